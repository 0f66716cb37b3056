"""Evaluation loops: ``evaluate`` (ann / for_v) and ``evaluate_snn`` (snn, T time steps), and
``simulate``, the one simulation path of a converted model (chunks of time steps, layer by layer).

Both return a dict of plain Python results. Accuracy is accumulated as tensor counts (one host
sync per batch, for the progress bar and the log), and every per-batch running figure is appended,
in English, to the log file (``log_ann.txt`` / ``log_snn.txt``), as the published scripts did.
"""
from __future__ import annotations

import contextlib
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Union

import torch
import torch.nn as nn
from tqdm import tqdm

import utils
from trans_utils import MultiStep, reset_net

__all__ = ['evaluate', 'evaluate_snn', 'simulate', 'chunk_sizes', 'autocast_context']


def autocast_context(device: torch.device, amp: Optional[str]):
    """``torch.autocast`` for ``amp`` in {'fp16', 'bf16'}, or a null context for None/'none'."""
    if amp in (None, 'none'):
        return contextlib.nullcontext()
    dtype = {'fp16': torch.float16, 'bf16': torch.bfloat16}[amp]
    return torch.autocast(device_type=device.type, dtype=dtype)


def _sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _batches(data_loader: Iterable, device: torch.device, max_batches: Optional[int]):
    """(index, images, targets) on ``device`` for the first ``max_batches`` batches (or all)."""
    for index, (images, target) in enumerate(data_loader):
        if max_batches is not None and index >= max_batches:
            break
        yield index, images.to(device, non_blocking=True), target.to(device, non_blocking=True)


def _percent(count: torch.Tensor, n: int) -> float:
    return 100.0 * float(count) / max(n, 1)


class _Progress:
    """A tqdm bar on a terminal; with output redirected, one flushed line every ``print_freq``
    batches and at the last one (a log file gets no carriage-return frames)."""

    def __init__(self, total: int, desc: str, show: bool, print_freq: int):
        self.total, self.desc, self.print_freq = total, desc, max(1, int(print_freq))
        self.lines = show and not sys.stderr.isatty()
        self.bar = tqdm(total=total, desc=desc, unit='batch', dynamic_ncols=True,
                        disable=not show or self.lines)
        self.start = time.perf_counter()
        self.done, self.printed, self.figures = 0, 0, {}

    def update(self, index: int, **figures: str) -> None:
        self.bar.set_postfix(**figures)
        self.bar.update(1)
        self.done, self.figures = index + 1, figures
        if self.lines and (self.done % self.print_freq == 0 or self.done == self.total):
            self._line()

    def _line(self) -> None:
        elapsed = time.perf_counter() - self.start
        shown = ', '.join(f'{k} {v}' for k, v in self.figures.items())
        print(f'{self.desc}: batch {self.done}/{self.total}, {shown}, {elapsed:.0f} s', flush=True)
        self.printed = self.done

    def close(self) -> None:
        if self.lines and self.done and self.printed != self.done:
            self._line()  # the last batches were fewer than announced (skipped images)
        self.bar.close()


def _topk(output: torch.Tensor) -> tuple:
    """Top-1, and top-5 where there are at least 5 classes (top-5 of fewer is always 100%)."""
    return (1, 5) if output.size(1) >= 5 else (1,)


@torch.no_grad()
def evaluate(model: nn.Module, data_loader: Iterable, device: torch.device, *,
             log_path: Optional[str] = None, amp: Optional[str] = None,
             max_batches: Optional[int] = None, desc: str = 'ann',
             reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
             show_progress: bool = True, print_freq: int = 10) -> Dict:
    """Plain evaluation (``ann``), or calibration (``for_v``: the model holds TestNeurons).

    Returns ``{'acc1', 'acc5', 'loss', 'n', 'seconds'}`` (accuracies in percent; ``seconds`` is the
    wall time of this loop alone; no ``acc5`` with fewer than 5 classes). ``max_batches`` stops
    after that many batches. Progress: a bar on a terminal, else a line every ``print_freq`` batches.
    ``reduce`` sums a tensor over processes (distributed runs); identity when None. It is called
    once, after the loop, so processes may have different numbers of batches (even none); the
    progress bar and the per-batch log lines then show this process's share, the result the sum.
    """
    model.eval()
    criterion = nn.CrossEntropyLoss(reduction='sum')
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct1, correct5, loss, n
    total_batches = len(data_loader) if max_batches is None else min(max_batches, len(data_loader))
    bar = _Progress(total_batches, desc, show_progress, print_freq)
    top5 = None  # whether top-5 means anything: known from the first batch's class count
    _sync(device)
    start = time.perf_counter()
    for index, images, target in _batches(data_loader, device, max_batches):
        with autocast_context(device, amp):
            output = model(images)
        output = output.float()
        top5 = len(_topk(output)) == 2
        correct1, correct5 = utils.accuracy(output, target, topk=(1, 5))
        batch = torch.stack([correct1.double(), correct5.double(), criterion(output, target).double(),
                             torch.tensor(float(target.numel()), dtype=torch.float64, device=device)])
        totals += batch
        c1, c5, loss, n = totals.tolist()
        n = int(n)
        figures = {'acc1': f'{_percent(c1, n):.2f}'}
        if top5:
            figures['acc5'] = f'{_percent(c5, n):.2f}'
        bar.update(index, **figures)
        if log_path is not None:
            five = f', top-5 {_percent(c5, n):.3f}%' if top5 else ''
            utils.append_log(log_path, f'{desc} batch {index + 1}/{total_batches}: images {n}, '
                                       f'top-1 {_percent(c1, n):.3f}%{five}, loss {loss / max(n, 1):.4f}')
    _sync(device)
    seconds = time.perf_counter() - start
    bar.close()
    if reduce is not None:
        totals = reduce(totals)
    c1, c5, loss, n = totals.tolist()
    n = int(n)
    results = {'acc1': _percent(c1, n), 'acc5': _percent(c5, n), 'loss': loss / max(n, 1), 'n': n,
               'seconds': seconds}
    if top5 is False:
        del results['acc5']
    return results


@torch.no_grad()
def chunk_sizes(T: int, time_chunk: Union[None, int, Sequence[int]] = None) -> List[int]:
    """The steps of each chunk: ``time_chunk`` at a time (None: all T at once; the last chunk
    holds what remains), or the given sizes (positive, summing to T)."""
    if T < 1:
        raise utils.UserError(f'the number of time steps must be >= 1, got {T}')
    if time_chunk is None:
        return [T]
    if isinstance(time_chunk, int):
        if time_chunk < 1:
            raise utils.UserError(f'--time_chunk must be >= 1, got {time_chunk}')
        return [min(time_chunk, T - first) for first in range(0, T, time_chunk)]
    sizes = [int(size) for size in time_chunk]
    if any(size < 1 for size in sizes) or sum(sizes) != T:
        raise utils.UserError(f'chunk sizes {sizes} must be positive and sum to T={T}')
    return sizes


def simulate(model: nn.Module, images: torch.Tensor, T: int, *,
             time_chunk: Union[None, int, Sequence[int]] = None, amp: Optional[str] = None,
             monitor=None) -> torch.Tensor:
    """Run a converted SNN for ``T`` steps on one batch (direct coding: the same images at every
    step) and return the head's output of every step, float32 [T, B, num_classes] (per step, not
    summed). The steps run in chunks of ``time_chunk`` (default T: all at once), each chunk layer by
    layer, every layer taking all the chunk's steps at once; the state is carried from one chunk to
    the next, and not kept after the last (ECMT_SPEC 13: every value is the same for any chunking;
    ``time_chunk=1`` is the step-by-step order; a sequence gives the size of each chunk). Memory
    grows with the chunk size x batch size, not with depth. The model is reset before and after. ``monitor``: a ``trans_utils.SOPMonitor``
    counting this batch (``new_batch`` is called here)."""
    sizes = chunk_sizes(T, time_chunk)
    reset_net(model)
    if monitor is not None:
        monitor.new_batch()
    outputs = []
    try:
        with MultiStep(model) as steps:
            first = 0
            for count in sizes:
                steps.chunk(count, last=first + count == T)
                if monitor is not None:
                    monitor.step, monitor.time_steps = first, count
                with autocast_context(images.device, amp):
                    output = model(images)
                outputs.append(output.float().unflatten(0, (count, -1)))
                first += count
    finally:
        if monitor is not None:
            monitor.time_steps = 1
        reset_net(model)  # nothing is left after a full run; after an error, free what is
    return torch.cat(outputs)


@torch.no_grad()
def evaluate_snn(model: nn.Module, data_loader: Iterable, device: torch.device, T: int, *,
                 log_path: Optional[str] = None, amp: Optional[str] = None, monitor=None,
                 time_chunk: Optional[int] = None, max_batches: Optional[int] = None,
                 reduce: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
                 show_progress: bool = True, print_freq: int = 10) -> Dict:
    """Run the converted SNN for ``T`` steps per batch (ECMT_SPEC 7).

    The prediction after step t is the argmax of the head's outputs summed over steps 1..t.
    Each batch runs through :func:`simulate` (``time_chunk`` steps at a time, default all T).
    Returns ``{'T', 'acc1': [T values], 'acc5': [T values], 'n', 'seconds'}``; with a ``monitor``
    (``trans_utils.SOPMonitor``) also its per-step ``fire_rate`` and ``energy_ratio``.
    ``reduce`` sums over processes once, after the loop, as in :func:`evaluate`. With fewer
    than 5 classes there is no ``acc5``; progress as in :func:`evaluate`.
    """
    if T < 1:
        raise utils.UserError(f'--test_T must be >= 1, got {T}')
    chunk_sizes(T, time_chunk)  # refuse a bad chunking before the first batch
    model.eval()
    totals = torch.zeros(T, 2, dtype=torch.float64, device=device)  # per step: correct1, correct5
    count = torch.zeros(1, dtype=torch.float64, device=device)
    total_batches = len(data_loader) if max_batches is None else min(max_batches, len(data_loader))
    bar = _Progress(total_batches, f'snn T={T}', show_progress, print_freq)
    top5 = None
    _sync(device)
    start = time.perf_counter()
    for index, images, target in _batches(data_loader, device, max_batches):
        outputs = simulate(model, images, T, time_chunk=time_chunk, amp=amp, monitor=monitor)
        logits = None
        batch = torch.zeros(T, 2, dtype=torch.float64, device=device)
        for t in range(T):
            # Summed one step at a time, in the step-by-step order (not cumsum: its double
            # accumulator would round differently).
            logits = outputs[t] if logits is None else logits + outputs[t]
            correct1, correct5 = utils.accuracy(logits, target, topk=(1, 5))
            batch[t, 0] = correct1
            batch[t, 1] = correct5
        totals += batch
        count += target.numel()
        n = int(count.item())
        acc = (100.0 * totals / max(n, 1)).tolist()
        top5 = len(_topk(outputs[0])) == 2
        bar.update(index, acc1=f'{acc[-1][0]:.2f}', acc1_t1=f'{acc[0][0]:.2f}')
        if log_path is not None:
            steps = ', '.join(f't={t + 1}: {a[0]:.3f}' for t, a in enumerate(acc))
            five = f', top-5 at T={T}: {acc[-1][1]:.3f}%' if top5 else ''
            utils.append_log(log_path, f'snn batch {index + 1}/{total_batches}: images {n}, '
                                       f'top-1 % per step [{steps}]{five}')
    _sync(device)
    seconds = time.perf_counter() - start
    bar.close()
    if reduce is not None:
        summed = reduce(torch.cat([totals.reshape(-1), count]))
        totals, count = summed[:-1].reshape(T, 2), summed[-1:]
        if monitor is not None:
            # A process that evaluated no image (fewer batches than processes) adds zero counts,
            # so that the monitor's reduction below still meets its partners.
            monitor.zero_counts(T, device)
    n = int(count.item())
    acc = (100.0 * totals / max(n, 1)).tolist()
    results = {'T': T, 'acc1': [a[0] for a in acc], 'acc5': [a[1] for a in acc], 'n': n,
               'seconds': seconds}
    if top5 is False:
        del results['acc5']
    if monitor is not None:
        results.update(monitor.summary(reduce=reduce))
    return results
