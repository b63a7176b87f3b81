"""LoRA against full fine-tuning on a real model: trainable parameters, peak memory, step time.

Each measurement is a fresh process (so its peak memory is its own): it loads the run, adds
LoRA adapters (or not), builds the optimizer the way ``llmscratch train`` does (AdamW over
what trains) and takes ``--steps`` steps on random token windows; the first step is left out
of the time (it allocates the optimizer state). Full and LoRA alternate (full, lora, full,
lora, ...) so a machine shared with other work slows both alike; the ratios are per round.

    python benchmarks/lora_memory.py RUN_DIR                       # e.g. runs/smollm2 (llmscratch import smollm2)
    python benchmarks/lora_memory.py RUN_DIR --rounds 3 --batch 4 --tokens 128 --rank 16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time


def child(args: argparse.Namespace) -> None:
    """One measurement: print a JSON line with the trainable parameters, peak memory and step times."""
    import torch

    from llmscratch.nn.lora import add_lora
    from llmscratch.store.checkpoint import load_model
    from llmscratch.training.config import TrainConfig
    from llmscratch.training.step import build_optimizer, train_step
    from llmscratch.training.train import peak_memory

    torch.manual_seed(0)
    model = load_model(args.run).train()
    if args.mode == "lora":
        add_lora(model, rank=args.rank, alpha=2 * args.rank, targets=args.targets.split(","))
    device = torch.device(args.device)
    model.to(device)
    optimizer = build_optimizer(model, TrainConfig(optimizer="adamw", lr=1e-4), device)
    gen = torch.Generator().manual_seed(1)
    times = []
    for _ in range(args.steps):
        ids = torch.randint(0, model.cfg.vocab_size, (args.batch, args.tokens + 1), generator=gen).to(device)
        t0 = time.perf_counter()
        train_step(lambda x, y: model(x, y), model.parameters(), optimizer, [(ids[:, :-1], ids[:, 1:])])
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    import resource

    print(json.dumps({"mode": args.mode, "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
                      "total": sum(p.numel() for p in model.parameters()),
                      "peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "peak": peak_memory(device), "step_s": statistics.median(times[1:])}))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run directory (its weights are the base)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=4, help="steps per measurement (the first is not timed)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--targets", default="query,value")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--mode", choices=("full", "lora"), help=argparse.SUPPRESS)  # a child process
    args = parser.parse_args()
    if args.mode:
        child(args)
        return 0
    print(f"# {args.run}, batch {args.batch} × {args.tokens} tokens, LoRA rank {args.rank} on {args.targets}, "
          f"{args.device}; {platform.processor() or platform.machine()}, shared machine; "
          f"{time.strftime('%Y-%m-%d %H:%M')}")
    results: dict[str, list[dict]] = {"full": [], "lora": []}
    for r in range(args.rounds):
        for mode in ("full", "lora"):
            cmd = [sys.executable, __file__, *sys.argv[1:], "--mode", mode]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            results[mode].append(json.loads(out.strip().splitlines()[-1]))
        full, lora = results["full"][-1], results["lora"][-1]
        print(f"round {r + 1}: full {full['step_s']:.2f} s/step, {full['peak_rss_kib'] / 2**20:.2f} GiB; "
              f"lora {lora['step_s']:.2f} s/step, {lora['peak_rss_kib'] / 2**20:.2f} GiB; "
              f"time lora/full {lora['step_s'] / full['step_s']:.2f}, "
              f"memory lora/full {lora['peak_rss_kib'] / full['peak_rss_kib']:.2f}")
    print("| | trainable parameters | peak resident memory (median) | s/step (median) |")
    print("| --- | --- | --- | --- |")
    for mode, runs in results.items():
        print(f"| {mode} | {runs[0]['trainable']:,} of {runs[0]['total']:,} | "
              f"{statistics.median(x['peak_rss_kib'] for x in runs) / 2**20:.2f} GiB | "
              f"{statistics.median(x['step_s'] for x in runs):.2f} |")
    ratios = [b["step_s"] / a["step_s"] for a, b in zip(results["full"], results["lora"])]
    memory = [b["peak_rss_kib"] / a["peak_rss_kib"] for a, b in zip(results["full"], results["lora"])]
    print(f"median per-round ratio lora/full: time {statistics.median(ratios):.2f}, memory {statistics.median(memory):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
