"""The eager backend: the toolkit's multi-step kernels written with torch operations, for any
device (the CUDA fallback where Triton does not import, and the reference backend of the tests).

Every function has the name, arguments, return values and state layout of its twin in
``kernels.native`` (the C++ CPU kernels) and ``kernels.triton`` (CUDA), so that a stateful module
calls ``kernels.mt_steps(...)`` whatever backend it was converted for (``kernels.kernels_of``):

* ``mt_steps`` / ``qkv_mt_steps``   K steps of the MT neuron (ECMT_SPEC 4), on an input or on one
                                    part (q, k or v) of a fused qkv linear output;
* ``ec_*_steps`` / ``ec_mt_steps``  K steps of an EC function (ECMT_SPEC 5), optionally with the MT
                                    neuron it feeds;
* ``running_sums`` / ``scaled_differences`` / ``nonzero_counts``  the bookkeeping of K steps of
                                    an EC product (ECMT_SPEC 6, 8).

The EC function is evaluated once over all K running means, and the differences along time are
one vectorised subtraction. Running sums are added one step at a time in float32 (K additions,
not ``torch.cumsum``, whose accumulation order and precision vary by device), so every chunking of
the steps gives the same sums bit for bit, as the step-by-step order does; the neuron loops over
the K steps (each depends on the membrane the last one left).
"""
from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch
import torch.nn.functional as F

from kernels import channel_table, differential_coding, parts_mt_steps

#: EC kinds a module runs through this backend's own kernels: none, the eager backend calls the
#: wrapped module itself (ec_function_steps) for every kind; ec_gelu/softmax/layer_norm_steps below
#: are the same functions written as the other backends' kernels take them (ec_mt_steps uses them).
EC_KINDS = ()
#: No fused kernels: an EC module and its neuron, and the q/k/v neurons, run apart.
#: Input dtypes the kernels read (any floating dtype: each step is computed in float32).
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
FUSES = False


def available() -> bool:
    return True


def mt_step(membrane: torch.Tensor, x: torch.Tensor, table) -> Tuple[torch.Tensor, torch.Tensor]:
    """One MT step on tensors of one shape: the membrane after ``v + x`` is compared with every
    level's threshold in turn (``table``: a one-channel ``kernels.level_table``, or the levels of
    :func:`channel_levels`); thresholds grow with the level, so the last level passed is the
    largest that fires, and NaN thresholds (levels beyond N, dead sides) never pass. Only
    comparisons and selections: the same spikes as the literal rule bit for bit. Returns (spike,
    new membrane)."""
    membrane = membrane + x
    spike = fire(membrane, table)
    return spike, membrane - spike


def fire(u: torch.Tensor, table) -> torch.Tensor:
    """The spike the MT rule emits for a membrane ``u`` that already holds this step's input
    (``table``: a one-channel level table, or per level (positive threshold, spike, negative
    threshold, spike) tensors broadcastable to ``u``, :func:`channel_levels`)."""
    levels = _scalar_levels(table) if isinstance(table, torch.Tensor) else table
    up = torch.zeros_like(u)
    down = torch.zeros_like(u)
    for up_at, up_spike, down_at, down_spike in levels:
        up = torch.where(u >= up_at, up_spike, up)
        down = torch.where(-u >= down_at, down_spike, down)
    return up - down


def _scalar_levels(table: torch.Tensor) -> list:
    table = table.reshape(4, -1)  # one channel
    return [(table[0, j], table[1, j], table[2, j], table[3, j]) for j in range(table.shape[1])]


def channel_levels(table: torch.Tensor, channels: Tuple[int, int, int], n: int
                   ) -> Tuple[Optional[Tuple[int, ...]], list]:
    """The thresholds of a [C, 4, width] table laid over a step of ``n`` elements by the channel
    map ``channels`` (``kernels.channel_map``): (the shape to view a step as, None for its own
    shape; per level the (positive threshold, spike, negative threshold, spike) broadcastable to
    that view). One channel: 0-d tensors. Otherwise a view [outer, groups, inner / width, width]
    against [groups, 1, width] thresholds where the map allows it, else every element's own
    (gathered, [n])."""
    if table.shape[0] == 1:
        return None, _scalar_levels(table[0])
    inner, groups, width = channels
    if groups == 1:
        inner = width  # the channel is i % width alone
    if inner % width == 0 and n % (groups * inner) == 0:
        shape = (n // (groups * inner), groups, inner // width, width)
        per = table.view(groups, 1, width, 4, table.shape[2])
    else:
        i = torch.arange(n, device=table.device)
        shape = (n,)
        per = table[((i // inner) % groups) * width + i % width]
    return shape, [(per[..., 0, j], per[..., 1, j], per[..., 2, j], per[..., 3, j]) for j in range(table.shape[2])]


def differential_step(membrane: torch.Tensor, estimate: torch.Tensor, x: torch.Tensor, table,
                      step: int) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One step t = ``step`` of the differential neuron (ECMT_SPEC 14), in the float order every
    backend follows: u = (v + x) - r; s = the MT spike for u; v = u - s; y = r + s; r = r + s / t.
    ``table`` as :func:`fire` takes it. Returns (y, s, new membrane, new estimate)."""
    u = (membrane + x) - estimate
    spike = fire(u, table)
    # A divisor tensor, not a Python number: torch may multiply by a scalar's reciprocal instead.
    return estimate + spike, spike, u - spike, estimate + spike / torch.full_like(spike, float(step))


def _check_state(name: str, state: Optional[torch.Tensor], n: int) -> None:
    if state is not None and (state.numel() != n or state.dtype != torch.float32):
        raise ValueError(f'{name}: the state must be float32 with one element per input element of a step')


def mt_steps(x: torch.Tensor, table: torch.Tensor, membrane: Optional[torch.Tensor], keep: bool, *,
             coding: str = 'rate', estimate: Optional[torch.Tensor] = None, t0: int = 0, sent: bool = False,
             channels: Tuple[int, int, int] = (1, 1, 1)):
    """K steps of the MT neuron on ``x`` [K, ...] (any strides and float dtype; computed in
    float32). ``table``: ``kernels.level_table`` [C, 4, width] (or [4, width]: one channel);
    ``channels=(inner, groups, width)``: the element at row-major index i of a step uses channel
    ((i // inner) % groups) * width + i % width (``kernels.channel_map``; groups * width == C).
    ``membrane``: the flat state after the previous chunk, or None (zero) on a batch's first chunk.
    Returns (spikes [K, ...] float32 contiguous, non-zero spikes per step [K] int64, the membrane
    after the chunk if ``keep``, else None).

    ``coding='differential'`` (ECMT_SPEC 14, :func:`differential_step`): the flat ``estimate`` is
    carried with the membrane (both None on a batch's first chunk), the steps are t0+1..t0+K, and
    the result is (outputs r + s [K, ...], non-zero spikes s per step [K], membrane, estimate (the
    states None without ``keep``), the spikes s [K, ...] if ``sent`` else None)."""
    table, channels = channel_table('mt_steps', table, channels)
    if x.dim() < 1:
        raise ValueError('mt_steps: x must have a leading time dimension')
    differential = differential_coding('mt_steps', coding, membrane, estimate)
    steps = x.shape[0]
    step_shape = x.shape[1:]
    n = math.prod(step_shape)
    _check_state('mt_steps', membrane, n)
    _check_state('mt_steps', estimate, n)
    view, levels = channel_levels(table.to(x.device), channels, n)
    view = step_shape if view is None else view
    v = (torch.zeros(view, dtype=torch.float32, device=x.device) if membrane is None
         else membrane.view(view))
    spikes = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    flat = spikes.view(steps, *view)
    if differential:
        r = torch.zeros_like(v) if estimate is None else estimate.view(view)
        outputs = torch.empty_like(spikes)
        flat_outputs = outputs.view(steps, *view)
        for k in range(steps):
            flat_outputs[k], flat[k], v, r = differential_step(v, r, x[k].float().reshape(view), levels, t0 + k + 1)
        counts = (spikes != 0).reshape(steps, -1).sum(1)
        states = (_kept(membrane, v), _kept(estimate, r)) if keep else (None, None)
        return outputs, counts, *states, (spikes if sent else None)
    for k in range(steps):
        spike, v = mt_step(v, x[k].float().reshape(view), levels)
        flat[k] = spike
    counts = (spikes != 0).reshape(steps, -1).sum(1)
    return spikes, counts, (_kept(membrane, v) if keep else None)


def _kept(given: Optional[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
    """The state after a chunk, written into the given state tensor (the one state semantics of
    every backend: ``kernels/__init__``), or a new flat tensor on a batch's first chunk."""
    if given is None:
        return value.reshape(-1).contiguous()
    return given.copy_(value.reshape(-1))


def qkv_part(qkv: torch.Tensor, part: int, heads: int) -> torch.Tensor:
    """Part ``part`` (0 q, 1 k, 2 v) of a fused qkv output [K, B, N, 3*heads*D] as the view
    [K, B, heads, N, D] the attention splits it into."""
    K, B, N, width = qkv.shape
    return qkv.view(K, B, N, 3, heads, width // (3 * heads))[:, :, :, part].permute(0, 1, 3, 2, 4)


def _check_qkv(name: str, qkv: torch.Tensor, part: int, heads: int) -> None:
    if qkv.dim() != 4 or heads < 1 or qkv.shape[-1] % (3 * heads):
        raise ValueError(f'{name}: qkv must be a [K, B, N, 3 * heads * D] tensor')
    if part not in (0, 1, 2):
        raise ValueError(f'{name}: part must be 0 (q), 1 (k) or 2 (v), got {part}')


def qkv_mt_steps(qkv: torch.Tensor, part: int, heads: int, table: torch.Tensor,
                 membrane: Optional[torch.Tensor], keep: bool, **coding):
    """:func:`mt_steps` of the q (``part`` 0), k (1) or v (2) neuron of an attention, on its part
    of the fused qkv linear output ``qkv`` [K, B, N, 3*heads*D]. Returns (spikes [K, B, heads, N,
    D] contiguous, counts [K], membrane: flat [B, heads, N, D] as mt_steps keeps it); ``coding``:
    the keywords of :func:`mt_steps` (a differential neuron's, and ``channels`` over one step of
    the output, [B, heads, N, D])."""
    _check_qkv('qkv_mt_steps', qkv, part, heads)
    return mt_steps(qkv_part(qkv, part, heads), table, membrane, keep, **coding)


def qkv_parts_mt_steps(qkv: torch.Tensor, heads: int, tables, membranes, keep: bool, *,
                       channels=(1, 1, 1), **coding):
    """The q, k and v neurons on one fused qkv output (:func:`parts_mt_steps` over
    :func:`qkv_mt_steps`); ``channels``: one map for the three parts, or one per part."""
    return parts_mt_steps(qkv_mt_steps, qkv, heads, tables, membranes, keep, channels=channels, **coding)


def running_sums(x: torch.Tensor, carried: Optional[torch.Tensor]) -> torch.Tensor:
    """Running sums along time of ``x`` [K, ...] (any strides) from ``carried`` (the flat sums
    after the previous chunk; None: from zero), one step at a time in float32. Returns [K, ...]
    float32 contiguous."""
    if x.dim() < 1:
        raise ValueError('running_sums: x must have a leading time dimension')
    _check_state('running_sums', carried, math.prod(x.shape[1:]))
    sums = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    previous = None if carried is None else carried.view(x.shape[1:])
    for k in range(x.shape[0]):
        if previous is None:
            sums[k].copy_(x[k])
        else:
            torch.add(previous, x[k].float(), out=sums[k])
        previous = sums[k]
    return sums


def _steps(t0: int, K: int, rank: int, device) -> torch.Tensor:
    """t0+1 .. t0+K as float32 [K, 1, ..., 1] of ``rank`` dimensions, made on the device."""
    steps = torch.arange(t0 + 1, t0 + K + 1, dtype=torch.float32, device=device)
    return steps.view(-1, *([1] * (rank - 1)))


def _differences(totals: torch.Tensor, prev: Optional[torch.Tensor]) -> torch.Tensor:
    """totals[k] - totals[k-1] along time, totals[0] - prev (nothing to subtract without prev)."""
    out = torch.empty_like(totals)
    out[1:] = totals[1:] - totals[:-1]
    if prev is None:
        out[0] = totals[0]
    else:
        torch.sub(totals[0], prev.view(totals.shape[1:]), out=out[0])
    return out


def scaled_differences(totals: torch.Tensor, prev: Optional[torch.Tensor], t0: int, keep: bool,
                       scale: float = 1.0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``totals`` [K, ...] float32 holds the products of running sums for steps t0+1..t0+K: returns
    (the outputs ``total_t - total_(t-1)`` with ``total_t = totals[t] / t``, the first less
    ``prev`` (the last total of the previous chunk), times ``scale`` after the difference; the
    chunk's last total shaped like one step, or None without ``keep``)."""
    if totals.dtype != torch.float32 or totals.dim() < 1:
        raise ValueError('scaled_differences: totals must be float32 [K, ...]')
    if prev is not None:
        _check_state('scaled_differences', prev, math.prod(totals.shape[1:]))
    totals = totals / _steps(t0, totals.shape[0], totals.dim(), totals.device)
    last = totals[-1].clone() if keep else None
    out = _differences(totals, prev)
    if scale != 1.0:
        out.mul_(scale)
    return out, last


def nonzero_counts(x: torch.Tensor, dim: int) -> torch.Tensor:
    """Non-zero elements of ``x`` [..., R, C] along ``dim`` (-2: per column, -1: per row), float32."""
    if x.dim() < 2 or dim not in (-1, -2):
        raise ValueError('nonzero_counts: x must have >= 2 dimensions, dim -1 or -2')
    # sign().abs() is a plain float kernel: faster than a boolean compare followed by a sum.
    return torch.sign(x).abs_().sum(dim=dim, dtype=torch.float32)


def ec_function_steps(f: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, cum: Optional[torch.Tensor],
                      prev: Optional[torch.Tensor], t0: int, keep: bool
                      ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """EC of any function ``f`` (ECMT_SPEC 5) for steps t0+1..t0+K of ``x`` [K, B, ...]: with the
    running sum A (``cum``, flat) and the last total (``prev``, flat) carried from the previous
    chunk (None on a batch's first chunk), step s gives ``s * f(A_s / s) - total_(s-1)``. ``f`` is
    called once on all K running means folded into the batch ([K*B, ...], the layout the wrapped
    module was written for). Returns (out [K, B, ...] float32, cum, prev; the states None without
    ``keep``)."""
    if (cum is None) != (prev is None):
        raise ValueError('ec steps: the running sum and the last total are carried together')
    means = running_sums(x, cum)
    new_cum = _kept(cum, means[-1].clone()) if keep else None
    steps = _steps(t0, x.shape[0], means.dim(), means.device)
    means.div_(steps)
    folded = means.flatten(0, 1) if means.dim() > 1 else means
    # The running means are not read after f: an in-place f (or one returning its input) may
    # have written them, and the totals may share their memory.
    totals = f(folded).float().view(means.shape)
    totals.mul_(steps)
    out = _differences(totals, prev)  # before prev is written
    new_prev = _kept(prev, totals[-1].clone()) if keep else None
    return out, new_cum, new_prev


def ec_gelu_steps(x: torch.Tensor, cum: Optional[torch.Tensor], prev: Optional[torch.Tensor], t0: int,
                  keep: bool, approximate: bool):
    """EC GELU (erf, or tanh with ``approximate``) on ``x`` [K, n]: see :func:`ec_function_steps`."""
    if x.dim() != 2:
        raise ValueError('ec_gelu_steps: x must have 2 dimensions (steps first)')
    mode = 'tanh' if approximate else 'none'
    return ec_function_steps(lambda a: F.gelu(a, approximate=mode), x, cum, prev, t0, keep)


def ec_softmax_steps(x: torch.Tensor, cum: Optional[torch.Tensor], prev: Optional[torch.Tensor], t0: int,
                     keep: bool):
    """EC softmax over the last dimension of ``x`` [K, rows, cols]: see :func:`ec_function_steps`."""
    if x.dim() != 3:
        raise ValueError('ec_softmax_steps: x must have 3 dimensions (steps first)')
    return ec_function_steps(lambda a: torch.softmax(a, dim=-1), x, cum, prev, t0, keep)


def ec_layer_norm_steps(x: torch.Tensor, cum: Optional[torch.Tensor], prev: Optional[torch.Tensor], t0: int,
                        keep: bool, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float):
    """EC LayerNorm over the last dimension of ``x`` [K, rows, cols]: see :func:`ec_function_steps`."""
    if x.dim() != 3:
        raise ValueError('ec_layer_norm_steps: x must have 3 dimensions (steps first)')
    cols = x.shape[-1]
    return ec_function_steps(lambda a: F.layer_norm(a, (cols,), weight, bias, eps), x, cum, prev, t0, keep)


def ec_mt_steps(kind: str, x: torch.Tensor, cum: Optional[torch.Tensor], prev: Optional[torch.Tensor], t0: int,
                keep: bool, table: torch.Tensor, membrane: Optional[torch.Tensor], *, approximate: bool = False,
                weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, eps: float = 0.0,
                coding: str = 'rate', estimate: Optional[torch.Tensor] = None, sent: bool = False,
                channels: Tuple[int, int, int] = (1, 1, 1)):
    """An EC kernel (``kind`` 'gelu', 'softmax', 'layer_norm') followed by the MT neuron it feeds:
    here the two in turn (``table`` and ``channels`` as :func:`mt_steps` takes them, over one step
    of ``x``). Returns (spikes shaped like ``x``, counts [K], cum, prev, membrane); a differential
    neuron (steps t0+1..t0+K): (outputs, counts, cum, prev, membrane, estimate, the spikes s if
    ``sent`` else None)."""
    channel_table(f'ec_mt_steps({kind})', table, channels)  # before any state is written
    if kind == 'gelu':
        out, cum, prev = ec_gelu_steps(x, cum, prev, t0, keep, approximate)
    elif kind == 'softmax':
        out, cum, prev = ec_softmax_steps(x, cum, prev, t0, keep)
    elif kind == 'layer_norm':
        out, cum, prev = ec_layer_norm_steps(x, cum, prev, t0, keep, weight, bias, eps)
    else:
        raise ValueError(f'ec_mt_steps: unknown kind {kind!r}')
    if coding == 'differential':
        y, counts, membrane, estimate, spikes = mt_steps(out, table, membrane, keep, coding=coding,
                                                         estimate=estimate, t0=t0, sent=sent, channels=channels)
        return y, counts, cum, prev, membrane, estimate, spikes
    spike, counts, membrane = mt_steps(out, table, membrane, keep, coding=coding, channels=channels)
    return spike, counts, cum, prev, membrane
