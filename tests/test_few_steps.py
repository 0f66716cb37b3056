"""ECMT_SPEC 15 through the modules: per-channel calibration (exact order statistics per channel),
per-channel thresholds and the rounding fire rule in whole converted models on every backend and
chunking against the literal step-by-step reference, the threshold scale, dead channel sides, and
checkpoints of per-channel thresholds. (The kernels alone: tests/test_channel_kernels.py.)"""
import copy

import pytest
import torch

import calibration
import trans_utils
from engine_for_finetuning import simulate
from helpers import CHUNKINGS, MODEL_CONFIGS, build, build_family, images
from monitors import SOPMonitor
from reference import ref_quantiles, ref_simulate
from trans_utils import TestNeuron as CalibratingPlace, TwoSideNeuron, convert_to_snn, replace_test_by_testneuron, set_backend

pytestmark = pytest.mark.usefixtures('single_thread')

T = 8


def calibrated(config, granularity='channel', batches=3, seed=0):
    model, _ = (build if config in MODEL_CONFIGS else build_family)(config, seed=seed)
    replace_test_by_testneuron(model, granularity=granularity)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _ in range(batches):
            model(torch.randn(8, 3, 16, 16, generator=g))
    return model


# ---------------------------------------------------------------- calibration per channel
@pytest.mark.parametrize('shape, threshold', [((4, 9, 6), (6,)), ((2, 3, 7, 5), (3, 1, 5)), ((3, 50), (50,))])
@pytest.mark.parametrize('percent', [0.99, 0.9, 0.5, 1.0])
def test_channel_quantiles_are_each_channels_exact_order_statistics(shape, threshold, percent):
    g = torch.Generator().manual_seed(len(shape) + int(percent * 100))
    x = torch.randn(shape, generator=g) * torch.rand(threshold, generator=g).mul(10).add(0.1)
    q_hi, q_lo = calibration.channel_quantiles(x, percent, threshold)
    assert q_hi.shape == threshold and q_lo.shape == threshold
    broadcast = torch.broadcast_to(torch.arange(q_hi.numel()).reshape(threshold), shape)
    for c in range(q_hi.numel()):
        want_hi, want_lo = ref_quantiles(x[broadcast == c], percent)
        assert q_hi.reshape(-1)[c] == want_hi and q_lo.reshape(-1)[c] == want_lo, c


def test_a_channel_holding_nan_has_no_statistics():
    x = torch.randn(5, 4, 3)
    x[2, 1, 1] = float('nan')
    q_hi, q_lo = calibration.channel_quantiles(x, 0.9, (3,))
    assert torch.isnan(q_hi[1]) and torch.isnan(q_lo[1])
    assert not torch.isnan(q_hi[[0, 2]]).any() and not torch.isnan(q_lo[[0, 2]]).any()


def test_channel_calibration_is_the_mean_of_per_batch_statistics():
    """Per channel: the running mean over batches of each batch's exact statistics (each batch
    weighs the same), for a linear place ([C]) and a head place ([heads, 1, D])."""
    g = torch.Generator().manual_seed(0)
    for place, shape, threshold in (('fc1', (2, 5, 6), (6,)), ('q', (2, 3, 4, 5), (3, 1, 5))):
        neuron = CalibratingPlace(place, 0.9, 'channel')
        batches = [torch.randn(shape, generator=g) for _ in range(3)]
        for x in batches:
            neuron(x)
        stats = [calibration.channel_quantiles(x, 0.9, threshold) for x in batches]
        want_p = sum(s[0].double() for s in stats) / 3
        want_n = -sum(s[1].double() for s in stats) / 3
        assert neuron.scale_p.shape == threshold
        torch.testing.assert_close(neuron.scale_p, want_p.float(), rtol=0, atol=0)
        torch.testing.assert_close(neuron.scale_n, want_n.float(), rtol=0, atol=0)
    with pytest.raises(ValueError, match='granularity'):
        CalibratingPlace('fc1', 0.9, 'pixel')


def test_places_take_the_channel_shapes_of_section_15():
    model = calibrated('vit_cls_token')
    shapes = {n.rsplit('.', 1)[-1]: tuple(m.scale_p.shape) for n, m in model.named_modules()
              if isinstance(m, CalibratingPlace) and n.startswith('blocks.0.')}
    width, heads = 48, 3
    assert shapes == {'place_fc_qkv': (width,), 'place_q': (heads, 1, width // heads),
                      'place_k': (heads, 1, width // heads), 'place_v': (heads, 1, width // heads),
                      'place_s': (1,), 'place_fc_out': (width,), 'place_fc1': (width,), 'place_fc2': (4 * width,)}


def test_per_channel_thresholds_travel_in_a_checkpoint():
    """A for_v state_dict of per-channel thresholds loads into the placeholders of a fresh model
    (they take the checkpoint's shapes) and converts to the same neurons."""
    model = calibrated('eva02_tiny')
    state = copy.deepcopy(model.state_dict())
    fresh, _ = build_family('eva02_tiny', seed=1)
    replace_test_by_testneuron(fresh)  # granularity unknown before loading
    fresh.load_state_dict(state)
    for (name, a), (_, b) in zip(model.named_modules(), fresh.named_modules()):
        if isinstance(a, CalibratingPlace):
            assert torch.equal(a.scale_p, b.scale_p) and torch.equal(a.scale_n, b.scale_n), name


# ---------------------------------------------------------------- conversion
def test_threshold_scale_multiplies_calibrated_thresholds_only():
    model = calibrated('vit_cls_token')
    calibrated_thresholds = {n: (m.scale_p.clone(), m.scale_n.clone()) for n, m in model.named_modules()
                             if isinstance(m, CalibratingPlace)}
    convert_to_snn(model, threshold_scale=1.5, fire_rule='round', fc2_thresholds=(0.25, 0.08), backend='eager')
    for name, neuron in model.named_modules():
        if not isinstance(neuron, TwoSideNeuron):
            continue
        assert neuron.fire_rule == 'round'
        if neuron.place == 's':
            assert neuron.scale_p.tolist() == neuron.scale_n.tolist() == [pytest.approx(0.0125)]
        elif neuron.place == 'fc2':
            assert neuron.scale_p.tolist() == [0.25] and neuron.scale_n.tolist() == [pytest.approx(0.08)]
        else:
            p, n = calibrated_thresholds[name]
            assert torch.equal(neuron.scale_p, p * 1.5) and torch.equal(neuron.scale_n, n * 1.5), name
    with pytest.raises(trans_utils.ConversionError, match='threshold_scale'):
        convert_to_snn(calibrated('vit_cls_token'), threshold_scale=0.0)
    with pytest.raises(trans_utils.ConversionError, match='fire rule'):
        convert_to_snn(calibrated('vit_cls_token'), fire_rule='floor')


def _backends():
    return [b for b in trans_utils.BACKENDS if trans_utils.backend_problem(b, 'cpu') is None]


@pytest.mark.parametrize('coding', ['rate', 'differential'])
@pytest.mark.parametrize('config', ['vit_cls_token', 'eva02_tiny'])
def test_channel_thresholds_and_rounding_equal_the_reference_on_every_backend(config, coding):
    """Per-channel thresholds, the rounding rule and a scale in a whole model (fused q/k/v and EC +
    neuron on native and triton, rotary q/k and a gated MLP for EVA-02), every backend and
    chunking, against the literal step-by-step network (tests/reference.py): eager to the float
    rounding of timm's pooling, native and triton to that of their own EC functions."""
    model = convert_to_snn(calibrated(config), fire_rule='round', threshold_scale=0.8, coding=coding)
    x = images(2)
    want = ref_simulate(model, x, T)
    fired = 0
    with torch.no_grad():
        for backend in _backends():
            set_backend(model, backend)
            for chunks, sizes in CHUNKINGS.items():
                if backend == 'triton' and chunks == '8x1':
                    continue  # the interpreter is slow on many launches; 1x8 and 3+5 carry state both ways
                got = simulate(model, x, T, time_chunk=sizes)
                for t in range(T):
                    error = ((got[t] - want[t]).norm() / want[t].norm()).item()
                    assert error < (1e-5 if backend == 'eager' else 1e-4), (backend, chunks, t, error)
                fired += 1
    assert fired >= 2 * len(_backends()) - 1


def test_dead_channel_sides_never_fire():
    """A channel whose positive (negative) threshold is not positive never emits a positive
    (negative) spike, whatever its input; the other channels fire."""
    neuron = TwoSideNeuron('fc1', torch.tensor([0.2, 0.0, 0.3, -1.0]), torch.tensor([0.2, 0.5, 0.0, 0.4]), 4,
                           fire_rule='round')
    x = torch.randn(6, 5, 4, generator=torch.Generator().manual_seed(3)) * 3
    spikes = torch.stack([neuron(x) for _ in range(4)])
    assert (spikes[..., 1] <= 0).all() and (spikes[..., 3] <= 0).all()  # dead positive sides
    assert (spikes[..., 2] >= 0).all()                                   # dead negative side
    assert (spikes[..., 0] > 0).any() and (spikes[..., 0] < 0).any() and (spikes[..., 1] < 0).any()


def test_level_counts_of_per_channel_neurons_add_up_to_their_spikes():
    model = convert_to_snn(calibrated('vit_cls_token'), fire_rule='round', backend='eager')
    spikes = {}
    for name, module in model.named_modules():
        if isinstance(module, TwoSideNeuron):
            module.register_forward_hook(
                lambda m, i, o, name=name: spikes.__setitem__(name, spikes.get(name, 0) + int((o != 0).sum())))
    with torch.no_grad(), SOPMonitor(model, count_levels=True) as monitor:
        simulate(model, images(2), 4, time_chunk=[4], monitor=monitor)
        records = monitor.level_counts()
    assert records and all(sum(r['positive']) + sum(r['negative']) == spikes[r['neuron']] for r in records)
    assert any('channels' in r for r in records) and sum(spikes.values()) > 0


# ---------------------------------------------------------------- through the command line
def test_cli_records_the_few_step_options_and_snn_runs_what_they_say(tmp_path, monkeypatch):
    """for_v --thresholds channel --fire_rule round --coding differential --threshold_scale 0.8
    writes per-channel thresholds and a record of all four; snn, given none of the flags, converts
    with them (the neurons it simulates have channel thresholds times 0.8 and the rounding rule);
    a contradicting flag is one error naming both values."""
    import run_class_finetuning as cli
    from helpers import cli_run
    record = cli_run(tmp_path, '--test_mode', 'for_v', '--savename', 'few', '--calib_batches', '1',
                     '--thresholds', 'channel', '--fire_rule', 'round', '--coding', 'differential',
                     '--threshold_scale', '0.8')
    saved = torch.load(record['checkpoint'], weights_only=True)
    assert {k: saved['calibration'][k] for k in ('thresholds', 'fire_rule', 'coding', 'threshold_scale')} == \
        {'thresholds': 'channel', 'fire_rule': 'round', 'coding': 'differential', 'threshold_scale': 0.8}
    assert saved['model']['blocks.0.attn.place_q.scale_p'].shape == (2, 1, 16)
    assert saved['model']['blocks.0.mlp.place_fc2.scale_p'].shape == (128,)  # calibrated per channel too
    converted = []
    real = cli.convert_to_snn

    def spy(model, **kwargs):
        converted.append((kwargs, model))
        return real(model, **kwargs)
    monkeypatch.setattr(cli, 'convert_to_snn', spy)
    snn = cli_run(tmp_path, '--test_mode', 'snn', '--model_path', record['checkpoint'], '--test_T', '2',
                  '--no-monitor')
    kwargs, model = converted[0]
    assert (kwargs['fire_rule'], kwargs['threshold_scale'], kwargs['coding']) == ('round', 0.8, 'differential')
    q = model.blocks[0].attn.place_q
    assert q.fire_rule == 'round' and torch.equal(q.scale_p, saved['model']['blocks.0.attn.place_q.scale_p'] * 0.8)
    assert snn['thresholds'] == 'channel' and len(snn['acc1']) == 2
    from utils import UserError
    with pytest.raises(UserError, match='--fire_rule ecmt contradicts .* calibrated for --fire_rule round'):
        cli_run(tmp_path, '--test_mode', 'snn', '--model_path', record['checkpoint'], '--fire_rule', 'ecmt')
