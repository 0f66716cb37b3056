"""The energy monitor (ECMT_SPEC 8): SOP counts against brute force (the masks multiplied out),
the firing-rate and energy formula, and the MT neurons' spike counts per level."""
import math

import pytest
import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

import model_vit
import trans_utils
from helpers import run, snn_images as images, tiny_snn
from trans_utils import AtNeuron, MulNeuron, SOPMonitor, TwoSideNeuron, convert_to_snn, spike_level_counts

pytestmark = pytest.mark.usefixtures('single_thread')

T = 3


def sparse(*shape, density=0.4, seed=0):
    """Random values with about ``density`` of them non-zero."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g)
    return x * (torch.rand(*shape, generator=g) < density)


def mask(x):
    return (x != 0).double()


def brute_product(a, b, cum_a, cum_b):
    """nz(a)·nz(b) + nz(a)·nz(B) + nz(A)·nz(b) by multiplying the non-zero masks out."""
    return float((mask(a) @ mask(b)).sum() + (mask(a) @ mask(cum_b)).sum() + (mask(cum_a) @ mask(b)).sum())


class BruteForce:
    """Hooks that count the same operations the slow, obvious way, per (layer, step)."""

    def __init__(self, model, monitor):
        self.sops, self.dense, self.monitor = {}, {}, monitor
        self.spikes = {}  # neuron -> list of its outputs
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                module.register_forward_hook(self.linear(name))
            elif isinstance(module, AtNeuron):
                module.register_forward_hook(self.product(name))
            elif isinstance(module, TwoSideNeuron):
                module.register_forward_hook(
                    lambda mod, inputs, out, name=name: self.spikes.setdefault(name, []).append(out.clone()))

    def add(self, name, sops, dense):
        key = (name, self.monitor.step)
        self.sops[key] = self.sops.get(key, 0.0) + sops
        self.dense[key] = self.dense.get(key, 0.0) + dense

    def linear(self, name):
        def hook(module, inputs, output):
            x = inputs[0]
            self.add(name, float(mask(x).sum()) * module.out_features, x.numel() * module.out_features)
        return hook

    def product(self, name):
        def hook(module, inputs, output):
            a, b = inputs
            self.add(name, brute_product(a, b, module.cum_a, module.cum_b),
                     (a.double() @ b.double()).numel() * a.shape[-1])
        return hook


# ------------------------------------------------------------------------- SOP counts
def test_linear_counts_on_random_sparse_inputs(fast):
    net = nn.Sequential(nn.Linear(16, 7), nn.Linear(7, 5))
    monitor = SOPMonitor(net)
    assert monitor.names == ['0', '1'] and monitor.kinds == ['linear', 'linear']
    expected = torch.zeros(2, 4, dtype=torch.float64)
    with torch.no_grad():
        for batch in range(2):
            monitor.new_batch()
            for t, density in enumerate((0.0, 0.1, 0.5, 1.0)):
                monitor.step = t
                x = sparse(batch + 2, 3, 16, density=density, seed=10 * batch + t)
                hidden = net[0](x) * (torch.rand(batch + 2, 3, 7) < 0.3)
                net[1](hidden)
                expected[0, t] += (x != 0).sum() * 7
                expected[1, t] += (hidden != 0).sum() * 5
    sops, dense = monitor.totals()
    assert torch.equal(sops, expected)
    assert dense[0].tolist() == [(2 + 3) * 3 * 16 * 7.0] * 4
    assert dense[1].tolist() == [(2 + 3) * 3 * 7 * 5.0] * 4
    monitor.remove()


class Zeroer(nn.Module):
    """Sets the first half of its input to zero in place (after the neuron counted it)."""

    def forward(self, x):
        return x.view(-1)[: x.numel() // 2].zero_() is not None and x


def test_linear_reuses_the_neurons_count_and_recounts_a_modified_input(fast):
    # MT neuron -> linear: the linear's count comes from the neuron's pass; the count must still
    # be right when something modifies the spike in place before the linear reads it.
    for modify in (False, True):
        neuron = TwoSideNeuron('fc1', 0.5, 0.5, 4)
        net = nn.Sequential(neuron, Zeroer() if modify else nn.Identity(), nn.Linear(12, 3))
        monitor = SOPMonitor(net)
        assert neuron._forward_hooks  # the monitor reads each output's per-step counts
        expected = torch.zeros(1, 3, dtype=torch.float64)
        outputs = []
        net[2].register_forward_hook(lambda mod, inputs, out: outputs.append(inputs[0].clone()))
        with torch.no_grad():
            monitor.new_batch()
            for t in range(3):
                monitor.step = t
                net(sparse(5, 12, density=0.7, seed=t))
                expected[0, t] = (outputs[-1] != 0).sum() * 3
        assert all((o[0, :6] == 0).all() for o in outputs) == modify
        assert torch.equal(monitor.totals()[0], expected), modify
        monitor.remove()
        assert not neuron._forward_hooks


@pytest.mark.parametrize('shapes', [((2, 3, 5, 4), (2, 3, 4, 6)), ((2, 3, 5, 4), (3, 4, 6)),
                                    ((7, 4), (4, 9))], ids=['batched', 'broadcast', 'matrix'])
def test_product_counts_on_random_sparse_operands(fast, shapes):
    net = nn.ModuleDict({'at': AtNeuron()})
    monitor = SOPMonitor(net)
    assert monitor.kinds == ['product']
    expected, cum_a, cum_b = [], 0, 0
    with torch.no_grad():
        for t in range(4):
            monitor.step = t
            a = sparse(*shapes[0], density=0.3, seed=2 * t)
            # The right operand as attention passes it: a transposed view, not contiguous.
            *lead, k, n = shapes[1]
            b = sparse(*lead, n, k, density=0.5, seed=2 * t + 1).transpose(-2, -1)
            net['at'](a, b)
            cum_a, cum_b = cum_a + a, cum_b + b
            expected.append(brute_product(a, b, cum_a, cum_b))
    sops, dense = monitor.totals()
    assert sops[0].tolist() == expected
    out = torch.broadcast_shapes(shapes[0][:-2], shapes[1][:-2]) + (shapes[0][-2], shapes[1][-1])
    assert dense[0].tolist() == [float(math.prod(out) * shapes[0][-1])] * 4
    monitor.remove()


@pytest.mark.parametrize('sizes', [[1, 1, 1, 1], [4], [1, 3]], ids=['4x1', '1x4', '1+3'])
def test_mul_counts_against_brute_force_masks(fast, sizes):
    """EC element-wise product (gated MLP): per element and step nz(a)nz(b) + nz(a)nz(B) +
    nz(A)nz(b), against one dense operation per element and step, in any chunking."""
    mul = MulNeuron()
    monitor = SOPMonitor(nn.ModuleDict({'mul': mul}))
    assert monitor.kinds == ['product']
    as_ = [sparse(3, 5, 7, density=0.3, seed=t) for t in range(4)]
    bs = [sparse(3, 5, 7, density=0.6, seed=10 + t) for t in range(4)]
    expected, cum_a, cum_b = [], 0, 0
    for a, b in zip(as_, bs):
        cum_a, cum_b = cum_a + a, cum_b + b
        expected.append(float((mask(a) * mask(b) + mask(a) * mask(cum_b) + mask(cum_a) * mask(b)).sum()))
    first = 0
    mul.clock = trans_utils.Chunk()
    with torch.no_grad():
        for count in sizes:
            mul.clock.steps, mul.clock.last = count, first + count == 4
            monitor.step, monitor.time_steps = first, count
            mul(torch.cat(as_[first:first + count]), torch.cat(bs[first:first + count]))
            first += count
    sops, dense = monitor.totals()
    assert sops[0].tolist() == expected
    assert dense[0].tolist() == [3 * 5 * 7.0] * 4
    monitor.remove()
    assert mul.recording == trans_utils.NO_RECORDING  # what the monitor asked for is released


@pytest.mark.parametrize('sizes', [[T], [1] * T, [1, 2]], ids=['1xT', 'Tx1', '1+2'])
def test_chunked_simulation_counts_what_the_step_by_step_order_counts(fast, sizes):
    """Every SOP and dense count (per layer, per step) and every level count of a simulation in
    chunks equals the brute-force count of the same network run one step at a time."""
    from engine_for_finetuning import simulate
    model = tiny_snn()
    batches = [images(4, seed=3), images(3, seed=4)]
    step_monitor = SOPMonitor(model, count_levels=True)
    brute = BruteForce(model, step_monitor)
    run(model, step_monitor, batches)
    step_levels = step_monitor.level_counts()
    step_monitor.remove()
    for module in model.modules():
        module._forward_hooks.clear()  # the brute-force hooks counted the step-by-step run only
    monitor = SOPMonitor(model, count_levels=True)
    with torch.no_grad():
        for x in batches:
            simulate(model, x, T, time_chunk=sizes, monitor=monitor)
    sops, dense = monitor.totals()
    for i, name in enumerate(monitor.names):
        for t in range(T):
            assert float(sops[i, t]) == brute.sops[name, t], (name, t)
            assert float(dense[i, t]) == brute.dense[name, t], (name, t)
    assert monitor.level_counts() == step_levels
    assert monitor.time_steps == 1  # back to the step-by-step protocol
    monitor.remove()


def test_product_at_first_step_is_three_times_the_plain_count(eager_neuron):
    at = AtNeuron()
    monitor = SOPMonitor(nn.ModuleDict({'at': at}))
    a, b = sparse(3, 4, 5, seed=1), sparse(3, 5, 2, seed=2)
    with torch.no_grad():
        at(a, b)
    assert float(monitor.totals()[0][0, 0]) == 3 * float((mask(a) @ mask(b)).sum())


class OpRecorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.add(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_counts_use_no_matrix_product(eager_neuron):
    at, mul, linear = AtNeuron(), MulNeuron(), nn.Linear(5, 3)
    net = nn.ModuleDict({'at': at, 'linear': linear})
    monitor = SOPMonitor(net)
    a, b = sparse(2, 4, 5, seed=1), sparse(2, 5, 6, seed=2)
    steps = [t.unsqueeze(0) for t in (a, b)]  # one step, time-major
    with torch.no_grad():
        recorder = OpRecorder()
        with recorder:  # the counting alone, as the modules and hooks do it
            at._operations(*steps, *steps)
            mul._operations(steps[0], steps[0], steps[0], steps[0])
            monitor._hook('linear', linear, (a,), None)
    products = {'mm', 'bmm', 'matmul', 'baddbmm', 'addmm', 'addbmm', 'dot', 'einsum', 'linear', 'mv'}
    assert recorder.ops and not recorder.ops & products, recorder.ops


def test_counts_inside_a_tiny_converted_model(fast):
    model = tiny_snn()
    monitor = SOPMonitor(model)
    brute = BruteForce(model, monitor)
    names = [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, AtNeuron))]
    assert monitor.names == names and len(names) == 2 * (4 + 2) + 1  # qkv proj fc1 fc2, 2 products; head
    assert monitor.kinds.count('product') == 4
    run(model, monitor, [images(4, seed=3), images(3, seed=4)])
    sops, dense = monitor.totals()
    assert sops.shape == (len(names), T)
    for i, name in enumerate(names):
        for t in range(T):
            assert float(sops[i, t]) == brute.sops[name, t], (name, t)
            assert float(dense[i, t]) == brute.dense[name, t], (name, t)
    # Spikes are sparse: the rate of a layer fed by MT neurons is below 1, the head's (analog) is 1.
    rates = sops / dense
    assert rates[names.index('blocks.0.mlp.fc2')].max() < 1 and rates[names.index('head')].min() == 1
    monitor.remove()


def test_remove_detaches_every_hook_and_stops_level_counting(eager_neuron):
    model = tiny_snn()
    before = {name: len(m._forward_hooks) for name, m in model.named_modules()}
    monitor = SOPMonitor(model, count_levels=True)
    assert all(n.recording.levels and n.recording.counts for _, n in monitor.neurons)
    monitor.remove()
    assert {name: len(m._forward_hooks) for name, m in model.named_modules()} == before
    assert all(n.recording == trans_utils.NO_RECORDING for _, n in monitor.neurons)
    with pytest.raises(RuntimeError, match='counted nothing'):
        monitor.summary()


# ------------------------------------------------------------------------- the formula
def test_fire_rate_and_energy_over_several_steps():
    net = nn.Sequential(nn.Linear(10, 4), nn.Linear(10, 6))
    monitor = SOPMonitor(net)
    nonzeros = [[3, 10, 0, 7], [1, 2, 9, 10]]  # per batch, per step: non-zeros of a 1x10 input
    with torch.no_grad():
        for batch in nonzeros:
            monitor.new_batch()
            for t, k in enumerate(batch):
                monitor.step = t
                x = torch.zeros(1, 10)
                x[0, :k] = 1.0
                net[0](x)
                net[1](x)
    summary = monitor.summary()
    steps = len(nonzeros[0])
    assert len(summary['fire_rate']) == len(summary['energy_ratio']) == steps
    for t in range(1, steps + 1):
        ops = sum(k * (4 + 6) for batch in nonzeros for k in batch[:t])
        dense = sum(10 * (4 + 6) for batch in nonzeros for _ in batch[:t])
        rate = ops / dense
        assert summary['fire_rate'][t - 1] == pytest.approx(rate, rel=1e-12)
        assert summary['energy_ratio'][t - 1] == pytest.approx(t * (0.9 / 4.6) * rate, rel=1e-12)
    monitor.remove()


def test_summary_and_layer_records_with_a_reduction():
    net = nn.Sequential(nn.Linear(4, 2))
    monitor = SOPMonitor(net)
    with torch.no_grad():
        monitor.step = 0
        net(torch.tensor([[1.0, 0.0, 2.0, 0.0]]))
    twice = lambda t: 2 * t  # noqa: E731 - two identical processes
    assert monitor.summary(reduce=twice)['fire_rate'] == [0.5]
    [record] = monitor.layer_records(reduce=twice)
    assert record == {'layer': '0', 'kind': 'linear', 'step': 1, 'sops': 8.0, 'dense': 16.0, 'fire_rate': 0.5}
    assert float(monitor.sops[0, 0]) == 4.0  # the reduction worked on a copy
    monitor.remove()


# ------------------------------------------------------------------------- levels
def test_spike_level_counts_of_known_spikes(fast):
    theta_p, theta_n = torch.tensor([0.3]), torch.tensor([0.07])
    levels = 5
    counts = torch.tensor([[4, 0, 2, 1, 3], [0, 5, 1, 0, 2]])
    parts = [torch.zeros(12)]
    for j in range(levels):
        parts.append(torch.full((int(counts[0, j]),), float(theta_p * 2 ** j)))
        parts.append(torch.full((int(counts[1, j]),), float(-theta_n * 2 ** j)))
    spike = torch.cat(parts)
    spike = spike[torch.randperm(spike.numel(), generator=torch.Generator().manual_seed(0))].reshape(3, -1)
    assert torch.equal(spike_level_counts(spike, theta_p, theta_n, levels), counts)


def test_level_counts_add_up_to_the_nonzero_spikes(fast):
    model = tiny_snn()
    monitor = SOPMonitor(model, count_levels=True)
    brute = BruteForce(model, monitor)
    run(model, monitor, [images(4, seed=5), images(2, seed=6)])
    records = monitor.level_counts()
    neurons = dict(monitor.neurons)
    assert [r['neuron'] for r in records] == list(neurons) and len(records) == 2 * 8
    for record in records:
        neuron = neurons[record['neuron']]
        spikes = torch.cat([s.reshape(-1) for s in brute.spikes[record['neuron']]])
        assert len(record['positive']) == len(record['negative']) == neuron.levels
        assert sum(record['positive']) + sum(record['negative']) == int((spikes != 0).sum())
        assert sum(record['positive']) == int((spikes > 0).sum())
        for side, sign, theta in (('positive', 1, neuron.scale_p), ('negative', -1, neuron.scale_n)):
            fired = spikes[spikes * sign > 0].abs()
            want = torch.bincount(torch.round(torch.log2(fired / theta)).long(), minlength=neuron.levels)
            assert record[side] == want.tolist(), (record['neuron'], side)
    assert monitor.level_batches_counted == 2
    monitor.remove()


def test_level_counting_stops_after_level_batches(eager_neuron):
    model = tiny_snn()
    monitor = SOPMonitor(model, count_levels=True, level_batches=1)
    brute = BruteForce(model, monitor)
    run(model, monitor, [images(3, seed=7), images(3, seed=8)])
    assert monitor.level_batches_counted == 1
    for record in monitor.level_counts():
        first_batch = torch.cat([s.reshape(-1) for s in brute.spikes[record['neuron']][:T]])
        assert sum(record['positive']) + sum(record['negative']) == int((first_batch != 0).sum())
    # The SOP counts still cover both batches.
    first = monitor.names[0]
    assert float(monitor.totals()[1][0].sum()) == sum(v for (n, _), v in brute.dense.items() if n == first)
    monitor.remove()
    with pytest.raises(ValueError):
        SOPMonitor(model, count_levels=True, level_batches=0)


def test_level_counts_are_off_unless_asked(eager_neuron):
    model = tiny_snn()
    monitor = SOPMonitor(model)
    run(model, monitor, [images(2)], steps=1)
    assert monitor.level_counts() == [] and monitor.level_batches_counted == 0
    assert all(n.last_record.levels is None for _, n in monitor.neurons)  # not even counted
    monitor.remove()


# ------------------------------------------------------------------------- end to end
def test_cli_energy_on_a_model_trained_on_digits_matches_a_literal_count(tmp_path):
    """A tiny ViT fine-tuned on real images (DIGITS), calibrated and simulated through the command
    line: its per-step energy ratio equals an independent count of the same simulation done the
    slow, literal way (one whole step at a time, non-zero masks multiplied out, as the published
    monitor did), and every chunking (--time_chunk) gives the same accuracies and energies."""
    import fintune_model
    import run_class_finetuning as cli
    from datasets import build_dataset

    shape = ['--model', 'vit_tiny_patch16_224', '--model_kwargs', 'patch_size=4', 'embed_dim=32',
             'depth=2', 'num_heads=2', '--input_size', '16', '--nb_classes', '10', '--data_set', 'DIGITS',
             '--device', 'cpu']
    trained = fintune_model.main(fintune_model.get_args_parser().parse_args(
        shape + ['--epochs', '12', '--lr', '5e-3', '--warmup_epochs', '0.5', '--batch_size', '64', '--no-save_every_epoch',
                 '--output_dir', str(tmp_path), '--savename', 'digits']))
    assert trained['best_acc1'] > 50  # it learned something from the images
    common = shape + ['--batch_size', '150', '--num_workers', '0', '--no_progress',
                      '--output_dir', str(tmp_path), '--log_dir', str(tmp_path)]
    calibrated = cli.main(cli.get_args_parser().parse_args(
        common + ['--test_mode', 'for_v', '--model_path', str(tmp_path / 'digits_best.pth'),
                  '--savename', 'digits_for_v']))
    steps = 4
    record = cli.main(cli.get_args_parser().parse_args(
        common + ['--test_mode', 'snn', '--model_path', calibrated['checkpoint'], '--test_T', str(steps)]))
    # One step at a time (the step-by-step order) and chunks of 3 (3 + 1): the same accuracy after
    # every step and the same energy, to the last bit.
    for chunk in ('1', '3'):
        chunked = cli.main(cli.get_args_parser().parse_args(
            common + ['--test_mode', 'snn', '--model_path', calibrated['checkpoint'], '--test_T', str(steps),
                      '--time_chunk', chunk, '--savename', f'chunk{chunk}']))
        for key in ('acc1', 'acc5', 'energy_ratio', 'fire_rate'):
            assert chunked[key] == record[key], (chunk, key)

    # The same SNN, rebuilt from the same files, counted literally on the same images.
    args = cli.get_args_parser().parse_args(common + ['--test_mode', 'snn', '--model_path',
                                                      calibrated['checkpoint']])
    model = cli.build_model(args).eval()
    convert_to_snn(model, fc2_thresholds=model_vit.default_fc2_thresholds(model))
    monitor = SOPMonitor(model)  # only for its step counter; the brute force does the counting
    brute = BruteForce(model, monitor)
    dataset, _ = build_dataset(False, args)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    run(model, monitor, images.split(150), steps=steps)
    monitor.remove()
    sops = [sum(v for (name, t), v in brute.sops.items() if t == step) for step in range(steps)]
    dense = [sum(v for (name, t), v in brute.dense.items() if t == step) for step in range(steps)]
    for t in range(1, steps + 1):
        literal = t * 0.9 / 4.6 * sum(sops[:t]) / sum(dense[:t])
        assert record['energy_ratio'][t - 1] == pytest.approx(literal, rel=1e-9), t
    # The accuracy after every step, from the independent step-by-step reference network.
    from reference import ref_simulate
    targets = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    logits = torch.cat([ref_simulate(model, batch, steps) for batch in images.split(150)], dim=1)
    for t in range(steps):
        correct = (logits[:t + 1].sum(0).argmax(-1) == targets).sum().item()
        assert record['acc1'][t] == pytest.approx(100.0 * correct / len(targets), abs=1e-9), t
    assert 0 < record['energy_ratio'][-1] < 1
