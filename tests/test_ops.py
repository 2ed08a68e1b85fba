"""Each fused operator against its pure-PyTorch formula, and torch.library.opcheck."""

import pytest
import torch

import savae_fast as sf
from savae_fast.ops import torch_impl
from savae_fast.ops.constants import FD_CENTRAL, FD_EXACT, FD_FORWARD

TOL = {torch.float64: 1e-12, torch.float32: 1e-6}
SHAPES = [(1, 1), (3, 5), (17, 16), (33, 7), (64, 130)]

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


def _state(shape, dtype, device="cpu"):
    """Random state whose ELBO gradients are not near-cancellations of their terms: on
    tiny shapes a chance cancellation makes g ill-conditioned in float32 whatever the
    implementation, and the clip Jacobian would magnify it (a test of the draw, not of
    the kernels)."""
    b, d = shape
    t = lambda scale=1.0: scale * torch.randn(b, d, dtype=dtype, device=device)  # noqa: E731
    while True:
        st = dict(mu=t(0.7), logvar=t(0.5), p_mu=t(0.2), p_logvar=t(0.2), eps=t(), grad_z=t(3.0), eps_next=t())
        sigma = torch.exp(0.5 * st["logvar"])
        terms_mu = st["grad_z"].abs() + 0.7 * st["mu"].abs()
        terms_lv = (0.5 * st["grad_z"] * st["eps"] * sigma).abs() + (0.35 * torch.expm1(st["logvar"])).abs()
        g_mu, g_lv = torch_impl.elbo_grad(st["grad_z"], st["mu"], st["logvar"], st["eps"], 1.0, 0.7)
        if g_mu.norm() >= 0.1 * terms_mu.norm() and g_lv.norm() >= 0.1 * terms_lv.norm():
            return st


def _scalars(clip: str, state):
    """Hyper-parameters with the clip clearly inactive / active for both tensors."""
    s, beta = 1.0 / state["mu"].shape[0], 0.7
    g_mu, g_lv = torch_impl.elbo_grad(state["grad_z"], state["mu"], state["logvar"], state["eps"], s, beta)
    n = min(g_mu.norm().item(), g_lv.norm().item())
    max_norm = {"off": 0.0, "inactive": 3.0 * max(g_mu.norm().item(), g_lv.norm().item()), "active": 0.5 * n}[clip]
    return dict(scale=s, kl_weight=beta, lr_mu=0.9, lr_logvar=0.6, momentum=0.5, max_grad_norm=max_norm)


def forward_step_args(shape, dtype, clip, with_next=True, device="cpu"):
    st = _state(shape, dtype, device)
    sc = _scalars(clip, st)
    return (st["mu"], st["logvar"], st["p_mu"], st["p_logvar"], st["eps"], st["grad_z"],
            st["eps_next"] if with_next else None, sc["scale"], sc["kl_weight"], sc["lr_mu"], sc["lr_logvar"],
            sc["momentum"], sc["max_grad_norm"])


def reverse_direction_args(shape, dtype, clip, fd_mode, device="cpu"):
    st = _state(shape, dtype, device)
    sc = _scalars(clip, st)
    g_mu, g_lv = torch_impl.elbo_grad(st["grad_z"], st["mu"], st["logvar"], st["eps"], sc["scale"], sc["kl_weight"])
    norms = torch.stack([g_mu.norm(), g_lv.norm()])
    lbar_mu, lbar_lv = torch.randn_like(st["mu"]), torch.randn_like(st["mu"])
    if shape[0] > 1:  # one example with a zero direction exercises the u_b = 0 branch
        lbar_mu[0], lbar_lv[0], st["p_mu"][0], st["p_logvar"][0] = 0, 0, 0, 0
    step = {FD_EXACT: 0.0, FD_FORWARD: 1e-3, FD_CENTRAL: 2e-3}[fd_mode]
    return (lbar_mu, lbar_lv, st["p_mu"], st["p_logvar"], st["mu"], st["logvar"], st["eps"], st["grad_z"], norms,
            sc["scale"], sc["kl_weight"], sc["lr_mu"], sc["lr_logvar"], sc["max_grad_norm"], fd_mode, step)


def reverse_update_args(shape, dtype, with_b=True, device="cpu"):
    st = _state(shape, dtype, device)
    t = lambda: torch.randn(shape, dtype=dtype, device=device)  # noqa: E731
    return (t(), t(), t(), t(), t(), t(), st["logvar"], st["eps"], st["grad_z"], t(), t() if with_b else None,
            333.0, 1.0 / shape[0], 0.7, 0.5)


def op_err(a, b, scale=1.0) -> float:
    """||a - b|| relative to max(||b||, RMS ``scale``): the inputs are O(1) random draws,
    and an output that cancels to almost nothing (the clip Jacobian on a 1x1 tensor)
    must be judged against the size of its terms, not its own size."""
    a, b = a.detach().double(), b.detach().double()
    return (a - b).norm().item() / max(b.norm().item(), scale * max(b.numel(), 1) ** 0.5)


def _assert_outputs_close(out, ref, dtype, scales=None):
    out = out if isinstance(out, (tuple, list)) else (out,)
    ref = ref if isinstance(ref, (tuple, list)) else (ref,)
    assert len(out) == len(ref)
    for i, (a, b) in enumerate(zip(out, ref)):
        assert a.shape == b.shape and a.dtype == b.dtype, (i, a.shape, b.shape, a.dtype, b.dtype)
        err = op_err(a, b, (scales or {}).get(i, 1.0))
        assert err <= TOL[dtype], f"output {i}: error {err:.2e}"


def assert_reverse_direction_close(out, ref, args, dtype):
    """reverse_direction's outputs against the formula's. Row weights 1 / (2 r_b) =
    |u_b| / (2 h (1 + |z_b|)) live on the 1 / (2 h) scale. With a single element and the
    clip active, J v = c v 1e-6 / (n + 1e-6) cancels below float32 rounding: the sign of
    the direction u is rounding noise, and the central points z + r u, z - r u may come out
    in either order (about 3% of draws), so they are compared as a pair."""
    fd_mode, max_norm, norms = args[14], args[13], args[8]
    out, ref = list(out), list(ref)
    if (fd_mode == FD_CENTRAL and dtype == torch.float32 and args[4].numel() == 1
            and 0 < max_norm < norms.max().item()):
        out[5], ref[5] = out[5].sort(dim=0).values, ref[5].sort(dim=0).values
    _assert_outputs_close(out, ref, dtype, scales={6: 0.5 / args[15]} if fd_mode == FD_CENTRAL else None)


def _compiled(name):
    return getattr(torch.ops.savae_fast, name).default


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_sample(shape, dtype):
    st = _state(shape, dtype)
    args = (st["mu"], st["logvar"], st["eps"])
    _assert_outputs_close(_compiled("sample")(*args), torch_impl.sample(*args), dtype)


@needs_ext
@pytest.mark.parametrize("with_next", [True, False])
@pytest.mark.parametrize("clip", ["off", "inactive", "active"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_step(shape, dtype, clip, with_next):
    args = forward_step_args(shape, dtype, clip, with_next)
    out = _compiled("forward_step")(*args)
    ref = torch_impl.forward_step(*args)
    _assert_outputs_close(out, ref, dtype)
    if clip == "active":
        assert (out[5] > args[-1]).all()  # both norms above the clip threshold


@needs_ext
@pytest.mark.parametrize("fd_mode", [FD_EXACT, FD_FORWARD, FD_CENTRAL])
@pytest.mark.parametrize("clip", ["off", "inactive", "active"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_reverse_direction(shape, dtype, clip, fd_mode):
    args = reverse_direction_args(shape, dtype, clip, fd_mode)
    out = _compiled("reverse_direction")(*args)
    ref = torch_impl.reverse_direction(*args)
    assert_reverse_direction_close(out, ref, args, dtype)
    if fd_mode == FD_CENTRAL and shape[0] > 1 and clip != "active":
        # a zero direction gives weight 0 and z+ = z- (with the clip active, J couples the
        # examples and example 0 gets a direction from the others)
        assert out[6][0] == 0 and torch.equal(out[5][0, 0], out[5][1, 0])


@needs_ext
@pytest.mark.parametrize("with_b", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape", SHAPES)
def test_reverse_update(shape, dtype, with_b):
    args = reverse_update_args(shape, dtype, with_b)
    _assert_outputs_close(_compiled("reverse_update")(*args), torch_impl.reverse_update(*args), dtype)


@needs_ext
def test_non_contiguous_inputs_are_handled():
    args = list(forward_step_args((8, 6), torch.float64, "active"))
    for i in range(6):
        args[i] = args[i].t().contiguous().t()  # same values, column-major
        assert not args[i].is_contiguous()
    _assert_outputs_close(_compiled("forward_step")(*args), torch_impl.forward_step(*args), torch.float64)


@needs_ext
@pytest.mark.parametrize("shape", [(1, 1), (4, 3), (9, 20)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(shape, dtype):
    cases = [
        ("sample", tuple(_state(shape, dtype)[k] for k in ("mu", "logvar", "eps"))),
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
    _assert_outputs_close(out, torch_impl.forward_step(*args), torch.float64)
    with pytest.raises(ValueError, match="'grad_z' has shape"):
        sf.ops.forward_step(*args[:5], args[5][:, :2], args[6], backend="torch", **kw)
    with pytest.raises(ValueError, match="backend"):
        sf.ops.get_backend("cuda-graphs", "cpu")


def _accumulate_case(dtype, shapes=((7,), (3, 4), (1,), (300, 5), (5000,))):
    total = [torch.randn(s, dtype=dtype) for s in shapes]
    values = [torch.randn(s, dtype=dtype) for s in shapes]
    values[1] = None  # a parameter the loss did not use
    return total, values


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
def test_accumulate_matches_formula(dtype):
    total, values = _accumulate_case(dtype)
    before = [t.clone() for t in total]
    _compiled("accumulate_")(total, values)
    for t, b, v in zip(total, before, values):
        # one rounding of the same addition: bit-identical to torch's add
        assert torch.equal(t, b if v is None else b + v)


@needs_ext
@pytest.mark.parametrize("backend", ["cpp", "torch"])
def test_accumulate_public_wrapper(backend):
    total, values = _accumulate_case(torch.float32)
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
    total, values = _accumulate_case(torch.float32)
    torch.library.opcheck(_compiled("accumulate_"), (total, values))
    with pytest.raises(RuntimeError, match="same length"):
        _compiled("accumulate_")(total, values[:2])
    with pytest.raises(RuntimeError, match="'values'\\[0\\] must match"):
        _compiled("accumulate_")(total, [values[0].double()] + values[1:])
    with pytest.raises(RuntimeError, match="contiguous"):
        _compiled("accumulate_")([total[1].t()], [None])


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
