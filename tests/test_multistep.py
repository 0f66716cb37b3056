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
from helpers import CHUNKINGS, FAMILIES, build, calibrate, converted_family, images, run_chunks
from trans_utils import (AtNeuron, MulNeuron, MultiStep, StatefulModule, TwoSideNeuron, convert_to_snn,
                         exp_comp_neuron, reset_net, set_backend)
from utils import UserError

pytestmark = pytest.mark.usefixtures('single_thread')

T = 8


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
    neuron.recording = trans_utils.Recording(counts=True)  # as the energy monitor asks
    wanted = ref_mt_neuron(xs, theta_p, theta_n, levels)
    got = run_chunks(neuron, [(x,) for x in xs], CHUNKINGS[chunks])
    for t, (spike, want) in enumerate(zip(got, wanted)):
        assert torch.equal(spike, want), f'step {t + 1}'
    assert neuron.membrane is None and len(neuron.last_record.nonzero) == CHUNKINGS[chunks][-1]
    fired = torch.stack(got)
    assert (fired > 0).any() and (fired < 0).any()


def test_neuron_counts_per_step_are_in_its_record(fast):
    """A neuron's record holds its per-step non-zero counts only when a monitor asked for them
    (nothing costly or kept past the call otherwise); the step numbers always."""
    neuron = TwoSideNeuron('fc1', 0.2, 0.2, 4)
    xs = spike_like((3, 7, 5), 5, seed=3)
    neuron.clock = trans_utils.Chunk(5, False)
    neuron(torch.cat(xs))
    assert neuron.last_record.nonzero is None and neuron.last_record.levels is None
    assert (neuron.last_record.first_step, neuron.last_record.steps) == (0, 5)
    neuron.reset()
    neuron.recording = trans_utils.Recording(counts=True, levels=True)  # as the energy monitor asks
    spikes = neuron(torch.cat(xs)).chunk(5)
    assert torch.as_tensor(neuron.last_record.nonzero).tolist() == [int((s != 0).sum()) for s in spikes]
    levels = torch.as_tensor(neuron.last_record.levels)
    assert int(levels.sum()) == sum(int((s != 0).sum()) for s in spikes)


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


def _backends(triton=True):
    return [b for b in trans_utils.BACKENDS
            if trans_utils.backend_problem(b, 'cpu') is None and (triton or b != 'triton')]


@pytest.mark.parametrize('config', FAMILIES)
def test_every_family_per_step_logits_equal_the_reference_on_every_backend(config):
    """Every family, every backend (native, triton in its interpreter, eager), every chunking,
    against the literal step-by-step network: eager to float rounding of pooling only, native
    and triton to the rounding of their own GELU/softmax/LayerNorm (spikes may flip at an edge)."""
    model = converted_family(config)
    x = images(2)
    want = ref_simulate(model, x, T)
    with torch.no_grad():
        for backend in _backends():
            set_backend(model, backend)
            for chunks, sizes in CHUNKINGS.items():
                got = simulate(model, x, T, time_chunk=sizes)
                assert got.shape == want.shape
                for t in range(T):
                    error = ((got[t] - want[t]).norm() / want[t].norm()).item()
                    assert error < (1e-5 if backend == 'eager' else 1e-4), (backend, chunks, t, error)


@pytest.mark.parametrize('levels', range(1, 9))
@pytest.mark.parametrize('config', ['vit_cls_token', 'vit_avg_pool', 'vit_layerscale_qknorm', 'vit_pre_norm',
                                    'eva_giant'])
def test_model_per_step_logits_equal_the_step_by_step_reference(config, levels):
    model = converted(config, levels)
    x = images(3)
    want = ref_simulate(model, x, T)
    assert want.shape == (T, 3, 10)
    results = {}
    with torch.no_grad():
        for backend in _backends(triton=levels in (3, 8)):  # the interpreter is slow: two level counts
            set_backend(model, backend)
            results[backend] = {chunks: simulate(model, x, T, time_chunk=sizes) for chunks, sizes in CHUNKINGS.items()}
    tolerance = POOLING_ROUNDING.get(config, 0.0)
    for chunks in CHUNKINGS:
        for backend, runs in results.items():
            # Every chunking of one backend gives the same numbers; the step-by-step order included.
            torch.testing.assert_close(runs[chunks], runs['8x1'], rtol=0, atol=tolerance, msg=(backend, chunks))
        torch.testing.assert_close(results['eager'][chunks], want, rtol=0, atol=tolerance, msg=chunks)
    # The native and Triton kernels' GELU/softmax/LayerNorm differ from torch's by float rounding
    # (GELU within 5e-7 of float64, as the kernel tests check): measured relative errors 3e-7 to 8e-7.
    for backend in set(results) - {'eager'}:
        relative = ((results[backend]['1x8'] - want).norm() / want.norm()).item()
        assert relative < 1e-5, (backend, relative)


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
        return [t for t in (m.state if isinstance(m.state, tuple) else (m.state,)) if t is not None]

    seen = []

    def after(module, inputs, output):
        seen.append((module.clock.last, len(state(module)), module.steps))
    for m in stateful:
        m.register_forward_hook(after)
    with torch.no_grad():
        simulate(model, images(2), T, time_chunk=[3, 5])
    first, last = seen[:len(stateful)], seen[len(stateful):]
    assert all(not end and n and steps == 3 for end, n, steps in first)   # carried to the next chunk
    assert all(end and n == 0 and steps == 0 for end, n, steps in last)  # freed at once
    assert all(m.clock is trans_utils.ONE_STEP for m in stateful)  # back to one step per call
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
    neuron.clock = trans_utils.Chunk(3, False)
    with pytest.raises(ValueError, match='3 time steps'):
        neuron(torch.randn(4, 5))


def test_one_backend_is_chosen_for_the_whole_model_at_conversion():
    model = converted('vit_cls_token', 4)
    backends = {m.backend for m in model.modules() if isinstance(m, StatefulModule)}
    native = trans_utils.backend_problem('native', 'cpu') is None
    assert backends == {'native' if native else 'eager'} and model.ecmt_backend == backends.pop()
    assert trans_utils.resolve_backend('auto', 'cpu') == ('native' if native else 'eager')
    assert trans_utils.resolve_backend('eager', 'cuda') == 'eager'
    with pytest.raises(trans_utils.ConversionError, match='CPU only'):
        trans_utils.resolve_backend('native', 'cuda')
    with pytest.raises(ValueError, match='unknown backend'):
        trans_utils.resolve_backend('compiled', 'cpu')
    set_backend(model, 'eager')
    assert {m.backend for m in model.modules() if isinstance(m, StatefulModule)} == {'eager'}
    assert not any(isinstance(m, (trans_utils.ECNeuron, trans_utils.ECPassThrough)) for m in model.modules())
    # A MultiStep is closed whatever happens inside it.
    with pytest.raises(RuntimeError):
        with MultiStep(model) as steps:
            steps.chunk(2, last=True)
            raise RuntimeError
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_a_native_model_moved_to_another_device_says_what_to_call():
    neuron = TwoSideNeuron('fc1', 0.2, 0.2, 4)
    neuron.backend = 'native'
    with pytest.raises(RuntimeError, match='set_backend'):
        neuron(torch.zeros(2, 3, device='meta'))


@pytest.mark.parametrize('backend', ['native', 'eager'])
def test_no_module_writes_another_modules_state(monkeypatch, backend):
    """Every stateful module's state is its own attribute ``state``, written only by its own
    forward: after a run of chunks that carry state, each module's state object was set by that
    module alone (no module reaches into another one's attributes, as fused modules once did), and
    no module's call changed another module's state tensors in place (the q, k and v neurons, run
    in one pass by the first of them, SharedQKV, read the others' states and leave them as they
    are)."""
    if trans_utils.backend_problem(backend, 'cpu'):
        pytest.skip(trans_utils.backend_problem(backend, 'cpu'))
    model = converted('vit_cls_token', 4)
    set_backend(model, backend)
    writers = {}
    stateful = [m for m in model.modules() if isinstance(m, StatefulModule)]
    original = StatefulModule.__setattr__

    def spy(self, name, value):
        if name == 'state' and value is not None:
            import inspect
            caller = inspect.stack()[1].frame.f_locals.get('self')
            writers.setdefault(id(self), set()).add(id(caller))
        original(self, name, value)

    def contents(skip):  # copies: a kernel writing through a pointer bumps no version counter
        return {(id(m), i): (t, t.clone()) for m in stateful if m is not skip
                for i, t in enumerate(m.state if isinstance(m.state, tuple) else (m.state,)) if t is not None}
    before, changed, calls = {}, [], []

    def pre(module, args, kwargs):
        before[id(module)] = contents(module)

    def post(module, args, kwargs, output):
        calls.append(module)
        changed.extend(key for key, (t, copy) in before.pop(id(module)).items() if not torch.equal(t, copy))
    hooks = [m.register_forward_pre_hook(pre, with_kwargs=True) for m in stateful]
    hooks += [m.register_forward_hook(post, with_kwargs=True) for m in stateful]
    monkeypatch.setattr(StatefulModule, '__setattr__', spy)
    with torch.no_grad():
        simulate(model, images(2), 4, time_chunk=[1, 2, 1])
    monkeypatch.undo()
    for hook in hooks:
        hook.remove()
    assert writers and all(callers == {key} for key, callers in writers.items())
    assert {id(m) for m in stateful} >= set(writers)
    assert len(calls) == 3 * len(stateful) and not changed


def test_qkv_neurons_that_cannot_go_together_run_apart(monkeypatch):
    """Where an attention's q, k and v neurons cannot share one pass (here k has another level
    count, so another table width), SharedQKV lets each run its own chunk on its part: the same
    per-step logits as the model whose q, k and v read the split views, and no joint call."""
    model = converted('vit_cls_token', 4)
    set_backend(model, 'native' if not trans_utils.backend_problem('native', 'cpu') else 'eager')
    attentions = [m for m in model.modules() if hasattr(m, 'fuse_qkv')]
    assert attentions and all(a.fuse_qkv for a in attentions)
    for attention in attentions:
        attention.place_k.levels = 40
    kernels = attentions[0].place_q.kernels.module  # the module its kernels are looked up in
    joint, real = [], kernels.qkv_parts_mt_steps
    monkeypatch.setattr(kernels, 'qkv_parts_mt_steps', lambda *a, **k: joint.append(1) or real(*a, **k))
    x = images(2)
    with torch.no_grad():
        placed = simulate(model, x, 4, time_chunk=[1, 3])
        for attention in attentions:
            attention.fuse_qkv = False
        apart = simulate(model, x, 4, time_chunk=[1, 3])
    assert not joint and torch.equal(placed, apart)


def _eva02_swiglu_norms():
    from model_base import create_model
    torch.manual_seed(0)
    model = create_model('eva02_base_patch14_224', img_size=16, num_classes=10, patch_size=4, embed_dim=32,
                         depth=2, num_heads=2, scale_attn_inner=True).eval()
    calibrate(model)
    return convert_to_snn(model)


@pytest.mark.parametrize('backend', ['native', 'triton'])
@pytest.mark.parametrize('config, pairs, triples', [
    ('vit_cls_token', {'softmax': 2, 'gelu': 2}, 2),      # softmax -> s, GELU -> fc2, q/k/v, per block
    ('eva_giant', {'softmax': 2, 'gelu': 2}, 2),          # q/v biases added to the fused qkv
    # attention norm -> fc_out, MLP norm -> fc2; separate q/k/v projections: no q/k/v triple
    ('eva02_swiglu_norms', {'softmax': 2, 'layer_norm': 4}, 0),
])
def test_fused_ec_neurons_change_no_number(monkeypatch, backend, config, pairs, triples):
    """An EC module fused with the MT neuron it feeds (one ECNeuron in the neuron's place, owning
    both states), and an attention's q, k and v neurons each reading its part of the qkv output in
    place (trans_utils.fuse_ec_neurons, made at conversion), give the per-step logits, every
    layer's SOPs per step and the spike counts per level of the unfused modules, bit for bit, for
    every chunking (states carried between chunks); the fused kernels do run (the q, k and v
    neurons of an attention in one ``qkv_parts_mt_steps`` call, trans_utils.SharedQKV)."""
    problem = trans_utils.backend_problem(backend, 'cpu')
    if problem:
        pytest.skip(problem)
    model = _eva02_swiglu_norms() if config == 'eva02_swiglu_norms' else converted(config, 8)
    set_backend(model, backend)
    fused = [m for m in model.modules() if isinstance(m, trans_utils.ECNeuron)]
    kinds = {}
    for m in fused:
        kinds[m.ec_kind] = kinds.get(m.ec_kind, 0) + 1
    assert kinds == pairs
    assert sum(isinstance(m, trans_utils.ECPassThrough) for m in model.modules()) == sum(pairs.values())
    kernels = trans_utils.kernels_of(backend).module  # the module the backend's kernels are looked up in
    calls, qkv_calls = [], []
    real, real_qkv = kernels.ec_mt_steps, kernels.qkv_parts_mt_steps
    monkeypatch.setattr(kernels, 'ec_mt_steps', lambda kind, *a, **k: calls.append(kind) or real(kind, *a, **k))
    monkeypatch.setattr(kernels, 'qkv_parts_mt_steps', lambda *a, **k: qkv_calls.append(1) or real_qkv(*a, **k))
    x = images(3)
    results = {}
    # The interpreter is slow on many launches: triton takes the chunkings that carry state in two
    # ways (one chunk, 3+5); native takes all three.
    chunkings = {k: v for k, v in CHUNKINGS.items() if backend == 'native' or k != '8x1'}
    for on in (True, False):
        assert trans_utils.fuse_ec_neurons(model, on) == (sum(pairs.values()) + triples if on else 0)
        for chunks, sizes in chunkings.items():
            with torch.no_grad(), trans_utils.SOPMonitor(model, count_levels=True) as monitor:
                logits = simulate(model, x, T, time_chunk=sizes, monitor=monitor)
                levels = monitor.level_counts()
                results[on, chunks] = (logits, monitor.sops.clone(), levels)
    chunk_runs = sum(len(s) for s in chunkings.values())
    assert len(calls) == sum(pairs.values()) * chunk_runs
    assert len(qkv_calls) == triples * chunk_runs  # the q, k and v neurons of an attention in one call
    want = results[False, '1x8']
    for key, (logits, sops, levels) in results.items():
        assert torch.equal(logits, want[0]) and torch.equal(sops, want[1]), key
        assert levels == want[2], key


def test_fusion_is_made_at_conversion_and_undone_by_what_lies_between():
    """Fusion keeps the neuron's name (thresholds are found by it) and the EC function's
    parameter names; refusing it where a module that is not an identity lies between."""
    model = converted('vit_cls_token', 8)
    mlp = model.blocks[0].mlp
    assert isinstance(mlp.place_fc2, trans_utils.ECNeuron) and isinstance(mlp.act, trans_utils.ECPassThrough)
    assert mlp.place_fc2.ec_function is mlp.act.module and mlp.place_fc2.place == 'fc2'
    names = {n for n, m in model.named_modules() if isinstance(m, TwoSideNeuron)}
    assert 'blocks.0.mlp.place_fc2' in names and 'blocks.0.attn.place_s' in names
    x = torch.randn(2, 5, 4)
    torch.testing.assert_close(mlp.act(x), x, rtol=0, atol=0)  # the pass-through
    mlp.drop1 = nn.Sequential(nn.Identity(), nn.Identity())  # no longer an identity module between
    trans_utils.fuse_ec_neurons(model)
    assert type(mlp.place_fc2) is TwoSideNeuron and type(mlp.act) is exp_comp_neuron
    assert isinstance(model.blocks[1].mlp.place_fc2, trans_utils.ECNeuron)
    with torch.no_grad():
        torch.testing.assert_close(simulate(model, images(2), 2), ref_simulate(model, images(2), 2),
                                   rtol=1e-5, atol=1e-5)


def test_an_ec_neuron_called_alone_is_the_ec_module_then_the_neuron():
    torch.manual_seed(3)
    neuron = TwoSideNeuron('fc2', 0.3, 0.2, 4)
    ec = exp_comp_neuron(nn.GELU())
    fused = trans_utils.ECNeuron(neuron, ec.module)
    xs = [torch.randn(2, 5, 6) for _ in range(5)]
    with torch.no_grad():
        got = [fused(x) for x in xs]
        want = [neuron(ec(x)) for x in xs]
    for a, b in zip(got, want):
        assert torch.equal(a, b)


def test_torch_operations_per_batch_on_triton_do_not_grow_with_T():
    """On the triton backend every stateful module loops over the steps inside its kernels (the
    membrane in registers, running sums and differences over time in one pass, step numbers made
    on the device): the torch operations one simulate call dispatches are the same for T = 2 and
    T = 8 (under the interpreter as on a GPU; the per-step accuracy bookkeeping of evaluate_snn is
    not part of simulate). On eager the neuron loops over the steps in Python: they grow."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops += 1
            return func(*args, **(kwargs or {}))

    model = converted_family('eva_giant')
    x = images(2)
    counts = {}
    for backend in _backends():
        set_backend(model, backend)
        for steps in (2, 8):
            with torch.no_grad(), Count() as counter:
                simulate(model, x, steps)
            counts[backend, steps] = counter.ops
    if ('triton', 2) not in counts:
        pytest.skip(trans_utils.backend_problem('triton', 'cpu'))
    assert counts['triton', 8] == counts['triton', 2], counts
    if ('native', 2) in counts:  # the C++ kernels loop over the steps inside too
        assert counts['native', 8] == counts['native', 2], counts
    assert counts['eager', 8] > counts['eager', 2], counts  # the test can tell a loop over steps


def test_a_cpu_record_keeps_no_tensor_past_the_call(fast):
    """On the CPU a record's counts are Python numbers (trans_utils.small_counts): a small tensor
    kept from one layer's call to the next batch would pin the heap between large freed blocks."""
    neuron = TwoSideNeuron('fc1', 0.2, 0.2, 4)
    neuron.recording = trans_utils.Recording(counts=True, levels=True)
    neuron.clock = trans_utils.Chunk(3, False)
    spikes = neuron(torch.cat(spike_like((2, 5), 3, seed=4))).chunk(3)
    record = neuron.last_record
    assert not any(torch.is_tensor(v) for v in record)
    assert list(record.nonzero) == [int((s != 0).sum()) for s in spikes]
    assert sum(map(sum, record.levels)) == sum(record.nonzero)
