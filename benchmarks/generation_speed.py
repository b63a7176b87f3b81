"""Decode speed with and without the KV cache: a script that prints a table, not a test.

A random-weight GPT of the chosen preset generates ``--new-tokens`` tokens greedily from
an 8-token prompt (batch 1), once with the KV cache (prefill, then one token per step)
and once without it (the whole window re-run every step, cut by the window rule of
``llmscratch.inference.generate``). Each timing is the median of ``--repeats`` runs after a short
warm-up. Usage::

    python benchmarks/generation_speed.py --preset cpu --new-tokens 200 --threads 2
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from llmscratch.inference.generate import SamplingConfig, stream
from llmscratch.nn.model import GPT, PRESETS, GPTConfig


def time_one_run(model: GPT, prompt: list[int], sampling: SamplingConfig, use_cache: bool) -> tuple[float, float, int]:
    """Seconds to the first token, seconds in total, and the number of tokens generated."""
    sync = torch.cuda.synchronize if next(model.parameters()).is_cuda else (lambda: None)
    sync()
    start = time.perf_counter()
    first = None
    count = 0
    for _ in stream(model, prompt, sampling, use_cache=use_cache):
        if first is None:
            first = time.perf_counter() - start
        count += 1
    sync()
    return first or 0.0, time.perf_counter() - start, count


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m", choices=sorted(PRESETS), help="model shape (default gpt2-124m)")
    parser.add_argument("--new-tokens", type=int, default=200, help="tokens to generate per run (default 200)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per mode; the median is shown (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(args.preset, drop_rate=0.0)
    model = GPT(cfg).to(args.device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (8,)).tolist()
    # eos_id=None: every run generates exactly --new-tokens tokens.
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    warmup = SamplingConfig(max_new_tokens=4, temperature=0.0)

    print(f"preset {args.preset}: {model.num_parameters():,} parameters, context {cfg.context_length}, "
          f"device {args.device}, threads {torch.get_num_threads()}, prompt 8 tokens, "
          f"{args.new_tokens} new tokens, median of {args.repeats}")
    print(f"{'mode':<10} {'tokens/s':>10} {'first token (ms)':>17} {'total (s)':>10}")
    rows = {}
    for use_cache in (True, False):
        for _ in stream(model, prompt, warmup, use_cache=use_cache):
            pass
        runs = [time_one_run(model, prompt, sampling, use_cache) for _ in range(args.repeats)]
        first = statistics.median(r[0] for r in runs)
        total = statistics.median(r[1] for r in runs)
        count = runs[0][2]
        mode = "cache" if use_cache else "no cache"
        rows[mode] = count / total
        print(f"{mode:<10} {count / total:>10.1f} {first * 1000:>17.1f} {total:>10.2f}")
    print(f"speed-up from the cache: {rows['cache'] / rows['no cache']:.2f}x")


if __name__ == "__main__":
    main()
