"""Weights as timm and the hub ship them, through the command line, offline (issue 25):
safetensors read by content, --pretrained from a Hugging Face cache the test builds (hf_hub: names,
published aliases, timm tags) under HF_HUB_OFFLINE=1, --pretrained_file, and the failure cases."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import run_class_finetuning as cli
from helpers_cli import COMMON, REPO, tiny_timm
from utils import UserError

DATA = ['--data_set', 'DIGITS', '--num_workers', '0', '--batch_size', '150', '--device', 'cpu', '--no_progress']
TINY_ARGS = {'patch_size': 4, 'embed_dim': 32, 'depth': 2, 'num_heads': 2}
REVISION = '0123456789abcdef0123456789abcdef01234567'


# One intra-op thread (conftest.single_thread): the runs here are tiny.
pytestmark = pytest.mark.usefixtures('single_thread')


@pytest.fixture(scope='module')
def files(tmp_path_factory):
    """The same tiny model as a torch.save file and as a safetensors file with another extension."""
    folder = tmp_path_factory.mktemp('weights')
    state = tiny_timm().state_dict()
    torch.save({'model': state}, folder / 'tiny.pth')
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / 'tiny.weights'))
    return folder / 'tiny.pth', folder / 'tiny.weights'


def run(tmp_path, *extra):
    args = cli.get_args_parser().parse_args(COMMON + ['--log_dir', str(tmp_path), '--output_dir', str(tmp_path),
                                                      *extra])
    return cli.main(args)


def test_safetensors_and_pth_give_identical_ann_for_v_and_snn(tmp_path, files):
    pth, safe = files
    results = {}
    for name, path in (('pth', pth), ('safe', safe)):
        ann = run(tmp_path, '--test_mode', 'ann', '--model_path', str(path))
        for_v = run(tmp_path, '--test_mode', 'for_v', '--model_path', str(path), '--savename', f'{name}_for_v')
        snn = run(tmp_path, '--test_mode', 'snn', '--model_path', for_v['checkpoint'], '--test_T', '2')
        thresholds = torch.load(for_v['checkpoint'], weights_only=True)['model']
        results[name] = (ann, snn, thresholds)
        assert ann['weights'] == {'kind': 'file', 'path': str(path)}
        assert snn['weights']['from'] == {'kind': 'file', 'path': str(path)}
    (ann_a, snn_a, th_a), (ann_b, snn_b, th_b) = results['pth'], results['safe']
    assert ann_a['acc1'] == ann_b['acc1'] and ann_a['loss'] == ann_b['loss']
    assert snn_a['acc1'] == snn_b['acc1'] and snn_a['fire_rate'] == snn_b['fire_rate']
    assert th_a.keys() == th_b.keys() and all(torch.equal(th_a[k], th_b[k]) for k in th_a)


def test_pretrained_file_goes_through_timm_loading(tmp_path, files):
    pth, safe = files
    plain = run(tmp_path, '--test_mode', 'ann', '--model_path', str(pth))
    loaded = run(tmp_path, '--test_mode', 'ann', '--pretrained_file', str(safe))
    assert loaded['acc1'] == plain['acc1'] and loaded['weights'] == {'kind': 'file', 'path': str(safe)}


@pytest.mark.parametrize('content, message', [
    ('truncated', 'truncated or damaged'),
    ('other_keys', 'missing keys'),
])
def test_bad_safetensors_files(tmp_path, files, content, message):
    _, safe = files
    path = tmp_path / 'bad.safetensors'
    if content == 'truncated':
        path.write_bytes(safe.read_bytes()[:-100])
    else:
        save_file({'encoder.weight': torch.zeros(2, 2), 'patch_embed.proj.bias': torch.zeros(32)}, str(path))
    with pytest.raises(UserError, match=message):
        run(tmp_path, '--test_mode', 'ann', '--model_path', str(path))


# ------------------------------------------------------------------------------------------
# A Hugging Face cache built by the test, read with HF_HUB_OFFLINE=1
# ------------------------------------------------------------------------------------------
def add_to_cache(hf_home: Path, repo: str, files: dict) -> None:
    """Write `files` (name -> bytes, or a state dict for model.safetensors) as the main revision of
    `repo` in the cache layout huggingface_hub reads: refs/main and snapshots/<commit>/."""
    folder = hf_home / 'hub' / ('models--' + repo.replace('/', '--'))
    snapshot = folder / 'snapshots' / REVISION
    snapshot.mkdir(parents=True, exist_ok=True)
    (folder / 'refs').mkdir(exist_ok=True)
    (folder / 'refs' / 'main').write_text(REVISION)
    for name, content in files.items():
        if isinstance(content, dict):
            save_file({k: v.contiguous() for k, v in content.items()}, str(snapshot / name))
        else:
            (snapshot / name).write_bytes(content)


def timm_config(architecture: str) -> bytes:
    return json.dumps({'architecture': architecture, 'num_classes': 10, 'model_args': dict(TINY_ARGS, img_size=16),
                       'pretrained_cfg': {'input_size': [3, 16, 16], 'crop_pct': 1.0, 'interpolation': 'bicubic',
                                          'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5],
                                          'num_classes': 10}}).encode()


@pytest.fixture(scope='module')
def hf_home(tmp_path_factory):
    home = tmp_path_factory.mktemp('hf_home')
    state = tiny_timm().state_dict()
    add_to_cache(home, 'someone/tiny-vit', {'config.json': timm_config('vit_tiny_patch16_224'),
                                            'model.safetensors': state})
    # The published alias vit_base_patch16_224_cifar10 names this repository.
    add_to_cache(home, 'edadaltocg/vit_base_patch16_224_in21k_ft_cifar10',
                 {'config.json': timm_config('vit_base_patch16_224'), 'model.safetensors': state})
    # timm's default tag of vit_tiny_patch16_224 lives in this repository.
    add_to_cache(home, 'timm/vit_tiny_patch16_224.augreg_in21k_ft_in1k', {'model.safetensors': state})
    add_to_cache(home, 'someone/not-timm', {'config.json': json.dumps(
        {'architectures': ['ViTForImageClassification'], 'model_type': 'vit'}).encode()})
    return home


def cli_offline(hf_home, cwd, *args):
    env = dict(os.environ, OMP_NUM_THREADS='1', HF_HOME=str(hf_home), HF_HUB_OFFLINE='1')
    env.pop('HF_HUB_CACHE', None)
    return subprocess.run([sys.executable, str(REPO / 'run_class_finetuning.py'), *DATA, *args,
                           '--log_dir', str(cwd), '--output_dir', str(cwd)],
                          capture_output=True, text=True, cwd=cwd, env=env, timeout=300)


def test_hf_hub_name_and_published_alias_load_offline_and_are_recorded(tmp_path, hf_home, files):
    pth, _ = files
    reference = run(tmp_path, '--test_mode', 'ann', '--model_path', str(pth))
    # No --model_kwargs, --input_size nor --nb_classes: the hub's config.json gives them.
    proc = cli_offline(hf_home, tmp_path, '--model', 'hf_hub:someone/tiny-vit', '--pretrained', '--test_mode', 'for_v',
                       '--savename', 'hub_for_v', '--results', str(tmp_path / 'hub.json'))
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / 'hub.json').read_text())
    assert saved['acc1'] == pytest.approx(reference['acc1'])
    assert saved['weights']['id'] == 'someone/tiny-vit' and saved['weights']['revision'] == REVISION
    record = torch.load(tmp_path / 'hub_for_v.pth', weights_only=True)['calibration']
    assert record['weights']['id'] == 'someone/tiny-vit' and record['weights']['revision'] == REVISION
    assert record['architecture'] == 'vit_tiny_patch16_224' and record['nb_classes'] == 10
    assert record['input_size'] == 16
    # snn on that file needs no model flags at all: the record rebuilds the model (no hub access).
    snn = run_plain(tmp_path, '--test_mode', 'snn', '--model_path', str(tmp_path / 'hub_for_v.pth'), '--test_T', '1')
    assert snn['n'] == 450 and snn['weights']['from']['id'] == 'someone/tiny-vit'

    proc = cli_offline(hf_home, tmp_path, '--model', 'vit_base_patch16_224_cifar10', '--pretrained', '--test_mode', 'ann',
                       '--results', str(tmp_path / 'alias.json'))
    assert proc.returncode == 0, proc.stderr
    alias = json.loads((tmp_path / 'alias.json').read_text())
    assert alias['acc1'] == pytest.approx(reference['acc1'])
    assert alias['weights']['id'] == 'edadaltocg/vit_base_patch16_224_in21k_ft_cifar10'


def run_plain(tmp_path, *extra):
    """The command line with the data flags only (no model flags)."""
    args = cli.get_args_parser().parse_args(DATA + ['--log_dir', str(tmp_path), '--output_dir', str(tmp_path), *extra])
    return cli.main(args)


def test_timm_name_with_default_tag_loads_offline(tmp_path, hf_home, files):
    pth, _ = files
    reference = run(tmp_path, '--test_mode', 'ann', '--model_path', str(pth))
    kwargs = [f'{k}={v}' for k, v in TINY_ARGS.items()]
    proc = cli_offline(hf_home, tmp_path, '--model', 'vit_tiny_patch16_224', '--pretrained', '--model_kwargs', *kwargs,
                       '--test_mode', 'ann', '--results', str(tmp_path / 'timm.json'))
    assert proc.returncode == 0, proc.stderr
    saved = json.loads((tmp_path / 'timm.json').read_text())
    assert saved['acc1'] == pytest.approx(reference['acc1'])
    assert saved['weights']['name'] == 'vit_tiny_patch16_224.augreg_in21k_ft_in1k'
    assert saved['weights']['revision'] == REVISION


@pytest.mark.parametrize('model, message', [
    ('hf_hub:someone/absent', 'no network and no cached copy of config.json of someone/absent'),
    ('vit_small_patch16_224', 'no network and no cached copy of model.safetensors or pytorch_model.bin of '
                              'timm/vit_small_patch16_224.augreg_in21k_ft_in1k'),
    ('hf_hub:someone/not-timm', 'is not a timm model'),
])
def test_pretrained_failures_are_one_line_and_write_nothing(tmp_path, hf_home, model, message):
    proc = cli_offline(hf_home, tmp_path, '--model', model, '--pretrained', '--test_mode', 'for_v',
                       '--results', str(tmp_path / 'r.json'))
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error: ') and message in lines[0], proc.stderr
    if 'no network' in message:
        assert 'HF_HUB_OFFLINE=1 is set' in lines[0] and '--model_path' in lines[0]
    assert not (tmp_path / 'r.json').exists() and not (tmp_path / 'test.pth').exists()
