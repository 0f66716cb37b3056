"""Low-latency calibration: thresholds chosen for the number of time steps a user will run.

The published calibration (ECMT_SPEC 3) takes one quantile (``percent``, 0.99) of every place's
input, whatever the number of steps T. An MT neuron fires its smallest spike once the membrane
reaches half its base threshold, so a high threshold leaves small inputs silent for the first
steps: at T = 1 or 2 the network is far from the ANN. This module chooses the thresholds for a
given T on calibration images only, in these stages:

1. one calibration pass records, for every place, the running mean of the quantiles of the
   candidate percents (the published statistic, per batch, each batch weighted equally; per
   channel for TestNeurons of ``granularity='channel'``, ECMT_SPEC 15); the candidate whose
   thresholds bring the SNN's output after T steps closest to the ANN's wins (by default there is
   one, the published 0.99);
1b. a global scale of every threshold from a geometric grid (``scales``), recorded as the
   conversion's ``threshold_scale`` (the fixed places' values in ``fixed_thresholds``);
2. a coordinate search refines one scale factor per KIND of place (all q places share one, all
   s, ...), then 3. one per place (the threshold of the place, both sides, is its base threshold
   times the scale): each group in turn tries its scale divided and multiplied by a factor, keeps
   a change only if the objective falls, and the factor shrinks (2^(1/2), 2^(1/4), 2^(1/8)) once
   a whole sweep finds nothing. A place's base threshold is its quantile at the chosen percent, or
   for a place of fixed thresholds (s at softmax_p, a fixed fc2) that fixed value (``search_fixed``);
   the values chosen for those are recorded (``fixed_thresholds``) and :func:`apply_fixed_thresholds`
   gives them to the ``snn`` model.

The objective is the KL divergence from the ANN's softmax to the softmax of the SNN's mean head
output over the T steps (the cumulative logits / T, which EC makes an unbiased estimate of the
ANN's logits), averaged over the search images. It needs no labels (the ANN's outputs are the
target), it is continuous where agreement or accuracy on training images saturates near 100 %,
it ignores a shift common to all logits (which no prediction depends on), and it weighs errors by
the ANN's own confidence. ``objective='mse'`` (the mean squared error of the same mean logits
against the ANN's) is the alternative measured in the README. Every step of the search only
accepts a candidate that lowers the objective, so it never increases. The search's cost is one T-step simulation of the search images per candidate,
bounded by ``budget``.

:func:`choose_thresholds` is the API (a model holding calibrating TestNeurons and a DataLoader of
calibration images); :func:`run_for_args` is what ``run_class_finetuning.py --target_T`` calls.
"""
from __future__ import annotations

import copy
import math
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

import utils
from options import (CODINGS, DEFAULT_BUDGET, DEFAULT_CACHE_MIB, DEFAULT_ENERGY_WEIGHT, DEFAULT_PERCENTS, DEFAULT_PREFIX_WEIGHT,
                     DEFAULT_SCALES, DEFAULT_SEARCH_IMAGES, OBJECTIVE_NAMES)
from engine_for_finetuning import autocast_context, simulate
from calibration import channel_quantiles, threshold_shape
from monitors import E_AC, E_MAC
from trans_utils import (SOPMonitor, TestNeuron, TwoSideNeuron, convert_to_snn, get_modules,
                         tail_quantiles, threshold_config)

__all__ = ['DEFAULT_PERCENTS', 'DEFAULT_SCALES', 'DEFAULT_BUDGET', 'DEFAULT_SEARCH_IMAGES', 'SCALE_FACTORS',
           'record_quantiles', 'choose_thresholds', 'kl_objective', 'check_search_args',
           'apply_fixed_thresholds', 'run_for_args']

#: Multiplicative steps of the per-place coordinate search, tried in turn (largest first).
SCALE_FACTORS = (2 ** 0.5, 2 ** 0.25, 2 ** 0.125)


def kl_objective(snn_steps: torch.Tensor, ann_logits: torch.Tensor) -> torch.Tensor:
    """Sum over images of KL(softmax(ANN logits) || softmax(SNN mean logits)), float64, 0-d.
    ``snn_steps`` are the per-step head outputs [T, B, C]; their mean over T is compared."""
    mean = snn_steps.sum(0) / snn_steps.shape[0]
    log_snn = F.log_softmax(mean.double(), dim=-1)
    log_ann = F.log_softmax(ann_logits.double(), dim=-1)
    return (log_ann.exp() * (log_ann - log_snn)).sum()


def mse_objective(snn_steps: torch.Tensor, ann_logits: torch.Tensor) -> torch.Tensor:
    """Sum over images of the mean squared difference between the SNN's mean logits over T steps
    and the ANN's logits, float64, 0-d."""
    mean = snn_steps.sum(0) / snn_steps.shape[0]
    return (mean.double() - ann_logits.double()).pow(2).mean(-1).sum()


#: The objectives of the search, by name (``--search_objective``).
OBJECTIVES = dict(zip(OBJECTIVE_NAMES, (kl_objective, mse_objective)))


def objective_of(name: str, prefix_weight: float = DEFAULT_PREFIX_WEIGHT) -> Callable:
    """The search's objective of the per-step head outputs [N, B, C] against the ANN's logits:
    the objective ``name`` of all N steps, plus ``prefix_weight`` times its mean over the
    prefixes of 1..N-1 steps (the prediction after each earlier step; nothing to add for N = 1)."""
    function = OBJECTIVES[name]
    if not prefix_weight:
        return function

    def objective(snn_steps: torch.Tensor, ann_logits: torch.Tensor) -> torch.Tensor:
        value = function(snn_steps, ann_logits)
        steps = snn_steps.shape[0]
        if steps > 1:
            earlier = sum(function(snn_steps[:t], ann_logits) for t in range(1, steps))
            value = value + prefix_weight * earlier / (steps - 1)
        return value
    return objective
OBJECTIVE_TEXT = {'kl': 'kl(ann || snn mean logits over T steps)',
                  'mse': 'mse(snn mean logits over T steps, ann logits)'}


@torch.no_grad()
def record_quantiles(model: nn.Module, loader: Iterable, percents: Sequence[float], device, *,
                     amp: Optional[str] = None, max_batches: Optional[int] = None,
                     keep_images: int = 0) -> Tuple[Dict[str, torch.Tensor], List[torch.Tensor],
                                                    List[torch.Tensor], int]:
    """One calibration pass recording every percent of ``percents`` at every calibrated place.

    ``model`` holds :class:`TestNeuron` s; they are identities during the pass (their own
    thresholds do not move) and a hook takes the quantiles. Per place the result is a float32
    tensor [len(percents), 2] of (scale_p, scale_n): the running mean over batches of the
    ``percent`` quantile and of the negated ``1 - percent`` quantile, each batch weighted equally,
    summed in float64: for any percent exactly what ``--test_mode for_v --percent p`` computes.
    A TestNeuron of ``granularity='channel'`` (ECMT_SPEC 15) gets per-channel quantiles
    (:func:`calibration.channel_quantiles`, the shape :func:`calibration.threshold_shape` gives at
    its first batch): a tensor [len(percents), 2, *channel shape], again exactly what its own
    calibration computes.
    The first ``keep_images`` images and the ANN's logits on them are kept (on ``device``) in
    batches for the search. Returns (quantiles by place name, image batches, logit batches,
    number of batches).
    """
    neurons = [(name, m) for name, m in get_modules(model, (TestNeuron,)) if m.calibrate]
    sums = {name: torch.zeros(len(percents), 2, dtype=torch.float64, device=device)
            for name, m in neurons if m.granularity != 'channel'}  # per channel: at the first batch

    def hook(name):
        def record(module, inputs):
            x = inputs[0]
            if module.granularity == 'channel':
                shape = threshold_shape(module.place, tuple(x.shape))
                if name not in sums:
                    sums[name] = torch.zeros(len(percents), 2, *shape, dtype=torch.float64, device=device)
                elif tuple(sums[name].shape[2:]) != shape:
                    raise utils.UserError(f'{name}: an input of shape {tuple(x.shape)} has channels {shape}, '
                                          f'earlier batches had {tuple(sums[name].shape[2:])}')
            for i, p in enumerate(percents):
                q_hi, q_lo = (channel_quantiles(x, p, shape) if module.granularity == 'channel'
                              else tail_quantiles(x, p))
                sums[name][i, 0] += q_hi.double().to(device)
                sums[name][i, 1] -= q_lo.double().to(device)
        return record

    handles = [m.register_forward_pre_hook(hook(name)) for name, m in neurons]
    for _, m in neurons:
        m.calibrate = False
    images_kept, logits_kept, batches, kept = [], [], 0, 0
    try:
        model.eval()
        for index, (images, _) in enumerate(loader):
            if max_batches is not None and index >= max_batches:
                break
            images = images.to(device, non_blocking=True)
            with autocast_context(images.device, amp):
                logits = model(images).float()
            batches += 1
            if kept < keep_images:
                take = min(keep_images - kept, images.shape[0])
                images_kept.append(images[:take])
                logits_kept.append(logits[:take])
                kept += take
    finally:
        for handle in handles:
            handle.remove()
        for _, m in neurons:
            m.calibrate = True
    if batches == 0:
        raise utils.UserError('the calibration loader gave no images')
    quantiles = {name: (total / batches).float() for name, total in sums.items()}
    bad = [name for name, q in quantiles.items() if not bool(torch.isfinite(q).all())]
    if bad:
        raise utils.UserError(f'calibration gave non-finite thresholds at {len(bad)} places '
                              f'({", ".join(bad[:5])}): the activations there hold NaN or inf values')
    return quantiles, images_kept, logits_kept, batches


def _thresholds(quantile: torch.Tensor, scale: float) -> torch.Tensor:
    """(scale_p, scale_n), float32 [2] (or [2, *channel shape]), of a place: its quantiles times
    its scale (in float64)."""
    return (quantile.double() * scale).float()


def _set_thresholds(neuron: nn.Module, value: torch.Tensor) -> None:
    """Give a TestNeuron or TwoSideNeuron the thresholds ``value`` ([2, ...]: scale_p, scale_n)
    in the shape of its buffers; a TestNeuron still holding the placeholder [1] takes the channel
    shape of ``value`` through its checkpoint path (as a per-channel checkpoint gives it)."""
    if isinstance(neuron, TestNeuron) and tuple(neuron.scale_p.shape) != tuple(value.shape[1:]) \
            and value[0].numel() > 1:
        neuron.load_state_dict({'scale_p': value[0].clone(), 'scale_n': value[1].clone()})
        return
    neuron.scale_p.copy_(value[0].reshape(neuron.scale_p.shape))
    neuron.scale_n.copy_(value[1].reshape(neuron.scale_n.shape))


class _Replay(nn.Module):
    """Stands in for a block the candidate does not change: the last one before the first block
    that runs gives that block's recorded input; earlier ones pass anything on (it is ignored)."""

    def __init__(self, output: Optional[torch.Tensor] = None) -> None:
        super().__init__()
        self.output = output

    def forward(self, x, *args, **kwargs):
        return x if self.output is None else self.output


def _block_of(name: str) -> int:
    """The index of the block a place sits in (``blocks.<i>.``), or 0 (before any block) for a
    place elsewhere: the conservative answer, a candidate changing it runs every block."""
    parts = name.split('.')
    return int(parts[1]) if len(parts) > 2 and parts[0] == 'blocks' and parts[1].isdigit() else 0


class _Search:
    """The SNN (a converted copy of the model) and the objective of a set of thresholds.

    Block cache: a candidate that changes only places in blocks b and later gives the blocks
    before b the same inputs, thresholds and hence outputs as the current best thresholds, so
    those blocks are not run again: the input of block b (all T steps of every search batch, as
    recorded in the current best's own run) is given to block b directly. Kept for as many block
    inputs as ``cache_bytes`` holds twice (the current best's and a candidate's), evenly spaced
    over the depth; a candidate starts from the nearest kept block at or before b. Every value is
    the one a full run gives (the same kernels on the same tensors)."""

    def __init__(self, snn: nn.Module, places: List[str], images: List[torch.Tensor],
                 logits: List[torch.Tensor], T: int, amp: Optional[str], budget: int,
                 objective: Callable = kl_objective, cache_bytes: int = 0,
                 log: Optional[Callable[[str], None]] = None, energy_weight: float = 0.0) -> None:
        modules = dict(snn.named_modules())
        self.snn, self.neurons = snn, [modules[name] for name in places]
        self.images, self.logits, self.T, self.amp = images, logits, T, amp
        self.budget, self.evaluations, self.function = budget, 0, objective
        self.count = sum(int(x.shape[0]) for x in images)
        self.seconds = 0.0
        self.log = log
        self.place_block = [_block_of(name) for name in places]
        blocks = getattr(snn, 'blocks', None)
        self.blocks = blocks if isinstance(blocks, (nn.Sequential, nn.ModuleList)) and len(blocks) > 1 else None
        self.cache_bytes = int(cache_bytes) if self.blocks is not None else 0
        self.kept: Optional[List[int]] = None  # the blocks whose inputs are cached; None: not chosen yet
        self.cache: Dict[int, List[torch.Tensor]] = {}     # block -> its input, per search batch
        self._pending: Dict[int, List[torch.Tensor]] = {}  # the same, of the last candidate
        self.blocks_run = 0    # block evaluations (one block on all search images) done
        self.blocks_total = 0  # the same for full runs
        # The energy term (``energy_weight`` > 0): SOPs and dense counts per monitored layer, summed
        # over steps and search images, of the current best (for the layers of blocks a candidate
        # does not run) and of the last candidate.
        self.energy_weight = float(energy_weight)
        self.layer_counts: Optional[torch.Tensor] = None
        self._pending_counts: Optional[torch.Tensor] = None
        self.last_energy: Optional[float] = None  # E_T of the last candidate
        self.best_energy: Optional[float] = None  # E_T of the current best

    def set(self, thresholds: List[torch.Tensor]) -> None:
        for neuron, value in zip(self.neurons, thresholds):
            _set_thresholds(neuron, value)

    def _choose_kept(self, block_bytes: int) -> None:
        depth = len(self.blocks)
        fit = self.cache_bytes // max(2 * block_bytes, 1)
        if fit >= depth - 1:
            self.kept = list(range(1, depth))
        else:  # evenly spaced over the depth
            self.kept = sorted({round((i + 1) * depth / (fit + 1)) for i in range(int(fit))} - {0, depth})

    def _start(self, changed: Optional[Sequence[int]]) -> int:
        """The first block to run for a candidate changing the places ``changed`` (None: all)."""
        if changed is None or not self.cache or not changed:
            return 0
        first = min(self.place_block[i] for i in changed)
        return max((b for b in self.cache if b <= first), default=0)

    @torch.no_grad()
    def objective(self, thresholds: List[torch.Tensor], changed: Optional[Sequence[int]] = None,
                  label: str = '') -> float:
        """The mean objective over the search images; counts one evaluation of the budget.
        ``changed``: the indices of the places whose thresholds differ from the current best's
        (the last :meth:`accept` ed candidate), for the block cache; None: any. Logs a progress
        line (``label``: what the candidate is) with the time the rest of the budget would take
        at the mean cost so far (the search may stop sooner, once no change helps)."""
        if self.evaluations >= self.budget:
            raise RuntimeError('the search budget is spent')
        start = time.perf_counter()
        self.set(thresholds)
        first = self._start(changed)
        capture = self.cache_bytes > 0 and (self.kept is None or any(b > first for b in self.kept))
        self._pending = {}
        total = torch.zeros((), dtype=torch.float64, device=self.logits[0].device)
        monitor = SOPMonitor(self.snn) if self.energy_weight else None
        try:
            for index, (images, logits) in enumerate(zip(self.images, self.logits)):
                total += self.function(self._simulate(index, images, first, capture, monitor), logits)
            energy = self._energy(monitor, first) if monitor is not None else None
        finally:
            if monitor is not None:
                monitor.remove()
        if self.blocks is not None:
            depth = len(self.blocks)
            self.blocks_run += depth - first
            self.blocks_total += depth
        self.evaluations += 1
        value = float(total) / self.count
        shown = f'{value:.5f}'
        if energy is not None:
            self.last_energy = energy
            shown = f'{value + self.energy_weight * energy:.5f} ({value:.5f} + {self.energy_weight:g} x energy {energy:.4f})'
            value += self.energy_weight * energy
        self.seconds += time.perf_counter() - start
        if self.log is not None:
            left = self.seconds / self.evaluations * (self.budget - self.evaluations)
            self.log(f'  candidate {self.evaluations}/{self.budget}, {label or "thresholds"}: objective '
                     f'{shown}, about {left:.0f} s left')
        return value

    def _energy(self, monitor: SOPMonitor, first: int) -> float:
        """E_T of ECMT_SPEC 8 (relative to the ANN, after the T steps) of the candidate on the
        search images: the SOPs and dense counts of every monitored layer summed over steps, those of
        the blocks before ``first`` (not run: the block cache) taken from the current best."""
        sops, dense = monitor.totals()
        counts = torch.stack([sops.sum(1), dense.sum(1)], 1).cpu()  # [layers, 2]
        if first > 0:
            if self.layer_counts is None:
                raise RuntimeError('the energy of a cached block is unknown before a full run')
            skipped = [i for i, name in enumerate(monitor.names)
                       if name.startswith('blocks.') and _block_of(name) < first]
            counts[skipped] = self.layer_counts[skipped]
        self._pending_counts = counts
        total_sops, total_dense = counts.sum(0).tolist()
        return self.T * (E_AC / E_MAC) * (total_sops / max(total_dense, 1.0))  # as SOPMonitor.summary

    def _simulate(self, index: int, images: torch.Tensor, first: int, capture: bool,
                  monitor: Optional[SOPMonitor] = None) -> torch.Tensor:
        if first == 0 and not capture:
            return simulate(self.snn, images, self.T, amp=self.amp, monitor=monitor)
        blocks, saved, handles = self.blocks, {}, []

        def keep(block):
            def hook(module, args):
                if self.kept is None:  # the first capture: choose what fits, from one input's size
                    self._choose_kept(args[0].numel() * args[0].element_size() * len(self.images))
                if block in self.kept and block > first and isinstance(args[0], torch.Tensor):
                    self._pending.setdefault(block, []).append(args[0])
            return hook
        try:
            for i in range(first):  # the blocks before ``first`` are not run
                saved[i] = blocks[i]
                blocks[i] = _Replay(self.cache[first][index] if i == first - 1 else None)
            if capture:
                for i in range(max(first, 1), len(blocks)):
                    handles.append(blocks[i].register_forward_pre_hook(keep(i)))
            return simulate(self.snn, images, self.T, amp=self.amp, monitor=monitor)
        finally:
            for handle in handles:
                handle.remove()
            for i, block in saved.items():
                blocks[i] = block

    def accept(self) -> None:
        """The last candidate is the current best: its block inputs replace the cached ones."""
        self.cache.update({b: v for b, v in self._pending.items() if len(v) == len(self.images)})
        self._pending = {}
        if self._pending_counts is not None:
            self.layer_counts, self._pending_counts = self._pending_counts, None
            self.best_energy = self.last_energy

    def cache_figures(self) -> Dict:
        kept = self.kept or []
        held = sum(t.numel() * t.element_size() for v in self.cache.values() for t in v)
        return {'cached_blocks': list(kept), 'cache_mib': held / 2 ** 20,
                'block_evaluations': self.blocks_run, 'block_evaluations_full': self.blocks_total}

    @torch.no_grad()
    def final_figures(self, thresholds: List[torch.Tensor]) -> Dict:
        """Agreement with the ANN's top-1 after every step, and the energy per step (SOPMonitor),
        of the chosen thresholds on the search images (one more run, outside the budget)."""
        self.set(thresholds)
        agree = torch.zeros(self.T, dtype=torch.float64)
        with SOPMonitor(self.snn) as monitor:
            for images, logits in zip(self.images, self.logits):
                cumulative = simulate(self.snn, images, self.T, amp=self.amp, monitor=monitor).cumsum(0)
                agree += (cumulative.argmax(-1) == logits.argmax(-1)).sum(1).double().cpu()
            energy = monitor.summary()
        return {'agreement': (100.0 * agree / self.count).tolist(), 'fire_rate': energy['fire_rate'],
                'energy_ratio': energy['energy_ratio']}


def _scale_candidates(scales: Sequence[float]) -> List[float]:
    """The global scales the stage evaluates: ``scales`` without 1 (the percent stage's own run)."""
    return [float(g) for g in scales if float(g) != 1.0]


def check_search_args(target_T: int, percents: Sequence[float], budget: int, search_images: int,
                      cache_mib: float = DEFAULT_CACHE_MIB, prefix_weight: float = DEFAULT_PREFIX_WEIGHT,
                      scales: Sequence[float] = DEFAULT_SCALES, energy_weight: float = DEFAULT_ENERGY_WEIGHT) -> None:
    """Refuse bad search settings with a :class:`utils.UserError` naming the flag."""
    if isinstance(target_T, bool) or not isinstance(target_T, int) or target_T < 1:
        raise utils.UserError(f'--target_T must be a number of time steps >= 1, got {target_T!r}')
    if not percents:
        raise utils.UserError('--target_percents needs at least one percent')
    bad = [p for p in percents if not 0.0 < p <= 1.0]
    if bad:
        raise utils.UserError(f'--target_percents must lie in (0, 1], got {bad[0]}')
    if len(set(percents)) != len(percents):
        raise utils.UserError('--target_percents holds the same percent twice')
    bad = [g for g in scales if not (math.isfinite(g) and g > 0)]
    if bad:
        raise utils.UserError(f'the candidate threshold scales must be positive numbers, got {bad[0]}')
    if len(set(scales)) != len(scales):
        raise utils.UserError('the candidate threshold scales hold the same scale twice')
    first = len(percents) + len(_scale_candidates(scales))
    if budget < first:
        what = 'percents' if first == len(percents) else 'percents and global scales'
        raise utils.UserError(f'--search_budget {budget} is smaller than the {first} candidate '
                              f'{what} it must evaluate first')
    if search_images < 1:
        raise utils.UserError(f'--search_images must be >= 1, got {search_images}')
    if not cache_mib >= 0:
        raise utils.UserError(f'--search_cache_mb must be >= 0 (0: no block cache), got {cache_mib}')
    if not prefix_weight >= 0:
        raise utils.UserError(f'--search_prefix_weight must be >= 0, got {prefix_weight}')
    if not (math.isfinite(energy_weight) and energy_weight >= 0):
        raise utils.UserError(f'--search_energy_weight must be a number >= 0, got {energy_weight}')


def choose_thresholds(model: nn.Module, calib_loader: Iterable, target_T: int, device, *,
                      percents: Sequence[float] = DEFAULT_PERCENTS, scales: Sequence[float] = DEFAULT_SCALES,
                      budget: int = DEFAULT_BUDGET, search_images: int = DEFAULT_SEARCH_IMAGES,
                      max_batches: Optional[int] = None, amp: Optional[str] = None,
                      conversion: Optional[Dict] = None, objective: str = 'kl', search_fixed: bool = True,
                      cache_mib: float = DEFAULT_CACHE_MIB, prefix_weight: float = DEFAULT_PREFIX_WEIGHT,
                      energy_weight: float = DEFAULT_ENERGY_WEIGHT, log: Callable[[str], None] = print) -> Dict:
    """Choose the thresholds of ``model`` for ``target_T`` steps on ``calib_loader`` alone.

    ``model`` holds calibrating :class:`TestNeuron` s (``for_v``), each of ``granularity``
    'place' or 'channel' (ECMT_SPEC 15: the search keeps it); ``calib_loader`` yields (images,
    labels) batches, of which the labels are never read; ``conversion`` are the keyword arguments
    of :func:`trans_utils.convert_to_snn` the SNN will be run with (levels, ``softmax_p``,
    ``fc2_thresholds``, ``coding``, ``fire_rule``, ``threshold_scale``): the search simulates that
    SNN, and places whose thresholds it fixes are not searched by percent or global scale.

    Stages (each candidate one ``target_T``-step simulation of the search images, ``budget`` in
    all): the percents (at the conversion's ``threshold_scale``), then the global scales
    (``scales``, relative to that ``threshold_scale``: every calibrated threshold times one
    factor; an empty ``scales`` skips the stage), then one scale per kind of place and one per
    place (:data:`SCALE_FACTORS`) with what is left of the budget.

    On return every calibrated TestNeuron's ``scale_p``/``scale_n`` hold the quantiles at the
    chosen percent times the place's own scale (1 for places not searched), WITHOUT the global
    scale: that is recorded as ``threshold_scale`` (also in the record's ``conversion``), to be
    passed to :func:`convert_to_snn`, which multiplies every calibrated threshold by it. The
    places of fixed thresholds (s, a fixed fc2), which threshold_scale does not touch, are scaled
    by the global stage too (the chosen scale relative to the conversion's,
    ``global_relative_scale``, times their own): their chosen values are ``fixed_thresholds``,
    given by :func:`apply_fixed_thresholds`. Converting the model with the
    record's ``conversion`` thus gives the SNN the search judged. Returns the search's record
    (plain values only: it goes into the checkpoint and the --results JSON).
    """
    percents = [float(p) for p in percents]
    scales = [float(g) for g in scales]
    check_search_args(target_T, percents, budget, search_images, cache_mib, prefix_weight, scales, energy_weight)
    if objective not in OBJECTIVES:
        raise utils.UserError(f'unknown search objective {objective!r}; choose one of {", ".join(OBJECTIVES)}')
    conversion = dict(conversion or {})
    start_scale = float(conversion.get('threshold_scale', 1.0))
    granularities = sorted({m.granularity for _, m in get_modules(model, (TestNeuron,)) if m.calibrate})
    granularity = granularities[0] if len(granularities) == 1 else 'mixed'
    start = time.perf_counter()
    quantiles, images, logits, batches = record_quantiles(
        model, calib_loader, percents, device, amp=amp, max_batches=max_batches, keep_images=search_images)
    record_seconds = time.perf_counter() - start

    # The SNN judged by the search: a converted copy, its thresholds set per candidate. Any
    # thresholds do for the conversion (it refuses uncalibrated places); the first percent's here.
    copied = copy.deepcopy(model)
    for name, neuron in get_modules(copied, (TestNeuron,)):
        if name in quantiles:
            _set_thresholds(neuron, quantiles[name][0])
    # The search simulates the neuron that will run (conversion['coding'], 'fire_rule', ECMT_SPEC 14, 15).
    snn = convert_to_snn(copied, **conversion).eval()
    places, fixed = [], {}
    levels_config = {k: v for k, v in conversion.items() if k not in ('coding', 'fire_rule', 'threshold_scale', 'backend')}
    for name, neuron in get_modules(snn, (TwoSideNeuron,)):
        value = threshold_config(neuron.place, **levels_config)[1]
        if value is None and name in quantiles:
            places.append(name)
        elif value is not None and search_fixed:
            # A place of fixed thresholds (s, a fixed fc2): its base is the fixed value, for
            # every percent; the per-place search scales it like any other.
            places.append(name)
            fixed[name] = torch.tensor([value] * len(percents), dtype=torch.float32)
    bases = {**quantiles, **fixed}  # per place, per percent
    search = _Search(snn, places, images, logits, target_T, amp, budget, objective_of(objective, prefix_weight),
                     cache_bytes=int(cache_mib * 2 ** 20), log=log, energy_weight=energy_weight)
    log(f'low-latency calibration for T={target_T} ({granularity} thresholds, fire rule '
        f'{conversion.get("fire_rule", "ecmt")}, {conversion.get("coding", "rate")} coding): {len(places)} places '
        f'searched, quantiles of {len(percents)} percents recorded on {batches} batches in {record_seconds:.1f} s; '
        f'objective {OBJECTIVE_TEXT[objective]}'
        + (f' + {prefix_weight:g} x its mean over the first 1..{target_T - 1} steps' if prefix_weight and target_T > 1
           else '')
        + (f' + {energy_weight:g} x the energy after {target_T} steps (ECMT_SPEC 8, relative to the ANN)'
           if energy_weight else '')
        + f' on {search.count} calibration images, at most {budget} evaluations')

    def scaled(i: int, base_value: torch.Tensor, place_scale: float, relative: float) -> torch.Tensor:
        # A calibrated place: what convert_to_snn gives it (the TestNeuron's value times
        # threshold_scale = start_scale * relative, in float32, as it computes it). A place of
        # fixed thresholds: its fixed value times the relative global scale and its own scale
        # (recorded in fixed_thresholds, which snn applies). The SNN judged is the one converted
        # from the TestNeurons and the record.
        if places[i] in fixed:
            return _thresholds(base_value, place_scale * relative)
        value = _thresholds(base_value, place_scale)
        return value * (start_scale * relative) if start_scale * relative != 1.0 else value

    def candidate(base_values: List[torch.Tensor], place_scales: Sequence[float], relative: float
                  ) -> List[torch.Tensor]:
        return [scaled(i, b, s, relative) for i, (b, s) in enumerate(zip(base_values, place_scales))]

    history: List[float] = []
    percent_objectives = []
    best_index, best = 0, float('inf')
    ones = [1.0] * len(places)
    for index, percent in enumerate(percents):
        value = search.objective(candidate([bases[name][index] for name in places], ones, 1.0),
                                 label=f'percent {percent:g}')
        percent_objectives.append({'percent': percent, 'objective': value})
        if value < best:
            best_index, best = index, value
            search.accept()
        history.append(best)
    percent = percents[best_index]
    base = [bases[name][best_index] for name in places]
    percent_objective = best

    # Stage 1b: one global scale of every searched threshold (calibrated ones through
    # threshold_scale, fixed ones through fixed_thresholds).
    chosen_relative = 1.0
    scale_objectives = [{'scale': 1.0, 'objective': percent_objective}] if scales else []
    for relative in _scale_candidates(scales):
        value = search.objective(candidate(base, ones, relative), label=f'global scale {relative:g}')
        scale_objectives.append({'scale': relative, 'objective': value})
        if value < best:
            best, chosen_relative = value, relative
            search.accept()
        history.append(best)
    scale_objective = best
    global_scale = start_scale * chosen_relative

    place_scales = [1.0] * len(places)
    current = candidate(base, place_scales, chosen_relative)
    accepted = 0

    def sweep(groups: List[List[int]], factors: Sequence[float], limit: int, stage: str) -> None:
        # Coordinate search over groups of places sharing one multiplicative change of scale.
        nonlocal best, current, accepted
        for factor in factors:
            improved = True
            while improved and search.evaluations < limit:
                improved = False
                for group in groups:
                    # Lower first: at few steps thresholds mostly need to come down.
                    for change in (1 / factor, factor):
                        if search.evaluations >= limit:
                            break
                        trial = list(current)
                        for i in group:
                            trial[i] = scaled(i, base[i], place_scales[i] * change, chosen_relative)
                        what = search.neurons[group[0]].place if len(group) > 1 else places[group[0]]
                        value = search.objective(trial, changed=group, label=f'{stage} {what} x{change:.3g}')
                        better = value < best
                        history.append(min(best, value))
                        if better:
                            search.accept()
                            best, current = value, trial
                            for i in group:
                                place_scales[i] *= change
                            improved = True
                            accepted += 1
                            break
            if search.evaluations >= limit:
                break

    kinds: Dict[str, List[int]] = {}
    for i, name in enumerate(places):
        kinds.setdefault(search.neurons[i].place, []).append(i)
    if len(kinds) < len(places):
        # Stage 2a: one scale per kind of place (q, s, fc1, ...), with at most half the budget left.
        sweep(list(kinds.values()), SCALE_FACTORS[:2], search.evaluations + (budget - search.evaluations) // 2,
              'per kind')
    kind_scales = {kind: place_scales[group[0]] for kind, group in kinds.items()}
    kind_accepted, kind_evaluations = accepted, search.evaluations
    # Stage 2b: one scale per place.
    sweep([[i] for i in range(len(places))], SCALE_FACTORS, budget, 'per place')
    log(f'  global scale {global_scale:g} (objective {percent_objective:.5f} -> {scale_objective:.5f}); '
        f'per-kind and per-place scales: {accepted} changes accepted, objective -> {best:.5f}')

    # The chosen thresholds go into the calibrating model: quantiles at the chosen percent times
    # the place's scale (1 where a place was not searched, or is a fixed fc2, whose searched value
    # is its fixed one times its scale: fixed_thresholds, applied by snn); the global scale is the
    # conversion's threshold_scale, not folded in.
    chosen = dict(zip(places, place_scales))
    fixed_thresholds = {name: [float(v) for v in current[i]] for i, name in enumerate(places) if name in fixed}
    for name, neuron in get_modules(model, (TestNeuron,)):
        if name in quantiles:  # a fixed fc2 keeps its quantile: its searched value is recorded
            _set_thresholds(neuron, _thresholds(quantiles[name][best_index],
                                                1.0 if name in fixed else chosen.get(name, 1.0)))
    final = search.final_figures(current)
    cache = search.cache_figures()
    search.cache.clear()
    seconds = time.perf_counter() - start
    skipped = ''
    if cache['block_evaluations_full']:
        skipped = (f'; block cache: inputs of {len(cache["cached_blocks"])} blocks kept ({cache["cache_mib"]:.0f} MiB), '
                   f'{cache["block_evaluations"]} of {cache["block_evaluations_full"]} block evaluations run')
    log(f'  search cost: {search.evaluations} evaluations of {target_T} steps on {search.count} images, '
        f'{search.seconds:.1f} s ({search.seconds / max(search.evaluations, 1):.2f} s each); '
        f'{seconds:.1f} s in all{skipped}')
    steps = ', '.join(f't={t}: {a:.2f}%' for t, a in enumerate(final['agreement'], 1))
    log(f'  chosen: percent {percent:g}, threshold_scale {global_scale:g}; agreement with the ANN on the search '
        f'images {steps}; energy vs ANN at t={target_T}: {final["energy_ratio"][-1]:.4f}')
    conversion_record = _plain(conversion)
    if scales or 'threshold_scale' in conversion:
        conversion_record['threshold_scale'] = global_scale
    return {
        'target_T': target_T, 'objective': objective, 'prefix_weight': prefix_weight, 'percent': percent,
        'percent_objectives': percent_objectives, 'percent_objective': percent_objective,
        'granularity': granularity, 'fire_rule': conversion.get('fire_rule', 'ecmt'),
        'coding': conversion.get('coding', 'rate'), 'threshold_scale': global_scale,
        'scale_candidates': [start_scale * g for g in scales], 'scale_objectives': scale_objectives,
        'scale_objective': scale_objective, 'global_relative_scale': chosen_relative,
        'final_objective': best, 'scales': chosen, 'scale_factors': list(SCALE_FACTORS),
        'objective_history': history, 'evaluations': search.evaluations, 'budget': budget,
        'accepted_changes': accepted, 'kind_scales': kind_scales, 'kind_accepted_changes': kind_accepted,
        'kind_stage_evaluations': kind_evaluations, 'search_images': search.count, 'calibration_batches': batches,
        'seconds_quantiles': record_seconds, 'seconds_search': search.seconds, 'seconds': seconds,
        'conversion': conversion_record, 'search_fixed': search_fixed, 'fixed_thresholds': fixed_thresholds,
        'cache_mib_limit': cache_mib, 'energy_weight': energy_weight, 'energy_of_best': search.best_energy,
        **cache,
        **{f'search_{k}': v for k, v in final.items()},
    }


def apply_fixed_thresholds(snn: nn.Module, record: Optional[Dict], log: Callable[[str], None] = print) -> int:
    """``snn`` mode: give the places of fixed thresholds (``s``, a fixed ``fc2``) of a converted
    model the thresholds a ``--target_T`` search chose for them (``record``: the checkpoint's
    ``low_latency`` entry; nothing to do without one or for a search that kept them fixed), so
    that the SNN is the one the search judged. Returns the number of places set."""
    chosen = (record or {}).get('fixed_thresholds') or {}
    if not chosen:
        return 0
    modules = dict(get_modules(snn, (TwoSideNeuron,)))
    missing = [name for name in chosen if name not in modules]
    if missing:
        raise utils.UserError(f'the checkpoint\'s low-latency record names {len(missing)} places this model '
                              f'does not have ({", ".join(missing[:3])}): it was searched for another model')
    for name, (theta_p, theta_n) in chosen.items():
        modules[name].scale_p.fill_(theta_p)
        modules[name].scale_n.fill_(theta_n)
    kinds = sorted({modules[name].place for name in chosen})
    log(f'thresholds of {len(chosen)} places of fixed thresholds ({", ".join(kinds)}) as chosen by for_v '
        f'--target_T {record.get("target_T")} (recorded in the checkpoint; --softmax_p and --fc2_thresholds '
        'do not apply to them)')
    return len(chosen)


def _plain(conversion: Dict) -> Dict:
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in conversion.items()}


def run_for_args(model: nn.Module, calib_loader: Iterable, args, device, amp: Optional[str],
                 conversion: Dict, log: Callable[[str], None] = print) -> Dict:
    """``run_class_finetuning.py --test_mode for_v --target_T N``: the search with the command
    line's settings on ``calib_loader`` (which already holds only the first --calib_batches
    batches). One process only: the search is not distributed."""
    if utils.get_world_size() > 1:
        raise utils.UserError('--target_T runs in one process: start it without torchrun')
    if not getattr(args, 'calib_data_path', None):
        print('warning: --target_T without --calib_data_path chooses the thresholds on the evaluation '
              'images (tuning on the test set); pass --calib_data_path to calibrate on a training split',
              file=sys.stderr)
    # The global-scale stage's candidates (none: --search_scales with no value skips the stage);
    # the chosen scale goes into the checkpoint's record as its threshold_scale, which snn applies.
    scales = getattr(args, 'search_scales', DEFAULT_SCALES)
    scales = DEFAULT_SCALES if scales is None else tuple(scales)
    return choose_thresholds(model, calib_loader, args.target_T, device, percents=args.target_percents,
                             scales=scales, budget=args.search_budget, search_images=args.search_images, amp=amp,
                             conversion=conversion, objective=args.search_objective,
                             search_fixed=args.search_fixed, cache_mib=args.search_cache_mb,
                             prefix_weight=args.search_prefix_weight,
                             energy_weight=getattr(args, 'search_energy_weight', DEFAULT_ENERGY_WEIGHT), log=log)
