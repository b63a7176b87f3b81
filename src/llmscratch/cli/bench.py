"""``llmscratch bench``: throughput, MFU, memory and attention kernels, with peers side by side."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .commands import command

if TYPE_CHECKING:
    import torch

    from ..nn.model import GPTConfig

PROMPT_TOKENS = 8  # the length of the random prompt the decode section continues


@dataclass
class _Session:
    """What every section of one ``llmscratch bench`` shares, and the record that ``--json`` writes."""

    device: torch.device
    precision: str
    cfg: GPTConfig
    context: int
    peers: list[str]
    compile: bool
    record: dict[str, Any]


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse a count below one, before anything is measured: no traceback, no half table."""
    from ..errors import ConfigError

    counts = {"--batch": args.batch, "--steps": args.steps, "--repeats": args.repeats, "--new-tokens": args.new_tokens,
              "--context": args.context, "--threads": args.threads,
              "--decode-batches": min(args.decode_batches, default=None)}
    for option, value in counts.items():
        if value is not None and value < 1:
            raise ConfigError(f"{option} must be at least 1, got {value}")


def _check_decode_fits(args: argparse.Namespace, cfg: GPTConfig) -> None:
    """Refuse a decode that runs past a learned position table (it would fail mid-run)."""
    from ..errors import ConfigError

    if args.what not in ("decode", "all") or cfg.pos_emb != "learned":
        return
    if PROMPT_TOKENS + args.new_tokens > cfg.context_length:
        raise ConfigError(f"--new-tokens {args.new_tokens} and the {PROMPT_TOKENS}-token prompt do not fit the "
                          f"{cfg.context_length}-token context of preset {args.preset} (learned positions): give "
                          f"--new-tokens {cfg.context_length - PROMPT_TOKENS} or less")


def _start(args: argparse.Namespace) -> _Session:
    """Check the options, choose the device and precision, and print the heading of the run."""
    import torch

    from ..nn.model import GPTConfig
    from ..runtime import resolve_precision, setup_runtime
    from ..tools import bench

    _check_numbers(args)
    if args.json:
        bench.check_json_path(args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = setup_runtime(args.device, "fp32" if args.device == "cpu" else "auto").device
    precision = resolve_precision(args.precision, device)
    cfg = GPTConfig.from_preset(args.preset, drop_rate=0.0)
    context = args.context or cfg.context_length
    _check_decode_fits(args, cfg)
    peers = bench.available_peers() if args.peers else []
    compile_ = device.type == "cuda" if args.compile is None else args.compile
    record: dict[str, Any] = {"environment": bench.environment(device), "preset": args.preset, "batch": args.batch,
                              "context": context, "precision": precision, "peers": peers}
    print(f"llmscratch bench on {record['environment']['device']} (torch {torch.__version__}), preset "
          f"{args.preset}, batch {args.batch}, context {context}, {precision}, peers: {', '.join(peers) or 'none'}")
    return _Session(device, precision, cfg, context, peers, compile_, record)


def _attention(args: argparse.Namespace, s: _Session) -> None:
    """Measure the attention op alone and print its table."""
    import torch

    from ..tools import bench

    shape = (args.batch, s.cfg.n_heads, s.context, s.cfg.head_dim)  # (B, H, T, d)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(s.precision, torch.float32)
    rows = bench.bench_attention(s.device, *shape, dtype=dtype, repeats=args.repeats)
    s.record["attention"] = rows
    print(f"\nattention op, B {shape[0]}, {bench.count(shape[1], 'head')}, T {shape[2]}, d {shape[3]}, causal, "
          f"{s.precision}, fwd+bwd:")
    print(bench.format_attention(rows))


def _train(args: argparse.Namespace, s: _Session) -> None:
    """Measure training steps of ours and the peers and print their table."""
    from ..tools import bench

    names = ["ours"] + [p for p in s.peers if p in bench.PEERS]
    rows = bench.bench_train(s.cfg, s.device, args.batch, s.context, s.precision, names, compile=s.compile,
                             steps=args.steps, repeats=args.repeats, loss_impl=args.loss)
    s.record["train"] = rows
    s.record["peak_tflops_measured"] = bench.measure_peak_tflops(s.device) if s.device.type == "cuda" else None
    print(f"\ntraining, {args.preset}, batch {args.batch}, context {s.context}, {s.precision}, AdamW "
          f"(median of {bench.count(args.repeats, 'run')} of {bench.count(args.steps, 'step')}):")
    print(bench.format_train(rows))


def _decode(args: argparse.Namespace, s: _Session) -> None:
    """Measure greedy decoding of ours and the peers and print its table."""
    from ..tools import bench

    decode_peers = [p for p in ("book", "hf") if args.peers and
                    (p == "hf" and "hf" in s.peers or p != "hf" and "book" in s.peers)]
    rows = bench.bench_decode(s.cfg, s.device, batches=tuple(args.decode_batches), new_tokens=args.new_tokens,
                              prompt_len=PROMPT_TOKENS, repeats=args.repeats, peers=decode_peers)
    s.record["decode"] = rows
    print(f"\ngreedy decoding, {args.preset}, prompt {PROMPT_TOKENS} tokens, "
          f"{bench.count(args.new_tokens, 'new token')} (median of {bench.count(args.repeats, 'run')}):")
    print(bench.format_decode(rows))


SECTIONS = (("attention", _attention), ("train", _train), ("decode", _decode))


def _run_bench(args: argparse.Namespace) -> int:
    from ..tools import bench

    session = _start(args)
    for what, measure in SECTIONS:
        if args.what in (what, "all"):
            measure(args, session)
            if args.json:  # after every section's table, so a run cut short or a failed write keeps it
                bench.write_json(args.json, session.record)
    if args.json:
        bench.write_json(args.json, session.record)
        print(f"\nwrote {args.json}")
    return 0


@command("bench")
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="measure training throughput and MFU, decode speed and the attention op",
        description="Benchmark llmscratch on this device with random weights and tokens, and the peers "
        "(the book's GPTModel/GPTModelFast, transformers' GPT-2) in the same run with --peers. "
        "Prints tables; --json writes every number with the date, device and versions.",
    )
    p.add_argument("what", nargs="?", default="all", choices=["train", "decode", "attention", "all"],
                   help="what to measure (default all)")
    p.add_argument("--preset", default="cpu", help="model preset, e.g. cpu (default), nanogpt-124m, gpt2-124m")
    p.add_argument("--batch", type=int, default=16, help="training (and attention) batch size (default 16)")
    p.add_argument("--context", type=int, default=None, help="training context length (default: the preset's)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="precision of training and of the attention op (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--peers", action="store_true", help="also measure the installed peers, reported as ratios")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also train a torch.compile'd llmscratch model (default: on CUDA only)")
    p.add_argument("--steps", type=int, default=5, help="training steps per timed run (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    p.add_argument("--loss", default="auto", choices=["auto", "plain", "chunked", "kernel"],
                   help="how our model computes the head and loss in training (as in `llmscratch train --loss`)")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens to decode (default 200)")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes (default 1 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, metavar="OUT", help="write all results as JSON to this file")
