"""How close the MT neuron's mean output after T steps comes to a constant input, whatever the
threshold: the floor of the per-activation error that no threshold choice removes.

For a constant input x (here x / theta log-uniform over [0.5, 64], the span of the 8 levels) the
neuron of ECMT_SPEC 4 emits one spike +theta * 2^j per step; the mean of its spikes over T steps
estimates x. The relative error |mean - x| / x is printed per T (max and mean over x). The
levels are powers of two of theta, so the error is the same for any theta (a lower threshold
only moves which inputs fall under the smallest level): at T = 1 and 2 it is a property of the
neuron, and how much of it the network tolerates decides its accuracy at those steps.

    python benchmarks/mt_error.py [--T 1 2 3 4 8] [--levels 8]
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from trans_utils import mt_fire  # noqa: E402


def relative_errors(T: int, levels: int = 8, points: int = 200001, low: float = 0.5,
                    high: float = 64.0) -> torch.Tensor:
    """|mean spike over T steps - x| / x for x / theta log-uniform over [low, high] (theta = 1)."""
    x = torch.exp(torch.linspace(math.log(low), math.log(high), points, dtype=torch.float64)).float()
    theta = torch.tensor(1.0)
    membrane, total = torch.zeros_like(x), torch.zeros_like(x)
    for _ in range(T):
        membrane = membrane + x
        spike = mt_fire(membrane, theta, theta, levels)
        membrane, total = membrane - spike, total + spike
    return (total / T - x).abs() / x


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--T', nargs='+', type=int, default=[1, 2, 3, 4, 8])
    parser.add_argument('--levels', type=int, default=8)
    args = parser.parse_args(argv)
    high = 2.0 ** (args.levels - 2)  # inputs the top level can still follow
    print(f'MT neuron, {args.levels} levels, constant input x / theta log-uniform in [0.5, {high:g}]:')
    print('| T | max relative error | mean relative error |\n|---|---|---|')
    for T in args.T:
        rel = relative_errors(T, args.levels, high=high)
        print(f'| {T} | {rel.max():.3f} | {rel.mean():.3f} |')


if __name__ == '__main__':
    main()
