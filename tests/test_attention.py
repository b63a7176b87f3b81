"""Tests for llmscratch.nn.attention: the book's numbers, the two backends, references, properties, errors.

References used: the book's own numbers (chapter 3), a naive loop written here in float64,
``torch.nn.MultiheadAttention``, the book's package ``llms_from_scratch.ch03`` and
``torch.autograd.gradcheck``. Everything runs on CPU in a few seconds.
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch
import torch.nn as nn

from llmscratch.nn.attention import (
    CausalAttention,
    MultiHeadAttention,
    MultiHeadAttentionWrapper,
    SelfAttention,
    SelfAttentionParams,
    attend,
    build_mask,
    resolve_scale,
)

# "Your journey starts with one step", the book's 6×3 embeddings.
BOOK_INPUTS = torch.tensor(
    [
        [0.43, 0.15, 0.89],  # Your
        [0.55, 0.87, 0.66],  # journey
        [0.57, 0.85, 0.64],  # starts
        [0.22, 0.58, 0.33],  # with
        [0.77, 0.25, 0.10],  # one
        [0.05, 0.80, 0.55],  # step
    ]
)
BOOK_BATCH = torch.stack((BOOK_INPUTS, BOOK_INPUTS))  # (2, 6, 3)

BACKEND_PAIR = ("explicit", "fused")


def assert_4dp(actual: torch.Tensor, expected: list[float]) -> None:
    """Equal to 4 decimals, as the book prints them."""
    assert [round(value, 4) for value in actual.detach().double().tolist()] == expected


def naive_attention(q, k, v, *, causal, key_padding_mask=None, attn_bias=None, factor):
    """Attention written with Python loops in float64: an independent reference.

    q (B, H, Tq, d), k/v (B, H, Tk, d); queries aligned to the end of the keys.
    A query with no visible key gets a zero vector.
    """
    q, k, v = q.double(), k.double(), v.double()
    b, h, tq, d = q.shape
    tk = k.shape[2]
    out = torch.zeros(b, h, tq, v.shape[-1], dtype=torch.float64)
    for bi in range(b):
        for hi in range(h):
            for i in range(tq):
                visible = [
                    j for j in range(tk)
                    if (not causal or j <= tk - tq + i)
                    and (key_padding_mask is None or bool(key_padding_mask[bi, j]))
                ]
                if not visible:
                    continue
                scores = []
                for j in visible:
                    s = float(q[bi, hi, i] @ k[bi, hi, j]) * factor
                    if attn_bias is not None:
                        s += float(attn_bias.expand(b, h, tq, tk)[bi, hi, i, j])
                    scores.append(s)
                top = max(scores)
                exps = [math.exp(s - top) for s in scores]
                total = sum(exps)
                for j, e in zip(visible, exps):
                    out[bi, hi, i] += (e / total) * v[bi, hi, j]
    return out


# --------------------------------------------------------------------------- the book's numbers


def test_book_self_attention_raw_parameters():
    torch.manual_seed(123)
    sa = SelfAttentionParams(3, 2)
    assert_4dp(sa(BOOK_INPUTS)[0], [0.2996, 0.8053])


def test_book_self_attention_linear():
    torch.manual_seed(789)
    sa = SelfAttention(3, 2)
    assert_4dp(sa(BOOK_INPUTS)[0], [-0.0739, 0.0713])


def test_book_causal_attention():
    torch.manual_seed(123)
    ca = CausalAttention(3, 2, context_length=6, dropout=0.0)
    out = ca(BOOK_BATCH)
    assert out.shape == (2, 6, 2)
    assert_4dp(out[0, 0], [-0.4519, 0.2216])
    assert_4dp(out[1, 0], [-0.4519, 0.2216])


def test_book_multi_head_wrapper():
    torch.manual_seed(123)
    mha = MultiHeadAttentionWrapper(3, 2, context_length=6, dropout=0.0, num_heads=2)
    out = mha(BOOK_BATCH)
    assert out.shape == (2, 6, 4)
    assert_4dp(out[0, 0], [-0.4519, 0.2216, 0.4772, 0.1063])


def test_book_multi_head_efficient():
    torch.manual_seed(123)
    mha = MultiHeadAttention(3, 2, context_length=6, dropout=0.0, num_heads=2)
    out = mha(BOOK_BATCH)
    assert out.shape == (2, 6, 2)
    assert_4dp(out[0, 0], [0.3190, 0.4858])


@pytest.mark.parametrize("backend", BACKEND_PAIR)
def test_book_numbers_hold_on_both_backends(backend):
    torch.manual_seed(123)
    assert_4dp(SelfAttentionParams(3, 2, backend=backend)(BOOK_INPUTS)[0], [0.2996, 0.8053])
    torch.manual_seed(123)
    mha = MultiHeadAttention(3, 2, context_length=6, dropout=0.0, num_heads=2, backend=backend)
    assert_4dp(mha(BOOK_BATCH)[0, 0], [0.3190, 0.4858])


# --------------------------------------------------------------------------- the book's package


def test_same_seed_same_outputs_as_the_books_classes():
    ch03 = pytest.importorskip("llms_from_scratch.ch03")
    x = torch.rand(3, 9, 5, generator=torch.Generator().manual_seed(0))
    pairs = [
        (lambda: CausalAttention(5, 4, 12, 0.0), lambda: ch03.CausalAttention(5, 4, 12, 0.0)),
        (lambda: MultiHeadAttentionWrapper(5, 3, 12, 0.0, 3),
         lambda: ch03.MultiHeadAttentionWrapper(5, 3, 12, 0.0, 3)),
        (lambda: MultiHeadAttention(5, 6, 12, 0.0, 3), lambda: ch03.MultiHeadAttention(5, 6, 12, 0.0, 3)),
        (lambda: MultiHeadAttention(5, 6, 12, 0.0, 2, qkv_bias=True),
         lambda: ch03.MultiHeadAttention(5, 6, 12, 0.0, 2, qkv_bias=True)),
    ]
    for ours_fn, book_fn in pairs:
        torch.manual_seed(7)
        ours = ours_fn()
        torch.manual_seed(7)
        book = book_fn()
        torch.testing.assert_close(ours(x), book(x))


def test_dropout_matches_the_book_in_training_mode():
    """The explicit path drops attention weights with the same RNG draws as the book's nn.Dropout."""
    ch03 = pytest.importorskip("llms_from_scratch.ch03")
    torch.manual_seed(123)
    ours = MultiHeadAttention(3, 4, 6, dropout=0.5, num_heads=2)
    torch.manual_seed(123)
    book = ch03.MultiHeadAttention(3, 4, 6, dropout=0.5, num_heads=2)
    ours.train(), book.train()
    torch.manual_seed(5)
    a = ours(BOOK_BATCH)
    torch.manual_seed(5)
    b = book(BOOK_BATCH)
    torch.testing.assert_close(a, b)
    ours.eval()
    torch.manual_seed(5)
    dropped = ours.train()(BOOK_BATCH)
    assert not torch.allclose(dropped, ours.eval()(BOOK_BATCH))  # dropout is active only in training


# --------------------------------------------------------------------------- backends agree


SIZES = [(1, 1, 1, 1, 1), (2, 3, 5, 5, 4), (3, 2, 7, 7, 8), (2, 4, 16, 16, 16), (1, 2, 33, 33, 5)]


def _qkv(b, h, tq, tk, d, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, h, tq, d, generator=g, dtype=dtype)
    k = torch.randn(b, h, tk, d, generator=g, dtype=dtype)
    v = torch.randn(b, h, tk, d, generator=g, dtype=dtype)
    return q, k, v


def _padding(b, tk, seed, *, left=False):
    """Random per-sequence lengths, at least one real key each; True = real token."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, tk + 1, (b,), generator=g)
    pos = torch.arange(tk)
    if left:
        return pos.unsqueeze(0) >= (tk - lengths).unsqueeze(1)
    return pos.unsqueeze(0) < lengths.unsqueeze(1)


TOLERANCES = {torch.float32: dict(rtol=1e-5, atol=1e-5), torch.float64: dict(rtol=1e-10, atol=1e-10)}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("scale", [True, False, 0.3])
def test_fused_equals_explicit(dtype, size, causal, padded, scale):
    b, h, tq, tk, d = size
    q, k, v = _qkv(b, h, tq, tk, d, dtype, seed=sum(size))
    kpm = _padding(b, tk, seed=tk) if padded else None
    kwargs = dict(causal=causal, key_padding_mask=kpm, scale=scale)
    fused, w = attend(q, k, v, backend="fused", **kwargs)
    explicit, _ = attend(q, k, v, backend="explicit", **kwargs)
    assert w is None
    assert fused.shape == (b, h, tq, d)
    torch.testing.assert_close(fused, explicit, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("padded", [False, True])
def test_fused_equals_explicit_with_float_bias(dtype, padded):
    """An ALiBi-like additive bias: -slope·distance per head."""
    b, h, t, d = 2, 4, 9, 8
    q, k, v = _qkv(b, h, t, t, d, dtype, seed=3)
    slopes = torch.tensor([2.0 ** -(i + 1) for i in range(h)], dtype=dtype)  # (H,)
    dist = (torch.arange(t)[None, :] - torch.arange(t)[:, None]).to(dtype)  # (T, T), j - i
    bias = (slopes[:, None, None] * dist).unsqueeze(0)  # (1, H, T, T)
    kpm = _padding(b, t, seed=1, left=True) if padded else None
    fused, _ = attend(q, k, v, causal=True, key_padding_mask=kpm, attn_bias=bias, backend="fused")
    explicit, _ = attend(q, k, v, causal=True, key_padding_mask=kpm, attn_bias=bias, backend="explicit")
    torch.testing.assert_close(fused, explicit, **TOLERANCES[dtype])
    reference = naive_attention(q, k, v, causal=True, key_padding_mask=kpm, attn_bias=bias,
                                factor=1 / math.sqrt(d))
    torch.testing.assert_close(explicit.double(), reference, **TOLERANCES[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("tq,tk", [(1, 7), (3, 7), (6, 7), (4, 4)])
@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_alignment_queries_at_the_end(dtype, tq, tk, padded):
    """q_len < k_len: query i sits at position k_len - q_len + i and sees keys up to it."""
    q, k, v = _qkv(2, 2, tq, tk, 4, dtype, seed=tq * 10 + tk)
    kpm = _padding(2, tk, seed=tk, left=True) if padded else None
    fused, _ = attend(q, k, v, causal=True, key_padding_mask=kpm, backend="fused")
    explicit, _ = attend(q, k, v, causal=True, key_padding_mask=kpm, backend="explicit")
    reference = naive_attention(q, k, v, causal=True, key_padding_mask=kpm, factor=1 / 2.0)
    torch.testing.assert_close(fused, explicit, **TOLERANCES[dtype])
    torch.testing.assert_close(explicit.double(), reference, **TOLERANCES[dtype])
    # The last tq queries of a full causal pass are exactly the cached-decode queries.
    full_q = torch.cat([torch.zeros(2, 2, tk - tq, 4, dtype=dtype), q], dim=2)  # (B, H, Tk, d)
    full, _ = attend(full_q, k, v, causal=True, key_padding_mask=kpm, backend="explicit")
    torch.testing.assert_close(full[:, :, tk - tq:], explicit, **TOLERANCES[dtype])


@pytest.mark.parametrize("size", SIZES[1:])
@pytest.mark.parametrize("causal", [True, False])
def test_explicit_equals_naive_loop(size, causal):
    b, h, tq, tk, d = size
    q, k, v = _qkv(b, h, tq, tk, d, torch.float64, seed=11)
    kpm = _padding(b, tk, seed=2)
    out, _ = attend(q, k, v, causal=causal, key_padding_mask=kpm, scale=0.7, backend="explicit")
    torch.testing.assert_close(out, naive_attention(q, k, v, causal=causal, key_padding_mask=kpm, factor=0.7))


@pytest.mark.parametrize("autocast", [False, True])
def test_explicit_bf16_keeps_its_scores_in_float32_as_sdpa_does(autocast):
    # Scores of size ~9: rounded to bf16 before the softmax, the explicit path was 8× further from
    # float64 than SDPA on the same bf16 inputs; in float32 it is as close as SDPA.
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 4, 128, 64, generator=gen) for _ in range(3))
    q, k = 3 * q, 3 * k  # scaled scores q·k/√64 with a spread of 3² = 9 (a sharp softmax)
    q, k, v = q.bfloat16(), k.bfloat16(), v.bfloat16()
    exact = naive_attention(q.double(), k.double(), v.double(), causal=True, key_padding_mask=None,
                            factor=1 / math.sqrt(64))
    context = torch.autocast("cpu", dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with context:
        explicit, _ = attend(q, k, v, backend="explicit")
    fused, _ = attend(q, k, v, backend="fused")
    err_explicit = (explicit.double() - exact).abs().max().item()
    err_fused = (fused.double() - exact).abs().max().item()
    assert explicit.dtype == torch.bfloat16
    assert err_explicit < 2 * err_fused, (err_explicit, err_fused)


@pytest.mark.parametrize(
    "make",
    [
        lambda be: SelfAttentionParams(5, 4, backend=be),
        lambda be: SelfAttention(5, 4, qkv_bias=True, backend=be),
        lambda be: CausalAttention(5, 4, 10, backend=be),
        lambda be: MultiHeadAttentionWrapper(5, 2, 10, 0.0, 3, backend=be),
        lambda be: MultiHeadAttention(5, 6, 10, 0.0, 3, backend=be),
    ],
    ids=["params", "linear", "causal", "wrapper", "mha"],
)
@pytest.mark.parametrize("padded", [False, True])
def test_every_class_fused_equals_explicit(make, padded):
    x = torch.randn(3, 8, 5, generator=torch.Generator().manual_seed(4))
    kpm = _padding(3, 8, seed=9) if padded else None
    torch.manual_seed(1)
    explicit = make("explicit")
    torch.manual_seed(1)
    fused = make("fused")
    torch.testing.assert_close(fused(x, key_padding_mask=kpm), explicit(x, key_padding_mask=kpm))


def test_scale_options():
    d = 4
    assert resolve_scale(True, d) == pytest.approx(0.5)
    assert resolve_scale(False, d) == 1.0
    assert resolve_scale(0.25, d) == 0.25
    assert resolve_scale(3, d) == 3.0
    q, k, v = _qkv(1, 1, 5, 5, d, torch.float64, seed=0)
    for backend in BACKEND_PAIR:
        no_scale, _ = attend(q, k, v, scale=False, backend=backend)
        one, _ = attend(q, k, v, scale=1.0, backend=backend)
        default, _ = attend(q, k, v, scale=True, backend=backend)
        half, _ = attend(q, k, v, scale=0.5, backend=backend)
        torch.testing.assert_close(no_scale, one)
        torch.testing.assert_close(default, half)
        assert not torch.allclose(no_scale, default)


def test_unscaled_scores_give_sharper_weights():
    """Why 1/sqrt(d_k): without it large-d scores saturate the softmax (the weights' entropy drops)."""
    q, k, v = _qkv(1, 1, 16, 16, 256, torch.float64, seed=0)
    _, scaled = attend(q, k, v, causal=False, scale=True, backend="explicit", need_weights=True)
    _, raw = attend(q, k, v, causal=False, scale=False, backend="explicit", need_weights=True)

    def entropy(w):
        return -(w * torch.log(w.clamp_min(1e-300))).sum(-1).mean()

    assert entropy(raw) < entropy(scaled)
    assert raw.max(dim=-1).values.mean() > 0.9  # nearly one-hot


# --------------------------------------------------------------------------- references


def _copy_heads_into_mha(wrapper: MultiHeadAttentionWrapper, mha: MultiHeadAttention) -> None:
    """Stack each head's projection rows into the efficient module; out_proj = identity."""
    with torch.no_grad():
        for name in ("W_query", "W_key", "W_value"):
            getattr(mha, name).weight.copy_(torch.cat([getattr(h, name).weight for h in wrapper.heads], dim=0))
            if getattr(mha, name).bias is not None:
                getattr(mha, name).bias.copy_(torch.cat([getattr(h, name).bias for h in wrapper.heads], dim=0))
        mha.out_proj.weight.copy_(torch.eye(mha.d_out))
        mha.out_proj.bias.zero_()


@pytest.mark.parametrize("backend", BACKEND_PAIR)
@pytest.mark.parametrize("qkv_bias", [False, True])
@pytest.mark.parametrize("num_heads,head_dim", [(1, 4), (2, 2), (3, 5), (4, 8)])
def test_efficient_equals_wrapper_with_copied_weights(backend, qkv_bias, num_heads, head_dim):
    torch.manual_seed(0)
    wrapper = MultiHeadAttentionWrapper(6, head_dim, 12, 0.0, num_heads, qkv_bias=qkv_bias, backend=backend)
    mha = MultiHeadAttention(6, num_heads * head_dim, 12, 0.0, num_heads, qkv_bias=qkv_bias, backend=backend)
    _copy_heads_into_mha(wrapper, mha)
    x = torch.randn(2, 10, 6, generator=torch.Generator().manual_seed(1))
    kpm = _padding(2, 10, seed=3)
    torch.testing.assert_close(mha(x), wrapper(x))
    torch.testing.assert_close(mha(x, key_padding_mask=kpm), wrapper(x, key_padding_mask=kpm))


def _torch_mha_with_copied_weights(ours: MultiHeadAttention) -> nn.MultiheadAttention:
    ref = nn.MultiheadAttention(ours.d_out, ours.num_heads, bias=True, batch_first=True)
    with torch.no_grad():
        ref.in_proj_weight.copy_(torch.cat([ours.W_query.weight, ours.W_key.weight, ours.W_value.weight]))
        ref.in_proj_bias.copy_(torch.cat([ours.W_query.bias, ours.W_key.bias, ours.W_value.bias]))
        ref.out_proj.weight.copy_(ours.out_proj.weight)
        ref.out_proj.bias.copy_(ours.out_proj.bias)
    return ref.eval()


@pytest.mark.parametrize("backend", BACKEND_PAIR)
@pytest.mark.parametrize("num_heads", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_equals_torch_multihead_attention(backend, num_heads, dtype):
    torch.manual_seed(2)
    c, t = 8, 11
    ours = MultiHeadAttention(c, c, 16, 0.0, num_heads, qkv_bias=True, backend=backend).to(dtype).eval()
    ref = _torch_mha_with_copied_weights(ours).to(dtype)
    x = torch.randn(3, t, c, generator=torch.Generator().manual_seed(3), dtype=dtype)
    hidden = torch.triu(torch.ones(t, t, dtype=torch.bool), diagonal=1)  # True = may NOT attend
    expected, ref_weights = ref(x, x, x, attn_mask=hidden, need_weights=True, average_attn_weights=False)
    torch.testing.assert_close(ours(x), expected, **TOLERANCES[dtype])
    # With right padding (every query still sees key 0, so the reference has no NaN rows).
    kpm = _padding(3, t, seed=5)
    expected_pad, _ = ref(x, x, x, attn_mask=hidden, key_padding_mask=~kpm, need_weights=False)
    torch.testing.assert_close(ours(x, key_padding_mask=kpm), expected_pad, **TOLERANCES[dtype])
    # The attention weights agree too.
    out, weights = ours(x, need_weights=True)
    torch.testing.assert_close(weights, ref_weights, **TOLERANCES[dtype])


# --------------------------------------------------------------------------- properties


CAUSAL_MAKERS = {
    "causal": lambda be: CausalAttention(4, 6, 16, backend=be),
    "wrapper": lambda be: MultiHeadAttentionWrapper(4, 3, 16, 0.0, 2, backend=be),
    "mha": lambda be: MultiHeadAttention(4, 6, 16, 0.0, 3, backend=be),
}


@pytest.mark.parametrize("backend", BACKEND_PAIR)
@pytest.mark.parametrize("name", list(CAUSAL_MAKERS))
@pytest.mark.parametrize("t", [0, 3, 8])
def test_causality(backend, name, t):
    torch.manual_seed(0)
    layer = CAUSAL_MAKERS[name](backend)
    g = torch.Generator().manual_seed(t)
    x = torch.randn(2, 10, 4, generator=g)
    changed = x.clone()
    changed[:, t + 1:] = torch.randn(2, 10 - t - 1, 4, generator=g)
    before, after = layer(x), layer(changed)
    torch.testing.assert_close(after[:, : t + 1], before[:, : t + 1], rtol=0, atol=1e-6)
    if t < 9:
        assert not torch.allclose(after[:, t + 1:], before[:, t + 1:])  # the change did reach later tokens


@pytest.mark.parametrize("backend", BACKEND_PAIR)
@pytest.mark.parametrize(
    "make",
    [
        lambda be: SelfAttention(4, 6, backend=be),
        lambda be: CausalAttention(4, 6, 16, backend=be),
        lambda be: MultiHeadAttention(4, 6, 16, 0.0, 2, backend=be),
    ],
    ids=["linear", "causal", "mha"],
)
@pytest.mark.parametrize("padded", [False, True])
def test_batch_independence(backend, make, padded):
    torch.manual_seed(0)
    layer = make(backend)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 7, 4, generator=g)
    kpm = _padding(4, 7, seed=2) if padded else None
    changed = x.clone()
    changed[2] = torch.randn(7, 4, generator=g)
    before, after = layer(x, key_padding_mask=kpm), layer(changed, key_padding_mask=kpm)
    keep = [0, 1, 3]
    torch.testing.assert_close(after[keep], before[keep], rtol=0, atol=1e-6)
    # Each sequence alone gives the same output as inside the batch.
    for i in range(4):
        alone = layer(x[i : i + 1], key_padding_mask=None if kpm is None else kpm[i : i + 1])
        torch.testing.assert_close(alone[0], before[i], rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- key padding


@pytest.mark.parametrize("causal", [True, False])
def test_padded_keys_get_zero_weight(causal):
    q, k, v = _qkv(3, 2, 6, 6, 4, torch.float32, seed=1)
    kpm = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 0]], dtype=torch.bool)
    _, w = attend(q, k, v, causal=causal, key_padding_mask=kpm, backend="explicit", need_weights=True)
    assert w.shape == (3, 2, 6, 6)
    hidden = (~kpm)[:, None, None, :].expand_as(w)  # (B, H, Tq, Tk)
    assert torch.all(w[hidden] == 0)
    torch.testing.assert_close(w.sum(-1), torch.ones(3, 2, 6))


@pytest.mark.parametrize("backend", BACKEND_PAIR)
def test_padded_keys_do_not_change_real_outputs(backend):
    """Right padding: the real tokens' outputs equal those of the unpadded shorter sequence."""
    torch.manual_seed(0)
    for layer in (SelfAttention(4, 6, backend=backend), MultiHeadAttention(4, 6, 16, 0.0, 2, backend=backend)):
        x = torch.randn(1, 9, 4, generator=torch.Generator().manual_seed(1))
        kpm = torch.zeros(1, 9, dtype=torch.bool)
        kpm[:, :5] = True
        torch.testing.assert_close(layer(x, key_padding_mask=kpm)[:, :5], layer(x[:, :5]))


@pytest.mark.parametrize("backend", BACKEND_PAIR)
@pytest.mark.parametrize("causal", [True, False])
def test_fully_padded_query_row_gives_zeros_not_nan(backend, causal):
    q, k, v = _qkv(2, 2, 5, 5, 3, torch.float32, seed=0)
    q.requires_grad_(True)
    if causal:  # left padding: queries 0 and 1 of sequence 0 see no real key
        kpm = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
        dead = (0, slice(None), slice(0, 2))
    else:  # sequence 0 is padding only
        kpm = torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
        dead = (0, slice(None), slice(None))
    out, _ = attend(q, k, v, causal=causal, key_padding_mask=kpm, backend=backend)
    assert torch.isfinite(out).all()
    assert torch.all(out[dead] == 0)
    out.sum().backward()
    assert torch.isfinite(q.grad).all()
    if backend == "explicit":
        _, w = attend(q, k, v, causal=causal, key_padding_mask=kpm, backend=backend, need_weights=True)
        assert torch.all(w[dead] == 0) and torch.isfinite(w).all()


@pytest.mark.parametrize("backend", BACKEND_PAIR)
def test_fully_padded_rows_in_the_classes(backend):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 3)
    kpm = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], dtype=torch.bool)
    ca = CausalAttention(3, 4, 8, backend=backend)
    out = ca(x, key_padding_mask=kpm)
    assert torch.all(out[0, :2] == 0) and torch.isfinite(out).all()
    mha = MultiHeadAttention(3, 4, 8, 0.0, 2, backend=backend)
    out = mha(x, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0, :2], mha.out_proj.bias.detach().expand(2, 4))  # zero context → bias
    sa = SelfAttention(3, 4, backend=backend)
    out = sa(x, key_padding_mask=torch.tensor([[0, 0, 0, 0, 0], [1, 1, 1, 0, 0]], dtype=torch.bool))
    assert torch.all(out[0] == 0) and torch.isfinite(out).all()


# --------------------------------------------------------------------------- weights


@pytest.mark.parametrize("backend", BACKEND_PAIR)
def test_need_weights_rows_sum_to_one_and_are_causal(backend):
    torch.manual_seed(123)
    mha = MultiHeadAttention(3, 4, 6, 0.0, 2, backend=backend)
    out, w = mha(BOOK_BATCH, need_weights=True)
    assert w.shape == (2, 2, 6, 6)
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 6))
    assert torch.all(w.triu(diagonal=1) == 0)
    assert torch.all(w[..., torch.ones(6, 6, dtype=torch.bool).tril()] > 0)  # every earlier token is seen
    torch.testing.assert_close(out, mha(BOOK_BATCH))  # asking for the weights does not change the output

    torch.manual_seed(123)
    ca = CausalAttention(3, 2, 6, backend=backend)
    ctx, w1 = ca(BOOK_INPUTS, need_weights=True)  # (T, d_in) input → (T, T) weights
    assert ctx.shape == (6, 2) and w1.shape == (6, 6)
    torch.testing.assert_close(w1.sum(-1), torch.ones(6))
    assert torch.all(w1.triu(diagonal=1) == 0)
    torch.testing.assert_close(w1 @ ca.W_value(BOOK_INPUTS), ctx)  # context = weights · V

    torch.manual_seed(123)
    sa = SelfAttentionParams(3, 2, backend=backend)
    ctx, w2 = sa(BOOK_INPUTS, need_weights=True)
    torch.testing.assert_close(w2.sum(-1), torch.ones(6))
    assert torch.all(w2 > 0)  # no mask: every token sees every token
    q, k = BOOK_INPUTS @ sa.W_query, BOOK_INPUTS @ sa.W_key
    torch.testing.assert_close(w2, torch.softmax(q @ k.T / math.sqrt(2), dim=-1))


# --------------------------------------------------------------------------- input shapes


@pytest.mark.parametrize(
    "make",
    [
        lambda: SelfAttentionParams(3, 2),
        lambda: SelfAttention(3, 2),
        lambda: CausalAttention(3, 2, 6),
    ],
    ids=["params", "linear", "causal"],
)
def test_single_head_classes_accept_unbatched_input(make):
    torch.manual_seed(0)
    layer = make()
    unbatched = layer(BOOK_INPUTS)
    assert unbatched.shape == (6, 2)
    torch.testing.assert_close(unbatched, layer(BOOK_INPUTS.unsqueeze(0))[0])
    torch.testing.assert_close(unbatched, layer(BOOK_BATCH)[1])


def test_shorter_sequence_uses_top_left_of_the_mask():
    torch.manual_seed(0)
    mha = MultiHeadAttention(3, 4, 6, 0.0, 2)
    torch.testing.assert_close(mha(BOOK_BATCH[:, :4]), mha(BOOK_BATCH)[:, :4])


# --------------------------------------------------------------------------- gradients


def test_gradcheck_explicit_path_float64():
    q, k, v = _qkv(2, 2, 4, 5, 3, torch.float64, seed=0)
    bias = torch.randn(1, 2, 4, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    kpm = torch.tensor([[1, 1, 1, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    for t in (q, k, v, bias):
        t.requires_grad_(True)

    def fn(q, k, v, bias):
        return attend(q, k, v, causal=True, key_padding_mask=kpm, attn_bias=bias, backend="explicit")[0]

    assert torch.autograd.gradcheck(fn, (q, k, v, bias))

    def weights_fn(q, k):
        return attend(q, k, v.detach(), causal=False, scale=0.8, backend="explicit", need_weights=True)[1]

    assert torch.autograd.gradcheck(weights_fn, (q, k))


def test_gradcheck_multi_head_attention_float64():
    torch.manual_seed(0)
    mha = MultiHeadAttention(3, 4, 6, 0.0, 2, qkv_bias=True).double()
    x = torch.randn(2, 5, 3, dtype=torch.float64, requires_grad=True)
    kpm = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: mha(x, key_padding_mask=kpm), (x,))
    # and with respect to the weights themselves
    params = [p for p in mha.parameters()]

    def by_params(*ps):
        out = x.detach()
        names = [n for n, _ in mha.named_parameters()]
        return torch.func.functional_call(mha, dict(zip(names, ps)), (out,))

    assert torch.autograd.gradcheck(by_params, tuple(p.detach().clone().requires_grad_(True) for p in params))


def test_gradcheck_fused_path_float64():
    q, k, v = _qkv(1, 2, 4, 4, 3, torch.float64, seed=2)
    for t in (q, k, v):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda q, k, v: attend(q, k, v, backend="fused")[0], (q, k, v))


def test_gradcheck_fused_path_with_padding_bias_and_dead_rows_float64():
    """What the fused path adds around SDPA: the bias and the mask merged, and the queries that
    see no key at all (left padding under the causal mask) given a visible key and then zeroed.
    Its gradients are checked numerically, and its values and gradients against the explicit path."""
    q, k, v = _qkv(2, 2, 4, 4, 3, torch.float64, seed=5)
    bias = torch.randn(2, 4, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))  # (H, Tq, Tk)
    padding = torch.tensor([[True] * 4, [False, False, True, True]])  # (B, Tk): row 1 padded on the left
    for t in (q, k, v):
        t.requires_grad_(True)

    def run(backend):
        return lambda q, k, v: attend(q, k, v, backend=backend, attn_bias=bias, key_padding_mask=padding)[0]

    assert torch.autograd.gradcheck(run("fused"), (q, k, v))
    fused, explicit = run("fused")(q, k, v), run("explicit")(q, k, v)
    assert fused[1, :, :2].abs().sum() == 0  # queries 0 and 1 of row 1 see no key: zero, not NaN
    torch.testing.assert_close(fused, explicit)
    torch.testing.assert_close(torch.autograd.grad(fused.square().sum(), (q, k, v)),
                               torch.autograd.grad(explicit.square().sum(), (q, k, v)))


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize("d_out,num_heads", [(5, 2), (4, 3), (4, 0)])
def test_d_out_not_divisible_by_heads(d_out, num_heads):
    with pytest.raises(ValueError, match=rf"d_out \({d_out}\) must be divisible by num_heads \({num_heads}\)"):
        MultiHeadAttention(3, d_out, 6, 0.0, num_heads)


@pytest.mark.parametrize("num_kv_heads", [0, 3, 8])
def test_kv_heads_must_divide_the_heads(num_kv_heads):
    with pytest.raises(ValueError, match=rf"num_kv_heads \({num_kv_heads}\) must divide num_heads \(4\)"):
        MultiHeadAttention(3, 8, 6, 0.0, 4, num_kv_heads=num_kv_heads)


@pytest.mark.parametrize("backend", ["explicit", "fused"])
def test_grouped_query_attention_has_narrower_keys_and_values_and_both_backends_agree(backend):
    torch.manual_seed(0)
    grouped = MultiHeadAttention(3, 8, 6, 0.0, 4, num_kv_heads=2, backend=backend).eval()
    assert grouped.W_key.weight.shape == grouped.W_value.weight.shape == (4, 3)  # 2 heads × d = 2, by d_in 3
    explicit = MultiHeadAttention(3, 8, 6, 0.0, 4, num_kv_heads=2, backend="explicit").eval()
    explicit.load_state_dict(grouped.state_dict())
    with torch.no_grad():
        out, weights = explicit(BOOK_BATCH, need_weights=True)
        torch.testing.assert_close(grouped(BOOK_BATCH), out, rtol=1e-5, atol=1e-6)
    assert weights.shape == (2, 4, 6, 6)  # one map per query head


def test_wrapper_needs_a_head():
    with pytest.raises(ValueError, match=r"num_heads must be at least 1, got 0"):
        MultiHeadAttentionWrapper(3, 2, 6, 0.0, 0)


@pytest.mark.parametrize(
    "make,x",
    [
        (lambda: CausalAttention(3, 2, 6), torch.rand(1, 7, 3)),
        (lambda: CausalAttention(3, 2, 6), torch.rand(7, 3)),
        (lambda: MultiHeadAttention(3, 4, 6, 0.0, 2), torch.rand(2, 7, 3)),
        (lambda: MultiHeadAttentionWrapper(3, 2, 6, 0.0, 2), torch.rand(2, 7, 3)),
    ],
    ids=["causal", "causal-2d", "mha", "wrapper"],
)
def test_too_long_sequence_names_both_lengths(make, x):
    with pytest.raises(ValueError, match=r"input has 7 tokens but the context length is 6") as err:
        make()(x)
    assert "context_length >= 7" in str(err.value)


@pytest.mark.parametrize("scale", [0, -1.0, float("inf"), float("nan"), "yes", None])
def test_bad_scale(scale):
    with pytest.raises(ValueError, match=r"scale must be True, False or a positive finite float, got "):
        resolve_scale(scale, 4)
    q, k, v = _qkv(1, 1, 2, 2, 4, torch.float32, seed=0)
    for backend in BACKEND_PAIR:
        with pytest.raises(ValueError, match=r"scale must be True, False or a positive finite float"):
            attend(q, k, v, scale=scale, backend=backend)
    with pytest.raises(ValueError, match=r"scale must be"):
        SelfAttention(4, 2, scale=scale)(torch.rand(3, 4))


def test_bad_backend():
    q, k, v = _qkv(1, 1, 2, 2, 4, torch.float32, seed=0)
    with pytest.raises(ValueError, match=r"attention backend must be one of \('explicit', 'fused'\), got 'flash'"):
        attend(q, k, v, backend="flash")
    with pytest.raises(ValueError, match=r"got 'flash'"):
        MultiHeadAttention(3, 4, 6, 0.0, 2, backend="flash")(BOOK_BATCH)


@pytest.mark.parametrize(
    "kpm,pattern",
    [
        (torch.ones(2, 5, dtype=torch.bool), r"key_padding_mask must have shape \(batch, 6\) \(one flag per key\), got \(2, 5\)"),
        (torch.ones(6, dtype=torch.bool), r"key_padding_mask must have shape \(batch, 6\) \(one flag per key\), got \(6,\)"),
        (torch.ones(2, 1, 6, dtype=torch.bool), r"key_padding_mask must have shape \(batch, 6\).*got \(2, 1, 6\)"),
        (torch.ones(3, 6, dtype=torch.bool), r"key_padding_mask must have shape \(batch, 6\) with the input's batch size 2, got \(3, 6\)"),
    ],
    ids=["short", "1d", "3d", "batch"],
)
@pytest.mark.parametrize("backend", BACKEND_PAIR)
def test_bad_key_padding_mask_shape(kpm, pattern, backend):
    torch.manual_seed(0)
    for layer in (MultiHeadAttention(3, 4, 6, 0.0, 2, backend=backend), CausalAttention(3, 2, 6, backend=backend),
                  SelfAttention(3, 2, backend=backend)):
        with pytest.raises(ValueError, match=pattern):
            layer(BOOK_BATCH, key_padding_mask=kpm)


def test_build_mask_shapes():
    kpm = torch.tensor([[1, 1, 0]], dtype=torch.bool)
    causal = build_mask(3, 3, causal=True, key_padding_mask=None, device=torch.device("cpu"))
    assert causal.tolist() == [[True, False, False], [True, True, False], [True, True, True]]
    assert build_mask(1, 4, causal=True, key_padding_mask=None, device=torch.device("cpu")) is None
    assert build_mask(3, 3, causal=False, key_padding_mask=None, device=torch.device("cpu")) is None
    both = build_mask(2, 3, causal=True, key_padding_mask=kpm, device=torch.device("cpu"))
    assert both.shape == (1, 1, 2, 3)
    assert both[0, 0].tolist() == [[True, True, False], [True, True, False]]
    three = build_mask(3, 3, causal=True, key_padding_mask=kpm, device=torch.device("cpu"), ndim=3)
    assert three.shape == (1, 3, 3)


@pytest.mark.parametrize(
    "make,x,pattern",
    [
        (lambda: SelfAttentionParams(3, 2), torch.rand(3), r"SelfAttentionParams expects input of shape \(T, d_in\) or \(B, T, d_in\), got \(3,\)"),
        (lambda: SelfAttention(3, 2), torch.rand(1, 2, 6, 3), r"SelfAttention expects input of shape \(T, d_in\) or \(B, T, d_in\), got \(1, 2, 6, 3\)"),
        (lambda: CausalAttention(3, 2, 6), torch.rand(1, 1, 6, 3), r"CausalAttention expects input of shape .*got \(1, 1, 6, 3\)"),
        (lambda: MultiHeadAttention(3, 4, 6, 0.0, 2), torch.rand(6, 3), r"MultiHeadAttention expects input \(B, T, d_in\), got \(6, 3\)"),
    ],
    ids=["params-1d", "linear-4d", "causal-4d", "mha-2d"],
)
def test_bad_input_rank(make, x, pattern):
    with pytest.raises(ValueError, match=pattern):
        make()(x)


@pytest.mark.parametrize("p", [-0.1, 1.0, 1.5])
def test_bad_dropout(p):
    with pytest.raises(ValueError, match=rf"dropout must be in \[0, 1\), got {p}"):
        CausalAttention(3, 2, 6, dropout=p)
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\)"):
        MultiHeadAttention(3, 4, 6, dropout=p, num_heads=2)
