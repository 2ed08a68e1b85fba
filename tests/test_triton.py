"""Triton kernels against the pure-PyTorch formulas (on GPUs, or on CPU tensors under
TRITON_INTERPRET=1, which conftest sets when no GPU is present)."""

import pytest
import torch

import savae_fast as sf
from savae_fast.ops import torch_impl
from savae_fast.ops.constants import FD_CENTRAL, FD_EXACT, FD_FORWARD
from helpers import make_problem, max_rel_err, refine_grads, reference_grads
from test_ops import (TOL, _assert_outputs_close, forward_step_args, reverse_direction_args,
                      reverse_update_args, _state)

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not sf.ops.triton_available(), reason="Triton cannot run here (no GPU, no interpreter)"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 1), (3, 5), (9, 130), (70, 3), (5, 257)]  # odd D, D > one tile, rows not a multiple of a block


def _triton():
    from savae_fast.ops import triton_impl

    return triton_impl


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_sample(shape, dtype):
    st = _state(shape, dtype, DEVICE)
    args = (st["mu"], st["logvar"], st["eps"])
    _assert_outputs_close(_triton().sample(*args), torch_impl.sample(*args), dtype)


@pytest.mark.parametrize("with_next", [True, False])
@pytest.mark.parametrize("clip", ["off", "inactive", "active"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_step(shape, dtype, clip, with_next):
    args = forward_step_args(shape, dtype, clip, with_next, device=DEVICE)
    _assert_outputs_close(_triton().forward_step(*args), torch_impl.forward_step(*args), dtype)


@pytest.mark.parametrize("fd_mode", [FD_EXACT, FD_FORWARD, FD_CENTRAL])
@pytest.mark.parametrize("clip", ["off", "active"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_reverse_direction(shape, dtype, clip, fd_mode):
    args = reverse_direction_args(shape, dtype, clip, fd_mode, device=DEVICE)
    _assert_outputs_close(_triton().reverse_direction(*args), torch_impl.reverse_direction(*args), dtype,
                          scales={6: 0.5 / args[-1]} if fd_mode == FD_CENTRAL else None)


@pytest.mark.parametrize("with_b", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_reverse_update(shape, dtype, with_b):
    args = reverse_update_args(shape, dtype, with_b, device=DEVICE)
    _assert_outputs_close(_triton().reverse_update(*args), torch_impl.reverse_update(*args), dtype)


def test_large_tensor_uses_several_reduction_programs():
    """More elements than one reduction program covers: the two-stage norm and dot reductions."""
    from savae_fast.ops import triton_impl

    shape = (64, 2 * triton_impl.BLOCK * 3 // 64 + 7)
    args = forward_step_args(shape, torch.float64, "active", device=DEVICE)
    _assert_outputs_close(triton_impl.forward_step(*args), torch_impl.forward_step(*args), torch.float64)
    args = reverse_direction_args(shape, torch.float64, "active", FD_CENTRAL, device=DEVICE)
    _assert_outputs_close(triton_impl.reverse_direction(*args), torch_impl.reverse_direction(*args), torch.float64,
                          scales={6: 0.5 / args[-1]})


@pytest.mark.parametrize("hvp,dtype,tol", [("fd_central", torch.float64, 1e-7), ("fd_central", torch.float32, 1e-4),
                                           ("fd_forward", torch.float64, 1e-6), ("exact", torch.float64, 1e-11)])
def test_refine_with_triton_backend_matches_unrolled(hvp, dtype, tol, seed):
    p = make_problem("mlp", dtype, batch=8, latent=5, steps=4)
    if DEVICE == "cuda":
        pytest.skip("covered by the GPU suite with CUDA problems")
    max_norm = 0.3
    _, grads = refine_grads(p, hvp=hvp, backend="triton", max_grad_norm=max_norm)
    _, ref = reference_grads(p, max_grad_norm=max_norm)
    worst, errs = max_rel_err(grads, ref)
    assert worst <= tol, f"seed={seed} {errs}"
