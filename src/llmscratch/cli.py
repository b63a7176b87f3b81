"""``llmscratch …``: a thin command-line layer over the package's typed functions.

Each subcommand is a pair: ``_add_<name>(subparsers)`` declares its options (every option
has help text), ``_run_<name>(args)`` calls the library function that does the work.
Imports of heavy modules happen inside ``_run_*`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

from .errors import LLMScratchError

COMMANDS: dict[str, tuple[Callable, Callable]] = {}


def command(name: str):
    """Register ``_add_<name>`` / ``_run_<name>`` as a subcommand."""

    def wrap(add: Callable) -> Callable:
        run = globals()[add.__name__.replace("_add_", "_run_")]
        COMMANDS[name] = (add, run)
        return add

    return wrap


# --------------------------------------------------------------------------- explain


def _run_explain(args: argparse.Namespace) -> int:
    from .inspect import explain

    explain(
        args.sentence, batch=args.batch, heads=args.heads, d_out=args.d_out, seed=args.seed,
        scale=not args.no_scale, max_values=args.max_values, out=sys.stdout,
    )
    return 0


@command("explain")
def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="print a step-by-step shape trace of causal multi-head attention",
        description="Trace one pass of causal multi-head self-attention, printing every tensor's "
        "name, shape and meaning (inputs → Q, K, V → heads → scores → mask → weights → context → output).",
    )
    p.add_argument("sentence", nargs="?", default="Your journey starts with one step",
                   help="the text to trace, one token per whitespace-separated word (default: the book's sentence)")
    p.add_argument("--batch", type=int, default=1,
                   help="batch size: the sentence, then its words rotated by 1, 2, ... (default 1)")
    p.add_argument("--heads", type=int, default=2, help="number of attention heads (default 2)")
    p.add_argument("--d-out", type=int, default=4, help="total output width, split across heads (default 4)")
    p.add_argument("--seed", type=int, default=123, help="seed for the projection weights (default 123)")
    p.add_argument("--no-scale", action="store_true", help="leave out the 1/sqrt(d_k) scaling of the scores")
    p.add_argument("--max-values", type=int, default=144, metavar="N",
                   help="print a tensor's values when it has at most N elements; 0 prints shapes only (default 144)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="llmscratch",
        description="A GPT-style language model from first principles: attention, training, generation, inspection.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _, run = COMMANDS[args.command]
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except LLMScratchError as err:  # bad input: a clear message, no traceback
        print(f"llmscratch {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
