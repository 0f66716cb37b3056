"""A researcher's own models, data and mistakes through the command line (issue 26): the for_v
record rebuilds the model, a checkpoint of another architecture is diagnosed from its shapes,
unreadable images, Ctrl-C, --help, progress output and top-k."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

import options
import torch
from PIL import Image

import cli_base
import run_class_finetuning as cli
from helpers_cli import ARCH, COMMON, REPO, tiny_timm
from utils import UserError

DATA = ['--data_set', 'DIGITS', '--num_workers', '0', '--batch_size', '150', '--device', 'cpu', '--no_progress']


# One intra-op thread (conftest.single_thread): the runs here are tiny.
pytestmark = pytest.mark.usefixtures('single_thread')


def main(tmp_path, *args):
    parsed = cli.get_args_parser().parse_args([*args, '--log_dir', str(tmp_path), '--output_dir', str(tmp_path)])
    return cli.main(parsed)


@pytest.fixture(scope='module')
def for_v_file(tmp_path_factory):
    folder = tmp_path_factory.mktemp('record')
    torch.save({'model': tiny_timm().state_dict()}, folder / 'tiny.pth')
    record = main(folder, *COMMON, '--test_mode', 'for_v', '--model_path', str(folder / 'tiny.pth'),
                  '--savename', 'tiny_for_v', '--linear_num', '6')
    return Path(record['checkpoint'])


# ------------------------------------------------------------------------------------------
# 1. The for_v record
# ------------------------------------------------------------------------------------------
def test_for_v_records_what_rebuilds_the_model(for_v_file):
    record = torch.load(for_v_file, weights_only=True)['calibration']
    assert record['model'] == 'vit_tiny_patch16_224' and record['architecture'] == 'vit_tiny_patch16_224'
    assert record['model_kwargs'] == ARCH[1:] and record['input_size'] == 16 and record['nb_classes'] == 10
    assert record['levels'] == {'linear_num': 6, 'qkv_num': 8, 'softmax_num': 8, 'softmax_p': 0.0125,
                                'fc2_thresholds': [0.25, 0.08]}


def test_snn_and_ann_on_a_for_v_file_need_no_model_flags(tmp_path, for_v_file, monkeypatch):
    seen, real = [], cli.convert_to_snn
    monkeypatch.setattr(cli, 'convert_to_snn', lambda model, **kw: seen.append(kw) or real(model, **kw))
    full = main(tmp_path, *COMMON, '--test_mode', 'snn', '--model_path', str(for_v_file), '--test_T', '2')
    bare = main(tmp_path, *DATA, '--test_mode', 'snn', '--model_path', str(for_v_file), '--test_T', '2')
    assert bare['acc1'] == full['acc1'] and bare['model'] == 'vit_tiny_patch16_224'
    assert seen[1]['linear_num'] == 6 and seen[1]['fc2_thresholds'] == (0.25, 0.08)
    ann = main(tmp_path, *DATA, '--test_mode', 'ann', '--model_path', str(for_v_file))
    assert ann['n'] == 450


@pytest.mark.parametrize('flags, message', [
    (['--model', 'deit_tiny_patch16_224'], '--model vit_tiny_patch16_224 (this run: deit_tiny_patch16_224)'),
    (['--input_size', '24'], '--input_size 16 (this run: 24)'),
    (['--nb_classes', '7'], '--nb_classes 10 (this run: 7)'),
    (['--model_kwargs', 'patch_size=4', 'embed_dim=32', 'depth=2', 'num_heads=4'], 'num_heads=2 (this run: '),
])
def test_a_given_flag_that_differs_from_the_record_is_an_error(tmp_path, for_v_file, flags, message):
    proc = subprocess.run([sys.executable, str(REPO / 'run_class_finetuning.py'), *DATA, *flags, '--test_mode', 'snn',
                           '--model_path', str(for_v_file), '--log_dir', str(tmp_path), '--output_dir', str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], proc.stderr
    assert 'was calibrated with' in lines[0] and not list(tmp_path.glob('*.csv'))


def test_a_level_flag_may_differ_and_is_said(tmp_path, for_v_file, capsys):
    record = main(tmp_path, *DATA, '--test_mode', 'snn', '--model_path', str(for_v_file), '--test_T', '1',
                  '--linear_num', '8', '--no-monitor')
    assert record['n'] == 450
    assert 'note: --linear_num 8 (the calibration recorded 6)' in capsys.readouterr().err


# ------------------------------------------------------------------------------------------
# 2. A checkpoint of another architecture
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('kwargs, says, fits, never', [
    ({'embed_dim': 64}, ['width (embed_dim) 64 (the model: 32)'],
     '--model_kwargs patch_size=4 embed_dim=64 depth=2 num_heads=2', ['classes', 'pos_embed', 'depth 3']),
    ({'depth': 3, 'mlp_ratio': 2.0}, ['depth 3 (the model: 2)', 'MLP ratio 2.0 (the model: 4.0)'],
     '--model_kwargs patch_size=4 embed_dim=32 depth=3 num_heads=2 mlp_ratio=2', ['width (', 'patch size']),
    ({'patch_size': 8, 'num_classes': 7}, ['patch size 8 (the model: 4)', 'class count 7 (the model: 10)'],
     '--model_kwargs patch_size=8 embed_dim=32 depth=2 num_heads=2 --nb_classes 7', ['resample', 'width (']),
])
def test_another_architecture_is_diagnosed_from_the_shapes(tmp_path, kwargs, says, fits, never):
    path = tmp_path / 'other.pth'
    torch.save(tiny_timm(**kwargs).state_dict(), path)
    with pytest.raises(UserError) as info:
        main(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(path))
    message = str(info.value)
    assert 'is another architecture than --model vit_tiny_patch16_224' in message
    for text in says + [fits]:
        assert text in message, message
    for text in never:
        assert text not in message, message
    if '--nb_classes' not in fits:  # following the advice works (on the 10 classes of DIGITS)
        args = list(COMMON)
        start = args.index('--model_kwargs')
        args[start:start + len(ARCH)] = fits.split()
        record = main(tmp_path, *args, '--test_mode', 'ann', '--model_path', str(path))
        assert record['n'] == 450


def make_folder(root: Path, classes: int = 2, per_class: int = 3, bad: bool = False) -> Path:
    folder = root / f'images_{classes}'
    for c in range(classes):
        sub = folder / f'class_{c}'
        sub.mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.new('RGB', (20, 20), (40 * c, 10 * i, 90)).save(sub / f'{i}.png')
    if bad:
        (folder / 'class_1' / 'broken.jpg').write_bytes(b'this is not a JPEG file')
    return folder


# ------------------------------------------------------------------------------------------
# 3. Unreadable images; 7. top-k and progress output
# ------------------------------------------------------------------------------------------
def folder_cli(tmp_path, folder, *extra, progress=False):
    torch.save(tiny_timm(num_classes=2).state_dict(), tmp_path / 'two.pth')
    args = ['--model', 'vit_tiny_patch16_224', *ARCH, '--input_size', '16', '--nb_classes', '2',
            '--data_set', 'image_folder', '--eval_data_path', str(folder), '--batch_size', '2', '--device', 'cpu',
            '--model_path', str(tmp_path / 'two.pth'), '--log_dir', str(tmp_path), '--output_dir', str(tmp_path),
            *extra] + ([] if progress else ['--no_progress'])
    return subprocess.run([sys.executable, str(REPO / 'run_class_finetuning.py'), *args], capture_output=True,
                          text=True, cwd=tmp_path, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))


@pytest.mark.parametrize('workers', ['0', '1'])
def test_an_unreadable_image_is_one_error_line_naming_it(tmp_path, workers):
    folder = make_folder(tmp_path, bad=True)
    proc = folder_cli(tmp_path, folder, '--test_mode', 'for_v', '--num_workers', workers,
                      '--results', str(tmp_path / 'r.json'))
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: cannot read the image ')
    assert 'broken.jpg' in lines[0] and '--skip_bad_images' in lines[0]
    assert not (tmp_path / 'r.json').exists() and not (tmp_path / 'test.pth').exists()


def test_skip_bad_images_names_and_counts_them_and_two_classes_have_no_top5(tmp_path):
    folder = make_folder(tmp_path, bad=True)
    proc = folder_cli(tmp_path, folder, '--test_mode', 'ann', '--num_workers', '0', '--skip_bad_images',
                      '--results', str(tmp_path / 'r.json'), progress=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count('broken.jpg') == 1 and 'warning: skipped the unreadable image' in proc.stderr
    saved = json.loads((tmp_path / 'r.json').read_text())
    assert saved['n'] == 6 and len(saved['skipped_images']) == 1 and 'acc5' not in saved
    assert 'top-5' not in proc.stdout and 'top-5' not in (tmp_path / 'log_ann.txt').read_text()
    # Output redirected: no progress bar frames, a progress line instead (4 batches, --print_freq 10).
    assert '\r' not in proc.stderr and '\r' not in proc.stdout
    assert 'ann: batch 3/4, acc1' in proc.stdout  # the 4th batch held only the unreadable file


# ------------------------------------------------------------------------------------------
# 4. Ctrl-C
# ------------------------------------------------------------------------------------------
def test_ctrl_c_during_a_run_is_one_line_and_exit_130(tmp_path, for_v_file):
    # Not --no_progress: with output redirected, a progress line per batch (--print_freq 1).
    args = [sys.executable, str(REPO / 'run_class_finetuning.py'), *DATA[:-1], '--batch_size', '5', '--test_mode', 'snn',
            '--model_path', str(for_v_file), '--test_T', '8', '--print_freq', '1', '--log_dir', str(tmp_path),
            '--output_dir', str(tmp_path), '--results', str(tmp_path / 'r.json')]
    # The child gets Ctrl-C's default disposition: a suite started in the background by a
    # non-interactive shell (`pytest &`) ignores SIGINT, and a child would inherit that and run on.
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                            env=dict(os.environ, OMP_NUM_THREADS='1'),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    for line in proc.stdout:  # wait until the simulation runs
        if 'batch 2/' in line:
            break
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    lines = err.strip().splitlines()
    assert lines == [lines[-1]] and lines[-1].startswith('interrupted: nothing was written'), err
    assert 'log_snn.txt' in lines[-1] and not (tmp_path / 'r.json').exists()


def test_ctrl_c_during_a_checkpoint_write_finishes_the_file(tmp_path):
    """The interrupt waits for the end of the write: the file is whole, then the run stops, and the
    line names it; no torch RuntimeError from the zip writer."""
    script = f'''
import os, signal, sys
sys.path.insert(0, {str(REPO)!r})
import torch, cli_base, utils

def main(args):
    real = torch.save
    def save(obj, fh):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C in the middle of the write
        real(obj, fh)
    torch.save = save
    utils.save_checkpoint({{'model': {{'w': torch.ones(1000)}}}}, {str(tmp_path / 'ckpt.pth')!r})
    print('not reached')

import argparse
cli_base.run_cli(main, argparse.ArgumentParser())
'''
    proc = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 130, proc.stderr
    assert proc.stderr.strip() == f'interrupted: written before the interruption: {tmp_path / "ckpt.pth"}'
    assert 'not reached' not in proc.stdout
    assert torch.equal(torch.load(tmp_path / 'ckpt.pth', weights_only=True)['model']['w'], torch.ones(1000))
    assert [p.name for p in tmp_path.iterdir()] == ['ckpt.pth']  # no temporary file left


# ------------------------------------------------------------------------------------------
# 5. --help
# ------------------------------------------------------------------------------------------
def test_help_is_fast_names_the_script_and_imports_no_torch():
    code = ('import runpy, sys, time; start = time.perf_counter(); sys.argv = ["run_class_finetuning.py", "--help"]\n'
            'try:\n    runpy.run_path("run_class_finetuning.py", run_name="__main__")\n'
            'except SystemExit:\n    pass\n'
            'print("TORCH" if "torch" in sys.modules else "NO TORCH", time.perf_counter() - start)')
    proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith('usage: run_class_finetuning.py ')
    *verdict, seconds = proc.stdout.strip().splitlines()[-1].split()
    assert verdict == ['NO', 'TORCH'] and float(seconds) < 2.0
    bad = subprocess.run([sys.executable, 'run_class_finetuning.py', '--test_T', 'x'], capture_output=True,
                         text=True, cwd=REPO, timeout=60)
    assert bad.returncode == 2 and "invalid int value: 'x'" in bad.stderr


def test_every_flag_has_help_and_shows_its_default():
    parser = cli.get_args_parser()
    text = parser.format_help()
    for action in parser._actions:
        if not action.option_strings or action.dest == 'help':
            continue
        assert action.help, action.dest
        if action.default not in (None, False, [], True) or action.dest == 'monitor':
            assert 'default' in parser._get_formatter()._get_help_string(action).lower(), action.dest
    for shown in ('(default: vit_small_patch16_224)', '(default: 8)', '(default: 0.99)', '(default: 0.0125)',
                  '(default: 64)', '(default: 0)', f'(default: {options.DEFAULT_BUDGET})'):
        assert shown in ' '.join(text.split()), shown


def test_given_flags_are_told_from_defaults():
    parser = cli.get_args_parser()
    args = parser.parse_args(['--input_size', '224', '--no-monitor', '--model_kwargs', 'depth=2'])
    assert {'input_size', 'monitor', 'model_kwargs'} <= args.given
    assert 'model' not in args.given and 'nb_classes' not in args.given
    assert cli_base.given_flags(args) == args.given


def test_search_defaults_are_read_from_low_latency():
    import low_latency
    args = cli.get_args_parser().parse_args([])
    assert tuple(args.target_percents) == tuple(low_latency.DEFAULT_PERCENTS)
    assert args.search_budget == low_latency.DEFAULT_BUDGET
    assert args.search_prefix_weight == low_latency.DEFAULT_PREFIX_WEIGHT
    assert set(cli.get_args_parser()._option_string_actions['--search_objective'].choices) == \
        set(low_latency.OBJECTIVES)
