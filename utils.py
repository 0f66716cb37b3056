"""Small helpers shared by the scripts: user errors, writing checkpoints and records, logs,
metrics, devices, torchrun. Reading weights is checkpoints.py's job (weights.py is the entry).

Every mistake a user can make on the command line (a wrong path, a checkpoint that does not
fit the model, a malformed option) is raised as `UserError`; the entry scripts catch it with
`run_cli` and print one line, `error: ...`, with exit code 2 instead of a traceback.
"""
from __future__ import annotations

import ast
import atexit
import json
import os
import random
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import torch

from cli_base import UserError, defer_interrupt, note_logged, note_written, run_cli

__all__ = [
    "UserError", "run_cli",
    "save_checkpoint", "check_writable_dir", "check_output_file", "lock_outputs", "release_output_locks",
    "write_json", "append_log",
    "accuracy", "seed_everything", "resolve_device", "parse_model_kwargs", "keep_freed_memory",
    "init_distributed", "is_distributed", "get_rank", "get_world_size", "is_main_process",
    "all_reduce_sum", "cleanup", "ShardedBatchSampler",
]


# UserError and run_cli live in cli_base (no torch import, for a fast --help); the same objects.


# --------------------------------------------------------------------------------------------
# Writing checkpoints (reading them: checkpoints.py; everything else about weights: weights.py)
# --------------------------------------------------------------------------------------------

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


def check_output_file(path, flag: str) -> None:
    """Refuse, before any work, a file this run will write where a folder stands (or whose folder
    cannot be written): one UserError naming `flag` and a name that works."""
    path = Path(path)
    if path.is_dir():
        example = path / ("results.json" if path.suffix == "" else path.name)
        raise UserError(f"{flag} {path} is a folder, not a file: name a file (e.g. {example}), or move "
                        "the folder away")
    check_writable_dir(path.parent, f"the folder of {flag}")


_LOCKS: dict = {}


def lock_outputs(paths, flag: str) -> None:
    """Hold a lock on each output of this run (`paths`: files, or a report name's prefix) until the
    process ends, so that a second run writing the same files stops at its start with one UserError
    instead of the last writer winning. Advisory ``flock`` locks on files in the system's temporary
    folder (named after the output's absolute path, so the output folders stay clean), released by
    the system whatever ends the process. A process may take the same lock again (one script
    running several times in one process, as the tests do); :func:`release_output_locks` ends them."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no locks, as before
        return
    import hashlib
    folder = Path(tempfile.gettempdir()) / "ecmt_output_locks"
    folder.mkdir(exist_ok=True)
    for path in paths:
        target = str(Path(path).resolve())
        if target in _LOCKS:
            continue
        lock_path = folder / (hashlib.sha1(target.encode()).hexdigest() + ".lock")
        handle = open(lock_path, "a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            owner = handle.read().strip() or "another process"
            handle.close()
            raise UserError(f"another run ({owner}) is writing {path} now: wait for it to end, or pass "
                            f"another {flag}") from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}")
        handle.flush()
        _LOCKS[target] = handle


def release_output_locks() -> None:
    """Release the locks :func:`lock_outputs` took (the end of a run; a process that runs the
    script's main several times releases them between runs)."""
    while _LOCKS:
        _, handle = _LOCKS.popitem()
        handle.close()  # closing the file releases its flock


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


def check_torchrun_environment(world_size: int) -> None:
    """Refuse a torchrun environment that torchrun did not make whole: WORLD_SIZE > 1 left in
    a shell (or set by a cluster job) without RANK, MASTER_ADDR or MASTER_PORT would end in a
    traceback from torch.distributed, or a wait for processes that never start."""
    missing = [name for name in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(name)]
    rank = os.environ.get("RANK", "0")
    if not missing and (not rank.isdigit() or int(rank) >= world_size):
        missing = [f"RANK={rank} (not a number below WORLD_SIZE)"]
    if missing:
        script = Path(sys.argv[0]).name or "run_class_finetuning.py"
        raise UserError(f"WORLD_SIZE={world_size} is set but {', '.join(missing)} "
                        f"{'is' if len(missing) == 1 else 'are'} not: torchrun's settings are left in the "
                        f"environment. Launch with torchrun --nproc_per_node={world_size} {script} ..., or "
                        "run one process after unset WORLD_SIZE RANK LOCAL_RANK")


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
    check_torchrun_environment(world_size)
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
