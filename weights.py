"""Everything about weights, in one place, for both entry scripts.

- **Reading a checkpoint** (:func:`read_checkpoint`): a torch.save file (``weights_only=True``,
  ``argparse.Namespace`` the only class allowed) or a safetensors file, recognised by content; its
  layout (``state_dict``/``model``/``model_state_dict``/``module`` wrappers, PyTorch Lightning
  files, a ``module.``/``model.``/``_orig_mod.`` prefix on every key) undone by one pure filter,
  :func:`clean_checkpoint`; the published scripts' placeholder names by another,
  :func:`convert_published_places`; BAAI's EVA-01 layout by ``model_eva.convert_baai_eva01``.
- **Pretrained weights** (:func:`load_pretrained`, ``--pretrained``/``--pretrained_file``): timm
  names and tags, ``hf_hub:org/name``, the published aliases, from the Hugging Face cache.
- **The architecture diagnosis** (:func:`check_architecture`): weights of another architecture
  than ``--model`` are refused with what differs and the flags that fit, read from the shapes;
  weights of another timm family (EVA/EVA-02, BEiT, Swin, DeiT distilled, CaiT, ResNet, ...) are
  recognised from their key names and a ``--model`` of that family is proposed, checked to load.
- **Position embeddings** (:func:`fit_pos_embed`, :func:`resample_pos_embed`): one made for
  another image size refused, or resampled with ``--resample_pos_embed``.
- **The record of for_v** (:func:`model_record`, :func:`calibration_record`,
  :func:`apply_record`, :func:`record_options` / :func:`restore_options`,
  :func:`check_calibration_record`): what rebuilds the model, the transform,
  the class names and the conversion options (``options.RECORDED_OPTIONS``) the thresholds were
  calibrated with, written by for_v and restored (or checked) by ann and snn.
- **The model** (:func:`build_model`): the convertible model of the command line with its
  weights loaded, used by ``run_class_finetuning.py`` and ``fintune_model.py``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import pickle
import re
import sys
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

import options
from cli_base import UserError, given_flags

__all__ = [
    "read_checkpoint", "load_checkpoint", "clean_checkpoint", "is_safetensors_header",
    "convert_published_places", "has_published_place_names", "load_model_weights",
    "HUB_PREFIX", "PUBLISHED_HUB_MODELS", "PUBLISHED_FILES", "PretrainedWeights", "load_pretrained",
    "is_hub_name", "load_weights",
    "read_architecture", "architecture_differences", "model_heads", "recognise_family",
    "check_architecture", "ARCHITECTURE_WORDS",
    "resample_pos_embed", "fit_pos_embed",
    "MODEL_FLAGS", "LEVEL_FLAGS", "model_record", "calibration_record", "apply_record", "record_options",
    "restore_options", "check_calibration_record", "recorded_transform",
    "create_model_of", "build_model", "fc2_thresholds", "THRESHOLD_KEYS",
]

THRESHOLD_KEYS = ("scale_p", "scale_n")


# ============================================================================================
# Reading a checkpoint
# ============================================================================================
#: Entries that hold the state dict in the training scripts people use: the published and
#: timm's ('model', 'state_dict'), PyTorch's tutorials ('model_state_dict'), DataParallel
#: wrappers ('module'), PyTorch Lightning ('state_dict'). The first that holds a mapping wins.
_WRAPPER_KEYS = ("model", "state_dict", "model_state_dict", "module")


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def _common_prefix(keys) -> str | None:
    """The first dotted component every key starts with ('module.', 'model.', '_orig_mod.', a
    Lightning module's attribute), or None. Never one that would leave a bare parameter name
    ('a.weight', 'a.bias' are a layer, not a wrapper)."""
    keys = list(keys)
    if not keys or not all("." in k for k in keys):
        return None
    first = keys[0].split(".", 1)[0] + "."
    if not all(k.startswith(first) for k in keys):
        return None
    if not any("." in k[len(first):] for k in keys):
        return None
    return first


def clean_checkpoint(obj) -> tuple[dict, dict, str]:
    """A loaded checkpoint -> (state dict, the entries beside it, the prefix stripped from every
    key ('' if none)). A pure function, like timm's ``clean_state_dict``: the wrappers of
    ``_WRAPPER_KEYS`` (nested ones too: ``{'model': {'module': sd}}``) are opened, and a prefix
    found on every key (``module.`` from DataParallel, ``_orig_mod.`` from torch.compile,
    ``model.`` from Lightning, several in a row) is stripped. The entries are those of the
    outermost wrapper (an ``argparse.Namespace`` among them becomes a dict). Raises ValueError
    when no state dict (name -> tensor) is found, naming what was."""
    extras: dict = {}
    for depth in range(4):
        if _is_state_dict(obj) or not isinstance(obj, Mapping):
            break
        key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            break
        if depth == 0:
            extras = {k: (vars(v) if isinstance(v, argparse.Namespace) else v)
                      for k, v in obj.items() if k != key}
        obj = obj[key]
    if not _is_state_dict(obj):
        raise ValueError(_describe(obj))
    state_dict, stripped = dict(obj), ""
    while (prefix := _common_prefix(state_dict)) is not None:
        state_dict = {k[len(prefix):]: v for k, v in state_dict.items()}
        stripped += prefix
    return state_dict, extras, stripped


def load_checkpoint(path) -> dict[str, torch.Tensor]:
    """The state dict of a checkpoint file (see :func:`read_checkpoint`)."""
    return read_checkpoint(path)[0]


def read_checkpoint(path, log: Callable[[str], None] | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, entries beside it) of a torch.save file (safely: weights_only=True) or a
    safetensors file (recognised by content, whatever the extension), on the CPU, through
    :func:`clean_checkpoint`; `log` gets one line naming a prefix stripped from every key.
    Besides tensors and plain values, ``argparse.Namespace`` is the one class a checkpoint may
    hold (the published scripts' 'args', ECMT_SPEC 11): anything else pickled is refused."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise UserError(f"checkpoint path is not a file: {path}")
    with open(path, "rb") as f:
        magic = f.read(9)
    if is_safetensors_header(magic):
        obj = _read_safetensors(path)
    else:
        # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (0x80).
        if not (magic.startswith(b"PK") or magic.startswith(b"\x80")):
            raise UserError(f"{path} is not a PyTorch checkpoint nor a safetensors file (neither a "
                            "torch.save zip archive, nor a legacy pickle, nor a safetensors header)")
        obj = _torch_load(path)
    try:
        state_dict, extras, stripped = clean_checkpoint(obj)
    except ValueError as err:
        raise UserError(f"checkpoint {path} does not hold a state dict (name -> tensor); found {err}") from None
    if stripped and log is not None:
        log(f"checkpoint {path}: stripped the prefix {stripped!r} found on every key")
    return state_dict, extras


def _torch_load(path: Path):
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        if "unsupported global" in str(err).lower():
            raise UserError(
                f"checkpoint {path} contains pickled Python objects besides tensors and an "
                "argparse.Namespace, and cannot be loaded safely; re-save only its state dict "
                "with torch.save(model.state_dict(), path)") from None
        raise UserError(f"{path} is not a PyTorch checkpoint ({_first_line(err)})") from None
    except Exception as err:  # torch reports truncated/foreign files with many exception types
        raise UserError(f"{path} is not a readable PyTorch checkpoint, or it is truncated "
                        f"({type(err).__name__}: {_first_line(err)})") from None


def is_safetensors_header(head: bytes) -> bool:
    """Whether a file starting with `head` (its first 9 bytes or more) is a safetensors file:
    an 8-byte little-endian header length, then the JSON header, which opens with '{'."""
    if len(head) < 9 or head[8:9] != b"{":
        return False
    return 0 < int.from_bytes(head[:8], "little") < 1 << 40


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file (recognised by its content, whatever its name)."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise UserError(f"{path} is a safetensors file: pip install safetensors to read it") from None
    try:
        state_dict = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise UserError(f"{path} is a safetensors file but cannot be read: it is truncated or "
                        f"damaged ({_first_line(err)})") from None
    if not state_dict:
        raise UserError(f"{path} is a safetensors file with no tensors")
    return state_dict


#: The published scripts' placeholder names (ECMT_SPEC 11) -> this toolkit's, per module kind.
PUBLISHED_PLACE_NAMES = {
    "attn": {"x_in_test": "place_fc_qkv", "q_out_test": "place_q", "k_out_test": "place_k",
             "v_out_test": "place_v", "attn_out_test": "place_s", "x_out_test": "place_fc_out"},
    "mlp": {"x1_in_test": "place_fc1", "x2_in_test": "place_fc2"},
}
_PUBLISHED_PLACE = re.compile(
    r"^(?P<parent>(?:.*\.)?(?P<kind>attn|mlp))\.(?P<name>[a-z0-9_]+_test)\.(?P<rest>.+)$")


def has_published_place_names(state_dict: Mapping[str, torch.Tensor]) -> bool:
    """Whether `state_dict` names its placeholders as the published scripts do."""
    return any(_published_place_key(k) is not None for k in state_dict)


def _published_place_key(key: str) -> str | None:
    match = _PUBLISHED_PLACE.match(key)
    if match is None:
        return None
    name = PUBLISHED_PLACE_NAMES[match["kind"]].get(match["name"])
    return None if name is None else f'{match["parent"]}.{name}.{match["rest"]}'


def convert_published_places(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename the published placeholders (`blocks.i.attn.x_in_test.scale_p`, ...) to this
    toolkit's (`blocks.i.attn.place_fc_qkv.scale_p`, ...); every other key is kept as it is.

    A pure state_dict -> state_dict function, like timm's checkpoint_filter_fn: the input is
    not modified, and the tensors are the same objects.
    """
    out = {}
    for key, value in state_dict.items():
        out[_published_place_key(key) or key] = value
    return out


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else "no details"


def _describe(obj) -> str:
    if isinstance(obj, Mapping):
        keys = list(obj)
        shown = ", ".join(repr(k) for k in keys[:5]) + (", ..." if len(keys) > 5 else "")
        return f"a {type(obj).__name__} with keys [{shown}]" if keys else "an empty dict"
    return f"a {type(obj).__name__}"


def _ignore_predicate(ignore) -> Callable[[str], bool]:
    if callable(ignore):
        return ignore
    if isinstance(ignore, str):  # a lone suffix, not a collection of characters
        ignore = (ignore,)
    suffixes = tuple(ignore)
    return lambda key: key.endswith(suffixes) if suffixes else False


def _listing(title: str, items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    more = f", ... ({len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)} {title}: {shown}{more}"


def _takes_threshold_shape(model: torch.nn.Module, key: str) -> bool:
    """Whether `key` is a threshold of a calibrating placeholder (which adopts a loaded shape)."""
    from trans_utils import TestNeuron
    owner = model.get_submodule(key.rsplit(".", 1)[0]) if "." in key else model
    return isinstance(owner, TestNeuron)


def load_model_weights(model: torch.nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                       ignore: Callable[[str], bool] | Collection[str] = ()) -> None:
    """Load `state_dict` into `model` strictly, explaining any mismatch in one UserError.

    `ignore` is a predicate on key names, or a collection of key suffixes (e.g.
    ('scale_p', 'scale_n')). Matching keys are dropped from the checkpoint, and matching keys
    of the model are not required: they keep the values the model already has.
    """
    skip = _ignore_predicate(ignore)
    checkpoint = {k: v for k, v in state_dict.items() if not skip(k)}
    expected = {k: v for k, v in model.state_dict().items() if not skip(k)}

    missing = [k for k in expected if k not in checkpoint]
    unexpected = [k for k in checkpoint if k not in expected]
    # A calibrating placeholder's thresholds take the checkpoint's shape (one pair, or one per
    # channel: ECMT_SPEC 15); every other tensor must fit as it is.
    mismatched = [k for k in checkpoint
                  if k in expected and checkpoint[k].shape != expected[k].shape
                  and not (k.endswith(THRESHOLD_KEYS) and _takes_threshold_shape(model, k))]
    if missing or unexpected or mismatched:
        problems = []
        head = _classifier_name(model) + ".weight"
        if (head in mismatched and checkpoint[head].ndim == expected[head].ndim == 2
                and checkpoint[head].shape[0] != expected[head].shape[0]):
            problems.append(f"checkpoint has {checkpoint[head].shape[0]} classes, "
                            f"--nb_classes is {expected[head].shape[0]}")
        if ("pos_embed" in mismatched and checkpoint["pos_embed"].ndim == 3
                and checkpoint["pos_embed"].shape[1] != expected["pos_embed"].shape[1]):
            problems.append("pos_embed differs (was the checkpoint trained at another "
                            "--input_size or patch size?)")
        prefix = _prefix_of_missing(missing, unexpected)
        if prefix:
            problems.append(f"every missing key is in the checkpoint under the prefix {prefix!r}, beside "
                            "other entries: save only the model's part, "
                            f"{{k[{len(prefix)}:]: v for k, v in sd.items() if k.startswith({prefix!r})}}")
        if missing:
            problems.append(_listing("missing keys", missing))
        if unexpected:
            problems.append(_listing("unexpected keys", unexpected))
        if mismatched:
            shapes = [f"{k}: checkpoint {tuple(checkpoint[k].shape)} vs model "
                      f"{tuple(expected[k].shape)}" for k in mismatched]
            problems.append(_listing("shape mismatches", shapes))
        raise UserError("checkpoint does not match the model: " + "; ".join(problems))
    # Keys the model has but `ignore` excused are the only ones allowed to stay missing.
    model.load_state_dict(checkpoint, strict=False)


def _classifier_name(model: torch.nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    name = cfg.get("classifier", "head") if isinstance(cfg, Mapping) else "head"
    return name if isinstance(name, str) else "head"


def _prefix_of_missing(missing: list, unexpected: list) -> str | None:
    """The prefix under which the checkpoint holds every key the model misses (a Lightning module
    whose model is one attribute among others, e.g. 'model.' beside 'loss_fn.'), or None."""
    if not missing or not unexpected:
        return None
    have = set(unexpected)
    for key in unexpected:
        if key.endswith("." + missing[0]):
            prefix = key[:-len(missing[0])]
            if all(prefix + k in have for k in missing):
                return prefix
    return None


# ============================================================================================
# Pretrained weights (--pretrained, --pretrained_file)
# ============================================================================================
# Three sources, each giving a state dict in timm's keys for the model the command line builds:
# a timm name, with or without a tag (timm's pretrained config says which hub repository or URL
# holds the weights); a hub repository, ``hf_hub:org/name`` (its ``config.json``, timm's format,
# names the architecture, class count, model arguments and data config; its model.safetensors or
# pytorch_model.bin holds the weights; the published aliases stand for the published README's hub
# models, ``eva_g_patch14`` for BAAI's file in ``BAAI/EVA``); a local file (--pretrained_file).
# Files come from the Hugging Face cache ($HF_HOME/hub): fetched once with a network, read from
# the cache afterwards, also with HF_HUB_OFFLINE=1. The state dict goes through timm's own
# pretrained loading so that timm's filter functions apply (key renames of older layouts).
HUB_PREFIX = "hf_hub:"
#: The published README's models that live on the hub under another name.
PUBLISHED_HUB_MODELS = {
    "vit_base_patch16_224_cifar10": "edadaltocg/vit_base_patch16_224_in21k_ft_cifar10",
    "vit_base_patch16_224_cifar100": "edadaltocg/vit_base_patch16_224_in21k_ft_cifar100",
}
#: Published models whose weights are one file of a hub repository that is not a timm model.
PUBLISHED_FILES = {"eva_g_patch14": ("BAAI/EVA", "eva_21k_1k_336px_psz14_ema_89p6.pt")}
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


@dataclass
class PretrainedWeights:
    """Weights in timm's keys and what their source says about the model they belong to."""
    state_dict: dict
    architecture: str                 # the timm model to build (no tag, no hf_hub:)
    model_args: dict = field(default_factory=dict)   # architecture arguments fixed by the source
    num_classes: int | None = None
    input_size: int | None = None
    pretrained_cfg: dict = field(default_factory=dict)  # timm's data config (mean, std, crop_pct)
    source: dict = field(default_factory=dict)        # provenance, recorded in the outputs


def is_hub_name(name: str) -> bool:
    return name.startswith(HUB_PREFIX)


def load_pretrained(model_name: str, model_kwargs: dict | None = None, *,
                    file: str | None = None) -> PretrainedWeights:
    """The pretrained weights of `model_name` (timm name, tag, alias or ``hf_hub:org/name``),
    or of the local `file` for that model. Raises UserError for anything the user can fix."""
    from model_base import resolve_model_name

    model_kwargs = dict(model_kwargs or {})
    if file is not None:
        if is_hub_name(model_name):
            raise UserError("--pretrained_file reads a local file for a timm --model name; "
                            f"{model_name} names a hub repository: pass --pretrained instead")
        base, _ = resolve_model_name(model_name)
        state_dict = load_checkpoint(file)
        return _through_timm(base, state_dict, {}, model_kwargs, {},
                             {"kind": "file", "path": str(file)})
    if model_name in PUBLISHED_FILES:
        repo, filename = PUBLISHED_FILES[model_name]
        path, revision = _hub_file(repo, filename, model_name)
        state_dict = load_checkpoint(path)
        base, _ = resolve_model_name(model_name)
        arch = read_architecture(state_dict)
        size = _input_size(arch)
        return PretrainedWeights(state_dict, base, num_classes=arch.get("num_classes"), input_size=size,
                                 source={"kind": "hf-hub", "id": repo, "file": filename,
                                         "revision": revision, "path": str(path)})
    hub_id = model_name[len(HUB_PREFIX):] if is_hub_name(model_name) else PUBLISHED_HUB_MODELS.get(model_name)
    if hub_id:
        return _from_hub_repository(hub_id, model_name, model_kwargs)
    return _from_timm_name(model_name, model_kwargs)


# --------------------------------------------------------------------------------------------
def _from_hub_repository(hub_id: str, model_name: str, model_kwargs: dict) -> PretrainedWeights:
    config_path, revision = _hub_file(hub_id, "config.json", model_name, not_timm=True)
    try:
        config = json.loads(Path(config_path).read_text())
    except (OSError, ValueError) as err:
        raise UserError(f"the config.json of {HUB_PREFIX}{hub_id} cannot be read: {err}") from None
    if not isinstance(config, dict) or not isinstance(config.get("architecture"), str):
        kind = ""
        if isinstance(config, dict) and ("architectures" in config or "model_type" in config):
            kind = " (it is a transformers model: its config.json names 'architectures'/'model_type')"
        raise UserError(f"{HUB_PREFIX}{hub_id} is not a timm model: its config.json has no "
                        f"'architecture'{kind}; pass a timm model, or its weights with --model_path")
    pretrained_cfg = dict(config.get("pretrained_cfg") or {k: v for k, v in config.items()
                                                            if k not in ("architecture", "model_args")})
    if "num_classes" in config:
        pretrained_cfg["num_classes"] = config["num_classes"]
    model_args = dict(config.get("model_args") or {})
    # The class count and image size are the command line's (--nb_classes, --input_size).
    for key in ("num_classes", "img_size"):
        value = model_args.pop(key, None)
        if key == "img_size" and value is not None and not pretrained_cfg.get("input_size"):
            pretrained_cfg["input_size"] = [3, *(value if isinstance(value, (list, tuple)) else (value, value))]
    path, filename, revision = _hub_weights(hub_id, model_name, revision)
    state_dict = load_checkpoint(path)
    source = {"kind": "hf-hub", "id": hub_id, "revision": revision, "file": filename, "path": str(path)}
    return _through_timm(config["architecture"], state_dict, pretrained_cfg, model_kwargs, model_args, source)


def _from_timm_name(model_name: str, model_kwargs: dict) -> PretrainedWeights:
    import timm
    from model_base import resolve_model_name

    base, fixed = resolve_model_name(model_name)
    if fixed:  # a published *_cifar10 name without published weights
        raise UserError(f"--model {model_name} has no published weights: fine-tune them with "
                        f"fintune_model.py --model {model_name} --pretrained (from {base}'s), then pass "
                        "the result with --model_path")
    if not timm.is_model(base):
        raise UserError(f"unknown model {model_name!r}: not a timm model name, a published alias, "
                        f"nor {HUB_PREFIX}org/name")
    cfg = timm.models.get_pretrained_cfg(base)  # a tag names its weights; no tag: timm's default
    if cfg is None or not (cfg.hf_hub_id or cfg.url):
        tags = timm.list_pretrained(base.split(".")[0] + ".*")
        known = f"; its pretrained tags: {', '.join(tags[:8])}" if tags else "; timm has none for it"
        raise UserError(f"timm has no pretrained weights for {model_name}{known}")
    name = f"{cfg.architecture}.{cfg.tag}" if cfg.tag else cfg.architecture
    source = {"kind": "timm", "name": name}
    if cfg.hf_hub_id:
        hub_id = cfg.hf_hub_id
        path, filename, revision = _hub_weights(hub_id, model_name, None, cfg.hf_hub_filename)
        source.update({"id": hub_id, "revision": revision, "file": filename, "path": str(path)})
        state_dict = load_checkpoint(path)
    else:
        state_dict = _from_url(cfg.url, model_name)
        source.update({"url": cfg.url})
    return _through_timm(name, state_dict, cfg.to_dict(), model_kwargs, {}, source)


def _from_url(url: str, model_name: str) -> dict:
    """A timm weight file published at a URL (older models), from torch's hub cache."""
    import torch
    from urllib.parse import urlparse

    cached = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(url).path)
    if not cached.is_file():
        if _offline():
            raise UserError(f"no cached copy of the weights of {model_name} ({cached}) and "
                            f"HF_HUB_OFFLINE=1 is set: fetch {url} once on a machine with internet "
                            "(into that file), or pass --model_path")
        try:
            torch.hub.download_url_to_file(url, str(cached), progress=False)
        except (OSError, ValueError) as err:
            raise UserError(f"no network and no cached copy of the weights of {model_name}: {url} "
                            f"could not be fetched ({err}); looked for {cached}; fetch it once on a "
                            "machine with internet, or pass --model_path") from None
    if cached.suffix == ".npz":
        raise UserError(f"the weights of {model_name} are a JAX .npz file ({cached}); pick a tag "
                        "timm publishes on the hub, or pass a converted file with --model_path")
    return load_checkpoint(cached)


def _through_timm(architecture: str, state_dict: dict, pretrained_cfg: dict, model_kwargs: dict,
                  model_args: dict, source: dict) -> PretrainedWeights:
    """timm's pretrained loading of `state_dict` into a plain model of its own size and class
    count (filter functions applied), and that model's state dict."""
    import timm

    base = architecture.split(".")[0]
    arch = read_architecture(state_dict)
    num_classes = arch.get("num_classes", pretrained_cfg.get("num_classes"))
    size = _input_size(arch)
    if size is None and pretrained_cfg.get("input_size"):
        size = int(pretrained_cfg["input_size"][-1])
    kwargs = {**model_args, **{k: v for k, v in model_kwargs.items() if k not in ("num_classes", "img_size")}}
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if size is not None:
        kwargs["img_size"] = size
    overlay = {"state_dict": state_dict, "custom_load": False, "file": None, "url": None,
               "hf_hub_id": None, "source": None}
    if num_classes is not None:
        overlay["num_classes"] = num_classes
    try:
        plain = timm.create_model(architecture, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, KeyError, TypeError, ValueError, AssertionError):
        # Another architecture than the model's: the caller's diagnosis names what differs.
        plain = None
    weights = ({k: v.detach() for k, v in plain.state_dict().items()} if plain is not None else state_dict)
    cfg = dict(pretrained_cfg)
    for key in ("state_dict", "file"):
        cfg.pop(key, None)
    return PretrainedWeights(weights, base, model_args, num_classes, size, cfg, source)


def _input_size(arch: dict) -> int | None:
    """The image size a state dict's position embedding was made for (grid x patch), if readable."""
    grid, patch = arch.get("grid"), arch.get("patch_size")
    if grid is None or patch is None:
        return None
    return grid * (patch if isinstance(patch, int) else patch[0])


# The Hugging Face cache
def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "on", "yes", "true")


def _cache_folder(repo: str) -> str:
    from huggingface_hub import constants
    return os.path.join(constants.HF_HUB_CACHE, "models--" + repo.replace("/", "--"))


class _NotInRepository(Exception):
    pass


def _hub_file(repo: str, filename: str, model_name: str, not_timm: bool = False,
              revision: str | None = None) -> tuple[Path, str]:
    """A file of a hub repository from the cache (fetched once when there is a network):
    (its path, the commit it belongs to)."""
    try:
        return _download(repo, filename, revision)
    except _NotInRepository:
        if not_timm:
            raise UserError(f"{HUB_PREFIX}{repo} is not a timm model: the repository has no {filename}; "
                            "pass a timm model, or its weights with --model_path") from None
        raise UserError(f"the hub repository {repo} has no file {filename}") from None
    except _Missing as missing:
        raise UserError(_missing_message(repo, [filename], model_name, missing.reason)) from None


class _Missing(Exception):
    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _download(repo: str, filename: str, revision: str | None) -> tuple[Path, str]:
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, LocalEntryNotFoundError,
                                            RepositoryNotFoundError, RevisionNotFoundError)
    except ImportError:
        raise UserError("--pretrained needs huggingface_hub: pip install huggingface_hub") from None
    try:
        path = Path(hf_hub_download(repo, filename, revision=revision))
    except LocalEntryNotFoundError as err:
        raise _Missing(str(err).splitlines()[0] if str(err) else "not cached") from None
    except EntryNotFoundError:
        raise _NotInRepository() from None
    except GatedRepoError:
        raise UserError(f"the hub repository {repo} is gated: accept its terms on huggingface.co and "
                        "log in (huggingface-cli login), or pass the weights with --model_path") from None
    except RepositoryNotFoundError:
        raise UserError(f"no hub repository {repo} (or it is private): check the name") from None
    except RevisionNotFoundError:
        raise UserError(f"the hub repository {repo} has no revision {revision}") from None
    except (OSError, ValueError) as err:  # network errors the hub client does not map to the cache
        raise _Missing(f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}") from None
    return path, path.parent.name  # .../snapshots/<commit>/<filename>


def _hub_weights(repo: str, model_name: str, revision: str | None,
                 filename: str | None = None) -> tuple[Path, str, str]:
    """The weight file of a hub repository: `filename`, or model.safetensors, else
    pytorch_model.bin (timm's order); (path, file name, commit)."""
    candidates = (filename,) if filename else _WEIGHT_FILES
    missing = None
    absent = []
    for name in candidates:
        try:
            path, commit = _download(repo, name, revision)
            return path, name, commit
        except _Missing as err:
            missing = err
        except _NotInRepository:
            absent.append(name)
    if missing is not None:
        raise UserError(_missing_message(repo, list(candidates), model_name, missing.reason))
    raise UserError(f"{HUB_PREFIX}{repo} is not a timm model: it has none of {', '.join(absent)}; "
                    "pass its weights with --model_path")


def _missing_message(repo: str, files: list, model_name: str, reason: str) -> str:
    looked = " or ".join(files)
    where = _cache_folder(repo)
    why = ("HF_HUB_OFFLINE=1 is set, so the hub was not asked" if _offline()
           else f"the hub could not be reached ({reason})" if reason else "the hub could not be reached")
    return (f"no network and no cached copy of {looked} of {repo} (for --model {model_name}; looked in "
            f"{where}; {why}): run the same command once on a machine with internet (it is then "
            "cached under $HF_HOME/hub and read offline afterwards), or download the weights and pass "
            "--model_path FILE")
# ============================================================================================
# The architecture diagnosis
# ============================================================================================
_BLOCK_INDEX = re.compile(r"^blocks\.(\d+)\.")


def read_architecture(state_dict: Mapping[str, torch.Tensor], classifier: str = "head",
                      prefix_tokens: int = 1) -> dict:
    """What the shapes of a ViT/EVA state dict (timm's keys) say about its architecture:
    embed_dim, depth, mlp_ratio, patch_size, num_classes, grid (the side of the square grid
    of patch positions), and num_heads where the weights tell it (q/k norms have the width of
    one head; otherwise heads leave no trace in the shapes). Only what is readable is set."""
    arch: dict = {}
    patch = state_dict.get("patch_embed.proj.weight")
    if patch is not None and patch.ndim == 4:
        arch["embed_dim"] = int(patch.shape[0])
        ph, pw = int(patch.shape[2]), int(patch.shape[3])
        arch["patch_size"] = ph if ph == pw else (ph, pw)
    elif state_dict.get("cls_token") is not None:
        arch["embed_dim"] = int(state_dict["cls_token"].shape[-1])
    blocks = {int(m.group(1)) for k in state_dict if (m := _BLOCK_INDEX.match(k))}
    if blocks:
        arch["depth"] = max(blocks) + 1
    width = arch.get("embed_dim")
    hidden = next((state_dict[k] for k in ("blocks.0.mlp.fc1.weight", "blocks.0.mlp.fc1_g.weight")
                   if k in state_dict), None)
    if hidden is not None and hidden.ndim == 2 and width:
        arch["mlp_ratio"] = round(int(hidden.shape[0]) / width, 4)
    q_norm = state_dict.get("blocks.0.attn.q_norm.weight")
    if q_norm is not None and q_norm.ndim == 1 and width and width % int(q_norm.shape[0]) == 0:
        arch["num_heads"] = width // int(q_norm.shape[0])
    head = state_dict.get(f"{classifier}.weight")
    if head is not None and head.ndim == 2:
        arch["num_classes"] = int(head.shape[0])
    pos = state_dict.get("pos_embed")
    if pos is not None and pos.ndim == 3:
        tokens = int(pos.shape[1]) - prefix_tokens
        side = math.isqrt(max(tokens, 0))
        if side * side == tokens and side > 0:
            arch["grid"] = side
    return arch


#: The names of read_architecture's entries in a message.
ARCHITECTURE_WORDS = {"embed_dim": "width (embed_dim)", "depth": "depth", "num_heads": "heads",
                      "mlp_ratio": "MLP ratio", "patch_size": "patch size", "num_classes": "class count",
                      "grid": "grid of patch positions"}


def architecture_differences(checkpoint: Mapping[str, torch.Tensor], model: torch.nn.Module,
                             prefix_tokens: int = 1) -> dict:
    """{entry: (checkpoint's value, model's value)} for each read_architecture entry that both
    have and that differs (heads: the model's own count where the checkpoint's is readable)."""
    classifier = _classifier_name(model)
    theirs = read_architecture(checkpoint, classifier, prefix_tokens)
    ours = read_architecture(model.state_dict(), classifier, prefix_tokens)
    heads = model_heads(model)
    if heads is not None:
        ours["num_heads"] = heads
    return {k: (theirs[k], ours[k]) for k in ARCHITECTURE_WORDS
            if k in theirs and k in ours and theirs[k] != ours[k]}


def model_heads(model: torch.nn.Module) -> int | None:
    for module in model.modules():
        heads = getattr(module, "num_heads", None)
        if isinstance(heads, int) and (hasattr(module, "qkv") or hasattr(module, "q_proj")):
            return heads
    return None




def _has(keys, *names) -> bool:
    return any(name in keys for name in names)


def _starts(keys, prefix: str) -> bool:
    return any(k.startswith(prefix) for k in keys)


#: timm families recognised from key names, in the order they are tested (the first that matches
#: wins): (name in words, test on the state dict, the key shown as evidence, timm models to try).
_FAMILIES = (
    ("Swin Transformer", lambda k: _starts(k, "layers.0.blocks.0.attn.relative_position_bias_table"),
     ("layers.0.blocks.0.attn.relative_position_bias_table",), ("swin_tiny_patch4_window7_224",)),
    ("BEiT", lambda k: _has(k, "blocks.0.attn.relative_position_bias_table",
                            "rel_pos_bias.relative_position_bias_table"),
     ("blocks.0.attn.relative_position_bias_table", "rel_pos_bias.relative_position_bias_table"),
     ("beit_base_patch16_224",)),
    ("CaiT", lambda k: _starts(k, "blocks_token_only."), ("blocks_token_only.0.attn.q.weight",),
     ("cait_xxs24_224",)),
    ("DeiT distilled", lambda k: "dist_token" in k, ("dist_token",), ("deit_tiny_distilled_patch16_224",)),
    ("EVA-02", lambda k: _has(k, "blocks.0.mlp.fc1_g.weight", "blocks.0.attn.q_proj.weight",
                              "blocks.0.mlp.norm.weight") or ("blocks.0.attn.q_bias" in k and _glu_ratio(k)),
     ("blocks.0.mlp.fc1_g.weight", "blocks.0.attn.q_proj.weight", "blocks.0.attn.q_bias"),
     ("eva02_tiny_patch14_224", "eva02_base_patch14_224")),
    ("EVA-01", lambda k: "blocks.0.attn.q_bias" in k, ("blocks.0.attn.q_bias",), ("eva_giant_patch14_224",)),
    ("ViT", lambda k: "blocks.0.attn.qkv.weight" in k and _has(k, "cls_token", "pos_embed"),
     ("blocks.0.attn.qkv.weight",), ("vit_tiny_patch16_224",)),
    ("ResNet", lambda k: _has(k, "layer1.0.conv1.weight") and "fc.weight" in k, ("layer1.0.conv1.weight",),
     ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")),
    ("convolutional network", lambda k: not any(".attn." in x or ".attention." in x for x in k)
     and _starts_any(k, ("stages.", "stem.", "conv_stem.", "features.", "layer1.")), (), ()),
)
#: Families that are no transformers: ECMT converts transformers only.
_NOT_TRANSFORMERS = ("ResNet", "convolutional network")


def _starts_any(keys, prefixes) -> bool:
    return any(k.startswith(prefixes) for k in keys)


def _glu_ratio(sd) -> bool:
    """Whether the MLP packs a gated unit's two halves in one fc1 (timm's GluMlp, EVA-02 tiny and
    small): fc2 reads half of fc1's outputs; EVA-01's plain MLP reads them all."""
    fc1, fc2 = sd.get("blocks.0.mlp.fc1.weight"), sd.get("blocks.0.mlp.fc2.weight")
    return (fc1 is not None and fc2 is not None and fc1.ndim == fc2.ndim == 2
            and int(fc1.shape[0]) == 2 * int(fc2.shape[1]))


def recognise_family(state_dict: Mapping[str, torch.Tensor]) -> tuple[str, str, tuple] | None:
    """(family in words, the key that shows it, timm models of that family to try) of a state dict
    in timm's keys, from its key names; None if none is recognised."""
    for name, test, evidence, candidates in _FAMILIES:
        if test(state_dict):
            return name, next((k for k in evidence if k in state_dict), ""), candidates
    return None


def _meta_shapes(name: str, kwargs: dict) -> dict | None:
    """{key: shape} of timm's model `name` built with `kwargs` on the meta device (no memory, no
    weights), or None if timm cannot build it so."""
    import timm
    try:
        with torch.device("meta"):
            model = timm.create_model(name, pretrained=False, **kwargs)
    except Exception:  # timm refuses a combination with many exception types
        return None
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _grid(tokens: int, prefixes=(1, 0, 2)) -> int | None:
    for prefix in prefixes:
        side = math.isqrt(max(tokens - prefix, 0))
        if side > 0 and side * side == tokens - prefix:
            return side
    return None


def _variants(name: str, sd: Mapping[str, torch.Tensor], heads_hint: int | None) -> list[dict]:
    """Keyword arguments of `name` that may fit `sd`, read from its shapes (tried in order)."""
    if name.startswith("resnet"):
        return [{}]
    if name.startswith("swin"):
        stages = sorted({int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))})
        depths = tuple(1 + max(int(m.group(1)) for k in sd if (m := re.match(rf"layers\.{s}\.blocks\.(\d+)\.", k)))
                       for s in stages)
        heads = tuple(int(sd[f"layers.{s}.blocks.0.attn.relative_position_bias_table"].shape[1]) for s in stages)
        table = int(sd["layers.0.blocks.0.attn.relative_position_bias_table"].shape[0])
        window = (math.isqrt(table) + 1) // 2
        proj = sd["patch_embed.proj.weight"]
        fc1 = sd["layers.0.blocks.0.mlp.fc1.weight"]
        return [{"patch_size": int(proj.shape[-1]), "embed_dim": int(proj.shape[0]), "depths": depths,
                 "num_heads": heads, "window_size": window,
                 "mlp_ratio": round(fc1.shape[0] / proj.shape[0], 4)}]
    arch = read_architecture(sd)
    width, patch = arch.get("embed_dim"), arch.get("patch_size")
    if width is None or patch is None:
        return []
    base = {"patch_size": patch, "embed_dim": width, "depth": arch.get("depth", 1)}
    heads = arch.get("num_heads")
    if name.startswith("beit"):
        table = next((sd[k] for k in ("blocks.0.attn.relative_position_bias_table",
                                      "rel_pos_bias.relative_position_bias_table") if k in sd), None)
        heads = int(table.shape[1]) if table is not None else heads
    if name.startswith("cait"):
        heads = int(sd["blocks.0.attn.proj_l.weight"].shape[0])
        base["depth_token_only"] = 1 + max(int(m.group(1)) for k in sd
                                           if (m := re.match(r"blocks_token_only\.(\d+)\.", k)))
    if heads is None:
        heads = heads_hint if heads_hint and width % heads_hint == 0 else max(1, width // 64)
    base["num_heads"] = heads
    ratios = _mlp_ratios(sd, width) or [None]
    extras = [{}]
    if name.startswith("beit") and "rel_pos_bias.relative_position_bias_table" in sd:
        extras = [{"use_shared_rel_pos_bias": True, "use_rel_pos_bias": False}]
    if name.startswith("vit"):
        extras = [{}, {"global_pool": "avg", "fc_norm": True}]
    return [{**base, **({"mlp_ratio": r} if r else {}), **extra} for r in ratios for extra in extras]


def _mlp_ratios(sd: Mapping[str, torch.Tensor], width: int) -> list:
    """MLP ratios that give the hidden widths of `sd` (fc2's input; a packed GluMlp's fc1 is twice
    that), as printed (6 digits) and with half a unit more where int(width * ratio) rounds down."""
    hidden = [int(sd[k].shape[d]) for k, d in (("blocks.0.mlp.fc2.weight", 1), ("blocks.0.mlp.fc1.weight", 0),
                                                 ("blocks.0.mlp.fc1_g.weight", 0)) if k in sd and sd[k].ndim == 2]
    ratios = []
    for h in hidden:
        for value in (h / width, (h + 0.5) / width):
            value = float(f"{value:g}")
            if value not in ratios:
                ratios.append(value)
    return ratios


def _image_size(name: str, sd: Mapping[str, torch.Tensor], kwargs: dict, input_size: int) -> int:
    """The image size the weights were made for, where they show it; else the run's."""
    patch = kwargs.get("patch_size")
    if name.startswith("beit"):
        table = next((sd[k] for k in ("blocks.0.attn.relative_position_bias_table",
                                      "rel_pos_bias.relative_position_bias_table") if k in sd), None)
        if table is not None and patch:
            side = (math.isqrt(int(table.shape[0]) - 3) + 1) // 2
            return side * patch
    pos = sd.get("pos_embed")
    if pos is not None and pos.ndim == 3 and patch:
        prefixes = (0,) if name.startswith("cait") else (2, 1, 0) if "dist_token" in sd else (1, 0)
        grid = _grid(int(pos.shape[1]), prefixes)
        if grid:
            return grid * patch
    return input_size


def _classes(sd: Mapping[str, torch.Tensor]) -> int | None:
    for key in ("head.weight", "head.fc.weight", "fc.weight"):
        if key in sd and sd[key].ndim == 2:
            return int(sd[key].shape[0])
    return None


def propose_model(state_dict: Mapping[str, torch.Tensor], candidates, input_size: int,
                  heads_hint: int | None = None):
    """(timm name, kwargs, input size, class count) of the first candidate model whose state dict
    has exactly the keys and shapes of `state_dict`, or None."""
    wanted = {k: tuple(v.shape) for k, v in state_dict.items()}
    classes = _classes(state_dict)
    for name in candidates:
        for kwargs in _variants(name, state_dict, heads_hint):
            size = _image_size(name, state_dict, kwargs, input_size)
            for size in dict.fromkeys((size, 224) if name.startswith("swin") else (size,)):
                built = dict(kwargs, num_classes=classes if classes is not None else 0)
                if not name.startswith("resnet"):
                    built["img_size"] = size
                if _meta_shapes(name, built) == wanted:
                    return name, kwargs, size, classes
    return None


def _kwarg_text(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value).replace(" ", "")


def _family_mismatch(model, state_dict, args) -> str | None:
    """The error for weights of another timm family than the model's, or None where the families
    are the same or the weights' is not recognised (then the shapes are compared)."""
    theirs = recognise_family(state_dict)
    if theirs is None:
        return None
    ours = recognise_family(model.state_dict())
    if ours is not None and ours[0] == theirs[0]:
        return None
    family, evidence, candidates = theirs
    what = family if family in _NOT_TRANSFORMERS else f"{family} model"
    head = (f"{weights_label(args)} holds the weights of {_article(what)} {what}"
            + (f" (keys such as {evidence})" if evidence else "")
            + f", not of --model {args.model}" + (f" ({_article(ours[0])} {ours[0]})" if ours else ""))
    if not candidates:
        return head + ", and is no transformer: ECMT converts Vision Transformers (ViT, DeiT, EVA)"
    found = propose_model(state_dict, candidates, args.input_size, model_heads(model))
    if found is None:
        return (head + f": pass --model {candidates[0]} with the --model_kwargs of its training (no "
                "arguments of that model fit these shapes)")
    name, kwargs, size, classes = found
    flags = f"--model {name}"
    if kwargs:
        flags += " --model_kwargs " + " ".join(f"{k}={_kwarg_text(v)}" for k, v in kwargs.items())
    if not name.startswith("resnet") and size != args.input_size:
        flags += f" --input_size {size}"
    if classes is not None and classes != args.nb_classes:
        flags += f" --nb_classes {classes}"
    text = head + f"; it fits {flags}"
    arch = read_architecture(state_dict)
    if "num_heads" in kwargs and "num_heads" not in arch and not name.startswith(("beit", "cait", "swin")):
        text += " (the heads do not show in the weights: use the count the checkpoint was trained with)"
    reason = _unconvertible(name, kwargs, size, classes)
    if reason and family in _NOT_TRANSFORMERS:
        text += f"; a {family} is no transformer: --test_mode ann evaluates it, ECMT (for_v, snn) does not convert it"
    elif reason:
        text += (f"; ECMT cannot convert {family} models yet: --test_mode ann evaluates it, for_v and snn "
                 "refuse it")
    return text


def _article(word: str) -> str:
    return "an" if word[:1].upper() in "AEIOU" else "a"


def _unconvertible(name: str, kwargs: dict, size: int, classes) -> str | None:
    from model_base import create_model, unconvertible_reason
    built = dict(kwargs, num_classes=classes or 0)
    if not name.startswith("resnet"):
        built["img_size"] = size
    try:
        with torch.device("meta"):
            return unconvertible_reason(create_model(name, allow_unconvertible=True, **built))
    except Exception as err:  # noqa: BLE001 - a refusal is a reason too
        return str(err)


def weights_label(args) -> str:
    """How messages name the weights of this run."""
    if getattr(args, "pretrained_file", None):
        return args.pretrained_file
    if getattr(args, "pretrained", False):
        return f"the pretrained weights of {args.model}"
    return str(args.model_path)


def check_architecture(model, state_dict, args) -> None:
    """Refuse weights of another architecture than the model, saying what fits. Weights of
    another timm family (from their key names): a --model of that family with the --model_kwargs
    that load them (checked by building it), and whether ECMT converts it. The same family:
    what differs, read from the shapes (width, depth, heads, MLP ratio, patch size, class count,
    grid), and the flags that would fit. A grid alone (another --input_size) or a class count
    alone keep their own messages."""
    other_family = _family_mismatch(model, state_dict, args)
    if other_family is not None:
        raise UserError(other_family)
    differences = architecture_differences(state_dict, model, _pos_embed_prefix(model))
    structural = set(differences) - {"num_classes", "grid"}
    if not structural:
        return
    parts = [f"{ARCHITECTURE_WORDS[k]} {theirs} (the model: {ours})" for k, (theirs, ours) in differences.items()]
    from utils import parse_model_kwargs
    kwargs = dict(parse_model_kwargs(args.model_kwargs))
    items = dict(item.split("=", 1) for item in args.model_kwargs)
    for key in ("patch_size", "embed_dim", "depth", "mlp_ratio"):
        if key in differences:
            items[key] = _kwarg_text(differences[key][0])
    width = differences.get("embed_dim", (None,))[0]
    heads_note = ""
    if "num_heads" in differences:
        items["num_heads"] = str(differences["num_heads"][0])
    elif width is not None:
        heads = kwargs.get("num_heads") or model_heads(model)
        if heads and width % heads == 0:
            items["num_heads"] = str(heads)
            heads_note = (f" (the heads do not show in the weights: {heads} is the model's; use the count the "
                          "checkpoint was trained with)")
        else:
            items["num_heads"] = "?"
            heads_note = (" (the heads do not show in the weights: pick the count the checkpoint was trained "
                          f"with, one that divides {width})")
    flags = "--model_kwargs " + " ".join(f"{k}={v}" for k, v in items.items())
    patch = differences.get("patch_size", (None,))[0] or getattr(model.patch_embed, "patch_size", (None,))[0]
    patch = patch[0] if isinstance(patch, tuple) else patch
    if "grid" in differences and patch and differences["grid"][0] * patch != args.input_size:
        flags += f" --input_size {differences['grid'][0] * patch}"
    if "num_classes" in differences:
        flags += f" --nb_classes {differences['num_classes'][0]}"
    raise UserError(f"{weights_label(args)} is another architecture than --model {args.model}: "
                    + ", ".join(parts) + f"; it fits {flags}{heads_note}")


# ============================================================================================
# Position embeddings made for another image size
# ============================================================================================
def resample_pos_embed(state_dict: Mapping[str, torch.Tensor], model) -> dict:
    """`state_dict` with its ``pos_embed`` resampled to `model`'s grid (timm's bicubic
    resampling; the prefix tokens' rows kept); the same dict's entries otherwise. The one
    resampling of the toolkit (ViT and EVA files alike)."""
    out = dict(state_dict)
    ours = getattr(model, "pos_embed", None)
    if "pos_embed" not in out or ours is None or out["pos_embed"].shape == ours.shape:
        return out
    from timm.layers import resample_abs_pos_embed
    out["pos_embed"] = resample_abs_pos_embed(out["pos_embed"], new_size=model.patch_embed.grid_size,
                                              num_prefix_tokens=_pos_embed_prefix(model))
    return out


def fit_pos_embed(model, state_dict, args) -> dict:
    """The checkpoint's weights for this model: a position embedding made for another image size
    refused, naming both sizes, or with --resample_pos_embed resampled, saying so."""
    mismatch = _pos_embed_mismatch(model, state_dict, args)
    if mismatch is not None and not getattr(args, "resample_pos_embed", False):
        theirs, ours, size = mismatch
        advice = f": pass --input_size {size}, or --resample_pos_embed to resample it to this size" if size else ""
        raise UserError(f"the position embedding of {weights_label(args)} is {theirs}, the model's is {ours}{advice}")
    if mismatch is not None:
        state_dict = resample_pos_embed(state_dict, model)
        print(f"resampled the position embedding of {weights_label(args)} from {mismatch[0]} to {mismatch[1]}")
    return state_dict


def _pos_embed_prefix(model) -> int:
    """How many rows of pos_embed belong to prefix tokens (class, registers), not to the grid."""
    return 0 if getattr(model, "no_embed_class", False) else int(getattr(model, "num_prefix_tokens", 1))


def _pos_embed_mismatch(model, state_dict, args):
    """None if the checkpoint's pos_embed fits the model; else (checkpoint's grid, model's grid,
    the --input_size the checkpoint's grid implies or None), in words."""
    theirs, ours = state_dict.get("pos_embed"), getattr(model, "pos_embed", None)
    if theirs is None or ours is None or theirs.shape == ours.shape:
        return None
    if theirs.ndim != 3 or theirs.shape[-1] != ours.shape[-1]:
        return None  # another width: load_model_weights reports it with the other shape mismatches
    patch = model.patch_embed.patch_size[0]
    grid_h, grid_w = model.patch_embed.grid_size
    tokens = theirs.shape[1] - _pos_embed_prefix(model)
    side = math.isqrt(max(tokens, 0))
    model_text = f"a {grid_h}x{grid_w} grid of patches (--input_size {args.input_size} at patch {patch})"
    if side * side != tokens:
        if getattr(args, "resample_pos_embed", False):
            raise UserError(f"the position embedding of {weights_label(args)} has {tokens} patch positions, "
                            "not a square grid: it cannot be resampled")
        return f"{tokens} patch positions (not a square grid)", model_text, None
    return f"a {side}x{side} grid of patches (input size {side * patch} at patch {patch})", model_text, side * patch


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
# The record of for_v: what rebuilds the model and its SNN
# ============================================================================================
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
# The model
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
    classifier = _classifier_name(model)
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
