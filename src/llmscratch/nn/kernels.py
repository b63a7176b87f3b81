"""The one hand-written GPU kernel: cross-entropy and its gradient in one Triton kernel.

Why a kernel of our own: at GPT-2's shape the logits are 16,384 rows × 50,304 bf16 columns
(1.65 GB per step). ``F.cross_entropy`` reads them for the loss, then its backward reads them
again and writes their gradient, and the kernels ``torch.compile`` makes for this ran at a
quarter to a third of the card's memory bandwidth (3.8 ms of a 33.8 ms step on an H200,
docs/performance.md). Since the loss is a mean over rows, its gradient ``softmax − onehot``
(times the incoming gradient over the count of targets) is known in the forward pass already:
one program per row reads the row once for its max and sum of exponentials, then again to
write the gradient, and the logits need not be kept. On an H200 it takes 1.48 ms where the
compiled ``F.cross_entropy`` took 4.1 (benchmarks/loss_kernel.py).

* :func:`cross_entropy_rows` is a PyTorch custom operator: ``torch.compile`` sees it as one
  opaque call with known output shapes. On CUDA it runs the Triton kernel; elsewhere it runs
  the same arithmetic in PyTorch (the reference the kernel is tested against).
* :func:`head_cross_entropy` is the LM head and the loss as one autograd function: the
  incoming gradient is folded into the two matrix products of the backward pass, so the
  (N, V) gradient is never rescaled in a pass of its own.

The readable path (logits, then ``F.cross_entropy``) stays one flag away:
``llmscratch train --loss plain`` (``GPT.loss_impl = "plain"``).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Any

import torch

IGNORE_INDEX = -100  # targets with this value add nothing to the loss, as in F.cross_entropy


def triton_available(device: torch.device) -> bool:
    """Whether the Triton kernel can run on ``device``: a CUDA device, Triton installed, and a C
    compiler for the small launcher Triton builds on first use (``$CC``, gcc or clang, where
    Triton looks), so that a machine without one trains on the plain path instead of failing."""
    if device.type != "cuda" or importlib.util.find_spec("triton") is None:
        return False
    return bool(os.environ.get("CC")) or any(shutil.which(cc) for cc in ("gcc", "clang"))


def _reference_rows(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row losses and ``softmax − onehot`` in PyTorch: what the kernel computes, written out."""
    real = logits[:, :vocab].float()  # (N, V): the padded columns are left out
    ignored = targets == IGNORE_INDEX  # (N,)
    target = torch.where(ignored, 0, targets)  # (N,)
    lse = torch.logsumexp(real, dim=1)  # (N,)
    losses = torch.where(ignored, 0.0, lse - real.gather(1, target[:, None]).squeeze(1))  # (N,)
    grad = torch.zeros(logits.shape, dtype=torch.float32, device=logits.device)  # (N, V_pad)
    grad[:, :vocab] = torch.exp(real - lse[:, None])  # softmax
    minus_one = torch.full((len(targets), 1), -1.0, device=logits.device)  # (N, 1)
    grad.scatter_add_(1, target[:, None], minus_one)  # − onehot, at the (N, 1) target ids
    grad[ignored] = 0.0
    return losses, grad.to(logits.dtype)


@torch.library.custom_op("llmscratch::cross_entropy_rows", mutates_args=())
def cross_entropy_rows(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each row's cross-entropy and its gradient with respect to the row's logits.

    ``logits (N, V_pad)`` with real columns ``[0, vocab)`` (the rest is padding, given zero
    gradient), ``targets (N,)`` integer ids with -100 = ignored. Returns ``losses (N,)`` in
    float32 (0 for ignored rows) and ``grad (N, V_pad)`` in the logits' dtype: the gradient
    of the *sum* of the row losses, ``softmax − onehot`` (0 for ignored rows).
    """
    return _reference_rows(logits, targets, vocab)


@cross_entropy_rows.register_fake
def _(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    return (logits.new_empty(logits.shape[0], dtype=torch.float32),
            torch.empty_like(logits, memory_format=torch.contiguous_format))


@cross_entropy_rows.register_kernel("cuda")
def _(logits: torch.Tensor, targets: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    return _triton_rows(logits, targets, vocab)


def _triton_rows(logits: torch.Tensor, targets: torch.Tensor, vocab: int,
                 kernel: Any = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the Triton kernel (by default the autotuned one; tests and benchmarks pass
    one of :func:`build_kernel`'s): one program per row."""
    kernel = kernel or _triton_kernel()
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    n_rows, n_cols = logits.shape
    losses = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
    if n_rows:
        kernel[(n_rows,)](logits, grad, targets.contiguous(), losses, logits.stride(0), grad.stride(0),
                          vocab, n_cols, IGNORE_INDEX)
    return losses, grad


_KERNEL = None
# (columns per block, warps per row): the fastest of these is measured once per row length
# (Triton's autotuner) on the first call. At GPT-2's rows on an H200: 2048 and 4 warps, 1.47 ms
# for 16,384 rows; the other configurations 1.54-2.00 ms (benchmarks/loss_kernel.py). Holding
# a whole row in registers to read it once was slower (2.3 ms and more: register spills).
CONFIGS = [(block, warps) for block in (2048, 4096, 8192) for warps in (4, 8, 16)]


def _triton_kernel() -> Any:
    """The kernel, compiled on first use (Triton is imported only where it runs)."""
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = build_kernel(CONFIGS)
    return _KERNEL


def build_kernel(configs: list[tuple[int, int]]) -> Any:  # a triton Autotuner (Triton is imported lazily)
    """The Triton kernel, autotuned over ``configs`` of (columns per block, warps)."""
    import triton
    import triton.language as tl

    @triton.autotune(configs=[triton.Config({"BLOCK": b}, num_warps=w) for b, w in configs], key=["n_cols"])
    @triton.jit
    def cross_entropy_rows_kernel(logits_ptr, grad_ptr, targets_ptr, losses_ptr, logits_stride, grad_stride,
                                  vocab, n_cols, ignore_index, BLOCK: tl.constexpr):
        row = tl.program_id(0).to(tl.int64)
        logits_ptr += row * logits_stride
        grad_ptr += row * grad_stride
        target = tl.load(targets_ptr + row)
        ignored = target == ignore_index
        cols = tl.arange(0, BLOCK)

        # pass 1: the row's max and its sum of exponentials, block by block (online softmax)
        top = tl.full((), float("-inf"), tl.float32)
        total = tl.full((), 0.0, tl.float32)
        for start in range(0, vocab, BLOCK):
            x = tl.load(logits_ptr + start + cols, mask=start + cols < vocab, other=float("-inf")).to(tl.float32)
            new_top = tl.maximum(top, tl.max(x, axis=0))
            total = total * tl.exp(top - new_top) + tl.sum(tl.exp(x - new_top), axis=0)
            top = new_top
        lse = top + tl.log(total)  # log Σ exp(logits)
        picked = tl.load(logits_ptr + tl.where(ignored, 0, target)).to(tl.float32)
        tl.store(losses_ptr + row, tl.where(ignored, 0.0, lse - picked))

        # pass 2: softmax − onehot over the padded row (0 on padding and on ignored rows)
        for start in range(0, n_cols, BLOCK):
            c = start + cols
            x = tl.load(logits_ptr + c, mask=c < vocab, other=float("-inf")).to(tl.float32)
            g = tl.exp(x - lse) - tl.where(c == target, 1.0, 0.0)
            g = tl.where(ignored, 0.0, g)
            tl.store(grad_ptr + c, g.to(grad_ptr.dtype.element_ty), mask=c < n_cols)

    return cross_entropy_rows_kernel


class _HeadCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy of ``x @ wᵀ``: the logits are made, turned into their gradient, and dropped."""

    @staticmethod
    def forward(ctx, x, w, targets, vocab: int, dtype: torch.dtype):
        # x (N, C), w (V_pad, C) (rows from `vocab` on are padding), targets (N,)
        xl, wl = x.to(dtype), w.to(dtype)
        logits = xl @ wl.t()  # (N, V_pad)
        losses, grad = cross_entropy_rows(logits, targets, vocab)  # (N,), (N, V_pad)
        count = (targets != IGNORE_INDEX).sum()
        ctx.save_for_backward(xl, wl, grad, count)
        ctx.dtypes = (x.dtype, w.dtype)
        return losses.sum() / count  # no target at all: 0 / 0 = NaN, as F.cross_entropy

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_loss):
        xl, wl, grad, count = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        scale = grad_loss / count.clamp_min(1)  # d(mean)/d(row loss), folded into the products below
        grad_x = (grad @ wl).to(x_dtype) * scale  # (N, C)
        grad_w = (grad.t() @ xl).to(w_dtype) * scale  # (V_pad, C)
        return grad_x, grad_w, None, None, None


def head_cross_entropy(x: torch.Tensor, w: torch.Tensor, targets: torch.Tensor, vocab: int,
                       dtype: torch.dtype | None = None) -> torch.Tensor:
    """``F.cross_entropy(x @ w[:vocab]ᵀ, targets, ignore_index=-100)`` through :func:`cross_entropy_rows`.

    ``x (N, C)``, ``w (V_pad, C)``, ``targets (N,)``; the matrix products run in ``dtype``
    (default ``x.dtype``), the softmax in float32. The forward pass computes the logits'
    gradient, so it is meant for training.
    """
    return _HeadCrossEntropy.apply(x, w, targets, vocab, dtype or x.dtype)
