"""Accuracy and energy per time step under the published calibration and under --target_T N.

For one model and data set: the thresholds are calibrated on the calibration images (the training
split of ``--calib_data_path``, as ``for_v`` reads it; the evaluation set without it), once as
published (``--percent``, 0.99) and once per target N (``low_latency.choose_thresholds``); each SNN
then runs T = 1..``--bench_T`` steps on
the evaluation images, with the energy monitor. Writes ``low_latency.md`` (the table),
``low_latency.json`` (every figure) and, with matplotlib, ``low_latency.png`` (top-1 against energy
relative to the ANN, one point per step) to ``--bench_out``. ``--bench_oracle`` adds, per target,
a search run on the evaluation images themselves: tuning on the test set, shown only as a bound
on what a choice of thresholds can reach on them (if even that misses the ANN, the gap is the
neuron's, not the calibration's). ``--coding rate differential`` runs every calibration for each
neuron coding (ECMT_SPEC 14; the searches simulate the coding that will run), one curve per coding
in the figure. ``--bench_scales A ...`` adds, per option and coding, the calibrated thresholds times
each global scale A without any search (the frontier of the scale alone). A benchmark, not a test:

    python benchmarks/low_latency.py --model vit_tiny_patch16_224 \\
        --model_kwargs patch_size=4 embed_dim=96 depth=4 num_heads=3 --input_size 32 --nb_classes 10 \\
        --data_set DIGITS --calib_data_path train --num_workers 0 --model_path digits_vit_best.pth \
        --bench_out bench_ll --coding rate differential

It takes the command line of ``run_class_finetuning.py`` (model, data, conversion and search
flags) plus the ``benchmark`` group below; ``--test_mode`` and ``--target_T`` are set here.
"""
from __future__ import annotations

import copy
import sys
import time
from pathlib import Path

from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import low_latency  # noqa: E402
import run_class_finetuning as cli  # noqa: E402
import utils  # noqa: E402
from datasets import build_dataset  # noqa: E402
from engine_for_finetuning import evaluate, evaluate_snn  # noqa: E402
from trans_utils import SOPMonitor, TestNeuron, convert_to_snn  # noqa: E402


def get_args_parser():
    parser = cli.get_args_parser()
    for action in parser._actions:  # the command line's --coding, here a list of codings to compare
        if '--coding' in action.option_strings:
            action.nargs, action.default = '+', ['rate']
            action.help = 'the neuron codings to compare (default: rate)'
    g = parser.add_argument_group('benchmark')
    g.add_argument('--bench_targets', nargs='*', type=int, default=[1, 2, 4], metavar='N',
                   help='the --target_T values to compare with the published calibration (no value: no search)')
    g.add_argument('--bench_T', default=8, type=int, help='time steps simulated on the evaluation images')
    g.add_argument('--bench_options', nargs='+', default=['published', 'channel+round'], choices=list(OPTION_SETS),
                   help='the ECMT_SPEC 15 options to compare: published (place thresholds, ecmt rule), channel, '
                        'round, channel+round (each calibrated and searched on its own)')
    g.add_argument('--bench_scales', nargs='*', type=float, default=[], metavar='A',
                   help='also run the calibrated thresholds times each global scale A, without search '
                        '(threshold_scale A at conversion): the accuracy/energy frontier of the scale alone')
    g.add_argument('--bench_out', default='bench_low_latency', type=str, help='folder of the outputs')
    g.add_argument('--bench_oracle', nargs='?', const='also', default=None, choices=('also', 'only'),
                   help='also (or, with "only", instead) search every target on the EVALUATION images '
                        'themselves (quantiles, search images and ANN logits all from the evaluation set): '
                        'tuning on the test set, a bound on what the search can reach on these images at '
                        'this budget, never a result')
    return parser


#: The ECMT_SPEC 15 options compared (--bench_options): (threshold granularity, fire rule).
OPTION_SETS = {'published': ('place', 'ecmt'), 'channel': ('channel', 'ecmt'), 'round': ('place', 'round'),
               'channel+round': ('channel', 'round')}


def run_snn(model, args, loader, device, amp, conversion, record=None):
    # A searched model runs the conversion its search judged (its record's: coding, fire rule and
    # the chosen global threshold_scale included); the published calibration the row's own.
    convert_to_snn(model, **(record['conversion'] if record else conversion))
    low_latency.apply_fixed_thresholds(model, record)  # the searched s / fixed fc2 thresholds
    with SOPMonitor(model) as monitor:
        return evaluate_snn(model, loader, device, args.bench_T, amp=amp, monitor=monitor,
                            show_progress=not args.no_progress)


def main(args):
    args.test_mode, args.target_T = 'for_v', None
    cli.check_args(args)
    bad = [a for a in args.bench_scales if not (a > 0 and a < float('inf'))]
    if bad:
        raise utils.UserError(f'--bench_scales must be positive numbers, got {bad[0]}')
    for target in args.bench_targets:
        low_latency.check_search_args(target, args.target_percents, args.search_budget, args.search_images,
                                      args.search_cache_mb, args.search_prefix_weight,
                                      energy_weight=args.search_energy_weight)
    utils.seed_everything(args.seed)
    device = utils.resolve_device(args.device)
    amp = cli.resolve_amp(args.amp, device)
    out = Path(args.bench_out)
    bases = {}
    for option in args.bench_options:  # a calibrating model of each granularity
        args.thresholds = OPTION_SETS[option][0]
        bases[option] = cli.build_model(args).to(device).eval()
    base = bases[args.bench_options[0]]
    calib_loader = cli.build_calibration_loader(args, base)  # the first --calib_batches batches
    calib_split = 'training' if args.calib_data_path else 'evaluation'
    eval_loader = DataLoader(build_dataset(False, args, base)[0], batch_size=args.batch_size, shuffle=False,
                             num_workers=args.num_workers)

    ann = copy.deepcopy(base)
    for neuron in ann.modules():
        if isinstance(neuron, TestNeuron):
            neuron.calibrate = False  # a plain ANN pass: the TestNeurons are identities
    ann_acc1 = evaluate(ann, eval_loader, device, amp=amp, show_progress=False)['acc1']
    print(f'ANN top-1 {ann_acc1:.2f}% on {len(eval_loader.dataset)} evaluation images; calibration on '
          f'{len(calib_loader.loader.dataset)} {calib_split} images')

    rows = []
    searches = [(False, calib_loader)] if args.bench_oracle != 'only' else []
    if args.bench_oracle:
        searches.append((True, eval_loader))
    for option, base in bases.items():
      granularity, fire_rule = OPTION_SETS[option]
      args.thresholds = granularity
      published = copy.deepcopy(base)
      start = time.perf_counter()
      evaluate(published, calib_loader, device, amp=amp, show_progress=False)  # the same for every coding
      calib_seconds = time.perf_counter() - start
      for coding in dict.fromkeys(args.coding):
        conversion = dict(linear_num=args.linear_num, qkv_num=args.qkv_num, softmax_num=args.softmax_num,
                          softmax_p=args.softmax_p, fc2_thresholds=cli.fc2_thresholds(args, base), coding=coding,
                          fire_rule=fire_rule, threshold_scale=args.threshold_scale or 1.0)
        rows.append({'coding': coding, 'options': option,
                     'calibration': f'{option}, published (percent {args.percent:g})', 'target_T': None,
                     'calibration_seconds': calib_seconds,
                     **run_snn(copy.deepcopy(published), args, eval_loader, device, amp, conversion)})
        print_row(rows[-1], ann_acc1)
        for scale in args.bench_scales:  # the same thresholds times one global scale, no search
            rows.append({'coding': coding, 'options': option, 'calibration': f'{option}, threshold_scale {scale:g}',
                         'target_T': None, 'threshold_scale': scale, 'calibration_seconds': calib_seconds,
                         **run_snn(copy.deepcopy(published), args, eval_loader, device, amp,
                                   dict(conversion, threshold_scale=scale))})
            print_row(rows[-1], ann_acc1)
        for target in args.bench_targets:
            for oracle, loader in searches:
                model = copy.deepcopy(base)
                record = low_latency.choose_thresholds(
                    model, loader, target, device, percents=args.target_percents, scales=args.search_scales,
                    budget=args.search_budget,
                    search_images=args.search_images, amp=amp, conversion=conversion,
                    objective=args.search_objective, search_fixed=args.search_fixed,
                    cache_mib=args.search_cache_mb, prefix_weight=args.search_prefix_weight,
                    energy_weight=args.search_energy_weight)
                name = (f'{option}, oracle --target_T {target} (searched on the evaluation images)' if oracle
                        else f'{option}, --target_T {target}')
                rows.append({'coding': coding, 'options': option, 'calibration': name, 'target_T': target,
                             'oracle': oracle, 'calibration_seconds': record['seconds'], 'search': record,
                             **run_snn(model, args, eval_loader, device, amp, conversion, record)})
                print_row(rows[-1], ann_acc1)

    out.mkdir(parents=True, exist_ok=True)
    table = markdown_table(rows, ann_acc1, args)
    (out / 'low_latency.md').write_text(table)
    utils.write_json({'model': args.model, 'model_kwargs': args.model_kwargs, 'data_set': args.data_set,
                      'calib_split': calib_split, 'ann_acc1': ann_acc1, 'rows': rows},
                     out / 'low_latency.json')
    print(table)
    try:
        plot(rows, ann_acc1, out / 'low_latency.png')
    except ImportError:
        print('matplotlib is not installed: no figure written')
    print(f'written to {out}')


def print_row(row, ann_acc1):
    steps = ' '.join(f'{a:.2f}' for a in row['acc1'])
    print(f'{row["coding"]}, {row["calibration"]}: top-1 t=1..{row["T"]}: {steps} (ANN {ann_acc1:.2f})')


def markdown_table(rows, ann_acc1, args) -> str:
    T = args.bench_T
    head = ('| coding | calibration | ' + ' | '.join(f't={t}' for t in range(1, T + 1))
            + ' | calibration s | evaluations |')
    lines = [f'ANN top-1 {ann_acc1:.2f}%. Each cell: SNN top-1 % / energy relative to the ANN, after t steps.',
             '', head, '|---' * (T + 4) + '|']
    for row in rows:
        cells = [f'{a:.2f} / {e:.3f}' for a, e in zip(row['acc1'], row['energy_ratio'])]
        search = row.get('search')
        evaluations = f'{search["evaluations"]} (percent {search["percent"]:g})' if search else '-'
        lines.append(f'| {row["coding"]} | {row["calibration"]} | ' + ' | '.join(cells)
                     + f' | {row["calibration_seconds"]:.1f} | {evaluations} |')
    return '\n'.join(lines) + '\n'


def plot(rows, ann_acc1, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    codings = list(dict.fromkeys(row['coding'] for row in rows))
    calibrations = list(dict.fromkeys(row['calibration'] for row in rows))
    colours = plt.rcParams['axes.prop_cycle'].by_key()['color']
    styles, markers = ('-', '--', ':', '-.'), 'osD^v<>p'
    for row in rows:  # one colour per coding, one line style and marker per calibration
        which = calibrations.index(row['calibration'])
        ax.plot(row['energy_ratio'], row['acc1'], color=colours[codings.index(row['coding']) % len(colours)],
                linestyle=styles[which % len(styles)], marker=markers[which % len(markers)], markersize=4,
                label=f'{row["coding"]}, {row["calibration"]}')
        ax.annotate('t=1', (row['energy_ratio'][0], row['acc1'][0]), textcoords='offset points',
                    xytext=(4, -10), fontsize=7)
    ax.axhline(ann_acc1, color='black', linestyle='--', linewidth=1, label='ANN')
    ax.set_xlabel('energy relative to the ANN (after t steps, t = 1, 2, ...)')
    ax.set_ylabel('top-1 (%)')
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == '__main__':
    utils.run_cli(main, get_args_parser())
