"""The energy report (issue 24, docs/energy.md): every operation class against a count by hand on a
one-block model, against brute-force counts from the shapes on one tiny model of each family, the
published energy_ratio unchanged under ``ecmt``, the split summing to the total, the CLI outputs."""
import csv
import json
import math

import pytest
import torch
import torch.nn as nn

import energy
from energy import CLASSES, ENERGY_MODELS, FUNCTION_OPS, SPECIAL_OPS, EnergyMonitor, energy_report
from engine_for_finetuning import simulate
from helpers import build_family as build_tiny_family, calibrate, cli_run, run, snn_images as images, tiny_snn
from trans_utils import AtNeuron, MulNeuron, MyAt, MyMul, SOPMonitor, TwoSideNeuron, exp_comp_neuron

pytestmark = pytest.mark.usefixtures('single_thread', 'eager_neuron')


# ------------------------------------------------------------------------- by hand
class OneBlock(nn.Module):
    """LayerNorm (EC) -> MT neuron -> linear 4->2 -> GELU (EC) -> head 2->3 (analog input)."""

    def __init__(self):
        super().__init__()
        self.norm = exp_comp_neuron(nn.LayerNorm(4))
        self.place = TwoSideNeuron('fc1', 0.5, 0.5, levels=3)
        self.fc = nn.Linear(4, 2)
        self.act = exp_comp_neuron(nn.GELU())
        self.head = nn.Linear(2, 3)

    def ecmt_feeds(self):
        """The place feeds fc (trans_utils.feed_graph); the head's input is analog."""
        return [('fc', ('place',))]

    def forward(self, x):
        return self.head(self.act(self.fc(self.place(self.norm(x)))))


def one_block_run(steps=2):
    """The one-block model on one image [1, 4], ``steps`` steps one at a time; the spikes per step."""
    torch.manual_seed(0)
    model = OneBlock().eval()
    sop = SOPMonitor(model)
    monitor = EnergyMonitor(model, sop)
    spikes = []
    model.place.register_forward_hook(lambda m, i, out: spikes.append(int((out != 0).sum())))
    run(model, sop, [torch.tensor([[1.0, -2.0, 0.5, 3.0]])], steps=steps)
    return model, sop, monitor, spikes


def test_one_block_counts_by_hand():
    model, sop, monitor, spikes = one_block_run()
    assert monitor.names == ['norm', 'place', 'fc', 'act', 'head']
    report = energy_report(monitor, 'fp32')
    counts = report.count_summary()
    assert report.images == 1 and report.steps == 2
    for t, step in enumerate(counts['per_step']):
        # LayerNorm over 4 (1 row): 4 adds, 3 muls per element; 2 muls, 1 add, 1 rsqrt per row;
        # EC bookkeeping 2 adds, 2 muls per element. GELU on 2: 3 muls, 1 add, 1 erf each, + EC.
        assert step['nl_add'] == (4 * 4 + 1 + 2 * 4) + (1 * 2 + 2 * 2)
        assert step['nl_mul'] == (3 * 4 + 2 + 2 * 4) + (3 * 2 + 2 * 2)
        assert step['nl_rsqrt'] == 1 and step['nl_erf'] == 2 and step['nl_exp'] == step['nl_div'] == 0
        # Neuron on 4 elements, 3 levels: an add each, 2*3 compares each, a subtract per spike.
        assert step['neuron_add'] == 4 + spikes[t] and step['neuron_cmp'] == 4 * 2 * 3
        # fc fed by spikes: SOPs; head fed by the GELU's analog output: its SOPs are MACs.
        assert step['sops'] == spikes[t] * 2 + 2 * 3 and step['sops_on_analog_inputs'] == 2 * 3
        assert step['mac'] == 0  # no convolution
        # Weights (and biases) read once per step; states: LayerNorm 2x4, neuron 1x4, GELU 2x2,
        # each read and written; written: LN 4, fc 2, GELU 2, head 3 and one word per spike.
        assert step['mem_weights'] == (4 * 2 + 2) + (2 * 3 + 3)
        assert step['mem_state'] == 2 * (2 * 4 + 4 + 2 * 2)
        assert step['mem_act'] == 4 + 2 + 2 + 3 + spikes[t]
    ann = counts['ann']
    assert ann['dense'] == 4 * 2 + 2 * 3
    assert ann['nl_add'] == 4 * 4 + 1 + 2 and ann['nl_mul'] == 3 * 4 + 2 + 3 * 2 and ann['nl_erf'] == 2
    assert ann['mem_weights'] == 10 + 9 and ann['mem_act'] == 4 + 2 + 2 + 3

    # Prices, fp32: 0.9 pJ per add, 3.7 per mul (Horowitz); specials in adds and muls.
    add, mul = 0.9, 3.7
    for t, step in enumerate(report.per_step()):
        assert step['synaptic'] == pytest.approx(spikes[t] * 2 * add)
        assert step['mac'] == pytest.approx(2 * 3 * (add + mul))
        adds = 4 * 4 + 1 + 2 * 4 + 1 * 2 + 2 * 2 + SPECIAL_OPS['rsqrt']['add'] + 2 * SPECIAL_OPS['erf']['add']
        muls = 3 * 4 + 2 + 2 * 4 + 3 * 2 + 2 * 2 + SPECIAL_OPS['rsqrt']['mul'] + 2 * SPECIAL_OPS['erf']['mul']
        assert step['nonlinear'] == pytest.approx(adds * add + muls * mul)
        assert step['neuron'] == pytest.approx((4 + spikes[t] + 24) * add)
        assert step['memory'] == 0
    assert report.ann_by_class()['mac'] == pytest.approx(14 * (add + mul))
    sop.remove()
    monitor.remove()


def test_one_block_memory_by_size():
    _, sop, monitor, spikes = one_block_run()
    report = energy_report(monitor, 'fp32_memory')
    # fc: 10 float32 words of weights read per step, from a 40-byte memory.
    fc = report.names.index('fc')
    per_bit = energy.sram_pj_per_bit(40)
    assert per_bit == pytest.approx(10.0 * 40 / (8 * 1024) / 64)
    fc_memory = report.snn[fc, :, CLASSES.index('memory')]
    assert fc_memory.tolist() == pytest.approx([10 * 32 * per_bit + 2 * 32 * energy.sram_pj_per_bit(8)] * 2)
    # Quantised to 2 bits (T=2): weights move 2 bits each, from a memory 2/32 the size.
    assert energy.quantised_bits(2) == [2, 8]
    two_bit = report.quantised[2][fc, CLASSES.index('memory')]
    assert float(two_bit) == pytest.approx(10 * 2 * energy.sram_pj_per_bit(40 * 2 / 32)
                                           + 2 * 2 * energy.sram_pj_per_bit(8 * 2 / 32))
    # And its MACs at 2-bit integer energies: 0.03 * 2/8 per add, 0.2 * (2/8)^2 per multiply.
    assert float(report.quantised[2][fc, CLASSES.index('mac')]) == pytest.approx(8 * (0.0075 + 0.0125))
    sop.remove()
    monitor.remove()


def test_sram_energy_by_size_follows_horowitz():
    assert energy.sram_pj_per_bit(8 * 1024) * 64 == pytest.approx(10.0)
    assert energy.sram_pj_per_bit(32 * 1024) * 64 == pytest.approx(20.0)
    assert energy.sram_pj_per_bit(1024 * 1024) * 64 == pytest.approx(100.0)
    assert energy.sram_pj_per_bit(20 * 1024) * 64 == pytest.approx(15.0)
    assert energy.sram_pj_per_bit(64 * 1024 * 1024) * 64 == pytest.approx(100.0)  # held above 1 MB


def test_presets_are_horowitz_pairs():
    mac = {name: model.mac for name, model in ENERGY_MODELS.items()}
    assert mac == pytest.approx({'ecmt': 4.6, 'fp32': 4.6, 'fp16': 1.5, 'int8': 0.23, 'fp32_memory': 4.6})
    assert [ENERGY_MODELS[n].add for n in ('fp32', 'fp16', 'int8')] == [0.9, 0.4, 0.03]
    assert energy.quantised_bits(8) == [4, 8] and energy.quantised_bits(1) == [1, 8]
    assert energy.quantised_bits(255) == [8]


def test_function_table_per_element_and_row():
    ops, name = energy.function_ops('layer_norm', nn.LayerNorm(6), (2, 5, 6))
    assert name == 'layer_norm' and ops == {'add': 4 * 60 + 10, 'mul': 3 * 60 + 2 * 10, 'rsqrt': 10}
    ops, name = energy.function_ops('softmax', nn.Softmax(-1), (3, 4))
    assert ops == {'add': 36, 'exp': 12, 'div': 12}
    assert energy.function_ops('gelu', nn.GELU(approximate='tanh'), (5,))[1] == 'gelu_tanh'
    assert energy.function_ops('function', nn.SiLU(), (5,))[0] == {'exp': 5, 'add': 5, 'div': 5}
    assert energy.function_ops('function', nn.Mish(), (5,)) == ({}, None)  # not in the table


# ------------------------------------------------------------------------- brute force, families
def build_family(family):
    if family == 'vit':
        return tiny_snn()
    from trans_utils import convert_to_snn
    model, _ = build_tiny_family(family)
    return convert_to_snn(calibrate(model))


class Brute:
    """Every class counted the obvious way on a run of one step per call: from each module's
    shapes and outputs, with nothing shared with energy.py but the table of operations per
    function (FUNCTION_OPS, a definition)."""

    def __init__(self, model, sop):
        self.sop, self.counts, self.macs = sop, {}, 0.0
        for module in model.modules():
            if isinstance(module, (nn.Linear, TwoSideNeuron, exp_comp_neuron, AtNeuron, MulNeuron, nn.Conv2d)):
                module.register_forward_hook(self.hook)

    def add(self, key, value):
        key = (key, self.sop.step)
        self.counts[key] = self.counts.get(key, 0.0) + float(value)

    def hook(self, module, args, out):
        if isinstance(module, TwoSideNeuron):
            self.add('neuron_add', out.numel() + (out != 0).sum())
            self.add('neuron_cmp', 2 * module.levels * out.numel())
        elif isinstance(module, exp_comp_neuron):
            x = args[0]
            kind = type(module.module).__name__
            table = {'LayerNorm': 'layer_norm', 'Softmax': 'softmax', 'GELU': 'gelu', 'SiLU': 'silu'}[kind]
            rows = x.numel() // x.shape[-1]
            for op in ('add', 'mul', 'exp', 'div', 'rsqrt', 'erf'):
                n = FUNCTION_OPS[table]['element'].get(op, 0) * x.numel() + FUNCTION_OPS[table]['row'].get(op, 0) * rows
                n += 2 * x.numel() if op in ('add', 'mul') else 0  # A += x, A/t, t f, difference
                self.add(f'nl_{op}', n)
        elif isinstance(module, (AtNeuron, MulNeuron)):
            a, b = args
            self.add('nl_add', a.numel() + b.numel() + out.numel())
            self.add('nl_mul', out.numel())

    def ann_hook(self, module, args, out):
        """The ANN's multiply-accumulates, from the shapes of the unconverted model's layers."""
        if isinstance(module, nn.Linear):
            self.macs += args[0].numel() * module.out_features
        elif isinstance(module, nn.Conv2d):
            self.macs += out.numel() * module.in_channels * math.prod(module.kernel_size)
        elif isinstance(module, MyAt):
            self.macs += out.numel() * args[0].shape[-1]
        elif isinstance(module, MyMul):
            self.macs += out.numel()


FAMILIES = ['vit', 'eva02_tiny', 'eva02_swiglu_norms']


@pytest.mark.parametrize('family', FAMILIES)
def test_every_class_against_brute_force_on_each_family(family):
    steps, batches = 3, [images(3, seed=5), images(2, seed=6)]
    if family != 'vit':
        from helpers import images as family_images
        batches = [family_images(3, seed=5), family_images(2, seed=6)]
    model = build_family(family)
    # The ANN's MACs from the shapes of the same model before conversion.
    if family == 'vit':
        from model_vit import create_model
        torch.manual_seed(0)
        ann_model = create_model('vit_tiny_patch16_224', img_size=16, patch_size=4, embed_dim=32, depth=2,
                                 num_heads=2, num_classes=10).eval()
    else:
        ann_model, _ = build_tiny_family(family)
    brute = Brute(ann_model, SOPMonitor(nn.Identity()))
    for module in ann_model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d, MyAt, MyMul)):
            module.register_forward_hook(brute.ann_hook)
    with torch.no_grad():
        for x in batches:
            ann_model(x)

    # Chunked simulation (all steps at once), counted by the monitors.
    sop = SOPMonitor(model)
    monitor = EnergyMonitor(model, sop)
    with torch.no_grad():
        for x in batches:
            simulate(model, x, steps, monitor=sop)
    sop.remove()
    monitor.remove()
    report = energy_report(monitor, 'fp32')
    n = sum(x.shape[0] for x in batches)
    assert report.images == n
    counts = report.count_summary()
    assert counts['ann']['dense'] + counts['ann']['mac'] == pytest.approx(brute.macs / n, rel=1e-12)

    # One step at a time, counted by brute force.
    step_sop = SOPMonitor(model)
    step_brute = Brute(model, step_sop)
    run(model, step_sop, batches, steps=steps)
    step_sop.remove()
    for t, step in enumerate(counts['per_step']):
        for key in ('neuron_add', 'neuron_cmp', 'nl_add', 'nl_mul', 'nl_exp', 'nl_div', 'nl_rsqrt', 'nl_erf'):
            assert step[key] * n == pytest.approx(step_brute.counts.get((key, t), 0.0), rel=1e-12), (key, t)
    assert any(step['nl_exp'] for step in counts['per_step'])  # softmax was counted
    assert counts['per_step'][0]['mac'] > 0 and counts['per_step'][1]['mac'] == 0  # the patch embedding, once


@pytest.mark.parametrize('sizes', [None, 1, [1, 2]], ids=['3', '1x3', '1+2'])
def test_every_chunking_gives_the_same_report(sizes):
    model = tiny_snn()

    def counted(chunk):
        sop = SOPMonitor(model)
        monitor = EnergyMonitor(model, sop)
        with torch.no_grad():
            for x in (images(3, seed=7), images(2, seed=8)):
                simulate(model, x, 3, time_chunk=chunk, monitor=sop)
        sop.remove()
        monitor.remove()
        return energy_report(monitor, 'fp32_memory').summary(sop.summary()['energy_ratio'])

    assert counted(sizes) == counted(3)


@pytest.mark.parametrize('fast', ['native', 'triton'], indirect=True)
def test_fused_kernels_give_the_eager_report(fast):
    """With the native or Triton kernels the EC modules are fused with the neurons they feed and
    the q, k, v neurons read the qkv output: the same counts as the eager modules, one by one (the
    report counts the converted network, not how a backend fuses it)."""
    import trans_utils

    def counted():
        model = tiny_snn()
        sop = SOPMonitor(model)
        monitor = EnergyMonitor(model, sop)
        with torch.no_grad():
            for x in (images(3, seed=7), images(2, seed=8)):
                simulate(model, x, 3, monitor=sop)
        sop.remove()
        monitor.remove()
        return model, energy_report(monitor, 'fp32_memory').summary(sop.summary()['energy_ratio'])

    model, native = counted()
    assert {m.backend for m in model.modules() if isinstance(m, TwoSideNeuron)} == {fast}
    assert any(isinstance(m, trans_utils.ECNeuron) for m in model.modules())
    previous = trans_utils.set_default_backend('eager')
    try:
        model, eager = counted()
    finally:
        trans_utils.set_default_backend(previous)
    assert {m.backend for m in model.modules() if isinstance(m, TwoSideNeuron)} == {'eager'}
    assert not any(isinstance(m, trans_utils.ECNeuron) for m in model.modules())
    assert native['counts'] == eager['counts']
    for mine, theirs in zip(native['per_step'], eager['per_step']):
        assert mine == pytest.approx(theirs, rel=1e-12)


# ------------------------------------------------------------------------- published ratio, totals
@pytest.fixture(scope='module')
def simulated():
    import trans_utils
    previous = trans_utils.set_default_backend('eager')
    try:
        model = tiny_snn()
        sop = SOPMonitor(model)
        monitor = EnergyMonitor(model, sop)
        with torch.no_grad():
            for x in (images(4, seed=3), images(3, seed=4)):
                simulate(model, x, 4, monitor=sop)
        sop.remove()
        monitor.remove()
    finally:
        trans_utils.set_default_backend(previous)
    return sop, monitor


def test_ecmt_is_the_published_estimate(simulated):
    sop, monitor = simulated
    published = sop.summary()['energy_ratio']
    report = energy_report(monitor, 'ecmt')
    summary = report.summary(published)
    assert summary['ratio'] == published
    assert report.ratio() == pytest.approx(published, rel=1e-12)  # the split gives the same numbers
    for step in summary['per_step']:
        assert step['synaptic'] > 0 and all(step[c] == 0 for c in CLASSES if c != 'synaptic')
    assert summary['ann']['mac'] > 0 and all(summary['ann'][c] == 0 for c in CLASSES if c != 'mac')
    sops, dense = sop.totals()
    assert sum(s['synaptic'] for s in summary['per_step']) == pytest.approx(0.9 * float(sops.sum()) / 7, rel=1e-12)
    assert summary['ann']['mac'] == pytest.approx(4.6 * float(dense[:, 0].sum()) / 7, rel=1e-12)


@pytest.mark.parametrize('model', list(ENERGY_MODELS))
def test_split_sums_to_the_total(simulated, model):
    sop, monitor = simulated
    report = energy_report(monitor, model)
    summary = report.summary(sop.summary()['energy_ratio'])
    assert len(summary['per_step']) == len(summary['ratio']) == 4
    layers = report.layer_records()
    ann_total = sum(summary['ann'].values())
    cumulative = 0.0
    for t, step in enumerate(summary['per_step'], start=1):
        assert list(step) == list(CLASSES)
        by_layer = sum(sum(v.values()) for (name, s), v in layers.items() if s == t)
        assert sum(step.values()) == pytest.approx(by_layer, rel=1e-12)
        cumulative += sum(step.values())
        assert summary['ratio'][t - 1] == pytest.approx(cumulative / ann_total, rel=1e-12)
    for quantised in summary['quantised']:
        total = sum(quantised['ann'].values())
        assert total < ann_total or model == 'int8' and quantised['bits'] == 8
        assert quantised['ratio'][-1] == pytest.approx(cumulative / total, rel=1e-12)
    if model != 'ecmt':
        assert all(summary['per_step'][0][c] > 0 for c in ('synaptic', 'mac', 'nonlinear', 'neuron'))
        assert (summary['per_step'][0]['memory'] > 0) == (model == 'fp32_memory')
    json.dumps(summary)  # plain values


def test_unknown_model_is_refused(simulated):
    with pytest.raises(ValueError, match='unknown energy model'):
        energy_report(simulated[1], 'fp64')


def test_an_ec_module_fused_with_its_neuron_is_counted_as_the_ec_module():
    """An EC module fused with the neuron it feeds (an ECNeuron, its place left to an
    ECPassThrough) is counted at the pass-through, on the EC module's input, as unfused."""
    import trans_utils
    plain = nn.Sequential(exp_comp_neuron(nn.Softmax(dim=-1)), TwoSideNeuron('s', 0.1, 0.1, levels=2))
    fused = nn.Sequential(trans_utils.ECPassThrough(plain[0].module),
                          trans_utils.ECNeuron(plain[1], plain[0].module))
    x = torch.rand(2, 3, 5)
    reports = []
    for model in (plain, fused):
        sop = SOPMonitor(model)
        monitor = EnergyMonitor(model, sop)
        run(model, sop, [x], steps=2)
        reports.append(energy_report(monitor, 'fp32').count_summary())
        sop.remove()
        monitor.remove()
    for key in ('nl_add', 'nl_mul', 'nl_exp', 'nl_div', 'neuron_cmp'):
        assert reports[0]['per_step'][1][key] == reports[1]['per_step'][1][key] > 0, key
    # Written per image, fused or not: the EC output (15 elements) and the spikes.
    spikes = [r['per_step'][1]['neuron_add'] - 15 for r in reports]
    assert reports[0]['per_step'][1]['mem_act'] == 15 + spikes[0]
    assert reports[1]['per_step'][1]['mem_act'] == 15 + spikes[1]


# ------------------------------------------------------------------------- CLI and reports
def test_cli_energy_model_results_csv_and_plot(tmp_path):
    pytest.importorskip('PIL.Image')
    record = cli_run(tmp_path, '--test_mode', 'for_v', '--savename', 'tiny_for_v', '--calib_batches', '1')
    out = {}
    for model in ('ecmt', 'fp32_memory'):
        out[model] = cli_run(tmp_path, '--test_mode', 'snn', '--model_path', record['checkpoint'], '--test_T', '2',
                             '--energy_model', model, '--savename', model, '--plot',
                             '--results', str(tmp_path / f'{model}.json'))
    for model, result in out.items():
        saved = json.loads((tmp_path / f'{model}.json').read_text())
        assert saved['energy']['model'] == model and saved['energy_ratio'] == out['ecmt']['energy_ratio']
        assert len(saved['energy']['per_step']) == 2 and [q['bits'] for q in saved['energy']['quantised']] == [2, 8]
        with open(tmp_path / f'{model}_layers.csv', newline='') as fh:
            rows = list(csv.DictReader(fh))
        assert set(CLASSES) <= set(rows[0])
        for t in (1, 2):
            total = sum(float(r[c]) for r in rows if int(r['step']) == t for c in CLASSES)
            assert total == pytest.approx(sum(saved['energy']['per_step'][t - 1].values()), rel=1e-5)
        assert (tmp_path / f'{model}_energy_split.png').is_file()
    assert out['ecmt']['energy']['ratio'] == out['ecmt']['energy_ratio']
    assert out['fp32_memory']['energy']['per_step'][0]['memory'] > 0


def test_the_command_line_offers_every_energy_model():
    import run_class_finetuning
    from energy import ENERGY_MODELS
    assert run_class_finetuning.ENERGY_MODELS == tuple(ENERGY_MODELS)
