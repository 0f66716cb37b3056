"""Low-latency calibration (``for_v --target_T``, low_latency.py): thresholds chosen for T steps on
calibration images only; the recorded percent and scales reproduce the SNN; the objective never
increases; bad settings are refused; without --target_T the published calibration is unchanged."""
import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from torch.utils.data import DataLoader, Subset, TensorDataset

import low_latency
import run_class_finetuning as cli
from datasets import build_dataset
from engine_for_finetuning import evaluate, evaluate_snn, simulate
import trans_utils
from trans_utils import convert_to_snn, get_modules

CALIBRATING = (trans_utils.TestNeuron,)  # not imported by name: pytest would try to collect it
from utils import UserError

REPO = Path(__file__).resolve().parents[1]
ARCH = ['--model_kwargs', 'patch_size=4', 'embed_dim=32', 'depth=2', 'num_heads=2']
COMMON = ['--model', 'vit_tiny_patch16_224', *ARCH, '--input_size', '16', '--nb_classes', '10',
          '--data_set', 'DIGITS', '--num_workers', '0', '--batch_size', '150', '--device', 'cpu',
          '--no_progress']
CPU = torch.device('cpu')
FC2 = (0.25, 0.08)  # the ViT default of the command line
# The search as it was before its global-scale stage (the old default percents, no global scales):
# the tests of the per-kind and per-place stages pin its behaviour.
LEGACY = dict(percents=(0.999, 0.995, 0.99, 0.98, 0.95, 0.9, 0.85, 0.8), scales=())


pytestmark = pytest.mark.usefixtures('single_thread')


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=16, patch_size=4,
                              embed_dim=32, depth=2, num_heads=2)
    path = tmp_path_factory.mktemp('ckpt') / 'tiny.pth'
    torch.save({'model': model.state_dict()}, path)
    return path


def parse(*extra):
    return cli.get_args_parser().parse_args(COMMON + list(extra))


def calibrating_model(weights):
    return cli.build_model(parse('--test_mode', 'for_v', '--model_path', str(weights))).eval()


def digits_loader(train: bool, count: int, batch_size: int = 75) -> DataLoader:
    data, _ = build_dataset(train, parse())
    return DataLoader(Subset(data, range(count)), batch_size=batch_size)


def thresholds(model):
    return {name: torch.cat([m.scale_p, m.scale_n]).clone() for name, m in get_modules(model, CALIBRATING)}


def run(tmp_path, *extra):
    return cli.main(parse('--log_dir', str(tmp_path), '--output_dir', str(tmp_path), *extra))


def step_logits(snn, images, T):
    with torch.no_grad():
        return simulate(snn, images, T)


@pytest.fixture(scope='module')
def search(weights):
    """One search for T=2 on 150 training images (budget 40: the per-kind stage reaches every kind):
    (calibrated model, record)."""
    model = calibrating_model(weights)
    record = low_latency.choose_thresholds(model, digits_loader(True, 150), 2, CPU, budget=40,
                                           search_images=150, conversion={'fc2_thresholds': FC2},
                                           log=lambda line: None)
    return model, record


def test_api_search_never_reads_the_evaluation_set(weights):
    """Through the API (an ANN pass over evaluation images, then the search on calibration images):
    changing the evaluation images leaves every threshold where it was; changing the calibration
    images moves them (so the comparison can fail)."""
    calib = digits_loader(True, 150)
    evaluation = digits_loader(False, 150)
    images = torch.stack([x for x, _ in evaluation.dataset])
    labels = torch.tensor([y for _, y in evaluation.dataset])
    noisy = DataLoader(TensorDataset(images + torch.randn_like(images), labels), batch_size=75)
    chosen = []
    for eval_loader, calib_loader in ((evaluation, calib), (noisy, calib), (evaluation, digits_loader(True, 300))):
        model = calibrating_model(weights)
        evaluate(model, eval_loader, CPU, show_progress=False)
        record = low_latency.choose_thresholds(model, calib_loader, 1, CPU, budget=10, search_images=150,
                                               conversion={'fc2_thresholds': FC2}, log=lambda line: None)
        chosen.append((thresholds(model), record['percent'], record['scales']))
    (first, p1, s1), (second, p2, s2), (other, _, _) = chosen
    assert p1 == p2 and s1 == s2
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert any(not torch.equal(first[name], other[name]) for name in first)


def image_folder(root: Path, seed: int, per_class: int = 4) -> Path:
    """One folder per class of the 10, of small real PNG images (gradient plus noise)."""
    rng = np.random.default_rng(seed)
    for label in range(10):
        (root / str(label)).mkdir(parents=True)
        for index in range(per_class):
            pixels = rng.uniform(0, 255, (16, 16, 3)) * 0.5 + np.linspace(0, 127, 16)[None, :, None] * (label % 3)
            Image.fromarray(pixels.clip(0, 255).astype(np.uint8), 'RGB').save(root / str(label) / f'{index}.png')
    return root


def test_cli_search_never_reads_the_evaluation_set_when_a_calibration_set_is_given(tmp_path, weights):
    """for_v --target_T --calib_data_path: other evaluation images, the same thresholds, percent and
    scales; other calibration images move them (so the comparison can fail)."""
    calib, other_calib = image_folder(tmp_path / 'calib', 0), image_folder(tmp_path / 'calib2', 1)
    eval_a, eval_b = image_folder(tmp_path / 'eval_a', 2), image_folder(tmp_path / 'eval_b', 3, per_class=2)
    chosen = []
    for name, calib_path, eval_path in (('a', calib, eval_a), ('b', calib, eval_b), ('c', other_calib, eval_a)):
        record = run(tmp_path, '--data_set', 'image_folder', '--test_mode', 'for_v', '--model_path', str(weights),
                     '--savename', name, '--calib_data_path', str(calib_path), '--eval_data_path', str(eval_path),
                     '--target_T', '1', '--search_budget', '10', '--search_images', '40')
        saved = torch.load(tmp_path / f'{name}.pth', weights_only=True)
        thresholds_of = {k: v for k, v in saved['model'].items() if k.endswith(('scale_p', 'scale_n'))}
        chosen.append((thresholds_of, record['low_latency']['percent'], record['low_latency']['scales']))
        assert record['n'] == 40 and saved['calibration']['split'] == 'train'
    (first, p1, s1), (second, p2, s2), (other, _, _) = chosen
    assert p1 == p2 and s1 == s2
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], other[k]) for k in first)


def test_percent_quantiles_are_the_published_calibration(weights):
    """The multi-percent pass gives, for each percent, bit for bit what for_v --percent p computes."""
    loader = digits_loader(True, 150)
    model = calibrating_model(weights)
    quantiles, _, _, batches = low_latency.record_quantiles(model, loader, [0.99, 0.9], CPU)
    assert batches == 2
    assert all(torch.equal(m.scale_p, torch.zeros(1)) for _, m in get_modules(model, CALIBRATING))
    for index, percent in enumerate((0.99, 0.9)):
        published = cli.build_model(parse('--test_mode', 'for_v', '--model_path', str(weights),
                                           '--percent', str(percent))).eval()
        evaluate(published, loader, CPU, show_progress=False)
        got = thresholds(published)
        assert set(quantiles) == {n for n, m in get_modules(published, CALIBRATING) if m.calibrate}
        for name, q in quantiles.items():
            assert torch.equal(q[index], got[name]), name


def test_objective_never_increases_and_refinement_lowers_it(search):
    model, record = search
    history = record['objective_history']
    assert len(history) == record["evaluations"] == record["budget"] == 40
    assert all(b <= a for a, b in zip(history, history[1:]))
    percents = [entry['objective'] for entry in record['percent_objectives']]
    assert record['percent_objective'] == min(percents) == history[len(percents) - 1]
    assert record['final_objective'] == history[-1] < record['percent_objective']
    assert record['accepted_changes'] >= 1 and any(s != 1.0 for s in record['scales'].values())
    assert record['percent'] in low_latency.DEFAULT_PERCENTS
    assert len(record['search_energy_ratio']) == len(record['search_agreement']) == 2
    # The places of fixed thresholds (s at softmax_p, fc2 under the ViT default) are searched from
    # their fixed values; the chosen thresholds are recorded (the calibrating model has no use for them).
    fixed = record['fixed_thresholds']
    assert record['search_fixed'] and sorted(fixed) == sorted(n for n in record['scales']
                                                              if n.endswith(('place_s', 'place_fc2')))
    assert len(fixed) == 4  # two blocks: s and fc2 each
    for name, value in fixed.items():
        base = (0.0125, 0.0125) if name.endswith('place_s') else FC2
        # Times the place's scale and the global one (relative to the conversion's threshold_scale, 1 here).
        scale = record['scales'][name] * record['global_relative_scale']
        assert record['global_relative_scale'] == record['threshold_scale']
        assert value == [float((torch.tensor(b, dtype=torch.float64) * scale).float()) for b in base]
    assert {name for name in fixed if record['scales'][name] * record['global_relative_scale'] != 1.0}, \
        'no fixed place moved: the test is void'


def test_search_fixed_false_keeps_the_fixed_thresholds(weights):
    model = calibrating_model(weights)
    record = low_latency.choose_thresholds(model, digits_loader(True, 150), 2, CPU, budget=10,
                                           search_images=150, conversion={'fc2_thresholds': FC2},
                                           search_fixed=False, log=lambda line: None)
    assert record['fixed_thresholds'] == {} and not record['search_fixed']
    assert record['scales'] and not any(name.endswith(('place_s', 'place_fc2')) for name in record['scales'])
    snn = convert_to_snn(copy.deepcopy(model), fc2_thresholds=FC2)
    assert low_latency.apply_fixed_thresholds(snn, record) == 0


def test_per_kind_stage_moves_places_of_one_kind_together(weights):
    """Stage 2a scales all places of one kind at once (here it accepts a change); stage 2b then
    moves single places, each accepted change at most one place away from its kind's scale."""
    model = calibrating_model(weights)
    record = low_latency.choose_thresholds(model, digits_loader(True, 150), 2, CPU, budget=14,
                                           search_images=150, conversion={'fc2_thresholds': FC2},
                                           log=lambda line: None, **LEGACY)
    assert record['kind_accepted_changes'] >= 1 and record['kind_stage_evaluations'] == 11
    moved = [kind for kind, scale in record['kind_scales'].items() if scale != 1.0]
    assert moved
    kind_of = {name: name.rsplit('place_', 1)[1] for name in record['scales']}
    assert all(sum(kind_of[name] == kind for name in record['scales']) == 2 for kind in moved)  # 2 blocks
    off_kind = [name for name, scale in record['scales'].items() if scale != record['kind_scales'][kind_of[name]]]
    assert len(off_kind) <= record['accepted_changes'] - record['kind_accepted_changes']


def judged_objective(model, record, images, logits, **conversion):
    """The search's objective (summed as the search sums it) of the SNN converted from ``model``
    with the record's conversion (``conversion`` overriding it) and fixed thresholds."""
    snn = convert_to_snn(copy.deepcopy(model), **{**record['conversion'], **conversion}).eval()
    low_latency.apply_fixed_thresholds(snn, record, log=lambda line: None)
    objective = low_latency.objective_of(record['objective'], record['prefix_weight'])
    total = torch.zeros((), dtype=torch.float64)
    for x, y in zip(images, logits):
        total += objective(step_logits(snn, x, record['target_T']), y)
    return float(total) / sum(len(x) for x in images)


def test_final_objective_is_that_of_the_stored_thresholds(search, weights):
    """The thresholds left in the model, converted with the record's conversion (its
    threshold_scale, the chosen global scale, included), are the SNN the search judged last."""
    model, record = search
    assert record['conversion']['threshold_scale'] == record['threshold_scale'] != 1.0, 'no global scale: void'
    _, images, logits, _ = low_latency.record_quantiles(calibrating_model(weights), digits_loader(True, 150),
                                                        [0.99], CPU, keep_images=150)
    assert record['prefix_weight'] == low_latency.DEFAULT_PREFIX_WEIGHT > 0
    assert judged_objective(model, record, images, logits) == record['final_objective']
    # The global scale is not in the TestNeurons: converting without it is another SNN.
    assert judged_objective(model, record, images, logits, threshold_scale=1.0) != record['final_objective']


def test_recorded_scales_reproduce_the_snn(tmp_path, weights):
    """for_v --target_T 2 records its percent and scales in the checkpoint and the JSON; the
    quantiles at that percent times those scales are the saved thresholds, and the SNN of the
    checkpoint (--test_mode snn) gives the same per-step logits as one rebuilt from the record."""
    run(tmp_path, '--test_mode', 'for_v', '--model_path', str(weights), '--savename', 'fast',
        '--target_T', '2', '--search_budget', '40', '--search_images', '150', '--calib_data_path', 'train',
        '--results', str(tmp_path / 'for_v.json'))
    saved = torch.load(tmp_path / 'fast.pth', weights_only=True)
    record = saved['low_latency']
    assert json.loads((tmp_path / 'for_v.json').read_text())['low_latency'] == json.loads(json.dumps(record))
    assert record['target_T'] == 2 and record['evaluations'] == 40 and record['search_images'] == 150
    assert record['conversion']['fc2_thresholds'] == list(FC2)

    assert saved['calibration']['split'] == 'train' and saved['calibration']['percent'] == record['percent']
    # Rebuild from the record: the quantiles at the recorded percent on the same calibration
    # images (the training split), times the recorded scales.
    rebuilt = calibrating_model(weights)
    data, _ = build_dataset(True, parse())
    loader = DataLoader(data, batch_size=150)
    quantiles, images, _, _ = low_latency.record_quantiles(rebuilt, loader, [record['percent']], CPU,
                                                           keep_images=150)
    for name, neuron in get_modules(rebuilt, CALIBRATING):
        if name in quantiles:
            # A fixed fc2 keeps its quantile (its scale is that of the fixed value, below).
            scale = 1.0 if name in record['fixed_thresholds'] else record['scales'].get(name, 1.0)
            value = low_latency._thresholds(quantiles[name][0], scale)
            neuron.scale_p.copy_(value[0:1])
            neuron.scale_n.copy_(value[1:2])
            assert torch.equal(value, torch.cat([saved['model'][f'{name}.scale_p'],
                                                 saved['model'][f'{name}.scale_n']])), name

    # The global scale the search chose is the checkpoint's recorded threshold_scale (snn applies it).
    assert saved['calibration']['threshold_scale'] == record['threshold_scale']
    # The places of fixed thresholds: their fixed values times the recorded scales (their own and the
    # global one, relative to the conversion's).
    assert record['fixed_thresholds']
    from_record = convert_to_snn(rebuilt, fc2_thresholds=FC2, threshold_scale=record['threshold_scale']).eval()
    modules = dict(get_modules(from_record, (trans_utils.TwoSideNeuron,)))
    for name, (theta_p, theta_n) in record['fixed_thresholds'].items():
        base = (0.0125, 0.0125) if name.endswith('place_s') else FC2
        value = low_latency._thresholds(torch.tensor(base), record['scales'][name] * record['global_relative_scale'])
        assert value.tolist() == [theta_p, theta_n]
        modules[name].scale_p.copy_(value[0:1])
        modules[name].scale_n.copy_(value[1:2])

    snn_args = parse('--test_mode', 'snn', '--model_path', str(tmp_path / 'fast.pth'))
    from_checkpoint = convert_to_snn(cli.build_model(snn_args), fc2_thresholds=cli.fc2_thresholds(snn_args, rebuilt),
                                     threshold_scale=saved['calibration']['threshold_scale'])
    low_latency.apply_fixed_thresholds(from_checkpoint, record, log=lambda line: None)
    want = step_logits(from_record, images[0], 3)
    got = step_logits(from_checkpoint.eval(), images[0], 3)
    assert torch.equal(got, want)

    # The command line's snn run is that SNN: the same top-1 after every step on the evaluation set.
    result = run(tmp_path, '--test_mode', 'snn', '--model_path', str(tmp_path / 'fast.pth'), '--test_T', '3')
    data, _ = build_dataset(False, parse())
    expected = evaluate_snn(from_record, DataLoader(data, batch_size=150), CPU, 3, show_progress=False)
    assert result['acc1'] == expected['acc1']
    # Without the recorded fixed thresholds the SNN differs (so the comparisons above can fail).
    plain = convert_to_snn(cli.build_model(snn_args), fc2_thresholds=FC2).eval()
    assert not torch.equal(step_logits(plain, images[0], 3), got)


def test_without_target_T_the_published_calibration_is_unchanged(tmp_path, weights):
    record = run(tmp_path, '--test_mode', 'for_v', '--model_path', str(weights), '--savename', 'published')
    assert 'low_latency' not in record
    saved = torch.load(tmp_path / 'published.pth', weights_only=True)
    assert 'low_latency' not in saved and saved['calibration']['percent'] == 0.99
    data, _ = build_dataset(False, parse())
    quantiles, _, _, _ = low_latency.record_quantiles(calibrating_model(weights), DataLoader(data, batch_size=150),
                                                      [0.99], CPU)
    for name, q in quantiles.items():
        assert torch.equal(q[0], torch.cat([saved['model'][f'{name}.scale_p'], saved['model'][f'{name}.scale_n']]))


@pytest.mark.parametrize('extra, message', [
    (['--target_T', '0'], '--target_T must be a number of time steps >= 1, got 0'),
    (['--target_T', '-2'], '--target_T must be a number of time steps >= 1, got -2'),
    (['--target_T', '2', '--search_budget', '5'], '--search_budget 5 is smaller than the 8 candidate'),
    (['--target_T', '2', '--target_percents', '0.9', '1.5'], '--target_percents must lie in (0, 1], got 1.5'),
    (['--target_T', '2', '--target_percents', '0.9', '0.9'], 'the same percent twice'),
    (['--target_T', '2', '--search_images', '0'], '--search_images must be >= 1, got 0'),
    (['--target_T', '2', '--search_cache_mb', '-1'], '--search_cache_mb must be >= 0 (0: no block cache), got -1.0'),
    (['--target_T', '2', '--search_cache_mb', 'nan'], '--search_cache_mb must be >= 0 (0: no block cache), got nan'),
    (['--target_T', '2', '--search_prefix_weight', '-0.5'], '--search_prefix_weight must be >= 0, got -0.5'),
    (['--target_T', '2', '--search_energy_weight', '-1'], '--search_energy_weight must be a number >= 0, got -1.0'),
    (['--target_T', '2', '--search_energy_weight', 'inf'], '--search_energy_weight must be a number >= 0, got inf'),
])
def test_bad_search_settings_are_refused(tmp_path, weights, extra, message):
    with pytest.raises(UserError, match=message.replace('(', r'\(').replace(')', r'\)')):
        run(tmp_path, '--test_mode', 'for_v', '--model_path', str(weights), *extra)


@pytest.mark.parametrize('mode', ['ann', 'snn'])
def test_target_T_needs_for_v(tmp_path, weights, mode):
    with pytest.raises(UserError, match=f'--target_T chooses thresholds: it needs --test_mode for_v, not {mode}'):
        run(tmp_path, '--test_mode', mode, '--model_path', str(weights), '--target_T', '2')


def test_bad_target_T_exits_2_with_one_line(tmp_path, weights):
    result = subprocess.run([sys.executable, str(REPO / 'run_class_finetuning.py'), *COMMON, '--test_mode', 'for_v',
                             '--model_path', str(weights), '--target_T', '0', '--log_dir', str(tmp_path)],
                            capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == 'error: --target_T must be a number of time steps >= 1, got 0'
    assert not (tmp_path / 'output').exists()


@pytest.mark.parametrize('name', ['kl', 'mse'])
def test_objectives_compare_the_mean_over_steps_with_the_ann(name):
    """Zero when the mean of the per-step outputs is the ANN's logits (whatever the single steps
    are), positive otherwise."""
    objective = low_latency.OBJECTIVES[name]
    ann = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    noise = torch.randn(2, 5, 10, generator=torch.Generator().manual_seed(1))
    steps = torch.stack([ann + noise[0], ann - noise[0]])
    assert float(objective(steps, ann)) == pytest.approx(0.0, abs=1e-12)
    assert float(objective(steps + noise, ann)) > 1e-3


@pytest.mark.parametrize('name', ['kl', 'mse'])
def test_prefix_weight_adds_the_earlier_steps_objectives(name):
    """objective_of(name, w): the objective of all N steps plus w x its mean over the first
    1..N-1 steps; w = 0 or N = 1: the objective of the N steps alone."""
    plain = low_latency.OBJECTIVES[name]
    ann = torch.randn(5, 10, generator=torch.Generator().manual_seed(0))
    steps = ann + torch.randn(3, 5, 10, generator=torch.Generator().manual_seed(1))
    assert low_latency.objective_of(name, 0.0) is plain
    want = plain(steps, ann) + 0.25 * (plain(steps[:1], ann) + plain(steps[:2], ann)) / 2
    assert float(low_latency.objective_of(name, 0.25)(steps, ann)) == pytest.approx(float(want), rel=1e-12)
    assert float(low_latency.objective_of(name, 0.25)(steps[:1], ann)) == float(plain(steps[:1], ann))
    assert float(want) > float(plain(steps, ann))  # the earlier steps do count


def test_fixed_thresholds_of_another_model_are_refused(search):
    """A record naming places the converted model lacks (searched for another model) is an error
    naming one of them, not a silent partial application."""
    model, record = search
    snn = convert_to_snn(copy.deepcopy(model), fc2_thresholds=FC2)
    foreign = dict(record, fixed_thresholds={'blocks.7.attn.place_s': [0.01, 0.01]})
    with pytest.raises(UserError, match=r'names 1 places this model does not have \(blocks\.7\.attn\.place_s\)'):
        low_latency.apply_fixed_thresholds(snn, foreign)


@pytest.mark.parametrize('extra, value', [([], True), (['--search_fixed', 'False'], False),
                                          (['--search_fixed'], True), (['--search_fixed', 'True'], True)])
def test_search_fixed_flag(extra, value):
    assert parse(*extra).search_fixed is value


def _random_calibrating_model(model, *kwargs):
    args = cli.get_args_parser().parse_args(
        ['--model', model, '--model_kwargs', *kwargs, '--input_size', '16', '--nb_classes', '10',
         '--data_set', 'DIGITS', '--num_workers', '0', '--device', 'cpu', '--test_mode', 'for_v'])
    torch.manual_seed(1)
    return cli.build_model(args).eval()


@pytest.mark.parametrize('model, kwargs, cache_mib, kept', [
    # every block input fits: a candidate changing block b runs blocks b.. only
    ('vit_tiny_patch16_224', ('patch_size=4', 'embed_dim=32', 'depth=3', 'num_heads=2'), 64, [1, 2]),
    # room for one of the two block inputs (twice 0.65 MB): the later one is kept
    ('vit_tiny_patch16_224', ('patch_size=4', 'embed_dim=32', 'depth=3', 'num_heads=2'), 1.5, [2]),
    # EVA-02: blocks in a ModuleList, called with the rotary embedding as a keyword
    ('eva02_tiny_patch14_224', ('patch_size=4', 'embed_dim=32', 'depth=3', 'num_heads=2'), 64, [1, 2]),
])
def test_block_cache_gives_the_search_of_full_runs(model, kwargs, cache_mib, kept):
    """The search with its block cache judges every candidate exactly as full runs do (same
    objectives, same choices), while running fewer blocks."""
    records = []
    for mib in (0, cache_mib):
        calibrating = _random_calibrating_model(model, *kwargs)
        records.append(low_latency.choose_thresholds(
            calibrating, digits_loader(True, 150), 2, CPU, budget=80, search_images=150,
            cache_mib=mib, log=lambda line: None))
        records[-1]['thresholds'] = thresholds(calibrating)
    full, cached = records
    assert full['cached_blocks'] == [] and full['block_evaluations'] == full['block_evaluations_full'] == 3 * 80
    assert cached['cached_blocks'] == kept
    assert cached['objective_history'] == full['objective_history']
    assert cached['scales'] == full['scales'] and cached['fixed_thresholds'] == full['fixed_thresholds']
    assert all(torch.equal(cached['thresholds'][n], t) for n, t in full['thresholds'].items())
    assert cached['search_agreement'] == full['search_agreement']
    assert cached['accepted_changes'] > cached['kind_accepted_changes'], 'no per-place change: the test is void'
    assert cached['block_evaluations'] < full['block_evaluations']



def channel_model(weights):
    """The calibrating model with per-channel TestNeurons (ECMT_SPEC 15)."""
    model = calibrating_model(weights)
    for name, neuron in list(get_modules(model, CALIBRATING)):
        parent, attr = name.rsplit('.', 1)
        setattr(model.get_submodule(parent), attr, trans_utils.TestNeuron(neuron.place, neuron.percent, 'channel'))
    return model


def test_global_stage_chooses_the_best_scale_and_logs_progress(weights):
    """With a budget for the percent and the global scales only: every scale is judged once, the
    lowest objective wins (recorded as threshold_scale, not folded: the TestNeurons hold the
    quantiles), and every candidate logs a progress line with the time it expects."""
    scales = (2.0, 1.0, 0.5, 0.25, 0.125)
    lines = []
    model = calibrating_model(weights)
    loader = digits_loader(True, 150)
    record = low_latency.choose_thresholds(model, loader, 1, CPU, percents=[0.99], scales=scales, budget=5,
                                           search_images=150, conversion={'fc2_thresholds': FC2}, log=lines.append)
    judged = {entry['scale']: entry['objective'] for entry in record['scale_objectives']}
    assert sorted(judged) == sorted(scales) and record['evaluations'] == 5
    assert len(set(judged.values())) == len(scales)  # the scales do matter
    best = min(scales, key=lambda g: judged[g])
    assert record['threshold_scale'] == best == record['conversion']['threshold_scale']
    assert record['final_objective'] == record['scale_objective'] == judged[best]
    assert record['scale_objectives'][0] == {'scale': 1.0, 'objective': record['percent_objective']}
    quantiles, _, _, _ = low_latency.record_quantiles(calibrating_model(weights), loader, [0.99], CPU)
    got = thresholds(model)
    assert all(torch.equal(got[name], q[0]) for name, q in quantiles.items())
    progress = [line for line in lines if line.lstrip().startswith('candidate ')]
    assert [line.split()[1] for line in progress] == [f'{i}/5,' for i in range(1, 6)]
    assert all(line.rstrip().endswith(' s left') and 'about ' in line for line in progress)
    assert any('global scale' in line for line in progress)


def test_per_channel_search_keeps_channel_shapes_and_reproduces_the_snn(weights):
    """TestNeurons of granularity 'channel', the rounding rule and differential coding: the search
    records per-channel quantiles (exactly what the TestNeurons' own calibration computes), leaves
    thresholds of the channel shape ([C], [heads, 1, D] for q, k, v), records the four options,
    and converting with the record gives the objective the search judged last."""
    loader = digits_loader(True, 150)
    own = channel_model(weights)
    evaluate(own, loader, CPU, show_progress=False)
    own_thresholds = thresholds(own)
    model = channel_model(weights)
    conversion = {'fc2_thresholds': FC2, 'fire_rule': 'round', 'coding': 'differential'}
    record = low_latency.choose_thresholds(model, loader, 2, CPU, percents=[0.99], budget=16, search_images=150,
                                           conversion=conversion, log=lambda line: None)
    assert (record['granularity'], record['fire_rule'], record['coding']) == ('channel', 'round', 'differential')
    got = thresholds(model)
    shapes = {name: tuple(t.shape) for name, t in got.items()}
    assert shapes == {name: tuple(t.shape) for name, t in own_thresholds.items()}
    neurons = dict(get_modules(model, CALIBRATING))
    for name, shape in (('blocks.0.attn.place_q', (2, 1, 16)), ('blocks.1.attn.place_v', (2, 1, 16)),
                        ('blocks.0.mlp.place_fc1', (32,))):
        assert tuple(neurons[name].scale_p.shape) == tuple(neurons[name].scale_n.shape) == shape, name
    unscaled = [name for name, scale in record['scales'].items() if scale == 1.0 and name in got]
    assert unscaled and all(torch.equal(got[name], own_thresholds[name]) for name in unscaled)
    assert any(scale != 1.0 for scale in record['scales'].values()), 'no per-place change: void'
    _, images, logits, _ = low_latency.record_quantiles(channel_model(weights), loader, [0.99], CPU,
                                                        keep_images=150)
    assert judged_objective(model, record, images, logits) == record['final_objective']
    assert judged_objective(model, record, images, logits, fire_rule='ecmt') != record['final_objective']


def test_energy_weight_adds_the_energy_the_monitor_counts(weights):
    """--search_energy_weight W: every candidate's objective is its accuracy objective plus W times
    E_T (ECMT_SPEC 8) on the search images; the chosen thresholds' E_T, as the search carried it
    (blocks it did not run taken from the best's counts), equals a fresh monitored full run's;
    and a heavy weight chooses thresholds that spend less energy than the accuracy alone."""
    loader = digits_loader(True, 150)
    records = {}
    for weight in (0.0, 0.5, 20.0):
        model = calibrating_model(weights)
        lines = []
        records[weight] = low_latency.choose_thresholds(
            model, loader, 2, CPU, budget=24, search_images=150, conversion={'fc2_thresholds': FC2},
            energy_weight=weight, log=lines.append)
        if weight:
            assert any('x energy' in line for line in lines if line.lstrip().startswith('candidate '))
    for weight in (0.5, 20.0):
        record = records[weight]
        assert record['energy_weight'] == weight
        assert record['energy_of_best'] == record['search_energy_ratio'][-1]
        assert record['cached_blocks'], 'no block cache: the carried counts are not exercised'
    assert records[0.0]['energy_of_best'] is None
    assert records[20.0]['search_energy_ratio'][-1] < records[0.0]['search_energy_ratio'][-1]
    assert records[20.0]['threshold_scale'] > records[0.0]['threshold_scale']


def test_energy_weight_with_the_block_cache_judges_as_full_runs(weights):
    """The energy term through the block cache: the same objectives and choices as full runs."""
    records = []
    for mib in (0, 64):
        model = _random_calibrating_model('vit_tiny_patch16_224', 'patch_size=4', 'embed_dim=32', 'depth=3',
                                          'num_heads=2')
        records.append(low_latency.choose_thresholds(model, digits_loader(True, 150), 2, CPU, budget=60,
                                                     search_images=150, cache_mib=mib, energy_weight=1.0,
                                                     log=lambda line: None))
    full, cached = records
    assert cached['block_evaluations'] < full['block_evaluations']
    assert cached['objective_history'] == full['objective_history']
    assert cached['scales'] == full['scales'] and cached['energy_of_best'] == full['energy_of_best']
