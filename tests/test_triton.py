"""The Triton kernels (kernels/triton.py) against the plain references (tests/reference.py), against
themselves (the fused EC + neuron kernels, the fused q/k/v neurons) and against the native CPU
kernels, in every chunking of 8 steps (1x8, 8x1, 3+5: state carried between chunks).

Without a CUDA device they run on the CPU in Triton's interpreter, which Triton reads when this
module imports kernels.triton; with one, on the GPU (the references still on the CPU). Tensors
are tiny and blocks large: the interpreter runs one program at a time."""
import functools
import importlib
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault('TRITON_INTERPRET', '1')
pytest.importorskip('triton')

import kernels.eager as eager_kernels  # noqa: E402
import kernels.triton as triton_kernels  # noqa: E402
import trans_utils  # noqa: E402
from reference import (ref_ec, ref_ec_product, ref_mt_neuron, ref_product_differences,  # noqa: E402
                       ref_running_sums)

if not triton_kernels.available() and os.environ.get('TRITON_INTERPRET') == '1':
    triton_kernels = importlib.reload(triton_kernels)  # imported earlier, before the interpreter was asked for

pytestmark = pytest.mark.skipif(not triton_kernels.available(), reason='neither CUDA nor TRITON_INTERPRET=1')
DEVICE = torch.device('cuda' if torch.cuda.is_available() else 'cpu')

STEPS = 8
CHUNKS = {'1x8': [1] * 8, '8x1': [8], '3+5': [3, 5]}


def on_device(*tensors):
    return [None if t is None else t.to(DEVICE) for t in tensors]


def table_for(theta_p, theta_n, levels):
    return trans_utils.level_table(torch.tensor(theta_p), torch.tensor(theta_n), levels).to(DEVICE)


# ---- the neuron ---------------------------------------------------------------------------------
def inputs_with_ties(shape, theta_p, theta_n, levels, seed):
    """STEPS random inputs, some elements of the first step exactly on a threshold, some -0."""
    g = torch.Generator().manual_seed(seed)
    top = 2 ** (min(levels, 8) - 1)  # inputs reaching the highest levels of short tables
    xs = torch.randn(STEPS, *shape, generator=g) * theta_p * top
    first = xs[0].view(-1)
    tp, tn = torch.tensor(theta_p), torch.tensor(theta_n)
    edges = torch.stack([tp * 2 ** j - tp / 2 for j in range(levels)]
                        + [-(tn * 2 ** j - tn / 2) for j in range(levels)])
    picks = torch.randint(0, first.numel(), (first.numel() // 5,), generator=g)
    first[picks] = edges[torch.randint(0, len(edges), picks.shape, generator=g)]
    first[:3] = -0.0  # 0 + (-0) is +0 in the rule
    return xs


@functools.lru_cache(maxsize=None)
def neuron_case(levels, theta_p, theta_n):
    xs = inputs_with_ties((3, 70), theta_p, theta_n, levels, seed=levels)
    return xs, ref_mt_neuron(list(xs), theta_p, theta_n, levels)


def neuron_chunks(kernels, xs, table, sizes):
    """mt_steps over ``xs`` in chunks of ``sizes``: (spikes, counts, membranes after each chunk
    but the last), on the CPU."""
    spikes, counts, carried, membrane, first = [], [], [], None, 0
    for count in sizes:
        keep = first + count < len(xs)
        spike, nonzero, membrane = kernels.mt_steps(xs[first:first + count], table, membrane, keep)
        assert spike.device == xs.device and spike.is_contiguous() and spike.dtype == torch.float32
        assert nonzero.dtype == torch.int64 and nonzero.shape == (count,)
        spikes += list(spike.cpu())
        counts += nonzero.tolist()
        if keep:
            carried.append(membrane.cpu().clone())
        else:
            assert membrane is None
        first += count
    return spikes, counts, carried


@pytest.mark.parametrize('levels', [3, 8, 16, 40], ids=lambda n: f'levels{n}')  # table widths 8, 8, 16, 64
@pytest.mark.parametrize('chunks', CHUNKS)
def test_neuron_steps_equal_the_reference_bit_for_bit(levels, chunks):
    theta_p, theta_n = 0.37, 0.21
    xs, want = neuron_case(levels, theta_p, theta_n)
    table = table_for(theta_p, theta_n, levels)
    spikes, counts, carried = neuron_chunks(triton_kernels, xs.to(DEVICE), table, CHUNKS[chunks])
    for t, (spike, spike_want) in enumerate(zip(spikes, want)):
        assert torch.equal(spike, spike_want), f'step {t + 1}'
        assert counts[t] == int((spike_want != 0).sum())
    assert sum(counts) > 0 and any((s == 0).any() for s in want)  # both fire and rest
    if levels >= 16:  # the highest levels are reached (the comparison runs over the whole table)
        assert max(float(s.abs().max()) for s in want) >= theta_n * 2 ** 8
    # The membrane carried after each chunk is the rule's v, rounding included.
    first, membrane = 0, None
    for count, got in zip(CHUNKS[chunks], carried):
        for t in range(first, first + count):
            membrane = (xs[t] if membrane is None else membrane + xs[t]) - want[t]
        first += count
        assert torch.equal(got.view(membrane.shape), membrane)


@pytest.mark.parametrize('theta_p, theta_n', [(0.0, 0.3), (-1.0, 0.3), (0.3, float('nan')), (0.0, -0.5)])
def test_neuron_steps_unusable_side_never_fires(theta_p, theta_n):
    xs = torch.randn(STEPS, 500, generator=torch.Generator().manual_seed(1))
    want = ref_mt_neuron(list(xs), theta_p, theta_n, 4)
    spikes, _, _ = neuron_chunks(triton_kernels, xs.to(DEVICE), table_for(theta_p, theta_n, 4), [3, 5])
    for spike, spike_want in zip(spikes, want):
        assert torch.equal(spike, spike_want)
        if not theta_p > 0:
            assert not (spike > 0).any()
        if not theta_n > 0:
            assert not (spike < 0).any()


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_half_precision_inputs_are_read_as_float32(dtype):
    xs = inputs_with_ties((4, 33), 0.3, 0.2, 8, seed=7).to(dtype)
    want = ref_mt_neuron(list(xs), 0.3, 0.2, 8)  # the reference converts each step to float32
    spikes, counts, _ = neuron_chunks(triton_kernels, xs.to(DEVICE), table_for(0.3, 0.2, 8), [3, 5])
    assert all(torch.equal(a, b) for a, b in zip(spikes, want)) and sum(counts) > 0
    carried = torch.randn(4, 33, generator=torch.Generator().manual_seed(2)).view(-1)
    sums = triton_kernels.running_sums(xs.to(DEVICE), carried.to(DEVICE))
    assert sums.dtype == torch.float32
    assert torch.equal(sums.cpu(), eager_kernels.running_sums(xs, carried))


@pytest.mark.parametrize('layout', ['qkv_view', 'transposed', 'expanded'])
def test_neuron_steps_on_strided_inputs_equal_their_contiguous_copy(layout):
    g = torch.Generator().manual_seed(5)
    x = {'qkv_view': lambda: torch.randn(3, 2, 9, 3, 3, 16, generator=g).permute(3, 0, 1, 4, 2, 5)[0],
         'transposed': lambda: torch.randn(3, 30, 7, generator=g).transpose(1, 2),
         'expanded': lambda: torch.randn(3, 1, 10, 9, generator=g).expand(3, 5, 10, 9)}[layout]().to(DEVICE)
    assert not x.is_contiguous()
    table = table_for(0.3, 0.25, 4)
    want = ref_mt_neuron([step.contiguous().cpu() for step in x], 0.3, 0.25, 4)
    spike, counts, _ = triton_kernels.mt_steps(x, table, None, False)
    assert spike.shape == x.shape
    for t in range(3):
        assert torch.equal(spike[t].cpu(), want[t]) and int(counts[t]) == int((want[t] != 0).sum())


# Every chunking with a table of width 8; a width of 16 in the uneven one (the interpreter is slow
# on wide tables; test_neuron_steps_equal_the_reference_bit_for_bit covers every width).
WIDE_ONCE = [(4, '1x8'), (4, '8x1'), (4, '3+5'), (16, '3+5')]


@pytest.mark.parametrize('levels, chunks', WIDE_ONCE, ids=[f'levels{n}-{c}' for n, c in WIDE_ONCE])
@pytest.mark.parametrize('shape', [(2, 7, 2, 16), (1, 5, 3, 5)], ids=['heads16', 'odd_head'])
def test_qkv_neurons_equal_three_neurons_on_the_views_bit_for_bit(levels, chunks, shape):
    B, N, H, D = shape
    g = torch.Generator().manual_seed(levels * 7 + N)
    xs = (torch.randn(STEPS, B, N, 3 * H * D, generator=g) * 0.4).to(DEVICE)
    xs[0, 0, 0, :5] = -0.0
    tables = [table_for(p, n, levels) for p, n in ((0.05, 0.03), (0.02, 0.07), (0.04, 0.04))]
    views = xs.view(STEPS, B, N, 3, H, D).permute(3, 0, 1, 4, 2, 5)
    fused, apart, first = [None] * 3, [None] * 3, 0
    spikes = [None] * 3
    for count in CHUNKS[chunks]:
        keep = first + count < STEPS
        for p in range(3):
            want = triton_kernels.mt_steps(views[p, first:first + count], tables[p], apart[p], keep)
            spikes[p], counts, fused[p] = triton_kernels.qkv_mt_steps(xs[first:first + count].contiguous(), p, H,
                                                                      tables[p], fused[p], keep)
            assert counts.shape == (count,) and counts.dtype == torch.int64
            assert spikes[p].shape == (count, B, H, N, D) and spikes[p].is_contiguous()
            assert torch.equal(spikes[p], want[0]) and torch.equal(counts, want[1]), p
            assert (fused[p] is None and want[2] is None) if not keep else torch.equal(fused[p], want[2])
            apart[p] = want[2]
        first += count
    # Against the literal rule too (the q neuron), and not void.
    q = ref_mt_neuron(list(views[0].cpu()), 0.05, 0.03, levels)
    assert sum(int((s != 0).sum()) for s in q) > 0
    assert torch.equal(spikes[0].cpu(), torch.stack(q[-CHUNKS[chunks][-1]:]))


# ---- expectation compensation -------------------------------------------------------------------
def f64_gelu(x, approximate):
    x = x.double()
    if approximate:
        return 0.5 * x * (1 + torch.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ec_case(kind, seed=0):
    """(x [STEPS, ...] on the CPU, the float64 function, a step function (x, cum, prev, t0,
    keep) of triton_kernels, the matching call of another kernels module)."""
    g = torch.Generator().manual_seed(seed)
    rows, cols = 9, 37
    weight, bias = torch.randn(cols, generator=g), torch.randn(cols, generator=g)
    if kind.startswith('gelu'):
        approximate = kind == 'gelu_tanh'
        x = torch.randn(STEPS, 600, generator=g) * 4
        x[0, :14] = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-7, -1e-7, 5.0, -5.0, 9.0, -9.0, 30.0, -30.0, 80.0,
                                  -80.0])
        return (x, lambda a: f64_gelu(a, approximate),
                lambda k: lambda x, c, p, t0, keep: k.ec_gelu_steps(x, c, p, t0, keep, approximate))
    x = torch.randn(STEPS, rows, cols, generator=g) * 3
    if kind == 'softmax':
        x[:, :, 1] = float('-inf')  # a masked position: exactly 0 after the softmax
        return (x, lambda a: torch.softmax(a, -1), lambda k: k.ec_softmax_steps)
    affine = kind == 'layer_norm_affine'
    w, b = (weight, bias) if affine else (None, None)
    return (x, lambda a: torch.nn.functional.layer_norm(a, (cols,), None if w is None else w.double(),
                                                        None if b is None else b.double(), 1e-6),
            lambda k: lambda x, c, p, t0, keep: k.ec_layer_norm_steps(x, c, p, t0, keep, *on_device(w, b), 1e-6)
            if k is triton_kernels else k.ec_layer_norm_steps(x, c, p, t0, keep, w, b, 1e-6))


def ec_chunks(step, xs, sizes):
    """A multi-step EC kernel over ``xs`` in chunks of ``sizes``: (outputs per step on the CPU,
    (step, cum, prev) carried after each chunk but the last)."""
    outs, carried, cum, prev, first = [], [], None, None, 0
    for count in sizes:
        keep = first + count < len(xs)
        out, cum, prev = step(xs[first:first + count], cum, prev, first, keep)
        assert out.shape == xs[first:first + count].shape and out.dtype == torch.float32
        outs += list(out.cpu())
        if keep:
            carried.append((first + count, cum.cpu().clone(), prev.cpu().clone()))
        else:
            assert cum is None and prev is None
        first += count
    return outs, carried


# Tolerances: rtol 1e-5 and an absolute error of ATOL * t at step t (the totals t*f(A/t) are
# differenced, so their float32 rounding grows with t). The smallest ATOL each kernel needed on
# these inputs under the interpreter: gelu 4.8e-7, gelu_tanh 4.8e-7, softmax 1.3e-8, layer_norm
# 1.7e-7, with weight and bias 2.0e-7 (test_ec_steps_match_float64 prints it; run with -s); ATOL
# leaves room for a GPU's exp and erf.
RTOL, ATOL = 1e-5, 2e-6


def needed_atol(outs, xs, f64_f):
    """The smallest ATOL for which every output is within RTOL of the float64 reference."""
    ref = ref_ec(f64_f, [x.double() for x in xs])
    worst = 0.0
    for t, (out, want) in enumerate(zip(outs, ref), start=1):
        finite = want.isfinite()
        excess = (out.double()[finite] - want[finite]).abs() - RTOL * want[finite].abs()
        worst = max(worst, float(excess.max()) / t)
        assert torch.equal(out.isnan(), want.isnan()), f'step {t}'
    return worst


@pytest.mark.parametrize('kind', ['gelu', 'gelu_tanh', 'softmax', 'layer_norm', 'layer_norm_affine'])
@pytest.mark.parametrize('chunks', CHUNKS)
def test_ec_steps_match_float64(kind, chunks):
    x, f64_f, make = ec_case(kind)
    outs, carried = ec_chunks(make(triton_kernels), x.to(DEVICE), CHUNKS[chunks])
    x_ref = x
    if kind == 'softmax':
        assert all(torch.equal(o[:, 1], torch.zeros(o.shape[0])) for o in outs)
        x_ref = x.clone()
        x_ref[:, :, 1] = -1e30  # for the float64 reference: -inf after the softmax
    atol = needed_atol(outs, list(x_ref), f64_f)
    print(f'{kind} {chunks}: needed atol {atol:.2g} * t')
    assert atol <= ATOL
    # The state carried after each chunk: the running sum and the last total.
    sums, sums_ref = torch.cumsum(x.double(), 0), torch.cumsum(x_ref.double(), 0)
    for t, cum_got, prev_got in carried:
        cum, total = sums[t - 1], t * f64_f(sums_ref[t - 1] / t)
        torch.testing.assert_close(cum_got.double().view(cum.shape), cum, rtol=1e-6, atol=1e-5)
        torch.testing.assert_close(prev_got.double().view(total.shape), total, rtol=RTOL, atol=ATOL * t)


def test_ec_steps_on_half_inputs_equal_their_float32_copy():
    x = torch.randn(STEPS, 5, 40, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(DEVICE)
    for step in (lambda x: triton_kernels.ec_gelu_steps(x.flatten(1), None, None, 0, False, False)[0],
                 lambda x: triton_kernels.ec_softmax_steps(x, None, None, 0, False)[0],
                 lambda x: triton_kernels.ec_layer_norm_steps(x, None, None, 0, False, None, None, 1e-5)[0]):
        assert torch.equal(step(x), step(x.float()))


def test_gelu_ec_steps_propagate_nan():
    x = torch.tensor([float('nan'), 1.0, -3.0, 0.5] * 5).to(DEVICE)
    for approximate in (False, True):
        out, cum, prev = triton_kernels.ec_gelu_steps(torch.stack([x, x]), None, None, 0, True, approximate)
        for o in out:
            assert torch.equal(o.isnan(), x.isnan())
        assert torch.equal(prev.isnan(), x.isnan()) and torch.equal(cum.isnan(), x.isnan())


def unfused(kind, x, cum, prev, t0, keep, table, membrane, affine):
    """The EC kernel's output, then mt_steps on it."""
    if kind.startswith('gelu'):
        out, cum, prev = triton_kernels.ec_gelu_steps(x, cum, prev, t0, keep, kind == 'gelu_tanh')
    elif kind == 'softmax':
        out, cum, prev = triton_kernels.ec_softmax_steps(x, cum, prev, t0, keep)
    else:
        out, cum, prev = triton_kernels.ec_layer_norm_steps(x, cum, prev, t0, keep, *affine, 1e-6)
    spike, counts, membrane = triton_kernels.mt_steps(out, table, membrane, keep)
    return spike, counts, cum, prev, membrane


FUSED_CASES = [(4, '1x8'), (4, '8x1'), (4, '3+5'), (40, '3+5')]  # table widths 8 and 64


@pytest.mark.parametrize('kind', ['gelu', 'gelu_tanh', 'softmax', 'layer_norm'])
@pytest.mark.parametrize('levels, chunks', FUSED_CASES, ids=[f'levels{n}-{c}' for n, c in FUSED_CASES])
def test_fused_ec_neuron_equals_the_two_kernels_bit_for_bit(kind, levels, chunks):
    """ec_mt_steps gives the spikes, counts and carried states of the EC kernel followed by
    mt_steps, whatever the chunking."""
    g = torch.Generator().manual_seed(levels)
    rows, cols = 6, 45
    xs = torch.randn(STEPS, rows, cols, generator=g) * 3
    if kind.startswith('gelu'):
        xs = xs.reshape(STEPS, -1)
    xs = xs.to(DEVICE)
    affine = on_device(torch.randn(cols, generator=g), torch.randn(cols, generator=g))
    table = table_for(0.05, 0.03, levels)
    states = {'fused': [None, None, None], 'apart': [None, None, None]}
    first, fired = 0, 0
    for count in CHUNKS[chunks]:
        x, keep = xs[first:first + count], first + count < STEPS
        want = unfused(kind, x, *states['apart'][:2], first, keep, table, states['apart'][2], affine)
        extra = ({'approximate': kind == 'gelu_tanh'} if kind.startswith('gelu') else
                 {'weight': affine[0], 'bias': affine[1], 'eps': 1e-6} if kind == 'layer_norm' else {})
        cum, prev, membrane = states['fused']
        got = triton_kernels.ec_mt_steps('gelu' if kind.startswith('gelu') else kind, x, cum, prev, first, keep,
                                         table, membrane, **extra)
        assert got[0].shape == x.shape and got[1].shape == (count,)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
        fired += int(got[1].sum())
        for a, b in zip(got[2:], want[2:]):
            assert (a is None and b is None) if not keep else torch.equal(a, b)
        states['apart'], states['fused'] = list(want[2:]), list(got[2:])
        first += count
    assert 0 < fired < xs.numel()  # both fire and rest


# ---- EC products and the energy monitor -----------------------------------------------------------
@pytest.mark.parametrize('layout', ['contiguous', 'transposed'])
@pytest.mark.parametrize('chunks', CHUNKS)
@pytest.mark.parametrize('scale', [None, 0.125 ** 0.5])
def test_product_bookkeeping_equals_the_reference(layout, chunks, scale):
    """running_sums (of a transposed k, say) and scaled_differences: ECMT_SPEC 6's float32 steps
    as tests/reference.py takes them (ref_running_sums, ref_product_differences), bit for bit, in
    every chunking; and the EC product built from them (q·kᵀ times a scale) is the reference's
    three-product form."""
    g = torch.Generator().manual_seed(9)
    a = torch.randn(STEPS, 2, 6, 5, generator=g) * (torch.rand(STEPS, 2, 6, 5, generator=g) < 0.6)
    full_b = torch.randn(STEPS, 2, 7, 5, generator=g)  # the k of q·kᵀ, read transposed
    b = full_b.transpose(-2, -1) if layout == 'transposed' else full_b[..., :5, :].contiguous()
    want_sums = {'a': ref_running_sums(list(a)), 'b': ref_running_sums(list(b))}
    cum = {'a': None, 'b': None}
    prev = None
    outs, products, lasts, first = [], [], [], 0
    for count in CHUNKS[chunks]:
        keep = first + count < STEPS
        chunk = {'a': a[first:first + count], 'b': b[first:first + count]}
        sums = {}
        for name in 'ab':
            sums[name] = triton_kernels.running_sums(chunk[name].to(DEVICE), cum[name])
            assert sums[name].is_contiguous()
            assert all(torch.equal(sums[name][k].cpu(), want_sums[name][first + k]) for k in range(count))
            cum[name] = sums[name][-1].reshape(-1).clone()
        totals = (sums['a'] @ sums['b']).contiguous()
        products += list(totals.cpu().clone())
        args = () if scale is None else (scale,)
        out, last = triton_kernels.scaled_differences(totals, prev, first, keep, *args)
        assert out.data_ptr() == totals.data_ptr()  # in place
        assert (last is not None) == keep
        lasts.append(None if last is None else last.cpu())
        prev = last
        outs += list(out.cpu())
        first += count
    want_outs, want_totals = ref_product_differences(products, scale)
    assert all(torch.equal(got, want) for got, want in zip(outs, want_outs))
    ends = [sum(CHUNKS[chunks][:i + 1]) for i in range(len(CHUNKS[chunks]))]
    assert all(last is None or torch.equal(last, want_totals[end - 1]) for last, end in zip(lasts, ends))
    ref = ref_ec_product(list(a), list(b))
    for t, (got, want) in enumerate(zip(outs, ref), start=1):
        want = want if scale is None else want * scale
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5, msg=f'step {t}')


@pytest.mark.parametrize('layout', ['contiguous', 'transposed', 'sliced', 'unmergeable', 'matrix'])
@pytest.mark.parametrize('dim', [-2, -1])
def test_nonzero_counts_equal_torch(layout, dim):
    g = torch.Generator().manual_seed(3)
    full = torch.randn(2, 3, 70, 65, generator=g) * (torch.rand(2, 3, 70, 65, generator=g) < 0.4)
    full[0, 0, 5] = -0.0  # a negative zero is a zero
    x = {'contiguous': full, 'transposed': full.transpose(-2, -1), 'sliced': full[:, :, 3:60, ::2],
         'unmergeable': full[:, :2], 'matrix': full[1, 2]}[layout].to(DEVICE)
    got = triton_kernels.nonzero_counts(x, dim)
    want = (x != 0).sum(dim=dim).float()
    assert got.dtype == torch.float32 and got.shape == want.shape and torch.equal(got, want)


# ---- against the native CPU kernels -------------------------------------------------------------
@pytest.fixture(scope='module')
def native():
    import kernels.native as native_kernels
    if not native_kernels.ENABLED or native_kernels.library() is None:
        pytest.skip('the native kernels are not available here')
    return native_kernels


def test_native_and_triton_kernels_agree(native):
    """The same inputs through both backends: the neurons' spikes, counts and membranes bit for
    bit, the running sums and scaled differences bit for bit, the EC outputs within rounding."""
    g = torch.Generator().manual_seed(11)
    table = trans_utils.level_table(torch.tensor(0.3), torch.tensor(0.2), 40)
    x = inputs_with_ties((5, 41), 0.3, 0.2, 40, seed=4)
    membrane = torch.randn(5 * 41, generator=g)
    got = triton_kernels.mt_steps(x.to(DEVICE), table.to(DEVICE), membrane.clone().to(DEVICE), True)  # in place
    want = native.mt_steps(x, table, membrane.clone(), True)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want)) and int(want[1].sum()) > 0

    qkv = torch.randn(3, 2, 5, 3 * 2 * 8, generator=g) * 0.4
    tables = [trans_utils.level_table(torch.tensor(p), torch.tensor(0.03), 8) for p in (0.05, 0.02, 0.04)]
    for p, table_p in enumerate(tables):
        got = triton_kernels.qkv_mt_steps(qkv.to(DEVICE), p, 2, table_p.to(DEVICE), None, True)
        want = native.qkv_mt_steps(qkv, p, 2, table_p, None, True)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, want)), p

    for kind in ('gelu', 'gelu_tanh', 'softmax', 'layer_norm_affine'):
        x, _, make = ec_case(kind, seed=5)
        for (got_out, got_cum, got_prev), (want_out, want_cum, want_prev) in zip(
                [make(triton_kernels)(x.to(DEVICE), None, None, 3, True)], [make(native)(x, None, None, 3, True)]):
            assert torch.equal(got_cum.cpu(), want_cum)  # the running sums: the same additions
            for t, (a, b) in enumerate(zip(got_out.cpu(), want_out), start=4):
                torch.testing.assert_close(a, b, rtol=RTOL, atol=2 * ATOL * t, msg=f'{kind} step {t}')

    a = torch.randn(4, 3, 7, 6, generator=g).transpose(-2, -1)
    carried = torch.randn(3 * 6 * 7, generator=g)
    sums = triton_kernels.running_sums(a.to(DEVICE), carried.to(DEVICE)).cpu()
    assert torch.equal(sums, native.running_sums(a, carried))
    prev = torch.randn(3, 6, 6, generator=g).view(-1)
    got = triton_kernels.scaled_differences(sums[..., :6].contiguous().to(DEVICE), prev.to(DEVICE), 2, True, 0.3)
    want = native.scaled_differences(sums[..., :6].contiguous(), prev, 2, True, 0.3)
    assert torch.equal(got[0].cpu(), want[0]) and torch.equal(got[1].cpu(), want[1])


# ---- the wrappers -------------------------------------------------------------------------------
def test_wrappers_refuse_mismatched_arguments():
    table = table_for(0.2, 0.3, 8)
    x = torch.zeros(2, 10, device=DEVICE)
    with pytest.raises(ValueError, match='state'):
        triton_kernels.mt_steps(x, table, torch.zeros(11, device=DEVICE), True)
    with pytest.raises(ValueError, match='table'):
        triton_kernels.mt_steps(x, table[0].t(), None, True)
    with pytest.raises(ValueError, match='float32, float16 or bfloat16'):
        triton_kernels.mt_steps(x.double(), table, None, True)
    with pytest.raises(ValueError, match='carried together'):
        triton_kernels.ec_gelu_steps(x[:, :5], torch.zeros(5, device=DEVICE), None, 1, True, False)
    with pytest.raises(ValueError, match='3 dimensions'):
        triton_kernels.ec_softmax_steps(x[:, :5], None, None, 0, True)
    with pytest.raises(ValueError, match='weight and bias'):
        triton_kernels.ec_layer_norm_steps(x.view(2, 2, 5), None, None, 0, False, torch.ones(6, device=DEVICE),
                                           None, 1e-5)
    with pytest.raises(ValueError, match='rows of more than'):
        triton_kernels.ec_softmax_steps(torch.zeros(1, 1, triton_kernels.MAX_ROW + 1, device=DEVICE), None, None, 0,
                                        False)
    with pytest.raises(ValueError, match='unknown kind'):
        triton_kernels.ec_mt_steps('relu', x, None, None, 0, False, table, None)
    with pytest.raises(ValueError, match='contiguous float32'):
        triton_kernels.qkv_mt_steps(torch.randn(2, 3, 2, 12, device=DEVICE).transpose(1, 2), 0, 2, table, None, False)
    with pytest.raises(ValueError, match='3 \\* heads'):
        triton_kernels.qkv_mt_steps(torch.randn(2, 1, 3, 10, device=DEVICE), 0, 2, table, None, False)
    with pytest.raises(ValueError, match='part must be'):
        triton_kernels.qkv_mt_steps(torch.randn(2, 1, 3, 12, device=DEVICE), 3, 2, table, None, False)
    with pytest.raises(ValueError, match='state'):
        triton_kernels.qkv_mt_steps(torch.randn(2, 1, 3, 12, device=DEVICE), 1, 2, table, torch.zeros(5, device=DEVICE),
                                    True)
    with pytest.raises(ValueError, match='contiguous float32'):
        triton_kernels.scaled_differences(torch.zeros(2, 4, 3, device=DEVICE).transpose(1, 2), None, 0, False)
    with pytest.raises(ValueError, match='dim -1 or -2'):
        triton_kernels.nonzero_counts(x, 0)
    if DEVICE.type == 'cuda':
        with pytest.raises(ValueError, match='device'):
            triton_kernels.mt_steps(x, table.cpu(), None, True)


def test_empty_chunks_and_steps():
    table = table_for(0.2, 0.3, 8)
    spike, counts, membrane = triton_kernels.mt_steps(torch.zeros(0, 4, 3, device=DEVICE), table, None, True)
    assert spike.shape == (0, 4, 3) and counts.shape == (0,) and torch.equal(membrane.cpu(), torch.zeros(12))
    spike, counts, membrane = triton_kernels.mt_steps(torch.zeros(3, 0, device=DEVICE), table, None, False)
    assert spike.shape == (3, 0) and counts.tolist() == [0, 0, 0] and membrane is None


def test_importable_without_triton(monkeypatch):
    """Without Triton the module imports; available() is False and the kernels say why."""
    monkeypatch.setitem(sys.modules, 'triton', None)
    monkeypatch.setitem(sys.modules, 'triton.language', None)
    spec = importlib.util.spec_from_file_location('triton_kernels_without_triton', triton_kernels.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.triton is None and not module.available()
    with pytest.raises(RuntimeError, match='Triton is not installed'):
        module.mt_steps(torch.zeros(2, 3), trans_utils.level_table(torch.tensor(0.2), torch.tensor(0.3), 8), None,
                        False)


_COMPILE_CHECK = r'''
import os, sys
os.environ.pop('TRITON_INTERPRET', None)
sys.path.insert(0, sys.argv[1])
import triton, kernels.triton as tk
from triton.backends.compiler import GPUTarget
P, I, C = '*fp32', 'i32', '*i64'
ec = dict(x=P, cum=P, prev=P, out=P, t0='fp32', K=I)
channel_map = dict(inner=I, groups=I, cwidth=I)  # per-channel thresholds (ECMT_SPEC 15)
neuron = dict(table=P, membrane=P, counts=C, estimate=P, sent=P, **channel_map)
coding = dict(estimate=P, sent=P, t0='fp32', **channel_map)
flags = dict(FRESH=False, KEEP=True, FUSED=True, NEURON_FRESH=False, W=16)
kernels = []
# the rate neuron and the differential one (ECMT_SPEC 14), each with one channel's table and with
# a table per channel
for differential, per_channel in ((False, False), (True, False), (False, True), (True, True)):
    codings = dict(DIFFERENTIAL=differential, SENT=differential, PER_CHANNEL=per_channel)
    kernels += [
        (tk._mt_kernel, dict(x='*bf16', table=P, membrane=P, spike=P, counts=C, K=I, n=I, **coding),
         dict(FRESH=False, KEEP=True, W=16, BLOCK=1024, **codings)),
        (tk._qkv_kernel, dict(qkv=P, table=P, membrane=P, spike=P, counts=C, part=I, K=I, N=I, H=I, D=I, n=I,
                              **coding), dict(FRESH=False, KEEP=True, W=8, BLOCK=1024, **codings))]
    flags_of = dict(flags, **codings)
    for approximate in (False, True):
        kernels.append((tk._ec_gelu_kernel, dict(ec, n=I, **neuron), dict(flags_of, APPROXIMATE=approximate,
                                                                          BLOCK=1024)))
    for layer_norm in (False, True):
        kernels.append((tk._ec_rows_kernel, dict(ec, rows=I, cols=I, weight=P, bias=P, eps='fp32', **neuron),
                        dict(flags_of, LAYER_NORM=layer_norm, HAS_WEIGHT=True, HAS_BIAS=True, ROWS=2,
                             BLOCK_C=1024)))
kernels += [
    (tk._running_sums_kernel, dict(x='*fp16', carried=P, sums=P, K=I, n=I), dict(CARRIED=True, BLOCK=1024)),
    (tk._scaled_differences_kernel, dict(totals=P, prev=P, last=P, t0='fp32', scale='fp32', K=I, n=I),
     dict(HAS_PREV=True, KEEP=True, BLOCK=1024)),
    (tk._nonzero_counts_kernel, dict(x=P, out=P, rows=I, count=I, length=I, stride_outer=I, stride_count=I,
                                      stride_along=I),
     dict(BLOCK_I=64, BLOCK_J=64)),
]
for fn, signature, constexprs in kernels:
    compiled = triton.compile(triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs),
                              target=GPUTarget('cuda', 90, 32), options={'enable_fp_fusion': False, 'num_warps': 8})
    ptx = compiled.asm['ptx']
    assert 'div.full' not in ptx and 'div.approx' not in ptx, (fn.__name__, 'an approximate division')
    print(fn.__name__, 'ok')
'''


def test_kernels_compile_for_a_gpu():
    """Every kernel compiles for an sm_90 GPU (the interpreter does not check what the compiler
    refuses), with correctly rounded divisions only; no GPU needed, only Triton's NVIDIA backend."""
    try:
        from triton.backends.nvidia import compiler  # noqa: F401
    except ImportError:
        pytest.skip("Triton's NVIDIA backend is not installed")
    root = os.path.dirname(os.path.dirname(os.path.abspath(triton_kernels.__file__)))
    result = subprocess.run([sys.executable, '-c', _COMPILE_CHECK, root], capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count(' ok') == 27  # 6 neuron kernels of each coding and table kind, 3 others
