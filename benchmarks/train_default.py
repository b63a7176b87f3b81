"""Time the default run: `llmscratch train` with no arguments, from a cold cache.

Runs the command exactly as a user would (a fresh process, an empty token/tokenizer
cache so data preparation is counted), then reads the run's metrics and prints:
wall time, training tokens/s, and held-out bits per byte on the whole validation split.

    python benchmarks/train_default.py              # the default run
    python benchmarks/train_default.py -- --steps 300 --lr 3e-3   # extra options for `llmscratch train`
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm-cache", action="store_true", help="reuse ~/.cache/llmscratch (skip data preparation)")
    parser.add_argument("--json", help="also write the results to this JSON file")
    parser.add_argument("extra", nargs="*", help="options passed on to `llmscratch train` (after --)")
    args = parser.parse_args()

    import torch

    with tempfile.TemporaryDirectory() as tmp:
        env = dict(os.environ)
        if not args.warm_cache:
            env["LLMSCRATCH_CACHE"] = str(Path(tmp) / "cache")
        cmd = [sys.executable, "-m", "llmscratch", "train", "--out-dir", str(Path(tmp) / "runs"),
               "--name", "default", "--no-progress", *args.extra]
        print("running:", " ".join(cmd[1:]), flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, env=env, text=True, capture_output=True)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n")
            return proc.returncode
        run = Path(tmp) / "runs" / "default"
        records = [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]
        train_cfg = json.loads((run / "train_config.json").read_text())
        config = json.loads((run / "config.json").read_text())
    speeds = [r["tokens_per_s"] for r in records if "tokens_per_s" in r][1:]  # the first includes warm-up
    final = [r for r in records if r.get("final")][-1]
    sample = None  # none with --sample-tokens 0
    if "--- generated text ---" in proc.stdout:
        sample = proc.stdout.split("--- generated text ---")[1].split("----------------------")[0].strip()
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "wall_s": round(wall, 1),
        "train_s": round(final["elapsed_s"], 1),
        "tokens_per_s_median": round(statistics.median(speeds)) if speeds else None,
        "steps": train_cfg["steps"],
        "val_loss": round(final["val_loss"], 4),
        "val_bpb": round(final["val_bpb"], 4),
        "val_tokens": final["val_tokens"],
        "model": {k: config[k] for k in ("n_layers", "n_heads", "emb_dim", "context_length", "vocab_size", "pos_emb")},
        "tokenizer": train_cfg["tokenizer"],
        "batch_size": train_cfg["batch_size"],
    }
    print()
    print("| what | value |")
    print("| --- | --- |")
    for key in ("date", "machine", "torch", "wall_s", "train_s", "tokens_per_s_median", "steps", "val_loss",
                "val_bpb", "val_tokens", "model", "tokenizer", "batch_size"):
        print(f"| {key} | {result[key]} |")
    if sample is not None:
        print("\nsample:\n" + sample)
    if args.json:
        Path(args.json).write_text(json.dumps({**result, "sample": sample}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
