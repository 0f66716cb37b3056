"""What a run records and checks (issue 32, items 3-7; issue 30, item 4): class names, the
transform (--mean/--std, --data_config timm from the checkpoint), the conversion options of
options.RECORDED_OPTIONS, --ann_results of another run, output paths and locks, stray torchrun
settings, and the per-step energy line. Every bad case is one `error:` line naming a fix that works."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import options
import run_class_finetuning as cli
from helpers_cli import ARCH, COMMON, DATA, REPO, tiny_timm
from utils import UserError

pytestmark = pytest.mark.usefixtures('single_thread')

MODEL = ['--model', 'vit_tiny_patch16_224', *ARCH, '--input_size', '16']


def main(tmp_path, *args):
    return cli.main(cli.get_args_parser().parse_args(
        [*args, '--log_dir', str(tmp_path), '--output_dir', str(tmp_path)]))


def command(tmp_path, *args, env=None):
    """The script in a fresh process: (exit status, stderr lines)."""
    done = subprocess.run([sys.executable, str(REPO / 'run_class_finetuning.py'), *args, '--log_dir', str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=env or dict(os.environ, OMP_NUM_THREADS='1'))
    assert 'Traceback' not in done.stderr, done.stderr[-3000:]
    return done.returncode, [line for line in done.stderr.splitlines() if line.strip()]


def one_error(tmp_path, *args, env=None) -> str:
    code, lines = command(tmp_path, *args, env=env)
    assert code == 2 and len(lines) == 1 and lines[0].startswith('error: '), lines
    return lines[0]


@pytest.fixture(scope='module')
def digits(tmp_path_factory):
    """A tiny ViT's weights and its for_v checkpoint on DIGITS."""
    out = tmp_path_factory.mktemp('digits')
    torch.save(tiny_timm().state_dict(), out / 'tiny.pth')
    record = main(out, *COMMON, '--test_mode', 'for_v', '--model_path', str(out / 'tiny.pth'), '--savename', 'fv',
                  '--calib_batches', '1')
    return out / 'tiny.pth', Path(record['checkpoint'])


# ------------------------------------------------------------------------------------------
# The generic record of conversion options (options.RECORDED_OPTIONS)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('option', options.RECORDED_OPTIONS, ids=lambda o: o.name)
def test_every_recorded_option_is_recorded_restored_and_checked(tmp_path, digits, option):
    weights_file, checkpoint = digits
    saved = torch.load(checkpoint, weights_only=True)['calibration']
    assert saved[option.name] == option.default
    snn = main(tmp_path, *DATA, '--test_mode', 'snn', '--model_path', str(checkpoint), '--test_T', '1',
               '--no-monitor')
    assert snn[option.name] == option.default
    # An old checkpoint without the entry runs with the default.
    old = torch.load(checkpoint, weights_only=True)
    del old['calibration'][option.name]
    torch.save(old, tmp_path / 'old.pth')
    args = cli.get_args_parser().parse_args([*DATA, '--test_mode', 'snn', '--model_path', str(tmp_path / 'old.pth'),
                                             '--test_T', '1', '--no-monitor', '--log_dir', str(tmp_path),
                                             '--output_dir', str(tmp_path)])
    cli.main(args)
    assert getattr(args, option.name) == option.default
    # A flag that contradicts the record: one line naming both values.
    others = [c for c in (option.choices or ()) if c != option.default]
    if others:
        line = one_error(tmp_path, *DATA, '--test_mode', 'snn', '--model_path', str(checkpoint),
                         f'--{option.name}', str(others[0]))
        assert f'--{option.name} {others[0]} contradicts' in line and f'--{option.name} {option.default}' in line


# ------------------------------------------------------------------------------------------
# Class names
# ------------------------------------------------------------------------------------------
def image_folder(root: Path, names, per_class: int = 3) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for c, name in enumerate(names):
        (root / name).mkdir(exist_ok=True)
        for i in range(per_class):
            Image.new('RGB', (20, 20), (60 * c, 20 * i, 90)).save(root / name / f'{i}.png')
    return root


def folder_args(folder, *extra):
    return [*MODEL, '--nb_classes', '2', '--data_set', 'image_folder', '--eval_data_path', str(folder),
            '--batch_size', '3', '--num_workers', '0', '--device', 'cpu', '--no_progress', *extra]


def test_renamed_class_folders_stop_snn_and_ann_unless_intended(tmp_path):
    folder = image_folder(tmp_path / 'shapes', ['circle', 'square'])
    torch.save(tiny_timm(num_classes=2).state_dict(), tmp_path / 'two.pth')
    fv = main(tmp_path, *folder_args(folder, '--test_mode', 'for_v', '--model_path', str(tmp_path / 'two.pth'),
                                     '--savename', 'two_fv', '--results', str(tmp_path / 'fv.json')))
    assert torch.load(fv['checkpoint'], weights_only=True)['calibration']['classes'] == ['circle', 'square']
    assert json.loads((tmp_path / 'fv.json').read_text())['classes'] == ['circle', 'square']
    (folder / 'circle').rename(folder / 'triangle')  # now square is label 0, triangle 1
    for mode in ('snn', 'ann'):
        line = one_error(tmp_path, *folder_args(folder, '--test_mode', mode, '--model_path', fv['checkpoint'],
                                                '--output_dir', str(tmp_path), '--results', str(tmp_path / 'r.json')))
        assert 'missing here: circle' in line and 'new here: triangle' in line and '--classes_changed' in line
        assert 'label numbers move for square' in line
    assert not (tmp_path / 'r.json').exists()
    record = main(tmp_path, *folder_args(folder, '--test_mode', 'snn', '--model_path', fv['checkpoint'],
                                         '--test_T', '1', '--classes_changed'))
    assert record['n'] == 6
    # A removed class: the names, not only the count.
    (folder / 'square').rename(tmp_path / 'square_away')
    line = one_error(tmp_path, *folder_args(folder, '--test_mode', 'snn', '--model_path', fv['checkpoint'],
                                            '--output_dir', str(tmp_path)))
    assert 'missing here: circle, square' in line


# ------------------------------------------------------------------------------------------
# Transforms: --mean/--std recorded by for_v and reused by snn
# ------------------------------------------------------------------------------------------
def test_mean_std_are_recorded_and_snn_reuses_the_recorded_transform(tmp_path, digits):
    weights_file, _ = digits
    fv = main(tmp_path, *COMMON, '--test_mode', 'for_v', '--model_path', str(weights_file), '--savename', 'half',
              '--mean', '0.5', '--std', '0.5', '--crop_pct', '0.875', '--calib_batches', '1')
    transform = torch.load(fv['checkpoint'], weights_only=True)['calibration']['transform']
    assert transform['mean'] == [0.5] * 3 and transform['std'] == [0.5] * 3 and transform['crop_pct'] == 0.875
    snn = main(tmp_path, *DATA, '--test_mode', 'snn', '--model_path', fv['checkpoint'], '--test_T', '1',
               '--no-monitor')
    assert snn['transform'] == transform
    ann = main(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(weights_file), '--mean', '0.5', '--std',
               '0.5', '--crop_pct', '0.875')
    plain = main(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(weights_file))
    assert ann['transform']['mean'] == [0.5] * 3 and plain['transform']['mean'] != [0.5] * 3
    assert ann['loss'] != plain['loss']  # the normalisation is applied
    line = one_error(tmp_path, *DATA, '--test_mode', 'snn', '--model_path', fv['checkpoint'], '--mean', '0.4',
                     '--std', '0.5', '--output_dir', str(tmp_path))
    assert 'calibrated on images made by' in line and 'Drop the transform flags' in line


@pytest.mark.parametrize('flags, says', [
    (['--mean', '0.5'], '--mean and --std go together'),
    (['--mean', '0.5', '0.5', '--std', '0.5'], '--mean takes 3 values'),
    (['--mean', '0.5', '--std', '0', '--test_mode', 'ann'], '--std must be positive'),
    (['--mean', '0.5', '--std', '0.5', '--imagenet_default_mean_and_std'], 'pass one'),
])
def test_bad_mean_std_are_one_error_line(tmp_path, digits, flags, says):
    assert says in one_error(tmp_path, *COMMON, '--model_path', str(digits[0]), *flags)


def test_data_config_timm_reads_the_checkpoint_pretrained_cfg(tmp_path):
    cfg = {'mean': [0.5, 0.5, 0.5], 'std': [0.25, 0.25, 0.25], 'crop_pct': 0.9, 'interpolation': 'bilinear'}
    torch.save({'state_dict': tiny_timm().state_dict(), 'pretrained_cfg': cfg}, tmp_path / 'cfg.pth')
    record = main(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(tmp_path / 'cfg.pth'),
                  '--data_config', 'timm')
    transform = record['transform']
    assert transform['mean'] == cfg['mean'] and transform['std'] == cfg['std']
    assert transform['crop_pct'] == 0.9 and transform['interpolation'] == 'bilinear'


# ------------------------------------------------------------------------------------------
# --ann_results of another run
# ------------------------------------------------------------------------------------------
def test_ann_results_of_another_model_or_data_are_refused(tmp_path, digits):
    weights_file, checkpoint = digits
    main(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(weights_file),
         '--results', str(tmp_path / 'ann.json'))
    ok = main(tmp_path, *DATA, '--test_mode', 'snn', '--model_path', str(checkpoint), '--test_T', '1',
              '--ann_results', str(tmp_path / 'ann.json'))
    assert ok['ann_acc1'] == json.loads((tmp_path / 'ann.json').read_text())['acc1']
    other = json.loads((tmp_path / 'ann.json').read_text())
    other.update(model='deit_small_patch16_224', n=1000)
    (tmp_path / 'other.json').write_text(json.dumps(other))
    line = one_error(tmp_path, *DATA, '--test_mode', 'snn', '--model_path', str(checkpoint), '--ann_results',
                     str(tmp_path / 'other.json'), '--output_dir', str(tmp_path), '--results', str(tmp_path / 's.json'))
    assert 'model deit_small_patch16_224 (this run: vit_tiny_patch16_224)' in line
    assert 'images 1000 (this run: 450)' in line
    assert not (tmp_path / 's.json').exists()


# ------------------------------------------------------------------------------------------
# The per-step energy line names its energy model
# ------------------------------------------------------------------------------------------
def test_the_per_step_energy_line_is_the_chosen_energy_model(tmp_path, digits, capsys):
    _, checkpoint = digits
    records = {}
    for model in ('ecmt', 'fp32'):
        records[model] = main(tmp_path, *DATA, '--test_mode', 'snn', '--model_path', str(checkpoint), '--test_T',
                              '2', '--energy_model', model)
        out = capsys.readouterr().out
        ratio = records[model]['energy']['ratio'][1]
        assert f'energy vs ANN ({model}) {ratio:.4f}' in out
    assert records['ecmt']['energy']['ratio'] != records['fp32']['energy']['ratio']
    assert records['ecmt']['energy_ratio'] == records['fp32']['energy_ratio']  # the published figure, kept


# ------------------------------------------------------------------------------------------
# Output paths and two runs on the same files
# ------------------------------------------------------------------------------------------
def test_a_folder_where_a_file_is_to_be_written_is_refused_before_any_work(tmp_path, digits):
    weights_file, checkpoint = digits
    (tmp_path / 'res').mkdir()
    line = one_error(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(weights_file), '--results',
                     str(tmp_path / 'res'))
    assert f'--results {tmp_path / "res"} is a folder' in line
    suggested = line.split('(e.g. ', 1)[1].split(')', 1)[0]  # following it works
    assert main(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(weights_file), '--results',
                suggested)['n'] == 450 and Path(suggested).is_file()
    (Path(suggested)).unlink()
    (tmp_path / 'cal.pth').mkdir()
    line = one_error(tmp_path, *COMMON, '--test_mode', 'for_v', '--model_path', str(weights_file), '--savename', 'cal',
                     '--output_dir', str(tmp_path))
    assert 'cal.pth is a folder' in line
    (tmp_path / 'fv_snn_layers.csv').mkdir()
    line = one_error(tmp_path, *DATA, '--test_mode', 'snn', '--model_path', str(checkpoint), '--output_dir',
                     str(tmp_path))
    assert 'fv_snn_layers.csv is a folder' in line
    assert len((tmp_path / 'log_ann.txt').read_text().split('=== ')) == 2  # only the run that was fixed
    assert not (tmp_path / 'log_snn.txt').exists()  # the refused runs started nothing


def test_a_second_run_on_the_same_files_is_refused_while_the_first_runs(tmp_path, digits):
    weights_file, _ = digits
    holder = subprocess.Popen([sys.executable, '-c', (
        'import sys, time; sys.path.insert(0, sys.argv[1]); import utils; '
        'utils.lock_outputs([sys.argv[2]], "--results"); print("held", flush=True); time.sleep(60)'),
        str(REPO), str(tmp_path / 'r.json')], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == 'held'
        line = one_error(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(weights_file), '--results',
                         str(tmp_path / 'r.json'))
        assert f'is writing {tmp_path / "r.json"} now' in line and f'pid {holder.pid}' in line
    finally:
        holder.kill()
        holder.wait()
    # Once that run has ended (however it ended), the same command runs.
    assert main(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(weights_file), '--results',
                str(tmp_path / 'r.json'))['n'] == 450


# ------------------------------------------------------------------------------------------
# torchrun settings left in the environment; BEiT/DeiT launch flags
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('env', [{'WORLD_SIZE': '2', 'RANK': '0'}, {'WORLD_SIZE': '2'},
                                 {'WORLD_SIZE': '4', 'RANK': '7', 'MASTER_ADDR': 'x', 'MASTER_PORT': '1'}])
def test_a_partial_torchrun_environment_is_one_line_saying_how_to_launch(tmp_path, digits, env):
    clean = {k: v for k, v in os.environ.items() if k not in ('WORLD_SIZE', 'RANK', 'LOCAL_RANK', 'MASTER_ADDR',
                                                             'MASTER_PORT')}
    line = one_error(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(digits[0]),
                     env={**clean, **env, 'OMP_NUM_THREADS': '1'})
    assert f'torchrun --nproc_per_node={env["WORLD_SIZE"]} run_class_finetuning.py' in line
    assert 'unset WORLD_SIZE RANK LOCAL_RANK' in line
    # Following it (one process): the run goes through.
    code, _ = command(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(digits[0]),
                      env={**clean, 'OMP_NUM_THREADS': '1'})
    assert code == 0


def test_beit_and_deit_launch_flags_are_accepted_or_refused_with_the_torchrun_command(tmp_path, digits):
    record = main(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(digits[0]), '--dist_eval',
                  '--local_rank', '0', '--world_size', '1', '--dist_url', 'env://')
    assert record['n'] == 450
    line = one_error(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(digits[0]), '--world_size', '4')
    assert 'torchrun --nproc_per_node=4 run_class_finetuning.py' in line
    line = one_error(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(digits[0]), '--dist_url',
                     'tcp://10.0.0.1:23456')
    assert 'torchrun' in line
