"""Instruction fine-tuning of a run (SmolLM2-135M) on the book's examples: all weights against LoRA.

Each kind trains in its own process (so that its peak resident memory is its own), on the same
training examples, for the same number of steps; the held-out response loss is measured before
and after on the same validation and test examples, and five test responses are printed beside
their references.

    llmscratch import smollm2 runs/smollm2
    python benchmarks/finetune_instruct.py runs/smollm2 --data instruction-data.json --steps 10

The split is the book's 85/5/10 (seeded, as `finetune` makes it); ``--held-out N`` keeps the
first N validation and test examples (a CPU cannot afford the whole held-out set twice per run).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path


def split_files(data: str, out: Path, seed: int, held_out: int) -> tuple[Path, Path, Path]:
    """The book's split of ``data`` as ``finetune`` makes it, written as train / val / test files."""
    from llmscratch.training.instruct import read_examples, split_examples

    train, val, test = split_examples(read_examples(data), seed, 0.05, 0.1)
    paths = []
    for name, examples in (("train", train), ("val", val[:held_out]), ("test", test[:held_out])):
        path = out / f"{name}.json"
        path.write_text(json.dumps([e.record for e in examples], indent=1), encoding="utf-8")
        paths.append(path)
    return paths[0], paths[1], paths[2]


def run_kind(args: argparse.Namespace, kind: str, files: tuple[Path, Path, Path], out: Path) -> dict:
    """One fine-tuning run in its own process; its numbers from its log and metrics."""
    train, val, test = files
    cmd = [sys.executable, "-m", "llmscratch", "finetune", args.run, "--data", str(train), "--val-data", str(val),
           "--test-data", str(test), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
           "--train", kind, "--eval-every", str(args.steps), "--log-every", "1", "--test-limit", "5",
           "--max-new-tokens", str(args.max_new_tokens), "--out-dir", str(out), "--name", kind.replace("-", "_"),
           "--no-progress", "--seed", str(args.seed)]
    if kind == "lora":
        cmd += ["--lora-rank", str(args.lora_rank), "--lora-alpha", str(args.lora_rank),
                "--lora-targets", args.lora_targets]
    log = subprocess.run(cmd, capture_output=True, text=True)
    if log.returncode != 0:
        raise SystemExit(f"{kind}: failed\n{log.stdout}\n{log.stderr}")
    run_dir = out / kind.replace("-", "_")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r and r["step"] > 1)  # not the first
    rates = rates or sorted(r["tokens_per_s"] for r in records if "tokens_per_s" in r)
    lines = log.stdout.splitlines()
    return {
        "kind": kind,
        "before": next(r for r in records if r.get("before")),
        "after": next(r for r in records if r.get("after")),
        "tokens_per_s_median": rates[len(rates) // 2] if rates else None,
        "peak": next((line.split(": ", 1)[1] for line in lines if line.startswith("peak memory:")), "?"),
        "learn": next((line for line in lines if line.startswith("fine-tuning ")), ""),
        "responses": [json.loads(line) for line in (run_dir / "test_responses.jsonl").read_text().splitlines()],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="the run to fine-tune (llmscratch import smollm2 DIR)")
    p.add_argument("--data", required=True, help="the book's instruction-data.json")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--held-out", type=int, default=20, help="validation and test examples kept (default 20 each)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--lora-targets", default="query,key,value,out,mlp_in,mlp_out")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--kinds", default="all,lora")
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--out", help="where the runs go (default: a temporary folder)")
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="ft-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    files = split_files(args.data, out, args.seed, args.held_out)
    results = [run_kind(args, kind, files, out) for kind in args.kinds.split(",")]
    print(f"{args.steps} steps of {args.batch_size} examples each; held-out response loss on {args.held_out} "
          "validation and test examples of the book's 85/5/10 split")
    print("| train | what learns | val loss before → after | test loss before → after | tokens/s (median) | peak memory |")
    print("| --- | --- | --- | --- | --- | --- |")
    for r in results:
        learn = r["learn"].split("learn)")[0].split(": ", 1)[-1] + "learn" if "learn)" in r["learn"] else "?"
        print(f"| {r['kind']} | {learn} | {r['before']['val_response_loss']:.3f} → {r['after']['val_response_loss']:.3f} "
              f"| {r['before']['test_response_loss']:.3f} → {r['after']['test_response_loss']:.3f} "
              f"| {r['tokens_per_s_median']:,.0f} | {r['peak']} |")
    for r in results:
        print(f"\n--- {r['kind']}: five test responses ---")
        for rec in r["responses"][:5]:
            print(json.dumps({"instruction": rec["instruction"], "input": rec.get("input", ""),
                              "reference": rec["output"], "model_response": rec["model_response"]},
                             ensure_ascii=False))


if __name__ == "__main__":
    main()
