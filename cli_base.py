"""What the entry scripts need before torch is imported: user errors, the parser, Ctrl-C.

`--help` and argument errors must answer at once, so this module imports nothing heavy:
the scripts build their parsers from it and import torch, timm and the engine only when a
run starts. `utils` re-exports `UserError` and `run_cli`, so `from utils import UserError`
names the same class.

- `UserError`: a mistake the user can fix; `run_cli` prints it as one line `error: ...`
  and exits with 2.
- Ctrl-C: `run_cli` prints one line, `interrupted: ...`, saying which output files were
  written (`note_written`), and exits with 130, the shell's code for SIGINT. Files are
  written through a temporary file and a rename, inside `defer_interrupt`, so an
  interruption never leaves a half-written file nor a traceback from the writer.
- `Parser`: an ArgumentParser that shows every default and records which flags were given
  on the command line (`args.given`), so that a run can tell "not given" from "given with
  the default value" (a for_v checkpoint's record fills only what was not given).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import signal
import sys
import threading
from pathlib import Path

__all__ = ["UserError", "run_cli", "Parser", "note_written", "note_logged", "defer_interrupt",
           "add_launch_flags", "check_launch_flags",
           "DATA_SETS", "DATA_CONFIGS", "INTERRUPTED_EXIT"]

#: --data_set and --data_config choices (datasets.py reads them from here).
DATA_SETS = ("CIFAR10", "CIFAR100", "IMNET", "image_folder", "DIGITS")
DATA_CONFIGS = ("published", "timm")

#: The exit status of a run stopped by Ctrl-C (128 + SIGINT), as a shell reports it.
INTERRUPTED_EXIT = 130


class UserError(ValueError):
    """A problem the user can fix (bad path, option or checkpoint); shown as one line."""


# --------------------------------------------------------------------------------------------
# What a run has written, for the line printed when it is interrupted
# --------------------------------------------------------------------------------------------
_written: list[str] = []
_logged: list[str] = []


def note_written(path) -> None:
    """Record an output file this process has finished writing (checkpoint, JSON, report)."""
    text = str(path)
    if text not in _written:
        _written.append(text)


def note_logged(path) -> None:
    """Record a log file this process has appended to."""
    text = str(path)
    if text not in _logged:
        _logged.append(text)


def interrupted_line() -> str:
    """`interrupted: ...`: what this process wrote before Ctrl-C, in one line."""
    if _written:
        text = "interrupted: written before the interruption: " + ", ".join(_written)
    else:
        text = "interrupted: nothing was written"
    if _logged:
        text += f" (the log {', '.join(_logged)} has the lines of the batches done)"
    return text


@contextlib.contextmanager
def defer_interrupt():
    """Hold back Ctrl-C (SIGINT) for the duration of the block, then raise it.

    Used around the final rename of an output file and around torch.save, whose C++ writer
    turns an interrupt into an unrelated RuntimeError. Outside the main thread (where
    signal handlers cannot be set) this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending = []

    def hold(signum, frame):
        pending.append(signum)

    try:
        previous = signal.signal(signal.SIGINT, hold)
    except (ValueError, OSError):  # no signals here (an embedded interpreter)
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
    if pending:
        raise KeyboardInterrupt


# --------------------------------------------------------------------------------------------
# Running an entry script
# --------------------------------------------------------------------------------------------
def run_cli(main, parser) -> None:
    """Parse the command line and call `main(args)`.

    A UserError is one line `error: ...` and exit status 2; Ctrl-C is one line
    `interrupted: ...` and exit status 130; neither prints a traceback. Standard output is
    line-buffered, so a redirected log receives every line when it is printed.
    """
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(line_buffering=True)
    try:
        args = parser.parse_args()
        main(args)
    except UserError as err:
        _close_progress_bars()
        parser.exit(2, f"error: {err}\n")
    except KeyboardInterrupt:
        with contextlib.suppress(ValueError, OSError):
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C does not interrupt this
        _close_progress_bars()
        sys.stderr.write(interrupted_line() + "\n")
        sys.stderr.flush()
        # Skip the interpreter's teardown: DataLoader workers and native threads may still be
        # stopping, and their clean-up messages are not the user's business.
        with contextlib.suppress(Exception):
            sys.stdout.flush()
        os._exit(INTERRUPTED_EXIT)


def _close_progress_bars() -> None:
    """End an open tqdm bar's line, so that the message starts on a line of its own."""
    tqdm = sys.modules.get("tqdm")
    if tqdm is None:
        return
    with contextlib.suppress(Exception):
        for bar in list(getattr(tqdm.tqdm, "_instances", ())):
            bar.close()


# --------------------------------------------------------------------------------------------
# The parser
# --------------------------------------------------------------------------------------------
class HelpFormatter(argparse.HelpFormatter):
    """Shows each flag's default after its help, unless the help already says it."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or default is None or default is False
                or default is argparse.SUPPRESS or not action.option_strings or default == []):
            return text
        if isinstance(default, (list, tuple)):
            shown = " ".join(str(v) for v in default)
        else:
            shown = str(default).replace("%", "%%")
        return f"{text} (default: {shown})"


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose namespace says which flags were given: `args.given` is the set
    of destinations set on the command line (a flag given with its default value counts)."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def parse_known_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        parsed, rest = super().parse_known_args(argv, namespace)
        # Parse again with every default suppressed: what is left was on the command line.
        saved = [(action, action.default) for action in self._actions]
        saved_defaults = dict(self._defaults)
        try:
            for action, _ in saved:
                action.default = argparse.SUPPRESS
            self._defaults = {}
            given, _ = super().parse_known_args(argv, None)
        finally:
            for action, default in saved:
                action.default = default
            self._defaults = saved_defaults
        parsed.given = frozenset(vars(given))
        return parsed, rest


def given_flags(args) -> frozenset:
    """The flags given on the command line (`Parser`); for a namespace made another way,
    every flag whose value is set is taken as given."""
    given = getattr(args, "given", None)
    return frozenset(vars(args)) if given is None else given


# --------------------------------------------------------------------------------------------
# Launch flags of other scripts (BEiT, DeiT): several processes come from torchrun, not flags
# --------------------------------------------------------------------------------------------
def add_launch_flags(parser) -> None:
    """--dist_eval, --local_rank, --world_size, --dist_url, as BEiT's and DeiT's scripts take them:
    accepted where harmless, refused with the torchrun command where they would be ignored."""
    g = parser.add_argument_group("launch habits of BEiT/DeiT scripts (processes come from torchrun)")
    g.add_argument("--dist_eval", action="store_true",
                   help="accepted: under torchrun the evaluation is always split across the processes")
    g.add_argument("--local_rank", "--local-rank", type=int, default=None, metavar="N",
                   help="accepted from torch.distributed.launch (LOCAL_RANK is what is read)")
    g.add_argument("--world_size", type=int, default=None, metavar="N",
                   help="accepted when it equals torchrun's WORLD_SIZE; processes are started by "
                        "torchrun --nproc_per_node=N, not by this flag")
    g.add_argument("--dist_url", default=None, metavar="URL",
                   help="accepted as env:// (torchrun's rendezvous); other URLs are refused")


def check_launch_flags(args, script: str) -> None:
    """Refuse --world_size/--dist_url that ask for processes torchrun did not start, with the
    command that starts them; pass --local_rank on as LOCAL_RANK where torchrun did not set it."""
    world = os.environ.get("WORLD_SIZE", "1")
    wanted = getattr(args, "world_size", None)
    if wanted is not None and wanted < 1:
        raise UserError(f"--world_size must be >= 1, got {wanted}")
    if wanted is not None and wanted > 1 and str(wanted) != world:
        raise UserError(f"--world_size {wanted} does not start processes: launch them with torchrun "
                        f"--nproc_per_node={wanted} {script} ... (without --world_size)")
    url = getattr(args, "dist_url", None)
    if url not in (None, "env://"):
        raise UserError(f"--dist_url {url}: processes find each other through torchrun's settings; launch "
                        f"with torchrun --nproc_per_node=N {script} ... (without --dist_url), or pass env://")
    local = getattr(args, "local_rank", None)
    if local is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local)
