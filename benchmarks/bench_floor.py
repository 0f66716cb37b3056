"""Where the SNN's floor lies, in one process (a benchmark, not a test): T plain ANN passes, the ANN
on the T*B rows at once, the SNN, and a memory floor of the neurons (one copy of every neuron
call's input: read it and write as many floats, the least any neuron can do). Random weights.

    python benchmarks/bench_floor.py      # the 4-block DIGITS ViT at 32 px, batch 64, T=8, 5 rounds
"""
from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels.native as native_kernels  # noqa: E402
import utils  # noqa: E402
from engine_for_finetuning import simulate  # noqa: E402
from model_vit import create_model  # noqa: E402
from trans_utils import (TwoSideNeuron, convert_to_snn, fuse_ec_neurons, get_modules,  # noqa: E402
                         replace_test_by_testneuron)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('the SNN against T ANN passes, the ANN on T*B rows and the neurons\' memory floor')
    p.add_argument('--model', default='vit_tiny_patch16_224')
    p.add_argument('--model_kwargs', nargs='*', default=['patch_size=4', 'embed_dim=96', 'depth=4', 'num_heads=3'])
    p.add_argument('--input_size', default=32, type=int)
    p.add_argument('--nb_classes', default=10, type=int)
    p.add_argument('--batch_size', default=64, type=int)
    p.add_argument('--T', default=8, type=int)
    p.add_argument('--rounds', default=5, type=int, help='timed rounds after a warm-up (median)')
    return p


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@torch.no_grad()
def main(args) -> dict:
    if min(args.batch_size, args.T, args.rounds, args.input_size) < 1:
        raise utils.UserError('--batch_size, --T, --rounds and --input_size must be >= 1')
    utils.keep_freed_memory()  # as the command line does
    native_kernels.prepare()
    torch.manual_seed(0)
    model = create_model(args.model, img_size=args.input_size, num_classes=args.nb_classes,
                         **utils.parse_model_kwargs(args.model_kwargs)).eval()
    images = torch.randn(args.batch_size, 3, args.input_size, args.input_size)
    snn = copy.deepcopy(model)
    replace_test_by_testneuron(snn, 0.99)
    snn(images)  # thresholds from this batch
    convert_to_snn(snn, fc2_thresholds=(0.25, 0.08))
    fuse_ec_neurons(snn, True)
    sizes = []
    # A q/k/v neuron given the fused qkv output (qkv_part) reads a third of it.
    hooks = [m.register_forward_pre_hook(lambda m, a, k: sizes.append(a[0].numel() // (3 if k.get('qkv_part') else 1)),
                                         with_kwargs=True)
             for _, m in get_modules(snn, (TwoSideNeuron,))]
    simulate(snn, images, args.T)
    for hook in hooks:
        hook.remove()
    inputs = [torch.randn(n) for n in sizes]
    rows = images.repeat(args.T, 1, 1, 1)
    passes = {'T_ann': lambda: [model(images) for _ in range(args.T)], 'ann_TB_rows': lambda: model(rows),
              'snn': lambda: simulate(snn, images, args.T), 'neuron_floor': lambda: [x.clone() for x in inputs]}
    seconds = {k: [] for k in passes}
    for r in range(args.rounds + 1):  # interleaved; round 0 warms up
        for k, fn in passes.items():
            s = timed(fn)
            if r:
                seconds[k].append(s)
    m = {k: statistics.median(v) for k, v in seconds.items()}
    print(f'{args.model} {" ".join(args.model_kwargs)}, batch {args.batch_size}, T={args.T}: {len(sizes)} neuron '
          f'calls, {sum(sizes) / 1e6:.1f} M elements; median of {args.rounds} rounds')
    print('  ' + ', '.join(f'{k} {1000 * v:.1f} ms' for k, v in m.items()))
    print(f'  over T ANN passes: SNN {m["snn"] / m["T_ann"]:.3f}; ANN on T*B rows {m["ann_TB_rows"] / m["T_ann"]:.3f}; '
          f'floor (ANN on T*B rows + neuron copies) {(m["ann_TB_rows"] + m["neuron_floor"]) / m["T_ann"]:.3f}')
    return m


if __name__ == '__main__':
    utils.run_cli(main, get_args_parser())
