"""Benchmark: the cost of simulating T SNN steps, and of calibration, against plain forward passes.

    python benchmarks/bench_snn.py                       # ViT-S/16, 224 px, batch 8, T=4, 96 images
    python benchmarks/bench_snn.py --model vit_tiny_patch16_224 --input_size 32 \
        --model_kwargs patch_size=4 embed_dim=96 depth=4 num_heads=3 --batch_size 64 --T 8 --images 448

Random weights, thresholds calibrated on random images (the cost does not depend on the values
much; the fire rates do, a little). Prints the ANN pass time over all images, the calibration pass
time and the SNN time for T steps (cold: the first pass, which includes one-time costs such as
building or loading kernels; warm: the median of --reps later passes), the ratios SNN/(T x ANN)
and calibration/ANN, the peak memory of the ANN pass and of the SNN run, and how often SNN and ANN
agree on top-1. This machine's speed drifts by tens of percent within seconds, so the passes are
interleaved batch by batch (ANN, calibration, SNN on each batch in turn) and each ratio is taken
within one repetition (warm: the median over --reps repetitions).
``--json`` prints one machine-readable line instead.

Memory instead of timings: ``--memory_scaling`` (SNN peak memory for depths 4 and 12 and T 4 and
8: it grows with T, not with depth), ``--eva_per_image`` (EVA-01 giant at 336 px, batch 1, depth
1, 2 and 3, extrapolated to its 40 blocks) and, on a GPU, ``--largest_batch`` (the largest batch that
fits, its images per second and peak memory):

    python benchmarks/bench_snn.py --memory_scaling --eva_per_image
    python benchmarks/bench_snn.py --device cuda --model eva_giant_patch14_336 --input_size 336 --T 4 \
        --largest_batch --fc2_calibrated
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.native as native_kernels  # noqa: E402
import utils  # noqa: E402
from steal import CpuSteal  # noqa: E402
from model_vit import create_model  # noqa: E402
from engine_for_finetuning import simulate  # noqa: E402
from trans_utils import (BACKEND_CHOICES, convert_to_snn, fuse_ec_neurons,  # noqa: E402
                         replace_test_by_testneuron)


class PeakMemory:
    """Peak memory above the level at entry: CUDA allocator statistics, or on the CPU the
    process's peak resident set size (Linux: VmHWM, reset at entry through /proc/self/clear_refs;
    elsewhere a thread sampling the resident set size every millisecond)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.peak_bytes = 0

    @staticmethod
    def _status(field: str) -> int:
        with open('/proc/self/status') as f:
            for line in f:
                if line.startswith(field + ':'):
                    return int(line.split()[1]) * 1024
        raise KeyError(field)

    def __enter__(self):
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
            return self
        self.base = self._status('VmRSS')
        try:
            with open('/proc/self/clear_refs', 'w') as f:
                f.write('5')  # reset the peak resident set size to the current one
            self.thread = None
        except OSError:
            self.max_rss, self.running = self.base, True
            self.thread = threading.Thread(target=self._sample, daemon=True)
            self.thread.start()
        return self

    def _sample(self) -> None:
        while self.running:
            self.max_rss = max(self.max_rss, self._status('VmRSS'))
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        if self.device.type == 'cuda':
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self.base
        elif self.thread is None:
            self.peak_bytes = self._status('VmHWM') - self.base
        else:
            self.running = False
            self.thread.join()
            self.peak_bytes = max(self.max_rss, self._status('VmRSS')) - self.base


def measure_peak_memory(args, device: torch.device, **overrides):
    """Peak memory of one ANN batch and of one SNN batch (T steps), in bytes above the weights and
    the inputs, for ``args`` with ``overrides`` (model, input_size, batch_size, T, model_kwargs).
    On the CPU this runs in a fresh process in which glibc serves every block of 64 KiB or more
    with mmap, so that freed memory leaves the resident set at once and the peak resident set
    size is the peak of live tensors (in this process it would hide in freed blocks and would
    slow the timed passes down)."""
    args = argparse.Namespace(**{**vars(args), **overrides})
    if device.type == 'cuda':
        return _peak_memory(args, device)
    import subprocess
    command = [sys.executable, __file__, '--memory_only', '--device', 'cpu', '--model', args.model,
               '--input_size', str(args.input_size), '--nb_classes', str(args.nb_classes),
               '--batch_size', str(args.batch_size), '--T', str(args.T), '--seed', str(args.seed)]
    command += ['--model_kwargs', *args.model_kwargs] if args.model_kwargs else []
    command += ['--time_chunk', str(args.time_chunk)] if args.time_chunk else []
    command += [flag for flag, on in (('--fc2_calibrated', args.fc2_calibrated), ('--no_fuse', args.no_fuse)) if on]
    out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
    peaks = json.loads(out.strip().splitlines()[-1])
    return peaks['ann'], peaks['snn']


def with_depth(model_kwargs, depth: int):
    return [k for k in model_kwargs if not k.startswith('depth=')] + [f'depth={depth}']


def memory_scaling(args, device: torch.device) -> dict:
    """Peak memory of one SNN batch against depth and T: with each layer taking all steps at once
    and keeping no state past a batch's last chunk, it should grow with T but not with depth."""
    rows = []
    for depth in args.scaling_depths:
        for steps in args.scaling_T:
            ann, snn = measure_peak_memory(args, device, T=steps, model_kwargs=with_depth(args.model_kwargs, depth))
            rows.append({'depth': depth, 'T': steps, 'ann_peak_mib': ann / 2**20, 'snn_peak_mib': snn / 2**20})
    return {'memory_scaling': rows}


def eva_per_image(args, device: torch.device) -> dict:
    """EVA-01 giant at 336 px (random weights), batch 1, T steps: SNN peak memory at depth 1, 2
    and 3, and the 40-block figure extrapolated from them: depth 1 plus 39 times the difference
    of depths 1 and 2 (the issue's estimate), and depth 2 plus 38 times the difference of depths 2
    and 3 (the first block's peak differs from the later ones' by a step that does not repeat)."""
    eva = dict(model='eva_giant_patch14_336', input_size=336, nb_classes=1000, batch_size=1, fc2_calibrated=True)
    peaks = {depth: measure_peak_memory(args, device, model_kwargs=[f'depth={depth}'], **eva)[1]
             for depth in (1, 2, 3)}
    return {'eva_giant_336': {
        'T': args.T, **{f'snn_peak_mib_depth{d}': peaks[d] / 2**20 for d in peaks},
        'per_block_mib_1_2': (peaks[2] - peaks[1]) / 2**20, 'per_block_mib_2_3': (peaks[3] - peaks[2]) / 2**20,
        'per_image_40_blocks_gib_from_1_2': (peaks[1] + 39 * (peaks[2] - peaks[1])) / 2**30,
        'per_image_40_blocks_gib_from_2_3': (peaks[2] + 38 * (peaks[3] - peaks[2])) / 2**30}}


@torch.no_grad()
def largest_batch(args, device: torch.device) -> dict:
    """The largest batch (powers of two up to --max_batch) whose SNN run of T steps fits on the
    GPU, and its throughput (images per second over --images images, after one untimed batch)
    and peak memory."""
    if device.type != 'cuda':
        raise utils.UserError('--largest_batch measures what fits on a GPU: pass --device cuda')
    torch.manual_seed(args.seed)
    kwargs = utils.parse_model_kwargs(args.model_kwargs)
    with device:  # initialised on the GPU: a billion random weights are slow to make on the CPU
        model = create_model(args.model, img_size=args.input_size, num_classes=args.nb_classes, **kwargs)
    model = model.eval()
    replace_test_by_testneuron(model, 0.99)
    model(torch.randn(2, 3, args.input_size, args.input_size, device=device))
    convert_to_snn(model, fc2_thresholds=None if args.fc2_calibrated else (0.25, 0.08), backend=args.backend)
    weights = torch.cuda.memory_allocated(device)
    amp = None if args.amp == 'none' else args.amp
    fits, batch = None, 1
    while batch <= args.max_batch:
        try:
            images = torch.randn(batch, 3, args.input_size, args.input_size, device=device)
            with PeakMemory(device) as peak:
                simulate(model, images, args.T, time_chunk=args.time_chunk, amp=amp)
            fits = (batch, peak.peak_bytes)
            del images
            batch *= 2
        except torch.cuda.OutOfMemoryError:
            break
        finally:
            torch.cuda.empty_cache()
    if fits is None:
        raise utils.UserError(f'not even a batch of 1 fits at T={args.T}')
    batch, peak_bytes = fits
    images = torch.randn(batch, 3, args.input_size, args.input_size, device=device)
    runs = max(1, args.images // batch)
    seconds = timed_pass(lambda b: simulate(model, b, args.T, time_chunk=args.time_chunk, amp=amp), [images] * runs,
                         device)
    return {'largest_batch': batch, 'amp': args.amp, 'backend': model.ecmt_backend, 'weights_gib': weights / 2**30,
            'snn_peak_gib': peak_bytes / 2**30,
            'snn_peak_gib_per_image': peak_bytes / 2**30 / batch, 'images_per_second': runs * batch / seconds}


@torch.no_grad()
def _peak_memory(args, device: torch.device):
    kwargs = utils.parse_model_kwargs(args.model_kwargs)
    model = create_model(args.model, img_size=args.input_size, num_classes=args.nb_classes, **kwargs)
    model = model.to(device).eval()
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
    model(images)
    with PeakMemory(device) as ann:
        model(images)
    replace_test_by_testneuron(model, 0.99)
    model(images)
    convert_to_snn(model, fc2_thresholds=None if args.fc2_calibrated else (0.25, 0.08), backend=args.backend)
    fuse_ec_neurons(model, not args.no_fuse)

    def snn_batch():
        simulate(model, images, args.T, time_chunk=args.time_chunk)

    snn_batch()  # compile first
    with PeakMemory(device) as snn:
        snn_batch()
    return ann.peak_bytes, snn.peak_bytes


def sync(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


@torch.no_grad()
def timed_pass(fn, batches, device) -> float:
    sync(device)
    start = time.perf_counter()
    for images in batches:
        fn(images)
    sync(device)
    return time.perf_counter() - start


def main(args) -> dict:
    device = utils.resolve_device(args.device)
    if args.memory_only:
        try:
            import ctypes
            ctypes.CDLL('libc.so.6').mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD: 64 KiB
        except (OSError, AttributeError):
            pass
        ann, snn = _peak_memory(args, device)
        print(json.dumps({'ann': ann, 'snn': snn}))
        return {'ann': ann, 'snn': snn}
    extra = [(flag, fn) for flag, fn in (('largest_batch', largest_batch), ('memory_scaling', memory_scaling),
                                         ('eva_per_image', eva_per_image)) if getattr(args, flag)]
    if extra:
        if device.type == 'cpu':
            native_kernels.prepare()
        result = {'model': args.model, 'input_size': args.input_size, 'batch_size': args.batch_size,
                  'T': args.T, 'time_chunk': args.time_chunk, 'device': str(device)}
        for _, fn in extra:
            result.update(fn(args, device))
        print_extra(result) if not args.json else print(json.dumps(result))
        return result
    if device.type == 'cpu' and not args.default_malloc:
        utils.keep_freed_memory()  # as the command line does: ANN and SNN alike
    if device.type == 'cpu':
        native_kernels.prepare()  # as the command line does
    torch.manual_seed(args.seed)
    kwargs = utils.parse_model_kwargs(args.model_kwargs)
    model = create_model(args.model, img_size=args.input_size, num_classes=args.nb_classes, **kwargs)
    model = model.to(device).eval()
    n_batches = max(1, args.images // args.batch_size)
    batches = [torch.randn(args.batch_size, 3, args.input_size, args.input_size, device=device)
               for _ in range(n_batches)]
    ctx = (torch.autocast(device.type, dtype={'fp16': torch.float16, 'bf16': torch.bfloat16}[args.amp])
           if args.amp != 'none' else torch.autocast(device.type, enabled=False))

    with torch.no_grad(), ctx, CpuSteal() as steal:
        model(batches[0])  # warm-up
        ann_logits = [model(b).float() for b in batches]
        # This machine's speed drifts by tens of percent within seconds. So the passes are
        # interleaved batch by batch (ANN, calibration, SNN on the same batch, in turn), and each
        # ratio is taken between the sums of one repetition: the same conditions for all three.
        calib_model = copy.deepcopy(model)
        replace_test_by_testneuron(calib_model, 0.99)
        snn_model = None
        agree = torch.zeros((), device=device)

        def snn_batch(images):
            return simulate(snn_model, images, args.T, time_chunk=args.time_chunk).sum(0)

        reps = []  # per repetition: seconds of ANN, calibration, SNN over all batches
        for rep in range(args.reps + 2):
            seconds = [0.0, 0.0, 0.0]
            for i, images in enumerate(batches):
                seconds[0] += timed_pass(model, [images], device)
                if rep <= args.reps:
                    seconds[1] += timed_pass(calib_model, [images], device)
                if snn_model is not None:
                    preds = []
                    seconds[2] += timed_pass(lambda b: preds.append(snn_batch(b).argmax(-1)), [images], device)
                    if rep == 1:
                        agree += (preds[0] == ann_logits[i].argmax(-1)).sum()
            reps.append(seconds)
            if rep == 0:  # thresholds from the first calibration pass; the SNN runs from rep 1 on
                snn_model = copy.deepcopy(calib_model)
                convert_to_snn(snn_model, fc2_thresholds=None if args.fc2_calibrated else (0.25, 0.08),
                               backend=args.backend)
                fuse_ec_neurons(snn_model, not args.no_fuse)
        result_mem = measure_peak_memory(args, device)

    # rep 0: first calibration pass (cold); rep 1: first SNN pass (cold); warm: the later ones.
    ann_times = [r[0] for r in reps]
    calib_cold, calib_pairs = reps[0][1], [(r[0], r[1]) for r in reps[1:args.reps + 1]]
    cold, cold_ann = reps[1][2], reps[1][0]
    snn_pairs = [(r[0], r[2]) for r in reps[2:]]
    ann_first = reps[0][0]
    ann = statistics.median(ann_times)
    calib_warm = statistics.median(c for _, c in calib_pairs)
    warm = statistics.median(s for _, s in snn_pairs)
    images = n_batches * args.batch_size
    result = {
        'model': args.model, 'model_kwargs': kwargs, 'input_size': args.input_size,
        'batch_size': args.batch_size, 'T': args.T, 'images': images, 'device': str(device),
        'threads': torch.get_num_threads(), 'backend': args.backend, 'ec_neuron_fusion': not args.no_fuse,
        'amp': args.amp,
        'reps': args.reps, 'ann_seconds': ann, 'ann_seconds_all': ann_times,
        'calibration_cold_seconds': calib_cold, 'calibration_warm_seconds': calib_warm,
        'snn_cold_seconds': cold, 'snn_warm_seconds': warm,
        # Cold: over the ANN passes interleaved with it. Warm: median over repetitions.
        'calibration_over_ann_cold': calib_cold / ann_first,
        'calibration_over_ann': statistics.median(c / a for a, c in calib_pairs),
        'snn_over_T_ann_cold': cold / (args.T * cold_ann),
        'snn_over_T_ann_warm': statistics.median(s / (args.T * a) for a, s in snn_pairs),
        'ann_peak_mib': result_mem[0] / 2**20, 'snn_peak_mib': result_mem[1] / 2**20,
        'snn_over_ann_peak_memory': result_mem[1] / max(result_mem[0], 1),
        'snn_ann_top1_agreement': float(agree) / images,
        'cpu_steal_percent': steal.percent,
        'malloc': 'default' if args.default_malloc or device.type != 'cpu' else 'keep_freed_memory',
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(f'{args.model} {kwargs or ""} at {args.input_size}px, batch {args.batch_size}, T={args.T}, '
              f'{images} images, {device} ({torch.get_num_threads()} threads), fused kernels={result["fused"]}, '
              f'EC+neuron fusion={result["ec_neuron_fusion"]}')
        print(f'  ANN pass                {ann:8.2f} s   (median of {len(ann_times)}: '
              f'{min(ann_times):.2f}-{max(ann_times):.2f})')
        print(f'  calibration, cold       {calib_cold:8.2f} s   x{result["calibration_over_ann_cold"]:.2f} of ANN '
              '(first pass: includes building/loading kernels)')
        print(f'  calibration, warm       {calib_warm:8.2f} s   x{result["calibration_over_ann"]:.2f} of ANN')
        print(f'  SNN, T steps, cold      {cold:8.2f} s   x{result["snn_over_T_ann_cold"]:.2f} of T x ANN '
              '(first pass: includes building/loading kernels)')
        print(f'  SNN, T steps, warm      {warm:8.2f} s   x{result["snn_over_T_ann_warm"]:.2f} of T x ANN')
        print(f'  peak memory, one batch  ANN {result["ann_peak_mib"]:.0f} MiB, SNN {result["snn_peak_mib"]:.0f} MiB '
              f'(x{result["snn_over_ann_peak_memory"]:.1f}; above the weights and inputs)')
        print(f'  SNN/ANN top-1 agreement {100 * result["snn_ann_top1_agreement"]:.1f}% '
              '(random weights and images)')
        if steal.percent is not None:
            print(f'  CPU steal time          {steal.percent:.0f}% (the hypervisor ran others; noisy if high)')
    return result


def print_extra(result: dict) -> None:
    if 'memory_scaling' in result:
        print(f'peak memory of one SNN batch against depth and T ({result["model"]}, {result["input_size"]} px, '
              f'batch {result["batch_size"]}, {result["device"]}; above the weights and inputs):')
        for row in result['memory_scaling']:
            print(f'  depth {row["depth"]:3d}, T={row["T"]:2d}: SNN {row["snn_peak_mib"]:8.0f} MiB   '
                  f'(ANN {row["ann_peak_mib"]:.0f} MiB)')
    if 'eva_giant_336' in result:
        e = result['eva_giant_336']
        print(f'EVA-01 giant, 336 px, batch 1, T={e["T"]}: SNN peak {e["snn_peak_mib_depth1"]:.0f} / '
              f'{e["snn_peak_mib_depth2"]:.0f} / {e["snn_peak_mib_depth3"]:.0f} MiB at depth 1 / 2 / 3 '
              f'({e["per_block_mib_1_2"]:+.0f}, then {e["per_block_mib_2_3"]:+.0f} MiB per block); 40 blocks, '
              f'extrapolated: {e["per_image_40_blocks_gib_from_1_2"]:.2f} GiB per image from depths 1-2, '
              f'{e["per_image_40_blocks_gib_from_2_3"]:.2f} GiB from depths 2-3')
    if 'largest_batch' in result:
        print(f'{result["model"]}, {result["input_size"]} px, T={result["T"]}: largest batch {result["largest_batch"]} '
              f'(powers of two), {result["images_per_second"]:.1f} images/s, peak {result["snn_peak_gib"]:.1f} GiB '
              f'above the weights ({result["snn_peak_gib_per_image"]:.2f} GiB per image; weights '
              f'{result["weights_gib"]:.1f} GiB)')


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument('--model', default='vit_small_patch16_224')
    p.add_argument('--model_kwargs', nargs='*', default=[], metavar='KEY=VALUE')
    p.add_argument('--input_size', type=int, default=224)
    p.add_argument('--nb_classes', type=int, default=1000)
    p.add_argument('--batch_size', type=int, default=8)
    p.add_argument('--T', type=int, default=4)
    p.add_argument('--time_chunk', type=int, default=None, help='steps simulated at a time (default: all T)')
    p.add_argument('--images', type=int, default=96, help='images per pass (whole batches)')
    p.add_argument('--reps', type=int, default=3, help='timed repetitions (median) after the warm-up')
    p.add_argument('--device', default=None, help='cpu or cuda (default: cuda if available)')
    p.add_argument('--amp', default='none', choices=('none', 'fp16', 'bf16'))
    p.add_argument('--backend', default='auto', choices=BACKEND_CHOICES,
                   help='kernels of the SNN: auto (native on the CPU, triton on CUDA), native, triton, eager '
                        '(default: %(default)s)')
    p.add_argument('--no_fuse', action='store_true',
                   help='compute each MT neuron apart from the EC kernel that feeds it (trans_utils.fuse_ec_neurons)')
    p.add_argument('--fc2_calibrated', action='store_true', help='use calibrated fc2 thresholds')
    p.add_argument('--default_malloc', action='store_true',
                   help="keep glibc's default allocator settings (see utils.keep_freed_memory)")
    p.add_argument('--seed', type=int, default=0)
    p.add_argument('--json', action='store_true', help='print one JSON line')
    p.add_argument('--memory_scaling', action='store_true',
                   help='instead of the timings: SNN peak memory for every depth and T below')
    p.add_argument('--scaling_depths', type=int, nargs='+', default=[4, 12])
    p.add_argument('--scaling_T', type=int, nargs='+', default=[4, 8])
    p.add_argument('--eva_per_image', action='store_true',
                   help='instead of the timings: EVA-01 giant memory per image (depth 1, 2 and 3 at 336 px, batch 1, '
                        'extrapolated to 40 blocks)')
    p.add_argument('--largest_batch', action='store_true',
                   help='instead of the timings (CUDA): the largest batch that fits, its images/s and peak memory')
    p.add_argument('--max_batch', type=int, default=512, help='--largest_batch: the largest batch tried')
    p.add_argument('--memory_only', action='store_true', help=argparse.SUPPRESS)
    return p


if __name__ == '__main__':
    utils.run_cli(main, get_args_parser())
