"""Convertible timm Vision Transformers: ViT, DeiT (distilled too), SigLIP-style attention pooling.

timm's ``VisionTransformer`` with class-token, mean or attention pooling (``global_pool='map'``,
``AttentionPoolLatent``: SigLIP), plain or gated MLPs, and ``VisionTransformerDistilled`` (DeiT
with a distillation token): in evaluation its two heads' outputs are averaged, a linear map, and
the distillation token is a constant input like the class token (ECMT_SPEC 12). The convertible
modules and the factory live in :mod:`model_base`; ``create_model`` and
``default_fc2_thresholds`` are importable from here too, as the command lines do.
"""
from __future__ import annotations

from typing import Optional

import torch.nn as nn
from timm.layers import AttentionPoolLatent
from timm.layers.attention import Attention
from timm.models.deit import VisionTransformerDistilled
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

from model_base import (CONTAINERS, ConvertibleAttention, ConvertibleMlp, Family, check_structure,
                        create_model, default_fc2_thresholds, register_family, resolve_model_name,
                        swap_convertible_modules)
from trans_utils import ConversionError, register_snn_modules

__all__ = ['ConvertibleAttention', 'ConvertibleMlp', 'make_vit_convertible', 'create_model',
           'resolve_model_name', 'VIT_FC2_THRESHOLDS', 'default_fc2_thresholds']

#: The fixed fc2 thresholds (θp, θn) with which the paper's ViT numbers were produced (ECMT_SPEC 4).
VIT_FC2_THRESHOLDS = (0.25, 0.08)

VIT_CONTAINERS = CONTAINERS + (VisionTransformer, VisionTransformerDistilled, Block, ResPostBlock)
register_snn_modules(containers=VIT_CONTAINERS)


def make_vit_convertible(model: nn.Module) -> nn.Module:
    """Make a timm ``VisionTransformer`` (or ``VisionTransformerDistilled``) convertible in place
    (and return it)."""
    if type(model) not in (VisionTransformer, VisionTransformerDistilled):
        raise ConversionError(f'{type(model).__name__} is not a timm VisionTransformer')
    pool: Optional[nn.Module] = getattr(model, 'attn_pool', None)
    if pool is not None and type(pool) is not AttentionPoolLatent:
        raise ConversionError(f'attn_pool ({type(pool).__name__}, global_pool={model.global_pool!r}) '
                              "cannot be converted (global_pool='map' can)")
    if getattr(model, 'global_pool', 'token') not in ('token', 'avg', '', 'map'):
        raise ConversionError(f"global_pool={model.global_pool!r} cannot be converted "
                              "(use 'token', 'avg' or 'map')")
    model.ecmt_input_modules = ('patch_embed', 'pos_drop', 'patch_drop')
    model.ecmt_family = 'vit'
    swap_convertible_modules(model, (Attention,))
    check_structure(model, VIT_CONTAINERS, type(model).__name__)
    return model


register_family(Family('vit', (VisionTransformer, VisionTransformerDistilled), make_vit_convertible,
                       fc2_thresholds=VIT_FC2_THRESHOLDS))
