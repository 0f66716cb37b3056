"""Test-wide setup: the repository root (the toolkit's modules) and tests/ (``reference``) are
importable whatever directory pytest is started from."""
import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)
for _path in (_TESTS, _ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import pytest  # noqa: E402
import torch  # noqa: E402

# Triton's kernels run on the CPU under its interpreter, which is read when they are defined (at
# import): set it before anything imports kernels.triton, unless a GPU is there to run them.
if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')


def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs a CUDA GPU (skipped without one; benchmarks/gpu_check.sh '
                                       'runs them: python -m pytest -m cuda)')


def run_snn(model, x, steps):
    """Per-step running mean of the head's outputs, one step per call (the modules' own step-by-step
    mode): [sum_{s<=t} out_s / t for t in 1..steps]."""
    import torch
    from trans_utils import reset_net
    reset_net(model)
    means, total = [], 0
    with torch.no_grad():
        for t in range(1, steps + 1):
            total = total + model(x)
            means.append(total / t)
    return means


def relative_error(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.fixture(params=['native', 'triton', 'eager'])
def fast(request):
    """Run a test with each backend for the stateful modules it builds or converts: the native CPU
    kernels (the CPU default), the Triton kernels (CUDA's; here under Triton's interpreter) and
    eager torch operations; the previous default is restored afterwards. The value is the
    backend's name. A backend that cannot run here is skipped, saying why."""
    import trans_utils
    problem = trans_utils.backend_problem(request.param, 'cpu')
    if problem is not None:
        pytest.skip(problem)
    previous = trans_utils.set_default_backend(request.param)
    try:
        yield request.param
    finally:
        trans_utils.set_default_backend(previous)


@pytest.fixture
def eager_neuron():
    """Run a test with the eager backend (its modules and conversions)."""
    import trans_utils
    previous = trans_utils.set_default_backend('eager')
    yield 'eager'
    trans_utils.set_default_backend(previous)


@pytest.fixture(scope='module')
def single_thread():
    """One intra-op thread for the tiny tensors of the core tests: more threads only add
    synchronisation, which on a shared 2-core machine makes each small op several times slower."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
