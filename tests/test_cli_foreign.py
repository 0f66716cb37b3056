"""Checkpoints from other training code (issue 32, items 1, 2 and 9): the layouts other scripts
write go through one pure filter and run; weights of another timm family are recognised from their
key names, and every hint the diagnosis prints is followed here and runs."""
import subprocess
import sys

import pytest
import timm
import torch

import run_class_finetuning as cli
import weights
from helpers_cli import ARCH, COMMON, REPO, tiny_timm
from utils import UserError

pytestmark = pytest.mark.usefixtures('single_thread')


def main(tmp_path, *args):
    return cli.main(cli.get_args_parser().parse_args(
        [*args, '--log_dir', str(tmp_path), '--output_dir', str(tmp_path)]))


@pytest.fixture(scope='module')
def plain(tmp_path_factory):
    """A timm state dict as torch.save writes it, and the ann top-1 it gives."""
    out = tmp_path_factory.mktemp('plain')
    torch.save(tiny_timm().state_dict(), out / 'plain.pth')
    record = main(out, *COMMON, '--test_mode', 'ann', '--model_path', str(out / 'plain.pth'))
    return tiny_timm().state_dict(), record['acc1']


LAYOUTS = {
    # PyTorch Lightning: the LightningModule's attribute (self.model) prefixes every key.
    'lightning': (lambda sd: {'state_dict': {f'model.{k}': v for k, v in sd.items()}, 'epoch': 3,
                              'global_step': 30, 'pytorch-lightning_version': '2.4.0',
                              'optimizer_states': [{'state': {}, 'param_groups': []}], 'hyper_parameters': {'lr': 0.1}},
                  'model.'),
    'tutorial': (lambda sd: {'model_state_dict': sd, 'optimizer_state_dict': {'state': {}}, 'epoch': 5,
                             'loss': torch.tensor(0.3)}, ''),
    'model_prefix': (lambda sd: {f'model.{k}': v for k, v in sd.items()}, 'model.'),
    'compiled': (lambda sd: {f'_orig_mod.{k}': v for k, v in sd.items()}, '_orig_mod.'),
    'ddp_of_compiled': (lambda sd: {'model': {f'module._orig_mod.{k}': v for k, v in sd.items()}},
                        'module._orig_mod.'),
}


@pytest.mark.parametrize('layout', sorted(LAYOUTS))
def test_checkpoints_of_other_training_code_run_and_name_the_prefix(tmp_path, plain, layout, capsys):
    state_dict, acc1 = plain
    wrap, prefix = LAYOUTS[layout]
    torch.save(wrap(state_dict), tmp_path / f'{layout}.ckpt')
    record = main(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(tmp_path / f'{layout}.ckpt'))
    assert record['acc1'] == acc1 and record['n'] == 450
    out = capsys.readouterr().out
    if prefix:
        assert f"stripped the prefix '{prefix}' found on every key" in out
    else:
        assert 'stripped the prefix' not in out


def test_the_layout_filter_is_pure_and_keeps_layers_named_alike():
    sd = {'model.blocks.0.w': torch.ones(1), 'model.head.b': torch.zeros(1)}
    wrapped = {'state_dict': sd, 'epoch': 1}
    clean, extras, prefix = weights.clean_checkpoint(wrapped)
    assert clean == {'blocks.0.w': sd['model.blocks.0.w'], 'head.b': sd['model.head.b']}
    assert clean['blocks.0.w'] is sd['model.blocks.0.w'] and extras == {'epoch': 1} and prefix == 'model.'
    assert list(sd) == ['model.blocks.0.w', 'model.head.b']  # the input is unchanged
    # One layer's weight and bias share a first component: that is a layer, not a wrapper.
    layer = {'fc.weight': torch.ones(1), 'fc.bias': torch.ones(1)}
    assert weights.clean_checkpoint(layer)[0].keys() == layer.keys()
    with pytest.raises(ValueError, match="'epoch'"):
        weights.clean_checkpoint({'epoch': 3})


def test_a_lightning_module_with_more_than_the_model_names_the_prefix_in_one_line(tmp_path, plain):
    state_dict, _ = plain
    lightning = {'state_dict': {**{f'model.{k}': v for k, v in state_dict.items()},
                                'loss_fn.weight': torch.ones(10)}}
    torch.save(lightning, tmp_path / 'lit.ckpt')
    done = subprocess.run([sys.executable, str(REPO / 'run_class_finetuning.py'), *COMMON, '--test_mode', 'ann',
                           '--model_path', str(tmp_path / 'lit.ckpt'), '--log_dir', str(tmp_path)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 2 and 'Traceback' not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert line.startswith('error:') and "under the prefix 'model.'" in line
    # Following it works: the model's part alone, re-saved.
    saved = torch.load(tmp_path / 'lit.ckpt', weights_only=True)['state_dict']
    torch.save({k[6:]: v for k, v in saved.items() if k.startswith('model.')}, tmp_path / 'fixed.pth')
    assert main(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(tmp_path / 'fixed.pth'))['n'] == 450


# ------------------------------------------------------------------------------------------
# Weights of another timm family: the hint names a model of that family, and following it runs
# ------------------------------------------------------------------------------------------
TINY = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)
FAMILIES = {
    'eva02_packed_glu': ('eva02_tiny_patch14_224', TINY, True),
    'eva02_swiglu': ('eva02_base_patch14_224', TINY, True),
    'eva01': ('eva_giant_patch14_224', dict(TINY, mlp_ratio=3.0), True),
    'deit_distilled': ('deit_tiny_distilled_patch16_224', TINY, True),
    'beit': ('beit_base_patch16_224', TINY, True),
    'cait': ('cait_xxs24_224', dict(TINY, depth_token_only=1), True),
    'swin': ('swin_tiny_patch4_window7_224', dict(embed_dim=16, depths=(1, 1), num_heads=(1, 2), window_size=2),
             True),
    'resnet': ('resnet18', {}, False),
}


def hinted_flags(message: str) -> list:
    """The flags after 'it fits ' in a diagnosis, as a command line."""
    assert 'it fits --model ' in message, message
    text = message.split('it fits ', 1)[1]
    for end in (' (', ';'):
        text = text.split(end, 1)[0]
    return text.split()


def with_hint(flags: list) -> list:
    """COMMON with its model flags replaced by the hint's (later flags win over earlier ones)."""
    base = [a for a in COMMON if a not in ('--model', 'vit_tiny_patch16_224', *ARCH)]
    return base + flags


@pytest.mark.parametrize('family', sorted(FAMILIES))
def test_every_family_hint_is_followed_and_runs(tmp_path, family):
    name, kwargs, sized = FAMILIES[family]
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **({'img_size': 16} if sized else {}), **kwargs)
    path = tmp_path / f'{family}.pth'
    torch.save({'model': model.state_dict()}, path)
    with pytest.raises(UserError) as info:
        main(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(path))
    message = str(info.value)
    assert 'holds the weights of' in message and 'not of --model vit_tiny_patch16_224' in message
    flags = hinted_flags(message)
    assert flags[:2] == ['--model', name]
    record = main(tmp_path, *with_hint(flags), '--test_mode', 'ann', '--model_path', str(path))
    assert record['n'] == 450
    # The hint's model gives exactly the logits of the model the weights came from.
    assert record['acc1'] == pytest.approx(_plain_acc1(model, record), abs=1e-9)
    # for_v: converted, or (a family ECMT does not convert yet) refused as the hint said.
    try:
        calibrated = main(tmp_path, *with_hint(flags), '--test_mode', 'for_v', '--model_path', str(path),
                          '--calib_batches', '1')
        assert 'cannot convert' not in message and calibrated['checkpoint']
    except UserError as err:
        assert 'cannot convert' in message or 'no transformer' in message
        assert 'convert' in str(err)


def _plain_acc1(model, record):
    import datasets
    args = cli.get_args_parser().parse_args(COMMON)
    data, _ = datasets.build_dataset(False, args)
    loader = torch.utils.data.DataLoader(data, batch_size=150)
    model.eval()
    with torch.no_grad():
        correct = sum(int((model(x).argmax(-1) == y).sum()) for x, y in loader)
    return 100.0 * correct / record['n']


def test_a_convolutional_network_is_named_and_no_model_is_proposed(tmp_path):
    torch.save(timm.create_model('convnext_atto', num_classes=10).state_dict(), tmp_path / 'cnn.pth')
    with pytest.raises(UserError) as info:
        main(tmp_path, *COMMON, '--test_mode', 'ann', '--model_path', str(tmp_path / 'cnn.pth'))
    assert 'convolutional network' in str(info.value) and 'no transformer' in str(info.value)
    assert 'it fits' not in str(info.value)


def test_eva02_weights_given_as_a_vit_are_one_error_line_naming_the_eva02_model(tmp_path):
    torch.manual_seed(0)
    model = timm.create_model('eva02_tiny_patch14_224', num_classes=10, img_size=16, **TINY)
    torch.save(model.state_dict(), tmp_path / 'eva02.pth')
    done = subprocess.run([sys.executable, str(REPO / 'run_class_finetuning.py'), *COMMON, '--test_mode', 'ann',
                           '--model_path', str(tmp_path / 'eva02.pth'), '--log_dir', str(tmp_path),
                           '--results', str(tmp_path / 'r.json')], capture_output=True, text=True, cwd=tmp_path,
                          timeout=300)
    assert done.returncode == 2 and 'Traceback' not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith('error:') and '--model eva02_tiny_patch14_224' in lines[0]
    assert 'mlp_ratio=5.3' not in lines[0]  # not the packed fc1's width (issue 32)
    assert not (tmp_path / 'r.json').exists()
