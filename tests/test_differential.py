"""Differential coding (ECMT_SPEC 14, ``--coding differential``): the neuron on every backend and
fused path against the literal reference (outputs y and spikes s bit for bit, in chunkings 1x8,
8x1 and 3+5), the worked example of the spec by hand, the closed form, the energy counts against
a brute-force count, whole models of every family against ``reference.ref_simulate``, and the
checkpoint record / flag checks of the command line."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import model_vit
import trans_utils
from engine_for_finetuning import simulate
from reference import ref_differential_neuron, ref_mt_neuron, ref_simulate
from helpers import CHUNKINGS, FAMILIES, MODEL_CONFIGS, build, build_family, calibrate, images, run_chunks
from trans_utils import (AtNeuron, ECNeuron, MulNeuron, SOPMonitor, TwoSideNeuron, convert_to_snn,
                         exp_comp_neuron, set_backend)

pytestmark = pytest.mark.usefixtures('single_thread')

T = 8
REPO = Path(__file__).resolve().parents[1]


def _runs(neuron, xs, sizes, **call):
    """(outputs, spikes sent, counts per step, estimates before each step) of ``neuron`` fed
    ``xs`` in chunks of ``sizes``."""
    neuron.recording = trans_utils.Recording(counts=True, sent=True)  # as the energy monitor asks
    outputs, sent, counts, before, first = [], [], [], [], 0
    neuron.clock = trans_utils.Chunk()
    try:
        for count in sizes:
            neuron.clock.steps, neuron.clock.last = count, first + count == len(xs)
            out = neuron(torch.cat(xs[first:first + count]), **call)
            outputs += list(out.chunk(count))
            sent += list(neuron.last_record.sent.chunk(count))
            before += list(neuron.last_record.estimates.chunk(count))
            counts += torch.as_tensor(neuron.last_record.nonzero).tolist()
            first += count
    finally:
        neuron.clock = trans_utils.ONE_STEP
    assert neuron.state is None, 'the neuron kept state after the last chunk'
    return outputs, sent, counts, before


def test_worked_example_of_section_14_by_hand(fast):
    """θ = 1, 8 levels, constant input 5: rate spikes 4, 4, 4, 8; differential spikes 4, 2, 0, 0,
    estimates 4, 5, 5, 5, outputs 4, 6, 5, 5 (summing to t times the estimate)."""
    xs = [torch.full((1, 1), 5.0)] * 4
    assert [float(s) for s in ref_mt_neuron(xs, 1.0, 1.0, 8)] == [4, 4, 4, 8]
    outputs, spikes, estimates = ref_differential_neuron(xs, 1.0, 1.0, 8)
    assert [float(s) for s in spikes] == [4, 2, 0, 0]
    assert [float(r) for r in estimates] == [4, 5, 5, 5]
    assert [float(y) for y in outputs] == [4, 6, 5, 5]
    for sizes in ([4], [1] * 4, [1, 3]):
        neuron = TwoSideNeuron('fc1', 1.0, 1.0, 8, coding='differential')
        got, sent, counts, before = _runs(neuron, xs, sizes)
        assert [float(y) for y in got] == [4, 6, 5, 5] and [float(s) for s in sent] == [4, 2, 0, 0]
        assert counts == [1, 1, 0, 0] and [float(r) for r in before] == [0, 4, 5, 5]


@pytest.mark.parametrize('chunks', CHUNKINGS)
@pytest.mark.parametrize('levels', [1, 3, 8])
def test_differential_neuron_matches_the_reference_bit_for_bit(fast, chunks, levels):
    """Outputs y, spikes s, their counts and the estimates, on a permuted view (q of a qkv), both
    sides and a dead side, for every backend and chunking."""
    g = torch.Generator().manual_seed(levels)
    for theta_p, theta_n in ((0.3, 0.17), (0.25, 0.0)):
        qkv = [torch.randn(2, 9, 3, 2, 8, generator=g) * theta_p * 2 ** (levels - 1) for _ in range(T)]
        xs = [t.permute(2, 0, 3, 1, 4)[0] for t in qkv]
        want_y, want_s, want_r = ref_differential_neuron(xs, theta_p, theta_n, levels)
        neuron = TwoSideNeuron('q', theta_p, theta_n, levels, coding='differential')
        got_y, got_s, counts, before = _runs(neuron, xs, CHUNKINGS[chunks])
        for t in range(T):
            assert torch.equal(got_y[t], want_y[t]) and torch.equal(got_s[t], want_s[t]), (theta_n, t + 1)
            assert counts[t] == int((want_s[t] != 0).sum())
            assert torch.equal(before[t], want_r[t - 1] if t else torch.zeros_like(want_r[0]))
        assert (torch.stack(want_s) < 0).any() == (theta_n > 0)


@pytest.mark.parametrize('chunks', ['1x8', '3+5'])
def test_qkv_parts_match_the_reference_bit_for_bit(fast, chunks):
    """Each of the q, k and v neurons reading its part of a fused qkv output in place."""
    g = torch.Generator().manual_seed(4)
    heads, theta = 2, 0.2
    qkv = [torch.randn(2, 5, 3 * heads * 4, generator=g) for _ in range(T)]
    for part in range(3):
        views = [x.view(2, 5, 3, heads, 4).permute(2, 0, 3, 1, 4)[part] for x in qkv]
        want_y, want_s, _ = ref_differential_neuron(views, theta, theta, 4)
        neuron = TwoSideNeuron('qkv'[part], theta, theta, 4, coding='differential')
        got_y, got_s, _, _ = _runs(neuron, qkv, CHUNKINGS[chunks], qkv_part=(part, heads))
        for t in range(T):
            assert torch.equal(got_y[t], want_y[t]) and torch.equal(got_s[t], want_s[t]), (part, t + 1)


@pytest.mark.parametrize('kind', ['gelu', 'softmax', 'layer_norm'])
def test_fused_ec_neuron_equals_the_ec_module_then_the_neuron(fast, kind):
    """ECNeuron (EC kernel and differential neuron in one) against the two modules apart, on the
    same backend: outputs, spikes, counts and estimates bit for bit, every chunking (eager's
    ec_mt_steps, which conversion does not fuse, is the two in turn)."""
    torch.manual_seed(1)
    function = {'gelu': nn.GELU(), 'softmax': nn.Softmax(-1), 'layer_norm': nn.LayerNorm(6)}[kind]
    xs = [torch.randn(2, 5, 6) for _ in range(T)]
    for chunks, sizes in CHUNKINGS.items():
        ec = exp_comp_neuron(function)
        ec_outputs = run_chunks(ec, [(x,) for x in xs], sizes)
        plain = TwoSideNeuron('fc2', 0.1, 0.05, 4, coding='differential')
        want = _runs(plain, ec_outputs, sizes)
        fused = ECNeuron(TwoSideNeuron('fc2', 0.1, 0.05, 4, coding='differential'), function)
        got = _runs(fused, xs, sizes)
        assert got[2] == want[2], chunks
        for a, b in zip(got[0] + got[1] + got[3], want[0] + want[1] + want[3]):
            assert torch.equal(a, b), chunks


def test_first_step_is_the_rate_neuron_and_the_closed_form_holds():
    """At t = 1 the differential neuron is the rate neuron; outputs summed over 1..t equal
    t * r_t (to float rounding: the sum and the product round differently)."""
    g = torch.Generator().manual_seed(9)
    xs = [torch.randn(4, 50, generator=g) + 0.5 for _ in range(T)]
    rate = ref_mt_neuron(xs, 0.2, 0.15, 6)
    outputs, spikes, estimates = ref_differential_neuron(xs, 0.2, 0.15, 6)
    assert torch.equal(outputs[0], rate[0]) and torch.equal(spikes[0], rate[0])
    total = torch.zeros_like(xs[0], dtype=torch.float64)
    for t in range(1, T + 1):
        total += outputs[t - 1].double()
        torch.testing.assert_close(total, t * estimates[t - 1].double(), rtol=1e-6, atol=1e-6)
    # and what it is for: the estimate after T steps is closer to the mean input than the rate
    # neuron's running mean, with fewer spikes from step 2 on
    mean = torch.stack(xs).mean(0)
    rate_mean = torch.stack(rate).mean(0)
    assert (estimates[-1] - mean).abs().mean() < (rate_mean - mean).abs().mean()
    assert sum(int((s != 0).sum()) for s in spikes[1:]) < sum(int((s != 0).sum()) for s in rate[1:])


# ---------------------------------------------------------------- energy

class Toy(nn.Module):
    """Neurons feeding an EC matrix product (q·kᵀ), an EC element-wise product and a linear layer."""

    def __init__(self, coding):
        super().__init__()
        for place, theta in (('q', 0.3), ('k', 0.25), ('gate', 0.2), ('up', 0.35), ('fc1', 0.3)):
            self.add_module(f'place_{place}', TwoSideNeuron(place, theta, theta * 0.8, 4, coding))
        self.qk, self.mul, self.fc = AtNeuron(), MulNeuron(), nn.Linear(6, 5)

    def ecmt_feeds(self):
        """The places feeding each product and the linear layer (trans_utils.feed_graph)."""
        return [('qk', ('place_q', 'place_k')), ('mul', ('place_gate', 'place_up')), ('fc', ('place_fc1',))]

    def forward(self, q, k, g, u, x):
        return (self.qk(self.place_q(q), self.place_k(k).transpose(-2, -1)),
                self.mul(self.place_gate(g), self.place_up(u)), self.fc(self.place_fc1(x)))


def _mask(x):
    return (x != 0).double()


def _brute_force(inputs, coding):
    """Per-step operations of q·kᵀ, the element-wise product and the linear layer, from the
    reference neurons, by products of 0/1 masks (no counting shortcut)."""
    thetas = {'q': 0.3, 'k': 0.25, 'gate': 0.2, 'up': 0.35, 'fc1': 0.3}
    sent, before = {}, {}
    for (place, theta), xs in zip(thetas.items(), inputs):
        if coding == 'differential':
            _, s, r = ref_differential_neuron(xs, theta, theta * 0.8, 4)
            sent[place], before[place] = s, [torch.zeros_like(r[0])] + r[:-1]
        else:
            sent[place] = ref_mt_neuron(xs, theta, theta * 0.8, 4)
    ops = {'qk': [], 'mul': [], 'fc': []}
    cums = {}
    for t in range(T):
        q, k, g, u = (sent[p][t] for p in ('q', 'k', 'gate', 'up'))
        k = k.transpose(-2, -1)
        if coding == 'differential':
            rq, rk, rg, ru = before['q'][t], before['k'][t].transpose(-2, -1), before['gate'][t], before['up'][t]
            ops['qk'].append(float((_mask(q) @ _mask(k)).sum() + (_mask(q) @ _mask(rk)).sum()
                                   + (_mask(rq) @ _mask(k)).sum()))
            ops['mul'].append(float((_mask(g) * _mask(u) + _mask(g) * _mask(ru) + _mask(rg) * _mask(u)).sum()))
        else:  # ECMT_SPEC 8: running sums including this step
            for name, x in (('q', q), ('k', k), ('g', g), ('u', u)):
                cums[name] = x if name not in cums else cums[name] + x
            ops['qk'].append(float((_mask(q) @ _mask(k)).sum() + (_mask(q) @ _mask(cums['k'])).sum()
                                   + (_mask(cums['q']) @ _mask(k)).sum()))
            ops['mul'].append(float((_mask(g) * _mask(u) + _mask(g) * _mask(cums['u'])
                                     + _mask(cums['g']) * _mask(u)).sum()))
        ops['fc'].append(float((sent['fc1'][t] != 0).sum()) * 5)
    levels = torch.zeros(2, 4, dtype=torch.int64)
    for s in sent['fc1']:
        index = torch.round(torch.log2(s.abs() / torch.where(s > 0, 0.3, 0.24))).long()
        for side, chosen in ((0, s > 0), (1, s < 0)):
            levels[side] += torch.bincount(index[chosen], minlength=4)
    return ops, levels


@pytest.mark.parametrize('coding', ['rate', 'differential'])
def test_energy_counts_what_is_transmitted_against_a_brute_force_count(fast, coding):
    """Differential: a linear layer counts nz(s) x out_features, an EC product of two differential
    neurons nz(s_a)nz(s_b) + nz(s_a)nz(r_b) + nz(r_a)nz(s_b), the level counts are of s; rate: the
    section 8 counts as before. Every chunking, the brute-force count from the references."""
    g = torch.Generator().manual_seed(6)
    shapes = [(2, 3, 5, 4), (2, 3, 7, 4), (2, 5, 6), (2, 5, 6), (2, 9, 6)]
    inputs = [[torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) < 0.7) for _ in range(T)]
              for shape in shapes]
    want, want_levels = _brute_force(inputs, coding)
    for chunks, sizes in CHUNKINGS.items():
        model = Toy(coding)
        clock = trans_utils.Chunk()
        for m in model.modules():
            if isinstance(m, trans_utils.StatefulModule):
                m.clock = clock
        with torch.no_grad(), SOPMonitor(model, count_levels=True) as monitor:
            monitor.new_batch()
            first = 0
            for count in sizes:
                clock.steps, clock.last = count, first + count == T
                monitor.step, monitor.time_steps = first, count
                model(*[torch.cat(xs[first:first + count]) for xs in inputs])
                first += count
            sops = monitor.sops
            for name in ('qk', 'mul', 'fc'):
                assert sops[monitor.names.index(name)].tolist() == want[name], (chunks, name)
            fc1 = next(r for r in monitor.level_counts() if r['neuron'] == 'place_fc1')
            assert torch.equal(torch.tensor([fc1['positive'], fc1['negative']]), want_levels), chunks


# ---------------------------------------------------------------- whole models

def differential_family(config, levels=8, seed=0):
    """A tiny calibrated model of ``config`` converted with differential neurons."""
    model, _ = (build if config in MODEL_CONFIGS else build_family)(config, seed=seed)
    calibrate(model)
    return convert_to_snn(model, linear_num=levels, qkv_num=levels, softmax_num=levels,
                          fc2_thresholds=model_vit.default_fc2_thresholds(model), coding='differential')


def _backends(triton):
    return [b for b in trans_utils.BACKENDS
            if trans_utils.backend_problem(b, 'cpu') is None and (triton or b != 'triton')]


# The interpreter is slow: Triton runs four families (a ViT's fused q/k/v and EC paths, EVA-01's
# qkv biases, EVA-02's norms and SwiGLU, attention pooling).
TRITON_FAMILIES = ('vit_cls_token', 'eva_giant', 'eva02_swiglu_norms', 'siglip_map')


@pytest.mark.parametrize('config', FAMILIES)
def test_every_family_in_differential_mode_equals_the_reference(config):
    """Every family, on native and eager (triton on two families), chunkings 1x8 and 3+5, against
    the literal step-by-step network with differential neurons: eager to the rounding of pooling,
    native and triton to that of their own GELU/softmax/LayerNorm."""
    model = differential_family(config, levels=4)
    assert all(m.coding == 'differential' for m in model.modules() if isinstance(m, TwoSideNeuron))
    x = images(2)
    steps = 4
    want = ref_simulate(model, x, steps)
    with torch.no_grad():
        for backend in _backends(triton=config in TRITON_FAMILIES):
            set_backend(model, backend)
            for sizes in ([steps], [1, 3]):
                got = simulate(model, x, steps, time_chunk=sizes)
                for t in range(steps):
                    error = ((got[t] - want[t]).norm() / want[t].norm()).item()
                    assert error < (1e-5 if backend == 'eager' else 1e-4), (backend, sizes, t, error)


@pytest.mark.parametrize('backend', ['native', 'triton'])
def test_fusions_change_no_number_in_differential_mode(backend):
    """Fused (EC + neuron, q/k/v on qkv) against unfused: logits, every layer's operations per
    step and level counts bit for bit; the products count what their neurons sent."""
    problem = trans_utils.backend_problem(backend, 'cpu')
    if problem:
        pytest.skip(problem)
    model = differential_family('vit_cls_token', levels=4)
    set_backend(model, backend)
    x = images(2)
    results = {}
    for on in (True, False):
        trans_utils.fuse_ec_neurons(model, on)
        assert any(isinstance(m, ECNeuron) for m in model.modules()) == on
        for sizes in ([4], [1, 3]):
            with torch.no_grad(), SOPMonitor(model, count_levels=True) as monitor:
                logits = simulate(model, x, 4, time_chunk=sizes, monitor=monitor)
                levels = monitor.level_counts()
                results[on, len(sizes)] = (logits, monitor.sops.clone(), levels)
    want = results[False, 2]
    for key, (logits, sops, levels) in results.items():
        # The head's matrix product on a strided view of [K*B] rows rounds differently for another
        # number of rows (measured 2e-6 here, in rate mode too): logits of another chunking to that.
        assert torch.equal(logits, results[False, key[1]][0]), key
        torch.testing.assert_close(logits, want[0], rtol=0, atol=1e-5, msg=key)
        assert torch.equal(sops, want[1]), key
        assert levels == want[2], key


def test_products_count_the_spikes_not_the_outputs():
    """In a differential model every product's count is the section 14 count of what its neurons
    sent, not the section 8 count on the outputs y (which the module itself makes)."""
    model = differential_family('vit_cls_token', levels=4)
    # The section 8 counts each product makes on its outputs (its record).
    made = {}
    for name, module in model.named_modules():
        if isinstance(module, trans_utils._ECProduct):
            module.register_forward_hook(lambda m, i, o, name=name: made.__setitem__(name, torch.as_tensor(m.last_record.operations, dtype=torch.float64)))
    with torch.no_grad(), SOPMonitor(model) as monitor:
        simulate(model, images(2), 4, time_chunk=[4], monitor=monitor)
        products = [i for i, kind in enumerate(monitor.kinds) if kind == 'product']
        on_outputs = [made[monitor.names[i]] for i in products]
        sent = [monitor.sops[i] for i in products]
    # t = 1: y = s and r = 0, so section 14 counts nz(s_a)nz(s_b) where section 8 (A = a, B = b)
    # counts that three times
    assert len(products) == 4 and all(torch.equal(a[:1], 3 * b[:1]) for a, b in zip(on_outputs, sent))
    assert all(not torch.equal(a[1:], b[1:]) for a, b in zip(on_outputs, sent))


# ---------------------------------------------------------------- the command line

CLI = ['--model', 'vit_tiny_patch16_224', '--model_kwargs', 'patch_size=4', 'embed_dim=32', 'depth=2',
       'num_heads=2', '--input_size', '16', '--nb_classes', '10', '--data_set', 'DIGITS', '--num_workers', '0',
       '--batch_size', '150', '--device', 'cpu', '--no_progress']


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    import timm
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=16, patch_size=4, embed_dim=32,
                              depth=2, num_heads=2)
    path = tmp_path_factory.mktemp('ckpt') / 'tiny.pth'
    torch.save({'model': model.state_dict()}, path)
    return path


def _cli(tmp_path, *extra):
    import run_class_finetuning as cli
    args = cli.get_args_parser().parse_args(CLI + ['--log_dir', str(tmp_path), '--output_dir', str(tmp_path),
                                                   *extra])
    return cli.main(args)


def test_for_v_records_the_coding_and_snn_takes_it(tmp_path, weights):
    record = _cli(tmp_path, '--test_mode', 'for_v', '--model_path', str(weights), '--savename', 'diff',
                  '--coding', 'differential', '--calib_batches', '1')
    saved = torch.load(record['checkpoint'], weights_only=True)
    assert saved['calibration']['coding'] == 'differential'
    snn = _cli(tmp_path, '--test_mode', 'snn', '--model_path', record['checkpoint'], '--test_T', '2')
    assert snn['coding'] == 'differential' and len(snn['energy_ratio']) == 2
    same = _cli(tmp_path, '--test_mode', 'snn', '--model_path', record['checkpoint'], '--test_T', '2',
                '--coding', 'differential')
    assert same['acc1'] == snn['acc1'] and same['energy_ratio'] == snn['energy_ratio']
    published = _cli(tmp_path, '--test_mode', 'for_v', '--model_path', str(weights), '--savename', 'rate',
                     '--calib_batches', '1')
    assert torch.load(published['checkpoint'], weights_only=True)['calibration']['coding'] == 'rate'
    rate = _cli(tmp_path, '--test_mode', 'snn', '--model_path', published['checkpoint'], '--test_T', '2')
    assert rate['coding'] == 'rate'
    assert rate['acc1'][0] == snn['acc1'][0]  # the same thresholds: step 1 is the rate neuron's

    # A --coding that contradicts the record: one line naming both, exit 2.
    result = subprocess.run([sys.executable, str(REPO / 'run_class_finetuning.py'), *CLI, '--test_mode', 'snn',
                             '--model_path', record['checkpoint'], '--coding', 'rate', '--log_dir', str(tmp_path),
                             '--output_dir', str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith('error: --coding rate contradicts') and '--coding differential' in line


def test_for_v_target_T_searches_with_the_differential_neuron(tmp_path, weights, monkeypatch):
    import low_latency
    codings = []
    real = low_latency.convert_to_snn
    monkeypatch.setattr(low_latency, 'convert_to_snn', lambda *a, **k: codings.append(k.get('coding')) or real(*a, **k))
    record = _cli(tmp_path, '--test_mode', 'for_v', '--model_path', str(weights), '--savename', 'fast',
                  '--coding', 'differential', '--target_T', '2', '--search_budget', '10', '--search_images', '150',
                  '--calib_batches', '1')
    assert codings and set(codings) == {'differential'}
    saved = torch.load(record['checkpoint'], weights_only=True)
    assert saved['calibration']['coding'] == 'differential'
    assert saved['low_latency']['conversion']['coding'] == 'differential'


def test_the_command_line_offers_every_coding():
    import low_latency
    import run_class_finetuning
    assert run_class_finetuning.CODINGS == tuple(low_latency.CODINGS)
