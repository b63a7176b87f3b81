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


# --------------------------------------------------------------------------- import / export


def _run_import(args: argparse.Namespace) -> int:
    from .checkpoint import import_checkpoint

    import_checkpoint(
        args.source, args.run_dir, heads=args.heads, preset=args.preset, tokenizer_dir=args.tokenizer_dir,
        no_tokenizer=args.no_tokenizer, overwrite=args.force, log=print,
    )
    return 0


@command("import")
def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import", help="turn Hugging Face GPT-2 or book weights into a run directory",
        description="Import weights into a run directory (config.json, model.safetensors, tokenizer). "
        "SOURCE is a Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin, "
        "save_pretrained's layout or the hub's), a state-dict file (.pt/.pth) of the book's GPTModel, or "
        "gpt2 / gpt2-medium / gpt2-large / gpt2-xl (downloaded from the hub where the network is reachable).",
    )
    p.add_argument("source",
                   help="a Hugging Face directory, a book .pt/.pth file, or gpt2/gpt2-medium/gpt2-large/gpt2-xl")
    p.add_argument("run_dir", help="the run directory to create")
    p.add_argument("--heads", type=int, default=None,
                   help="number of attention heads (book format only: it is not stored in the weights)")
    p.add_argument("--preset", default=None,
                   help="model preset whose head count and dropout to use for a book file, e.g. gpt2-124m")
    p.add_argument("--tokenizer-dir", default=None,
                   help="folder with GPT-2's tokenizer files (vocab.bpe + encoder.json or merges.txt + vocab.json) "
                   "for a book file; default $LLMSCRATCH_GPT2_DIR, then tiktoken's cache")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="import the weights even where no tokenizer is found (the run cannot take text prompts)")
    p.add_argument("--force", action="store_true", help="overwrite a run directory that already holds a model")


def _run_export(args: argparse.Namespace) -> int:
    from .checkpoint import export_checkpoint

    export_checkpoint(args.run_dir, args.out, args.format, log=print)
    return 0


@command("export")
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a run's model as Hugging Face GPT-2 or as the book's state dict",
        description="Export a run's weights: --format hf writes a directory that "
        "transformers.GPT2LMHeadModel.from_pretrained loads (with the run's GPT-2 tokenizer files); "
        "--format book writes one torch.save file for the book's GPTModel (mask buffers included).",
    )
    p.add_argument("run_dir", help="the run directory to export")
    p.add_argument("out", help="output: a directory for --format hf, a file (e.g. model.pth) for --format book")
    p.add_argument("--format", choices=("hf", "book"), default="hf", help="output format (default hf)")


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
