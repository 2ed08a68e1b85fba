import os
import random

import pytest
import torch

# Without a GPU, the Triton kernels are tested on CPU tensors by Triton's
# interpreter; it must be chosen before the kernels are defined (first use).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# cuBLAS is deterministic under torch.use_deterministic_algorithms(True) only with a fixed
# workspace configuration, read when cuBLAS starts (tests/test_randomness.py).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

# Fresh random inputs in every test; the seed is printed on failure and can be
# replayed with SAVAE_TEST_SEED=<seed>.
_SEED_ENV = "SAVAE_TEST_SEED"


@pytest.fixture(autouse=True)
def seed(request):
    value = int(os.environ[_SEED_ENV]) if _SEED_ENV in os.environ else random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    request.node.savae_seed = value
    return value


@pytest.fixture
def adaptive_evaluations(monkeypatch):
    """A list that grows by one at every evaluation of fd_adaptive's four passes (its first
    evaluation of each reverse step and every retry) during the test."""
    from savae_fast.refine.hvp import HVP_METHODS

    method = HVP_METHODS["fd_adaptive"]
    calls = []
    evaluate = method.evaluate
    monkeypatch.setattr(method, "evaluate", lambda *a, **kw: calls.append(1) or evaluate(*a, **kw))
    return calls


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed and hasattr(item, "savae_seed"):
        report.sections.append(("random seed", f"{_SEED_ENV}={item.savae_seed}"))


def pytest_report_header(config):
    from savae_fast import ops

    info = ops.build_info() if ops.extension_loaded() else {"extension": f"not loaded ({ops.EXTENSION_ERROR})"}
    return [f"savae_fast extension: {info}", f"torch {torch.__version__}, cuda available: {torch.cuda.is_available()}"]
