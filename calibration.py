"""Threshold calibration (``for_v``, ECMT_SPEC 3): the calibrating placeholder and its statistics.

:class:`TestNeuron` stands at every place while calibrating: an identity that keeps, per batch, the
exact ``percent`` quantile of its input and the negated ``1 - percent`` one (:func:`tail_quantiles`,
exact order statistics even past torch.quantile's 2^24-element limit), and their running means over
batches, each batch weighted equally. :func:`sync_calibration` pools them over processes.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Tuple

import numpy as np
import torch
import torch.nn as nn

import kernels.native as native_kernels
from options import THRESHOLD_GRANULARITIES

__all__ = ['UNCALIBRATED_PLACES', 'HEAD_PLACES', 'TestNeuron', 'tail_quantiles', 'channel_quantiles',
           'threshold_shape', 'sync_calibration']

#: Places whose thresholds are not calibrated (``s`` uses ``softmax_p``).
UNCALIBRATED_PLACES = ('s',)


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


#: Places whose threshold channels are (head, channel) of a [B, heads, N, D] input (ECMT_SPEC 15).
HEAD_PLACES = ('q', 'k', 'v')


def threshold_shape(place: str, input_shape: Tuple[int, ...]) -> Tuple[int, ...]:
    """The shape of per-channel thresholds of ``place`` for an input of ``input_shape`` (ECMT_SPEC
    15), broadcastable against one step's input without its batch dimension: the last axis as the
    next linear layer or product reads it ([C]), and for q, k, v of a [B, heads, N, D] input the
    head and the channel within it ([heads, 1, D])."""
    if place in HEAD_PLACES and len(input_shape) >= 4:
        return (input_shape[-3], 1, input_shape[-1])
    return (input_shape[-1],)


def channel_quantiles(x: torch.Tensor, percent: float, shape: Tuple[int, ...]) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`tail_quantiles` per channel (ECMT_SPEC 15): for each channel of ``shape`` (thresholds
    broadcast right-aligned against ``x``), the exact ``percent`` and ``1 - percent`` order
    statistics of that channel's n values over every other dimension, k = int(percent·n) and
    int((1 - percent)·n), 1-based, at least 1; NaN for a channel holding a NaN. Memory: one copy of
    ``x`` with the channels first (the selection runs along each channel's values). Returns two
    float32 tensors of ``shape`` on ``x``'s device."""
    if not 0.0 < percent <= 1.0:
        raise ValueError(f'percent must be in (0, 1], got {percent}')
    x = x.detach().float()
    dims = list(range(x.dim() - len(shape), x.dim()))
    channel_dims = [d for d, size in zip(dims, shape) if size != 1]
    other = [d for d in range(x.dim()) if d not in channel_dims]
    values = x.permute(*channel_dims, *other).reshape(math.prod(x.shape[d] for d in channel_dims), -1)
    n = values.shape[1]
    if n == 0:
        raise ValueError('cannot calibrate on an empty tensor')
    k_hi = min(n, max(1, int(percent * n)))
    k_lo = min(n, max(1, int((1 - percent) * n)))
    q_hi = torch.kthvalue(values, k_hi, dim=1).values
    q_lo = torch.kthvalue(values, k_lo, dim=1).values
    nan = torch.isnan(values).any(dim=1)
    q_hi = torch.where(nan, torch.full_like(q_hi, math.nan), q_hi)
    q_lo = torch.where(nan, torch.full_like(q_lo, math.nan), q_lo)
    return q_hi.reshape(shape), q_lo.reshape(shape)


class TestNeuron(nn.Module):
    """Calibrating placeholder (``for_v``): identity that records thresholds (ECMT_SPEC 3, 15).

    ``scale_p`` is the running mean over batches of the ``percent`` quantile of the input,
    ``scale_n`` that of the negated ``1 - percent`` quantile; each batch weighs the same. With
    ``granularity='place'`` (section 3) both are buffers of shape [1]; with ``'channel'``
    (section 15) the statistics are taken per channel (:func:`channel_quantiles`) and the buffers
    take the channel shape (:func:`threshold_shape`) at the first batch. They travel in the
    state_dict under the placeholder's path; loading a checkpoint gives them its shapes.
    """

    def __init__(self, place: str, percent: float = 0.99, granularity: str = 'place') -> None:
        super().__init__()
        if not 0.0 < percent <= 1.0:
            raise ValueError(f'percent must be in (0, 1], got {percent}')
        if granularity not in THRESHOLD_GRANULARITIES:
            raise ValueError(f'granularity must be one of {", ".join(THRESHOLD_GRANULARITIES)}, got {granularity!r}')
        self.place = place
        self.percent = percent
        self.granularity = granularity
        self.calibrate = place not in UNCALIBRATED_PLACES
        self.register_buffer('scale_p', torch.zeros(1))
        self.register_buffer('scale_n', torch.zeros(1))
        # float64 sums of the per-batch values; the count is a Python int (no host sync).
        self.register_buffer('sum_p', torch.zeros(1, dtype=torch.float64), persistent=False)
        self.register_buffer('sum_n', torch.zeros(1, dtype=torch.float64), persistent=False)
        self.num_batches = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.calibrate:
            if self.granularity == 'channel':
                shape = threshold_shape(self.place, tuple(x.shape))
                if self.num_batches == 0:
                    self._reshape(shape, x.device)
                elif tuple(self.scale_p.shape) != shape:
                    raise ValueError(f'{self.place} place: an input of shape {tuple(x.shape)} has channels {shape}, '
                                     f'earlier batches had {tuple(self.scale_p.shape)}')
                q_hi, q_lo = channel_quantiles(x, self.percent, shape)
            else:
                q_hi, q_lo = tail_quantiles(x, self.percent)
            self.sum_p += q_hi.double()
            self.sum_n -= q_lo.double()
            self.num_batches += 1
            self.scale_p.copy_(self.sum_p / self.num_batches)
            self.scale_n.copy_(self.sum_n / self.num_batches)
        return x

    def _reshape(self, shape: Tuple[int, ...], device) -> None:
        """Buffers of the thresholds' shape (zero): per-channel statistics, or a checkpoint's."""
        self.scale_p = torch.zeros(shape, device=device)
        self.scale_n = torch.zeros(shape, device=device)
        self.sum_p = torch.zeros(shape, dtype=torch.float64, device=device)
        self.sum_n = torch.zeros(shape, dtype=torch.float64, device=device)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        # A checkpoint's thresholds may be per channel (ECMT_SPEC 15): take their shape.
        loaded = state_dict.get(prefix + 'scale_p')
        if torch.is_tensor(loaded) and tuple(loaded.shape) != tuple(self.scale_p.shape):
            self._reshape(tuple(loaded.shape), self.scale_p.device)
            self.granularity = 'channel' if loaded.numel() > 1 else 'place'
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        shape = '' if self.scale_p.numel() == 1 else f', channels={tuple(self.scale_p.shape)}'
        return f'place={self.place}, percent={self.percent}, batches={self.num_batches}{shape}'


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
    # One flat vector: each neuron's sums (one per channel) and its batch count.
    stats = reduce(torch.cat([torch.cat([n.sum_p.reshape(-1), n.sum_n.reshape(-1),
                                         torch.full_like(n.sum_p.reshape(-1)[:1], n.num_batches)])
                              for n in neurons]))
    offset = 0
    for neuron in neurons:
        size = neuron.sum_p.numel()
        sum_p, sum_n = stats[offset:offset + size], stats[offset + size:offset + 2 * size]
        count = stats[offset + 2 * size]
        offset += 2 * size + 1
        neuron.sum_p.copy_(sum_p.reshape(neuron.sum_p.shape))
        neuron.sum_n.copy_(sum_n.reshape(neuron.sum_n.shape))
        neuron.num_batches = int(round(float(count)))
        if neuron.num_batches:
            neuron.scale_p.copy_(neuron.sum_p / neuron.num_batches)
            neuron.scale_n.copy_(neuron.sum_n / neuron.num_batches)
    return max(n.num_batches for n in neurons)
