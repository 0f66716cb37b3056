"""The record of for_v: what rebuilds the model and its SNN.

What rebuilds the model, the transform, the class names and the conversion options
(``options.RECORDED_OPTIONS``) the thresholds were calibrated with (:func:`model_record`,
:func:`calibration_record`, :func:`record_options`), written by for_v and restored or checked by
ann and snn (:func:`apply_record`, :func:`restore_options`, :func:`recorded_transform`,
:func:`check_calibration_record`); and the run's fc2 choice (:func:`fc2_thresholds`), which the
record keeps.
"""
from __future__ import annotations

import sys
from collections.abc import Mapping

import options
from cli_base import UserError, given_flags

__all__ = [
    "MODEL_FLAGS", "LEVEL_FLAGS", "TRANSFORM_FLAGS", "model_record", "calibration_record", "apply_record",
    "record_options", "restore_options", "check_calibration_record", "recorded_transform", "fc2_thresholds",
]


#: Flags that rebuild the model: a for_v record fills them where not given; a given one must agree.
MODEL_FLAGS = ("model", "model_kwargs", "input_size", "nb_classes")
#: Flags of the SNN's neurons: a for_v record fills them where not given (see apply_record).
LEVEL_FLAGS = ("linear_num", "qkv_num", "softmax_num", "softmax_p")
#: The flags that make the transform (a for_v record's transform is used where none is given).
TRANSFORM_FLAGS = ("data_config", "crop_pct", "imagenet_default_mean_and_std", "mean", "std", "input_size")


def _calibration(extras: Mapping) -> Mapping | None:
    record = extras.get("calibration")
    return record if isinstance(record, Mapping) else None


def _kwargs_text(items) -> str:
    return " ".join(items) if items else "(none)"


def apply_record(args, extras: Mapping) -> None:
    """ann/snn on a for_v checkpoint: its record of --model, --model_kwargs, --input_size and
    --nb_classes fills each flag not given, and a given one that differs is an error naming both;
    the level flags and the fc2 choice are filled the same way, and a given one that differs is
    used (thresholds do not depend on the levels) unless the thresholds were searched for the
    recorded ones (--target_T), then it is an error too. A file without a record (the published
    scripts') changes nothing."""
    from utils import parse_model_kwargs
    record = _calibration(extras)
    if record is None:
        return
    given = given_flags(args)
    recorded = {"model": record.get("model"), "model_kwargs": record.get("model_kwargs"),
                "input_size": record.get("input_size", (record.get("transform") or {}).get("input_size")),
                "nb_classes": record.get("nb_classes")}
    conflicts = []
    for flag in MODEL_FLAGS:
        value = recorded[flag]
        if value is None:
            continue
        if flag == "model_kwargs":
            value = list(value)
            same = parse_model_kwargs(args.model_kwargs) == parse_model_kwargs(value)
        else:
            same = getattr(args, flag) == value
        if flag in given and not same:
            shown = _kwargs_text(value) if flag == "model_kwargs" else value
            mine = _kwargs_text(args.model_kwargs) if flag == "model_kwargs" else getattr(args, flag)
            conflicts.append(f"--{flag} {shown} (this run: {mine})")
        elif flag not in given:
            setattr(args, flag, value)
    if conflicts:
        raise UserError(f"{args.model_path} was calibrated with " + ", ".join(conflicts) + ": drop those flags "
                        "(the checkpoint's record is used) or calibrate again with them")
    if record.get("architecture"):
        args.architecture = record["architecture"]
    if isinstance(record.get("classes"), list):  # the data set checks its class names against them
        args.expected_classes = (list(record["classes"]), f"the for_v run of {args.model_path}")
    levels = record.get("levels")
    if not isinstance(levels, Mapping):
        return
    searched = isinstance(extras.get("low_latency"), Mapping)
    for flag in LEVEL_FLAGS:
        if flag not in levels:
            continue
        if flag not in given:
            setattr(args, flag, levels[flag])
        elif getattr(args, flag) != levels[flag]:
            if searched:
                raise UserError(f"the thresholds in {args.model_path} were chosen for --{flag} {levels[flag]} "
                                f"(for_v --target_T); this run gives {getattr(args, flag)}: drop --{flag} or "
                                "calibrate again with it")
            print(f"note: --{flag} {getattr(args, flag)} (the calibration recorded {levels[flag]})", file=sys.stderr)
    if "fc2_thresholds" in levels and not ({"fc2_thresholds", "fc2_calibrated"} & given):
        fc2 = levels["fc2_thresholds"]
        args.fc2_calibrated, args.fc2_thresholds = fc2 is None, None if fc2 is None else list(fc2)


def record_options(args) -> dict:
    """for_v: {name: value} of every option of ``options.RECORDED_OPTIONS``, for its record (a flag
    not given records the option's default)."""
    values = {}
    for option in options.RECORDED_OPTIONS:
        value = getattr(args, option.name, None)
        values[option.name] = option.default if value is None else value
    return values


def restore_options(args, extras: Mapping, path) -> dict:
    """snn: each option of ``options.RECORDED_OPTIONS`` from the checkpoint's record where its
    flag is not given (set on `args` too); a given flag that differs from the record is one
    UserError naming both values; a checkpoint without the entry runs with the flag, else the
    option's default. Returns {name: value}."""
    record = _calibration(extras) or {}
    given = given_flags(args)
    values = {}
    for option in options.RECORDED_OPTIONS:
        recorded = record.get(option.name)
        if not _recordable(option, recorded):
            recorded = None  # a value this version does not know: as if not recorded
        # A flag's parser default is not a request: only a flag on the command line contradicts.
        requested = getattr(args, option.name, None) if option.name in given else None
        if requested is not None and recorded is not None and requested != recorded:
            flag = f"--{option.name}"
            raise UserError(f"{flag} {requested} contradicts {path}, whose thresholds were calibrated for "
                            f"{flag} {recorded} (drop {flag}, or run for_v {flag} {requested} to calibrate for it)")
        value = requested if requested is not None else recorded if recorded is not None else option.default
        setattr(args, option.name, value)
        values[option.name] = value
    return values


def _recordable(option, value) -> bool:
    """Whether a record's `value` is one `option` can take (an int for a float option too)."""
    if value is None:
        return False
    kinds = (int, float) if option.kind is float else option.kind
    if not isinstance(value, kinds) or (isinstance(value, bool) and option.kind is not bool):
        return False
    return option.choices is None or value in option.choices


def model_record(args, model, source) -> dict:
    """What for_v records to rebuild the model and its SNN: the flags of MODEL_FLAGS and
    LEVEL_FLAGS, the timm architecture built, the fc2 choice, and where the weights came from."""
    kwargs = list(args.model_kwargs) + [f"{k}={v!r}" for k, v in (getattr(args, "model_args", None) or {}).items()
                                        if not any(item.split("=", 1)[0].strip() == k for item in args.model_kwargs)]
    fc2 = fc2_thresholds(args, model)
    levels = {flag: getattr(args, flag) for flag in LEVEL_FLAGS}
    levels["fc2_thresholds"] = None if fc2 is None else [float(v) for v in fc2]
    record = {"model_kwargs": kwargs, "architecture": getattr(args, "architecture", None) or args.model,
              "input_size": args.input_size, "nb_classes": args.nb_classes, "levels": levels}
    if source is not None:
        record["weights"] = source
    return record


def calibration_record(args, transform: dict, images: int, classes=None) -> dict:
    """What for_v stores beside the thresholds: the images, transform and class names they were
    measured on, and the recorded conversion options."""
    data_path = None if args.data_set.upper() == "DIGITS" else (args.calib_data_path or args.eval_data_path)
    record = {"transform": transform, "data_set": args.data_set, "data_path": data_path,
              "split": "train" if args.calib_data_path else "evaluation", "images": images,
              "batches": args.calib_batches, "percent": args.percent, "model": args.model}
    if classes is not None:
        record["classes"] = list(classes)
    record.update(record_options(args))
    return record


def recorded_transform(args, extras: Mapping) -> None:
    """snn on a for_v checkpoint: the transform its thresholds were calibrated with is this run's
    when no transform flag is given (--data_config, --crop_pct, --mean/--std,
    --imagenet_default_mean_and_std, --input_size); given ones are checked against it instead
    (:func:`check_calibration_record`)."""
    record = _calibration(extras)
    transform = record.get("transform") if record else None
    if isinstance(transform, Mapping) and not (set(TRANSFORM_FLAGS) & given_flags(args)):
        import datasets
        if all(k in transform for k in datasets.TRANSFORM_KEYS):
            args.transform_record = dict(transform)


def check_calibration_record(args, extras: Mapping, transform: dict) -> None:
    """snn: refuse thresholds calibrated on images of another size or transform than this run's.
    A file with no record (the published scripts write none) gets one warning."""
    import datasets
    from utils import is_main_process
    record = _calibration(extras)
    if record is None or not isinstance(record.get("transform"), Mapping):
        if is_main_process():
            print(f"warning: {args.model_path} does not record the transform its thresholds were calibrated "
                  f"with (a file of the published scripts?); assuming this run's", file=sys.stderr)
        return
    recorded = record["transform"]
    if not datasets.same_transform(recorded, transform):
        raise UserError(
            f"the thresholds in {args.model_path} were calibrated on images made by: "
            f"{_describe_record(recorded)}; this run makes: {datasets.describe_transform(transform)}. "
            "Drop the transform flags (snn then uses the recorded transform), pass those of its for_v run, "
            "or calibrate again")


def _describe_record(record: Mapping) -> str:
    import datasets
    try:
        return datasets.describe_transform(record)
    except (KeyError, TypeError, ValueError, ZeroDivisionError):  # a record of another version
        return repr(dict(record))


# ============================================================================================
# The fc2 thresholds of a run (recorded by model_record)
# ============================================================================================
def fc2_thresholds(args, model):
    """The fixed fc2 thresholds of this run, or None for the calibrated ones. By default the
    published override (0.25, 0.08) where the published code applies it: a --model name that
    contains 'vit' (ECMT_SPEC 11; so not deit_* nor eva_g_patch14), and only for the models those
    thresholds were set for: a timm VisionTransformer with GELU MLPs (model_base's
    default_fc2_thresholds; not a rotary ViT, which timm builds as an Eva, nor a gated MLP, whose
    fc2 reads an element-wise product)."""
    from model_base import default_fc2_thresholds
    from model_vit import VIT_FC2_THRESHOLDS
    if getattr(args, "fc2_calibrated", False):
        return None
    if getattr(args, "fc2_thresholds", None) is not None:
        return tuple(args.fc2_thresholds)
    if getattr(args, "thresholds", None) == "channel":  # calibrated per channel, fc2 too (ECMT_SPEC 15)
        return None
    family_fits = model is None or default_fc2_thresholds(model) is not None
    return VIT_FC2_THRESHOLDS if "vit" in args.model and family_fits else None

