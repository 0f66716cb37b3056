"""Convertible timm EVA-01 models, and BAAI's EVA-01 checkpoint format.

EVA-01 (``eva_giant_patch14_224/336/560`` and any timm ``Eva`` without rotary embeddings or a
gated MLP): fused qkv with separate q/v biases (zero k bias), absolute position embedding, mean
pooling of the patch tokens followed by ``fc_norm``. Its attention and MLP are swapped for the same
convertible modules as the ViT's (:mod:`model_vit`), so state_dict keys stay timm's.

``eva_g_patch14`` is the published name of EVA-01 giant (patch 14, width 1408, depth 40, 16 heads,
MLP 6144, LayerNorm eps 1e-6); it reads BAAI's own file ``eva_21k_1k_336px_psz14_ema_89p6.pt``
through :func:`convert_baai_eva01`, a pure state_dict -> state_dict function (ECMT_SPEC 9).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm

from model_vit import (VIT_CONTAINERS, ConvertibleAttention, check_structure,
                       swap_attention_and_mlp)
from trans_utils import ConversionError, register_snn_modules

__all__ = ['EVA_ALIASES', 'make_eva_convertible', 'convert_baai_eva01', 'Eva']

#: Published names -> timm names (the image size comes from ``img_size``/``--input_size``).
EVA_ALIASES = {'eva_g_patch14': 'eva_giant_patch14_224'}

EVA_CONTAINERS = VIT_CONTAINERS + (Eva, EvaBlock, EvaBlockPostNorm)
register_snn_modules(containers=EVA_CONTAINERS)


def make_eva_convertible(model: Eva) -> Eva:
    """Make a timm ``Eva`` (EVA-01 style) convertible in place (and return it)."""
    if type(model) is not Eva:
        raise ConversionError(f'{type(model).__name__} is not a timm Eva model')
    if getattr(model, 'rope', None) is not None:
        raise ConversionError('rope (rotary position embeddings, EVA-02 style) cannot be converted')
    if getattr(model, 'attn_pool', None) is not None:
        raise ConversionError('attn_pool (attention pooling) cannot be converted')
    if getattr(model, 'global_pool', 'avg') not in ('avg', 'token', ''):
        raise ConversionError(f"global_pool={model.global_pool!r} cannot be converted")
    for name, module in model.named_modules():
        if type(module) in (EvaBlock, EvaBlockPostNorm) and type(module.attn) is not EvaAttention:
            raise ConversionError(f'{name}.attn ({type(module.attn).__name__}) cannot be converted')
    model.ecmt_input_modules = ('patch_embed', 'pos_drop', 'patch_drop', 'rope')
    model.ecmt_family = 'eva'
    swap_attention_and_mlp(model, (EvaAttention,))
    check_structure(model, EVA_CONTAINERS, type(model).__name__)
    return model


def convert_baai_eva01(state_dict: Dict[str, torch.Tensor], model: nn.Module | None = None
                       ) -> Dict[str, torch.Tensor]:
    """Map BAAI's EVA-01 checkpoint (as read by the published ``eva_g_patch14``) to timm keys.

    Accepts the weights directly or under ``'model'``/``'module'``. BAAI's layout already uses the
    names timm's ``Eva`` uses for EVA-01 (``blocks.i.attn.qkv.weight`` without bias,
    ``q_bias``/``v_bias``, ``fc_norm``, ``head``); what differs is dropped or adapted here:
    a ``k_bias`` entry (zero, a non-persistent buffer in timm), training-only entries
    (``lm_head``/``mask_token``/relative-position tables the giant model does not use), and a
    ``pos_embed`` of another grid, resampled to ``model``'s grid when a model is given.
    """
    if 'model' in state_dict and isinstance(state_dict['model'], dict):
        state_dict = state_dict['model']
    elif 'module' in state_dict and isinstance(state_dict['module'], dict):
        state_dict = state_dict['module']
    out = {}
    for key, value in state_dict.items():
        if key.startswith('module.'):
            key = key[len('module.'):]
        if key.endswith('attn.k_bias') or key.startswith(('lm_head', 'mask_token')) \
                or 'relative_position' in key:
            continue
        out[key] = value
    if model is not None and 'pos_embed' in out and hasattr(model, 'pos_embed') \
            and model.pos_embed is not None and out['pos_embed'].shape != model.pos_embed.shape:
        from timm.layers import resample_abs_pos_embed
        num_prefix = 0 if getattr(model, 'no_embed_class', False) else model.num_prefix_tokens
        out['pos_embed'] = resample_abs_pos_embed(
            out['pos_embed'], new_size=model.patch_embed.grid_size, num_prefix_tokens=num_prefix)
    return out
