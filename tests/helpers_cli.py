"""What the command-line tests share: the tiny model's flags, weights written by the tests, and
BAAI's EVA-01 layout at tiny size. A helpers module, not a test file (no test imports another)."""
from pathlib import Path

import timm
import torch

REPO = Path(__file__).resolve().parents[1]
ARCH = ['--model_kwargs', 'patch_size=4', 'embed_dim=32', 'depth=2', 'num_heads=2']
COMMON = ['--model', 'vit_tiny_patch16_224', *ARCH, '--input_size', '16', '--nb_classes', '10',
          '--data_set', 'DIGITS', '--num_workers', '0', '--batch_size', '150', '--device', 'cpu',
          '--no_progress']
DATA = ['--data_set', 'DIGITS', '--num_workers', '0', '--batch_size', '150', '--device', 'cpu', '--no_progress']


def tiny_timm(**kwargs):
    """The tiny timm ViT of COMMON (seeded), with `kwargs` changed."""
    torch.manual_seed(0)
    cfg = dict(num_classes=10, img_size=16, patch_size=4, embed_dim=32, depth=2, num_heads=2)
    cfg.update(kwargs)
    return timm.create_model('vit_tiny_patch16_224', **cfg)


# BAAI's EVA-01 layout at tiny size (ECMT_SPEC 9).
DIM, DEPTH, HEADS, HIDDEN, CLASSES = 32, 2, 2, 96, 10
IMG, PATCH = 16, 4
GRID = IMG // PATCH
EVA_ARCH = dict(img_size=IMG, patch_size=PATCH, embed_dim=DIM, depth=DEPTH, num_heads=HEADS,
                mlp_ratio=HIDDEN / DIM, num_classes=CLASSES)


def baai_state_dict(grid=GRID, with_k_bias=False, seed=0):
    """Random weights with BAAI's EVA-01 key names and shapes (no qkv bias tensor)."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, std=0.2):
        return torch.randn(*shape, generator=g) * std

    sd = {
        'cls_token': rand(1, 1, DIM),
        'pos_embed': rand(1, 1 + grid * grid, DIM),
        'patch_embed.proj.weight': rand(DIM, 3, PATCH, PATCH),
        'patch_embed.proj.bias': rand(DIM),
    }
    for i in range(DEPTH):
        p = f'blocks.{i}.'
        sd.update({
            p + 'norm1.weight': 1 + rand(DIM), p + 'norm1.bias': rand(DIM),
            p + 'attn.qkv.weight': rand(3 * DIM, DIM),
            p + 'attn.q_bias': rand(DIM), p + 'attn.v_bias': rand(DIM),
            p + 'attn.proj.weight': rand(DIM, DIM), p + 'attn.proj.bias': rand(DIM),
            p + 'norm2.weight': 1 + rand(DIM), p + 'norm2.bias': rand(DIM),
            p + 'mlp.fc1.weight': rand(HIDDEN, DIM), p + 'mlp.fc1.bias': rand(HIDDEN),
            p + 'mlp.fc2.weight': rand(DIM, HIDDEN), p + 'mlp.fc2.bias': rand(DIM),
        })
        if with_k_bias:
            sd[p + 'attn.k_bias'] = torch.zeros(DIM)
    sd.update({
        'fc_norm.weight': 1 + rand(DIM), 'fc_norm.bias': rand(DIM),
        'head.weight': rand(CLASSES, DIM, std=0.5), 'head.bias': rand(CLASSES),
    })
    return sd


