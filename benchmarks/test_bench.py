"""pytest-benchmark entry points (``python -m pytest benchmarks/test_bench.py``).

The same measurements as ``python -m benchmarks``, in pytest-benchmark's format
(``--benchmark-json``, ``--benchmark-compare`` against a saved run). Groups put
each refinement method next to the decoder floor and the references, and each
fused operator next to the eager PyTorch sequence it replaces; compare within a
group (one run, one machine). ``--benchmark-disable`` runs every case once, as
a smoke test. ``SAVAE_BENCH_DEVICE=cuda`` selects the GPU.
"""

from __future__ import annotations

import os

import pytest
import torch

import savae_fast as sf
from savae_fast.ops import torch_impl
from benchmarks.configs import CONFIGS, make_problem
from benchmarks.op_level import op_args
from benchmarks.refinement import METHODS, decoder_floor
from savae_fast.testing import training_step

DEVICE = os.environ.get("SAVAE_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


def _sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()


@pytest.fixture(scope="module")
def small_lstm():
    return make_problem(CONFIGS["small_lstm"], DEVICE)


STEP_METHODS = ["refine fd_forward", "refine fd_central", "refine exact", "optim_n2n (authors)",
                "unrolled (autograd)"]


@pytest.mark.benchmark(group="training step: small_lstm (B=32, D=16, K=20)")
def test_decoder_floor(benchmark, small_lstm):
    benchmark(lambda: (decoder_floor(small_lstm), _sync()))


@pytest.mark.benchmark(group="training step: small_lstm (B=32, D=16, K=20)")
def test_decoder_floor_with_sums(benchmark, small_lstm):
    benchmark(lambda: (decoder_floor(small_lstm, sum_param_grads=True), _sync()))


@pytest.mark.benchmark(group="training step: small_lstm (B=32, D=16, K=20)")
@pytest.mark.parametrize("method", STEP_METHODS)
def test_training_step(benchmark, small_lstm, method):
    grads = benchmark(lambda: (training_step(METHODS[method], small_lstm), _sync())[0])
    assert len(grads) == 2 + len(small_lstm.params)
    assert all(torch.isfinite(g).all() for g in grads)


OPS = ["forward_step", "reverse_direction", "reverse_update"]
SIZES = [(32, 32), (1024, 256)]


@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("impl", ["fused", "eager"])
def test_op(benchmark, name, size, impl):
    if impl == "fused" and not sf.ops.available(DEVICE):
        pytest.skip(f"compiled kernels not built for {DEVICE}")
    benchmark.group = f"op {name} {size[0]}x{size[1]}"
    args = op_args(name, *size, DEVICE)
    fn = getattr(torch.ops.savae_fast, name).default if impl == "fused" else getattr(torch_impl, name)
    out = benchmark(lambda: (fn(*args), _sync())[0])
    ref = getattr(torch_impl, name)(*args)
    for a, b in zip(out, ref):
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
