"""Energy report of an SNN run: every operation the converted network performs, per layer and per
time step, in five classes, against the ANN's under the same energy model (issue 24, docs/energy.md).

Classes (pJ per image):

* ``synaptic``  spike-driven accumulates: the SOPs of :class:`monitors.SOPMonitor` (ECMT_SPEC 8
  and 14) of linear layers fed by MT neurons and of EC products;
* ``mac``       dense multiply-accumulates: the ANN's, and those the SNN still does (linear layers
  fed by an analog input, such as the head after the final EC norm; the patch embedding, once);
* ``nonlinear`` the EC modules' dense analog work: the function f of every EC module on every
  element at every step (:data:`FUNCTION_OPS`) and the EC bookkeeping (running sums, 1/t, t·f,
  differences) of EC functions and EC products; the ANN evaluates f once;
* ``neuron``    MT neuron updates: per element and step one add, 2N compares (the bound: a silent
  element tries every level), and one subtract per emitted spike;
* ``memory``    SRAM accesses: membranes and EC running sums read and written per element and step,
  weights read once per step, activations written (a spike per event, analog outputs per element).

``monitors.EnergyMonitor`` counts them, a view of the same hooks as ``monitors.SOPMonitor``'s (by
module type and input/output shape, the SOPs that SOPMonitor counts and the chunk, ``step`` and
``time_steps``, that ``engine_for_finetuning.simulate`` sets on it). :func:`energy_report` prices the
counts with one of :data:`ENERGY_MODELS`. Under ``ecmt`` (the published pair, 0.9 pJ per SOP and
4.6 pJ per MAC) only ``synaptic`` and the ANN's ``mac`` of the counted layers are non-zero and the
ratio is the published ``energy_ratio``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

if TYPE_CHECKING:
    from monitors import EnergyMonitor


__all__ = ['CLASSES', 'ENERGY_MODELS', 'EnergyModel', 'FUNCTION_OPS', 'SPECIAL_OPS', 'EnergyMonitor',
           'EnergyReport', 'energy_report', 'function_ops', 'quantised_bits', 'sram_pj_per_bit']

#: The operation classes, in report order.
CLASSES = ('synaptic', 'mac', 'nonlinear', 'neuron', 'memory')

# ---------------------------------------------------------------------------------------------
# Energy per operation
# ---------------------------------------------------------------------------------------------
#: Horowitz, "Computing's energy problem (and what we can do about it)", ISSCC 2014, 45 nm, 0.9 V:
#: (add, multiply) in pJ. A MAC is one of each; an accumulate (a synaptic operation) is one add.
HOROWITZ_45NM = {'fp32': (0.9, 3.7), 'fp16': (0.4, 1.1), 'int32': (0.1, 3.1), 'int8': (0.03, 0.2)}
#: The same table: an SRAM (cache) access of 64 bits, pJ, by memory size in bytes.
SRAM_64BIT_PJ = ((8 * 1024, 10.0), (32 * 1024, 20.0), (1024 * 1024, 100.0))
#: Memories hold float32 words (the SNN's membranes, running sums, weights and activations).
WORD_BITS = 32


def sram_pj_per_bit(size_bytes: float) -> float:
    """Energy of moving one bit to or from an SRAM of ``size_bytes``: Horowitz's 64-bit access
    energies (8 KB 10 pJ, 32 KB 20 pJ, 1 MB 100 pJ), linear between them and from (0, 0), as
    Lemaire et al. (2022) interpolate them, held at 100 pJ above 1 MB (DRAM is not modelled),
    divided by 64 (an access moves 64 bits)."""
    size = max(0.0, float(size_bytes))
    x0, y0 = 0.0, 0.0
    for x1, y1 in SRAM_64BIT_PJ:
        if size <= x1:
            return (y0 + (y1 - y0) * (size - x0) / (x1 - x0)) / 64.0
        x0, y0 = x1, y1
    return SRAM_64BIT_PJ[-1][1] / 64.0


@dataclass(frozen=True)
class EnergyModel:
    """pJ per add (also a compare, a subtract and a synaptic accumulate) and per multiply;
    ``memory``: SRAM accesses are priced (:func:`sram_pj_per_bit`); ``published``: ECMT_SPEC 8's
    estimate, which prices every SOPMonitor count as a synaptic accumulate and the ANN's dense
    counts of the same layers as MACs, and nothing else."""
    name: str
    add: float
    mul: float
    memory: bool = False
    published: bool = False
    source: str = ''

    @property
    def mac(self) -> float:
        return self.add + self.mul


_H = 'Horowitz, ISSCC 2014, 45 nm'
ENERGY_MODELS: Dict[str, EnergyModel] = {
    'ecmt': EnergyModel('ecmt', *HOROWITZ_45NM['fp32'], published=True,
                        source=f'ECMT_SPEC 8: 0.9 pJ per SOP, 4.6 pJ per ANN MAC ({_H}, float32)'),
    'fp32': EnergyModel('fp32', *HOROWITZ_45NM['fp32'], source=f'{_H}: float32 add 0.9, mult 3.7'),
    'fp16': EnergyModel('fp16', *HOROWITZ_45NM['fp16'], source=f'{_H}: float16 add 0.4, mult 1.1'),
    'int8': EnergyModel('int8', *HOROWITZ_45NM['int8'], source=f'{_H}: int8 add 0.03, mult 0.2'),
    'fp32_memory': EnergyModel('fp32_memory', *HOROWITZ_45NM['fp32'], memory=True,
                               source=f'{_H}: float32, plus SRAM 8 KB 10 / 32 KB 20 / 1 MB 100 pJ per 64 bits, '
                                      'interpolated by memory size (Lemaire et al. 2022)'),
}


def quantised_bits(T: int) -> List[int]:
    """Bit widths of the quantised ANNs an SNN of T steps is compared with: ceil(log2(T+1))
    (the same number of levels as T binary steps; Yan et al., arXiv 2409.08290) and 8."""
    return sorted({max(1, math.ceil(math.log2(T + 1))), 8})


def _int_energies(bits: int) -> Tuple[float, float]:
    """(add, multiply) pJ of a ``bits``-bit integer unit, scaled from Horowitz's 8-bit pair: an
    adder grows linearly with its width, an array multiplier with its square (his 32-bit pair,
    0.1 and 3.1 pJ, is 3.3 and 15.5 times the 8-bit one: close to 4 and 16)."""
    add8, mul8 = HOROWITZ_45NM['int8']
    return add8 * bits / 8.0, mul8 * (bits / 8.0) ** 2


# ---------------------------------------------------------------------------------------------
# Operations per element of the nonlinear functions
# ---------------------------------------------------------------------------------------------
#: Elementary operations (adds, multiplies) of the special functions, from a stated implementation:
#: div a/d = a * (1/d), 1/d by 3 Newton-Raphson steps r(2 - d r) from a table seed (6 mul, 3 add)
#: plus the product; exp by range reduction x = k ln2 + r (2 mul, 2 add, the rounding an add),
#: a degree-5 Horner polynomial (5 mul, 5 add) and 2^k added to the exponent (1 add); rsqrt by 3
#: Newton steps y(1.5 - 0.5 x y^2) (3 mul, 1 add each) and 0.5 x once; erf by Abramowitz-Stegun
#: 7.1.26 (t = 1/(1 + p|x|): 1 mul, 1 add, a div; degree-5 polynomial in t: 5 mul, 4 add; x^2 and
#: exp(-x^2): 1 mul and an exp; the product and 1 - it: 1 mul, 1 add); tanh u = 1 - 2/(1 + exp(2u))
#: (1 mul, an exp, 2 add, a div).
SPECIAL_OPS: Dict[str, Dict[str, int]] = {
    'div': {'add': 3, 'mul': 7},
    'exp': {'add': 8, 'mul': 7},
    'rsqrt': {'add': 3, 'mul': 10},
    'erf': {'add': 17, 'mul': 22},
    'tanh': {'add': 13, 'mul': 15},
}
#: Operations of one evaluation of f: per element, and per row for the norms (a row being what
#: is normalised together: the last dimension of a LayerNorm). Keys: add (also compare, max,
#: subtract), mul, and the special functions of :data:`SPECIAL_OPS`.
FUNCTION_OPS: Dict[str, Dict[str, Dict[str, int]]] = {
    # max (compare), subtract the max, exp, sum, divide by the sum
    'softmax': {'element': {'add': 3, 'exp': 1, 'div': 1}, 'row': {}},
    # mean: sum; variance: subtract the mean, square, sum; normalise: multiply by rsqrt; affine:
    # multiply and add. Per row: the mean and variance times 1/n, + eps, rsqrt.
    'layer_norm': {'element': {'add': 4, 'mul': 3}, 'row': {'mul': 2, 'add': 1, 'rsqrt': 1}},
    # RMSNorm: square, sum, normalise, scale; per row: times 1/n, + eps, rsqrt
    'rms_norm': {'element': {'add': 1, 'mul': 3}, 'row': {'mul': 1, 'add': 1, 'rsqrt': 1}},
    # 0.5 x (1 + erf(x / sqrt 2))
    'gelu': {'element': {'mul': 3, 'add': 1, 'erf': 1}, 'row': {}},
    # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
    'gelu_tanh': {'element': {'mul': 6, 'add': 2, 'tanh': 1}, 'row': {}},
    # x / (1 + exp(-x)) and 1 / (1 + exp(-x))
    'silu': {'element': {'exp': 1, 'add': 1, 'div': 1}, 'row': {}},
    'sigmoid': {'element': {'exp': 1, 'add': 1, 'div': 1}, 'row': {}},
    'tanh': {'element': {'tanh': 1}, 'row': {}},
    'relu': {'element': {'add': 1}, 'row': {}},
    # x * min(max(x + 3, 0), 6) / 6
    'hardswish': {'element': {'add': 3, 'mul': 2}, 'row': {}},
    # x if x > 0 else exp(x) - 1 (the bound: compare, exp, subtract)
    'elu': {'element': {'add': 2, 'exp': 1}, 'row': {}},
}
#: The EC bookkeeping per element and step around f (ECMT_SPEC 5): A += x, A * (1/t), t * f,
#: total - previous total.
EC_STEP_OPS = {'add': 2, 'mul': 2}
#: Per step of an EC product (ECMT_SPEC 6): each operand element is added to its running sum; each
#: output element is the product of running sums times 1/t minus the previous total.
PRODUCT_OUTPUT_OPS = {'add': 1, 'mul': 1}

_OP_KEYS = ('add', 'mul') + tuple(SPECIAL_OPS)


def _function_name(kind: str, module: Optional[nn.Module]) -> Optional[str]:
    """The :data:`FUNCTION_OPS` entry of an EC module of ``kind`` wrapping ``module`` (None: not
    in the table)."""
    approximate = module is not None and (type(module).__name__ == 'GELUTanh'
                                          or getattr(module, 'approximate', 'none') != 'none')
    if kind == 'gelu':
        return 'gelu_tanh' if approximate else 'gelu'
    if kind in ('softmax', 'layer_norm'):
        return kind
    if module is None:
        return None
    name = type(module).__name__.lower()
    if name in ('layernorm', 'groupnorm', 'layernorm2d'):
        return 'layer_norm'
    if name in ('rmsnorm',):
        return 'rms_norm'
    if name == 'gelutanh':
        return 'gelu_tanh'
    if name == 'softmax':
        return 'softmax'
    return {'silu': 'silu', 'sigmoid': 'sigmoid', 'tanh': 'tanh', 'relu': 'relu', 'hardswish': 'hardswish',
            'elu': 'elu', 'gelu': 'gelu'}.get(name)


def _row_length(module: Optional[nn.Module], shape: Sequence[int]) -> int:
    """Elements normalised together by a norm over an input of ``shape`` (one step)."""
    if isinstance(module, nn.GroupNorm):
        per_sample = math.prod(shape[1:]) if len(shape) > 1 else 1
        return max(1, per_sample // module.num_groups)
    normalized = getattr(module, 'normalized_shape', None)
    if normalized:
        return max(1, math.prod(normalized) if isinstance(normalized, (tuple, list)) else int(normalized))
    return max(1, int(shape[-1]) if shape else 1)


def function_ops(kind: str, module: Optional[nn.Module], shape: Sequence[int]) -> Tuple[Dict[str, float], Optional[str]]:
    """Operations of one evaluation of the function of an EC module of ``kind`` (wrapping
    ``module``, None for a fused neuron) on an input of ``shape``: ({op: count}, the table entry
    used, None if the function is not in :data:`FUNCTION_OPS`, then no operations)."""
    name = _function_name(kind, module)
    if name is None:
        return {}, None
    elements = float(math.prod(shape))
    table = FUNCTION_OPS[name]
    ops = {op: n * elements for op, n in table['element'].items()}
    if table['row']:
        rows = elements / _row_length(module, shape)
        for op, n in table['row'].items():
            ops[op] = ops.get(op, 0.0) + n * rows
    return ops, name


# ---------------------------------------------------------------------------------------------
# Counting
# ---------------------------------------------------------------------------------------------
#: Counters of one module and step (SNN) or of one module (ANN). Memory counters are in words of
#: :data:`WORD_BITS` bits; ``nl_*`` are the nonlinear class's operations.
SNN_KEYS = ('mac',) + tuple(f'nl_{op}' for op in _OP_KEYS) + (
    'neuron_add', 'neuron_cmp', 'mem_weights', 'mem_state', 'mem_act')
ANN_KEYS = ('mac',) + tuple(f'nl_{op}' for op in _OP_KEYS) + ('mem_weights', 'mem_act')


# ---------------------------------------------------------------------------------------------
# Pricing
# ---------------------------------------------------------------------------------------------
def _nonlinear_pj(counts: Dict[str, float], add: float, mul: float) -> float:
    adds = counts.get('add', 0.0) + sum(counts.get(s, 0.0) * SPECIAL_OPS[s]['add'] for s in SPECIAL_OPS)
    muls = counts.get('mul', 0.0) + sum(counts.get(s, 0.0) * SPECIAL_OPS[s]['mul'] for s in SPECIAL_OPS)
    return adds * add + muls * mul


def _memory_pj(words: Dict[str, float], sizes: Dict[str, float], bits: int = WORD_BITS) -> float:
    """``words`` (weights, state, act) of float32 words, moved as ``bits``-bit values, each in an
    SRAM the size of that data (shrunk in proportion to ``bits``)."""
    total = 0.0
    for what, count in words.items():
        if count:
            size = sizes.get(what, 0.0) * bits / WORD_BITS
            total += count * bits * sram_pj_per_bit(size)
    return total


class EnergyReport:
    """The priced counts of an :class:`EnergyMonitor`: per module and step, pJ summed over all
    images by class (``snn`` [modules, steps, classes], ``ann`` [modules, classes]); see
    :meth:`summary` for the results record and :meth:`layer_records` for the per-layer CSV."""

    def __init__(self, monitor: EnergyMonitor, model: str | EnergyModel = 'ecmt',
                 reduce: Optional[Callable] = None) -> None:
        self.model = ENERGY_MODELS[model] if isinstance(model, str) else model
        if monitor.sop.sops is None and reduce is None:  # no linear layer nor product ran
            steps = monitor.steps_counted
            sops = dense = torch.zeros(len(monitor.sop.names), steps, dtype=torch.float64)
        else:
            sops, dense = (t.double().cpu() for t in monitor.sop.totals(reduce))
        self.steps = sops.shape[1]
        snn, ann, images = monitor.counts(self.steps, reduce)
        self.images = max(1, images)
        self.names, self.kinds = list(monitor.names), list(monitor.kinds)
        sop_index = {name: i for i, name in enumerate(monitor.sop.names)}
        self.sop_rows = [sop_index.get(name) for name in self.names]
        self.analog = [monitor.analog_input.get(i, False) for i in range(len(self.names))]
        self.sizes = [monitor.sizes.get(i, {}) for i in range(len(self.names))]
        self.functions = dict(monitor.functions)
        self.sops, self.dense, self.snn_counts, self.ann_counts = sops, dense, snn, ann
        # Layers the SOPMonitor counts that this monitor does not see (none in this toolkit's models).
        self.other_sop_rows = sorted(set(range(len(monitor.sop.names))) - {r for r in self.sop_rows if r is not None})
        self.snn, self.ann = self.price(self.model)
        self.quantised = {bits: self.price(self.model, bits=bits)[1] for bits in quantised_bits(self.steps)}

    # -- one pricing of all counts -------------------------------------------------------------
    def price(self, model: EnergyModel, bits: Optional[int] = None) -> Tuple[torch.Tensor, torch.Tensor]:
        """pJ summed over images: SNN [modules, steps, classes], ANN [modules, classes]. With
        ``bits``: the ANN quantised to ``bits``-bit integers (MACs at that width, weights and
        activations moved as ``bits``-bit values; its nonlinear work stays at ``model``'s
        precision: a quantised transformer dequantises for softmax, LayerNorm and GELU)."""
        M, S, C = len(self.names), self.steps, len(CLASSES)
        snn = torch.zeros(M, S, C, dtype=torch.float64)
        ann = torch.zeros(M, C, dtype=torch.float64)
        cls = {name: i for i, name in enumerate(CLASSES)}
        mac_ann = model.mac if bits is None else sum(_int_energies(bits))
        ann_bits = WORD_BITS if bits is None else bits
        for i in range(M):
            row = self.sop_rows[i]
            counts = self.snn_counts[i]
            if row is not None:
                sops = self.sops[row]
                if model.published or not self.analog[i] or self.kinds[i] == 'product':
                    snn[i, :, cls['synaptic']] += sops * model.add
                else:
                    snn[i, :, cls['mac']] += sops * model.mac
                ann[i, cls['mac']] += float(self.dense[row, 0]) * mac_ann
            if model.published:
                continue
            snn[i, :, cls['mac']] += counts[:, SNN_KEYS.index('mac')] * model.mac
            ann[i, cls['mac']] += float(self.ann_counts[i, ANN_KEYS.index('mac')]) * mac_ann
            for t in range(S):
                nl = {op: float(counts[t, SNN_KEYS.index(f'nl_{op}')]) for op in _OP_KEYS}
                snn[i, t, cls['nonlinear']] += _nonlinear_pj(nl, model.add, model.mul)
                snn[i, t, cls['neuron']] += float(counts[t, SNN_KEYS.index('neuron_add')]
                                                  + counts[t, SNN_KEYS.index('neuron_cmp')]) * model.add
                if model.memory:
                    words = {what: float(counts[t, SNN_KEYS.index(f'mem_{what}')]) for what in ('weights', 'state', 'act')}
                    snn[i, t, cls['memory']] += _memory_pj(words, self.sizes[i])
            nl = {op: float(self.ann_counts[i, ANN_KEYS.index(f'nl_{op}')]) for op in _OP_KEYS}
            ann[i, cls['nonlinear']] += _nonlinear_pj(nl, model.add, model.mul)
            if model.memory:
                words = {what: float(self.ann_counts[i, ANN_KEYS.index(f'mem_{what}')]) for what in ('weights', 'act')}
                ann[i, cls['memory']] += _memory_pj(words, self.sizes[i], ann_bits)
        if self.other_sop_rows:  # counted by the SOPMonitor only: priced as ECMT_SPEC 8 does
            for row in self.other_sop_rows:
                snn_row = torch.zeros(1, S, C, dtype=torch.float64)
                snn_row[0, :, cls['synaptic']] = self.sops[row] * model.add
                ann_row = torch.zeros(1, C, dtype=torch.float64)
                ann_row[0, cls['mac']] = float(self.dense[row, 0]) * mac_ann
                snn, ann = torch.cat([snn, snn_row]), torch.cat([ann, ann_row])
        return snn, ann

    # -- outputs -------------------------------------------------------------------------------
    def per_step(self) -> List[Dict[str, float]]:
        """Each step's own SNN energy by class, pJ per image."""
        totals = self.snn.sum(0) / self.images
        return [{c: float(totals[t, j]) for j, c in enumerate(CLASSES)} for t in range(self.steps)]

    def ann_by_class(self, ann: Optional[torch.Tensor] = None) -> Dict[str, float]:
        totals = (self.ann if ann is None else ann).sum(0) / self.images
        return {c: float(totals[j]) for j, c in enumerate(CLASSES)}

    def ratio(self, ann: Optional[torch.Tensor] = None) -> List[float]:
        """SNN energy of steps 1..t over the ANN's, for t = 1..T."""
        ann_total = float((self.ann if ann is None else ann).sum())
        cumulative = self.snn.sum((0, 2)).cumsum(0)
        return [float(c) / ann_total if ann_total else 0.0 for c in cumulative]

    def summary(self, published_ratio: Optional[Sequence[float]] = None) -> Dict:
        """The results record's ``energy`` entry. ``published_ratio`` (the SOPMonitor's
        ``energy_ratio``): under ``ecmt`` the ratio is that list itself, which the per-step split
        reproduces to float64 rounding (the same quantities summed in another order)."""
        ratio = self.ratio()
        if self.model.published and published_ratio is not None:
            ratio = [float(r) for r in published_ratio]
        record = {
            'model': self.model.name,
            'per_step': self.per_step(),
            'ann': self.ann_by_class(),
            'ratio': ratio,
            'quantised': [{'bits': bits, 'ann': self.ann_by_class(ann), 'ratio': self.ratio(ann)}
                          for bits, ann in self.quantised.items()],
            'images': self.images,
            'pj_per_op': {'add': self.model.add, 'mul': self.model.mul, 'mac': self.model.mac,
                          'sram': self.model.memory, 'source': self.model.source},
            'counts': self.count_summary(),
        }
        uncounted = sorted({self.names[i] for i, name in self.functions.items() if name is None})
        if uncounted:
            record['uncounted_functions'] = uncounted
        return record

    def count_summary(self) -> Dict:
        """Operation counts per image (model-free): per step for the SNN, once for the ANN."""
        per_image = self.snn_counts.sum(0) / self.images
        ann = self.ann_counts.sum(0) / self.images
        sop_steps = self.sops.sum(0) / self.images
        analog_rows = [r for r, a, k in zip(self.sop_rows, self.analog, self.kinds)
                       if r is not None and a and k == 'linear']
        analog_sops = (self.sops[analog_rows].sum(0) if analog_rows else torch.zeros(self.steps)) / self.images
        steps = []
        for t in range(self.steps):
            entry = {'sops': float(sop_steps[t]), 'sops_on_analog_inputs': float(analog_sops[t])}
            entry.update({key: float(per_image[t, j]) for j, key in enumerate(SNN_KEYS)})
            steps.append(entry)
        ann_entry = {'dense': float(self.dense[:, 0].sum()) / self.images}
        ann_entry.update({key: float(ann[j]) for j, key in enumerate(ANN_KEYS)})
        return {'per_step': steps, 'ann': ann_entry}

    def layer_records(self) -> Dict[Tuple[str, int], Dict[str, float]]:
        """{(module name, step): {class: pJ per image}} of every counted module and step."""
        out = {}
        for i, name in enumerate(self.names):
            for t in range(self.steps):
                out[name, t + 1] = {c: float(self.snn[i, t, j]) / self.images for j, c in enumerate(CLASSES)}
        return out


def energy_report(monitor: EnergyMonitor, model: str = 'ecmt', reduce: Optional[Callable] = None) -> EnergyReport:
    """Price the counts of ``monitor`` under the energy model named ``model``; ``reduce`` sums
    over processes (every process must call it). See :class:`EnergyReport`."""
    if model not in ENERGY_MODELS:
        raise ValueError(f'unknown energy model {model!r}; choose from {", ".join(ENERGY_MODELS)}')
    return EnergyReport(monitor, model, reduce)


def __getattr__(name: str):
    """``energy.EnergyMonitor``: the energy view of the monitors' hooks (``monitors``, which
    imports this module's counting tables)."""
    if name == 'EnergyMonitor':
        import monitors
        return monitors.EnergyMonitor
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
