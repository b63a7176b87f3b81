"""``llmscratch …``: the parser of every subcommand, and ``main``, which runs one and
turns bad input into a one-line error.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from typing import Callable, Optional, Sequence

from . import (attention, bench, chat, classify, convert, evaluate, experiment, explain, finetune, generate, info,
               prepare, runs, serve, train)
from ..errors import LLMScratchError
from .commands import COMMANDS


# importing a command's module registers it (``@command``)
COMMAND_MODULES = (explain, train, prepare, generate, chat, serve, info, runs, evaluate, convert, attention, experiment,
                   bench, finetune, classify)


def _version() -> str:
    """``llmscratch 0.1.0 (torch 2.13.0+cpu, Python 3.11.7)``: what a bug report needs, without importing torch."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from .. import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"llmscratch {__version__} (torch {torch_version}, Python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    """The ``llmscratch`` argument parser, one subcommand per ``@command``."""
    parser = argparse.ArgumentParser(
        prog="llmscratch",
        description="A GPT-style language model from first principles: attention, training, generation, inspection.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def _rank_tag() -> str:
    """`` (rank 1 of 2)`` in a process of a torchrun job, so that each rank's error says whose it is."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')} of {world})" if world.isdigit() and int(world) > 1 else ""


# What makes each command need less memory, for the out-of-memory message.
_SMALLER = {
    "train": "a smaller model (--preset test or cpu, --emb-dim, --n-layers, --context-length, --vocab-size) "
             "or fewer windows per forward pass (--micro-batch, --batch-size)",
    "explain": "a smaller --d-out, a smaller --batch or a shorter sentence",
    "generate": "fewer --num-samples or --max-new-tokens, or a smaller model",
    "chat": "a shorter conversation (--load, /reset) or a smaller model",
    "attention": "a shorter --prompt, or a smaller model",
    "eval": "a smaller --batch-size",
    "finetune": "a smaller --batch-size or --micro-batch, --train lora, or a smaller model",
    "prepare": "fewer --workers",
    "bench": "a smaller --batch, --context, --decode-batches or --preset",
    "experiment": "--quick or --tiny",
}
# The CPU allocator's message (c10/core/impl/alloc_cpu.cpp): "... DefaultCPUAllocator: can't allocate memory: you
# tried to allocate 12000000000000 bytes. Error code 12 (Cannot allocate memory)".
_CPU_OOM = re.compile(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes")


def _out_of_memory(err: BaseException, command: str) -> Optional[str]:
    """The one-line message for ``err`` if it means the device ran out of memory, else None.

    ``torch.OutOfMemoryError`` (CUDA; ``torch.cuda.OutOfMemoryError`` before torch 2.5), the CPU
    allocator's RuntimeError (matched by its message; no other RuntimeError) and MemoryError.
    """
    torch = sys.modules.get("torch")  # an error from torch means torch was imported
    oom_types: tuple = (MemoryError,)
    if torch is not None:
        oom_types += tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                       getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if t)
    cpu = _CPU_OOM.search(str(err)) if isinstance(err, RuntimeError) else None
    if not (cpu or isinstance(err, oom_types)):
        return None
    if cpu:
        where = f"the CPU (one allocation of {int(cpu.group(1)) / 2**30:,.1f} GiB failed)"
    elif isinstance(err, MemoryError):
        where = "the CPU"
    else:  # "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of ..."
        tried = re.search(r"Tried to allocate ([\d.]+ \w+)", str(err))
        where = "the GPU" + (f" (one allocation of {tried.group(1)} failed)" if tried else "")
    smaller = _SMALLER.get(command, "a smaller model")
    return f"out of memory on {where}: the sizes asked for do not fit this machine; try {smaller}"


def _one_line_warnings(command: str) -> Callable[..., None]:
    """Show this package's own warnings (a damaged cache rebuilt, say) as one line, as errors are
    shown; other libraries' keep Python's format. Returns the handler it replaced."""
    import warnings

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep  # llmscratch/, not cli/
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(package):
            print(f"llmscratch {command}: warning: {message}", file=file or sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    return previous


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one subcommand and return its exit status: bad input gives a one-line error and 2, not a traceback."""
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    _, run = COMMANDS[args.command]
    previous_warnings = _one_line_warnings(args.command)
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt as err:  # Ctrl-C; or errors.Stopped, which training raises for SIGTERM too
        signum = getattr(err, "signum", signal.SIGINT)
        if not getattr(err, "saved", False):  # a training run that saved has said where
            print("interrupted" if signum == signal.SIGINT else "terminated", file=sys.stderr)
        return 128 + signum  # as a shell reports a command that the signal ended: 130, 143
    except LLMScratchError as err:  # bad input: a clear message, no traceback
        print(f"llmscratch {args.command}{_rank_tag()}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:  # a path that is a file, a full disk, no permission: the OS names the file
        print(f"llmscratch {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as err:  # sizes too large for memory: 2, as for other sizes the user chose
        message = _out_of_memory(err, args.command)
        if message is None:
            raise  # any other RuntimeError is a bug: keep its traceback
        print(f"llmscratch {args.command}{_rank_tag()}: error: {message}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = previous_warnings


if __name__ == "__main__":
    sys.exit(main())
