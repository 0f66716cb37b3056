"""Evaluate a ViT/EVA as an ANN, calibrate its SNN thresholds, or simulate the converted SNN.

    python run_class_finetuning.py --test_mode ann   --model M --model_path W.pth ...
    python run_class_finetuning.py --test_mode for_v --model M --model_path W.pth --savename S ...
    python run_class_finetuning.py --test_mode snn   --model_path ../models/S.pth --test_T 8 ...

The command line is the published one (ECMT, ACM MM 2024), with its defaults (ECMT_SPEC 11:
``--output_dir ../models``, ``--savename test``, ``--eval_data_path ../datasets/val``), so that
its README's commands run as written, plus ``--device``, ``--model_kwargs``, ``--results`` and a
few switches; see docs/cli.md for every flag. This file is the wiring only: weights, the model and
the for_v record are :mod:`weights`'s (the entry of :mod:`checkpoints`, :mod:`pretrained`,
:mod:`diagnosis` and :mod:`records`), the loops :mod:`engine_for_finetuning`'s, the reports
:mod:`report`'s.
"""
from __future__ import annotations

import argparse
import math
import importlib
import os
import time
from pathlib import Path

from cli_base import DATA_CONFIGS, DATA_SETS, Parser, UserError, add_launch_flags, check_launch_flags, run_cli
import options
from options import BACKEND_CHOICES, CODINGS, ENERGY_MODELS

# torch, timm and the engine are imported when a run starts, not for --help or a bad flag.
_LAZY = {
    'torch': ('torch', None), 'DataLoader': ('torch.utils.data', 'DataLoader'),
    'datasets': ('datasets', None), 'low_latency': ('low_latency', None), 'report': ('report', None),
    'native_kernels': ('kernels.native', None), 'utils': ('utils', None), 'weights': ('weights', None),
    'energy': ('energy', None),
    'build_calibration_dataset': ('datasets', 'build_calibration_dataset'),
    'build_dataset': ('datasets', 'build_dataset'),
    'evaluate': ('engine_for_finetuning', 'evaluate'), 'evaluate_snn': ('engine_for_finetuning', 'evaluate_snn'),
    'create_model': ('model_vit', 'create_model'),
    **{name: ('trans_utils', name) for name in ('ConversionError', 'SOPMonitor', 'TestNeuron', 'convert_to_snn',
                                                'get_modules', 'sync_calibration')},
}


def _lazy(name: str):
    module, attr = _LAZY[name]
    value = importlib.import_module(module)
    return value if attr is None else getattr(value, attr)


def __getattr__(name: str):
    """`run_class_finetuning.torch`, `.convert_to_snn`, ...: imported on first use."""
    if name in _LAZY:
        value = globals()[name] = _lazy(name)
        return value
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def _import_runtime() -> None:
    """Import what a run needs (names already set, e.g. by a test's monkeypatch, are kept)."""
    for name in _LAZY:
        if name not in globals():
            globals()[name] = _lazy(name)


def _default_workers() -> int:
    return min(8, max(0, (os.cpu_count() or 2) // 2))


def get_args_parser() -> argparse.ArgumentParser:
    parser = Parser(prog='run_class_finetuning.py',
                    description='ECMT: evaluate a ViT/EVA as an ANN (ann), calibrate its SNN thresholds (for_v), '
                                'simulate the converted SNN (snn).',
                    epilog='A for_v checkpoint records --model, --model_kwargs, --input_size, --nb_classes, '
                           'the level flags, --coding, the transform and the class names; ann and snn on it use '
                           'the record where a flag is not given. '
                           'Guide: README.md; semantics: docs/semantics.md.')
    _model_flags(parser)
    _data_flags(parser)
    _conversion_flags(parser)
    _low_latency_flags(parser)
    _run_flags(parser)
    _snn_reports_flags(parser)
    add_launch_flags(parser)
    return parser


def _model_flags(parser) -> None:
    g = parser.add_argument_group('model (ann and snn on a for_v checkpoint: from its record where not given)')
    g.add_argument('--model', default='vit_small_patch16_224', type=str,
                   help='timm model name (with an optional pretrained tag, e.g. vit_base_patch16_224.augreg_in21k), '
                        'hf_hub:org/name, or published alias (vit_base_patch16_224_cifar10, eva_g_patch14)')
    g.add_argument('--model_path', default=None, type=str,
                   help='weights: a torch.save or safetensors file (read by content): a timm state_dict '
                        "(optionally under model/module), a for_v output, or BAAI's EVA-01 file")
    g.add_argument('--pretrained', action='store_true',
                   help="ann/for_v: the weights timm or the hub publish for --model (timm's default tag, the "
                        "given tag, or hf_hub:org/name with its config.json), from the Hugging Face cache "
                        '(fetched once with a network; HF_HUB_OFFLINE=1 is honoured)')
    g.add_argument('--pretrained_file', default=None, type=str, metavar='PATH',
                   help="ann/for_v: a local weight file for --model loaded through timm's pretrained loading "
                        '(its filter functions apply: older key layouts)')
    g.add_argument('--model_kwargs', nargs='*', default=[], metavar='KEY=VALUE',
                   help='architecture overrides for timm.create_model, e.g. patch_size=4 depth=4 '
                        '(default: none, the named model as timm defines it)')
    g.add_argument('--input_size', default=224, type=int,
                   help='image size (img_size of the model); with --pretrained: the size of the weights')
    g.add_argument('--nb_classes', default=1000, type=int,
                   help='number of classes; with --pretrained: the class count of the weights')
    g.add_argument('--resample_pos_embed', action='store_true',
                   help="resample a checkpoint's position embedding made for another image size to "
                        '--input_size (default: such a checkpoint is an error)')


def _data_flags(parser) -> None:
    g = parser.add_argument_group('data')
    g.add_argument('--data_set', default='image_folder', choices=DATA_SETS, type=str,
                   help='CIFAR10 | CIFAR100 | IMNET | image_folder | DIGITS (bundled, no download)')
    g.add_argument('--eval_data_path', default='../datasets/val', type=str,
                   help='evaluation data folder (default ../datasets/val, as published; not read for DIGITS)')
    g.add_argument('--calib_data_path', default=None, type=str,
                   help='for_v: calibrate on the training split of --data_set in this folder (CIFAR: its '
                        'training batches; IMNET: <path>/train; image_folder: the folder itself; DIGITS: its '
                        'training split) instead of on the evaluation set (the default, as published)')
    g.add_argument('--download', action='store_true', help='download CIFAR if it is missing')
    g.add_argument('--imagenet_default_mean_and_std', action='store_true',
                   help='normalize with ImageNet mean/std instead of CLIP mean/std')
    g.add_argument('--mean', nargs='+', type=float, default=None, metavar='M',
                   help='normalise with this mean (3 values, or 1 for every channel), the one the model was '
                        'trained with (default: CLIP\'s, or the model\'s with --data_config timm); with --std')
    g.add_argument('--std', nargs='+', type=float, default=None, metavar='S',
                   help='normalise with this standard deviation (3 values or 1); with --mean')
    g.add_argument('--data_config', default='published', choices=DATA_CONFIGS,
                   help="published: resize the shorter side to --input_size (bicubic) and center crop it "
                        "(crop fraction 1.0); timm: the model's pretrained data config (crop fraction, "
                        'interpolation, mean/std) through timm.data.create_transform')
    g.add_argument('--crop_pct', default=None, type=float,
                   help='crop fraction: resize the shorter side to input_size / crop_pct, then crop '
                        '(default: 1.0, or the model\'s with --data_config timm)')
    g.add_argument('--classes_changed', action='store_true',
                   help='ann/snn: the class folders differ from those for_v (or the --ann_results run) recorded, '
                        'and the new label order is intended (default: such a difference is an error)')
    g.add_argument('--skip_bad_images', action='store_true',
                   help='leave unreadable image files out (named once, counted in the results) instead of '
                        'stopping at the first one')
    g.add_argument('--num_workers', default=_default_workers(), type=int,
                   help='data loading processes (default: half the CPU cores, at most 8; 0: in this process)')
    g.add_argument('--batch_size', default=64, type=int, help='images per batch')


def _conversion_flags(parser) -> None:
    g = parser.add_argument_group('conversion')
    g.add_argument('--test_mode', default='ann', choices=('ann', 'for_v', 'snn'),
                   help='ann: evaluate the ANN; for_v: calibrate thresholds; snn: simulate the SNN')
    g.add_argument('--test_T', default=8, type=int, help='time steps of the SNN simulation')
    g.add_argument('--time_chunk', default=None, type=int,
                   help='snn: simulate this many steps at a time, carrying the state (default: all '
                        'T at once; smaller needs less memory; the results are the same)')
    g.add_argument('--percent', default=0.99, type=float, help='calibration quantile')
    g.add_argument('--calib_batches', default=None, type=int,
                   help='for_v: calibrate on the first N batches only (default: all); under torchrun '
                        'N in total, the same N batches as one process, dealt across the processes')
    g.add_argument('--linear_num', default=8, type=int, help='levels N of the neurons before linear layers')
    g.add_argument('--qkv_num', default=8, type=int, help='levels N of the q, k, v neurons')
    g.add_argument('--softmax_num', default=8, type=int, help='levels N of the neurons after softmax')
    g.add_argument('--softmax_p', default=0.0125, type=float, help='threshold of the neurons after softmax')
    g.add_argument('--fc2_thresholds', nargs=2, type=float, default=None, metavar=('THETA_P', 'THETA_N'),
                   help='fixed fc2 thresholds (default for ViT models: 0.25 0.08, as published)')
    g.add_argument('--fc2_calibrated', action='store_true',
                   help='use the calibrated fc2 thresholds, also for ViT models')
    g.add_argument('--monitor', nargs='?', const=True, default=True, type=_true_or_false, metavar='True|False',
                   help='snn: count synaptic operations, report firing rate and energy (default on; '
                        '--monitor False or --no-monitor turns it off)')
    g.add_argument('--no-monitor', dest='monitor', action='store_false', help='the same as --monitor False')
    g.add_argument('--coding', default=None, choices=CODINGS,
                   help='neuron coding (ECMT_SPEC 14): rate, the published neuron, or differential (sends only the '
                        'correction to a running estimate). for_v records it in the checkpoint (and --target_T '
                        'searches with it); snn takes it from there (default: the record, else rate); a --coding '
                        'that differs from the record is an error')
    g = parser.add_argument_group('few time steps (ECMT_SPEC 15; for T <= 4: --thresholds channel --fire_rule round '
                                  '--coding differential with for_v --target_T T)')
    g.add_argument('--thresholds', default=None, choices=options.THRESHOLD_GRANULARITIES,
                   help='for_v: one threshold pair per place (place, the published calibration) or per channel '
                        '(channel: the features before a linear layer, (head, channel) for q, k, v; the fc2 '
                        'override then applies only if --fc2_thresholds is given). Recorded; snn takes it '
                        'from the record (default place)')
    g.add_argument('--fire_rule', default=None, choices=options.FIRE_RULES,
                   help='ecmt: the published rule (a level fires at 2^j - 1/2 of the base threshold); round: '
                        'a membrane is rounded to the nearest level (3/4 of the way up). Recorded; snn takes it '
                        'from the record (default ecmt)')
    g.add_argument('--threshold_scale', default=None, type=float, metavar='A',
                   help='every calibrated threshold times A at conversion (fixed ones, s and a fixed fc2, '
                        'are not). Recorded; snn takes it from the record (default 1)')


def _low_latency_flags(parser) -> None:
    g = parser.add_argument_group('low-latency calibration (for_v --target_T)')
    g.add_argument('--target_T', default=None, type=int, metavar='N',
                   help='for_v: choose the thresholds for N time steps on the calibration images (best '
                        'percent, then a global threshold scale, then a scale per kind of place and per place), '
                        'judged by how close the SNN after N steps is to the ANN; default: the published '
                        'calibration at --percent')
    g.add_argument('--target_percents', nargs='+', type=float, default=list(options.DEFAULT_PERCENTS),
                   metavar='P', help='candidate global percents of --target_T (all recorded in one pass)')
    g.add_argument('--search_scales', nargs='*', type=float, default=list(options.DEFAULT_SCALES), metavar='A',
                   help='--target_T: candidate global threshold scales (relative to --threshold_scale), tried after '
                        'the percents; the chosen one is recorded as the checkpoint\'s threshold_scale, which snn '
                        'applies (no value: skip the stage, the search before ECMT_SPEC 15)')
    g.add_argument('--search_budget', default=options.DEFAULT_BUDGET, type=int, metavar='K',
                   help='--target_T: at most K candidate evaluations (each one N-step simulation of the '
                        'search images), the candidate percents included')
    g.add_argument('--search_images', default=options.DEFAULT_SEARCH_IMAGES, type=int, metavar='M',
                   help='--target_T: the objective is computed on the first M calibration images')
    g.add_argument('--search_objective', default='kl', choices=options.OBJECTIVE_NAMES,
                   help="--target_T: kl: KL divergence from the ANN's softmax to that of the SNN's mean logits "
                        "over N steps; mse: mean squared error of those logits against the ANN's")
    g.add_argument('--search_fixed', nargs='?', const=True, default=True, type=_true_or_false,
                   metavar='True|False', help='--target_T: also search the places of fixed thresholds (s at '
                   '--softmax_p, a fixed fc2), starting from their fixed values (default on; the chosen '
                   'values are recorded in the checkpoint and used by snn)')
    g.add_argument('--search_prefix_weight', default=options.DEFAULT_PREFIX_WEIGHT, type=float, metavar='W',
                   help='--target_T N: the objective of N steps plus W times its mean over the first 1..N-1 steps '
                        '(the predictions after the earlier steps; 0: N steps only)')
    g.add_argument('--search_energy_weight', default=options.DEFAULT_ENERGY_WEIGHT, type=float, metavar='W',
                   help='--target_T N: add W times the energy after N steps (relative to the ANN, ECMT_SPEC 8, on '
                        'the search images) to the objective, trading accuracy for fewer spikes (default 0: '
                        'accuracy alone)')
    g.add_argument('--search_cache_mb', default=options.DEFAULT_CACHE_MIB, type=float, metavar='MB',
                   help='--target_T: memory for the inputs of unchanged blocks, kept so that a candidate that '
                        'changes only later blocks does not run the earlier ones again (same values; 0: off)')


def _run_flags(parser) -> None:
    g = parser.add_argument_group('run and outputs')
    g.add_argument('--device', default=None, type=str, help='cuda or cpu (default: cuda if available)')
    g.add_argument('--amp', default='auto', choices=('auto', 'none', 'fp16', 'bf16'),
                   help='autocast dtype; auto: fp16 on CUDA (as published), none (float32) elsewhere '
                        '(neuron membranes and running sums stay float32)')
    g.add_argument('--backend', default='auto', choices=BACKEND_CHOICES,
                   help='kernels the snn mode runs on (the --target_T search takes auto): auto = native C++ kernels on '
                        'the CPU, triton on CUDA where Triton imports, else eager (torch operations); under '
                        'TRITON_INTERPRET=1, triton runs on the CPU in Triton\'s interpreter. A backend that '
                        'cannot run on --device is an error. Recorded in the results (default: %(default)s)')
    g.add_argument('--seed', default=0, type=int, help='random seed (Python, NumPy, torch)')
    g.add_argument('--output_dir', default='../models', type=str,
                   help='where for_v writes its checkpoint and snn its reports (default ../models, as published)')
    g.add_argument('--savename', default=None, type=str,
                   help='for_v: checkpoint name (default: test, as published), written as '
                        '<output_dir>/<savename>.pth; snn: name of the reports (default: the --model_path '
                        'file name without extension plus _snn, e.g. vit_for_v.pth -> vit_for_v_snn): '
                        '<output_dir>/<savename>_layers.csv, with --level_batches _levels.json, with --plot '
                        '_accuracy.png, _energy.png, _layer_rates.png')
    g.add_argument('--log_dir', default='.', type=str, help='folder of log_ann.txt / log_snn.txt')
    g.add_argument('--results', default=None, type=str, help='write the run\'s figures as JSON to this file')
    g.add_argument('--no_progress', action='store_true', help='no progress bars nor progress lines')
    g.add_argument('--print_freq', default=10, type=int, metavar='N',
                   help='with output not on a terminal: one progress line every N batches (on a terminal: a '
                        'progress bar)')


def _snn_reports_flags(parser) -> None:
    g = parser.add_argument_group('snn reports (with --monitor)')
    g.add_argument('--level_batches', default=0, type=_level_batches, metavar='N|all',
                   help="count the MT neurons' spikes per level on the first N batches (or all) and write "
                        '<savename>_levels.json, which shows whether all N levels are used (default 0: not '
                        'counted; per batch, the histograms cost about twice as much as all SOP counts, '
                        'and 1 batch is usually enough)')
    g.add_argument('--plot', action='store_true',
                   help='snn: draw accuracy, energy and per-layer firing rate against the time step as PNG '
                        'files in --output_dir (needs matplotlib)')
    g.add_argument('--ann_results', default=None, type=str, metavar='PATH',
                   help="snn: the --results JSON of a --test_mode ann run; its top-1 is drawn as the ANN's "
                        'line in the accuracy figure (otherwise no ANN line is drawn)')
    g.add_argument('--energy_model', default='ecmt', choices=ENERGY_MODELS,
                   help='snn with the monitor: price the energy report (results "energy", the per-layer CSV\'s '
                        'class columns, --plot _energy_split.png) with ecmt (the published 0.9 pJ per SOP against '
                        '4.6 pJ per ANN MAC, nothing else), fp32 / fp16 / int8 (Horowitz 45 nm: every operation) '
                        'or fp32_memory (fp32 plus SRAM accesses by memory size); default ecmt (docs/energy.md)')


def _true_or_false(text: str) -> bool:
    """--monitor VALUE: the published flag took any value as on; here False means off."""
    value = text.strip().lower()
    if value in ('true', '1', 'yes', 'on'):
        return True
    if value in ('false', '0', 'no', 'off'):
        return False
    raise argparse.ArgumentTypeError(f'expected True or False, got {text!r}')


def _level_batches(text: str):
    """--level_batches: a count >= 0, or 'all' (None)."""
    if text == 'all':
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of batches or 'all', got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f'must be >= 0, got {value}')
    return value


def check_args(args) -> None:
    """Refuse bad arguments before any work is done."""
    if args.test_T < 1:
        raise UserError(f'--test_T must be >= 1, got {args.test_T}')
    if args.batch_size < 1:
        raise UserError(f'--batch_size must be >= 1, got {args.batch_size}')
    if not 0.0 < args.percent <= 1.0:
        raise UserError(f'--percent must be in (0, 1], got {args.percent}')
    for name in ('linear_num', 'qkv_num', 'softmax_num'):
        if getattr(args, name) < 1:
            raise UserError(f'--{name} must be >= 1, got {getattr(args, name)}')
    if args.softmax_p <= 0:
        raise UserError(f'--softmax_p must be > 0, got {args.softmax_p}')
    if args.calib_batches is not None and args.calib_batches < 1:
        raise UserError(f'--calib_batches must be >= 1, got {args.calib_batches}')
    if args.fc2_thresholds is not None and args.fc2_calibrated:
        raise UserError('--fc2_thresholds and --fc2_calibrated contradict each other')
    if args.threshold_scale is not None and not (math.isfinite(args.threshold_scale) and args.threshold_scale > 0):
        raise UserError(f'--threshold_scale must be a positive number, got {args.threshold_scale}')
    if args.test_mode == 'snn' and not args.model_path:
        raise UserError('--test_mode snn needs --model_path: the checkpoint written by --test_mode for_v')
    if args.crop_pct is not None and not 0.0 < args.crop_pct <= 1.0:
        raise UserError(f'--crop_pct must be in (0, 1], got {args.crop_pct}')
    if args.calib_data_path and args.test_mode != 'for_v':
        raise UserError('--calib_data_path is for --test_mode for_v (the calibration); '
                              f'--test_mode {args.test_mode} evaluates on --eval_data_path')
    if args.pretrained and args.pretrained_file:
        raise UserError('--pretrained and --pretrained_file both name the weights: pass one')
    if (args.pretrained or args.pretrained_file) and args.model_path:
        raise UserError('--model_path and --pretrained/--pretrained_file both name the weights: pass one')
    if (args.pretrained or args.pretrained_file) and args.test_mode == 'snn':
        raise UserError('snn reads the weights with the thresholds from the for_v checkpoint (--model_path), '
                        'which records where they came from: drop --pretrained/--pretrained_file')
    if args.classes_changed and args.test_mode == 'for_v':
        raise UserError('--classes_changed is for ann and snn (for_v records the class names it calibrates on)')
    check_launch_flags(args, 'run_class_finetuning.py')
    if args.print_freq < 1:
        raise UserError(f'--print_freq must be >= 1, got {args.print_freq}')
    if args.target_T is not None:  # low-latency calibration (issue 15)
        if args.test_mode != 'for_v':
            raise UserError(f'--target_T chooses thresholds: it needs --test_mode for_v, not {args.test_mode}')
        _import_runtime()
        low_latency.check_search_args(args.target_T, args.target_percents, args.search_budget,
                                      args.search_images, args.search_cache_mb, args.search_prefix_weight,
                                      energy_weight=args.search_energy_weight)


def check_outputs(args) -> None:
    """Refuse, before any work, an output this run cannot write: a folder that is a file or cannot
    be written, a folder where a file is to be written (--results, the for_v checkpoint, the snn
    reports); and lock those files against a second run writing them at the same time."""
    _import_runtime()
    utils.release_output_locks()  # those of an earlier run in this process, which has ended
    utils.check_writable_dir(args.log_dir, '--log_dir')
    files = []
    if args.results:
        utils.check_output_file(args.results, '--results')
        files.append((args.results, '--results'))
    if args.test_mode == 'for_v' or (args.test_mode == 'snn' and (args.monitor or args.plot)):
        utils.check_writable_dir(args.output_dir, '--output_dir')
    output = Path(args.output_dir)
    if args.test_mode == 'for_v':
        path = output / f'{args.savename or "test"}.pth'
        utils.check_output_file(path, 'the checkpoint (--output_dir/--savename)')
        files.append((path, '--savename'))
    elif args.test_mode == 'snn' and (args.monitor or args.plot):
        savename = args.savename or f'{Path(args.model_path).stem}_snn'
        for suffix in ('_layers.csv', '_levels.json', '_accuracy.png', '_energy.png', '_layer_rates.png'):
            utils.check_output_file(output / f'{savename}{suffix}', 'a report (--output_dir/--savename)')
        files.append((output / savename, '--savename'))
    if os.environ.get('RANK', '0') == '0':  # under torchrun process 0 alone writes
        for path, flag in files:
            utils.lock_outputs([path], flag)


def resolve_amp(amp: str, device) -> str:
    """--amp auto: fp16 autocast on CUDA, as the published evaluation ran; float32 elsewhere."""
    if amp == 'auto':
        return 'fp16' if device.type == 'cuda' else 'none'
    return amp


def main(args) -> dict:
    """One run: data, model and engine wired as the mode asks; returns the results record."""
    check_args(args)
    check_outputs(args)
    utils.seed_everything(args.seed)
    # Under torchrun: one process per device; otherwise (rank 0 of 1) exactly a single process.
    device, rank, world_size = utils.init_distributed(args.device)
    amp = resolve_amp(args.amp, device)
    if device.type == 'cpu':
        utils.keep_freed_memory()  # page faults on fresh memory cost a quarter of a CPU run
        native_kernels.prepare()  # a first run on a machine builds them while the data loads
    main_process = rank == 0
    say = print if main_process else (lambda *_, **__: None)
    state_dict, extras, source = weights.load_weights(args, log=say)
    if args.test_mode in ('ann', 'snn'):
        weights.apply_record(args, extras)
    if args.test_mode == 'snn':  # the conversion options and transform the thresholds were made for
        conversion = weights.restore_options(args, extras, args.model_path)
        weights.recorded_transform(args, extras)
    model = build_model(args, state_dict).to(device).eval()
    del state_dict
    # The transform may come from the model's config (--data_config timm), hence after the model.
    transform = datasets.transform_config(args, model)
    if args.test_mode == 'snn':
        weights.check_calibration_record(args, extras, transform)
    loader, classes = build_loader(args, model, rank, world_size, pin_memory=device.type == 'cuda')
    record = {'test_mode': args.test_mode, 'model': args.model, 'data_set': args.data_set,
              'transform': transform, 'amp': amp}
    if source is not None:
        record['weights'] = source
    if world_size > 1:
        record['world_size'] = world_size
    run = Run(args, model, loader, device, amp, utils.all_reduce_sum if world_size > 1 else None,
              main_process, Path(args.log_dir) / f'log_{"snn" if args.test_mode == "snn" else "ann"}.txt')
    ann_acc1 = check_snn_inputs(args, loader, classes) if args.test_mode == 'snn' else None
    run.log(f'transform: {datasets.describe_transform(transform)}', header=True)
    if args.test_mode == 'snn':
        record.update(conversion)
        record.update(run_snn(run, extras, ann_acc1))
    else:
        if classes is not None:
            record['classes'] = classes
        record.update(run_ann(run))
        if args.test_mode == 'for_v':
            record.update(calibrate(run, transform, classes, source, record['n']))
    if loader.skipped:
        record['skipped_images'] = list(loader.skipped)
    if args.results and main_process:
        utils.write_json(record, args.results)
        print(f'results written to {args.results}')
    utils.release_output_locks()
    return record


class Run:
    """What the steps of one run share: the arguments, model, batches, device, the reduction over
    processes (None in one process), whether this process writes, and its log."""

    def __init__(self, args, model, loader, device, amp, reduce, main_process: bool, log_path: Path):
        self.args, self.model, self.loader, self.device, self.amp = args, model, loader, device, amp
        self.reduce, self.main_process = reduce, main_process
        self.log_path = log_path if main_process else None
        self.show = not args.no_progress and main_process

    def log(self, line: str, header: bool = False) -> None:
        """Print `line` and append it to the log (process 0 only); `header` starts the run's entry."""
        if not self.main_process:
            return
        if header:
            utils.append_log(self.log_path, _header(self.args))
        print(line)
        utils.append_log(self.log_path, line)


def build_model(args, state_dict=None):
    """The model of the command line with its weights (:func:`weights.build_model`)."""
    _import_runtime()
    return weights.build_model(args, state_dict)


def fc2_thresholds(args, model):
    """The fixed fc2 thresholds of this run, or None (:func:`weights.fc2_thresholds`)."""
    _import_runtime()
    return weights.fc2_thresholds(args, model)


def build_loader(args, model, rank: int = 0, world_size: int = 1, pin_memory: bool = False):
    """(batches, class names): for_v's calibration batches, or the evaluation set's, dealt
    round-robin to the processes under torchrun, with no padding (every image counts once)."""
    if args.test_mode == 'for_v':
        loader = build_calibration_loader(args, model, rank=rank, world_size=world_size, pin_memory=pin_memory)
        return loader, loader.classes
    dataset, _ = build_dataset(False, args, model)
    classes = datasets.class_names(dataset)
    dataset = datasets.readable(dataset)
    if world_size > 1:
        loader = DataLoader(dataset, batch_sampler=utils.ShardedBatchSampler(len(dataset), args.batch_size, rank,
                                                                             world_size),
                            num_workers=args.num_workers, pin_memory=pin_memory, collate_fn=datasets.collate_readable)
    else:
        loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                            pin_memory=pin_memory, drop_last=False, collate_fn=datasets.collate_readable)
    loader = datasets.CheckedBatches(loader, skip=args.skip_bad_images)
    loader.images = len(dataset)
    return loader, classes


def build_calibration_loader(args, model=None, *, rank: int = 0, world_size: int = 1,
                             pin_memory: bool = False):
    """The batches thresholds are calibrated on (a datasets.CheckedBatches: unreadable files stop the
    run or, with --skip_bad_images, are left out): --calib_data_path (its training split) or, as
    published, the evaluation set; with the evaluation transform (`model` is read for
    --data_config timm); the first --calib_batches batches (default all). Under torchrun each
    process gets its share of the single-process batches (rank, world_size), so the pooled
    statistics are those of one process. Its `classes` are the data's class names."""
    _import_runtime()
    dataset, _ = build_calibration_dataset(args, model)
    classes = datasets.class_names(dataset)
    batches = utils.ShardedBatchSampler(len(dataset), args.batch_size, rank, world_size,
                                        max_batches=args.calib_batches)
    loader = DataLoader(datasets.readable(dataset), batch_sampler=batches, num_workers=args.num_workers,
                        pin_memory=pin_memory, collate_fn=datasets.collate_readable)
    loader = datasets.CheckedBatches(loader, skip=getattr(args, 'skip_bad_images', False))
    loader.classes, loader.images = classes, len(dataset)
    return loader


def run_ann(run: Run) -> dict:
    """ann and for_v: one pass of the ANN (for_v: its placeholders record the statistics)."""
    args = run.args
    results = evaluate(run.model, run.loader, run.device, log_path=run.log_path, amp=run.amp, desc=args.test_mode,
                       reduce=run.reduce, show_progress=run.show, print_freq=args.print_freq)
    five = f'top-5 {results["acc5"]:.2f}%, ' if 'acc5' in results else ''
    run.log(f'{args.test_mode}: {results["n"]} images, top-1 {results["acc1"]:.2f}%, '
            f'{five}loss {results["loss"]:.4f}, {results["seconds"]:.1f} s')
    return results


def calibrate(run: Run, transform: dict, classes, source, images: int) -> dict:
    """for_v after the ANN pass: the thresholds (pooled over processes; with --target_T searched
    for N steps), checked, and saved with the weights and the record of what made them."""
    args, model = run.args, run.model
    if run.reduce is not None:
        sync_calibration(model, run.reduce)  # every process now holds the same thresholds
    check_thresholds_finite(model)
    out = {'calibration': {**weights.calibration_record(args, transform, images, classes),
                           **weights.model_record(args, model, source)}}
    if args.target_T is not None:
        # Thresholds for --target_T steps, chosen on the calibration batches alone.
        conversion = dict(linear_num=args.linear_num, qkv_num=args.qkv_num, softmax_num=args.softmax_num,
                          softmax_p=args.softmax_p, fc2_thresholds=fc2_thresholds(args, model),
                          coding=out['calibration']['coding'], fire_rule=out['calibration']['fire_rule'],
                          threshold_scale=out['calibration']['threshold_scale'])
        out['low_latency'] = low_latency.run_for_args(
            model, run.loader, args, run.device, run.amp, conversion,
            log=lambda line: (print(line), utils.append_log(run.log_path, line)))
        out['calibration']['percent'] = out['low_latency']['percent']  # times its scales
        # The global scale the search chose: a recorded option, applied by snn at conversion.
        out['calibration']['threshold_scale'] = float(out['low_latency']['threshold_scale'])
    if run.main_process:
        path = Path(args.output_dir) / f'{args.savename or "test"}.pth'
        checkpoint = {'model': {k: v.detach().cpu() for k, v in model.state_dict().items()},
                      'calibration': out['calibration']}
        if 'low_latency' in out:
            checkpoint['low_latency'] = out['low_latency']
        utils.save_checkpoint(checkpoint, path)
        out['checkpoint'] = str(path)
        print(f'thresholds of {len(get_modules(model, (TestNeuron,)))} places saved with the weights to {path}')
    return out


def check_snn_inputs(args, loader, classes):
    """snn, before anything is written: refuse a missing matplotlib (--plot) or an --ann_results
    of another model or data; the ANN's top-1 (or None)."""
    if args.plot:
        report.require_matplotlib()
    if not args.ann_results:
        return None
    return report.check_ann_results(args.ann_results, args.model, args.data_set, loader.images, classes)


def run_snn(run: Run, extras: dict, ann_acc1) -> dict:
    """snn: convert, simulate T steps with the monitors, report and write the reports."""
    args, model = run.args, run.model
    savename = args.savename or f'{Path(args.model_path).stem}_snn'
    try:
        convert_to_snn(model, linear_num=args.linear_num, qkv_num=args.qkv_num, softmax_num=args.softmax_num,
                       softmax_p=args.softmax_p, fc2_thresholds=fc2_thresholds(args, model), backend=args.backend,
                       coding=args.coding, fire_rule=args.fire_rule, threshold_scale=args.threshold_scale)
    except ConversionError as exc:
        raise UserError(str(exc)) from None
    out = {'backend': model.ecmt_backend}
    if run.main_process:
        print(f'snn: backend {model.ecmt_backend} on {run.device}')
    low_latency.apply_fixed_thresholds(model, extras.get('low_latency'),
                                       log=print if run.main_process else (lambda line: None))
    count_levels = args.level_batches != 0
    monitor = (SOPMonitor(model, count_levels=count_levels, level_batches=args.level_batches or None)
               if args.monitor else None)
    energy_monitor = energy.EnergyMonitor(model, monitor) if monitor is not None else None
    try:
        results = evaluate_snn(model, run.loader, run.device, args.test_T, log_path=run.log_path, amp=run.amp,
                               monitor=monitor, time_chunk=args.time_chunk, reduce=run.reduce,
                               show_progress=run.show, print_freq=args.print_freq)
    finally:
        for hooks in (monitor, energy_monitor):
            if hooks is not None:
                hooks.remove()
    energy_report = None
    if energy_monitor is not None:  # every process takes part in its reductions
        energy_report = energy.energy_report(energy_monitor, args.energy_model, reduce=run.reduce)
        results['energy'] = energy_report.summary(results.get('energy_ratio'))
    out.update(results)
    if ann_acc1 is not None:
        out['ann_acc1'] = ann_acc1
    for line in snn_lines(results):
        run.log(line)
    # Every process takes part in the reductions; the first one writes the files.
    entries, lines = report.write_snn_reports(
        results, args.output_dir, savename, monitor, levels=count_levels, plot=args.plot, ann_acc1=ann_acc1,
        reduce=run.reduce, write=run.main_process, energy=energy_report)
    out.update(entries)
    for line in lines:
        run.log(line)
    return out


def snn_lines(results: dict) -> list:
    """The snn summary: top-1 (and top-5) after every step, with the monitor its firing rate and its
    energy against the ANN under the run's energy model, named in each line."""
    lines = [f'snn: {results["n"]} images, T={results["T"]}, {results["seconds"]:.1f} s']
    top5 = results.get('acc5') or [None] * len(results['acc1'])
    energy_model = results.get('energy')
    for t, (a1, a5) in enumerate(zip(results['acc1'], top5), start=1):
        line = f'  t={t}: top-1 {a1:.2f}%' + ('' if a5 is None else f'  top-5 {a5:.2f}%')
        if 'energy_ratio' in results:
            ratio, name = results['energy_ratio'][t - 1], 'ecmt'
            if energy_model:
                ratio, name = energy_model['ratio'][t - 1], energy_model['model']
            line += f'  firing rate {results["fire_rate"][t - 1]:.4f}  energy vs ANN ({name}) {ratio:.4f}'
        lines.append(line)
    return lines


def check_thresholds_finite(model) -> None:
    """Refuse calibrated thresholds that are NaN or infinite (activations holding NaN or inf, from
    broken weights or an fp16 overflow): an SNN with them never fires or fires nonsense."""
    bad = [name for name, neuron in get_modules(model, (TestNeuron,))
           if neuron.calibrate and not bool(torch.isfinite(torch.cat([neuron.scale_p, neuron.scale_n])).all())]
    if bad:
        shown = ', '.join(bad[:5]) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
        raise UserError(f'calibration gave non-finite thresholds at {len(bad)} places ({shown}): '
                        'the activations there hold NaN or inf values (check the weights, or '
                        'run with --amp none); no checkpoint written')


def _header(args) -> str:
    header = (f'=== {time.strftime("%Y-%m-%d %H:%M:%S")} {args.test_mode} model={args.model} '
              f'data_set={args.data_set} model_path={args.model_path} T={args.test_T} '
              f'batch_size={args.batch_size} ===')
    world_size = utils.get_world_size()
    if world_size > 1:
        header += (f'\n(torchrun, {world_size} processes: the batch lines count process 0\'s share '
                   'of the images; the final figures are the totals over all processes)')
    return header


if __name__ == '__main__':
    run_cli(main, get_args_parser())
