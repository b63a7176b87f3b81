"""``llmscratch generate``: text from a run's model, streamed as it is decoded."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from .commands import command
from .sampling import add_sampling_options, sampling_config

if TYPE_CHECKING:
    from ..inference.generate import SamplingConfig


def read_prompt_file(path: str) -> str:
    """The whole of a prompt file (``-``: standard input) as one prompt; a clear error if it cannot be read."""
    from pathlib import Path

    from ..errors import ConfigError

    if path == "-":
        data, where = sys.stdin.buffer.read(), "standard input (--prompt-file -)"
    else:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"--prompt-file {path} is a folder: give a text file (or - for standard input)")
        if not p.exists():
            raise ConfigError(f"--prompt-file {path} does not exist")
        try:  # a pipe, <(...) or /dev/stdin is read as a file is
            data, where = p.read_bytes(), f"--prompt-file {path}"
        except OSError as err:
            raise ConfigError(f"cannot read --prompt-file {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}): "
                          f"save it as UTF-8") from None


def _prompts(args: argparse.Namespace) -> tuple[list[str], list[str]]:
    """The prompts' texts in command-line order, and how an error names each (by its option)."""
    from ..data.tokenizer import check_utf8
    from ..errors import ConfigError
    from ..inference.engine import prompt_label

    given = args.prompts or [("--prompt", "")]  # (option, value) in command-line order
    if given.count(("--prompt-file", "-")) > 1:
        raise ConfigError("--prompt-file - reads standard input, which holds one prompt: give it once")
    texts = [read_prompt_file(value) if option == "--prompt-file" else value for option, value in given]
    for i, (option, text) in enumerate(given):  # a file's text was decoded as UTF-8 already
        if option == "--prompt":
            check_utf8(text, "--prompt" + (f" (prompt {i + 1})" if len(given) > 1 else ""))
    names = [f"--prompt-file {value}" if option == "--prompt-file" else f"--prompt {prompt_label(value)}"
             for option, value in given]
    return texts, names


def _run_chat(args: argparse.Namespace, sampling: "SamplingConfig") -> int:
    """``--chat``: one user message (after ``--system``, if given) in the model's chat template; the answer streamed."""
    from ..data.tokenizer import check_utf8
    from ..inference.chat import chat_format_for, chat_sampling, single_turn
    from ..inference.engine import Engine

    check_utf8(args.chat, "--chat")
    if args.system is not None:
        check_utf8(args.system, "--system")
    engine = Engine.load(args.run_dir, args.device, use_cache=not args.no_cache, rows=args.num_samples)
    chat = chat_format_for(engine.tokenizer, args.run_dir)  # its template, or ours; a base model is refused
    ids = single_turn(chat, args.chat, args.system)  # the template's text, special tokens as their ids
    sampling = chat_sampling(chat, sampling)  # the end of the turn ends the answer
    if args.num_samples > 1:
        for i, answer in enumerate(engine.complete([ids], sampling, samples=args.num_samples,
                                                   ignore_eos=args.ignore_eos)):
            print(f"--- sample {i + 1} (seed {args.seed + i}) ---")
            print(answer)
        return 0
    for piece in engine.stream(ids, sampling, ignore_eos=args.ignore_eos):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


def _run_generate(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..inference.engine import Engine

    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be at least 1, got {args.num_samples}")
    sampling = sampling_config(args)
    if args.chat is not None:
        if args.prompts:
            raise ConfigError("--chat is the user's message, put into the model's chat template: give it or "
                              "--prompt/--prompt-file (raw text to continue), not both")
        return _run_chat(args, sampling)
    if args.system is not None:
        raise ConfigError("--system is the system message of a --chat request: give --chat too")
    texts, names = _prompts(args)
    rows = len(texts) * args.num_samples  # row i: prompt i // num_samples, seed + i
    engine = Engine.load(args.run_dir, args.device, use_cache=not args.no_cache, rows=rows)
    if rows > 1:  # one batch (prompts of different lengths are left-padded), printed when all are done
        outputs = engine.complete(texts, sampling, samples=args.num_samples, names=names, ignore_eos=args.ignore_eos)
        for i, new_text in enumerate(outputs):
            p, n = divmod(i, args.num_samples)
            label = [f"prompt {p + 1}"] if len(texts) > 1 else []
            label += [f"sample {n + 1}"] if args.num_samples > 1 else []
            print(f"--- {', '.join(label)} (seed {args.seed + i}) ---")
            print(texts[p] + new_text)
        return 0
    # Text as it becomes safe to show: never half a character, never any of a stop string.
    pieces = engine.stream(texts[0], sampling, name=names[0], ignore_eos=args.ignore_eos)  # encoded now
    sys.stdout.write(texts[0])
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


@command("generate")
def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a trained or imported run, streaming",
                       description="Generate text from a run directory, printing tokens as they come. Several "
                                   "prompts (--prompt and --prompt-file, each as often as needed) or --num-samples "
                                   "above 1 decode as one batch, printed when all rows are done.")
    p.add_argument("run_dir", help="a run directory (from `llmscratch train` or `llmscratch import`)")
    # Both options add to one list, so that the prompts keep the order they were given in.
    p.add_argument("--prompt", action="append", dest="prompts", type=lambda v: ("--prompt", v), metavar="TEXT",
                   help="text to continue; give it again for more prompts in one batch (none: the text "
                        "starts from the end-of-text token, as GPT-2's unconditional samples)")
    p.add_argument("--prompt-file", action="append", dest="prompts", type=lambda v: ("--prompt-file", v),
                   metavar="PATH", help="a UTF-8 file whose whole text is one prompt (- reads standard input); "
                                        "may be repeated; prompts are numbered in the order given")
    p.add_argument("--chat", metavar="TEXT",
                   help="a user message, put into the model's chat template (its own, or for our models the book's "
                        "instruction format) and answered: only the answer is printed, ending at the model's "
                        "end-of-turn token")
    p.add_argument("--system", metavar="TEXT", help="with --chat: a system message before it")
    add_sampling_options(p)
    p.add_argument("--num-samples", type=int, default=1,
                   help="how many samples to draw of each prompt, in one batch (printed when all are done)")
