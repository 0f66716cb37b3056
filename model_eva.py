"""Convertible timm ``Eva`` models (EVA-01, EVA-02, timm's rotary ViTs), and BAAI's EVA-01
checkpoint format.

EVA-01 (``eva_giant_patch14_224/336/560``): fused qkv with separate q/v biases (zero k bias),
absolute position embedding, mean pooling of the patch tokens followed by ``fc_norm``.
EVA-02 (``eva02_*``) adds rotary position embeddings, SwiGLU MLPs (packed ``GluMlp`` at tiny and
small size, ``SwiGLU`` with a norm inside from base up) and optionally a norm inside the attention;
timm's rotary ViTs (``vit_*_rope_*``: register tokens, LayerScale, no absolute position embedding)
are built as ``Eva`` too, some with timm's ``AttentionRope`` (``vit_*_rope_224``, ``vit_pe_*``:
qkv biases inside the linear layers, grouped-query attention possible). Rotary embeddings are a fixed linear map of each step's q and k (the
``rope`` module computes them from positions only: outside the converted region), gated MLPs get
the places and EC element-wise product of ECMT_SPEC 12. Attention and MLPs are swapped for the
convertible modules of :mod:`model_base`, so state_dict keys stay timm's.

``eva_g_patch14`` is the published name of EVA-01 giant (patch 14, width 1408, depth 40, 16 heads,
MLP 6144, LayerNorm eps 1e-6); it reads BAAI's own file ``eva_21k_1k_336px_psz14_ema_89p6.pt``
through :func:`convert_baai_eva01`, a pure state_dict -> state_dict function (ECMT_SPEC 9).
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
from timm.layers import AttentionRope
from timm.models.eva import Eva, EvaAttention, EvaBlock, EvaBlockPostNorm

from model_base import CONTAINERS, Family, check_structure, register_family, swap_convertible_modules
from trans_utils import ConversionError, register_snn_modules

__all__ = ['EVA_ALIASES', 'make_eva_convertible', 'convert_baai_eva01', 'Eva']

#: Published names -> timm names (the image size comes from ``img_size``/``--input_size``).
EVA_ALIASES = {'eva_g_patch14': 'eva_giant_patch14_224'}

#: Eva's attentions: ``attn_type='eva'`` and ``attn_type='rope'`` (grouped-query attention possible).
EVA_ATTENTIONS = (EvaAttention, AttentionRope)
EVA_CONTAINERS = CONTAINERS + (Eva, EvaBlock, EvaBlockPostNorm)
register_snn_modules(containers=EVA_CONTAINERS)


def make_eva_convertible(model: Eva) -> Eva:
    """Make a timm ``Eva`` convertible in place (and return it)."""
    if type(model) is not Eva:
        raise ConversionError(f'{type(model).__name__} is not a timm Eva model')
    if getattr(model, 'global_pool', 'avg') not in ('avg', 'token', '', 'map'):
        raise ConversionError(f"global_pool={model.global_pool!r} cannot be converted "
                              "(use 'avg', 'token' or 'map')")
    for name, module in model.named_modules():
        if type(module) in (EvaBlock, EvaBlockPostNorm) and type(module.attn) not in EVA_ATTENTIONS:
            raise ConversionError(f'{name}.attn ({type(module.attn).__name__}) cannot be converted')
    model.ecmt_input_modules = ('patch_embed', 'pos_drop', 'patch_drop', 'rope')
    model.ecmt_family = 'eva'
    swap_convertible_modules(model, EVA_ATTENTIONS)
    check_structure(model, EVA_CONTAINERS, type(model).__name__)
    return model


register_family(Family('eva', (Eva,), make_eva_convertible, aliases=EVA_ALIASES))


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
    from checkpoints import clean_checkpoint  # the toolkit's one layout filter: wrappers, 'module.' prefixes
    state_dict = clean_checkpoint(state_dict)[0]
    out = {}
    for key, value in state_dict.items():
        if key.endswith('attn.k_bias') or key.startswith(('lm_head', 'mask_token')) \
                or 'relative_position' in key:
            continue
        out[key] = value
    if model is not None:  # the toolkit's one resampling (diagnosis.py)
        from diagnosis import resample_pos_embed
        out = resample_pos_embed(out, model)
    return out
