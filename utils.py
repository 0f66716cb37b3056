"""Small helpers shared by the scripts: user errors, checkpoints, logs, metrics, devices.

Every mistake a user can make on the command line (a wrong path, a checkpoint that does not
fit the model, a malformed option) is raised as `UserError`; the entry scripts catch it with
`run_cli` and print one line, `error: ...`, with exit code 2 instead of a traceback.
"""
from __future__ import annotations

import argparse
import ast
import atexit
import json
import math
import os
import pickle
import random
import re
import sys
import tempfile
from collections.abc import Callable, Collection, Mapping
from pathlib import Path

import numpy as np
import torch

from cli_base import UserError, defer_interrupt, note_logged, note_written, run_cli

__all__ = [
    "UserError", "run_cli",
    "load_checkpoint", "read_checkpoint", "load_model_weights", "save_checkpoint",
    "read_architecture", "architecture_differences", "model_heads", "is_safetensors_header",
    "convert_published_places", "has_published_place_names", "check_writable_dir",
    "write_json", "append_log",
    "accuracy", "seed_everything", "resolve_device", "parse_model_kwargs", "keep_freed_memory",
    "init_distributed", "is_distributed", "get_rank", "get_world_size", "is_main_process",
    "all_reduce_sum", "cleanup", "ShardedBatchSampler",
]


# UserError and run_cli live in cli_base (no torch import, for a fast --help); the same objects.


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------

_WRAPPER_KEYS = ("model", "module", "state_dict")


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, Mapping) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()))


def load_checkpoint(path) -> dict[str, torch.Tensor]:
    """Load a state dict saved with torch.save (safely: weights_only=True) or as safetensors
    (recognised by content, whatever the extension), onto the CPU.

    Accepts a bare state dict or one wrapped as {'model': sd}, {'module': sd} or
    {'state_dict': sd} (other entries next to it, such as 'epoch' or the published scripts'
    'args' Namespace, are ignored), and strips the 'module.' prefix that
    DistributedDataParallel adds when every key carries it.
    """
    return read_checkpoint(path)[0]


def read_checkpoint(path) -> tuple[dict[str, torch.Tensor], dict]:
    """:func:`load_checkpoint`, plus the entries stored beside the state dict (a dict).

    The entries are those of the outermost wrapper other than the state dict itself, e.g.
    a `for_v` file's 'calibration' record; an `argparse.Namespace` among them (the published
    scripts' 'args') becomes a plain dict. Besides tensors and plain values, Namespace is the
    one class a checkpoint may hold (ECMT_SPEC 11): anything else pickled is refused.
    """
    path = Path(path)
    if not path.exists():
        raise UserError(f"checkpoint not found: {path}")
    if not path.is_file():
        raise UserError(f"checkpoint path is not a file: {path}")
    with open(path, "rb") as f:
        magic = f.read(9)
    if is_safetensors_header(magic):
        return _read_safetensors(path), {}
    # torch.save writes a zip archive (PK..) or, in the legacy format, a pickle (protocol 2+: 0x80).
    if not (magic.startswith(b"PK") or magic.startswith(b"\x80")):
        raise UserError(f"{path} is not a PyTorch checkpoint nor a safetensors file (neither a "
                        "torch.save zip archive, nor a legacy pickle, nor a safetensors header)")
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
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

    # Unwrap training checkpoints; a wrapper may itself be wrapped ({'model': {'module': sd}}).
    extras: dict = {}
    for depth in range(3):
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
        raise UserError(f"checkpoint {path} does not hold a state dict (name -> tensor); "
                        f"found {_describe(obj)}")

    state_dict = dict(obj)
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
    return state_dict, extras


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
    if all(k.startswith("module.") for k in state_dict):
        state_dict = {k[len("module."):]: v for k, v in state_dict.items()}
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
    mismatched = [k for k in checkpoint
                  if k in expected and checkpoint[k].shape != expected[k].shape]
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


_PLAIN_TYPES = (torch.Tensor, str, int, float, bool, bytes, type(None))


def _check_plain(obj, where: str) -> None:
    if isinstance(obj, _PLAIN_TYPES):
        return
    if isinstance(obj, Mapping):
        for k, v in obj.items():
            if not isinstance(k, (str, int)):
                raise TypeError(f"checkpoint key {where}[{k!r}] is a {type(k).__name__}")
            _check_plain(v, f"{where}[{k!r}]")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _check_plain(v, f"{where}[{i}]")
    else:
        raise TypeError(f"checkpoint entry {where} is a {type(obj).__name__}; only tensors and "
                        "plain Python values can be loaded with weights_only=True")


def _current_umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def _atomic_write(path, write: Callable, mode: str) -> None:
    """Write through a temporary file in the target directory, then rename it over `path`,
    so a crash never leaves a half-written file under the final name."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # Ctrl-C waits for the end of the write (torch.save's writer would turn it into a
        # RuntimeError), then stops the run with the file complete.
        with defer_interrupt():
            os.chmod(tmp_name, 0o666 & ~_current_umask())  # mkstemp makes files private (0600)
            with os.fdopen(fd, mode) as fh:
                write(fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, path)
            note_written(path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def save_checkpoint(obj, path) -> None:
    """torch.save `obj` atomically, creating parent directories.

    `obj` may hold only tensors and plain Python values (dict, list, tuple, str, numbers,
    None) so that it loads with torch.load(..., weights_only=True); anything else is a
    TypeError before anything is written.
    """
    _check_plain(obj, "obj")
    _atomic_write(path, lambda fh: torch.save(obj, fh), "wb")


# --------------------------------------------------------------------------------------------
# Logs and records
# --------------------------------------------------------------------------------------------

def write_json(obj, path) -> None:
    """Write `obj` as indented JSON (with a final newline), atomically."""
    text = json.dumps(obj, indent=2) + "\n"
    _atomic_write(path, lambda fh: fh.write(text), "w")


def append_log(path, line: str) -> None:
    """Append one line of text to a log file, creating its directory."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(line.rstrip("\n") + "\n")
    note_logged(path)


def check_writable_dir(folder, flag: str) -> None:
    """Make sure files can be written in `folder` (created if missing), before any work is
    done: a folder that is a file, or that cannot be written, is one UserError naming `flag`.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        # Writing is the only test that also holds for root and for read-only mounts.
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        if folder.exists() and not folder.is_dir():
            reason = "it is a file, not a folder"
        elif isinstance(err, FileExistsError) or isinstance(err, NotADirectoryError):
            reason = "a part of the path is a file"
        raise UserError(f"cannot write to {flag} {folder}: {reason}") from None


# --------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------

def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[torch.Tensor]:
    """Number of samples whose target is among the top-k logits, for each k in `topk`.

    Unlike timm's `accuracy`, this returns counts (0-dim int64 tensors on output's device),
    not percentages: sum them over batches without a device sync, and divide by the
    number of samples at the end. `output` is (batch, classes), `target` class indices.
    """
    maxk = min(max(topk), output.size(1))
    pred = output.topk(maxk, dim=1).indices.t()          # (maxk, batch)
    correct = pred.eq(target.reshape(1, -1))
    return [correct[:min(k, maxk)].sum() for k in topk]


# --------------------------------------------------------------------------------------------
# Runtime setup
# --------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str | None = None) -> torch.device:
    """The torch.device for `--device`; None means 'cuda' if available, else 'cpu'."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device name (try cpu, cuda or cuda:0)") \
            from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was requested but CUDA is not available here; "
                            "use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name} does not exist: this machine has "
                            f"{torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserError(f"--device {name} was requested but MPS is not available here")
    return device


def keep_freed_memory() -> bool:
    """Let this process reuse the memory its tensors free, instead of giving it back to the OS.

    With glibc's defaults, large blocks come from fresh mappings and freed heap tops are returned
    to the OS, so a CPU run touches new pages all the time: every page costs a fault on its first
    write (measured on ViT-S, batch 8: 300k-600k faults and about 20-35% of the wall time of
    4 ANN passes or T=4 SNN steps, where the SNN frees its whole state at each reset). Here:
    no mmap for large blocks, no trimming of the heap (glibc ``mallopt``); the process keeps
    its peak memory until it exits. Called by the command line for CPU runs
    (``ECMT_KEEP_MEMORY=0`` leaves the defaults). Returns whether the settings took effect
    (False off Linux/glibc)."""
    if os.environ.get('ECMT_KEEP_MEMORY', '1') == '0' or not sys.platform.startswith('linux'):
        return False
    import ctypes
    try:
        mallopt = ctypes.CDLL('libc.so.6').mallopt
    except (OSError, AttributeError):  # not glibc (musl has no mallopt)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
    # -1 is the largest size_t: the heap is never trimmed; 0 mappings: every block on the heap.
    return bool(mallopt(M_TRIM_THRESHOLD, -1)) and bool(mallopt(M_MMAP_MAX, 0))


def parse_model_kwargs(items) -> dict:
    """Turn ['k=v', ...] into keyword arguments for model creation.

    A value that is a Python literal becomes that literal (`depth=2` -> 2, `qk_norm=True`
    -> True, `img_size=(32,32)` -> (32, 32)); anything else stays a string
    (`global_pool=avg` -> 'avg').
    """
    kwargs = {}
    for item in items or ():
        key, sep, text = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"--model_kwargs expects items like name=value, got {item!r}")
        if key in kwargs:
            raise UserError(f"--model_kwargs sets {key!r} twice")
        try:
            kwargs[key] = ast.literal_eval(text.strip())
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            kwargs[key] = text
    return kwargs


# --------------------------------------------------------------------------------------------
# Distributed helpers
# --------------------------------------------------------------------------------------------
# One process per device, started by `torchrun` (torch.distributed's own launcher), which sets
# RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT. A plain `python script.py` sets none
# of them and runs exactly as a single process, with no process group.

_OWN_PROCESS_GROUP = False  # whether init_distributed created the group (and cleanup ends it)


def _torchrun_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']!r} is not a number") from None


def init_distributed(device_arg: str | None = None) -> tuple[torch.device, int, int]:
    """Join the process group that torchrun set up; return (device, rank, world_size).

    Without torchrun (or with a single process) nothing is initialised and this is
    `(resolve_device(device_arg), 0, 1)`. Under torchrun every process takes one device:
    cuda:LOCAL_RANK with the NCCL backend, or the CPU with gloo. `--device cuda` (or no
    --device on a CUDA machine) means "my local GPU"; naming one index (cuda:1) is refused,
    since all processes would share that GPU. A process group the caller already initialised
    is used as it is (and left for the caller to destroy). The group this function creates
    lives until `cleanup()`, called at exit at the latest, so a script may call it repeatedly.
    """
    global _OWN_PROCESS_GROUP
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        rank, world_size = dist.get_rank(), dist.get_world_size()
        device = resolve_device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        return device, rank, world_size
    world_size = _torchrun_world_size()
    if world_size <= 1:
        return resolve_device(device_arg), 0, 1
    if not dist.is_available():
        raise UserError("WORLD_SIZE > 1 (torchrun) but this PyTorch build has no "
                        "torch.distributed")
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(device_arg)
    if device.type == "cuda":
        if device_arg is not None and device.index is not None:
            raise UserError(f"--device {device_arg} names one GPU, but torchrun starts one "
                            "process per GPU: pass --device cuda (process i uses cuda:LOCAL_RANK)")
        if local_rank >= torch.cuda.device_count():
            raise UserError(f"LOCAL_RANK {local_rank} has no GPU: this node has "
                            f"{torch.cuda.device_count()}; lower --nproc_per_node")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    elif device.type == "cpu":
        dist.init_process_group("gloo")
    else:
        raise UserError(f"--device {device_arg}: distributed runs support cuda (NCCL) and "
                        "cpu (gloo)")
    _OWN_PROCESS_GROUP = True
    atexit.register(cleanup)  # also after an error, so that NCCL shuts down cleanly
    return device, rank, world_size


def is_distributed() -> bool:
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def get_rank() -> int:
    dist = torch.distributed
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def get_world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main_process() -> bool:
    """True on rank 0, and in a single-process run: the process that writes files and prints."""
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of `tensor` over all processes (a new tensor; `tensor` is left as it is).

    Identity without a process group. gloo reduces CPU tensors only, so under gloo a tensor
    on another device makes a round trip through the CPU. Every process must call this the
    same number of times with tensors of the same shape and dtype.
    """
    if not is_distributed():
        return tensor
    dist = torch.distributed
    cpu_only = dist.get_backend() == "gloo" and tensor.device.type != "cpu"
    out = tensor.detach().to("cpu", copy=True) if cpu_only else tensor.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(tensor.device) if cpu_only else out


def cleanup() -> None:
    """Leave the process group, if init_distributed created it."""
    global _OWN_PROCESS_GROUP
    if _OWN_PROCESS_GROUP and torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    _OWN_PROCESS_GROUP = False


class ShardedBatchSampler(torch.utils.data.Sampler):
    """Batches of an evaluation set in order, dealt round-robin to the processes; no padding.

    The set is cut into the batches a single process would see ([0, B), [B, 2B), ...; the
    last one may be short), optionally only the first `max_batches` of them; process `rank`
    takes batches rank, rank + world_size, ... Every image is seen exactly once over all
    processes, and every batch is the single-process batch, so per-batch figures (calibration
    quantiles included) are those of a single-process run. Processes may get one batch more
    than others, or none at all when there are fewer batches than processes.
    Use as `DataLoader(dataset, batch_sampler=ShardedBatchSampler(...))`.
    """

    def __init__(self, size: int, batch_size: int, rank: int = 0, world_size: int = 1,
                 max_batches: int | None = None) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, {world_size})")
        self.size, self.batch_size = int(size), int(batch_size)
        self.rank, self.world_size = rank, world_size
        total = -(-self.size // self.batch_size)
        self.total_batches = total if max_batches is None else min(total, max_batches)

    def __iter__(self):
        for index in range(self.rank, self.total_batches, self.world_size):
            start = index * self.batch_size
            yield list(range(start, min(start + self.batch_size, self.size)))

    def __len__(self) -> int:
        return len(range(self.rank, self.total_batches, self.world_size))
