"""Evaluate a ViT/EVA as an ANN, calibrate its SNN thresholds, or simulate the converted SNN.

    python run_class_finetuning.py --test_mode ann   --model M --model_path W.pth ...
    python run_class_finetuning.py --test_mode for_v --model M --model_path W.pth --savename S ...
    python run_class_finetuning.py --test_mode snn   --model M --model_path ../models/S.pth --test_T 8 ...

The command line is the published one (ECMT, ACM MM 2024), with its defaults (ECMT_SPEC 11:
``--output_dir ../models``, ``--savename test``, ``--eval_data_path ../datasets/val``), so that
its README's commands run as written, plus ``--device``, ``--model_kwargs``, ``--results`` and a
few switches; see the README for every flag.
"""
from __future__ import annotations

import argparse
import importlib
import math
import os
import sys
import time
from collections.abc import Mapping
from pathlib import Path

from cli_base import DATA_CONFIGS, DATA_SETS, Parser, UserError, given_flags, run_cli

THRESHOLD_KEYS = ('scale_p', 'scale_n')
import options
from options import BACKEND_CHOICES, CODINGS, ENERGY_MODELS

# torch, timm and the engine are imported when a run starts, not for --help or a bad flag.
_LAZY = {
    'torch': ('torch', None), 'DataLoader': ('torch.utils.data', 'DataLoader'),
    'datasets': ('datasets', None), 'low_latency': ('low_latency', None),
    'native_kernels': ('kernels.native', None), 'utils': ('utils', None), 'weights': ('weights', None),
    'energy': ('energy', None),
    'build_calibration_dataset': ('datasets', 'build_calibration_dataset'),
    'build_dataset': ('datasets', 'build_dataset'),
    'evaluate': ('engine_for_finetuning', 'evaluate'), 'evaluate_snn': ('engine_for_finetuning', 'evaluate_snn'),
    'default_fc2_thresholds': ('model_base', 'default_fc2_thresholds'),
    'unconvertible_reason': ('model_base', 'unconvertible_reason'),
    'VIT_FC2_THRESHOLDS': ('model_vit', 'VIT_FC2_THRESHOLDS'), 'create_model': ('model_vit', 'create_model'),
    **{name: ('trans_utils', name) for name in ('ConversionError', 'TestNeuron', 'convert_to_snn', 'get_modules',
                                                'replace_test_by_testneuron', 'sync_calibration')},
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
                    epilog='A for_v checkpoint records --model, --model_kwargs, --input_size, --nb_classes and '
                           'the level flags; ann and snn on it use the record where a flag is not given. '
                           'Guide: README.md; semantics: docs/semantics.md.')
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
    g.add_argument('--data_config', default='published', choices=DATA_CONFIGS,
                   help="published: resize the shorter side to --input_size (bicubic) and center crop it "
                        "(crop fraction 1.0); timm: the model's pretrained data config (crop fraction, "
                        'interpolation, mean/std) through timm.data.create_transform')
    g.add_argument('--crop_pct', default=None, type=float,
                   help='crop fraction: resize the shorter side to input_size / crop_pct, then crop '
                        '(default: 1.0, or the model\'s with --data_config timm)')
    g.add_argument('--skip_bad_images', action='store_true',
                   help='leave unreadable image files out (named once, counted in the results) instead of '
                        'stopping at the first one')
    g.add_argument('--num_workers', default=_default_workers(), type=int,
                   help='data loading processes (default: half the CPU cores, at most 8; 0: in this process)')
    g.add_argument('--batch_size', default=64, type=int, help='images per batch')

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

    # -- low-latency calibration (issue 15) --
    g = parser.add_argument_group('low-latency calibration (for_v --target_T)')
    g.add_argument('--target_T', default=None, type=int, metavar='N',
                   help='for_v: choose the thresholds for N time steps on the calibration images (best '
                        'global percent, then a scale per place), judged by how close the SNN after N steps '
                        'is to the ANN; default: the published calibration at --percent')
    g.add_argument('--target_percents', nargs='+', type=float, default=list(options.DEFAULT_PERCENTS),
                   metavar='P', help='candidate global percents of --target_T (all recorded in one pass)')
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
    g.add_argument('--search_cache_mb', default=options.DEFAULT_CACHE_MIB, type=float, metavar='MB',
                   help='--target_T: memory for the inputs of unchanged blocks, kept so that a candidate that '
                        'changes only later blocks does not run the earlier ones again (same values; 0: off)')
    # -- end of low-latency calibration --
    # -- differential coding (issue 23) --
    g.add_argument('--coding', default=None, choices=CODINGS,
                   help='neuron coding (ECMT_SPEC 14): rate, the published neuron, or differential (sends only the '
                        'correction to a running estimate). for_v records it in the checkpoint (and --target_T '
                        'searches with it); snn takes it from there (default: the record, else rate); a --coding '
                        'that differs from the record is an error')
    # -- end of differential coding --

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
    # -- energy report (issue 24)
    g.add_argument('--energy_model', default='ecmt', choices=ENERGY_MODELS,
                   help='snn with the monitor: price the energy report (results "energy", the per-layer CSV\'s '
                        'class columns, --plot _energy_split.png) with ecmt (the published 0.9 pJ per SOP against '
                        '4.6 pJ per ANN MAC, nothing else), fp32 / fp16 / int8 (Horowitz 45 nm: every operation) '
                        'or fp32_memory (fp32 plus SRAM accesses by memory size); default ecmt (docs/energy.md)')
    return parser


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
    if args.print_freq < 1:
        raise UserError(f'--print_freq must be >= 1, got {args.print_freq}')
    if args.target_T is not None:  # low-latency calibration (issue 15)
        if args.test_mode != 'for_v':
            raise UserError(f'--target_T chooses thresholds: it needs --test_mode for_v, not {args.test_mode}')
        _import_runtime()
        low_latency.check_search_args(args.target_T, args.target_percents, args.search_budget,
                                      args.search_images, args.search_cache_mb, args.search_prefix_weight)


def check_output_folders(args) -> None:
    """Refuse, before any work, a folder this run will write to but cannot (a file, no permission):
    the log folder, the results file's folder, and --output_dir where the mode writes there."""
    _import_runtime()
    utils.check_writable_dir(args.log_dir, '--log_dir')
    if args.results:
        utils.check_writable_dir(Path(args.results).parent, 'the folder of --results')
    if args.test_mode == 'for_v' or (args.test_mode == 'snn' and (args.monitor or args.plot)):
        utils.check_writable_dir(args.output_dir, '--output_dir')


def resolve_amp(amp: str, device) -> str:
    """--amp auto: fp16 autocast on CUDA, as the published evaluation ran; float32 elsewhere."""
    if amp == 'auto':
        return 'fp16' if device.type == 'cuda' else 'none'
    return amp


# --------------------------------------------------------------------------------------------
# Where the weights come from, and what a for_v checkpoint records about its model
# --------------------------------------------------------------------------------------------
#: Flags that rebuild the model: a for_v record fills them where not given; a given one must agree.
MODEL_FLAGS = ('model', 'model_kwargs', 'input_size', 'nb_classes')
#: Flags of the SNN's neurons: a for_v record fills them where not given (see apply_record).
LEVEL_FLAGS = ('linear_num', 'qkv_num', 'softmax_num', 'softmax_p')


def weights_label(args) -> str:
    """How messages name the weights of this run."""
    if getattr(args, 'pretrained_file', None):
        return args.pretrained_file
    if getattr(args, 'pretrained', False):
        return f'the pretrained weights of {args.model}'
    return str(args.model_path)


def load_weights(args):
    """(state_dict, extras, source) of this run: --model_path's file (torch.save or safetensors),
    or --pretrained / --pretrained_file through timm; `source` says where they came from. Fills
    --nb_classes and --input_size from pretrained weights where not given."""
    _import_runtime()
    if args.pretrained or args.pretrained_file:
        kwargs = utils.parse_model_kwargs(args.model_kwargs)
        found = weights.load_pretrained(args.model, kwargs, file=args.pretrained_file)
        given = given_flags(args)
        args.architecture = found.architecture
        args.model_args = found.model_args
        args.pretrained_cfg = found.pretrained_cfg
        if 'nb_classes' not in given and found.num_classes is not None:
            args.nb_classes = found.num_classes
        if 'input_size' not in given and found.input_size is not None:
            args.input_size = found.input_size
        return found.state_dict, {}, found.source
    if not args.model_path:
        return None, {}, None
    state_dict, extras = utils.read_checkpoint(args.model_path)
    source = {'kind': 'file', 'path': str(args.model_path)}
    record = extras.get('calibration')
    if isinstance(record, Mapping) and isinstance(record.get('weights'), Mapping):
        source['from'] = dict(record['weights'])  # a for_v file: where its weights came from
    return state_dict, extras, source


def _kwargs_text(items) -> str:
    return ' '.join(items) if items else '(none)'


def apply_record(args, extras: Mapping) -> None:
    """ann/snn on a for_v checkpoint: its record of --model, --model_kwargs, --input_size and
    --nb_classes fills each flag not given, and a given one that differs is an error naming both;
    the level flags and the fc2 choice are filled the same way, and a given one that differs is
    used (thresholds do not depend on the levels) unless the thresholds were searched for the
    recorded ones (--target_T), then it is an error too. A file without a record (the published
    scripts') changes nothing."""
    record = extras.get('calibration')
    if not isinstance(record, Mapping):
        return
    given = given_flags(args)
    recorded = {'model': record.get('model'), 'model_kwargs': record.get('model_kwargs'),
                'input_size': record.get('input_size', (record.get('transform') or {}).get('input_size')),
                'nb_classes': record.get('nb_classes')}
    conflicts = []
    for flag in MODEL_FLAGS:
        value = recorded[flag]
        if value is None:
            continue
        if flag == 'model_kwargs':
            value = list(value)
            same = utils.parse_model_kwargs(args.model_kwargs) == utils.parse_model_kwargs(value)
        else:
            same = getattr(args, flag) == value
        if flag in given and not same:
            shown = _kwargs_text(value) if flag == 'model_kwargs' else value
            mine = _kwargs_text(args.model_kwargs) if flag == 'model_kwargs' else getattr(args, flag)
            conflicts.append(f'--{flag} {shown} (this run: {mine})')
        elif flag not in given:
            setattr(args, flag, value)
    if conflicts:
        raise UserError(f'{args.model_path} was calibrated with ' + ', '.join(conflicts) + ': drop those flags '
                        '(the checkpoint\'s record is used) or calibrate again with them')
    if record.get('architecture'):
        args.architecture = record['architecture']
    levels = record.get('levels')
    if not isinstance(levels, Mapping):
        return
    searched = isinstance(extras.get('low_latency'), Mapping)
    for flag in LEVEL_FLAGS:
        if flag not in levels:
            continue
        if flag not in given:
            setattr(args, flag, levels[flag])
        elif getattr(args, flag) != levels[flag]:
            if searched:
                raise UserError(f'the thresholds in {args.model_path} were chosen for --{flag} {levels[flag]} '
                                f'(for_v --target_T); this run gives {getattr(args, flag)}: drop --{flag} or '
                                'calibrate again with it')
            print(f'note: --{flag} {getattr(args, flag)} (the calibration recorded {levels[flag]})', file=sys.stderr)
    if 'fc2_thresholds' in levels and not ({'fc2_thresholds', 'fc2_calibrated'} & given):
        fc2 = levels['fc2_thresholds']
        args.fc2_calibrated, args.fc2_thresholds = fc2 is None, None if fc2 is None else list(fc2)


def model_record(args, model, source) -> dict:
    """What for_v records to rebuild the model and its SNN: the flags of MODEL_FLAGS and
    LEVEL_FLAGS, the timm architecture built, the fc2 choice, and where the weights came from."""
    kwargs = list(args.model_kwargs) + [f'{k}={v!r}' for k, v in (getattr(args, 'model_args', None) or {}).items()
                                        if not any(item.split('=', 1)[0].strip() == k for item in args.model_kwargs)]
    fc2 = fc2_thresholds(args, model)
    levels = {flag: getattr(args, flag) for flag in LEVEL_FLAGS}
    levels['fc2_thresholds'] = None if fc2 is None else [float(v) for v in fc2]
    record = {'model_kwargs': kwargs, 'architecture': getattr(args, 'architecture', None) or args.model,
              'input_size': args.input_size, 'nb_classes': args.nb_classes, 'levels': levels}
    if source is not None:
        record['weights'] = source
    return record


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------
def build_model(args, state_dict=None):
    """The convertible model, with TestNeurons in for_v/snn mode, and its weights loaded (from
    `state_dict` when given, else from --model_path)."""
    _import_runtime()
    kwargs = {**(getattr(args, 'model_args', None) or {}), **utils.parse_model_kwargs(args.model_kwargs)}
    for key in ('num_classes', 'img_size'):
        if key in kwargs:
            raise UserError(f'--model_kwargs {key}=... is set by --nb_classes/--input_size')
    architecture = getattr(args, 'architecture', None) or args.model
    try:
        # ann needs no conversion: a model the method cannot convert is evaluated as plain timm.
        model = create_model(architecture, allow_unconvertible=args.test_mode == 'ann',
                             num_classes=args.nb_classes, img_size=args.input_size, **kwargs)
    except ConversionError as exc:
        raise UserError(str(exc)) from None
    if getattr(args, 'pretrained_cfg', None):
        # The source's data config (mean, std, crop), read by --data_config timm.
        model.pretrained_cfg = {**getattr(model, 'pretrained_cfg', {}), **args.pretrained_cfg}
    reason = unconvertible_reason(model)
    if reason is not None and utils.is_main_process():
        print(f'note: --model {args.model} is evaluated as a plain timm network; --test_mode for_v and '
              f'snn will refuse it: {reason}', file=sys.stderr)
    if args.test_mode in ('for_v', 'snn'):
        replace_test_by_testneuron(model, args.percent)
    if state_dict is None and not args.model_path:
        print('warning: no --model_path given: the model has RANDOM weights', file=sys.stderr)
        return model
    if state_dict is None:
        state_dict = utils.load_checkpoint(args.model_path)
    if utils.has_published_place_names(state_dict):  # a file of the published scripts
        state_dict = utils.convert_published_places(state_dict)
    check_architecture(model, state_dict, args)
    state_dict = fit_pos_embed(model, state_dict, args)
    if args.test_mode == 'snn':
        _check_thresholds_present(model, state_dict, args)
        utils.load_model_weights(model, state_dict)
    else:  # ann ignores thresholds; for_v computes them afresh
        utils.load_model_weights(model, state_dict, ignore=THRESHOLD_KEYS)
    return model


def check_architecture(model, state_dict, args) -> None:
    """Refuse weights of another architecture with what differs, read from the shapes (width,
    depth, heads, MLP ratio, patch size, class count, grid), and the flags that would fit. A
    grid alone (another --input_size) or a class count alone keep their own messages."""
    differences = utils.architecture_differences(state_dict, model, _pos_embed_prefix(model))
    structural = set(differences) - {'num_classes', 'grid'}
    if not structural:
        return
    words = utils.ARCHITECTURE_WORDS
    parts = [f'{words[k]} {theirs} (the model: {ours})' for k, (theirs, ours) in differences.items()]
    kwargs = dict(utils.parse_model_kwargs(args.model_kwargs))
    items = dict(item.split('=', 1) for item in args.model_kwargs)
    for key in ('patch_size', 'embed_dim', 'depth', 'mlp_ratio'):
        if key in differences:
            theirs = differences[key][0]
            items[key] = f'{theirs:g}' if isinstance(theirs, float) else str(theirs).replace(' ', '')
    width = differences.get('embed_dim', (None,))[0]
    heads_note = ''
    if 'num_heads' in differences:
        items['num_heads'] = str(differences['num_heads'][0])
    elif width is not None:
        heads = kwargs.get('num_heads') or utils.model_heads(model)
        if heads and width % heads == 0:
            items['num_heads'] = str(heads)
            heads_note = (f' (the heads do not show in the weights: {heads} is the model\'s; use the count the '
                          'checkpoint was trained with)')
        else:
            items['num_heads'] = '?'
            heads_note = (f' (the heads do not show in the weights: pick the count the checkpoint was trained '
                          f'with, one that divides {width})')
    flags = '--model_kwargs ' + ' '.join(f'{k}={v}' for k, v in items.items())
    patch = differences.get('patch_size', (None,))[0] or getattr(model.patch_embed, 'patch_size', (None,))[0]
    patch = patch[0] if isinstance(patch, tuple) else patch
    if 'grid' in differences and patch and differences['grid'][0] * patch != args.input_size:
        flags += f' --input_size {differences["grid"][0] * patch}'
    if 'num_classes' in differences:
        flags += f' --nb_classes {differences["num_classes"][0]}'
    raise UserError(f'{weights_label(args)} is another architecture than --model {args.model}: '
                    + ', '.join(parts) + f'; it fits {flags}{heads_note}')


def fit_pos_embed(model, state_dict, args) -> dict:
    """The checkpoint's weights for this model: BAAI's EVA layout mapped to timm's, and a position
    embedding made for another image size refused, naming both sizes, or with --resample_pos_embed
    resampled (timm's bicubic resampling of the grid), saying so."""
    mismatch = _pos_embed_mismatch(model, state_dict, args)
    if mismatch is not None and not args.resample_pos_embed:
        theirs, ours, size = mismatch
        advice = f': pass --input_size {size}, or --resample_pos_embed to resample it to this size' if size else ''
        raise UserError(f'the position embedding of {weights_label(args)} is {theirs}, the model\'s is '
                              f'{ours}{advice}')
    if getattr(model, 'ecmt_family', None) == 'eva':
        from model_eva import convert_baai_eva01
        # Given the model, the conversion resamples the grid; without it, it leaves it as it is.
        state_dict = convert_baai_eva01(state_dict, model if args.resample_pos_embed else None)
    elif mismatch is not None:
        from timm.layers import resample_abs_pos_embed
        state_dict = dict(state_dict)
        state_dict['pos_embed'] = resample_abs_pos_embed(
            state_dict['pos_embed'], new_size=model.patch_embed.grid_size,
            num_prefix_tokens=_pos_embed_prefix(model))
    if mismatch is not None:
        print(f'resampled the position embedding of {weights_label(args)} from {mismatch[0]} to {mismatch[1]}')
    return state_dict


def _pos_embed_prefix(model) -> int:
    """How many rows of pos_embed belong to prefix tokens (class, registers), not to the grid."""
    return 0 if getattr(model, 'no_embed_class', False) else int(getattr(model, 'num_prefix_tokens', 1))


def _pos_embed_mismatch(model, state_dict, args):
    """None if the checkpoint's pos_embed fits the model; else (checkpoint's grid, model's grid,
    the --input_size the checkpoint's grid implies or None), in words."""
    theirs, ours = state_dict.get('pos_embed'), getattr(model, 'pos_embed', None)
    if theirs is None or ours is None or theirs.shape == ours.shape:
        return None
    if theirs.ndim != 3 or theirs.shape[-1] != ours.shape[-1]:
        return None  # another width: load_model_weights reports it with the other shape mismatches
    patch = model.patch_embed.patch_size[0]
    grid_h, grid_w = model.patch_embed.grid_size
    tokens = theirs.shape[1] - _pos_embed_prefix(model)
    side = math.isqrt(max(tokens, 0))
    model_text = f'a {grid_h}x{grid_w} grid of patches (--input_size {args.input_size} at patch {patch})'
    if side * side != tokens:
        if args.resample_pos_embed:
            raise UserError(f'the position embedding of {weights_label(args)} has {tokens} patch positions, '
                                  'not a square grid: it cannot be resampled')
        return f'{tokens} patch positions (not a square grid)', model_text, None
    return f'a {side}x{side} grid of patches (input size {side * patch} at patch {patch})', model_text, side * patch


def _check_thresholds_present(model, state_dict, args) -> None:
    path = args.model_path
    places = [name for name, _ in get_modules(model, (TestNeuron,))]
    missing = [p for p in places if f'{p}.scale_p' not in state_dict or f'{p}.scale_n' not in state_dict]
    if len(missing) == len(places):
        raise utils.UserError(f'{path} holds no thresholds: run --test_mode for_v on it first and '
                              'pass the checkpoint it writes')
    known = set(places)
    stray = sorted({k.rsplit('.', 1)[0] for k in state_dict if k.endswith(THRESHOLD_KEYS)} - known)
    if missing or stray:
        parts = []
        if missing:
            parts.append(f'{len(missing)} places of the model have no thresholds: '
                         + ', '.join(missing[:6]) + (' ...' if len(missing) > 6 else ''))
        if stray:
            parts.append(f'{len(stray)} threshold entries match no place of the model: '
                         + ', '.join(stray[:6]) + (' ...' if len(stray) > 6 else ''))
        raise utils.UserError(f'the thresholds in {path} do not match --model {args.model}: '
                              + '; '.join(parts))


def fc2_thresholds(args, model):
    """The fixed fc2 thresholds of this run, or None for the calibrated ones. By default the
    published override (0.25, 0.08) where the published code applies it: a --model name that
    contains 'vit' (ECMT_SPEC 11; so not deit_* nor eva_g_patch14), and only for the models those
    thresholds were set for: a timm VisionTransformer with GELU MLPs (model_base's
    default_fc2_thresholds; not a rotary ViT, which timm builds as an Eva, nor a gated MLP, whose
    fc2 reads an element-wise product)."""
    if args.fc2_calibrated:
        return None
    if args.fc2_thresholds is not None:
        return tuple(args.fc2_thresholds)
    family_fits = model is None or default_fc2_thresholds(model) is not None
    return VIT_FC2_THRESHOLDS if 'vit' in args.model and family_fits else None


def build_calibration_loader(args, model=None, *, rank: int = 0, world_size: int = 1,
                             pin_memory: bool = False) -> DataLoader:
    """The batches thresholds are calibrated on (a datasets.CheckedBatches: unreadable files stop the
    run or, with --skip_bad_images, are left out): --calib_data_path (its training split) or, as
    published, the evaluation set; with the evaluation transform (`model` is read for
    --data_config timm); the first --calib_batches batches (default all). Under torchrun each
    process gets its share of the single-process batches (rank, world_size), so the pooled
    statistics are those of one process."""
    _import_runtime()
    dataset, _ = build_calibration_dataset(args, model)
    batches = utils.ShardedBatchSampler(len(dataset), args.batch_size, rank, world_size,
                                        max_batches=args.calib_batches)
    loader = DataLoader(datasets.readable(dataset), batch_sampler=batches, num_workers=args.num_workers,
                        pin_memory=pin_memory, collate_fn=datasets.collate_readable)
    return datasets.CheckedBatches(loader, skip=getattr(args, 'skip_bad_images', False))


def calibration_record(args, transform: dict, images: int) -> dict:
    """What for_v stores beside the thresholds: the images and transform they were measured on."""
    data_path = None if args.data_set.upper() == 'DIGITS' else (args.calib_data_path or args.eval_data_path)
    return {'transform': transform, 'data_set': args.data_set, 'data_path': data_path,
            'split': 'train' if args.calib_data_path else 'evaluation', 'images': images,
            'batches': args.calib_batches, 'percent': args.percent, 'model': args.model}


def check_calibration_record(args, extras: dict, transform: dict) -> None:
    """snn: refuse thresholds calibrated on images of another size or transform than this run's.
    A file with no record (the published scripts write none) gets one warning."""
    record = extras.get('calibration')
    if not isinstance(record, Mapping) or not isinstance(record.get('transform'), Mapping):
        if utils.is_main_process():
            print(f'warning: {args.model_path} does not record the transform its thresholds were calibrated '
                  f'with (a file of the published scripts?); assuming this run\'s', file=sys.stderr)
        return
    recorded = record['transform']
    if not datasets.same_transform(recorded, transform):
        raise utils.UserError(
            f'the thresholds in {args.model_path} were calibrated on images made by: '
            f'{_describe_record(recorded)}; this run makes: {datasets.describe_transform(transform)}. '
            'Pass the --input_size, --data_config, --crop_pct and --imagenet_default_mean_and_std of its '
            'for_v run, or calibrate again')


def _describe_record(record: Mapping) -> str:
    try:
        return datasets.describe_transform(record)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):  # a record of another version
        return repr(dict(record))


def main(args) -> dict:
    check_args(args)
    check_output_folders(args)
    utils.seed_everything(args.seed)
    # Under torchrun: one process per device; otherwise (rank 0 of 1) exactly a single process.
    device, rank, world_size = utils.init_distributed(args.device)
    amp = resolve_amp(args.amp, device)
    if device.type == 'cpu':
        utils.keep_freed_memory()  # page faults on fresh memory cost a quarter of a CPU run
        native_kernels.prepare()  # a first run on a machine builds them while the data loads
    distributed, main_process = world_size > 1, rank == 0
    state_dict, extras, source = load_weights(args)
    if args.test_mode in ('ann', 'snn'):
        apply_record(args, extras)
    model = build_model(args, state_dict).to(device).eval()
    del state_dict
    # The transform may come from the model's config (--data_config timm), hence after the model.
    transform = datasets.transform_config(args, model)
    if args.test_mode == 'snn':
        check_calibration_record(args, extras, transform)
    pin_memory = device.type == 'cuda'
    if args.test_mode == 'for_v':
        loader = build_calibration_loader(args, model, rank=rank, world_size=world_size, pin_memory=pin_memory)
    else:
        dataset, _ = build_dataset(False, args, model)
        dataset = datasets.readable(dataset)
        if distributed:
            # The single-process batches, dealt round-robin with no padding: every image counts once.
            loader = DataLoader(dataset, batch_sampler=utils.ShardedBatchSampler(
                len(dataset), args.batch_size, rank, world_size), num_workers=args.num_workers,
                pin_memory=pin_memory, collate_fn=datasets.collate_readable)
        else:
            loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=args.num_workers,
                                pin_memory=pin_memory, drop_last=False, collate_fn=datasets.collate_readable)
        loader = datasets.CheckedBatches(loader, skip=args.skip_bad_images)
    reduce = utils.all_reduce_sum if distributed else None  # figures summed over processes
    show = not args.no_progress and main_process
    log_dir = Path(args.log_dir)
    record = {'test_mode': args.test_mode, 'model': args.model, 'data_set': args.data_set,
              'transform': transform, 'amp': amp}
    if source is not None:
        record['weights'] = source
    if distributed:
        record['world_size'] = world_size
    transform_line = f'transform: {datasets.describe_transform(transform)}'
    if main_process:
        print(transform_line)

    if args.test_mode == 'snn':
        import report
        from trans_utils import SOPMonitor
        savename = args.savename or f'{Path(args.model_path).stem}_snn'
        # Refuse a missing matplotlib or a bad ANN record now, not after the long simulation.
        ann_acc1 = report.read_ann_accuracy(args.ann_results) if args.ann_results else None
        if args.plot:
            report.require_matplotlib()
        record['coding'] = low_latency.resolve_coding(args.coding, extras, args.model_path)  # issue 23
        try:
            convert_to_snn(model, linear_num=args.linear_num, qkv_num=args.qkv_num,
                           softmax_num=args.softmax_num, softmax_p=args.softmax_p,
                           fc2_thresholds=fc2_thresholds(args, model), backend=args.backend,
                           coding=record['coding'])
        except ConversionError as exc:
            raise UserError(str(exc)) from None
        record['backend'] = model.ecmt_backend
        if main_process:
            print(f'snn: backend {model.ecmt_backend} on {device}')
        low_latency.apply_fixed_thresholds(model, extras.get('low_latency'),
                                           log=print if main_process else (lambda line: None))
        count_levels = args.level_batches != 0
        monitor = (SOPMonitor(model, count_levels=count_levels, level_batches=args.level_batches or None)
                   if args.monitor else None)
        energy_monitor = energy.EnergyMonitor(model, monitor) if monitor is not None else None  # issue 24
        log_path = log_dir / 'log_snn.txt' if main_process else None
        if main_process:
            utils.append_log(log_path, _header(args))
            utils.append_log(log_path, transform_line)
        try:
            results = evaluate_snn(model, loader, device, args.test_T, log_path=log_path, amp=amp,
                                   monitor=monitor, time_chunk=args.time_chunk, reduce=reduce,
                                   show_progress=show, print_freq=args.print_freq)
        finally:
            if monitor is not None:
                monitor.remove()
            if energy_monitor is not None:
                energy_monitor.remove()
        # -- energy report (issue 24): every process takes part in its reductions
        energy_report = None
        if energy_monitor is not None:
            energy_report = energy.energy_report(energy_monitor, args.energy_model, reduce=reduce)
            results['energy'] = energy_report.summary(results.get('energy_ratio'))
        record.update(results)
        if ann_acc1 is not None:
            record['ann_acc1'] = ann_acc1
        if main_process:
            _report_snn(results, log_path)
        # Every process takes part in the reductions; the first one writes the files.
        entries, lines = report.write_snn_reports(
            results, args.output_dir, savename, monitor, levels=count_levels, plot=args.plot,
            ann_acc1=ann_acc1, reduce=reduce, write=main_process, energy=energy_report)
        record.update(entries)
        for line in lines:
            print(line)
            utils.append_log(log_path, line)
    else:
        log_path = log_dir / 'log_ann.txt' if main_process else None
        if main_process:
            utils.append_log(log_path, _header(args))
            utils.append_log(log_path, transform_line)
        results = evaluate(model, loader, device, log_path=log_path, amp=amp, desc=args.test_mode,
                           reduce=reduce, show_progress=show, print_freq=args.print_freq)
        record.update(results)
        five = f'top-5 {results["acc5"]:.2f}%, ' if 'acc5' in results else ''
        line = (f'{args.test_mode}: {results["n"]} images, top-1 {results["acc1"]:.2f}%, '
                f'{five}loss {results["loss"]:.4f}, {results["seconds"]:.1f} s')
        if main_process:
            print(line)
            utils.append_log(log_path, line)
        if args.test_mode == 'for_v' and distributed:
            # Pool all processes' batch statistics: every process now holds the same thresholds.
            sync_calibration(model, reduce)
        if args.test_mode == 'for_v':
            check_thresholds_finite(model)
            record['calibration'] = {**calibration_record(args, transform, results['n']),
                                     **model_record(args, model, source)}
            record['calibration']['coding'] = args.coding or 'rate'  # issue 23: snn runs this coding
        if args.test_mode == 'for_v' and args.target_T is not None:
            # -- low-latency calibration (issue 15): thresholds for --target_T steps, chosen on the
            # calibration loader alone (--calib_data_path's images; the evaluation set without it).
            conversion = dict(linear_num=args.linear_num, qkv_num=args.qkv_num, softmax_num=args.softmax_num,
                              softmax_p=args.softmax_p, fc2_thresholds=fc2_thresholds(args, model),
                              coding=args.coding or 'rate')
            record['low_latency'] = low_latency.run_for_args(
                model, loader, args, device, amp, conversion,
                log=lambda line: (print(line), utils.append_log(log_path, line)))
            record['calibration']['percent'] = record['low_latency']['percent']  # times its scales
        if args.test_mode == 'for_v' and main_process:
            path = Path(args.output_dir) / f'{args.savename or "test"}.pth'
            checkpoint = {'model': {k: v.detach().cpu() for k, v in model.state_dict().items()},
                          'calibration': record['calibration']}
            if 'low_latency' in record:
                checkpoint['low_latency'] = record['low_latency']
            utils.save_checkpoint(checkpoint, path)
            record['checkpoint'] = str(path)
            print(f'thresholds of {len(get_modules(model, (TestNeuron,)))} places saved with the weights '
                  f'to {path}')
    if loader.skipped:
        record['skipped_images'] = list(loader.skipped)
    if args.results and main_process:
        utils.write_json(record, args.results)
        print(f'results written to {args.results}')
    return record


def check_thresholds_finite(model) -> None:
    """Refuse calibrated thresholds that are NaN or infinite (activations holding NaN or inf, from
    broken weights or an fp16 overflow): an SNN with them never fires or fires nonsense."""
    bad = [name for name, neuron in get_modules(model, (TestNeuron,))
           if neuron.calibrate and not bool(torch.isfinite(torch.cat([neuron.scale_p, neuron.scale_n])).all())]
    if bad:
        shown = ', '.join(bad[:5]) + (f' and {len(bad) - 5} more' if len(bad) > 5 else '')
        raise utils.UserError(f'calibration gave non-finite thresholds at {len(bad)} places ({shown}): '
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


def _report_snn(results: dict, log_path: Path) -> None:
    lines = [f'snn: {results["n"]} images, T={results["T"]}, {results["seconds"]:.1f} s']
    top5 = results.get('acc5') or [None] * len(results['acc1'])
    for t, (a1, a5) in enumerate(zip(results['acc1'], top5), start=1):
        line = f'  t={t}: top-1 {a1:.2f}%' + ('' if a5 is None else f'  top-5 {a5:.2f}%')
        if 'energy_ratio' in results:
            line += f'  firing rate {results["fire_rate"][t - 1]:.4f}  energy vs ANN {results["energy_ratio"][t - 1]:.4f}'
        lines.append(line)
    for line in lines:
        print(line)
        utils.append_log(log_path, line)


if __name__ == '__main__':
    run_cli(main, get_args_parser())
