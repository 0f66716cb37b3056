"""Convertible timm Vision Transformers: ViT, DeiT (distilled too), SigLIP-style attention pooling,
and the ViT-like families BEiT, CaiT, Swin and Swin V2.

timm's ``VisionTransformer`` with class-token, mean or attention pooling (``global_pool='map'``,
``AttentionPoolLatent``: SigLIP), plain or gated MLPs, and ``VisionTransformerDistilled`` (DeiT
with a distillation token): in evaluation its two heads' outputs are averaged, a linear map, and
the distillation token is a constant input like the class token (ECMT_SPEC 12). ``Beit``,
``Cait``, ``SwinTransformer`` and ``SwinTransformerV2``: their attentions and patch merging are
swapped for the convertible modules below (what each becomes: docs/semantics.md, "More
families"). The shared convertible modules and the factory live in :mod:`model_base`;
``create_model`` and ``default_fc2_thresholds`` are importable from here too, as the command
lines do.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import AttentionPoolLatent, ClassifierHead, SelectAdaptivePool2d
from timm.layers.adaptive_avgmax_pool import FastAdaptiveAvgPool
from timm.layers.attention import Attention, maybe_add_mask, resolve_self_attn_mask
from timm.models.beit import Attention as BeitAttention, Beit, Block as BeitBlock
from timm.models.cait import Cait, ClassAttn, LayerScaleBlock, LayerScaleBlockClassAttn, TalkingHeadAttn
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import PatchMerging as SwinPatchMerging
from timm.models.swin_transformer import SwinTransformer, SwinTransformerBlock, SwinTransformerStage
from timm.models.swin_transformer import WindowAttention as SwinWindowAttention
from timm.models.swin_transformer_v2 import PatchMerging as SwinV2PatchMerging
from timm.models.swin_transformer_v2 import SwinTransformerV2, SwinTransformerV2Block, SwinTransformerV2Stage
from timm.models.swin_transformer_v2 import WindowAttention as SwinV2WindowAttention
from timm.models.naflexvit import NaFlexVit
from timm.models.swin_transformer_v2_cr import SwinTransformerV2Cr
from timm.models.vision_transformer import Block, ParallelScalingBlock, ResPostBlock, VisionTransformer
from timm.models.vision_transformer_relpos import VisionTransformerRelPos
from timm.models.xcit import Xcit

from model_base import (CONTAINERS, ConvertibleAttention, ConvertibleMlp, Family, check_structure,
                        create_model, default_fc2_thresholds, register_family, register_refusal,
                        resolve_model_name, swap_convertible_modules)
from trans_utils import ConversionError, MyAt, MyTestPlace, register_ec_module, register_snn_modules

__all__ = ['ConvertibleAttention', 'ConvertibleMlp', 'make_vit_convertible', 'create_model',
           'resolve_model_name', 'VIT_FC2_THRESHOLDS', 'default_fc2_thresholds',
           'ConvertibleRelPosAttention', 'ConvertibleClassAttention', 'ConvertibleTalkingHeadAttention',
           'ConvertibleWindowAttention', 'ConvertiblePatchMerging', 'make_beit_convertible',
           'make_cait_convertible', 'make_swin_convertible', 'ConvertibleParallelScalingBlock',
           'CosineNormalisation']

#: The fixed fc2 thresholds (θp, θn) with which the paper's ViT numbers were produced (ECMT_SPEC 4).
VIT_FC2_THRESHOLDS = (0.25, 0.08)

class ConvertibleParallelScalingBlock(nn.Module):
    """timm ``ParallelScalingBlock`` (the ``*_xp_*`` ViTs, ViT-22B style) with placeholders: one
    input norm and one linear layer for both the MLP's first layer and qkv, attention and MLP in
    parallel, their outputs through one linear layer on the concatenation or two summed.

    in_norm (EC) -> fc_qkv -> in_proj -> split: MLP part [+ mlp_bias], q, k, v
      attention: [q_norm, k_norm (EC)] -> q, k, v -> q·kᵀ (EC product) * scale [+ mask] -> softmax
                 (EC) -> attn_drop -> s -> s·v (EC product) -> merge -> fc_out
      MLP:       act (EC) -> mlp_drop -> fc2
    -> out_proj(cat) or attn_out_proj + mlp_out_proj -> LayerScale -> + residual

    The MLP part's place is ``fc2`` (the input of the MLP's output layer, a GELU output as in
    ViT's MLP); the MLP's first layer is part of in_proj, whose input is the ``fc_qkv`` place.
    """

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.head_dim, self.scale = block.num_heads, block.head_dim, block.scale
        self.in_split = block.in_split
        # Registration order as timm's, so that state_dict keys come in timm's order.
        if block.mlp_bias is None:
            self.register_parameter('mlp_bias', None)
        else:
            self.mlp_bias = block.mlp_bias
        self.in_norm, self.in_proj = block.in_norm, block.in_proj
        self.q_norm, self.k_norm = block.q_norm, block.k_norm
        self.attn_drop, self.mlp_drop, self.mlp_act = block.attn_drop, block.mlp_drop, block.mlp_act
        self.out_proj, self.attn_out_proj, self.mlp_out_proj = block.out_proj, block.attn_out_proj, block.mlp_out_proj
        self.ls, self.drop_path = block.ls, block.drop_path
        self.softmax = nn.Softmax(dim=-1)
        self.qk_matmul, self.av_matmul = MyAt(), MyAt()
        for place in ('fc_qkv', 'q', 'k', 'v', 's', 'fc_out', 'fc2'):
            self.add_module(f'place_{place}', MyTestPlace(place))

    def ecmt_feeds(self):
        """Which places feed which linear layers and products (trans_utils.feed_graph); the output
        layer on the concatenation of both parts has no single place before it."""
        return [('in_proj', ('place_fc_qkv',)), ('qk_matmul', ('place_q', 'place_k')),
                ('av_matmul', ('place_s', 'place_v')), ('attn_out_proj', ('place_fc_out',)),
                ('mlp_out_proj', ('place_fc2',))]

    def ecmt_fusable(self):
        """EC module -> modules between -> MT neuron, in this forward (trans_utils.fuse_ec_neurons)."""
        return [('softmax', ('attn_drop',), 'place_s'), ('mlp_act', ('mlp_drop',), 'place_fc2')]

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None, is_causal: bool = False,
                **kwargs) -> torch.Tensor:
        B, N, C = x.shape
        y = self.in_proj(self.place_fc_qkv(self.in_norm(x)))
        x_mlp, q, k, v = torch.split(y, self.in_split, dim=-1)
        if self.mlp_bias is not None:
            x_mlp = x_mlp + self.mlp_bias
        q = self.q_norm(q.reshape(B, N, self.num_heads, self.head_dim)).transpose(1, 2)
        k = self.k_norm(k.reshape(B, N, self.num_heads, self.head_dim)).transpose(1, 2)
        v = v.reshape(B, N, self.num_heads, self.head_dim).transpose(1, 2)
        q, k, v = self.place_q(q), self.place_k(k), self.place_v(v)
        attn = self.qk_matmul(q, k.transpose(-2, -1), scale=self.scale)
        attn = maybe_add_mask(attn, resolve_self_attn_mask(N, attn, attn_mask, is_causal))
        attn = self.place_s(self.attn_drop(self.softmax(attn)))
        x_attn = self.place_fc_out(self.av_matmul(attn, v).transpose(1, 2).reshape(B, N, C))
        x_mlp = self.place_fc2(self.mlp_drop(self.mlp_act(x_mlp)))
        if self.out_proj is not None:
            y = self.out_proj(torch.cat((x_attn, x_mlp), dim=-1))
        else:
            y = self.attn_out_proj(x_attn) + self.mlp_out_proj(x_mlp)
        return x + self.drop_path(self.ls(y))


VIT_CONTAINERS = CONTAINERS + (VisionTransformer, VisionTransformerDistilled, Block, ResPostBlock,
                               ConvertibleParallelScalingBlock)
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
    swap_convertible_modules(model, (Attention,), {ParallelScalingBlock: ConvertibleParallelScalingBlock})
    check_structure(model, VIT_CONTAINERS, type(model).__name__)
    return model


register_family(Family('vit', (VisionTransformer, VisionTransformerDistilled), make_vit_convertible,
                       fc2_thresholds=VIT_FC2_THRESHOLDS))


# ---------------------------------------------------------------------------------------------
# BEiT, CaiT, Swin and Swin V2 (docs/semantics.md, "More families")
# ---------------------------------------------------------------------------------------------
class ConvertibleRelPosAttention(ConvertibleAttention):
    """BEiT's attention (timm ``beit.Attention``): :class:`ConvertibleAttention`'s placeholders,
    plus its relative position bias. The bias is a learned table read at fixed indices: it
    depends on no input, so it is the same at every step and is added to the scores before the
    softmax as a constant (what the EC softmax averages is the mean score plus the bias: no EC of
    its own). A bias shared by all blocks (``use_shared_rel_pos_bias``, the model's
    ``rel_pos_bias``) is added the same way. q, k and v are placed on the split heads, apart."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__(attn)
        # Registered after q_bias and v_bias, as in timm, so that state_dict keys keep their order.
        self.relative_position_bias_table = attn.relative_position_bias_table
        self.window_size = attn.window_size
        if attn.relative_position_bias_table is not None:
            self.register_buffer('relative_position_index', attn.relative_position_index, persistent=False)

    def ecmt_qkv_fusable(self) -> bool:
        return False

    def position_bias(self) -> Optional[torch.Tensor]:
        """The block's own bias [1, heads, N, N] (N = patches + 1), or None."""
        if self.relative_position_bias_table is None:
            return None
        area = self.window_size[0] * self.window_size[1] + 1
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)].view(area, area, -1)
        return bias.permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, shared_rel_pos_bias: Optional[torch.Tensor] = None,
                **kwargs) -> torch.Tensor:
        bias = self.position_bias()
        if shared_rel_pos_bias is not None:
            bias = shared_rel_pos_bias if bias is None else bias + shared_rel_pos_bias
        return super().forward(x, attn_mask=bias)


class ConvertibleClassAttention(nn.Module):
    """CaiT's class attention (timm ``ClassAttn``): only the class token queries the patch tokens.

    fc_qkv -> q (class token only), k, v linear layers -> split heads -> q, k, v -> q·kᵀ (EC
    product) * scale -> softmax (EC) -> attn_drop -> s -> s·v (EC product) -> merge -> fc_out -> proj
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        self.q, self.k, self.v = attn.q, attn.k, attn.v
        self.attn_drop, self.proj, self.proj_drop = attn.attn_drop, attn.proj, attn.proj_drop
        self.softmax = nn.Softmax(dim=-1)
        self.qk_matmul, self.av_matmul = MyAt(), MyAt()
        for place in ('fc_qkv', 'q', 'k', 'v', 's', 'fc_out'):
            self.add_module(f'place_{place}', MyTestPlace(place))

    def ecmt_feeds(self):
        """Which places feed which linear layers and products (trans_utils.feed_graph): q reads the
        class token only, a part of the fc_qkv place's output, and counts its own input."""
        return [('k', ('place_fc_qkv',)), ('v', ('place_fc_qkv',)), ('qk_matmul', ('place_q', 'place_k')),
                ('av_matmul', ('place_s', 'place_v')), ('proj', ('place_fc_out',))]

    def ecmt_fusable(self):
        """EC module -> modules between -> MT neuron, in this forward (trans_utils.fuse_ec_neurons)."""
        return [('softmax', ('attn_drop',), 'place_s')]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        x = self.place_fc_qkv(x)
        q = self.q(x[:, :1]).reshape(B, 1, self.num_heads, -1).transpose(1, 2)
        k = self.k(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        v = self.v(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
        q, k, v = self.place_q(q), self.place_k(k), self.place_v(v)
        attn = self.qk_matmul(q, k.transpose(-2, -1), scale=self.scale)
        attn = self.place_s(self.attn_drop(self.softmax(attn)))
        x_cls = self.av_matmul(attn, v).transpose(1, 2).reshape(B, 1, C)
        return self.proj_drop(self.proj(self.place_fc_out(x_cls)))


class ConvertibleTalkingHeadAttention(nn.Module):
    """CaiT's talking-heads attention (timm ``TalkingHeadAttn``): two linear maps across the heads,
    ``proj_l`` on the scores before the softmax and ``proj_w`` on the probabilities after it.

    fc_qkv -> qkv -> split heads -> q, k, v -> q·kᵀ (EC product) * scale -> proj_l -> softmax (EC)
    -> s -> proj_w -> attn_drop -> (·)·v (EC product) -> merge -> fc_out -> proj

    No place between q·kᵀ and the softmax: proj_l is a fixed linear map (with a bias) of the
    scores, which commutes with the running sums the EC softmax keeps, as the scale does. The
    ``s`` place sits on the probabilities, where its fixed softmax thresholds belong, and feeds
    proj_w like any place feeds its linear layer; proj_w's output (a fixed linear mix of the
    spikes of all heads) is the left operand of the product with v, analog, which the EC product
    takes as it is (ECMT_SPEC 6 holds for any two time-varying operands).
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.num_heads, self.scale = attn.num_heads, attn.scale
        # Registration order as timm's, so that state_dict keys come in timm's order.
        self.qkv, self.attn_drop, self.proj = attn.qkv, attn.attn_drop, attn.proj
        self.proj_l, self.proj_w, self.proj_drop = attn.proj_l, attn.proj_w, attn.proj_drop
        self.softmax = nn.Softmax(dim=-1)
        self.qk_matmul, self.av_matmul = MyAt(), MyAt()
        for place in ('fc_qkv', 'q', 'k', 'v', 's', 'fc_out'):
            self.add_module(f'place_{place}', MyTestPlace(place))

    def ecmt_feeds(self):
        """Which places feed which linear layers and products (trans_utils.feed_graph): the talking
        heads' second map reads the s place; the product with v takes its analog output."""
        return [('qkv', ('place_fc_qkv',)), ('qk_matmul', ('place_q', 'place_k')), ('proj_w', ('place_s',)),
                ('av_matmul', (None, 'place_v')), ('proj', ('place_fc_out',))]

    def ecmt_fusable(self):
        """EC module -> modules between -> MT neuron, in this forward (trans_utils.fuse_ec_neurons)."""
        return [('softmax', (), 'place_s')]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        x = self.place_fc_qkv(x)
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = self.place_q(q), self.place_k(k), self.place_v(v)
        attn = self.qk_matmul(q, k.transpose(-2, -1), scale=self.scale)
        attn = self.proj_l(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)
        attn = self.place_s(self.softmax(attn))
        attn = self.attn_drop(self.proj_w(attn.permute(0, 2, 3, 1)).permute(0, 3, 1, 2))
        x = self.av_matmul(attn, v).transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(self.place_fc_out(x)))


class CosineNormalisation(nn.Module):
    """The q/k normalisation of Swin V2's cosine attention, F.normalize over the head channels,
    times sqrt(head_dim): an RMS norm without weights (rms_norm(x) = x·sqrt(D)/|x|), registered
    below as a function that conversion wraps in EC like every norm. The factor sqrt(D) of q and
    of k is divided out of the scores with the logit scale (a constant factor). Computed in float32
    whatever the autocast dtype (|x|² of a half-precision head can overflow), and a zero vector
    stays zero, as F.normalize keeps it. No weights: the state_dict stays timm's."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.normalized_shape = (head_dim,)

    def extra_repr(self) -> str:
        return f'{self.normalized_shape}'

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, enabled=False):
            return F.normalize(x.float(), dim=-1) * math.sqrt(self.normalized_shape[0])


register_ec_module(CosineNormalisation)


class ConvertibleWindowAttention(nn.Module):
    """Swin's window attention (timm ``swin_transformer.WindowAttention``) and Swin V2's cosine
    window attention (``swin_transformer_v2.WindowAttention``) with ECMT placeholders.

    Swin:    fc_qkv -> qkv -> split heads -> q, k, v -> q·kᵀ (EC product) * scale -> + position
             bias [+ shift mask] -> softmax (EC) -> attn_drop -> s -> s·v (EC product) -> merge
             -> fc_out -> proj
    Swin V2: fc_qkv -> qkv (+ q/v biases) -> split heads -> q_norm, k_norm (EC) -> q, k, v ->
             q·kᵀ (EC product) * logit scale -> + position bias [+ shift mask] -> softmax (EC) ...
             as Swin.

    The windows themselves (the cyclic shift, padding, partition and reverse in the block) are
    reshapes of the time-folded batch. The position bias (a learned table read at fixed indices;
    in V2, 16·sigmoid of a small MLP of the fixed relative coordinates) and the shifted windows'
    mask (0 or -100) depend on no input: constants added to the scores before the softmax (no EC).
    V2's position MLP is evaluated with its own weights directly (not through the modules, so
    that it is neither an EC module nor counted as a synaptic layer): once per forward pass, the
    same value at every step, analog, like the class token. V2's learned logit scale, clamped as
    in timm, is a per-head constant factor on the scores.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.cosine = isinstance(attn, SwinV2WindowAttention)
        self.num_heads = attn.num_heads
        self.window_size = tuple(attn.window_size)
        self.head_dim = attn.qkv.out_features // (3 * attn.num_heads)
        # Registration order as timm's, so that state_dict keys come in timm's order.
        self.q_bias = None
        if self.cosine:
            mlp = attn.cpb_mlp
            if not (isinstance(mlp, nn.Sequential) and [type(m) for m in mlp] == [nn.Linear, nn.ReLU, nn.Linear]):
                raise ConversionError(f'a position MLP {mlp} other than timm\'s Linear-ReLU-Linear cannot be converted')
            self.logit_scale = attn.logit_scale
            if attn.q_bias is not None:
                self.q_bias = attn.q_bias
                self.register_buffer('k_bias', attn.k_bias, persistent=False)
                self.v_bias = attn.v_bias
            self.cpb_mlp = mlp
            self.register_buffer('relative_coords_table', attn.relative_coords_table, persistent=False)
        else:
            self.relative_position_bias_table = attn.relative_position_bias_table
            self.scale = attn.scale
        self.register_buffer('relative_position_index', attn.relative_position_index, persistent=False)
        self.qkv, self.attn_drop, self.proj, self.proj_drop = attn.qkv, attn.attn_drop, attn.proj, attn.proj_drop
        self.softmax = nn.Softmax(dim=-1)
        if self.cosine:
            self.q_norm = CosineNormalisation(self.head_dim)
            self.k_norm = CosineNormalisation(self.head_dim)
        self.qk_matmul, self.av_matmul = MyAt(), MyAt()
        for place in ('fc_qkv', 'q', 'k', 'v', 's', 'fc_out'):
            self.add_module(f'place_{place}', MyTestPlace(place))

    def ecmt_feeds(self):
        """Which places feed which linear layers and products (trans_utils.feed_graph)."""
        return [('qkv', ('place_fc_qkv',)), ('qk_matmul', ('place_q', 'place_k')),
                ('av_matmul', ('place_s', 'place_v')), ('proj', ('place_fc_out',))]

    def ecmt_fusable(self):
        """EC module -> modules between -> MT neuron, in this forward (trans_utils.fuse_ec_neurons)."""
        return [('softmax', ('attn_drop',), 'place_s')]

    def position_bias(self) -> torch.Tensor:
        """The relative position bias [1, heads, N, N] of a window of N tokens (no input)."""
        if self.cosine:
            first, _, second = self.cpb_mlp
            hidden = F.relu(F.linear(self.relative_coords_table, first.weight, first.bias))
            table = 16 * torch.sigmoid(F.linear(hidden, second.weight, second.bias).view(-1, self.num_heads))
        else:
            table = self.relative_position_bias_table
        area = self.window_size[0] * self.window_size[1]
        return table[self.relative_position_index.view(-1)].view(area, area, -1).permute(2, 0, 1).unsqueeze(0)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B_, N, _ = x.shape  # B_ = windows x images (x time steps in a multi-step run)
        x = self.place_fc_qkv(x)
        qkv = self.qkv(x)
        if self.q_bias is not None:
            # Added after the linear layer (timm folds it into F.linear) so that hooks on every
            # nn.Linear (the energy monitor) see this one too.
            qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
        q, k, v = qkv.reshape(B_, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        if self.cosine:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = self.place_q(q), self.place_k(k), self.place_v(v)
        if self.cosine:
            # normalize(q)·normalize(k) = q_norm(q)·k_norm(k) / head_dim (see CosineNormalisation).
            scale = torch.clamp(self.logit_scale, max=math.log(1. / 0.01)).exp() / self.head_dim
            attn = self.qk_matmul(q, k.transpose(-2, -1)) * scale
        else:
            attn = self.qk_matmul(q, k.transpose(-2, -1), scale=self.scale)
        attn = attn + self.position_bias()
        if mask is not None:
            windows = mask.shape[0]
            attn = attn.view(-1, windows, self.num_heads, N, N) + mask.unsqueeze(1).unsqueeze(0)
            attn = attn.view(-1, self.num_heads, N, N)
        attn = self.place_s(self.attn_drop(self.softmax(attn)))
        x = self.av_matmul(attn, v).transpose(1, 2).reshape(B_, N, -1)
        return self.proj_drop(self.proj(self.place_fc_out(x)))


class ConvertiblePatchMerging(nn.Module):
    """Swin's patch merging (timm ``PatchMerging``, V1 and V2): each 2x2 group of neighbouring
    tokens concatenated (a reshape of the time-folded batch, zero padding at odd sizes), then
    Swin:    norm (EC) -> reduction place -> reduction (a linear layer);
    Swin V2: reduction place -> reduction -> norm (EC).
    The place is of kind 'fc1' (calibrated, ``linear_num`` levels): the input of a linear layer."""

    def __init__(self, merge: nn.Module) -> None:
        super().__init__()
        self.post_norm = isinstance(merge, SwinV2PatchMerging)
        if self.post_norm:  # registration order as timm's (state_dict keys)
            self.reduction, self.norm = merge.reduction, merge.norm
        else:
            self.norm, self.reduction = merge.norm, merge.reduction
        self.place_reduction = MyTestPlace('fc1')

    def ecmt_feeds(self):
        """The reduction place feeds the reduction layer (trans_utils.feed_graph)."""
        return [('reduction', ('place_reduction',))]

    def ecmt_fusable(self):
        """EC module -> modules between -> MT neuron, in this forward (trans_utils.fuse_ec_neurons)."""
        return [] if self.post_norm else [('norm', (), 'place_reduction')]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        _, H, W, _ = x.shape
        x = x.reshape(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).flatten(3)
        if self.post_norm:
            return self.norm(self.reduction(self.place_reduction(x)))
        return self.reduction(self.place_reduction(self.norm(x)))


#: Linear leaves of these families' heads: Swin's mean over the token grid, flattening.
POOL_LEAVES = (FastAdaptiveAvgPool, nn.AdaptiveAvgPool2d, nn.Flatten)
BEIT_CONTAINERS = CONTAINERS + (Beit, BeitBlock, ConvertibleRelPosAttention)
CAIT_CONTAINERS = CONTAINERS + (Cait, LayerScaleBlock, LayerScaleBlockClassAttn, ConvertibleClassAttention,
                                ConvertibleTalkingHeadAttention)
SWIN_CONTAINERS = CONTAINERS + (SwinTransformer, SwinTransformerStage, SwinTransformerBlock, SwinTransformerV2,
                                SwinTransformerV2Stage, SwinTransformerV2Block, ConvertibleWindowAttention,
                                ConvertiblePatchMerging, ClassifierHead, SelectAdaptivePool2d)
register_snn_modules(containers=BEIT_CONTAINERS + CAIT_CONTAINERS + SWIN_CONTAINERS, leaves=POOL_LEAVES)


def make_beit_convertible(model: nn.Module) -> nn.Module:
    """Make a timm ``Beit`` (BEiT v1/v2) convertible in place (and return it). The shared relative
    position bias module depends on no input: outside the converted region, like the patch
    embedding. ``pos_drop`` (an identity in evaluation) is inside it: Beit iterates its blocks
    (a ModuleList, never called itself), so pos_drop is the first module of the region that is
    called, where trans_utils.MultiStep repeats the input for the steps of a chunk."""
    if type(model) is not Beit:
        raise ConversionError(f'{type(model).__name__} is not a timm Beit')
    model.ecmt_input_modules = ('patch_embed', 'rel_pos_bias')
    model.ecmt_family = 'beit'
    swap_convertible_modules(model, (), {BeitAttention: ConvertibleRelPosAttention})
    check_structure(model, BEIT_CONTAINERS, type(model).__name__)
    return model


def make_cait_convertible(model: nn.Module) -> nn.Module:
    """Make a timm ``Cait`` convertible in place (and return it). The class token joins at the
    class-attention blocks, the same at every step (analog, like ViT's); LayerScale factors are
    fixed element-wise scales (linear)."""
    if type(model) is not Cait:
        raise ConversionError(f'{type(model).__name__} is not a timm Cait')
    model.ecmt_input_modules = ('patch_embed', 'pos_drop')
    model.ecmt_family = 'cait'
    swap_convertible_modules(model, (), {TalkingHeadAttn: ConvertibleTalkingHeadAttention,
                                         ClassAttn: ConvertibleClassAttention})
    check_structure(model, CAIT_CONTAINERS, type(model).__name__)
    return model


def make_swin_convertible(model: nn.Module) -> nn.Module:
    """Make a timm ``SwinTransformer`` or ``SwinTransformerV2`` convertible in place (and return
    it). V2's position MLPs depend on no input: outside the converted region (not EC, not
    counted), evaluated by their attention as a constant."""
    if type(model) not in (SwinTransformer, SwinTransformerV2):
        raise ConversionError(f'{type(model).__name__} is not a timm SwinTransformer or SwinTransformerV2')
    head = model.head
    pool = getattr(getattr(head, 'global_pool', None), 'pool_type', None)
    if type(head) is not ClassifierHead or pool not in ('avg', ''):
        raise ConversionError(f"head ({type(head).__name__}, global_pool={pool!r}) cannot be converted "
                              "(global_pool='avg' can)")
    model.ecmt_family = 'swin'
    swap_convertible_modules(model, (), {SwinWindowAttention: ConvertibleWindowAttention,
                                         SwinV2WindowAttention: ConvertibleWindowAttention,
                                         SwinPatchMerging: ConvertiblePatchMerging,
                                         SwinV2PatchMerging: ConvertiblePatchMerging})
    position_mlps = tuple(f'{name}.cpb_mlp' for name, module in model.named_modules()
                          if isinstance(module, ConvertibleWindowAttention) and module.cosine)
    model.ecmt_input_modules = ('patch_embed',) + position_mlps
    check_structure(model, SWIN_CONTAINERS, type(model).__name__, leaves=POOL_LEAVES)
    return model


register_family(Family('beit', (Beit,), make_beit_convertible))
register_family(Family('cait', (Cait,), make_cait_convertible))
register_family(Family('swin', (SwinTransformer, SwinTransformerV2), make_swin_convertible))

# What is still refused, and what converting it would take.
register_refusal(Xcit, 'cross-covariance attention (a softmax over the channels of L2-normalised q and k with a '
                       'learned temperature), the local patch interaction (depthwise 3x3 convolutions with '
                       'BatchNorm and GELU), a convolutional stem with BatchNorm and class-attention blocks have '
                       'no convertible modules yet')
register_refusal(SwinTransformerV2Cr, "the Swin V2 variant 'cr' has its own blocks (an extra norm every few "
                                      'blocks, a position MLP of log-spaced coordinates, NCHW stages) that have '
                                      'no convertible modules yet (SwinTransformerV2 converts)')
register_refusal(VisionTransformerRelPos, "its relative position modules (timm's RelPosMlp/RelPosBias, and "
                                          'the res-post-norm and parallel blocks of some names) have no '
                                          'convertible modules yet')
register_refusal(NaFlexVit, 'variable-resolution patch embedding with padding masks and its own attention '
                            'blocks have no convertible modules yet')
