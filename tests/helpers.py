"""Helpers the test files share (tests import from here, never from one another): tiny models of
every family, their calibration and conversion, chunked runs, the monitor's protocol, the CLI."""
import timm
import torch
import torch.nn as nn

import model_vit
import trans_utils
from trans_utils import convert_to_snn, replace_test_by_testneuron, reset_net

TINY = dict(img_size=16, patch_size=4, depth=2, num_classes=10)
BLOCK_PLACES = ['fc_qkv', 'q', 'k', 'v', 's', 'fc_out']
MLP_PLACES = ['fc1', 'fc2']
GLU_PLACES = ['fc1', 'gate', 'up', 'fc2']

# ---------------------------------------------------------------- tiny models (test_models.py)
MODEL_CONFIGS = {
    'vit_cls_token': ('vit_tiny_patch16_224', dict(embed_dim=48, num_heads=3)),
    'vit_avg_pool': ('vit_tiny_patch16_224', dict(embed_dim=32, num_heads=2, global_pool='avg',
                                                  fc_norm=True, class_token=False)),
    'vit_layerscale_qknorm': ('vit_tiny_patch16_224', dict(embed_dim=32, num_heads=2, init_values=0.1,
                                                           qk_norm=True)),
    'vit_pre_norm': ('vit_tiny_patch16_224', dict(embed_dim=32, num_heads=2, pre_norm=True)),
    'deit': ('deit_tiny_patch16_224', dict(embed_dim=48, num_heads=3)),
    'eva_giant': ('eva_giant_patch14_224', dict(embed_dim=48, num_heads=3, mlp_ratio=4.0)),
    'eva_g_alias': ('eva_g_patch14', dict(embed_dim=32, num_heads=2, mlp_ratio=6144 / 1408)),
}


def build(config, seed=0):
    """(convertible model, plain timm model) with the same random weights, O(1) logits."""
    name, kwargs = MODEL_CONFIGS[config]
    kwargs = dict(TINY, **kwargs)
    torch.manual_seed(seed)
    plain = timm.create_model(model_vit.resolve_model_name(name)[0], pretrained=False, **kwargs).eval()
    with torch.no_grad():  # timm initialises heads small (EVA: 1e-3); make the logits O(1)
        plain.head.weight.normal_(0, 0.3)
        plain.head.bias.normal_(0, 0.1)
    model = model_vit.create_model(name, **kwargs).eval()
    model.load_state_dict(plain.state_dict(), strict=True)
    return model, plain


def images(n=2, seed=1):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def calibrate(model, batches=3, seed=2):
    replace_test_by_testneuron(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(8, 3, 16, 16, generator=g))
    return model


def calibrate_and_convert(model):
    """Calibrate ``model`` on random images, convert it with 16 levels everywhere, and return a
    fixed input with the ANN's logits on it (taken before the conversion)."""
    calibrate(model)
    x = images()
    with torch.no_grad():
        ann = model(x)
    convert_to_snn(model, linear_num=16, qkv_num=16, softmax_num=16, fc2_thresholds=None)
    return x, ann



# ---------------------------------------------------------------- the newer families (test_families.py)

# name -> (timm name, kwargs, places of the whole model, EC-wrapped modules that must exist)
FAMILY_CONFIGS = {
    # EVA-02 tiny/small: rope, packed SwiGLU (GluMlp), mean pooling + fc_norm.
    'eva02_tiny': ('eva02_tiny_patch14_224', dict(embed_dim=32, num_heads=2),
                   (BLOCK_PLACES + GLU_PLACES) * 2, ['blocks.0.mlp.act', 'fc_norm']),
    # EVA-02 base-style: separate q/k/v, SwiGLU with its norm, the attention's inner norm.
    'eva02_swiglu_norms': ('eva02_base_patch14_224', dict(embed_dim=32, num_heads=2, scale_attn_inner=True),
                           (BLOCK_PLACES + GLU_PLACES) * 2, ['blocks.0.mlp.norm', 'blocks.0.attn.norm']),
    # timm SBB rotary ViT: register token, LayerScale, rope without absolute position embedding.
    'vit_rope_reg': ('vit_medium_patch16_rope_reg1_gap_256', dict(embed_dim=32, num_heads=2, init_values=0.1),
                     (BLOCK_PLACES + MLP_PLACES) * 2, ['blocks.0.mlp.act']),
    # Naver rotary ViT: AttentionRope, mixed (learned, per-block) rope, class token.
    'vit_rope_mixed': ('vit_small_patch16_rope_mixed_224', dict(embed_dim=32, num_heads=2, init_values=0.1),
                       (BLOCK_PLACES + MLP_PLACES) * 2, ['blocks.0.mlp.act']),
    # SigLIP: attention pooling with a latent query and its own MLP.
    'siglip_map': ('vit_base_patch16_siglip_224', dict(embed_dim=32, num_heads=2),
                   (BLOCK_PLACES + MLP_PLACES) * 2 + ['k', 'v'] + MLP_PLACES,
                   ['attn_pool.softmax', 'attn_pool.norm', 'attn_pool.mlp.act']),
    # Perception Encoder: Eva with AttentionRope, a pre-norm and attention pooling.
    'vit_pe_core': ('vit_pe_core_tiny_patch16_384', dict(embed_dim=32, num_heads=2, attn_pool_num_heads=2),
                    (BLOCK_PLACES + MLP_PLACES) * 2 + ['k', 'v'] + MLP_PLACES, ['norm_pre', 'attn_pool.norm']),
    # DeiT distilled: class and distillation tokens, the two heads averaged.
    'deit_distilled': ('deit_tiny_distilled_patch16_224', dict(embed_dim=48, num_heads=3),
                       (BLOCK_PLACES + MLP_PLACES) * 2, ['norm']),
}


@torch.no_grad()
def trained_scale_(model: nn.Module) -> nn.Module:
    """Give ``model``'s linear layers weights of the scale of trained ones (std 1/sqrt(fan-in),
    biases std 0.1), in place, and return it: timm initialises them small (std 0.02; heads
    smaller, GLU gates near zero), so attention would be near uniform and rotary embeddings near
    invisible; with these the logits are O(1)."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            module.weight.normal_(0, module.in_features ** -0.5)
            if module.bias is not None:
                module.bias.normal_(0, 0.1)
    return model


def build_family(config, seed=0):
    """(convertible model, plain timm model) with the same random weights, O(1) logits."""
    name, kwargs, _, _ = FAMILY_CONFIGS[config]
    kwargs = dict(TINY, **kwargs)
    torch.manual_seed(seed)
    plain = trained_scale_(timm.create_model(name, pretrained=False, **kwargs).eval())
    model = model_vit.create_model(name, **kwargs).eval()
    model.load_state_dict(plain.state_dict(), strict=True)
    return model, plain


# ---------------------------------------------------------------- chunked runs (test_multistep.py)
CHUNKINGS = {'1x8': [8], '8x1': [1] * 8, '3+5': [3, 5]}


def run_chunks(module, step_inputs, sizes):
    """Feed ``module`` the per-step inputs (a list of tuples of tensors) in chunks of ``sizes``,
    time-major, as MultiStep drives it; return the per-step outputs."""
    outputs, first = [], 0
    module.clock = trans_utils.Chunk()
    try:
        for count in sizes:
            module.clock.steps, module.clock.last = count, first + count == len(step_inputs)
            chunk = [torch.cat([step[i] for step in step_inputs[first:first + count]])
                     for i in range(len(step_inputs[0]))]
            outputs += list(module(*chunk).chunk(count))
            first += count
    finally:
        module.clock = trans_utils.ONE_STEP
    assert module.steps == 0 and module.state is None, 'the module kept state after the last chunk'
    return outputs


#: Every family the toolkit converts, one tiny model each: class-token ViT, mean-pooled ViT,
#: LayerScale + qk-norm ViT, pre-norm ViT, EVA-01, EVA-02 (GluMlp; SwiGLU + norms), rotary ViTs
#: with registers, attention pooling (SigLIP, PE), distilled DeiT.
FAMILIES = ['vit_cls_token', 'vit_avg_pool', 'vit_layerscale_qknorm', 'vit_pre_norm', 'eva_giant',
            'eva02_tiny', 'eva02_swiglu_norms', 'vit_rope_reg', 'vit_rope_mixed', 'siglip_map', 'vit_pe_core',
            'deit_distilled']


def converted_family(config, levels=8, seed=0, coding='rate'):
    """A tiny calibrated and converted model of ``config`` (:data:`MODEL_CONFIGS` or
    :data:`FAMILY_CONFIGS`), on the default backend."""
    model, _ = (build if config in MODEL_CONFIGS else build_family)(config, seed=seed)
    calibrate(model)
    return convert_to_snn(model, linear_num=levels, qkv_num=levels, softmax_num=levels,
                          fc2_thresholds=model_vit.default_fc2_thresholds(model), coding=coding)



# ---------------------------------------------------------------- the monitor's protocol (test_monitor.py)
def tiny_snn(seed=0):
    """A converted ViT (16x16 images, patch 4, width 32, 2 blocks) with calibrated thresholds."""
    torch.manual_seed(seed)
    model = model_vit.create_model('vit_tiny_patch16_224', img_size=16, patch_size=4, embed_dim=32,
                                   depth=2, num_heads=2, num_classes=10).eval()
    replace_test_by_testneuron(model)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, 16, 16, generator=g))
    return convert_to_snn(model, fc2_thresholds=model_vit.default_fc2_thresholds(model))


def snn_images(n=4, seed=3):
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def run(model, monitor, batches, steps=3):
    """The evaluation loop's protocol: new_batch() per batch, monitor.step before each step."""
    with torch.no_grad():
        for x in batches:
            reset_net(model)
            monitor.new_batch()
            for t in range(steps):
                monitor.step = t
                model(x)
    reset_net(model)



# ---------------------------------------------------------------- the command line
CLI_ARCH = ['--model', 'vit_tiny_patch16_224', '--model_kwargs', 'patch_size=4', 'embed_dim=32', 'depth=2',
            'num_heads=2', '--input_size', '16', '--nb_classes', '10', '--data_set', 'DIGITS',
            '--num_workers', '0', '--batch_size', '150', '--device', 'cpu', '--no_progress']


def cli_run(out, *extra):
    """``run_class_finetuning`` in this process on a tiny random ViT and the bundled DIGITS data,
    logs and outputs in ``out``; returns main()'s record."""
    import run_class_finetuning as cli
    args = cli.get_args_parser().parse_args(CLI_ARCH + ['--log_dir', str(out), '--output_dir', str(out)] + list(extra))
    return cli.main(args)


# ---------------------------------------------------------------- the feed graph, checked on a run
def feeds_that_run(model, x, steps=2):
    """(the producers each linear layer and product receives in a run of ``model`` on ``x``, the
    producers trans_utils.feed_graph declares), both as {consumer: (neuron name or None, ...)},
    consumers fed by no neuron left out. The run's producers are found here, in the tests only, by
    storage and size: an operand that is a whole view of a neuron's output."""
    from engine_for_finetuning import simulate
    names = {m: n for n, m in model.named_modules()}
    outputs, seen, hooks = {}, {}, []

    def neuron_hook(module, args, output):
        outputs[names[module]] = output

    def producer(x):
        for name, out in outputs.items():
            if (torch.is_tensor(x) and x.numel() == out.numel()
                    and x.untyped_storage().data_ptr() == out.untyped_storage().data_ptr()):
                return name
        return None

    def consumer_hook(module, args, output):
        operands = args[:1] if isinstance(module, nn.Linear) else args[:2]
        seen[names[module]] = tuple(producer(x) for x in operands)

    for module in model.modules():
        if isinstance(module, trans_utils.TwoSideNeuron):
            hooks.append(module.register_forward_hook(neuron_hook))
        elif isinstance(module, (nn.Linear, trans_utils._ECProduct)):
            hooks.append(module.register_forward_hook(consumer_hook))
    try:
        with torch.no_grad():
            simulate(model, x, steps)
    finally:
        for hook in hooks:
            hook.remove()
    graph = trans_utils.feed_graph(model)
    ran = {name: producers for name, producers in seen.items() if any(producers)}
    declared = {name: producers for name, producers in graph.items() if any(producers)}
    return ran, declared
