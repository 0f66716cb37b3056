"""Reading a checkpoint file, whatever wrote it, and loading it into a model.

- **Reading** (:func:`read_checkpoint`): a torch.save file (``weights_only=True``,
  ``argparse.Namespace`` the only class allowed) or a safetensors file, recognised by content; its
  layout (``state_dict``/``model``/``model_state_dict``/``module`` wrappers, PyTorch Lightning
  files, a ``module.``/``model.``/``_orig_mod.`` prefix on every key) undone by one pure filter,
  :func:`clean_checkpoint`; the published scripts' placeholder names by another,
  :func:`convert_published_places` (BAAI's EVA-01 layout: ``model_eva.convert_baai_eva01``).
- **Loading** (:func:`load_model_weights`): strictly, every mismatch explained in one UserError.

Writing checkpoints is ``utils.py``'s; ``weights.py`` is the entry that the scripts call.
"""
from __future__ import annotations

import argparse
import pickle
import re
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import torch

from cli_base import UserError

__all__ = [
    "read_checkpoint", "load_checkpoint", "clean_checkpoint", "is_safetensors_header",
    "convert_published_places", "has_published_place_names", "load_model_weights",
    "PUBLISHED_PLACE_NAMES", "classifier_name", "THRESHOLD_KEYS",
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
        head = classifier_name(model) + ".weight"
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


def classifier_name(model: torch.nn.Module) -> str:
    """The name of `model`'s classifier (its pretrained config says; 'head' otherwise)."""
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
