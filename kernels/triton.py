"""Triton kernels of the toolkit: the GPU twin of :mod:`kernels.native` (the C++ CPU kernels).

Every function here has the name, arguments, return values and state layout of its namesake in
``kernels.native``, so that a module calls ``kernels.mt_steps(...)`` whichever backend
``kernels`` is. What differs is where it runs:

- on CUDA tensors, the kernels are compiled by Triton for the GPU (once per table width,
  variant and block size; the number of steps K is a runtime argument, so a new T does not
  recompile anything);
- on CPU tensors only under Triton's interpreter: ``TRITON_INTERPRET=1`` in the environment
  *before this module is imported* (Triton reads it when ``@triton.jit`` decorates). The
  interpreter runs each program in numpy, one after the other: slow, but the same kernels, which
  is how the tests hold them to the plain references (``tests/test_triton.py``) without a GPU.

:func:`available` says whether either applies. Without Triton installed the module still imports;
:func:`available` is then False and every kernel raises a RuntimeError saying so.

The kernels (each reads its inputs and writes its outputs once; a step loop inside keeps the state
of a tile of elements in registers for all K steps of a chunk; the state is read only when carried
from a previous chunk and written only with ``keep``):

- :func:`mt_steps`: K steps of the multi-threshold neuron (ECMT_SPEC 4) by the table comparison
  of ``kernels.eager.mt_step``: spikes bit for bit those of the literal rule;
- :func:`qkv_mt_steps`: the q, k or v neuron reading its part of a fused qkv output in place
  (contiguous runs of a token's row) and writing head-major spikes;
- :func:`ec_gelu_steps`, :func:`ec_softmax_steps`, :func:`ec_layer_norm_steps`: expectation
  compensation (ECMT_SPEC 5) of GELU (erf or tanh), softmax and LayerNorm over rows;
- :func:`ec_mt_steps`: one of those with the MT neuron it feeds fused after it (the EC output
  never leaves the registers); both paths share the same ``@triton.jit`` helpers and are built
  without floating-point contraction, so the fused spikes equal the unfused ones bit for bit;
- :func:`running_sums`, :func:`scaled_differences`: the bookkeeping of EC products
  (ECMT_SPEC 6);
- :func:`nonzero_counts`: the energy monitor's non-zero counts per row or column (ECMT_SPEC 8).

Per-step non-zero spike counts are summed on the device with int64 atomics (no host
synchronisation). Arithmetic is float32 throughout; fp16 and bf16 inputs are converted on load.
Divisions and square roots use the correctly rounded forms (``div_rn``, ``sqrt_rn``): Triton's
plain ``/`` is approximate on NVIDIA GPUs.
"""
from __future__ import annotations

import math
import os
from typing import Optional, Tuple

import torch

from kernels import NeuronCall, channel_table, neuron_call, parts_mt_steps

try:
    import triton
    import triton.language as tl
except ImportError:  # the module stays importable; available() is False
    triton = None
    tl = None

#: EC kinds with a kernel of their own (any other function runs through kernels.eager).
EC_KINDS = ('gelu', 'softmax', 'layer_norm')
#: Fused kernels here: an EC function with the MT neuron it feeds, and q/k/v on one qkv output.
FUSES = True
#: Floating-point inputs the kernels load (and convert to float32).
INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
#: Longest row of the softmax and LayerNorm kernels (a row is one program's tile).
MAX_ROW = 1 << 16


def _interpreting() -> bool:
    if triton is None:
        return False
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:  # pragma: no cover - an unusual Triton
        return os.environ.get('TRITON_INTERPRET', '0') == '1'
    return isinstance(_mt_kernel, InterpretedFunction)


def available() -> bool:
    """Whether these kernels can run here: Triton is importable and either a CUDA device is
    present or this module was imported under the interpreter (``TRITON_INTERPRET=1``)."""
    return triton is not None and (INTERPRETED or torch.cuda.is_available())


def _require(*tensors: Optional[torch.Tensor]) -> None:
    if triton is None:
        raise RuntimeError('kernels.triton: Triton is not installed (pip install triton); use the native or '
                           'the eager backend')
    for t in tensors:
        if t is not None and t.device.type != 'cuda' and not INTERPRETED:
            raise RuntimeError(f'kernels.triton: a tensor on {t.device} needs Triton\'s interpreter: set '
                               'TRITON_INTERPRET=1 before importing kernels.triton (or move it to a CUDA device)')


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def _block(n: int) -> int:
    """Elements per program of the element-wise kernels: a GPU tile, or under the interpreter
    (one program at a time, a numpy call per operation) as few programs as possible."""
    if INTERPRETED:
        return max(16, min(_next_power_of_2(n), 1 << 16))
    return 1024


def _warps(elements: int) -> int:
    return 4 if elements <= 1024 else 8 if elements <= 4096 else 16


# Launch options shared by every kernel: no fused multiply-adds, so that the EC kernels and their
# fused twins (and the CPU interpreter) perform the same roundings.
_OPTIONS = {'enable_fp_fusion': False}


if triton is not None:
    @triton.jit
    def _fire(u, table, W: tl.constexpr):
        """The spike for membrane u (input of the step already added): the last level whose
        threshold u reaches on each side (NaN thresholds are never reached), up minus down."""
        negated = -u
        up = tl.zeros_like(u)
        down = tl.zeros_like(u)
        for j in tl.static_range(W):
            up = tl.where(u >= tl.load(table + j), tl.load(table + W + j), up)
            down = tl.where(negated >= tl.load(table + 2 * W + j), tl.load(table + 3 * W + j), down)
        return up - down

    @triton.jit
    def _levels_at(table, index, inner, groups, cwidth, W: tl.constexpr, PER_CHANNEL: tl.constexpr):
        """Where the levels of the elements at row-major ``index`` (of one step) lie in a
        [C, 4, W] table: with PER_CHANNEL, each element's channel block, channel
        ((index // inner) % groups) * cwidth + index % cwidth (in range for any index, so masked
        lanes read the table too); otherwise the one channel's block."""
        if PER_CHANNEL:
            return table + (((index // inner) % groups) * cwidth + index % cwidth) * (4 * W)
        else:
            return table

    @triton.jit
    def _neuron_step(v, d, mask, table, spike_ptrs, count_ptr, W: tl.constexpr):
        """One MT step of a tile fed d: writes the spikes, adds their non-zero count; returns the
        new membrane."""
        u = v + d
        s = _fire(u, table, W)
        tl.store(spike_ptrs, s, mask=mask)
        tl.atomic_add(count_ptr, tl.sum((mask & (s != 0.0)).to(tl.int32)).to(tl.int64), sem='relaxed')
        return u - s

    @triton.jit
    def _differential_step(v, r, d, mask, table, out_ptrs, sent_ptrs, count_ptr, step, SENT: tl.constexpr,
                           W: tl.constexpr):
        """One step (number ``step``) of the differential neuron (ECMT_SPEC 14) fed d, in the
        reference's float order: u = (v + d) - r; s fires on u; v = u - s; out = r + s;
        r = r + s / step. Writes the outputs (and with SENT the spikes s), adds the non-zero count
        of s; returns (membrane, estimate)."""
        u = (v + d) - r
        s = _fire(u, table, W)
        tl.store(out_ptrs, r + s, mask=mask)
        if SENT:
            tl.store(sent_ptrs, s, mask=mask)
        tl.atomic_add(count_ptr, tl.sum((mask & (s != 0.0)).to(tl.int32)).to(tl.int64), sem='relaxed')
        return u - s, r + tl.math.div_rn(s, step + tl.zeros_like(s))

    @triton.jit
    def _neuron_start(membrane, estimate, at, mask, FRESH: tl.constexpr, DIFFERENTIAL: tl.constexpr):
        """A tile's membrane and (DIFFERENTIAL) estimate before a chunk's first step, at offsets
        ``at`` of the states: zero if FRESH, else read. Without DIFFERENTIAL the estimate returned
        is a placeholder that nothing reads."""
        if FRESH:
            v = tl.zeros(at.shape, dtype=tl.float32)
        else:
            v = tl.load(membrane + at, mask=mask, other=0.0)
        r = v
        if DIFFERENTIAL:
            if FRESH:
                r = tl.zeros(at.shape, dtype=tl.float32)
            else:
                r = tl.load(estimate + at, mask=mask, other=0.0)
        return v, r

    @triton.jit
    def _mt_step(v, r, d, mask, table, out_ptrs, sent_ptrs, count_ptr, step, DIFFERENTIAL: tl.constexpr,
                 SENT: tl.constexpr, W: tl.constexpr):
        """One step of the neuron of either coding (:func:`_neuron_step`, :func:`_differential_step`):
        returns (membrane, estimate)."""
        if DIFFERENTIAL:
            v, r = _differential_step(v, r, d, mask, table, out_ptrs, sent_ptrs, count_ptr, step, SENT, W)
        else:
            v = _neuron_step(v, d, mask, table, out_ptrs, count_ptr, W)
        return v, r

    @triton.jit
    def _neuron_keep(membrane, estimate, at, mask, v, r, KEEP: tl.constexpr, DIFFERENTIAL: tl.constexpr):
        """With KEEP, a tile's membrane and (DIFFERENTIAL) estimate after the chunk, written."""
        if KEEP:
            tl.store(membrane + at, v, mask=mask)
            if DIFFERENTIAL:
                tl.store(estimate + at, r, mask=mask)

    @triton.jit
    def _neuron_chunk(x_ptrs, x_step, at, mask, table, membrane, spike, counts, K, n, estimate, sent, t0,
                      FRESH: tl.constexpr, KEEP: tl.constexpr, W: tl.constexpr, DIFFERENTIAL: tl.constexpr,
                      SENT: tl.constexpr):
        """K steps of the neuron on a tile whose inputs lie at ``x_ptrs`` (``x_step`` apart from
        step to step) and whose states and outputs ([K, n]) at offsets ``at``. DIFFERENTIAL: the
        estimates are carried as the membrane is, ``spike`` receives the outputs r + s and ``sent``
        (SENT) the spikes s; steps t0+1..t0+K."""
        v, r = _neuron_start(membrane, estimate, at, mask, FRESH, DIFFERENTIAL)
        spike_ptrs = spike + at
        sent_ptrs = sent + at
        for k in range(K):
            d = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            v, r = _mt_step(v, r, d, mask, table, spike_ptrs, sent_ptrs, counts + k, t0 + (k + 1), DIFFERENTIAL,
                            SENT, W)
            x_ptrs += x_step
            spike_ptrs += n
            sent_ptrs += n
        _neuron_keep(membrane, estimate, at, mask, v, r, KEEP, DIFFERENTIAL)

    @triton.jit
    def _mt_kernel(x, table, membrane, spike, counts, K, n, estimate, sent, t0, inner, groups, cwidth,
                   FRESH: tl.constexpr, KEEP: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr,
                   DIFFERENTIAL: tl.constexpr, SENT: tl.constexpr, PER_CHANNEL: tl.constexpr):
        # PER_CHANNEL: each element's thresholds are its channel's (_levels_at).
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        table = _levels_at(table, offs, inner, groups, cwidth, W, PER_CHANNEL)
        _neuron_chunk(x + offs, n, offs, mask, table, membrane, spike, counts, K, n, estimate, sent, t0, FRESH, KEEP,
                      W, DIFFERENTIAL, SENT)

    @triton.jit
    def _qkv_kernel(qkv, table, membrane, spike, counts, part, K, N, H, D, n, estimate, sent, t0, inner, groups,
                    cwidth, FRESH: tl.constexpr, KEEP: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr,
                    DIFFERENTIAL: tl.constexpr, SENT: tl.constexpr, PER_CHANNEL: tl.constexpr):
        # Program i: elements [i*BLOCK, (i+1)*BLOCK) of the neuron's [B, N, H*D] input, which lie
        # in the fused rows at part*H*D (contiguous runs of H*D); its spikes and membrane are
        # [B, H, N, D].
        e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = e < n
        width = H * D
        row = e // width
        col = e % width
        head = col // D
        token = row % N
        source = row * (3 * width) + part * width + col
        target = (((row // N) * H + head) * N + token) * D + col % D
        table = _levels_at(table, target, inner, groups, cwidth, W, PER_CHANNEL)  # channels of the output
        _neuron_chunk(qkv + source, 3 * n, target, mask, table, membrane, spike, counts, K, n, estimate, sent, t0,
                      FRESH, KEEP, W, DIFFERENTIAL, SENT)

    @triton.jit
    def _gelu(a, APPROXIMATE: tl.constexpr):
        if APPROXIMATE:
            z = 0.7978845608028654 * (a + 0.044715 * a * a * a)  # sqrt(2/pi) (a + c a^3)
            # tanh z = 1 - 2 / (e^2z + 1); the clamp keeps e^2z finite (tanh is 1 there anyway)
            tanh_z = 1.0 - tl.math.div_rn(tl.full(z.shape, 2.0, tl.float32),
                                          tl.exp(tl.minimum(2.0 * z, 88.0)) + 1.0)
            return a * 0.5 * (1.0 + tanh_z)
        else:
            return a * 0.5 * (1.0 + tl.math.erf(a * 0.7071067811865476))

    @triton.jit
    def _ec_start(cum, prev, at, mask, FRESH: tl.constexpr):
        """A tile's EC running sum and last total before a chunk: zero if FRESH, else read."""
        if FRESH:
            c = tl.zeros(at.shape, dtype=tl.float32)
            p = tl.zeros(at.shape, dtype=tl.float32)
        else:
            c = tl.load(cum + at, mask=mask, other=0.0)
            p = tl.load(prev + at, mask=mask, other=0.0)
        return c, p

    @triton.jit
    def _ec_output(v, r, d, mask, table, out_ptrs, sent_ptrs, count_ptr, step, FUSED: tl.constexpr,
                   DIFFERENTIAL: tl.constexpr, SENT: tl.constexpr, W: tl.constexpr):
        """A step's EC output d: written, or (FUSED) fed to the neuron, whose outputs are written
        instead. Returns the neuron's (membrane, estimate)."""
        if FUSED:
            v, r = _mt_step(v, r, d, mask, table, out_ptrs, sent_ptrs, count_ptr, step, DIFFERENTIAL, SENT, W)
        else:
            tl.store(out_ptrs, d, mask=mask)
        return v, r

    @triton.jit
    def _ec_keep(cum, prev, membrane, estimate, at, mask, c, p, v, r, KEEP: tl.constexpr, FUSED: tl.constexpr,
                 DIFFERENTIAL: tl.constexpr):
        """With KEEP, a tile's EC state after the chunk, and (FUSED) its neuron's, written."""
        if KEEP:
            tl.store(cum + at, c, mask=mask)
            tl.store(prev + at, p, mask=mask)
        if FUSED:
            _neuron_keep(membrane, estimate, at, mask, v, r, KEEP, DIFFERENTIAL)

    @triton.jit
    def _ec_gelu_kernel(x, cum, prev, out, t0, K, n, table, membrane, counts, estimate, sent, inner, groups, cwidth,
                        FRESH: tl.constexpr, KEEP: tl.constexpr, APPROXIMATE: tl.constexpr, FUSED: tl.constexpr,
                        NEURON_FRESH: tl.constexpr, W: tl.constexpr, BLOCK: tl.constexpr,
                        DIFFERENTIAL: tl.constexpr, SENT: tl.constexpr, PER_CHANNEL: tl.constexpr):
        # Per element and step s = t0+k+1: A += x; total = s * gelu(A / s); out = total - P;
        # P = total. FUSED: `out` receives the spikes of the MT neuron fed `total - P` instead.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        c, p = _ec_start(cum, prev, offs, mask, FRESH)
        # Unfused, the neuron's state is zeros that nothing reads (NEURON_FRESH, one channel).
        table = _levels_at(table, offs, inner, groups, cwidth, W, PER_CHANNEL)
        v, r = _neuron_start(membrane, estimate, offs, mask, NEURON_FRESH, DIFFERENTIAL)
        x_ptrs = x + offs
        out_ptrs = out + offs
        sent_ptrs = sent + offs
        for k in range(K):
            steps = t0 + (k + 1)
            c = c + tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            total = _gelu(tl.math.div_rn(c, steps + tl.zeros_like(c)), APPROXIMATE) * steps
            d = total - p
            p = total
            v, r = _ec_output(v, r, d, mask, table, out_ptrs, sent_ptrs, counts + k, steps, FUSED, DIFFERENTIAL, SENT,
                              W)
            x_ptrs += n
            out_ptrs += n
            sent_ptrs += n
        _ec_keep(cum, prev, membrane, estimate, offs, mask, c, p, v, r, KEEP, FUSED, DIFFERENTIAL)

    @triton.jit
    def _ec_rows_kernel(x, cum, prev, out, t0, K, rows, cols, weight, bias, eps, table, membrane, counts,
                        estimate, sent, inner, groups, cwidth, LAYER_NORM: tl.constexpr, HAS_WEIGHT: tl.constexpr,
                        HAS_BIAS: tl.constexpr,
                        FRESH: tl.constexpr, KEEP: tl.constexpr, FUSED: tl.constexpr, NEURON_FRESH: tl.constexpr,
                        W: tl.constexpr, ROWS: tl.constexpr, BLOCK_C: tl.constexpr, DIFFERENTIAL: tl.constexpr,
                        SENT: tl.constexpr, PER_CHANNEL: tl.constexpr):
        # ROWS whole rows per program. Per step s: A += x; total = s * f(A / s) over each row
        # (f: softmax, or LayerNorm with biased variance, then weight and bias); out = total - P;
        # P = total. FUSED as in _ec_gelu_kernel.
        row = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)[:, None]
        col = tl.arange(0, BLOCK_C)[None, :]
        in_row = col < cols
        mask = (row < rows) & in_row
        offs = row * cols + col
        n = rows * cols
        c, p = _ec_start(cum, prev, offs, mask, FRESH)
        # Unfused, the neuron's state is zeros that nothing reads (NEURON_FRESH, one channel).
        table = _levels_at(table, offs, inner, groups, cwidth, W, PER_CHANNEL)
        v, r = _neuron_start(membrane, estimate, offs, mask, NEURON_FRESH, DIFFERENTIAL)
        if LAYER_NORM:
            if HAS_WEIGHT:
                w = tl.load(weight + col, mask=in_row, other=0.0)
            if HAS_BIAS:
                b = tl.load(bias + col, mask=in_row, other=0.0)
        width = tl.zeros([ROWS], dtype=tl.float32) + cols
        x_ptrs = x + offs
        out_ptrs = out + offs
        sent_ptrs = sent + offs
        for k in range(K):
            steps = t0 + (k + 1)
            c = c + tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            a = tl.math.div_rn(c, steps + tl.zeros_like(c))
            if LAYER_NORM:
                mean = tl.math.div_rn(tl.sum(tl.where(in_row, a, 0.0), axis=1), width)
                centred = tl.where(in_row, a - mean[:, None], 0.0)
                variance = tl.math.div_rn(tl.sum(centred * centred, axis=1), width)
                rstd = tl.math.div_rn(tl.full([ROWS], 1.0, tl.float32), tl.math.sqrt_rn(variance + eps))
                y = centred * rstd[:, None]
                if HAS_WEIGHT:
                    y = y * w
                if HAS_BIAS:
                    y = y + b
                total = y * steps
            else:
                a = tl.where(in_row, a, float('-inf'))
                e = tl.exp(a - tl.max(a, axis=1)[:, None])
                total = e * tl.math.div_rn(steps + tl.zeros([ROWS], dtype=tl.float32), tl.sum(e, axis=1))[:, None]
            d = total - p
            p = total
            v, r = _ec_output(v, r, d, mask, table, out_ptrs, sent_ptrs, counts + k, steps, FUSED, DIFFERENTIAL, SENT,
                              W)
            x_ptrs += n
            out_ptrs += n
            sent_ptrs += n
        _ec_keep(cum, prev, membrane, estimate, offs, mask, c, p, v, r, KEEP, FUSED, DIFFERENTIAL)

    @triton.jit
    def _running_sums_kernel(x, carried, sums, K, n, CARRIED: tl.constexpr, BLOCK: tl.constexpr):
        # The first step is copied (not added to zero: a -0 stays -0, as torch's copy keeps it).
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        x_ptrs = x + offs
        sum_ptrs = sums + offs
        c = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        if CARRIED:
            c = tl.load(carried + offs, mask=mask, other=0.0) + c
        tl.store(sum_ptrs, c, mask=mask)
        for _ in range(1, K):
            x_ptrs += n
            sum_ptrs += n
            c = c + tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
            tl.store(sum_ptrs, c, mask=mask)

    @triton.jit
    def _scaled_differences_kernel(totals, prev, last, t0, scale, K, n, HAS_PREV: tl.constexpr,
                                   KEEP: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        ptrs = totals + offs
        # The first step apart: without prev it is the total itself (total - 0 would turn a -0
        # into +0).
        total = tl.load(ptrs, mask=mask, other=0.0)
        total = tl.math.div_rn(total, t0 + 1 + tl.zeros_like(total))
        if HAS_PREV:
            step = total - tl.load(prev + offs, mask=mask, other=0.0)
        else:
            step = total
        tl.store(ptrs, step * scale, mask=mask)
        p = total
        for k in range(1, K):
            ptrs += n
            total = tl.math.div_rn(tl.load(ptrs, mask=mask, other=0.0), t0 + (k + 1) + tl.zeros_like(p))
            tl.store(ptrs, (total - p) * scale, mask=mask)
            p = total
        if KEEP:
            tl.store(last + offs, p, mask=mask)

    @triton.jit
    def _nonzero_counts_kernel(x, out, rows, count, length, stride_outer, stride_count, stride_along,
                               BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr):
        # out[r] for r = o * count + i: the non-zero elements among x[o, i, j] for j < length
        # (strides in elements). A program takes BLOCK_I consecutive (o, i) rows, whatever o: a
        # short row (a head's tokens) does not make a program of its own.
        r = tl.program_id(0).to(tl.int64) * BLOCK_I + tl.arange(0, BLOCK_I)
        j = tl.arange(0, BLOCK_J)
        base = x + (r // count) * stride_outer + (r % count) * stride_count
        total = tl.zeros([BLOCK_I], dtype=tl.int32)
        for start in range(0, length, BLOCK_J):
            along = start + j
            m = (r[:, None] < rows) & (along[None, :] < length)
            values = tl.load(base[:, None] + along[None, :].to(tl.int64) * stride_along, mask=m, other=0.0)
            total += tl.sum((values != 0).to(tl.int32), axis=1)
        tl.store(out + r, total.to(tl.float32), mask=r < rows)

    INTERPRETED = _interpreting()
else:
    INTERPRETED = False


# ---- argument checks and state ------------------------------------------------------------------
def _state(state: Optional[torch.Tensor], n: int, keep: bool, device: torch.device
           ) -> Tuple[Optional[torch.Tensor], bool]:
    """(the state tensor the kernel reads and/or writes, whether it starts at zero), as
    kernels.native keeps it; a fresh state that is kept is allocated here (the kernel writes it)."""
    if state is not None:
        if (state.numel() != n or not state.is_contiguous() or state.dtype != torch.float32
                or state.device != device):
            raise ValueError('the state must be contiguous float32 with one element per input element of a step, '
                             'on the input\'s device')
        return state, False
    return (torch.empty(n, dtype=torch.float32, device=device) if keep else None), True




def _check_input(name: str, x: torch.Tensor) -> None:
    if x.dtype not in INPUT_DTYPES:
        raise ValueError(f'{name}: x must be float32, float16 or bfloat16, not {x.dtype}')


def _step_elements(x: torch.Tensor) -> int:
    n = 1
    for size in x.shape[1:]:
        n *= size
    return n


# ---- the neuron ---------------------------------------------------------------------------------
def _neuron_call(name: str, x: torch.Tensor, table: torch.Tensor, channels, coding: str,
                 membrane: Optional[torch.Tensor], estimate: Optional[torch.Tensor], sent: bool, keep: bool,
                 shape) -> NeuronCall:
    """``kernels.neuron_call`` for a neuron kernel reading ``x`` and writing outputs of ``shape``
    [K, ...] on its device: the table after ``kernels.channel_table``'s checks and the kernels' own,
    the counts zero (the kernels add to them)."""
    table, channels = channel_table(name, table, channels)
    if not table.is_contiguous() or table.dtype != torch.float32:
        raise ValueError(f'{name}: table must be a contiguous float32 [C, 4, width] tensor')
    if table.device != x.device:
        raise ValueError(f'{name}: table must be on the input\'s device ({x.device})')
    _require(x)

    def state(given, n, keep):
        return _state(given, n, keep, x.device)
    counts = torch.zeros(shape[0], dtype=torch.int64, device=x.device)
    return neuron_call(name, table, channels, coding, membrane, estimate, sent, keep, shape, math.prod(shape[1:]),
                       state, counts)


def _neuron_arguments(call: NeuronCall, spare: torch.Tensor) -> dict:
    """The neuron's arguments of every kernel that runs one (``spare``: a tensor for the pointers
    that a variant does not use)."""
    inner, groups, cwidth = call.channels
    return dict(table=call.table, membrane=spare if call.membrane is None else call.membrane, counts=call.counts,
                estimate=spare if call.estimate is None else call.estimate,
                sent=spare if call.sent is None else call.sent, inner=inner, groups=groups, cwidth=cwidth,
                KEEP=call.keep, W=call.table.shape[2], DIFFERENTIAL=call.differential, SENT=call.sent is not None,
                PER_CHANNEL=call.table.shape[0] > 1)


def _launch_neuron(kernel, x: torch.Tensor, call: NeuronCall, t0: int, **geometry) -> None:
    """One launch of a neuron kernel (:func:`_mt_kernel`, :func:`_qkv_kernel`: ``geometry``, the
    arguments of its own) over the n elements of a step, or the state at rest for no step."""
    steps, n = call.spike.shape[0], _step_elements(call.spike)
    if n and steps:
        block = _block(n)
        kernel[(triton.cdiv(n, block),)](x, spike=call.spike, K=steps, n=n, t0=float(t0), FRESH=call.fresh,
                                         BLOCK=block, num_warps=4, **geometry,
                                         **_neuron_arguments(call, call.spike), **_OPTIONS)
    else:
        call.at_rest()


def mt_steps(x: torch.Tensor, table: torch.Tensor, membrane: Optional[torch.Tensor], keep: bool, *,
             coding: str = 'rate', estimate: Optional[torch.Tensor] = None, t0: int = 0, sent: bool = False,
             channels: Tuple[int, int, int] = (1, 1, 1)):
    """K steps of the MT neuron (``kernels.eager.mt_step``) on ``x`` [K, ...] (float32, fp16
    or bf16; a non-contiguous x is copied first). ``table``: ``kernels.level_table`` [C, 4, width]
    (or [4, width]: one channel) and ``channels=(inner, groups, width)``, the element at row-major
    index i of a step using channel ((i // inner) % groups) * width + i % width
    (``kernels.channel_map``; one channel compiles the kernel without the per-element lookup).
    ``membrane``: the flat state carried from the previous chunk, or None on a batch's first chunk
    (it starts at zero and is not read). With ``keep`` the membrane after the K steps is written
    (into ``membrane``, or a new tensor) and returned; without, nothing is written and None is
    returned. Returns (spikes [K, ...] contiguous float32, non-zero spikes per step [K] int64,
    membrane or None).

    ``coding='differential'`` (ECMT_SPEC 14): the flat ``estimate`` is carried with the membrane
    (both None on a batch's first chunk), the steps are t0+1..t0+K, and the result is (outputs
    r + s, non-zero spikes s per step [K], membrane, estimate (None without ``keep``), the spikes s
    [K, ...] if ``sent`` else None)."""
    if x.dim() < 1:
        raise ValueError('mt_steps: x must have at least one dimension (steps first)')
    _check_input('mt_steps', x)
    call = _neuron_call('mt_steps', x, table, channels, coding, membrane, estimate, sent, keep, x.shape)
    _launch_neuron(_mt_kernel, x.contiguous(), call, t0)
    return call.result()


def qkv_mt_steps(qkv: torch.Tensor, part: int, heads: int, table: torch.Tensor,
                 membrane: Optional[torch.Tensor], keep: bool, *, coding: str = 'rate',
                 estimate: Optional[torch.Tensor] = None, t0: int = 0, sent: bool = False,
                 channels: Tuple[int, int, int] = (1, 1, 1)):
    """K steps of the q (``part`` 0), k (1) or v (2) MT neuron of an attention on its part of the
    fused qkv linear output ``qkv``: contiguous [K, B, N, 3 * heads * D] (float32, fp16 or bf16),
    read in place (contiguous runs of heads * D per token), the spikes written head-major. The
    same spikes, counts and state as :func:`mt_steps` on ``qkv.view(K, B, N, 3, heads, D).permute(3,
    0, 1, 4, 2, 5)[part]``; ``channels`` over one step of that view, [B, heads, N, D].
    ``membrane``: the flat [B, heads, N, D] state (None on a batch's first chunk). Returns (spikes
    [K, B, heads, N, D] contiguous float32, non-zero spikes per step [K] int64, membrane or None
    without ``keep``); differential coding as :func:`mt_steps`."""
    if (qkv.dim() != 4 or not qkv.is_contiguous() or qkv.dtype not in INPUT_DTYPES or heads < 1
            or qkv.shape[-1] % (3 * heads)):
        raise ValueError('qkv_mt_steps: qkv must be a contiguous float32 (or fp16/bf16) [K, B, N, 3 * heads * D] '
                         'tensor')
    if part not in (0, 1, 2):
        raise ValueError(f'qkv_mt_steps: part must be 0 (q), 1 (k) or 2 (v), got {part}')
    K, B, N, _ = qkv.shape
    D = qkv.shape[-1] // (3 * heads)
    call = _neuron_call('qkv_mt_steps', qkv, table, channels, coding, membrane, estimate, sent, keep,
                        (K, B, heads, N, D))
    _launch_neuron(_qkv_kernel, qkv, call, t0, part=part, N=N, H=heads, D=D)
    return call.result()


def qkv_parts_mt_steps(qkv: torch.Tensor, heads: int, tables, membranes, keep: bool, *, channels=(1, 1, 1),
                       **coding):
    """The q, k and v neurons on one fused qkv output: :func:`qkv_mt_steps` per part
    (``kernels.parts_mt_steps``; on a GPU each part is its own launch); ``channels``: one map for
    the three parts, or one per part."""
    return parts_mt_steps(qkv_mt_steps, qkv, heads, tables, membranes, keep, channels=channels, **coding)

# ---- expectation compensation -------------------------------------------------------------------
def _ec_arguments(name: str, x: torch.Tensor, cum, prev, keep: bool, rank: int):
    if x.dim() != rank:
        raise ValueError(f'{name}: x must have {rank} dimensions (steps first)')
    _check_input(name, x)
    if (cum is None) != (prev is None):
        raise ValueError(f'{name}: the running sum and the last total are carried together')
    _require(x)
    x = x.contiguous()
    n = _step_elements(x)
    cum, fresh = _state(cum, n, keep, x.device)
    prev, _ = _state(prev, n, keep, x.device)
    return x, cum, prev, fresh


def _check_affine(name: str, x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
    for p in (weight, bias):
        if p is not None and (p.shape != (x.shape[-1],) or not p.is_contiguous() or p.dtype != torch.float32
                              or p.device != x.device):
            raise ValueError(f'{name}: weight and bias must be contiguous float32 of cols elements on x\'s device')


def _launch_ec(kind: str, x, cum, prev, fresh, keep, t0, out, neuron: Optional[NeuronCall], *, approximate=False,
               weight=None, bias=None, eps=0.0):
    """Run one EC kernel over the chunk ``x``; ``neuron`` fuses the MT neuron after it (``out``
    then receives its outputs)."""
    steps = x.shape[0]
    if steps == 0 or x[0].numel() == 0:
        if keep and fresh:
            cum.zero_()
            prev.zero_()
        if neuron is not None:
            neuron.at_rest()
        return
    fused = neuron is not None
    if fused:
        neuron_arguments = _neuron_arguments(neuron, x)
    else:  # the neuron's arguments, unused
        neuron_arguments = dict(table=x, membrane=x, counts=x, estimate=x, sent=x, inner=1, groups=1, cwidth=1,
                                KEEP=bool(keep), W=1, DIFFERENTIAL=False, SENT=False, PER_CHANNEL=False)
    state = dict(FRESH=fresh, FUSED=fused, NEURON_FRESH=neuron.fresh if fused else True, **neuron_arguments)
    cum_arg = x if cum is None else cum
    prev_arg = x if prev is None else prev
    if kind == 'gelu':
        n = x.shape[1]
        block = _block(n)
        _ec_gelu_kernel[(triton.cdiv(n, block),)](x, cum_arg, prev_arg, out, float(t0), steps, n,
                                                 APPROXIMATE=bool(approximate), BLOCK=block, num_warps=4, **state,
                                                 **_OPTIONS)
        return
    rows, cols = x.shape[1], x.shape[2]
    if cols > MAX_ROW:
        raise ValueError(f'{kind}: rows of more than {MAX_ROW} elements are not supported by the Triton kernels '
                         '(a row lives in one program\'s registers)')
    block_c = _next_power_of_2(cols)
    tile = (1 << 16) if INTERPRETED else 2048
    rows_per_program = max(1, min(_next_power_of_2(rows), tile // block_c))
    _ec_rows_kernel[(triton.cdiv(rows, rows_per_program),)](
        x, cum_arg, prev_arg, out, float(t0), steps, rows, cols, x if weight is None else weight,
        x if bias is None else bias, float(eps), LAYER_NORM=kind == 'layer_norm',
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, ROWS=rows_per_program, BLOCK_C=block_c,
        num_warps=_warps(rows_per_program * block_c), **state, **_OPTIONS)


def ec_gelu_steps(x: torch.Tensor, cum: Optional[torch.Tensor], prev: Optional[torch.Tensor], t0: int,
                  keep: bool, approximate: bool
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """EC GELU steps t0+1..t0+K (``trans_utils.exp_comp_neuron``) on ``x`` [K, n]: with the
    running sum A (``cum``) and the last total P (``prev``) carried from the previous chunk (None
    on a batch's first chunk: zero), each step gives ``s * gelu(A_s / s) - P_(s-1)`` (erf GELU, or
    the tanh form with ``approximate``). Returns (out [K, n] float32, cum, prev), the state after
    the chunk if ``keep``, else (out, None, None)."""
    x, cum, prev, fresh = _ec_arguments('ec_gelu_steps', x, cum, prev, keep, 2)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _launch_ec('gelu', x, cum, prev, fresh, keep, t0, out, None, approximate=approximate)
    return (out, cum, prev) if keep else (out, None, None)


def ec_softmax_steps(x: torch.Tensor, cum: Optional[torch.Tensor], prev: Optional[torch.Tensor], t0: int,
                     keep: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """EC softmax steps over the last dimension of ``x`` [K, rows, cols]; state and result as
    :func:`ec_gelu_steps` (the state holds rows x cols elements)."""
    x, cum, prev, fresh = _ec_arguments('ec_softmax_steps', x, cum, prev, keep, 3)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _launch_ec('softmax', x, cum, prev, fresh, keep, t0, out, None)
    return (out, cum, prev) if keep else (out, None, None)


def ec_layer_norm_steps(x: torch.Tensor, cum: Optional[torch.Tensor], prev: Optional[torch.Tensor], t0: int,
                        keep: bool, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """EC LayerNorm steps over the last dimension of ``x`` [K, rows, cols] (biased variance, then
    ``weight`` and ``bias`` of cols elements if given); state and result as :func:`ec_softmax_steps`."""
    _check_affine('ec_layer_norm_steps', x, weight, bias)
    x, cum, prev, fresh = _ec_arguments('ec_layer_norm_steps', x, cum, prev, keep, 3)
    out = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    _launch_ec('layer_norm', x, cum, prev, fresh, keep, t0, out, None, weight=weight, bias=bias, eps=eps)
    return (out, cum, prev) if keep else (out, None, None)


def ec_mt_steps(kind: str, x: torch.Tensor, cum: Optional[torch.Tensor], prev: Optional[torch.Tensor], t0: int,
                keep: bool, table: torch.Tensor, membrane: Optional[torch.Tensor], *, approximate: bool = False,
                weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, eps: float = 0.0,
                coding: str = 'rate', estimate: Optional[torch.Tensor] = None, sent: bool = False,
                channels: Tuple[int, int, int] = (1, 1, 1)):
    """An EC kernel (``kind`` 'gelu', 'softmax' or 'layer_norm', with the arguments and state of
    :func:`ec_gelu_steps` / :func:`ec_softmax_steps` / :func:`ec_layer_norm_steps`) with the MT
    neuron it feeds fused after it: the EC output never leaves the registers; the neuron's
    ``table``, ``channels`` (over one step of ``x``) and ``membrane`` are those of :func:`mt_steps`
    (None on a batch's first chunk). The same spikes as :func:`mt_steps` fed the EC kernel's
    output, bit for bit. Returns (spikes shaped like ``x``, non-zero spikes per step [K] int64,
    cum, prev, membrane), the states None unless ``keep``; with ``coding='differential'`` (the
    neuron's steps are the EC kernel's): (outputs r + s, counts of s, cum, prev, membrane,
    estimate, the spikes s if ``sent`` else None)."""
    if kind not in ('gelu', 'softmax', 'layer_norm'):
        raise ValueError(f'ec_mt_steps: unknown kind {kind!r} (gelu, softmax or layer_norm)')
    name = f'ec_mt_steps({kind})'
    if kind == 'layer_norm':
        _check_affine(name, x, weight, bias)
    x, cum, prev, fresh = _ec_arguments(name, x, cum, prev, keep, 2 if kind == 'gelu' else 3)
    call = _neuron_call(name, x, table, channels, coding, membrane, estimate, sent, keep, x.shape)
    _launch_ec(kind, x, cum, prev, fresh, keep, t0, call.spike, call, approximate=approximate, weight=weight,
               bias=bias, eps=eps)
    return call.result(cum, prev) if keep else call.result(None, None)


# ---- EC products and the energy monitor -----------------------------------------------------------
def running_sums(x: torch.Tensor, carried: Optional[torch.Tensor]) -> torch.Tensor:
    """Running sums along time of ``x`` [K, ...] (float32, fp16 or bf16, any strides: a
    non-contiguous x is copied first) from ``carried`` (the sums after the previous chunk,
    contiguous float32, one element per element of a step; None: from zero, the first step copied),
    added one step at a time in float32 so that every chunking gives the same sums. Returns the
    sums, [K, ...] contiguous float32."""
    if x.dim() < 1:
        raise ValueError('running_sums: x must have at least one dimension (steps first)')
    _check_input('running_sums', x)
    n = _step_elements(x)
    if carried is not None:
        _state(carried, n, False, x.device)
    _require(x)
    x = x.contiguous()
    sums = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    if n and x.shape[0]:
        block = _block(n)
        _running_sums_kernel[(triton.cdiv(n, block),)](x, x if carried is None else carried, sums, x.shape[0], n,
                                                       CARRIED=carried is not None, BLOCK=block, num_warps=4,
                                                       **_OPTIONS)
    return sums


def scaled_differences(totals: torch.Tensor, prev: Optional[torch.Tensor], t0: int, keep: bool,
                       scale: float = 1.0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """In place on ``totals`` [K, ...] (contiguous float32, products of running sums for steps
    t0+1..t0+K): each becomes ``total_t - total_(t-1)`` with ``total_t = totals[t] / t``, the first
    less ``prev`` (the last total of the previous chunk; None: nothing), then times ``scale`` (in
    float32, after the difference). Returns (totals, the chunk's last total shaped like one step,
    or None without ``keep``)."""
    if not totals.is_contiguous() or totals.dtype != torch.float32 or totals.dim() < 1:
        raise ValueError('scaled_differences: totals must be contiguous float32 [K, ...]')
    n = _step_elements(totals)
    if prev is not None:
        _state(prev, n, False, totals.device)
    _require(totals)
    last = torch.empty(totals.shape[1:], dtype=torch.float32, device=totals.device) if keep else None
    steps = totals.shape[0]
    if n and steps:
        block = _block(n)
        _scaled_differences_kernel[(triton.cdiv(n, block),)](
            totals, totals if prev is None else prev, totals if last is None else last, float(t0), float(scale),
            steps, n, HAS_PREV=prev is not None, KEEP=bool(keep), BLOCK=block, num_warps=4, **_OPTIONS)
    elif keep and n:
        last.copy_(prev.view(last.shape) if prev is not None else torch.zeros_like(last))
    return totals, last


def nonzero_counts(x: torch.Tensor, dim: int) -> torch.Tensor:
    """The non-zero elements of ``x`` [..., R, C] (float32, fp16 or bf16) counted along ``dim``
    (-2: per column, [..., C]; -1: per row, [..., R]), float32 (exact integers), in one read of x
    whatever the strides of its last two dimensions (leading dimensions that do not merge into
    one stride are copied first). Never None."""
    if x.dim() < 2 or dim not in (-1, -2) or x.dtype not in INPUT_DTYPES:
        raise ValueError('nonzero_counts: x must be a float tensor with >= 2 dimensions, dim -1 or -2')
    _require(x)
    lead, R, C = x.shape[:-2], x.shape[-2], x.shape[-1]
    flat = x.reshape(-1, R, C)  # a view where the leading dimensions merge
    outer = flat.shape[0]
    count, length = (C, R) if dim == -2 else (R, C)
    stride_count, stride_along = ((flat.stride(2), flat.stride(1)) if dim == -2 else (flat.stride(1), flat.stride(2)))
    out = torch.empty(*lead, count, dtype=torch.float32, device=x.device)
    if outer and count:
        if length == 0:
            return out.zero_()
        rows = outer * count
        block_j = min(_next_power_of_2(length), 64)
        # Under the interpreter, few programs (each costs a Python pass): up to 64K elements each.
        block_i = min(_next_power_of_2(rows), max(1, (1 << 16) // block_j) if INTERPRETED else 64)
        _nonzero_counts_kernel[(triton.cdiv(rows, block_i),)](
            flat, out, rows, count, length, flat.stride(0), stride_count, stride_along, BLOCK_I=block_i,
            BLOCK_J=block_j, num_warps=4, **_OPTIONS)
    return out
