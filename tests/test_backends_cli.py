"""``--backend`` through the command line, as a user runs it: the same snn per-step accuracies and
energies on every backend (triton on the CPU in Triton's interpreter), the backend recorded in the
results, and a backend that cannot run on the device refused with one line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

import run_class_finetuning as cli
import trans_utils

REPO = Path(__file__).resolve().parents[1]
COMMON = ['--model', 'vit_tiny_patch16_224', '--model_kwargs', 'patch_size=4', 'embed_dim=32', 'depth=2',
          'num_heads=2', '--input_size', '16', '--nb_classes', '10', '--data_set', 'DIGITS', '--num_workers', '0',
          '--batch_size', '150', '--device', 'cpu', '--no_progress']


@pytest.fixture(scope='module')
def for_v_checkpoint(tmp_path_factory):
    out = tmp_path_factory.mktemp('backends')
    torch.manual_seed(0)
    model = timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=16, patch_size=4, embed_dim=32,
                              depth=2, num_heads=2)
    torch.save({'model': model.state_dict()}, out / 'tiny.pth')
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        args = cli.get_args_parser().parse_args(
            COMMON + ['--test_mode', 'for_v', '--model_path', str(out / 'tiny.pth'), '--savename', 'tiny_for_v',
                      '--output_dir', str(out), '--log_dir', str(out)])
        record = cli.main(args)
    finally:
        torch.set_num_threads(threads)
    return Path(record['checkpoint'])


def snn(tmp_path, checkpoint, backend, capsys, T=3):
    """The command line's main in this process (tests/conftest.py set TRITON_INTERPRET=1, as a user
    would for the CPU), all 450 images in one batch (the interpreter's cost is per launch)."""
    args = cli.get_args_parser().parse_args(
        COMMON + ['--batch_size', '450', '--test_mode', 'snn', '--model_path', str(checkpoint), '--test_T', str(T),
                  '--backend', backend, '--output_dir', str(tmp_path), '--log_dir', str(tmp_path),
                  '--savename', backend, '--results', str(tmp_path / f'{backend}.json')])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli.main(args)
    finally:
        torch.set_num_threads(threads)
    return capsys.readouterr().out, json.loads((tmp_path / f'{backend}.json').read_text())


@pytest.fixture(scope='module')
def native_run(tmp_path_factory, for_v_checkpoint):
    """The native backend's record, which every other backend is held to (run once)."""
    problem = trans_utils.backend_problem('native', 'cpu')
    if problem is not None:
        pytest.skip(f'the native backend cannot run here: {problem}')
    out = tmp_path_factory.mktemp('native')
    args = cli.get_args_parser().parse_args(
        COMMON + ['--batch_size', '450', '--test_mode', 'snn', '--model_path', str(for_v_checkpoint), '--test_T',
                  '3', '--backend', 'native', '--output_dir', str(out), '--log_dir', str(out), '--savename',
                  'native', '--results', str(out / 'native.json')])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        cli.main(args)
    finally:
        torch.set_num_threads(threads)
    return json.loads((out / 'native.json').read_text())


@pytest.mark.parametrize('backend', ['native', 'triton', 'eager'])
def test_every_backend_gives_the_native_accuracies_and_energies(tmp_path, for_v_checkpoint, native_run, backend,
                                                                capsys):
    problem = trans_utils.backend_problem(backend, 'cpu')
    if problem is not None:
        pytest.skip(f'the {backend} backend cannot run here: {problem}')  # reported, not dropped
    out, record = snn(tmp_path, for_v_checkpoint, backend, capsys)
    assert record['backend'] == backend and f'snn: backend {backend} on cpu' in out
    want = native_run
    assert want['n'] == 450 and len(want['acc1']) == 3
    # The same spikes (the kernels' EC values differ by float rounding only): the same
    # accuracies after every step, and the same energy to rounding of a rare edge spike.
    assert record['acc1'] == want['acc1'], backend
    assert record['energy_ratio'] == pytest.approx(want['energy_ratio'], rel=1e-4), backend
    assert record['fire_rate'] == pytest.approx(want['fire_rate'], rel=1e-4), backend


def test_a_backend_that_cannot_run_here_is_one_error_line(tmp_path, for_v_checkpoint):
    env = dict(os.environ)
    env.pop('TRITON_INTERPRET', None)  # triton on the CPU without its interpreter
    done = subprocess.run([sys.executable, str(REPO / 'run_class_finetuning.py'), *COMMON, '--test_mode', 'snn',
                           '--model_path', str(for_v_checkpoint), '--test_T', '1', '--backend', 'triton',
                           '--output_dir', str(tmp_path), '--log_dir', str(tmp_path)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert done.returncode == 2, done.stderr[-2000:]
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert lines[-1].startswith('error:') and "backend 'triton' cannot run here" in lines[-1]
    assert 'Traceback' not in done.stderr
    assert not list(tmp_path.glob('*.json'))
