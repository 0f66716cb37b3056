"""BAAI's EVA-01 checkpoint layout (ECMT_SPEC 9) through ``model_eva.convert_baai_eva01``.

A tiny state_dict in BAAI's layout is built here, converted, loaded strictly into the toolkit's
``eva_g_patch14`` at tiny size, and the logits are checked against a forward pass written out by
hand from the same tensors (and against plain timm).
"""
import math

import pytest
import timm
import torch
import torch.nn.functional as F

import model_eva
import model_vit
from helpers_cli import EVA_ARCH as ARCH
from helpers_cli import CLASSES, DEPTH, DIM, GRID, HEADS, HIDDEN, IMG, PATCH, baai_state_dict

pytestmark = pytest.mark.usefixtures('single_thread')

def hand_forward(sd, images):
    """EVA-01 as the published eva_g_patch14 computes it, from BAAI's tensors directly."""
    def ln(x, name):
        return F.layer_norm(x.float(), (DIM,), sd[name + '.weight'], sd[name + '.bias'], eps=1e-6)

    B = images.shape[0]
    x = F.conv2d(images, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'], stride=PATCH)
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([sd['cls_token'].expand(B, -1, -1), x], dim=1) + sd['pos_embed']
    N = x.shape[1]
    head_dim = DIM // HEADS
    for i in range(DEPTH):
        p = f'blocks.{i}.'
        h = ln(x, p + 'norm1')
        bias = torch.cat([sd[p + 'attn.q_bias'], torch.zeros(DIM), sd[p + 'attn.v_bias']])
        qkv = F.linear(h, sd[p + 'attn.qkv.weight'], bias).reshape(B, N, 3, HEADS, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attn = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(head_dim), dim=-1)
        h = (attn @ v).transpose(1, 2).reshape(B, N, DIM)
        x = x + F.linear(h, sd[p + 'attn.proj.weight'], sd[p + 'attn.proj.bias'])
        h = ln(x, p + 'norm2')
        h = F.gelu(F.linear(h, sd[p + 'mlp.fc1.weight'], sd[p + 'mlp.fc1.bias']))
        x = x + F.linear(h, sd[p + 'mlp.fc2.weight'], sd[p + 'mlp.fc2.bias'])
    pooled = ln(x[:, 1:].mean(dim=1), 'fc_norm')
    return F.linear(pooled, sd['head.weight'], sd['head.bias'])


def images(n=2):
    return torch.randn(n, 3, IMG, IMG, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize('wrapping', ['plain', 'model', 'module', 'module_prefix'])
@pytest.mark.parametrize('with_k_bias', [False, True])
def test_baai_checkpoint_loads_and_matches_hand_forward(wrapping, with_k_bias):
    sd = baai_state_dict(with_k_bias=with_k_bias)
    raw = dict(sd)
    raw['lm_head.weight'] = torch.randn(50, DIM)  # pre-training leftovers the classifier drops
    raw['lm_head.bias'] = torch.randn(50)
    raw['mask_token'] = torch.randn(1, 1, DIM)
    if wrapping == 'model':
        raw = {'model': raw}
    elif wrapping == 'module':
        raw = {'module': raw, 'epoch': 3}
    elif wrapping == 'module_prefix':  # saved from a DistributedDataParallel wrapper
        raw = {'model': {'module.' + k: v for k, v in raw.items()}}
    model = model_vit.create_model('eva_g_patch14', **ARCH).eval()
    converted = model_eva.convert_baai_eva01(raw, model)
    assert not any(k.startswith(('lm_head', 'mask_token')) or k.endswith('k_bias') for k in converted)
    model.load_state_dict(converted, strict=True)
    x = images()
    with torch.no_grad():
        want = hand_forward(sd, x)
        got = model(x)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        plain = timm.create_model('eva_giant_patch14_224', pretrained=False, **ARCH).eval()
        plain.load_state_dict(converted, strict=True)
        torch.testing.assert_close(plain(x), want, rtol=1e-5, atol=1e-5)
    assert want.abs().max() > 0.1 and want.std() > 0.05  # the logits carry the weights' signal
    # The k bias stays zero, as in BAAI's model.
    assert torch.equal(model.blocks[0].attn.k_bias, torch.zeros(DIM))
    # The converted weights are the checkpoint's own tensors (values), not re-initialised ones.
    assert torch.equal(model.state_dict()['blocks.1.attn.q_bias'], sd['blocks.1.attn.q_bias'])


def test_conversion_is_pure():
    sd = baai_state_dict(with_k_bias=True)
    keys = list(sd)
    model_eva.convert_baai_eva01({'model': sd})
    assert list(sd) == keys  # the input dict is not modified


def test_pos_embed_of_another_grid_is_resampled():
    big = 6  # e.g. a 336-pixel checkpoint into a 224-pixel model: another grid of patches
    sd = baai_state_dict(grid=big)
    grid_part = torch.randn(1, big * big, DIM)
    grid_part[..., :4] = 0.7  # channels constant over the grid stay constant after resampling
    sd['pos_embed'] = torch.cat([sd['pos_embed'][:, :1], grid_part], dim=1)
    model = model_vit.create_model('eva_g_patch14', **ARCH).eval()
    converted = model_eva.convert_baai_eva01(sd, model)
    pos = converted['pos_embed']
    assert pos.shape == (1, 1 + GRID * GRID, DIM)
    assert torch.equal(pos[:, :1], sd['pos_embed'][:, :1])  # the class token's entry is kept
    torch.testing.assert_close(pos[:, 1:, :4], torch.full((1, GRID * GRID, 4), 0.7), rtol=1e-5, atol=1e-5)
    # Resampled as an image of the grid (bicubic), not truncated or reshaped.
    image = grid_part.reshape(1, big, big, DIM).permute(0, 3, 1, 2)
    want = F.interpolate(image, size=(GRID, GRID), mode='bicubic', antialias=True, align_corners=False)
    torch.testing.assert_close(pos[:, 1:], want.permute(0, 2, 3, 1).reshape(1, GRID * GRID, DIM),
                               rtol=1e-4, atol=1e-4)
    model.load_state_dict(converted, strict=True)
    with torch.no_grad():
        assert torch.isfinite(model(images())).all()
    # Without a model to take the grid from, nothing is resampled.
    assert model_eva.convert_baai_eva01(sd)['pos_embed'].shape == (1, 1 + big * big, DIM)
    # The same grid is left exactly as it is.
    same = baai_state_dict()
    assert torch.equal(model_eva.convert_baai_eva01(same, model)['pos_embed'], same['pos_embed'])


def test_loaded_checkpoint_converts_to_an_snn(eager_neuron):
    from trans_utils import convert_to_snn, replace_test_by_testneuron, reset_net
    sd = baai_state_dict()
    model = model_vit.create_model('eva_g_patch14', **ARCH).eval()
    model.load_state_dict(model_eva.convert_baai_eva01(sd, model), strict=True)
    replace_test_by_testneuron(model)
    x = images()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(8, 3, IMG, IMG))
        ann = model(x)
    convert_to_snn(model, linear_num=16, qkv_num=16, softmax_num=16)
    reset_net(model)
    total = 0
    with torch.no_grad():
        for _ in range(16):
            total = total + model(x)
    assert ((total / 16 - ann).norm() / ann.norm()) < 0.1
