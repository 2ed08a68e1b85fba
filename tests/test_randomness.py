"""Stochastic decoders (dropout): RNG replay, determinism, the caller's generator."""

import threading

import pytest
import torch

import savae_fast as sf
from savae_fast.testing import make_problem, max_rel_err, refine_grads, reference_grads


@pytest.mark.parametrize("kind", ["mlp", "lstm"])
def test_dropout_fd_central_agrees_with_exact(kind, seed):
    p = make_problem(kind, torch.float64, batch=16, latent=6, steps=8, dropout=0.5)
    p.decoder.train()
    state = torch.get_rng_state()
    _, central = refine_grads(p, hvp="fd_central")
    torch.set_rng_state(state)
    _, exact = refine_grads(p, hvp="exact")
    worst, errs = max_rel_err(central, exact)
    assert worst <= 1e-5, f"seed={seed} {errs}"


@pytest.mark.parametrize("hvp,other_thread", [("fd_central", False), ("fd_forward", False), ("fd_richardson", False),
                                              ("fd_adaptive", False), ("exact", False), ("jvp", False),
                                              ("fd_forward", True), ("fd_central", True)])
def test_dropout_matches_unrolled_reference(hvp, other_thread, seed):
    """unrolled calls nll_fn once per step from the same generator state, so with correct
    replay the dropout masks of every evaluation agree and so do the gradients. With
    another thread alive refine finds the decoder's draws per operator (a generator that
    moved may be that thread's doing) and still replays them."""
    p = make_problem("lstm", torch.float64, batch=16, latent=6, steps=8, dropout=0.5)
    p.decoder.train()
    stop = threading.Event()
    idle = threading.Thread(target=stop.wait)
    if other_thread:
        idle.start()
    state = torch.get_rng_state()
    try:
        _, ours = refine_grads(p, hvp=hvp)
    finally:
        stop.set()
        if other_thread:
            idle.join()
    torch.set_rng_state(state)
    _, ref = reference_grads(p)
    worst, errs = max_rel_err(ours, ref)
    bound = {"fd_central": 1e-7, "fd_forward": 1e-6, "fd_richardson": 1e-10, "fd_adaptive": 1e-10, "exact": 1e-11,
             "jvp": 1e-11}[hvp]
    assert worst <= bound, f"seed={seed} {errs}"


def test_without_replay_the_difference_quotient_is_noise():
    p = make_problem("lstm", torch.float64, batch=16, latent=6, steps=8, dropout=0.5)
    p.decoder.train()
    state = torch.get_rng_state()
    _, ref = reference_grads(p)
    torch.set_rng_state(state)
    _, ours = refine_grads(p, hvp="fd_central", preserve_rng_state=False)
    assert max_rel_err(ours, ref)[0] > 1e-2


DEVICES = ["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"]


@pytest.fixture
def deterministic_algorithms():
    """torch.use_deterministic_algorithms(True) for the test (on CUDA the decoder's own ops,
    e.g. the embedding backward, use atomics otherwise; our kernels have none)."""
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("hvp", ["fd_central", "fd_forward", "fd_adaptive", "exact", "jvp"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_same_seed_bit_identical(hvp, dtype, device, deterministic_algorithms):
    # CUDA's LSTM cell and dropout backward have no forward-mode derivative
    # (test_gpu_features.py::test_jvp_names_cuda_ops_without_forward_derivative)
    no_forward_ad = hvp == "jvp" and device == "cuda"
    p = make_problem("mlp" if no_forward_ad else "lstm", dtype, batch=8, latent=4, steps=6,
                     dropout=0.0 if no_forward_ad else 0.5).to(device=device)
    p.decoder.train()

    def run():
        torch.manual_seed(1234)
        mu0 = p.mu0.clone().requires_grad_(True)
        mu_k, lv_k = sf.refine(mu0, p.logvar0, p.nll_fn, p.params, steps=6, hvp=hvp)  # noise from the generator
        grads = torch.autograd.grad(p.elbo_loss(mu_k, lv_k), [mu0, *p.params])
        return [mu_k.detach(), lv_k.detach(), *grads]

    first, second = run(), run()
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_caller_generator_state():
    """After the forward: as if the noise were drawn and nll_fn called K times.
    The backward leaves the generator where it found it."""
    p = make_problem("mlp", torch.float64, batch=8, latent=4, steps=5, dropout=0.5)
    p.decoder.train()
    torch.manual_seed(7)
    torch.randn(5, 8, 4, dtype=torch.float64)
    for _ in range(5):
        p.nll_fn(torch.zeros(8, 4, dtype=torch.float64))
    expected = torch.get_rng_state()

    torch.manual_seed(7)
    mu0 = p.mu0.clone().requires_grad_(True)
    mu_k, lv_k = sf.refine(mu0, p.logvar0, p.nll_fn, p.params, steps=5)
    assert torch.equal(torch.get_rng_state(), expected)
    torch.rand(3)  # the caller moves on
    before_backward = torch.get_rng_state()
    (mu_k.sum() + lv_k.sum()).backward()
    assert torch.equal(torch.get_rng_state(), before_backward)


def test_dropout_replayed_in_fd_adaptive_retries(adaptive_evaluations, seed):
    """fd_adaptive evaluates a reverse step again where it halves an example's step, and every
    evaluation must see that step's dropout masks. Large-weight LSTM with dropout 0.3 in
    float64 (retries on every draw measured) against unrolled with the same masks."""
    from benchmarks.configs import CONFIGS, make_problem as config_problem
    from savae_fast.testing import relative_error

    p = config_problem(CONFIGS["large_weight_lstm"], "cpu", torch.float64, seed=int(torch.randint(2**31, ())))
    p.decoder.dropout.p = 0.3
    p.decoder.train()
    state = torch.get_rng_state()
    _, ours = refine_grads(p, hvp="fd_adaptive")
    torch.set_rng_state(state)
    _, ref = reference_grads(p)
    assert len(adaptive_evaluations) > p.noise.shape[0], "no reverse step was evaluated again"
    assert relative_error(ours, ref) <= 1e-9, f"seed={seed}"
