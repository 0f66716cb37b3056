"""The multi-step kernels of the stateful modules, one module per backend, and what they share.

A backend is a module of kernels with one signature per kernel (:class:`Kernels`): ``eager``
(torch operations, any device; the reference backend of the tests), ``native`` (C++ CPU kernels,
``csrc/ecmt_kernels.cpp``, loaded through ctypes) and ``triton`` (CUDA; the CPU under
``TRITON_INTERPRET=1``). A converted module keeps the kernel module it was given at conversion
(:func:`kernels_of`, from :data:`BACKEND_TABLE`) and never branches on a backend's name.

State semantics, the same on every backend: a kernel given a state tensor (membrane, estimate,
running sum, last total) reads it and, with ``keep``, writes the state after the chunk into it in
place and returns it; given None (a batch's first chunk: the state starts at zero) with ``keep`` it
returns a new tensor; without ``keep`` (a batch's last chunk) it writes nothing and returns None.
A caller that must not see its state changed passes a copy. The EC product's bookkeeping
(``running_sums``, ``scaled_differences``) is pure: it reads what it is given and returns new
tensors, from which the product module makes its state.

The MT neuron's thresholds reach the kernels as a level table (:func:`level_table`): per level j
the positive fire threshold, the positive spike, the negative fire threshold and the negative
spike, NaN where a level never fires (levels past N, dead sides).
"""
from __future__ import annotations

import importlib
import math
import warnings
from types import ModuleType
from typing import Callable, Dict, NamedTuple, Optional, Protocol, Sequence, Tuple

import torch

from options import BACKEND_CHOICES, BACKENDS, CODINGS, FIRE_RULES

__all__ = ['BACKENDS', 'BACKEND_CHOICES', 'BACKEND_TABLE', 'Backend', 'ConversionError', 'Kernels', 'kernels_of',
           'backend_problem', 'resolve_backend', 'set_default_backend', 'default_backend', 'level_table',
           'level_width', 'channel_map', 'channel_table', 'part_channels', 'differential_coding', 'NeuronCall',
           'neuron_call', 'parts_mt_steps']


class ConversionError(ValueError):
    """The model or its thresholds cannot be converted as asked (a backend that cannot run here
    included); the message names the modules."""


#: Backend name -> the module of its kernels (imported on first use: triton may be missing).
BACKEND_TABLE: Dict[str, str] = {'native': 'kernels.native', 'triton': 'kernels.triton', 'eager': 'kernels.eager'}

_default_backend = 'auto'
_warned: set = set()


class Kernels(Protocol):
    """What a backend module provides (the signatures every backend shares; each function's
    docstring in ``kernels.eager`` is the reference). States are flat float32 tensors, one element
    per element of a step; see the module docstring for who writes them."""

    #: EC kinds with a kernel of their own (any other function: ``eager.ec_function_steps``).
    EC_KINDS: Tuple[str, ...]
    #: Input dtypes the kernels read as they are (any other is converted to float32 first).
    INPUT_DTYPES: Tuple[torch.dtype, ...]
    #: Whether fused kernels exist (an EC function with its neuron; q/k/v on one qkv output).
    FUSES: bool

    def available(self) -> bool: ...

    def mt_steps(self, x: torch.Tensor, table: torch.Tensor, membrane: Optional[torch.Tensor], keep: bool, *,
                 coding: str = 'rate', estimate: Optional[torch.Tensor] = None, t0: int = 0,
                 sent: bool = False) -> tuple:
        """K steps of the MT neuron on ``x`` [K, ...]: rate (spikes, counts [K], membrane);
        differential (outputs r + s, counts of s [K], membrane, estimate, spikes s or None)."""

    def qkv_mt_steps(self, qkv: torch.Tensor, part: int, heads: int, table: torch.Tensor,
                     membrane: Optional[torch.Tensor], keep: bool, **coding) -> tuple:
        """:meth:`mt_steps` on part ``part`` (q 0, k 1, v 2) of a fused qkv output
        [K, B, N, 3*heads*D]; the outputs are [K, B, heads, N, D]."""

    def qkv_parts_mt_steps(self, qkv: torch.Tensor, heads: int, tables: Sequence[Optional[torch.Tensor]],
                           membranes: Sequence[Optional[torch.Tensor]], keep: bool, **coding) -> list:
        """:meth:`qkv_mt_steps` of the parts whose table is given, in one pass where the backend
        can (per part its result, or None)."""

    def ec_gelu_steps(self, x, cum, prev, t0: int, keep: bool, approximate: bool) -> tuple: ...

    def ec_softmax_steps(self, x, cum, prev, t0: int, keep: bool) -> tuple: ...

    def ec_layer_norm_steps(self, x, cum, prev, t0: int, keep: bool, weight, bias, eps: float) -> tuple: ...

    def ec_mt_steps(self, kind: str, x, cum, prev, t0: int, keep: bool, table, membrane, **extra) -> tuple:
        """K steps of an EC function and the MT neuron it feeds, in one pass."""

    def running_sums(self, x: torch.Tensor, carried: Optional[torch.Tensor]) -> torch.Tensor: ...

    def scaled_differences(self, totals: torch.Tensor, prev: Optional[torch.Tensor], t0: int, keep: bool,
                           scale: float) -> Tuple[torch.Tensor, Optional[torch.Tensor]]: ...

    def nonzero_counts(self, x: torch.Tensor, dim: int) -> Optional[torch.Tensor]: ...


def _load(backend: str) -> Optional[ModuleType]:
    try:
        return importlib.import_module(BACKEND_TABLE[backend])
    except ImportError:  # pragma: no cover - the modules are part of the toolkit
        return None


class Backend:
    """A backend as a converted module keeps it: the kernels of one backend (attributes are the
    kernel module's), its ``name`` for display and records, and :meth:`problem_on` for a device.
    One object per backend, shared by every module; copying a model (``copy.deepcopy``) and
    pickling keep the same object, as they would a module-level function."""
    __slots__ = ('name', 'module')

    def __init__(self, name: str, module: ModuleType) -> None:
        self.name, self.module = name, module

    def __getattr__(self, attr: str):
        return getattr(self.module, attr)

    def problem_on(self, device: torch.device) -> Optional[str]:
        """Why these kernels cannot take tensors on ``device``, or None."""
        return backend_problem(self.name, device)

    def __deepcopy__(self, memo) -> 'Backend':
        return self

    def __reduce__(self):
        return kernels_of, (self.name,)

    def __repr__(self) -> str:
        return f'Backend({self.name!r})'


_backends: Dict[str, Backend] = {}


def kernels_of(backend: str) -> Backend:
    """The kernels of ``backend`` (a name of :data:`BACKENDS`), as a module keeps them."""
    found = _backends.get(backend)
    if found is not None:
        return found
    if backend not in BACKEND_TABLE:
        raise ValueError(f'unknown backend {backend!r}; choose one of {", ".join(BACKENDS)}')
    module = _load(backend)
    if module is None:  # pragma: no cover
        raise ConversionError(f'the {backend} backend is not available: {BACKEND_TABLE[backend]} does not import')
    found = _backends[backend] = Backend(backend, module)
    return found


def backend_problem(backend: str, device: torch.device | str = 'cpu') -> Optional[str]:
    """Why ``backend`` cannot run a model on ``device``, or None if it can."""
    device = torch.device(device)
    if backend == 'eager':
        return None
    if backend == 'native':
        native = _load('native')
        if device.type != 'cpu':
            return f'the native kernels run on the CPU only, and the model is on {device}'
        if not native.ENABLED:
            return 'the native kernels are turned off (ECMT_NATIVE=0)'
        if native.library() is None:
            return 'the native kernels could not be built (no working C++ compiler: see the warning above)'
        return None
    if backend == 'triton':
        module = _load('triton')
        if module is None or module.triton is None:
            return 'Triton is not installed (it comes with the CUDA builds of torch: pip install triton)'
        if device.type == 'cuda' and not module.INTERPRETED:
            return None
        if device.type == 'cpu' and module.INTERPRETED:
            return None
        return (f'Triton runs on CUDA devices, or on the CPU under TRITON_INTERPRET=1 (set before start), '
                f'and the model is on {device}' + (' with TRITON_INTERPRET=1 set' if module.INTERPRETED else ''))
    raise ValueError(f'unknown backend {backend!r}; choose one of {", ".join(BACKEND_CHOICES)}')


def resolve_backend(backend: Optional[str] = None, device: torch.device | str = 'cpu') -> str:
    """The backend a model on ``device`` runs on: ``backend`` itself (a ConversionError saying why
    if it cannot run there), or for 'auto' (and None: the default, :func:`set_default_backend`)
    native on the CPU and triton on CUDA where they work, else eager (warned once)."""
    backend = backend or _default_backend
    device = torch.device(device)
    if backend != 'auto':
        problem = backend_problem(backend, device)
        if problem is not None:
            raise ConversionError(f'backend {backend!r} cannot run here: {problem}')
        return backend
    preferred = {'cpu': 'native', 'cuda': 'triton'}.get(device.type, 'eager')
    problem = backend_problem(preferred, device)
    if problem is None:
        return preferred
    message = f'backend {preferred} unavailable ({problem}): the SNN runs on the eager backend (same numbers, slower)'
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message)
    return 'eager'


def set_default_backend(backend: str) -> str:
    """The backend that conversions given no backend take ('auto', the default, or a name of
    :data:`BACKENDS`). Returns the previous default. Changes no existing module:
    ``trans_utils.set_backend`` does that."""
    global _default_backend
    if backend not in BACKEND_CHOICES:
        raise ValueError(f'unknown backend {backend!r}; choose one of {", ".join(BACKEND_CHOICES)}')
    previous, _default_backend = _default_backend, backend
    return previous


def default_backend() -> str:
    return _default_backend


# ---------------------------------------------------------------------------------------------
# What the backends share
# ---------------------------------------------------------------------------------------------
def level_width(levels: int) -> int:
    """Levels are padded to a power of two (at least 8) so that one compiled kernel serves many N."""
    return max(8, 1 << (int(levels) - 1).bit_length())


def level_table(theta_p, theta_n, levels: int, width: Optional[int] = None,
                fire_rule: str = 'ecmt') -> torch.Tensor:
    """The MT neuron's thresholds as the kernels read them: float32 [C, 4, width] contiguous, one
    [4, width] block per channel (C: the elements of ``theta_p`` and ``theta_n``, tensors of one
    shape, in row-major order; a scalar or [1] gives C = 1). Per level j: the positive fire
    threshold, the positive spike θp·2^j, the negative fire threshold and spike (same with θn).
    Fire thresholds: ``fire_rule='ecmt'`` (ECMT_SPEC 4) θ·2^j − θ·0.5; ``'round'`` (ECMT_SPEC 15)
    θ·f_j with f_0 = 0.5 and f_j = 0.75·2^j for j >= 1 (exact in float32: one rounding, the
    reference's expression). NaN (never reached) for levels j >= ``levels`` (padding up to
    ``width``) and for a channel side whose θ is not positive (or NaN). Which element of a
    kernel's input uses which channel: the kernels' ``channels`` argument (:func:`channel_map`)."""
    if fire_rule not in FIRE_RULES:
        raise ValueError(f"fire_rule must be one of {', '.join(FIRE_RULES)}, got {fire_rule!r}")
    width = width or level_width(levels)
    theta_p = torch.as_tensor(theta_p, dtype=torch.float32)
    theta_n = torch.as_tensor(theta_n, dtype=torch.float32).to(theta_p.device)
    if theta_p.numel() != theta_n.numel() or (theta_p.numel() > 1 and theta_p.shape != theta_n.shape):
        raise ValueError(f'level_table: theta_p {tuple(theta_p.shape)} and theta_n {tuple(theta_n.shape)} must have '
                         'one shape')
    theta_p, theta_n = theta_p.reshape(-1, 1), theta_n.reshape(-1, 1)
    j = torch.arange(width, dtype=torch.float32, device=theta_p.device)
    scale = torch.exp2(j)  # exact powers of two
    if fire_rule == 'round':
        factor = torch.where(j >= 1, scale * 0.75, torch.full_like(scale, 0.5))  # exact
    rows = []
    for theta in (theta_p, theta_n):
        if fire_rule == 'round':
            threshold = theta * factor
        else:
            threshold = theta * scale - theta * 0.5  # the rule's own expression: same rounding
        threshold = torch.where((theta > 0) & (j < levels), threshold, torch.full_like(threshold, math.nan))
        rows += [threshold, theta * scale]
    return torch.stack(rows, dim=1).contiguous()


def channel_map(theta_shape: Sequence[int], step_shape: Sequence[int]) -> Tuple[int, int, int]:
    """The kernels' ``channels=(inner, groups, width)`` for thresholds of shape ``theta_shape``
    broadcast (right-aligned) against one step of a kernel's output, ``step_shape``: the element
    at row-major index i of a step uses channel ((i // inner) % groups) * width + i % width, the
    row-major index of its threshold. The trailing dimensions that the thresholds do not broadcast
    form ``width``; at most one further block of them, before broadcast dimensions, forms
    ``groups`` (its inner: the elements of one step after it); a scalar gives (1, 1, 1) and one
    block alone (1, 1, width). A shape that does not broadcast, or a third block, raises
    ValueError (expand the thresholds instead)."""
    theta_shape, step_shape = tuple(int(s) for s in theta_shape), tuple(int(s) for s in step_shape)
    problem = f'thresholds of shape {theta_shape} do not broadcast against a step of shape {step_shape}'
    if len(theta_shape) > len(step_shape):
        if any(s != 1 for s in theta_shape[:len(theta_shape) - len(step_shape)]):
            raise ValueError(problem)
        theta_shape = theta_shape[len(theta_shape) - len(step_shape):]
    theta_shape = (1,) * (len(step_shape) - len(theta_shape)) + theta_shape
    blocks = [1]  # from the right: width, the broadcast run after groups, groups
    own = True  # whether the current block holds dimensions of the thresholds' own
    for t, s in zip(reversed(theta_shape), reversed(step_shape)):
        if s == 1 and t == 1:
            continue
        if t != s and t != 1:
            raise ValueError(problem)
        if (t == s) != own:
            own = not own
            blocks.append(1)
            if len(blocks) > 3 and own:
                raise ValueError(f'{problem} as one block of channels or two (the channels of thresholds of '
                                 f'shape {theta_shape} are not one run of (inner, groups, width): expand them)')
        blocks[-1] *= s
    width = blocks[0]
    between = blocks[1] if len(blocks) > 1 else 1
    groups = blocks[2] if len(blocks) > 2 else 1
    if groups == 1:
        return 1, 1, width
    return between * width, groups, width


def channel_table(name: str, table: torch.Tensor, channels) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """(``table`` as [C, 4, width], the channel map) after checking them against each other: an
    old [4, width] table is one channel; ``channels`` is (inner, groups, width) of positive
    integers with groups * width == C (what every backend's neuron kernels check)."""
    if table.dim() == 2:
        table = table.unsqueeze(0)
    if table.dim() != 3 or table.shape[1] != 4 or table.shape[2] < 1:
        raise ValueError(f'{name}: table must be a [C, 4, width] tensor (or [4, width]: one channel), got '
                         f'{tuple(table.shape)}')
    try:
        inner, groups, width = (int(c) for c in channels)
    except (TypeError, ValueError):
        raise ValueError(f'{name}: channels must be (inner, groups, width), got {channels!r}') from None
    if min(inner, groups, width) < 1:
        raise ValueError(f'{name}: channels must be positive (inner, groups, width), got {channels!r}')
    if groups * width != table.shape[0]:
        raise ValueError(f'{name}: channels {(inner, groups, width)} name {groups * width} channels, the table has '
                         f'{table.shape[0]}')
    return table, (inner, groups, width)


def part_channels(channels) -> list:
    """The channel map of each part (q, k, v) of ``qkv_parts_mt_steps``: one (inner, groups,
    width) for the three, or a sequence of three (None: one channel)."""
    if len(channels) == 3 and all(c is None or isinstance(c, (tuple, list)) for c in channels):
        return [(1, 1, 1) if c is None else tuple(c) for c in channels]
    return [tuple(channels)] * 3


def differential_coding(name: str, coding: str, membrane: Optional[torch.Tensor],
                        estimate: Optional[torch.Tensor]) -> bool:
    """Whether ``coding`` is the differential one, checking that its two states come together (the
    argument check of every backend's neuron kernels)."""
    if coding not in CODINGS:
        raise ValueError(f"{name}: coding must be one of {', '.join(CODINGS)}, got {coding!r}")
    if coding == 'differential' and (membrane is None) != (estimate is None):
        raise ValueError(f'{name}: the membrane and the estimate are carried together')
    return coding == 'differential'


class NeuronCall(NamedTuple):
    """One call of a neuron kernel (``mt_steps``, ``qkv_mt_steps``, ``ec_mt_steps`` of the
    backends that run a kernel of their own), its arguments prepared by :func:`neuron_call`: the
    checked table and channel map, the state the kernel reads and/or writes (the given tensors, a
    new one for a fresh state that is kept, None for one that is not) and the outputs it writes."""
    table: torch.Tensor
    channels: Tuple[int, int, int]
    differential: bool
    keep: bool
    membrane: Optional[torch.Tensor]
    fresh: bool  # the states start at zero (not read)
    estimate: Optional[torch.Tensor]  # differential only
    spike: torch.Tensor  # rate: the spikes; differential: the outputs r + s
    sent: Optional[torch.Tensor]  # differential with ``sent`` only: the spikes s
    counts: torch.Tensor

    def at_rest(self) -> None:
        """A chunk of no step (or of empty steps) leaves a fresh state at zero: a kept one is
        zeroed here, for the kernels that write nothing then."""
        if self.keep and self.fresh:
            self.membrane.zero_()
            if self.differential:
                self.estimate.zero_()

    def result(self, *ec_state) -> tuple:
        """What the kernel function returns: (spikes, counts, ``*ec_state``, membrane) for the
        rate neuron, (outputs, counts, ``*ec_state``, membrane, estimate, spikes s or None) for the
        differential one; the states None without ``keep``."""
        membrane, estimate = (self.membrane, self.estimate) if self.keep else (None, None)
        if self.differential:
            return self.spike, self.counts, *ec_state, membrane, estimate, self.sent
        return self.spike, self.counts, *ec_state, membrane


def neuron_call(name: str, table: torch.Tensor, channels: Tuple[int, int, int], coding: str,
                membrane: Optional[torch.Tensor], estimate: Optional[torch.Tensor], sent: bool, keep: bool,
                shape: Sequence[int], n: int, state: Callable, counts: torch.Tensor) -> NeuronCall:
    """The :class:`NeuronCall` of a neuron kernel writing outputs of ``shape`` ([K, ...], float32
    on ``counts``' device) from states of ``n`` elements: the coding checked
    (:func:`differential_coding`), the states through the backend's ``state(given, n, keep)`` ->
    (tensor or None, fresh), the outputs allocated; ``table`` and ``channels`` as the backend
    checked them."""
    differential = differential_coding(name, coding, membrane, estimate)
    membrane, fresh = state(membrane, n, keep)
    estimate = state(estimate, n, keep)[0] if differential else None
    spike = torch.empty(shape, dtype=torch.float32, device=counts.device)
    spikes_sent = torch.empty_like(spike) if differential and sent else None
    return NeuronCall(table, channels, differential, bool(keep), membrane, fresh, estimate, spike, spikes_sent, counts)


def parts_mt_steps(qkv_mt_steps: Callable, qkv: torch.Tensor, heads: int, tables, membranes, keep: bool, *,
                   coding: str = 'rate', estimates=(None, None, None), t0: int = 0, sents=(False, False, False),
                   channels=(1, 1, 1)):
    """``qkv_parts_mt_steps`` as one ``qkv_mt_steps`` call per part that has a table, for the
    backends without a joint kernel (``native`` reads each row once): per part what
    ``qkv_mt_steps`` returns, or None. ``channels``: one map for the three parts, or one per part
    (:func:`part_channels`). States as every kernel's (updated in place with ``keep``)."""
    maps = part_channels(channels)
    if not (len(tables) == len(membranes) == len(estimates) == len(sents) == 3):
        raise ValueError('qkv_parts_mt_steps: give one table, membrane, estimate and sent flag per part')
    if all(table is None for table in tables):
        raise ValueError('qkv_parts_mt_steps: no part has a table')
    results = [None] * 3
    for part, table in enumerate(tables):
        if table is None:
            continue
        extra = (dict(coding=coding, estimate=estimates[part], t0=t0, sent=sents[part])
                 if coding == 'differential' else {})
        results[part] = qkv_mt_steps(qkv, part, heads, table, membranes[part], keep, channels=maps[part], **extra)
    return results
