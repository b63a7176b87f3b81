"""The peer that ``prepare_speed.py`` measures ``llmscratch prepare`` against: nanoGPT's method.

nanoGPT prepares OpenWebText (``data/openwebtext/prepare.py``) by loading the corpus with
Hugging Face ``datasets``, tokenizing every document with ``Dataset.map(num_proc=N)`` (tiktoken's
GPT-2 ``encode_ordinary``, then the end-of-text token), and writing all ids into one ``np.memmap``
per split, in batches. This script does the same on a JSONL corpus (written here from that
description; the GPT-2 encoding is built from local ``vocab.bpe`` / ``encoder.json`` files, as
``tiktoken.get_encoding("gpt2")`` would download them). Usage:

    python benchmarks/prepare_peer_nanogpt.py --data corpus.jsonl --out DIR --num-proc 2 --gpt2-dir DIR
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def gpt2_encoding(gpt2_dir: Path):
    """tiktoken's GPT-2 encoding ("gpt2": r50k pattern, 50,257 tokens) from OpenAI's two files on disk."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    ranks = data_gym_to_mergeable_bpe_ranks(str(gpt2_dir / "vocab.bpe"), str(gpt2_dir / "encoder.json"))
    pattern = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
    return tiktoken.Encoding(name="gpt2", pat_str=pattern, mergeable_ranks=ranks,
                             special_tokens={"<|endoftext|>": 50256})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="a JSONL file with a text field")
    p.add_argument("--out", required=True, help="folder for train.bin (and the datasets cache)")
    p.add_argument("--num-proc", type=int, default=os.cpu_count())
    p.add_argument("--gpt2-dir", required=True, help="folder with vocab.bpe and encoder.json")
    p.add_argument("--val-size", type=float, default=0.0, help="nanoGPT uses 0.0005; 0 keeps every document in train")
    args = p.parse_args()

    import numpy as np
    from datasets import disable_progress_bars, load_dataset

    disable_progress_bars()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    enc = gpt2_encoding(Path(args.gpt2_dir))
    t0 = time.perf_counter()
    dataset = load_dataset("json", data_files=args.data, split="train", cache_dir=str(out / "hf-cache"),
                           num_proc=args.num_proc)
    splits = {"train": dataset}
    if args.val_size > 0:
        parts = dataset.train_test_split(test_size=args.val_size, seed=2357, shuffle=True)
        splits = {"train": parts["train"], "val": parts["test"]}

    def process(example):
        ids = enc.encode_ordinary(example["text"])  # encode_ordinary ignores any special token
        ids.append(enc.eot_token)  # the end-of-text token after each document
        return {"ids": ids, "len": len(ids)}

    tokens = 0
    for split, dset in splits.items():
        tokenized = dset.map(process, remove_columns=["text"], desc=f"tokenizing {split}", num_proc=args.num_proc)
        arr_len = int(np.sum(tokenized["len"], dtype=np.uint64))
        arr = np.memmap(out / f"{split}.bin", dtype=np.uint16, mode="w+", shape=(arr_len,))
        total_batches = min(1024, len(tokenized))
        idx = 0
        for batch_idx in range(total_batches):
            batch = tokenized.shard(num_shards=total_batches, index=batch_idx, contiguous=True).with_format("numpy")
            arr_batch = np.concatenate(batch["ids"])
            arr[idx: idx + len(arr_batch)] = arr_batch
            idx += len(arr_batch)
        arr.flush()
        tokens += arr_len
    print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - t0}))


if __name__ == "__main__":
    main()
