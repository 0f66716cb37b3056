"""Before and after in one process (a benchmark, not a test): the SNN of two checkouts of this
project on the same model, thresholds and images, timed round after round, the two interleaved
(the order alternating) so that the host's drift falls on both alike.

    git worktree add ../before <commit>
    python benchmarks/ab_trees.py --before ../before                  # ViT-S/16, 224 px, batch 8, T=4
    python benchmarks/ab_trees.py --before ../before --model vit_tiny_patch16_224 --input_size 32 \\
        --model_kwargs patch_size=4 embed_dim=96 depth=4 num_heads=3 --batch_size 64 --T 8 --rounds 9

Each checkout's modules are imported under their own names and swapped into ``sys.modules`` while
its code runs. Per round and checkout: one ANN pass and one SNN simulation of T steps, wall time
and process CPU time (one intra-op thread by default: CPU time is then robust to other processes'
load). Prints the medians, SNN/(T x ANN) per checkout, the after/before ratio of SNN times (median
of the per-round ratios), whether the logits agree, and, with ``--memory``, each checkout's peak
resident set size above its state before the first SNN pass, measured in a child process of its own
(one number per checkout: a process's peak cannot be split between two code trees).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import copy
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parents[1]
# The top-level module names of the checkouts (each checkout brings its own; others, such as
# torch and timm, are imported once).
PROJECT: set = set()


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser('the SNN of two checkouts of this project, interleaved in one process')
    p.add_argument('--before', required=True, help='the checkout to compare against (a git worktree)')
    p.add_argument('--after', default=str(HERE), help='the checkout under test (default: this one)')
    p.add_argument('--model', default='vit_small_patch16_224')
    p.add_argument('--model_kwargs', nargs='*', default=[])
    p.add_argument('--input_size', default=224, type=int)
    p.add_argument('--nb_classes', default=10, type=int)
    p.add_argument('--batch_size', default=8, type=int)
    p.add_argument('--T', default=4, type=int)
    p.add_argument('--rounds', default=7, type=int, help='timed rounds after a warm-up round (medians)')
    p.add_argument('--threads', default=1, type=int, help='intra-op threads (default 1: CPU time is then robust)')
    p.add_argument('--memory', action='store_true', help='also each checkout\'s peak RSS of one SNN pass, in a child')
    p.add_argument('--json', action='store_true', help='one machine-readable line')
    p.add_argument('--child', default=None, help=argparse.SUPPRESS)  # internal: the --memory child's checkout
    return p


class Checkout:
    """One checkout's project modules, imported apart from any other checkout's."""

    def __init__(self, root: str) -> None:
        self.root = str(Path(root).resolve())
        if not (Path(self.root) / 'trans_utils.py').exists():
            raise SystemExit(f'error: {root} is not a checkout of this project (no trans_utils.py)')
        self.modules = {}
        PROJECT.update(path.stem for path in Path(self.root).glob('*.py'))
        for package in Path(self.root).glob('*/__init__.py'):  # kernels/ and its modules
            PROJECT.add(package.parent.name)
            PROJECT.update(f'{package.parent.name}.{path.stem}' for path in package.parent.glob('*.py'))
        with self.active():
            import engine_for_finetuning  # noqa: F401  (imports the rest it needs)
            import model_vit  # noqa: F401
            import trans_utils  # noqa: F401
            native_kernels = importlib.import_module(
                'kernels.native' if (Path(self.root) / 'kernels').is_dir() else 'native_kernels')
            import utils
            utils.keep_freed_memory()
            native_kernels.prepare()
        if not str(self.modules['trans_utils'].__file__).startswith(self.root):
            raise SystemExit(f'error: the modules of {self.root} could not be imported apart from another checkout')

    @contextlib.contextmanager
    def active(self):
        saved = {name: sys.modules.pop(name) for name in PROJECT if name in sys.modules}
        sys.modules.update(self.modules)
        sys.path.insert(0, self.root)
        try:
            yield
        finally:
            sys.path.remove(self.root)
            for name in PROJECT:
                module = sys.modules.pop(name, None)
                if module is not None and str(getattr(module, '__file__', '')).startswith(self.root):
                    self.modules[name] = module
            sys.modules.update(saved)

    def build(self, args, images):
        """(ANN, converted SNN) from the same seed: thresholds from ``images``."""
        import torch
        with self.active():
            from model_vit import create_model
            from trans_utils import convert_to_snn, replace_test_by_testneuron
            from utils import parse_model_kwargs
            torch.manual_seed(0)
            model = create_model(args.model, img_size=args.input_size, num_classes=args.nb_classes,
                                 **parse_model_kwargs(args.model_kwargs)).eval()
            snn = copy.deepcopy(model)
            replace_test_by_testneuron(snn, 0.99)
            with torch.no_grad():
                snn(images)
            convert_to_snn(snn, fc2_thresholds=(0.25, 0.08))
        return model, snn

    def simulate(self, snn, images, T):
        with self.active():
            from engine_for_finetuning import simulate
            return simulate(snn, images, T)


def _images(args):
    import torch
    return torch.randn(args.batch_size, 3, args.input_size, args.input_size,
                       generator=torch.Generator().manual_seed(1))


def _peak_rss_child(args) -> int:
    """(The --memory child.) Peak RSS above the state before the first SNN pass, in bytes."""
    import torch
    torch.set_num_threads(args.threads)
    tree = Checkout(args.child)
    images = _images(args)
    _, snn = tree.build(args, images)

    def status(field):
        with open('/proc/self/status') as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ':'))
    base = status('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')
    with torch.no_grad():
        for _ in range(2):
            tree.simulate(snn, images, args.T)
    return status('VmHWM') - base


@contextlib.contextmanager
def _timer(into_wall, into_cpu, into_faults=None):
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    into_cpu.append(time.process_time() - cpu)
    into_wall.append(time.perf_counter() - wall)
    if into_faults is not None:  # page faults: memory the pass took fresh from the system
        into_faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)


def main(args) -> dict:
    if args.child:
        print(_peak_rss_child(args))
        return {}
    import torch
    torch.set_num_threads(args.threads)
    images = _images(args)
    trees = {'before': Checkout(args.before), 'after': Checkout(args.after)}
    built = {name: tree.build(args, images) for name, tree in trees.items()}
    times = {name: {k: [] for k in ('ann_wall', 'ann_cpu', 'snn_wall', 'snn_cpu', 'snn_page_faults')}
             for name in trees}
    logits = {}
    with torch.no_grad():
        for r in range(args.rounds + 1):  # round 0 warms up
            order = list(trees) if r % 2 else list(reversed(trees))
            for name in order:
                model, snn = built[name]
                t = times[name] if r else {k: [] for k in times[name]}
                with _timer(t['ann_wall'], t['ann_cpu']):
                    model(images)
                with _timer(t['snn_wall'], t['snn_cpu'], t['snn_page_faults']):
                    logits[name] = trees[name].simulate(snn, images, args.T)
    med = {name: {k: statistics.median(v) for k, v in t.items()} for name, t in times.items()}
    out = {'model': args.model, 'model_kwargs': args.model_kwargs, 'input_size': args.input_size,
           'batch_size': args.batch_size, 'T': args.T, 'rounds': args.rounds, 'threads': args.threads,
           'before_root': trees['before'].root, 'after_root': trees['after'].root,
           'machine': f'{os.cpu_count()} CPUs, {torch.__version__}',
           'logits_max_abs_diff': float((logits['after'] - logits['before']).abs().max())}
    for name in trees:
        m = med[name]
        out[name] = {**{k: round(v, 4) for k, v in m.items()},
                     'snn_over_T_ann_cpu': round(m['snn_cpu'] / (args.T * m['ann_cpu']), 3),
                     'snn_over_T_ann_wall': round(m['snn_wall'] / (args.T * m['ann_wall']), 3)}
    for clock in ('cpu', 'wall'):
        pairs = [a / b for a, b in zip(times['after'][f'snn_{clock}'], times['before'][f'snn_{clock}'])]
        out[f'after_over_before_snn_{clock}'] = round(statistics.median(pairs), 4)
        out[f'after_faster_rounds_{clock}'] = sum(p < 1 for p in pairs)
    if args.memory:
        for name, tree in trees.items():
            command = [sys.executable, __file__, '--child', tree.root, '--before', tree.root,
                       *sum(([f'--{k}', str(getattr(args, k))] for k in
                             ('model', 'input_size', 'nb_classes', 'batch_size', 'T', 'threads')), []),
                       '--model_kwargs', *args.model_kwargs]
            peak = int(subprocess.run(command, check=True, capture_output=True, text=True).stdout.split()[-1])
            out[name]['snn_peak_rss_mib'] = round(peak / 2 ** 20, 1)
    if args.json:
        print(json.dumps(out))
        return out
    print(f'{args.model} {" ".join(args.model_kwargs)}, {args.input_size} px, batch {args.batch_size}, T={args.T}, '
          f'{args.threads} thread(s), median of {args.rounds} interleaved rounds ({out["machine"]})')
    for name in trees:
        o = out[name]
        memory = f', SNN peak RSS +{o["snn_peak_rss_mib"]} MiB' if args.memory else ''
        print(f'  {name:6s} {trees[name].root}: ANN {o["ann_cpu"]:.3f} s CPU / {o["ann_wall"]:.3f} s wall, '
              f'SNN {o["snn_cpu"]:.3f} s CPU / {o["snn_wall"]:.3f} s wall, SNN/(T x ANN) '
              f'{o["snn_over_T_ann_cpu"]} CPU, {o["snn_over_T_ann_wall"]} wall, {o["snn_page_faults"]:.0f} page faults '
              f'per SNN pass{memory}')
    print(f'  after/before SNN: {out["after_over_before_snn_cpu"]} CPU (after faster in '
          f'{out["after_faster_rounds_cpu"]}/{args.rounds} rounds), {out["after_over_before_snn_wall"]} wall '
          f'({out["after_faster_rounds_wall"]}/{args.rounds}); logits max |diff| {out["logits_max_abs_diff"]:.3g}')
    return out


if __name__ == '__main__':
    main(get_args_parser().parse_args())
