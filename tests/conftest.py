"""Test-wide setup: the repository root (the toolkit's modules) and tests/ (``reference``) are
importable whatever directory pytest is started from."""
import os
import sys

_TESTS = os.path.dirname(os.path.abspath(__file__))
_ROOT = os.path.dirname(_TESTS)
for _path in (_TESTS, _ROOT):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import shutil  # noqa: E402

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line('markers', 'cuda: needs a CUDA GPU (skipped without one; benchmarks/gpu_check.sh '
                                       'runs them: python -m pytest -m cuda)')


def fast_neuron_enabled() -> bool:
    """Whether modules built or converted from now on may take the fused backends (native,
    compiled)."""
    import trans_utils
    getter = getattr(trans_utils, 'fast_neuron_enabled', None)
    return getter() if getter is not None else trans_utils._FAST_NEURON


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


@pytest.fixture(params=['native', 'compiled', 'eager'])
def fast(request, monkeypatch):
    """Run a test with each backend of the neuron/EC modules it builds: the native CPU kernels (the
    CPU default), torch.compile (what other devices use for the neuron; EC eager then), and eager;
    restore the previous setting afterwards. The value is whether the fused backends are on."""
    import native_kernels
    import trans_utils
    fused = request.param != 'eager'
    previous = fast_neuron_enabled()
    if fused and not any(shutil.which(c) for c in ('cc', 'gcc', 'clang', 'c++', 'g++')):
        pytest.skip('no C compiler: the fused kernels cannot be built here')
    monkeypatch.setattr(native_kernels, 'ENABLED', request.param == 'native')
    trans_utils.set_fast_neuron(fused)
    try:
        yield fused
        # The fused paths fall back (with a warning) if compilation fails; that must not have
        # happened, or the variant tested nothing.
        if fused:
            assert fast_neuron_enabled(), 'torch.compile failed and the code fell back to eager'
        if request.param == 'native':
            assert native_kernels.library() is not None, 'the native kernels failed to build or load'
    finally:
        trans_utils.set_fast_neuron(previous)


@pytest.fixture
def eager_neuron():
    """Run a test with the eager neuron/EC steps (compilation is slow for one-off shapes)."""
    import trans_utils
    previous = fast_neuron_enabled()
    trans_utils.set_fast_neuron(False)
    yield
    trans_utils.set_fast_neuron(previous)


@pytest.fixture(scope='module')
def single_thread():
    """One intra-op thread for the tiny tensors of the core tests: more threads only add
    synchronisation, which on a shared 2-core machine makes each small op several times slower."""
    import torch
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
