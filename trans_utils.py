"""ECMT modules: placeholders, multi-threshold neurons, expectation compensation, products.

The semantics are those of ``ECMT_SPEC.md`` (the published ECMT scripts, with their quirks fixed):

* ``MyTestPlace``   identity placeholder at every activation hand-off (``ann`` mode);
* ``TestNeuron``    the placeholder while calibrating (``for_v``): running mean of exact quantiles;
* ``TwoSideNeuron`` the multi-threshold (MT) neuron of ``snn`` mode;
* ``exp_comp_neuron`` expectation compensation (EC) of a nonlinear module (softmax, GELU, LayerNorm);
* ``MyAt`` / ``AtNeuron`` the product of two time-varying operands, plain and EC;
* ``MyMul`` / ``MulNeuron`` the element-wise product of a gated MLP, plain and EC.

The surgery that puts them in a model (``convert_to_snn`` and its steps, ``set_backend``, the
fusions) is in :mod:`conversion`; its names are given here too. Public names are the published
ones so that researchers' scripts keep working. Every module that
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
one signature per kernel (``kernels.native``, ``kernels.triton``, ``kernels.eager``). Fusions
(an EC module with the neuron it feeds; an attention's q/k/v neurons reading the qkv output) are
made then too, as modules that own their state. Running state is float32 whatever the autocast
dtype, and is not kept past a batch's last chunk.
"""
from __future__ import annotations

import itertools
from typing import Dict, Iterable, List, NamedTuple, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from kernels import (BACKEND_CHOICES, BACKENDS, Backend, ConversionError, backend_problem, channel_map, kernels_of,
                     level_table, level_width, resolve_backend, set_default_backend)
from kernels.eager import ec_function_steps
from options import CODINGS, FIRE_RULES
from calibration import UNCALIBRATED_PLACES, TestNeuron, sync_calibration, tail_quantiles  # noqa: F401 (published names)
from multistep import ONE_STEP, Chunk, MultiStep  # noqa: F401

__all__ = [
    'PLACES', 'ConversionError', 'StatefulModule', 'MyTestPlace', 'TestNeuron', 'TwoSideNeuron',
    'exp_comp_neuron', 'ECNeuron', 'ECPassThrough', 'MyAt', 'AtNeuron', 'MyMul', 'MulNeuron', 'MultiStep',
    'Chunk', 'mt_fire', 'tail_quantiles', 'replace_test_by_testneuron', 'replace_testneuron_by_twosideneuron',
    'replace_nonlinear_by_neuron', 'replace_at_by_neuron', 'convert_to_snn', 'get_modules',
    'reset_net', 'set_backend', 'set_default_backend', 'resolve_backend', 'backend_problem', 'kernels_of',
    'BACKENDS', 'BACKEND_CHOICES', 'threshold_config',
    'EC_MODULE_TYPES', 'register_ec_module', 'register_snn_modules', 'check_fully_converted', 'BaseMonitor', 'SOPMonitor',
    'product_nonzero_macs', 'spike_level_counts', 'fuse_ec_neurons', 'CODINGS', 'Recording', 'NO_RECORDING',
    'NeuronRecord', 'ProductRecord', 'ECRecord', 'NeuronState', 'ECState', 'ECNeuronState', 'ProductState',
    'set_recording', 'set_clock', 'feed_graph', 'small_counts',
]

#: Placeholder kinds, in the order they appear in a transformer block (ECMT_SPEC section 2; 'gate'
#: and 'up' are the two operands of a gated MLP's element-wise product, section 12).
PLACES = ('fc_qkv', 'q', 'k', 'v', 's', 'fc_out', 'fc1', 'gate', 'up', 'fc2')


def get_modules(model: nn.Module, types: Tuple[type, ...] = ()) -> List[Tuple[str, nn.Module]]:
    """List ``(name, module)`` of the ECMT modules of ``model`` (or of ``types`` if given)."""
    types = types or (MyTestPlace, TestNeuron, TwoSideNeuron, exp_comp_neuron, MyAt, AtNeuron, MyMul,
                       MulNeuron)
    return [(name, m) for name, m in model.named_modules() if isinstance(m, types)]


def skip_prefixes(model: nn.Module) -> Tuple[str, ...]:
    # Modules that only ever see the constant input (direct coding) are outside the converted region.
    return tuple(getattr(model, 'ecmt_input_modules', ('patch_embed',)))


def in_region(name: str, skip: Tuple[str, ...]) -> bool:
    return not any(name == p or name.startswith(p + '.') for p in skip)



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


# ---------------------------------------------------------------------------------------------
# What a module records of each call, and what a monitor asks it to record
# ---------------------------------------------------------------------------------------------
class Recording(NamedTuple):
    """What the records of a stateful module hold beyond their step numbers; what costs time or
    memory is off unless a monitor asks for it, once, when it is attached (:func:`set_recording`)."""
    #: Neurons: the non-zero elements of what they sent, per step; products: operations per step.
    counts: bool = False
    #: Neurons: the spikes of the call per level (positive and negative side).
    levels: bool = False
    #: Differential neurons: the spikes s they sent and their estimates before each step.
    sent: bool = False


NO_RECORDING = Recording()


def small_counts(counts: torch.Tensor):
    """A record's small count tensor as the record keeps it: on a GPU the tensor itself (no host
    synchronisation inside a batch), on the CPU its values as (nested) tuples of Python numbers:
    a small tensor kept from one layer's call to the next batch sits between the large freed
    blocks of later layers and keeps glibc from reusing them (a CPU run's heap then grows with
    depth: measured +820 MiB at 12 blocks of ViT-S/16 against 4, batch 8, T=4, through the CLI).
    ``torch.as_tensor`` gives either back as a tensor."""
    if counts.device.type != 'cpu':
        return counts
    values = counts.tolist()
    return tuple(tuple(v) if isinstance(v, list) else v for v in values)


class NeuronRecord(NamedTuple):
    """What an MT neuron did in its last call (``last_record``), replaced at every call. Counts
    are kept as :func:`small_counts` gives them."""
    first_step: int                    # t0: the steps of the batch before this call
    steps: int                         # K: the steps of this call
    nonzero: Optional[Sequence]        # [K]: non-zero elements sent per step (s, differential)
    levels: Optional[Sequence]         # [2, levels]: spikes of this call per level
    sent: Optional[torch.Tensor]       # differential: the spikes s, shaped and laid out as the output
    estimates: Optional[torch.Tensor]  # differential: the estimates r before each step, as ``sent``


class ProductRecord(NamedTuple):
    """What an EC product did in its last call (``last_record``)."""
    first_step: int
    steps: int
    operations: Optional[Sequence]      # [K] float64 (small_counts): operations of ECMT_SPEC 8 per step
    dense: float                        # the dense product's operations of the call (all steps)


class ECRecord(NamedTuple):
    """What an EC module did in its last call: the steps (its outputs are all dense)."""
    first_step: int
    steps: int


def set_recording(model: nn.Module, recording: Recording = NO_RECORDING,
                  names: Optional[Iterable[str]] = None) -> None:
    """What the records of ``model``'s stateful modules hold from their next call on (all of them,
    or those named in ``names``): a monitor calls it when it is attached, and with
    :data:`NO_RECORDING` when it is removed. Thresholds, states and outputs are not touched."""
    wanted = None if names is None else set(names)
    for name, module in model.named_modules():
        if isinstance(module, StatefulModule) and (wanted is None or name in wanted):
            module.recording = recording


def set_clock(model: nn.Module, clock: 'Chunk' = ONE_STEP) -> List['StatefulModule']:
    """Give every stateful module of ``model`` the clock (:class:`Chunk`) that says how many steps
    its next calls hold (:class:`MultiStep` shares one and sets it before each pass; the default,
    one step per call, when it closes). Returns the modules, found afresh (no cache to go stale
    after module surgery)."""
    modules = [m for m in model.modules() if isinstance(m, StatefulModule)]
    for module in modules:
        module.clock = clock
    return modules


# ---------------------------------------------------------------------------------------------
# Stateful modules: one chunk function each, time-major chunks of steps
# ---------------------------------------------------------------------------------------------
class StatefulModule(nn.Module):
    """Base of every module that keeps state across time steps (neurons, EC modules, EC products).

    Inputs and outputs are time-major, the K steps of a chunk folded into the batch: [K*B, ...],
    the layout timm's code runs on unchanged; only these modules view it as [K, B, ...]. Each
    subclass has ONE chunk function, ``run_chunk(inputs of K steps, state, t0, keep) -> (outputs,
    state, record)``, on its kernels, whatever K: called directly, a module takes one step per
    call (K = 1 of the same function). Its forward only splits time, calls it, keeps the returned
    state (a NamedTuple of the subclass, the same fields whatever the options) and its record
    (``last_record``, what the call did, for monitors to read), and advances ``steps`` (the steps
    of the batch so far: the first step number t0 of the next chunk). ``clock`` (a :class:`Chunk`)
    says how many steps a call holds and whether it ends the batch; after a batch's last chunk the
    module holds no state (memory does not grow with depth). The state is None after
    :meth:`reset` and takes its shape from the first chunk.

    ``kernels`` (:class:`kernels.Backend`) is given at conversion (:func:`set_backend`); a module
    made and called on its own takes the default backend for its first input's device, once.
    ``recording`` (:func:`set_recording`) says what its records hold.
    """
    kind = 'function'

    def __init__(self) -> None:
        super().__init__()
        self.steps = 0
        self.clock = ONE_STEP
        self.kernels: Optional[Backend] = None
        self.recording = NO_RECORDING
        self.state = None
        self.last_record = None
        self.step_shape: Tuple[int, ...] = ()  # of one step's input (the state is kept flat)
        self._device_checked: Optional[torch.device] = None

    @property
    def backend(self) -> Optional[str]:
        """The name of the kernels' backend (None before the first call of a module on its own)."""
        return None if self.kernels is None else self.kernels.name

    @backend.setter
    def backend(self, name: str) -> None:
        self.kernels = kernels_of(name)
        self._device_checked = None

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
        if x.device == self._device_checked:
            return
        if self.kernels is None:
            self.kernels = kernels_of(resolve_backend(None, x.device))
        problem = self.kernels.problem_on(x.device)
        if problem is not None:
            raise RuntimeError(f'this {type(self).__name__} runs on the {self.kernels.name} backend, which cannot '
                               f'take this input ({problem}): call trans_utils.set_backend(model) after moving the model')
        self._device_checked = x.device

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the kernels read it (float32 unless they read its dtype as it is)."""
        return x if x.dtype in self.kernels.INPUT_DTYPES else x.float()

    def _shaped(self, flat: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if flat is None else flat.view(self.step_shape)

    def _advance(self, state, record) -> None:
        """Keep the chunk's final state (nothing after a batch's last chunk) and its record."""
        self.last_record = record
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


class NeuronState(NamedTuple):
    """An MT neuron's state after a chunk, flat: the membrane, and a differential neuron's running
    estimate (None for rate coding)."""
    membrane: torch.Tensor
    estimate: Optional[torch.Tensor]


class TwoSideNeuron(StatefulModule):
    """Multi-threshold neuron of ``snn`` mode (ECMT_SPEC 4).

    Each step: ``v += x``; emit at most one spike of ``+scale_p * 2^j`` or ``-scale_n * 2^j``
    (``j < levels``); ``v -= spike``. The output is the spike (float32, the shape of ``x``).
    State: :class:`NeuronState`, with the level table built from ``scale_p``/``scale_n`` at a
    batch's first chunk (thresholds changed in place apply from the next batch). Its record
    (:class:`NeuronRecord`) holds what ``recording`` asks for: the non-zero spikes per step (which
    the kernels count in their own pass), the spikes per level, a differential neuron's spikes
    and estimates. Given ``qkv_part=(part, heads)``, the input is an attention's fused qkv linear
    output [K*B, N, 3*heads*D] and the neuron (q: part 0, k: 1, v: 2) reads its own part of it in
    place, returning [K*B, heads, N, D] as on the split view.

    ``coding='differential'`` (ECMT_SPEC 14): the neuron keeps a running estimate r too and, at
    step t, fires the same rule on ``(v + x) - r``, keeps ``v = u - s``, outputs ``y = r + s`` and
    updates ``r += s / t``. Its output is y (what the next module computes with); what it
    transmits, and what its record counts, is s.
    """
    kind = 'neuron'

    def __init__(self, place: str, scale_p: float | torch.Tensor, scale_n: float | torch.Tensor,
                 levels: int, coding: str = 'rate', fire_rule: str = 'ecmt') -> None:
        super().__init__()
        if levels < 1:
            raise ValueError(f'levels must be >= 1, got {levels}')
        if coding not in CODINGS:
            raise ValueError(f'unknown coding {coding!r}; choose one of {", ".join(CODINGS)}')
        if fire_rule not in FIRE_RULES:
            raise ValueError(f'unknown fire rule {fire_rule!r}; choose one of {", ".join(FIRE_RULES)}')
        self.place = place
        self.levels = int(levels)
        self.coding = coding
        self.fire_rule = fire_rule
        scale_p, scale_n = (torch.as_tensor(t, dtype=torch.float32) for t in (scale_p, scale_n))
        if scale_p.shape != scale_n.shape and scale_p.numel() * scale_n.numel() > 1:
            scale_p, scale_n = torch.broadcast_tensors(scale_p, scale_n)
        # One pair (shape [1], ECMT_SPEC 4) or per channel (ECMT_SPEC 15: a shape that broadcasts
        # right-aligned against one step's input, e.g. [C] or [heads, 1, D]).
        self.register_buffer('scale_p', scale_p.reshape(-1 if scale_p.numel() == 1 else scale_p.shape).clone())
        self.register_buffer('scale_n', scale_n.reshape(-1 if scale_n.numel() == 1 else scale_n.shape).clone())
        self._table: Optional[torch.Tensor] = None
        self._channels: Tuple[int, int, int] = (1, 1, 1)

    def reset(self) -> None:
        super().reset()
        self._table = None

    def level_table(self, step_shape: Optional[Tuple[int, ...]] = None) -> torch.Tensor:
        """The level table of this batch (built from the thresholds at a batch's first chunk; with
        per-channel thresholds, for steps of ``step_shape`` (the kernel's output of one step): see
        :meth:`channels`)."""
        if self._table is None:
            theta_p, theta_n = self.scale_p, self.scale_n
            self._channels = (1, 1, 1)
            if theta_p.numel() > 1:
                if step_shape is None:
                    raise ValueError(f'{self.place} neuron: per-channel thresholds need the shape of a step')
                try:
                    self._channels = channel_map(tuple(theta_p.shape), step_shape)
                except ValueError:  # a layout the kernels' map cannot express: one channel per element
                    theta_p, theta_n = (t.expand(step_shape[1:]).contiguous() for t in (theta_p, theta_n))
                    self._channels = (1, 1, theta_p.numel())
            self._table = level_table(theta_p, theta_n, self.levels, fire_rule=self.fire_rule)
        return self._table

    def channels(self) -> Tuple[int, int, int]:
        """The kernels' channel map of this batch's table (:func:`kernels.channel_map`)."""
        return self._channels

    @property
    def membrane(self) -> Optional[torch.Tensor]:
        """The membrane potential after the last step (shaped like one step's input), or None."""
        return None if self.state is None else self._shaped(self.state.membrane)

    @property
    def estimate(self) -> Optional[torch.Tensor]:
        """A differential neuron's running estimate r after the last step (shaped like one step's
        input), or None."""
        return None if self.state is None else self._shaped(self.state.estimate)

    @property
    def wants_sent(self) -> bool:
        """Whether a call must also give the spikes s (a differential neuron whose record holds
        its spikes per level or its spikes and estimates)."""
        return self.coding == 'differential' and (self.recording.levels or self.recording.sent)

    def kernel_arguments(self, state: Optional[NeuronState], t0: int) -> Dict:
        """The keywords of this neuron's coding for its kernels, from its state before a chunk."""
        if self.coding != 'differential':
            return {}
        return dict(coding='differential', estimate=None if state is None else state.estimate, t0=t0,
                    sent=self.wants_sent)

    def run_chunk(self, xs: torch.Tensor, state: Optional[NeuronState], t0: int, keep: bool,
                  qkv_part: Optional[Tuple[int, int]] = None):
        """K steps: (outputs [K, ...], :class:`NeuronState` or None without keep, :class:`NeuronRecord`).
        ``xs``: [K, ...], or the fused qkv output [K, B, N, 3*heads*D] with ``qkv_part``."""
        xs = self._input(xs)
        membrane = None if state is None else state.membrane
        coding = self.kernel_arguments(state, t0)
        start = self.start_estimate(state)  # before the kernels update the state in place
        if qkv_part is not None:
            part, heads = qkv_part
            table = self.level_table(_qkv_step_shape(xs, heads))
            result = self.kernels.qkv_mt_steps(xs.contiguous(), part, heads, table, membrane, keep,
                                               channels=self._channels, **coding)
        else:
            table = self.level_table(tuple(xs.shape[1:]))
            result = self.kernels.mt_steps(xs, table, membrane, keep, channels=self._channels, **coding)
        return self.chunk_from_kernel(result, start, t0, keep)

    def start_estimate(self, state: Optional[NeuronState]) -> Optional[torch.Tensor]:
        """A copy of the estimate before a chunk, where the record will need it (a differential
        neuron recording what it sent), else None."""
        if state is None or self.coding != 'differential' or not self.recording.sent:
            return None
        return state.estimate.clone()

    def chunk_from_kernel(self, result: tuple, start: Optional[torch.Tensor], t0: int, keep: bool):
        """:meth:`run_chunk`'s result from what a neuron kernel returned for this neuron's chunk
        (``start``: :meth:`start_estimate` of the state before it)."""
        if self.coding == 'differential':
            out, counts, membrane, estimate, spikes = result
        else:
            out, counts, membrane = result
            estimate, spikes = None, out
        new_state = NeuronState(membrane, estimate) if keep else None
        recording = self.recording
        levels = (small_counts(spike_level_counts(spikes, self.scale_p, self.scale_n, self.levels))
                  if recording.levels else None)
        sent = estimates = None
        if recording.sent and self.coding == 'differential':
            sent = spikes
            estimates = _estimates_before(spikes, start, t0)
        record = NeuronRecord(t0, out.shape[0], small_counts(counts) if recording.counts else None, levels, sent,
                              estimates)
        return out, new_state, record

    @torch.no_grad()
    def forward(self, x: torch.Tensor, qkv_part: Optional[Tuple[int, int]] = None,
                shared: Optional['SharedQKV'] = None) -> torch.Tensor:
        self._check_device(x)
        xs = self._split_time(x.detach())
        self.step_shape = tuple(xs.shape[1:]) if qkv_part is None else (xs.shape[1], qkv_part[1], xs.shape[2], -1)
        if shared is not None:
            out, state, record = shared.take(self, xs)
        else:
            out, state, record = self.run_chunk(xs, self.state, self.steps, not self.clock.last, qkv_part)
        shape = (-1,) + tuple(out.shape[2:]) if qkv_part is not None else x.shape
        if record.sent is not None:
            record = record._replace(sent=record.sent.reshape(shape), estimates=record.estimates.reshape(shape))
        self._advance(state, record)
        return out.reshape(shape)

    def extra_repr(self) -> str:
        coding = '' if self.coding == 'rate' else f', coding={self.coding}'
        rule = '' if self.fire_rule == 'ecmt' else f', fire_rule={self.fire_rule}'
        if self.scale_p.numel() == 1:
            thresholds = f'scale_p={self.scale_p.item():.6g}, scale_n={self.scale_n.item():.6g}'
        else:
            thresholds = (f'scale_p=mean {self.scale_p.mean().item():.6g} per channel {tuple(self.scale_p.shape)}, '
                          f'scale_n=mean {self.scale_n.mean().item():.6g}')
        return f'place={self.place}, levels={self.levels}, {thresholds}{coding}{rule}, backend={self.backend}'


def _estimates_before(spikes: torch.Tensor, start: Optional[torch.Tensor], t0: int) -> torch.Tensor:
    """The estimates r before each step of a differential neuron's chunk, [K, ...] like its spikes
    s, from the estimate before the chunk (None: zero), with the neuron's own float operations
    (r + s / t, ECMT_SPEC 14)."""
    r = torch.zeros_like(spikes[0]) if start is None else start.view(spikes.shape[1:]).clone()
    before = torch.empty_like(spikes)
    for k in range(spikes.shape[0]):
        before[k] = r
        r = r + spikes[k] / torch.full_like(spikes[k], float(t0 + k + 1))
    return before


def _qkv_step_shape(qkv_steps: torch.Tensor, heads: int) -> Tuple[int, int, int, int]:
    """One step's output shape [B, heads, N, D] of a q/k/v neuron on a fused qkv output
    [K, B, N, 3 * heads * D]."""
    _, B, N, width = qkv_steps.shape
    return (B, heads, N, width // (3 * heads))


class SharedQKV:
    """One forward's fused qkv output, shared by an attention's q, k and v neurons (made by the
    attention for that call and dropped after it; it outlives no call).

    A neuron given it (``TwoSideNeuron.forward(qkv, qkv_part=(part, heads), shared=...)``) takes
    its part through :meth:`take`: the first of the three runs all of them in ONE pass of their
    kernels' ``qkv_parts_mt_steps`` (each token's row read once, not a third of it three times:
    on the CPU about a fifth less time for the three neurons), from copies of the three neurons'
    states and their level tables; each neuron then takes its own outputs, state and record (made
    by its own :meth:`TwoSideNeuron.chunk_from_kernel`) and keeps them in its own forward. Where
    the three cannot go together (other kernels, coding or level width; different steps or
    states), each neuron runs its own chunk function, as it would alone."""

    def __init__(self, heads: int, neurons: Sequence['TwoSideNeuron']) -> None:
        self.heads, self.neurons = heads, tuple(neurons)
        self.results: Optional[List] = None

    def _joint(self) -> bool:
        first = self.neurons[0]
        return (len(self.neurons) == 3
                and all(type(n).run_chunk is TwoSideNeuron.run_chunk for n in self.neurons)
                and all(n.kernels is first.kernels and n.coding == first.coding and n.clock is first.clock
                        and n.steps == first.steps and (n.state is None) == (first.state is None)
                        and level_width(n.levels) == level_width(first.levels) for n in self.neurons))

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
            return neuron.run_chunk(xs, neuron.state, neuron.steps, keep, (part, self.heads))
        self.results[part] = None  # nothing kept past the neuron that takes it
        # The kernels had copies of the states: the neuron's own are as before the chunk.
        return neuron.chunk_from_kernel(result, neuron.start_estimate(neuron.state), neuron.steps, keep)

    def _run_joint(self, xs: torch.Tensor, keep: bool) -> List:
        neurons, first = self.neurons, self.neurons[0]
        xs = first._input(xs)
        # Copies: the kernels update the states they are given, and these are the neurons' own.
        membranes = [None if n.state is None else n.state.membrane.clone() for n in neurons]
        extra = {}
        if first.coding == 'differential':
            extra = dict(coding='differential',
                         estimates=[None if n.state is None else n.state.estimate.clone() for n in neurons],
                         t0=first.steps, sents=[n.wants_sent for n in neurons])
        tables = [n.level_table(_qkv_step_shape(xs, self.heads)) for n in neurons]
        return first.kernels.qkv_parts_mt_steps(xs.contiguous(), self.heads, tables, membranes, keep,
                                                channels=[n.channels() for n in neurons], **extra)


# ---------------------------------------------------------------------------------------------
# Expectation compensation
# ---------------------------------------------------------------------------------------------
def _layer_norm_types() -> Tuple[type, ...]:
    try:
        from timm.layers import LayerNorm as TimmLayerNorm
    except ImportError:  # pragma: no cover
        return (nn.LayerNorm,)
    return (nn.LayerNorm, TimmLayerNorm)


#: Module types declared by :func:`conversion.register_ec_module`, with their EC kind.
_EC_REGISTERED: Dict[type, str] = {}


def _ec_kind(module: nn.Module) -> str:
    """'gelu', 'softmax' (over the last dimension) or 'layer_norm' (over the last dimension) for a
    function the native and Triton kernels know exactly, else 'function' (the module is called)."""
    try:
        from timm.layers import GELU as TimmGELU, GELUTanh
    except ImportError:  # pragma: no cover
        TimmGELU = GELUTanh = ()
    if type(module) in _EC_REGISTERED:
        return _EC_REGISTERED[type(module)]
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



class ECState(NamedTuple):
    """An EC module's state after a chunk, flat: the running sum of inputs and the last total."""
    cum: torch.Tensor
    prev: torch.Tensor


class exp_comp_neuron(StatefulModule):
    """Expectation compensation of a nonlinear module f (ECMT_SPEC 5).

    With A_t the running sum of inputs after step t, the output is ``t*f(A_t/t) - (t-1)*f(A_(t-1)/(t-1))``,
    so the outputs summed over steps 1..t are ``t * f(mean input)``. A chunk of K steps takes the
    running means of all K steps, evaluates f once over all of them and returns the differences
    along time. State: :class:`ECState`. The wrapped module is ``self.module``; GELU, and a softmax
    or LayerNorm over the last dimension, run as the kernels' own multi-step kernels where the
    backend has them (``EC_KINDS``); every other function is the module itself called once on the
    K running means.
    """

    def __init__(self, module: nn.Module) -> None:
        self.kind = _ec_kind(module)
        super().__init__()
        self.module = module

    @property
    def cum_input(self) -> Optional[torch.Tensor]:
        """The running sum of inputs after the last step (shaped like one step's input), or None."""
        return None if self.state is None else self._shaped(self.state.cum)

    @property
    def prev_total(self) -> Optional[torch.Tensor]:
        """``t * f(cum_input / t)`` of the last step t (shaped like one step's input), or None."""
        return None if self.state is None else self._shaped(self.state.prev)

    def run_chunk(self, xs: torch.Tensor, state: Optional[ECState], t0: int, keep: bool):
        """K steps of [K, B, ...]: (outputs [K, B, ...] float32, :class:`ECState` or None, :class:`ECRecord`)."""
        cum, prev = state if state is not None else (None, None)
        kernels = self.kernels
        if self.kind in kernels.EC_KINDS:
            flat, extra = _ec_kernel_arguments(self.kind, self.module, xs.float())
            out, cum, prev = _ec_steps(kernels, self.kind, flat, cum, prev, t0, keep, extra)
            out = out.view(xs.shape)
        else:
            out, cum, prev = ec_function_steps(self.module, xs, cum, prev, t0, keep)
        return out, (ECState(cum, prev) if keep else None), ECRecord(t0, xs.shape[0])

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_device(x)
        xs = self._split_time(x.detach())
        self.step_shape = tuple(xs.shape[1:])
        out, state, record = self.run_chunk(xs, self.state, self.steps, not self.clock.last)
        self._advance(state, record)
        return out.view(x.shape)


class ECPassThrough(nn.Module):
    """Where an EC module's output goes straight to an MT neuron and the two are fused
    (:func:`fuse_ec_neurons`), the EC module's place: it passes its input on unchanged to the
    :class:`ECNeuron` that computes both. Holds the wrapped function (``module``, so that its
    parameters keep their names), the kernels the EC module had, and no state."""

    def __init__(self, module: nn.Module, kernels: Optional[Backend] = None) -> None:
        super().__init__()
        self.module = module
        self.kind = _ec_kind(module)
        self.kernels = kernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class ECNeuronState(NamedTuple):
    """A fused EC module and MT neuron's state after a chunk, flat: the EC module's running sum and
    last total, the neuron's membrane and (differential coding) estimate."""
    cum: torch.Tensor
    prev: torch.Tensor
    membrane: torch.Tensor
    estimate: Optional[torch.Tensor]


class ECNeuron(TwoSideNeuron):
    """An MT neuron fed by an EC module, the two computed by one kernel of the backend
    (``ec_mt_steps``): the EC output never goes to memory. Made at conversion by
    :func:`fuse_ec_neurons` in the neuron's place (same name, thresholds and levels; the EC
    module's place becomes an :class:`ECPassThrough`), it takes the EC module's input and owns
    both states (:class:`ECNeuronState`). The same spikes, states and records as the two modules
    apart. ``ec_kind`` names the function ('gelu', 'softmax', 'layer_norm'); ``ec_function`` is
    the wrapped module (held by the pass-through)."""

    def __init__(self, neuron: TwoSideNeuron, function: nn.Module) -> None:
        super().__init__(neuron.place, neuron.scale_p, neuron.scale_n, neuron.levels, neuron.coding, neuron.fire_rule)
        self.kernels, self.recording = neuron.kernels, neuron.recording
        self.ec_kind = _ec_kind(function)
        self.__dict__['ec_function'] = function  # a reference, not a submodule (the pass-through holds it)

    def run_chunk(self, xs: torch.Tensor, state: Optional[ECNeuronState], t0: int, keep: bool, qkv_part=None):
        """K steps of EC then neuron: (outputs [K, ...], :class:`ECNeuronState` or None, :class:`NeuronRecord`)."""
        flat, extra = _ec_kernel_arguments(self.ec_kind, self.ec_function, xs.float())
        cum, prev, membrane, estimate = state if state is not None else (None,) * 4
        before = None if state is None else NeuronState(membrane, estimate)
        coding = self.kernel_arguments(before, t0)
        coding.pop('t0', None)  # ec_mt_steps takes the first step as its EC part does
        start = self.start_estimate(before)  # before the kernels update the state in place
        table = self.level_table(tuple(xs.shape[1:]))
        out, counts, cum, prev, *neuron = self.kernels.ec_mt_steps(
            self.ec_kind, flat, cum, prev, t0, keep, table, membrane, channels=self._channels, **extra, **coding)
        out = out.view(xs.shape)
        if self.coding == 'differential':
            membrane, estimate, spikes = neuron
            neuron_result = (out, counts, membrane, estimate, None if spikes is None else spikes.view(xs.shape))
        else:
            neuron_result = (out, counts, neuron[0])
        out, neuron_state, record = self.chunk_from_kernel(neuron_result, start, t0, keep)
        new_state = ECNeuronState(cum, prev, *neuron_state) if keep else None
        return out, new_state, record

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


class ProductState(NamedTuple):
    """An EC product's state after a chunk, flat: the running sums of both operands and the last
    total."""
    cum_a: torch.Tensor
    cum_b: torch.Tensor
    prev: torch.Tensor


class _ECProduct(StatefulModule):
    """Expectation compensation of a product of two time-varying operands (ECMT_SPEC 6); the
    subclasses supply the product (:meth:`_op`) and its operation count (:meth:`_operations`).

    With running sums A and B, the output at step t is ``A_t∘B_t / t - A_(t-1)∘B_(t-1) / (t-1)``.
    A chunk of K steps forms the running sums of both operands along time (float32), takes one
    batched product over all K (in float32 also under autocast: the totals grow like t²), and one
    fused pass scales each by 1/t, takes the differences along time and applies ``scale``. State:
    :class:`ProductState`. Its record (:class:`ProductRecord`) holds the per-step operation counts
    of ECMT_SPEC 8 when ``recording.counts`` asks for them, and the dense count.
    """
    kind = 'product'

    def _op(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _operations(self, a, b, cum_a, cum_b) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def dense_operations(self, a: torch.Tensor, b: torch.Tensor, out: torch.Tensor) -> float:
        """Operations of the dense product of one call (all its steps)."""
        raise NotImplementedError  # pragma: no cover

    def sent_operations(self, sent_a: torch.Tensor, sent_b: torch.Tensor, estimate_a: torch.Tensor,
                        estimate_b: torch.Tensor) -> torch.Tensor:
        """Per-step operations [K] float64 of a call whose two operands came from differential
        neurons (ECMT_SPEC 14): nz(s_a)·nz(s_b) + nz(s_a)·nz(r_b) + nz(r_a)·nz(s_b), with s the
        spikes sent and r the estimates before the step, each given as the operands were
        ([K*B, ...], the same views), K the steps of that call."""
        split = self._split_time
        return self._operations(split(sent_a), split(sent_b), split(estimate_a), split(estimate_b))

    # The state after the last step, each shaped like that step's operand (or output), or None.
    @property
    def cum_a(self) -> Optional[torch.Tensor]:
        return None if self.state is None else self.state.cum_a.view(self._shapes[0])

    @property
    def cum_b(self) -> Optional[torch.Tensor]:
        return None if self.state is None else self.state.cum_b.view(self._shapes[1])

    @property
    def prev_total(self) -> Optional[torch.Tensor]:
        return None if self.state is None else self.state.prev.view(self._shapes[2])

    def _count_nonzero(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        self._check_device(x)
        counts = self.kernels.nonzero_counts(x, dim)
        return _nonzero_counts(x, dim) if counts is None else counts.double()

    def run_chunk(self, a_steps: torch.Tensor, b_steps: torch.Tensor, state: Optional[ProductState], t0: int,
                  keep: bool, scale: Optional[float] = None):
        """K steps of [K, ...] operands: (outputs [K, ...], :class:`ProductState` or None without
        keep, :class:`ProductRecord`)."""
        cum_a, cum_b, prev = state if state is not None else (None, None, None)
        kernels = self.kernels
        a_steps, b_steps = self._input(a_steps), self._input(b_steps)
        sums_a = kernels.running_sums(a_steps, cum_a)
        sums_b = kernels.running_sums(b_steps, cum_b)
        with torch.autocast(sums_a.device.type, enabled=False):
            if sums_a.shape[0] == 1:  # one step: the operands as given (any ranks, broadcasting as the op does)
                totals = self._op(sums_a[0], sums_b[0]).float().unsqueeze(0)
            else:
                totals = self._op(sums_a, sums_b).float()
        operations = self._operations(a_steps, b_steps, sums_a, sums_b) if self.recording.counts else None
        dense = self.dense_operations(a_steps, b_steps, totals)
        out, last = kernels.scaled_differences(totals.contiguous(), prev, t0, keep,
                                               1.0 if scale is None else float(scale))
        new_state = None
        if keep:
            new_state = ProductState(sums_a[-1].reshape(-1).clone(), sums_b[-1].reshape(-1).clone(), last.reshape(-1))
        return out, new_state, ProductRecord(t0, a_steps.shape[0], None if operations is None else small_counts(operations),
                                             dense)

    @torch.no_grad()
    def forward(self, a: torch.Tensor, b: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
        """The EC product's output for the chunk's steps, times ``scale`` if given (the same as
        multiplying the output afterwards, without another pass over it)."""
        self._check_device(a)
        a_steps, b_steps = self._split_time(a.detach()), self._split_time(b.detach())
        out, state, record = self.run_chunk(a_steps, b_steps, self.state, self.steps, not self.clock.last, scale)
        self._shapes = (a_steps.shape[1:], b_steps.shape[1:], out.shape[1:])
        self._advance(state, record)
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
# Level counts (a neuron's record) and the feed graph (what a monitor looks producers up in)
# ---------------------------------------------------------------------------------------------
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
    # Thresholds of any shape broadcast against the spikes (one pair, or per channel).
    index = _spike_level_index(spike, theta_p, theta_n, levels).reshape(-1)
    counts = torch.bincount(index, minlength=2 * levels + 1)
    return counts[:2 * levels].view(2, levels)


def feed_graph(model: nn.Module) -> Dict[str, Tuple[Optional[str], ...]]:
    """Who feeds whom, as the model's convertible modules declare it (``ecmt_feeds()``: pairs of
    a consumer's attribute, a linear layer or a product, and the attributes of the places whose
    outputs are its operands, None for an operand that is not a place's output as it left it):
    {consumer's full name: (producer's full name or None, ...)}. A consumer not declared is fed by
    something else than a place (an analog input)."""
    graph: Dict[str, Tuple[Optional[str], ...]] = {}
    for prefix, module in model.named_modules():
        declared = getattr(module, 'ecmt_feeds', None)
        if declared is None:
            continue
        join = (lambda attr: f'{prefix}.{attr}') if prefix else (lambda attr: attr)
        for consumer, producers in declared():
            if getattr(module, consumer, None) is None:
                continue
            graph[join(consumer)] = tuple(None if p is None else join(p) for p in producers)
    return graph


_MONITOR_NAMES = ('BaseMonitor', 'SOPMonitor', 'product_nonzero_macs', 'E_AC', 'E_MAC')
_CONVERSION_NAMES = ('EC_MODULE_TYPES', 'LINEAR_MODULE_TYPES', 'FUSABLE_KINDS', 'replace_test_by_testneuron',
                     'threshold_config', 'replace_testneuron_by_twosideneuron', 'replace_nonlinear_by_neuron',
                     'replace_at_by_neuron', 'register_snn_modules', 'check_fully_converted', 'convert_to_snn',
                     'set_backend', 'fuse_ec_neurons', 'register_ec_module')


def __getattr__(name: str):
    """The published names of the monitors and the conversion (they live in ``monitors`` and
    ``conversion``, which import this module)."""
    if name in _MONITOR_NAMES:
        import monitors
        return getattr(monitors, name)
    if name in _CONVERSION_NAMES:
        import conversion
        return getattr(conversion, name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
