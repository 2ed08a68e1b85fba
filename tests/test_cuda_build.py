"""The CUDA build: kernels registered for every operator, and (with a GPU) run against the formulas."""

import os

import pytest
import torch

import savae_fast as sf
from savae_fast.ops import torch_impl
from savae_fast.ops.constants import FD_CENTRAL, FD_EXACT, FD_FORWARD
from savae_fast.testing import (accumulate_case, assert_outputs_close, op_state, assert_reverse_direction_close,
                      forward_step_args, reverse_direction_args,
                      reverse_update_args)

built_with_cuda = sf.ops.build_info().get("cuda_kernels_compiled", False)


def test_ci_requested_cuda_build_is_present():
    """CI builds with FORCE_CUDA=1; the test must not silently skip the CUDA checks there."""
    if os.environ.get("FORCE_CUDA") == "1":
        assert built_with_cuda, "FORCE_CUDA=1 but the installed extension has no CUDA kernels"


@pytest.mark.skipif(not built_with_cuda, reason="extension built without CUDA")
def test_every_operator_has_a_cuda_kernel():
    for name in sf.ops.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"savae_fast::{name}", "CUDA"), name
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"savae_fast::{name}", "CPU"), name


@pytest.mark.skipif(not built_with_cuda, reason="extension built without CUDA")
def test_cuda_architectures_recorded():
    """The extension records the architectures it was compiled for: TORCH_CUDA_ARCH_LIST
    of the build (run the tests with the same setting), else the default list."""
    archs = sf.ops.build_info()["cuda_archs"].replace(" ", "").split(";")
    requested = os.environ.get("TORCH_CUDA_ARCH_LIST", "8.0;9.0+PTX").replace(" ", "").split(";")
    assert archs == requested, (archs, requested)


needs_gpu = pytest.mark.skipif(not (built_with_cuda and torch.cuda.is_available()), reason="needs a CUDA GPU")
# the last two: more elements, and more rows, than the device's resident blocks cover in
# one sweep (the kernels that reduce the workspace in every block are launched with at most those)
SHAPES = [(1, 1), (3, 5), (33, 130), (1024, 32), (64, 4099), (2048, 300), (20000, 3)]
# every shape in float64 and float32
SHAPES_AND_DTYPES = pytest.mark.parametrize(
    "shape,dtype", [(s, d) for s in SHAPES for d in (torch.float64, torch.float32)])


def _run(name, args):
    return getattr(torch.ops.savae_fast, name).default(*args)


@pytest.fixture(params=["one_block", "two_launches"])
def reduction_path(request):
    """forward_step / reverse_direction on the same shapes through both CUDA reduction paths."""
    before = sf.ops.cuda_single_block_max_elements()
    sf.ops.set_cuda_single_block_max_elements(1 << 40 if request.param == "one_block" else 0)
    yield request.param
    sf.ops.set_cuda_single_block_max_elements(before)


@pytest.mark.skipif(not built_with_cuda, reason="extension built without CUDA")
def test_single_block_limit_setting():
    before = sf.ops.cuda_single_block_max_elements()
    assert before > 0
    try:
        sf.ops.set_cuda_single_block_max_elements(123)
        assert sf.ops.cuda_single_block_max_elements() == 123
        for bad in (-1, 1.5, True, "8"):
            with pytest.raises(ValueError, match="'numel'"):
                sf.ops.set_cuda_single_block_max_elements(bad)
    finally:
        sf.ops.set_cuda_single_block_max_elements(before)


@needs_gpu
@pytest.mark.cuda
@SHAPES_AND_DTYPES
def test_cuda_kernels_match_formulas(shape, dtype, reduction_path):
    st = op_state(shape, dtype, "cuda")
    args = (st["mu"], st["logvar"], st["eps"])
    assert_outputs_close(_run("sample", args), torch_impl.sample(*args), dtype)
    for clip in ("off", "inactive", "active"):  # inactive: the reverse step's one-pass path
        for with_next in (True, False):
            args = forward_step_args(shape, dtype, clip, with_next, device="cuda")
            assert_outputs_close(_run("forward_step", args), torch_impl.forward_step(*args), dtype)
        for mode in (FD_EXACT, FD_FORWARD, FD_CENTRAL):
            args = reverse_direction_args(shape, dtype, clip, mode, device="cuda")
            assert_reverse_direction_close(_run("reverse_direction", args), torch_impl.reverse_direction(*args), args,
                                           dtype)
    for with_b in (True, False):
        args = reverse_update_args(shape, dtype, with_b, device="cuda")
        assert_outputs_close(_run("reverse_update", args), torch_impl.reverse_update(*args), dtype)


@needs_gpu
@pytest.mark.cuda
def test_cuda_accumulate_and_opcheck():
    total, values = accumulate_case(torch.float32)
    total = [t.cuda() for t in total]
    values = [None if v is None else v.cuda() for v in values]
    expected = [t if v is None else t + v for t, v in zip(total, values)]
    _run("accumulate_", (total, values))
    assert all(torch.equal(a, b) for a, b in zip(total, expected))
    torch.library.opcheck(torch.ops.savae_fast.accumulate_.default, (total, values))
    torch.library.opcheck(torch.ops.savae_fast.forward_step.default,
                          forward_step_args((4, 3), torch.float32, "active", device="cuda"))
    torch.library.opcheck(torch.ops.savae_fast.reverse_direction.default,
                          reverse_direction_args((4, 3), torch.float32, "active", FD_CENTRAL, device="cuda"))
