"""The loss alone at GPT-2's shape: our Triton kernel in each configuration against PyTorch's loss.

Logits of 16,384 tokens (batch 16 × 1024) over GPT-2's vocabulary padded to 50,304 columns,
bf16, random. Each row of the table computes the mean loss and its gradient with respect to
the logits, timed between CUDA events (median of ``--repeats`` calls after warm-up):

* our kernel (``kernels.cross_entropy_rows``) in each of ``kernels.CONFIGS`` and autotuned;
* ``F.cross_entropy`` on the sliced, float32-cast logits, forward + backward, eager and under
  ``torch.compile`` (what the plain training path does).

"GB/s" counts the bytes the kernel must move at least: the bf16 logits read once and their
gradient written once (2 × 1.65 GB); the kernel reads the logits twice.

    PYTHONPATH=src python3 benchmarks/loss_kernel.py --json /tmp/loss_kernel.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable

import torch
import torch.nn.functional as F

from llmscratch.nn import kernels


def time_ms(fn: Callable[[], object], repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=16 * 1024,
                    help="tokens, i.e. rows of the logits (default %(default)s: batch 16 × context 1024)")
    ap.add_argument("--vocab", type=int, default=50257,
                    help="real vocabulary: targets and the loss use the first VOCAB columns (default %(default)s, GPT-2's)")
    ap.add_argument("--padded", type=int, default=50304,
                    help="columns of the logits, the vocabulary padded for the kernels (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=20,
                    help="timed calls per row; the table shows their median (default %(default)s)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file (default: none)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("benchmarks/loss_kernel.py needs a CUDA GPU")
    torch.manual_seed(0)
    logits = (torch.randn(args.rows, args.padded, device="cuda") * 4).to(torch.bfloat16)  # (N, V_pad)
    targets = torch.randint(0, args.vocab, (args.rows,), device="cuda")  # (N,)
    moved_gb = 2 * logits.numel() * logits.element_size() / 1e9
    rows = []

    def record(name: str, ms: float) -> None:
        rows.append({"variant": name, "ms": ms, "gb_per_s": moved_gb / (ms / 1e3)})
        print(f"| {name:<52} | {ms:7.3f} | {moved_gb / (ms / 1e3):8.0f} |", flush=True)

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; logits {tuple(logits.shape)} bf16\n")
    print(f"| {'variant':<52} |      ms |     GB/s |\n| --- | --- | --- |")
    for config in kernels.CONFIGS:
        kernel = kernels.build_kernel([config])
        ms = time_ms(lambda: kernels._triton_rows(logits, targets, args.vocab, kernel), args.repeats)
        record(f"kernel: block {config[0]}, {config[1]} warps", ms)
    ms = time_ms(lambda: kernels._triton_rows(logits, targets, args.vocab), args.repeats)
    record(f"kernel, autotuned ({kernels._KERNEL.best_config})"[:52], ms)

    leaf = logits.detach().requires_grad_(True)

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(x[:, : args.vocab].float(), targets)

    for name, fn in (("eager", loss_of), ("torch.compile", torch.compile(loss_of))):
        record(f"F.cross_entropy, fwd + bwd, {name}", time_ms(lambda: torch.autograd.grad(fn(leaf), leaf), args.repeats))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                       "shape": list(logits.shape), "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
