"""Model layer: the six training modes on every kind of data, resume, data parallel, CLI."""

import json
import math
import os
import shutil
import subprocess
import sys

import pytest
import torch

from savae_fast.app.cli import main as cli_main
from savae_fast.models import ImageVAE, TextVAE
from savae_fast.app.train import checkpoint
from savae_fast.app.train.config import MODES, TrainConfig
from savae_fast.app.train.loop import Trainer

TINY_TEXT = dict(latent_dim=3, embed_dim=8, hidden_dim=12, dropout=0.0, batch_size=8, epochs=1, svi_steps=3,
                 eval_samples=5, eval_elbo_samples=1, optimizer="adam", lr=1e-2, warmup_epochs=1,
                 max_batches_per_epoch=3)
TINY_SYNTHETIC = {"train": 48, "valid": 16, "test": 16}
TINY_IMAGES = dict(latent_dim=3, enc_channels=4, dec_channels=4, kernels=(3, 3), batch_size=16, epochs=1,
                   svi_steps=3, eval_samples=5, eval_elbo_samples=1, optimizer="adam", lr=1e-3,
                   max_batches_per_epoch=2)


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("text")
    gen = torch.Generator().manual_seed(0)
    words = [f"w{i}" for i in range(30)]
    for split, n in (("train", 40), ("valid", 12), ("test", 12)):
        lines = [" ".join(words[j] for j in torch.randint(0, 30, (int(torch.randint(3, 9, (1,), generator=gen)),),
                                                          generator=gen)) for _ in range(n)]
        (d / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return str(d)


def _check_results(res: dict, mode: str):
    assert math.isfinite(res["nll_bound"]) and res["nll_bound"] > 0
    assert math.isfinite(res["iw_nll"])
    if mode != "autoreg":
        assert res["kl"] >= 0 and "mutual_info" in res and 0 <= res["active_units"]


@pytest.mark.slow
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dataset", ["synthetic", "text", "digits"])
def test_every_mode_trains_and_evaluates(mode, dataset, tmp_path, text_dir):
    if dataset == "digits":
        kw = dict(TINY_IMAGES, dataset="digits")
    else:
        kw = dict(TINY_TEXT, dataset=dataset, synthetic=TINY_SYNTHETIC if dataset == "synthetic" else {},
                  data_path=text_dir if dataset == "text" else None)
    cfg = TrainConfig(**kw, mode=mode, out_dir=str(tmp_path / "run")).validate()
    trainer = Trainer(cfg, progress=False)
    before = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit()
    changed = [k for k, v in trainer.model.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "no parameter was updated"
    if mode == "svi":
        assert trainer.model.encoder is None
    elif mode != "autoreg":  # the encoder is trained in every other mode
        assert any(k.startswith("encoder.") for k in changed)
    res = trainer.test()
    _check_results(res, mode)
    for name in ("best.pt", "last.pt", "metrics.csv", "metrics.json", "results.json", "config.json"):
        assert os.path.exists(tmp_path / "run" / name), name
    if dataset == "synthetic":
        assert res["true_nll"] > 0


def test_resume_matches_uninterrupted_run(tmp_path):
    kw = dict(TINY_TEXT, dataset="synthetic", synthetic=TINY_SYNTHETIC, mode="savae", epochs=3,
              max_batches_per_epoch=None)
    full = Trainer(TrainConfig(**kw, out_dir=str(tmp_path / "full")).validate(), progress=False)
    full.fit()
    interrupted = Trainer(TrainConfig(**dict(kw, epochs=1), out_dir=str(tmp_path / "part")).validate(),
                          progress=False)
    interrupted.fit()  # writes last.pt after epoch 1, as a crash would leave it
    interrupted.close()  # (the crashed process's lock on the directory ends with it)
    resumed = Trainer(TrainConfig(**kw, out_dir=str(tmp_path / "part")).validate(), resume=True, progress=False)
    assert resumed.state["epoch"] == 1
    resumed.fit()
    assert [h["valid_nll_bound"] for h in resumed.state["history"]] == \
        [h["valid_nll_bound"] for h in full.state["history"]]
    for k, v in full.model.state_dict().items():
        assert torch.equal(v, resumed.model.state_dict()[k]), k


def test_checkpoint_atomic_and_corruption_detected(tmp_path):
    path = str(tmp_path / "ck.pt")
    checkpoint.save({"a": torch.arange(5)}, path)
    assert torch.equal(checkpoint.load(path)["a"], torch.arange(5))
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".tmp-")]
    data = open(path, "rb").read()
    open(path, "wb").write(data[: len(data) // 2])
    with pytest.raises(checkpoint.CheckpointError, match="truncated"):
        checkpoint.load(path)
    blob = torch.load(io_bytes(data), weights_only=False)
    blob["payload"] = blob["payload"][:-1] + bytes([blob["payload"][-1] ^ 1])
    torch.save(blob, path)
    with pytest.raises(checkpoint.CheckpointError, match="checksum"):
        checkpoint.load(path)


def io_bytes(data: bytes):
    import io

    return io.BytesIO(data)


def test_cli_user_errors_are_one_line_exit_2(tmp_path, capsys):
    assert cli_main(["train", "--dataset", "text", "--data-path", str(tmp_path / "missing"),
                     "--out-dir", str(tmp_path / "o"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not found" in err
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert cli_main(["eval", str(bad)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "checkpoint" in err
    assert cli_main(["train", "--mode", "nope", "--out-dir", str(tmp_path / "o")]) == 2
    assert "mode must be one of" in capsys.readouterr().err
    assert cli_main(["plot", str(tmp_path)]) == 2


def test_cli_train_eval_plot(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--mode", "vae", "--dataset", "synthetic", "--synthetic", json.dumps(TINY_SYNTHETIC),
            "--latent-dim", "2", "--embed-dim", "8", "--hidden-dim", "8", "--epochs", "2", "--batch-size", "16",
            "--optimizer", "adam", "--lr", "0.01", "--eval-samples", "4", "--out-dir", out, "--no-progress"]
    assert cli_main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["mode"] == "vae" and "iw_nll" in printed
    assert cli_main(["eval", os.path.join(out, "best.pt"), "--samples", "4"]) == 0
    assert "nll_bound" in json.loads(capsys.readouterr().out)
    assert cli_main(["plot", out]) == 0
    assert os.path.getsize(os.path.join(out, "curves.png")) > 1000


@pytest.mark.slow
def test_quick_demo_runs(tmp_path):
    from savae_fast.app.demo import run_demo

    rows = run_demo(str(tmp_path / "demo"), quick=True, progress=False)
    assert {(r["data"], r["mode"]) for r in rows} == {("synthetic", "vae"), ("synthetic", "svi"),
                                                     ("synthetic", "savae"), ("digits", "vae"), ("digits", "savae")}
    assert os.path.exists(tmp_path / "demo" / "synthetic_curves.png")


def test_pixelcnn_is_causal():
    model = ImageVAE(latent_dim=2, image_size=5, enc_channels=4, dec_channels=6, kernels=(5, 3, 3), cond_channels=2)
    x = (torch.rand(1, 1, 5, 5) < 0.5).float().requires_grad_(True)
    logits = model.decoder.logits(x, torch.randn(1, 2))
    for i in range(5):
        for j in range(5):
            (g,) = torch.autograd.grad(logits[0, 0, i, j], x, retain_graph=True)
            later = torch.zeros(5, 5, dtype=torch.bool)
            later.view(-1)[i * 5 + j:] = True
            assert torch.count_nonzero(g[0, 0][later]) == 0, (i, j)


def test_pixelcnn_activation_is_smooth_by_default_and_validated():
    """The FD Hessian-vector products need a smooth decoder: with the default GELU head,
    difference quotients of dNLL/dz converge to the exact Hessian-vector product."""
    from savae_fast.models import GatedPixelCNNDecoder

    dec = GatedPixelCNNDecoder(3, image_size=10, channels=8, kernels=(5, 3, 3), cond_channels=2).double()
    x = (torch.rand(8, 1, 10, 10) < 0.4).double()
    z = torch.randn(8, 3, dtype=torch.float64, requires_grad=True)
    u = torch.randn(8, 3, dtype=torch.float64)
    (gz,) = torch.autograd.grad(dec.nll(x, z).sum(), z, create_graph=True)
    (hvp,) = torch.autograd.grad(gz, z, u)

    def grad_at(h):
        zz = (z + h * u).detach().requires_grad_(True)
        return torch.autograd.grad(dec.nll(x, zz).sum(), zz)[0]

    errs = [((grad_at(h) - grad_at(-h)) / (2 * h) - hvp).norm().item() / hvp.norm().item() for h in (1e-2, 1e-3)]
    # second-order convergence (a ReLU head gives errors of order 1 here: units change sign)
    assert errs[0] < 1e-2 and errs[1] < errs[0] / 30, errs
    with pytest.raises(ValueError, match="'activation'"):
        GatedPixelCNNDecoder(3, activation="swish")


def test_models_plug_into_refine():
    import savae_fast as sf

    text = TextVAE(20, latent_dim=3, embed_dim=4, hidden_dim=5, dropout=0.0)
    x = torch.randint(1, 20, (4, 6))
    mu, logvar = text.encode(x)
    mu_k, _ = sf.refine(mu, logvar, lambda z: text.nll(x, z), text.decoder.parameters(), steps=2)
    mu_k.sum().backward()
    assert all(p.grad is not None for p in text.parameters())
    lm = TextVAE(20, latent_dim=0, embed_dim=4, hidden_dim=5)
    assert lm.nll(x).shape == (4,) and lm.encoder is None


@pytest.mark.slow
@pytest.mark.skipif(not torch.distributed.is_available() or shutil.which("torchrun") is None
                    and not os.path.exists(os.path.join(os.path.dirname(sys.executable), "torchrun")),
                    reason="torchrun not available")
@pytest.mark.parametrize("mode,hvp", [("savae", "fd_central"), ("vae+svi", "fd_central"), ("savae", "fd_adaptive")])
def test_two_process_gloo_matches_one_process(mode, hvp, tmp_path):
    """torchrun --nproc_per_node 2 (gloo): the parameter update equals one process on the same global batch,
    with inner clipping active (global clip norms across the processes). fd_adaptive: every process
    re-evaluates a reverse step when any example on any process needs it (same passes everywhere)."""
    common = ["--mode", mode, "--dataset", "synthetic", "--synthetic", json.dumps({"train": 8, "valid": 8, "test": 8}),
              "--latent-dim", "3", "--embed-dim", "8", "--hidden-dim", "8", "--dropout", "0", "--epochs", "1",
              "--batch-size", "8", "--optimizer", "sgd", "--lr", "0.5", "--svi-steps", "4", "--svi-max-grad-norm",
              "0.05", "--hvp", hvp, "--eval-samples", "2", "--eval-elbo-samples", "1", "--no-progress"]
    torchrun = shutil.which("torchrun") or os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    single = subprocess.run([sys.executable, "-m", "savae_fast.app.train", *common, "--out-dir", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    multi = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", "-m", "savae_fast.app.train", *common,
                            "--out-dir", str(tmp_path / "two")], capture_output=True, text=True, env=env, timeout=300)
    assert multi.returncode == 0, multi.stderr[-3000:]
    one = checkpoint.load(str(tmp_path / "one" / "last.pt"))
    two = checkpoint.load(str(tmp_path / "two" / "last.pt"))
    init = Trainer(TrainConfig.from_dict(dict(one["config"], out_dir=str(tmp_path / "init"))), progress=False)
    moved = 0
    for k, v in one["model"].items():
        torch.testing.assert_close(two["model"][k], v, rtol=1e-5, atol=1e-6, msg=k)
        moved += int(not torch.equal(v, init.model.state_dict()[k]))
    assert moved > 0


def test_optim_n2n_training_option_is_the_reference_on_one_batch(tmp_path):
    """--hvp optim_n2n: the savae objective's loss and gradients are reference.optim_n2n's (the
    authors' algorithm), with the same random draws."""
    from savae_fast.gaussian import gaussian_kl
    from savae_fast.reference import optim_n2n

    cfg = TrainConfig(**dict(TINY_TEXT, dataset="synthetic", synthetic=TINY_SYNTHETIC, mode="savae", hvp="optim_n2n",
                             out_dir=str(tmp_path / "run"))).validate()
    trainer = Trainer(cfg, progress=False)
    x = trainer.data.batches("train", cfg.batch_size, shuffle=False)[0]
    model, params = trainer.model, list(trainer.model.parameters())
    torch.manual_seed(7)
    out = trainer.objective(x, 0.6, x.shape[0], slice(None))
    got = torch.autograd.grad(out.loss, params, allow_unused=True)
    torch.manual_seed(7)
    mu0, logvar0 = model.encode(x)
    noise = torch.randn(cfg.svi_steps, x.shape[0], cfg.latent_dim)
    nll = lambda z: model.nll(x, z)  # noqa: E731
    mu_k, lv_k = optim_n2n(mu0, logvar0, nll, model.decoder.parameters(), noise=noise, steps=cfg.svi_steps,
                           lr=cfg.svi_lr, momentum=cfg.svi_momentum, max_grad_norm=cfg.svi_max_grad_norm, kl_weight=0.6)
    z = mu_k + torch.exp(0.5 * lv_k) * torch.randn_like(mu_k)
    want = torch.autograd.grad((model.nll(x, z) + 0.6 * gaussian_kl(mu_k, lv_k)).mean(), params, allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None) and (g is None or torch.equal(g, w))
    trainer.close()
    assert cli_main(["train", "--mode", "savae", "--hvp", "optim_n2n", "--dataset", "synthetic", "--synthetic",
                     json.dumps(TINY_SYNTHETIC), "--latent-dim", "2", "--embed-dim", "8", "--hidden-dim", "8",
                     "--epochs", "1", "--batch-size", "8", "--svi-steps", "2", "--eval-samples", "2",
                     "--out-dir", str(tmp_path / "cli"), "--no-progress"]) == 0
    assert cli_main(["train", "--mode", "vae", "--hvp", "optim_n2n", "--out-dir", str(tmp_path / "x")]) == 2
