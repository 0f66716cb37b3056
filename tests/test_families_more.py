"""BEiT, CaiT, Swin, Swin V2 and ViTs with parallel scaling blocks at tiny size: timm's keys and
logits, where the new modules' places, EC modules and products sit, whole-model SNN outputs
against ``reference.ref_simulate`` per step on every backend and chunking, the energy count of
every new product and linear layer, and the refusals of what is still not converted.

Random weights of trained scale, no download; 16x16 images, two blocks (Swin: two stages of two).
"""
import copy
import math
from functools import partial

import pytest
import timm
import torch
import torch.nn as nn
from timm.models.vision_transformer import ParallelScalingBlock

import model_base
import model_vit
import trans_utils
from helpers import calibrate as calibrated, feeds_that_run, images as pictures, trained_scale_
from reference import ref_simulate
from trans_utils import (AtNeuron, ConversionError, MultiStep, SOPMonitor, TwoSideNeuron, convert_to_snn,
                         exp_comp_neuron, get_modules, reset_net)

pytestmark = pytest.mark.usefixtures('single_thread')

ATTENTION_PLACES = ['fc_qkv', 'q', 'k', 'v', 's', 'fc_out']
MLP_PLACES = ['fc1', 'fc2']
VIT_SIZE = dict(img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2, num_classes=10)
# 8x8 tokens in 4x4 windows (the second block of a stage shifts them by 2), merged to 4x4 tokens
# (one window: no shift there, as timm decides).
SWIN_SIZE = dict(img_size=16, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(2, 4), window_size=4,
                 num_classes=10)
SWIN_PLACES = (ATTENTION_PLACES + MLP_PLACES) * 4 + ['fc1']  # + the patch merging's reduction

# name -> (timm name, kwargs, places of the whole model)
CONFIGS = {
    # BEiT v1: a relative position bias in every block, LayerScale, mean pooling + fc_norm.
    'beit': ('beit_base_patch16_224', dict(VIT_SIZE, init_values=0.1), (ATTENTION_PLACES + MLP_PLACES) * 2),
    # BEiT with one bias shared by all blocks, an absolute position embedding, class-token pooling.
    'beit_shared_bias': ('beit_base_patch16_224', dict(VIT_SIZE, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                                                       use_abs_pos_emb=True, global_pool='token'),
                         (ATTENTION_PLACES + MLP_PLACES) * 2),
    # CaiT: talking-heads blocks, then class-attention blocks (the class token joins there).
    'cait': ('cait_xxs24_224', dict(VIT_SIZE, depth_token_only=2, init_values=0.1),
             (ATTENTION_PLACES + MLP_PLACES) * 4),
    'swin': ('swin_tiny_patch4_window7_224', SWIN_SIZE, SWIN_PLACES),
    # Swin V2: cosine attention (learned logit scale), the position MLP, post-norm blocks.
    'swinv2': ('swinv2_tiny_window8_256', SWIN_SIZE, SWIN_PLACES),
    # ViT-22B-style parallel blocks: one in_proj for qkv and the MLP, RmsNorm, qk norm, pre-norm.
    'vit_parallel_scaling': ('vit_base_patch16_xp_224', dict(VIT_SIZE, init_values=0.5),
                             (ATTENTION_PLACES + ['fc2']) * 2),
    # The same with one output layer on the concatenation, q/k/v and MLP biases in in_proj.
    'vit_parallel_fused_out': ('vit_base_patch16_xp_224',
                               dict(VIT_SIZE, qkv_bias=True,
                                    block_fn=partial(ParallelScalingBlock, fuse_out_proj=True)),
                               (ATTENTION_PLACES + ['fc2']) * 2),
}

T = 8
CHUNKINGS = {'1x8': [8], '8x1': [1] * 8, '3+5': [3, 5]}


def make(config, seed=0):
    """(convertible model, plain timm model) with the same random weights of trained scale."""
    name, kwargs, _ = CONFIGS[config]
    torch.manual_seed(seed)
    # timm starts linear layers small, position tables at zero, BEiT v2's LayerScale at 1e-5 and
    # Swin V2's post-norms at zero (blocks that add nothing): the comparison would be blind to the
    # blocks. Scales of trained weights instead, O(1) logits.
    plain = trained_scale_(timm.create_model(name, pretrained=False, **kwargs).eval())
    with torch.no_grad():
        for param_name, param in plain.named_parameters():
            leaf = param_name.rsplit('.', 1)[-1]
            if leaf == 'relative_position_bias_table':
                param.normal_(0, 0.5)
            elif leaf in ('gamma_1', 'gamma_2', 'gamma') or param_name.endswith(('norm1.weight', 'norm2.weight')):
                param.normal_(1, 0.2)
            elif leaf in ('q_bias', 'v_bias', 'mlp_bias'):
                param.normal_(0, 0.1)
    model = model_vit.create_model(name, **kwargs).eval()
    model.load_state_dict(plain.state_dict(), strict=True)
    return model, plain


def converted(config, levels=8, backend=None):
    model, _ = make(config)
    return convert_to_snn(calibrated(model), linear_num=levels, qkv_num=levels, softmax_num=levels,
                          backend=backend)


def run_in_chunks(model, x, sizes, monitor=None):
    """The head's output of every step, [steps, B, classes], the steps run in chunks of ``sizes``
    through trans_utils.MultiStep (each layer takes a chunk's steps at once, time-major)."""
    reset_net(model)
    if monitor is not None:
        monitor.new_batch()
    outputs, first = [], 0
    with torch.no_grad(), MultiStep(model) as steps:
        for count in sizes:
            steps.chunk(count, last=first + count == sum(sizes))
            if monitor is not None:
                monitor.step, monitor.time_steps = first, count
            outputs.append(model(x).float().unflatten(0, (count, -1)))
            first += count
    if monitor is not None:
        monitor.time_steps = 1
    return torch.cat(outputs)


def relative_error(a, b) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- timm compatibility

@pytest.mark.parametrize('config', CONFIGS)
def test_ann_equals_timm(config):
    model, plain = make(config)
    assert list(model.state_dict()) == list(plain.state_dict())
    x = pictures(3)
    with torch.no_grad():
        want = plain(x)
        assert want.abs().max() > 0.1  # not a comparison between near-zero numbers
        assert relative_error(model(x), want) < 1e-4
        calibrated(model, batches=1)  # for_v: calibrating places are identities too
        assert relative_error(model(x), want) < 1e-4
    places = [m.place for _, m in get_modules(model, (trans_utils.TestNeuron,))]
    assert sorted(places) == sorted(CONFIGS[config][2])


def test_position_terms_and_the_shift_mask_matter():
    """The comparison above is not blind to the position biases or the shifted windows' mask:
    without each, the logits differ."""
    x = pictures()
    for config, drop in (
            ('beit', lambda m: m.blocks[1].attn.relative_position_bias_table.zero_()),
            ('beit_shared_bias', lambda m: m.rel_pos_bias.relative_position_bias_table.zero_()),
            ('swin', lambda m: m.layers[0].blocks[0].attn.relative_position_bias_table.zero_()),
            ('swin', lambda m: setattr(m.layers[0].blocks[1], 'attn_mask', None)),
            ('swinv2', lambda m: m.layers[0].blocks[0].attn.cpb_mlp[2].weight.zero_()),
            ('swinv2', lambda m: m.layers[0].blocks[0].attn.logit_scale.add_(1.0)),
            ('cait', lambda m: m.blocks[0].attn.proj_l.weight.mul_(2)),
            ('cait', lambda m: m.blocks[0].attn.proj_w.weight.mul_(2))):
        model, plain = make(config)
        with torch.no_grad():
            want = plain(x)
            drop(model)
            assert relative_error(model(x), want) > 1e-3, config


def test_time_folded_into_the_batch():
    """Images repeated along the batch (time folded in, as the multi-step engine runs timm's code)
    give each copy the logits of the images alone: windows, masks, biases and class tokens
    broadcast over the first dimension, whatever it holds."""
    for config in CONFIGS:
        model, _ = make(config)
        x = pictures(2)
        with torch.no_grad():
            alone = model(x)
            folded = model(x.repeat(3, 1, 1, 1))
        torch.testing.assert_close(folded, alone.repeat(3, 1), rtol=1e-5, atol=1e-5)


def test_cosine_normalisation_is_timm_normalize():
    """Swin V2's q/k normalisation as an EC-convertible norm: q_norm(x) / sqrt(D) is
    F.normalize(x), zero vectors included, in float32 also under autocast; equal to a weightless
    RMS norm, and registered as a module type that conversion wraps in EC."""
    attn = make('swinv2')[0].layers[0].blocks[0].attn
    x = torch.randn(5, 2, 16, attn.head_dim, generator=torch.Generator().manual_seed(0)) * 3
    x[0, 0, 0] = 0
    normalised = attn.q_norm(x) / math.sqrt(attn.head_dim)
    torch.testing.assert_close(normalised, nn.functional.normalize(x, dim=-1), rtol=1e-6, atol=1e-7)
    assert torch.equal(normalised[0, 0, 0], torch.zeros(attn.head_dim))
    rms = nn.functional.rms_norm(x, (attn.head_dim,), eps=1e-30)
    torch.testing.assert_close(attn.q_norm(x), rms, rtol=1e-5, atol=1e-6)
    assert isinstance(attn.q_norm, trans_utils.EC_MODULE_TYPES)  # registered (register_ec_module)
    assert trans_utils._ec_kind(attn.q_norm) == 'function'  # called on the running means
    assert not list(attn.q_norm.parameters())  # no weights: the state_dict stays timm's
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert attn.q_norm(x.bfloat16()).dtype == torch.float32


class SignedSquare(nn.Module):
    """x·|x|: a nonlinear function of one input that no kernel knows (for the test below)."""

    def forward(self, x):
        return x * x.abs()


def test_a_registered_module_type_is_wrapped_in_ec():
    """trans_utils.register_ec_module: a module type conversion does not know is refused (it would
    stay analog) until registered; then it is wrapped in EC, called as a function on the running
    means, and with analog neurons every step is the ANN (the literal reference)."""
    model, _ = make('beit')
    model.blocks[0].mlp.act = SignedSquare()
    calibrated(model)
    x = pictures(2)
    with torch.no_grad():
        want = model(x)
    with pytest.raises(ValueError, match='unknown EC kind'):
        trans_utils.register_ec_module(SignedSquare, kind='sign')
    if SignedSquare not in trans_utils.EC_MODULE_TYPES:  # a rerun in the same process: registered
        with pytest.raises(ConversionError, match=r'blocks\.0\.mlp\.act \(SignedSquare\)'):
            convert_to_snn(copy.deepcopy(model), backend='eager')
    trans_utils.register_ec_module(SignedSquare)
    convert_to_snn(model, backend='eager')
    act = model.blocks[0].mlp.act
    assert type(act) is exp_comp_neuron and type(act.module) is SignedSquare and act.kind == 'function'
    means = ref_simulate(model, x, 3, analog=True).cumsum(0) / torch.arange(1, 4).view(-1, 1, 1)
    for t in range(3):
        assert relative_error(means[t], want) < 1e-5, t


# ---------------------------------------------------------------- what the conversion makes

def test_snn_structure_of_the_new_modules():
    """After conversion: products are EC products fed by MT neurons; softmax, norms and V2's q/k
    normalisation are EC; position tables and V2's position MLP stay as they are (constants, not
    EC, their ReLU unwrapped); the patch merging's reduction reads an MT neuron; CaiT's talking
    heads' proj_l and proj_w stay linear layers, with the s neuron before proj_w."""
    model = converted('swinv2', backend='eager')
    attn = model.layers[0].blocks[1].attn
    assert type(attn.qk_matmul) is AtNeuron and type(attn.av_matmul) is AtNeuron
    for place in ('place_fc_qkv', 'place_q', 'place_k', 'place_v', 'place_s', 'place_fc_out'):
        assert type(getattr(attn, place)) is TwoSideNeuron, place
    assert type(attn.softmax) is exp_comp_neuron
    assert type(attn.q_norm) is exp_comp_neuron and type(attn.q_norm.module) is model_vit.CosineNormalisation
    assert type(attn.k_norm) is exp_comp_neuron
    assert type(attn.cpb_mlp[1]) is nn.ReLU and type(attn.cpb_mlp[0]) is nn.Linear
    block = model.layers[0].blocks[1]
    assert type(block.norm1) is exp_comp_neuron and type(block.norm2) is exp_comp_neuron
    merge = model.layers[1].downsample
    assert type(merge.place_reduction) is TwoSideNeuron and type(merge.norm) is exp_comp_neuron
    assert not get_modules(model, (trans_utils.MyTestPlace, trans_utils.TestNeuron, trans_utils.MyAt))

    model = converted('cait', backend='eager')
    talking = model.blocks[0].attn
    assert type(talking.proj_l) is nn.Linear and type(talking.proj_w) is nn.Linear
    assert type(talking.place_s) is TwoSideNeuron and type(talking.softmax) is exp_comp_neuron
    cls_attn = model.blocks_token_only[0].attn
    assert type(cls_attn.qk_matmul) is AtNeuron and type(cls_attn.place_q) is TwoSideNeuron

    model = converted('vit_parallel_scaling', backend='eager')
    block = model.blocks[0]
    assert type(block.in_norm) is exp_comp_neuron and type(block.mlp_act) is exp_comp_neuron
    assert type(block.q_norm) is exp_comp_neuron and type(block.place_fc2) is TwoSideNeuron
    assert type(block.qk_matmul) is AtNeuron and type(block.av_matmul) is AtNeuron

    model = converted('beit_shared_bias', backend='eager')
    assert type(model.rel_pos_bias).__name__ == 'RelativePositionBias'  # outside the region
    assert type(model.blocks[0].attn.qk_matmul) is AtNeuron


def test_swin_head_pools_the_mean_and_a_max_pool_is_refused():
    with pytest.raises(ConversionError) as info:
        model_vit.create_model('swin_tiny_patch4_window7_224', **dict(SWIN_SIZE, global_pool='max'))
    assert "global_pool='max'" in str(info.value)


# ---------------------------------------------------------------- SNN against the reference

# The backends of conftest's ``fast`` fixture, with Triton's interpreter marked slow (15-30 s a
# family on an idle 2-core machine, the step-by-step chunking above all: many launches).
BACKENDS = ['native', pytest.param('triton', marks=pytest.mark.slow), 'eager']


@pytest.mark.parametrize('backend', BACKENDS)
@pytest.mark.parametrize('config', CONFIGS)
def test_per_step_outputs_equal_the_reference_on_every_backend(config, backend):
    """Each family, each backend (native, triton in its interpreter, eager), each chunking,
    against the literal step-by-step network: eager to float rounding, native and triton to the
    rounding of their own GELU/softmax/LayerNorm (a spike may flip at an edge)."""
    problem = trans_utils.backend_problem(backend, 'cpu')
    if problem is not None:
        pytest.skip(problem)
    model = converted(config, backend=backend)
    assert {m.backend for m in model.modules() if isinstance(m, trans_utils.StatefulModule)} == {backend}
    x = pictures(2)
    want = ref_simulate(model, x, T)
    assert want.shape == (T, 2, 10)
    runs = {}
    for chunks, sizes in CHUNKINGS.items():
        runs[chunks] = got = run_in_chunks(model, x, sizes)
        assert got.shape == want.shape
        for t in range(T):
            error = relative_error(got[t], want[t])
            assert error < (1e-5 if backend == 'eager' else 1e-4), (chunks, t, error)
    # Not a trivial match: the outputs change from step to step.
    assert relative_error(want[1], want[0]) > 1e-3
    for chunks in CHUNKINGS:  # one backend: every chunking the same numbers, to float rounding
        assert relative_error(runs[chunks], runs['8x1']) < 1e-5, chunks


@pytest.mark.parametrize('config', CONFIGS)
def test_snn_approaches_the_ann(config):
    """The running mean of the outputs approaches the ANN's logits as steps go on."""
    model, _ = make(config)
    calibrated(model)
    x = pictures()
    with torch.no_grad():
        ann = model(x)
    convert_to_snn(model, linear_num=16, qkv_num=16, softmax_num=16, backend='native')
    outputs = run_in_chunks(model, x, [32])
    means = outputs.cumsum(0) / torch.arange(1, 33).view(-1, 1, 1)
    errors = {t: relative_error(means[t - 1], ann) for t in (1, 4, 32)}
    assert errors[32] < 0.5 * errors[4] and errors[32] < errors[1], errors
    assert errors[32] < 0.15, errors


@pytest.mark.parametrize('config', CONFIGS)
def test_with_analog_neurons_every_step_is_the_ann(config):
    """The constants each family adds at every step (BEiT's relative position bias, own or shared,
    LayerScale, q/v biases, Swin's position bias and shift mask, V2's logit scale) enter the
    expectation once: with every MT neuron passing its input on unchanged and the EC modules and
    products literal (reference.ref_simulate, analog=True), the running mean of the outputs is
    timm's logits at every step (ECMT_SPEC 5, 6), not only approached as steps go on. A constant
    accumulated per step, or added both to a product and after it, would miss from step 2 on."""
    model, plain = make(config)
    calibrated(model)
    x = pictures(2)
    with torch.no_grad():
        want = plain(x)
    convert_to_snn(model, backend='eager')
    outputs = ref_simulate(model, x, 4, analog=True)
    means = outputs.cumsum(0) / torch.arange(1, 5).view(-1, 1, 1)
    for t in range(4):
        assert relative_error(means[t], want) < 1e-5, (t, relative_error(means[t], want))


# ---------------------------------------------------------------- energy

@pytest.mark.parametrize('config', CONFIGS)
def test_monitor_counts_every_product_and_linear_layer(config):
    """SOPMonitor counts each EC product (two per attention) and each linear layer at every
    step; the only linear layers it sees nothing of are Swin V2's position MLPs (computed from
    constants, no synaptic operations per step). A product's dense count is its multiply-adds."""
    model = converted(config, backend='native')
    x = pictures(2)
    with SOPMonitor(model) as monitor:
        run_in_chunks(model, x, [3, 5], monitor=monitor)
        sops, dense = monitor.totals()
        names, kinds = monitor.names, monitor.kinds
        rate = monitor.summary()['fire_rate']
    attentions = [m for m in model.modules() if hasattr(m, 'qk_matmul')]
    products = [n for n, k in zip(names, kinds) if k == 'product']
    assert len(products) == 2 * len(attentions) > 0
    linear_names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    assert [n for n, k in zip(names, kinds) if k == 'linear'] == linear_names
    for index, name in enumerate(names):
        assert dense.shape[1] == T
        if '.cpb_mlp.' in name:
            assert dense[index].sum() == 0 and sops[index].sum() == 0, name
        else:
            assert (dense[index] > 0).all(), name
            assert (sops[index] <= (3 if kinds[index] == 'product' else 1) * dense[index]).all(), name
    for name in products:
        assert sops[names.index(name)].sum() > 0, name
    assert all(0 < r < 3 for r in rate)
    # The dense count of q·kᵀ in a window attention: (windows x images x heads) x N x N x head_dim.
    if config.startswith('swin'):
        index = names.index('layers.0.blocks.0.attn.qk_matmul')
        heads, head_dim = 2, SWIN_SIZE['embed_dim'] // 2
        windows, tokens = 4, 16
        assert dense[index, 0].item() == windows * 2 * heads * tokens * tokens * head_dim


# ---------------------------------------------------------------- refusals

@pytest.mark.parametrize('name,kwargs,words', [
    ('xcit_nano_12_p16_224', dict(img_size=32, num_classes=10, depth=1), ['Xcit', 'cross-covariance']),
    ('swinv2_cr_tiny_224', dict(img_size=32, num_classes=10, window_size=4, depths=(1, 1), num_heads=(2, 2),
                                embed_dim=16), ['SwinTransformerV2Cr']),
    ('vit_relpos_small_patch16_224', dict(VIT_SIZE), ['VisionTransformerRelPos']),
], ids=['xcit', 'swinv2_cr', 'relpos'])
def test_what_is_still_refused_is_named(name, kwargs, words):
    with pytest.raises(ConversionError) as info:
        model_base.create_model(name, **kwargs)
    for word in words:
        assert word in str(info.value)
    plain = model_base.create_model(name, allow_unconvertible=True, **kwargs)
    assert model_base.unconvertible_reason(plain) == str(info.value)


def test_families_are_registered_with_calibrated_fc2():
    """The new families calibrate fc2 (the fixed ViT thresholds were set for ViT's MLPs); ViTs
    with parallel blocks keep the ViT default."""
    for config in CONFIGS:
        model, _ = make(config)
        if config.startswith('vit_'):  # a ViT: fc2 reads a GELU output, as in ViT's MLP
            assert model.ecmt_family == 'vit'
            assert model_base.default_fc2_thresholds(model) == model_vit.VIT_FC2_THRESHOLDS
        else:
            assert model.ecmt_family in {'beit', 'cait', 'swin'}
            assert model_base.default_fc2_thresholds(model) is None


@pytest.mark.parametrize('config', CONFIGS)
def test_the_declared_feed_graph_is_the_one_that_runs(config):
    """The monitors look a layer's producer up by name in the graph the convertible modules
    declare (ecmt_feeds): it is the one a run shows (a differential neuron's layer then counts its
    spikes, not its outputs)."""
    model = converted(config, levels=4)
    ran, declared = feeds_that_run(model, pictures(2))
    assert ran == declared
