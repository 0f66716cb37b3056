"""ECMT conversion: placeholders, multi-threshold neurons, expectation compensation, surgery.

The semantics are those of ``ECMT_SPEC.md`` (the published ECMT scripts, with their quirks fixed):

* ``MyTestPlace``   identity placeholder at every activation hand-off (``ann`` mode);
* ``TestNeuron``    the placeholder while calibrating (``for_v``): running mean of exact quantiles;
* ``TwoSideNeuron`` the multi-threshold (MT) neuron of ``snn`` mode;
* ``exp_comp_neuron`` expectation compensation (EC) of a nonlinear module (softmax, GELU, LayerNorm);
* ``MyAt`` / ``AtNeuron`` the product of two time-varying operands, plain and EC;
* ``MyMul`` / ``MulNeuron`` their element-wise product, plain and EC (gated MLPs, ECMT_SPEC 12).

Public names are the published ones so that researchers' scripts keep working. Every module that
keeps state across time steps derives from :class:`StatefulModule`; :func:`reset_net` resets them.

Fast path (see the README's benchmark table): the neuron's fire rule is computed in one pass over
the membrane (a native CPU kernel, ``torch.compile`` elsewhere), each EC module evaluates its
function once per step (GELU, softmax and LayerNorm steps as native CPU kernels), each EC product
computes one product of running sums per step, and the calibration takes exact order statistics
from a small candidate set gathered in one pass instead of a full selection.
Running state is float32 whatever the autocast dtype, and is freed on ``reset()``.
"""
from __future__ import annotations

import math
import os
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn

import native_kernels

__all__ = [
    'PLACES', 'ConversionError', 'StatefulModule', 'MyTestPlace', 'TestNeuron', 'TwoSideNeuron',
    'exp_comp_neuron', 'MyAt', 'AtNeuron', 'MyMul', 'MulNeuron', 'mt_fire', 'tail_quantiles',
    'replace_test_by_testneuron', 'replace_testneuron_by_twosideneuron',
    'replace_nonlinear_by_neuron', 'replace_at_by_neuron', 'convert_to_snn', 'get_modules',
    'reset_net', 'set_fast_neuron', 'threshold_config', 'EC_MODULE_TYPES', 'register_snn_modules',
    'check_fully_converted', 'BaseMonitor', 'SOPMonitor', 'product_nonzero_macs',
    'spike_level_counts',
]

#: Placeholder kinds, in the order they appear in a transformer block (ECMT_SPEC sections 2 and
#: 12: ``gate`` and ``up`` are the two operands of a gated MLP's element-wise product).
PLACES = ('fc_qkv', 'q', 'k', 'v', 's', 'fc_out', 'fc1', 'gate', 'up', 'fc2')
#: Places whose thresholds are not calibrated (``s`` uses ``softmax_p``).
UNCALIBRATED_PLACES = ('s',)


class ConversionError(ValueError):
    """The model or its thresholds cannot be converted as asked; the message names the modules."""


# ---------------------------------------------------------------------------------------------
# Stateful base
# ---------------------------------------------------------------------------------------------
class StatefulModule(nn.Module):
    """Base of every module that keeps state across time steps (neurons, EC modules)."""

    def reset(self) -> None:  # pragma: no cover - every subclass overrides it
        raise NotImplementedError


def reset_net(model: nn.Module) -> None:
    """Reset every stateful module of ``model`` (call between samples/batches)."""
    for module in model.modules():
        if isinstance(module, StatefulModule):
            module.reset()


def get_modules(model: nn.Module, types: Tuple[type, ...] = ()) -> List[Tuple[str, nn.Module]]:
    """List ``(name, module)`` of the ECMT modules of ``model`` (or of ``types`` if given)."""
    types = types or (MyTestPlace, TestNeuron, TwoSideNeuron, exp_comp_neuron, MyAt, AtNeuron,
                      MyMul, MulNeuron)
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
    """:func:`_mt_step_table` for ``torch.compile``: the membrane is updated in place (no new
    state tensor per step), and the number of non-zero spikes is counted in the same pass (the
    energy monitor's count of the next linear layer's input, at no extra read)."""
    spike, new_membrane = _mt_step_table(membrane, x, table)
    membrane.copy_(new_membrane)
    return spike, (spike != 0).sum()


def _mt_step_eager(membrane: torch.Tensor, x: torch.Tensor, theta_p: torch.Tensor,
                   theta_n: torch.Tensor, levels: int) -> Tuple[torch.Tensor, torch.Tensor]:
    membrane = membrane + x
    spike = mt_fire(membrane, theta_p, theta_n, levels)
    return spike, membrane - spike


_COMPILE = os.environ.get('ECMT_COMPILE', '1') != '0'
_compiled: Dict[Callable, Callable] = {}


def set_fast_neuron(enabled: bool) -> None:
    """Fuse (``True``, the default; ``ECMT_COMPILE=0`` turns it off) the per-step element-wise
    work of neurons and EC modules into single kernels: native kernels on the CPU
    (``native_kernels``), ``torch.compile`` elsewhere. All paths compute the same values (spikes
    bit for bit); the fused ones are several times faster on CPU and GPU."""
    global _COMPILE
    _COMPILE = bool(enabled)


def fast_neuron_enabled() -> bool:
    return _COMPILE


def _fused(fn: Callable, *args, eager: Optional[Callable] = None):
    """Call ``fn`` fused into one kernel, or ``eager`` (default ``fn``) uncompiled when fusing is
    off or no compiler works here (then with one warning).

    On the CPU the steps of :data:`_NATIVE_STEPS` run as native kernels (``native_kernels``: built
    once per machine in about 3 s, loaded in a millisecond); anything else (CUDA tensors, other
    dtypes, no C++ compiler) goes through ``torch.compile`` (once per function, dynamic shapes).
    All paths compute the same values (the neuron's spikes bit for bit)."""
    global _COMPILE
    if _COMPILE and not torch.jit.is_scripting():
        native = _NATIVE_STEPS.get(fn)
        if native is not None and native_kernels.usable(*args):
            return native(*args)
        if fn in _NATIVE_OR_EAGER:
            return (eager or fn)(*args)
        compiled = _compiled.get(fn)
        if compiled is None:
            # Every level count (a loop bound) and tensor layout is a graph of its own; dynamo's
            # default of 8 graphs per function would end fusing for good in a sweep of levels.
            config = torch._dynamo.config
            limit = 'recompile_limit' if hasattr(config, 'recompile_limit') else 'cache_size_limit'
            setattr(config, limit, max(getattr(config, limit), 64))
            compiled = _compiled[fn] = torch.compile(fn, dynamic=True, fullgraph=True)
        try:
            return compiled(*args)
        except Exception as exc:  # no C++ toolchain, unsupported backend: stay correct
            import warnings
            warnings.warn(f'torch.compile failed ({type(exc).__name__}: {str(exc)[:200]}); '
                          'running the SNN without fused kernels (same numbers, slower)')
            _COMPILE = False
    return (eager or fn)(*args)


class TwoSideNeuron(StatefulModule):
    """Multi-threshold neuron of ``snn`` mode (ECMT_SPEC 4).

    Each step: ``v += x``; emit at most one spike of ``+scale_p * 2^j`` or ``-scale_n * 2^j``
    (``j < levels``); ``v -= spike``. The output is the spike (float32, the shape of ``x``).
    """

    def __init__(self, place: str, scale_p: float | torch.Tensor, scale_n: float | torch.Tensor,
                 levels: int) -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f'levels must be >= 1, got {levels}')
        self.place = place
        self.levels = int(levels)
        self.register_buffer('scale_p', torch.as_tensor(scale_p, dtype=torch.float32).reshape(1).clone())
        self.register_buffer('scale_n', torch.as_tensor(scale_n, dtype=torch.float32).reshape(1).clone())
        self._membrane: Optional[torch.Tensor] = None  # flat (fused path) or shaped like x
        self._table: Optional[torch.Tensor] = None     # level_table of the fused path
        self._shape: Tuple[int, ...] = ()
        # Spike counts per level (positive and negative side), filled only when asked for.
        self.count_levels = False
        self.level_counts: Optional[torch.Tensor] = None
        # Set by the energy monitor: attach each spike's non-zero count to the spike tensor.
        self.post_nonzero = False

    def reset(self) -> None:
        self._membrane = None
        self._table = None  # rebuilt from the thresholds at the first step after a reset

    @property
    def membrane(self) -> Optional[torch.Tensor]:
        """The membrane potential after the last step (shaped like the input), or None."""
        return None if self._membrane is None else self._membrane.view(self._shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        self._shape = tuple(x.shape)
        nonzero = None
        if _COMPILE:
            # Flat, contiguous tensors and padded level tables: one fused kernel for every
            # shape, layout and N up to 8 (one compilation in all, not one per layer). The
            # membrane is a flat tensor of its own, updated in place.
            # detach(): a tensor of its own over the same memory, so that a view and a plain
            # tensor are the same input to the compiled kernel (no second compilation).
            x_in = x.detach()
            if self._table is None:
                self._table = level_table(self.scale_p, self.scale_n, self.levels)
            if self._membrane is not None and self._membrane.dim() != 1:  # the eager path ran before
                self._membrane = self._membrane.reshape(-1).clone()
            if x_in.device.type == 'cpu' and native_kernels.usable(self._table):
                # Any strides: a q/k/v view of the attention is read where it lies, not copied.
                # First step: the membrane is only written (no zero fill, no read).
                first = self._membrane is None
                if first:
                    self._membrane = torch.empty(x.numel(), dtype=torch.float32)
                spike, nonzero = native_kernels.mt_step(self._membrane, x_in, self._table, first=first)
            else:
                if self._membrane is None:
                    self._membrane = torch.zeros(x.numel(), dtype=torch.float32, device=x.device)
                spike, nonzero = _fused(_mt_step_fused, self._membrane, x_in.reshape(-1), self._table,
                                        eager=_mt_step_fused)
            spike = spike.view(x.shape)
        else:
            membrane = self.membrane if self._membrane is not None else torch.zeros_like(x)
            spike, self._membrane = _mt_step_eager(membrane, x, self.scale_p, self.scale_n, self.levels)
        if self.post_nonzero:
            # For the energy monitor: the linear layer this spike feeds reads the count here
            # instead of counting again (valid while the tensor is not modified in place).
            if nonzero is None:
                nonzero = _nonzero_count(spike)
            spike._ecmt_nonzero = (spike._version, nonzero)
        if self.count_levels:
            self._count(spike)
        return spike

    @torch.no_grad()
    def _count(self, spike: torch.Tensor) -> None:
        counts = spike_level_counts(spike, self.scale_p, self.scale_n, self.levels)
        self.level_counts = counts if self.level_counts is None else self.level_counts + counts

    def extra_repr(self) -> str:
        return (f'place={self.place}, levels={self.levels}, '
                f'scale_p={self.scale_p.item():.6g}, scale_n={self.scale_n.item():.6g}')


# ---------------------------------------------------------------------------------------------
# Expectation compensation
# ---------------------------------------------------------------------------------------------
def _ec_gelu(cum, x, prev, steps):
    """One fused EC step of GELU; the running sum and the previous total are updated in place
    (no new state tensors per step: fresh memory costs page faults on every step)."""
    cum.add_(x)
    total = torch.nn.functional.gelu(cum / steps) * steps
    out = total - prev
    prev.copy_(total)
    return out


def _ec_gelu_tanh(cum, x, prev, steps):
    cum.add_(x)
    total = torch.nn.functional.gelu(cum / steps, approximate='tanh') * steps
    out = total - prev
    prev.copy_(total)
    return out


def _ec_softmax(cum, x, prev, steps):
    """One EC step of a softmax over the last dimension (2-D state, updated in place). Runs as a
    native kernel on the CPU, else eager: inductor's row softmax on the CPU was 3x slower than
    eager's, so it is never compiled."""
    cum.add_(x)
    total = torch.softmax(cum / steps, dim=-1) * steps
    out = total - prev
    prev.copy_(total)
    return out


def _ec_layer_norm(cum, x, prev, steps, weight, bias, eps):
    """One EC step of a LayerNorm over the last dimension (2-D state, updated in place). Runs as
    a native kernel on the CPU, else eager (never compiled: inductor's was slower on the CPU)."""
    cum.add_(x)
    total = torch.nn.functional.layer_norm(cum / steps, cum.shape[-1:], weight, bias, eps) * steps
    out = total - prev
    prev.copy_(total)
    return out


def _layer_norm_types() -> Tuple[type, ...]:
    try:
        from timm.layers import LayerNorm as TimmLayerNorm
    except ImportError:  # pragma: no cover
        return (nn.LayerNorm,)
    return (nn.LayerNorm, TimmLayerNorm)


def _fused_ec_kind(module: nn.Module) -> Optional[Callable]:
    """The fused step function when ``module`` is a function the fused EC step knows exactly,
    else None (the module itself is then called: same semantics, unfused).

    GELU is fused (native kernel on the CPU, torch.compile elsewhere): its erf dominates and one
    kernel reading the running sum once is several times faster than the eager steps. A softmax
    and a LayerNorm over the last dimension run as native kernels on the CPU and eager elsewhere
    (inductor's were slower than eager on the CPU: row softmax 10.7 ms against 3.5 ms, LayerNorm
    0.80 ms against 0.65 ms, on ViT-sized tensors)."""
    try:
        from timm.layers import GELU as TimmGELU, GELUTanh
    except ImportError:  # pragma: no cover
        TimmGELU = GELUTanh = ()
    if type(module) is nn.GELU or (TimmGELU and type(module) is TimmGELU):
        return _ec_gelu if getattr(module, 'approximate', 'none') == 'none' else _ec_gelu_tanh
    if GELUTanh and type(module) is GELUTanh:
        return _ec_gelu_tanh
    if type(module) is nn.Softmax and module.dim == -1:
        return _ec_softmax
    if type(module) in _layer_norm_types() and len(module.normalized_shape) == 1:
        return _ec_layer_norm
    return None


class exp_comp_neuron(StatefulModule):
    """Expectation compensation of a nonlinear module f (ECMT_SPEC 5).

    With A the running sum of inputs after step t, the output is ``t*f(A/t) - (t-1)*f(A'/(t-1))``,
    so the outputs summed over steps 1..t are ``t * f(mean input)``. f is evaluated once per step:
    the previous ``(t-1)*f(A'/(t-1))`` is remembered. The wrapped module is ``self.module``.
    GELU, and a softmax or LayerNorm over the last dimension, run as one fused step (see
    :func:`set_fast_neuron` and :func:`_fused_ec_kind`); any other module is called as it is.
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self._fused_step = _fused_ec_kind(module)
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self._cum: Optional[torch.Tensor] = None    # running sum of inputs
        self._prev: Optional[torch.Tensor] = None   # t * f(running sum / t) of the last step
        self._shape: Tuple[int, ...] = ()
        self._steps: Optional[torch.Tensor] = None  # the step count as a 0-d tensor (fused path)

    @property
    def cum_input(self) -> Optional[torch.Tensor]:
        """The running sum of inputs after the last step (shaped like the input), or None."""
        return None if self._cum is None else self._cum.view(self._shape)

    @property
    def prev_total(self) -> Optional[torch.Tensor]:
        """``t * f(cum_input / t)`` of the last step t (shaped like the input), or None."""
        return None if self._prev is None else self._prev.view(self._shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float()
        self.steps += 1
        shape = self._shape = tuple(x.shape)
        if (self._fused_step is not None and _COMPILE and x.dim()
                and not torch.is_autocast_enabled(x.device.type)):
            # State kept as 2-D tensors of their own (rows x last dim): one compiled kernel for
            # every rank and layout, and no recompilation when a state tensor is a view. The step
            # count goes in as a 0-d tensor: as a Python int it would be compiled as a symbolic
            # integer, and that kernel is several times slower than the eager steps.
            x2 = x.reshape(-1, shape[-1]).detach()  # detach(): see TwoSideNeuron.forward
            if self._cum is None:
                self._cum = x2.clone(memory_format=torch.contiguous_format)
                total = out = self.module(self._cum).float()  # step 1: f(x) (t = 1)
            else:
                # A device tensor filled in place: no host-to-device copy (a sync on CUDA).
                if self._steps is None or self._steps.device != x.device:
                    self._steps = torch.empty((), device=x.device)
                steps = self._steps.fill_(float(self.steps))
                if self._cum.shape != x2.shape:  # the eager path ran before: own copies
                    self._cum = self._cum.reshape(x2.shape).clone()
                    self._prev = self._prev.reshape(x2.shape).clone()
                extra = ((self.module.weight, self.module.bias, self.module.eps)
                         if self._fused_step is _ec_layer_norm else ())
                out = _fused(self._fused_step, self._cum, x2, self._prev, steps, *extra)
                return out.view(shape)
            self._prev = total.clone()  # updated in place from step 2 on; out is handed on
            return out.view(shape)
        cum = x.clone() if self._cum is None else self._cum.view(shape) + x
        total = self.module(cum / self.steps).float() * self.steps
        out = total if self._prev is None else total - self._prev.view(shape)
        self._cum, self._prev = cum, total
        return out

    def extra_repr(self) -> str:
        return f'steps={self.steps}'


#: EC steps with a native CPU kernel (native_kernels): called instead of torch.compile's kernels
#: for contiguous float32 CPU tensors. (TwoSideNeuron calls native_kernels.mt_step itself: it
#: takes inputs of any strides.)
_NATIVE_STEPS: Dict[Callable, Callable] = {
    _ec_gelu: lambda cum, x, prev, steps: native_kernels.ec_gelu(cum, x, prev, float(steps), False),
    _ec_gelu_tanh: lambda cum, x, prev, steps: native_kernels.ec_gelu(cum, x, prev, float(steps), True),
    _ec_softmax: lambda cum, x, prev, steps: native_kernels.ec_softmax(cum, x, prev, float(steps)),
    _ec_layer_norm: lambda cum, x, prev, steps, weight, bias, eps: native_kernels.ec_layer_norm(
        cum, x, prev, float(steps), weight, bias, eps),
}
#: Steps that are never compiled: eager where the native kernel does not apply.
_NATIVE_OR_EAGER = {_ec_softmax, _ec_layer_norm}


class MyAt(nn.Module):
    """Product of two operands, ``a @ b`` (plain; becomes :class:`AtNeuron` in ``snn`` mode)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a @ b


class AtNeuron(StatefulModule):
    """Expectation compensation of a product of two time-varying operands (ECMT_SPEC 6).

    With running sums A and B, the output at step t is ``A_t B_t / t - A_{t-1} B_{t-1} / (t-1)``;
    one product of running sums per step, the previous cumulative result remembered. In float32
    the subtraction is fused into the product (``baddbmm``). ``cum_a``/``cum_b`` (after this
    step) stay readable for the energy monitor.
    """

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.cum_a: Optional[torch.Tensor] = None
        self.cum_b: Optional[torch.Tensor] = None
        self.prev_total: Optional[torch.Tensor] = None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.float(), b.float()
        self.steps += 1
        if self.steps == 1:
            self.cum_a, self.cum_b = a.clone(), b.clone()
            out = (self.cum_a @ self.cum_b).float()
            self.prev_total = out.clone()  # its own: updated in place below, out is handed on
            return out
        self.cum_a.add_(a)  # in place: the running sums are this module's own tensors
        self.cum_b.add_(b)
        prev = self.prev_total
        if torch.is_autocast_enabled(a.device.type) or self.cum_a.dim() < 2:
            total = (self.cum_a @ self.cum_b).float() / self.steps
            out = total - prev
        else:
            lead = torch.broadcast_shapes(self.cum_a.shape[:-2], self.cum_b.shape[:-2])
            a3 = self.cum_a.expand(*lead, *self.cum_a.shape[-2:]).reshape(-1, *self.cum_a.shape[-2:])
            b3 = self.cum_b.expand(*lead, *self.cum_b.shape[-2:]).reshape(-1, *self.cum_b.shape[-2:])
            out = torch.baddbmm(prev.reshape(-1, *prev.shape[-2:]), a3, b3, beta=-1.0,
                                alpha=1.0 / self.steps).reshape(prev.shape)
            total = prev.add_(out)  # in place: no new memory (page faults) per step
        self.prev_total = total
        return out

    def extra_repr(self) -> str:
        return f'steps={self.steps}'


class MyMul(nn.Module):
    """Element-wise product of two operands, ``a * b`` (plain; becomes :class:`MulNeuron` in
    ``snn`` mode)."""

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return a * b


class MulNeuron(StatefulModule):
    """Expectation compensation of an element-wise product of two time-varying operands
    (ECMT_SPEC 12): section 6 with ``*`` for ``@``. With running sums A and B, the output at step
    t is ``A_t * B_t / t - A_{t-1} * B_{t-1} / (t-1)`` (``a_1 * b_1`` at t = 1), so the outputs
    summed over steps 1..t equal ``A_t * B_t / t``. ``cum_a``/``cum_b`` (after this step) stay
    readable for the energy monitor."""

    def __init__(self) -> None:
        super().__init__()
        self.reset()

    def reset(self) -> None:
        self.steps = 0
        self.cum_a: Optional[torch.Tensor] = None
        self.cum_b: Optional[torch.Tensor] = None
        self.prev_total: Optional[torch.Tensor] = None

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        a, b = a.float(), b.float()
        self.steps += 1
        if self.steps == 1:
            self.cum_a, self.cum_b = a.clone(), b.clone()
            out = self.cum_a * self.cum_b
            self.prev_total = out.clone()  # its own: updated in place below, out is handed on
            return out
        self.cum_a.add_(a)
        self.cum_b.add_(b)
        total = self.cum_a * self.cum_b / self.steps
        out = total - self.prev_total
        self.prev_total = total
        return out

    def extra_repr(self) -> str:
        return f'steps={self.steps}'


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
                   softmax_p: float = 0.0125, fc2_thresholds: Optional[Tuple[float, float]] = None
                   ) -> nn.Module:
    """All of ``snn`` mode's surgery on a model holding calibrated :class:`TestNeuron` s:
    MT neurons, EC nonlinear modules, EC products, then the check that nothing stays analog."""
    replace_testneuron_by_twosideneuron(model, linear_num, qkv_num, softmax_num, softmax_p, fc2_thresholds)
    replace_nonlinear_by_neuron(model)
    replace_at_by_neuron(model)
    check_fully_converted(model)
    reset_net(model)
    return model


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


def _nonzero_count(x: torch.Tensor) -> torch.Tensor:
    # Not torch.count_nonzero: this is about 2.5x faster on CPU.
    return (x != 0).sum()


def _nonzero_mask(x: torch.Tensor) -> torch.Tensor:
    # 1.0 where x is non-zero, as float32: sign and abs are plain vectorised float kernels, about
    # three times faster on the CPU than `x != 0` (a boolean tensor) followed by a sum.
    return torch.sign(x.float()).abs_()


def _product_sops(a: torch.Tensor, b: torch.Tensor, cum_a: torch.Tensor,
                  cum_b: torch.Tensor) -> torch.Tensor:
    """nz(a)·nz(b) + nz(a)·nz(B) + nz(A)·nz(b) of an EC product, as :func:`product_nonzero_macs`
    three times, but with each operand's non-zero counts taken once (four passes, not six).
    Eager: compiled, it is about 1.5x faster per call, but its two kernels (q·kᵀ and s·v differ in
    layout) cost about 0.9 s to load in every process and half a minute to compile the first time,
    more than they save in a run of a few thousand products. Float32 sums of 0/1 are exact."""
    cols_a = _nonzero_mask(a).sum(dim=-2).double()
    cols_cum_a = _nonzero_mask(cum_a).sum(dim=-2).double()
    rows_b = _nonzero_mask(b).sum(dim=-1).double()
    rows_cum_b = _nonzero_mask(cum_b).sum(dim=-1).double()
    return (cols_a * (rows_b + rows_cum_b) + cols_cum_a * rows_b).sum()


def _spike_level_index(spike: torch.Tensor, theta_p: torch.Tensor, theta_n: torch.Tensor,
                       levels: int) -> torch.Tensor:
    """Per element: j for a spike +theta_p*2^j, levels + j for -theta_n*2^j, 2*levels for none.
    Spikes are exact multiples theta*2^j, so comparing with 0.75*theta*2^j finds j; comparisons
    (no log2) vectorise fully once fused."""
    positive = spike > 0
    theta = torch.where(positive, theta_p, theta_n)
    magnitude = spike.abs()
    level = torch.zeros_like(magnitude)
    for j in range(1, levels):
        level = level + (magnitude >= theta * (0.75 * 2 ** j)).to(magnitude.dtype)
    index = torch.where(positive, level, level + levels)
    index = torch.where(spike == 0, torch.full_like(index, 2 * levels), index)
    return index.to(torch.uint8 if 2 * levels < 256 else torch.int64)


def _spike_level_index_eager(spike, theta_p, theta_n, levels: int) -> torch.Tensor:
    # Unfused, one log2 is cheaper than levels - 1 comparisons.
    positive = spike > 0
    theta = torch.where(positive, theta_p, theta_n)
    level = torch.round(torch.log2(spike.abs() / theta)).clamp_(0, levels - 1)
    index = torch.where(positive, level, level + levels)
    return torch.where(spike == 0, torch.full_like(index, 2 * levels), index).long()


def spike_level_counts(spike: torch.Tensor, theta_p: torch.Tensor, theta_n: torch.Tensor,
                       levels: int) -> torch.Tensor:
    """[2, levels] int64: how many elements of ``spike`` are +theta_p*2^j (row 0) and
    -theta_n*2^j (row 1), for j = 0..levels-1; one histogram of a combined index."""
    # Flat: one compiled kernel for spikes of every shape and layout.
    index = _fused(_spike_level_index, spike.reshape(-1), theta_p, theta_n, levels,
                   eager=_spike_level_index_eager)
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
    out_features. EC product at step t (operands a, b; running sums A, B including step t):
    SOPs = nz(a)·nz(b) + nz(a)·nz(B) + nz(A)·nz(b), each the multiply-adds whose two factors are
    non-zero; dense = the product's multiply-adds. An EC element-wise product counts the same
    three terms per element, against one dense operation per element (ECMT_SPEC 12). Firing
    rate after t steps r_t = SOPs(1..t) / dense(1..t) over all layers and images; energy relative to the ANN
    E_t = t · (0.9/4.6) · r_t (ECMT_SPEC 8). Counts come from non-zero counts per tensor, row and
    column, never from extra matrix products: a linear layer fed by an MT neuron takes the count
    the neuron's fused kernel made in its own pass; the products' row and column counts are four
    mask-and-sum passes per product. They stay on the device (no host sync per step), and add up
    over all batches.

    The evaluation loop calls :meth:`new_batch` before each batch and sets ``monitor.step``
    (0-based) before each step. ``count_levels=True`` also counts the MT neurons' spikes per
    level, on the first ``level_batches`` batches only (None: all); a histogram per neuron and
    step costs more than all the SOP counts together.
    """

    def __init__(self, model: nn.Module, count_levels: bool = False,
                 level_batches: Optional[int] = None) -> None:
        super().__init__()
        if level_batches is not None and level_batches < 1:
            raise ValueError(f'level_batches must be >= 1 or None, got {level_batches}')
        self.step = 0
        self.batches = 0
        self.count_levels = bool(count_levels)
        self.level_batches = level_batches
        self.names: List[str] = []
        self.kinds: List[str] = []
        self._sops: Optional[torch.Tensor] = None    # [layers, steps] float64, on the device
        self._dense: Optional[torch.Tensor] = None   # [layers, steps] float64
        # Counts of the current batch, added up at the next batch or when read: a hook only
        # appends (a per-hook indexed add of two 0-d tensors costs more than the counting).
        self._pending_linear: List[Tuple[int, int, torch.Tensor, int]] = []  # layer, step, nz, out
        self._pending_product: List[Tuple[int, int, torch.Tensor]] = []       # layer, step, sops
        self._pending_dense: Dict[Tuple[int, int], float] = {}
        self._device: Optional[torch.device] = None
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear):
                self._watch(name, module, 'linear', self._linear_hook)
            elif isinstance(module, AtNeuron):
                self._watch(name, module, 'product', self._product_hook)
            elif isinstance(module, MulNeuron):
                self._watch(name, module, 'product', self._mul_hook)
        self.neurons = [(n, m) for n, m in model.named_modules() if isinstance(m, TwoSideNeuron)]
        for _, neuron in self.neurons:
            neuron.count_levels = self.count_levels
            neuron.level_counts = None
            neuron.post_nonzero = True

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
        flat = self._sops.view(-1)
        if self._pending_linear:
            where = torch.tensor([i * width + t for i, t, _, _ in self._pending_linear], device=device)
            factor = torch.tensor([f for _, _, _, f in self._pending_linear], dtype=torch.float64,
                                  device=device)
            counts = torch.stack([c.reshape(()) for _, _, c, _ in self._pending_linear]).double()
            flat.index_add_(0, where, counts * factor)
        if self._pending_product:
            where = torch.tensor([i * width + t for i, t, _ in self._pending_product], device=device)
            flat.index_add_(0, where, torch.stack([c.reshape(()).double() for _, _, c in self._pending_product]))
        dense = torch.zeros_like(self._dense, device='cpu')
        for (i, t), value in self._pending_dense.items():
            dense[i, t] = value
        self._dense += dense.to(device)
        self._pending_linear.clear()
        self._pending_product.clear()
        self._pending_dense.clear()

    def _add_dense(self, index: int, dense: float, device) -> None:
        key = (index, self.step)
        self._pending_dense[key] = self._pending_dense.get(key, 0.0) + dense
        self._device = device

    @property
    def level_batches_counted(self) -> int:
        """Batches whose spikes the level counts cover."""
        if not self.count_levels:
            return 0
        return self.batches if self.level_batches is None else min(self.batches, self.level_batches)

    def _linear_hook(self, index, module, inputs, output) -> None:
        x = inputs[0]
        posted = getattr(x, '_ecmt_nonzero', None)
        if posted is not None and posted[0] == x._version:
            nonzero = posted[1]  # counted by the MT neuron that emitted x, in its own pass
        else:
            nonzero = _nonzero_count(x)  # an analog input (the head's): small
        self._pending_linear.append((index, self.step, nonzero, module.out_features))
        self._add_dense(index, float(x.numel()) * module.out_features, x.device)

    def _product_hook(self, index, module, inputs, output) -> None:
        a, b = inputs
        sops = _product_sops(a, b, module.cum_a, module.cum_b)
        self._pending_product.append((index, self.step, sops))
        self._add_dense(index, float(output.numel()) * a.shape[-1], a.device)

    def _mul_hook(self, index, module, inputs, output) -> None:
        a, b = inputs
        nz_a, nz_b = _nonzero_mask(a), _nonzero_mask(b)
        sops = (nz_a * (nz_b + _nonzero_mask(module.cum_b)) + _nonzero_mask(module.cum_a) * nz_b).sum(
            dtype=torch.float64)
        self._pending_product.append((index, self.step, sops))
        self._add_dense(index, float(output.numel()), a.device)

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
            neuron.post_nonzero = False
