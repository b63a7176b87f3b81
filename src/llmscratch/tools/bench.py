"""Benchmarks: training throughput and MFU, decode speed, the attention op, and the peers.

Every number here is measured, not estimated, on whatever device runs it, and every claim
against another implementation is a ratio measured in the same run:

* **train**: tokens per second of full optimizer steps (forward, loss, backward, gradient
  clipping, AdamW) on random tokens; model FLOPs utilisation (MFU) against the peak of a
  large bf16 matrix product measured on the same device and against the datasheet; peak
  device memory. Peers: the book's ``GPTModel`` and ``GPTModelFast`` (``llms_from_scratch``)
  and Hugging Face ``GPT2LMHeadModel`` with SDPA attention, built with the same shape.
* **decode**: tokens per second of greedy decoding at batch 1 and 8, without a cache, with
  the KV cache (on the CPU also with the weights laid out as ``generate`` lays them out), and
  with the static cache (compiled into a CUDA graph on CUDA); time to first token; the KV
  cache's bytes per token against multi-head attention's. Of a random model of a preset, or
  of a run's own (``--run``: SmolLM2-135M imported with ``llmscratch import smollm2``). Peers:
  the book's ``generate_text_simple`` (no cache) and its KV-cache model, and ``transformers``'
  ``generate`` (for a Llama-family model, its own Llama/Qwen class holding our weights, so
  both decode the same tokens, which the table checks). The ratio over transformers is also
  taken round by round (``over_transformers_rounds``): on a shared machine it holds steady
  where the tokens/s do not.
* **attention**: the attention op alone, forward and backward: the explicit path, the
  fused path, and each SDPA kernel (flash, efficient, cuDNN, math) where it runs.

Timings are medians of several repeats after a warm-up; on CUDA they are taken with CUDA
events around a run of steps, with no host synchronisation inside the run. On the CPU the
models are timed interleaved (A, B, A, B, ...), so that a load that comes and goes on a
shared machine hits all of them alike. MFU counts ``6·N + 12·L·T·C`` FLOPs per token
(N: the parameters that do matrix products, the tied head included and the position
table left out; the second term is attention's scores and weighted sum), as nanoGPT does.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..nn.model import GPT, GPTConfig, loss_label

# Dense bf16 tensor-core peaks from the vendors' datasheets, TFLOP/s (no sparsity).
DATASHEET_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "GH200": 989.0, "A100": 312.0, "L40S": 362.0,
                         "A10G": 70.0, "RTX 4090": 165.0, "RTX 3090": 71.0}
SDPA_BACKENDS = ("flash", "efficient", "cudnn", "math")
PEERS = ("book", "book-fast", "hf")


# ---------------------------------------------------------------------------- timing


def synchronize(device: torch.device) -> None:
    """Wait for the work queued on a CUDA device (a no-op elsewhere), so a timer stops after it ran."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn: Callable[[], Any], device: torch.device, iters: int = 1) -> float:
    """Seconds per call of ``fn`` over ``iters`` back-to-back calls (CUDA events on CUDA)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1000 / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) / iters


def median_time(fn: Callable[[], Any], device: torch.device, iters: int, repeats: int, warmup: int = 1) -> float:
    """Median over ``repeats`` of the seconds per call, after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    synchronize(device)
    return statistics.median(time_call(fn, device, iters) for _ in range(repeats))


def measure_peak_tflops(device: torch.device, dtype: torch.dtype = torch.bfloat16, n: Optional[int] = None) -> float:
    """TFLOP/s of a large square matrix product on random data: the ceiling MFU is measured against."""
    n = n or (8192 if device.type == "cuda" else 1024)
    dtype = dtype if device.type == "cuda" else torch.float32
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_time(lambda: a @ b, device, iters=10 if device.type == "cuda" else 2, repeats=5, warmup=3)
    return 2 * n**3 / seconds / 1e12


def datasheet_tflops(device: torch.device) -> Optional[float]:
    """The datasheet's dense bf16 peak of this GPU, if we know its name."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key in sorted(DATASHEET_BF16_TFLOPS, key=len, reverse=True):
        if key in name:
            return DATASHEET_BF16_TFLOPS[key]
    return None


def flops_per_token(cfg: GPTConfig, matmul_params: int, context: int) -> float:
    """Training FLOPs per token: 6·N for the matrix products, 12·L·T·C for attention (fwd + bwd)."""
    return 6 * matmul_params + 12 * cfg.n_layers * context * cfg.emb_dim


def environment(device: torch.device) -> dict[str, Any]:
    """Date, device and versions, recorded with every result."""
    env: dict[str, Any] = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else (platform.processor() or "cpu"),
        "torch": torch.__version__, "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }
    if device.type == "cuda":
        env["cuda"] = torch.version.cuda
    for name in ("transformers", "llms_from_scratch", "triton"):
        try:
            module = __import__(name)
            env[name] = getattr(module, "__version__", "installed")
        except ImportError:
            env[name] = None
    return env


# ---------------------------------------------------------------------------- the models


@dataclass
class Contender:
    """One model under test: the module, how to get the loss, and how to count it."""

    name: str
    model: nn.Module
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    matmul_params: int
    sdpa_backend: Optional[str] = None  # run the step under this SDPA kernel (our fastest, by probe)
    note: str = ""
    same_as_peers: bool = True  # built with the configuration the peers run
    compiled: bool = False  # run through torch.compile


def peer_config(cfg: GPTConfig) -> GPTConfig:
    """``cfg`` as the peers can compute it: GPT-2's GELU MLP and learned absolute positions."""
    return dataclasses.replace(cfg, activation="gelu", pos_emb="learned")


def book_config(cfg: GPTConfig) -> dict[str, Any]:
    """The book's config dict with our shape (the book's layers always have biases)."""
    return {"vocab_size": cfg.vocab_size, "context_length": cfg.context_length, "emb_dim": cfg.emb_dim,
            "n_heads": cfg.n_heads, "n_layers": cfg.n_layers, "drop_rate": cfg.drop_rate,
            "qkv_bias": cfg.qkv_bias}


def _count(model: nn.Module, position_table: Optional[nn.Module]) -> int:
    n = sum(p.numel() for p in model.parameters())
    return n - (position_table.weight.numel() if position_table is not None else 0)


def _logits_loss(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The book's loss: cross-entropy of the model's logits, flattened."""
    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        logits = model(x)  # (B, T, V)
        return F.cross_entropy(logits.flatten(0, 1), y.flatten())  # (B·T, V) against (B·T,)
    return loss


CONTENDER_LABELS = {"ours": "llmscratch", "book": "book GPTModel", "book-fast": "book GPTModelFast",
                    "hf": "transformers GPT2LMHeadModel (sdpa)"}


def contender_label(name: str, compiled: bool = False, as_peers: bool = False, loss_impl: str = "auto",
                    device: torch.device = torch.device("cuda")) -> str:
    """The row name of contender ``name`` (a key of :data:`CONTENDER_LABELS`), as tables and JSON show it."""
    label = CONTENDER_LABELS.get(name, name)
    if name != "ours":
        return label
    if as_peers:
        return f"{label} ({'compiled, ' if compiled else ''}as the peers: gelu, learned pos.)"
    label += " (compiled)" if compiled else ""
    return label + (f", {loss_label(loss_impl, device)}" if loss_impl != "auto" else "")


def build_contender(name: str, cfg: GPTConfig, device: torch.device, compile: bool = False,
                    loss_impl: str = "auto") -> Contender:
    """``ours`` (llmscratch's GPT), ``book``, ``book-fast`` or ``hf``, with ``cfg``'s shape, on ``device``.

    The peers get our weight tying by sharing the head with the token embedding, so the
    parameter count and the work per token match. ``loss_impl``: ours's ``GPT.loss_impl``.
    """
    if name == "ours":
        model = GPT(cfg).to(device)
        model.loss_impl = loss_impl
        pos = model.pos_emb if cfg.pos_emb == "learned" else None
        forward = torch.compile(model) if compile else model
        return Contender(contender_label(name, compile), model,
                         lambda x, y: forward(x, y), _count(model, pos), compiled=compile)
    if name in ("book", "book-fast"):
        from llms_from_scratch.ch04 import GPTModel, GPTModelFast

        model = (GPTModel if name == "book" else GPTModelFast)(book_config(cfg)).to(device)
        if cfg.tie_weights:
            model.out_head.weight = model.tok_emb.weight
        return Contender(contender_label(name), model, _logits_loss(model), _count(model, model.pos_emb),
                         note="biases always on" if not cfg.bias else "")
    if name == "hf":
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_cfg = GPT2Config(
            vocab_size=cfg.vocab_size, n_positions=cfg.context_length, n_embd=cfg.emb_dim, n_layer=cfg.n_layers,
            n_head=cfg.n_heads, resid_pdrop=cfg.drop_rate, embd_pdrop=cfg.drop_rate, attn_pdrop=cfg.drop_rate,
            activation_function="gelu_new", layer_norm_epsilon=cfg.layer_norm_eps,
            tie_word_embeddings=cfg.tie_weights, bos_token_id=None, eos_token_id=None,
        )
        hf_cfg._attn_implementation = "sdpa"
        model = GPT2LMHeadModel(hf_cfg).to(device)

        def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits = model(input_ids=x).logits  # (B, T, V)
            return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten())  # (B·T, V) against (B·T,)

        return Contender(contender_label(name), model, loss,
                         _count(model, model.transformer.wpe), note="biases always on" if not cfg.bias else "")
    raise ValueError(f"unknown model {name!r}; choose ours, book, book-fast or hf")


def available_peers() -> list[str]:
    """The peers whose packages are installed here."""
    from importlib import import_module

    found = []
    for module, names in (("llms_from_scratch.ch04", ["book", "book-fast"]), ("transformers", ["hf"])):
        try:
            import_module(module)  # imported, not just found: a package missing its requirements is no peer
        except ImportError:
            continue
        found += names
    return found


# ---------------------------------------------------------------------------- attention kernels

_SDPA_CHOICE: dict[tuple, str] = {}


def _sdpa_backend_enum(name: str):
    from torch.nn.attention import SDPBackend

    return {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[name]


def sdpa_context(backend: Optional[str]) -> contextlib.AbstractContextManager:
    """A context that restricts SDPA to one kernel (no-op for ``None``)."""
    if backend is None:
        return contextlib.nullcontext()
    from torch.nn.attention import sdpa_kernel

    return sdpa_kernel([_sdpa_backend_enum(backend)])


def _attention_fn(variant: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> Callable[[], None]:
    """One forward + backward of causal attention by ``variant``."""
    from ..nn.attention import attend

    grad = torch.randn_like(q)

    def run() -> None:
        if variant == "explicit":
            out, _ = attend(q, k, v, causal=True, backend="explicit")
        elif variant == "fused":
            out, _ = attend(q, k, v, causal=True, backend="fused")
        else:
            with sdpa_context(variant):
                out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.backward(grad)
        q.grad = k.grad = v.grad = None

    return run


def bench_attention(device: torch.device, batch: int = 16, heads: int = 12, tokens: int = 1024, head_dim: int = 64,
                    dtype: Optional[torch.dtype] = None, repeats: int = 5, iters: int = 10) -> list[dict[str, Any]]:
    """Forward + backward time of causal attention: explicit, fused (default dispatch), each SDPA kernel."""
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    q, k, v = (torch.randn(batch, heads, tokens, head_dim, device=device, dtype=dtype, requires_grad=True)
               for _ in range(3))  # (B, H, T, d) each
    rows = []
    for variant in ("explicit", "fused", *SDPA_BACKENDS):
        row: dict[str, Any] = {"variant": variant, "shape": [batch, heads, tokens, head_dim], "dtype": str(dtype)}
        try:
            row["ms"] = 1000 * median_time(_attention_fn(variant, q, k, v), device, iters, repeats, warmup=2)
        except RuntimeError as err:  # this kernel does not run on this device, dtype or shape
            row["ms"], row["error"] = None, str(err).splitlines()[0][:120]
        rows.append(row)
    best = min((r for r in rows if r["variant"] in SDPA_BACKENDS and r["ms"]), key=lambda r: r["ms"], default=None)
    for r in rows:
        r["vs_best_sdpa"] = (r["ms"] / best["ms"]) if (best and r["ms"]) else None
    return rows


def fastest_sdpa_backend(device: torch.device, batch: int, heads: int, tokens: int, head_dim: int,
                         dtype: torch.dtype) -> Optional[str]:
    """The SDPA kernel that runs causal forward + backward fastest at this shape, measured once and cached.

    ``None`` on the CPU (PyTorch's own dispatch is used there).
    """
    if device.type != "cuda":
        return None
    key = (str(device), torch.cuda.get_device_name(device), batch, heads, tokens, head_dim, dtype)
    if key not in _SDPA_CHOICE:
        rows = bench_attention(device, batch, heads, tokens, head_dim, dtype, repeats=3, iters=5)
        best = min((r for r in rows if r["variant"] in ("flash", "efficient", "cudnn") and r["ms"]),
                   key=lambda r: r["ms"], default=None)
        _SDPA_CHOICE[key] = best["variant"] if best else None
    return _SDPA_CHOICE[key]


# ---------------------------------------------------------------------------- training


def _autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


class _TrainStep:
    """One optimizer step of a contender on a rotating set of random batches."""

    def __init__(self, c: Contender, cfg: GPTConfig, batch: int, context: int, device: torch.device, precision: str):
        self.c, self.device, self.precision = c, device, precision
        fused = {"fused": True} if device.type in ("cuda", "cpu") else {}  # the fastest AdamW for every model
        self.opt = torch.optim.AdamW(c.model.parameters(), lr=1e-4, weight_decay=0.1, **fused)
        gen = torch.Generator().manual_seed(0)
        self.batches = [
            tuple(torch.randint(0, cfg.vocab_size, (batch, context), generator=gen).to(device) for _ in range(2))
            for _ in range(4)
        ]  # 4 × (x (B, T), y (B, T))
        self.i = 0
        self.last_loss: Optional[torch.Tensor] = None

    def __call__(self) -> None:
        from ..training.step import train_step

        x, y = self.batches[self.i % len(self.batches)]
        self.i += 1
        with sdpa_context(self.c.sdpa_backend):
            result = train_step(self.c.loss_fn, self.c.model.parameters(), self.opt, [(x, y)], grad_clip=1.0,
                                autocast=lambda: _autocast(self.device, self.precision))
        self.last_loss = result.loss  # read only after the timed run: no host sync per step


def train_plan(names: list[str], cfg: GPTConfig, same: GPTConfig, compile: bool) -> list[tuple[str, bool, GPTConfig]]:
    """The rows :func:`bench_train` measures, in order: ``(name, compiled, config)``.

    ``ours`` runs with ``cfg`` (and compiled when ``compile``); a peer with ``same``, the
    configuration it can compute. Where the two differ and a peer is in ``names``, ours runs
    with ``same`` as well, so that every peer has an identical llmscratch row to compare with.
    """
    with_peers = any(name != "ours" for name in names)
    plan = []
    for name in names:
        plan.append((name, False, cfg if name == "ours" else same))
        if name == "ours" and compile:
            plan.append((name, True, cfg))
        if name == "ours" and with_peers and same != cfg:
            plan.append((name, False, same))
            if compile:
                plan.append((name, True, same))
    return plan


@dataclass
class _TrainBench:
    """What every row of one :func:`bench_train` shares: the shape, the device and the peaks MFU divides by."""

    cfg: GPTConfig  # ours, its context widened to the one measured
    same: GPTConfig  # the peers' configuration (:func:`peer_config`)
    device: torch.device
    batch: int
    context: int
    precision: str
    loss_impl: str
    backend: Optional[str]  # our SDPA kernel, the fastest at this shape (None: PyTorch's dispatch)
    peak: Optional[float]  # TFLOP/s of a large matrix product measured here (CUDA only)
    sheet: Optional[float]  # TFLOP/s of the datasheet, if the GPU is known

    def label(self, name: str, compiled: bool, config: GPTConfig) -> str:
        """The row name of a planned contender."""
        return contender_label(name, compiled, as_peers=name == "ours" and config != self.cfg,
                               loss_impl=self.loss_impl, device=self.device)

    def setup(self, name: str, compiled: bool, config: GPTConfig) -> tuple[Contender, _TrainStep]:
        """Build a planned contender (seeded, so every row starts from the same weights) and its step."""
        torch.manual_seed(0)
        c = build_contender(name, config, self.device, compile=compiled, loss_impl=self.loss_impl)
        c.name = self.label(name, compiled, config)
        if name == "ours":
            c.sdpa_backend = self.backend
        c.same_as_peers = config == self.same
        return c, _TrainStep(c, config, self.batch, self.context, self.device, self.precision)

    def row(self, c: Contender, step: _TrainStep, times: list[float], peak_bytes: Optional[int]) -> dict[str, Any]:
        """The row of a measured contender: ``times`` are seconds per step, one per repeat."""
        seconds = statistics.median(times)
        tps = self.batch * self.context / seconds
        fpt = flops_per_token(self.cfg, c.matmul_params, self.context)  # positions and activation change no matmul
        loss = float(step.last_loss) if step.last_loss is not None else float("nan")
        return {"model": c.name, "same_as_peers": c.same_as_peers, "compiled": c.compiled, "tokens_per_s": tps,
                "step_ms": 1000 * seconds,
                "step_ms_runs": [1000 * t for t in times],  # one per repeat; interleaved: run i of every row is round i
                "loss": loss,
                "params": sum(p.numel() for p in c.model.parameters()), "flops_per_token": fpt,
                "mfu_measured_peak": tps * fpt / (self.peak * 1e12) if self.peak else None,
                "mfu_datasheet": tps * fpt / (self.sheet * 1e12) if self.sheet else None,
                "peak_memory_gb": peak_bytes / 1e9 if peak_bytes is not None else None,
                "sdpa_backend": c.sdpa_backend, "note": c.note,
                "loss_impl": c.model.loss_implementation(self.device) if isinstance(c.model, GPT) else None}

    def error_row(self, name: str, compiled: bool, config: GPTConfig, err: Exception) -> dict[str, Any]:
        """The row of a contender that failed to build or to run, with the reason."""
        return {"model": self.label(name, compiled, config), "error": repr(err)[:300]}


def _train_interleaved(bench: _TrainBench, plan: list[tuple[str, bool, GPTConfig]], steps: int, repeats: int,
                       warmup: int) -> list[dict[str, Any]]:
    """Time every planned contender round by round (A, B, A, B, ...): a passing load hits all alike.

    Every model is alive at once, so no peak memory is measured. The rows of the contenders
    that failed come first, then the measured ones in the plan's order.
    """
    rows: list[dict[str, Any]] = []
    runs: list[tuple[Contender, _TrainStep, list[float]]] = []
    for name, compiled, config in plan:
        try:
            c, step = bench.setup(name, compiled, config)
            for _ in range(warmup):
                step()
        except Exception as err:  # a peer or the compiler (no C++ compiler, say) failing must not lose the rest
            rows.append(bench.error_row(name, compiled, config, err))
            continue
        runs.append((c, step, []))
    for _ in range(repeats):
        for c, step, times in runs:
            times.append(time_call(step, bench.device, steps))
    return rows + [bench.row(c, step, times, None) for c, step, times in runs]


def _train_one_by_one(bench: _TrainBench, plan: list[tuple[str, bool, GPTConfig]], steps: int, repeats: int,
                      warmup: int, log: Callable[[str], None]) -> list[dict[str, Any]]:
    """Time the planned contenders one after another, each freed before the next: on CUDA its peak memory is its own."""
    device = bench.device
    rows: list[dict[str, Any]] = []
    for name, compiled, config in plan:
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        try:
            c, step = bench.setup(name, compiled, config)
            t0 = time.perf_counter()
            for _ in range(warmup):
                step()
            synchronize(device)
            log(f"  {c.name}: warm-up {time.perf_counter() - t0:.1f}s")
            times = [time_call(step, device, steps) for _ in range(repeats)]
            peak_bytes = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
            rows.append(bench.row(c, step, times, peak_bytes))
            del c, step
        except Exception as err:  # a peer or the compiler failing must not lose the other rows
            rows.append(bench.error_row(name, compiled, config, err))
    return rows


def _fastest(rows: list[dict[str, Any]]) -> Optional[dict[str, Any]]:
    """The row with the most tokens per second, or None for no rows."""
    return max(rows, key=lambda r: r["tokens_per_s"]) if rows else None


def add_train_ratios(rows: list[dict[str, Any]]) -> None:
    """Add ``ours_over_this`` and ``eager_over_this`` to the measured rows, in place.

    Our rows are compared with our fastest row. A peer is compared with our fastest row of the
    identical configuration (``ours_over_this``) and with the fastest uncompiled one of it
    (``eager_over_this``: the peers run eagerly).
    """
    ours = [r for r in rows if r.get("model", "").startswith("llmscratch") and r.get("tokens_per_s")]
    peers_ours = [r for r in ours if r["same_as_peers"]]  # a peer is compared with the identical config
    best, best_same = _fastest(ours), _fastest(peers_ours)
    best_eager_same = _fastest([r for r in peers_ours if not r["compiled"]])
    for r in rows:
        if not r.get("tokens_per_s"):
            continue
        mine = r.get("model", "").startswith("llmscratch")
        ref = best if mine else best_same
        if ref:
            r["ours_over_this"] = ref["tokens_per_s"] / r["tokens_per_s"]
        if not mine and best_eager_same:
            r["eager_over_this"] = best_eager_same["tokens_per_s"] / r["tokens_per_s"]  # ours without compile


def bench_train(
    cfg: GPTConfig, device: torch.device, batch: int, context: int, precision: str, names: list[str],
    compile: bool = False, steps: int = 5, repeats: int = 3, warmup: int = 2,
    interleave: Optional[bool] = None, log: Callable[[str], None] = print, loss_impl: str = "auto",
) -> list[dict[str, Any]]:
    """Tokens/s, MFU and peak memory of training steps for each model in ``names``.

    ``ours`` is run eagerly, and compiled too when ``compile``. On CUDA the models are run one
    after another (each freed before the next, so peak memory is its own); elsewhere they are
    interleaved repeat by repeat. Where ``cfg`` uses what the peers lack (relu2, RoPE), ours is
    also run with :func:`peer_config` (compiled too when ``compile``), and the peers' ratios
    compare that identical configuration: ``ours_over_this`` with our fastest such row,
    ``eager_over_this`` with our fastest uncompiled one (the peers run eagerly). ``loss_impl``
    sets how our model computes its loss (``GPT.loss_impl``; other than ``auto``, named in the rows).
    """
    cfg = GPTConfig.from_dict({**cfg.to_dict(), "context_length": max(context, cfg.context_length)})
    interleave = device.type != "cuda" if interleave is None else interleave
    peak = measure_peak_tflops(device) if device.type == "cuda" else None
    sheet = datasheet_tflops(device)
    backend = fastest_sdpa_backend(device, batch, cfg.n_heads, context, cfg.head_dim,
                                   torch.bfloat16 if precision == "bf16" else torch.float32)
    bench = _TrainBench(cfg, peer_config(cfg), device, batch, context, precision, loss_impl, backend, peak, sheet)
    plan = train_plan(names, cfg, bench.same, compile)
    if interleave:
        rows = _train_interleaved(bench, plan, steps, repeats, warmup)
    else:
        rows = _train_one_by_one(bench, plan, steps, repeats, warmup, log)
    add_train_ratios(rows)
    return rows


# ---------------------------------------------------------------------------- decoding

# A decode runner decodes every new token greedily and returns them, ``(B, N)`` on the CPU; it
# calls its argument (if any) once the first new token exists, for the time to first token.
DecodeRun = Callable[[Optional[Callable[[], None]]], torch.Tensor]
# Our decode modes as ``--decode-modes`` spells them (no spaces or commas to quote in a shell).
DECODE_MODES = {"no-cache": "no cache", "cache": "cache", "laid-out": "cache, weights laid out",
                "static": "static", "static-compiled": "static compiled"}


def _decode_runner(mode: str, model: nn.Module, prompt: torch.Tensor, new_tokens: int, compile: bool) -> DecodeRun:
    """A function that decodes ``new_tokens`` greedily after ``prompt (B, T0)`` by ``mode``."""
    from ..inference.generate import SamplingConfig, StaticDecoder, decode_steps

    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    prompts = prompt.tolist()
    if mode in ("cache", "no cache", "cache, weights laid out"):
        def run(first: Optional[Callable[[], None]] = None) -> torch.Tensor:
            tokens = []
            for i, step in enumerate(decode_steps(model, prompts, sampling, use_cache=mode != "no cache")):
                if i == 0 and first:
                    first()
                tokens.append(step.tokens)
            return torch.stack(tokens, dim=1).cpu()  # N × (B,) → (B, N)
        return run
    if mode.startswith("static"):
        decoder = StaticDecoder(model, prompt.shape[0], prompt.shape[1] + new_tokens, compile=compile)

        def run_static(first: Optional[Callable[[], None]] = None) -> torch.Tensor:
            on_first = (lambda _: first()) if first else None
            return decoder.generate(prompt, sampling, on_first_token=on_first).cpu()  # (B, N)
        return run_static
    raise ValueError(mode)


DECODE_PEER_LABELS = {"book": "book GPTModel, no cache", "book-cache": "book GPTModel, KV cache",
                      "hf": "transformers generate (cache)"}


def book_misfits(cfg: GPTConfig) -> list[str]:
    """What of ``cfg``'s shape GPT-2's blocks (the book's ``GPTModel``, transformers' GPT-2) lack; empty where none.

    Positions and the MLP's nonlinearity are not counted: with learned positions and GELU the
    peer does the same work per token, and the decode benchmark compares speed at one shape.
    """
    misfits = []
    if cfg.norm != "layernorm":
        misfits.append(cfg.norm)
    if cfg.activation == "swiglu":
        misfits.append("a SwiGLU MLP")
    if cfg.kv_heads != cfg.n_heads:
        misfits.append(f"grouped-query attention ({cfg.n_heads} query heads, {cfg.kv_heads} K/V heads)")
    if cfg.head_dim * cfg.n_heads != cfg.emb_dim:
        misfits.append(f"heads of {cfg.head_dim} over a {cfg.emb_dim}-wide stream")
    if cfg.ff_hidden != 4 * cfg.emb_dim:
        misfits.append(f"an MLP {cfg.ff_hidden} wide (GPT-2's is 4 · {cfg.emb_dim})")
    if cfg.qk_norm:
        misfits.append("RMSNorm on q and k")
    return misfits


def llama_family(cfg: GPTConfig) -> Optional[str]:
    """The transformers class that computes ``cfg`` (``LlamaForCausalLM``, Qwen2's, Qwen3's); None if none does."""
    from ..errors import CheckpointError, ConfigError
    from ..store.hf_llama import LLAMA_FAMILY, hf_family

    try:
        return LLAMA_FAMILY[hf_family(cfg)]
    except (CheckpointError, ConfigError):
        return None


def peer_skip_reason(name: str, cfg: GPTConfig) -> Optional[str]:
    """Why decode peer ``name`` cannot compute ``cfg`` (the row says so instead of timing it); None where it can."""
    if name == "hf":
        if llama_family(cfg) is not None or not book_misfits(cfg):
            return None
        return "neither transformers' GPT-2 nor its Llama family computes " + ", ".join(book_misfits(cfg))
    misfits = book_misfits(cfg)
    return "the book's GPTModel has GPT-2's blocks, without " + ", ".join(misfits) if misfits else None


def _hf_llama_peer(model: GPT, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """transformers' class of ``model``'s family (Llama, Qwen2, Qwen3) holding ``model``'s own weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..store.hf_llama import hf_llama_config_from_ours, ours_to_hf_llama

    cfg = model.cfg
    fields = hf_llama_config_from_ours(cfg)
    hf_cfg = AutoConfig.for_model(fields.pop("model_type"), **fields)
    hf_cfg.pad_token_id = 0
    hf = AutoModelForCausalLM.from_config(hf_cfg, attn_implementation="sdpa", dtype=torch.float32)
    missing, unexpected = hf.load_state_dict(ours_to_hf_llama(model, cfg), strict=False)
    missing = [k for k in missing if not (cfg.tie_weights and k == "lm_head.weight")]  # tied: the embedding's
    if missing or unexpected:
        raise ValueError(f"our weights do not fill transformers' {type(hf).__name__}: missing {missing}, "
                         f"unexpected {unexpected}")
    return hf.to(device, dtype).eval()


def _hf_generate(hf: nn.Module, prompt: torch.Tensor, new_tokens: int) -> DecodeRun:
    """transformers' greedy ``generate`` with its KV cache, exactly ``new_tokens`` tokens a row."""
    def run(first: Optional[Callable[[], None]] = None) -> torch.Tensor:
        with torch.no_grad():
            out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                              min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)  # (B, T0 + N)
        return out[:, prompt.shape[1]:].cpu()  # (B, N)
    return run


def _peer_decode_runner(name: str, cfg: GPTConfig, device: torch.device, dtype: torch.dtype, prompt: torch.Tensor,
                        new_tokens: int, model: Optional[GPT] = None) -> tuple[str, DecodeRun, bool]:
    """A peer's decoder with the same shape and greedy decoding: ``(label, run, same weights as ours)``.

    The ``hf`` peer of a Llama-family config (:func:`llama_family`) is transformers' own class
    of that family loaded with ``model``'s weights, so it decodes the same tokens as ours; the
    GPT-2 shaped peers have random weights of the same shape. The cached GPT-2 peers get a
    position table long enough for the whole generation (a cached decode never crops its
    window; past its table a learned-position model cannot go on at all).
    """
    torch.manual_seed(0)
    positions = max(cfg.context_length, prompt.shape[1] + new_tokens)
    t0 = prompt.shape[1]
    if name == "book":
        from llms_from_scratch.ch04 import GPTModel, generate_text_simple

        book = GPTModel(book_config(cfg)).to(device, dtype).eval()

        def run(first=None) -> torch.Tensor:
            with torch.no_grad():
                return generate_text_simple(book, prompt, new_tokens, cfg.context_length)[:, t0:].cpu()  # (B, N)
        return DECODE_PEER_LABELS["book"], run, False
    if name == "book-cache":
        from llms_from_scratch.kv_cache.gpt2 import GPTModel
        from llms_from_scratch.kv_cache.utils import KVCache as BookKVCache

        book = GPTModel({**book_config(cfg), "context_length": positions}).to(device, dtype).eval()

        def run_cached(first=None) -> torch.Tensor:  # the book's cached greedy loop (its chapter 4 bonus code)
            with torch.no_grad():
                book.current_pos = 0
                cache = BookKVCache(cfg.n_layers)
                logits = book(prompt, use_cache=True, cache=cache)  # (B, T0, V)
                picked = []
                for _ in range(new_tokens):
                    next_idx = logits[:, -1].argmax(dim=-1, keepdim=True)  # (B, 1)
                    picked.append(next_idx)
                    logits = book(next_idx, use_cache=True, cache=cache)  # (B, 1, V)
            return torch.cat(picked, dim=1).cpu()  # (B, N)
        return DECODE_PEER_LABELS["book-cache"], run_cached, False
    if name == "hf":
        family = llama_family(cfg)
        if family is not None:
            hf = _hf_llama_peer(model if model is not None else GPT(cfg), device, dtype)
            return f"transformers generate ({family}, cache)", _hf_generate(hf, prompt, new_tokens), model is not None
        from transformers import GPT2Config, GPT2LMHeadModel

        hf_cfg = GPT2Config(vocab_size=cfg.vocab_size, n_positions=positions, n_embd=cfg.emb_dim,
                            n_layer=cfg.n_layers, n_head=cfg.n_heads, tie_word_embeddings=cfg.tie_weights,
                            bos_token_id=None, eos_token_id=None, pad_token_id=0)
        hf_cfg._attn_implementation = "sdpa"
        gpt2 = GPT2LMHeadModel(hf_cfg).to(device, dtype).eval()
        return DECODE_PEER_LABELS["hf"], _hf_generate(gpt2, prompt, new_tokens), False
    raise ValueError(name)


def default_decode_modes(device: torch.device) -> list[str]:
    """The modes :func:`bench_decode` measures unless told: CUDA graphs on CUDA, the CPU weight layout elsewhere."""
    return ["no cache", "cache"] + (["static", "static compiled"] if device.type == "cuda"
                                    else ["cache, weights laid out", "static"])


@dataclass
class _Decoder:
    """One decode row being measured: how to run it, how to warm it up, and the times taken."""

    label: str
    run: DecodeRun  # decodes every new token; calls its argument at the first
    warm: Optional[DecodeRun] = None  # a shorter warm-up run (None: ``run``)
    layout: Optional[dict[str, str]] = None  # the weight layout chosen, for "cache, weights laid out"
    same_weights: bool = True  # the weights of our model: its greedy tokens must be ours
    totals: list[float] = dataclasses.field(default_factory=list)  # seconds of each timed run
    firsts: list[float] = dataclasses.field(default_factory=list)  # seconds to the first token of each run
    tokens: Optional[torch.Tensor] = None  # (B, N) the new tokens of the last timed run


def _our_decoders(modes: list[str], model: GPT, prompt: torch.Tensor, new_tokens: int, warmup_tokens: int,
                  rows: list[dict[str, Any]]) -> list[_Decoder]:
    """Our model's decoder for each mode; a mode it cannot run (the static cache and ALiBi) is appended
    to ``rows`` as an error row with its reason."""
    from ..inference.generate import choose_weight_layout

    batch = prompt.shape[0]
    decoders = []
    for mode in modes:
        label, runs_on, layout, compiled = f"llmscratch {mode}", model, None, "compiled" in mode
        if mode == "cache, weights laid out":  # a copy, stored the way this CPU multiplies `batch` rows fastest
            runs_on = copy.deepcopy(model)
            layout = {f"{o}x{i}": way for (o, i), way in choose_weight_layout(runs_on, rows=batch).items()}
        try:
            run = _decode_runner(mode, runs_on, prompt, new_tokens, compiled)
            warm = (_decode_runner(mode, runs_on, prompt, warmup_tokens, compiled)
                    if warmup_tokens != new_tokens else None)
        except ValueError as err:
            rows.append({"mode": label, "batch": batch, "error": repr(err)[:300]})
            continue
        decoders.append(_Decoder(label, run, warm, layout))
    return decoders


def _peer_decoders(peers: list[str], model: GPT, device: torch.device, dtype: torch.dtype, prompt: torch.Tensor,
                   new_tokens: int, rows: list[dict[str, Any]]) -> list[_Decoder]:
    """The peers' decoders (the transformers peer of a Llama-family ``model`` with its weights); a peer
    that cannot compute the config, or cannot be built, is appended to ``rows`` with its reason."""
    decoders = []
    for peer in peers:
        label = DECODE_PEER_LABELS.get(peer, peer)
        reason = peer_skip_reason(peer, model.cfg)
        if reason is not None:
            rows.append({"mode": label, "batch": prompt.shape[0], "skipped": reason})
            continue
        try:
            label, run, same = _peer_decode_runner(peer, model.cfg, device, dtype, prompt, new_tokens, model)
            decoders.append(_Decoder(label, run, same_weights=same))
        except Exception as err:
            rows.append({"mode": label, "batch": prompt.shape[0], "error": repr(err)[:300]})
    return decoders


def _warm_up(decoders: list[_Decoder], device: torch.device, batch: int, log: Callable[[str], None],
             rows: list[dict[str, Any]]) -> list[_Decoder]:
    """Run each decoder once untimed (compiling where it compiles); those that fail become error rows.

    Returns the decoders that ran.
    """
    live = []
    for d in decoders:
        try:
            t0 = time.perf_counter()
            (d.warm or d.run)(None)
            synchronize(device)
            log(f"  decode {d.label} batch {batch}: warm-up {time.perf_counter() - t0:.1f}s")
            live.append(d)
        except Exception as err:
            rows.append({"mode": d.label, "batch": batch, "error": repr(err)[:300]})
    return live


def _time_decode(d: _Decoder, device: torch.device) -> None:
    """Time one run of ``d``, whole and to its first token, and keep both (and the tokens it decoded)."""
    synchronize(device)
    start = time.perf_counter()
    first_at: list[float] = []

    def first() -> None:
        synchronize(device)
        first_at.append(time.perf_counter() - start)

    d.tokens = d.run(first)
    synchronize(device)
    d.totals.append(time.perf_counter() - start)
    d.firsts.extend(first_at)


def token_agreement(tokens: torch.Tensor, reference: torch.Tensor) -> Optional[int]:
    """The index of the first new token where ``tokens`` and ``reference`` (both ``(B, N)``) differ in any row;
    None where every token agrees."""
    differ = (tokens != reference).any(dim=0).nonzero()  # (k, 1) the columns where some row differs
    return int(differ[0, 0]) if len(differ) else None


def _decode_row(d: _Decoder, batch: int, new_tokens: int, prompt_len: int, dtype: torch.dtype,
                reference: Optional[_Decoder]) -> dict[str, Any]:
    """The row of a measured decoder: medians of its runs, every run, and whether its greedy tokens are
    ``reference``'s (for a decoder with our weights)."""
    seconds = statistics.median(d.totals)
    row = {"mode": d.label, "batch": batch, "new_tokens": new_tokens, "prompt": prompt_len,
           "tokens_per_s": batch * new_tokens / seconds, "seconds": seconds,
           "first_token_ms": 1000 * statistics.median(d.firsts) if d.firsts else None,
           "dtype": str(dtype), "runs_s": d.totals, "same_weights": d.same_weights,
           **({"weight_layout": d.layout} if d.layout is not None else {})}
    if d.same_weights and reference is not None and d is not reference and d.tokens is not None:
        first_difference = token_agreement(d.tokens, reference.tokens)
        row.update(same_tokens=first_difference is None, first_different_token=first_difference,
                   tokens_compared_with=reference.label)
    if d is reference:
        row["tokens_reference"] = True
    return row


def add_decode_ratios(rows: list[dict[str, Any]], batches: tuple[int, ...]) -> None:
    """Add ratios to the measured rows, in place, at each batch: ``over_no_cache`` (tokens/s over ours
    without a cache) and ``over_transformers`` (tokens/s over transformers' ``generate``), each a ratio of
    the medians; and ``over_transformers_rounds``, the ratio in every round (run *i* of every row is
    round *i*: they are timed interleaved), with its median, ``over_transformers_round_median``. On a
    shared machine a load that comes and goes slows one round of every row alike, so the round's
    ratio keeps steady where the tokens/s do not."""
    for batch in batches:
        measured = [r for r in rows if r["batch"] == batch and r.get("tokens_per_s")]
        no_cache = next((r for r in measured if r["mode"] == "llmscratch no cache"), None)
        hf = next((r for r in measured if r["mode"].startswith("transformers")), None)
        for r in measured:
            if no_cache:
                r["over_no_cache"] = r["tokens_per_s"] / no_cache["tokens_per_s"]
            if hf:
                r["over_transformers"] = r["tokens_per_s"] / hf["tokens_per_s"]
                rounds = [theirs / ours for ours, theirs in zip(r["runs_s"], hf["runs_s"])]  # same tokens a run
                r["over_transformers_rounds"] = rounds
                r["over_transformers_round_median"] = statistics.median(rounds)


def kv_cache_bytes(cfg: GPTConfig, dtype: torch.dtype = torch.float32) -> dict[str, Any]:
    """The KV cache's memory per token (one row), ours against multi-head attention's of the same shape.

    Ours is measured on the cache :class:`~llmscratch.nn.model.KVCache` allocates, one token
    long: ``2 · layers · kv_heads · head_dim · bytes`` (keys and values). Multi-head attention
    stores a key and a value for every query head, ``n_heads / kv_heads`` times as much.
    """
    from ..nn.model import KVCache

    cache = KVCache.for_model(cfg, batch=1, max_len=1, dtype=dtype)
    ours = cache.k.nbytes + cache.v.nbytes
    mha = 2 * cfg.n_layers * cfg.n_heads * cfg.head_dim * cache.k.element_size()
    return {"bytes_per_token": ours, "mha_bytes_per_token": mha, "fraction_of_mha": ours / mha,
            "dtype": str(dtype), "layers": cfg.n_layers, "kv_heads": cfg.kv_heads, "n_heads": cfg.n_heads,
            "head_dim": cfg.head_dim}


def decode_dtype(device: torch.device, dtype: Optional[torch.dtype] = None) -> torch.dtype:
    """The precision :func:`bench_decode` decodes in: bf16 on CUDA (decoding is memory-bound), else float32."""
    return dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def bench_decode(
    cfg: GPTConfig, device: torch.device, batches: tuple[int, ...] = (1, 8), new_tokens: int = 200,
    prompt_len: int = 8, repeats: int = 3, modes: Optional[list[str]] = None, peers: list[str] = (),
    dtype: Optional[torch.dtype] = None, log: Callable[[str], None] = print, warmup_tokens: Optional[int] = None,
    model: Optional[GPT] = None,
) -> list[dict[str, Any]]:
    """Greedy decode speed (tokens/s over all rows) and time to first token, per mode and batch.

    Modes: ``no cache``, ``cache`` (eager KV cache), ``cache, weights laid out`` (the same on
    a copy of the model whose weights :func:`generate.choose_weight_layout` stored or packed the
    way this CPU multiplies ``batch`` rows fastest, as ``llmscratch generate`` does; CPU only),
    ``static`` (static cache, eager) and ``static compiled`` (the one-token step compiled;
    CUDA graphs on CUDA). ``model``: the model to decode with (a run's, moved to ``device``
    and ``dtype``); default a random one of ``cfg``. Peers that cannot compute its config are
    rows that say why; the transformers peer of a Llama-family model holds its weights, and
    every row with our weights says whether its greedy tokens are those of our first mode
    (``same_tokens``, ``first_different_token``). On CUDA the weights are bf16 (decoding is
    memory-bound); on the CPU float32. The warm-up run decodes ``warmup_tokens`` (default: all
    of them on CUDA, where it compiles the step for these shapes; 2 on the CPU, where there is
    nothing to compile and a run is slow). The modes and peers of a batch are timed
    interleaved, run by run.
    """
    if warmup_tokens is None:
        warmup_tokens = new_tokens if device.type == "cuda" else 2
    dtype = decode_dtype(device, dtype)
    modes = default_decode_modes(device) if modes is None else modes
    if model is None:
        torch.manual_seed(0)
        model = GPT(GPTConfig.from_dict({**cfg.to_dict(), "drop_rate": 0.0}))
    model = model.to(device, dtype).eval()
    rows: list[dict[str, Any]] = []
    for batch in batches:
        prompt = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=torch.Generator().manual_seed(1))
        prompt = prompt.to(device)  # (B, T0)
        decoders = _our_decoders(modes, model, prompt, new_tokens, warmup_tokens, rows)
        decoders += _peer_decoders(list(peers), model, device, dtype, prompt, new_tokens, rows)
        live = _warm_up(decoders, device, batch, log, rows)
        for _ in range(repeats):  # interleaved: a passing load on a shared machine hits every mode alike
            for d in live:
                _time_decode(d, device)
        reference = next((d for d in live if d.label.startswith("llmscratch")), None)
        rows += [_decode_row(d, batch, new_tokens, prompt_len, dtype, reference) for d in live]
        del decoders, live  # the laid-out copy and the peers' models, before the next batch builds its own
    add_decode_ratios(rows, batches)
    return rows


def decode_matches_eager(model: GPT, prompt: torch.Tensor, new_tokens: int, compile: bool) -> bool:
    """Whether the static (optionally compiled) decoder's greedy tokens equal the eager KV-cache path's."""
    from ..inference.generate import SamplingConfig, StaticDecoder, generate

    sampling = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    eager = generate(model, prompt.tolist(), sampling, use_cache=True)
    fast = StaticDecoder(model, prompt.shape[0], prompt.shape[1] + new_tokens, compile=compile)
    return fast.generate(prompt, sampling).tolist() == eager


# ---------------------------------------------------------------------------- tables


def count(n: int, noun: str) -> str:
    """``n`` and the noun, singular for one: ``count(1, "run")`` is ``"1 run"``, ``count(3, "run")`` ``"3 runs"``."""
    return f"{n} {noun if n == 1 else noun + 's'}"


def _fmt(value: Any, spec: str) -> str:
    if value is None:  # "-", aligned and padded as the number would be
        align_width = re.match(r"[<>^]?\d*", spec).group()
        return format("-", align_width)
    return format(value, spec)


def format_train(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`bench_train` as a Markdown table (what ``llmscratch bench`` prints)."""
    lines = [f"| {'model':<56} | {'tokens/s':>10} | {'step ms':>8} | {'MFU meas.':>9} | {'MFU sheet':>9} | "
             f"{'peak GB':>7} | {'ours ×':>6} | {'eager ×':>7} |", "| " + " | ".join(["---"] * 8) + " |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']:<56} | error: {r['error'][:80]} |")
            continue
        lines.append(
            f"| {r['model']:<56} | {r['tokens_per_s']:>10,.0f} | {r['step_ms']:>8.1f} | "
            f"{_fmt(r['mfu_measured_peak'], '>9.1%')} | {_fmt(r['mfu_datasheet'], '>9.1%')} | "
            f"{_fmt(r['peak_memory_gb'], '>7.2f')} | {_fmt(r.get('ours_over_this'), '>6.2f')} | "
            f"{_fmt(r.get('eager_over_this'), '>7.2f')} |")
    return "\n".join(lines)


def _same_tokens_cell(r: dict[str, Any]) -> str:
    """``yes``, ``from N`` (the first new token that differs), ``ref.`` (the row the others are compared with)
    or ``-`` (other weights)."""
    if r.get("tokens_reference"):
        return "ref."
    if "same_tokens" not in r:
        return "-"
    return "yes" if r["same_tokens"] else f"from {r['first_different_token']}"


def _rounds_cell(r: dict[str, Any]) -> str:
    """The ratio over transformers round by round: ``median (min–max)``; ``-`` where there is none."""
    rounds = r.get("over_transformers_rounds")
    if not rounds:
        return "-"
    return f"{r['over_transformers_round_median']:.2f} ({min(rounds):.2f}–{max(rounds):.2f})"


def format_decode(rows: list[dict[str, Any]], kv: Optional[dict[str, Any]] = None) -> str:
    """The rows of :func:`bench_decode` as a Markdown table (what ``llmscratch bench`` prints), and under it
    the KV cache's bytes per token (``kv``: :func:`kv_cache_bytes`). ``× transformers`` is the ratio of
    the medians; ``by round`` the median and range of the ratios taken round by round."""
    lines = [f"| {'mode':<48} | {'batch':>5} | {'tokens/s':>9} | {'first token ms':>14} | {'× no cache':>10} | "
             f"{'× transformers':>14} | {'by round (range)':>18} | {'same tokens':>11} |",
             "| " + " | ".join(["---"] * 8) + " |"]
    for r in rows:
        if "error" in r or "skipped" in r:
            what = f"error: {r['error'][:80]}" if "error" in r else f"skipped: {r['skipped']}"
            lines.append(f"| {r['mode']:<48} | {r['batch']:>5} | {what} |")
            continue
        lines.append(f"| {r['mode']:<48} | {r['batch']:>5} | {r['tokens_per_s']:>9.1f} | "
                     f"{_fmt(r['first_token_ms'], '>14.1f')} | {_fmt(r.get('over_no_cache'), '>10.2f')} | "
                     f"{_fmt(r.get('over_transformers'), '>14.2f')} | {_rounds_cell(r):>18} | "
                     f"{_same_tokens_cell(r):>11} |")
    if kv is not None:
        lines.append(f"\nKV cache per token (one row, {kv['dtype'].removeprefix('torch.')}): {kv['bytes_per_token']:,} "
                     f"bytes (2 × {kv['layers']} layers × {count(kv['kv_heads'], 'K/V head')} × {kv['head_dim']} "
                     f"dims); multi-head attention with {kv['n_heads']} heads: {kv['mha_bytes_per_token']:,} bytes, "
                     f"{kv['mha_bytes_per_token'] / kv['bytes_per_token']:.2f} × ours")
    return "\n".join(lines)


def format_attention(rows: list[dict[str, Any]]) -> str:
    """The rows of :func:`bench_attention` as a Markdown table (what ``llmscratch bench`` prints)."""
    lines = [f"| {'variant':<10} | {'fwd+bwd ms':>10} | {'× best SDPA':>11} |", "| --- | --- | --- |"]
    for r in rows:
        if r.get("error"):  # a kernel this device or shape does not offer
            lines.append(f"| {r['variant']:<10} | {'-':>10} | not run: {r['error'][:60]} |")
            continue
        lines.append(f"| {r['variant']:<10} | {_fmt(r['ms'], '>10.3f')} | {_fmt(r['vs_best_sdpa'], '>11.2f')} |")
    return "\n".join(lines)


def check_json_path(path: str) -> None:
    """Refuse, before anything is measured, a ``--json`` path that cannot be written.

    The file is written by a rename inside its folder, so the folder must exist and be
    writable (``os.access`` catches a read-only file system and, for other users than root,
    missing permissions); an existing file there is replaced whatever its own mode.
    """
    from ..errors import ConfigError

    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"--json {path} is a directory; give a file name, e.g. {target / 'bench.json'}")
    folder = target.parent
    if not folder.is_dir():
        raise ConfigError(f"--json {path}: the folder {folder} does not exist (or is a file); create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ConfigError(f"--json {path}: the folder {folder} cannot be written (read-only file system or no "
                          f"permission); give a path in a folder you can write to, "
                          f"e.g. --json {Path.cwd() / target.name}")


def write_json(path: str, record: dict[str, Any]) -> None:
    """Write the record atomically: a run cut short keeps the previous file whole.

    If ``path`` cannot be written (a full disk, a folder made read-only or removed while
    measuring), the record is saved to a new file in the temporary folder instead and a
    ConfigError names both, so nothing measured is lost; the tables are printed before.
    """
    from ..errors import ConfigError
    from ..files import write_text_atomic

    text = json.dumps(record, indent=2, default=str) + "\n"
    try:
        write_text_atomic(path, text)
    except OSError as err:
        reason = err.strerror or str(err)
        saved = _save_elsewhere(text)
        where = (f"; the whole record was saved to {saved} instead (copy it where you want it)" if saved
                 else " (it could not be saved to the temporary folder either)")
        raise ConfigError(f"could not write --json {path}: {reason}. The results measured are in the tables "
                          f"above{where}. Next time give a --json path on a disk with room, in a folder you "
                          f"can write to") from err


def _save_elsewhere(text: str) -> Optional[str]:
    """Save ``text`` to a new ``llmscratch-bench-*.json`` in the temporary folder; its path, or None."""
    try:
        fd, name = tempfile.mkstemp(prefix="llmscratch-bench-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        return name
    except OSError:
        return None
