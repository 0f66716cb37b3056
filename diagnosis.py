"""Do these weights fit the model? If not, say what would.

- **The architecture diagnosis** (:func:`check_architecture`): weights of another architecture
  than ``--model`` are refused with what differs and the flags that fit, read from the shapes;
  weights of another timm family (EVA/EVA-02, BEiT, Swin, DeiT distilled, CaiT, ResNet, ...) are
  recognised from their key names and a ``--model`` of that family is proposed, checked to load.
- **Position embeddings** (:func:`fit_pos_embed`, :func:`resample_pos_embed`): one made for
  another image size refused, or resampled with ``--resample_pos_embed``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping

import torch

from checkpoints import classifier_name
from cli_base import UserError

__all__ = [
    "read_architecture", "architecture_differences", "model_heads", "recognise_family",
    "propose_model", "check_architecture", "weights_label", "ARCHITECTURE_WORDS",
    "resample_pos_embed", "fit_pos_embed",
]


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
    classifier = classifier_name(model)
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

