"""The cross-entropy kernel computes what ``F.cross_entropy`` computes.

* Its PyTorch reference (the CPU implementation of the custom operator) gives
  ``F.cross_entropy``'s per-row losses and, as its gradient, autograd's gradient of their sum.
* ``head_cross_entropy`` gives the plain path's loss and gradients (in the model:
  tests/test_fast_path.py, with one compiled graph).
* The Triton kernel gives the reference's numbers: in Triton's interpreter on the CPU (where
  Triton is installed) and on a CUDA GPU (marked ``gpu``).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from llmscratch.nn import kernels
from llmscratch.nn.model import GPT, GPTConfig

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="needs Triton installed")


def _batch(n: int, vocab: int, padded: int, dtype=torch.float32, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, padded, generator=g) * 4).to(dtype)  # (N, V_pad)
    targets = torch.randint(0, vocab, (n,), generator=g)  # (N,)
    targets[1] = targets[-1] = kernels.IGNORE_INDEX
    return logits, targets


def test_reference_rows_are_f_cross_entropy_and_the_gradient_of_their_sum():
    logits, targets = _batch(9, vocab=50, padded=64)
    leaf = logits[:, :50].clone().requires_grad_(True)  # (N, V): the real columns
    expected = F.cross_entropy(leaf, targets, reduction="none")  # (N,); 0 where ignored
    expected.sum().backward()
    losses, grad = kernels.cross_entropy_rows(logits, targets, 50)
    torch.testing.assert_close(losses, expected.detach())
    torch.testing.assert_close(grad[:, :50], leaf.grad)
    assert grad[:, 50:].abs().max() == 0  # padding: no gradient
    assert grad.dtype == logits.dtype and losses.dtype == torch.float32


def test_the_operator_passes_pytorchs_custom_op_checks():
    logits, targets = _batch(6, vocab=30, padded=32, dtype=torch.bfloat16)
    torch.library.opcheck(kernels.cross_entropy_rows, (logits, targets, 30))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_head_cross_entropy_gives_the_plain_loss_and_gradients(dtype):
    torch.manual_seed(0)
    x = torch.randn(40, 16, requires_grad=True)
    w = torch.randn(64, 16, requires_grad=True)  # 50 real rows, 14 of padding
    targets = torch.randint(0, 50, (40,))
    targets[:7] = kernels.IGNORE_INDEX
    logits = (x.to(dtype) @ w.to(dtype)[:50].t()).float()  # (N, V)
    ref = F.cross_entropy(logits, targets)
    ref_grads = torch.autograd.grad(ref * 3.0, (x, w))  # an incoming gradient other than 1
    loss = kernels.head_cross_entropy(x, w, targets, 50, dtype)
    grads = torch.autograd.grad(loss * 3.0, (x, w))
    tol = {} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 2e-3}
    torch.testing.assert_close(loss, ref, **tol)
    torch.testing.assert_close(grads[0], ref_grads[0], **tol)
    torch.testing.assert_close(grads[1], ref_grads[1], **tol)
    assert grads[1][50:].abs().max() == 0


def test_head_cross_entropy_with_every_target_ignored_matches_f_cross_entropy():
    x = torch.randn(5, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    targets = torch.full((5,), kernels.IGNORE_INDEX)
    ref = F.cross_entropy(x @ w.t(), targets)
    loss = kernels.head_cross_entropy(x, w, targets, 10)
    assert torch.isnan(loss) and torch.isnan(ref)  # a mean over no targets
    grads = torch.autograd.grad(loss, (x, w))
    assert all(g.abs().max() == 0 for g in grads)  # zeros, not NaN


def test_the_kernel_needs_triton_and_a_c_compiler_for_its_launcher(monkeypatch):
    cuda = torch.device("cuda")
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: object())  # Triton "installed"
    monkeypatch.setenv("CC", "")
    monkeypatch.setattr(kernels.shutil, "which", lambda name: None)
    assert not kernels.triton_available(cuda)  # no compiler: the plain path, not a crash at the first step
    monkeypatch.setattr(kernels.shutil, "which", lambda name: "/usr/bin/gcc" if name == "gcc" else None)
    assert kernels.triton_available(cuda)
    assert not kernels.triton_available(torch.device("cpu"))
    monkeypatch.setattr(kernels.importlib.util, "find_spec", lambda name: None)
    assert not kernels.triton_available(cuda)


def test_which_loss_runs_where(monkeypatch):
    model = GPT(GPTConfig.from_preset("test"))
    assert model.loss_implementation(torch.device("cpu")) == "chunked"
    for triton_here, expected in ((True, "kernel"), (False, "plain")):
        monkeypatch.setattr(kernels, "triton_available", lambda device, ok=triton_here: ok and device.type == "cuda")
        assert model.loss_implementation(torch.device("cuda")) == expected
        assert model.loss_implementation(torch.device("cpu")) == "chunked"
    assert model.loss_implementation(torch.device("mps")) == "plain"
    model.loss_impl = "kernel"
    with pytest.raises(ValueError, match="needs a CUDA device with Triton"):
        model.loss_implementation(torch.device("mps"))
    model.loss_impl = "fast"
    with pytest.raises(ValueError, match="loss_impl must be one of"):
        model.loss_implementation(torch.device("cpu"))


# The kernel's gradient is float32 arithmetic rounded once to bf16, as the reference's is: they
# may differ by one bf16 step (2⁻⁸ to 2⁻⁷ relative; Triton's interpreter truncates where a GPU
# rounds to nearest). An absolute slack would leave most entries unchecked (at 50,257 columns
# almost every softmax value is below 1e-4), so the check is relative; the atol only lets
# a GPU's flush-to-zero of float32 denormals pass.
GRAD_TOLERANCE = dict(rtol=1e-2, atol=1e-30)

INTERPRETED = textwrap.dedent("""
    import torch
    import triton
    from llmscratch.nn import kernels
    cases = [(7, 1000, 1024, 256), (5, 300, 320, 128), (3, 64, 64, 64), (16, 50257, 50304, 2048)]
    try:
        for n, vocab, padded, block in cases:
            g = torch.Generator().manual_seed(n)
            logits = (torch.randn(n, padded, generator=g) * 4).to(torch.bfloat16)
            targets = torch.randint(0, vocab, (n,), generator=g)
            targets[1] = -100
            losses, grad = kernels._triton_rows(logits, targets, vocab, kernels.build_kernel([(block, 4)]))
            ref_losses, ref_grad = kernels._reference_rows(logits, targets, vocab)
            torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(grad.float(), ref_grad.float(), **TOLERANCE)
            assert grad[1].abs().sum() == 0 and grad[:, vocab:].abs().sum() == 0
            kept = targets != -100
            assert grad[kept].float().sum(dim=1).abs().max() < 1e-2  # softmax − onehot sums to 0
    except triton.runtime.errors.InterpreterError as err:
        if "only 0-dimensional arrays can be converted" not in str(err):
            raise
        print("skip: this Triton's interpreter cannot pass scalar arguments under NumPy 2 (int() of a "
              "1-element array; seen with Triton 3.6, fine with 3.8)")
        raise SystemExit(0)
    print("ok")
""")


@needs_triton
def test_the_triton_kernel_in_triton_s_interpreter_matches_the_reference():
    """Runs the kernel's own code on the CPU (blocks that do and do not divide the row, and GPT-2's row)."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    script = f"TOLERANCE = {GRAD_TOLERANCE!r}\n" + INTERPRETED
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    if done.stdout.startswith("skip:"):
        pytest.skip(done.stdout.strip()[len("skip: "):])
    assert done.stdout.strip() == "ok", done.stdout[-3000:]


@pytest.mark.gpu
@needs_cuda
@needs_triton
@pytest.mark.parametrize("config", [None] + kernels.CONFIGS, ids=str)  # None: the autotuned kernel
def test_the_triton_kernel_on_cuda_matches_the_reference_at_gpt2_s_vocabulary(config):
    logits, targets = _batch(2048, vocab=50257, padded=50304, dtype=torch.bfloat16)
    logits, targets = logits.cuda(), targets.cuda()
    kernel = kernels.build_kernel([config]) if config else None
    losses, grad = kernels._triton_rows(logits, targets, 50257, kernel)
    ref_losses, ref_grad = kernels._reference_rows(logits, targets, 50257)
    torch.testing.assert_close(losses, ref_losses, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(grad.float(), ref_grad.float(), **GRAD_TOLERANCE)
    assert grad[1].abs().sum() == 0 and grad[:, 50257:].abs().sum() == 0
    assert grad[targets != -100].float().sum(dim=1).abs().max() < 1e-2  # softmax − onehot sums to 0
