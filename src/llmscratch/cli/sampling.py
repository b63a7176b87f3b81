"""The sampling options that ``generate`` and ``chat`` share, declared once, and their SamplingConfig."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ..inference.generate import SamplingConfig


def add_sampling_options(p: argparse.ArgumentParser, max_new_tokens: Optional[int] = 200,
                         max_new_tokens_help: str = "tokens to generate (default 200)") -> None:
    """Declare how tokens are sampled (and where decoding runs) on ``p``: ``--max-new-tokens``
    (default ``max_new_tokens``, explained by ``max_new_tokens_help``), ``--temperature``,
    ``--top-k``, ``--top-p``, ``--repetition-penalty``, ``--stop``, ``--greedy``, ``--seed``,
    ``--ignore-eos``, ``--no-cache``, ``--device``."""
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help=max_new_tokens_help)
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
                   help="random seed (default 1337): the same seed, the same tokens; row i of a batch (prompt by "
                        "prompt, sample by sample) uses seed + i")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text (and end-of-turn) token")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole window every step (no KV cache)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")


def sampling_config(args: argparse.Namespace, max_new_tokens: Optional[int] = None) -> "SamplingConfig":
    """The sampling options as a SamplingConfig, checked before the run is loaded (the tokenizer's
    end-of-text id and vocabulary limit are the Engine's to add). ``max_new_tokens``: instead of
    ``args.max_new_tokens`` (a default that depends on the model, known once it is loaded)."""
    from ..data.tokenizer import check_utf8
    from ..errors import ConfigError
    from ..inference.generate import SamplingConfig

    if args.greedy and args.temperature is not None:  # (--top-k and --top-p agree with it: the top token is in both)
        raise ConfigError(f"--greedy is temperature 0 (always the most likely token), so --temperature "
                          f"{args.temperature} contradicts it: give one of them")
    for stop in args.stop or []:
        check_utf8(stop, f"--stop {stop!r}")
    return SamplingConfig(
        max_new_tokens=args.max_new_tokens if max_new_tokens is None else max_new_tokens,
        temperature=0.0 if args.greedy else 0.8 if args.temperature is None else args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        repetition_penalty=args.repetition_penalty, stop=tuple(args.stop or ()),
    )
