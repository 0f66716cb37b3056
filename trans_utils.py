"""ECMT conversion: placeholders, multi-threshold neurons, expectation compensation, surgery.

The semantics are those of ``ECMT_SPEC.md`` (the published ECMT scripts, with their quirks fixed):

* ``MyTestPlace``   identity placeholder at every activation hand-off (``ann`` mode);
* ``TestNeuron``    the placeholder while calibrating (``for_v``): running mean of exact quantiles;
* ``TwoSideNeuron`` the multi-threshold (MT) neuron of ``snn`` mode;
* ``exp_comp_neuron`` expectation compensation (EC) of a nonlinear module (softmax, GELU, LayerNorm);
* ``MyAt`` / ``AtNeuron`` the product of two time-varying operands, plain and EC;
* ``MyMul`` / ``MulNeuron`` the element-wise product of a gated MLP, plain and EC.

Public names are the published ones so that researchers' scripts keep working. Every module that
keeps state across time steps derives from :class:`StatefulModule`; :func:`reset_net` resets them.

Multi-step simulation (ECMT_SPEC 13): every stateful module takes a chunk of K time steps at once,
folded time-major into the batch ([K*B, ...], the layout timm's code runs on unchanged), and
carries its state (membrane, running sums, last totals) to the next chunk; :class:`MultiStep`
repeats the input of the converted region K times and tells each module its chunk. Linear layers
thus run once on K*B rows, the MT neuron is one kernel looping over the K steps inside, an EC
module evaluates its function once over all K running means, an EC product is one batched product
of running sums. Called directly, a module takes one step per call, as the published ones did.
The backend of each module (native CPU kernels, ``torch.compile``, eager) is chosen once, when the
model is converted, from :data:`BACKENDS`. Running state is float32 whatever the autocast dtype,
and is not kept past a batch's last chunk.
"""
from __future__ import annotations

import itertools
import math
import os
import warnings
import weakref
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

import native_kernels

__all__ = [
    'PLACES', 'ConversionError', 'StatefulModule', 'MyTestPlace', 'TestNeuron', 'TwoSideNeuron',
    'exp_comp_neuron', 'MyAt', 'AtNeuron', 'MyMul', 'MulNeuron', 'MultiStep', 'mt_fire',
    'tail_quantiles', 'replace_test_by_testneuron', 'replace_testneuron_by_twosideneuron',
    'replace_nonlinear_by_neuron', 'replace_at_by_neuron', 'convert_to_snn', 'get_modules',
    'reset_net', 'set_fast_neuron', 'set_backend', 'choose_backend', 'BACKENDS', 'threshold_config',
    'EC_MODULE_TYPES', 'register_snn_modules', 'check_fully_converted', 'BaseMonitor', 'SOPMonitor',
    'product_nonzero_macs', 'spike_level_counts', 'fuse_ec_neurons', 'qkv_neurons',
]

#: Placeholder kinds, in the order they appear in a transformer block (ECMT_SPEC section 2; 'gate'
#: and 'up' are the two operands of a gated MLP's element-wise product, section 12).
PLACES = ('fc_qkv', 'q', 'k', 'v', 's', 'fc_out', 'fc1', 'gate', 'up', 'fc2')
#: Places whose thresholds are not calibrated (``s`` uses ``softmax_p``).
UNCALIBRATED_PLACES = ('s',)


class ConversionError(ValueError):
    """The model or its thresholds cannot be converted as asked; the message names the modules."""


def get_modules(model: nn.Module, types: Tuple[type, ...] = ()) -> List[Tuple[str, nn.Module]]:
    """List ``(name, module)`` of the ECMT modules of ``model`` (or of ``types`` if given)."""
    types = types or (MyTestPlace, TestNeuron, TwoSideNeuron, exp_comp_neuron, MyAt, AtNeuron, MyMul,
                       MulNeuron)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, types)]


# ---------------------------------------------------------------------------------------------
# Placeholders and calibration
# ---------------------------------------------------------------------------------------------
class MyTestPlace(nn.Module):
    """Identity placeholder marking an activation hand-off of kind ``place`` (ECMT_SPEC 2)."""

    def __init__(self, place: str) -> None:
        super().__init__()
        if place not in PLACES:
            raise ValueError(f'unknown place {place!r}; expected one of {PLACES}')
        self.place = place

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def extra_repr(self) -> str:
        return f'place={self.place}'


# Tensors up to this size take the plain selection; larger ones the candidate-set path.
_DIRECT_SELECT_MAX = 1 << 15
_SAMPLE_SIZE = 1 << 13
_sample_indices_cache: Dict[Tuple[int, torch.device], torch.Tensor] = {}


def _sample_indices(n: int, device: torch.device) -> torch.Tensor:
    """A fixed pseudo-random set of flat indices into a tensor of n elements (cached)."""
    key = (n, device)
    indices = _sample_indices_cache.get(key)
    if indices is None:
        if len(_sample_indices_cache) > 256:
            _sample_indices_cache.clear()
        generator = torch.Generator().manual_seed(n)
        indices = torch.randint(0, n, (_SAMPLE_SIZE,), generator=generator).to(device)
        _sample_indices_cache[key] = indices
    return indices


# How CPU tensors select: 'native' (native_kernels; numpy where the kernels are unavailable),
# 'numpy', or 'torch' (torch's kernels, what other devices run; for tests).
_CPU_SELECTION = 'native'


def _kth_smallest(values, k: int):
    """The k-th smallest (1-based) of a 1-D torch tensor or numpy array (one selection)."""
    if isinstance(values, np.ndarray):
        return np.partition(values, k - 1)[k - 1]
    return torch.kthvalue(values, k).values


def tail_quantiles(x: torch.Tensor, percent: float) -> Tuple[torch.Tensor, torch.Tensor]:
    """The exact ``percent`` and ``1 - percent`` order statistics of ``x`` (ECMT_SPEC 3).

    With n elements, the upper statistic is the k-th smallest with ``k = int(percent * n)`` and the
    lower one the k-th smallest with ``k = int((1 - percent) * n)`` (1-based, at least 1). Works for
    any size (``torch.quantile`` refuses more than 2^24 elements) and any strides (a permuted view
    is not copied: order statistics do not depend on the order). For large tensors a random
    sample gives bounds just outside both quantiles; the elements beyond the bounds are gathered
    and the statistics are selected among them. The counts prove the bounds right; otherwise (an
    unlucky sample) the full selection is used, so the result is always exact. On the CPU one
    pass of a small native kernel does the comparisons and the gathering (``native_kernels``,
    about three times faster than numpy, which is the fallback). A tensor holding a NaN has no order
    statistics: both results are NaN then (the calibration refuses such thresholds).
    Returns two 0-d float32 tensors on ``x``'s device.
    """
    if not 0.0 < percent <= 1.0:
        raise ValueError(f'percent must be in (0, 1], got {percent}')
    x = x.detach()
    if x.dtype != torch.float32:
        x = x.float()
    n = x.numel()
    if n == 0:
        raise ValueError('cannot calibrate on an empty tensor')
    k_hi = min(n, max(1, int(percent * n)))
    k_lo = min(n, max(1, int((1 - percent) * n)))
    if n <= _DIRECT_SELECT_MAX:
        flat = x.reshape(-1)
        return _nan_if_any(flat, torch.kthvalue(flat, k_hi).values, torch.kthvalue(flat, k_lo).values)

    indices = _sample_indices(n, x.device)
    m = indices.numel()
    # Bounds a little looser than the quantiles: 6 standard deviations of a sample quantile.
    spread = 6.0 * math.sqrt(max(percent * (1 - percent), 1.0 / m) / m) + 2.0 / m
    r_hi = max(1, min(m, int((percent - spread) * m)))  # ranks of the bounds in the sample
    r_lo = max(1, min(m, int((1 - percent + spread) * m) + 1))
    on_cpu = x.device.type == 'cpu'
    if (on_cpu and _CPU_SELECTION == 'native' and x.dim() <= native_kernels.MAX_DIMS
            and native_kernels.library() is not None):
        q_hi, q_lo, _ = native_kernels.tail_quantiles(x, indices, r_hi, r_lo, k_hi, k_lo)
        return q_hi, q_lo
    if on_cpu and _CPU_SELECTION != 'torch':
        values = x.numpy()  # numpy over the tensor's own memory, whatever its strides
        if np.isnan(values).any():
            nan = torch.tensor(float('nan'))
            return nan, nan.clone()
        sample = values.flat[indices.numpy()]
    else:
        values = x.reshape(-1)
        sample = torch.take(values, indices)
    hb, lb = _kth_smallest(sample, r_hi), _kth_smallest(sample, r_lo)
    if not bool(lb < hb):
        q_hi, q_lo = _full_selection(values, k_hi), _full_selection(values, k_lo)
    else:
        upper, lower = _beyond(values, hb, lb)  # every element >= hb, every element <= lb
        need_hi = n - k_hi + 1  # elements >= the upper statistic
        q_hi = (_kth_smallest(upper, len(upper) - need_hi + 1) if len(upper) >= need_hi
                else _full_selection(values, k_hi))
        q_lo = _kth_smallest(lower, k_lo) if len(lower) >= k_lo else _full_selection(values, k_lo)
    if isinstance(values, np.ndarray):
        return (torch.from_numpy(np.asarray(q_hi, dtype=np.float32)),
                torch.from_numpy(np.asarray(q_lo, dtype=np.float32)))
    return _nan_if_any(values, q_hi, q_lo)


def _nan_if_any(flat: torch.Tensor, q_hi: torch.Tensor, q_lo: torch.Tensor):
    """NaN statistics for a tensor holding a NaN (no host synchronisation on a GPU)."""
    has_nan = torch.isnan(flat).any()
    nan = torch.full((), float('nan'), device=flat.device)
    return torch.where(has_nan, nan, q_hi), torch.where(has_nan, nan, q_lo)


def _full_selection(values, k: int):
    return _kth_smallest(values.reshape(-1), k)


def _beyond(values, hb, lb):
    """(elements >= hb, elements <= lb) of a torch tensor or a numpy array (any shape).
    (Splitting the array over two threads was tried: slower in the calibration pass, where
    OpenMP's spinning threads hold the second core.)"""
    return values[values >= hb], values[values <= lb]


class TestNeuron(nn.Module):
    """Calibrating placeholder (``for_v``): identity that records thresholds (ECMT_SPEC 3).

    ``scale_p`` is the running mean over batches of the ``percent`` quantile of the input,
    ``scale_n`` that of the negated ``1 - percent`` quantile; each batch weighs the same.
    Both are buffers of shape [1] and travel in the state_dict under the placeholder's path.
    """

    def __init__(self, place: str, percent: float = 0.99) -> None:
        super().__init__()
        if not 0.0 < percent <= 1.0:
            raise ValueError(f'percent must be in (0, 1], got {percent}')
        self.place = place
        self.percent = percent
        self.calibrate = place not in UNCALIBRATED_PLACES
        self.register_buffer('scale_p', torch.zeros(1))
        self.register_buffer('scale_n', torch.zeros(1))
        # float64 sums of the per-batch values; the count is a Python int (no host sync).
        self.register_buffer('sum_p', torch.zeros(1, dtype=torch.float64), persistent=False)
        self.register_buffer('sum_n', torch.zeros(1, dtype=torch.float64), persistent=False)
        self.num_batches = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrate:
            q_hi, q_lo = tail_quantiles(x, self.percent)
            self.sum_p += q_hi.double()
            self.sum_n -= q_lo.double()
            self.num_batches += 1
            self.scale_p.copy_(self.sum_p / self.num_batches)
            self.scale_n.copy_(self.sum_n / self.num_batches)
        return x

    def extra_repr(self) -> str:
        return f'place={self.place}, percent={self.percent}, batches={self.num_batches}'


def sync_calibration(model: nn.Module, reduce: Callable[[torch.Tensor], torch.Tensor]) -> int:
    """Pool the ``for_v`` statistics of all processes into every process's TestNeurons.

    ``reduce`` sums a tensor over processes (``utils.all_reduce_sum``). The per-batch sums and the
    batch counts of every TestNeuron are summed in one collective, and ``scale_p``/``scale_n``
    become the mean over all processes' batches, each batch weighted equally, as one process
    seeing all of them would compute; every process ends with the same thresholds. A process that
    saw no batch contributes zeros. Call it once, after calibration (calling again double-counts).
    Returns the number of batches calibrated on, over all processes.
    """
    neurons = [m for m in model.modules() if isinstance(m, TestNeuron)]
    if not neurons:
        return 0
    stats = torch.stack([torch.cat([n.sum_p, n.sum_n, torch.full_like(n.sum_p, n.num_batches)])
                         for n in neurons])
    stats = reduce(stats)
    for neuron, (sum_p, sum_n, count) in zip(neurons, stats.unbind(0)):
        neuron.sum_p.copy_(sum_p.reshape(1))
        neuron.sum_n.copy_(sum_n.reshape(1))
        neuron.num_batches = int(round(float(count)))
        if neuron.num_batches:
            neuron.scale_p.copy_(neuron.sum_p / neuron.num_batches)
            neuron.scale_n.copy_(neuron.sum_n / neuron.num_batches)
    return max(n.num_batches for n in neurons)


# ---------------------------------------------------------------------------------------------
# Multi-threshold neuron
# ---------------------------------------------------------------------------------------------
def _level_threshold(theta: torch.Tensor, level: torch.Tensor) -> torch.Tensor:
    # theta * 2^j - theta / 2, evaluated exactly as the rule states it (same float rounding).
    return theta * torch.exp2(level) - theta * 0.5


def mt_fire(membrane: torch.Tensor, theta_p: torch.Tensor, theta_n: torch.Tensor,
            levels: int) -> torch.Tensor:
    """The spike of the MT fire rule (ECMT_SPEC 4) for a membrane that already holds ``v + x``.

    The reference tries levels j = N-1..0, positive side first, and emits the first that fires.
    Thresholds grow with j, and with positive base thresholds the two sides cannot both fire (the
    positive side needs v > 0, the negative one v < 0), so the spike is the largest level j < N with
    |v| >= theta * 2^j - theta / 2 on the side of v's sign: j = floor(log2(|v|/theta + 1/2)),
    checked one level down and up against the exact threshold to absorb rounding of the log.
    A side whose threshold is not positive (or NaN) never fires.
    """
    positive = membrane > 0
    theta = torch.where(positive, theta_p, theta_n)
    usable = theta > 0
    theta = torch.where(usable, theta, torch.ones_like(theta))
    magnitude = membrane.abs()
    level = torch.floor(torch.log2((magnitude / theta + 0.5).clamp_min(1.0))).clamp_(max=levels - 1)
    level = torch.where(magnitude >= _level_threshold(theta, level), level, level - 1).clamp_(min=0)
    up = (level + 1).clamp_(max=levels - 1)
    level = torch.where(magnitude >= _level_threshold(theta, up), up, level)
    fire = usable & (magnitude >= _level_threshold(theta, level))
    spike = torch.where(fire, theta * torch.exp2(level), torch.zeros_like(theta))
    return torch.where(positive, spike, -spike)


def level_table(theta_p: torch.Tensor, theta_n: torch.Tensor, levels: int,
                width: Optional[int] = None) -> torch.Tensor:
    """[4, width] float32: per level j, the positive threshold θp·2^j − θp/2, the positive spike
    θp·2^j, the negative threshold and spike (same with θn). Thresholds of levels j >= ``levels``
    (padding up to ``width``) and of a side whose θ is not positive are NaN: never reached."""
    width = width or _level_width(levels)
    theta_p = torch.as_tensor(theta_p, dtype=torch.float32).reshape(())
    theta_n = torch.as_tensor(theta_n, dtype=torch.float32).reshape(()).to(theta_p.device)
    j = torch.arange(width, dtype=torch.float32, device=theta_p.device)
    scale = torch.exp2(j)  # exact powers of two
    rows = []
    for theta in (theta_p, theta_n):
        threshold = theta * scale - theta * 0.5  # the rule's own expression: same rounding
        threshold = torch.where((theta > 0) & (j < levels), threshold, torch.full_like(threshold, math.nan))
        rows += [threshold, theta * scale]
    return torch.stack(rows)


def _level_width(levels: int) -> int:
    # Levels are padded to a power of two (at least 8) so that one fused kernel serves many N.
    return max(8, 1 << (int(levels) - 1).bit_length())


def _mt_step_table(membrane: torch.Tensor, x: torch.Tensor, table: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """One MT step on flat tensors, by comparing v with every level's threshold in turn: more
    element-wise work than the closed form, but only comparisons and selections, so it
    vectorises fully once fused into one kernel. Thresholds grow with j, so the last level
    passed is the largest that fires; NaN thresholds never pass. Returns (spike, new membrane)."""
    membrane = membrane + x
    up = torch.zeros_like(membrane)
    down = torch.zeros_like(membrane)
    for j in range(table.shape[1]):
        up = torch.where(membrane >= table[0, j], table[1, j], up)
        down = torch.where(-membrane >= table[2, j], table[3, j], down)
    spike = up - down
    return spike, membrane - spike


def _mt_step_fused(membrane: torch.Tensor, x: torch.Tensor, table: torch.Tensor
                   ) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`_mt_step_table` for ``torch.compile``: the membrane is updated in place, and the
    number of non-zero spikes is counted in the same pass (the energy monitor's count of the
    next linear layer's input, at no extra read)."""
    spike, new_membrane = _mt_step_table(membrane, x, table)
    membrane.copy_(new_membrane)
    return spike, (spike != 0).sum()


def _mt_step_eager(membrane: torch.Tensor, x: torch.Tensor, theta_p: torch.Tensor,
                   theta_n: torch.Tensor, levels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    membrane = membrane + x
    spike = mt_fire(membrane, theta_p, theta_n, levels)
    return spike, membrane - spike


# ---------------------------------------------------------------------------------------------
# Backends: chosen once per module, from one table
# ---------------------------------------------------------------------------------------------
#: Implementations of each kind of stateful module, by device type ('default': any other), in
#: order of preference; a module takes the first that is available when it is converted
#: (:func:`set_backend`). 'native': the multi-step C++ kernels (``native_kernels``; CPU, float32);
#: 'compiled': ``torch.compile`` of one step, looped over the chunk's steps; 'eager': torch ops,
#: f evaluated once over all steps of a chunk. Every backend keeps the same state layout and
#: computes the same values (the neuron's spikes and the products bit for bit). Not compiled: the
#: EC functions (inductor's row softmax and LayerNorm were slower than eager on the CPU; on CUDA the
#: eager form over all K steps is a few large kernels) and the products (one batched matrix
#: product; on the CPU their running sums and scaled differences are native passes).
BACKENDS: Dict[str, Dict[str, Tuple[str, ...]]] = {
    'neuron': {'cpu': ('native', 'compiled', 'eager'), 'default': ('compiled', 'eager')},
    'gelu': {'cpu': ('native', 'eager'), 'default': ('eager',)},
    'softmax': {'cpu': ('native', 'eager'), 'default': ('eager',)},
    'layer_norm': {'cpu': ('native', 'eager'), 'default': ('eager',)},
    'function': {'default': ('eager',)},
    'product': {'cpu': ('native', 'eager'), 'default': ('eager',)},
}

_COMPILE = os.environ.get('ECMT_COMPILE', '1') != '0'


def set_fast_neuron(enabled: bool) -> None:
    """Whether modules converted (or built) from now on may use the fused backends, 'native' and
    'compiled' (``True``, the default; ``ECMT_COMPILE=0`` turns it off), or run eager. It changes
    no module that exists: :func:`set_backend` does that. All backends compute the same values."""
    global _COMPILE
    _COMPILE = bool(enabled)


def fast_neuron_enabled() -> bool:
    return _COMPILE


def choose_backend(kind: str, device: torch.device | str = 'cpu', prefer: Optional[str] = None) -> str:
    """The backend a module of ``kind`` runs on ``device``: ``prefer`` where the table lists it
    for that device and it is available, else the first available one of :data:`BACKENDS`."""
    device = torch.device(device)
    table = BACKENDS[kind]
    candidates = table.get(device.type, table['default'])

    def available(name: str) -> bool:
        if name == 'eager':
            return True
        if not _COMPILE:
            return False
        return name != 'native' or (device.type == 'cpu' and native_kernels.library() is not None)

    if prefer is not None and prefer in candidates and available(prefer):
        return prefer
    return next(name for name in candidates if available(name))


def set_backend(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Choose the backend of every stateful module of ``model`` for the device its weights are on
    (``backend``: a preferred one, e.g. 'eager'; see :func:`choose_backend`). :func:`convert_to_snn`
    calls it; call it again after moving a converted model to another device."""
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    device = tensor.device if tensor is not None else torch.device('cpu')
    for module in model.modules():
        if isinstance(module, StatefulModule):
            module.backend = choose_backend(module.kind, device, backend)
    return model


_compiled: Dict[Callable, Callable] = {}


def _compiled_step(fn: Callable) -> Callable:
    compiled = _compiled.get(fn)
    if compiled is None:
        # Every level count (a loop bound) and tensor layout is a graph of its own; dynamo's
        # default of 8 graphs per function would end fusing for good in a sweep of levels.
        config = torch._dynamo.config
        limit = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'
        setattr(config, limit, max(getattr(config, limit), 64))
        compiled = _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
    return compiled


# ---------------------------------------------------------------------------------------------
# Stateful modules: time-major chunks of steps
# ---------------------------------------------------------------------------------------------
class StatefulModule(nn.Module):
    """Base of every module that keeps state across time steps (neurons, EC modules, EC products).

    Inputs and outputs are time-major, the K steps of a chunk folded into the batch: [K*B, ...],
    the layout timm's code runs on unchanged; only these modules view it as [K, B, ...]. Called
    directly, a module takes one step per call and keeps its state (K = 1), as the published
    modules did. :class:`MultiStep` sets the chunk of every module before each forward pass:
    ``time_steps`` K, and ``keep_state`` False on a batch's last chunk, after which the module
    holds nothing (so the memory of a run does not grow with depth). ``steps`` counts the steps
    of the batch so far, the offset t0 of the next chunk. The state across chunks (named by each
    subclass) is the only state a module keeps; it is None after :meth:`reset` and takes its
    shape from the first chunk. ``backend`` names the implementation (:data:`BACKENDS`).
    """
    kind = 'function'
    time_steps = 1
    keep_state = True

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0
        self.backend = choose_backend(self.kind)

    def reset(self) -> None:
        self.steps = 0
        self._clear_state()

    def _clear_state(self) -> None:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError

    def _split_time(self, x: torch.Tensor) -> torch.Tensor:
        """[K*B, ...] -> [K, B, ...] (a view, whatever the strides)."""
        if x.dim() == 0 or x.shape[0] % self.time_steps:
            raise ValueError(f'{type(self).__name__}: an input of shape {tuple(x.shape)} does not hold '
                             f'{self.time_steps} time steps along its first dimension')
        return x.unflatten(0, (self.time_steps, x.shape[0] // self.time_steps))

    def _finish_chunk(self) -> None:
        if self.keep_state:
            self.steps += self.time_steps
        else:
            self.reset()

    def _steps_column(self, rank: int, device) -> torch.Tensor:
        """t0+1 .. t0+K as float32 [K, 1, ..., 1] of ``rank`` dimensions (broadcasts along time)."""
        steps = torch.arange(self.steps + 1, self.steps + self.time_steps + 1, dtype=torch.float32)
        return steps.to(device).view(-1, *([1] * (rank - 1)))

    def extra_repr(self) -> str:
        return f'steps={self.steps}, backend={self.backend}'


def reset_net(model: nn.Module) -> None:
    """Reset every stateful module of ``model`` (call between samples/batches)."""
    for module in model.modules():
        if isinstance(module, StatefulModule):
            module.reset()


def _differences(totals: torch.Tensor, prev: Optional[torch.Tensor]) -> torch.Tensor:
    """In place along time: totals[k] - totals[k-1], and totals[0] - prev (nothing at t = 1)."""
    for k in range(totals.shape[0] - 1, 0, -1):
        totals[k].sub_(totals[k - 1])
    if prev is not None:
        totals[0].sub_(prev)
    return totals


def _running_sums(xs: torch.Tensor, carried: Optional[torch.Tensor]) -> torch.Tensor:
    """Running sums along time of ``xs`` [K, ...] starting from ``carried`` (None: zero), added
    one step at a time in float32, as the step-by-step order adds them (so every chunking gives
    the same sums bit for bit; torch.cumsum accumulates in double on the CPU)."""
    sums = torch.empty(xs.shape, dtype=torch.float32, device=xs.device)
    for k in range(xs.shape[0]):
        if carried is None:
            sums[k].copy_(xs[k])
        else:
            torch.add(carried, xs[k], out=sums[k])
        carried = sums[k]
    return sums


class TwoSideNeuron(StatefulModule):
    """Multi-threshold neuron of ``snn`` mode (ECMT_SPEC 4).

    Each step: ``v += x``; emit at most one spike of ``+scale_p * 2^j`` or ``-scale_n * 2^j``
    (``j < levels``); ``v -= spike``. The output is the spike (float32, the shape of ``x``).
    State: the membrane, and the level table built from ``scale_p``/``scale_n`` at a batch's
    first chunk (thresholds changed in place after :func:`reset_net` apply to the next batch).
    Each call also gives the non-zero spikes per step, ``last_nonzero`` ([K] int64), which the
    energy monitor uses for the linear layer this neuron feeds.
    """
    kind = 'neuron'

    def __init__(self, place: str, scale_p: float | torch.Tensor, scale_n: float | torch.Tensor,
                 levels: int) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f'levels must be >= 1, got {levels}')
        self.place = place
        self.levels = int(levels)
        self.register_buffer('scale_p', torch.as_tensor(scale_p, dtype=torch.float32).reshape(1).clone())
        self.register_buffer('scale_n', torch.as_tensor(scale_n, dtype=torch.float32).reshape(1).clone())
        self.last_nonzero: Optional[torch.Tensor] = None
        # Spike counts per level (positive and negative side), filled only when asked for.
        self.count_levels = False
        self.level_counts: Optional[torch.Tensor] = None
        self._clear_state()

    def _clear_state(self) -> None:
        self._membrane: Optional[torch.Tensor] = None  # flat, one element per element of a step
        self._table: Optional[torch.Tensor] = None     # level_table of this batch's thresholds
        self._shape: Tuple[int, ...] = ()
        # (spikes, counts) of this chunk, computed by the EC kernel fused with this neuron (see
        # exp_comp_neuron.fuse): the next call receives those spikes and only records them.
        self._prefused: Optional[Tuple[torch.Tensor, torch.Tensor]] = None

    def level_table(self) -> torch.Tensor:
        """The level table of this batch (built from the thresholds at a batch's first chunk)."""
        if self._table is None:
            self._table = level_table(self.scale_p, self.scale_n, self.levels)
        return self._table

    @property
    def membrane(self) -> Optional[torch.Tensor]:
        """The membrane potential after the last step (shaped like one step's input), or None."""
        return None if self._membrane is None else self._membrane.view(self._shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._prefused is not None:  # this chunk's spikes, made by the EC kernel fused with us
            spike, counts = self._prefused
            self._prefused = None
            if x is not spike:
                raise RuntimeError(f'the {self.place} neuron is fused with the EC module before it, but received '
                                   'another tensor than that module\'s output: call trans_utils.fuse_ec_neurons('
                                   'model, False) before changing what lies between them')
            self.last_nonzero = counts
            if self.count_levels:
                self._count(spike)
            self._finish_chunk()
            return spike
        xs = self._split_time(x.detach().float())
        self._shape = tuple(xs.shape[1:])
        self.level_table()
        keep = self.keep_state
        if self.backend == 'native':
            if xs.device.type != 'cpu':
                raise RuntimeError('this neuron was converted for the CPU: call trans_utils.set_backend(model) '
                                   'after moving the model')
            spike, counts, self._membrane = native_kernels.mt_steps(xs, self._table, self._membrane, keep)
        else:
            spike, counts = self._torch_steps(xs)
        spike = spike.view(x.shape)
        self.last_nonzero = counts
        if self.count_levels:
            self._count(spike)
        self._finish_chunk()
        return spike

    def _torch_steps(self, xs: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        spikes, counts = [], []
        membrane = self._membrane
        for k in range(xs.shape[0]):
            if self.backend == 'compiled':
                if membrane is None:
                    membrane = torch.zeros(xs[k].numel(), dtype=torch.float32, device=xs.device)
                try:
                    spike, count = _compiled_step(_mt_step_fused)(membrane, xs[k].reshape(-1).detach(), self._table)
                except Exception as exc:  # no C++ toolchain, unsupported backend: stay correct
                    if spikes:
                        raise
                    self._fall_back(exc)
                    return self._torch_steps(xs)
            else:
                shaped = torch.zeros_like(xs[k]) if membrane is None else membrane.view(xs[k].shape)
                spike, shaped = _mt_step_eager(shaped, xs[k], self.scale_p, self.scale_n, self.levels)
                membrane, count = shaped.reshape(-1), (spike != 0).sum()
            spikes.append(spike.view(xs[k].shape))
            counts.append(count)
        self._membrane = membrane
        return torch.stack(spikes), torch.stack(counts)

    def _fall_back(self, exc: Exception) -> None:
        global _COMPILE
        warnings.warn(f'torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); '
                      'running the SNN without fused kernels (same numbers, slower)')
        _COMPILE = False
        self.backend = 'eager'

    @torch.no_grad()
    def _count(self, spike: torch.Tensor) -> None:
        counts = spike_level_counts(spike, self.scale_p, self.scale_n, self.levels)
        self.level_counts = counts if self.level_counts is None else self.level_counts + counts

    def extra_repr(self) -> str:
        return (f'place={self.place}, levels={self.levels}, '
                f'scale_p={self.scale_p.item():.6g}, scale_n={self.scale_n.item():.6g}, backend={self.backend}')


# ---------------------------------------------------------------------------------------------
# Expectation compensation
# ---------------------------------------------------------------------------------------------
def _layer_norm_types() -> Tuple[type, ...]:
    try:
        from timm.layers import LayerNorm as TimmLayerNorm
    except ImportError:  # pragma: no cover
        return (nn.LayerNorm,)
    return (nn.LayerNorm, TimmLayerNorm)


def _ec_kind(module: nn.Module) -> str:
    """'gelu', 'softmax' (over the last dimension) or 'layer_norm' (over the last dimension) for a
    function the native kernels know exactly, else 'function' (the module itself is called)."""
    try:
        from timm.layers import GELU as TimmGELU, GELUTanh
    except ImportError:  # pragma: no cover
        TimmGELU = GELUTanh = ()
    if type(module) in (nn.GELU, TimmGELU, GELUTanh):
        return 'gelu'
    if type(module) is nn.Softmax and module.dim == -1:
        return 'softmax'
    if type(module) in _layer_norm_types() and len(module.normalized_shape) == 1:
        return 'layer_norm'
    return 'function'


class exp_comp_neuron(StatefulModule):
    """Expectation compensation of a nonlinear module f (ECMT_SPEC 5).

    With A_t the running sum of inputs after step t, the output is ``t*f(A_t/t) - (t-1)*f(A_(t-1)/(t-1))``,
    so the outputs summed over steps 1..t are ``t * f(mean input)``. A chunk of K steps takes the
    running means of all K steps, evaluates f once over all of them and returns the differences
    along time. State: the running sum and the last total t*f(A_t/t). The wrapped module is
    ``self.module``; GELU, and a softmax or LayerNorm over the last dimension, run as native
    multi-step kernels on the CPU (:data:`BACKENDS`).
    """

    def __init__(self, module: nn.Module) -> None:
        self.kind = _ec_kind(module)
        super().__init__()
        self.module = module
        self._approximate = (type(module).__name__ == 'GELUTanh'
                             or getattr(module, 'approximate', 'none') != 'none')
        # The MT neuron this module's output goes to, through identities only (fuse); not a
        # submodule (it belongs to its own parent), hence kept out of nn.Module's registry.
        self.__dict__['_fused'] = None
        self._posting: Optional[Tuple['TwoSideNeuron', torch.Tensor]] = None
        self._clear_state()

    def fuse(self, neuron: Optional['TwoSideNeuron'], between: Sequence[nn.Module] = ()) -> None:
        """Compute the MT neuron ``neuron``, which takes this module's output through the
        modules ``between`` (identities, or dropouts that are identities in evaluation), in this
        module's native kernel: the EC output never goes to memory; the neuron's next call gets the
        spikes and records them. The same spikes, states and counts as unfused. Only where both run
        native and ``between`` are identities at the time of the call; None: unfuse."""
        self.__dict__['_fused'] = None if neuron is None else (neuron, tuple(between))

    @property
    def fused_neuron(self) -> Optional['TwoSideNeuron']:
        return None if self._fused is None else self._fused[0]

    def _fusable(self) -> Optional['TwoSideNeuron']:
        if self._fused is None or self.kind not in FUSABLE_KINDS:
            return None
        neuron, between = self._fused
        if 'time_steps' not in self.__dict__:
            # Only inside a MultiStep run (simulate), which calls the whole model: a direct call
            # of this module alone returns its EC output, as unfused.
            return None
        if neuron.backend != 'native' or neuron._prefused is not None or neuron.time_steps != self.time_steps:
            return None
        if not all(isinstance(m, nn.Identity) or (isinstance(m, nn.Dropout) and (not m.training or m.p == 0))
                   for m in between):
            return None
        return neuron

    def _clear_state(self) -> None:
        self._cum: Optional[torch.Tensor] = None    # running sum of inputs, flat
        self._prev: Optional[torch.Tensor] = None   # t * f(running sum / t) of the last step, flat
        self._shape: Tuple[int, ...] = ()

    @property
    def cum_input(self) -> Optional[torch.Tensor]:
        """The running sum of inputs after the last step (shaped like one step's input), or None."""
        return None if self._cum is None else self._cum.view(self._shape)

    @property
    def prev_total(self) -> Optional[torch.Tensor]:
        """``t * f(cum_input / t)`` of the last step t (shaped like one step's input), or None."""
        return None if self._prev is None else self._prev.view(self._shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xs = self._split_time(x.detach().float())
        self._shape = tuple(xs.shape[1:])
        if self.backend == 'native':
            if xs.device.type != 'cpu':
                raise RuntimeError('this EC module was converted for the CPU: call '
                                   'trans_utils.set_backend(model) after moving the model')
            out = self._native_steps(xs)
        else:
            out = self._torch_steps(xs)
        self._finish_chunk()
        out = out.view(x.shape)
        if self._posting is not None:
            neuron, counts = self._posting
            self._posting = None
            neuron._prefused = (out, counts)
        return out

    def _native_steps(self, xs: torch.Tensor) -> torch.Tensor:
        K, t0, keep, m = xs.shape[0], self.steps, self.keep_state, self.module
        flat = xs.reshape(K, -1) if self.kind == 'gelu' else xs.reshape(K, -1, xs.shape[-1])
        neuron = self._fusable()
        if neuron is not None:  # the EC kernel with the neuron it feeds (see fuse)
            extra = ({'approximate': self._approximate} if self.kind == 'gelu' else
                     {'weight': m.weight, 'bias': m.bias, 'eps': m.eps} if self.kind == 'layer_norm' else {})
            spike, counts, self._cum, self._prev, membrane = native_kernels.ec_mt_steps(
                self.kind, flat, self._cum, self._prev, t0, keep, neuron.level_table(), neuron._membrane, **extra)
            neuron._membrane, neuron._shape = membrane, tuple(xs.shape[1:])
            self._posting = (neuron, counts)  # forward posts the spikes as it returns them
            return spike
        if self.kind == 'gelu':
            out, self._cum, self._prev = native_kernels.ec_gelu_steps(
                flat, self._cum, self._prev, t0, keep, self._approximate)
        elif self.kind == 'softmax':
            out, self._cum, self._prev = native_kernels.ec_softmax_steps(flat, self._cum, self._prev, t0, keep)
        else:
            out, self._cum, self._prev = native_kernels.ec_layer_norm_steps(
                flat, self._cum, self._prev, t0, keep, m.weight, m.bias, m.eps)
        return out

    def _torch_steps(self, xs: torch.Tensor) -> torch.Tensor:
        step_shape = xs.shape[1:]
        carried = None if self._cum is None else self._cum.view(step_shape)
        means = _running_sums(xs, carried)
        self._cum = means[-1].reshape(-1).clone() if self.keep_state else None
        steps = self._steps_column(means.dim(), means.device)
        means.div_(steps)
        # f once over all K steps, on the folded [K*B, ...] layout the module was written for.
        totals = self.module(means.flatten(0, 1)).float().view(means.shape)
        if totals.data_ptr() == means.data_ptr():  # an in-place f: the totals are its own
            totals = totals.clone()
        totals.mul_(steps)
        prev = None if self._prev is None else self._prev.view(step_shape)
        self._prev = totals[-1].reshape(-1).clone() if self.keep_state else None
        return _differences(totals, prev)


class MyAt(nn.Module):
    """Product of two operands, ``a @ b``, times ``scale`` if given (q·kᵀ times the attention
    scale: ``(a @ b) * scale``); plain, it becomes :class:`AtNeuron` in ``snn`` mode."""

    def forward(self, a: torch.Tensor, b: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
        out = a @ b
        return out if scale is None else out * scale


class MyMul(nn.Module):
    """Element-wise product of two operands, ``a * b`` (the gate of a gated MLP, ECMT_SPEC 12;
    becomes :class:`MulNeuron` in ``snn`` mode)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


def _mask(x: torch.Tensor) -> torch.Tensor:
    # 1.0 where x is non-zero, as float32: sign and abs are plain vectorised float kernels, about
    # three times faster on the CPU than `x != 0` (a boolean tensor) followed by a sum.
    return torch.sign(x).abs_()


def _nonzero_counts(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Non-zero elements of ``x`` along ``dim``, float64 (exact)."""
    return _mask(x).sum(dim=dim).double()


def _native_nonzero_counts(x: torch.Tensor, dim: int) -> torch.Tensor:
    """:func:`_nonzero_counts` in one native pass over ``x`` (no temporaries of its size)."""
    counts = native_kernels.nonzero_counts(x, dim) if x.dtype == torch.float32 else None
    return _nonzero_counts(x, dim) if counts is None else counts.double()


class _ECProduct(StatefulModule):
    """Expectation compensation of a product of two time-varying operands (ECMT_SPEC 6); the
    subclasses supply the product (:meth:`_op`) and its operation count (:meth:`_operations`).

    With running sums A and B, the output at step t is ``A_t∘B_t / t - A_(t-1)∘B_(t-1) / (t-1)``.
    A chunk of K steps forms the running sums of both operands along time, takes one batched
    product over all K, scales it by 1/t and returns the differences along time. With K > 1 both
    operands carry the K*B leading dimension. State: both running sums and the last total.
    ``count_operations`` (set by the energy monitor) makes each call also give
    ``last_operations``, the per-step operation counts [K] float64 of ECMT_SPEC 8.
    """
    kind = 'product'

    def __init__(self) -> None:
        super().__init__()
        self.count_operations = False
        self.last_operations: Optional[torch.Tensor] = None
        self._clear_state()

    def _clear_state(self) -> None:
        self.cum_a: Optional[torch.Tensor] = None       # running sums after the last step
        self.cum_b: Optional[torch.Tensor] = None
        self.prev_total: Optional[torch.Tensor] = None  # A_t∘B_t / t of the last step

    def _op(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _operations(self, a, b, cum_a, cum_b) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def dense_operations(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> float:
        """Operations of the dense product of one call (all its steps)."""
        raise NotImplementedError  # pragma: no cover

    def forward(self, a: torch.Tensor, b: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
        """The EC product's output for the chunk's steps, times ``scale`` if given (the same as
        multiplying the output afterwards, without another pass over it)."""
        a, b = a.detach().float(), b.detach().float()
        single = self.time_steps == 1  # operands as given (any ranks, broadcasting as the op does)
        a_steps = a.unsqueeze(0) if single else self._split_time(a)
        b_steps = b.unsqueeze(0) if single else self._split_time(b)
        native = self.backend == 'native'
        if native and a.device.type != 'cpu':
            raise RuntimeError('this EC product was converted for the CPU: call trans_utils.set_backend(model) '
                               'after moving the model')
        running_sums = native_kernels.running_sums if native else _running_sums
        cum_a = running_sums(a_steps, self.cum_a)
        cum_b = running_sums(b_steps, self.cum_b)
        if single:
            totals = self._op(cum_a[0], cum_b[0]).float().unsqueeze(0)
        else:
            totals = self._op(cum_a, cum_b).float()
        if self.count_operations:
            self.last_operations = self._operations(a_steps, b_steps, cum_a, cum_b)
        prev, keep = self.prev_total, self.keep_state
        if native:
            out, last_total = native_kernels.scaled_differences(totals.contiguous(), prev, self.steps, keep,
                                                                1.0 if scale is None else scale)
        else:
            totals = totals.div_(self._steps_column(totals.dim(), totals.device))
            last_total = totals[-1].clone() if keep else None
            out = _differences(totals, prev)
            if scale is not None:
                out = out.mul_(scale)
        if keep:
            last = (lambda t: t[-1]) if single else (lambda t: t[-1].clone())  # not the whole chunk
            self.cum_a, self.cum_b, self.prev_total = last(cum_a), last(cum_b), last_total
        self._finish_chunk()
        return out[0] if single else out.flatten(0, 1)


class AtNeuron(_ECProduct):
    """Expectation compensation of a matrix product ``a @ b`` of two time-varying operands
    (q·kᵀ, attention·v): see :class:`_ECProduct`. ``cum_a``/``cum_b`` stay readable."""

    def _op(self, a, b):
        return a @ b

    def _operations(self, a, b, cum_a, cum_b):
        """Per step: nz(a)·nz(b) + nz(a)·nz(B) + nz(A)·nz(b), each the multiply-adds of ``a @ b``
        whose two factors are non-zero, from non-zero counts per column of the left operand and
        per row of the right one (no matrix product). Float32 sums of 0/1 are exact."""
        count = _native_nonzero_counts if self.backend == 'native' else _nonzero_counts
        cols_a, cols_cum_a = count(a, -2), count(cum_a, -2)
        rows_b, rows_cum_b = count(b, -1), count(cum_b, -1)
        return (cols_a * (rows_b + rows_cum_b) + cols_cum_a * rows_b).flatten(1).sum(1)

    def dense_operations(self, a, b, out):
        return float(out.numel()) * a.shape[-1]


class MulNeuron(_ECProduct):
    """Expectation compensation of an element-wise product ``a * b`` (the gated MLP's, ECMT_SPEC
    12): output ``A_t*B_t/t - A_(t-1)*B_(t-1)/(t-1)``; see :class:`_ECProduct`."""

    def _op(self, a, b):
        return a * b

    def _operations(self, a, b, cum_a, cum_b):
        """Per step and element: nz(a)nz(b) + nz(a)nz(B) + nz(A)nz(b), summed."""
        mask_a, mask_b = _mask(a), _mask(b)
        per_element = mask_a * (mask_b + _mask(cum_b)) + _mask(cum_a) * mask_b
        return per_element.flatten(1).sum(1, dtype=torch.float64)

    def dense_operations(self, a, b, out):
        return float(out.numel())


class MultiStep:
    """Runs a converted model on chunks of time steps (ECMT_SPEC 13), layer by layer.

    While open, the input of the converted region (the output of the model's input modules,
    ``ecmt_input_modules``: the patch embedding of the unchanged image and the position
    embedding) is repeated K times, time-major, at the entry of the first region module called in
    a forward pass, so that the input modules run once per chunk and every later layer runs once
    on K*B rows. :meth:`chunk` sets K and whether the chunk is the batch's last on every stateful
    module (found afresh at every open: no cache to go stale after module surgery). On leaving,
    the hooks are removed and every module is back to one step per call.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modules = [m for m in model.modules() if isinstance(m, StatefulModule)]
        self.steps = 1
        self._entered = False
        skip = _skip_prefixes(model)
        self.handles = [model.register_forward_pre_hook(self._new_pass)]
        for name, child in model.named_children():
            if _in_region(name, skip):
                self.handles.append(child.register_forward_pre_hook(self._enter_region))

    def chunk(self, steps: int, last: bool) -> None:
        """The next forward pass runs ``steps`` steps; ``last``: they end the batch."""
        self.steps = int(steps)
        for module in self.modules:
            module.time_steps = self.steps
            module.keep_state = not last

    def _new_pass(self, module, args) -> None:
        self._entered = False

    def _enter_region(self, module, args):
        if self._entered:
            return None
        self._entered = True
        if self.steps == 1 or not args:
            return None
        x = args[0]
        return (x.unsqueeze(0).expand(self.steps, *x.shape).flatten(0, 1), *args[1:])

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module in self.modules:
            for name in ('time_steps', 'keep_state'):
                module.__dict__.pop(name, None)

    def __enter__(self) -> 'MultiStep':
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------------------------------
# Module surgery
# ---------------------------------------------------------------------------------------------
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


def _named_children_recursive(module: nn.Module, prefix: str = '') -> Iterator[Tuple[nn.Module, str, str, nn.Module]]:
    """Yield (parent, attribute, full name, child) for every submodule, parents first."""
    for attr, child in module.named_children():
        full = f'{prefix}.{attr}' if prefix else attr
        yield module, attr, full, child
        yield from _named_children_recursive(child, full)


def _skip_prefixes(model: nn.Module) -> Tuple[str, ...]:
    # Modules that only ever see the constant input (direct coding) are outside the converted region.
    return tuple(getattr(model, 'ecmt_input_modules', ('patch_embed',)))


def _in_region(name: str, skip: Tuple[str, ...]) -> bool:
    return not any(name == p or name.startswith(p + '.') for p in skip)


def replace_test_by_testneuron(model: nn.Module, percent: float = 0.99) -> nn.Module:
    """Replace every :class:`MyTestPlace` by a calibrating :class:`TestNeuron` (``for_v``, and
    before loading a threshold checkpoint for ``snn``)."""
    for parent, attr, _, child in list(_named_children_recursive(model)):
        if type(child) is MyTestPlace:
            setattr(parent, attr, TestNeuron(child.place, percent))
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
                                        fc2_thresholds: Optional[Tuple[float, float]] = None
                                        ) -> nn.Module:
    """Replace every calibrated :class:`TestNeuron` by an MT :class:`TwoSideNeuron`.

    Levels and thresholds per place follow ECMT_SPEC 4; ``fc2_thresholds`` (θp, θn) overrides the
    calibrated fc2 thresholds (the ViT default is (0.25, 0.08)). Raises :class:`ConversionError`
    naming the places whose calibrated thresholds are all zero or not finite.
    """
    for name, value in (('linear_num', linear_num), ('qkv_num', qkv_num), ('softmax_num', softmax_num)):
        if int(value) < 1:
            raise ConversionError(f'{name} must be >= 1, got {value}')
    if not softmax_p > 0:
        raise ConversionError(f'softmax_p must be > 0, got {softmax_p}')
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
        else:
            scale_p, scale_n = fixed
        new = TwoSideNeuron(neuron.place, scale_p, scale_n, levels).to(neuron.scale_p.device)
        setattr(parent, attr, new)
    return model


def replace_nonlinear_by_neuron(model: nn.Module) -> nn.Module:
    """Wrap every nonlinear module of the converted region in an :class:`exp_comp_neuron`."""
    skip = _skip_prefixes(model)
    for parent, attr, name, child in list(_named_children_recursive(model)):
        if isinstance(parent, exp_comp_neuron) or not _in_region(name, skip):
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
    skip = _skip_prefixes(model)
    leaves = (TwoSideNeuron, exp_comp_neuron, AtNeuron, MulNeuron) + LINEAR_MODULE_TYPES + tuple(_SNN_LEAVES)
    bad = []
    for _, _, name, child in _named_children_recursive(model):
        if not _in_region(name, skip) or _inside_ec(model, name):
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
        if isinstance(module, exp_comp_neuron):
            return True
    return False


def convert_to_snn(model: nn.Module, *, linear_num: int = 8, qkv_num: int = 8, softmax_num: int = 8,
                   softmax_p: float = 0.0125, fc2_thresholds: Optional[Tuple[float, float]] = None,
                   backend: Optional[str] = None) -> nn.Module:
    """All of ``snn`` mode's surgery on a model holding calibrated :class:`TestNeuron` s:
    MT neurons, EC nonlinear modules, EC products, the check that nothing stays analog, and the
    backend of every stateful module for the model's device (``backend``: a preferred one)."""
    replace_testneuron_by_twosideneuron(model, linear_num, qkv_num, softmax_num, softmax_p, fc2_thresholds)
    replace_nonlinear_by_neuron(model)
    replace_at_by_neuron(model)
    check_fully_converted(model)
    set_backend(model, backend)
    fuse_ec_neurons(model)
    reset_net(model)
    return model


_FUSE = os.environ.get('ECMT_FUSE', '1') != '0'
#: EC kinds with a native kernel that can compute the MT neuron after it (native_kernels.ec_mt_steps).
FUSABLE_KINDS = ('gelu', 'softmax', 'layer_norm')


def qkv_neurons(neurons: Sequence['TwoSideNeuron'], qkv: torch.Tensor, heads: int
                ) -> Optional[Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """The spikes of an attention's q, k and v neurons (``neurons``) for this chunk, computed in
    one pass over the fused qkv linear output ``qkv`` ([K*B, N, 3*heads*D], what the neurons'
    inputs are the head-split views of) by :func:`native_kernels.qkv_mt_steps`, which reads it
    row after row instead of through three strided views. Each neuron's next call receives its
    spikes ([K*B, heads, N, D], as its own call would return them) and records them; states and
    counts are the ones its own kernel would have left. None (nothing done: the caller splits
    qkv and each neuron runs alone) unless inside a MultiStep run (simulate), with the three
    native, on a float32 contiguous CPU tensor, with tables of one width."""
    if not all(isinstance(n, TwoSideNeuron) and n.backend == 'native' and n._prefused is None
               and 'time_steps' in n.__dict__ for n in neurons):
        return None
    steps = neurons[0].time_steps
    if (any(n.time_steps != steps or n.keep_state != neurons[0].keep_state for n in neurons)
            or qkv.device.type != 'cpu' or qkv.dtype != torch.float32 or qkv.dim() != 3
            or not qkv.is_contiguous() or qkv.shape[0] % steps or qkv.shape[-1] % (3 * heads)):
        return None
    tables = [n.level_table() for n in neurons]
    if len({t.shape for t in tables}) != 1 or len({n._membrane is None for n in neurons}) != 1:
        return None
    spikes, counts, membranes = native_kernels.qkv_mt_steps(
        qkv.detach().unflatten(0, (steps, -1)), heads, tables, [n._membrane for n in neurons], neurons[0].keep_state)
    out = []
    for neuron, spike, count, membrane in zip(neurons, spikes, counts, membranes):
        neuron._membrane, neuron._shape = membrane, tuple(spike.shape[1:])
        spike = spike.flatten(0, 1)
        neuron._prefused = (spike, count)
        out.append(spike)
    return tuple(out)


def fuse_ec_neurons(model: nn.Module, enabled: Optional[bool] = None) -> int:
    """Fuse each EC module with the MT neuron its output goes to (:meth:`exp_comp_neuron.fuse`),
    where a module of the model names such pairs: its ``ecmt_fusable()`` gives (EC attribute,
    attributes of the modules between, neuron attribute), e.g. a converted MLP's GELU -> drop ->
    norm -> fc2 place, and the modules between are identities; and where an attention's q, k and v
    places take the fused qkv linear output directly (its ``ecmt_qkv_fusable()``), the three
    neurons run as one kernel (:func:`qkv_neurons`). ``enabled`` False (or ``ECMT_FUSE=0``, the
    default for None) unfuses everything. The numbers are the same either way. Returns the number
    of pairs and q/k/v triples fused."""
    enabled = _FUSE if enabled is None else bool(enabled)
    fused, claimed = 0, set()
    for module in model.modules():
        if isinstance(module, exp_comp_neuron):
            module.fuse(None)
        if hasattr(module, 'ecmt_qkv_fusable'):
            module.fuse_qkv = False
    if not enabled:
        return 0
    for module in model.modules():
        qkv = getattr(module, 'ecmt_qkv_fusable', None)
        if qkv is not None and qkv() and all(isinstance(getattr(module, f'place_{p}', None), TwoSideNeuron)
                                             for p in 'qkv'):
            module.fuse_qkv = True  # its q, k and v neurons in one kernel (qkv_neurons)
            fused += 1
        pairs = getattr(module, 'ecmt_fusable', None)
        if pairs is None:
            continue
        for ec_name, between_names, neuron_name in pairs():
            ec, neuron = getattr(module, ec_name, None), getattr(module, neuron_name, None)
            between = [getattr(module, name, None) for name in between_names]
            if (isinstance(ec, exp_comp_neuron) and ec.kind in FUSABLE_KINDS and isinstance(neuron, TwoSideNeuron)
                    and all(isinstance(m, (nn.Identity, nn.Dropout)) for m in between)
                    and ec.fused_neuron is None and neuron not in claimed):
                ec.fuse(neuron, between)
                claimed.add(neuron)
                fused += 1
    return fused


# ---------------------------------------------------------------------------------------------
# Energy monitor
# ---------------------------------------------------------------------------------------------
#: Energy of one accumulate (AC) and one multiply-accumulate (MAC), in pJ (45 nm, ECMT_SPEC 8).
E_AC, E_MAC = 0.9, 4.6


def product_nonzero_macs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Multiply-adds of ``a @ b`` whose two factors are both non-zero, without a product:
    for each inner index k, (non-zeros of a's column k) x (non-zeros of b's row k), summed."""
    cols = (a != 0).sum(dim=-2, dtype=torch.float32)   # [..., K]
    rows = (b != 0).sum(dim=-1, dtype=torch.float32)   # [..., K]
    return (cols * rows).sum(dtype=torch.float64)


def _spike_level_index(spike, theta_p, theta_n, levels: int) -> torch.Tensor:
    """Per element: j for a spike +theta_p*2^j, levels + j for -theta_n*2^j, 2*levels for none
    (spikes are exact multiples theta*2^j: the rounded log2 finds j)."""
    positive = spike > 0
    theta = torch.where(positive, theta_p, theta_n)
    level = torch.round(torch.log2(spike.abs() / theta)).clamp_(0, levels - 1)
    index = torch.where(positive, level, level + levels)
    return torch.where(spike == 0, torch.full_like(index, 2 * levels), index).long()


def spike_level_counts(spike: torch.Tensor, theta_p: torch.Tensor, theta_n: torch.Tensor,
                       levels: int) -> torch.Tensor:
    """[2, levels] int64: how many elements of ``spike`` are +theta_p*2^j (row 0) and
    -theta_n*2^j (row 1), for j = 0..levels-1; one histogram of a combined index."""
    index = _spike_level_index(spike.reshape(-1), theta_p, theta_n, levels)
    counts = torch.bincount(index, minlength=2 * levels + 1)
    return counts[:2 * levels].view(2, levels)


class BaseMonitor:
    """Forward hooks on chosen modules, removed by :meth:`remove` (or on leaving a ``with``)."""

    def __init__(self) -> None:
        self.handles: List = []

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


class SOPMonitor(BaseMonitor):
    """Synaptic operations (SOPs) of every ``nn.Linear`` and every EC product, per time step.

    Linear layer: SOPs = non-zero input elements x out_features; dense = all input elements x
    out_features. EC matrix product at step t (operands a, b; running sums A, B including step t):
    SOPs = nz(a)·nz(b) + nz(a)·nz(B) + nz(A)·nz(b), each the multiply-adds whose two factors are
    non-zero; dense = the product's multiply-adds. EC element-wise product: the same three terms
    per element, against one dense operation per element. Firing rate after t steps
    r_t = SOPs(1..t) / dense(1..t) over all layers and images; energy relative to the ANN
    E_t = t · (0.9/4.6) · r_t (ECMT_SPEC 8). Counts come from non-zero counts per tensor, row and
    column, never from extra matrix products: a linear layer fed by an MT neuron takes the
    per-step counts the neuron's kernel made in its own pass (its explicit output
    ``last_nonzero``); each EC product counts its own operations from the running sums it forms
    (``last_operations``). They stay on the device (no host sync per step), and add up over all
    batches.

    Steps: :func:`engine_for_finetuning.simulate` calls :meth:`new_batch` before each batch and
    sets ``step`` (0-based, the first step of the chunk) and ``time_steps`` (K, the steps in the
    chunk) before each forward pass. Driven step by step (``time_steps`` 1), set ``step`` before
    each step. ``count_levels=True`` also counts the MT neurons' spikes per level, on the first
    ``level_batches`` batches only (None: all).
    """

    def __init__(self, model: nn.Module, count_levels: bool = False,
                 level_batches: Optional[int] = None) -> None:
        super().__init__()
        if level_batches is not None and level_batches < 1:
            raise ValueError(f'level_batches must be >= 1 or None, got {level_batches}')
        self.step = 0
        self.time_steps = 1
        self.batches = 0
        self.count_levels = bool(count_levels)
        self.level_batches = level_batches
        self.names: List[str] = []
        self.kinds: List[str] = []
        self._sops: Optional[torch.Tensor] = None    # [layers, steps] float64, on the device
        self._dense: Optional[torch.Tensor] = None   # [layers, steps] float64
        # Counts of the current batch, added up at the next batch or when read: a hook only
        # appends (an indexed add per hook costs more than the counting).
        self._pending: List[Tuple[int, int, torch.Tensor, float]] = []  # layer, first step, [K], factor
        self._pending_dense: Dict[Tuple[int, int], float] = {}
        self._device: Optional[torch.device] = None
        # The last MT neuron output: (weak reference, its version, its per-step non-zero counts).
        self._posted: Optional[Tuple[weakref.ref, int, torch.Tensor]] = None
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                self._watch(name, module, 'linear', self._linear_hook)
            elif isinstance(module, _ECProduct):
                module.count_operations = True
                self._watch(name, module, 'product', self._product_hook)
        self.neurons = [(n, m) for n, m in model.named_modules() if isinstance(m, TwoSideNeuron)]
        for _, neuron in self.neurons:
            neuron.count_levels = self.count_levels
            neuron.level_counts = None
            self.handles.append(neuron.register_forward_hook(self._neuron_hook))
        self._products = [m for m in model.modules() if isinstance(m, _ECProduct)]

    def _watch(self, name: str, module: nn.Module, kind: str, hook: Callable) -> None:
        index = len(self.names)
        self.names.append(name)
        self.kinds.append(kind)
        self.handles.append(module.register_forward_hook(
            lambda mod, inputs, output, index=index: hook(index, mod, inputs, output)))

    def new_batch(self) -> None:
        """Counts add up over batches; only level counting stops after ``level_batches``."""
        self._flush()
        self.batches += 1
        if self.count_levels and self.level_batches is not None:
            counting = self.batches <= self.level_batches
            for _, neuron in self.neurons:
                neuron.count_levels = counting

    @property
    def sops(self) -> Optional[torch.Tensor]:
        """Synaptic operations per layer and step, [layers, steps] float64 (None before any)."""
        self._flush()
        return self._sops

    @property
    def dense(self) -> Optional[torch.Tensor]:
        """Dense operations per layer and step, [layers, steps] float64 (None before any)."""
        self._flush()
        return self._dense

    def zero_counts(self, steps: int, device) -> None:
        """Zero counts for ``steps`` steps, if nothing was counted (a distributed process that saw
        no image still takes part in the reductions of the totals)."""
        if self.sops is None:
            self._sops = torch.zeros(len(self.names), steps, dtype=torch.float64, device=device)
            self._dense = torch.zeros_like(self._sops)

    def _flush(self) -> None:
        if not self._pending_dense:
            return
        device = self._device
        steps = max(step for _, step in self._pending_dense) + 1
        if self._sops is None or self._sops.shape[1] < steps or self._sops.device != device:
            grown = torch.zeros(len(self.names), steps, dtype=torch.float64, device=device)
            grown_dense = torch.zeros_like(grown)
            if self._sops is not None:
                grown[:, :self._sops.shape[1]] = self._sops.to(device)
                grown_dense[:, :self._dense.shape[1]] = self._dense.to(device)
            self._sops, self._dense = grown, grown_dense
        width = self._sops.shape[1]
        if self._pending:
            where = torch.tensor([i * width + first + k for i, first, counts, _ in self._pending
                                  for k in range(counts.numel())], device=device)
            values = torch.cat([counts.reshape(-1).double() * factor for _, _, counts, factor in self._pending])
            self._sops.view(-1).index_add_(0, where, values)
        dense = torch.zeros_like(self._dense, device='cpu')
        for (i, t), value in self._pending_dense.items():
            dense[i, t] = value
        self._dense += dense.to(device)
        self._pending.clear()
        self._pending_dense.clear()

    def _add(self, index: int, counts: torch.Tensor, factor: float, dense_per_step: float, device) -> None:
        self._pending.append((index, self.step, counts, factor))
        for k in range(counts.numel()):
            key = (index, self.step + k)
            self._pending_dense[key] = self._pending_dense.get(key, 0.0) + dense_per_step
        self._device = device

    @property
    def level_batches_counted(self) -> int:
        """Batches whose spikes the level counts cover."""
        if not self.count_levels:
            return 0
        return self.batches if self.level_batches is None else min(self.batches, self.level_batches)

    def _neuron_hook(self, module, inputs, output) -> None:
        self._posted = (weakref.ref(output), output._version, module.last_nonzero)

    def _linear_hook(self, index, module, inputs, output) -> None:
        x = inputs[0]
        posted = self._posted
        if posted is not None and posted[0]() is x and posted[1] == x._version:
            counts = posted[2]  # counted by the MT neuron that emitted x, in its own pass
        else:
            counts = (x != 0).reshape(self.time_steps, -1).sum(1)  # an analog input (the head's), or modified
        self._add(index, counts, float(module.out_features),
                  float(x.numel() // self.time_steps) * module.out_features, x.device)

    def _product_hook(self, index, module, inputs, output) -> None:
        a, b = inputs
        counts = module.last_operations
        self._add(index, counts, 1.0, module.dense_operations(a, b, output) / counts.numel(), a.device)

    def totals(self, reduce: Optional[Callable] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per-layer, per-step SOPs and dense counts ([layers, steps], summed over processes)."""
        if self.sops is None:
            raise RuntimeError('the monitor has counted nothing yet')
        sops, dense = self.sops, self.dense
        if reduce is not None:
            sops, dense = reduce(sops.clone()), reduce(dense.clone())
        return sops, dense

    def summary(self, reduce: Optional[Callable] = None) -> Dict[str, List[float]]:
        """``fire_rate`` r_t and ``energy_ratio`` E_t for t = 1..T (ECMT_SPEC 8)."""
        sops, dense = self.totals(reduce)
        cum_sops = sops.sum(0).cumsum(0)
        cum_dense = dense.sum(0).cumsum(0)
        rate = (cum_sops / cum_dense.clamp_min(1)).cpu()
        steps = torch.arange(1, rate.numel() + 1, dtype=torch.float64)
        energy = steps * (E_AC / E_MAC) * rate
        return {'fire_rate': rate.tolist(), 'energy_ratio': energy.tolist()}

    def layer_records(self, reduce: Optional[Callable] = None) -> List[Dict]:
        """One record per monitored layer and step: name, kind, step, sops, dense, firing rate."""
        sops, dense = (t.cpu() for t in self.totals(reduce))
        records = []
        for index, (name, kind) in enumerate(zip(self.names, self.kinds)):
            for step in range(sops.shape[1]):
                d = float(dense[index, step])
                records.append({'layer': name, 'kind': kind, 'step': step + 1,
                                'sops': float(sops[index, step]), 'dense': d,
                                'fire_rate': float(sops[index, step]) / d if d else 0.0})
        return records

    def level_counts(self, reduce: Optional[Callable] = None) -> List[Dict]:
        """Spikes per level of every MT neuron (``count_levels=True``): positive and negative."""
        out = []
        for name, neuron in self.neurons:
            counts = neuron.level_counts
            if counts is None:
                if not self.count_levels:
                    continue
                # Saw no batch here; zeros keep a distributed reduction in step with the others.
                counts = torch.zeros(2, neuron.levels, dtype=torch.int64, device=neuron.scale_p.device)
            counts = reduce(counts.clone()) if reduce is not None else counts
            counts = counts.cpu()
            out.append({'neuron': name, 'place': neuron.place, 'levels': neuron.levels,
                        'scale_p': float(neuron.scale_p), 'scale_n': float(neuron.scale_n),
                        'positive': counts[0].tolist(), 'negative': counts[1].tolist()})
        return out

    def remove(self) -> None:
        super().remove()
        for _, neuron in self.neurons:
            neuron.count_levels = False
        for product in self._products:
            product.count_operations = False
            product.last_operations = None
        self._posted = None
