"""Pretrained weights (``--pretrained``, ``--pretrained_file``): timm names and tags,
``hf_hub:org/name``, the published aliases, from the Hugging Face cache (:func:`load_pretrained`).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from checkpoints import load_checkpoint
from cli_base import UserError
from diagnosis import read_architecture

__all__ = [
    "HUB_PREFIX", "PUBLISHED_HUB_MODELS", "PUBLISHED_FILES", "PretrainedWeights", "load_pretrained",
    "is_hub_name",
]


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
