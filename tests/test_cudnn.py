"""Double backward through decoders with cuDNN RNNs (which have none): the evaluations
that are differentiated twice run without cuDNN. On CPU a stand-in RNN with cuDNN's
property (no double backward while cuDNN is enabled) takes the cuDNN path."""

import pytest
import torch
from torch import nn
from torch.autograd.function import once_differentiable

from savae_fast.testing import MLPDecoder, Problem, max_rel_err, refine_grads, reference_grads
from savae_fast.refine import cudnn


class CudnnRnnStandIn(torch.autograd.Function):
    """tanh(x @ w) whose backward cannot be differentiated, as cuDNN's RNN kernels (its
    autograd node is named like theirs: CudnnRnn...Backward)."""

    @staticmethod
    def forward(ctx, x, w):
        y = torch.tanh(x @ w)
        ctx.save_for_backward(x, w, y)
        return y

    @staticmethod
    def backward(ctx, grad):
        return _CudnnRnnBackwardStandIn.apply(grad, *ctx.saved_tensors)


class _CudnnRnnBackwardStandIn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, grad, x, w, y):
        g = grad * (1 - y * y)
        return g @ w.t(), x.t() @ g

    @staticmethod
    def backward(ctx, *grads):
        raise NotImplementedError("Double backwards is not supported for CuDNN RNNs (stand-in)")


class StandInRnnDecoder(MLPDecoder):
    """MLPDecoder whose first layer is the cuDNN stand-in while cuDNN is enabled, and the
    same function in plain (twice differentiable) ops when it is not."""

    def nll(self, x, z):
        w, b = self.l1.weight.t(), self.l1.bias
        zb = torch.cat([z, torch.ones_like(z[:, :1])], dim=1)
        wb = torch.cat([w, b[None]], dim=0)
        h = CudnnRnnStandIn.apply(zb, wb) if torch.backends.cudnn.enabled else torch.tanh(zb @ wb)
        logits = self.l2(self.drop(h)).view(-1, self.length, self.vocab)
        return nn.functional.cross_entropy(logits.reshape(-1, self.vocab), x.reshape(-1), reduction="none").view(
            -1, self.length).sum(1)


def _problem(dtype, dropout=0.0):
    dec = StandInRnnDecoder(5, dropout=dropout).to(dtype)
    b = 6
    return Problem(dec, torch.randint(0, 9, (b, 6)), 0.5 * torch.randn(b, 5, dtype=dtype),
                   0.3 * torch.randn(b, 5, dtype=dtype), torch.randn(4, b, 5, dtype=dtype),
                   torch.randn(b, 5, dtype=dtype))


@pytest.fixture
def cudnn_path(monkeypatch):
    """Treat CPU tensors as a cuDNN device (the stand-in decides by the cuDNN flag)."""
    monkeypatch.setattr(cudnn, "may_use_cudnn_rnn", lambda device: torch.backends.cudnn.enabled)
    before = torch.backends.cudnn.enabled
    torch.backends.cudnn.enabled = True
    yield
    torch.backends.cudnn.enabled = before


def test_graph_inspection_finds_cudnn_rnn_nodes():
    x = torch.randn(3, 4, requires_grad=True)
    w = torch.randn(4, 2)
    assert cudnn.has_cudnn_rnn((CudnnRnnStandIn.apply(x, w) * 2).exp().sum())
    assert not cudnn.has_cudnn_rnn(torch.tanh(x @ w).exp().sum())
    assert not cudnn.has_cudnn_rnn(x.sum().detach())


def test_without_the_fallback_the_double_backward_fails(cudnn_path, monkeypatch):
    monkeypatch.setattr(cudnn, "may_use_cudnn_rnn", lambda device: False)
    p = _problem(torch.float64)
    with pytest.raises(RuntimeError, match="differentiates the decoder twice.*CuDNN RNNs"):
        refine_grads(p, hvp="exact")


class _OnceDifferentiableTanh(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        y = torch.tanh(x)
        ctx.save_for_backward(y)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (y,) = ctx.saved_tensors
        return grad * (1 - y * y)


def test_once_differentiable_decoder_is_refused_by_exact():
    """A @once_differentiable backward leaves the second-order terms disconnected (autograd
    would return zeros, a silent wrong answer): exact mode raises instead."""
    p = _problem(torch.float64)
    p.nll_fn = lambda z: (_OnceDifferentiableTanh.apply(z) ** 2).sum(1) * 3.0
    with pytest.raises(RuntimeError, match="once_differentiable"):
        refine_grads(p, hvp="exact")
    refine_grads(p, hvp="fd_central")  # first order only: fine


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_exact_and_unrolled_run_without_cudnn_where_needed(cudnn_path, dropout, seed):
    p = _problem(torch.float64, dropout)
    p.decoder.train()
    state = torch.get_rng_state()
    _, ours = refine_grads(p, hvp="exact")
    assert torch.backends.cudnn.enabled  # restored
    torch.set_rng_state(state)
    _, ref = reference_grads(p)  # unrolled: every step differentiated twice
    assert torch.backends.cudnn.enabled
    # the first-order passes (forward steps, final ELBO) kept cuDNN
    worst, errs = max_rel_err(ours, ref)
    assert worst <= 1e-11, f"seed={seed} {errs}"


def test_evaluations_without_rnn_keep_cudnn(cudnn_path):
    seen = []
    evaluations = cudnn.TwiceDifferentiable(torch.device("cpu"))
    z = torch.randn(3, 2, requires_grad=True)
    for _ in range(3):
        evaluations.evaluate(lambda: seen.append(torch.backends.cudnn.enabled) or (z * z).sum())
    assert seen == [True] * 3 and not evaluations.without_cudnn


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("hvp", ["exact", "fd_central"])
def test_bundled_lstm_decoder_on_cuda(hvp, seed):
    """The cuDNN LSTM decoder: exact double backward and the float64 reference work on CUDA."""
    from savae_fast.testing import make_problem

    p = make_problem("lstm", torch.float64, batch=8, latent=4, steps=5, dropout=0.3).to(device="cuda")
    p.decoder.train()
    state = torch.cuda.get_rng_state()
    _, ours = refine_grads(p, hvp=hvp)
    torch.cuda.set_rng_state(state)
    _, ref = reference_grads(p)
    worst, errs = max_rel_err(ours, ref)
    assert worst <= {"exact": 1e-10, "fd_central": 1e-7}[hvp], f"seed={seed} {errs}"


@pytest.mark.parametrize("dropout", [0.0, 0.5])
def test_jvp_runs_rnns_without_cudnn_for_forward_mode(cudnn_path, dropout, seed):
    """The stand-in, like cuDNN's (and oneDNN's) RNN kernels, has no forward-mode derivative:
    hvp="jvp" reruns those evaluations without them (dropout replayed) and is exact."""
    p = _problem(torch.float64, dropout)
    p.decoder.train()
    state = torch.get_rng_state()
    _, ours = refine_grads(p, hvp="jvp")
    assert torch.backends.cudnn.enabled and torch.backends.mkldnn.enabled  # restored
    torch.set_rng_state(state)
    _, ref = reference_grads(p)
    worst, errs = max_rel_err(ours, ref)
    assert worst <= 1e-11, f"seed={seed} {errs}"


class _NoForwardMode(torch.autograd.Function):
    """A differentiable op with no forward-mode derivative (no jvp)."""

    @staticmethod
    def forward(ctx, z):
        ctx.save_for_backward(z)
        return torch.tanh(z)

    @staticmethod
    def backward(ctx, grad):
        (z,) = ctx.saved_tensors
        return grad * (1 - torch.tanh(z) ** 2)


def test_jvp_names_the_missing_forward_derivative():
    p = _problem(torch.float64)
    p.nll_fn = lambda z: (_NoForwardMode.apply(z) ** 2).sum(1)
    flags = (torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled)
    with pytest.raises(RuntimeError, match=r"hvp='jvp'\) needs forward-mode derivatives.*hvp='exact'"):
        refine_grads(p, hvp="jvp")
    assert (torch.backends.cudnn.enabled, torch.backends.mkldnn.enabled) == flags  # restored after the error
    refine_grads(p, hvp="exact")  # double backward works for it
