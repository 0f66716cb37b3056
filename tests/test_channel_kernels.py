"""Per-channel thresholds and the rounding fire rule (ECMT_SPEC 15) in every neuron kernel of every
backend (native C++, Triton under TRITON_INTERPRET=1, eager), against the literal reference
(tests/reference.py) bit for bit: both fire rules x both codings x one threshold pair and one per
channel (some channel sides dead: θ <= 0 or NaN) x the chunkings 1x8, 8x1 and 3+5 (state carried
between chunks, updated in place as kernels/__init__ says); mt_steps on a contiguous input and on
a permuted q/k/v-like view, qkv_mt_steps and qkv_parts_mt_steps with per-(head, channel)
thresholds, ec_mt_steps (GELU, softmax, LayerNorm) with per-feature thresholds. Also the level
table itself and the channel map (``kernels.channel_map``).

Tensors are tiny (the interpreter runs one program at a time, a numpy call per operation)."""
import functools
import math

import pytest
import torch

import kernels
from reference import ref_differential_neuron, ref_fire, ref_fire_threshold, ref_mt_neuron

STEPS, LEVELS = 8, 5
CHUNKS = {'1x8': [1] * 8, '8x1': [8], '3+5': [3, 5]}
RULES = ('ecmt', 'round')
CODINGS = ('rate', 'differential')
THRESHOLDS = ('scalar', 'channel')


@pytest.fixture(params=['native', 'triton', 'eager'])
def backend(request):
    problem = kernels.backend_problem(request.param, 'cpu')
    if problem is not None:
        pytest.skip(problem)
    return kernels.kernels_of(request.param)


# ---- cases --------------------------------------------------------------------------------------
def channel_thresholds(shape, seed):
    """(θp, θn) of ``shape``, one per channel, between 0.02 and 0.5, with dead sides: some
    channels' θp is 0 or negative, some θn is 0 or NaN, one channel has both dead."""
    g = torch.Generator().manual_seed(seed)
    theta_p = 0.02 + torch.rand(shape, generator=g) * 0.48
    theta_n = 0.02 + torch.rand(shape, generator=g) * 0.48
    flat_p, flat_n = theta_p.view(-1), theta_n.view(-1)
    flat_p[1::7] = 0.0
    flat_p[2::7] = -0.3
    flat_n[3::7] = 0.0
    flat_n[4::7] = float('nan')
    flat_p[5], flat_n[5] = -1.0, float('nan')
    return theta_p, theta_n


def thresholds_of(kind, shape, seed):
    if kind == 'scalar':  # a place's buffers: one pair, shape [1]
        return torch.tensor([0.37]), torch.tensor([0.21])
    return channel_thresholds(shape, seed)


def channel_of_each_element(theta_shape, step_shape):
    """The row-major index of each element's threshold, by broadcasting (independent of the
    kernels' channel map)."""
    count = math.prod(theta_shape)
    return torch.arange(count).reshape(theta_shape).expand(step_shape).reshape(-1)


def inputs(step_shape, theta_p, theta_n, rule, seed):
    """STEPS steps of random inputs reaching every level, with a fifth of the first step's
    elements exactly on a fire threshold of their own channel (either side) and a few -0."""
    g = torch.Generator().manual_seed(seed)
    top = float(torch.nan_to_num(theta_p.clamp(min=0), 0.0).max()) * 2 ** (LEVELS - 1)
    xs = torch.randn(STEPS, *step_shape, generator=g) * top * 0.6
    first = xs[0].view(-1)
    channel = channel_of_each_element(tuple(theta_p.shape), step_shape)
    picks = torch.randperm(first.numel(), generator=g)[: first.numel() // 5]
    levels = torch.randint(0, LEVELS, picks.shape, generator=g)
    flat_p = theta_p.reshape(-1)[channel[picks]]
    flat_n = theta_n.reshape(-1)[channel[picks]]
    for i, (pick, j) in enumerate(zip(picks.tolist(), levels.tolist())):
        if i % 2 and flat_n[i] > 0:
            first[pick] = -ref_fire_threshold(flat_n[i], j, rule)
        elif flat_p[i] > 0:
            first[pick] = ref_fire_threshold(flat_p[i], j, rule)
    first[:3] = -0.0
    return xs


def reference(xs, theta_p, theta_n, rule, coding):
    """The reference's (outputs, spikes s, estimates or None) per step; θ broadcasts against a step."""
    if coding == 'differential':
        return ref_differential_neuron(list(xs), theta_p, theta_n, LEVELS, rule)
    spikes = ref_mt_neuron(list(xs), theta_p, theta_n, LEVELS, 'rate', rule)
    return spikes, spikes, None


def ref_membranes(xs, want):
    """The reference's membrane after every step (its float operations), from its spikes and
    estimates."""
    outputs, spikes, estimates = want
    membranes, v = [], torch.zeros_like(xs[0])
    for t in range(len(xs)):
        if estimates is None:
            v = (v + xs[t]) - spikes[t]
        else:
            r = torch.zeros_like(v) if t == 0 else estimates[t - 1]
            v = ((v + xs[t]) - r) - spikes[t]
        membranes.append(v)
    return membranes


def run_chunks(call, xs, want, coding, sizes, in_place=True):
    """Run ``call(first, count, membrane, estimate, keep)`` (a kernel on steps first..first+count)
    chunk by chunk and hold each chunk to the reference ``want``: outputs, counts, the spikes s a
    differential neuron sends, the states (the given ones updated in place with keep, nothing
    written without). ``xs`` [STEPS, ...] is the neuron's input as the reference saw it."""
    outputs, spikes, estimates = want
    membranes = ref_membranes(xs, want)
    differential = coding == 'differential'
    membrane = estimate = None
    first = 0
    for count in sizes:
        keep = first + count < STEPS
        given = (membrane, estimate)
        before = [None if t is None else t.clone() for t in given]
        result = call(first, count, membrane, estimate, keep)
        out, counts = result[0], result[1]
        assert out.shape == (count, *xs.shape[1:]) and out.dtype == torch.float32 and out.is_contiguous()
        assert counts.dtype == torch.int64 and counts.shape == (count,)
        for k in range(count):
            t = first + k
            assert torch.equal(out[k].cpu(), outputs[t]), f'step {t + 1}'
            assert int(counts[k]) == int((spikes[t] != 0).sum()), f'step {t + 1}'
        if differential:
            membrane, estimate, sent = result[2], result[3], result[4]
            assert sent is not None and all(torch.equal(sent[k].cpu(), spikes[first + k]) for k in range(count))
        else:
            membrane, estimate = result[2], None
        if keep:
            assert torch.equal(membrane.cpu().view(xs.shape[1:]), membranes[first + count - 1])
            if differential:
                assert torch.equal(estimate.cpu().view(xs.shape[1:]), estimates[first + count - 1])
            for got, was in zip((membrane, estimate), given):  # a given state is updated in place
                assert not in_place or was is None or got is was
        else:
            assert membrane is None and estimate is None
            for was, copy in zip(given, before):  # without keep nothing is written
                assert was is None or torch.equal(was, copy)
        first += count
    assert any(int((s > 0).sum()) for s in spikes) and any(int((s < 0).sum()) for s in spikes)
    assert any(int((s == 0).sum()) for s in spikes)


def coding_keywords(coding, first, estimate):
    if coding == 'differential':
        return dict(coding='differential', estimate=estimate, t0=first, sent=True)
    return {}


def ec_coding_keywords(coding, estimate):  # ec_mt_steps takes t0 as the EC kernel's own argument
    return dict(coding='differential', estimate=estimate, sent=True) if coding == 'differential' else {}


# ---- mt_steps ----------------------------------------------------------------------------------
@functools.lru_cache(maxsize=None)
def mt_case(layout, kind, rule, coding):
    """(x [STEPS, ...] as the kernel reads it, θp, θn, the reference)."""
    if layout == 'contiguous':  # [B, N, C] tokens, thresholds per feature [C]
        step_shape, theta_shape = (2, 5, 12), (12,)
        theta_p, theta_n = thresholds_of(kind, theta_shape, 1)
        x = inputs(step_shape, theta_p, theta_n, rule, 2)
    else:  # the q of a fused qkv output, [B, H, N, D] read with strides; per (head, channel) [H, 1, D]
        B, N, H, D = 2, 5, 3, 8
        theta_p, theta_n = thresholds_of(kind, (H, 1, D), 3)
        q = inputs((B, H, N, D), theta_p, theta_n, rule, 4)
        qkv = torch.randn(STEPS, B, N, 3, H, D, generator=torch.Generator().manual_seed(5))
        qkv[:, :, :, 0] = q.permute(0, 1, 3, 2, 4)
        x = qkv.permute(3, 0, 1, 4, 2, 5)[0]
        assert not x.is_contiguous() and torch.equal(x, q)
    return x, theta_p, theta_n, reference(x.contiguous(), theta_p, theta_n, rule, coding)


@pytest.mark.parametrize('chunks', CHUNKS)
@pytest.mark.parametrize('kind', THRESHOLDS)
@pytest.mark.parametrize('coding', CODINGS)
@pytest.mark.parametrize('rule', RULES)
@pytest.mark.parametrize('layout', ['contiguous', 'permuted'])
def test_mt_steps_follow_the_reference(backend, layout, rule, coding, kind, chunks):
    x, theta_p, theta_n, want = mt_case(layout, kind, rule, coding)
    table = kernels.level_table(theta_p, theta_n, LEVELS, fire_rule=rule)
    channels = kernels.channel_map(theta_p.shape, x.shape[1:])
    assert (channels == (1, 1, 1)) == (kind == 'scalar')

    def call(first, count, membrane, estimate, keep):
        return backend.mt_steps(x[first:first + count], table, membrane, keep, channels=channels,
                                **coding_keywords(coding, first, estimate))
    run_chunks(call, x.contiguous(), want, coding, CHUNKS[chunks])


# ---- the q, k and v neurons on a fused qkv output --------------------------------------------------
QKV = (2, 5, 2, 8)  # B, N, H, D


@functools.lru_cache(maxsize=None)
def qkv_case(kind, rule, coding):
    """(qkv [STEPS, B, N, 3*H*D], per part (θp, θn, the reference on its head-split view))."""
    B, N, H, D = QKV
    parts, views = [], []
    for p in range(3):
        theta_p, theta_n = thresholds_of(kind, (H, 1, D), 10 + p)
        if kind == 'scalar':
            theta_p, theta_n = theta_p * (p + 1) / 2, theta_n * (3 - p) / 2
        view = inputs((B, H, N, D), theta_p, theta_n, rule, 20 + p)
        views.append(view.permute(0, 1, 3, 2, 4))  # [STEPS, B, N, H, D]
        parts.append((theta_p, theta_n, reference(view, theta_p, theta_n, rule, coding)))
    qkv = torch.stack(views, dim=3).reshape(STEPS, B, N, 3 * H * D).contiguous()
    return qkv, parts


def qkv_view(qkv, part):
    B, N, H, D = QKV
    return qkv.view(STEPS, B, N, 3, H, D).permute(3, 0, 1, 4, 2, 5)[part]


@pytest.mark.parametrize('chunks', CHUNKS)
@pytest.mark.parametrize('kind', THRESHOLDS)
@pytest.mark.parametrize('coding', CODINGS)
@pytest.mark.parametrize('rule', RULES)
def test_qkv_mt_steps_follow_the_reference(backend, rule, coding, kind, chunks):
    """One part per case (q, k and v in turn over the cases: the interpreter is slow); every part
    in every case in test_qkv_parts_mt_steps_follow_the_reference."""
    B, N, H, D = QKV
    qkv, parts = qkv_case(kind, rule, coding)
    chosen = (RULES.index(rule) + 2 * CODINGS.index(coding) + list(CHUNKS).index(chunks)) % 3
    for part, (theta_p, theta_n, want) in enumerate(parts):
        if part != chosen:
            continue
        table = kernels.level_table(theta_p, theta_n, LEVELS, fire_rule=rule)
        channels = kernels.channel_map(theta_p.shape, (B, H, N, D))
        assert channels == ((1, 1, 1) if kind == 'scalar' else (N * D, H, D))

        def call(first, count, membrane, estimate, keep):
            return backend.qkv_mt_steps(qkv[first:first + count].contiguous(), part, H, table, membrane, keep,
                                        channels=channels, **coding_keywords(coding, first, estimate))
        run_chunks(call, qkv_view(qkv, part).contiguous(), want, coding, CHUNKS[chunks])


@pytest.mark.parametrize('chunks', CHUNKS)
@pytest.mark.parametrize('kind', THRESHOLDS)
@pytest.mark.parametrize('coding', CODINGS)
@pytest.mark.parametrize('rule', RULES)
def test_qkv_parts_mt_steps_follow_the_reference(backend, rule, coding, kind, chunks):
    """The three neurons in one call; per-channel thresholds for q and v, one pair for k (a map
    per part), or one map for all three."""
    B, N, H, D = QKV
    qkv, parts = qkv_case(kind, rule, coding)
    tables, maps = [], []
    for part, (theta_p, theta_n, _) in enumerate(parts):
        if kind == 'channel' and part == 1:
            theta_p, theta_n = torch.tensor([0.3]), torch.tensor([0.2])
        tables.append(kernels.level_table(theta_p, theta_n, LEVELS, fire_rule=rule))
        maps.append(kernels.channel_map(theta_p.shape, (B, H, N, D)))
    wants = [want for _, _, want in parts]
    if kind == 'channel':
        wants[1] = reference(qkv_view(qkv, 1).contiguous(), torch.tensor([0.3]), torch.tensor([0.2]), rule, coding)
    channels = maps if kind == 'channel' else maps[0]
    differential = coding == 'differential'
    recorded, states, first = [], [(None, None)] * 3, 0
    for count in CHUNKS[chunks]:  # one call per chunk for the three parts
        keep = first + count < STEPS
        membranes, estimates = [s[0] for s in states], [s[1] for s in states]
        before = [None if m is None else m.clone() for m in membranes]
        extra = dict(coding='differential', estimates=estimates, t0=first, sents=[True] * 3) if differential else {}
        result = backend.qkv_parts_mt_steps(qkv[first:first + count].contiguous(), H, tables, membranes, keep,
                                            channels=channels, **extra)
        if not keep:  # nothing written
            assert all(m is None or torch.equal(m, b) for m, b in zip(membranes, before))
        elif first:  # the given states updated in place
            assert all(r[2] is m for r, m in zip(result, membranes))
            assert not differential or all(r[3] is e for r, e in zip(result, estimates))
        # the states as they are now (the next call writes into them)
        recorded.append([tuple(t.clone() if i in (2, 3) and t is not None else t for i, t in enumerate(r))
                         for r in result])
        states = [(r[2], r[3] if differential else None) for r in result]
        first += count
    for part in range(3):  # each part's results, as one neuron's (its states given back in turn)
        replay = iter(recorded)
        run_chunks(lambda *args: next(replay)[part], qkv_view(qkv, part).contiguous(), wants[part], coding,
                   CHUNKS[chunks], in_place=False)


# ---- an EC function and the neuron it feeds ------------------------------------------------------
EC_ROWS, EC_COLS = 6, 12


def ec_apart(backend, kind, x, cum, prev, t0, keep, affine):
    if kind == 'gelu':
        return backend.ec_gelu_steps(x, cum, prev, t0, keep, False)
    if kind == 'softmax':
        return backend.ec_softmax_steps(x, cum, prev, t0, keep)
    return backend.ec_layer_norm_steps(x, cum, prev, t0, keep, *affine, 1e-6)


@pytest.mark.parametrize('chunks', CHUNKS)
@pytest.mark.parametrize('kind', THRESHOLDS)
@pytest.mark.parametrize('coding', CODINGS)
@pytest.mark.parametrize('rule', RULES)
@pytest.mark.parametrize('ec', ['gelu', 'softmax', 'layer_norm'])
def test_ec_mt_steps_follow_the_reference(backend, ec, rule, coding, kind, chunks):
    """ec_mt_steps with per-feature thresholds: the reference neuron fed this backend's own EC
    output (the EC kernel alone, same chunks), bit for bit; the EC state carried as the EC kernel
    carries it."""
    g = torch.Generator().manual_seed(7)
    xs = torch.randn(STEPS, EC_ROWS, EC_COLS, generator=g) * 2
    affine = (torch.randn(EC_COLS, generator=g), torch.randn(EC_COLS, generator=g))
    theta_p, theta_n = thresholds_of(kind, (EC_COLS,), 8)
    if ec == 'softmax':
        theta_p, theta_n = theta_p / 8, theta_n / 8  # probabilities' differences are small
    channels = kernels.channel_map(theta_p.shape, (EC_ROWS, EC_COLS))
    assert channels == ((1, 1, 1) if kind == 'scalar' else (1, 1, EC_COLS))
    if ec == 'gelu':  # GELU takes [K, n]: a token's features are still the last, fastest index
        xs = xs.reshape(STEPS, -1)
    table = kernels.level_table(theta_p, theta_n, LEVELS, fire_rule=rule)
    extra = {'weight': affine[0], 'bias': affine[1], 'eps': 1e-6} if ec == 'layer_norm' else {}
    ec_out, ec_state, first = [], (None, None), 0
    for count in CHUNKS[chunks]:
        keep = first + count < STEPS
        out, *ec_state = ec_apart(backend, ec, xs[first:first + count], *ec_state, first, keep, affine)
        ec_out.append(out)
        first += count
    fed = torch.cat(ec_out).view(STEPS, EC_ROWS, EC_COLS)  # per feature: θ broadcasts over the rows
    want = reference(fed, theta_p, theta_n, rule, coding)
    ec_states = [(None, None)]

    def call(first, count, membrane, estimate, keep):
        result = backend.ec_mt_steps(ec, xs[first:first + count], *ec_states[-1], first, keep, table, membrane,
                                     channels=channels, **extra, **ec_coding_keywords(coding, estimate))
        if keep:
            ec_states.append((result[2], result[3]))
        else:
            assert result[2] is None and result[3] is None
        spikes = result[0].view(count, EC_ROWS, EC_COLS)
        if coding == 'differential':  # (outputs, counts, membrane, estimate, spikes s)
            return spikes, result[1], result[4], result[5], result[6].view(count, EC_ROWS, EC_COLS)
        return spikes, result[1], result[4]
    run_chunks(call, fed, want, coding, CHUNKS[chunks])


# ---- the level table ----------------------------------------------------------------------------
@pytest.mark.parametrize('rule', RULES)
def test_level_table_layout_and_values(rule):
    theta_p, theta_n = channel_thresholds((2, 1, 4), 30)
    theta_p[0, 0, 0] = 1e30  # huge: the top spikes overflow to inf, the thresholds still grow
    levels = 6
    table = kernels.level_table(theta_p, theta_n, levels, fire_rule=rule)
    width = kernels.level_width(levels)
    assert table.shape == (8, 4, width) and table.dtype == torch.float32 and table.is_contiguous()
    for c in range(8):  # row-major channel order; each channel's block is the one-channel table
        tp, tn = theta_p.view(-1)[c], theta_n.view(-1)[c]
        assert _same(table[c], kernels.level_table(tp, tn, levels, fire_rule=rule)[0])
        for j in range(width):
            for row, theta in ((0, tp), (2, tn)):
                value = table[c, row, j]
                if j < levels and theta > 0:
                    assert torch.equal(value, ref_fire_threshold(theta, j, rule))
                    exact = float(theta) * (2 ** j - 0.5 if rule == 'ecmt' else (0.75 * 2 ** j if j else 0.5))
                    assert math.isclose(float(value), exact, rel_tol=1e-6)
                else:
                    assert torch.isnan(value)
                assert _same(table[c, row + 1, j], theta * 2 ** j)
        if tp > 0:
            assert bool((table[c, 0, :levels].diff() > 0).all())  # thresholds grow with the level


def _same(a, b):
    return torch.equal(torch.nan_to_num(a, nan=-7.0), torch.nan_to_num(b, nan=-7.0)) and torch.equal(a.isnan(),
                                                                                                          b.isnan())


def test_level_table_of_one_pair_and_mistakes():
    one = kernels.level_table(torch.tensor(0.3), torch.tensor([0.2]), 3)
    assert one.shape == (1, 4, 8)
    assert _same(one, kernels.level_table(0.3, 0.2, 3))
    assert _same(one[0, 0, :3], torch.tensor([0.3, 0.6, 1.2]) - torch.tensor(0.3) * 0.5)
    with pytest.raises(ValueError, match='fire_rule'):
        kernels.level_table(0.3, 0.2, 3, fire_rule='floor')
    with pytest.raises(ValueError, match='one shape'):
        kernels.level_table(torch.ones(3), torch.ones(4), 3)


def test_round_rule_rounds_to_the_nearest_level():
    """ECMT_SPEC 15: one step from rest rounds the membrane to the nearest of 0, θ, ..., 2^(N-1)θ
    (ties to the larger), clamped above the top level; the negative side mirrors it."""
    theta, levels = 0.5, 6
    values = torch.linspace(0, theta * 2 ** levels, 4001)
    candidates = torch.tensor([0.0] + [theta * 2 ** j for j in range(levels)])
    distance = (values[:, None] - candidates[None, :]).abs()
    nearest = candidates[(distance <= distance.min(dim=1, keepdim=True).values).int().cumsum(1).argmax(1)]
    got = ref_fire(values, theta, theta, levels, 'round')
    assert torch.equal(got, nearest)
    assert torch.equal(ref_fire(-values, theta, theta, levels, 'round'), -nearest)
    assert not torch.equal(ref_fire(values, theta, theta, levels, 'ecmt'), nearest)  # the floor rule


# ---- the channel map ----------------------------------------------------------------------------
@pytest.mark.parametrize('theta_shape, step_shape, expected', [
    ((), (2, 5, 7), (1, 1, 1)),
    ((1,), (2, 5, 7), (1, 1, 1)),
    ((7,), (2, 5, 7), (1, 1, 7)),
    ((1, 7), (2, 5, 7), (1, 1, 7)),
    ((5, 7), (2, 5, 7), (1, 1, 35)),
    ((3, 1, 8), (2, 3, 5, 8), (40, 3, 8)),
    ((3, 1, 1), (2, 3, 5, 8), (40, 3, 1)),
    ((1, 3, 1, 8), (2, 3, 5, 8), (40, 3, 8)),
    ((2, 1, 1), (2, 5, 7), (35, 2, 1)),
    ((5, 1), (2, 5, 7), (7, 5, 1)),
    ((3, 1, 8), (2, 3, 1, 8), (1, 1, 24)),  # a size-1 step dimension is no block
])
def test_channel_map_gives_the_broadcast_channel_of_every_element(theta_shape, step_shape, expected):
    inner, groups, width = kernels.channel_map(theta_shape, step_shape)
    assert (inner, groups, width) == expected
    i = torch.arange(math.prod(step_shape))
    assert torch.equal(((i // inner) % groups) * width + i % width, channel_of_each_element(theta_shape, step_shape))


@pytest.mark.parametrize('theta_shape, step_shape', [
    ((6,), (2, 5, 7)),  # does not broadcast
    ((2, 7), (5, 7)),
    ((2, 1, 7), (5, 7)),  # more dimensions than a step, not 1
    ((2, 1, 5, 1, 7), (2, 3, 5, 4, 7)),  # three blocks
    ((2, 1, 5, 1), (2, 3, 5, 4)),
])
def test_channel_map_refuses_what_it_cannot_map(theta_shape, step_shape):
    with pytest.raises(ValueError, match='thresholds of shape'):
        kernels.channel_map(theta_shape, step_shape)


def test_kernels_check_the_table_against_the_channels(backend):
    x = torch.randn(2, 3, 4)
    table = kernels.level_table(torch.rand(4) + 0.1, torch.rand(4) + 0.1, 4)
    with pytest.raises(ValueError, match='channels'):
        backend.mt_steps(x, table, None, False)  # 4 channels, the default map names one
    with pytest.raises(ValueError, match='channels'):
        backend.mt_steps(x, table, None, False, channels=(1, 1, 3))
    with pytest.raises(ValueError, match='channels'):
        backend.mt_steps(x, table, None, False, channels=(0, 1, 4))
    qkv = torch.randn(2, 1, 3, 3 * 2 * 4)
    with pytest.raises(ValueError, match='channels'):
        backend.qkv_mt_steps(qkv, 0, 2, table, None, False, channels=(12, 2, 4))
    with pytest.raises(ValueError, match='channels'):
        backend.qkv_parts_mt_steps(qkv, 2, [table, None, None], [None] * 3, False, channels=[(1, 1, 3), None, None])
    with pytest.raises(ValueError, match='channels'):
        backend.ec_mt_steps('gelu', x.view(2, -1), None, None, 0, False, table, None, channels=(1, 1, 5))
    # The old one-channel [4, width] table is still taken, as one channel.
    old = kernels.level_table(0.3, 0.2, 4)[0]
    assert old.shape == (4, 8)
    assert all(torch.equal(a, b) for a, b in zip(backend.mt_steps(x, old, None, True),
                                                  backend.mt_steps(x, old.unsqueeze(0), None, True)))
