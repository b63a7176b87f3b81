"""``llmscratch generate``: text from a run's model, streamed as it is decoded."""

from __future__ import annotations

import argparse
import sys

from .commands import command


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


def _run_generate(args: argparse.Namespace) -> int:
    from ..store.checkpoint import load_run
    from ..errors import ConfigError, LLMScratchError
    import dataclasses

    from ..inference.generate import SamplingConfig, choose_weight_layout, decodable_limit, generate_text, stream_text
    from ..runtime import setup_runtime
    from ..data.tokenizer import check_utf8

    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.greedy and args.temperature is not None:  # (--top-k and --top-p agree with it: the top token is in both)
        raise ConfigError(f"--greedy is temperature 0 (always the most likely token), so --temperature "
                          f"{args.temperature} contradicts it: give one of them")
    for stop in args.stop or []:
        check_utf8(stop, f"--stop {stop!r}")
    # The sampling options are checked now, before the run is loaded; the tokenizer's ids come later.
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=0.0 if args.greedy else 0.8 if args.temperature is None else args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        repetition_penalty=args.repetition_penalty, stop=tuple(args.stop or ()),
    )
    given = args.prompts or [("--prompt", "")]  # (option, value) in command-line order
    if given.count(("--prompt-file", "-")) > 1:
        raise ConfigError("--prompt-file - reads standard input, which holds one prompt: give it once")
    texts = [read_prompt_file(value) if option == "--prompt-file" else value for option, value in given]
    for i, (option, text) in enumerate(given):  # a file's text was decoded as UTF-8 already
        if option == "--prompt":
            check_utf8(text, "--prompt" + (f" (prompt {i + 1})" if len(given) > 1 else ""))
    # How an error names each prompt.
    named = [f"--prompt-file {value}" if option == "--prompt-file" else
             f"--prompt {value!r}" if len(value) <= 30 else f"--prompt {value[:27]!r}..." for option, value in given]
    runtime = setup_runtime(args.device, "fp32" if args.device in (None, "auto", "cpu") else "auto")
    model, tokenizer, _ = load_run(args.run_dir, device=runtime.device, need_tokenizer="the prompt")
    # One row per prompt and sample, prompt by prompt: row i samples with seed + i, so each row
    # prints exactly what a run of its prompt alone with --seed (seed + i) prints.
    rows = [(p, text, n) for p, text in enumerate(texts) for n in range(args.num_samples)]
    if not args.no_cache:  # on a CPU: each weight shape stored or packed the way decoding multiplies it fastest (timed)
        choose_weight_layout(model, rows=len(rows))
    empty = [tokenizer.eot_id if tokenizer.eot_id is not None else 0]  # an empty prompt starts from end-of-text
    encoded = []
    for text, name in zip(texts, named):
        try:
            encoded.append(tokenizer.encode(text) or empty)
        except LLMScratchError as err:
            raise LLMScratchError(f"{name}{f' (prompt {len(encoded) + 1})' if len(texts) > 1 else ''}: {err}; "
                                  f"leave those characters out") from None
    prompts = [encoded[p] for p, _, _ in rows]
    sampling = dataclasses.replace(sampling, eos_id=None if args.ignore_eos else tokenizer.eot_id,
                                   vocab_limit=decodable_limit(tokenizer.vocab_size, model.cfg.vocab_size))
    if len(rows) > 1:  # one batch (prompts of different lengths are left-padded), printed when all are done
        outputs = generate_text(model, prompts, sampling, tokenizer.decode, use_cache=not args.no_cache)
        for i, ((p, text, n), new_text) in enumerate(zip(rows, outputs)):
            label = [f"prompt {p + 1}"] if len(texts) > 1 else []
            label += [f"sample {n + 1}"] if args.num_samples > 1 else []
            print(f"--- {', '.join(label)} (seed {args.seed + i}) ---")
            print(text + new_text)
        return 0
    sys.stdout.write(texts[0])
    # Text as it becomes safe to show: never half a character, never any of a stop string.
    for piece in stream_text(model, prompts[0], sampling, tokenizer.decode, use_cache=not args.no_cache):
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
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of tokens with this probability mass")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="P",
                   help="make tokens already in the text (prompt included) less likely, as Hugging Face transformers "
                        "does: their logits are divided by P (multiplied if negative); above 1 discourages repeats, "
                        "e.g. 1.2 (default 1.0: off)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end a row when its text contains TEXT, which is not printed; give it again for more stop "
                        "strings (default: none; a newline in bash: --stop $'\\n')")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (temperature 0)")
    p.add_argument("--seed", type=int, default=1337,
                   help="random seed (default 1337); row i of a batch (prompt by prompt, sample by sample) uses seed + i")
    p.add_argument("--num-samples", type=int, default=1,
                   help="how many samples to draw of each prompt, in one batch (printed when all are done)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole window every step (no KV cache)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
