"""Variants of the compiled training step, side by side, in one GPU call.

nanoGPT's GPT-2 small shape (``nanogpt-124m``), batch 16, context 1024, bf16 autocast, fused
AdamW, gradient clipping: the step of ``llmscratch bench train`` (``bench._TrainStep``), timed
the same way (warm-up steps that include compilation, then the median of ``--repeats`` runs of
``--steps`` back-to-back steps between CUDA events). Variants, in order of priority:

1. the default: ``torch.compile(model)``, SDPA kernel by bench's probe, the loss by
   ``kernels.head_cross_entropy`` (the Triton cross-entropy kernel), with a kernel profile;
2. the plain loss as before (logits sliced to the real vocabulary, ``F.cross_entropy``);
3. peers: the book's GPTModelFast and transformers' GPT2LMHeadModel (sdpa), eager, as in bench;
4. CUDA graphs (``mode="reduce-overhead"``);
5. the plain loss on the padded logits (padded columns set to −inf instead of sliced off);
6. the best of the above at batch 32;
7. Inductor's ``coordinate_descent_tuning`` with the kernel loss;
8. the chunked head + loss (``GPT.loss_impl = "chunked"``, the CPU's default);
9. the default again (run-to-run spread);
10. ``mode="max-autotune-no-cudagraphs"`` (Triton matrix-product templates, which can fuse the
    GELU and residual adds into their epilogues; minutes of compilation), only with 150 s left.

``--only`` picks some of 2–10 (the default always runs first).

Each variant prints one line when it finishes and every result is rewritten to ``OUT/variants.json``
at once, so a timeout keeps what was measured. No variant is started after ``--budget`` seconds,
nor one whose estimated time (from the baseline's compile time) would run past ``--hard``.

    PYTHONPATH=src python3 benchmarks/gpu_train_variants.py --out /tmp/variants
"""

from __future__ import annotations

import time

T0 = time.perf_counter()

import argparse  # noqa: E402
import contextlib  # noqa: E402
import gc  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
from typing import Any, Callable, Optional  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from llmscratch.tools import bench  # noqa: E402
from llmscratch.nn.model import GPT, GPTConfig  # noqa: E402
from llmscratch.runtime import setup_runtime  # noqa: E402


def loss_on_padded_logits(self: GPT, x: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """``GPT.loss`` without slicing the padded vocabulary off: its columns are set to −inf instead.

    The same loss and gradients (a −inf logit has probability 0 and gradient 0); the loss
    kernels then run over the padded row length, a multiple of 64, rather than 50,257 columns.
    """
    w = self._head_weight(x)  # (V_pad, C)
    logits = F.linear(x, w)  # (B, T, V_pad)
    padded = torch.arange(w.shape[0], device=x.device) >= self.cfg.vocab_size  # (V_pad,)
    logits = logits.masked_fill(padded, float("-inf"))  # (B, T, V_pad)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1), ignore_index=-100)


def elapsed() -> float:
    return time.perf_counter() - T0


def log(msg: str) -> None:
    print(f"[{elapsed():5.0f}s] {msg}", flush=True)


def sdpa_list(*names: str) -> Callable[[], contextlib.AbstractContextManager]:
    """A context factory that allows only these SDPA kernels, tried in this order."""
    from torch.nn.attention import sdpa_kernel

    backends = [bench._sdpa_backend_enum(n) for n in names]

    def ctx() -> contextlib.AbstractContextManager:
        try:
            return sdpa_kernel(backends, set_priority=True)
        except TypeError:  # an older torch without set_priority
            return sdpa_kernel(backends[:1])
    return ctx


class Step(bench._TrainStep):
    """bench's training step with the SDPA context around forward and backward."""

    def __init__(self, c, cfg, batch, context, device, ctx: Callable[[], contextlib.AbstractContextManager],
                 around_backward: bool):
        super().__init__(c, cfg, batch, context, device, "bf16")
        self.ctx, self.around_backward = ctx, around_backward
        self.autocast_device = device.type

    def __call__(self) -> None:
        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        with self.ctx():
            with torch.autocast(self.autocast_device, dtype=torch.bfloat16):
                loss = self.c.loss_fn(x, y)
            if self.around_backward:
                loss.backward()
        if not self.around_backward:
            loss.backward()
        torch.nn.utils.clip_grad_norm_(self.c.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        self.last_loss = loss.detach()


KINDS = [("loss (our Triton kernel)", r"cross_entropy_rows"),
         ("Triton (Inductor fusions)", r"^triton_"),
         ("matmul (cuBLAS/CUTLASS)", r"gemm|nvjet|xmma|cutlass|cublas|splitK|Kernel2"),
         ("attention (SDPA)", r"cudnn|flash|fmha|sdpa|attention"),
         ("optimizer (fused AdamW)", r"adam|Adam"),
         ("clip / foreach / other aten", r".")]


def profile_steps(step: Step, step_ms: float, n: int = 3) -> dict[str, Any]:
    """Kernel time per step of ``n`` profiled steps: top kernels and time by kind."""
    from torch.profiler import ProfilerActivity, profile

    bench.synchronize(step.device)
    activities = [ProfilerActivity.CUDA] if step.device.type == "cuda" else [ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        for _ in range(n):
            step()
        bench.synchronize(step.device)
    kernels = []
    for e in prof.key_averages():
        us = getattr(e, "self_device_time_total", 0) or getattr(e, "device_time_total", 0) \
            or getattr(e, "self_cuda_time_total", 0)
        if us:
            kernels.append((us / n / 1000, e.count / n, e.key))
    kernels.sort(reverse=True)
    total = sum(k[0] for k in kernels) or 1e-9
    kinds: dict[str, float] = {}
    for ms, _, name in kernels:
        kind = next(label for label, pattern in KINDS if re.search(pattern, name))
        kinds[kind] = kinds.get(kind, 0.0) + ms
    lines = [f"kernel time per step {total:.2f} ms of a {step_ms:.2f} ms step (GPU busy {100 * total / step_ms:.1f}%)",
             "", "| kind | ms/step | % of kernel time |", "| --- | --- | --- |"]
    lines += [f"| {k} | {v:.2f} | {100 * v / total:.1f} |" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1])]
    lines += ["", "| ms/step | calls/step | kernel |", "| --- | --- | --- |"]
    lines += [f"| {ms:.3f} | {calls:.0f} | {name[:150]} |" for ms, calls, name in kernels[:40]]
    return {"kernel_ms_per_step": total, "busy": total / step_ms, "kinds_ms": kinds,
            "top": [{"ms": ms, "calls": calls, "name": name[:300]} for ms, calls, name in kernels[:60]],
            "text": "\n".join(lines)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=os.environ.get("OUT", "/tmp/variants"),
                    help="folder for variants.json and profile.md (default: $OUT if set, else /tmp/variants)")
    ap.add_argument("--preset", default="nanogpt-124m", help="model preset to train (default %(default)s)")
    ap.add_argument("--batch", type=int, default=16, help="sequences per step (default %(default)s)")
    ap.add_argument("--context", type=int, default=1024, help="tokens per sequence (default %(default)s)")
    ap.add_argument("--steps", type=int, default=10,
                    help="back-to-back steps in one timed run (default %(default)s)")
    ap.add_argument("--repeats", type=int, default=5,
                    help="timed runs per variant; the step time is their median (default %(default)s)")
    ap.add_argument("--warmup", type=int, default=3,
                    help="untimed steps before timing, compilation included (default %(default)s)")
    ap.add_argument("--chunk", type=int, default=1024,
                    help="tokens per chunk of the chunked head + loss (default %(default)s)")
    ap.add_argument("--budget", type=float, default=290,
                    help="start no variant after this many seconds since the script started (default %(default)s)")
    ap.add_argument("--hard", type=float, default=325,
                    help="start no variant whose estimated end is past this many seconds since the script started "
                    "(default %(default)s)")
    ap.add_argument("--no-peers", action="store_true",
                    help="skip the peer models (the book's GPTModelFast, transformers' GPT-2) (default: run them)")
    ap.add_argument("--only", default="", help="comma-separated variants after the default: plain, peers, "
                    "cudagraphs, padded, batch32, cdt, chunked, again, autotune (default: all, in that order)")
    ap.add_argument("--smoke", action="store_true",
                    help="CPU dry run of the control flow: test preset, eager backend, tiny sizes (default: off)")
    args = ap.parse_args()
    if args.smoke:
        args.preset, args.batch, args.context, args.steps, args.repeats, args.warmup, args.chunk = "test", 2, 32, 1, 2, 2, 16
    os.makedirs(args.out, exist_ok=True)

    runtime = setup_runtime("cpu" if args.smoke else "cuda", "bf16")
    device = runtime.device
    # A cached AOTAutograd graph could be reused across SDPA settings; Inductor's own cache is
    # keyed on the traced graph (which names the SDPA kernel), so it stays on.
    try:
        torch._functorch.config.enable_autograd_cache = False
    except AttributeError:
        pass
    cfg = GPTConfig.from_preset(args.preset)
    cfg = GPTConfig.from_dict({**cfg.to_dict(), "context_length": max(args.context, cfg.context_length)})
    record: dict[str, Any] = {"env": bench.environment(device), "preset": args.preset, "context": args.context,
                              "steps": args.steps, "repeats": args.repeats, "warmup": args.warmup,
                              "rows": [], "skipped": []}
    if device.type == "cuda":
        record["env"]["gpu_memory_gb"] = torch.cuda.get_device_properties(device).total_memory / 1e9
    peak = bench.measure_peak_tflops(device)
    sheet = bench.datasheet_tflops(device)
    probe = bench.fastest_sdpa_backend(device, args.batch, cfg.n_heads, args.context, cfg.head_dim, torch.bfloat16)
    record.update(peak_tflops=peak, datasheet_tflops=sheet, sdpa_probe=probe)
    log(f"{record['env']['device']}, torch {torch.__version__}, peak bf16 {peak:.1f} TFLOP/s, SDPA probe: {probe}")

    def save() -> None:
        with open(os.path.join(args.out, "variants.json"), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2, default=str)

    save()
    compile_s: list[float] = []  # the baseline's compile time, the unit of the estimates

    def estimate(kind: str) -> float:
        c = compile_s[0] if compile_s else 60.0
        return {"cached": 0.5 * c + 8, "fresh": c + 8, "cdt": 2.5 * c + 10, "peer": 12,
                "autotune": max(150.0, 4 * c)}[kind]

    def may_start(name: str, kind: str) -> bool:
        est, now = estimate(kind), elapsed()
        why = None
        if now > args.budget:
            why = f"past the {args.budget:.0f}s budget"
        elif now + est > args.hard:
            why = f"estimate {est:.0f}s would end past {args.hard:.0f}s"
        elif kind == "autotune" and args.hard - now < 150:
            why = "under 150s left"
        if why:
            log(f"skip {name}: {why}")
            record["skipped"].append({"variant": name, "why": why, "at_s": now})
            save()
        return why is None

    def measure(name: str, c: bench.Contender, step: Step, batch: int, extra: dict[str, Any],
                profile: bool = False) -> Optional[dict[str, Any]]:
        t0 = time.perf_counter()
        step()
        bench.synchronize(device)
        first_loss = float(step.last_loss)  # at the initial weights: the same in every variant at one batch
        for _ in range(args.warmup - 1):
            step()
        bench.synchronize(device)
        warm = time.perf_counter() - t0
        times = [bench.time_call(step, device, args.steps) for _ in range(args.repeats)]
        seconds = statistics.median(times)
        tps = batch * args.context / seconds
        fpt = bench.flops_per_token(cfg, c.matmul_params, args.context)
        row = {"variant": name, "batch": batch, "tokens_per_s": tps, "step_ms": 1000 * seconds,
               "step_ms_min": 1000 * min(times), "step_ms_max": 1000 * max(times),
               "mfu_measured_peak": tps * fpt / (peak * 1e12), "mfu_datasheet": tps * fpt / (sheet * 1e12) if sheet else None,
               "peak_memory_gb": torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else 0.0,
               "warmup_s": warm,
               "first_loss": first_loss, "last_loss": float(step.last_loss), "flops_per_token": fpt,
               "at_s": elapsed(), **extra}
        record["rows"].append(row)
        log(f"{name:<46} B{batch}: {tps:>9,.0f} tok/s {1000 * seconds:7.2f} ms (min {row['step_ms_min']:.2f} "
            f"max {row['step_ms_max']:.2f}) MFU {100 * row['mfu_measured_peak']:.1f}% peak {row['peak_memory_gb']:.2f} GB "
            f"warm-up {warm:.1f}s loss0 {first_loss:.4f}")
        if profile:
            try:
                prof = profile_steps(step, 1000 * seconds)
                record["profile"] = {"variant": name, **{k: v for k, v in prof.items() if k != "text"}}
                with open(os.path.join(args.out, "profile.md"), "w", encoding="utf-8") as f:
                    f.write(f"# Kernel profile: {name}, batch {batch}\n\n{prof['text']}\n")
                log("profile: " + prof["text"].split("\n")[0])
                for line in prof["text"].split("\n")[4:4 + len(prof["kinds_ms"])]:
                    log("  " + line)
            except Exception as err:  # the profile is extra: never lose the row for it
                log(f"profile failed: {err!r}"[:300])
        save()
        return row

    def fresh_memory() -> None:
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)

    def ours(name: str, batch: int = 16, sdpa: str = "probe", compile_kw: Optional[dict] = None,
             loss_impl: str = "auto", profile: bool = False,
             padded_loss: bool = False) -> Optional[dict[str, Any]]:
        fresh_memory()
        compile_kw = compile_kw if compile_kw is not None else {}
        try:
            torch.manual_seed(0)
            model = GPT(cfg).to(device)
            model.loss_impl, model.loss_chunk = loss_impl, args.chunk
            if args.smoke and loss_impl == "auto":
                model.loss_impl = "kernel"  # what "auto" is on CUDA with Triton (on the CPU: its reference)
            if padded_loss:
                model.loss = loss_on_padded_logits.__get__(model)  # this instance only
            compiled = torch.compile(model, backend="eager") if args.smoke else torch.compile(model, **compile_kw)
            c = bench.Contender(name, model, compiled, bench._count(model, model.pos_emb))
            if sdpa == "probe":
                ctx, around = (lambda: bench.sdpa_context(probe)), False
            elif sdpa == "default":
                ctx, around = contextlib.nullcontext, False
            else:
                ctx, around = sdpa_list(*sdpa.split("+")), True
            step = Step(c, cfg, batch, args.context, device, ctx, around)
            extra = {"sdpa": probe if sdpa == "probe" else sdpa, "sdpa_spec": sdpa, "compile": compile_kw,
                     "loss_impl": model.loss_implementation(device), "padded_loss": padded_loss}
            row = measure(name, c, step, batch, extra, profile=profile)
            del c, step, model, compiled
            return row
        except Exception as err:  # a failing variant must not lose the others
            record["rows"].append({"variant": name, "batch": batch, "error": repr(err)[:500], "at_s": elapsed()})
            log(f"{name} failed: {err!r}"[:400])
            save()
            return None

    def peer(key: str) -> None:
        fresh_memory()
        try:
            torch.manual_seed(0)
            c = bench.build_contender(key, cfg, device)
            step = Step(c, cfg, args.batch, args.context, device, contextlib.nullcontext, False)
            measure(c.name, c, step, args.batch, {"peer": True, "note": c.note})
            del c, step
        except Exception as err:
            record["rows"].append({"variant": key, "error": repr(err)[:500], "at_s": elapsed()})
            log(f"peer {key} failed: {err!r}"[:400])
            save()

    b = args.batch
    t = time.perf_counter()
    base = ours("default: compile, Triton loss kernel (loss_impl auto)", b, profile=True)
    compile_s.append(base["warmup_s"] if base else 60.0)
    log(f"first warm-up (compile) {compile_s[0]:.1f}s; estimates: cached {estimate('cached'):.0f}s, "
        f"fresh {estimate('fresh'):.0f}s, cdt {estimate('cdt'):.0f}s, autotune {estimate('autotune'):.0f}s "
        f"(it took {time.perf_counter() - t:.0f}s)")
    try:  # which block size and warps the loss kernel's autotuner chose
        from llmscratch.nn import kernels
        record["loss_kernel_config"] = str(kernels._KERNEL.best_config) if kernels._KERNEL else None
        log(f"loss kernel config: {record['loss_kernel_config']}")
    except AttributeError:
        pass
    wanted = set(args.only.split(",")) if args.only else None

    def want(key: str) -> bool:
        return wanted is None or key in wanted

    if want("plain") and may_start("plain loss", "fresh"):
        ours("plain loss: logits sliced, F.cross_entropy (before)", b, loss_impl="plain")
    if want("peers") and not args.no_peers:
        for key in ("book-fast", "hf"):
            if may_start(key, "peer"):
                peer(key)
    if want("cudagraphs") and may_start("cudagraphs", "fresh"):
        ours("CUDA graphs: compile mode reduce-overhead", b, compile_kw={"mode": "reduce-overhead"})
    if want("padded") and may_start("padded loss", "fresh"):
        ours("plain loss on the padded logits (padded columns -inf)", b, loss_impl="plain", padded_loss=True)
    done = [r for r in record["rows"] if r.get("tokens_per_s") and not r.get("peer") and r["batch"] == b]
    if want("batch32") and done and may_start("batch 32", "fresh"):
        best = max(done, key=lambda r: r["tokens_per_s"])
        ours(f"B{2 * b} of best: {best['variant']}", 2 * b, sdpa=best["sdpa_spec"], compile_kw=best["compile"],
             loss_impl=best["loss_impl"], padded_loss=best["padded_loss"])
    if want("cdt") and may_start("coordinate descent", "cdt"):
        ours("Triton loss kernel + coordinate_descent_tuning", b,
             compile_kw={"options": {"coordinate_descent_tuning": True}})
    if want("chunked") and may_start("chunked", "fresh"):
        ours(f"chunked head+loss ({args.chunk} tokens a chunk)", b, loss_impl="chunked")
    if want("again") and may_start("default again", "cached"):
        ours("default again (spread)", b)
    # Triton matrix-product templates, which can take the GELU and residual adds into their epilogues.
    if want("autotune") and may_start("max-autotune-no-cudagraphs", "autotune"):
        ours("max-autotune-no-cudagraphs", b, compile_kw={"mode": "max-autotune-no-cudagraphs"})
    record["total_s"] = elapsed()
    save()
    log("done")


if __name__ == "__main__":
    main()
