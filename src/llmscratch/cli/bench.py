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
    model_name: str  # how headings name the model: "preset cpu" or "run runs/smollm2"


def _check_numbers(args: argparse.Namespace) -> None:
    """Refuse a count below one, before anything is measured: no traceback, no half table."""
    from ..errors import ConfigError

    counts = {"--batch": args.batch, "--steps": args.steps, "--repeats": args.repeats, "--new-tokens": args.new_tokens,
              "--context": args.context, "--threads": args.threads,
              "--decode-batches": min(args.decode_batches, default=None)}
    for option, value in counts.items():
        if value is not None and value < 1:
            raise ConfigError(f"{option} must be at least 1, got {value}")


def _check_decode_fits(args: argparse.Namespace, cfg: GPTConfig, model_name: str) -> None:
    """Refuse a decode that runs past a learned position table (it would fail mid-run)."""
    from ..errors import ConfigError

    if args.what not in ("decode", "all") or cfg.pos_emb != "learned":
        return
    if PROMPT_TOKENS + args.new_tokens > cfg.context_length:
        raise ConfigError(f"--new-tokens {args.new_tokens} and the {PROMPT_TOKENS}-token prompt do not fit the "
                          f"{cfg.context_length}-token context of {model_name} (learned positions): give "
                          f"--new-tokens {cfg.context_length - PROMPT_TOKENS} or less")


def _model_config(args: argparse.Namespace) -> tuple[GPTConfig, str]:
    """The config to measure and how headings name it: ``--run``'s (decode only) or ``--preset``'s (default cpu)."""
    from ..errors import ConfigError
    from ..nn.model import GPTConfig
    from ..store.checkpoint import load_config

    if args.run is None:
        preset = args.preset or "cpu"
        return GPTConfig.from_preset(preset, drop_rate=0.0), f"preset {preset}"
    if args.what != "decode":
        raise ConfigError(f"--run measures a run's own model decoding, not {args.what!r}: give "
                          f"`llmscratch bench decode --run {args.run}` (train and attention take --preset)")
    if args.preset is not None:
        raise ConfigError(f"--run {args.run} and --preset {args.preset} both name the model: give one of them")
    return load_config(args.run), f"run {args.run}"


def _chosen_peers(args: argparse.Namespace) -> list[str]:
    """The peers to measure: none without ``--peers``, every installed one with it alone, else those named."""
    from ..errors import ConfigError
    from ..tools import bench

    if args.peers is None:
        return []
    installed = bench.available_peers()
    if not args.peers:
        return installed
    missing = [p for p in args.peers if p not in installed]
    if missing:
        package = {"hf": "transformers", "book": "llms_from_scratch", "book-fast": "llms_from_scratch"}
        raise ConfigError(f"--peers {' '.join(missing)}: not installed here (pip install "
                          f"{' '.join(sorted({package[p] for p in missing}))}); installed peers: "
                          f"{', '.join(installed) or 'none'}")
    return list(dict.fromkeys(args.peers))


def _start(args: argparse.Namespace) -> _Session:
    """Check the options, choose the device and precision, and print the heading of the run."""
    import torch

    from ..runtime import resolve_precision, setup_runtime
    from ..tools import bench

    _check_numbers(args)
    if args.json:
        bench.check_json_path(args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = setup_runtime(args.device, "fp32" if args.device == "cpu" else "auto").device
    precision = resolve_precision(args.precision, device)
    cfg, model_name = _model_config(args)
    context = args.context or cfg.context_length
    _check_decode_fits(args, cfg, model_name)
    peers = _chosen_peers(args)
    compile_ = device.type == "cuda" if args.compile is None else args.compile
    record: dict[str, Any] = {"environment": bench.environment(device), "preset": None if args.run else
                              (args.preset or "cpu"), "run": args.run, "batch": args.batch, "context": context,
                              "precision": precision, "peers": peers}
    print(f"llmscratch bench on {record['environment']['device']} (torch {torch.__version__}), {model_name}, "
          f"batch {args.batch}, context {context}, {precision}, peers: {', '.join(peers) or 'none'}")
    return _Session(device, precision, cfg, context, peers, compile_, record, model_name)


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
    """Measure greedy decoding of ours and the peers (of ``--run``'s model, or a random one) and print its table."""
    from ..store.checkpoint import load_model
    from ..tools import bench

    decode_peers = [p for p in ("book", "hf") if p in s.peers]
    modes = [bench.DECODE_MODES[m] for m in args.decode_modes] if args.decode_modes else None
    model = load_model(args.run) if args.run else None
    rows = bench.bench_decode(s.cfg, s.device, batches=tuple(args.decode_batches), new_tokens=args.new_tokens,
                              prompt_len=PROMPT_TOKENS, repeats=args.repeats, modes=modes, peers=decode_peers,
                              model=model)
    kv = bench.kv_cache_bytes(s.cfg, bench.decode_dtype(s.device))
    s.record["decode"] = rows
    s.record["decode_kv_cache"] = kv
    print(f"\ngreedy decoding, {s.model_name}, prompt {PROMPT_TOKENS} tokens, "
          f"{bench.count(args.new_tokens, 'new token')} (median of {bench.count(args.repeats, 'run')}, timed in "
          f"interleaved rounds; by round: the ratio in each round):")
    print(bench.format_decode(rows, kv))


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
        description="Benchmark llmscratch on this device with random weights and tokens (decode: or a run's model, "
        "--run), and the peers (the book's GPTModel/GPTModelFast, transformers' GPT-2, or its Llama/Qwen class "
        "holding our weights) in the same run with --peers. "
        "Prints tables; --json writes every number with the date, device and versions.",
    )
    p.add_argument("what", nargs="?", default="all", choices=["train", "decode", "attention", "all"],
                   help="what to measure (default all)")
    p.add_argument("--preset", default=None, help="model preset, e.g. cpu (default), nanogpt-124m, gpt2-124m, "
                   "smollm2-135m (random weights)")
    p.add_argument("--run", default=None, metavar="RUN_DIR",
                   help="decode with this run's model (its config and weights; from llmscratch train or import) "
                   "instead of a preset's random one: `bench decode --run RUN_DIR`")
    p.add_argument("--batch", type=int, default=16, help="training (and attention) batch size (default 16)")
    p.add_argument("--context", type=int, default=None, help="training context length (default: the preset's)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="precision of training and of the attention op (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--peers", nargs="*", default=None, choices=["book", "book-fast", "hf"], metavar="PEER",
                   help="also measure peers, reported as ratios: every installed one (--peers alone) or those "
                   "named (book, book-fast, hf); put the section first: `bench decode --peers hf`")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also train a torch.compile'd llmscratch model (default: on CUDA only)")
    p.add_argument("--steps", type=int, default=5, help="training steps per timed run (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    p.add_argument("--loss", default="auto", choices=["auto", "plain", "chunked", "kernel"],
                   help="how our model computes the head and loss in training (as in `llmscratch train --loss`)")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens to decode (default 200)")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes (default 1 8)")
    p.add_argument("--decode-modes", nargs="+", default=None, choices=["no-cache", "cache", "laid-out", "static",
                                                                       "static-compiled"],
                   metavar="MODE", help="our decode modes to measure: no-cache, cache, laid-out (the KV cache with "
                   "the weights laid out for this CPU, as generate does), static, static-compiled (default: no-cache "
                   "cache laid-out static on a CPU, no-cache cache static static-compiled on CUDA)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, metavar="OUT", help="write all results as JSON to this file")
