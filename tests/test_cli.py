"""End-to-end runs of run_class_finetuning.py (ann, for_v, snn) on DIGITS, and its bad-input errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import run_class_finetuning as cli
from helpers_cli import ARCH, COMMON, REPO, baai_state_dict, tiny_timm
from utils import UserError

# One intra-op thread (conftest.single_thread): the runs here are tiny.
pytestmark = pytest.mark.usefixtures('single_thread')


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """A timm-format checkpoint written by the test (random weights, wrapped as published)."""
    path = tmp_path_factory.mktemp('ckpt') / 'tiny.pth'
    torch.save({'model': tiny_timm().state_dict()}, path)
    return path


def run(tmp_path, *extra):
    args = cli.get_args_parser().parse_args(COMMON + ['--log_dir', str(tmp_path),
                                                      '--output_dir', str(tmp_path)] + list(extra))
    return cli.main(args)


@pytest.fixture(scope='module')
def for_v_checkpoint(tmp_path_factory, weights):
    out = tmp_path_factory.mktemp('forv')
    record = run(out, '--test_mode', 'for_v', '--model_path', str(weights), '--savename', 'tiny_for_v',
                 '--results', str(out / 'for_v.json'))
    return Path(record['checkpoint'])


def test_ann_matches_plain_timm_and_writes_results(tmp_path, weights):
    record = run(tmp_path, '--test_mode', 'ann', '--model_path', str(weights),
                 '--results', str(tmp_path / 'ann.json'))
    saved = json.loads((tmp_path / 'ann.json').read_text())
    assert saved == json.loads(json.dumps(record))
    for key in ('test_mode', 'model', 'data_set', 'n', 'seconds', 'acc1', 'acc5', 'loss'):
        assert key in saved
    assert saved['n'] == 450 and saved['test_mode'] == 'ann'
    # The same accuracy from a plain timm model on the same data.
    import datasets
    data, _ = datasets.build_dataset(False, cli.get_args_parser().parse_args(COMMON))
    model = tiny_timm().eval()
    loader = torch.utils.data.DataLoader(data, batch_size=150)
    with torch.no_grad():
        correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in loader)
    assert saved['acc1'] == pytest.approx(100.0 * correct / 450)
    log = (tmp_path / 'log_ann.txt').read_text()
    assert 'ann batch 3/3' in log and 'top-1' in log


def test_for_v_checkpoint_holds_weights_and_thresholds(for_v_checkpoint, weights):
    state = torch.load(for_v_checkpoint, weights_only=True)['model']
    places = [k[:-len('.scale_p')] for k in state if k.endswith('.scale_p')]
    assert len(places) == 2 * 8  # 8 places per block, 2 blocks
    assert all(f'{p}.scale_n' in state for p in places)
    calibrated = [p for p in places if not p.endswith('place_s')]
    assert all(float(state[f'{p}.scale_p']) > 0 for p in calibrated)
    plain = torch.load(weights, weights_only=True)['model']
    for key, value in plain.items():
        assert torch.equal(state[key], value), key


def test_snn_reports_every_step(tmp_path, for_v_checkpoint):
    record = run(tmp_path, '--test_mode', 'snn', '--model_path', str(for_v_checkpoint), '--test_T', '3',
                 '--results', str(tmp_path / 'snn.json'))
    saved = json.loads((tmp_path / 'snn.json').read_text())
    assert saved['T'] == 3 and saved['n'] == 450
    for key in ('acc1', 'acc5', 'fire_rate', 'energy_ratio'):
        assert len(saved[key]) == 3, key
    assert all(0 <= a <= 100 for a in saved['acc1'] + saved['acc5'])
    assert all(a1 <= a5 for a1, a5 in zip(saved['acc1'], saved['acc5']))
    for t, (rate, energy) in enumerate(zip(saved['fire_rate'], saved['energy_ratio']), start=1):
        assert 0 < rate <= 1.5
        assert energy == pytest.approx(t * 0.9 / 4.6 * rate)
    log = (tmp_path / 'log_snn.txt').read_text()
    assert 'snn batch 3/3' in log and 't=3:' in log and 'energy vs ANN' in log
    assert record['seconds'] > 0


def test_snn_without_monitor_has_no_energy(tmp_path, for_v_checkpoint):
    record = run(tmp_path, '--test_mode', 'snn', '--model_path', str(for_v_checkpoint), '--test_T', '1',
                 '--no-monitor')
    assert 'fire_rate' not in record and len(record['acc1']) == 1


def test_fc2_override_is_default_for_vit_and_can_be_switched_off(tmp_path, for_v_checkpoint, monkeypatch):
    seen = {}
    real = cli.convert_to_snn

    def spy(model, **kwargs):
        seen.setdefault('fc2', []).append(kwargs['fc2_thresholds'])
        return real(model, **kwargs)

    monkeypatch.setattr(cli, 'convert_to_snn', spy)
    common = ['--test_mode', 'snn', '--model_path', str(for_v_checkpoint), '--test_T', '1', '--no-monitor']
    run(tmp_path, *common)
    run(tmp_path, *common, '--fc2_calibrated')
    run(tmp_path, *common, '--fc2_thresholds', '0.5', '0.1')
    assert seen['fc2'] == [(0.25, 0.08), None, (0.5, 0.1)]


# ------------------------------------------------------------------------------------------
# Bad input: one clear message, exit code 2
# ------------------------------------------------------------------------------------------
def cli_subprocess(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS='1')
    return subprocess.run([sys.executable, str(REPO / 'run_class_finetuning.py'), *COMMON, *args],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_missing_checkpoint_exits_2_with_message(tmp_path):
    proc = cli_subprocess('--test_mode', 'ann', '--model_path', str(tmp_path / 'nope.pth'), cwd=tmp_path)
    assert proc.returncode == 2
    assert 'error:' in proc.stderr and 'nope.pth' in proc.stderr
    assert 'Traceback' not in proc.stderr


def test_snn_zero_thresholds_exit_2_naming_places(tmp_path, for_v_checkpoint):
    state = torch.load(for_v_checkpoint, weights_only=True)['model']
    for key in state:
        if key.endswith(('scale_p', 'scale_n')):
            state[key] = torch.zeros(1)
    path = tmp_path / 'zeros.pth'
    torch.save({'model': state}, path)
    proc = cli_subprocess('--test_mode', 'snn', '--model_path', str(path), '--test_T', '2', cwd=tmp_path)
    assert proc.returncode == 2
    assert 'no calibrated thresholds' in proc.stderr and 'blocks.0.attn.place_q' in proc.stderr
    assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('extra, message', [
    (['--test_mode', 'ann', '--model_path', 'TEXT'], 'not a'),
    (['--test_mode', 'snn', '--model_path', 'WEIGHTS'], 'holds no thresholds'),
    (['--test_mode', 'snn', '--model_path', 'FORV', '--test_T', '0'], '--test_T must be >= 1'),
    (['--test_mode', 'snn'], 'needs --model_path'),
    (['--test_mode', 'ann', '--model_path', 'WEIGHTS', '--nb_classes', '7'], 'has 10 classes'),
    (['--test_mode', 'ann', '--model', 'no_such_model'], 'unknown model'),
    (['--test_mode', 'for_v', *ARCH, 'global_pool=avgmax'], 'avgmax'),
    (['--test_mode', 'ann', *ARCH, 'depth'], 'depth'),
    (['--test_mode', 'ann', '--data_set', 'CIFAR10', '--eval_data_path', 'DIR'], 'cifar-10-batches-py'),
    (['--test_mode', 'ann', '--percent', '1.5'], '--percent'),
    (['--test_mode', 'ann', '--device', 'cuda:7'], 'cuda'),
])
def test_bad_input_is_a_user_error(tmp_path, weights, for_v_checkpoint, extra, message):
    text = tmp_path / 'notes.pth'
    text.write_text('not a checkpoint\n')
    subst = {'TEXT': str(text), 'WEIGHTS': str(weights), 'FORV': str(for_v_checkpoint), 'DIR': str(tmp_path)}
    # A repeated --model_kwargs replaces the earlier one.
    extra = [subst.get(a, a) for a in extra]
    parsed = cli.get_args_parser().parse_args(COMMON + extra + ['--log_dir', str(tmp_path),
                                                                '--output_dir', str(tmp_path)])
    with pytest.raises(UserError) as info:
        cli.main(parsed)
    assert message in str(info.value)


def test_thresholds_of_another_model_are_refused(tmp_path, for_v_checkpoint):
    """A for_v file of a 2-block model given to a 3-block model: the record names both --model_kwargs;
    a file without a record (as the published scripts write) names the places that differ."""
    args = list(COMMON)
    args[args.index('depth=2')] = 'depth=3'
    parsed = cli.get_args_parser().parse_args(
        args + ['--test_mode', 'snn', '--model_path', str(for_v_checkpoint), '--log_dir', str(tmp_path)])
    with pytest.raises(UserError) as info:
        cli.main(parsed)
    assert 'was calibrated with --model_kwargs patch_size=4 embed_dim=32 depth=2' in str(info.value)
    assert '(this run: patch_size=4 embed_dim=32 depth=3 num_heads=2)' in str(info.value)
    bare = tmp_path / 'no_record.pth'
    torch.save({'model': torch.load(for_v_checkpoint, weights_only=True)['model']}, bare)
    parsed = cli.get_args_parser().parse_args(
        args + ['--test_mode', 'snn', '--model_path', str(bare), '--log_dir', str(tmp_path)])
    with pytest.raises(UserError) as info:
        cli.main(parsed)
    assert 'depth 2 (the model: 3)' in str(info.value) and 'depth=2' in str(info.value)


def test_for_v_refuses_nan_activations_and_writes_no_checkpoint(tmp_path):
    """Broken weights make NaN activations: calibration names the places, exits 2, writes nothing."""
    state = tiny_timm().state_dict()
    state['blocks.1.mlp.fc1.bias'][0] = float('nan')  # NaN from fc1 of the second block on
    path = tmp_path / 'broken.pth'
    torch.save({'model': state}, path)
    proc = cli_subprocess('--test_mode', 'for_v', '--model_path', str(path), '--savename', 'broken_for_v',
                          '--log_dir', str(tmp_path), '--output_dir', str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert 'non-finite thresholds' in proc.stderr and 'blocks.1.mlp.place_fc2' in proc.stderr
    assert 'blocks.0.' not in proc.stderr  # the first block's places are fine
    assert 'Traceback' not in proc.stderr
    assert not (tmp_path / 'broken_for_v.pth').exists()


# ------------------------------------------------------------------------------------------
# Published defaults and flags (ECMT_SPEC 11)
# ------------------------------------------------------------------------------------------
def test_published_defaults():
    args = cli.get_args_parser().parse_args([])
    assert (args.output_dir, args.eval_data_path, args.batch_size, args.test_T) == \
        ('../models', '../datasets/val', 64, 8)
    assert args.savename is None  # for_v: test (the published default); snn: named after --model_path
    assert args.amp == 'auto' and args.monitor is True and args.data_config == 'published'


@pytest.mark.parametrize('given, monitor', [([], True), (['--monitor'], True), (['--monitor', 'True'], True),
                                            (['--monitor', 'False'], False), (['--monitor', 'false'], False),
                                            (['--monitor', '0'], False), (['--no-monitor'], False)])
def test_monitor_takes_true_or_false(given, monitor):
    assert cli.get_args_parser().parse_args(given).monitor is monitor


def test_monitor_false_is_honoured(tmp_path, for_v_checkpoint):
    off = run(tmp_path, '--test_mode', 'snn', '--model_path', str(for_v_checkpoint), '--test_T', '1',
              '--monitor', 'False')
    on = run(tmp_path, '--test_mode', 'snn', '--model_path', str(for_v_checkpoint), '--test_T', '1',
             '--monitor', 'True')
    assert 'fire_rate' not in off and len(on['fire_rate']) == 1
    assert off['acc1'] == on['acc1']


def test_amp_auto_is_fp16_on_cuda_only(tmp_path, weights):
    assert cli.resolve_amp('auto', torch.device('cuda')) == 'fp16'
    assert cli.resolve_amp('auto', torch.device('cpu')) == 'none'
    assert cli.resolve_amp('none', torch.device('cuda')) == 'none'
    assert cli.resolve_amp('bf16', torch.device('cpu')) == 'bf16'
    record = run(tmp_path, '--test_mode', 'ann', '--model_path', str(weights))
    assert record['amp'] == 'none'


@pytest.mark.parametrize('name, fc2', [('vit_small_patch16_224', (0.25, 0.08)),
                                       ('vit_base_patch16_224_cifar10', (0.25, 0.08)),
                                       ('deit_small_patch16_224', None), ('eva_g_patch14', None),
                                       ('eva_giant_patch14_224', None)])
def test_fc2_override_follows_the_model_name(name, fc2):
    args = cli.get_args_parser().parse_args(['--model', name])
    assert cli.fc2_thresholds(args, model=None) == fc2



@pytest.mark.parametrize('name, kwargs, fc2', [
    ('vit_tiny_patch16_224', {}, (0.25, 0.08)),
    ('vit_base_patch16_siglip_224', {'embed_dim': 32, 'num_heads': 2}, (0.25, 0.08)),  # a VisionTransformer
    ('deit_tiny_distilled_patch16_224', {}, None),   # not a 'vit' name
    ('vit_medium_patch16_rope_reg1_gap_256', {'embed_dim': 32, 'num_heads': 2}, None),  # timm builds an Eva
    ('vit_tiny_patch16_224', {'mlp_layer': 'swiglu'}, None),  # gated MLP: fc2 reads a product
])
def test_fc2_override_needs_a_vit_name_and_a_plain_vit_model(name, kwargs, fc2):
    from timm.layers import SwiGLU
    kwargs = {k: SwiGLU if v == 'swiglu' else v for k, v in kwargs.items()}
    model = cli.create_model(name, num_classes=10, img_size=32, patch_size=16, depth=1, **kwargs)
    assert cli.fc2_thresholds(cli.get_args_parser().parse_args(['--model', name]), model) == fc2

def test_deit_runs_with_its_calibrated_fc2(tmp_path, for_v_checkpoint, monkeypatch):
    seen, real = [], cli.convert_to_snn
    monkeypatch.setattr(cli, 'convert_to_snn', lambda model, **kw: seen.append(kw['fc2_thresholds']) or real(model, **kw))
    # A file without the record (as the published scripts write), so that another --model name is allowed.
    bare = tmp_path / 'no_record.pth'
    torch.save({'model': torch.load(for_v_checkpoint, weights_only=True)['model']}, bare)
    args = list(COMMON)
    args[args.index('vit_tiny_patch16_224')] = 'deit_tiny_patch16_224'  # the same timm architecture
    cli.main(cli.get_args_parser().parse_args(args + [
        '--test_mode', 'snn', '--model_path', str(bare), '--test_T', '1', '--no-monitor',
        '--log_dir', str(tmp_path), '--output_dir', str(tmp_path)]))
    assert seen == [None]


# ------------------------------------------------------------------------------------------
# Output folders are checked before any work
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('flag, mode', [('--output_dir', 'for_v'), ('--log_dir', 'ann'), ('--output_dir', 'snn'),
                                        ('--results', 'ann')])
def test_unwritable_output_is_an_error_at_start(tmp_path, weights, for_v_checkpoint, flag, mode):
    blocker = tmp_path / 'a_file'
    blocker.write_text('not a folder')
    target = str(blocker / 'r.json') if flag == '--results' else str(blocker)
    model_path = for_v_checkpoint if mode == 'snn' else weights
    values = {'--output_dir': str(tmp_path), '--log_dir': str(tmp_path), flag: target}
    extra = [item for pair in values.items() for item in pair]
    proc = cli_subprocess('--test_mode', mode, '--model_path', str(model_path), *extra, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert 'error: cannot write to' in proc.stderr and 'a_file' in proc.stderr
    assert 'Traceback' not in proc.stderr
    assert 'transform:' not in proc.stdout and not list(tmp_path.glob('log_*.txt'))  # nothing was run


def test_ann_does_not_need_the_output_dir(tmp_path, weights):
    blocker = tmp_path / 'a_file'
    blocker.write_text('x')
    parsed = cli.get_args_parser().parse_args(COMMON + ['--test_mode', 'ann', '--model_path', str(weights),
                                                        '--log_dir', str(tmp_path), '--output_dir', str(blocker)])
    assert cli.main(parsed)['n'] == 450


# ------------------------------------------------------------------------------------------
# A position embedding of another size is an error naming both sizes, or resampled on request
# ------------------------------------------------------------------------------------------
def test_vit_pos_embed_of_another_size(tmp_path, weights, capsys):
    args = list(COMMON)
    args[args.index('--input_size') + 1] = '24'  # a 6x6 grid; the checkpoint has 4x4 (16 px)
    base = args + ['--test_mode', 'ann', '--model_path', str(weights), '--log_dir', str(tmp_path)]
    with pytest.raises(UserError) as info:
        cli.main(cli.get_args_parser().parse_args(base))
    message = str(info.value)
    assert 'a 4x4 grid of patches (input size 16 at patch 4)' in message
    assert 'a 6x6 grid of patches (--input_size 24 at patch 4)' in message and '--resample_pos_embed' in message
    record = cli.main(cli.get_args_parser().parse_args(base + ['--resample_pos_embed']))
    assert record['n'] == 450
    assert 'resampled the position embedding' in capsys.readouterr().out


def test_eva_pos_embed_of_another_grid(tmp_path, capsys):
    path = tmp_path / 'baai.pth'
    torch.save({'module': baai_state_dict(grid=6)}, path)  # made for 24 px at patch 4
    args = ['--model', 'eva_g_patch14', '--model_kwargs', 'patch_size=4', 'embed_dim=32', 'depth=2', 'num_heads=2',
            'mlp_ratio=3.0'] + COMMON[COMMON.index('--input_size'):] + ['--test_mode', 'ann', '--model_path', str(path),
                                                                         '--log_dir', str(tmp_path)]
    with pytest.raises(UserError) as info:
        cli.main(cli.get_args_parser().parse_args(args))
    assert 'a 6x6 grid of patches (input size 24 at patch 4)' in str(info.value)
    assert 'a 4x4 grid of patches (--input_size 16 at patch 4)' in str(info.value)
    capsys.readouterr()
    record = cli.main(cli.get_args_parser().parse_args(args + ['--resample_pos_embed']))
    out = capsys.readouterr().out
    assert record['n'] == 450
    assert 'resampled the position embedding' in out and 'from a 6x6 grid' in out and 'to a 4x4 grid' in out



def test_ann_evaluates_an_unconvertible_model_as_plain_timm_and_for_v_refuses_it(tmp_path, capsys):
    """ann needs no conversion: a model the method cannot convert (here global_pool=avgmax, a max
    over tokens it has no rule for) is evaluated as the plain timm network, with a note saying why
    for_v/snn refuse it, and gives plain timm's accuracy; for_v then stops with one error line."""
    common = ['--model', 'vit_tiny_patch16_224', '--model_kwargs', 'patch_size=4', 'embed_dim=32',
              'depth=1', 'num_heads=2', 'global_pool=avgmax', '--input_size', '16', '--nb_classes', '10',
              '--data_set', 'DIGITS', '--num_workers', '0', '--batch_size', '150', '--no_progress',
              '--log_dir', str(tmp_path), '--output_dir', str(tmp_path)]
    plain = timm.create_model('vit_tiny_patch16_224', pretrained=False, num_classes=10, img_size=16,
                              patch_size=4, embed_dim=32, depth=1, num_heads=2, global_pool='avgmax').eval()
    torch.save(plain.state_dict(), tmp_path / 'plain.pth')
    common += ['--model_path', str(tmp_path / 'plain.pth')]
    parser = cli.get_args_parser()
    record = cli.main(parser.parse_args(common + ['--test_mode', 'ann']))
    err = capsys.readouterr().err
    assert 'evaluated as a plain timm network' in err and 'for_v and snn will refuse it' in err
    assert 'avgmax' in err
    from datasets import build_dataset
    args = parser.parse_args(common)
    dataset, _ = build_dataset(False, args)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))])
    targets = torch.tensor([dataset[i][1] for i in range(len(dataset))])
    with torch.no_grad():
        want = 100.0 * float((plain(images).argmax(1) == targets).sum()) / len(targets)
    assert record['n'] == 450 and record['acc1'] == pytest.approx(want, abs=1e-9)
    with pytest.raises(UserError, match='avgmax'):
        cli.main(parser.parse_args(common + ['--test_mode', 'for_v']))
