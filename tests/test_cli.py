"""The command line with bad input: one line naming the problem on stderr, exit status 2,
and nothing written that a later run would misread. Also what a run tells the user
(notes about the data, progress in logs, the long final evaluation)."""

import gzip
import json
import os
import stat
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from savae_fast.app.cli import main as cli_main
from savae_fast.app.data.text import TextCorpus
from savae_fast.app.train.metrics import Progress

TINY_SYNTHETIC = json.dumps({"train": 32, "valid": 8, "test": 8})
TINY = ["--latent-dim", "2", "--embed-dim", "8", "--hidden-dim", "8", "--epochs", "1", "--batch-size", "8",
        "--optimizer", "adam", "--lr", "0.01", "--svi-steps", "2", "--eval-samples", "2", "--eval-elbo-samples", "1",
        "--no-progress"]


def _one_line_error(capsys, code, *needles):
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.count("\n") == 0, err
    assert ": error: " in err and all(n in err for n in needles), err
    return err


def _write_text(d, lines_per_split=None, words=30, seed=0, extra_train=()):
    os.makedirs(d, exist_ok=True)
    gen = np.random.default_rng(seed)
    for split, n in (lines_per_split or {"train": 24, "valid": 8, "test": 8}).items():
        lines = [" ".join(f"w{j}" for j in gen.integers(0, words, gen.integers(3, 8))) for _ in range(n)]
        if split == "train":
            lines += list(extra_train)
        with open(os.path.join(d, f"{split}.txt"), "w") as f:
            f.write("\n".join(lines) + "\n")
    return str(d)


BAD_TRAIN_OPTIONS = [
    (["--svi-momentum", "1.0"], "svi_momentum"),
    (["--hvp", "bogus"], "hvp must be one of"),
    (["--backend", "bogus"], "backend must be one of"),
    (["--svi-max-grad-norm", "nan"], "svi_max_grad_norm"),
    (["--svi-lr", "inf"], "svi_lr"),
    (["--warmup-start", "-5"], "warmup_start"),
    (["--max-batches-per-epoch", "-1"], "max_batches_per_epoch"),
    (["--synthetic", '{"bogus": 1}'], "unknown fields ['bogus']"),
    (["--synthetic", "[1]"], "must be a JSON object"),
    (["--synthetic", '{"train": 0}'], "train must be >= 1"),
    (["--synthetic", '{"vocab_size": 2.5}'], "vocab_size must be an integer"),
    (["--hidden-dim", "0"], "hidden_dim"),
    (["--embed-dim", "-1"], "embed_dim"),
    (["--max-length", "0"], "max_length"),
    (["--device", "bogus"], "device"),
    (["--epochs", "x"], "--epochs"),
]


@pytest.mark.parametrize("options,needle", BAD_TRAIN_OPTIONS, ids=[" ".join(o) for o, _ in BAD_TRAIN_OPTIONS])
def test_bad_train_option_is_one_line_exit_2(tmp_path, capsys, options, needle):
    out = tmp_path / "run"
    code = cli_main(["train", "--dataset", "synthetic", "--synthetic", TINY_SYNTHETIC, *TINY, "--out-dir", str(out),
                     *options])
    _one_line_error(capsys, code, needle)
    assert not out.exists()  # found before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_device_without_a_gpu(tmp_path, capsys):
    code = cli_main(["train", "--synthetic", TINY_SYNTHETIC, *TINY, "--device", "cuda", "--out-dir",
                     str(tmp_path / "run")])
    _one_line_error(capsys, code, "no CUDA GPU")


def test_out_dir_naming_a_file(tmp_path, capsys):
    f = tmp_path / "a_file"
    f.write_text("keep me")
    code = cli_main(["train", "--synthetic", TINY_SYNTHETIC, *TINY, "--out-dir", str(f)])
    _one_line_error(capsys, code, "names a file")
    assert f.read_text() == "keep me"


def test_eval_bad_samples(tmp_path, capsys):
    code = cli_main(["train", "--mode", "vae", "--synthetic", TINY_SYNTHETIC, *TINY, "--out-dir", str(tmp_path)])
    assert code == 0
    capsys.readouterr()
    for bad in ("-5", "0", "x"):
        code = cli_main(["eval", str(tmp_path / "best.pt"), "--samples", bad])
        _one_line_error(capsys, code, "--samples", "positive integer")


def test_text_directory_without_test_file_fails_before_training(tmp_path, capsys):
    d = _write_text(tmp_path / "text", {"train": 24, "valid": 8})
    code = cli_main(["train", "--dataset", "text", "--data-path", d, *TINY, "--out-dir", str(tmp_path / "run")])
    _one_line_error(capsys, code, "lacks test.txt")
    assert not (tmp_path / "run" / "config.json").exists()


def _train_text(tmp_path, data, out, *extra):
    return cli_main(["train", "--mode", "savae", "--dataset", "text", "--data-path", data, *TINY, "--out-dir", out,
                     *extra])


def test_rejected_resume_keeps_the_run_and_names_the_difference(tmp_path, capsys):
    out = str(tmp_path / "run")
    data = _write_text(tmp_path / "a", seed=0)
    assert _train_text(tmp_path, data, out) == 0
    config_before = open(os.path.join(out, "config.json")).read()
    last_before = open(os.path.join(out, "last.pt"), "rb").read()
    capsys.readouterr()

    # other data with another vocabulary size (this was a size-mismatch traceback)
    other_vocab = _write_text(tmp_path / "b", words=50, seed=1)
    _one_line_error(capsys, _train_text(tmp_path, other_vocab, out, "--resume", "--epochs", "2"), "different data")
    # other data of the same vocabulary size (this was accepted silently)
    same_vocab = _write_text(tmp_path / "c", seed=2)
    assert len(TextCorpus.from_files(*(os.path.join(same_vocab, f"{s}.txt") for s in ("train", "valid", "test")))
               .vocab) == len(TextCorpus.from_files(*(os.path.join(data, f"{s}.txt")
                                                      for s in ("train", "valid", "test"))).vocab)
    _one_line_error(capsys, _train_text(tmp_path, same_vocab, out, "--resume", "--epochs", "2"), "different data")
    # a changed option that changes what is computed
    _one_line_error(capsys, _train_text(tmp_path, data, out, "--resume", "--epochs", "2", "--svi-lr", "0.5"),
                    "svi_lr=1.0", "svi_lr=0.5")
    assert open(os.path.join(out, "config.json")).read() == config_before
    assert open(os.path.join(out, "last.pt"), "rb").read() == last_before
    # the same data from another directory, more epochs: accepted
    moved = tmp_path / "moved"
    os.rename(data, moved)
    assert _train_text(tmp_path, str(moved), out, "--resume", "--epochs", "2") == 0


def test_resume_with_other_synthetic_data_is_refused(tmp_path, capsys):
    out = str(tmp_path / "run")
    args = ["train", "--mode", "vae", *TINY, "--out-dir", out]
    assert cli_main([*args, "--synthetic", TINY_SYNTHETIC]) == 0
    capsys.readouterr()
    other = json.dumps({"train": 32, "valid": 8, "test": 8, "seed": 5})
    _one_line_error(capsys, cli_main([*args, "--synthetic", other, "--resume", "--epochs", "2"]), "synthetic")


def test_checkpoints_have_the_mode_of_other_run_files(tmp_path):
    out = tmp_path / "run"
    assert cli_main(["train", "--mode", "vae", "--synthetic", TINY_SYNTHETIC, *TINY, "--out-dir", str(out)]) == 0
    mode = lambda name: stat.S_IMODE(os.stat(out / name).st_mode)  # noqa: E731
    assert mode("best.pt") == mode("last.pt") == mode("config.json") == mode("metrics.csv")


def _mnist_args(tmp_path, path):
    return ["train", "--mode", "vae", "--dataset", "mnist", "--data-path", str(path), *TINY,
            "--out-dir", str(tmp_path / "run")]


def _idx(path, n, truncate=0):
    data = (2051).to_bytes(4, "big") + n.to_bytes(4, "big") + (28).to_bytes(4, "big") + (28).to_bytes(4, "big")
    data += bytes(n * 784 - truncate)
    with gzip.open(path, "wb") as f:
        f.write(data)


@pytest.mark.parametrize("case", ["npz_without_x_test", "garbage_npz", "truncated_idx", "too_few_images"])
def test_bad_mnist_files(tmp_path, capsys, case):
    if case == "npz_without_x_test":
        path = tmp_path / "mnist.npz"
        np.savez(path, x_train=np.zeros((10010, 28, 28), np.uint8))
        needle = "lacks x_test"
    elif case == "garbage_npz":
        path = tmp_path / "mnist.npz"
        path.write_bytes(b"this is not a zip file" * 10)
        needle = "not a readable mnist.npz"
    else:
        path = tmp_path / "idx"
        path.mkdir()
        _idx(path / "t10k-images-idx3-ubyte.gz", 3)
        if case == "truncated_idx":
            _idx(path / "train-images-idx3-ubyte.gz", 10010, truncate=100)
            needle = "truncated"
        else:
            _idx(path / "train-images-idx3-ubyte.gz", 50)
            needle = "50 training"
    _one_line_error(capsys, cli_main(_mnist_args(tmp_path, path)), needle)


def test_plot_without_matplotlib_is_one_line(tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    assert cli_main(["train", "--mode", "vae", "--synthetic", TINY_SYNTHETIC, *TINY, "--out-dir", str(out)]) == 0
    capsys.readouterr()
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import fails as if not installed
    _one_line_error(capsys, cli_main(["plot", str(out)]), "needs matplotlib")


def test_a_very_long_line_is_left_out_with_a_note(tmp_path, capsys):
    """A 20,000-token line made training crawl with no message; it is now left out, and said."""
    data = _write_text(tmp_path / "text", extra_train=[" ".join(["w1"] * 20000)])
    assert _train_text(tmp_path, data, str(tmp_path / "run")) == 0
    err = capsys.readouterr().err
    assert "train.txt: left out 1 of 25 sentences longer than 500 words (the longest has 20000" in err


def test_literal_reserved_tokens_are_words_not_padding(tmp_path, capsys):
    data = _write_text(tmp_path / "text", extra_train=["a <pad> b", "<s> c </s>"])
    paths = [os.path.join(data, f"{s}.txt") for s in ("train", "valid", "test")]
    corpus = TextCorpus.from_files(*paths)
    train = corpus.splits["train"]
    pad_row, bos_row = train[-2], train[-1]
    unk = corpus.vocab.stoi["<unk>"]
    assert pad_row[2] == unk and 0 not in pad_row  # counted in the loss (padding id 0 is not)
    assert bos_row[1] == unk and bos_row[3] == unk
    assert any("3 occurrence(s) of the reserved tokens" in n for n in corpus.notes)


def test_progress_in_a_log_is_a_few_plain_lines(capsys):
    bar = Progress(True, 1000, "savae epoch 1/1", interval=3600.0)
    for _ in range(1000):
        bar.update(loss="1.00")
    bar.close()
    err = capsys.readouterr().err
    assert "\r" not in err
    assert err.strip().splitlines() == [l for l in err.strip().splitlines() if "1000/1000" in l]  # only the last


def test_final_evaluation_is_announced_without_progress(tmp_path, capsys):
    assert cli_main(["train", "--mode", "savae", "--synthetic", TINY_SYNTHETIC, *TINY, "--out-dir",
                     str(tmp_path / "run")]) == 0
    err = capsys.readouterr().err
    assert "testing best.pt on the test split (8 examples, 1 batches, 2 importance samples per example)" in err


def test_training_progress_without_tqdm(capsys, monkeypatch):
    """tqdm is optional: on a terminal without it, progress is plain lines (it crashed)."""
    monkeypatch.setitem(sys.modules, "tqdm", None)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True, raising=False)
    bar = Progress(True, 3, "vae epoch 1/1", interval=0.0)
    for _ in range(3):
        bar.update(loss="2.00")
    bar.close()
    assert capsys.readouterr().err.count("vae epoch 1/1: ") == 3


def test_omniglot_without_scipy_is_one_line(tmp_path, capsys, monkeypatch):
    path = tmp_path / "chardata.mat"
    path.write_bytes(b"x")
    monkeypatch.setitem(sys.modules, "scipy.io", None)
    code = cli_main(["train", "--mode", "vae", "--dataset", "omniglot", "--data-path", str(path), *TINY,
                     "--out-dir", str(tmp_path / "run")])
    _one_line_error(capsys, code, "needs SciPy")


# ------------------------------------------------------------------ the run directory
def _synthetic_train(out, *extra):
    return cli_main(["train", "--mode", "vae", "--synthetic", TINY_SYNTHETIC, *TINY, "--out-dir", str(out), *extra])


def test_a_second_run_on_a_directory_in_use_is_refused(tmp_path, capsys):
    from savae_fast.app.train.loop import RunDirectory

    other = RunDirectory(str(tmp_path / "run"))
    other.claim()  # another run holds the directory
    try:
        _one_line_error(capsys, _synthetic_train(tmp_path / "run"), "is in use by another savae-fast run", "pid")
        assert not (tmp_path / "run" / "config.json").exists()
    finally:
        other.release()
    assert _synthetic_train(tmp_path / "run") == 0


def test_a_fresh_run_in_a_run_directory_is_refused_unless_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert _synthetic_train(out) == 0
    rows = (out / "metrics.csv").read_text()
    last = (out / "last.pt").read_bytes()
    capsys.readouterr()
    _one_line_error(capsys, _synthetic_train(out), "holds a run already", "--resume", "--overwrite")
    _one_line_error(capsys, _synthetic_train(out, "--epochs", "0"), "holds a run already")
    assert (out / "metrics.csv").read_text() == rows and (out / "last.pt").read_bytes() == last
    assert _synthetic_train(out, "--overwrite", "--seed", "7") == 0
    assert (out / "metrics.csv").read_text().count("\n") == 2  # header and one epoch, not appended


def test_unwritable_out_dir_is_one_line(tmp_path, capsys, monkeypatch):
    import errno

    from savae_fast.app.train import loop

    out = tmp_path / "run"
    out.mkdir()
    real_open = open

    def read_only(path, *a, **k):
        if str(path).startswith(str(out)) and (a[:1] and any(m in a[0] for m in "wa+")):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *a, **k)

    monkeypatch.setattr("builtins.open", read_only)
    _one_line_error(capsys, _synthetic_train(out), "cannot write to out_dir", "Read-only file system")
    monkeypatch.setattr("builtins.open", real_open)

    def full_disk(obj, path):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(loop.checkpoint, "save", full_disk)
    _one_line_error(capsys, _synthetic_train(tmp_path / "full"), "No space left on device", "no epoch was saved")


def test_metrics_after_a_crash_between_metrics_and_last_pt(tmp_path, capsys, monkeypatch):
    """A crash after epoch 2's metrics row but before its last.pt: the resumed run's metrics have
    one row per epoch (the crash left a duplicate of epoch 2's row)."""
    from savae_fast.app.train import loop

    out = tmp_path / "run"
    real = loop.Trainer._save_last

    def crash_at_epoch_2(self):
        if self.state["epoch"] == 2:
            raise KeyboardInterrupt
        real(self)

    monkeypatch.setattr(loop.Trainer, "_save_last", crash_at_epoch_2)
    assert _synthetic_train(out, "--epochs", "3") == 130
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "holds epoch 1 of 3" in err and "--resume" in err, err
    monkeypatch.setattr(loop.Trainer, "_save_last", real)
    assert _synthetic_train(out, "--epochs", "3", "--resume") == 0
    epochs = [line.split(",")[0] for line in (out / "metrics.csv").read_text().splitlines()[1:]]
    assert epochs == ["1", "2", "3"]


@pytest.mark.slow
def test_ctrl_c_prints_one_line_and_resume_is_exact(tmp_path):
    """SIGINT to a real training process: exit 130 and one line saying how to continue (that
    resuming is exact: tests/test_training.py)."""
    import signal
    import subprocess
    import time

    out = tmp_path / "run"
    args = [sys.executable, "-m", "savae_fast.app.train", "--mode", "vae", "--synthetic",
            json.dumps({"train": 256, "valid": 8, "test": 8}), *[a for a in TINY if a != "--no-progress"],
            "--no-progress", "--epochs", "100000", "--out-dir", str(out)]  # (runs until interrupted)
    # (a process started in the background by a shell without job control inherits SIGINT
    # ignored, and Python then installs no KeyboardInterrupt handler: give the child the default)
    proc = subprocess.Popen(args, stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 240
        while not (out / "last.pt").exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.2)
        time.sleep(0.3)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("savae-fast train: interrupted"), err
    assert "--resume" in err


def test_fifo_as_a_data_file_is_named(tmp_path, capsys):
    d = _write_text(tmp_path / "text", {"train": 24, "test": 8})
    os.mkfifo(os.path.join(d, "valid.txt"))
    code = cli_main(["train", "--dataset", "text", "--data-path", d, *TINY, "--out-dir", str(tmp_path / "run")])
    _one_line_error(capsys, code, "valid.txt is not a regular file")


def test_eval_refuses_a_checkpoint_of_other_data(tmp_path, capsys):
    data = _write_text(tmp_path / "a", seed=0)
    out = tmp_path / "run"
    assert _train_text(tmp_path, data, str(out)) == 0
    capsys.readouterr()
    _write_text(tmp_path / "a", seed=2)  # edited in place, the same vocabulary size (as seed 0)
    _one_line_error(capsys, cli_main(["eval", str(out / "best.pt")]), "trained on other data", "--other-data")
    assert cli_main(["eval", str(out / "best.pt"), "--other-data"]) == 0
    assert "on other data than it was trained on" in capsys.readouterr().err


BAD_CONFIG_FILES = [(b"[1, 2]", "got list"), (b'"savae"', "got str"), (b"null", "got null"),
                    (b"\xff\xfe{}", "not UTF-8"), (b"{bad", "not valid JSON")]


@pytest.mark.parametrize("content,needle", BAD_CONFIG_FILES, ids=[n for _, n in BAD_CONFIG_FILES])
def test_bad_config_file_is_one_line(tmp_path, capsys, content, needle):
    path = tmp_path / "config.json"
    path.write_bytes(content)
    _one_line_error(capsys, cli_main(["train", "--config", str(path), "--out-dir", str(tmp_path / "run")]), needle)


@pytest.mark.parametrize("options,needle", [(["--svi-steps", "1000000000", "--mode", "savae"], "svi_steps"),
                                            (["--hidden-dim", "10000000"], "--hidden-dim")])
def test_sizes_beyond_memory_are_one_line_before_anything_is_written(tmp_path, capsys, options, needle):
    out = tmp_path / "run"
    code = cli_main(["train", "--synthetic", TINY_SYNTHETIC, *TINY, "--out-dir", str(out), *options])
    _one_line_error(capsys, code, needle, "GiB")
    assert not (out / "config.json").exists()


# ------------------------------------------------------------------ threads
def test_default_threads_rule():
    """benchmarks/results/*_threads.md: small text models one thread; otherwise the cores idle
    at the start less one, at least one."""
    from savae_fast.app.threads import auto_threads
    from savae_fast.app.train.config import TrainConfig

    small = TrainConfig(dataset="synthetic", hidden_dim=64)
    large = TrainConfig(dataset="synthetic", hidden_dim=256)
    digits = TrainConfig(dataset="digits")
    assert auto_threads(small, cores=16, load=0.0) == 1
    assert auto_threads(large, cores=2, load=0.0) == 1
    assert auto_threads(digits, cores=16, load=0.0) == 15
    assert auto_threads(large, cores=16, load=10.3) == 5
    assert auto_threads(large, cores=16, load=40.0) == 1


def test_train_sets_its_threads(tmp_path):
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert _synthetic_train(tmp_path / "run", "--threads", "1") == 0
        assert torch.get_num_threads() == 1
        assert json.loads((tmp_path / "run" / "config.json").read_text())["threads"] == 1
    finally:
        torch.set_num_threads(before)


def test_train_with_stacked_points(tmp_path, capsys):
    """--stack-points with the paper's text model (dropout 0.5, savae_fast.nn.Dropout)."""
    out = tmp_path / "run"
    code = cli_main(["train", "--mode", "savae", "--synthetic", TINY_SYNTHETIC, *TINY, "--hvp", "fd_richardson",
                     "--stack-points", "4", "--dropout", "0.5", "--out-dir", str(out)])
    assert code == 0, capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["stack_points"] == 4
    capsys.readouterr()
    _one_line_error(capsys, cli_main(["train", "--synthetic", TINY_SYNTHETIC, *TINY, "--stack-points", "-2",
                                      "--out-dir", str(tmp_path / "bad")]), "stack_points")


def test_every_train_option_says_what_it_takes(capsys):
    from savae_fast.app.cli import build_parser

    parser = build_parser()
    train = next(a for a in parser._subparsers._group_actions[0].choices.values() if a.prog.endswith("train"))
    for action in train._actions:
        if action.option_strings and action.dest != "help":
            assert action.help and len(action.help) > 12, action.option_strings
    with pytest.raises(SystemExit):
        parser.parse_args(["train", "--help"])
    out = capsys.readouterr().out
    for choices in ("{synthetic,text,ptb,digits,omniglot,mnist}", "{autoreg,vae,svi,vae+svi,vae+svi+kl,savae}",
                    "{sgd,adam}", "{auto,cpp,triton,torch}", "optim_n2n}"):
        assert choices in out, choices


def test_plot_of_a_one_epoch_run_shows_its_points(tmp_path, monkeypatch):
    """A one-epoch run is one point per curve: drawn with markers (the panels looked empty)."""
    import matplotlib.axes

    out = tmp_path / "run"
    assert _synthetic_train(out) == 0
    markers = []
    real = matplotlib.axes.Axes.plot
    monkeypatch.setattr(matplotlib.axes.Axes, "plot",
                        lambda self, *a, **k: (markers.append(k.get("marker")), real(self, *a, **k))[1])
    assert cli_main(["plot", str(out)]) == 0
    assert markers and all(m == "o" for m in markers)


def test_info_reports_what_runs_here(capsys):
    """savae-fast info: versions, the extension's build, backends with auto's pick, precision, hvp
    modes; on a machine without a GPU it says so in one line, and exits 0."""
    import savae_fast as sf

    assert cli_main(["info"]) == 0
    out = capsys.readouterr().out
    assert f"savae_fast {sf.__version__}" in out and f"torch {torch.__version__}" in out
    assert "[cpu] backend='auto' uses: " + sf.ops.get_backend("auto", "cpu").name in out
    assert "[cpu]   hvp fd_central: yes" in out and "default fd_eps: fd_forward 0.001" in out
    if not torch.cuda.is_available():
        assert "GPU: none (torch.cuda.is_available() is False)" in out and "[cuda]" not in out
    assert "[cpu]   backend triton: " in out  # (yes under TRITON_INTERPRET=1, as in the tests; else why not)
    assert cli_main(["info", "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["devices"]["cpu"]["backends"]["torch"] is True
    assert isinstance(data["extension"], (dict, str))


def test_quick_run_limits_evaluation_and_says_when_validation_takes_long(tmp_path, capsys, monkeypatch):
    """--max-eval-batches caps validation and test (a 5-batch run evaluated all of PTB's validation
    for minutes, silently); with --no-progress a validation over 30 s says how long it may take."""
    from savae_fast.app.train import metrics

    out = tmp_path / "run"
    code = cli_main(["train", "--mode", "vae", "--synthetic", json.dumps({"train": 32, "valid": 64, "test": 64}),
                     *TINY, "--max-eval-batches", "2", "--out-dir", str(out)])
    assert code == 0
    err = capsys.readouterr().err
    assert "on the test split (16 examples, 2 batches" in err
    assert json.loads((out / "metrics.json").read_text())[0]["valid_examples"] == 16
    clock = iter(range(0, 10**6, 40))  # every reading 40 s later: the first batch "took" 40 s
    monkeypatch.setattr(metrics.time, "monotonic", lambda: next(clock))
    bar = metrics.Progress(False, 5, "vae valid", estimate=True, estimate_above=30.0)
    bar.update()
    assert "vae valid: 1/5 took 40.0 s; the rest may take about" in capsys.readouterr().err


def test_mutual_information_comes_with_its_standard_error(capsys):
    """At small sizes the estimate can be below 0 (eval printed mutual_info -0.04): its standard
    error is reported, and eval notes an estimate within two of them of 0."""
    from savae_fast.app.cli import mi_note
    from savae_fast.app.evaluate import mutual_information_se

    mu, logvar = 0.01 * torch.randn(20, 2), torch.zeros(20, 2)  # posteriors all alike: I(x; z) ~ 0
    mi, se = mutual_information_se(mu, logvar)
    assert se > 0 and abs(mi) < 5 * se  # (an estimate of 0 lands beyond 2 standard errors in ~5% of draws)
    mi_note({"mutual_info": mi, "mutual_info_se": se, "examples": 20})
    assert ("within two standard errors" in capsys.readouterr().err) == (mi < 2 * se)
    mi_note({"mutual_info": -0.04, "mutual_info_se": 0.03, "examples": 20})  # eval's -0.04
    assert "within two standard errors" in capsys.readouterr().err
    mu = 3 * torch.randn(200, 2)  # well separated posteriors: clearly positive, no note
    mi, se = mutual_information_se(mu, torch.full((200, 2), -4.0))
    mi_note({"mutual_info": mi, "mutual_info_se": se, "examples": 200})
    assert mi > 10 * se and capsys.readouterr().err == ""


def test_help_does_not_import_the_heavy_modules():
    """`savae-fast --help` costs little more than `import torch`: it loads neither Dynamo (refine's
    compile boundary is made at its first call) nor Triton, matplotlib or scikit-learn."""
    code = ("import sys; from savae_fast.app.cli import main; main(['train', '--help']); "
            "print([m for m in ('torch._dynamo', 'triton', 'matplotlib', 'sklearn', 'scipy') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _readme_command(prefix: str) -> list[str]:
    """The arguments of README's first ``savae-fast <prefix>`` command (continuation lines joined)."""
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read().replace("\\\n", " ")
    line = next(ln for ln in readme.splitlines() if ln.strip().startswith(f"savae-fast {prefix}"))
    return line.split("#")[0].split()[1:]


def test_readmes_quick_run_trains_the_small_model_on_a_cpu():
    """The one-minute run of README trained the paper's 50M-parameter model on a CPU (2 min 42 s, two
    200 MB checkpoints): without a GPU the default size is the small one."""
    from savae_fast.app.cli import build_parser
    from savae_fast.app.train.command import config_from_args
    from savae_fast.app.train.config import SIZES

    args = build_parser().parse_args(_readme_command("train --dataset ptb --mode savae --epochs 1"))
    cfg = config_from_args(args)
    assert args.max_batches_per_epoch and args.max_eval_batches  # (it is the quick run)
    if not torch.cuda.is_available():
        assert cfg.size == "small"
        assert (cfg.embed_dim, cfg.hidden_dim) == (SIZES["small"]["embed_dim"], SIZES["small"]["hidden_dim"])
    # the paper's size is one option away, and options given explicitly win over the size
    paper = config_from_args(build_parser().parse_args(["train", "--size", "paper", "--hidden-dim", "256"]))
    assert (paper.embed_dim, paper.hidden_dim, paper.kernels) == (512, 256, SIZES["paper"]["kernels"])


def test_eval_to_a_file_states_its_plan_and_shows_progress_before_it_ends(tmp_path):
    """eval with its output in a file printed nothing for 25 minutes: it now states what it will
    evaluate, then a line after the first batch with the time the rest may take (and one at least
    every 30 s), each flushed as it happens."""
    out = tmp_path / "run"
    assert cli_main(["train", "--mode", "savae", "--synthetic", json.dumps({"train": 16, "valid": 8, "test": 256}),
                     *TINY, "--out-dir", str(out)]) == 0
    log = tmp_path / "eval.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "savae_fast.app.cli", "eval", str(out / "best.pt"),
                                 "--samples", "400", "--threads", "1"], stdout=f, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while "took" not in log.read_text() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        seen, running = log.read_text(), proc.poll() is None
    finally:
        proc.wait(timeout=600)
    assert "evaluating 256 test examples (32 batches) x 400 importance samples" in seen
    assert "eval test: 1/32 took" in seen and "the rest may take about" in seen
    assert running, "the progress line arrived only when eval ended"
    text = log.read_text()
    assert text.index("eval test: 32/32") < text.index('"mode"')  # the result comes after its progress
    assert proc.returncode == 0


def test_eval_max_batches_bounds_the_work(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli_main(["train", "--mode", "vae", "--synthetic", json.dumps({"train": 16, "valid": 8, "test": 64}),
                     *TINY, "--out-dir", str(out)]) == 0
    capsys.readouterr()
    assert cli_main(["eval", str(out / "best.pt"), "--samples", "3", "--max-batches", "2"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["examples"] == 16
    assert "16 test examples (2 batches, --max-batches) x 3 importance samples" in captured.err
    for bad in ("0", "-1", "x"):
        _one_line_error(capsys, cli_main(["eval", str(out / "best.pt"), "--max-batches", bad]), "--max-batches")


def test_train_records_the_outer_gradient_and_refines_amplification(tmp_path, capsys):
    """Per epoch: the outer gradient's norm before clipping and refine's amplification of its
    backpropagated vector (savae), in metrics; --backward-clip and --backward-steps reach the run."""
    out = tmp_path / "run"
    assert cli_main(["train", "--mode", "savae", "--synthetic", TINY_SYNTHETIC, *TINY, "--out-dir", str(out),
                     "--backward-clip", "2.5", "--backward-steps", "3"]) == 0
    row = json.loads((out / "metrics.json").read_text())[0]
    for key in ("train_grad_norm_median", "train_grad_norm_max", "refine_gain_median", "refine_gain_max",
                "backward_clip_engaged"):
        assert key in row and row[key] >= 0, key
    assert row["refine_gain_max"] > 0 and row["train_grad_norm_max"] >= row["train_grad_norm_median"] > 0
    capsys.readouterr()
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["backward_clip"], cfg["backward_steps"]) == (2.5, 3)
    _one_line_error(capsys, cli_main(["train", "--synthetic", TINY_SYNTHETIC, *TINY, "--out-dir",
                                      str(tmp_path / "b"), "--backward-clip", "-1"]), "backward_clip")
    assert cli_main(["train", "--synthetic", TINY_SYNTHETIC, *TINY, "--out-dir", str(tmp_path / "c"),
                     "--backward-clip", "none"]) == 0
    assert json.loads((tmp_path / "c" / "config.json").read_text())["backward_clip"] is None


def test_a_checkpoint_with_a_changed_byte_is_corrupted_and_a_cut_one_truncated(tmp_path):
    from savae_fast.app.errors import CheckpointError
    from savae_fast.app.train import checkpoint

    path = str(tmp_path / "ck.pt")
    checkpoint.save({"model": {"w": torch.randn(1000)}}, path)
    data = bytearray(open(path, "rb").read())
    flipped = tmp_path / "flipped.pt"
    data[len(data) // 2] ^= 0x01  # one bit inside the stored tensor data
    flipped.write_bytes(bytes(data))
    cut = tmp_path / "cut.pt"
    cut.write_bytes(bytes(data[: len(data) // 2]))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    for p, needle in ((flipped, "corrupted"), (cut, "truncated"), (garbage, "not a checkpoint")):
        with pytest.raises(CheckpointError, match=needle):
            checkpoint.load(str(p))


@pytest.mark.parametrize("again", [[], ["--resume"]], ids=["fresh", "resume"])
def test_a_run_killed_before_its_first_checkpoint_is_started_again(tmp_path, capsys, again):
    """kill -9 before the first checkpoint left config.json alone: a fresh run refused ("pass
    --resume") and --resume failed ("last.pt not found"). Such a run holds nothing to keep: either
    starts it, with one line saying so."""
    out = tmp_path / "run"
    out.mkdir()
    args = ["train", "--mode", "vae", "--synthetic", TINY_SYNTHETIC, *TINY, "--out-dir", str(out)]
    (out / "config.json").write_text("{}")  # what a run killed during its first epoch leaves
    (out / ".savae-fast.lock").write_text("12345\n")  # and its lock file (the lock itself died with it)
    assert cli_main([*args, *again]) == 0
    err = capsys.readouterr().err
    assert err.count("stopped before its first checkpoint") == 1
    assert (out / "last.pt").exists() and json.loads((out / "config.json").read_text())["mode"] == "vae"
    # a run with a checkpoint is still protected
    _one_line_error(capsys, cli_main(args), "holds a run already", "--resume")


def test_progress_beats_within_a_long_item(capsys, monkeypatch):
    """A paper-sized model's first evaluation batch (500 importance samples) can take minutes: the
    progress lines come from within it, at least every interval."""
    from savae_fast.app.train import metrics

    clock = iter(range(0, 10**6, 20))  # every reading 20 s later
    monkeypatch.setattr(metrics.time, "monotonic", lambda: next(clock))
    bar = Progress(True, 4, "eval test", interval=30.0)
    bar.mode = "lines"  # (what a file gets)
    bar.beat(0.1)  # 20 s after the start: nothing yet
    assert capsys.readouterr().err == ""
    bar.beat(0.4)
    assert "eval test: 0/4, item 1 40% done" in capsys.readouterr().err
