"""Peak memory of the command line, as a user runs it: `ann` and `snn` of run_class_finetuning.py
in fresh processes, at several depths (issue 22, item 5).

    python benchmarks/cli_memory.py                      # ViT-S/16, 224 px, batch 8, T=4, 96 images, depths 1 2 4 8 12
    python benchmarks/cli_memory.py --eva                # EVA-01 giant at 336 px, T=4, depths 1 2 3, GB per image at 40 blocks
    python benchmarks/cli_memory.py --env ECMT_KEEP_MEMORY=0 --depths 4 12

Random weights (the CLI seeds them: the same in every process) and random images (a folder of
PNGs in two classes, made here); thresholds calibrated once per depth by a `for_v` run on the
first batch. Each `ann` and `snn --no-monitor` run is a fresh process whose peak resident set
size (VmHWM of that process alone, not of its data-loader workers) is read when it exits; the
table gives both peaks (with --repeats N, the medians of N pairs of runs), `snn - ann` (what
simulating the SNN costs beyond evaluating the ANN, which holds the same weights and data
pipeline) and the SNN's `seconds`. The checks of the issue
are printed under the table: `snn - ann` at most --limit_mib at every depth, and flat in depth
(its value at the deepest depth within 10% of that at the reference depth, 4 by default; also
the SNN's own peak). With --eva: the SNN peak at depths 1, 2, 3 at batch --batch_size,
extrapolated to 40 blocks per image (as bench_snn.py --eva_per_image does for one batch in one
process). ``--json`` prints one machine-readable line instead.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CLI = str(ROOT / 'run_class_finetuning.py')

# Runs the command line in this process and writes its own peak RSS (VmHWM, kB) to a file at exit.
WRAPPER = r'''
import atexit, os, runpy, sys
def report():
    with open('/proc/self/status') as f:
        fields = dict(line.split(':', 1) for line in f if ':' in line)
    with open(os.environ['CLI_MEMORY_OUT'], 'w') as out:
        out.write(fields['VmHWM'].split()[0])
atexit.register(report)
sys.argv = sys.argv[1:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))
runpy.run_path(sys.argv[0], run_name='__main__')
'''


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('Peak RSS of the CLI ann and snn runs against depth')
    p.add_argument('--model', default='vit_small_patch16_224')
    p.add_argument('--input_size', default=224, type=int)
    p.add_argument('--nb_classes', default=2, type=int, help='classes of the head (the image folder has two)')
    p.add_argument('--batch_size', default=8, type=int)
    p.add_argument('--T', default=4, type=int)
    p.add_argument('--images', default=96, type=int, help='evaluation images (random PNGs, two classes)')
    p.add_argument('--depths', nargs='+', type=int, default=[1, 2, 4, 8, 12])
    p.add_argument('--reference_depth', default=4, type=int, help='flatness: the deepest depth against this one')
    p.add_argument('--limit_mib', default=256.0, type=float, help='the issue\'s bound on snn - ann')
    p.add_argument('--model_kwargs', nargs='*', default=[], help='more architecture overrides (depth is set here)')
    p.add_argument('--cli_args', nargs=argparse.REMAINDER, default=[],
                   help='more arguments for every ann/snn run (last on the line)')
    p.add_argument('--env', nargs='*', default=[], metavar='KEY=VALUE', help='environment of the CLI runs')
    p.add_argument('--num_workers', default=None, type=int, help='data-loader workers (default: the CLI\'s)')
    p.add_argument('--eva', action='store_true',
                   help='EVA-01 giant at 336 px, T=4, batch 2, 4 images, depths 1 2 3: GB per image at 40 blocks')
    p.add_argument('--workdir', default=None, help='folder for images and checkpoints (default: a temporary one)')
    p.add_argument('--repeats', default=1, type=int,
                   help='ann and snn processes per depth; the table gives medians (3 or more: a steadier figure)')
    p.add_argument('--json', action='store_true')
    return p


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open('/proc/cpuinfo') as f:
            cpu = next(line.split(':', 1)[1].strip() for line in f if line.startswith('model name'))
    except (OSError, StopIteration):
        pass
    try:
        with open('/proc/meminfo') as f:
            mem = int(f.readline().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        mem = float('nan')
    libc = ' '.join(platform.libc_ver())
    import torch
    return (f'{platform.node()}: {cpu}, {os.cpu_count()} cores visible, {mem:.0f} GiB, {libc}, '
            f'Python {platform.python_version()}, torch {torch.__version__}')


def make_images(folder: Path, count: int, size: int) -> None:
    import numpy as np
    from PIL import Image
    rng = np.random.default_rng(0)
    for index in range(count):
        target = folder / ('a' if index % 2 == 0 else 'b')
        target.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(target / f'{index:04d}.png')


def run_cli(args, mode: str, depth: int, work: Path, extra=()) -> dict:
    """One CLI run in a fresh process: its peak RSS (MiB) and, for ann/snn, its results."""
    results = work / f'{mode}_d{depth}.json'
    peak_file = work / f'{mode}_d{depth}.peak'
    command = [sys.executable, '-c', WRAPPER, CLI, '--test_mode', mode, '--model', args.model,
               '--model_kwargs', *args.model_kwargs, f'depth={depth}', '--input_size', str(args.input_size),
               '--nb_classes', str(args.nb_classes), '--data_set', 'image_folder',
               '--eval_data_path', str(work / 'images'), '--batch_size', str(args.batch_size),
               '--log_dir', str(work), '--output_dir', str(work), '--results', str(results), '--no_progress',
               *extra]
    if args.num_workers is not None:
        command += ['--num_workers', str(args.num_workers)]
    command += args.cli_args
    env = dict(os.environ, CLI_MEMORY_OUT=str(peak_file))
    env.update(item.split('=', 1) for item in args.env)
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f'{mode} at depth {depth} failed:\n{done.stderr[-3000:]}')
    record = json.loads(results.read_text())
    return {'peak_mib': int(peak_file.read_text()) / 1024, 'seconds': record.get('seconds')}


def measure(args, work: Path) -> list:
    """One row per depth: medians over --repeats pairs of ann and snn processes (the peak of one
    process moves by tens of MiB between identical runs: where the allocator's free blocks fall
    depends on the timing of the data-loader workers), the runs themselves in ``runs``."""
    rows = []
    for depth in args.depths:
        checkpoint = work / f'calibrated_d{depth}.pth'
        run_cli(args, 'for_v', depth, work, ['--savename', checkpoint.stem, '--calib_batches', '1'])
        runs = []
        for _ in range(args.repeats):
            ann = run_cli(args, 'ann', depth, work)
            snn = run_cli(args, 'snn', depth, work, ['--model_path', str(checkpoint), '--test_T', str(args.T),
                                                     '--no-monitor'])
            runs.append({'ann_peak_mib': ann['peak_mib'], 'snn_peak_mib': snn['peak_mib'],
                         'snn_minus_ann_mib': snn['peak_mib'] - ann['peak_mib'], 'ann_seconds': ann['seconds'],
                         'snn_seconds': snn['seconds']})
        row = {'depth': depth, **{key: statistics.median(run[key] for run in runs) for key in runs[0]}}
        if args.repeats > 1:
            row['runs'] = runs
        rows.append(row)
        if not args.json:
            spread = ''
            if args.repeats > 1:
                spread = ' (runs ' + ', '.join(f"{run['snn_minus_ann_mib']:+.0f}" for run in runs) + ')'
            print(f"  depth {depth:3d}: ann {row['ann_peak_mib']:7.0f} MiB  snn {row['snn_peak_mib']:7.0f} MiB  "
                  f"snn - ann {row['snn_minus_ann_mib']:+6.0f} MiB{spread}  (ann {row['ann_seconds']:.1f} s, "
                  f"snn {row['snn_seconds']:.1f} s)", flush=True)
    return rows


def checks(args, rows: list) -> dict:
    by_depth = {row['depth']: row for row in rows}
    out = {}
    if not args.eva:
        out['max_snn_minus_ann_mib'] = max(row['snn_minus_ann_mib'] for row in rows)
        out['within_limit'] = out['max_snn_minus_ann_mib'] <= args.limit_mib
        deepest = max(by_depth)
        if args.reference_depth in by_depth and deepest != args.reference_depth:
            ref, deep = by_depth[args.reference_depth], by_depth[deepest]
            out['flat'] = {
                'depths': [args.reference_depth, deepest],
                'snn_minus_ann_ratio': deep['snn_minus_ann_mib'] / ref['snn_minus_ann_mib'],
                'snn_peak_ratio': deep['snn_peak_mib'] / ref['snn_peak_mib']}
    else:
        # What the SNN costs beyond the ANN (same weights and data), per image, extrapolated to
        # EVA-01 giant's 40 blocks (the whole-process peaks also hold the weights, ~100 MiB a block).
        extra = {d: by_depth[d]['snn_minus_ann_mib'] / args.batch_size for d in (1, 2, 3) if d in by_depth}
        if len(extra) == 3:
            out['eva_gib_per_image_40_blocks_from_1_2'] = (extra[1] + 39 * (extra[2] - extra[1])) / 1024
            out['eva_gib_per_image_40_blocks_from_2_3'] = (extra[2] + 38 * (extra[3] - extra[2])) / 1024
            out['eva_gib_per_image_40_blocks_from_1_3'] = (extra[1] + 39 * (extra[3] - extra[1]) / 2) / 1024
    return out


def main() -> dict:
    args = get_args_parser().parse_args()
    if args.eva:
        defaults = get_args_parser().parse_args([])
        for name, value in dict(model='eva_giant_patch14_336', input_size=336, T=4, batch_size=2, images=4,
                                depths=[1, 2, 3]).items():
            if getattr(args, name) == getattr(defaults, name):
                setattr(args, name, value)
        if '--fc2_calibrated' not in args.cli_args:
            args.cli_args = ['--fc2_calibrated', *args.cli_args]
    with tempfile.TemporaryDirectory(prefix='cli_memory_') as tmp:
        work = Path(args.workdir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        if not (work / 'images').exists():
            make_images(work / 'images', args.images, args.input_size)
        if not args.json:
            print(f'machine: {machine()}')
            print(f'{args.model} at {args.input_size} px, batch {args.batch_size}, T={args.T}, {args.images} '
                  f"images, random weights; env {' '.join(args.env) or '(as given)'}; peak RSS of each process:")
        rows = measure(args, work)
    result = {'machine': machine(), 'model': args.model, 'input_size': args.input_size,
              'batch_size': args.batch_size, 'T': args.T, 'images': args.images, 'env': args.env,
              'rows': rows, **checks(args, rows)}
    if args.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key not in ('rows', 'machine', 'model', 'input_size', 'batch_size', 'T', 'images', 'env'):
                print(f'{key}: {value}')
    return result


if __name__ == '__main__':
    main()
