"""Device and precision, decided in one place.

* Device: ``auto`` picks CUDA, then Apple's MPS, then the CPU; any torch device string
  overrides it.
* Precision: ``auto`` is float32 on the CPU and MPS, bf16 autocast on CUDA (fp16 with a
  GradScaler on GPUs without bf16). Weights and optimizer state stay float32; autocast
  runs the matrix products in the low precision.
* On CUDA, TF32 matrix products are enabled for whatever still runs in float32.
* On the CPU (Linux), the C library's malloc is asked to keep freed memory for reuse
  (``keep_freed_memory``): PyTorch's CPU tensors come from malloc, and by default each
  training step would page-fault its large tensors in afresh.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import sys
from dataclasses import dataclass
from typing import ContextManager

import numpy as np
import torch

from .errors import ConfigError

PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass(frozen=True)
class Runtime:
    """Where and how the arithmetic runs."""

    device: torch.device
    precision: str  # "fp32", "bf16" or "fp16" (resolved, never "auto")

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(self.precision)

    @property
    def needs_grad_scaler(self) -> bool:
        return self.precision == "fp16"

    def autocast(self) -> ContextManager:
        """Mixed-precision context for forward passes (a no-op in fp32)."""
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype)

    def synchronize(self) -> None:
        """Wait for the device's queued work (CUDA, MPS), so that wall-clock timings cover it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        elif self.device.type == "mps":
            torch.mps.synchronize()


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` → ``$LLMSCRATCH_DEVICE`` where set, else cuda, then mps, then cpu; otherwise the
    named device, checked to exist."""
    if name == "auto" and os.environ.get("LLMSCRATCH_DEVICE", "auto") != "auto":
        try:
            return resolve_device(os.environ["LLMSCRATCH_DEVICE"])
        except ConfigError as err:
            raise ConfigError(f"LLMSCRATCH_DEVICE={os.environ['LLMSCRATCH_DEVICE']}: {err}") from err
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"unknown device {name!r}: use auto, cpu, cuda, cuda:N or mps") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device {name!r} asked for, but this PyTorch sees no CUDA GPU; use --device cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device {name!r} asked for, but MPS is not available here; use --device cpu")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 on CUDA with bf16 support, fp16 on older GPUs, fp32 elsewhere."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
        return "fp32"
    if precision == "fp16" and device.type == "cpu":
        raise ConfigError("precision fp16 needs a GPU (CPU fp16 matrix products are slow); use fp32 or bf16")
    return precision


def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks for reuse instead of handing them back to the OS.

    glibc serves a large block (the default run's 16 MB logits, their softmax) with its own
    mmap and unmaps it on free, so the next step touches brand-new pages: about 4,000 page
    faults a step of the default run on a 2-core VM (11,000-15,000 and 20-40 ms of kernel time
    before the head and loss were fused).
    With the mmap threshold at glibc's maximum (32 MB) and a 1 GB trim threshold, such blocks
    come from the heap and stay there to be reused (PyTorch's CPU tuning guide suggests
    jemalloc or tcmalloc for the same reason). The cost: the process keeps its peak heap
    instead of shrinking after a step. Process-wide; Linux with glibc only, a no-op elsewhere.
    Returns whether both settings took.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # not glibc (musl, …)
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # from glibc's <malloc.h>
    return bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 1 << 30))


def setup_runtime(device: str = "auto", precision: str = "auto") -> Runtime:
    """Resolve the device and precision and set the global switches that go with them."""
    dev = resolve_device(device)
    prec = resolve_precision(precision, dev)
    if dev.type == "cpu":
        keep_freed_memory()
    if dev.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.set_float32_matmul_precision("high")
    return Runtime(device=dev, precision=prec)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and PyTorch (all devices) so the same command gives the same numbers."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
