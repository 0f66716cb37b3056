"""What per-channel thresholds and the rounding rule (ECMT_SPEC 15) cost over the published neuron,
on one model, in one process (a benchmark, not a test).

The same model and calibration images give two SNNs: thresholds per place with the section 4 rule
(the default), and per channel with the rounding rule. Round after round, alternating the order,
each simulates the same batch for T steps on one intra-op thread (process CPU time, robust to
other processes' load; wall time beside it). Prints the medians, the ratio channel/place (median
of the per-round ratios), the peak resident set size of the process, and the machine.

    python benchmarks/bench_channels.py                       # ViT-S/16, 224 px, batch 8, T=4
    python benchmarks/bench_channels.py --model vit_tiny_patch16_224 --input_size 32 \\
        --model_kwargs patch_size=4 embed_dim=96 depth=4 num_heads=3 --batch_size 64 --T 8
"""
from __future__ import annotations

import argparse
import copy
import platform
import resource
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.native as native_kernels  # noqa: E402
from engine_for_finetuning import simulate  # noqa: E402
from model_vit import create_model  # noqa: E402
from trans_utils import convert_to_snn, replace_test_by_testneuron  # noqa: E402
from utils import parse_model_kwargs  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('per-channel thresholds and the rounding rule against the published neuron')
    p.add_argument('--model', default='vit_small_patch16_224')
    p.add_argument('--model_kwargs', nargs='*', default=[])
    p.add_argument('--input_size', default=224, type=int)
    p.add_argument('--batch_size', default=8, type=int)
    p.add_argument('--T', default=4, type=int)
    p.add_argument('--rounds', default=7, type=int)
    p.add_argument('--threads', default=1, type=int)
    p.add_argument('--coding', default='rate', choices=('rate', 'differential'))
    return p


def main(args) -> None:
    torch.set_num_threads(args.threads)
    native_kernels.prepare()
    torch.manual_seed(0)
    base = create_model(args.model, img_size=args.input_size, num_classes=10,
                        **parse_model_kwargs(args.model_kwargs)).eval()
    calib = torch.randn(2 * args.batch_size, 3, args.input_size, args.input_size)
    x = torch.randn(args.batch_size, 3, args.input_size, args.input_size)
    models = {}
    for name, granularity, rule in (('place', 'place', 'ecmt'), ('channel', 'channel', 'round')):
        model = replace_test_by_testneuron(copy.deepcopy(base), granularity=granularity)
        with torch.no_grad():
            for batch in calib.split(args.batch_size):
                model(batch)
        models[name] = convert_to_snn(model, fire_rule=rule, coding=args.coding)
    times = {name: [] for name in models}
    walls = {name: [] for name in models}
    with torch.no_grad():
        for round_ in range(args.rounds + 1):
            order = list(models) if round_ % 2 == 0 else list(reversed(models))
            for name in order:
                cpu, wall = time.process_time(), time.perf_counter()
                simulate(models[name], x, args.T)
                if round_:  # the first round warms up
                    times[name].append(time.process_time() - cpu)
                    walls[name].append(time.perf_counter() - wall)
    ratio = statistics.median(c / p for c, p in zip(times['channel'], times['place']))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f'machine: {platform.processor() or platform.machine()}, {torch.get_num_threads()} thread(s), '
          f'torch {torch.__version__}; {args.model} {args.input_size}px batch {args.batch_size} T={args.T} '
          f'coding {args.coding}, {args.rounds} rounds')
    for name in models:
        print(f'  {name:8s} CPU {statistics.median(times[name]):.3f} s   wall {statistics.median(walls[name]):.3f} s')
    print(f'  channel+round / place+ecmt CPU time: {ratio:.3f} (median of per-round ratios); peak RSS {peak:.0f} MiB')


if __name__ == '__main__':
    main(get_args_parser().parse_args())
