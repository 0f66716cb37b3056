"""Native CPU kernels of the toolkit (``csrc/ecmt_kernels.cpp``), loaded through ctypes.

The multi-step work of the MT neuron and of the EC GELU, softmax and LayerNorm (all K steps of a
chunk in one call, looping over time inside, the state kept in registers meanwhile), and the
calibration's tail order statistics, each read and write their tensors once in a small C++ kernel. The library is compiled
once per machine with the system's C++ compiler (``$CXX``, else ``c++``, ``g++`` or ``clang++``;
about 3 s, ``-O3 -march=native -fopenmp``) into ``$ECMT_CACHE_DIR/native`` (default
``~/.cache/ecmt/native``, safe to delete), keyed by the source, the compiler and flags and the
CPU's instruction set, and written atomically (concurrent processes never load half a library).
Every later process loads it in about a millisecond.

Where no compiler works, :func:`library` returns None after one warning and the callers use
torch's kernels (the eager backend, ``kernels.eager``, for the steps; numpy for the statistics):
the same numbers, slower. ``ECMT_NATIVE=0`` turns the kernels off. The tests hold every kernel to the plain
reference implementations (``tests/reference.py``) and to the other paths.
"""
from __future__ import annotations

import ctypes
import math
import os
import threading
import warnings
from typing import Optional, Tuple

import torch

from kernels import channel_table, neuron_call, part_channels

#: False: never build or load the library (``ECMT_NATIVE=0``); the callers' fallbacks run.
ENABLED = os.environ.get('ECMT_NATIVE', '1') != '0'
#: Largest rank the selection kernel accepts (its kMaxDims).
MAX_DIMS = 25
#: EC kinds with a kernel of their own (any other function runs through kernels.eager).
EC_KINDS = ('gelu', 'softmax', 'layer_norm')
#: Fused kernels here: an EC function with the MT neuron it feeds, and q/k/v on one qkv output.
#: Input dtypes the kernels read (a module converts any other to float32 first).
INPUT_DTYPES = (torch.float32,)
FUSES = True

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'csrc', 'ecmt_kernels.cpp')
_library: Optional[ctypes.CDLL] = None
_failed = False
_lock = threading.Lock()
# Compiler flags, tried in turn: some compilers or CPUs lack -march=native, some lack OpenMP
# (single-threaded kernels then, still correct).
_FLAG_SETS = (['-march=native', '-fopenmp'], ['-fopenmp'], ['-march=native'], [])
_BASE_FLAGS = ['-O3', '-std=c++17', '-shared', '-fPIC']


def cache_dir(kind: str) -> str:
    """``$ECMT_CACHE_DIR/<kind>``, else under ``$XDG_CACHE_HOME/ecmt`` or ``~/.cache/ecmt``."""
    root = os.environ.get('ECMT_CACHE_DIR')
    if not root:
        base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
        root = os.path.join(base, 'ecmt')
    return os.path.join(root, kind)


def cpu_fingerprint() -> str:
    """The CPU's architecture and instruction set (what -march=native code depends on)."""
    import platform
    flags = ''
    try:
        with open('/proc/cpuinfo') as f:
            flags = next((line for line in f if line.startswith(('flags', 'Features'))), '')
    except OSError:
        pass
    return f'{platform.machine()} {platform.processor()} {flags}'


def library() -> Optional[ctypes.CDLL]:
    """The loaded kernels, building them first if this machine has none yet; None when they are
    turned off or cannot be built (warned once). Thread-safe: a caller waits for a build that
    another thread (see :func:`prepare`) has started."""
    global _library, _failed
    if not ENABLED or _failed:
        return None
    if _library is None:
        with _lock:
            if _library is None and not _failed:
                try:
                    _library = _load(_build())
                except Exception as exc:  # no compiler, unwritable cache, a failed build
                    _failed = True
                    warnings.warn(f'native kernels unavailable ({type(exc).__name__}: {str(exc)[-300:]}); '
                                  'the SNN runs on the eager backend and the calibration on numpy (same numbers, slower)')
    return _library if not _failed else None


def available() -> bool:
    """Whether the library is built and loaded (building it on the first call)."""
    return library() is not None


def prepare() -> None:
    """Build (first run on a machine, about 3 s) and load the kernels on a thread of their own,
    while the caller loads data and weights; the first kernel call waits for it if needed. The
    command line calls this first thing for CPU runs."""
    if ENABLED and _library is None and not _failed:
        threading.Thread(target=library, name='ecmt-native-kernels').start()


def _build() -> str:
    import hashlib
    import shutil
    import subprocess
    import tempfile
    with open(SOURCE, 'rb') as f:
        source = f.read()
    compiler = os.environ.get('CXX') or next(
        (c for c in ('c++', 'g++', 'clang++') if shutil.which(c)), None)
    if compiler is None:
        raise RuntimeError('no C++ compiler found (set CXX)')
    digest = hashlib.sha256(source)
    digest.update(repr((compiler, _BASE_FLAGS, _FLAG_SETS, cpu_fingerprint())).encode())
    directory = cache_dir('native')
    path = os.path.join(directory, f'ecmt_kernels-{digest.hexdigest()[:24]}.so')
    if os.path.exists(path):
        return path
    os.makedirs(directory, exist_ok=True)
    handle, tmp = tempfile.mkstemp(suffix='.so', dir=directory)
    os.close(handle)
    try:
        errors = ''
        for flags in _FLAG_SETS:
            try:
                result = subprocess.run([compiler, *_BASE_FLAGS, *flags, SOURCE, '-o', tmp],
                                        capture_output=True, text=True)
            except OSError as exc:  # the compiler named by CXX does not exist
                raise RuntimeError(f'cannot run {compiler}: {exc}') from None
            if result.returncode == 0:
                break
            errors = result.stderr
        else:
            raise RuntimeError(f'{compiler} failed: {errors.strip()}')
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def _load(path: str) -> ctypes.CDLL:
    lib = ctypes.CDLL(path)
    p, i64, i32, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
    lib.ecmt_mt_steps.argtypes = [p, i32, p, p, p, i32, i32, p, i64, p, p, i32, i32, p, f32, p, i64, i64, i64]
    lib.ecmt_mt_steps.restype = i32
    lib.ecmt_qkv_mt_steps.argtypes = [p, i64, i64, i64, i64, i64, p, p, p, i64, p, p, p, i32, i32, p, p, p, p, i32,
                                      i32, p, p, p, f32, p, p, p, p]
    lib.ecmt_qkv_mt_steps.restype = i32
    lib.ecmt_ec_gelu_steps.argtypes = [p, p, p, i32, i32, f32, p, i64, i64, i32, i32]
    lib.ecmt_ec_gelu_steps.restype = None
    lib.ecmt_ec_softmax_steps.argtypes = [p, p, p, i32, i32, f32, p, i64, i64, i64, i32]
    lib.ecmt_ec_softmax_steps.restype = None
    lib.ecmt_ec_layer_norm_steps.argtypes = [p, p, p, i32, i32, f32, p, p, f32, p, i64, i64, i64, i32]
    lib.ecmt_ec_layer_norm_steps.restype = None
    lib.ecmt_ec_gelu_mt_steps.argtypes = [p, p, p, i32, i32, f32, i64, i64, i32, p, i64, p, i32, i32, p, p, i32,
                                          i32, p, p, i64, i64, i64]
    lib.ecmt_ec_gelu_mt_steps.restype = i32
    lib.ecmt_ec_softmax_mt_steps.argtypes = [p, p, p, i32, i32, f32, i64, i64, i64, p, i64, p, i32, i32, p, p, i32,
                                             i32, p, p, i64, i64, i64]
    lib.ecmt_ec_softmax_mt_steps.restype = i32
    lib.ecmt_ec_layer_norm_mt_steps.argtypes = [p, p, p, i32, i32, f32, p, p, f32, i64, i64, i64, p, i64, p, i32,
                                                i32, p, p, i32, i32, p, p, i64, i64, i64]
    lib.ecmt_ec_layer_norm_mt_steps.restype = i32
    lib.ecmt_running_sums.argtypes = [p, i32, p, p, p, p, i32]
    lib.ecmt_running_sums.restype = i32
    lib.ecmt_scaled_differences.argtypes = [p, p, p, f32, f32, i64, i64, i32]
    lib.ecmt_scaled_differences.restype = None
    lib.ecmt_tail_quantiles.argtypes = [p, i32, p, p, p, i64, i64, i64, i64, i64, p, p, i32]
    lib.ecmt_tail_quantiles.restype = i32
    lib.ecmt_nonzero_counts.argtypes = [p, i64, i64, i64, i64, i64, i64, i32, p, i32]
    lib.ecmt_nonzero_counts.restype = i32
    return lib


def _state(state: Optional[torch.Tensor], n: int, keep: bool) -> Tuple[Optional[torch.Tensor], bool]:
    """(the state tensor the kernel reads and/or writes, whether it starts at zero). A fresh state
    that is kept is allocated here (no zero fill: the kernel only writes it)."""
    if state is not None:
        if state.numel() != n or not state.is_contiguous() or state.dtype != torch.float32:
            raise ValueError('the state must be contiguous float32 with one element per input element of a step')
        return state, False
    return (torch.empty(n, dtype=torch.float32) if keep else None), True


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def _table(name: str, table: torch.Tensor, channels) -> Tuple[torch.Tensor, Tuple[int, int, int]]:
    """([C, 4, width] table, channel map), checked (``kernels.channel_table``) for the kernels: a
    contiguous float32 CPU table whose channel offsets fit the kernels' 32-bit offsets."""
    table, channels = channel_table(name, table, channels)
    if not table.is_contiguous() or table.dtype != torch.float32 or table.device.type != 'cpu':
        raise ValueError(f'{name}: table must be a contiguous float32 CPU tensor')
    if table.numel() >= 1 << 31:
        raise ValueError(f'{name}: a table of {table.shape[0]} channels is too large for the native kernels')
    return table, channels


def _neuron_call(name: str, table: torch.Tensor, channels, coding: str, membrane: Optional[torch.Tensor],
                 estimate: Optional[torch.Tensor], sent: bool, keep: bool, shape,
                 counts: Optional[torch.Tensor] = None):
    """``kernels.neuron_call`` for a native neuron kernel writing outputs of ``shape`` [K, ...] (its
    table checked by :func:`_table`; the kernel zeroes the counts, [K] unless given)."""
    table, channels = _table(name, table, channels)
    steps = shape[0]
    n = math.prod(shape[1:]) if steps else 0
    counts = torch.empty(steps, dtype=torch.int64) if counts is None else counts
    return neuron_call(name, table, channels, coding, membrane, estimate, sent, keep, shape, n, _state, counts)


def mt_steps(x: torch.Tensor, table: torch.Tensor, membrane: Optional[torch.Tensor], keep: bool, *,
             coding: str = 'rate', estimate: Optional[torch.Tensor] = None, t0: int = 0, sent: bool = False,
             channels: Tuple[int, int, int] = (1, 1, 1)):
    """K steps of the MT neuron (see ``kernels.eager.mt_step``) on a float32 CPU input
    ``x`` [K, ...] of any strides (a permuted q/k/v view is read where it lies). ``table``:
    ``kernels.level_table`` [C, 4, width] (or [4, width]: one channel); ``channels=(inner, groups,
    width)``: the element at row-major index i of a step uses channel ((i // inner) % groups) *
    width + i % width (``kernels.channel_map``; groups * width == C; one channel takes the
    kernel's scalar path). ``membrane``: the flat state carried from the previous chunk, or None on
    a batch's first chunk (it starts at zero and is not read). With ``keep`` the membrane after the
    K steps is written (into ``membrane``, or a new tensor) and returned; without (a batch's last
    chunk) nothing is written and None is returned. Returns (spikes [K, ...] contiguous, non-zero
    spikes per step [K] int64, membrane or None).

    ``coding='differential'`` (ECMT_SPEC 14): the running ``estimate`` is carried with the membrane
    (both None on a batch's first chunk), the steps are t0+1..t0+K, and the result is (outputs r + s
    [K, ...], non-zero spikes s per step [K], membrane, estimate (None without ``keep``), the spikes
    s [K, ...] if ``sent`` else None)."""
    if x.dim() < 1 or x.dim() > MAX_DIMS + 1:
        raise ValueError(f'mt_steps: x must have 1 to {MAX_DIMS + 1} dimensions')
    call = _neuron_call('mt_steps', table, channels, coding, membrane, estimate, sent, keep, x.shape)
    shape = (ctypes.c_int64 * x.dim())(*x.shape)
    strides = (ctypes.c_int64 * x.dim())(*x.stride())
    status = library().ecmt_mt_steps(x.data_ptr(), x.dim(), shape, strides, _ptr(call.membrane), int(call.fresh),
                                     int(call.keep), call.table.data_ptr(), call.table.shape[2], call.spike.data_ptr(),
                                     call.counts.data_ptr(), torch.get_num_threads(), int(call.differential),
                                     _ptr(call.estimate), float(t0), _ptr(call.sent), *call.channels)
    if status != 0:
        raise RuntimeError(f'ecmt_mt_steps rejected its arguments (status {status})')
    return call.result()


def qkv_mt_steps(qkv: torch.Tensor, part: int, heads: int, table: torch.Tensor,
                 membrane: Optional[torch.Tensor], keep: bool, *, coding: str = 'rate',
                 estimate: Optional[torch.Tensor] = None, t0: int = 0, sent: bool = False,
                 channels: Tuple[int, int, int] = (1, 1, 1)):
    """K steps of the q (``part`` 0), k (1) or v (2) MT neuron of an attention on its part of the
    fused qkv linear output ``qkv``: float32 CPU [K, B, N, 3 * heads * D] contiguous, read in place
    row after row (only this part's contiguous third of each token's row), the spikes written
    head-major. The same spikes, counts and state as :func:`mt_steps` on the permuted view
    ``qkv.view(K, B, N, 3, heads, D).permute(3, 0, 1, 4, 2, 5)[part]``, which reads with a stride of
    3 * heads * D between tokens; ``channels`` over one step of that view, [B, heads, N, D] (per
    (head, channel) thresholds [heads, 1, D]: (N * D, heads, D)). ``membrane``: the flat
    [B, heads, N, D] state (None on a batch's first chunk), updated in place. Returns (spikes
    [K, B, heads, N, D] contiguous, non-zero spikes per step [K] int64, membrane or None without
    ``keep``); differential coding as :func:`mt_steps`."""
    if part not in (0, 1, 2):
        raise ValueError(f'qkv_mt_steps: part must be 0 (q), 1 (k) or 2 (v), got {part}')
    one = [None] * 3
    tables, membranes, estimates, sents = list(one), list(one), list(one), [False] * 3
    tables[part], membranes[part], estimates[part], sents[part] = table, membrane, estimate, sent
    return _qkv_pass('qkv_mt_steps', qkv, heads, tables, membranes, keep, coding, estimates, t0, sents,
                     [channels] * 3)[part]


def qkv_parts_mt_steps(qkv: torch.Tensor, heads: int, tables, membranes, keep: bool, *, coding: str = 'rate',
                       estimates=(None, None, None), t0: int = 0, sents=(False, False, False), channels=(1, 1, 1)):
    """The q, k and v neurons of one attention on a fused qkv output in ONE pass (each token's row
    read once, whole, instead of a third of it by each neuron): per part (0 q, 1 k, 2 v) exactly
    what :func:`qkv_mt_steps` returns for that part, or None for a part whose table is None.
    ``tables``, ``membranes``, ``estimates`` (differential) and ``sents`` have one entry per part;
    the parts' tables have one width, and their states are all given or all None (the neurons of
    one attention step together); ``channels``: one map for the three parts, or one per part. The
    given states are updated in place, as by every kernel."""
    return _qkv_pass('qkv_parts_mt_steps', qkv, heads, tables, membranes, keep, coding, estimates, t0, sents,
                     part_channels(channels))


def _qkv_pass(name: str, qkv: torch.Tensor, heads: int, tables, membranes, keep: bool, coding: str, estimates,
              t0: int, sents, channels):
    """One ``ecmt_qkv_mt_steps`` call for the parts that have a table (given states updated in place)."""
    if qkv.dim() != 4 or not qkv.is_contiguous() or qkv.dtype != torch.float32 or heads < 1 \
            or qkv.shape[-1] % (3 * heads):
        raise ValueError(f'{name}: qkv must be a contiguous float32 [K, B, N, 3 * heads * D] tensor')
    if not (len(tables) == len(membranes) == len(estimates) == len(sents) == 3):
        raise ValueError(f'{name}: give one table, membrane, estimate and sent flag per part')
    active = [p for p in range(3) if tables[p] is not None]
    if not active:
        raise ValueError(f'{name}: no part has a table')
    if len({membranes[p] is None for p in active}) > 1:
        raise ValueError(f'{name}: the parts\' membranes must all be given or all be None')
    K, B, N, _ = qkv.shape
    D = qkv.shape[-1] // (3 * heads)
    counts = torch.empty(3, K, dtype=torch.int64)
    calls = [None] * 3
    for p in active:
        calls[p] = _neuron_call(name, tables[p], channels[p], coding, membranes[p], estimates[p], sents[p], keep,
                                (K, B, heads, N, D), counts[p])
    first = calls[active[0]]
    width = first.table.shape[-1]
    if any(calls[p].table.shape[-1] != width for p in active):
        raise ValueError(f'{name}: the tables must be [C, 4, width] tensors of one width')

    # per part (None for a part not asked for)
    table_ptrs, membrane_ptrs, spike_ptrs, estimate_ptrs, sent_ptrs = zip(*[
        (None,) * 5 if call is None else
        (_ptr(call.table), _ptr(call.membrane), _ptr(call.spike), _ptr(call.estimate), _ptr(call.sent))
        for call in calls])
    maps = (ctypes.c_int64 * 9)(*[c for call in calls for c in ((1, 1, 1) if call is None else call.channels)])
    status = library().ecmt_qkv_mt_steps(qkv.data_ptr(), K, B, N, heads, D, *table_ptrs, width, *membrane_ptrs,
                                         int(first.fresh), int(first.keep), *spike_ptrs, counts.data_ptr(),
                                         torch.get_num_threads(), int(first.differential), *estimate_ptrs, float(t0),
                                         *sent_ptrs, maps)
    if status != 0:
        raise RuntimeError(f'ecmt_qkv_mt_steps rejected its arguments (status {status})')
    return [None if call is None else call.result() for call in calls]


def _ec_arguments(name: str, x: torch.Tensor, cum, prev, keep: bool, rank: int, output: bool = True):
    if x.dim() != rank:
        raise ValueError(f'{name}: x must have {rank} dimensions (steps first)')
    x = x.contiguous()
    n = x[0].numel() if x.shape[0] else 0
    if (cum is None) != (prev is None):
        raise ValueError(f'{name}: the running sum and the last total are carried together')
    cum, fresh = _state(cum, n, keep)
    prev, _ = _state(prev, n, keep)
    return x, cum, prev, fresh, torch.empty_like(x) if output else None


def ec_gelu_steps(x: torch.Tensor, cum: Optional[torch.Tensor], prev: Optional[torch.Tensor], t0: int,
                  keep: bool, approximate: bool
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """EC GELU steps t0+1..t0+K (see ``trans_utils.exp_comp_neuron``) on ``x`` [K, n]: with the
    running sum A (``cum``) and the last total P (``prev``) carried from the previous chunk (None
    on a batch's first chunk: zero), each step gives ``s * gelu(A_s / s) - P_(s-1)``. Returns
    (out [K, n], cum, prev), the state after the chunk if ``keep``, else (out, None, None)."""
    x, cum, prev, fresh, out = _ec_arguments('ec_gelu_steps', x, cum, prev, keep, 2)
    library().ecmt_ec_gelu_steps(x.data_ptr(), _ptr(cum), _ptr(prev), int(fresh), int(bool(keep)), float(t0),
                                 out.data_ptr(), x.shape[0], x.shape[1], int(bool(approximate)),
                                 torch.get_num_threads())
    return (out, cum, prev) if keep else (out, None, None)


def ec_softmax_steps(x: torch.Tensor, cum: Optional[torch.Tensor], prev: Optional[torch.Tensor], t0: int,
                     keep: bool) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """EC softmax steps over the last dimension of ``x`` [K, rows, cols]; state and result as
    :func:`ec_gelu_steps` (the state holds rows x cols elements)."""
    x, cum, prev, fresh, out = _ec_arguments('ec_softmax_steps', x, cum, prev, keep, 3)
    library().ecmt_ec_softmax_steps(x.data_ptr(), _ptr(cum), _ptr(prev), int(fresh), int(bool(keep)), float(t0),
                                    out.data_ptr(), x.shape[0], x.shape[1], x.shape[2], torch.get_num_threads())
    return (out, cum, prev) if keep else (out, None, None)


def _check_affine(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> None:
    for p in (weight, bias):
        if p is not None and (p.shape != (x.shape[-1],) or not p.is_contiguous() or p.dtype != torch.float32
                              or p.device.type != 'cpu'):
            raise ValueError('ec_layer_norm_steps: weight and bias must be contiguous float32 of cols elements')


def ec_layer_norm_steps(x: torch.Tensor, cum: Optional[torch.Tensor], prev: Optional[torch.Tensor], t0: int,
                        keep: bool, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
                        ) -> Tuple[torch.Tensor, Optional[torch.Tensor], Optional[torch.Tensor]]:
    """EC LayerNorm steps over the last dimension of ``x`` [K, rows, cols] (biased variance, then
    ``weight`` and ``bias`` of cols elements if given); state and result as :func:`ec_softmax_steps`."""
    _check_affine(x, weight, bias)
    x, cum, prev, fresh, out = _ec_arguments('ec_layer_norm_steps', x, cum, prev, keep, 3)
    library().ecmt_ec_layer_norm_steps(x.data_ptr(), _ptr(cum), _ptr(prev), int(fresh), int(bool(keep)),
                                       float(t0), _ptr(weight), _ptr(bias), float(eps), out.data_ptr(),
                                       x.shape[0], x.shape[1], x.shape[2], torch.get_num_threads())
    return (out, cum, prev) if keep else (out, None, None)


def ec_mt_steps(kind: str, x: torch.Tensor, cum: Optional[torch.Tensor], prev: Optional[torch.Tensor], t0: int,
                keep: bool, table: torch.Tensor, membrane: Optional[torch.Tensor], *, approximate: bool = False,
                weight: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None, eps: float = 0.0,
                coding: str = 'rate', estimate: Optional[torch.Tensor] = None, sent: bool = False,
                channels: Tuple[int, int, int] = (1, 1, 1)):
    """An EC kernel (``kind`` 'gelu', 'softmax' or 'layer_norm', with the arguments and state of
    :func:`ec_gelu_steps` / :func:`ec_softmax_steps` / :func:`ec_layer_norm_steps`) with the MT
    neuron it feeds fused after it: the EC output never leaves the kernel; the neuron's ``table``,
    ``channels`` (over one step of ``x``) and ``membrane`` are those of :func:`mt_steps` (None on a
    batch's first chunk). The same spikes as :func:`mt_steps` fed the EC kernel's output. Returns
    (spikes shaped like ``x``, non-zero spikes per step [K] int64, cum, prev, membrane), the states
    None unless ``keep``; with ``coding='differential'`` (the neuron's steps are the EC kernel's
    t0+1..t0+K): (outputs r + s, counts of s, cum, prev, membrane, estimate, the spikes s if
    ``sent`` else None)."""
    rank = 2 if kind == 'gelu' else 3
    if kind == 'layer_norm':
        _check_affine(x, weight, bias)
    x, cum, prev, fresh, _ = _ec_arguments(f'ec_mt_steps({kind})', x, cum, prev, keep, rank, output=False)
    call = _neuron_call('ec_mt_steps', table, channels, coding, membrane, estimate, sent, keep, x.shape)
    lib, threads = library(), torch.get_num_threads()
    head = (x.data_ptr(), _ptr(cum), _ptr(prev), int(fresh), int(bool(keep)), float(t0))
    neuron = (call.table.data_ptr(), call.table.shape[2], _ptr(call.membrane), int(call.fresh), int(call.keep),
              call.spike.data_ptr(), call.counts.data_ptr(), threads, int(call.differential), _ptr(call.estimate),
              _ptr(call.sent), *call.channels)
    if kind == 'gelu':
        status = lib.ecmt_ec_gelu_mt_steps(*head, x.shape[0], x.shape[1], int(bool(approximate)), *neuron)
    elif kind == 'softmax':
        status = lib.ecmt_ec_softmax_mt_steps(*head, *x.shape, *neuron)
    elif kind == 'layer_norm':
        status = lib.ecmt_ec_layer_norm_mt_steps(*head, _ptr(weight), _ptr(bias), float(eps), *x.shape, *neuron)
    else:
        raise ValueError(f'ec_mt_steps: unknown kind {kind!r}')
    if status != 0:
        raise RuntimeError(f'ecmt_ec_{kind}_mt_steps rejected its arguments (status {status})')
    return call.result(cum, prev) if keep else call.result(None, None)


def running_sums(x: torch.Tensor, carried: Optional[torch.Tensor]) -> torch.Tensor:
    """Running sums along time of a float32 CPU input ``x`` [K, ...] of any strides (the k of
    q·kᵀ is a transposed view), from ``carried`` (the sums after the previous chunk, contiguous,
    one element per element of a step; None: from zero), added one step at a time in float32.
    Returns the sums, [K, ...] contiguous."""
    if x.dim() < 1 or x.dim() > MAX_DIMS + 1:
        raise ValueError(f'running_sums: x must have 1 to {MAX_DIMS + 1} dimensions')
    if carried is not None:
        _state(carried, x[0].numel(), False)
    sums = torch.empty(x.shape, dtype=torch.float32)
    shape = (ctypes.c_int64 * x.dim())(*x.shape)
    strides = (ctypes.c_int64 * x.dim())(*x.stride())
    status = library().ecmt_running_sums(x.data_ptr(), x.dim(), shape, strides, _ptr(carried), sums.data_ptr(),
                                         torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f'ecmt_running_sums rejected its arguments (status {status})')
    return sums


def scaled_differences(totals: torch.Tensor, prev: Optional[torch.Tensor], t0: int, keep: bool,
                       scale: float = 1.0) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """In place on ``totals`` [K, ...] (contiguous float32, products of running sums for steps
    t0+1..t0+K): each becomes ``total_t - total_(t-1)`` with ``total_t = totals[t] / t``, the first
    less ``prev`` (the last total of the previous chunk; None: nothing), then times ``scale`` (in
    float32, after the difference, as ``out * scale`` after the product). Returns (totals, the
    chunk's last total shaped like one step, or None without ``keep``)."""
    if not totals.is_contiguous() or totals.dtype != torch.float32 or totals.dim() < 1:
        raise ValueError('scaled_differences: totals must be contiguous float32 [K, ...]')
    n = totals[0].numel()
    if prev is not None:
        _state(prev, n, False)
    last = torch.empty(totals.shape[1:], dtype=torch.float32) if keep else None
    library().ecmt_scaled_differences(totals.data_ptr(), _ptr(prev), _ptr(last), float(t0), float(scale),
                                      totals.shape[0], n,
                                      torch.get_num_threads())
    return totals, last


def nonzero_counts(x: torch.Tensor, dim: int) -> Optional[torch.Tensor]:
    """The non-zero elements of a float32 CPU tensor ``x`` [..., R, C] counted along ``dim``
    (-2: per column, [..., C]; -1: per row, [..., R]), float32 (exact integers), in one read of x
    whatever the strides of its last two dimensions; None where the leading dimensions do not
    merge into one stride (the caller counts with torch then)."""
    if x.dim() < 2 or dim not in (-1, -2) or x.dtype != torch.float32 or x.device.type != 'cpu':
        raise ValueError('nonzero_counts: x must be float32 on the CPU with >= 2 dimensions, dim -1 or -2')
    lead = x.shape[:-2]
    outer, outer_stride = 1, 0
    for size, stride in zip(reversed(lead), reversed(x.stride()[:-2])):  # innermost leading dim first
        if size == 1:
            continue
        if outer > 1 and stride != outer_stride * outer:
            return None
        if outer == 1:
            outer_stride = stride
        outer *= size
    R, C = x.shape[-2], x.shape[-1]
    out = torch.empty(*lead, C if dim == -2 else R, dtype=torch.float32)
    status = library().ecmt_nonzero_counts(x.data_ptr(), outer, R, C, outer_stride, x.stride(-2), x.stride(-1),
                                           1 if dim == -2 else 2, out.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise RuntimeError(f'ecmt_nonzero_counts rejected its arguments (status {status})')
    return out


def tail_quantiles(x: torch.Tensor, sample: torch.Tensor, r_hi: int, r_lo: int, k_hi: int, k_lo: int
                   ) -> Tuple[torch.Tensor, torch.Tensor, Tuple[int, int, bool]]:
    """The k_hi-th and k_lo-th smallest elements (1-based) of a float32 CPU tensor of any strides
    and at most :data:`MAX_DIMS` dimensions, with bounds at ranks r_hi and r_lo of the sample
    ``sample`` (flat row-major indices, int64). Returns (upper, lower statistic as 0-d float32
    tensors, NaN when x holds a NaN; (elements gathered beyond the upper bound, beyond the lower
    bound, whether the full selection was needed))."""
    if sample.dtype != torch.int64 or not sample.is_contiguous() or sample.device.type != 'cpu':
        raise ValueError('tail_quantiles: the sample must be contiguous int64 indices on the CPU')
    dims = max(x.dim(), 1)
    shape = (ctypes.c_int64 * dims)(*x.shape)
    strides = (ctypes.c_int64 * dims)(*x.stride())
    out = (ctypes.c_float * 2)()
    info = (ctypes.c_int64 * 3)()
    status = library().ecmt_tail_quantiles(x.data_ptr(), x.dim(), shape, strides, sample.data_ptr(),
                                           sample.numel(), r_hi, r_lo, k_hi, k_lo, out, info,
                                           torch.get_num_threads())
    if status == 1:  # the tensor holds a NaN
        return torch.tensor(float('nan')), torch.tensor(float('nan')), (0, 0, False)
    if status != 0:
        raise RuntimeError(f'ecmt_tail_quantiles rejected its arguments (status {status})')
    return (torch.tensor(out[0], dtype=torch.float32), torch.tensor(out[1], dtype=torch.float32),
            (int(info[0]), int(info[1]), bool(info[2])))
