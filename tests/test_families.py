"""The modern timm families at tiny size: EVA-02 (rotary, SwiGLU, norms inside), rotary ViTs,
attention pooling (SigLIP), distilled DeiT; the EC element-wise product; refusals and the plain
``ann`` fallback for models that cannot be converted.

Random weights, no download; 16x16 images, 2 blocks: a 32-step SNN runs in about a second.
"""
import pytest
import timm
import torch
import torch.nn as nn

import model_base
import model_eva
import model_vit
import trans_utils
from conftest import relative_error, run_snn
from helpers import FAMILY_CONFIGS as CONFIGS, TINY, build_family as build, calibrate, images
from trans_utils import (ConversionError, MulNeuron, MyMul, SOPMonitor, TwoSideNeuron,
                         convert_to_snn, exp_comp_neuron, get_modules, reset_net)

pytestmark = pytest.mark.usefixtures('single_thread')

# ---------------------------------------------------------------- timm compatibility

@pytest.mark.parametrize('config', CONFIGS)
def test_ann_equals_timm(config):
    model, plain = build(config)
    assert list(model.state_dict()) == list(plain.state_dict())
    x = images(3)
    with torch.no_grad():
        want = plain(x)
        assert want.abs().max() > 0.1  # the comparison below is not between near-zero numbers
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
        calibrate(model, batches=1)  # for_v: calibrating placeholders are identities too
        torch.testing.assert_close(model(x), want, rtol=1e-5, atol=1e-5)
    places = [m.place for _, m in get_modules(model, (trans_utils.TestNeuron,))]
    assert sorted(places) == sorted(CONFIGS[config][2])


def test_rope_and_gated_mlp_matter():
    """The comparison above is not blind to rope or the gate: without them the logits differ."""
    model, plain = build('eva02_tiny')
    x = images()
    with torch.no_grad():
        want = plain(x)
        model.rope.get_embed = lambda *a, **k: None  # no rotation
        assert relative_error(model(x), want) > 0.01
        model, _ = build('eva02_tiny')
        model.blocks[0].mlp.gate_last = True  # the halves swapped
        assert relative_error(model(x), want) > 0.01


def test_time_folded_into_the_batch():
    """A batch holding the same images several times over (time folded into the batch, as the
    multi-step engine runs timm's code) gives each copy the logits of the images alone: constant
    queries, tokens and rotary tables broadcast over the first dimension, whatever it holds."""
    for config in ('eva02_tiny', 'siglip_map', 'deit_distilled', 'vit_rope_mixed'):
        model, _ = build(config)
        x = images(2)
        with torch.no_grad():
            alone = model(x)
            folded = model(x.repeat(3, 1, 1, 1))
        torch.testing.assert_close(folded, alone.repeat(3, 1), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- SNN fidelity

# Measured relative errors ||sum_{s<=t} out_s / t - ann|| / ||ann||, t = 4 -> t = 32, over five
# seeds of weights/calibration/input (float32, CPU, eager neuron; 16 levels everywhere):
#   eva02_tiny 0.21-0.35 -> 0.022-0.044;      eva02_swiglu_norms 0.23-0.49 -> 0.020-0.052;
#   vit_rope_reg 0.044-0.069 -> 0.0042-0.0098; vit_rope_mixed 0.31-0.63 -> 0.033-0.055;
#   siglip_map 0.18-0.39 -> 0.015-0.044;      deit_distilled 0.27-0.56 -> 0.040-0.065;
#   vit_pe_core 0.13-0.40 -> 0.023-0.057.
# (Weights of trained scale, hence larger than test_models' errors at timm's small init.)
# The err(32)/err(4) ratio was at most 0.20. The bounds leave 2x headroom over the worst seed.
FIDELITY_BOUND_T32 = {'eva02_tiny': 0.09, 'eva02_swiglu_norms': 0.11, 'vit_rope_reg': 0.02,
                      'vit_rope_mixed': 0.11, 'siglip_map': 0.09, 'deit_distilled': 0.13, 'vit_pe_core': 0.12}


@pytest.mark.parametrize('config', CONFIGS)
def test_snn_fidelity(config, eager_neuron):
    model, _ = build(config)
    calibrate(model)
    x = images()
    with torch.no_grad():
        ann = model(x)
    convert_to_snn(model, linear_num=16, qkv_num=16, softmax_num=16, fc2_thresholds=None)
    compensated = {name for name, _ in get_modules(model, (exp_comp_neuron,))}
    assert set(CONFIGS[config][3]) <= compensated
    means = run_snn(model, x, 32)
    errors = {t: relative_error(means[t - 1], ann) for t in (1, 4, 8, 32)}
    assert errors[32] < FIDELITY_BOUND_T32[config], errors
    assert errors[32] < 0.35 * errors[4], errors
    assert errors[8] < errors[1], errors
    again = run_snn(model, x, 4)  # reset_net cleared every state
    for a, b in zip(again, means[:4]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_snn_structure_of_the_new_modules(eager_neuron):
    """After conversion: the gated MLP's product is an EC element-wise product fed by MT neurons,
    its activation and norm are EC; the attention pool's products are EC products, its k and v
    come from MT neurons, and its latent query stays analog (no neuron before q)."""
    model, _ = build('eva02_swiglu_norms')
    convert_to_snn(calibrate(model, batches=1))
    mlp = model.blocks[0].mlp
    assert type(mlp.mul) is MulNeuron
    assert type(mlp.place_gate) is TwoSideNeuron and type(mlp.place_up) is TwoSideNeuron
    assert type(mlp.act) is exp_comp_neuron and type(mlp.norm) is exp_comp_neuron
    assert type(model.blocks[0].attn.norm) is exp_comp_neuron
    assert not get_modules(model, (MyMul,))

    model, _ = build('siglip_map')
    convert_to_snn(calibrate(model, batches=1))
    pool = model.attn_pool
    assert type(pool.qk_matmul) is trans_utils.AtNeuron and type(pool.av_matmul) is trans_utils.AtNeuron
    assert type(pool.place_k) is TwoSideNeuron and type(pool.place_v) is TwoSideNeuron
    assert type(pool.softmax) is exp_comp_neuron and type(pool.norm) is exp_comp_neuron
    assert type(pool.q) is nn.Linear
    assert 'attn_pool.mlp.place_fc1' in dict(get_modules(model, (TwoSideNeuron,)))


def test_default_fc2_thresholds_per_family():
    """The paper's fixed fc2 thresholds are the ViT family's default (DeiT distilled and SigLIP
    included); EVA and rotary ViTs calibrate, and so does any model with gated MLPs (its fc2
    input is a product, not the GELU output those thresholds were set for)."""
    for config in ('siglip_map', 'deit_distilled'):
        assert model_vit.default_fc2_thresholds(build(config)[0]) == model_vit.VIT_FC2_THRESHOLDS
    for config in ('eva02_tiny', 'vit_rope_reg', 'vit_rope_mixed'):
        assert model_vit.default_fc2_thresholds(build(config)[0]) is None
    from timm.layers import SwiGLU
    glu_vit = model_vit.create_model('vit_tiny_patch16_224', mlp_layer=SwiGLU, embed_dim=32, num_heads=2, **TINY)
    assert glu_vit.ecmt_family == 'vit' and model_vit.default_fc2_thresholds(glu_vit) is None


# ---------------------------------------------------------------- EC element-wise product

def test_ec_elementwise_product_identity():
    """Outputs summed over steps 1..t equal A_t * B_t / t (ECMT_SPEC 12), broadcasting included;
    each step's output is the difference of two such totals; reset clears the state."""
    g = torch.Generator().manual_seed(0)
    mul = MulNeuron()
    for shape_a, shape_b in (((2, 5, 6), (2, 5, 6)), ((2, 5, 6), (1, 5, 1))):
        reset_net(nn.ModuleList([mul]))
        cum_a = cum_b = total = 0
        previous = None
        for t in range(1, 9):
            # spike-like operands: many exact zeros, a few levels
            a = torch.randint(-2, 3, shape_a, generator=g).float() * 0.25
            b = torch.randint(-2, 3, shape_b, generator=g).float() * 0.5
            cum_a, cum_b = cum_a + a.double(), cum_b + b.double()
            out = mul(a, b)
            assert out.shape == torch.broadcast_shapes(shape_a, shape_b)
            total = total + out.double()
            expected = cum_a * cum_b / t
            torch.testing.assert_close(total, expected, rtol=1e-6, atol=1e-6)
            if previous is not None:
                torch.testing.assert_close(out.double(), expected - previous, rtol=1e-6, atol=1e-6)
            previous = expected
    assert mul.steps == 8
    mul.reset()
    a, b = torch.ones(3), torch.full((3,), 2.0)
    assert torch.equal(mul(a, b), a * b)  # the first step after a reset is a_1 * b_1


def test_ec_elementwise_product_energy_count():
    """SOPMonitor counts nz(a)nz(b) + nz(a)nz(B) + nz(A)nz(b) per element (A, B the running sums
    including this step) against one dense operation per element, per step (ECMT_SPEC 12)."""
    g = torch.Generator().manual_seed(3)
    net = nn.ModuleDict({'mul': MulNeuron()})
    monitor = SOPMonitor(net)
    monitor.new_batch()
    cum_a = cum_b = 0
    want = []
    for step in range(5):
        monitor.step = step
        a = torch.randint(-1, 2, (4, 7), generator=g).float()
        b = torch.randint(-1, 2, (4, 7), generator=g).float()
        cum_a, cum_b = cum_a + a, cum_b + b
        net['mul'](a, b)
        nz = lambda x: (x != 0).double()  # noqa: E731 - brute-force masks, element by element
        want.append(float((nz(a) * nz(b) + nz(a) * nz(cum_b) + nz(cum_a) * nz(b)).sum()))
    sops, dense = monitor.totals()
    monitor.remove()
    assert monitor.names == ['mul'] and monitor.kinds == ['product']
    assert sops[0].tolist() == want
    assert dense[0].tolist() == [28.0] * 5
    assert 0 < sum(want) < 3 * 28 * 5


def test_monitor_counts_the_gated_mlps(eager_neuron):
    model, _ = build('eva02_tiny')
    convert_to_snn(calibrate(model, batches=1))
    with SOPMonitor(model) as monitor:
        reset_net(model)
        monitor.new_batch()
        with torch.no_grad():
            for step in range(3):
                monitor.step = step
                model(images())
        products = [n for n, k in zip(monitor.names, monitor.kinds) if k == 'product']
        assert {'blocks.0.mlp.mul', 'blocks.1.mlp.mul'} <= set(products)
        assert len(products) == 3 * TINY['depth']
        rate = monitor.summary()['fire_rate']
        assert len(rate) == 3 and all(0 < r < 3 for r in rate)


# ---------------------------------------------------------------- refusals and the ann fallback

def tiny_kwargs(**extra):
    return dict(TINY, embed_dim=32, num_heads=2, **extra)


@pytest.mark.parametrize('name,kwargs,words', [
    ('vit_tiny_patch16_224', tiny_kwargs(global_pool='max'), ["global_pool='max'"]),
    ('vit_tiny_patch16_224', tiny_kwargs(global_pool='prr'), ['attn_pool', 'AttentionPoolPrr']),
    ('vit_dwee_patch16_reg1_gap_256', tiny_kwargs(), ['blocks.0.attn', 'DiffAttention']),
    ('vit_small_patch16_18x2_224', tiny_kwargs(), ['blocks.0', 'ParallelThingsBlock']),
    ('vit_relpos_small_patch16_224', tiny_kwargs(), ['VisionTransformerRelPos']),
    ('resnet18', dict(num_classes=10), ['ResNet', 'Eva', 'VisionTransformer']),
], ids=['max_pool', 'prr_pool', 'diff_attention', 'parallel_blocks', 'relpos', 'cnn'])
def test_unconvertible_models_are_refused(name, kwargs, words):
    with pytest.raises(ConversionError) as info:
        model_vit.create_model(name, **kwargs)
    for word in words:
        assert word in str(info.value)


def test_gated_attention_is_refused_by_name():
    plain = timm.create_model('eva02_tiny_patch14_224', **tiny_kwargs())
    plain.blocks[1].attn.gate = nn.Linear(32, 32)
    with pytest.raises(ConversionError) as info:
        model_eva.make_eva_convertible(plain)
    assert 'blocks.1.attn' in str(info.value) and 'gated attention' in str(info.value)


def test_unconvertible_model_is_evaluated_plain_in_ann():
    """allow_unconvertible=True: the plain timm network (what ann mode evaluates), with the reason
    for_v/snn refuse it; a convertible model comes back converted with no reason."""
    name, kwargs = 'vit_dwee_patch16_reg1_gap_256', tiny_kwargs()
    with pytest.raises(ConversionError) as info:
        model_vit.create_model(name, **kwargs)
    model = model_base.create_model(name, allow_unconvertible=True, **kwargs).eval()
    reason = model_base.unconvertible_reason(model)
    assert reason == str(info.value) and 'DiffAttention' in reason
    # Built afresh: not even the blocks' MLPs, which the refused conversion had swapped, are.
    assert not get_modules(model)
    torch.manual_seed(0)
    plain = timm.create_model(name, **kwargs).eval()
    model.load_state_dict(plain.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(images()), plain(images()), rtol=0, atol=0)
    converted = model_base.create_model('eva02_tiny_patch14_224', allow_unconvertible=True, **tiny_kwargs())
    assert model_base.unconvertible_reason(converted) is None and get_modules(converted)
    with pytest.raises(ConversionError, match='unknown model'):  # a bad name stays an error
        model_base.create_model('not_a_model', allow_unconvertible=True)


def test_model_files_depend_one_way():
    """The families build on model_base and never on each other; model_base names no family."""
    import pathlib
    import re
    root = pathlib.Path(model_base.__file__).parent
    for path in root.glob('model_*.py'):
        imports = set(re.findall(r'^\s*(?:from|import) (model_\w+)', path.read_text(), re.M))
        expected = set() if path.stem == 'model_base' else {'model_base'}
        assert imports == expected, (path.name, imports)
    assert {f.name for f in model_base.families()} >= {'vit', 'eva'}
