"""Benchmark through the command line: the `seconds` fields of run_class_finetuning.py.

    python benchmarks/bench_cli.py                     # 4-block ViT at 32 px on DIGITS, batch 64, T=8
    python benchmarks/bench_cli.py --model_path quickstart_output/digits_vit_best.pth --runs 5

Each measurement is a fresh process, as a user runs it, so one-time costs (loading or compiling
the fused kernels, first use of memory) are inside the SNN's `seconds`. Per run: `ann`, `for_v`,
`snn` (energy monitor on, the default) and `snn --no-monitor`, one after the other, so that the
ratios of a run are taken under the same conditions. Printed per run and as medians over runs:
SNN/(T x ANN), calibration/ANN, and the monitor's cost (monitor on / off - 1). ``--json`` prints
one machine-readable line instead.

Without ``--model_path`` the model has random weights (the same in every process: the CLI seeds
them); thresholds are calibrated once, first, by a ``for_v`` run. The costs hardly depend on the
weights.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from steal import CpuSteal  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
CLI = str(ROOT / 'run_class_finetuning.py')


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('CLI timings of ann, for_v and snn (fresh processes)')
    p.add_argument('--model', default='vit_tiny_patch16_224')
    p.add_argument('--model_kwargs', nargs='*', default=['patch_size=4', 'embed_dim=96', 'depth=4', 'num_heads=3'])
    p.add_argument('--model_path', default=None, help='trained weights (default: random weights)')
    p.add_argument('--input_size', default=32, type=int)
    p.add_argument('--nb_classes', default=10, type=int)
    p.add_argument('--data_set', default='DIGITS')
    p.add_argument('--eval_data_path', default=None)
    p.add_argument('--batch_size', default=64, type=int)
    p.add_argument('--T', default=8, type=int)
    p.add_argument('--runs', default=3, type=int, help='repetitions of the four commands')
    p.add_argument('--device', default='cpu')
    p.add_argument('--json', action='store_true', help='print one JSON line')
    return p


def run_cli(args, out: Path, mode: str, name: str, model_path, *extra) -> dict:
    results = out / f'{name}.json'
    command = [sys.executable, CLI, '--test_mode', mode, '--model', args.model, '--input_size',
               str(args.input_size), '--nb_classes', str(args.nb_classes), '--data_set', args.data_set,
               '--batch_size', str(args.batch_size), '--num_workers', '0', '--device', args.device,
               '--no_progress', '--output_dir', str(out), '--log_dir', str(out), '--results', str(results),
               '--test_T', str(args.T), *extra]
    if args.model_kwargs:
        command += ['--model_kwargs', *args.model_kwargs]
    if model_path:
        command += ['--model_path', str(model_path)]
    if args.eval_data_path:
        command += ['--eval_data_path', args.eval_data_path]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f'{mode} failed (exit {done.returncode}):\n{done.stderr[-2000:]}')
    return json.loads(results.read_text())


def main(args) -> dict:
    rows = []
    with tempfile.TemporaryDirectory(prefix='ecmt_bench_cli_') as tmp:
        out = Path(tmp)
        run_cli(args, out, 'for_v', 'calibrate', args.model_path, '--savename', 'thresholds')
        thresholds = out / 'thresholds.pth'
        for run in range(args.runs):
            with CpuSteal() as steal:
                ann = run_cli(args, out, 'ann', 'ann', args.model_path)
                snn = run_cli(args, out, 'snn', 'snn', thresholds)
                bare = run_cli(args, out, 'snn', 'snn_bare', thresholds, '--no-monitor')
                calib = run_cli(args, out, 'for_v', 'for_v', args.model_path, '--savename', 'again')
            row = {'ann': ann['seconds'], 'for_v': calib['seconds'], 'snn': snn['seconds'],
                   'snn_no_monitor': bare['seconds'], 'images': ann['n'],
                   'snn_acc1_T': snn['acc1'][-1], 'ann_acc1': ann['acc1'], 'cpu_steal_percent': steal.percent}
            row['snn_over_T_ann'] = row['snn'] / (args.T * row['ann'])
            row['snn_no_monitor_over_T_ann'] = row['snn_no_monitor'] / (args.T * row['ann'])
            row['calibration_over_ann'] = row['for_v'] / row['ann']
            row['monitor_overhead'] = row['snn'] / row['snn_no_monitor'] - 1
            rows.append(row)
            if not args.json:
                print(f'run {run + 1}: ann {row["ann"]:.2f} s, for_v {row["for_v"]:.2f} s, snn {row["snn"]:.2f} s '
                      f'(no monitor {row["snn_no_monitor"]:.2f} s): SNN/(T x ANN) {row["snn_over_T_ann"]:.2f}, '
                      f'calibration/ANN {row["calibration_over_ann"]:.2f}, monitor {100 * row["monitor_overhead"]:+.1f}%'
                      + (f', CPU steal {steal.percent:.0f}%' if steal.percent is not None else ''), flush=True)
    keys = [k for k in rows[0] if k not in ('images',) and rows[0][k] is not None]
    medians = {k: statistics.median(r[k] for r in rows) for k in keys}
    result = {'model': args.model, 'model_kwargs': args.model_kwargs, 'input_size': args.input_size,
              'batch_size': args.batch_size, 'T': args.T, 'data_set': args.data_set,
              'images': rows[0]['images'], 'runs': rows, 'median': medians}
    if args.json:
        print(json.dumps(result))
    else:
        m = medians
        print(f'median of {len(rows)} runs ({rows[0]["images"]} images, batch {args.batch_size}, T={args.T}): '
              f'ann {m["ann"]:.2f} s, for_v {m["for_v"]:.2f} s, snn {m["snn"]:.2f} s; '
              f'SNN/(T x ANN) {m["snn_over_T_ann"]:.2f} (no monitor {m["snn_no_monitor_over_T_ann"]:.2f}), '
              f'calibration/ANN {m["calibration_over_ann"]:.2f}, monitor {100 * m["monitor_overhead"]:+.1f}%')
    return result


if __name__ == '__main__':
    main(get_args_parser().parse_args())
