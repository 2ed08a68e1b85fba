"""Bad input raises a clear error that names the argument."""

import pytest
import torch

import savae_fast as sf


def _ok():
    return torch.randn(4, 3), torch.randn(4, 3), lambda z: (z ** 2).sum(1)


@pytest.mark.parametrize(
    "change,exc,match",
    [
        (dict(mu=torch.randn(4)), ValueError, "'mu' must be 2-D"),
        (dict(logvar=torch.randn(4, 2)), ValueError, "'logvar' has shape"),
        (dict(mu=torch.randn(4, 3).half()), TypeError, "'mu' must be float32 or float64"),
        (dict(logvar=torch.randn(4, 3, dtype=torch.float64)), TypeError, "'logvar' has dtype"),
        (dict(mu=torch.randn(0, 3), logvar=torch.randn(0, 3)), ValueError, "batch >= 1"),
        (dict(mu="x"), TypeError, "'mu' must be a Tensor"),
        (dict(nll_fn=3), TypeError, "'nll_fn' must be callable"),
        (dict(params=[1.0]), TypeError, r"'params'\[0\] must be a Tensor"),
        (dict(steps=-1), ValueError, "'steps' must be >= 0"),
        (dict(steps=2.5), TypeError, "'steps' must be an int"),
        (dict(lr=0.0), ValueError, "'lr' must be > 0"),
        (dict(lr=(1.0, 2.0, 3.0)), ValueError, "'lr' must be a number or a pair"),
        (dict(momentum=1.0), ValueError, "'momentum' must be < 1"),
        (dict(momentum=float("nan")), ValueError, "'momentum' must be finite"),
        (dict(max_grad_norm=float("inf")), ValueError, "'max_grad_norm' must be finite"),
        (dict(kl_weight=-1.0), ValueError, "'kl_weight' must be >= 0"),
        (dict(reduction="none"), ValueError, "'reduction'"),
        (dict(hvp="central"), ValueError, "'hvp' must be one of"),
        (dict(fd_eps=0.0), ValueError, "'fd_eps' must be > 0"),
        (dict(fd_tol=1e-3), ValueError, "'fd_tol' applies to hvp='fd_adaptive' only"),
        (dict(hvp="fd_adaptive", fd_tol=0.0), ValueError, "'fd_tol' must be > 0"),
        (dict(hvp="fd_adaptive", fd_tol=2.0), ValueError, "'fd_tol' must be <= 1"),
        (dict(hvp="fd_adaptive", fd_tol="1e-3"), TypeError, "'fd_tol' must be a real number"),
        (dict(noise=torch.randn(2, 4, 3)), ValueError, "'noise' must have shape"),
        (dict(noise=torch.randn(20, 4, 3, dtype=torch.float64)), TypeError, "'noise' has dtype"),
        (dict(backend="fast"), ValueError, "'backend' must be one of"),
        (dict(nll_fn=lambda z: z.sum()), ValueError, r"shape \[4\]"),
        (dict(nll_fn=lambda z: z), ValueError, "do not reduce over the batch|shape"),
    ],
)
def test_refine_rejects(change, exc, match):
    mu, logvar, nll_fn = _ok()
    kw = dict(mu=mu, logvar=logvar, nll_fn=nll_fn)
    kw.update(change)
    with pytest.raises(exc, match=match):
        sf.refine(kw.pop("mu"), kw.pop("logvar"), kw.pop("nll_fn"), **kw)


def test_auto_backend_falls_back_with_one_warning(monkeypatch):
    from savae_fast import ops

    monkeypatch.setattr(ops, "available", lambda device: False)
    monkeypatch.setattr(ops, "_fallback_warned", False)
    with pytest.warns(RuntimeWarning, match="pure-PyTorch"):
        assert ops.get_backend("auto", "cpu").name == "torch"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert ops.get_backend("auto", "cpu").name == "torch"  # no second warning


def test_model_entry_points_reject_bad_inputs():
    from savae_fast.models import ImageVAE, TextVAE

    text = TextVAE(10, latent_dim=2, embed_dim=4, hidden_dim=4)
    with pytest.raises(ValueError, match="'x' must be a \\[batch, length\\] integer"):
        text.nll(torch.randn(3, 5), torch.randn(3, 2))
    with pytest.raises(ValueError, match="outside \\[0, 10\\)"):
        text.encode(torch.full((3, 5), 12))
    with pytest.raises(ValueError, match="'z' must be a float \\[3, 2\\]"):
        text.nll(torch.randint(0, 10, (3, 5)), torch.randn(3, 3))
    with pytest.raises(ValueError, match="at least 2 tokens"):
        text.nll(torch.randint(0, 10, (3, 1)), torch.randn(3, 2))
    image = ImageVAE(latent_dim=2, image_size=8, enc_channels=4, dec_channels=4, kernels=(3,))
    with pytest.raises(ValueError, match="\\[batch, 1, 8, 8\\]"):
        image.nll(torch.rand(2, 1, 7, 7), torch.randn(2, 2))
    with pytest.raises(ValueError, match="'z' is required"):
        image.nll(torch.rand(2, 1, 8, 8))


@pytest.mark.parametrize("fd_eps", [1e3, 1e10, 1.5, 1e-13, 1e-30, 1e-300])
def test_refine_rejects_fd_eps_outside_its_range(fd_eps):
    """A relative step above 1 or below 1e-12 gives gradients wrong by orders of magnitude."""
    mu, logvar, nll_fn = _ok()
    with pytest.raises(ValueError, match=r"'fd_eps' must be in \[1e-12, 1\]"):
        sf.refine(mu, logvar, nll_fn, fd_eps=fd_eps)


@pytest.mark.parametrize("name", ["mu", "logvar", "noise"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_refine_rejects_non_finite_inputs_up_front(name, bad):
    mu, logvar, nll_fn = _ok()
    kw = dict(mu=mu, logvar=logvar, noise=torch.randn(3, 4, 3))
    kw[name] = kw[name].clone()
    kw[name].view(-1)[5] = bad
    with pytest.raises(ValueError, match=f"'{name}' has non-finite values"):
        sf.refine(kw.pop("mu"), kw.pop("logvar"), nll_fn, steps=3, **kw)
    # on_nonfinite="ignore" (CUDA-graph capture) does no host read, and so no check
    kw = dict(mu=mu, logvar=logvar, noise=torch.randn(3, 4, 3))
    kw[name] = kw[name].clone()
    kw[name].view(-1)[5] = bad
    sf.refine(kw.pop("mu"), kw.pop("logvar"), nll_fn, steps=3, on_nonfinite="ignore", **kw)


@pytest.mark.parametrize("hvp", ["fd_forward", "fd_central", "exact", "jvp"])
@pytest.mark.parametrize("how", ["no_grad", "inference_mode", "detach"])
def test_decoder_without_a_graph_to_z_is_an_error(how, hvp):
    """A decoder that computes without autograd (or detaches z) would give dNLL/dz = 0: the
    refinement would silently ignore it."""
    mu, logvar, _ = _ok()
    w = torch.randn(3, requires_grad=True)
    ctx = {"no_grad": torch.no_grad, "inference_mode": torch.inference_mode}

    def nll_fn(z):
        if how == "detach":
            return ((z.detach() * w) ** 2).sum(1)
        with ctx[how]():
            return ((z * w) ** 2).sum(1)

    with pytest.raises(RuntimeError, match="no autograd graph back to z"):
        mu_k, lv_k = sf.refine(mu.requires_grad_(), logvar, nll_fn, [w], steps=3, hvp=hvp)
        (mu_k.sum() + lv_k.sum()).backward()


def test_refine_under_inference_mode_equals_no_grad():
    """refine called under torch.inference_mode computes the same refinement as under no_grad
    (its decoder gradients need autograd, which it enables for them)."""
    mu, logvar, nll_fn = _ok()
    noise = torch.randn(5, 4, 3)
    with torch.no_grad():
        expected = sf.refine(mu, logvar, nll_fn, steps=5, noise=noise)
    with torch.inference_mode():
        got = sf.refine(mu, logvar, nll_fn, steps=5, noise=noise)
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    assert not torch.equal(got[0], mu)  # the decoder moved it


def test_process_group_must_be_a_process_group_of_an_initialised_torch_distributed(tmp_path):
    """It was accepted and ignored (the refinement silently ran as one process)."""
    import torch.distributed as dist

    mu = torch.zeros(3, 2, requires_grad=True)
    dec = lambda z: (z ** 2).sum(1)  # noqa: E731
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="'process_group' was given but torch.distributed is not initialised"):
        sf.refine(mu, torch.zeros_like(mu), dec, (), steps=2, process_group=object())
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(TypeError, match="'process_group' must be a torch.distributed.ProcessGroup or None"):
            sf.refine(mu, torch.zeros_like(mu), dec, (), steps=2, process_group=object())
        sf.refine(mu, torch.zeros_like(mu), dec, (), steps=2, process_group=dist.group.WORLD)
    finally:
        dist.destroy_process_group()


def test_capture_refuses_modes_that_read_device_values(monkeypatch):
    """fd_adaptive decides on the host whether to evaluate a reverse step again: inside a CUDA
    graph capture refine refuses it by name before anything is recorded (the capture itself
    needs a GPU: tests/test_gpu_features.py; here the check, with capture reported on)."""
    import dataclasses
    import types

    from savae_fast.refine.hvp import HVP_METHODS
    from savae_fast.refine.validation import check_capture, make_config

    cfg = make_config(torch.zeros(2, 3), steps=2, lr=1.0, momentum=0.5, max_grad_norm=5.0, kl_weight=1.0,
                      reduction="mean", hvp="fd_adaptive", fd_eps=None, preserve_rng_state=False,
                      on_nonfinite="ignore")
    assert cfg.fd_tol > 0
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    on_gpu = types.SimpleNamespace(device=torch.device("cuda"))
    with pytest.raises(RuntimeError, match="hvp='fd_adaptive'.*hvp='fd_richardson'"):
        check_capture(cfg, on_gpu)
    check_capture(dataclasses.replace(cfg, hvp=HVP_METHODS["fd_richardson"]), on_gpu)  # the same passes, fixed
