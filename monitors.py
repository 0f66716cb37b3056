"""What a converted network does, counted: synaptic operations (ECMT_SPEC 8 and 14), spikes per
level, and every operation class of the energy report, from ONE set of forward hooks.

Monitors read, modules own: a hook reads its module's inputs, output and ``last_record`` (the
record of what the call did, :class:`trans_utils.NeuronRecord` / ``ProductRecord``), and the
records of the neurons that feed it, looked up by name in the graph the model declares
(:func:`trans_utils.feed_graph`: which place feeds which linear layer or product). It never sets
an attribute of a module nor matches tensors by identity. What the records must hold is asked for
once, when the monitor is attached (:func:`trans_utils.set_recording`), and released on
:meth:`SOPMonitor.remove`.

:class:`SOPMonitor` holds the hooks and the SOP counts; :class:`EnergyMonitor` is a second view of
the same hooks (attached to a SOPMonitor, it adds the energy classes that ``energy.energy_report``
prices). ``engine_for_finetuning.simulate`` calls :meth:`SOPMonitor.new_batch` before each batch
and sets ``step`` (0-based first step of the chunk) and ``time_steps`` (K) before each pass.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.nn as nn

from energy import EC_STEP_OPS, PRODUCT_OUTPUT_OPS, WORD_BITS, function_ops
from trans_utils import (ECPassThrough, Recording, StatefulModule, TwoSideNeuron, _ECProduct, exp_comp_neuron,
                         feed_graph, set_recording)

__all__ = ['E_AC', 'E_MAC', 'BaseMonitor', 'SOPMonitor', 'EnergyMonitor', 'product_nonzero_macs']

#: Energy of one accumulate (AC) and one multiply-accumulate (MAC), in pJ (45 nm, ECMT_SPEC 8).
E_AC, E_MAC = 0.9, 4.6


def product_nonzero_macs(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Multiply-adds of ``a @ b`` whose two factors are both non-zero, without a product:
    for each inner index k, (non-zeros of a's column k) x (non-zeros of b's row k), summed."""
    cols = (a != 0).sum(dim=-2, dtype=torch.float32)   # [..., K]
    rows = (b != 0).sum(dim=-1, dtype=torch.float32)   # [..., K]
    return (cols * rows).sum(dtype=torch.float64)


def _view_as(record_tensor: torch.Tensor, operand: torch.Tensor) -> Optional[torch.Tensor]:
    """``record_tensor`` (laid out as a neuron's contiguous output) viewed as ``operand``, a view of
    that output, is laid out (the same strides and offset); None if ``operand`` cannot be one."""
    if operand.dtype != record_tensor.dtype or operand.untyped_storage().nbytes() != record_tensor.nbytes:
        return None
    return record_tensor.as_strided(operand.shape, operand.stride(),
                                    record_tensor.storage_offset() + operand.storage_offset())


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
    """Synaptic operations (SOPs) of every ``nn.Linear`` and every EC product, per time step, and
    the spikes per level of every MT neuron; the hooks of an :class:`EnergyMonitor` too.

    Linear layer: SOPs = non-zero input elements x out_features; dense = all input elements x
    out_features. EC matrix product at step t (operands a, b; running sums A, B including step t):
    SOPs = nz(a)·nz(b) + nz(a)·nz(B) + nz(A)·nz(b), each the multiply-adds whose two factors are
    non-zero; dense = the product's multiply-adds. EC element-wise product: the same three terms
    per element, against one dense operation per element. Firing rate after t steps
    r_t = SOPs(1..t) / dense(1..t) over all layers and images; energy relative to the ANN
    E_t = t · (0.9/4.6) · r_t (ECMT_SPEC 8). Counts come from non-zero counts, never from extra
    matrix products: a linear layer fed by an MT neuron (by the model's feed graph) takes the
    per-step counts in that neuron's record, which its kernel made in its own pass; each EC
    product counts its own operations (its record). They stay on the device (no host sync per
    step), and add up over all batches.

    Differential neurons (ECMT_SPEC 14) transmit their spikes s, not their outputs y = r + s: their
    records count s, so a linear layer they feed counts nz(s) x out_features; an EC product whose
    two operands come from two such neurons counts nz(s_a)·nz(s_b) + nz(s_a)·nz(r_b) + nz(r_a)·nz(s_b)
    from the spikes and estimates those neurons' records hold. A product with another operand (an
    analog one, or a copy such as grouped-query attention's repeated k/v) keeps the count of
    section 8 on the operands as given. Level counts are of s. ``count_levels=True`` counts the
    spikes per level on the first ``level_batches`` batches only (None: all).
    """

    def __init__(self, model: nn.Module, count_levels: bool = False,
                 level_batches: Optional[int] = None) -> None:
        super().__init__()
        if level_batches is not None and level_batches < 1:
            raise ValueError(f'level_batches must be >= 1 or None, got {level_batches}')
        self.model = model
        self.step = 0
        self.time_steps = 1
        self.batches = 0
        self.count_levels = bool(count_levels)
        self.level_batches = level_batches
        self.energy: Optional['EnergyMonitor'] = None
        self.names: List[str] = []   # the layers SOPs are counted for (linear layers, products)
        self.kinds: List[str] = []
        self._sops: Optional[torch.Tensor] = None    # [layers, steps] float64, on the device
        self._dense: Optional[torch.Tensor] = None   # [layers, steps] float64
        # Dense counts (plain numbers) are added up at the next batch or when read.
        self._pending_dense: Dict[Tuple[int, int], float] = {}
        self._device: Optional[torch.device] = None
        self._levels: Dict[str, torch.Tensor] = {}   # neuron name -> [2, levels] int64
        self.graph = feed_graph(model)
        self._modules = dict(model.named_modules())
        self.neurons = [(n, m) for n, m in self._modules.items() if isinstance(m, TwoSideNeuron)]
        self._sop_index: Dict[str, int] = {}
        for name, module in self._modules.items():
            kind = 'linear' if isinstance(module, nn.Linear) else 'product' if isinstance(module, _ECProduct) else None
            if kind is not None:
                self._sop_index[name] = len(self.names)
                self.names.append(name)
                self.kinds.append(kind)
        for name, module in self._modules.items():
            if isinstance(module, (nn.Linear, StatefulModule, ECPassThrough, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
                self.handles.append(module.register_forward_hook(
                    lambda mod, args, output, name=name: self._hook(name, mod, args, output)))
        self.handles.append(model.register_forward_pre_hook(self._count_images))
        self._request(levels=self.count_levels)

    # -- what the records hold -------------------------------------------------------------------
    def _senders(self) -> List[str]:
        """Differential neurons whose spikes and estimates a product's count needs (both operands
        of the product come from differential neurons)."""
        senders = []
        for consumer, producers in self.graph.items():
            if isinstance(self._modules.get(consumer), _ECProduct) and len(producers) == 2 and all(
                    isinstance(self._modules.get(p), TwoSideNeuron) and self._modules[p].coding == 'differential'
                    for p in producers):
                senders += list(producers)
        return senders

    def _request(self, levels: bool) -> None:
        set_recording(self.model, Recording(counts=True, levels=levels))
        set_recording(self.model, Recording(counts=True, levels=levels, sent=True), names=self._senders())

    def new_batch(self) -> None:
        """Counts add up over batches; only level counting stops after ``level_batches``."""
        self._flush()
        self.batches += 1
        if self.count_levels and self.level_batches is not None and self.batches == self.level_batches + 1:
            self._request(levels=False)

    @property
    def level_batches_counted(self) -> int:
        """Batches whose spikes the level counts cover."""
        if not self.count_levels:
            return 0
        return self.batches if self.level_batches is None else min(self.batches, self.level_batches)

    # -- totals ------------------------------------------------------------------------------------
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

    # -- the hooks ---------------------------------------------------------------------------------
    def _record_of(self, name: Optional[str]):
        """The record of the neuron ``name`` from this pass (its first step and steps those of the
        chunk), or None."""
        module = self._modules.get(name) if name is not None else None
        record = getattr(module, 'last_record', None) if isinstance(module, TwoSideNeuron) else None
        if record is None or record.first_step != self.step or record.steps != self.time_steps:
            return None
        return record

    def _count_images(self, module, args) -> None:
        if self.energy is not None:
            self.energy.count_images(args, self.step)

    def _hook(self, name: str, module: nn.Module, args, output) -> None:
        K = max(1, int(self.time_steps))
        if isinstance(module, TwoSideNeuron):
            record = module.last_record
            if record.levels is not None:
                levels = torch.as_tensor(record.levels, dtype=torch.int64, device=module.scale_p.device)
                total = self._levels.get(name)
                self._levels[name] = levels if total is None else total.add_(levels)
            if self.energy is not None:
                counts = (torch.as_tensor(record.nonzero, device=output.device) if record.nonzero is not None
                          else (output != 0).reshape(K, -1).sum(1))
                self.energy.count_neuron(name, module, output, counts, K, self.step)
        elif isinstance(module, nn.Linear):
            x = args[0]
            producers = self.graph.get(name, ())
            record = self._record_of(producers[0]) if len(producers) == 1 else None
            spikes = record is not None and record.nonzero is not None
            counts = torch.as_tensor(record.nonzero, device=x.device) if spikes else (x != 0).reshape(K, -1).sum(1)
            self._add(self._sop_index[name], counts, float(module.out_features),
                      float(x.numel() // K) * module.out_features, x.device)
            if self.energy is not None:
                self.energy.count_linear(name, module, x, output, K, self.step, spikes)
        elif isinstance(module, _ECProduct):
            a, b = args[:2]
            record = module.last_record
            counts = torch.as_tensor(record.operations, dtype=torch.float64, device=a.device)  # asked for at attach
            sent = self._sent_operations(name, module, a, b)
            if sent is not None:
                counts = sent
            self._add(self._sop_index[name], counts, 1.0, record.dense / counts.numel(), a.device)
            if self.energy is not None:
                self.energy.count_product(name, a, b, output, K, self.step)
        elif isinstance(module, (exp_comp_neuron, ECPassThrough)):
            if self.energy is not None:
                self.energy.count_function(name, module, args[0], K, self.step)
        elif isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            if self.energy is not None:
                self.energy.count_conv(name, module, output, self.step)

    def _sent_operations(self, name: str, module: _ECProduct, a: torch.Tensor, b: torch.Tensor
                         ) -> Optional[torch.Tensor]:
        """ECMT_SPEC 14's count of a product whose two operands are views of two differential
        neurons' outputs (by the feed graph), from their records' spikes and estimates."""
        producers = self.graph.get(name, ())
        if len(producers) != 2:
            return None
        records = [self._record_of(p) for p in producers]
        if any(r is None or r.sent is None for r in records):
            return None
        views = [(_view_as(r.sent, x), _view_as(r.estimates, x)) for r, x in zip(records, (a, b))]
        if any(v is None for pair in views for v in pair):
            return None
        (sent_a, est_a), (sent_b, est_b) = views
        return module.sent_operations(sent_a, sent_b, est_a, est_b)

    # -- results -----------------------------------------------------------------------------------
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
        if not self.count_levels:
            return []
        out = []
        for name, neuron in self.neurons:
            counts = self._levels.get(name)
            if counts is None:
                # Saw no batch here; zeros keep a distributed reduction in step with the others.
                counts = torch.zeros(2, neuron.levels, dtype=torch.int64, device=neuron.scale_p.device)
            counts = reduce(counts.clone()) if reduce is not None else counts
            counts = counts.cpu()
            entry = {'neuron': name, 'place': neuron.place, 'levels': neuron.levels,
                     'scale_p': float(neuron.scale_p.float().mean()), 'scale_n': float(neuron.scale_n.float().mean()),
                     'positive': counts[0].tolist(), 'negative': counts[1].tolist()}
            if neuron.scale_p.numel() > 1:  # per channel (ECMT_SPEC 15): the means above, and the shape
                entry['channels'] = list(neuron.scale_p.shape)
            out.append(entry)
        return out

    def remove(self) -> None:
        super().remove()
        set_recording(self.model)  # its counts stay readable (and its EnergyMonitor's)


class EnergyMonitor:
    """The energy classes (``energy.CLASSES``) of every module a converted model runs, per time
    step, and the ANN's for the same images: a second view of a :class:`SOPMonitor`'s hooks
    (``sop_monitor``; attach it before the run), whose SOPs it prices as ``synaptic`` and whose
    ``step`` / ``time_steps`` say which steps a call covers. Elements are counted from the shapes
    of inputs and outputs; the spikes a neuron emits from the non-zero counts in its record.
    Convolutions (the patch embedding) run once per image, outside the converted region: counted
    at step 1."""

    def __init__(self, model: nn.Module, sop_monitor: SOPMonitor) -> None:
        if sop_monitor.energy is not None:
            raise ValueError('this SOPMonitor already has an EnergyMonitor')
        self.sop = sop_monitor
        self.names: List[str] = []
        self.kinds: List[str] = []
        self.functions: Dict[int, Optional[str]] = {}
        self.analog_input: Dict[int, bool] = {}         # linear layers: fed by something not spikes
        self.sizes: Dict[int, Dict[str, float]] = {}     # bytes: weights, state and output per image
        self.images = 0
        self._snn: Dict[Tuple[int, int, str], float] = {}  # (module, step, key) -> count
        self._ann: Dict[Tuple[int, str], float] = {}       # (module, key) -> count
        self._spikes: Dict[int, torch.Tensor] = {}  # module -> non-zero spikes per step, float64
        self._index: Dict[str, int] = {}
        for name, module in model.named_modules():
            kind = self._kind(module)
            if kind is not None:
                self._index[name] = len(self.names)
                self.names.append(name)
                self.kinds.append(kind)
        sop_monitor.energy = self

    @staticmethod
    def _kind(module: nn.Module) -> Optional[str]:
        if isinstance(module, nn.Linear):
            return 'linear'
        if isinstance(module, _ECProduct):
            return 'product'
        if isinstance(module, TwoSideNeuron):
            return 'neuron'
        if isinstance(module, (exp_comp_neuron, ECPassThrough)):
            return f'ec_{module.kind}'
        if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
            return 'conv'
        return None

    def remove(self) -> None:
        """Stop counting (the SOPMonitor counts SOPs on until it is removed itself)."""
        if self.sop.energy is self:
            self.sop.energy = None

    def __enter__(self) -> 'EnergyMonitor':
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    @property
    def steps_counted(self) -> int:
        """The steps any count covers (1 before any)."""
        return 1 + max([t for _, t, _ in self._snn] + [c.numel() - 1 for c in self._spikes.values()] + [0])

    # -- bookkeeping -------------------------------------------------------------------------------
    def count_images(self, args, step: int) -> None:
        if step == 0 and args and torch.is_tensor(args[0]):
            self.images += int(args[0].shape[0])

    def _add(self, index: int, key: str, per_step: float, steps: int, first: int) -> None:
        """``per_step`` of ``key`` at each of the chunk's ``steps`` steps from ``first``."""
        if not per_step:
            return
        for t in range(first, first + steps):
            self._snn[index, t, key] = self._snn.get((index, t, key), 0.0) + per_step

    def _add_ann(self, index: int, key: str, value: float, step: int) -> None:
        if value and step == 0:  # what the ANN does once per image: count it with step 1
            self._ann[index, key] = self._ann.get((index, key), 0.0) + value

    def _size(self, index: int, what: str, nbytes: float) -> None:
        sizes = self.sizes.setdefault(index, {})
        sizes[what] = max(sizes.get(what, 0.0), float(nbytes))

    # -- one count per module type (called by the SOPMonitor's hook) -------------------------------
    def count_neuron(self, name: str, module: TwoSideNeuron, output: torch.Tensor, counts: torch.Tensor,
                     K: int, first: int) -> None:
        index = self._index[name]
        elements = float(output.numel()) / K
        batch = max(1, output.shape[0] // K) if output.dim() else 1
        self._add(index, 'neuron_add', elements, K, first)
        self._add(index, 'neuron_cmp', 2 * module.levels * elements, K, first)
        self._add(index, 'mem_state', 2 * elements, K, first)  # membrane read and written
        self._size(index, 'state', elements / batch * WORD_BITS / 8)
        self._size(index, 'act', elements / batch * WORD_BITS / 8)
        # Subtracts and spike writes: one per emitted spike (events), added up in place in one
        # small tensor per neuron.
        totals = self._spikes.get(index)
        if totals is None or totals.numel() < first + K:
            grown = torch.zeros(first + K, dtype=torch.float64, device=counts.device)
            if totals is not None:
                grown[:totals.numel()] = totals
            totals = self._spikes[index] = grown
        totals[first:first + K] += counts.detach().double()

    def count_function(self, name: str, module: nn.Module, x: torch.Tensor, K: int, first: int) -> None:
        """An EC function on ``x`` ([K*B, ...]): f and the bookkeeping at every step, its two states
        (running sum, last total) read and written per element, its output written per element;
        the ANN: f once. An EC module fused with the neuron it feeds leaves a pass-through in its
        place, fed the EC module's input: counted as the EC module (every backend reports the same)."""
        index = self._index[name]
        step_shape = (x.shape[0] // K,) + tuple(x.shape[1:])
        ops, function = function_ops(module.kind, module.module, step_shape)
        self.functions[index] = function
        elements = float(math.prod(step_shape))
        per_image = elements / max(1, step_shape[0])
        for op, n in ops.items():
            self._add(index, f'nl_{op}', n, K, first)
            self._add_ann(index, f'nl_{op}', n, first)
        for op, n in EC_STEP_OPS.items():
            self._add(index, f'nl_{op}', n * elements, K, first)
        self._add(index, 'mem_state', 4 * elements, K, first)
        self._size(index, 'state', 2 * per_image * WORD_BITS / 8)
        self._add_ann(index, 'mem_act', elements, first)
        self._add(index, 'mem_act', elements, K, first)
        self._size(index, 'act', per_image * WORD_BITS / 8)

    def count_product(self, name: str, a: torch.Tensor, b: torch.Tensor, output: torch.Tensor, K: int,
                      first: int) -> None:
        index = self._index[name]
        operands = float(a.numel() + b.numel()) / K
        out = float(output.numel()) / K
        batch = max(1, output.shape[0] // K) if output.dim() > 2 else 1
        self._add(index, 'nl_add', operands + PRODUCT_OUTPUT_OPS['add'] * out, K, first)
        self._add(index, 'nl_mul', PRODUCT_OUTPUT_OPS['mul'] * out, K, first)
        self._add(index, 'mem_state', 2 * (operands + out), K, first)  # A, B and the last total
        self._add(index, 'mem_act', out, K, first)
        self._add_ann(index, 'mem_act', out, first)
        self._size(index, 'state', (operands + out) / batch * WORD_BITS / 8)
        self._size(index, 'act', out / batch * WORD_BITS / 8)

    def count_linear(self, name: str, module: nn.Linear, x: torch.Tensor, output: torch.Tensor, K: int,
                     first: int, spikes: bool) -> None:
        """``spikes``: the input is an MT neuron's output (by the feed graph), else analog."""
        index = self._index[name]
        self.analog_input[index] = self.analog_input.get(index, False) or not spikes
        batch = max(1, x.shape[0] // K)
        weights = float(module.weight.numel() + (module.bias.numel() if module.bias is not None else 0))
        out = float(output.numel()) / K
        self._add(index, 'mem_weights', weights * batch, K, first)  # once per step and image
        self._add(index, 'mem_act', out, K, first)
        self._add_ann(index, 'mem_weights', weights * batch, first)
        self._add_ann(index, 'mem_act', out, first)
        self._size(index, 'weights', weights * WORD_BITS / 8)
        self._size(index, 'act', out / batch * WORD_BITS / 8)

    def count_conv(self, name: str, module: nn.Module, output: torch.Tensor, first: int) -> None:
        if first != 0:
            return
        index = self._index[name]
        batch = max(1, output.shape[0])
        fan_in = module.in_channels // module.groups * math.prod(module.kernel_size)
        macs = float(output.numel()) * fan_in
        weights = float(module.weight.numel() + (module.bias.numel() if module.bias is not None else 0))
        for key, value in (('mac', macs), ('mem_weights', weights * batch), ('mem_act', float(output.numel()))):
            self._add(index, key, value, 1, first)
            self._add_ann(index, key, value, first)
        self._size(index, 'weights', weights * WORD_BITS / 8)
        self._size(index, 'act', output.numel() / batch * WORD_BITS / 8)

    # -- results -------------------------------------------------------------------------------------
    def counts(self, steps: int, reduce: Optional[Callable] = None) -> Tuple[torch.Tensor, torch.Tensor, int]:
        """(SNN counts [modules, steps, len(SNN_KEYS)], ANN counts [modules, len(ANN_KEYS)], images),
        float64, summed over processes by ``reduce``."""
        from energy import ANN_KEYS, SNN_KEYS
        snn = torch.zeros(len(self.names), steps, len(SNN_KEYS), dtype=torch.float64)
        ann = torch.zeros(len(self.names), len(ANN_KEYS), dtype=torch.float64)
        for (i, t, key), value in self._snn.items():
            if t < steps:
                snn[i, t, SNN_KEYS.index(key)] += value
        for (i, key), value in self._ann.items():
            ann[i, ANN_KEYS.index(key)] += value
        for i, counts in self._spikes.items():
            counts = counts.cpu()[:steps]
            snn[i, :counts.numel(), SNN_KEYS.index('neuron_add')] += counts  # the subtract
            snn[i, :counts.numel(), SNN_KEYS.index('mem_act')] += counts     # the spike written
        images = torch.tensor([float(self.images)], dtype=torch.float64)
        if reduce is not None:
            device = self.sop.sops.device if self.sop.sops is not None else torch.device('cpu')
            packed = reduce(torch.cat([snn.reshape(-1), ann.reshape(-1), images]).to(device)).cpu()
            snn = packed[:snn.numel()].reshape(snn.shape)
            ann = packed[snn.numel():snn.numel() + ann.numel()].reshape(ann.shape)
            images = packed[-1:]
        return snn, ann, int(images.item())
