"""Where a run's weights come from and the model they go into: the entry both scripts call
(``run_class_finetuning.py``, ``fintune_model.py``).

- **The run's weights** (:func:`load_weights`): --model_path's file, or --pretrained /
  --pretrained_file.
- **The model** (:func:`build_model`): the convertible model of the command line with its
  weights loaded.

The rest lives in one module per job, and every name of theirs listed below is importable from
here too:

- ``checkpoints.py``: reading a file (torch.save, safetensors) and undoing its key layout
  (wrappers, prefixes, the published placeholder names); loading it strictly into a model.
- ``pretrained.py``: ``--pretrained``/``--pretrained_file``: timm names and tags,
  ``hf_hub:org/name``, the published aliases, from the Hugging Face cache.
- ``diagnosis.py``: weights of another architecture or family than ``--model``, and position
  embeddings made for another image size: refused with the flags that fit, or resampled.
- ``records.py``: the record of for_v (what rebuilds the model, the transform, the class names,
  the conversion options of ``options.RECORDED_OPTIONS``), written by for_v and restored or
  checked by ann and snn; the run's fc2 thresholds.
"""
from __future__ import annotations

import json
import sys
from collections.abc import Callable, Mapping
from pathlib import Path

from checkpoints import THRESHOLD_KEYS, classifier_name, convert_published_places, has_published_place_names
from checkpoints import load_checkpoint, load_model_weights, read_checkpoint
from cli_base import UserError, given_flags
from diagnosis import check_architecture, fit_pos_embed
from pretrained import load_pretrained

# The names the scripts, tests and other modules have always imported from here, wherever they live.
from checkpoints import PUBLISHED_PLACE_NAMES, clean_checkpoint, is_safetensors_header
from diagnosis import (ARCHITECTURE_WORDS, architecture_differences, model_heads, propose_model,
                       read_architecture, recognise_family, resample_pos_embed, weights_label)
from pretrained import HUB_PREFIX, PUBLISHED_FILES, PUBLISHED_HUB_MODELS, PretrainedWeights, is_hub_name
from records import (LEVEL_FLAGS, MODEL_FLAGS, TRANSFORM_FLAGS, apply_record, calibration_record,
                     check_calibration_record, fc2_thresholds, model_record, record_options, recorded_transform,
                     restore_options)

__all__ = [
    "read_checkpoint", "load_checkpoint", "clean_checkpoint", "is_safetensors_header",
    "convert_published_places", "has_published_place_names", "load_model_weights",
    "PUBLISHED_PLACE_NAMES", "classifier_name",
    "HUB_PREFIX", "PUBLISHED_HUB_MODELS", "PUBLISHED_FILES", "PretrainedWeights", "load_pretrained",
    "is_hub_name", "load_weights",
    "read_architecture", "architecture_differences", "model_heads", "recognise_family",
    "check_architecture", "ARCHITECTURE_WORDS", "propose_model", "weights_label",
    "resample_pos_embed", "fit_pos_embed",
    "MODEL_FLAGS", "LEVEL_FLAGS", "TRANSFORM_FLAGS", "model_record", "calibration_record", "apply_record",
    "record_options", "restore_options", "check_calibration_record", "recorded_transform",
    "create_model_of", "build_model", "fc2_thresholds", "THRESHOLD_KEYS",
]


# ============================================================================================
# Where a run's weights come from
# ============================================================================================
def load_weights(args, log: Callable[[str], None] = print):
    """(state_dict, extras, source) of this run: --model_path's file (torch.save or safetensors),
    or --pretrained / --pretrained_file through timm; `source` says where they came from. Fills
    --nb_classes and --input_size from pretrained weights where not given, and keeps the data
    config a source carries (a hub config.json, a checkpoint's 'pretrained_cfg' entry, a timm
    config.json beside the file) for --data_config timm."""
    from utils import parse_model_kwargs
    if getattr(args, "pretrained", False) or getattr(args, "pretrained_file", None):
        found = load_pretrained(args.model, parse_model_kwargs(args.model_kwargs), file=args.pretrained_file)
        given = given_flags(args)
        args.architecture, args.model_args, args.pretrained_cfg = (found.architecture, found.model_args,
                                                                   found.pretrained_cfg)
        if "nb_classes" not in given and found.num_classes is not None:
            args.nb_classes = found.num_classes
        if "input_size" not in given and found.input_size is not None:
            args.input_size = found.input_size
        return found.state_dict, {}, found.source
    if not args.model_path:
        return None, {}, None
    state_dict, extras = read_checkpoint(args.model_path, log=log)
    source = {"kind": "file", "path": str(args.model_path)}
    record = extras.get("calibration")
    if isinstance(record, Mapping) and isinstance(record.get("weights"), Mapping):
        source["from"] = dict(record["weights"])  # a for_v file: where its weights came from
    cfg = extras.get("pretrained_cfg")
    beside = Path(args.model_path).parent / "config.json"
    if not isinstance(cfg, Mapping) and beside.is_file():
        try:
            config = json.loads(beside.read_text())
            cfg = config.get("pretrained_cfg") if isinstance(config, dict) and "architecture" in config else None
        except (OSError, ValueError):
            cfg = None
    if isinstance(cfg, Mapping):
        args.pretrained_cfg = {k: v for k, v in cfg.items() if isinstance(v, (str, int, float, list, tuple))}
    return state_dict, extras, source


# ============================================================================================
# The model
# ============================================================================================
def create_model_of(args, *, new_head: bool = False):
    """The model of the command line, without weights: convertible; in ann mode a model ECMT
    cannot convert is the plain timm model (said once); `new_head`: for fine-tuning (never plain)."""
    from model_base import unconvertible_reason
    from model_vit import create_model
    from trans_utils import ConversionError
    from utils import is_main_process, parse_model_kwargs
    mode = getattr(args, "test_mode", "ann")
    given = parse_model_kwargs(args.model_kwargs)
    clash = sorted({"num_classes", "img_size"} & set(given))
    if clash:
        raise UserError(f"--model_kwargs {', '.join(clash)}=... is set by --nb_classes/--input_size: "
                        "use --nb_classes and --input_size")
    kwargs = {**(getattr(args, "model_args", None) or {}), **given}
    kwargs = {k: v for k, v in kwargs.items() if k not in ("num_classes", "img_size")}
    architecture = getattr(args, "architecture", None) or args.model
    size = {"img_size": args.input_size}
    try:
        # ann needs no conversion: a model the method cannot convert is evaluated as plain timm.
        try:
            model = create_model(architecture, allow_unconvertible=mode == "ann" and not new_head,
                                 num_classes=args.nb_classes, **size, **kwargs)
        except ConversionError as exc:
            if "'img_size'" not in str(exc):
                raise
            # A network of any image size (ResNet, ConvNeXt): ann evaluates it at --input_size.
            model = create_model(architecture, allow_unconvertible=mode == "ann" and not new_head,
                                 num_classes=args.nb_classes, **kwargs)
    except ConversionError as exc:
        raise UserError(str(exc)) from None
    except (RuntimeError, TypeError) as exc:  # e.g. an unknown keyword in --model_kwargs
        raise UserError(f"cannot create model {args.model!r}: {exc}") from None
    if getattr(args, "pretrained_cfg", None):
        # The source's data config (mean, std, crop), read by --data_config timm.
        model.pretrained_cfg = {**(getattr(model, "pretrained_cfg", None) or {}), **args.pretrained_cfg}
    reason = unconvertible_reason(model)
    if reason is not None and is_main_process():
        print(f"note: --model {args.model} is evaluated as a plain timm network; --test_mode for_v and "
              f"snn will refuse it: {reason}", file=sys.stderr)
    return model


def build_model(args, state_dict=None, *, new_head: bool = False):
    """The model of the command line with its weights (`state_dict`, else --model_path's file):
    convertible, with TestNeurons in for_v/snn mode; in ann mode a model ECMT cannot convert is
    the plain timm model. `new_head` (fine-tuning): weights with another class count leave the
    head out, to be trained. Weights that do not fit are one UserError saying what would."""
    from trans_utils import replace_test_by_testneuron
    from utils import is_main_process
    mode = getattr(args, "test_mode", "ann")
    model = create_model_of(args, new_head=new_head)
    if mode in ("for_v", "snn") and not new_head:
        replace_test_by_testneuron(model, args.percent, getattr(args, "thresholds", None) or "place")
    if state_dict is None and not getattr(args, "model_path", None):
        if not new_head:
            print("warning: no --model_path given: the model has RANDOM weights", file=sys.stderr)
        return model
    if state_dict is None:
        state_dict = load_checkpoint(args.model_path)
    if has_published_place_names(state_dict):  # a file of the published scripts
        state_dict = convert_published_places(state_dict)
    ignore = THRESHOLD_KEYS if mode != "snn" or new_head else ()
    classifier = classifier_name(model)
    head = state_dict.get(f"{classifier}.weight")
    if new_head and head is not None and head.ndim == 2 and head.shape[0] != args.nb_classes:
        if is_main_process():
            print(f"checkpoint head has {head.shape[0]} classes, --nb_classes is {args.nb_classes}: dropping "
                  f"{classifier}.* and training a new head")
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(classifier + ".")}
        ignore = lambda key: key.startswith(classifier + ".") or key.endswith(THRESHOLD_KEYS)  # noqa: E731
    if getattr(model, "ecmt_family", None) == "eva":
        from model_eva import convert_baai_eva01
        state_dict = convert_baai_eva01(state_dict)  # BAAI's EVA-01 layout; timm's passes unchanged
    check_architecture(model, state_dict, args)
    state_dict = fit_pos_embed(model, state_dict, args)
    if mode == "snn" and not new_head:
        _check_thresholds_present(model, state_dict, args)
    load_model_weights(model, state_dict, ignore=ignore)
    return model


def _check_thresholds_present(model, state_dict, args) -> None:
    from trans_utils import TestNeuron, get_modules
    path = args.model_path
    places = [name for name, _ in get_modules(model, (TestNeuron,))]
    missing = [p for p in places if f"{p}.scale_p" not in state_dict or f"{p}.scale_n" not in state_dict]
    if len(missing) == len(places):
        raise UserError(f"{path} holds no thresholds: run --test_mode for_v on it first and "
                        "pass the checkpoint it writes")
    known = set(places)
    stray = sorted({k.rsplit(".", 1)[0] for k in state_dict if k.endswith(THRESHOLD_KEYS)} - known)
    if missing or stray:
        parts = []
        if missing:
            parts.append(f"{len(missing)} places of the model have no thresholds: "
                         + ", ".join(missing[:6]) + (" ..." if len(missing) > 6 else ""))
        if stray:
            parts.append(f"{len(stray)} threshold entries match no place of the model: "
                         + ", ".join(stray[:6]) + (" ..." if len(stray) > 6 else ""))
        raise UserError(f"the thresholds in {path} do not match --model {args.model}: " + "; ".join(parts))
