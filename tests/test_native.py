"""The native CPU kernels (native_kernels, csrc/ecmt_kernels.cpp) against the plain references:
every table width of the neuron step, the EC steps of both GELUs, softmax and LayerNorm, thread
counts, block edges, special values; and the build: cached on disk, and a clean fallback where it
cannot be built."""
import functools
import math
import os

import pytest
import torch

import native_kernels
import trans_utils
from reference import ref_mt_neuron, ref_quantiles

needs_compiler = pytest.mark.skipif(not any(
    os.path.exists(os.path.join(d, c)) for d in os.environ.get('PATH', '').split(os.pathsep)
    for c in ('c++', 'g++', 'clang++')), reason='no C++ compiler here')


@pytest.fixture
def native(monkeypatch):
    monkeypatch.setattr(native_kernels, 'ENABLED', True)
    lib = native_kernels.library()
    assert lib is not None, 'the native kernels failed to build or load'
    return lib


@pytest.fixture(params=[1, 2], ids=['1-thread', '2-threads'])
def threads(request):
    previous = torch.get_num_threads()
    torch.set_num_threads(request.param)
    yield request.param
    torch.set_num_threads(previous)


# Blocks of the parallel loops hold 2^15 elements: sizes below, at and across block edges.
SIZES = [1, 15, 17, 1 << 15, (1 << 16) + 37]


def inputs_with_ties(n, theta_p, theta_n, levels, steps, seed):
    """Random inputs, with some elements landing exactly on a threshold at the first step."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(n, generator=g) * theta_p * 2 ** (levels - 1) for _ in range(steps)]
    tp, tn = torch.tensor(theta_p), torch.tensor(theta_n)  # float32, as the neuron's thresholds
    edges = torch.stack([tp * 2 ** j - tp / 2 for j in range(levels)]
                        + [-(tn * 2 ** j - tn / 2) for j in range(levels)])
    picks = torch.randint(0, n, (max(1, n // 7),), generator=g)
    xs[0][picks] = edges[torch.randint(0, len(edges), picks.shape, generator=g)]
    return xs


@functools.lru_cache(maxsize=None)
def neuron_case(levels, n, theta_p, theta_n):
    """Inputs and the reference's spikes, computed once for every thread count and variant (the
    literal reference is slow on 65k elements and 33 levels)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        xs = inputs_with_ties(n, theta_p, theta_n, levels, steps=4, seed=levels * 1000 + n)
        xs[0][:3] = -0.0  # 0 + (-0) is +0: the first-step shortcut must round the same way
        return xs, ref_mt_neuron(xs, theta_p, theta_n, levels)
    finally:
        torch.set_num_threads(previous)


@needs_compiler
@pytest.mark.parametrize('levels', [1, 4, 8, 9, 16, 17, 33])  # table widths 8, 16, 32 and 64 (generic)
@pytest.mark.parametrize('n', SIZES)
@pytest.mark.parametrize('first', [False, True], ids=['zeroed', 'first_step_flag'])
def test_neuron_step_equals_the_reference_bit_for_bit(native, threads, levels, n, first):
    theta_p, theta_n = 0.37, 0.21
    xs, want = neuron_case(levels, n, theta_p, theta_n)
    table = trans_utils.level_table(torch.tensor(theta_p), torch.tensor(theta_n), levels)
    # With the first-step flag the membrane's old contents must not be read: NaN would show.
    membrane = torch.full((n,), float('nan')) if first else torch.zeros(n)
    for t, (x, spike_want) in enumerate(zip(xs, want)):
        spike, count = native_kernels.mt_step(membrane, x, table, first=first and t == 0)
        if t == 0:
            membrane_want = xs[0] + 0.0 - spike_want  # the reference's v after step 1, rounding included
            assert torch.equal(membrane, membrane_want) and not membrane.isnan().any()
        assert torch.equal(spike, spike_want), f'step {t + 1}'
        assert count.dtype == torch.int64 and int(count) == int((spike_want != 0).sum())
    membrane_want = sum(xs) - sum(want)  # v after the last step, as the reference computes it
    torch.testing.assert_close(membrane, membrane_want, rtol=0, atol=1e-5 * theta_p * 2 ** levels)


@needs_compiler
@pytest.mark.parametrize('theta_p, theta_n', [(0.0, 0.3), (-1.0, 0.3), (0.3, float('nan'))])
def test_neuron_step_unusable_side_never_fires(native, theta_p, theta_n):
    xs = [torch.randn(40_000, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    want = ref_mt_neuron(xs, theta_p, theta_n, 4)
    table = trans_utils.level_table(torch.tensor(theta_p), torch.tensor(theta_n), 4)
    membrane = torch.zeros(40_000)
    for x, spike_want in zip(xs, want):
        assert torch.equal(native_kernels.mt_step(membrane, x, table)[0], spike_want)


def f64_gelu(x, approximate):
    x = x.double()
    if approximate:
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


@needs_compiler
@pytest.mark.parametrize('approximate', [False, True], ids=['erf', 'tanh'])
@pytest.mark.parametrize('n', SIZES)
def test_gelu_ec_step_matches_float64(native, threads, approximate, n):
    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(n, generator=g) * 4 for _ in range(5)]
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 5.0, -5.0, 9.0, -9.0, 30.0, -30.0,
                            80.0, -80.0])
    k = min(n, len(special))
    xs[0][:k] = special[:k]
    cum = xs[0].clone()
    prev = f64_gelu(cum, approximate).float()  # step 1 is f(x) (computed by the module itself)
    for t in range(2, len(xs) + 1):
        cum_want = cum.double() + xs[t - 1].double()
        prev_before = prev.double()
        out = native_kernels.ec_gelu(cum, xs[t - 1], prev, float(t), approximate)
        total_want = t * f64_gelu(cum_want / t, approximate)
        torch.testing.assert_close(cum.double(), cum_want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(prev.double(), total_want, rtol=2e-6, atol=1e-6 * t)
        torch.testing.assert_close(out.double(), total_want - prev_before, rtol=2e-6, atol=2e-6 * t)


@needs_compiler
@pytest.mark.parametrize('approximate', [False, True], ids=['erf', 'tanh'])
def test_gelu_ec_step_propagates_nan(native, approximate):
    x = torch.tensor([float('nan'), 1.0, -3.0, 0.5] * 5)
    cum = torch.zeros_like(x)
    prev = torch.zeros_like(x)
    out = native_kernels.ec_gelu(cum, x, prev, 2.0, approximate)
    assert torch.equal(out.isnan(), x.isnan()) and torch.equal(prev.isnan(), x.isnan())
    finite = ~x.isnan()
    want = f64_gelu(x[finite] / 2, approximate) * 2
    torch.testing.assert_close(out[finite].double(), want, rtol=1e-6, atol=1e-6)


def run_row_steps(step, xs, f64_f):
    """Feed 2-D inputs to a native row step from step 2 on; compare every output, running sum and
    total with float64 (step 1 is f itself, computed by the module)."""
    cum = xs[0].clone()
    prev = (f64_f(cum.double())).float()
    for t in range(2, len(xs) + 1):
        cum_want = cum.double() + xs[t - 1].double()
        prev_before = prev.double()
        out = step(cum, xs[t - 1], prev, float(t))
        total_want = t * f64_f(cum_want / t)
        torch.testing.assert_close(cum.double(), cum_want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(prev.double(), total_want, rtol=1e-5, atol=2e-6 * t)
        torch.testing.assert_close(out.double(), total_want - prev_before, rtol=1e-5, atol=4e-6 * t)


@needs_compiler
@pytest.mark.parametrize('cols', [1, 5, 16, 33, 197])
@pytest.mark.parametrize('rows', [1, 7, 1200])
def test_softmax_ec_step_matches_float64(native, threads, rows, cols):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    xs = [torch.randn(rows, cols, generator=g) * 3 for _ in range(4)]
    if cols > 2:  # masked positions (-inf) stay exactly 0, as in torch's softmax
        xs[0][:, 1] = float('-inf')
    run_row_steps(native_kernels.ec_softmax, xs, lambda a: torch.softmax(a, -1))
    cum, prev = xs[0].clone(), torch.softmax(xs[0], -1)
    out = native_kernels.ec_softmax(cum, xs[1], prev, 2.0)
    if cols > 2:
        assert torch.equal(prev[:, 1], torch.zeros(rows)) and not out.isnan().any()


@needs_compiler
@pytest.mark.parametrize('cols', [1, 5, 16, 33, 384])
@pytest.mark.parametrize('affine', [True, False])
def test_layer_norm_ec_step_matches_float64(native, threads, cols, affine):
    g = torch.Generator().manual_seed(cols)
    rows, eps = 300, 1e-6
    xs = [torch.randn(rows, cols, generator=g) * 2 + 0.5 for _ in range(4)]
    weight = torch.randn(cols, generator=g) if affine else None
    bias = torch.randn(cols, generator=g) if affine else None

    def f64_f(a):
        return torch.nn.functional.layer_norm(a, (cols,), None if weight is None else weight.double(),
                                              None if bias is None else bias.double(), eps)

    run_row_steps(lambda c, x, p, t: native_kernels.ec_layer_norm(c, x, p, t, weight, bias, eps), xs, f64_f)
    with pytest.raises(ValueError):
        native_kernels.ec_layer_norm(xs[0].clone(), xs[1], xs[0].clone(), 2.0, torch.ones(cols + 1), None, eps)


@needs_compiler
def test_thread_counts_give_identical_results(native):
    x = torch.randn((1 << 17) + 5, generator=torch.Generator().manual_seed(3))
    table = trans_utils.level_table(torch.tensor(0.2), torch.tensor(0.3), 8)
    results = []
    previous = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            membrane = torch.zeros_like(x)
            spike, nonzero = native_kernels.mt_step(membrane, x, table)
            cum, prev = x.clone(), torch.zeros_like(x)
            rows = x[:(1 << 17)].view(-1, 64)
            results.append((spike, nonzero, membrane, native_kernels.ec_gelu(cum, x, prev, 2.0, False),
                            native_kernels.ec_softmax(rows.clone(), rows, torch.zeros_like(rows), 2.0),
                            native_kernels.ec_layer_norm(rows.clone(), rows, torch.zeros_like(rows), 2.0,
                                                         None, None, 1e-5)))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@needs_compiler
def test_wrappers_refuse_mismatched_arguments(native):
    table = trans_utils.level_table(torch.tensor(0.2), torch.tensor(0.3), 8)
    with pytest.raises(ValueError):
        native_kernels.mt_step(torch.zeros(10), torch.zeros(11), table)
    with pytest.raises(ValueError):
        native_kernels.mt_step(torch.zeros(10), torch.zeros(10), table.t())
    with pytest.raises(ValueError):
        native_kernels.ec_gelu(torch.zeros(4, 5), torch.zeros(4, 5), torch.zeros(4, 4), 2.0, False)


def _fresh_library_state(monkeypatch, cache):
    monkeypatch.setenv('ECMT_CACHE_DIR', str(cache))
    monkeypatch.setattr(native_kernels, 'ENABLED', True)
    monkeypatch.setattr(native_kernels, '_library', None)
    monkeypatch.setattr(native_kernels, '_failed', False)


@needs_compiler
def test_build_is_cached_on_disk_and_reused(monkeypatch, tmp_path):
    _fresh_library_state(monkeypatch, tmp_path)
    assert native_kernels.library() is not None
    built = sorted(os.listdir(tmp_path / 'native'))
    assert len(built) == 1 and built[0].startswith('ecmt_kernels-') and built[0].endswith('.so')
    # A new process (here: a fresh module state) loads the file without compiling again.
    monkeypatch.setattr(native_kernels, '_library', None)

    def no_compiler(*args, **kwargs):
        raise AssertionError('compiled again although the library is cached')
    import subprocess
    monkeypatch.setattr(subprocess, 'run', no_compiler)
    assert native_kernels.library() is not None
    assert sorted(os.listdir(tmp_path / 'native')) == built


def test_without_a_compiler_everything_falls_back_with_one_warning(monkeypatch, tmp_path):
    _fresh_library_state(monkeypatch, tmp_path)
    monkeypatch.setenv('CXX', str(tmp_path / 'no-such-compiler'))
    with pytest.warns(UserWarning, match='native kernels unavailable'):
        assert native_kernels.library() is None
    assert not (tmp_path / 'native').exists() or not os.listdir(tmp_path / 'native')  # nothing half-written
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # no second warning
        assert native_kernels.library() is None
        # The calibration still gives the exact statistics (numpy instead).
        x = torch.randn(100_000, generator=torch.Generator().manual_seed(8))
        got = trans_utils.tail_quantiles(x, 0.99)
        want = ref_quantiles(x, 0.99)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not native_kernels.usable(torch.zeros(3))


@needs_compiler
@pytest.mark.parametrize('layout', ['contiguous', 'permuted', 'long_rows', 'short_rows'])
def test_selection_scan_on_several_threads_is_exact(native, monkeypatch, layout):
    """The selection kernel's scan splits the tensor among threads (blocks of rows, or chunks of
    one long row) and joins what each gathered: the statistics are the same at any count."""
    monkeypatch.setattr(trans_utils, '_CPU_SELECTION', 'native')
    g = torch.Generator().manual_seed(21)
    x = {'contiguous': lambda: torch.randn(300_007, generator=g),
         'permuted': lambda: torch.randn(7, 33, 3, 5, 64, generator=g).permute(2, 0, 3, 1, 4)[1],
         'long_rows': lambda: torch.randn(3, 100_003, generator=g).t(),
         'short_rows': lambda: torch.randn(20_000, 3, generator=g)[:, :2]}[layout]()
    previous = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            for percent in (0.99, 0.9):
                got = trans_utils.tail_quantiles(x, percent)
                want = ref_quantiles(x, percent)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (count, percent)
    finally:
        torch.set_num_threads(previous)


@needs_compiler
@pytest.mark.parametrize('layout', ['qkv_view', 'inner_stride_2', 'transposed', 'expanded'])
def test_neuron_step_reads_strided_inputs_where_they_lie(native, threads, layout):
    """A strided input (the q of a fused qkv, say) gives the spikes of its contiguous copy."""
    g = torch.Generator().manual_seed(5)
    make = {'qkv_view': lambda: torch.randn(4, 37, 3, 3, 16, generator=g).permute(2, 0, 3, 1, 4)[0],
            'inner_stride_2': lambda: torch.randn(6, 50, 34, generator=g)[..., ::2],
            'transposed': lambda: torch.randn(300, 70, generator=g).t(),
            'expanded': lambda: torch.randn(1, 40, 9, generator=g).expand(5, 40, 9)}[layout]
    xs = [make() for _ in range(3)]
    assert not xs[0].is_contiguous()
    table = trans_utils.level_table(torch.tensor(0.3), torch.tensor(0.25), 4)
    want = ref_mt_neuron([x.contiguous().reshape(-1) for x in xs], 0.3, 0.25, 4)
    membrane = torch.zeros(xs[0].numel())
    for x, spike_want in zip(xs, want):
        spike, count = native_kernels.mt_step(membrane, x, table)
        assert torch.equal(spike, spike_want) and int(count) == int((spike_want != 0).sum())


@needs_compiler
def test_prepare_builds_on_a_thread_and_callers_wait_for_that_build(monkeypatch, tmp_path):
    import threading
    import time
    _fresh_library_state(monkeypatch, tmp_path)
    builds = []
    original = native_kernels._build

    def slow_build():
        builds.append(threading.current_thread().name)
        time.sleep(0.3)  # the caller below arrives while this build runs
        return original()
    monkeypatch.setattr(native_kernels, '_build', slow_build)
    native_kernels.prepare()
    time.sleep(0.05)
    assert native_kernels.library() is not None  # waits for the thread's build, builds nothing
    assert builds == ['ecmt-native-kernels']
    native_kernels.prepare()  # loaded: nothing more to do
    time.sleep(0.05)
    assert builds == ['ecmt-native-kernels']
