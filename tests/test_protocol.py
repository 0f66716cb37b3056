"""The published protocol (ECMT_SPEC 2, 7, 10, 11), end to end through run_class_finetuning.main.

The published transform is written out here (torchvision's Resize + CenterCrop + ToTensor +
Normalize) and compared with the toolkit's on real PIL images; DIGITS is written as PNG files into
the published folder layout (`datasets/val/<class>/`, the command run from `code/`), a small ViT is
trained on DIGITS here, and its ANN accuracy through the command line is compared with the
accuracy of the same weights (plain timm) on tensors made by the written-out composition. A for_v
file in the published layout (`{'model', 'args'}`, `*_test` names) is built here and simulated.
"""
import argparse
import json
import math

import numpy as np
import pytest
import timm
import torch
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from torchvision import transforms as T

import datasets
import run_class_finetuning as cli
import utils
import weights
from model_vit import create_model
from trans_utils import MyTestPlace, reset_net
from utils import UserError

SIZE = 16
ARCH = dict(patch_size=4, embed_dim=32, depth=2, num_heads=2)
MODEL_ARGS = ['--model', 'vit_tiny_patch16_224', '--model_kwargs', *(f'{k}={v}' for k, v in ARCH.items()),
              '--input_size', str(SIZE), '--nb_classes', '10', '--num_workers', '0', '--batch_size', '100',
              '--device', 'cpu', '--no_progress']
# The published README's layout: the commands run from code/, beside datasets/ and models/.
FOLDER_ARGS = MODEL_ARGS + ['--data_set', 'image_folder']
SPEC_2_ORDER = ['fc_qkv', 'q', 'k', 'v', 's', 'fc_out', 'fc1', 'fc2']


@pytest.fixture(autouse=True, scope='module')
def one_thread():  # module scope: also around the module fixtures (the training)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def published_transform(size, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    """The published scripts' evaluation transform (ECMT_SPEC 10), written out."""
    return T.Compose([T.Resize(size, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(size),
                      T.ToTensor(), T.Normalize(mean, std)])


def noise_image(width, height, seed):
    """A real RGB PIL image with structure at every scale (smooth gradient plus noise)."""
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 255, width)[None, :, None]
    y = np.linspace(0, 255, height)[:, None, None]
    pixels = (0.4 * x + 0.4 * y + rng.uniform(0, 50, (height, width, 3))).clip(0, 255)
    return Image.fromarray(pixels.astype(np.uint8), 'RGB')


def args_for(**overrides):
    values = dict(data_set='image_folder', input_size=SIZE, imagenet_default_mean_and_std=False,
                  data_config='published', crop_pct=None)
    values.update(overrides)
    return argparse.Namespace(**values)


# ------------------------------------------------------------------------------------------
# The transform (ECMT_SPEC 10)
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize('size', [16, 32, 224])
@pytest.mark.parametrize('data_set', ['image_folder', 'IMNET', 'CIFAR10', 'DIGITS'])
@pytest.mark.parametrize('imagenet', [False, True])
def test_transform_is_the_published_composition(size, data_set, imagenet):
    mine = datasets.build_transform(False, args_for(data_set=data_set, input_size=size,
                                                    imagenet_default_mean_and_std=imagenet))
    mean, std = (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD) if imagenet else (OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)
    theirs = published_transform(size, mean, std)
    # Square, landscape, portrait, smaller and larger than the input, CIFAR-sized, ImageNet-sized.
    for seed, (w, h) in enumerate([(8, 8), (32, 32), (50, 20), (17, 64), (300, 224), (500, 375)]):
        image = noise_image(w, h, seed)
        got = mine(image)
        assert got.shape == (3, size, size)
        assert torch.equal(got, theirs(image)), (w, h)


def test_transform_keeps_the_whole_image_of_its_own_size():
    """Crop fraction 1.0: an image of the input size goes through untouched but normalised
    (a 0.875 crop would have cut its border)."""
    image = noise_image(32, 32, 7)
    got = datasets.build_transform(False, args_for(input_size=32))(image)
    plain = T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)(T.ToTensor()(image))
    assert torch.equal(got, plain)


def test_digits_items_are_the_published_composition_of_their_pixels():
    """DIGITS: pixel p (0..16) -> round(p * 255 / 16) gray RGB, then the same transform."""
    from sklearn.datasets import load_digits
    data, _ = datasets.build_dataset(False, argparse.Namespace(data_set='DIGITS', input_size=SIZE))
    digits = load_digits()
    for index in (0, 17, 449):
        # The evaluation split's items are the held-out images in their original order.
        image, label = data[index]
        source = digits.images[data.source_indices[index]]
        pixels = np.floor(source * 255 / 16 + 0.5).astype(np.uint8)
        expected = published_transform(SIZE)(Image.fromarray(np.stack([pixels] * 3, axis=-1), 'RGB'))
        assert torch.equal(image, expected)
        assert label == int(digits.target[data.source_indices[index]])
    assert int(data.images.max()) == 255 and int(data.images.min()) == 0


def test_crop_pct_overrides_the_crop_fraction():
    args = args_for(input_size=32, crop_pct=0.875)
    image = noise_image(60, 45, 3)
    want = T.Compose([T.Resize(36, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                      T.ToTensor(), T.Normalize(OPENAI_CLIP_MEAN, OPENAI_CLIP_STD)])
    assert torch.equal(datasets.build_transform(False, args)(image), want(image))
    assert datasets.transform_config(args)['crop_pct'] == 0.875


@pytest.mark.parametrize('crop_pct, scale', [(None, 35), (1.0, 32)])  # vit_tiny's config: crop_pct 0.9
def test_timm_data_config_reads_the_model(crop_pct, scale):
    model = create_model('vit_tiny_patch16_224', num_classes=10, img_size=32, **ARCH)
    args = args_for(input_size=32, data_config='timm', crop_pct=crop_pct)
    record = datasets.transform_config(args, model)
    assert record == {'data_config': 'timm', 'input_size': 32, 'interpolation': 'bicubic',
                      'crop_pct': 0.9 if crop_pct is None else 1.0, 'crop_mode': 'center',
                      'mean': [0.5, 0.5, 0.5], 'std': [0.5, 0.5, 0.5]}
    # floor(32 / 0.9) = 35, as timm computes it; the model's mean/std, not CLIP's.
    want = T.Compose([T.Resize(scale, interpolation=T.InterpolationMode.BICUBIC), T.CenterCrop(32),
                      T.ToTensor(), T.Normalize((0.5,) * 3, (0.5,) * 3)])
    image = noise_image(70, 50, 4)
    assert torch.equal(datasets.build_transform(False, args, model)(image), want(image))
    assert 'resize the shorter side to %d' % scale in datasets.describe_transform(record)
    with pytest.raises(UserError, match='contradict'):
        datasets.transform_config(args_for(data_config='timm', imagenet_default_mean_and_std=True), model)


# ------------------------------------------------------------------------------------------
# Placeholder call order (ECMT_SPEC 2) and per-step accuracy (ECMT_SPEC 7)
# ------------------------------------------------------------------------------------------
def _record_calls(model, block):
    """The order in which the block's placeholders and timm's own layers are called."""
    calls, handles = [], []
    named = {block.norm1: 'norm1', block.attn.qkv: 'qkv', block.attn.proj: 'proj', block.norm2: 'norm2',
             block.mlp.fc1: 'fc1_linear', block.mlp.act: 'act', block.mlp.fc2: 'fc2_linear'}
    for module in block.modules():
        if hasattr(module, 'place') or module in named:
            name = module.place if hasattr(module, 'place') else named[module]
            handles.append(module.register_forward_hook(lambda m, i, o, name=name: calls.append(name)))
    with torch.no_grad():
        model(torch.randn(2, 3, SIZE, SIZE))
    for handle in handles:
        handle.remove()
    return calls


@pytest.mark.parametrize('name, extra', [('vit_tiny_patch16_224', {}),
                                         ('vit_tiny_patch16_224', dict(global_pool='avg', fc_norm=True)),
                                         ('eva_g_patch14', dict(mlp_ratio=3.0))])
def test_placeholders_are_called_in_the_order_of_spec_2(name, extra):
    from trans_utils import convert_to_snn, replace_test_by_testneuron
    model = create_model(name, num_classes=10, img_size=SIZE, **ARCH, **extra).eval()
    for block in model.blocks:
        assert sum(isinstance(m, MyTestPlace) for m in block.modules()) == 8
        calls = _record_calls(model, block)
        assert [c for c in calls if c in SPEC_2_ORDER] == SPEC_2_ORDER
        assert calls == ['norm1', 'fc_qkv', 'qkv', 'q', 'k', 'v', 's', 'fc_out', 'proj',
                         'norm2', 'fc1', 'fc1_linear', 'act', 'fc2', 'fc2_linear']
    # The same order once the places are MT neurons (the LayerNorms and GELU are EC-wrapped then).
    replace_test_by_testneuron(model)
    with torch.no_grad():
        model(torch.randn(4, 3, SIZE, SIZE))
    convert_to_snn(model)
    reset_net(model)
    calls = _record_calls(model, model.blocks[1])
    assert [c for c in calls if c in SPEC_2_ORDER] == SPEC_2_ORDER


# ------------------------------------------------------------------------------------------
# End to end from an image folder of real PNG files, as the published README runs it
# ------------------------------------------------------------------------------------------
def digits_eval_split():
    """The 450 held-out DIGITS images as 8x8 uint8 arrays (pixel p -> round(p * 255 / 16))."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    digits = load_digits()
    indices = list(range(len(digits.target)))
    _, held_out = train_test_split(indices, test_size=0.25, random_state=0, stratify=digits.target)
    held_out = sorted(held_out)
    pixels = np.floor(digits.images[held_out] * 255 / 16 + 0.5).astype(np.uint8)
    return pixels, digits.target[held_out]


@pytest.fixture(scope='module')
def workspace(tmp_path_factory):
    """code/, datasets/val/<class>/*.png (the DIGITS evaluation split) and models/ with a trained
    tiny ViT (timm keys, {'model': sd})."""
    root = tmp_path_factory.mktemp('published')
    (root / 'code').mkdir()
    pixels, targets = digits_eval_split()
    for index, (image, target) in enumerate(zip(pixels, targets)):
        folder = root / 'datasets' / 'val' / f'digit_{target}'
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image, 'L').convert('RGB').save(folder / f'{index:04d}.png')
    (root / 'models').mkdir()
    torch.save({'model': train_tiny_vit().state_dict()}, root / 'models' / 'digits_vit.pth')
    return root


def tiny_timm():
    torch.manual_seed(0)
    return timm.create_model('vit_tiny_patch16_224', num_classes=10, img_size=SIZE, **ARCH)


def train_tiny_vit(epochs=25):
    """A few seconds of AdamW on the DIGITS training split, under the published transform."""
    train, _ = datasets.build_dataset(True, argparse.Namespace(data_set='DIGITS', input_size=SIZE))
    images = torch.stack([train[i][0] for i in range(len(train))])
    labels = torch.tensor(train.targets)
    model = tiny_timm()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.05)
    steps = epochs * math.ceil(len(images) / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, 3e-3, total_steps=steps)
    order = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(images), generator=order).split(64):
            loss = torch.nn.functional.cross_entropy(model(images[batch]), labels[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


def run_in(workspace, monkeypatch, *extra):
    """run_class_finetuning.main from code/ with the published defaults for the paths."""
    monkeypatch.chdir(workspace / 'code')
    return cli.main(cli.get_args_parser().parse_args(FOLDER_ARGS + list(extra)))


def published_accuracy(workspace, state_dict):
    """Top-1 (%) of plain timm with `state_dict` on the PNG files under the written-out transform."""
    folder = workspace / 'datasets' / 'val'
    classes = sorted(p.name for p in folder.iterdir())
    files = [(f, c) for c, name in enumerate(classes) for f in sorted((folder / name).iterdir())]
    transform = published_transform(SIZE)
    images = torch.stack([transform(Image.open(f).convert('RGB')) for f, _ in files])
    labels = torch.tensor([c for _, c in files])
    model = tiny_timm().eval()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return 100.0 * int((model(images).argmax(-1) == labels).sum()) / len(files)


@pytest.fixture(scope='module')
def runs(workspace):
    """ann, for_v (the README's step 4: --savename only) and snn (step 5: ../models/<savename>.pth)."""
    monkeypatch = pytest.MonkeyPatch()
    try:
        weights = '../models/digits_vit.pth'
        out = {'ann': run_in(workspace, monkeypatch, '--test_mode', 'ann', '--model_path', weights,
                             '--results', 'ann.json'),
               'for_v': run_in(workspace, monkeypatch, '--test_mode', 'for_v', '--model_path', weights,
                               '--savename', 'digits_for_v', '--results', 'for_v.json')}
        out['snn'] = run_in(workspace, monkeypatch, '--test_mode', 'snn', '--model_path',
                            '../models/digits_for_v.pth', '--test_T', '4', '--results', 'snn.json')
    finally:
        monkeypatch.undo()
    return out


def test_ann_accuracy_from_the_folder_equals_the_published_transform(workspace, runs):
    state = torch.load(workspace / 'models' / 'digits_vit.pth', weights_only=True)['model']
    want = published_accuracy(workspace, state)
    assert runs['ann']['n'] == 450
    assert runs['ann']['acc1'] == pytest.approx(want, abs=1e-9)
    assert want > 85  # measured: 89.11 (trained: the comparison means something); 71.78 under a 0.875 crop
    saved = json.loads((workspace / 'code' / 'ann.json').read_text())
    assert saved['transform'] == datasets.transform_config(args_for()) and saved['amp'] == 'none'


def test_readme_steps_4_and_5_use_the_published_defaults(workspace, runs):
    assert runs['for_v']['checkpoint'] == '../models/digits_for_v.pth'
    assert (workspace / 'models' / 'digits_for_v.pth').is_file()
    assert (workspace / 'code' / 'log_ann.txt').is_file() and (workspace / 'code' / 'log_snn.txt').is_file()
    assert 'transform: resize the shorter side to 16 (bicubic), center crop 16x16 (crop_pct 1.0)' in \
        (workspace / 'code' / 'log_snn.txt').read_text()
    # for_v calibrates on the evaluation set, as published, and says so in the checkpoint.
    saved = torch.load(workspace / 'models' / 'digits_for_v.pth', weights_only=True)
    published = {'transform': datasets.transform_config(args_for()),
                 'data_set': 'image_folder', 'data_path': '../datasets/val',
                 'split': 'evaluation', 'images': 450, 'batches': None, 'percent': 0.99,
                 'model': 'vit_tiny_patch16_224', 'coding': 'rate'}
    assert {k: saved['calibration'][k] for k in published} == published
    # Beside it, what rebuilds the model and where the weights came from (issues 25 and 26).
    assert saved['calibration']['weights'] == {'kind': 'file', 'path': '../models/digits_vit.pth'}
    assert {'architecture', 'model_kwargs', 'input_size', 'nb_classes', 'levels'} <= saved['calibration'].keys()
    assert runs['for_v']['acc1'] == runs['ann']['acc1']  # calibration does not change the ANN
    snn = runs['snn']
    assert len(snn['acc1']) == 4 and snn['n'] == 450
    # measured: 32.00, 76.67, 83.78, 88.00 % against the ANN's 89.11 %
    assert snn['acc1'][-1] > runs['ann']['acc1'] - 4
    assert snn['acc1'][-1] > snn['acc1'][0] + 40


def test_for_v_without_savename_writes_models_test_pth(workspace, monkeypatch):
    record = run_in(workspace, monkeypatch, '--test_mode', 'for_v', '--model_path', '../models/digits_vit.pth',
                    '--calib_batches', '1')
    assert record['checkpoint'] == '../models/test.pth' and (workspace / 'models' / 'test.pth').is_file()


def published_layout(state_dict):
    """The toolkit's placeholder names renamed to the published scripts' (ECMT_SPEC 11)."""
    names = {'place_fc_qkv': 'x_in_test', 'place_q': 'q_out_test', 'place_k': 'k_out_test',
             'place_v': 'v_out_test', 'place_s': 'attn_out_test', 'place_fc_out': 'x_out_test',
             'place_fc1': 'x1_in_test', 'place_fc2': 'x2_in_test'}
    out = {}
    for key, value in state_dict.items():
        parts = key.split('.')
        out['.'.join(names.get(p, p) for p in parts)] = value
    return out


def test_a_for_v_file_in_the_published_layout_runs_in_snn_and_ann(workspace, runs, monkeypatch, capsys):
    state = torch.load(workspace / 'models' / 'digits_for_v.pth', weights_only=True)['model']
    published = published_layout(state)
    assert 'blocks.1.mlp.x2_in_test.scale_p' in published and not any('place_' in k for k in published)
    args = argparse.Namespace(model='vit_tiny_patch16_224', input_size=SIZE, batch_size=64, test_mode='for_v',
                              savename='published_for_v', output_dir='../models', monitor=True)
    torch.save({'model': published, 'args': args}, workspace / 'models' / 'published_for_v.pth')
    capsys.readouterr()
    snn = run_in(workspace, monkeypatch, '--test_mode', 'snn', '--model_path', '../models/published_for_v.pth',
                 '--test_T', '4')
    assert snn['acc1'] == runs['snn']['acc1'] and snn['acc5'] == runs['snn']['acc5']
    assert snn['energy_ratio'] == runs['snn']['energy_ratio']
    assert capsys.readouterr().err.count('does not record the transform') == 1
    ann = run_in(workspace, monkeypatch, '--test_mode', 'ann', '--model_path', '../models/published_for_v.pth')
    assert ann['acc1'] == runs['ann']['acc1']


@pytest.mark.parametrize('extra, recorded, current', [
    (['--imagenet_default_mean_and_std'], 'mean (0.4815, 0.4578, 0.4082)', 'mean (0.4850, 0.4560, 0.4060)'),
    (['--crop_pct', '0.875'], 'resize the shorter side to 16 ', 'resize the shorter side to 18 '),
])
def test_snn_refuses_thresholds_of_another_transform(workspace, runs, monkeypatch, extra, recorded, current):
    with pytest.raises(UserError) as info:
        run_in(workspace, monkeypatch, '--test_mode', 'snn', '--model_path', '../models/digits_for_v.pth',
               '--test_T', '1', *extra)
    message = str(info.value)
    assert 'calibrated on images made by' in message
    assert message.index(recorded) < message.index('this run makes') < message.index(current)


def test_snn_accuracy_per_step_is_the_argmax_of_summed_head_outputs(workspace, runs, monkeypatch):
    """Hook on the head during evaluate_snn; the cumulative argmax is computed here. The
    simulation is multi-step: the head runs once per batch on all T steps, time-major
    ([T*B, classes], ECMT_SPEC 13)."""
    outputs, real = [], cli.evaluate_snn

    def spy(model, loader, *args, **kwargs):
        handle = model.head.register_forward_hook(lambda m, i, o: outputs.append(o.detach().clone()))
        try:
            return real(model, loader, *args, **kwargs)
        finally:
            handle.remove()

    monkeypatch.setattr(cli, 'evaluate_snn', spy)
    T_steps = 5
    record = run_in(workspace, monkeypatch, '--test_mode', 'snn', '--model_path', '../models/digits_for_v.pth',
                    '--test_T', str(T_steps), '--batch_size', '128', '--no-monitor')
    targets = torch.tensor(datasets.build_dataset(False, argparse.Namespace(
        data_set='image_folder', eval_data_path=str(workspace / 'datasets' / 'val'), input_size=SIZE))[0].targets)
    batches = [targets[i:i + 128] for i in range(0, len(targets), 128)]
    assert len(outputs) == len(batches)
    correct = [0] * T_steps
    for output, labels in zip(outputs, batches):
        assert output.shape == (T_steps * len(labels), 10)
        steps = output.view(T_steps, len(labels), 10)  # (T, batch, classes)
        for t, summed in enumerate(steps.cumsum(dim=0)):
            correct[t] += int((summed.argmax(-1) == labels).sum())
    assert record['acc1'] == [100.0 * c / len(targets) for c in correct]
    assert record['acc1'][:4] == runs['snn']['acc1']  # the batch size changes nothing


def test_calib_data_path_calibrates_on_the_training_split(tmp_path):
    args = cli.get_args_parser().parse_args(MODEL_ARGS + [
        '--data_set', 'DIGITS', '--test_mode', 'for_v', '--calib_data_path', 'train', '--calib_batches', '2',
        '--output_dir', str(tmp_path), '--log_dir', str(tmp_path), '--savename', 'train_for_v'])
    record = cli.main(args)
    assert record['n'] == 200  # 2 batches of 100 training images
    saved = torch.load(tmp_path / 'train_for_v.pth', weights_only=True)
    assert saved['calibration']['split'] == 'train' and saved['calibration']['batches'] == 2
    args.calib_data_path, args.savename = None, 'eval_for_v'
    cli.main(args)
    other = torch.load(tmp_path / 'eval_for_v.pth', weights_only=True)
    assert other['calibration']['split'] == 'evaluation'
    key = 'blocks.0.attn.place_fc_qkv.scale_p'
    assert not torch.equal(saved['model'][key], other['model'][key])  # other images, other quantiles


def test_calib_data_path_errors(tmp_path):
    base = MODEL_ARGS + ['--data_set', 'image_folder', '--output_dir', str(tmp_path), '--log_dir', str(tmp_path)]
    with pytest.raises(UserError, match='--calib_data_path is for --test_mode for_v'):
        cli.main(cli.get_args_parser().parse_args(base + ['--test_mode', 'ann', '--calib_data_path', 'x']))
    (tmp_path / 'val' / 'a').mkdir(parents=True)
    noise_image(8, 8, 0).save(tmp_path / 'val' / 'a' / '0.png')
    with pytest.raises(UserError, match=r'nowhere not found .*--calib_data_path'):
        cli.main(cli.get_args_parser().parse_args(base + [
            '--test_mode', 'for_v', '--eval_data_path', str(tmp_path / 'val'), '--nb_classes', '1',
            '--calib_data_path', str(tmp_path / 'nowhere')]))


def test_published_place_names_map_onto_the_toolkit(tmp_path):
    model = create_model('vit_tiny_patch16_224', num_classes=10, img_size=SIZE, **ARCH)
    from trans_utils import replace_test_by_testneuron
    replace_test_by_testneuron(model)
    ours = model.state_dict()
    assert weights.convert_published_places(published_layout(ours)).keys() == ours.keys()
    assert weights.has_published_place_names(published_layout(ours)) and not weights.has_published_place_names(ours)
