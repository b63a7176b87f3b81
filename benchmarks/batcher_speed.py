"""Aggregate decode speed of the continuous batcher at 1, 4 and 16 concurrent clients: a script, not a test.

A random-weight GPT of the chosen preset (gpt2-124m by default) serves ``C`` clients at once
through one :class:`llmscratch.inference.batcher.Batcher`: each client is a thread that submits
``--requests`` requests one after the other (the next when the last is done), each greedy with
``--new-tokens`` new tokens, after prompts of mixed lengths (``--prompt-lengths``, one per
request in turn). The aggregate speed of a round is every completion token of every client over
the round's wall time (the prefills included); beside it, per second of this process's CPU time
(``time.process_time``, every thread), which a machine shared with other work disturbs less. The client counts take turns round after round
(1, 4, 16, 1, 4, 16, …), so that a load passing on a shared machine slows them alike; each
round's ratios to one client and their medians are printed. Usage::

    python benchmarks/batcher_speed.py --threads 2 --rounds 3
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import torch

from llmscratch.inference.batcher import Batcher
from llmscratch.inference.engine import Engine
from llmscratch.inference.generate import SamplingConfig, choose_weight_layout
from llmscratch.nn.model import GPT, PRESETS, GPTConfig


class IdTokenizer:
    """Enough of a tokenizer for the batcher (no files): the model's whole vocabulary, each id one character."""

    kind = "ids"
    eot_id = None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size = vocab_size

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(0x4E00 + i % 20000) for i in ids)


def one_round(batcher: Batcher, clients: int, requests: int, prompts: list[list[int]], sampling: SamplingConfig
              ) -> tuple[float, float, int]:
    """Wall and CPU seconds for ``clients`` threads to finish ``requests`` requests each, and the completion tokens made."""
    tokens = [0] * clients

    def client(c: int) -> None:
        for r in range(requests):
            request = batcher.submit(prompts[(c * requests + r) % len(prompts)], sampling)
            request.wait()
            assert request.finish_reason == "length", (request.finish_reason, request.error)
            tokens[c] += request.completion_tokens

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start, cpu = time.perf_counter(), time.process_time()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - start, time.process_time() - cpu, sum(tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m", choices=sorted(PRESETS), help="model shape (default gpt2-124m)")
    parser.add_argument("--clients", default="1,4,16", help="concurrent clients to compare (default 1,4,16)")
    parser.add_argument("--requests", type=int, default=2, help="requests per client per round (default 2)")
    parser.add_argument("--new-tokens", type=int, default=64, help="new tokens per request (default 64)")
    parser.add_argument("--prompt-lengths", default="8,24,64,128", help="prompt lengths, in turn (default 8,24,64,128)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of every client count (default 3)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--layout-rows", type=int, default=None,
                        help="lay the CPU weights out for batches of this many rows (generate.choose_weight_layout, "
                             "as Engine.load(rows=...) does; default: the largest client count)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    counts = [int(c) for c in args.clients.split(",")]
    lengths = [int(n) for n in args.prompt_lengths.split(",")]

    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(args.preset, drop_rate=0.0)
    model = GPT(cfg).eval()
    layout = choose_weight_layout(model, rows=args.layout_rows or max(counts))
    engine = Engine(model, IdTokenizer(cfg.vocab_size))
    prompts = [torch.randint(0, cfg.vocab_size, (n,)).tolist() for n in lengths]
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    batcher = Batcher(engine, max_batch=max(counts))
    batcher.start()
    one_round(batcher, 1, 1, prompts[:1], SamplingConfig(max_new_tokens=4, temperature=0.0))  # warm-up

    print(f"preset {args.preset}: {model.num_parameters():,} parameters, cpu threads {torch.get_num_threads()}, "
          f"weights laid out for {args.layout_rows or max(counts)} rows ({sorted(set(layout.values()))}), "
          f"greedy, {args.new_tokens} new tokens, prompts of {lengths} tokens in turn, "
          f"{args.requests} requests per client per round")
    speeds: dict[str, dict[int, list[float]]] = {"wall": {c: [] for c in counts}, "cpu": {c: [] for c in counts}}
    for r in range(args.rounds):
        for c in counts:
            wall, cpu, tokens = one_round(batcher, c, args.requests, prompts, sampling)
            speeds["wall"][c].append(tokens / wall)
            speeds["cpu"][c].append(tokens / cpu)
        for clock, unit in (("wall", "tok/s"), ("cpu", "tok/cpu-s")):
            got = speeds[clock]
            ratios = "  ".join(f"{c}:{got[c][-1] / got[counts[0]][-1]:.2f}x" for c in counts[1:])
            print(f"round {r + 1} {clock:4}: " + "  ".join(f"{c} clients {got[c][-1]:7.1f} {unit}" for c in counts)
                  + f"   ratios to {counts[0]}: {ratios}", flush=True)
    batcher.stop(grace_s=0)
    for clock, unit in (("wall", "tok/s"), ("cpu", "tok/cpu-s")):
        got = speeds[clock]
        print(f"median {clock:4}: " + "  ".join(f"{c} clients {statistics.median(got[c]):7.1f} {unit}" for c in counts))
        for c in counts[1:]:
            per_round = [s / base for s, base in zip(got[c], got[counts[0]])]
            print(f"  {clock} {c} clients / {counts[0]}: median of per-round ratios {statistics.median(per_round):.2f}x "
                  f"({', '.join(f'{x:.2f}' for x in per_round)})")


if __name__ == "__main__":
    main()
