"""The fast paths compute what the readable paths compute.

* The static KV cache (fixed shapes, positions as a tensor) decodes the same greedy tokens
  as the growing :class:`KVCache` (CPU, uncompiled; GPU, compiled with CUDA graphs).
* On the GPU: the compiled bf16 training forward (loss inside the compiled region, SDPA,
  padded vocabulary) gives the loss and gradients of the explicit float32 path within bf16
  tolerance on the same batch, and padded vocabulary ids are never produced.

GPU tests are marked ``gpu`` and skip cleanly where there is no CUDA device.
"""

from __future__ import annotations

import copy

import pytest
import torch

from llmscratch.inference.generate import SamplingConfig, StaticDecoder, generate
from llmscratch.nn.model import GPT, GPTConfig, StaticKVCache, linear_cross_entropy
import llmscratch.nn.model as model_module

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
GREEDY = SamplingConfig(max_new_tokens=24, temperature=0.0)


def sharp_model(cfg: GPTConfig, device: str = "cpu", seed: int = 0) -> GPT:
    """A random model with larger weights, so greedy choices are not near-ties that rounding flips."""
    torch.manual_seed(seed)
    model = GPT(cfg).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(5.0)
    return model


# --------------------------------------------------------------------------- CPU


@pytest.mark.parametrize("pos_emb", ["learned", "rope", "sinusoidal", "none"])
def test_static_cache_decodes_like_the_kv_cache(pos_emb):
    cfg = GPTConfig.from_preset("test", pos_emb=pos_emb)
    model = sharp_model(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (3, 5), generator=torch.Generator().manual_seed(1))
    eager = generate(model, prompt.tolist(), GREEDY, use_cache=True)
    static = StaticDecoder(model, batch=3, max_len=cfg.context_length).generate(prompt, GREEDY)
    assert static.tolist() == eager


def test_static_decoder_samples_each_row_as_alone_with_seed_plus_row():
    cfg = GPTConfig.from_preset("test")
    model = sharp_model(cfg)
    prompt = torch.randint(0, cfg.vocab_size, (3, 5), generator=torch.Generator().manual_seed(3))
    sampling = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=21)
    batched = StaticDecoder(model, batch=3, max_len=cfg.context_length).generate(prompt, sampling)
    for row in range(3):
        alone = SamplingConfig(max_new_tokens=12, temperature=1.0, seed=21 + row)
        assert generate(model, [prompt[row].tolist()], alone)[0] == batched[row].tolist(), row


def test_static_cache_step_logits_equal_full_forward():
    cfg = GPTConfig.from_preset("test")
    model = sharp_model(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 10), generator=torch.Generator().manual_seed(2))
    cache = StaticKVCache.for_model(cfg, batch=2)
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        parts = [model(idx[:, :4], positions=torch.arange(4), cache=cache)]
        for t in range(4, 10):
            parts.append(model(idx[:, t : t + 1], positions=torch.tensor([t]), cache=cache))
    torch.testing.assert_close(torch.cat(parts, dim=1), full, rtol=1e-4, atol=1e-4)


def test_static_cache_refuses_what_it_cannot_do():
    model = GPT(GPTConfig.from_preset("test", pos_emb="alibi"))
    cache = StaticKVCache.for_model(model.cfg, batch=1)
    with pytest.raises(ValueError, match="alibi"):
        model(torch.zeros(1, 2, dtype=torch.long), positions=torch.arange(2), cache=cache)
    with pytest.raises(ValueError, match="positions"):
        model(torch.zeros(1, 2, dtype=torch.long), cache=cache)
    decoder = StaticDecoder(GPT(GPTConfig.from_preset("test")), batch=1, max_len=8)
    with pytest.raises(ValueError, match="do not fit"):
        decoder.generate(torch.zeros(1, 4, dtype=torch.long), SamplingConfig(max_new_tokens=10, temperature=0))


def test_linear_cross_entropy_equals_logits_then_cross_entropy():
    torch.manual_seed(0)
    vocab, pad = 37, 27  # the head padded to 64 rows, as on CUDA; padded rows must not count
    x = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    w = torch.randn(vocab, 16, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, vocab, (50,))
    y[[3, 17, 49]] = -100
    ref = torch.nn.functional.cross_entropy(x @ w.t(), y, ignore_index=-100)
    ref.backward(torch.tensor(0.7, dtype=torch.float64))
    ref_grads = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    padded = torch.nn.functional.pad(w, (0, 0, 0, pad))
    fused = linear_cross_entropy(x, padded, y, vocab, chunk=16)  # chunks of 16, 16, 16, 2
    fused.backward(torch.tensor(0.7, dtype=torch.float64))
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close((x.grad, w.grad), ref_grads)


def test_the_heads_forward_product_equals_the_matrix_product_on_either_library():
    import platform

    import llmscratch.nn.model as model_module

    gen = torch.Generator().manual_seed(0)
    x, w = torch.randn(300, 32, generator=gen), torch.randn(500, 32, generator=gen)
    exact = (x.double() @ w.double().t()).float()
    torch.testing.assert_close(model_module._logits_product(x, w), exact, rtol=1e-5, atol=1e-5)
    w_t = w.t().contiguous().t()  # the same matrix stored column-major: the plain product
    torch.testing.assert_close(model_module._logits_product(x, w_t), x @ w_t.t(), rtol=0, atol=0)
    x64, w64 = x.double(), w.double()  # oneDNN only for float32
    torch.testing.assert_close(model_module._logits_product(x64, w64), x64 @ w64.t(), rtol=0, atol=0)
    if platform.machine().lower() in ("x86_64", "amd64") and hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        assert model_module._onednn_logits()  # so the first check above ran through oneDNN


def test_the_chunked_loss_in_float32_matches_f_cross_entropy():
    torch.manual_seed(0)
    x = torch.randn(70, 24, requires_grad=True)
    w = torch.randn(300, 24, requires_grad=True)
    y = torch.randint(0, 300, (70,))
    ref = torch.nn.functional.cross_entropy(x @ w.t(), y)
    ref_grads = torch.autograd.grad(ref, (x, w))
    fused = linear_cross_entropy(x, w, y, vocab=300, chunk=32)
    torch.testing.assert_close(fused, ref, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(torch.autograd.grad(fused, (x, w)), ref_grads, rtol=1e-4, atol=1e-6)


def test_linear_cross_entropy_is_exact_where_the_target_probability_underflows():
    # A target logit 200 below the best one: p(target) = e^-200 underflows float32 to 0, so
    # -log p(target) would be inf; the loss must still be the true 200-odd (as F.cross_entropy).
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    w = torch.tensor([[100.0, 0.0], [-100.0, 0.0], [0.0, 3.0]], requires_grad=True)
    y = torch.tensor([1, 2])
    ref = torch.nn.functional.cross_entropy(x @ w.t(), y)
    ref_grads = torch.autograd.grad(ref, (x, w))
    fused = linear_cross_entropy(x, w, y, vocab=3, chunk=1)
    assert torch.isfinite(fused) and fused.item() > 100
    torch.testing.assert_close(fused, ref)
    torch.testing.assert_close(torch.autograd.grad(fused, (x, w)), ref_grads)


def test_linear_cross_entropy_with_every_target_ignored_matches_f_cross_entropy():
    x = torch.randn(4, 8, requires_grad=True)
    w = torch.randn(10, 8, requires_grad=True)
    y = torch.full((4,), -100)
    ref = torch.nn.functional.cross_entropy(x @ w.t(), y)
    ref_grads = torch.autograd.grad(ref, (x, w))
    fused = linear_cross_entropy(x, w, y, vocab=10, chunk=3)
    assert torch.isnan(fused) and torch.isnan(ref)  # a mean over no targets
    torch.testing.assert_close(torch.autograd.grad(fused, (x, w)), ref_grads)  # zeros, not NaN


def test_the_fused_loss_is_the_default_in_training_on_the_cpu(monkeypatch):
    model = GPT(GPTConfig.from_preset("test"))
    x = torch.randint(0, 256, (2, 8))
    calls = []
    real = model_module.linear_cross_entropy
    monkeypatch.setattr(model_module, "linear_cross_entropy", lambda *a, **k: calls.append(a[4]) or real(*a, **k))
    model(x, x).backward()
    assert calls == [model_module.CPU_LOSS_CHUNK]
    with torch.no_grad():
        model(x, x)  # evaluation: the plain path
    model.loss_impl = "plain"
    model(x, x).backward()
    assert calls == [model_module.CPU_LOSS_CHUNK]


@pytest.mark.parametrize("impl", ["chunked", "kernel"])  # kernel: on the CPU, the Triton kernel's PyTorch reference
def test_fused_loss_gives_the_plain_loss_and_gradients_in_the_model(impl):
    cfg = GPTConfig.from_preset("test", tie_weights=True)
    torch.manual_seed(0)
    plain = GPT(cfg)
    plain.loss_impl = "plain"  # logits, then F.cross_entropy
    fused = copy.deepcopy(plain)
    fused.loss_impl, fused.loss_chunk = impl, 24  # chunks of 24 tokens where chunked
    x = torch.randint(0, cfg.vocab_size, (3, 20))
    y = torch.randint(0, cfg.vocab_size, (3, 20))
    y[0, :5] = -100
    plain(x, y).backward()
    loss = fused(x, y)
    loss.backward()
    torch.testing.assert_close(loss, plain(x, y), rtol=1e-5, atol=1e-6)
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=f"gradient of {name}")
    with torch.no_grad():  # outside training the plain path runs (no gradients to fuse)
        torch.testing.assert_close(fused(x, y), plain(x, y), rtol=1e-5, atol=1e-6)
    # One graph and no break under torch.compile, with bf16 autocast as in training.
    with torch.autocast("cpu", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(fused)(x, y)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons


# --------------------------------------------------------------------------- GPU


def _tiny_nanogpt_shape() -> GPTConfig:
    # A vocabulary that is not a multiple of 64, so the padded head is exercised.
    return GPTConfig.from_preset("nanogpt-124m", vocab_size=1000, context_length=128, emb_dim=128,
                                 n_heads=4, n_layers=2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("loss_impl", ["plain", "auto"])  # auto: the Triton kernel where Triton is installed
def test_fast_training_path_matches_explicit_fp32_on_the_same_batch(loss_impl):
    cfg = _tiny_nanogpt_shape()
    torch.manual_seed(0)
    ref = GPT(GPTConfig.from_dict({**cfg.to_dict(), "attn_backend": "explicit"})).cuda()
    ref.loss_impl = "plain"
    fast = copy.deepcopy(ref)
    fast.loss_impl = loss_impl
    fast.cfg.attn_backend = "fused"  # the blocks share this config object
    x = torch.randint(0, cfg.vocab_size, (8, cfg.context_length), device="cuda")
    y = torch.randint(0, cfg.vocab_size, (8, cfg.context_length), device="cuda")

    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        ref_loss = ref(x, y)  # float32, explicit attention, no autocast
        ref_loss.backward()
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    compiled = torch.compile(fast)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        fast_loss = compiled(x, y)
    fast_loss.backward()

    assert torch.isfinite(fast_loss)
    assert abs(fast_loss.item() - ref_loss.item()) / ref_loss.item() < 1e-2
    for (name, p_ref), p_fast in zip(ref.named_parameters(), fast.parameters()):
        rel = (p_fast.grad - p_ref.grad).norm() / p_ref.grad.norm().clamp_min(1e-12)
        assert rel < 5e-2, f"gradient of {name} differs by {rel:.3g} (relative)"


@pytest.mark.gpu
@needs_cuda
def test_fused_loss_on_cuda_in_bf16_matches_the_plain_loss():
    """The fused head + loss on the GPU under bf16 autocast (padded head, ignored targets, chunks
    that do not divide the rows) against the plain path of the same model, as in training."""
    cfg = _tiny_nanogpt_shape()
    torch.manual_seed(0)
    plain = GPT(cfg).cuda()
    plain.loss_impl = "plain"
    fused = copy.deepcopy(plain)
    fused.loss_impl, fused.loss_chunk = "chunked", 100  # 8 × 128 = 1024 rows: chunks of 100, …, 24
    x = torch.randint(0, cfg.vocab_size, (8, cfg.context_length), device="cuda")
    y = torch.randint(0, cfg.vocab_size, (8, cfg.context_length), device="cuda")
    y[0, :50] = -100
    losses = []
    for model in (plain, fused):
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x, y)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[1] - losses[0]) / losses[0] < 1e-3
    for (name, a), b in zip(plain.named_parameters(), fused.parameters()):
        rel = (b.grad - a.grad).norm() / a.grad.norm().clamp_min(1e-12)
        assert rel < 3e-2, f"gradient of {name} differs by {rel:.3g} (relative)"  # 1.1 % on a CPU in bf16


@pytest.mark.parametrize("loss_impl", ["plain", "chunked", "kernel"])  # kernel: its PyTorch reference on a CPU
def test_a_padded_head_computes_what_the_unpadded_one_does(monkeypatch, loss_impl):
    """The CUDA-only padding of the head (250 → 256 rows), forced on the CPU: the same logits,
    loss and gradients as without it, and no padded id ever sampled."""
    cfg = GPTConfig.from_preset("test", vocab_size=250)
    torch.manual_seed(0)
    idx, targets = torch.randint(0, 250, (2, 16)), torch.randint(0, 250, (2, 16))
    results = []
    for padded in (False, True):
        monkeypatch.setattr(model_module, "pads_vocabulary", lambda device: padded)
        model = sharp_model(cfg)
        model.loss_impl = loss_impl
        assert model._head_weight(idx).shape[0] == (256 if padded else 250)
        with torch.no_grad():
            logits = model(idx)
        loss = model(idx, targets)
        loss.backward()
        sampled = generate(model, idx[:, :4].tolist(), SamplingConfig(max_new_tokens=40, temperature=3.0, seed=0))
        results.append((logits, loss.detach(), [p.grad for p in model.parameters()], sampled))
    (logits, loss, grads, sampled), (p_logits, p_loss, p_grads, p_sampled) = results
    assert p_logits.shape == (2, 16, 250)
    torch.testing.assert_close(p_logits, logits)
    torch.testing.assert_close(p_loss, torch.nn.functional.cross_entropy(logits.reshape(-1, 250), targets.reshape(-1)))
    torch.testing.assert_close(p_grads, grads)
    assert p_sampled == sampled and all(0 <= t < 250 for row in p_sampled for t in row)


@pytest.mark.gpu
@needs_cuda
def test_padded_vocabulary_never_leaves_the_model():
    cfg = _tiny_nanogpt_shape()
    model = sharp_model(cfg, "cuda")
    idx = torch.randint(0, cfg.vocab_size, (2, 16), device="cuda")
    with torch.no_grad():
        assert model(idx).shape == (2, 16, cfg.vocab_size)
    sampled = generate(model, idx.tolist(), SamplingConfig(max_new_tokens=32, temperature=2.0, seed=0))
    assert all(0 <= t < cfg.vocab_size for row in sampled for t in row)
    assert model.out_head.weight.shape[0] == cfg.vocab_size
    assert all(v.shape[0] == cfg.vocab_size for k, v in model.state_dict().items() if "tok_emb" in k)


@pytest.mark.gpu
@needs_cuda
def test_compiled_static_decode_equals_eager_cache_on_cuda():
    cfg = _tiny_nanogpt_shape()
    model = sharp_model(cfg, "cuda")
    prompt = torch.randint(0, cfg.vocab_size, (2, 8), device="cuda")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        eager = generate(model, prompt.tolist(), GREEDY, use_cache=True)
        decoder = StaticDecoder(model, batch=2, max_len=64, compile=True)
        for _ in range(2):  # the first call records the CUDA graph, the second replays it
            assert decoder.generate(prompt, GREEDY).tolist() == eager
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
