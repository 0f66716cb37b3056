"""What every convertible model family shares: the convertible attention and MLPs, the structure
check, and the model factory.

A model is built with ``timm.create_model`` and then made convertible in place: every attention,
MLP and attention pool of a known timm class is swapped for a convertible module that REUSES the
same weight modules and adds the ECMT placeholders (ECMT_SPEC sections 2 and 12). The state_dict
keys stay exactly timm's, so any timm checkpoint loads unchanged, and in ``ann`` mode the logits
equal the plain timm model's (up to float rounding: the attention is computed explicitly instead
of by a fused kernel).

Each family (``model_vit.py``, ``model_eva.py``, ...) builds on this file and registers itself
with :func:`register_family`; this file never imports a family by name. :func:`create_model`
finds the families by file name (every ``model_*.py`` next to this one), so adding a family is
adding its file and nothing else. What the method cannot convert is refused with a
:class:`ConversionError` naming the module.
"""
from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import timm
import torch
import torch.nn as nn
from timm.layers import DropPath, GluMlp, LayerScale, Mlp, PatchDropout, SwiGLU
from timm.layers import AttentionPoolLatent, apply_rot_embed_cat
from timm.layers.attention import maybe_add_mask, resolve_self_attn_mask

import trans_utils
from trans_utils import ConversionError, MyAt, MyMul, MyTestPlace, SharedQKV, register_snn_modules

__all__ = ['ConvertibleAttention', 'ConvertibleMlp', 'ConvertibleGluMlp', 'ConvertibleAttentionPool',
           'swap_convertible_modules', 'check_structure', 'Family', 'register_family',
           'resolve_model_name', 'create_model', 'unconvertible_reason', 'default_fc2_thresholds',
           'register_refusal',
           'uses_gated_mlp',
           'CONTAINERS']


def _optional(module: nn.Module, name: str) -> nn.Module:
    """``module.name``, or an identity where timm's class has no such module (or None)."""
    child = getattr(module, name, None)
    return nn.Identity() if child is None else child


class ConvertibleAttention(nn.Module):
    """Self-attention with ECMT placeholders; reuses the weights of a timm ``Attention``,
    ``EvaAttention`` or ``AttentionRope`` (fused qkv with optional q/v biases, or separate q/k/v
    projections, with fewer k/v heads than q heads in grouped-query attention).

    fc_qkv -> qkv -> split heads -> [q_norm, k_norm] -> [rope] -> q, k, v -> [repeat k/v heads]
    -> q·kᵀ (product) * scale -> [+ mask] -> softmax -> attn_drop -> s -> s·v (product) -> merge
    -> [norm] -> fc_out -> proj

    Rotary embeddings (EVA-02, rotary ViTs) rotate each step's q and k by a fixed, position-dependent
    map: linear and the same at every step, so they commute with the running sums and need no EC;
    the q and k places sit after them, on the product's operands (ECMT_SPEC 12). Prefix tokens
    (class, registers) are not rotated, as in timm.
    """

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        if getattr(attn, 'gate', None) is not None:
            raise ConversionError('gated attention (a sigmoid gate multiplied into the attention '
                                  'output) cannot be converted')
        self.num_heads = attn.num_heads
        self.num_kv_heads = getattr(attn, 'num_kv_heads', None) or attn.num_heads
        # BEiT's attention keeps no head_dim: its fused qkv layer holds three heads' worth.
        self.head_dim = getattr(attn, 'head_dim', None) or attn.qkv.out_features // (3 * attn.num_heads)
        self.attn_dim = self.num_heads * self.head_dim
        self.scale = attn.scale
        self.num_prefix_tokens = getattr(attn, 'num_prefix_tokens', 0)
        self.rotate_half = getattr(attn, 'rotate_half', False)
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
        # Optional in timm (BEiT's attention has none of them): identities where absent.
        self.q_norm = _optional(attn, 'q_norm')
        self.k_norm = _optional(attn, 'k_norm')
        self.attn_drop = attn.attn_drop
        self.norm = _optional(attn, 'norm')
        self.proj = attn.proj
        self.proj_drop = attn.proj_drop
        self.softmax = nn.Softmax(dim=-1)
        self.qk_matmul = MyAt()
        self.av_matmul = MyAt()
        for place in ('fc_qkv', 'q', 'k', 'v', 's', 'fc_out'):
            self.add_module(f'place_{place}', MyTestPlace(place))

    #: Whether the q, k and v neurons each read their part of the fused qkv output in place (set
    #: at conversion by trans_utils.fuse_ec_neurons where ecmt_qkv_fusable() holds).
    fuse_qkv = False

    def ecmt_fusable(self):
        """EC module -> modules between -> MT neuron, in this forward (trans_utils.fuse_ec_neurons)."""
        return [('softmax', ('attn_drop',), 'place_s'), ('norm', (), 'place_fc_out')]

    def ecmt_feeds(self):
        """Which places' outputs are the operands of which linear layers and products, in this
        forward (the monitors look producers up in it: trans_utils.feed_graph). Grouped-query
        attention repeats k and v after their places: those operands are copies, not outputs."""
        kv = 'place_k' if self.num_kv_heads == self.num_heads else None
        vv = 'place_v' if self.num_kv_heads == self.num_heads else None
        return [('qkv', ('place_fc_qkv',)), ('q_proj', ('place_fc_qkv',)), ('k_proj', ('place_fc_qkv',)),
                ('v_proj', ('place_fc_qkv',)), ('qk_matmul', ('place_q', kv)), ('av_matmul', ('place_s', vv)),
                ('proj', ('place_fc_out',))]

    def ecmt_qkv_fusable(self) -> bool:
        """Whether q, k and v go from the fused qkv linear layer straight to their places (no q/k
        norm between; a rotary embedding, given per call, turns the fusion off for that call)."""
        return (self.qkv is not None and isinstance(self.q_norm, nn.Identity)
                and isinstance(self.k_norm, nn.Identity))

    def _rotate(self, x: torch.Tensor, rope: torch.Tensor) -> torch.Tensor:
        npt = self.num_prefix_tokens
        return torch.cat([x[:, :, :npt, :], apply_rot_embed_cat(x[:, :, npt:, :], rope, half=self.rotate_half)],
                         dim=2)

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
                is_causal: bool = False, rope: Optional[torch.Tensor] = None, **kwargs) -> torch.Tensor:
        B, N, _ = x.shape  # B is images x time steps in a multi-step run: nothing below needs either
        x = self.place_fc_qkv(x)
        if self.qkv is not None:
            qkv = self.qkv(x)
            if self.q_bias is not None:
                # Added after the linear layer (not inside F.linear) so that hooks on every
                # nn.Linear (the energy monitor) see this one too.
                qkv = qkv + torch.cat((self.q_bias, self.k_bias, self.v_bias))
            placed = self.fuse_qkv and rope is None
            if placed:  # the q, k and v neurons read their parts of qkv in place, in one pass
                places = (self.place_q, self.place_k, self.place_v)
                shared = SharedQKV(self.num_heads, places)
                q, k, v = (place(qkv, qkv_part=(part, self.num_heads), shared=shared)
                           for part, place in enumerate(places))
            else:
                q, k, v = qkv.reshape(B, N, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        else:
            placed = False
            q = self.q_proj(x).reshape(B, N, self.num_heads, -1).transpose(1, 2)
            k = self.k_proj(x).reshape(B, N, self.num_kv_heads, -1).transpose(1, 2)
            v = self.v_proj(x).reshape(B, N, self.num_kv_heads, -1).transpose(1, 2)
        if not placed:
            q, k = self.q_norm(q), self.k_norm(k)
            if rope is not None:
                q, k = self._rotate(q, rope).type_as(v), self._rotate(k, rope).type_as(v)
            q, k, v = self.place_q(q), self.place_k(k), self.place_v(v)
        if self.num_kv_heads != self.num_heads:
            # Grouped-query attention: head h reads k/v head h // groups, as in timm. The places
            # come before the copy (a neuron is element-wise: the same spikes, fewer states).
            groups = self.num_heads // self.num_kv_heads
            k, v = k.repeat_interleave(groups, dim=1), v.repeat_interleave(groups, dim=1)
        attn = self.qk_matmul(q, k.transpose(-2, -1), scale=self.scale)
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

    def ecmt_fusable(self):
        """EC module -> modules between -> MT neuron, in this forward (trans_utils.fuse_ec_neurons)."""
        return [('act', ('drop1', 'norm'), 'place_fc2'), ('norm', (), 'place_fc2')]

    def ecmt_feeds(self):
        """Which places feed which linear layers (trans_utils.feed_graph)."""
        return [('fc1', ('place_fc1',)), ('fc2', ('place_fc2',))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.fc1(self.place_fc1(x))
        x = self.drop1(self.act(x))
        x = self.norm(x)
        x = self.fc2(self.place_fc2(x))
        return self.drop2(x)


class ConvertibleGluMlp(nn.Module):
    """timm ``SwiGLU`` (gate and up linear layers apart, EVA-02's optional norm inside) or
    ``GluMlp`` (one packed linear layer, halves split) with placeholders (ECMT_SPEC 12):

    fc1 -> linear(s) -> act(gate) -> gate, up -> gate * up (EC element-wise product) -> drop1
    -> [norm] -> fc2 -> fc2 -> drop2
    """

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        if isinstance(mlp, SwiGLU):
            self.fc1_g, self.fc1_x = mlp.fc1_g, mlp.fc1_x
            self.fc1 = None
        else:
            if not isinstance(mlp.fc1, nn.Linear):
                raise ConversionError(f'a GluMlp with {type(mlp.fc1).__name__} layers cannot be converted')
            self.fc1 = mlp.fc1
            self.gate_last = mlp.gate_last  # timm: the gate is the second half of fc1's output
        self.act, self.drop1 = mlp.act, mlp.drop1
        self.norm, self.fc2, self.drop2 = mlp.norm, mlp.fc2, mlp.drop2
        self.mul = MyMul()
        for place in ('fc1', 'gate', 'up', 'fc2'):
            self.add_module(f'place_{place}', MyTestPlace(place))

    def ecmt_fusable(self):
        """EC module -> modules between -> MT neuron, in this forward (trans_utils.fuse_ec_neurons)."""
        return [('act', (), 'place_gate'), ('norm', (), 'place_fc2')]

    def ecmt_feeds(self):
        """Which places feed which linear layers and the gate product (trans_utils.feed_graph)."""
        return [('fc1', ('place_fc1',)), ('fc1_g', ('place_fc1',)), ('fc1_x', ('place_fc1',)),
                ('mul', ('place_gate', 'place_up')), ('fc2', ('place_fc2',))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.place_fc1(x)
        if self.fc1 is None:
            gate, up = self.fc1_g(x), self.fc1_x(x)
        else:
            first, second = self.fc1(x).chunk(2, dim=-1)
            gate, up = (second, first) if self.gate_last else (first, second)
        x = self.mul(self.place_gate(self.act(gate)), self.place_up(up))
        x = self.norm(self.drop1(x))
        x = self.fc2(self.place_fc2(x))
        return self.drop2(x)


class ConvertibleAttentionPool(nn.Module):
    """timm ``AttentionPoolLatent`` (``global_pool='map'``) with placeholders (ECMT_SPEC 12).

    The learned query is the same at every step and stays analog, like the class token; k and v
    get places after the kv linear layer; q·kᵀ and attn·v are EC products, softmax and the norms
    EC, and the MLP is a convertible MLP (its own places). The query is expanded to the input's
    first dimension, whatever it holds (images, or images x time steps).
    """

    def __init__(self, pool: AttentionPoolLatent) -> None:
        super().__init__()
        # Registration order as timm's, so that state_dict keys come in timm's order.
        self.pos_embed = pool.pos_embed
        self.latent = pool.latent
        self.num_heads, self.head_dim, self.scale = pool.num_heads, pool.head_dim, pool.scale
        self.latent_len, self.pool = pool.latent_len, pool.pool
        self.q, self.kv = pool.q, pool.kv
        self.q_norm, self.k_norm = pool.q_norm, pool.k_norm
        self.proj, self.proj_drop, self.norm, self.mlp = pool.proj, pool.proj_drop, pool.norm, pool.mlp
        self.softmax = nn.Softmax(dim=-1)
        self.qk_matmul = MyAt()
        self.av_matmul = MyAt()
        self.place_k = MyTestPlace('k')
        self.place_v = MyTestPlace('v')

    def ecmt_feeds(self):
        """The products' place-fed operands (trans_utils.feed_graph): the learned query and the
        attention probabilities are analog."""
        return [('qk_matmul', (None, 'place_k')), ('av_matmul', (None, 'place_v'))]

    def forward(self, x: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        B, N, _ = x.shape
        if self.pos_embed is not None:
            x = x + self.pos_embed.unsqueeze(0).to(x.dtype)
        q = self.q(self.latent.expand(B, -1, -1))
        q = q.reshape(B, self.latent_len, self.num_heads, self.head_dim).transpose(1, 2)
        k, v = self.kv(x).reshape(B, N, 2, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        k, v = self.place_k(k), self.place_v(v)
        attn = self.qk_matmul(q, k.transpose(-2, -1), scale=self.scale)
        attn = self.softmax(maybe_add_mask(attn, attn_mask))
        x = self.av_matmul(attn, v)
        x = x.transpose(1, 2).reshape(B, self.latent_len, self.num_heads * self.head_dim)
        x = self.proj_drop(self.proj(x))
        if self.mlp is not None:
            x = x + self.mlp(self.norm(x))
        if self.pool == 'token':
            return x[:, 0]
        if self.pool == 'avg':
            return x.mean(1)
        return x


#: timm classes swapped in every family (exact classes), and their convertible versions.
_SHARED_SWAPS: Dict[type, type] = {Mlp: ConvertibleMlp, GluMlp: ConvertibleGluMlp, SwiGLU: ConvertibleGluMlp,
                                   AttentionPoolLatent: ConvertibleAttentionPool}


def swap_convertible_modules(model: nn.Module, attention_types: Tuple[type, ...],
                             swaps: Optional[Dict[type, Callable[[nn.Module], nn.Module]]] = None) -> None:
    """Swap, in place, every attention of ``attention_types`` and every timm MLP and latent
    attention pool (exact classes) for its convertible version, and every module of a class in
    the family's own ``swaps`` (exact class -> its convertible version); a refusal names the
    module. Recurses into the new modules, so that the MLP inside an attention pool is swapped too."""
    swaps = {**_SHARED_SWAPS, **{t: ConvertibleAttention for t in attention_types}, **(swaps or {})}

    def visit(module: nn.Module, prefix: str) -> None:
        for attr, child in list(module.named_children()):
            full = f'{prefix}.{attr}' if prefix else attr
            convertible = swaps.get(type(child))
            if convertible is not None:
                try:
                    child = convertible(child)
                except ConversionError as exc:
                    raise ConversionError(f'{full} ({type(child).__name__}): {exc}') from None
                setattr(module, attr, child)
            visit(child, full)

    visit(model, '')


#: Containers of every family whose forward is known (the family adds its model and block classes).
CONTAINERS: Tuple[type, ...] = (ConvertibleAttention, ConvertibleMlp, ConvertibleGluMlp,
                                ConvertibleAttentionPool, nn.Sequential, nn.ModuleList)
register_snn_modules(containers=CONTAINERS, leaves=(DropPath, LayerScale, PatchDropout))


def check_structure(model: nn.Module, containers: Tuple[type, ...], what: str,
                    leaves: Tuple[type, ...] = ()) -> None:
    """Refuse any module in the converted region that is neither a known linear/EC-convertible
    leaf (or one of the family's linear ``leaves``) nor a container whose forward we know: never
    run a silently half-converted network."""
    skip = tuple(model.ecmt_input_modules)
    leaves = (nn.Linear, nn.Identity, nn.Dropout, DropPath, LayerScale, PatchDropout, MyTestPlace, MyAt,
              MyMul, nn.Softmax) + trans_utils.EC_MODULE_TYPES + tuple(leaves)  # as registered now
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


# ---------------------------------------------------------------------------------------------
# Families and the factory
# ---------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Family:
    """A model family: the timm model classes it converts (exact classes), the function that
    makes such a model convertible in place (raising :class:`ConversionError` with the reason),
    its published names (-> timm names), and its default fc2 thresholds (ECMT_SPEC 4)."""
    name: str
    model_types: Tuple[type, ...]
    make_convertible: Callable[[nn.Module], nn.Module]
    aliases: Dict[str, str] = field(default_factory=dict)
    fc2_thresholds: Optional[Tuple[float, float]] = None


_FAMILIES: Dict[str, Family] = {}
_DISCOVERED = False
#: timm model classes that no family converts, with the reason (a family's file registers them).
_REFUSALS: Dict[type, str] = {}


def register_family(family: Family) -> Family:
    """Declare a family (its file calls this when imported)."""
    _FAMILIES[family.name] = family
    return family


def register_refusal(model_type: type, reason: str) -> None:
    """Say why a timm model class is not converted (the message of its refusal)."""
    _REFUSALS[model_type] = reason


def families() -> List[Family]:
    """Every family, after importing each ``model_*.py`` file next to this one once."""
    global _DISCOVERED
    if not _DISCOVERED:
        _DISCOVERED = True
        for path in sorted(Path(__file__).resolve().parent.glob('model_*.py')):
            if path.stem != Path(__file__).stem:
                importlib.import_module(path.stem)
    return list(_FAMILIES.values())


# Published convenience names: '<timm name>_cifar10' / '_cifar100' fix the class count.
_DATASET_SUFFIX = re.compile(r'^(?P<base>.+)_(?P<data>cifar100|cifar10)$')
_SUFFIX_CLASSES = {'cifar10': 10, 'cifar100': 100}


def resolve_model_name(name: str) -> Tuple[str, dict]:
    """Map a published model name to (timm name, fixed kwargs); timm names map to themselves."""
    for family in families():
        if name in family.aliases:
            return family.aliases[name], {}
    match = _DATASET_SUFFIX.match(name)
    if match and not timm.is_model(name) and timm.is_model(match['base']):
        return match['base'], {'num_classes': _SUFFIX_CLASSES[match['data']]}
    return name, {}


def _family_of(model: nn.Module) -> Optional[Family]:
    for family in families():
        if type(model) in family.model_types:
            return family
    return None


def create_model(name: str, allow_unconvertible: bool = False, **kwargs) -> nn.Module:
    """Build a convertible model by timm or published name (random weights; no download).

    ``kwargs`` go to ``timm.create_model`` (``num_classes``, ``img_size``, architecture overrides).
    A published ``*_cifar10`` / ``*_cifar100`` name fixes the class count; a conflicting
    ``num_classes`` is an error. A model that cannot be converted raises :class:`ConversionError`
    with the reason, unless ``allow_unconvertible``: then the plain timm model comes back (what
    ``ann`` mode evaluates; it needs no conversion), and :func:`unconvertible_reason` says why
    ``for_v``/``snn`` would refuse it. An unknown name or bad kwargs are errors either way.
    """
    base, fixed = resolve_model_name(name)
    if not timm.is_model(base):
        raise ConversionError(f'unknown model {name!r}: not a timm model name nor a published alias')
    for key, value in fixed.items():
        if kwargs.get(key) is not None and kwargs[key] != value:
            raise ConversionError(f'model {name!r} has {key}={value}, but {kwargs[key]} was asked for')
        kwargs[key] = value
    kwargs = {k: v for k, v in kwargs.items() if v is not None}

    def build() -> nn.Module:
        try:
            return timm.create_model(base, pretrained=False, **kwargs)
        except (TypeError, AssertionError) as exc:
            raise ConversionError(f'cannot build {base!r} with {kwargs}: {exc}') from None

    model = build()
    family = _family_of(model)
    try:
        if family is None:
            known = ', '.join(sorted({t.__name__ for f in families() for t in f.model_types}))
            why = _REFUSALS.get(type(model))
            why = f': {why}' if why else ''
            raise ConversionError(f'{type(model).__name__} ({base}) is not a model class the toolkit '
                                  f'converts{why} (it converts {known})')
        return family.make_convertible(model)
    except ConversionError as exc:
        if not allow_unconvertible:
            raise
        plain = build()  # afresh: the refused conversion may have swapped some modules already
        plain.ecmt_unconvertible = str(exc)
        return plain


def unconvertible_reason(model: nn.Module) -> Optional[str]:
    """Why ``for_v``/``snn`` refuse a model that :func:`create_model` returned plain
    (``allow_unconvertible=True``), or None for a convertible model."""
    return getattr(model, 'ecmt_unconvertible', None)


def default_fc2_thresholds(model: nn.Module) -> Optional[Tuple[float, float]]:
    """The fc2 threshold override that applies to ``model`` by default: its family's (the ViT
    family's (0.25, 0.08)), except in a model with gated MLPs, whose fc2 input is a product and not
    the GELU output those fixed thresholds were set for (calibrated thresholds then)."""
    family = _FAMILIES.get(getattr(model, 'ecmt_family', None))
    if family is None or uses_gated_mlp(model):
        return None
    return family.fc2_thresholds


def uses_gated_mlp(model: nn.Module) -> bool:
    """Whether ``model`` has a gated MLP (SwiGLU/GluMlp), whose fc2 input is an element-wise
    product: the fixed ViT fc2 thresholds were set for a GELU output and never apply there."""
    return any(isinstance(m, ConvertibleGluMlp) for m in model.modules())
