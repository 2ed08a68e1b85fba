"""Each fused operator against its pure-PyTorch formula, and torch.library.opcheck."""

import pytest
import torch

import savae_fast as sf
from savae_fast.ops import torch_impl
from savae_fast.ops.constants import FD_CENTRAL, FD_EXACT, FD_FORWARD
from savae_fast.testing import (accumulate_case, assert_outputs_close, assert_reverse_direction_close,
                                forward_step_args, op_err, op_state, reverse_direction_args, reverse_update_args)

SHAPES = [(1, 1), (3, 5), (17, 16), (33, 7), (64, 130)]
# every shape in float64 and float32
SHAPES_AND_DTYPES = pytest.mark.parametrize(
    "shape,dtype", [(s, d) for s in SHAPES for d in (torch.float64, torch.float32)])

needs_ext = pytest.mark.skipif(not sf.ops.available("cpu"), reason="compiled CPU kernels not built")


def _cpu_builds():
    """The CPU loops come in a portable and an AVX2/Sleef build of one source; test both."""
    if not sf.ops.available("cpu"):
        return ["default"]
    return ["portable", "avx2"] if sf.ops.build_info()["cpu_vector_kernels"] else ["portable"]


@pytest.fixture(autouse=True, params=_cpu_builds())
def cpu_build(request):
    if request.param == "default":
        yield request.param
        return
    before = sf.ops.cpu_vector_kernels()
    sf.ops.set_cpu_vector_kernels(request.param == "avx2")
    try:
        yield request.param
    finally:
        sf.ops.set_cpu_vector_kernels(before)


def _compiled(name):
    return getattr(torch.ops.savae_fast, name).default


def _compiled_and_formula(name, args):
    """(compiled operator's outputs, pure-PyTorch formula's outputs) for the same arguments."""
    return _compiled(name)(*args), getattr(torch_impl, name)(*args)


@needs_ext
@SHAPES_AND_DTYPES
def test_sample(shape, dtype):
    st = op_state(shape, dtype)
    args = (st["mu"], st["logvar"], st["eps"])
    assert_outputs_close(*_compiled_and_formula("sample", args), dtype)


@needs_ext
@pytest.mark.parametrize("with_next", [True, False])
@pytest.mark.parametrize("clip", ["off", "inactive", "active"])
@SHAPES_AND_DTYPES
def test_forward_step(shape, dtype, clip, with_next):
    args = forward_step_args(shape, dtype, clip, with_next)
    out, ref = _compiled_and_formula("forward_step", args)
    assert_outputs_close(out, ref, dtype)
    if clip == "active":
        assert (out[5] > args[-1]).all()  # both norms above the clip threshold


@needs_ext
@pytest.mark.parametrize("fd_mode", [FD_EXACT, FD_FORWARD, FD_CENTRAL])
@pytest.mark.parametrize("clip", ["off", "inactive", "active"])
@SHAPES_AND_DTYPES
def test_reverse_direction(shape, dtype, clip, fd_mode):
    args = reverse_direction_args(shape, dtype, clip, fd_mode)
    out, ref = _compiled_and_formula("reverse_direction", args)
    assert_reverse_direction_close(out, ref, args, dtype)
    if fd_mode == FD_CENTRAL and shape[0] > 1 and clip != "active":
        # a zero direction gives weight 0 and z+ = z- (with the clip active, J couples the
        # examples and example 0 gets a direction from the others)
        assert out[6][0] == 0 and torch.equal(out[5][0, 0], out[5][1, 0])


@needs_ext
@pytest.mark.parametrize("with_b", [True, False])
@SHAPES_AND_DTYPES
def test_reverse_update(shape, dtype, with_b):
    args = reverse_update_args(shape, dtype, with_b)
    assert_outputs_close(*_compiled_and_formula("reverse_update", args), dtype)


@needs_ext
def test_non_contiguous_inputs_are_handled():
    args = list(forward_step_args((8, 6), torch.float64, "active"))
    for i in range(6):
        args[i] = args[i].t().contiguous().t()  # same values, column-major
        assert not args[i].is_contiguous()
    assert_outputs_close(_compiled("forward_step")(*args), torch_impl.forward_step(*args), torch.float64)


@needs_ext
@pytest.mark.parametrize("shape", [(1, 1), (4, 3), (9, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(shape, dtype):
    cases = [
        ("sample", tuple(op_state(shape, dtype)[k] for k in ("mu", "logvar", "eps"))),
        ("forward_step", forward_step_args(shape, dtype, "active")),
        ("forward_step", forward_step_args(shape, dtype, "off", with_next=False)),
        ("reverse_update", reverse_update_args(shape, dtype)),
        ("reverse_update", reverse_update_args(shape, dtype, with_b=False)),
    ] + [("reverse_direction", reverse_direction_args(shape, dtype, "active", m))
         for m in (FD_EXACT, FD_FORWARD, FD_CENTRAL)]
    for name, args in cases:
        torch.library.opcheck(_compiled(name), args)


@needs_ext
def test_compiled_kernels_are_registered_for_cpu():
    for name in sf.ops.OP_NAMES:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"savae_fast::{name}", "CPU")


@needs_ext
@pytest.mark.parametrize(
    "mutate,match",
    [
        (lambda a: a.__setitem__(0, a[0][:, :2]), "shape"),
        (lambda a: a.__setitem__(1, a[1].float()), "dtype"),
        (lambda a: a.__setitem__(0, a[0].unsqueeze(0)), "2-D"),
        (lambda a: a.__setitem__(0, a[0].half()), "float32 or float64"),
        (lambda a: a.__setitem__(12, float("nan")), "finite"),
    ],
)
def test_compiled_kernels_reject_bad_arguments(mutate, match):
    args = list(forward_step_args((4, 3), torch.float64, "off"))
    mutate(args)
    with pytest.raises(RuntimeError, match=match):
        _compiled("forward_step")(*args)


def test_public_wrappers_validate_and_dispatch():
    args = forward_step_args((5, 4), torch.float64, "active")
    names = ("scale", "kl_weight", "lr_mu", "lr_logvar", "momentum", "max_grad_norm")
    kw = dict(zip(names, args[7:]))
    out = sf.ops.forward_step(*args[:7], backend="torch", **kw)
    assert_outputs_close(out, torch_impl.forward_step(*args), torch.float64)
    with pytest.raises(ValueError, match="'grad_z' has shape"):
        sf.ops.forward_step(*args[:5], args[5][:, :2], args[6], backend="torch", **kw)
    with pytest.raises(ValueError, match="backend"):
        sf.ops.get_backend("cuda-graphs", "cpu")


def test_public_reverse_direction_names_bad_arguments():
    args = list(reverse_direction_args((5, 4), torch.float64, "active", FD_CENTRAL))
    names = ("scale", "kl_weight", "lr_mu", "lr_logvar", "max_grad_norm", "fd_mode", "fd_step")
    kw = dict(zip(names, args[9:]))
    out = sf.ops.reverse_direction(*args[:9], backend="torch", **kw)
    assert_reverse_direction_close(out, torch_impl.reverse_direction(*args), args, torch.float64)
    bad = {  # argument position -> (replacement, expected message)
        4: (args[4].float(), "'mu' has dtype"),
        6: (args[6].to("meta"), "'eps' is on meta"),
        8: (args[8].to("meta"), "'grad_norms' must be a \\[2\\] tensor of mu's dtype and device"),
    }
    for position, (value, match) in bad.items():
        call = list(args[:9])
        call[position] = value
        with pytest.raises((ValueError, TypeError), match=match):
            sf.ops.reverse_direction(*call, backend="torch", **kw)
    with pytest.raises(ValueError, match="'fd_mode'"):
        sf.ops.reverse_direction(*args[:9], backend="torch", **{**kw, "fd_mode": 7})


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_accumulate_matches_formula(dtype):
    total, values = accumulate_case(dtype)
    before = [t.clone() for t in total]
    _compiled("accumulate_")(total, values)
    for t, b, v in zip(total, before, values):
        # one rounding of the same addition: bit-identical to torch's add
        assert torch.equal(t, b if v is None else b + v)


@needs_ext
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_accumulate_public_wrapper(backend):
    total, values = accumulate_case(torch.float32)
    expected = [t if v is None else t + v for t, v in zip(total, values)]
    sf.ops.accumulate_(total, values, backend=backend)
    assert all(torch.equal(a, b) for a, b in zip(total, expected))
    with pytest.raises(ValueError, match="same length"):
        sf.ops.accumulate_(total, values[:2], backend=backend)
    with pytest.raises(ValueError, match="'values'\\[0\\] must match"):
        sf.ops.accumulate_(total, [values[0][:3]] + values[1:], backend=backend)
    with pytest.raises(TypeError, match="'total'\\[0\\] must be a floating-point"):
        sf.ops.accumulate_([torch.zeros(3, dtype=torch.int64)], [None], backend=backend)


@needs_ext
def test_accumulate_opcheck_and_errors():
    total, values = accumulate_case(torch.float32)
    torch.library.opcheck(_compiled("accumulate_"), (total, values))
    with pytest.raises(RuntimeError, match="same length"):
        _compiled("accumulate_")(total, values[:2])
    with pytest.raises(RuntimeError, match="'values'\\[0\\] must match"):
        _compiled("accumulate_")(total, [values[0].double()] + values[1:])
    with pytest.raises(RuntimeError, match="contiguous"):
        _compiled("accumulate_")([total[1].t()], [None])


@needs_ext
@pytest.mark.parametrize("name,position", [("sample", 2), ("sample", 0), ("forward_step", 5), ("forward_step", 6),
                                           ("reverse_direction", 8), ("reverse_update", 9)])
def test_mixing_meta_and_cpu_tensors_is_an_error(name, position):
    """The dispatcher sends a call with any meta tensor to the fake kernel: it must refuse
    the mix by argument name (it returned an uninitialised CPU tensor, or did nothing)."""
    args = {"sample": lambda: [op_state((5, 4), torch.float32)[k] for k in ("mu", "logvar", "eps")],
            "forward_step": lambda: forward_step_args((5, 4), torch.float32, "active"),
            "reverse_direction": lambda: reverse_direction_args((5, 4), torch.float32, "active", FD_FORWARD),
            "reverse_update": lambda: reverse_update_args((5, 4), torch.float32)}[name]()
    args = list(args)
    args[position] = args[position].to("meta")
    with pytest.raises(RuntimeError, match=f"savae_fast::{name}: argument '\\w+' is on"):
        _compiled(name)(*args)


@needs_ext
def test_accumulate_mixing_meta_and_cpu_is_an_error():
    total, values = accumulate_case(torch.float32)
    before = [t.clone() for t in total]
    with pytest.raises(RuntimeError, match="'values'\\[0\\] .* does not match 'total'\\[0\\]"):
        _compiled("accumulate_")(total, [values[0].to("meta")] + values[1:])
    with pytest.raises(RuntimeError, match="'total' has 1 tensors but 'values' has 2"):
        _compiled("accumulate_")([torch.zeros(3, device="meta")], [None, None])
    assert all(torch.equal(a, b) for a, b in zip(total, before))


@needs_ext
def test_accumulate_refuses_tensors_that_require_grad_under_grad_mode():
    """Like PyTorch's in-place ops on leaves: refused under grad mode (the sum has no
    derivative), allowed under no_grad (as optimisers update parameters)."""
    op = _compiled("accumulate_")
    leaf = torch.zeros(3, requires_grad=True)
    with pytest.raises(RuntimeError, match="'total'\\[0\\] is a leaf tensor that requires grad"):
        op([leaf], [torch.ones(3)])
    assert torch.equal(leaf.detach(), torch.zeros(3))
    with pytest.raises(RuntimeError, match="'values'\\[0\\] is a leaf tensor that requires grad"):
        op([torch.zeros(3)], [torch.ones(3, requires_grad=True)])
    with pytest.raises(RuntimeError, match="'total'\\[0\\] is a tensor that requires grad"):
        op([leaf * 1], [torch.ones(3)])
    with torch.no_grad():
        op([leaf], [torch.ones(3)])
    assert torch.equal(leaf.detach(), torch.ones(3))


@needs_ext
def test_loop_backend_is_the_registered_operators():
    """refine's loop calls the operator overloads themselves (what torch.compile and
    dispatch modes see too), and they reject bad arguments by name."""
    fast = sf.ops.get_backend("cpp", "cpu")
    for name in sf.ops.OP_NAMES:
        assert getattr(fast, name) is getattr(torch.ops.savae_fast, name).default
    bad = list(forward_step_args((5, 4), torch.float32, "off"))
    bad[5] = torch.zeros(5, 2)
    with pytest.raises(RuntimeError, match="'grad_z' has shape \\[5, 2\\] but 'mu' has shape \\[5, 4\\]"):
        fast.forward_step(*bad)


@needs_ext
def test_cpu_builds_agree():
    """The AVX2 build (own exp/expm1, FMA) and the portable build compute the same
    formulas: they agree to a few roundings, and the per-row sums are ordered the same."""
    if not sf.ops.build_info()["cpu_vector_kernels"]:
        pytest.skip("AVX2 kernels not available on this CPU/build")
    before = sf.ops.cpu_vector_kernels()
    cases = [("forward_step", forward_step_args((37, 19), torch.float64, "active")),
             ("reverse_direction", reverse_direction_args((37, 19), torch.float64, "active", FD_CENTRAL)),
             ("reverse_update", reverse_update_args((37, 19), torch.float64))]
    try:
        for name, args in cases:
            outs = []
            for enabled in (False, True):
                sf.ops.set_cpu_vector_kernels(enabled)
                outs.append(_compiled(name)(*args))
            for a, b in zip(*outs):
                assert op_err(a, b) <= 1e-14, name
    finally:
        sf.ops.set_cpu_vector_kernels(before)
