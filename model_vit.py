"""Convertible timm Vision Transformers (ViT, DeiT), and the model factory of the toolkit.

A model is built with ``timm.create_model`` and then made convertible in place: every timm
``Attention`` and ``Mlp`` is swapped for :class:`ConvertibleAttention` / :class:`ConvertibleMlp`,
which REUSE the same weight modules and add the ECMT placeholders of ECMT_SPEC section 2. The
state_dict keys stay exactly timm's, so any timm checkpoint loads unchanged, and in ``ann`` mode
the logits equal the plain timm model's (up to float rounding: the attention is computed explicitly
instead of by a fused kernel).

What the method cannot convert (rotary embeddings, SwiGLU/GLU MLPs, gated attention, attention
pooling, distillation heads, parallel blocks, ...) is refused with a :class:`ConversionError`
naming the module.
"""
from __future__ import annotations

import re
from typing import Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.layers import DropPath, LayerScale, Mlp, PatchDropout
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.vision_transformer import Block, ResPostBlock, VisionTransformer

from trans_utils import (EC_MODULE_TYPES, ConversionError, MyAt, MyTestPlace, register_snn_modules)

__all__ = ['ConvertibleAttention', 'ConvertibleMlp', 'make_vit_convertible', 'create_model',
           'resolve_model_name', 'VIT_FC2_THRESHOLDS', 'default_fc2_thresholds']

#: The fixed fc2 thresholds (θp, θn) with which the paper's ViT numbers were produced (ECMT_SPEC 4).
VIT_FC2_THRESHOLDS = (0.25, 0.08)


class ConvertibleAttention(nn.Module):
    """Self-attention with ECMT placeholders; reuses the weights of a timm ``Attention`` or
    ``EvaAttention`` (fused qkv with optional q/v biases, or separate q/k/v projections).

    fc_qkv -> qkv -> split heads -> [q_norm, k_norm] -> q, k, v -> q·kᵀ (product) * scale
    -> [+ mask] -> softmax -> attn_drop -> s -> s·v (product) -> merge -> [norm] -> fc_out -> proj
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        if getattr(attn, 'gate', None) is not None:
            raise ConversionError('gated attention (a sigmoid gate multiplied into the attention '
                                  'output) cannot be converted')
        self.num_heads = attn.num_heads
        self.head_dim = attn.head_dim
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = attn.scale
        self.qkv = getattr(attn, 'qkv', None)
        if self.qkv is None:
            self.q_proj, self.k_proj, self.v_proj = attn.q_proj, attn.k_proj, attn.v_proj
        q_bias = getattr(attn, 'q_bias', None)
        if q_bias is not None:  # EVA: fused qkv without bias, q and v biases apart, k bias zero
            self.q_bias = q_bias
            self.register_buffer('k_bias', attn.k_bias, persistent=False)
            self.v_bias = attn.v_bias
        else:
            self.q_bias = None
        self.q_norm = attn.q_norm
        self.k_norm = attn.k_norm
        self.attn_drop = attn.attn_drop
        self.norm = attn.norm
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        self.softmax = nn.Softmax(dim=-1)
        self.qk_matmul = MyAt()
        self.av_matmul = MyAt()
        for place in ('fc_qkv', 'q', 'k', 'v', 's', 'fc_out'):
            self.add_module(f'place_{place}', MyTestPlace(place))

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, rope: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        if rope is not None:
            raise ConversionError('rotary position embeddings cannot be converted')
        B, N, _ = x.shape
        x = self.place_fc_qkv(x)
        if self.qkv is not None:
            qkv = self.qkv(x)
            if self.q_bias is not None:
                # Added after the linear layer (not inside F.linear) so that hooks on every
                # nn.Linear (the energy monitor) see this one too.
                qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
            q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            k = self.k_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            v = self.v_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = self.place_q(q), self.place_k(k), self.place_v(v)
        attn = self.qk_matmul(q, k.transpose(-2, -1)) * self.scale
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.softmax(attn)
        attn = self.attn_drop(attn)
        attn = self.place_s(attn)
        x = self.av_matmul(attn, v)
        x = x.transpose(1, 2).reshape(B, N, self.attn_dim)
        x = self.norm(x)
        x = self.place_fc_out(x)
        x = self.proj(x)
        return self.proj_drop(x)


class ConvertibleMlp(nn.Module):
    """timm ``Mlp`` with placeholders: fc1 -> fc1 -> act -> drop1 -> [norm] -> fc2 -> fc2 -> drop2."""

    def __init__(self, mlp: Mlp) -> None:
        super().__init__()
        if not isinstance(mlp.fc1, nn.Linear):
            raise ConversionError(f'an Mlp with {type(mlp.fc1).__name__} layers cannot be converted')
        self.fc1, self.act, self.drop1 = mlp.fc1, mlp.act, mlp.drop1
        self.norm, self.fc2, self.drop2 = mlp.norm, mlp.fc2, mlp.drop2
        self.place_fc1 = MyTestPlace('fc1')
        self.place_fc2 = MyTestPlace('fc2')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(self.place_fc1(x))
        x = self.drop1(self.act(x))
        x = self.norm(x)
        x = self.fc2(self.place_fc2(x))
        return self.drop2(x)


def swap_attention_and_mlp(model: nn.Module, attention_types: Tuple[type, ...]) -> None:
    """Swap every attention of ``attention_types`` and every timm ``Mlp`` (exact class) in place."""
    for name, module in list(model.named_modules()):
        for attr, child in list(module.named_children()):
            full = f'{name}.{attr}' if name else attr
            if type(child) in attention_types:
                setattr(module, attr, ConvertibleAttention(child))
            elif type(child) is Mlp:
                try:
                    setattr(module, attr, ConvertibleMlp(child))
                except ConversionError as exc:
                    raise ConversionError(f'{full}: {exc}') from None


def check_structure(model: nn.Module, containers: Tuple[type, ...], what: str) -> None:
    """Refuse any module in the converted region that is neither a known linear/EC-convertible
    leaf nor a container whose forward we know: never run a silently half-converted network."""
    skip = tuple(model.ecmt_input_modules)
    leaves = (nn.Linear, nn.Identity, nn.Dropout, DropPath, LayerScale, PatchDropout, MyTestPlace, MyAt,
              nn.Softmax) + EC_MODULE_TYPES
    bad = []
    for name, module in model.named_modules():
        if not name or any(name == p or name.startswith(p + '.') for p in skip):
            continue
        if type(module) in containers or isinstance(module, leaves):
            continue
        bad.append(f'{name} ({type(module).__name__})')
    if bad:
        shown = ', '.join(bad[:6]) + (f' ... ({len(bad)} in all)' if len(bad) > 6 else '')
        raise ConversionError(f'{what}: these modules cannot be converted by ECMT: {shown}')


VIT_CONTAINERS = (VisionTransformer, Block, ResPostBlock, ConvertibleAttention, ConvertibleMlp,
                  nn.Sequential, nn.ModuleList)
register_snn_modules(containers=VIT_CONTAINERS, leaves=(DropPath, LayerScale, PatchDropout))


def make_vit_convertible(model: nn.Module) -> nn.Module:
    """Make a timm ``VisionTransformer`` convertible in place (and return it)."""
    if type(model) is not VisionTransformer:
        raise ConversionError(f'{type(model).__name__} is not a plain timm VisionTransformer '
                              '(distilled models and other variants cannot be converted)')
    if getattr(model, 'attn_pool', None) is not None:
        raise ConversionError("attn_pool (global_pool='map', attention pooling) cannot be converted")
    if getattr(model, 'global_pool', 'token') not in ('token', 'avg', ''):
        raise ConversionError(f"global_pool={model.global_pool!r} cannot be converted "
                              "(use 'token' or 'avg')")
    model.ecmt_input_modules = ('patch_embed', 'pos_drop', 'patch_drop')
    model.ecmt_family = 'vit'
    swap_attention_and_mlp(model, (Attention,))
    check_structure(model, VIT_CONTAINERS, type(model).__name__)
    return model


def default_fc2_thresholds(model: nn.Module) -> Optional[Tuple[float, float]]:
    """The fc2 threshold override that applies to ``model`` by default (ViT family only)."""
    return VIT_FC2_THRESHOLDS if getattr(model, 'ecmt_family', None) == 'vit' else None


# Published convenience names: '<timm name>_cifar10' / '_cifar100' fix the class count.
_DATASET_SUFFIX = re.compile(r'^(?P<base>.+)_(?P<data>cifar100|cifar10)$')
_SUFFIX_CLASSES = {'cifar10': 10, 'cifar100': 100}


def resolve_model_name(name: str) -> Tuple[str, dict]:
    """Map a published model name to (timm name, fixed kwargs); timm names map to themselves."""
    from model_eva import EVA_ALIASES
    if name in EVA_ALIASES:
        return EVA_ALIASES[name], {}
    match = _DATASET_SUFFIX.match(name)
    if match and not timm.is_model(name) and timm.is_model(match['base']):
        return match['base'], {'num_classes': _SUFFIX_CLASSES[match['data']]}
    return name, {}


def create_model(name: str, **kwargs) -> nn.Module:
    """Build a convertible model by timm or published name (random weights; no download).

    ``kwargs`` go to ``timm.create_model`` (``num_classes``, ``img_size``, architecture overrides).
    A published ``*_cifar10`` / ``*_cifar100`` name fixes the class count; a conflicting
    ``num_classes`` is an error.
    """
    base, fixed = resolve_model_name(name)
    if not timm.is_model(base):
        raise ConversionError(f'unknown model {name!r}: not a timm model name nor a published alias')
    for key, value in fixed.items():
        if kwargs.get(key) is not None and kwargs[key] != value:
            raise ConversionError(f'model {name!r} has {key}={value}, but {kwargs[key]} was asked for')
        kwargs[key] = value
    kwargs = {k: v for k, v in kwargs.items() if v is not None}
    try:
        model = timm.create_model(base, pretrained=False, **kwargs)
    except TypeError as exc:
        raise ConversionError(f'cannot build {base!r} with {kwargs}: {exc}') from None
    from model_eva import Eva, make_eva_convertible
    if isinstance(model, Eva):
        return make_eva_convertible(model)
    return make_vit_convertible(model)
