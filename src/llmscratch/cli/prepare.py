"""``llmscratch prepare``: tokenize a corpus of any size into token shards, in parallel."""

from __future__ import annotations

import argparse
import os
import sys

from .commands import command


def _size(text: str) -> int:
    """An integer that may be written 100M, 2G, 64MB, 1_000_000."""
    t = text.strip().upper().replace("_", "").rstrip("B")
    scale = {"K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12}.get(t[-1:], 1)
    try:
        return int(float(t[:-1] if scale != 1 else t) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 100M, 2G, 65536)") from None


def _run_prepare(args: argparse.Namespace) -> int:
    from ..data.prepare import PrepareConfig, prepare

    cfg = PrepareConfig(inputs=args.data, out=args.out, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                        sample_bytes=args.sample_bytes, text_field=args.text_field, workers=args.workers,
                        shard_tokens=args.shard_tokens, val_fraction=args.val_fraction, val_docs=args.val_docs,
                        skip_bad=args.skip_bad, seed=args.seed, progress_every=0 if args.quiet else args.progress_every,
                        per_worker=args.per_worker)
    prepare(cfg, log=lambda message: print(message, file=sys.stderr, flush=True))
    print(args.out)
    return 0


@command("prepare")
def _add_prepare(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("prepare", help="tokenize a corpus into token shards (in parallel, as a stream)",
                       description="Tokenize text, JSONL or Parquet files (plain, .gz or .zst) into token shards "
                       "and an index.json, in parallel worker processes, reading the inputs as a stream. "
                       "`llmscratch train --data DIR` trains on the folder. Run it again after an interruption: "
                       "it resumes at the first unfinished shard.")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help="files, folders (their .txt/.jsonl/.parquet files, plain, .gz or .zst) or globs")
    p.add_argument("--out", required=True, metavar="DIR", help="the folder for the shards, index.json and tokenizer")
    p.add_argument("--tokenizer", default="gpt2",
                   help="gpt2 (GPT-2's files, see docs/training.md), bpe or char (trained on --sample-bytes of the "
                   "training documents), or a folder holding a saved tokenizer (default gpt2)")
    p.add_argument("--vocab-size", type=int, default=2048, help="tokens of a bpe tokenizer (default 2048)")
    p.add_argument("--sample-bytes", type=_size, default=64 * 10**6,
                   help="text a bpe or char tokenizer is trained on (default 64M)")
    p.add_argument("--text-field", default="text", help="the JSONL field or Parquet column of the text (default text)")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                   help=f"tokenizing processes (default: the machine's cores, here {os.cpu_count()})")
    p.add_argument("--shard-tokens", type=_size, default=100 * 10**6, help="tokens per shard (default 100M)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val-fraction", type=float, default=0.001,
                     help="fraction of the documents held out for validation, chosen by a hash of their number "
                     "(default 0.001)")
    val.add_argument("--val-docs", type=int, default=None, help="hold out the first N documents instead")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation documents' choice (default 0)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip (and count) bad documents: a file that is not UTF-8, a line that is not JSON, a missing field")
    p.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines (default 5)")
    p.add_argument("--per-worker", action="store_true", help="progress lines per worker too")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
