"""The native CPU kernels (native_kernels, csrc/ecmt_kernels.cpp) against the plain references:
every table width of the multi-step neuron, the multi-step EC of both GELUs, softmax and LayerNorm,
state carried between chunks, thread counts, tile and work-item edges, special values; and the
build: cached on disk, and a clean fallback where it cannot be built."""
import functools
import math
import os

import pytest
import torch

import kernels
import kernels.native as native_kernels
import calibration
import trans_utils
from reference import (ref_differential_neuron, ref_mt_neuron, ref_product_differences, ref_quantiles,
                       ref_running_sums)

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


# Tiles of 64 elements, work items of 2048: sizes below, at and across their edges.
SIZES = [1, 15, 64, 65, 2048, (1 << 16) + 37]
# Chunks of the 4 steps: the state is carried (first chunk: fresh and kept; then read and kept;
# the last: read, not kept).
CHUNKS = {'4': [4], '1+3': [1, 3], '2+1+1': [2, 1, 1]}


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


def neuron_chunks(xs, table, sizes):
    """Run mt_steps over the steps ``xs`` in chunks of ``sizes``; (spikes, counts, membranes
    carried after each chunk but the last)."""
    spikes, counts, carried, membrane, first = [], [], [], None, 0
    for count in sizes:
        keep = first + count < len(xs)
        spike, nonzero, membrane = native_kernels.mt_steps(torch.stack(xs[first:first + count]), table,
                                                          membrane, keep)
        spikes += list(spike)
        counts += nonzero.tolist()
        if keep:
            carried.append(membrane.clone())
        else:
            assert membrane is None
        first += count
    return spikes, counts, carried


@needs_compiler
@pytest.mark.parametrize('levels', [1, 4, 8, 9, 16, 17, 33])  # table widths 8, 16, 32 and 64 (generic)
@pytest.mark.parametrize('n', SIZES)
@pytest.mark.parametrize('chunks', CHUNKS)
def test_neuron_steps_equal_the_reference_bit_for_bit(native, threads, levels, n, chunks):
    theta_p, theta_n = 0.37, 0.21
    xs, want = neuron_case(levels, n, theta_p, theta_n)
    table = trans_utils.level_table(torch.tensor(theta_p), torch.tensor(theta_n), levels)
    spikes, counts, carried = neuron_chunks(xs, table, CHUNKS[chunks])
    for t, (spike, spike_want) in enumerate(zip(spikes, want)):
        assert torch.equal(spike, spike_want), f'step {t + 1}'
        assert counts[t] == int((spike_want != 0).sum())
    # The membrane carried after each chunk is the reference's v, rounding included.
    first, membrane = 0, torch.zeros(n)
    for count, got in zip(CHUNKS[chunks], carried):
        for t in range(first, first + count):
            membrane = membrane + xs[t] - want[t]
        first += count
        torch.testing.assert_close(got, membrane, rtol=0, atol=1e-5 * theta_p * 2 ** levels)
        assert not got.isnan().any()
    if CHUNKS[chunks][0] == 1:  # after one step from rest: v = (0 + x) - spike exactly
        assert torch.equal(carried[0], xs[0] + 0.0 - want[0])


@needs_compiler
@pytest.mark.parametrize('theta_p, theta_n', [(0.0, 0.3), (-1.0, 0.3), (0.3, float('nan'))])
def test_neuron_steps_unusable_side_never_fires(native, theta_p, theta_n):
    xs = [torch.randn(40_000, generator=torch.Generator().manual_seed(s)) for s in range(3)]
    want = ref_mt_neuron(xs, theta_p, theta_n, 4)
    table = trans_utils.level_table(torch.tensor(theta_p), torch.tensor(theta_n), 4)
    spikes, _, _ = neuron_chunks(xs, table, [1, 2])
    for spike, spike_want in zip(spikes, want):
        assert torch.equal(spike, spike_want)


def f64_gelu(x, approximate):
    x = x.double()
    if approximate:
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ec_chunks(step, xs, sizes):
    """Run a multi-step EC kernel over the steps ``xs`` in chunks of ``sizes``: (outputs per step,
    (step, cum, prev) carried after each chunk but the last)."""
    outs, carried, cum, prev, first = [], [], None, None, 0
    for count in sizes:
        keep = first + count < len(xs)
        out, cum, prev = step(torch.stack(xs[first:first + count]), cum, prev, first, keep)
        outs += list(out)
        if keep:
            carried.append((first + count, cum.clone(), prev.clone()))
        else:
            assert cum is None and prev is None
        first += count
    return outs, carried


def check_ec(outs, carried, xs, f64_f, rtol, atol):
    """Every output, and the running sum and total carried after each chunk, against float64."""
    cum, prev = 0, 0
    totals = {}
    for t, (x, out) in enumerate(zip(xs, outs), start=1):
        cum = cum + x.double()
        total = t * f64_f(cum / t)
        torch.testing.assert_close(out.double(), total - prev, rtol=rtol, atol=atol * t, msg=f'step {t}')
        totals[t] = (cum, total)
        prev = total
    for t, cum_got, prev_got in carried:
        cum_want, total_want = totals[t]
        torch.testing.assert_close(cum_got.double().view(cum_want.shape), cum_want, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(prev_got.double().view(total_want.shape), total_want, rtol=rtol, atol=atol * t)


@needs_compiler
@pytest.mark.parametrize('approximate', [False, True], ids=['erf', 'tanh'])
@pytest.mark.parametrize('n', SIZES)
@pytest.mark.parametrize('chunks', ['1+3', '2+1+1'])
def test_gelu_ec_steps_match_float64(native, threads, approximate, n, chunks):
    g = torch.Generator().manual_seed(n)
    xs = [torch.randn(n, generator=g) * 4 for _ in range(4)]
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 5.0, -5.0, 9.0, -9.0, 30.0, -30.0,
                            80.0, -80.0])
    k = min(n, len(special))
    xs[0][:k] = special[:k]
    step = lambda x, cum, prev, t0, keep: native_kernels.ec_gelu_steps(x, cum, prev, t0, keep, approximate)  # noqa: E731
    outs, carried = ec_chunks(step, xs, CHUNKS[chunks])
    check_ec(outs, carried, xs, lambda a: f64_gelu(a, approximate), rtol=2e-6, atol=2e-6)


@needs_compiler
@pytest.mark.parametrize('approximate', [False, True], ids=['erf', 'tanh'])
def test_gelu_ec_steps_propagate_nan(native, approximate):
    x = torch.tensor([float('nan'), 1.0, -3.0, 0.5] * 5)
    out, cum, prev = native_kernels.ec_gelu_steps(torch.stack([x, x]), None, None, 0, True, approximate)
    for o in out:
        assert torch.equal(o.isnan(), x.isnan())
    assert torch.equal(prev.isnan(), x.isnan()) and torch.equal(cum.isnan(), x.isnan())
    finite = ~x.isnan()
    torch.testing.assert_close(out[1][finite].double(), f64_gelu(x[finite], approximate),
                               rtol=1e-6, atol=1e-6)  # 2 gelu(2x/2) - gelu(x)


@needs_compiler
@pytest.mark.parametrize('cols', [1, 5, 16, 33, 197])
@pytest.mark.parametrize('rows', [1, 7, 1200])
def test_softmax_ec_steps_match_float64(native, threads, rows, cols):
    g = torch.Generator().manual_seed(rows * 1000 + cols)
    xs = [torch.randn(rows, cols, generator=g) * 3 for _ in range(4)]
    if cols > 2:  # masked positions (-inf) stay exactly 0, as in torch's softmax
        for x in xs:
            x[:, 1] = float('-inf')
    outs, carried = ec_chunks(native_kernels.ec_softmax_steps, xs, CHUNKS['1+3'])
    if cols > 2:
        assert all(torch.equal(o[:, 1], torch.zeros(rows)) and not o.isnan().any() for o in outs)
        for x in xs:
            x[:, 1] = -1e30  # for the float64 reference: as -inf after the softmax
        for _, cum, _ in carried:
            cum.view(rows, cols)[:, 1] = -1e30
    check_ec(outs, carried, xs, lambda a: torch.softmax(a, -1), rtol=1e-5, atol=4e-6)


@needs_compiler
@pytest.mark.parametrize('cols', [1, 5, 16, 33, 384])
@pytest.mark.parametrize('affine', [True, False])
def test_layer_norm_ec_steps_match_float64(native, threads, cols, affine):
    g = torch.Generator().manual_seed(cols)
    rows, eps = 300, 1e-6
    xs = [torch.randn(rows, cols, generator=g) * 2 + 0.5 for _ in range(4)]
    weight = torch.randn(cols, generator=g) if affine else None
    bias = torch.randn(cols, generator=g) if affine else None

    def f64_f(a):
        return torch.nn.functional.layer_norm(a, (cols,), None if weight is None else weight.double(),
                                              None if bias is None else bias.double(), eps)

    step = lambda x, cum, prev, t0, keep: native_kernels.ec_layer_norm_steps(  # noqa: E731
        x, cum, prev, t0, keep, weight, bias, eps)
    outs, carried = ec_chunks(step, xs, CHUNKS['2+1+1'])
    check_ec(outs, carried, xs, f64_f, rtol=1e-5, atol=4e-6)
    with pytest.raises(ValueError):
        native_kernels.ec_layer_norm_steps(torch.stack(xs[:2]), None, None, 0, False, torch.ones(cols + 1), None, eps)


@needs_compiler
@pytest.mark.parametrize('layout', ['contiguous', 'transposed'])
@pytest.mark.parametrize('chunks', CHUNKS)
@pytest.mark.parametrize('scale', [None, 0.125 ** 0.5])
def test_product_bookkeeping_equals_the_reference_bit_for_bit(native, threads, layout, chunks, scale):
    """The EC products' running sums (of a transposed k, say) and scaled differences along time:
    ECMT_SPEC 6's float32 steps as tests/reference.py takes them, bit for bit, in every chunking
    (the state carried from one chunk to the next)."""
    g = torch.Generator().manual_seed(9)
    full = torch.randn(4, 3, 70, 65, generator=g) * (torch.rand(4, 3, 70, 65, generator=g) < 0.5)
    xs = full.transpose(-2, -1) if layout == 'transposed' else full
    products = torch.randn(4, 3, 50, 33, generator=g)
    want_sums = ref_running_sums(list(xs))
    want_outs, want_totals = ref_product_differences(list(products), scale)
    cum = prev = None
    first = 0
    for count in CHUNKS[chunks]:
        keep = first + count < 4
        sums = native_kernels.running_sums(xs[first:first + count], cum)
        assert sums.is_contiguous()
        assert all(torch.equal(sums[k], want_sums[first + k]) for k in range(count))
        cum = sums[-1].reshape(-1).clone()
        totals = products[first:first + count].clone()
        if scale is None:
            out, last = native_kernels.scaled_differences(totals, prev, first, keep)
        else:
            out, last = native_kernels.scaled_differences(totals, prev, first, keep, scale)
        assert all(torch.equal(out[k], want_outs[first + k]) for k in range(count))  # the output times the scale
        if keep:
            assert torch.equal(last, want_totals[first + count - 1])
        else:
            assert last is None
        prev = None if last is None else last.reshape(-1)
        first += count


@needs_compiler
@pytest.mark.parametrize('layout', ['contiguous', 'transposed', 'sliced', 'unmergeable'])
@pytest.mark.parametrize('dim', [-2, -1])
def test_nonzero_counts_equal_torch(native, threads, layout, dim):
    """The energy monitor's per-column / per-row non-zero counts of a product operand, in one pass
    whatever its strides (a transposed k, a slice); leading dimensions that do not merge into one
    stride are left to torch (None)."""
    g = torch.Generator().manual_seed(3)
    full = torch.randn(4, 3, 70, 65, generator=g) * (torch.rand(4, 3, 70, 65, generator=g) < 0.4)
    full[0, 0, 5] = -0.0  # a negative zero is a zero
    x = {'contiguous': full, 'transposed': full.transpose(-2, -1), 'sliced': full[:, :, 3:60, ::2],
         'unmergeable': full[:, :2]}[layout]
    got = native_kernels.nonzero_counts(x, dim)
    want = (x != 0).sum(dim=dim).float()
    if layout == 'unmergeable':
        assert got is None
        product = trans_utils.AtNeuron()
        product.backend = 'native'
        assert torch.equal(product._count_nonzero(x, dim), want.double())  # torch counts then
    else:
        assert got.shape == want.shape and torch.equal(got, want)


@needs_compiler
def test_thread_counts_give_identical_results(native):
    x = torch.randn(3, (1 << 17) + 5, generator=torch.Generator().manual_seed(3))
    table = trans_utils.level_table(torch.tensor(0.2), torch.tensor(0.3), 8)
    rows = x[:, :(1 << 17)].reshape(3, -1, 64)
    results = []
    previous = torch.get_num_threads()
    try:
        for count in (1, 2, 3):
            torch.set_num_threads(count)
            results.append((*native_kernels.mt_steps(x, table, None, True),
                            *native_kernels.ec_gelu_steps(x, None, None, 0, True, False),
                            *native_kernels.ec_softmax_steps(rows, None, None, 0, True),
                            *native_kernels.ec_layer_norm_steps(rows, None, None, 0, True, None, None, 1e-5)))
    finally:
        torch.set_num_threads(previous)
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))


@needs_compiler
def test_wrappers_refuse_mismatched_arguments(native):
    table = trans_utils.level_table(torch.tensor(0.2), torch.tensor(0.3), 8)
    with pytest.raises(ValueError):
        native_kernels.mt_steps(torch.zeros(2, 10), table, torch.zeros(11), True)
    with pytest.raises(ValueError):
        native_kernels.mt_steps(torch.zeros(2, 10), table[0].t(), None, True)
    with pytest.raises(ValueError):
        native_kernels.ec_gelu_steps(torch.zeros(2, 5), torch.zeros(5), None, 1, True, False)
    with pytest.raises(ValueError):
        native_kernels.ec_softmax_steps(torch.zeros(2, 5), None, None, 0, True)  # not [K, rows, cols]


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
    with pytest.warns(UserWarning, match='eager backend'):
        assert trans_utils.resolve_backend('auto', 'cpu') == 'eager'
    with pytest.raises(trans_utils.ConversionError, match='could not be built'):
        trans_utils.resolve_backend('native', 'cpu')


@needs_compiler
@pytest.mark.parametrize('layout', ['contiguous', 'permuted', 'long_rows', 'short_rows'])
def test_selection_scan_on_several_threads_is_exact(native, monkeypatch, layout):
    """The selection kernel's scan splits the tensor among threads (blocks of rows, or chunks of
    one long row) and joins what each gathered: the statistics are the same at any count."""
    monkeypatch.setattr(calibration, '_CPU_SELECTION', 'native')
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
def test_neuron_steps_read_strided_inputs_where_they_lie(native, threads, layout):
    """A strided input (the q of a fused qkv, say; steps first) gives the spikes of its
    contiguous copy."""
    g = torch.Generator().manual_seed(5)
    make = {'qkv_view': lambda: torch.randn(3, 4, 37, 3, 3, 16, generator=g).permute(3, 0, 1, 4, 2, 5)[0],
            'inner_stride_2': lambda: torch.randn(3, 6, 50, 34, generator=g)[..., ::2],
            'transposed': lambda: torch.randn(3, 300, 70, generator=g).transpose(1, 2),
            'expanded': lambda: torch.randn(3, 1, 40, 9, generator=g).expand(3, 5, 40, 9)}[layout]
    x = make()
    assert not x.is_contiguous()
    table = trans_utils.level_table(torch.tensor(0.3), torch.tensor(0.25), 4)
    want = ref_mt_neuron([step.contiguous() for step in x], 0.3, 0.25, 4)
    spike, counts, _ = native_kernels.mt_steps(x, table, None, False)
    for t in range(3):
        assert torch.equal(spike[t], want[t]) and int(counts[t]) == int((want[t] != 0).sum())


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


def _ec_then_neuron(kind, x, cum, prev, t0, keep, table, membrane, affine, channels=(1, 1, 1)):
    """The unfused pair: the EC kernel's output, then mt_steps on it."""
    if kind.startswith('gelu'):
        out, cum, prev = native_kernels.ec_gelu_steps(x, cum, prev, t0, keep, kind == 'gelu_tanh')
    elif kind == 'softmax':
        out, cum, prev = native_kernels.ec_softmax_steps(x, cum, prev, t0, keep)
    else:
        out, cum, prev = native_kernels.ec_layer_norm_steps(x, cum, prev, t0, keep, *affine, 1e-6)
    spike, counts, membrane = native_kernels.mt_steps(out, table, membrane, keep, channels=channels)
    return spike, counts, cum, prev, membrane


@needs_compiler
@pytest.mark.parametrize('kind', ['gelu', 'gelu_tanh', 'softmax', 'layer_norm'])
@pytest.mark.parametrize('levels', [4, 16, 33])  # table widths 8, 16 and 64 (generic)
@pytest.mark.parametrize('chunks', CHUNKS)
@pytest.mark.parametrize('thresholds', ['place', 'channel'])
def test_fused_ec_neuron_equals_the_two_kernels_bit_for_bit(native, threads, kind, levels, chunks, thresholds):
    """ec_mt_steps (an EC kernel with the MT neuron it feeds fused after it) gives the spikes,
    counts and carried states of the EC kernel followed by mt_steps, whatever the chunking; with
    one threshold pair, or one per feature (ECMT_SPEC 15; the rounding rule)."""
    g = torch.Generator().manual_seed(levels)
    rows, cols = 37, 197  # rows longer than a tile, 7289 elements: several tiles and work items
    xs = torch.randn(4, rows, cols, generator=g) * 3
    if kind.startswith('gelu'):
        xs = xs.reshape(4, -1)
    affine = (torch.randn(cols, generator=g), torch.randn(cols, generator=g))
    if thresholds == 'place':
        table, channels = trans_utils.level_table(torch.tensor(0.05), torch.tensor(0.03), levels), (1, 1, 1)
    else:
        theta_p, theta_n = torch.rand(cols, generator=g) * 0.1, torch.rand(cols, generator=g) * 0.1 - 0.01
        table = kernels.level_table(theta_p, theta_n, levels, fire_rule='round')
        channels = kernels.channel_map(theta_p.shape, (rows, cols))
    states = {'fused': [None, None, None], 'apart': [None, None, None]}
    first = 0
    for count in CHUNKS[chunks]:
        x, keep = xs[first:first + count], first + count < 4
        cum, prev, membrane = states['apart']
        want = _ec_then_neuron(kind, x, cum, prev, first, keep, table, membrane, affine, channels)
        cum, prev, membrane = states['fused']
        extra = ({'approximate': kind == 'gelu_tanh'} if kind.startswith('gelu') else
                 {'weight': affine[0], 'bias': affine[1], 'eps': 1e-6} if kind == 'layer_norm' else {})
        got = native_kernels.ec_mt_steps('gelu' if kind.startswith('gelu') else kind, x, cum, prev, first, keep,
                                         table, membrane, channels=channels, **extra)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        assert int(got[1].sum()) > 0 and int((got[0] == 0).sum()) > 0  # both fire and rest: not void
        for a, b in zip(got[2:], want[2:]):
            assert (a is None and b is None) if not keep else torch.equal(a, b)
        states['apart'], states['fused'] = list(want[2:]), list(got[2:])
        first += count


@needs_compiler
@pytest.mark.parametrize('levels', [4, 16, 33])  # table widths 8, 16 and 64 (generic)
@pytest.mark.parametrize('chunks', CHUNKS)
@pytest.mark.parametrize('shape', [(3, 7, 2, 32), (2, 65, 3, 5), (1, 4, 2, 88), (2, 150, 1, 64)],
                         ids=['heads32', 'odd_head', 'head_over_a_tile', 'long_block'])
def test_qkv_neurons_equal_three_neurons_on_the_views_bit_for_bit(native, threads, levels, chunks, shape):
    """qkv_mt_steps (the q, k or v neuron reading its part of a fused qkv output in place) gives
    each neuron's spikes, counts and carried membranes of mt_steps on its head-split view, for
    every chunking: heads shorter than, as long as and longer than a tile (88 = 64 + 24), token
    blocks of an image split over several work items (150 tokens of 3 x 64)."""
    B, N, H, D = shape
    g = torch.Generator().manual_seed(levels * 7 + N)
    xs = torch.randn(4, B, N, 3 * H * D, generator=g) * 0.4
    xs[0, 0, 0, :5] = -0.0
    tables = [trans_utils.level_table(torch.tensor(p), torch.tensor(n), levels)
              for p, n in ((0.05, 0.03), (0.02, 0.07), (0.04, 0.04))]
    views = xs.view(4, B, N, 3, H, D).permute(3, 0, 1, 4, 2, 5)
    fused, apart, first = [None] * 3, [None] * 3, 0
    for count in CHUNKS[chunks]:
        keep = first + count < 4
        for p in range(3):
            want = native_kernels.mt_steps(views[p, first:first + count], tables[p], apart[p], keep)
            spikes, counts, fused[p] = native_kernels.qkv_mt_steps(xs[first:first + count].contiguous(), p, H,
                                                                   tables[p], fused[p], keep)
            assert spikes.shape == (count, B, H, N, D)
            assert torch.equal(spikes, want[0]) and torch.equal(counts, want[1]), p
            assert int(counts.sum()) > 0 and int((spikes == 0).sum()) > 0  # both fire and rest
            assert (fused[p] is None and want[2] is None) if not keep else torch.equal(fused[p], want[2])
            apart[p] = want[2]
        first += count


@pytest.mark.parametrize('backend', ['native', 'triton', 'eager'])
@pytest.mark.parametrize('coding', ['rate', 'differential'])
@pytest.mark.parametrize('chunks', CHUNKS)
def test_qkv_parts_in_one_pass_follow_the_reference(monkeypatch, backend, coding, chunks):
    """qkv_parts_mt_steps (an attention's q, k and v neurons on the fused qkv output in one pass,
    trans_utils.SharedQKV) gives each neuron the outputs of ECMT_SPEC 4 / 14 (tests/reference.py)
    on its head-split view, bit for bit, for every chunking; the counts, and the spikes s of a
    differential neuron, are each part's own; the states it is given are updated in place with
    keep (the one state semantics of every kernel) and not written without; a part without a table
    is skipped."""
    problem = trans_utils.backend_problem(backend, 'cpu')
    if problem:
        pytest.skip(problem)
    kernels = trans_utils.kernels_of(backend)
    K, B, N, H, D, levels = 4, 2, 9, 2, 24, 5
    g = torch.Generator().manual_seed(11 + len(chunks))
    xs = torch.randn(K, B, N, 3 * H * D, generator=g) * 0.4
    thresholds = ((0.05, 0.03), (0.02, 0.07), (0.04, 0.04))
    tables = [trans_utils.level_table(torch.tensor(p), torch.tensor(n), levels) for p, n in thresholds]
    views = xs.view(K, B, N, 3, H, D).permute(3, 0, 1, 4, 2, 5)
    want = [ref_differential_neuron(list(views[p]), *thresholds[p], levels) if coding == 'differential'
            else (ref_mt_neuron(list(views[p]), *thresholds[p], levels), None) for p in range(3)]
    states, first = [None] * 3, 0
    differential = coding == 'differential'
    for count in CHUNKS[chunks]:
        keep = first + count < K
        given = [None if st is None else tuple(t.clone() for t in st) for st in states]
        copies = [None if st is None else tuple(t.clone() for t in st) for st in given]
        extra = {}
        if differential:
            extra = dict(coding='differential', estimates=[None if st is None else st[1] for st in given],
                         t0=first, sents=[True, False, True])
        results = kernels.qkv_parts_mt_steps(xs[first:first + count].contiguous(), H, tables,
                                             [None if st is None else st[0] for st in given], keep, **extra)
        for p in range(3):
            out, counts, *rest = results[p]
            for k in range(count):
                assert torch.equal(out[k], want[p][0][first + k]), (p, k)
                spikes = want[p][1][first + k] if differential else want[p][0][first + k]
                assert int(counts[k]) == int((spikes != 0).sum()), (p, k)
            if differential:
                assert (rest[2] is None) == (p == 1)
                assert p == 1 or torch.equal(rest[2], torch.stack(want[p][1][first:first + count]))
            assert (rest[0] is None) == (not keep)
            states[p] = (rest[0], rest[1]) if differential else (rest[0],)
            if given[p] is not None:  # one state semantics (kernels/__init__): updated in place with keep
                if keep:
                    assert all(r is g for r, g in zip(states[p], given[p]))
                else:
                    assert all(torch.equal(a, b) for a, b in zip(given[p], copies[p]))
        first += count
    assert any(int((o != 0).sum()) for o in want[0][0])  # the neurons fire
    skipped = kernels.qkv_parts_mt_steps(xs.contiguous(), H, [None, tables[1], None], [None] * 3, False)
    assert skipped[0] is None and skipped[2] is None  # the k neuron alone (rate coding)
    rate_k = ref_mt_neuron(list(views[1]), *thresholds[1], levels)
    assert all(torch.equal(skipped[1][0][k], rate_k[k]) for k in range(K))


def test_qkv_neurons_refuse_mismatched_arguments(native):
    table = trans_utils.level_table(torch.tensor(0.1), torch.tensor(0.1), 4)
    with pytest.raises(ValueError, match='contiguous float32'):
        native_kernels.qkv_mt_steps(torch.randn(2, 3, 2, 12).transpose(1, 2), 0, 2, table, None, False)
    with pytest.raises(ValueError, match='3 \\* heads'):
        native_kernels.qkv_mt_steps(torch.randn(2, 1, 3, 10), 0, 2, table, None, False)
    with pytest.raises(ValueError, match='part must be'):
        native_kernels.qkv_mt_steps(torch.randn(2, 1, 3, 12), 3, 2, table, None, False)
    with pytest.raises(ValueError, match='one element per input element'):
        native_kernels.qkv_mt_steps(torch.randn(2, 1, 3, 12), 1, 2, table, torch.zeros(5), True)


def per_element(theta, step_shape, channels):
    """Thresholds of one channel per element, [*step_shape], by the channel map's formula (for the
    reference, which takes thresholds that broadcast against its input)."""
    inner, groups, width = channels
    i = torch.arange(math.prod(step_shape))
    return theta.reshape(-1)[((i // inner) % groups) * width + i % width].view(step_shape)


# (step shape, threshold shape or a map of its own): a token's features, q/k/v's (head, channel),
# groups alone (width 1), and a map that no broadcast gives; steps of several work items.
CHANNEL_MAPS = {'feature': ((3, 37, 40), (40,)), 'head_channel': ((3, 4, 37, 10), (4, 1, 10)),
                'groups_only': ((3, 37, 40), (37, 1)), 'arbitrary': ((3, 37, 40), (7, 5, 3))}


@needs_compiler
@pytest.mark.parametrize('levels', [4, 17, 33])  # table widths 8, 32 and 64 (generic)
@pytest.mark.parametrize('layout', CHANNEL_MAPS)
@pytest.mark.parametrize('coding', ['rate', 'differential'])
def test_per_channel_neuron_steps_equal_the_reference(native, threads, levels, layout, coding):
    """mt_steps with a table per channel (ECMT_SPEC 15, both fire rules) on steps of several
    tiles and work items, every table width: the reference's outputs bit for bit, chunked 1+3."""
    step_shape, theta_shape = CHANNEL_MAPS[layout]
    channels = theta_shape if layout == 'arbitrary' else kernels.channel_map(theta_shape, step_shape)
    count = channels[1] * channels[2] if layout == 'arbitrary' else math.prod(theta_shape)
    g = torch.Generator().manual_seed(levels)
    theta_p, theta_n = torch.rand(count, generator=g) * 0.3 + 0.01, torch.rand(count, generator=g) * 0.3 + 0.01
    theta_p[::4], theta_n[1::5] = 0.0, float('nan')  # dead sides
    xs = torch.randn(4, *step_shape, generator=g) * 0.1 * 2 ** min(levels, 8)
    for rule in ('ecmt', 'round'):
        table = kernels.level_table(theta_p, theta_n, levels, fire_rule=rule)
        full_p, full_n = per_element(theta_p, step_shape, channels), per_element(theta_n, step_shape, channels)
        if layout != 'arbitrary':  # the map is the broadcast's
            assert torch.equal(full_p, theta_p.view(theta_shape).expand(step_shape))
        want = (ref_differential_neuron(list(xs), full_p, full_n, levels, rule) if coding == 'differential'
                else [ref_mt_neuron(list(xs), full_p, full_n, levels, 'rate', rule)])
        membrane = estimate = None
        first = 0
        for steps in (1, 3):
            keep = first + steps < 4
            extra = dict(coding=coding, estimate=estimate, t0=first, sent=True) if coding == 'differential' else {}
            result = native_kernels.mt_steps(xs[first:first + steps], table, membrane, keep, channels=channels,
                                             **extra)
            for k in range(steps):
                assert torch.equal(result[0][k], want[0][first + k]), (rule, first + k)
                if coding == 'differential':
                    assert torch.equal(result[4][k], want[1][first + k])
            membrane, estimate = result[2], (result[3] if coding == 'differential' else None)
            first += steps
        assert any(bool((w > 0).any()) for w in want[0]) and any(bool((w < 0).any()) for w in want[0])


@needs_compiler
@pytest.mark.parametrize('shape', [(2, 150, 1, 64), (1, 4, 2, 88)], ids=['long_block', 'head_over_a_tile'])
def test_per_channel_qkv_neurons_equal_the_reference(native, threads, shape):
    """The joint q/k/v pass with per-(head, channel) tables on blocks of tokens over several work
    items and heads longer than a tile: each part the reference on its head-split view."""
    B, N, H, D = shape
    g = torch.Generator().manual_seed(N)
    qkv = torch.randn(3, B, N, 3 * H * D, generator=g) * 0.4
    views = qkv.view(3, B, N, 3, H, D).permute(3, 0, 1, 4, 2, 5)
    thresholds = [(torch.rand(H, 1, D, generator=g) * 0.1, torch.rand(H, 1, D, generator=g) * 0.1) for _ in range(3)]
    tables = [kernels.level_table(p, n, 5, fire_rule='round') for p, n in thresholds]
    channels = kernels.channel_map((H, 1, D), (B, H, N, D))
    results = native_kernels.qkv_parts_mt_steps(qkv, H, tables, [None] * 3, False, channels=channels)
    for part, (theta_p, theta_n) in enumerate(thresholds):
        want = ref_mt_neuron(list(views[part]), theta_p, theta_n, 5, 'rate', 'round')
        assert all(torch.equal(results[part][0][k], want[k]) for k in range(3)), part
        assert int(results[part][1].sum()) > 0
