"""Expectation compensation (ECMT_SPEC 5 and 6): the identities and the literal references.

For a nonlinear f, the outputs summed over steps 1..t must equal t·f(mean of the inputs so far);
for a product, A_t·B_t/t. Every backend (native kernels, eager) is held to them, one step per call
(tests/test_multistep.py takes chunks of steps).
"""
import copy

import pytest
import torch
import torch.nn as nn
from timm.layers import LayerNorm as TimmLayerNorm

from reference import ref_ec, ref_ec_product
from trans_utils import AtNeuron, exp_comp_neuron, reset_net

pytestmark = pytest.mark.usefixtures('single_thread')

STEPS = 8
D = 16


def layer_norm(eps=1e-5, cls=nn.LayerNorm):
    norm = cls(D, eps=eps)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(D) * 0.5 + 1.0)
        norm.bias.copy_(torch.randn(D) * 0.3)
    return norm


FUNCTIONS = {
    'softmax': lambda: nn.Softmax(dim=-1),
    'softmax_dim1': lambda: nn.Softmax(dim=1),   # not the fused kind: the module is called as is
    'gelu': lambda: nn.GELU(),
    'gelu_tanh': lambda: nn.GELU(approximate='tanh'),
    'layernorm': lambda: layer_norm(),
    'timm_layernorm_eps1e-6': lambda: layer_norm(1e-6, TimmLayerNorm),
    'silu': lambda: nn.SiLU(),
}


def inputs(steps=STEPS, shape=(2, 5, D), seed=0):
    g = torch.Generator().manual_seed(seed)
    # Spike-like inputs: sparse, of a few magnitudes, plus a dense analog part.
    return [torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.6) * 2.0
            + 0.1 * torch.randn(shape, generator=g) for _ in range(steps)]


@pytest.mark.parametrize('name', FUNCTIONS)
def test_ec_sum_is_t_times_f_of_mean(fast, name):
    torch.manual_seed(1)
    f = FUNCTIONS[name]()
    ec = exp_comp_neuron(f)
    xs = inputs()
    originals = [x.clone() for x in xs]
    f64 = copy.deepcopy(f).double()
    expected = ref_ec(f64, xs)
    total = torch.zeros(())
    for t, (x, want) in enumerate(zip(xs, expected), start=1):
        out = ec(x)
        assert out.dtype == torch.float32 and out.shape == x.shape
        total = total + out
        mean = torch.stack(xs[:t]).double().mean(0)
        torch.testing.assert_close(total.double(), t * f64(mean), rtol=1e-5, atol=2e-6 * t)
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=4e-6 * t)
        assert ec.steps == t
        torch.testing.assert_close(ec.cum_input.double(), torch.stack(xs[:t]).double().sum(0),
                                   rtol=1e-6, atol=1e-5)
    for x, x0 in zip(xs, originals):
        assert torch.equal(x, x0), 'EC modified its input in place'
    # The compensation is not the naive per-step f(x): the test can tell them apart.
    assert not torch.allclose(total, sum(f(x) for x in xs), atol=1e-3)


def test_ec_with_a_constant_input_gives_f_every_step(fast):
    """Direct input coding: the same tensor object every step (the model's first norm sees it)."""
    f = layer_norm()
    ec = exp_comp_neuron(f)
    x = torch.randn(2, 5, D)
    x0 = x.clone()
    for _ in range(4):
        torch.testing.assert_close(ec(x), f(x0), rtol=1e-5, atol=1e-5)
    assert torch.equal(x, x0)


def test_ec_softmax_on_attention_scores(fast):
    """Softmax over the keys of (batch, heads, tokens, tokens) scores, as in the attention."""
    g = torch.Generator().manual_seed(8)
    xs = [torch.randn(2, 3, 17, 17, generator=g) * 2 for _ in range(6)]
    ec = exp_comp_neuron(nn.Softmax(dim=-1))
    total = 0
    for t, (x, want) in enumerate(zip(xs, ref_ec(lambda v: torch.softmax(v, -1), xs)), start=1):
        out = ec(x)
        total = total + out
        torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=4e-6 * t)
        torch.testing.assert_close(total.sum(-1), torch.full((2, 3, 17), float(t)), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['softmax', 'layernorm', 'gelu'])
def test_ec_reset_clears_state(fast, name):
    f = FUNCTIONS[name]()
    ec = exp_comp_neuron(f)
    xs = inputs(steps=4, seed=5)
    first = [ec(x) for x in xs]
    assert ec.steps == 4 and ec.cum_input is not None
    ec.reset()
    assert ec.steps == 0 and ec.cum_input is None and ec.prev_total is None
    torch.testing.assert_close(ec(xs[0]), f(xs[0]))
    reset_net(nn.Sequential(ec))
    assert ec.steps == 0 and ec.cum_input is None
    for x, want in zip(xs, first):
        torch.testing.assert_close(ec(x), want, rtol=0, atol=0)


# ---------------------------------------------------------------- products

def test_reference_product_is_the_difference_of_cumulative_products():
    """The original's three-products form equals A_t B_t / t − A_{t−1} B_{t−1} / (t−1)."""
    g = torch.Generator().manual_seed(2)
    as_ = [torch.randn(3, 5, 4, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    bs = [torch.randn(3, 4, 6, generator=g, dtype=torch.float64) for _ in range(STEPS)]
    outs = ref_ec_product(as_, bs)
    prev = None
    for t in range(1, STEPS + 1):
        total = sum(as_[:t]) @ sum(bs[:t]) / t
        want = total if prev is None else total - prev
        torch.testing.assert_close(outs[t - 1], want, rtol=1e-12, atol=1e-12)
        prev = total


@pytest.mark.parametrize('shapes', [
    ((2, 3, 5, 4), (2, 3, 4, 6)),   # attention: batch, heads
    ((2, 3, 5, 4), (3, 4, 6)),      # broadcast leading dimensions
    ((5, 4), (2, 4, 6)),            # broadcast the other operand
    ((5, 4), (4, 6)),               # plain matrices
    ((4,), (4, 6)),                 # a vector operand
], ids=['4d', 'broadcast', 'broadcast_left', '2d', 'vector'])
def test_at_neuron_sum_is_product_of_sums_over_t(fast, shapes):
    g = torch.Generator().manual_seed(3)
    as_ = [torch.randn(shapes[0], generator=g) * (torch.rand(shapes[0], generator=g) < 0.5) for _ in range(STEPS)]
    bs = [torch.randn(shapes[1], generator=g) for _ in range(STEPS)]
    originals = [x.clone() for x in as_ + bs]
    at = AtNeuron()
    expected = ref_ec_product(as_, bs)
    total = 0
    for t in range(1, STEPS + 1):
        out = at(as_[t - 1], bs[t - 1])
        assert out.dtype == torch.float32
        total = total + out
        cum_a, cum_b = sum(as_[:t]).double(), sum(bs[:t]).double()
        torch.testing.assert_close(total.double(), cum_a @ cum_b / t, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.double(), expected[t - 1], rtol=1e-5, atol=1e-5)
        # The running sums stay readable (the energy monitor uses them).
        torch.testing.assert_close(at.cum_a.double(), cum_a, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(at.cum_b.double(), cum_b, rtol=1e-6, atol=1e-6)
    for x, x0 in zip(as_ + bs, originals):
        assert torch.equal(x, x0), 'AtNeuron modified its input in place'
    assert not torch.allclose(total, sum(a @ b for a, b in zip(as_, bs)), atol=1e-2)


def test_at_neuron_reset_clears_state(fast):
    g = torch.Generator().manual_seed(4)
    as_ = [torch.randn(2, 5, 4, generator=g) for _ in range(3)]
    bs = [torch.randn(2, 4, 3, generator=g) for _ in range(3)]
    at = AtNeuron()
    first = [at(a, b) for a, b in zip(as_, bs)]
    at.reset()
    assert at.steps == 0 and at.cum_a is None and at.cum_b is None and at.prev_total is None
    torch.testing.assert_close(at(as_[0], bs[0]), as_[0] @ bs[0])
    reset_net(nn.ModuleList([at]))
    assert at.steps == 0 and at.cum_a is None
    for (a, b), want in zip(zip(as_, bs), first):
        torch.testing.assert_close(at(a, b), want, rtol=0, atol=0)


@pytest.mark.parametrize('f', [torch.nn.ReLU(inplace=True), torch.nn.Identity()], ids=['relu_inplace', 'identity'])
def test_ec_of_a_function_that_writes_or_returns_its_input(f):
    """eager ec_function_steps with an f that works in place or returns its input: the same
    outputs as ECMT_SPEC 5 written out, and the input untouched."""
    from kernels.eager import ec_function_steps
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5)
    before = x.clone()
    out, _, _ = ec_function_steps(f, x, None, None, 0, keep=False)
    plain = torch.relu if isinstance(f, torch.nn.ReLU) else (lambda v: v)
    sums = x.cumsum(0)
    want = torch.stack([(s + 1) * plain(sums[s] / (s + 1)) - (s * plain(sums[s - 1] / s) if s else 0)
                        for s in range(4)])
    assert torch.allclose(out, want, atol=1e-6) and torch.equal(x, before)
