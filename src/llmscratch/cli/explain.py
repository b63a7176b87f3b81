"""``llmscratch explain``: the step-by-step shape trace of causal multi-head attention."""

from __future__ import annotations

import argparse
import sys

from .commands import command


def _run_explain(args: argparse.Namespace) -> int:
    from ..tools.inspect import explain, explain_run

    from ..errors import ConfigError
    from ..data.tokenizer import check_utf8

    if args.max_values < 0:
        raise ConfigError(f"--max-values must be >= 0 (0: shapes only), got {args.max_values}")
    check_utf8(args.sentence, "the sentence")
    toy = {"--batch": args.batch, "--heads": args.heads, "--kv-heads": args.kv_heads, "--d-out": args.d_out,
           "--seed": args.seed, "--no-scale": args.no_scale or None}
    if args.run:
        given = [name for name, value in toy.items() if value is not None]
        if given:
            raise ConfigError(f"--run traces the run's own first attention layer, whose shape and weights are its "
                              f"own: {', '.join(given)} cannot apply; drop them")
        explain_run(args.run, args.sentence, max_values=args.max_values, out=sys.stdout)
        return 0
    explain(
        args.sentence, batch=1 if args.batch is None else args.batch, heads=2 if args.heads is None else args.heads,
        d_out=4 if args.d_out is None else args.d_out, seed=123 if args.seed is None else args.seed,
        scale=not args.no_scale, kv_heads=args.kv_heads, max_values=args.max_values, out=sys.stdout,
    )
    return 0


@command("explain")
def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="print a step-by-step shape trace of causal multi-head attention",
        description="Trace one pass of causal multi-head self-attention, printing every tensor's "
        "name, shape and meaning (inputs → Q, K, V → heads → scores → mask → weights → context → output). "
        "--kv-heads N makes it grouped-query attention (as in Llama and Qwen); --run RUN_DIR traces a trained "
        "model's first attention layer instead, grouped-query or not, as its config says.",
    )
    p.add_argument("sentence", nargs="?", default="Your journey starts with one step",
                   help="the text to trace, one token per whitespace-separated word (default: the book's sentence)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size: the sentence, then its words rotated by 1, 2, ... (default 1)")
    p.add_argument("--heads", type=int, default=None, help="number of attention heads (default 2)")
    p.add_argument("--kv-heads", type=int, default=None, metavar="N",
                   help="key/value heads, for grouped-query attention: K and V get N heads (W_k, W_v N·d wide), each "
                   "shared by heads/N query heads, and the KV cache per token is compared with multi-head "
                   "attention's; N must divide --heads (default: --heads, plain multi-head attention). A --run "
                   "model's own key/value heads come from its config")
    p.add_argument("--d-out", type=int, default=None, help="total output width, split across heads (default 4)")
    p.add_argument("--seed", type=int, default=None, help="seed for the projection weights (default 123)")
    p.add_argument("--run", metavar="RUN_DIR",
                   help="trace a trained model's first attention layer on its real tokens and weights")
    p.add_argument("--no-scale", action="store_true", help="leave out the 1/sqrt(d_k) scaling of the scores")
    p.add_argument("--max-values", type=int, default=144, metavar="N",
                   help="values to print: the scores, mask and weights as one T×T table per batch entry and "
                   "head whenever there are at most 16 tokens (however many elements they have), any other "
                   "tensor when it has at most N elements (default 144); 0 prints shapes only. Lines fit "
                   "the terminal's width ($COLUMNS; 100 when piped)")
