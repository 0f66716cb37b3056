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
repeats the input of the converted region K times and tells the modules the chunk. Linear layers
thus run once on K*B rows, the MT neuron is one kernel looping over the K steps inside, an EC
module evaluates its function once over all K running means, an EC product is one batched product
of running sums. Called directly, a module takes one step per call, as the published ones did:
K = 1 of the same chunk function. One backend runs a whole model, chosen when it is converted
(:func:`set_backend`): 'native' (C++ kernels, CPU), 'triton' (CUDA; the CPU under
``TRITON_INTERPRET=1``) or 'eager' (torch operations, any device), each a module of kernels with
one signature per kernel (``native_kernels``, ``triton_kernels``, ``eager_kernels``). Fusions
(an EC module with the neuron it feeds; an attention's q/k/v neurons reading the qkv output) are
made then too, as modules that own their state. Running state is float32 whatever the autocast
dtype, and is not kept past a batch's last chunk.
"""
from __future__ import annotations

import itertools
import os
import weakref
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

import kernels.eager as eager_kernels
from kernels import (BACKEND_CHOICES, BACKENDS, ConversionError, backend_problem, kernels_of, level_table,
                     resolve_backend, set_default_backend)
from options import CODINGS
from calibration import UNCALIBRATED_PLACES, TestNeuron, sync_calibration, tail_quantiles  # noqa: F401 (published names)
from multistep import ONE_STEP, Chunk, MultiStep  # noqa: F401

__all__ = [
    'PLACES', 'ConversionError', 'StatefulModule', 'MyTestPlace', 'TestNeuron', 'TwoSideNeuron',
    'exp_comp_neuron', 'ECNeuron', 'ECPassThrough', 'MyAt', 'AtNeuron', 'MyMul', 'MulNeuron', 'MultiStep',
    'Chunk', 'mt_fire', 'tail_quantiles', 'replace_test_by_testneuron', 'replace_testneuron_by_twosideneuron',
    'replace_nonlinear_by_neuron', 'replace_at_by_neuron', 'convert_to_snn', 'get_modules',
    'reset_net', 'set_backend', 'set_default_backend', 'resolve_backend', 'backend_problem', 'kernels_of',
    'BACKENDS', 'BACKEND_CHOICES', 'threshold_config',
    'EC_MODULE_TYPES', 'register_snn_modules', 'check_fully_converted', 'BaseMonitor', 'SOPMonitor',
    'product_nonzero_macs', 'spike_level_counts', 'fuse_ec_neurons', 'CODINGS',
]

#: Placeholder kinds, in the order they appear in a transformer block (ECMT_SPEC section 2; 'gate'
#: and 'up' are the two operands of a gated MLP's element-wise product, section 12).
PLACES = ('fc_qkv', 'q', 'k', 'v', 's', 'fc_out', 'fc1', 'gate', 'up', 'fc2')


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


def model_device(model: nn.Module) -> torch.device:
    tensor = next(itertools.chain(model.parameters(), model.buffers()), None)
    return tensor.device if tensor is not None else torch.device('cpu')


def set_backend(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Run every stateful module of ``model`` on one backend for the device its weights are on
    (:func:`resolve_backend`: 'auto'/None chooses), resetting their state, and make the fusions
    that backend has (:func:`fuse_ec_neurons`). :func:`convert_to_snn` calls it; call it again
    after moving a converted model to another device. The name is in ``model.ecmt_backend``."""
    name = resolve_backend(backend, model_device(model))
    for module in model.modules():
        if isinstance(module, StatefulModule):
            module.backend = name
            module.reset()
        elif isinstance(module, ECPassThrough):  # the EC module it stands for, if unfused
            module.backend = name
    model.ecmt_backend = name
    fuse_ec_neurons(model)
    return model


# ---------------------------------------------------------------------------------------------
# Stateful modules: one chunk function each, time-major chunks of steps
# ---------------------------------------------------------------------------------------------
class StatefulModule(nn.Module):
    """Base of every module that keeps state across time steps (neurons, EC modules, EC products).

    Inputs and outputs are time-major, the K steps of a chunk folded into the batch: [K*B, ...],
    the layout timm's code runs on unchanged; only these modules view it as [K, B, ...]. Each
    subclass has ONE chunk function, ``run_chunk(inputs of K steps, state, t0, keep) -> (outputs,
    per-step non-zero counts or None, state)``, on the kernels of its backend (:func:`kernels_of`),
    whatever K: called directly, a module takes one step per call (K = 1 of the same function).
    Its forward only splits time, calls it, keeps the returned state and advances ``steps`` (the
    steps of the batch so far: the first step number t0 of the next chunk). ``clock`` (a
    :class:`Chunk`) says how many steps a call holds and whether it ends the batch; after a
    batch's last chunk the module holds nothing (memory does not grow with depth). The state is
    None after :meth:`reset` and takes its shape from the first chunk. ``backend`` names the
    kernels (:func:`set_backend` chooses it for a whole model).
    """
    kind = 'function'

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0
        self.clock = ONE_STEP
        self.backend = resolve_backend(None, 'cpu')
        self.state = None
        self.step_shape: Tuple[int, ...] = ()  # of one step's input (the state is kept flat)

    @property
    def kernels(self):
        return kernels_of(self.backend)

    def reset(self) -> None:
        self.steps = 0
        self.state = None

    def _split_time(self, x: torch.Tensor) -> torch.Tensor:
        """[K*B, ...] -> [K, B, ...] (a view, whatever the strides)."""
        steps = self.clock.steps
        if x.dim() == 0 or x.shape[0] % steps:
            raise ValueError(f'{type(self).__name__}: an input of shape {tuple(x.shape)} does not hold '
                             f'{steps} time steps along its first dimension')
        return x.unflatten(0, (steps, x.shape[0] // steps))

    def _check_device(self, x: torch.Tensor) -> None:
        if self.backend == 'native' and x.device.type != 'cpu':
            raise RuntimeError(f'this {type(self).__name__} was converted for the CPU (native backend): call '
                               'trans_utils.set_backend(model) after moving the model')

    def _shaped(self, flat: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if flat is None else flat.view(self.step_shape)

    def _advance(self, state) -> None:
        """Keep the chunk's final state, or nothing after a batch's last chunk."""
        if self.clock.last:
            self.reset()
        else:
            self.state = state
            self.steps += self.clock.steps

    def extra_repr(self) -> str:
        return f'steps={self.steps}, backend={self.backend}'


def reset_net(model: nn.Module) -> None:
    """Reset every stateful module of ``model`` (call between samples/batches)."""
    for module in model.modules():
        if isinstance(module, StatefulModule):
            module.reset()


#: Places whose neurons feed an EC product (whose energy count needs the spikes and estimates).
PRODUCT_PLACES = ('q', 'k', 'v', 's', 'gate', 'up')


class TwoSideNeuron(StatefulModule):
    """Multi-threshold neuron of ``snn`` mode (ECMT_SPEC 4).

    Each step: ``v += x``; emit at most one spike of ``+scale_p * 2^j`` or ``-scale_n * 2^j``
    (``j < levels``); ``v -= spike``. The output is the spike (float32, the shape of ``x``).
    State: the membrane (flat), with the level table built from ``scale_p``/``scale_n`` at a
    batch's first chunk (thresholds changed in place apply from the next batch). With
    ``count_nonzero`` (set by the energy monitor, which takes them in its hook) each call also
    gives the non-zero spikes per step, ``last_nonzero`` ([K] int64), for the linear layer this
    neuron feeds; otherwise ``last_nonzero`` stays None. Nothing a call makes outlives it unless
    asked for: a small tensor kept from one layer's call to the next batch sits between the large
    freed blocks of later layers and keeps glibc from merging them, so that the heap of a CPU run
    grew by about 70 MiB per block (ViT-S/16, batch 8, T=4). Given ``qkv_part=(part, heads)``, the input is an
    attention's fused qkv linear output [K*B, N, 3*heads*D] and the neuron (q: part 0, k: 1, v: 2)
    reads its own part of it in place, returning [K*B, heads, N, D] as on the split view.

    ``coding='differential'`` (ECMT_SPEC 14): the neuron keeps a running estimate r too (state:
    (membrane, estimate), both flat) and, at step t, fires the same rule on ``(v + x) - r``, keeps
    ``v = u - s``, outputs ``y = r + s`` and updates ``r += s / t``. Its output is y (what the
    next module computes with); what it transmits, and what ``last_nonzero`` and the level counts
    count, is s. With ``record_sent`` (set by the energy monitor) each call also leaves
    ``last_sent`` = (s, the estimates before each step), both shaped like the output.
    """
    kind = 'neuron'

    def __init__(self, place: str, scale_p: float | torch.Tensor, scale_n: float | torch.Tensor,
                 levels: int, coding: str = 'rate') -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f'levels must be >= 1, got {levels}')
        if coding not in CODINGS:
            raise ValueError(f'unknown coding {coding!r}; choose one of {", ".join(CODINGS)}')
        self.place = place
        self.levels = int(levels)
        self.coding = coding
        self.record_sent = False
        self.last_sent: Optional[Tuple[torch.Tensor, torch.Tensor]] = None
        self.register_buffer('scale_p', torch.as_tensor(scale_p, dtype=torch.float32).reshape(1).clone())
        self.register_buffer('scale_n', torch.as_tensor(scale_n, dtype=torch.float32).reshape(1).clone())
        self.count_nonzero = False
        self.last_nonzero: Optional[torch.Tensor] = None
        # Spike counts per level (positive and negative side), filled only when asked for.
        self.count_levels = False
        self.level_counts: Optional[torch.Tensor] = None
        self._table: Optional[torch.Tensor] = None

    def reset(self) -> None:
        super().reset()
        self._table = None

    def level_table(self) -> torch.Tensor:
        """The level table of this batch (built from the thresholds at a batch's first chunk)."""
        if self._table is None:
            self._table = level_table(self.scale_p, self.scale_n, self.levels)
        return self._table

    @property
    def membrane(self) -> Optional[torch.Tensor]:
        """The membrane potential after the last step (shaped like one step's input), or None."""
        if self.coding == 'differential':
            return None if self.state is None else self._shaped(self.state[0])
        return self._shaped(self.state)

    @property
    def estimate(self) -> Optional[torch.Tensor]:
        """A differential neuron's running estimate r after the last step (shaped like one step's
        input), or None."""
        if self.coding != 'differential' or self.state is None:
            return None
        return self._shaped(self.state[-1])

    def _coding_arguments(self, state, t0: int, sent: bool) -> Dict:
        """The kernels' keywords for a differential neuron whose (membrane, estimate) is ``state``."""
        return dict(coding='differential', estimate=None if state is None else state[1], t0=t0, sent=sent)

    def run_chunk(self, xs: torch.Tensor, state, t0: int, keep: bool,
                  qkv_part: Optional[Tuple[int, int]] = None, sent: bool = False):
        """K steps: (outputs [K, ...], non-zero spikes per step [K], state or None without keep);
        the state is the membrane, or (membrane, estimate) for a differential neuron, whose
        outputs are y = r + s; with ``sent`` (differential only) the spikes s [K, ...] follow.
        ``xs``: [K, ...], or the fused qkv output [K, B, N, 3*heads*D] with ``qkv_part``."""
        kernels = self.kernels
        if self.backend == 'native':
            xs = xs.float()
        if self.coding == 'differential':
            membrane = None if state is None else state[0]
            coding = self._coding_arguments(state, t0, sent)
            if qkv_part is not None:
                part, heads = qkv_part
                result = kernels.qkv_mt_steps(xs.contiguous(), part, heads, self.level_table(), membrane, keep,
                                              **coding)
            else:
                result = kernels.mt_steps(xs, self.level_table(), membrane, keep, **coding)
            return self._chunk_result(result, keep, sent)
        if qkv_part is not None:
            part, heads = qkv_part
            return kernels.qkv_mt_steps(xs.contiguous(), part, heads, self.level_table(), state, keep)
        return kernels.mt_steps(xs, self.level_table(), state, keep)

    def _chunk_result(self, result, keep: bool, sent: bool):
        """A kernel's neuron result as :meth:`run_chunk` returns it (a differential neuron's two
        states as one, its spikes s last when asked for)."""
        if self.coding != 'differential':
            return result
        out, counts, membrane, estimate, spikes = result
        new_state = (membrane, estimate) if keep else None
        return (out, counts, new_state, spikes) if sent else (out, counts, new_state)

    def _sends(self) -> bool:
        """Whether a call must also give the spikes s (a differential neuron whose levels are
        counted or whose spikes the energy monitor reads)."""
        return self.coding == 'differential' and (self.count_levels or self.record_sent)

    @torch.no_grad()
    def forward(self, x: torch.Tensor, qkv_part: Optional[Tuple[int, int]] = None,
                shared: Optional['SharedQKV'] = None) -> torch.Tensor:
        self._check_device(x)
        xs = self._split_time(x.detach())
        self.step_shape = tuple(xs.shape[1:]) if qkv_part is None else (xs.shape[1], qkv_part[1], xs.shape[2], -1)
        sent = self._sends()
        start = self.state[-1].clone() if sent and self.record_sent and self.state is not None else None
        if shared is not None:
            out, counts, state, *spikes = shared.take(self, xs)
        else:
            out, counts, state, *spikes = self.run_chunk(xs, self.state, self.steps, not self.clock.last, qkv_part,
                                                         sent=sent)
        shape = (-1,) + tuple(out.shape[2:]) if qkv_part is not None else x.shape
        out = out.reshape(shape)
        spikes = spikes[0].reshape(shape) if spikes else out
        self._record(spikes, counts)
        if sent and self.record_sent:
            self.last_sent = (spikes, self._estimates_before(spikes, start, self.steps))
        self._advance(state)
        return out

    def _estimates_before(self, spikes: torch.Tensor, start: Optional[torch.Tensor], t0: int) -> torch.Tensor:
        """The estimates r before each step of the chunk, shaped like its spikes s, from the
        estimate before it (None: zero), with the neuron's own float operations (r + s / t)."""
        steps = self.clock.steps
        s = spikes.unflatten(0, (steps, -1))
        r = torch.zeros_like(s[0]) if start is None else start.view(s.shape[1:])
        before = torch.empty_like(s)
        for k in range(steps):
            before[k] = r
            r = r + s[k] / torch.full_like(s[k], float(t0 + k + 1))
        return before.view(spikes.shape)

    def _record(self, spike: torch.Tensor, counts: torch.Tensor) -> None:
        self.last_nonzero = counts if self.count_nonzero else None
        if self.count_levels:
            self._count(spike)

    @torch.no_grad()
    def _count(self, spike: torch.Tensor) -> None:
        counts = spike_level_counts(spike, self.scale_p, self.scale_n, self.levels)
        if self.level_counts is None:
            self.level_counts = counts
        else:  # in place: a new sum per call would be kept until the next batch (see the class)
            self.level_counts += counts

    def extra_repr(self) -> str:
        coding = '' if self.coding == 'rate' else f', coding={self.coding}'
        return (f'place={self.place}, levels={self.levels}, '
                f'scale_p={self.scale_p.item():.6g}, scale_n={self.scale_n.item():.6g}{coding}, backend={self.backend}')


class SharedQKV:
    """One forward's fused qkv output, shared by an attention's q, k and v neurons (made by the
    attention for that call and dropped after it; it outlives no call).

    A neuron given it (``TwoSideNeuron.forward(qkv, qkv_part=(part, heads), shared=...)``) takes
    its part through :meth:`take`: the first of the three runs all of them in ONE pass of its
    backend's ``qkv_parts_mt_steps`` (each token's row read once, not a third of it three times:
    on the CPU about a fifth less time for the three neurons), from the three neurons' states and
    level tables, which it reads and does not change; each neuron then takes its own outputs and
    counts, and keeps its own new state in its own forward. Where the three cannot go together
    (another backend, coding or level width; different steps or states), each neuron runs its own
    chunk function, as it would alone."""

    def __init__(self, heads: int, neurons: Sequence['TwoSideNeuron']) -> None:
        self.heads, self.neurons = heads, tuple(neurons)
        self.results: Optional[List] = None

    def _joint(self) -> bool:
        first = self.neurons[0]
        return (len(self.neurons) == 3
                and all(type(n).run_chunk is TwoSideNeuron.run_chunk for n in self.neurons)
                and all(n.backend == first.backend and n.coding == first.coding and n.clock is first.clock
                        and n.steps == first.steps and (n.state is None) == (first.state is None)
                        and n.level_table().shape == first.level_table().shape for n in self.neurons))

    def take(self, neuron: 'TwoSideNeuron', xs: torch.Tensor):
        """``neuron``'s chunk result (as its ``run_chunk`` gives it) on its part of ``xs``, the
        fused qkv output split into steps [K, B, N, 3 * heads * D]."""
        part = self.neurons.index(neuron)
        keep = not neuron.clock.last
        if self.results is None:
            self.results = [None] * 3
            if self._joint():
                self.results = self._run_joint(xs, keep)
        result = self.results[part]
        if result is None:
            return neuron.run_chunk(xs, neuron.state, neuron.steps, keep, (part, self.heads), sent=neuron._sends())
        self.results[part] = None  # nothing kept past the neuron that takes it
        return result

    def _run_joint(self, xs: torch.Tensor, keep: bool) -> List:
        neurons, first = self.neurons, self.neurons[0]
        if first.backend == 'native':
            xs = xs.float()
        differential = first.coding == 'differential'
        # Copies: the kernels update the states they are given, and these are the neurons' own.
        membranes = [None if n.state is None else (n.state[0] if differential else n.state).clone() for n in neurons]
        extra = {}
        if differential:
            extra = dict(coding='differential',
                         estimates=[None if n.state is None else n.state[1].clone() for n in neurons],
                         t0=first.steps, sents=[n._sends() for n in neurons])
        results = first.kernels.qkv_parts_mt_steps(xs.contiguous(), self.heads, [n.level_table() for n in neurons],
                                                   membranes, keep, **extra)
        return [n._chunk_result(r, keep, n._sends()) for n, r in zip(neurons, results)]


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
    function the native and Triton kernels know exactly, else 'function' (the module is called)."""
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


def _gelu_approximate(module: nn.Module) -> bool:
    return type(module).__name__ == 'GELUTanh' or getattr(module, 'approximate', 'none') != 'none'


def _ec_kernel_arguments(kind: str, module: nn.Module, xs: torch.Tensor) -> Tuple[torch.Tensor, Dict]:
    """(the chunk's input as the EC kernels of ``kind`` take it: [K, n] for GELU, [K, rows, cols]
    for softmax and LayerNorm; their keyword arguments)."""
    if kind == 'gelu':
        return xs.reshape(xs.shape[0], -1), {'approximate': _gelu_approximate(module)}
    flat = xs.reshape(xs.shape[0], -1, xs.shape[-1])
    if kind == 'layer_norm':
        return flat, {'weight': module.weight, 'bias': module.bias, 'eps': module.eps}
    return flat, {}


def _ec_steps(kernels, kind: str, flat: torch.Tensor, cum, prev, t0: int, keep: bool, extra: Dict):
    if kind == 'gelu':
        return kernels.ec_gelu_steps(flat, cum, prev, t0, keep, extra['approximate'])
    if kind == 'softmax':
        return kernels.ec_softmax_steps(flat, cum, prev, t0, keep)
    return kernels.ec_layer_norm_steps(flat, cum, prev, t0, keep, extra['weight'], extra['bias'], extra['eps'])


class exp_comp_neuron(StatefulModule):
    """Expectation compensation of a nonlinear module f (ECMT_SPEC 5).

    With A_t the running sum of inputs after step t, the output is ``t*f(A_t/t) - (t-1)*f(A_(t-1)/(t-1))``,
    so the outputs summed over steps 1..t are ``t * f(mean input)``. A chunk of K steps takes the
    running means of all K steps, evaluates f once over all of them and returns the differences
    along time. State: (running sum, last total t*f(A_t/t)), flat. The wrapped module is
    ``self.module``; GELU, and a softmax or LayerNorm over the last dimension, run as the backend's
    own multi-step kernels on native and triton; every other function (and every function on
    eager) is the module itself called once on the K running means.
    """

    def __init__(self, module: nn.Module) -> None:
        self.kind = _ec_kind(module)
        super().__init__()
        self.module = module

    @property
    def cum_input(self) -> Optional[torch.Tensor]:
        """The running sum of inputs after the last step (shaped like one step's input), or None."""
        return None if self.state is None else self._shaped(self.state[0])

    @property
    def prev_total(self) -> Optional[torch.Tensor]:
        """``t * f(cum_input / t)`` of the last step t (shaped like one step's input), or None."""
        return None if self.state is None else self._shaped(self.state[1])

    def run_chunk(self, xs: torch.Tensor, state, t0: int, keep: bool):
        """K steps of [K, B, ...]: (outputs [K, B, ...] float32, None, (cum, prev) or None)."""
        cum, prev = state if state is not None else (None, None)
        kernels = self.kernels
        if self.backend != 'eager' and self.kind in kernels.EC_KINDS:
            flat, extra = _ec_kernel_arguments(self.kind, self.module, xs.float())
            out, cum, prev = _ec_steps(kernels, self.kind, flat, cum, prev, t0, keep, extra)
            out = out.view(xs.shape)
        else:
            out, cum, prev = eager_kernels.ec_function_steps(self.module, xs, cum, prev, t0, keep)
        return out, None, ((cum, prev) if keep else None)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_device(x)
        xs = self._split_time(x.detach())
        self.step_shape = tuple(xs.shape[1:])
        out, _, state = self.run_chunk(xs, self.state, self.steps, not self.clock.last)
        self._advance(state)
        return out.view(x.shape)


class ECPassThrough(nn.Module):
    """Where an EC module's output goes straight to an MT neuron and the two are fused
    (:func:`fuse_ec_neurons`), the EC module's place: it passes its input on unchanged to the
    :class:`ECNeuron` that computes both. Holds the wrapped function (``module``, so that its
    parameters keep their names) and no state."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module
        self.kind = _ec_kind(module)
        self.backend = resolve_backend(None, 'cpu')

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ECNeuron(TwoSideNeuron):
    """An MT neuron fed by an EC module, the two computed by one kernel of the backend
    (``ec_mt_steps``): the EC output never goes to memory. Made at conversion by
    :func:`fuse_ec_neurons` in the neuron's place (same name, thresholds and levels; the EC
    module's place becomes an :class:`ECPassThrough`), it takes the EC module's input and owns
    both states: (running sum, last total, membrane). The same spikes, states and counts as the
    two modules apart. ``ec_kind`` names the function ('gelu', 'softmax', 'layer_norm');
    ``ec_function`` is the wrapped module (held by the pass-through)."""

    def __init__(self, neuron: TwoSideNeuron, function: nn.Module) -> None:
        super().__init__(neuron.place, neuron.scale_p, neuron.scale_n, neuron.levels, neuron.coding)
        self.backend, self.record_sent = neuron.backend, neuron.record_sent
        self.count_levels, self.level_counts = neuron.count_levels, neuron.level_counts
        self.count_nonzero = neuron.count_nonzero
        self.ec_kind = _ec_kind(function)
        self.__dict__['ec_function'] = function  # a reference, not a submodule (the pass-through holds it)

    def run_chunk(self, xs: torch.Tensor, state, t0: int, keep: bool, qkv_part=None, sent: bool = False):
        """K steps of EC then neuron: (outputs [K, ...], counts [K], (cum, prev, membrane) or None;
        a differential neuron's state ends with its estimate, and ``sent`` adds its spikes s)."""
        flat, extra = _ec_kernel_arguments(self.ec_kind, self.ec_function, xs.float())
        if self.coding == 'differential':
            cum, prev, membrane, estimate = state if state is not None else (None,) * 4
            out, counts, cum, prev, membrane, estimate, spikes = self.kernels.ec_mt_steps(
                self.ec_kind, flat, cum, prev, t0, keep, self.level_table(), membrane, **extra,
                coding='differential', estimate=estimate, sent=sent)
            new_state = (cum, prev, membrane, estimate) if keep else None
            if sent:
                return out.view(xs.shape), counts, new_state, spikes.view(xs.shape)
            return out.view(xs.shape), counts, new_state
        cum, prev, membrane = state if state is not None else (None, None, None)
        spike, counts, cum, prev, membrane = self.kernels.ec_mt_steps(
            self.ec_kind, flat, cum, prev, t0, keep, self.level_table(), membrane, **extra)
        return spike.view(xs.shape), counts, ((cum, prev, membrane) if keep else None)

    @property
    def membrane(self) -> Optional[torch.Tensor]:
        return None if self.state is None else self._shaped(self.state[2])

    def extra_repr(self) -> str:
        return f'ec={self.ec_kind}, ' + super().extra_repr()


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


class _ECProduct(StatefulModule):
    """Expectation compensation of a product of two time-varying operands (ECMT_SPEC 6); the
    subclasses supply the product (:meth:`_op`) and its operation count (:meth:`_operations`).

    With running sums A and B, the output at step t is ``A_t∘B_t / t - A_(t-1)∘B_(t-1) / (t-1)``.
    A chunk of K steps forms the running sums of both operands along time (float32), takes one
    batched product over all K (in float32 also under autocast: the totals grow like t²), and one
    fused pass scales each by 1/t, takes the differences along time and applies ``scale``. State:
    (both running sums, the last total), flat. ``count_operations`` (set by the energy monitor)
    makes each call also give ``last_operations``, the per-step operation counts [K] float64 of
    ECMT_SPEC 8.
    """
    kind = 'product'

    def __init__(self) -> None:
        super().__init__()
        self.count_operations = False
        self.last_operations: Optional[torch.Tensor] = None

    def _op(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _operations(self, a, b, cum_a, cum_b) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def dense_operations(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> float:
        """Operations of the dense product of one call (all its steps)."""
        raise NotImplementedError  # pragma: no cover

    def sent_operations(self, sent_a: torch.Tensor, sent_b: torch.Tensor, estimate_a: torch.Tensor,
                        estimate_b: torch.Tensor) -> torch.Tensor:
        """Per-step operations [K] float64 of the last call when both operands came from
        differential neurons (ECMT_SPEC 14): nz(s_a)·nz(s_b) + nz(s_a)·nz(r_b) + nz(r_a)·nz(s_b),
        with s the spikes sent and r the estimates before the step, each given as the operands
        were ([K*B, ...], the same views)."""
        split = self._split_time
        return self._operations(split(sent_a), split(sent_b), split(estimate_a), split(estimate_b))

    # The state after the last step, each shaped like that step's operand (or output), or None.
    @property
    def cum_a(self) -> Optional[torch.Tensor]:
        return None if self.state is None else self.state[0].view(self._shapes[0])

    @property
    def cum_b(self) -> Optional[torch.Tensor]:
        return None if self.state is None else self.state[1].view(self._shapes[1])

    @property
    def prev_total(self) -> Optional[torch.Tensor]:
        return None if self.state is None else self.state[2].view(self._shapes[2])

    def _count_nonzero(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        counts = self.kernels.nonzero_counts(x, dim)
        return _nonzero_counts(x, dim) if counts is None else counts.double()

    def run_chunk(self, a_steps: torch.Tensor, b_steps: torch.Tensor, state, t0: int, keep: bool,
                  scale: Optional[float] = None):
        """K steps of [K, ...] operands: (outputs [K, ...], per-step operation counts [K] float64
        or None, (cum_a, cum_b, last total) or None without keep)."""
        cum_a, cum_b, prev = state if state is not None else (None, None, None)
        kernels = self.kernels
        if self.backend == 'native':
            a_steps, b_steps = a_steps.float(), b_steps.float()
        sums_a = kernels.running_sums(a_steps, cum_a)
        sums_b = kernels.running_sums(b_steps, cum_b)
        with torch.autocast(sums_a.device.type, enabled=False):
            if sums_a.shape[0] == 1:  # one step: the operands as given (any ranks, broadcasting as the op does)
                totals = self._op(sums_a[0], sums_b[0]).float().unsqueeze(0)
            else:
                totals = self._op(sums_a, sums_b).float()
        operations = self._operations(a_steps, b_steps, sums_a, sums_b) if self.count_operations else None
        out, last = kernels.scaled_differences(totals.contiguous(), prev, t0, keep,
                                               1.0 if scale is None else float(scale))
        new_state = None
        if keep:
            new_state = (sums_a[-1].reshape(-1).clone(), sums_b[-1].reshape(-1).clone(), last.reshape(-1))
        return out, operations, new_state

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
        """The EC product's output for the chunk's steps, times ``scale`` if given (the same as
        multiplying the output afterwards, without another pass over it)."""
        self._check_device(a)
        a_steps, b_steps = self._split_time(a.detach()), self._split_time(b.detach())
        out, operations, state = self.run_chunk(a_steps, b_steps, self.state, self.steps, not self.clock.last, scale)
        self._shapes = (a_steps.shape[1:], b_steps.shape[1:], out.shape[1:])
        self.last_operations = operations
        self._advance(state)
        return out[0] if out.shape[0] == 1 else out.flatten(0, 1)


class AtNeuron(_ECProduct):
    """Expectation compensation of a matrix product ``a @ b`` of two time-varying operands
    (q·kᵀ, attention·v): see :class:`_ECProduct`."""

    def _op(self, a, b):
        return a @ b

    def _operations(self, a, b, cum_a, cum_b):
        """Per step: nz(a)·nz(b) + nz(a)·nz(B) + nz(A)·nz(b), each the multiply-adds of ``a @ b``
        whose two factors are non-zero, from non-zero counts per column of the left operand and
        per row of the right one (no matrix product). Float32 sums of 0/1 are exact."""
        count = self._count_nonzero
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


def skip_prefixes(model: nn.Module) -> Tuple[str, ...]:
    # Modules that only ever see the constant input (direct coding) are outside the converted region.
    return tuple(getattr(model, 'ecmt_input_modules', ('patch_embed',)))


def in_region(name: str, skip: Tuple[str, ...]) -> bool:
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
                                        fc2_thresholds: Optional[Tuple[float, float]] = None,
                                        coding: str = 'rate') -> nn.Module:
    """Replace every calibrated :class:`TestNeuron` by an MT :class:`TwoSideNeuron` of ``coding``
    ('rate', or 'differential': ECMT_SPEC 14).

    Levels and thresholds per place follow ECMT_SPEC 4; ``fc2_thresholds`` (θp, θn) overrides the
    calibrated fc2 thresholds (the ViT default is (0.25, 0.08)). Raises :class:`ConversionError`
    naming the places whose calibrated thresholds are all zero or not finite.
    """
    for name, value in (('linear_num', linear_num), ('qkv_num', qkv_num), ('softmax_num', softmax_num)):
        if int(value) < 1:
            raise ConversionError(f'{name} must be >= 1, got {value}')
    if not softmax_p > 0:
        raise ConversionError(f'softmax_p must be > 0, got {softmax_p}')
    if coding not in CODINGS:
        raise ConversionError(f'unknown coding {coding!r}; choose one of {", ".join(CODINGS)}')
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
        new = TwoSideNeuron(neuron.place, scale_p, scale_n, levels, coding).to(neuron.scale_p.device)
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
                   backend: Optional[str] = None, coding: str = 'rate') -> nn.Module:
    """All of ``snn`` mode's surgery on a model holding calibrated :class:`TestNeuron` s:
    MT neurons of ``coding`` ('rate' or 'differential', ECMT_SPEC 14), EC nonlinear modules, EC products, the check that nothing stays analog, and one
    backend for the whole model on its device (``backend``: 'auto'/None, 'native', 'triton' or
    'eager'; one that cannot run there is a ConversionError) with that backend's fusions
    (:func:`set_backend`)."""
    replace_testneuron_by_twosideneuron(model, linear_num, qkv_num, softmax_num, softmax_p, fc2_thresholds, coding)
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
                                  child.coding).to(child.scale_p.device)
            plain.backend, plain.count_levels, plain.level_counts = child.backend, child.count_levels, child.level_counts
            plain.count_nonzero = child.count_nonzero
            plain.record_sent = child.record_sent
            setattr(parent, attr, plain)
        elif isinstance(child, ECPassThrough):
            ec = exp_comp_neuron(child.module)
            ec.backend = child.backend
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
                and all(n.kernels.FUSES for n in neurons)):
            module.fuse_qkv = True
            fused += 1
        pairs = getattr(module, 'ecmt_fusable', None)
        if pairs is None:
            continue
        for ec_name, between_names, neuron_name in pairs():
            ec, neuron = getattr(module, ec_name, None), getattr(module, neuron_name, None)
            between = [getattr(module, name, None) for name in between_names]
            if (type(ec) is exp_comp_neuron and ec.kind in FUSABLE_KINDS and type(neuron) is TwoSideNeuron
                    and neuron.kernels.FUSES and ec.backend == neuron.backend
                    and _between_is_identity(between)):
                passthrough = ECPassThrough(ec.module)
                passthrough.backend = ec.backend
                setattr(module, neuron_name, ECNeuron(neuron, ec.module))
                setattr(module, ec_name, passthrough)
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

    Differential neurons (ECMT_SPEC 14) transmit their spikes s, not their outputs y = r + s: their
    ``last_nonzero`` counts s, so a linear layer they feed counts nz(s) x out_features; the neurons
    that feed products (:data:`PRODUCT_PLACES`) leave their s and their estimates before each step
    (``record_sent``), and an EC product whose two operands are views of two such neurons'
    outputs counts nz(s_a)·nz(s_b) + nz(s_a)·nz(r_b) + nz(r_a)·nz(s_b) (``sent_operations``).
    A product with another operand (an analog one, or a copy such as grouped-query attention's
    repeated k/v) keeps the count of section 8 on the operands as given. Level counts are of s.

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
        # SOPs are added up as each hook runs (a hook keeps no tensor: a batch's counts held until
        # the next batch pinned the heap like the neurons' counts, see TwoSideNeuron); dense
        # counts (plain numbers) are added up at the next batch or when read.
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
        # What differential neurons feeding products sent, by neuron: (the output, its version,
        # spikes s, estimates before each step), taken by the product. The output is held (not
        # weakly: its operand may be a view whose base object is gone) so that its memory cannot
        # be another tensor's; an entry lives until the product takes it or the neuron's next call.
        self._sent: Dict[int, Tuple[torch.Tensor, int, torch.Tensor, torch.Tensor]] = {}
        for _, neuron in self.neurons:
            neuron.count_nonzero = True
            neuron.count_levels = self.count_levels
            neuron.level_counts = None
            neuron.record_sent = neuron.coding == 'differential' and neuron.place in PRODUCT_PLACES
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
        self._sent.clear()
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
        self._grow(max(step for _, step in self._pending_dense) + 1, device)
        dense = torch.zeros_like(self._dense, device='cpu')
        for (i, t), value in self._pending_dense.items():
            dense[i, t] = value
        self._dense += dense.to(device)
        self._pending_dense.clear()

    def _grow(self, steps: int, device) -> None:
        """The totals hold at least ``steps`` steps, on ``device``."""
        if self._sops is None or self._sops.shape[1] < steps or self._sops.device != device:
            grown = torch.zeros(len(self.names), steps, dtype=torch.float64, device=device)
            grown_dense = torch.zeros_like(grown)
            if self._sops is not None:
                grown[:, :self._sops.shape[1]] = self._sops.to(device)
                grown_dense[:, :self._dense.shape[1]] = self._dense.to(device)
            self._sops, self._dense = grown, grown_dense

    def _add(self, index: int, counts: torch.Tensor, factor: float, dense_per_step: float, device) -> None:
        end = self.step + counts.numel()
        self._grow(end, device)
        self._sops[index, self.step:end] += counts.reshape(-1).double() * factor
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
        # Taken from the module, which then holds no tensor past its call (see TwoSideNeuron).
        counts, module.last_nonzero = module.last_nonzero, None
        self._posted = (weakref.ref(output), output._version, counts)
        if module.last_sent is not None:
            self._sent[id(module)] = (output, output._version, *module.last_sent)
            module.last_sent = None

    def _take_sent(self, x: torch.Tensor) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(spikes, estimates before each step) viewed as ``x`` is, if ``x`` is an unmodified view
        of a differential neuron's output (the same memory and version), else None. Taken once:
        the monitor holds no neuron's spikes past the product that uses them."""
        for key, (output, version, spikes, estimates) in list(self._sent.items()):
            if (output.untyped_storage().data_ptr() == x.untyped_storage().data_ptr() and x._version == version
                    and x.dtype == spikes.dtype and output.is_contiguous() and spikes.shape == output.shape):
                del self._sent[key]
                offset = x.storage_offset() - output.storage_offset()
                return (spikes.as_strided(x.shape, x.stride(), spikes.storage_offset() + offset),
                        estimates.as_strided(x.shape, x.stride(), estimates.storage_offset() + offset))
        return None

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
        a, b = inputs[:2]
        counts, module.last_operations = module.last_operations, None
        if self._sent:
            sent_a, sent_b = self._take_sent(a), self._take_sent(b)
            if sent_a is not None and sent_b is not None:
                counts = module.sent_operations(sent_a[0], sent_b[0], sent_a[1], sent_b[1])
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
            neuron.count_levels = neuron.count_nonzero = False
            neuron.last_nonzero = None
            neuron.record_sent = False
            neuron.last_sent = None
        self._sent.clear()
        for product in self._products:
            product.count_operations = False
            product.last_operations = None
        self._posted = None
