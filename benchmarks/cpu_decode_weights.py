"""Decoding on a CPU with the weights as PyTorch leaves them, laid out, and packed: a table.

``generate.choose_weight_layout`` times every weight shape of the model three ways (row-major,
column-major, a oneDNN-packed copy) and keeps the fastest. This script shows what that buys
end to end: a random-weight model of ``--preset`` decodes greedily with the KV cache from an
8-token prompt per row, ``--new-tokens`` tokens for every row, in three copies of the same
model — as built (row-major, MKL), after ``choose_weight_layout(pack=False)``, and after
``choose_weight_layout()`` — and, with ``--peers``, Hugging Face ``transformers``' ``generate``
with the same shape. The copies run interleaved (A, B, C, A, B, C, …) so a passing load on a
shared machine hits them alike; the table gives the median of ``--repeats`` runs after a
warm-up, and every greedy output is checked to be the same tokens. Usage::

    python benchmarks/cpu_decode_weights.py --preset gpt2-124m --batches 1 4 8 --threads 2 --peers
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time
from typing import Callable

import torch

from llmscratch.inference.generate import SamplingConfig, choose_weight_layout, generate
from llmscratch.nn.model import GPT, PRESETS, GPTConfig
from llmscratch.runtime import keep_freed_memory


def hf_runner(model: GPT, prompts: torch.Tensor, new_tokens: int) -> Callable[[], list[list[int]]]:
    """``transformers``' GPT2LMHeadModel with our weights' shape (random weights), greedy with its cache."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = model.cfg
    hf = GPT2LMHeadModel(GPT2Config(
        vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim, n_layer=cfg.n_layers,
        n_head=cfg.n_heads, activation_function="gelu_new", tie_word_embeddings=cfg.tie_weights,
        bos_token_id=None, eos_token_id=None, pad_token_id=0,
    )).eval()

    def run() -> list[list[int]]:
        with torch.no_grad():
            out = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, use_cache=True)
        return out[:, prompts.shape[1]:].tolist()  # (B, new_tokens)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="gpt2-124m", choices=sorted(PRESETS), help="model shape (default gpt2-124m)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8], help="rows decoded together (default 1 8)")
    parser.add_argument("--new-tokens", type=int, default=100, help="tokens per row and run (default 100)")
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per copy; the median is shown (default 5)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--peers", action="store_true", help="also time transformers' generate")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    keep_freed_memory()  # as `llmscratch generate` does on a CPU

    torch.manual_seed(0)
    cfg = GPTConfig.from_preset(args.preset, drop_rate=0.0)
    built = GPT(cfg).eval()
    sampling = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0)
    print(f"preset {args.preset}: {built.num_parameters():,} parameters, threads {torch.get_num_threads()}, "
          f"prompt 8 tokens, {args.new_tokens} new tokens per row, median of {args.repeats} interleaved runs")
    print("| weights | batch | tokens/s | × as built | ways chosen |")
    print("| --- | --- | --- | --- | --- |")
    for batch in args.batches:
        prompts = torch.randint(0, cfg.vocab_size, (batch, 8), generator=torch.Generator().manual_seed(batch))
        laid, packed = copy.deepcopy(built), copy.deepcopy(built)
        ways = {"laid out": choose_weight_layout(laid, rows=batch, pack=False),
                "laid out or packed": choose_weight_layout(packed, rows=batch)}
        runners = {name: (lambda m=m: generate(m, prompts.tolist(), sampling))
                   for name, m in [("as built", built), ("laid out", laid), ("laid out or packed", packed)]}
        if args.peers:
            runners["transformers generate"] = hf_runner(built, prompts, args.new_tokens)
        seconds: dict[str, list[float]] = {name: [] for name in runners}
        outputs = {}
        for name, run in runners.items():  # warm-up
            run()
        for _ in range(args.repeats):
            for name, run in runners.items():
                start = time.perf_counter()
                outputs[name] = run()
                seconds[name].append(time.perf_counter() - start)
        for name in ("laid out", "laid out or packed"):
            if outputs[name] != outputs["as built"]:
                print(f"  note: {name} gave other tokens than as built (rounding of the products)")
        base = statistics.median(seconds["as built"])
        for name, times in seconds.items():
            median = statistics.median(times)
            chosen = ", ".join(f"{o}x{i} {way}" for (o, i), way in ways.get(name, {}).items()) or "-"
            print(f"| {name} | {batch} | {batch * args.new_tokens / median:,.1f} | {base / median:.2f} | {chosen} |")
        del laid, packed


if __name__ == "__main__":
    main()
