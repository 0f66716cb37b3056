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


def fast_neuron_enabled() -> bool:
    """Whether trans_utils currently fuses neuron/EC steps with torch.compile."""
    import trans_utils
    getter = getattr(trans_utils, 'fast_neuron_enabled', None)
    return getter() if getter is not None else trans_utils._FAST_NEURON


@pytest.fixture(params=[True, False], ids=['compiled', 'eager'])
def fast(request):
    """Run a test with the torch.compile-fused steps (the default) and with the eager ones;
    restore the previous setting afterwards."""
    import trans_utils
    previous = fast_neuron_enabled()
    if request.param and not any(shutil.which(c) for c in ('cc', 'gcc', 'clang', 'c++', 'g++')):
        pytest.skip('no C compiler: torch.compile cannot build the fused kernels here')
    trans_utils.set_fast_neuron(request.param)
    try:
        yield request.param
        # The fused path falls back to eager (with a warning) if compilation fails; that must
        # not have happened, or the "compiled" variant tested nothing.
        if request.param:
            assert fast_neuron_enabled(), 'torch.compile failed and the code fell back to eager'
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
