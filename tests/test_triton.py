"""Triton kernels against the pure-PyTorch formulas (on GPUs, or on CPU tensors under
TRITON_INTERPRET=1, which conftest sets when no GPU is present)."""

import pytest
import torch

import savae_fast as sf
from savae_fast.ops import torch_impl
from savae_fast.ops.constants import FD_CENTRAL, FD_EXACT, FD_FORWARD
from savae_fast.testing import make_problem, max_rel_err, refine_grads, reference_grads
from savae_fast.testing import (assert_outputs_close, assert_reverse_direction_close, forward_step_args,
                      reverse_direction_args, reverse_update_args, op_state)

pytestmark = [
    pytest.mark.triton,
    pytest.mark.skipif(not sf.ops.triton_available(), reason="Triton cannot run here (no GPU, no interpreter)"),
]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SHAPES = [(1, 1), (3, 5), (9, 130), (70, 3), (5, 257)]  # odd D, D > one tile, rows not a multiple of a block
# every shape in float64 and float32
SHAPES_AND_DTYPES = pytest.mark.parametrize(
    "shape,dtype", [(s, d) for s in SHAPES for d in (torch.float64, torch.float32)])


def _triton():
    from savae_fast.ops import triton_impl

    return triton_impl


@SHAPES_AND_DTYPES
def test_sample(shape, dtype):
    st = op_state(shape, dtype, DEVICE)
    args = (st["mu"], st["logvar"], st["eps"])
    assert_outputs_close(_triton().sample(*args), torch_impl.sample(*args), dtype)


# "two_programs" (a third of these grids' time under the interpreter) runs in the full suite.
@pytest.fixture(params=["one_program", "several_programs", pytest.param("two_programs", marks=pytest.mark.slow)])
def reduction_path(request, monkeypatch):
    """forward_step / reverse_direction on the same shapes as one program and as the two-stage
    launches; "two_programs" caps every launch at two programs, so that each program of the
    consuming kernels handles several blocks or row groups."""
    if request.param != "one_program":
        monkeypatch.setattr(_triton(), "SMALL_ELEMENTS", 0)
    if request.param == "two_programs":
        monkeypatch.setattr(_triton(), "MAX_PROGRAMS", 2)
    return request.param


@pytest.mark.parametrize("with_next", [True, False])
@pytest.mark.parametrize("clip", ["off", "inactive", "active"])
@SHAPES_AND_DTYPES
def test_forward_step(shape, dtype, clip, with_next, reduction_path):
    args = forward_step_args(shape, dtype, clip, with_next, device=DEVICE)
    assert_outputs_close(_triton().forward_step(*args), torch_impl.forward_step(*args), dtype)


@pytest.mark.parametrize("fd_mode", [FD_EXACT, FD_FORWARD, FD_CENTRAL])
@pytest.mark.parametrize("clip", ["off", "inactive", "active"])  # inactive: the one-pass path
@SHAPES_AND_DTYPES
def test_reverse_direction(shape, dtype, clip, fd_mode, reduction_path):
    args = reverse_direction_args(shape, dtype, clip, fd_mode, device=DEVICE)
    assert_reverse_direction_close(_triton().reverse_direction(*args), torch_impl.reverse_direction(*args), args,
                                   dtype)


@pytest.mark.parametrize("with_b", [True, False])
@SHAPES_AND_DTYPES
def test_reverse_update(shape, dtype, with_b):
    args = reverse_update_args(shape, dtype, with_b, device=DEVICE)
    assert_outputs_close(_triton().reverse_update(*args), torch_impl.reverse_update(*args), dtype)


def test_large_tensor_uses_several_reduction_programs():
    """More elements than one reduction program covers: the two-stage norm and dot reductions."""
    from savae_fast.ops import triton_impl

    shape = (64, 2 * triton_impl.BLOCK * 3 // 64 + 7)
    args = forward_step_args(shape, torch.float64, "active", device=DEVICE)
    assert_outputs_close(triton_impl.forward_step(*args), torch_impl.forward_step(*args), torch.float64)
    args = reverse_direction_args(shape, torch.float64, "active", FD_CENTRAL, device=DEVICE)
    assert_outputs_close(triton_impl.reverse_direction(*args), torch_impl.reverse_direction(*args), torch.float64,
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


def _compiled_launch_signature(kernel, args, kwargs):
    """The argument types Triton's compiled (GPU) launcher gives a launch of ``kernel``: the
    interpreter passes Python floats through untyped, so it cannot show a float32 scalar."""
    from triton.backends.compiler import BaseBackend
    from triton.runtime.jit import JITFunction, create_function_from_signature

    jit = JITFunction(kernel.fn.fn)  # CachedKernel -> Triton's function -> the Python one
    binder = create_function_from_signature(jit.signature, jit.params, BaseBackend)
    _, specialization, _ = binder(*args, **kwargs)
    return dict(zip(jit.arg_names, (spec[0] for spec in specialization)))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_float_arguments_reach_kernels_at_full_precision(dtype, monkeypatch):
    """Every float argument of every kernel is typed float64 by the compiled launcher (and
    converted to the tensors' dtype in the kernel): typed float32, fd_step = 5e-6 or a
    scale of 1/3 lose half their digits in float64 kernels."""
    triton_impl = _triton()
    launches = []

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                launches.append((self.kernel, args, kwargs))
                return self.kernel[grid](*args, **kwargs)
            return launch

    for name in dir(triton_impl):
        if name.endswith("_kernel"):
            monkeypatch.setattr(triton_impl, name, Recorder(getattr(triton_impl, name)))
    for shape in ((3, 5), (40, 130)):  # one program; several
        triton_impl.forward_step(*forward_step_args(shape, dtype, "active", device=DEVICE))
        for mode in (FD_EXACT, FD_FORWARD, FD_CENTRAL):
            triton_impl.reverse_direction(*reverse_direction_args(shape, dtype, "active", mode, device=DEVICE))
    for with_b in (True, False):
        triton_impl.reverse_update(*reverse_update_args((3, 5), dtype, with_b, device=DEVICE))
    assert {k.fn.fn.__name__ for k, _, _ in launches} == {
        name for name in dir(triton_impl) if name.endswith("_kernel") and name != "_sample_kernel"}
    for kernel, args, kwargs in launches:
        types = _compiled_launch_signature(kernel, args, kwargs)
        floats = {name: t for name, t in types.items() if t in ("fp16", "bf16", "fp32", "fp64")}
        assert floats and all(t == "fp64" for t in floats.values()), (kernel.fn.fn.__name__, floats)


@pytest.mark.parametrize("hvp", ["fd_central", "fd_forward", "exact"])
def test_float64_refine_with_triton_is_as_accurate_as_cpp(hvp, seed):
    """float64 through the Triton kernels is as accurate as through the compiled kernels,
    with hyper-parameters float32 cannot represent (scale 1/3, fd_eps, clip norm, lr,
    momentum): float32-typed scalars gave 1e-7 instead of 1e-12 with fd_central."""
    if not sf.ops.available(DEVICE):
        pytest.skip("compiled kernels not built for this device")
    p = make_problem("mlp", torch.float64, batch=3, latent=5, steps=4).to(device=DEVICE)
    kw = dict(hvp=hvp, max_grad_norm=0.3, lr=(0.7, 0.3), momentum=0.45)
    _, ref = reference_grads(p, **kw)
    _, tri = refine_grads(p, backend="triton", **kw)
    _, cpp = refine_grads(p, backend="cpp", **kw)
    err_tri, err_cpp = max_rel_err(tri, ref)[0], max_rel_err(cpp, ref)[0]
    assert err_tri <= 3 * err_cpp + 1e-12, f"seed={seed} triton {err_tri:.2e} vs cpp {err_cpp:.2e}"
    if hvp != "fd_forward":  # fd_forward's float64 error is its difference quotient's (~1e-9)
        assert err_tri <= 1e-10, f"seed={seed} {err_tri:.2e}"


def test_host_helpers_agree_with_triton():
    """The wrappers' own cdiv / next_power_of_2 (Triton's are slow to call from the host)."""
    import triton

    from savae_fast.ops import triton_impl

    for n in range(1, 5000):
        assert triton_impl._next_power_of_2(n) == triton.next_power_of_2(n), n
        for d in (4, 1024):
            assert triton_impl._cdiv(n, d) == triton.cdiv(n, d), (n, d)


def test_operators_run_on_their_tensors_device(monkeypatch):
    """Triton launches on the current device: each operator makes its tensors' GPU current
    (a model on cuda:1 while cuda:0 is current), and leaves it alone where it already is."""
    import contextlib

    triton_impl = _triton()
    entered = []

    @contextlib.contextmanager
    def device(index):
        entered.append(index)
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    args = reverse_update_args((3, 5), torch.float64, device=DEVICE)
    expected = torch_impl.reverse_update(*args)
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 1)
    assert_outputs_close(triton_impl.reverse_update(*args), expected, torch.float64)
    triton_impl.forward_step(*forward_step_args((3, 5), torch.float64, "active", device=DEVICE))
    triton_impl.reverse_direction(*reverse_direction_args((3, 5), torch.float64, "active", FD_CENTRAL, device=DEVICE))
    triton_impl.sample(*args[:3])
    assert entered == [1, 1, 1, 1]
    monkeypatch.setattr(torch.Tensor, "get_device", lambda self: 0)
    triton_impl.reverse_update(*args)
    assert entered == [1, 1, 1, 1]
