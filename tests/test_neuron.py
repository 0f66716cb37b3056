"""The multi-threshold neuron (ECMT_SPEC 4) against the literal reference, spike for spike.

The neuron tests run with each backend: the native multi-step kernel (the CPU default), the
``torch.compile``-fused step and the eager one (the closed-form rule ``mt_fire``), here one step
per call (tests/test_multistep.py takes chunks of steps). Equality is exact (``torch.equal``): all
must reproduce the literal level-by-level rule on every element, ties at the threshold edges
included.
"""
import math
from pathlib import Path

import pytest
import torch

from reference import ref_mt_neuron
from trans_utils import TwoSideNeuron, mt_fire

pytestmark = pytest.mark.usefixtures('single_thread')

NAN = float('nan')
INF = float('inf')

# (θp, θn): equal, unequal, tiny, huge, and not exactly representable in binary.
THRESHOLDS = [(1.0, 1.0), (0.1, 0.3), (1e-3, 2.5e-2), (123.4, 0.07), (3e-7, 5e4), (0.0125, 0.0125)]
# A side whose threshold is not positive must never fire.
DEAD_SIDES = [(0.0, 0.7), (0.7, 0.0), (-0.5, 0.7), (0.7, -0.5), (NAN, 0.7), (0.7, NAN),
              (0.0, 0.0), (-1.0, NAN), (-0.0, 0.7)]


def run_neuron(xs, theta_p, theta_n, levels):
    neuron = TwoSideNeuron('fc1', theta_p, theta_n, levels)
    return [neuron(x) for x in xs], neuron


def assert_same_spikes(xs, theta_p, theta_n, levels):
    spikes, neuron = run_neuron(xs, theta_p, theta_n, levels)
    expected = ref_mt_neuron(xs, theta_p, theta_n, levels)
    for t, (got, want) in enumerate(zip(spikes, expected), start=1):
        assert got.dtype == torch.float32 and got.shape == xs[t - 1].shape
        if not torch.equal(got, want):
            bad = (got != want).nonzero()[:5].tolist()
            raise AssertionError(f'step {t}, θp={theta_p}, θn={theta_n}, N={levels}: spikes differ '
                                 f'at {bad}: got {got[tuple(zip(*bad))]}, want {want[tuple(zip(*bad))]}')
    return spikes, neuron


def random_inputs(theta_p, theta_n, levels, steps=4, shape=(16, 64), seed=0):
    """Inputs that reach every level on both sides, with a few exact zeros."""
    g = torch.Generator().manual_seed(seed)
    scale = max(t for t in (theta_p, theta_n) if t == t and t > 0) if any(
        t == t and t > 0 for t in (theta_p, theta_n)) else 1.0
    xs = []
    for _ in range(steps):
        x = torch.randn(shape, generator=g) * scale * 2.0 ** torch.randint(-2, levels + 1, shape, generator=g)
        x[torch.rand(shape, generator=g) < 0.05] = 0.0
        xs.append(x)
    return xs


@pytest.mark.parametrize('levels', range(1, 9))
@pytest.mark.parametrize('theta_p,theta_n', THRESHOLDS)
def test_random_sequences_match_reference(fast, levels, theta_p, theta_n):
    xs = random_inputs(theta_p, theta_n, levels, seed=levels)
    spikes, neuron = assert_same_spikes(xs, theta_p, theta_n, levels)
    # Every spike is 0 or ±θ·2^j with j < N, and the membrane keeps what was not emitted.
    tp, tn = torch.tensor(theta_p), torch.tensor(theta_n)
    allowed = torch.cat([torch.zeros(1)] + [torch.stack([tp * 2 ** j, -tn * 2 ** j]) for j in range(levels)])
    for s in spikes:
        assert torch.isin(s, allowed).all()
    torch.testing.assert_close(neuron.membrane + sum(spikes), sum(xs), rtol=1e-5,
                               atol=1e-5 * max(theta_p, theta_n) * 2 ** levels)
    # The sequences exercise both sides and more than one level (the test is not vacuous).
    fired = torch.stack(spikes)
    assert (fired > 0).any() and (fired < 0).any()
    if levels > 2:
        assert (fired.abs() > 2.5 * min(theta_p, theta_n)).any()


def edge_membranes(theta, levels):
    """Membranes exactly at θ·2^j − θ/2 (float32 arithmetic) and one ulp below and above, for
    every level and one beyond the top, both signs; zeros; and values far beyond the top level."""
    t = torch.tensor(theta, dtype=torch.float32)
    values = []
    for j in range(levels + 1):
        edge = t * 2 ** j - t / 2
        values += [edge, torch.nextafter(edge, torch.tensor(INF)), torch.nextafter(edge, torch.tensor(-INF))]
        values += [t * 2 ** j, t * 2 ** (j + 1) - t / 2]
    v = torch.stack(values)
    big = torch.tensor([1e3 * theta * 2 ** levels, 3.0e38, torch.finfo(torch.float32).max, INF])
    return torch.cat([v, -v, big, -big, torch.tensor([0.0, -0.0])])


def embed(values, into):
    """``into`` with its first elements replaced by ``values`` (same shape as ``into``)."""
    out = into.clone().reshape(-1)
    out[: values.numel()] = values
    return out.reshape(into.shape)


@pytest.mark.parametrize('levels', [1, 2, 3, 5, 8])
@pytest.mark.parametrize('theta_p,theta_n', THRESHOLDS + [(1e-38, 2e-39), (1e30, 3e33)])
def test_ties_at_threshold_edges(fast, levels, theta_p, theta_n):
    edges = torch.cat([edge_membranes(theta_p, levels), edge_membranes(theta_n, levels)])
    edges = embed(edges, torch.zeros(16, 64))  # the 2-d shape of the other tests: no recompilation
    # One step from rest (the membrane is the input), then a second step on what remains.
    spikes, _ = assert_same_spikes([edges, edges], theta_p, theta_n, levels)
    # Spot checks of the rule itself, independent of the reference.
    tp = torch.tensor(theta_p, dtype=torch.float32)
    exact = tp * 2 ** (levels - 1) - tp / 2
    below = torch.nextafter(exact, torch.tensor(-INF))
    first = spikes[0]
    assert first[edges == exact].eq(tp * 2 ** (levels - 1)).all()
    if levels > 1:
        assert first[edges == below].eq(tp * 2 ** (levels - 2)).all()
    assert first[edges == 0].eq(0).all()
    assert first[edges == INF].eq(tp * 2 ** (levels - 1)).all()


@pytest.mark.parametrize('levels', [1, 4, 8])
@pytest.mark.parametrize('theta_p,theta_n', DEAD_SIDES)
def test_non_positive_threshold_never_fires(fast, levels, theta_p, theta_n):
    xs = random_inputs(theta_p, theta_n, levels, steps=3, seed=7)
    xs.append(embed(edge_membranes(1.0, levels), torch.full((16, 64), 5.0)))
    spikes, neuron = assert_same_spikes(xs, theta_p, theta_n, levels)
    fired = torch.stack(spikes)
    assert not torch.isnan(fired).any()
    if not theta_p > 0:
        assert not (fired > 0).any()
    if not theta_n > 0:
        assert not (fired < 0).any()
    if theta_p > 0:
        assert (fired > 0).any()
    if theta_n > 0:
        assert (fired < 0).any()


@pytest.mark.parametrize('levels', [1, 3, 8])
@pytest.mark.parametrize('theta_p,theta_n', THRESHOLDS[:4] + DEAD_SIDES[:6])
def test_mt_fire_matches_reference_step(levels, theta_p, theta_n):
    """``mt_fire`` on a membrane that already holds v + x is one step of the reference."""
    g = torch.Generator().manual_seed(levels)
    scale = 1.0 if not theta_p > 0 else theta_p
    membrane = torch.randn(16, 64, generator=g) * scale * 2.0 ** torch.randint(-2, levels + 2, (16, 64), generator=g)
    membrane = embed(edge_membranes(scale, levels), membrane)
    spike = mt_fire(membrane, torch.tensor([theta_p]), torch.tensor([theta_n]), levels)
    assert torch.equal(spike, ref_mt_neuron([membrane], theta_p, theta_n, levels)[0])


def test_non_contiguous_attention_layout(fast):
    """q, k, v reach their neurons as permuted views of the qkv output (batch, heads, tokens, dim)."""
    g = torch.Generator().manual_seed(9)
    qkv = [torch.randn(2, 17, 3, 3, 16, generator=g) * 0.8 for _ in range(4)]
    for index in range(3):
        xs = [t.permute(2, 0, 3, 1, 4)[index] for t in qkv]
        assert not xs[0].is_contiguous()
        assert_same_spikes(xs, 0.3, 0.2, 8)


def test_many_level_counts_keep_the_fused_path(fast):
    """One process may build neurons with many level counts (a sweep over linear_num, qkv_num,
    softmax_num; several models): more graphs than dynamo's default limit of 8 per function.
    The fused path must stay on and exact."""
    x = torch.randn(16, 64, generator=torch.Generator().manual_seed(4)) * 3
    for levels in range(1, 11):
        spike = TwoSideNeuron('fc1', 0.05, 0.07, levels)(x)
        assert torch.equal(spike, ref_mt_neuron([x], 0.05, 0.07, levels)[0]), levels
    # (the fixture checks that the fused path is still on)


def test_reset_clears_state(fast):
    xs = random_inputs(0.5, 0.25, 4, steps=5, seed=3)
    neuron = TwoSideNeuron('fc1', 0.5, 0.25, 4)
    first = [neuron(x) for x in xs]
    assert neuron.membrane is not None and neuron.membrane.abs().sum() > 0
    neuron.reset()
    assert neuron.membrane is None
    second = [neuron(x) for x in xs]
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    # Without the reset the left-over membrane changes the spikes.
    third = [neuron(x) for x in xs]
    assert any(not torch.equal(a, b) for a, b in zip(first, third))


def test_state_is_float32_whatever_the_input_dtype(fast):
    x = torch.randn(4, 8).to(torch.bfloat16)
    neuron = TwoSideNeuron('fc1', 0.3, 0.3, 4)
    spike = neuron(x)
    assert spike.dtype == torch.float32 and neuron.membrane.dtype == torch.float32
    assert torch.equal(spike, ref_mt_neuron([x.float()], 0.3, 0.3, 4)[0])


def test_thresholds_are_buffers_and_shown():
    neuron = TwoSideNeuron('v', 0.5, 0.25, 6)
    state = neuron.state_dict()
    assert set(state) == {'scale_p', 'scale_n'}
    assert state['scale_p'].shape == (1,) and state['scale_p'].item() == 0.5
    assert 'levels=6' in repr(neuron) and 'scale_n=0.25' in repr(neuron)
    with pytest.raises(ValueError):
        TwoSideNeuron('v', 0.5, 0.25, 0)
    assert math.isclose(neuron.scale_n.item(), 0.25)


def test_mean_error_after_T_steps_does_not_depend_on_the_threshold():
    """benchmarks/mt_error.py's claim: for a constant input the relative error of the mean spike
    after T steps is a function of x / theta only (the levels are theta * 2^j), so no threshold
    removes it; its mean at T = 2 is docs/low_latency.md's 0.135."""
    import importlib.util
    spec = importlib.util.spec_from_file_location('mt_error', Path(__file__).resolve().parents[1] / 'benchmarks' / 'mt_error.py')
    mt_error = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt_error)
    x = torch.exp(torch.linspace(math.log(0.5), math.log(64.0), 5001, dtype=torch.float64)).float()
    for T in (1, 2, 4):
        errors = []
        for theta in (1.0, 0.375, 3.0):
            total = sum(ref_mt_neuron([x * theta] * T, theta, theta, 8))
            errors.append((total / T - x * theta).abs() / (x * theta))
        assert torch.allclose(errors[1], errors[0], atol=1e-5) and torch.allclose(errors[2], errors[0], atol=1e-5)
        assert torch.allclose(mt_error.relative_errors(T, points=5001), errors[0], atol=1e-5)
    rel = mt_error.relative_errors(2)
    assert float(rel.mean()) == pytest.approx(0.135, abs=5e-4) and float(rel.max()) == pytest.approx(1 / 3, abs=1e-3)


@pytest.mark.parametrize('fire_rule', ['ecmt', 'round'])
@pytest.mark.parametrize('coding', ['rate', 'differential'])
def test_reference_with_a_threshold_per_channel_is_each_channels_own_neuron(fire_rule, coding):
    """tests/reference.py with thresholds that broadcast against the input (ECMT_SPEC 15): each
    channel's outputs are those of the neuron with that channel's scalar pair, dead sides
    included; a [1] tensor is the float pair, bit for bit."""
    theta_p = torch.tensor([0.3, 0.05, 0.0, 1.2, -0.1, 0.7])
    theta_n = torch.tensor([0.2, NAN, 0.4, 0.0, 0.3, 0.7])
    xs = [x * 2 for x in random_inputs(1.0, 1.0, 5, steps=4, shape=(3, 7, 6), seed=11)]
    got = ref_mt_neuron(xs, theta_p, theta_n, 5, coding, fire_rule)
    for c in range(6):
        want = ref_mt_neuron([x[..., c] for x in xs], float(theta_p[c]), float(theta_n[c]), 5, coding, fire_rule)
        assert all(torch.equal(a[..., c], b) for a, b in zip(got, want)), c
    assert all(torch.equal(a, b) for a, b in zip(
        ref_mt_neuron(xs, torch.tensor([0.3]), torch.tensor([0.2]), 5, coding, fire_rule),
        ref_mt_neuron(xs, 0.3, 0.2, 5, coding, fire_rule)))
    fired = torch.stack(got)
    assert not (fired[..., 2] > 0).any() and not (fired[..., 4] > 0).any()  # θp <= 0: never up
    assert not (fired[..., 1] < 0).any() and not (fired[..., 3] < 0).any()  # θn NaN or 0: never down
    assert (fired[..., 0] > 0).any() and (fired[..., 0] < 0).any()


def test_rounding_rule_first_spikes_are_nearer_than_the_floor_rules():
    """ECMT_SPEC 15's example: at θ = 1 a membrane of 3 fires 2 under section 4's rule (floor
    between levels) and 4 under the rounding rule (3 >= 0.75 * 4); 2.9 fires 2 under both."""
    x = torch.tensor([3.0, 2.9, 0.5, 0.49, 200.0, -3.0])
    assert ref_mt_neuron([x], 1.0, 1.0, 8)[0].tolist() == [2.0, 2.0, 1.0, 0.0, 128.0, -2.0]
    assert ref_mt_neuron([x], 1.0, 1.0, 8, fire_rule='round')[0].tolist() == [4.0, 2.0, 1.0, 0.0, 128.0, -4.0]
