"""Multi-step simulation (ECMT_SPEC 13): every module takes a chunk of K steps at once, carrying
its state to the next chunk, and every chunking gives the values of the step-by-step order.

Chunkings: 1x8 (one chunk of 8 steps), 8x1 (eight chunks of one step: the step-by-step order) and
3+5. Module by module against the literal references (spikes bit for bit); whole models against
``reference.ref_simulate``, an independent copy of the network run one whole step at a time.
"""
import copy

import pytest
import torch
import torch.nn as nn

import model_vit
import trans_utils
from engine_for_finetuning import chunk_sizes, simulate
from reference import ref_ec, ref_ec_product, ref_mt_neuron, ref_simulate
from test_models import build, calibrate, images
from trans_utils import (AtNeuron, MulNeuron, MultiStep, StatefulModule, TwoSideNeuron, convert_to_snn,
                         exp_comp_neuron, reset_net, set_backend)
from utils import UserError

pytestmark = pytest.mark.usefixtures('single_thread')

T = 8
CHUNKINGS = {'1x8': [8], '8x1': [1] * 8, '3+5': [3, 5]}


def run_chunks(module, step_inputs, sizes):
    """Feed ``module`` the per-step inputs (a list of tuples of tensors) in chunks of ``sizes``,
    time-major, as MultiStep drives it; return the per-step outputs."""
    outputs, first = [], 0
    try:
        for count in sizes:
            module.time_steps, module.keep_state = count, first + count < len(step_inputs)
            chunk = [torch.cat([step[i] for step in step_inputs[first:first + count]])
                     for i in range(len(step_inputs[0]))]
            outputs += list(module(*chunk).chunk(count))
            first += count
    finally:
        module.__dict__.pop('time_steps', None)
        module.__dict__.pop('keep_state', None)
    assert module.steps == 0, 'the module kept state after the last chunk'
    return outputs


def spike_like(shape, steps, seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) * scale * (torch.rand(shape, generator=g) < 0.6)
            + 0.1 * torch.randn(shape, generator=g) for _ in range(steps)]


# ---------------------------------------------------------------- modules

def test_chunk_sizes():
    assert chunk_sizes(8) == [8] and chunk_sizes(8, 3) == [3, 3, 2] and chunk_sizes(8, 1) == [1] * 8
    assert chunk_sizes(8, [3, 5]) == [3, 5] and chunk_sizes(2, 5) == [2]
    for bad in (0, [3, 4], [0, 8], [-1, 9]):
        with pytest.raises(UserError):
            chunk_sizes(8, bad)


@pytest.mark.parametrize('chunks', CHUNKINGS)
@pytest.mark.parametrize('levels', range(1, 9))
def test_neuron_chunks_match_the_reference_bit_for_bit(fast, chunks, levels):
    theta_p, theta_n = 0.3, 0.17
    g = torch.Generator().manual_seed(levels)
    # q of a fused qkv: a permuted view, read where it lies (batch 2 per step).
    qkv = [torch.randn(2, 9, 3, 2, 8, generator=g) * theta_p * 2 ** (levels - 1) for _ in range(T)]
    xs = [t.permute(2, 0, 3, 1, 4)[0] for t in qkv]
    neuron = TwoSideNeuron('q', theta_p, theta_n, levels)
    wanted = ref_mt_neuron(xs, theta_p, theta_n, levels)
    got = run_chunks(neuron, [(x,) for x in xs], CHUNKINGS[chunks])
    for t, (spike, want) in enumerate(zip(got, wanted)):
        assert torch.equal(spike, want), f'step {t + 1}'
    assert neuron.membrane is None and neuron.last_nonzero.shape == (CHUNKINGS[chunks][-1],)
    fired = torch.stack(got)
    assert (fired > 0).any() and (fired < 0).any()


def test_neuron_counts_per_step_are_its_explicit_output(fast):
    neuron = TwoSideNeuron('fc1', 0.2, 0.2, 4)
    xs = spike_like((3, 7, 5), 5, seed=3)
    neuron.time_steps = 5
    try:
        spikes = neuron(torch.cat(xs)).chunk(5)
    finally:
        neuron.__dict__.pop('time_steps')
    assert neuron.last_nonzero.tolist() == [int((s != 0).sum()) for s in spikes]


EC_FUNCTIONS = {
    'gelu': nn.GELU, 'gelu_tanh': lambda: nn.GELU(approximate='tanh'), 'softmax': lambda: nn.Softmax(-1),
    'layernorm': lambda: nn.LayerNorm(16), 'softmax_dim1': lambda: nn.Softmax(dim=1), 'silu': nn.SiLU,
}


@pytest.mark.parametrize('name', EC_FUNCTIONS)
def test_ec_chunkings_agree_exactly_and_with_the_reference(fast, name):
    torch.manual_seed(0)
    f = EC_FUNCTIONS[name]()
    xs = spike_like((2, 5, 16), T, seed=7, scale=2.0)
    results = {chunks: run_chunks(exp_comp_neuron(f), [(x,) for x in xs], sizes)
               for chunks, sizes in CHUNKINGS.items()}
    for chunks, outs in results.items():
        for t, (a, b) in enumerate(zip(outs, results['8x1'])):
            assert torch.equal(a, b), (chunks, t + 1)
    want = ref_ec(copy.deepcopy(f).double(), xs)
    total = 0
    for t, (out, w) in enumerate(zip(results['3+5'], want), start=1):
        torch.testing.assert_close(out.double(), w, rtol=1e-5, atol=4e-6 * t)
        total = total + out.double()
    torch.testing.assert_close(total, T * copy.deepcopy(f).double()(torch.stack(xs).double().mean(0)),
                               rtol=1e-5, atol=2e-5)


@pytest.mark.parametrize('kind', ['matmul', 'mul'])
def test_product_chunkings_agree_exactly_and_with_the_reference(fast, kind):
    g = torch.Generator().manual_seed(11)
    if kind == 'matmul':
        as_ = [torch.randn(2, 3, 5, 4, generator=g) * (torch.rand(2, 3, 5, 4, generator=g) < 0.5) for _ in range(T)]
        bs = [torch.randn(2, 3, 6, 4, generator=g).transpose(-2, -1) for _ in range(T)]  # k transposed
        make, op = AtNeuron, torch.matmul
    else:
        as_ = [torch.randn(2, 5, 6, generator=g) * (torch.rand(2, 5, 6, generator=g) < 0.5) for _ in range(T)]
        bs = [torch.randn(2, 5, 6, generator=g) for _ in range(T)]
        make, op = MulNeuron, torch.mul
    results = {chunks: run_chunks(make(), list(zip(as_, bs)), sizes) for chunks, sizes in CHUNKINGS.items()}
    for chunks, outs in results.items():
        for t, (a, b) in enumerate(zip(outs, results['8x1'])):
            assert torch.equal(a, b), (chunks, t + 1)
    total = 0
    for t, out in enumerate(results['3+5'], start=1):
        total = total + out.double()
        cum_a, cum_b = sum(as_[:t]).double(), sum(bs[:t]).double()
        torch.testing.assert_close(total, op(cum_a, cum_b) / t, rtol=1e-5, atol=1e-5)
    if kind == 'matmul':
        for out, want in zip(results['3+5'], ref_ec_product(as_, bs)):
            torch.testing.assert_close(out.double(), want, rtol=1e-5, atol=1e-5)


def test_mul_neuron_step_by_step_identity_and_reset():
    """Called directly (one step per call): the outputs summed over 1..t equal A_t*B_t/t."""
    g = torch.Generator().manual_seed(5)
    as_ = [torch.randn(3, 4, generator=g) for _ in range(5)]
    bs = [torch.randn(1, 4, generator=g) for _ in range(5)]  # broadcast, as the op allows
    mul = MulNeuron()
    total = 0
    for t, (a, b) in enumerate(zip(as_, bs), start=1):
        total = total + mul(a, b).double()
        torch.testing.assert_close(total, sum(as_[:t]).double() * sum(bs[:t]).double() / t, rtol=1e-6, atol=1e-6)
    assert mul.steps == 5 and mul.cum_a.shape == (3, 4)
    reset_net(nn.ModuleList([mul]))
    assert mul.steps == 0 and mul.cum_a is None and mul.prev_total is None
    assert torch.equal(mul(as_[0], bs[0]), as_[0] * bs[0])


def test_mymul_placeholder_becomes_mul_neuron():
    model = nn.ModuleDict({'gate_mul': trans_utils.MyMul(), 'at': trans_utils.MyAt()})
    a, b = torch.randn(2, 3), torch.randn(2, 3)
    assert torch.equal(model['gate_mul'](a, b), a * b)
    trans_utils.replace_at_by_neuron(model)
    assert type(model['gate_mul']) is MulNeuron and type(model['at']) is AtNeuron
    assert trans_utils.PLACES == ('fc_qkv', 'q', 'k', 'v', 's', 'fc_out', 'fc1', 'gate', 'up', 'fc2')
    for place in ('gate', 'up'):  # calibrated like fc1, with linear_num levels
        assert trans_utils.threshold_config(place, linear_num=5, qkv_num=3) == (5, None)


# ---------------------------------------------------------------- whole models

def converted(config, levels, seed=0):
    model, _ = build(config, seed=seed)
    calibrate(model)
    return convert_to_snn(model, linear_num=levels, qkv_num=levels, softmax_num=levels,
                          fc2_thresholds=model_vit.default_fc2_thresholds(model))


# The eager backend computes what the literal reference computes, operation for operation; equal
# bit for bit wherever timm's own operations give each row the same result whatever the number of
# rows. Mean pooling over tokens (global_pool='avg') does not: measured up to 4.8e-6 (float32).
POOLING_ROUNDING = {'vit_avg_pool': 2e-5}


@pytest.mark.parametrize('levels', range(1, 9))
@pytest.mark.parametrize('config', ['vit_cls_token', 'vit_avg_pool', 'vit_layerscale_qknorm', 'vit_pre_norm',
                                    'eva_giant'])
def test_model_per_step_logits_equal_the_step_by_step_reference(config, levels):
    model = converted(config, levels)
    x = images(3)
    want = ref_simulate(model, x, T)
    assert want.shape == (T, 3, 10)
    with torch.no_grad():
        native = {chunks: simulate(model, x, T, time_chunk=sizes) for chunks, sizes in CHUNKINGS.items()}
        set_backend(model, 'eager')
        eager = {chunks: simulate(model, x, T, time_chunk=sizes) for chunks, sizes in CHUNKINGS.items()}
    tolerance = POOLING_ROUNDING.get(config, 0.0)
    for chunks in CHUNKINGS:
        # Every chunking of one backend gives the same numbers; the step-by-step order included.
        torch.testing.assert_close(native[chunks], native['8x1'], rtol=0, atol=tolerance, msg=chunks)
        torch.testing.assert_close(eager[chunks], eager['8x1'], rtol=0, atol=tolerance, msg=chunks)
        torch.testing.assert_close(eager[chunks], want, rtol=0, atol=tolerance, msg=chunks)
    # The native kernels' GELU/softmax differ from torch's by float rounding (GELU within 5e-7
    # of float64, as the native tests check): measured relative errors 3e-7 to 8e-7.
    relative = ((native['1x8'] - want).norm() / want.norm()).item()
    assert relative < 1e-5, relative


def test_the_input_modules_run_once_per_chunk_and_layers_see_time_major_rows():
    model = converted('vit_cls_token', 8)
    calls, rows = [], {}
    model.patch_embed.register_forward_hook(lambda m, i, o: calls.append(o.shape[0]))
    model.blocks[0].attn.qkv.register_forward_hook(lambda m, i, o: rows.setdefault('qkv', []).append(i[0].shape[0]))
    with torch.no_grad():
        simulate(model, images(3), T, time_chunk=[3, 5])
    assert calls == [3, 3] and rows['qkv'] == [9, 15]


def test_no_module_keeps_state_past_the_last_chunk():
    model = converted('eva_giant', 4)
    stateful = [m for m in model.modules() if isinstance(m, StatefulModule)]

    def state(m):
        return [getattr(m, name) for name in ('_membrane', '_cum', '_prev', 'cum_a', 'cum_b', 'prev_total')
                if getattr(m, name, None) is not None]

    seen = []

    def after(module, inputs, output):
        seen.append((module.keep_state, len(state(module)), module.steps))
    for m in stateful:
        m.register_forward_hook(after)
    with torch.no_grad():
        simulate(model, images(2), T, time_chunk=[3, 5])
    first, last = seen[:len(stateful)], seen[len(stateful):]
    assert all(keep and n and steps == 3 for keep, n, steps in first)   # carried to the next chunk
    assert all(not keep and n == 0 and steps == 0 for keep, n, steps in last)  # freed at once
    assert all(m.time_steps == 1 and m.keep_state for m in stateful)  # back to one step per call
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_thresholds_changed_in_place_after_reset_apply_to_the_next_batch():
    model = converted('vit_cls_token', 4)
    x = images(2)
    with torch.no_grad():
        before = simulate(model, x, 4)
        reset_net(model)
        for m in model.modules():
            if isinstance(m, TwoSideNeuron) and m.place == 'fc1':
                m.scale_p.mul_(1.7)
                m.scale_n.mul_(0.6)
        after = simulate(model, x, 4)
    assert not torch.equal(before, after)
    torch.testing.assert_close(after, ref_simulate(model, x, 4), rtol=1e-5, atol=1e-5)


def test_multistep_refuses_an_input_without_the_time_steps():
    neuron = TwoSideNeuron('fc1', 0.2, 0.2, 4)
    neuron.time_steps = 3
    with pytest.raises(ValueError, match='3 time steps'):
        neuron(torch.randn(4, 5))


def test_backends_are_chosen_once_from_the_table(monkeypatch):
    model = converted('vit_cls_token', 4)
    kinds = {type(m).__name__ + ':' + m.kind: m.backend for m in model.modules() if isinstance(m, StatefulModule)}
    native = trans_utils.native_kernels.library() is not None and trans_utils.fast_neuron_enabled()
    assert kinds['TwoSideNeuron:neuron'] == ('native' if native else kinds['TwoSideNeuron:neuron'])
    assert kinds['AtNeuron:product'] == ('native' if native else 'eager')
    assert trans_utils.choose_backend('softmax', 'cuda') == 'eager'
    assert trans_utils.choose_backend('product', 'cuda') == 'eager'
    assert trans_utils.choose_backend('neuron', 'cuda', 'eager') == 'eager'
    assert trans_utils.choose_backend('gelu', 'cpu', 'compiled') in ('native', 'eager')  # not listed: first available
    set_backend(model, 'eager')
    assert {m.backend for m in model.modules() if isinstance(m, StatefulModule)} == {'eager'}
    # A MultiStep is closed whatever happens inside it.
    with pytest.raises(RuntimeError):
        with MultiStep(model) as steps:
            steps.chunk(2, last=True)
            raise RuntimeError
    assert not any(m._forward_pre_hooks for m in model.modules())


def _eva02_swiglu_norms():
    from model_base import create_model
    torch.manual_seed(0)
    model = create_model('eva02_base_patch14_224', img_size=16, num_classes=10, patch_size=4, embed_dim=32,
                         depth=2, num_heads=2, scale_attn_inner=True).eval()
    calibrate(model)
    return convert_to_snn(model)


@pytest.mark.parametrize('config, pairs, triples, qkv_runs', [
    ('vit_cls_token', {'softmax': 2, 'gelu': 2}, 2, 2),      # softmax -> s, GELU -> fc2, q/k/v, per block
    ('eva_giant', {'softmax': 2, 'gelu': 2}, 2, 2),          # q/v biases added to the fused qkv
    # attention norm -> fc_out, MLP norm -> fc2; separate q/k/v projections: no q/k/v triple
    ('eva02_swiglu_norms', {'softmax': 2, 'layer_norm': 4}, 0, 0),
])
def test_fused_ec_neurons_change_no_number(monkeypatch, config, pairs, triples, qkv_runs):
    """An EC module fused with the MT neuron it feeds, and an attention's q, k and v neurons run
    as one kernel on the qkv output (trans_utils.fuse_ec_neurons, on by default), give the
    per-step logits, every layer's SOPs per step and the spike counts per level of the unfused
    modules, bit for bit, for every chunking (membranes carried between chunks); the fused kernels
    do run."""
    import native_kernels
    model = _eva02_swiglu_norms() if config == 'eva02_swiglu_norms' else converted(config, 8)
    fused = [m for m in model.modules() if isinstance(m, trans_utils.exp_comp_neuron) and m.fused_neuron is not None]
    kinds = {}
    for m in fused:
        kinds[m.kind] = kinds.get(m.kind, 0) + 1
    assert kinds == pairs
    calls, qkv_calls = [], []
    real, real_qkv = native_kernels.ec_mt_steps, native_kernels.qkv_mt_steps
    monkeypatch.setattr(native_kernels, 'ec_mt_steps', lambda kind, *a, **k: calls.append(kind) or real(kind, *a, **k))
    monkeypatch.setattr(native_kernels, 'qkv_mt_steps', lambda *a, **k: qkv_calls.append(1) or real_qkv(*a, **k))
    x = images(3)
    results = {}
    for on in (True, False):
        assert trans_utils.fuse_ec_neurons(model, on) == (sum(pairs.values()) + triples if on else 0)
        for chunks, sizes in CHUNKINGS.items():
            with torch.no_grad(), trans_utils.SOPMonitor(model, count_levels=True) as monitor:
                logits = simulate(model, x, T, time_chunk=sizes, monitor=monitor)
                levels = [n.level_counts.clone() for _, n in monitor.neurons]
                results[on, chunks] = (logits, monitor.sops.clone(), levels)
    chunk_runs = sum(len(s) for s in CHUNKINGS.values())
    assert len(calls) == sum(pairs.values()) * chunk_runs
    assert len(qkv_calls) == qkv_runs * chunk_runs
    want = results[False, '8x1']
    for key, (logits, sops, levels) in results.items():
        assert torch.equal(logits, want[0]) and torch.equal(sops, want[1]), key
        assert all(torch.equal(a, b) for a, b in zip(levels, want[2])), key


def test_a_fused_neuron_refuses_a_tensor_other_than_its_ec_modules_output():
    model = converted('vit_cls_token', 8)
    mlp = model.blocks[0].mlp
    assert mlp.act.fused_neuron is mlp.place_fc2
    mlp.norm = nn.Sequential(nn.Identity(), trans_utils.MyTestPlace('fc2'))  # what lies between changed
    mlp.norm[1].forward = lambda x: x.clone()
    with pytest.raises(RuntimeError, match='fuse_ec_neurons'):
        with torch.no_grad():
            simulate(model, images(2), 2)
    trans_utils.fuse_ec_neurons(model)  # re-fusing sees the new module between: that pair stays apart
    assert mlp.act.fused_neuron is None and model.blocks[1].mlp.act.fused_neuron is not None
    with torch.no_grad():
        simulate(model, images(2), 2)


def test_a_fused_ec_module_called_alone_returns_its_ec_output():
    """Fusion applies inside simulate's multi-step runs only: called directly (the published
    one-step-per-call use of a module), a fused EC module gives its EC output, not spikes."""
    model = converted('vit_cls_token', 8)
    act = model.blocks[0].mlp.act
    assert act.fused_neuron is model.blocks[0].mlp.place_fc2
    x = torch.randn(2, 5, 4)
    with torch.no_grad():
        torch.testing.assert_close(act(x), nn.functional.gelu(x), rtol=1e-6, atol=1e-6)
    assert model.blocks[0].mlp.place_fc2._prefused is None
