"""ECMT conversion: the surgery that turns an ``ann``/``for_v`` model into an SNN.

:func:`convert_to_snn` replaces every calibrated placeholder by an MT neuron
(:func:`replace_testneuron_by_twosideneuron`, thresholds from :func:`threshold_config`), every
nonlinear module of the converted region by its EC module (:func:`replace_nonlinear_by_neuron`,
the types in :data:`EC_MODULE_TYPES`), every product of two time-varying operands by its EC
product (:func:`replace_at_by_neuron`), checks that nothing unconvertible is left
(:func:`check_fully_converted`, :func:`register_snn_modules`), then chooses the backend and makes
its fusions (:func:`set_backend`, :func:`fuse_ec_neurons`). The modules themselves (neurons, EC
modules, products, their states and records) are in :mod:`trans_utils`, which also gives every name
here under its published name.
"""
from __future__ import annotations

import math
import os
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from calibration import TestNeuron
from kernels import ConversionError, kernels_of, resolve_backend
from options import CODINGS, FIRE_RULES, THRESHOLD_GRANULARITIES
from trans_utils import (_EC_REGISTERED, AtNeuron, ECNeuron, ECPassThrough, MulNeuron, MyAt, MyMul, MyTestPlace, StatefulModule,
                         TwoSideNeuron, exp_comp_neuron, in_region, model_device,
                         skip_prefixes)

__all__ = ['EC_MODULE_TYPES', 'LINEAR_MODULE_TYPES', 'FUSABLE_KINDS', 'replace_test_by_testneuron', 'threshold_config',
           'replace_testneuron_by_twosideneuron', 'replace_nonlinear_by_neuron', 'replace_at_by_neuron',
           'register_ec_module', 'register_snn_modules', 'check_fully_converted', 'convert_to_snn', 'set_backend',
           'fuse_ec_neurons']


def set_backend(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Run every stateful module of ``model`` on one backend for the device its weights are on
    (:func:`resolve_backend`: 'auto'/None chooses), resetting their state, and make the fusions
    that backend has (:func:`fuse_ec_neurons`). :func:`convert_to_snn` calls it; call it again
    after moving a converted model to another device. The name is in ``model.ecmt_backend``."""
    kernels = kernels_of(resolve_backend(backend, model_device(model)))
    for module in model.modules():
        if isinstance(module, (StatefulModule, ECPassThrough)):  # a pass-through: its EC module, if unfused
            module.kernels = kernels
            if isinstance(module, StatefulModule):
                module.reset()
    model.ecmt_backend = kernels.name
    fuse_ec_neurons(model)
    return model


def _norm_types() -> Tuple[type, ...]:
    types: List[type] = [nn.LayerNorm, nn.GroupNorm]
    try:
        from timm.layers import RmsNorm
        types.append(RmsNorm)
    except ImportError:  # pragma: no cover - older timm
        pass
    if hasattr(nn, 'RMSNorm'):
        types.append(nn.RMSNorm)
    return tuple(types)


#: Nonlinear modules of one input that expectation compensation converts exactly.
EC_MODULE_TYPES: Tuple[type, ...] = _norm_types() + (
    nn.GELU, nn.Softmax, nn.SiLU, nn.ReLU, nn.Tanh, nn.Sigmoid, nn.Hardswish, nn.Mish, nn.ELU)
try:
    from timm.layers import GELU as _TimmGELU, GELUTanh as _TimmGELUTanh, QuickGELU as _TimmQuickGELU
    EC_MODULE_TYPES += (_TimmGELU, _TimmGELUTanh, _TimmQuickGELU)
except ImportError:  # pragma: no cover - older timm
    pass


def register_ec_module(module_type: type, kind: str = 'function') -> None:
    """Declare ``module_type`` a nonlinear function of one input that conversion wraps in EC
    (ECMT_SPEC 5), as the norms and activations of :data:`EC_MODULE_TYPES` are (its subclasses too,
    as 'function' unless registered themselves). ``kind``: 'function' (any function: the module
    itself is called on the running means), or a kernel's own 'gelu', 'softmax' or 'layer_norm' for a module
    that computes exactly torch's function of that name from the same attributes (``approximate``;
    ``dim`` -1; ``normalized_shape`` of one dimension, ``weight``, ``bias``, ``eps``)."""
    global EC_MODULE_TYPES
    if kind not in ('function', 'gelu', 'softmax', 'layer_norm'):
        raise ValueError(f"unknown EC kind {kind!r}; choose one of function, gelu, softmax, layer_norm")
    _EC_REGISTERED[module_type] = kind
    if module_type not in EC_MODULE_TYPES:
        EC_MODULE_TYPES += (module_type,)


def _named_children_recursive(module: nn.Module, prefix: str = '') -> Iterator[Tuple[nn.Module, str, str, nn.Module]]:
    """Yield (parent, attribute, full name, child) for every submodule, parents first."""
    for attr, child in module.named_children():
        full = f'{prefix}.{attr}' if prefix else attr
        yield module, attr, full, child
        yield from _named_children_recursive(child, full)


def replace_test_by_testneuron(model: nn.Module, percent: float = 0.99, granularity: str = 'place') -> nn.Module:
    """Replace every :class:`MyTestPlace` by a calibrating :class:`TestNeuron` (``for_v``, and
    before loading a threshold checkpoint for ``snn``, whose thresholds' shapes they take):
    ``granularity`` 'place' (ECMT_SPEC 3) or 'channel' (ECMT_SPEC 15)."""
    if granularity not in THRESHOLD_GRANULARITIES:
        raise ConversionError(f'unknown threshold granularity {granularity!r}; choose one of '
                              f'{", ".join(THRESHOLD_GRANULARITIES)}')
    for parent, attr, _, child in list(_named_children_recursive(model)):
        if type(child) is MyTestPlace:
            setattr(parent, attr, TestNeuron(child.place, percent, granularity))
    return model


def threshold_config(place: str, *, linear_num: int = 8, qkv_num: int = 8, softmax_num: int = 8,
                     softmax_p: float = 0.0125,
                     fc2_thresholds: Optional[Tuple[float, float]] = None
                     ) -> Tuple[int, Optional[Tuple[float, float]]]:
    """(levels, fixed thresholds or None for the calibrated ones) of a place (ECMT_SPEC 4)."""
    if place == 's':
        return softmax_num, (softmax_p, softmax_p)
    if place in ('q', 'k', 'v'):
        return qkv_num, None
    if place == 'fc2' and fc2_thresholds is not None:
        return linear_num, tuple(fc2_thresholds)
    return linear_num, None


def replace_testneuron_by_twosideneuron(model: nn.Module, linear_num: int = 8, qkv_num: int = 8,
                                        softmax_num: int = 8, softmax_p: float = 0.0125,
                                        fc2_thresholds: Optional[Tuple[float, float]] = None,
                                        coding: str = 'rate', fire_rule: str = 'ecmt',
                                        threshold_scale: float = 1.0) -> nn.Module:
    """Replace every calibrated :class:`TestNeuron` by an MT :class:`TwoSideNeuron` of ``coding``
    ('rate', or 'differential': ECMT_SPEC 14) and ``fire_rule`` ('ecmt': section 4; 'round':
    section 15).

    Levels and thresholds per place follow ECMT_SPEC 4; ``fc2_thresholds`` (θp, θn) overrides the
    calibrated fc2 thresholds (the ViT default is (0.25, 0.08)). Calibrated thresholds, one pair
    per place or per channel, are multiplied by ``threshold_scale`` (ECMT_SPEC 15; fixed ones are
    not). Raises :class:`ConversionError` naming the places whose calibrated thresholds are all
    zero or not finite.
    """
    for name, value in (('linear_num', linear_num), ('qkv_num', qkv_num), ('softmax_num', softmax_num)):
        if int(value) < 1:
            raise ConversionError(f'{name} must be >= 1, got {value}')
    if not softmax_p > 0:
        raise ConversionError(f'softmax_p must be > 0, got {softmax_p}')
    if coding not in CODINGS:
        raise ConversionError(f'unknown coding {coding!r}; choose one of {", ".join(CODINGS)}')
    if fire_rule not in FIRE_RULES:
        raise ConversionError(f'unknown fire rule {fire_rule!r}; choose one of {", ".join(FIRE_RULES)}')
    if not (math.isfinite(threshold_scale) and threshold_scale > 0):
        raise ConversionError(f'threshold_scale must be a positive number, got {threshold_scale}')
    cfg = dict(linear_num=linear_num, qkv_num=qkv_num, softmax_num=softmax_num,
               softmax_p=softmax_p, fc2_thresholds=fc2_thresholds)
    targets = [(p, a, n, c) for p, a, n, c in _named_children_recursive(model) if type(c) is TestNeuron]
    if any(type(c) is MyTestPlace for _, _, _, c in _named_children_recursive(model)):
        raise ConversionError('the model still has plain placeholders (MyTestPlace): call '
                              'replace_test_by_testneuron and load calibrated thresholds first')
    uncalibrated = []
    for _, _, name, neuron in targets:
        _, fixed = threshold_config(neuron.place, **cfg)
        if fixed is None:
            p, n = neuron.scale_p, neuron.scale_n
            if not (torch.isfinite(p).all() and torch.isfinite(n).all()) or (p == 0).all() and (n == 0).all():
                uncalibrated.append(name)
    if uncalibrated:
        shown = ', '.join(uncalibrated[:8]) + (f' ... ({len(uncalibrated)} in all)' if len(uncalibrated) > 8 else '')
        raise ConversionError('these places have no calibrated thresholds (zero or not finite): '
                              f'{shown}. Run --test_mode for_v first and pass its checkpoint.')
    for parent, attr, _, neuron in targets:
        levels, fixed = threshold_config(neuron.place, **cfg)
        if fixed is None:
            scale_p, scale_n = neuron.scale_p.detach(), neuron.scale_n.detach()
            if threshold_scale != 1.0:
                scale_p, scale_n = scale_p * threshold_scale, scale_n * threshold_scale
        else:
            scale_p, scale_n = fixed
        new = TwoSideNeuron(neuron.place, scale_p, scale_n, levels, coding, fire_rule).to(neuron.scale_p.device)
        setattr(parent, attr, new)
    return model


def replace_nonlinear_by_neuron(model: nn.Module) -> nn.Module:
    """Wrap every nonlinear module of the converted region in an :class:`exp_comp_neuron`."""
    skip = skip_prefixes(model)
    for parent, attr, name, child in list(_named_children_recursive(model)):
        if isinstance(parent, (exp_comp_neuron, ECPassThrough)) or not in_region(name, skip):
            continue
        if isinstance(child, EC_MODULE_TYPES):
            setattr(parent, attr, exp_comp_neuron(child))
    return model


def replace_at_by_neuron(model: nn.Module) -> nn.Module:
    """Replace every product placeholder by its EC version: :class:`MyAt` by :class:`AtNeuron`,
    :class:`MyMul` by :class:`MulNeuron`."""
    for parent, attr, _, child in list(_named_children_recursive(model)):
        if type(child) is MyAt:
            setattr(parent, attr, AtNeuron())
        elif type(child) is MyMul:
            setattr(parent, attr, MulNeuron())
    return model


#: Modules that are linear (or identities at evaluation) and may stay as they are in an SNN.
LINEAR_MODULE_TYPES: Tuple[type, ...] = (nn.Linear, nn.Identity, nn.Dropout)
# Containers whose forward is a linear composition of their children (registered by the model files).
_SNN_CONTAINERS: List[type] = [nn.Sequential, nn.ModuleList]
_SNN_LEAVES: List[type] = []


def register_snn_modules(containers: Iterable[type] = (), leaves: Iterable[type] = ()) -> None:
    """Declare module classes that are safe in an SNN: ``containers`` whose own forward only
    composes their children linearly (sums, reshapes, fixed scales), ``leaves`` that are linear."""
    _SNN_CONTAINERS.extend(c for c in containers if c not in _SNN_CONTAINERS)
    _SNN_LEAVES.extend(c for c in leaves if c not in _SNN_LEAVES)


def check_fully_converted(model: nn.Module) -> None:
    """Refuse a half-converted network: every module of the converted region must be an MT neuron,
    an EC module, a known linear module, or a registered container. Raises ConversionError."""
    skip = skip_prefixes(model)
    leaves = ((TwoSideNeuron, exp_comp_neuron, ECPassThrough, AtNeuron, MulNeuron) + LINEAR_MODULE_TYPES
              + tuple(_SNN_LEAVES))
    bad = []
    for _, _, name, child in _named_children_recursive(model):
        if not in_region(name, skip) or _inside_ec(model, name):
            continue
        if type(child) in _SNN_CONTAINERS or isinstance(child, leaves):
            continue
        bad.append(f'{name} ({type(child).__name__})')
    if bad:
        shown = ', '.join(bad[:8]) + (f' ... ({len(bad)} in all)' if len(bad) > 8 else '')
        raise ConversionError(f'these modules cannot be converted to the SNN and would stay analog: {shown}')


def _inside_ec(model: nn.Module, name: str) -> bool:
    module = model
    for part in name.split('.')[:-1]:
        module = getattr(module, part)
        if isinstance(module, (exp_comp_neuron, ECPassThrough)):
            return True
    return False


def convert_to_snn(model: nn.Module, *, linear_num: int = 8, qkv_num: int = 8, softmax_num: int = 8,
                   softmax_p: float = 0.0125, fc2_thresholds: Optional[Tuple[float, float]] = None,
                   backend: Optional[str] = None, coding: str = 'rate', fire_rule: str = 'ecmt',
                   threshold_scale: float = 1.0) -> nn.Module:
    """All of ``snn`` mode's surgery on a model holding calibrated :class:`TestNeuron` s:
    MT neurons of ``coding`` ('rate' or 'differential', ECMT_SPEC 14) and ``fire_rule`` with the
    calibrated thresholds times ``threshold_scale`` (ECMT_SPEC 15), EC nonlinear modules, EC
    products, the check that nothing stays analog, and one
    backend for the whole model on its device (``backend``: 'auto'/None, 'native', 'triton' or
    'eager'; one that cannot run there is a ConversionError) with that backend's fusions
    (:func:`set_backend`)."""
    replace_testneuron_by_twosideneuron(model, linear_num, qkv_num, softmax_num, softmax_p, fc2_thresholds, coding,
                                        fire_rule, threshold_scale)
    replace_nonlinear_by_neuron(model)
    replace_at_by_neuron(model)
    check_fully_converted(model)
    set_backend(model, backend)
    return model


#: Whether conversion fuses an EC module with the MT neuron it feeds (``ECMT_FUSE=0``: never).
_FUSE = os.environ.get('ECMT_FUSE', '1') != '0'
#: EC kinds that a backend's ``ec_mt_steps`` computes together with the MT neuron after them.
FUSABLE_KINDS = ('gelu', 'softmax', 'layer_norm')


def _between_is_identity(modules: Sequence[Optional[nn.Module]]) -> bool:
    # Dropouts are identities in evaluation, the only mode an SNN runs in.
    return all(isinstance(m, (nn.Identity, nn.Dropout)) for m in modules)


def fuse_ec_neurons(model: nn.Module, enabled: Optional[bool] = None) -> int:
    """Make the fusions of ``model``'s backend, at conversion, as modules that own their state:

    * an EC module whose output goes straight to an MT neuron (a module of the model names such
      pairs: its ``ecmt_fusable()`` gives (EC attribute, attributes of the modules between, neuron
      attribute), e.g. a converted MLP's GELU -> drop -> norm -> fc2 place; the modules between must
      be identities or dropouts) becomes one :class:`ECNeuron` in the neuron's place, the EC
      module's place an :class:`ECPassThrough`;
    * an attention whose q, k and v places take the fused qkv linear output directly (its
      ``ecmt_qkv_fusable()``) has each of its q, k and v neurons read its part of that output in
      place (``fuse_qkv``; each neuron keeps its own state).

    Every fusion is undone first; ``enabled`` False (or ``ECMT_FUSE=0``, the default for None)
    leaves them undone, and so does a backend without fused kernels (eager). The numbers are the
    same either way. Returns the number of pairs and q/k/v triples fused."""
    enabled = _FUSE if enabled is None else bool(enabled)
    for parent, attr, _, child in list(_named_children_recursive(model)):
        if isinstance(child, ECNeuron):
            plain = TwoSideNeuron(child.place, child.scale_p, child.scale_n, child.levels,
                                  child.coding, child.fire_rule).to(child.scale_p.device)
            plain.kernels, plain.recording = child.kernels, child.recording
            setattr(parent, attr, plain)
        elif isinstance(child, ECPassThrough):
            ec = exp_comp_neuron(child.module)
            ec.kernels = child.kernels
            setattr(parent, attr, ec)
    for module in model.modules():
        if hasattr(module, 'ecmt_qkv_fusable'):
            module.fuse_qkv = False
    if not enabled:
        return 0
    fused = 0
    for module in list(model.modules()):
        qkv = getattr(module, 'ecmt_qkv_fusable', None)
        neurons = [getattr(module, f'place_{p}', None) for p in 'qkv']
        if (qkv is not None and qkv() and all(type(n) is TwoSideNeuron for n in neurons)
                and all(n.kernels is not None and n.kernels.FUSES for n in neurons)):
            module.fuse_qkv = True
            fused += 1
        pairs = getattr(module, 'ecmt_fusable', None)
        if pairs is None:
            continue
        for ec_name, between_names, neuron_name in pairs():
            ec, neuron = getattr(module, ec_name, None), getattr(module, neuron_name, None)
            between = [getattr(module, name, None) for name in between_names]
            if (type(ec) is exp_comp_neuron and ec.kind in FUSABLE_KINDS and type(neuron) is TwoSideNeuron
                    and neuron.kernels is not None and neuron.kernels.FUSES and ec.kernels is neuron.kernels
                    and _between_is_identity(between)):
                passthrough = ECPassThrough(ec.module, ec.kernels)
                setattr(module, neuron_name, ECNeuron(neuron, ec.module))
                setattr(module, ec_name, passthrough)
                fused += 1
    return fused


