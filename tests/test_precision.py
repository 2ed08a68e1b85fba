"""The decoder's real precision: TF32 detection, TF32 difference steps, fp32_precision="ieee".

A GPU's TF32 is reproduced on CPU by decoders whose products are rounded to TF32 while the
CPU's own TF32 setting (torch.backends.mkldnn.matmul.fp32_precision) is "tf32"
(helpers.tf32_matmul); the same code paths then run as on a GPU with cuDNN's TF32 default.
"""

import warnings

import pytest
import torch

from savae_fast.testing import cpu_tf32_enabled, make_problem, max_rel_err, refine_grads, reference_grads, round_to_tf32
from savae_fast.refine import precision
from savae_fast.refine.validation import DEFAULT_FD_EPS, make_config

SETTINGS = ("mkldnn", "mkldnn.matmul", "mkldnn.conv", "mkldnn.rnn", "cuda.matmul", "cudnn", "cudnn.conv",
            "cudnn.rnn")


def _setting(path):
    obj = torch.backends
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@pytest.fixture
def cpu_tf32(monkeypatch):
    """CPU float32 products in TF32 for the test (the emulating decoders follow the setting);
    every precision setting restored after, and refine's warn-once flag reset."""
    saved = {path: _setting(path).fp32_precision for path in SETTINGS}
    monkeypatch.setattr(precision, "_warned", False)
    torch.backends.mkldnn.matmul.fp32_precision = "tf32"
    yield
    for path, value in saved.items():
        _setting(path).fp32_precision = value


def _config(mu, hvp, **kw):
    return make_config(mu, steps=3, lr=1.0, momentum=0.5, max_grad_norm=5.0, kl_weight=1.0, reduction="mean",
                       hvp=hvp, fd_eps=None, preserve_rng_state=False, **kw)


def test_tf32_rounding_emulation():
    x = torch.randn(10000) * torch.logspace(-20, 20, 10000)
    r = round_to_tf32(x)
    assert ((r - x).abs() <= x.abs() * 2.0 ** -11).all()  # half an ulp of a 10-bit mantissa
    assert ((r.view(torch.int32) & 0x1FFF) == 0).all()
    assert (r - x).abs().max() > 0


def test_reduced_precision_settings_are_detected(cpu_tf32):
    mu = torch.zeros(2, 3)
    assert precision.reduced_fp32_settings("cpu") == {"torch.backends.mkldnn.matmul.fp32_precision": "tf32"}
    assert precision.decoder_precision(mu) == precision.TF32
    assert precision.decoder_precision(mu.double()) == torch.float64  # TF32 is a float32 matter
    assert precision.decoder_precision(mu, full_fp32=True) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast decides when it is on
        assert precision.decoder_precision(mu) == torch.bfloat16
    for hvp in ("fd_forward", "fd_central"):
        assert _config(mu, hvp).fd_eps == DEFAULT_FD_EPS[(hvp, precision.TF32)]
        assert _config(mu, hvp, fp32_precision="ieee").fd_eps == DEFAULT_FD_EPS[(hvp, torch.float32)]
    # a leaf set to "none" inherits its parent's setting
    torch.backends.mkldnn.matmul.fp32_precision = "none"
    assert precision.reduced_fp32_settings("cpu") == {}
    torch.backends.mkldnn.fp32_precision = "bf16"
    assert set(precision.reduced_fp32_settings("cpu").values()) == {"bf16"}
    assert precision.decoder_precision(mu) == torch.bfloat16
    with pytest.raises(ValueError, match="'fp32_precision'"):
        _config(mu, "fd_forward", fp32_precision="tf32")


def test_full_fp32_switches_off_and_restores_even_on_error(cpu_tf32):
    torch.backends.mkldnn.conv.fp32_precision = "bf16"
    with pytest.raises(KeyError):
        with precision.full_fp32("cpu"):
            assert precision.reduced_fp32_settings("cpu") == {}
            assert not cpu_tf32_enabled()
            raise KeyError("decoder failed")
    assert torch.backends.mkldnn.matmul.fp32_precision == "tf32"
    assert torch.backends.mkldnn.conv.fp32_precision == "bf16"


def test_refine_warns_once_naming_the_fix(cpu_tf32):
    p = make_problem("tf32_mlp", torch.float32, batch=4, latent=3, steps=2)
    with pytest.warns(UserWarning, match="fp32_precision='ieee'"):
        refine_grads(p)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refine_grads(p)  # once per process
        refine_grads(p.to(torch.float64))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["tf32_mlp", "tf32_lstm"])
@pytest.mark.parametrize("hvp,tf32_bound", [("fd_forward", 1.2e-1), ("fd_central", 1.5e-2), ("fd_richardson", 2e-2),
                                             ("fd_adaptive", 2e-2), ("exact", 2e-3)])
def test_tf32_decoder_accuracy(kind, hvp, tf32_bound, cpu_tf32, seed):
    """Under TF32 the default steps follow it (errors 10-40x smaller than with the float32
    steps; worst seen over 12 draws: fd_forward 6e-2, fd_central 5e-3, exact 7e-4; over 40 draws
    fd_central 9.0e-3, fd_richardson 7.8e-3, fd_adaptive 4.0e-3, and one draw fd_richardson 1.04e-2
    against a bound of 1e-2: the Richardson bounds are 2e-2); fp32_precision="ieee" gives back the float32 accuracy (within 3x of the
    error with TF32 off). The objective is a fixed linear function of lambda_K, so that the
    errors are refine's (a final ELBO computed in TF32 has its own error, ~4e-4 here)."""
    p = make_problem(kind, torch.float32, batch=32, latent=8, steps=20)
    _, ref = reference_grads(p, objective="linear")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        _, tf32 = refine_grads(p, objective="linear", hvp=hvp)
        _, ieee = refine_grads(p, objective="linear", hvp=hvp, fp32_precision="ieee")
    assert cpu_tf32_enabled()  # restored after refine
    torch.backends.mkldnn.matmul.fp32_precision = "none"
    _, off = refine_grads(p, objective="linear", hvp=hvp)
    err_tf32, err_ieee, err_off = (max_rel_err(g, ref)[0] for g in (tf32, ieee, off))
    assert err_tf32 <= tf32_bound, f"seed={seed} {err_tf32:.2e}"
    assert err_ieee <= 3 * err_off, f"seed={seed} ieee {err_ieee:.2e} vs TF32 off {err_off:.2e}"
    if hvp != "exact":  # the TF32 steps matter: the float32 ones are far worse under TF32
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.backends.mkldnn.matmul.fp32_precision = "tf32"
            _, fp32_steps = refine_grads(p, objective="linear", hvp=hvp,
                                         fd_eps=DEFAULT_FD_EPS[(hvp, torch.float32)])
        assert max_rel_err(fp32_steps, ref)[0] > 2 * err_tf32


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hvp", ["fd_forward", "fd_central", "fd_richardson", "fd_adaptive"])
def test_cuda_default_tf32_and_full_precision(hvp, seed, monkeypatch):
    """The bundled (cuDNN) LSTM decoder with PyTorch's default settings (cuDNN TF32 on):
    fp32_precision="ieee" is within 3x of the error with TF32 switched off globally (the
    refinement's gradient; whole-step numbers are printed for the record)."""
    monkeypatch.setattr(precision, "_warned", False)
    p = make_problem("lstm", torch.float32, batch=32, latent=8, steps=20).to(device="cuda")
    errs = {}
    for objective in ("linear", "elbo"):
        _, ref = reference_grads(p, objective=objective)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _, default = refine_grads(p, objective=objective, hvp=hvp)
        _, ieee = refine_grads(p, objective=objective, hvp=hvp, fp32_precision="ieee")
        with precision.full_fp32("cuda"):
            _, off = refine_grads(p, objective=objective, hvp=hvp)
        errs[objective] = [max_rel_err(g, ref)[0] for g in (default, ieee, off)]
        print(f"{hvp} {objective}: default (TF32) {errs[objective][0]:.2e}, "
              f"fp32_precision='ieee' {errs[objective][1]:.2e}, TF32 off {errs[objective][2]:.2e}")
    err_default, err_ieee, err_off = errs["linear"]
    assert err_ieee <= 3 * err_off, f"seed={seed}"
    assert err_default <= {"fd_forward": 1.2e-1, "fd_central": 1.5e-2, "fd_richardson": 1e-2, "fd_adaptive": 1e-2}[hvp], \
        f"seed={seed}"
    monkeypatch.setattr(precision, "_warned", False)
    with pytest.warns(UserWarning, match="fp32_precision='ieee'"):
        refine_grads(p, hvp=hvp)
