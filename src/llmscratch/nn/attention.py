"""Self-attention, from trainable weights to causal multi-head attention over batches.

The module follows the order in which the idea is usually taught:

1. ``SelfAttentionParams``  – raw ``nn.Parameter`` matrices, ``x @ W``.
2. ``SelfAttention``        – the same with ``nn.Linear`` projections.
3. ``CausalAttention``      – a mask over future positions and dropout on the weights.
4. ``MultiHeadAttentionWrapper`` – several independent causal heads, concatenated.
5. ``MultiHeadAttention``   – the efficient form: one projection per Q, K, V, split into
   heads by reshaping into ``(B, H, T, d)``.

All of them end in one function, :func:`attend`, which computes
``softmax(mask(Q·Kᵀ · scale)) · V`` with one of two backends:

* ``"explicit"``: the matrix products, mask, softmax and dropout written out. It can
  return the attention weights, which the inspection tools draw.
* ``"fused"``: :func:`torch.nn.functional.scaled_dot_product_attention`, which picks
  PyTorch's fastest kernel (flash, memory-efficient, cuDNN) for the device.

Tests hold the two equal. Shapes: ``B`` batch, ``H`` heads, ``T`` tokens, ``d`` head dim.
"""

from __future__ import annotations

import math
from typing import Literal, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

Backend = Literal["explicit", "fused"]
Scale = Union[bool, float]
BACKENDS = ("explicit", "fused")


def resolve_scale(scale: Scale, head_dim: int) -> float:
    """The factor the scores Q·Kᵀ are multiplied by: 1/√d_k, 1 (no scaling) or a given float.

    Why 1/√d_k: a dot product of d_k unit-variance entries has variance d_k; scaled, the
    scores keep a spread near 1 at any head size, so softmax does not saturate to one-hot.
    """
    if scale is True:
        return 1.0 / math.sqrt(head_dim)
    if scale is False:
        return 1.0
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        if not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"scale must be True, False or a positive finite float, got {scale!r}")
        return float(scale)
    raise ValueError(f"scale must be True, False or a positive finite float, got {scale!r}")


def build_mask(
    q_len: int,
    k_len: int,
    *,
    causal: bool,
    key_padding_mask: Optional[torch.Tensor],
    device: torch.device,
    causal_mask: Optional[torch.Tensor] = None,
    ndim: int = 4,
) -> Optional[torch.Tensor]:
    """Boolean mask of the keys each query may see, ``True`` = visible.

    Queries are aligned to the *end* of the keys: with a KV cache, ``q_len`` new tokens
    follow ``k_len - q_len`` cached ones, so query ``i`` sits at absolute position
    ``k_len - q_len + i`` and sees keys ``j <= k_len - q_len + i``.

    ``causal_mask`` replaces the computed causal part (the book-style layers pass the
    top-left corner of their stored mask buffer).

    ``ndim`` is the rank of the scores the mask will be applied to: 4 for ``(B, H, Tq, Tk)``
    (multi-head), 3 for ``(B, Tq, Tk)`` (the single-head classes); the padding flags are
    placed on the batch axis of that rank.

    Returns ``None`` when every key is visible to every query, else a mask that
    broadcasts to the scores: ``(q_len, k_len)`` (causal only), ``(B, 1, 1, k_len)`` or
    ``(B, 1, k_len)`` (padding only), ``(B, 1, q_len, k_len)`` or ``(B, q_len, k_len)`` (both).
    """
    mask = None
    if causal and causal_mask is not None:
        mask = causal_mask.to(device=device, dtype=torch.bool)  # (Tq, Tk), given by the caller
    elif causal and q_len > 1:  # a single newest query sees every key
        offset = k_len - q_len
        q_pos = torch.arange(q_len, device=device).unsqueeze(1) + offset  # (Tq, 1)
        k_pos = torch.arange(k_len, device=device).unsqueeze(0)  # (1, Tk)
        mask = k_pos <= q_pos  # (Tq, Tk)
    if key_padding_mask is not None:
        if key_padding_mask.dim() != 2 or key_padding_mask.shape[1] != k_len:
            raise ValueError(
                f"key_padding_mask must have shape (batch, {k_len}) (one flag per key), "
                f"got {tuple(key_padding_mask.shape)}"
            )
        pad = key_padding_mask.to(device=device, dtype=torch.bool)
        pad = pad.reshape(pad.shape[0], *([1] * (ndim - 2)), k_len)  # (B, 1, 1, Tk) or (B, 1, Tk)
        mask = pad if mask is None else (mask & pad)  # both: (B, 1, Tq, Tk) or (B, Tq, Tk)
    return mask


def attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    key_padding_mask: Optional[torch.Tensor] = None,
    attn_bias: Optional[torch.Tensor] = None,
    scale: Scale = True,
    dropout_p: float = 0.0,
    backend: Backend = "fused",
    need_weights: bool = False,
    causal_mask: Optional[torch.Tensor] = None,
) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Scaled dot-product attention over ``(..., T, d)`` tensors.

    Args:
        q: queries ``(B, H, Tq, d)`` (any leading dims work).
        k, v: keys and values ``(B, H_kv, Tk, d)``; ``Tk >= Tq`` with a KV cache. ``H_kv`` divides
            ``H``: with fewer key/value heads (grouped-query attention) query head ``h`` reads
            key/value head ``h // (H / H_kv)``.
        causal: hide future keys (queries aligned to the end of the keys).
        key_padding_mask: ``(B, Tk)`` bool, ``True`` for real tokens, ``False`` for padding.
        attn_bias: float tensor added to the scores (ALiBi), broadcastable to ``(B, H, Tq, Tk)``.
        scale: ``True`` for 1/√d_k, ``False`` for none, or a float factor.
        dropout_p: dropout on the attention weights (pass 0.0 in eval mode).
        backend: ``"explicit"`` or ``"fused"``; asking for the weights forces ``"explicit"``.
        need_weights: also return the attention weights ``(B, H, Tq, Tk)``.
        causal_mask: optional precomputed ``(Tq, Tk)`` bool mask, ``True`` = visible.

    Returns:
        ``(context (B, H, Tq, d), weights or None)``. A query that sees no key at all
        (a fully padded row) gets a zero context vector and zero weights, never NaN.
    """
    if backend not in BACKENDS:
        raise ValueError(f"attention backend must be one of {BACKENDS}, got {backend!r}")
    q_len, k_len, head_dim = q.shape[-2], k.shape[-2], q.shape[-1]
    factor = resolve_scale(scale, head_dim)
    if key_padding_mask is not None and q.dim() < 3:
        raise ValueError(f"key_padding_mask needs batched queries (B, ..., T, d), got {tuple(q.shape)}")
    if key_padding_mask is not None and key_padding_mask.dim() == 2 and key_padding_mask.shape[0] != q.shape[0]:
        raise ValueError(
            f"key_padding_mask must have shape (batch, {k_len}) with the input's batch size "
            f"{q.shape[0]}, got {tuple(key_padding_mask.shape)}"
        )
    mask = build_mask(
        q_len, k_len, causal=causal, key_padding_mask=key_padding_mask, device=q.device,
        causal_mask=causal_mask, ndim=q.dim(),
    )
    # Rows with no visible key at all (possible only with padding) are zeroed at the end.
    dead_rows = None
    if key_padding_mask is not None and mask is not None:
        dead_rows = ~mask.any(dim=-1, keepdim=True)  # the mask's shape with Tk -> 1, e.g. (B, 1, Tq, 1)

    groups = _query_groups(q, k)
    if backend == "fused" and not need_weights:
        return _fused(q, k, v, mask, attn_bias, dead_rows, factor, dropout_p,
                      plain_causal=causal and key_padding_mask is None and causal_mask is None and q_len == k_len,
                      grouped=groups > 1), None
    if groups > 1:
        context, weights = _explicit_grouped(q, k, v, mask, attn_bias, dead_rows, factor, dropout_p, groups)
    else:
        context, weights = _explicit(q, k, v, mask, attn_bias, dead_rows, factor, dropout_p)
    return context, (weights if need_weights else None)


def _query_groups(q: torch.Tensor, k: torch.Tensor) -> int:
    """How many query heads share each key/value head: ``H / H_kv`` (1 for plain multi-head attention)."""
    if q.dim() < 3 or k.dim() < 3 or q.shape[-3] == k.shape[-3]:
        return 1
    if q.shape[-3] % k.shape[-3] != 0:
        raise ValueError(f"{k.shape[-3]} key/value heads cannot be shared evenly by {q.shape[-3]} query heads "
                         f"(q {tuple(q.shape)}, k {tuple(k.shape)})")
    return q.shape[-3] // k.shape[-3]


def _explicit_grouped(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
                      attn_bias: Optional[torch.Tensor], dead_rows: Optional[torch.Tensor], factor: float,
                      dropout_p: float, groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_explicit` for grouped-query attention, without copying a key or value.

    The ``G = H / H_kv`` query heads that share a key/value head are stacked as extra query
    rows of that head: ``(B, H, Tq, d)`` → ``(B, H_kv, G·Tq, d)``. Every row still meets the
    keys of its own head, so the arithmetic is :func:`_explicit`'s; the mask and the bias,
    given per query row, are repeated (or regrouped, per head) to match.
    """
    *lead, h, t, d = q.shape
    h_kv = h // groups
    q_rows = q.reshape(*lead, h_kv, groups * t, d)  # (B, H_kv, G·Tq, d): head h = kv·G + g
    mask, dead_rows = _repeat_rows(mask, groups, t), _repeat_rows(dead_rows, groups, t)
    if attn_bias is not None:
        attn_bias = attn_bias.expand(*attn_bias.shape[:-3], h, t, attn_bias.shape[-1])  # (..., H, Tq, Tk)
        attn_bias = attn_bias.reshape(*attn_bias.shape[:-3], h_kv, groups * t, attn_bias.shape[-1])  # (..., H_kv, G·Tq, Tk)
    context, weights = _explicit(q_rows, k, v, mask, attn_bias, dead_rows, factor, dropout_p)
    context = context.reshape(*lead, h, t, d)  # (B, H, Tq, d)
    weights = weights.reshape(*lead, h, t, weights.shape[-1])  # (B, H, Tq, Tk)
    return context, weights


def _repeat_rows(mask: Optional[torch.Tensor], groups: int, q_len: int) -> Optional[torch.Tensor]:
    """A mask given per query row ``(..., Tq, Tk)`` repeated for ``groups`` stacked heads: ``(..., G·Tq, Tk)``.

    A mask with one row for every query (``(..., 1, Tk)``, padding only) broadcasts as it is.
    """
    if mask is None or mask.dim() < 2 or mask.shape[-2] == 1:
        return mask
    assert mask.shape[-2] == q_len, (tuple(mask.shape), q_len)
    return mask.repeat(*([1] * (mask.dim() - 2)), groups, 1)  # (..., G·Tq, Tk)


def _fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
           attn_bias: Optional[torch.Tensor], dead_rows: Optional[torch.Tensor], factor: float, dropout_p: float,
           plain_causal: bool, grouped: bool = False) -> torch.Tensor:
    """:func:`attend`'s fused path: PyTorch's SDPA with our mask (or ``is_causal``) and bias.

    ``grouped``: fewer key/value heads than query heads, which SDPA shares itself (``enable_gqa``).
    """
    sdpa_mask = mask
    is_causal = False
    if attn_bias is not None:
        sdpa_mask = attn_bias.to(q.dtype)
        if mask is not None:
            sdpa_mask = sdpa_mask.masked_fill(~mask, float("-inf"))
    elif mask is not None and plain_causal:
        # SDPA's is_causal aligns the mask top-left, ours bottom-right: equal only when Tq == Tk.
        sdpa_mask, is_causal = None, True  # lets SDPA pick the flash kernel
    if dead_rows is not None and sdpa_mask is not None:
        # Give fully masked rows one visible key so no kernel produces NaN; zeroed below.
        if sdpa_mask.dtype == torch.bool:
            sdpa_mask = sdpa_mask | dead_rows
        else:
            sdpa_mask = sdpa_mask.masked_fill(dead_rows, 0.0)
    gqa = {"enable_gqa": True} if grouped else {}  # only where needed: PyTorch before 2.5 lacks the argument
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=sdpa_mask, dropout_p=dropout_p, is_causal=is_causal, scale=factor, **gqa
    )  # (B, H, Tq, d)
    if dead_rows is not None:
        out = out.masked_fill(dead_rows, 0.0)
    return out


def _explicit(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
              attn_bias: Optional[torch.Tensor], dead_rows: Optional[torch.Tensor], factor: float,
              dropout_p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`attend`'s explicit path, written out line by line: ``(context, weights)``.

    The mask (and ALiBi) become one additive bias: 0 where a key is visible, -inf where it is
    hidden (softmax turns -inf into weight 0), so scaling and masking the scores is a single
    pass over them (faster on a CPU than two: docs/performance.md).
    """
    if q.dtype in (torch.float16, torch.bfloat16):
        # Scores in float32, as fused kernels keep them: rounded to bf16's 8 bits, Q·Kᵀ of size ~9
        # gave attention outputs 8× further from float64 than SDPA's (autocast would round them again).
        with torch.autocast(q.device.type, enabled=False):
            scores = q.float() @ k.float().transpose(-2, -1)  # (B, H, Tq, Tk)
    else:
        scores = q @ k.transpose(-2, -1)  # (B, H, Tq, Tk)
    bias = None
    if attn_bias is not None:
        # In float32: a large bias (ALiBi over long distances) added in bf16 loses the scores.
        bias = attn_bias.to(torch.promote_types(scores.dtype, torch.float32))
    if mask is not None:
        hidden = ~mask
        bias = torch.zeros(hidden.shape, dtype=scores.dtype, device=scores.device) if bias is None else bias
        bias = bias.masked_fill(hidden, float("-inf"))  # broadcasts to the scores
    scores = scores * factor if bias is None else torch.add(bias, scores, alpha=factor)  # bias + factor·scores
    if dead_rows is not None:
        scores = scores.masked_fill(dead_rows, 0.0)  # softmax of a row of -inf is NaN
    weights = torch.softmax(scores, dim=-1)  # (B, H, Tq, Tk)
    if dead_rows is not None:
        weights = weights.masked_fill(dead_rows, 0.0)
    if dropout_p > 0.0:  # callers pass 0.0 in eval mode, so training=True is safe here
        weights = F.dropout(weights, p=dropout_p, training=True)
    context = weights.to(v.dtype) @ v  # (B, H, Tq, d)
    return context, weights


def _as_batch(x: torch.Tensor, name: str) -> tuple[torch.Tensor, bool]:
    """Accept ``(T, d_in)`` or ``(B, T, d_in)``; return a 3-D tensor and whether to squeeze."""
    if x.dim() == 2:
        return x.unsqueeze(0), True  # (1, T, d_in)
    if x.dim() == 3:
        return x, False
    raise ValueError(f"{name} expects input of shape (T, d_in) or (B, T, d_in), got {tuple(x.shape)}")


class SelfAttentionParams(nn.Module):
    """Self-attention with raw trainable matrices W_q, W_k, W_v (``x @ W``), no causal mask.

    The weights are ``nn.Parameter(torch.rand(d_in, d_out))`` created in the order
    query, key, value, so with the same seed the numbers match the book's chapter 3.
    """

    def __init__(self, d_in: int, d_out: int, scale: Scale = True, backend: Backend = "explicit"):
        super().__init__()
        self.W_query = nn.Parameter(torch.rand(d_in, d_out))
        self.W_key = nn.Parameter(torch.rand(d_in, d_out))
        self.W_value = nn.Parameter(torch.rand(d_in, d_out))
        self.scale = scale
        self.backend = backend

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = False,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Each token's context vector, from every token (not causal); ``(context, weights)`` with ``need_weights``."""
        x, squeeze = _as_batch(x, type(self).__name__)
        queries = x @ self.W_query  # (B, T, d_out)
        keys = x @ self.W_key  # (B, T, d_out)
        values = x @ self.W_value  # (B, T, d_out)
        context, weights = attend(
            queries, keys, values, causal=False, key_padding_mask=key_padding_mask,
            scale=self.scale, backend=self.backend, need_weights=need_weights,
        )
        return _finish(context, weights, squeeze, need_weights)


class SelfAttention(nn.Module):
    """Self-attention with ``nn.Linear`` projections (optional bias), no causal mask."""

    def __init__(
        self, d_in: int, d_out: int, qkv_bias: bool = False, scale: Scale = True,
        backend: Backend = "explicit",
    ):
        super().__init__()
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.scale = scale
        self.backend = backend

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = False,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Each token's context vector, from every token (not causal); ``(context, weights)`` with ``need_weights``."""
        x, squeeze = _as_batch(x, type(self).__name__)
        context, weights = attend(
            self.W_query(x), self.W_key(x), self.W_value(x), causal=False,
            key_padding_mask=key_padding_mask, scale=self.scale, backend=self.backend,
            need_weights=need_weights,
        )
        return _finish(context, weights, squeeze, need_weights)


class CausalAttention(nn.Module):
    """One causal head: a token attends only to itself and earlier tokens.

    As in the book, the context length is fixed at construction and the mask is kept
    as a buffer (``1`` above the diagonal = hidden); shorter inputs use its top-left part.
    """

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float = 0.0,
        qkv_bias: bool = False, scale: Scale = True, backend: Backend = "explicit",
    ):
        super().__init__()
        _check_dropout(dropout)
        self.d_out = d_out
        self.context_length = context_length
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))
        self.scale = scale
        self.backend = backend

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = False,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Each token's context vector, from itself and earlier tokens; ``(context, weights)`` with ``need_weights``."""
        x, squeeze = _as_batch(x, type(self).__name__)
        num_tokens = x.shape[1]
        _check_length(num_tokens, self.context_length, type(self).__name__)
        # The buffer's top-left corner is exactly the causal mask for num_tokens.
        visible = ~self.mask.bool()[:num_tokens, :num_tokens]  # (T, T), True = may attend
        context, weights = attend(
            self.W_query(x), self.W_key(x), self.W_value(x), causal=True,
            key_padding_mask=key_padding_mask, scale=self.scale,
            dropout_p=self.dropout.p if self.training else 0.0,
            backend=self.backend, need_weights=need_weights, causal_mask=visible,
        )
        return _finish(context, weights, squeeze, need_weights)


class MultiHeadAttentionWrapper(nn.Module):
    """Multi-head attention as a stack of independent :class:`CausalAttention` heads.

    Each head has its own ``d_out``; outputs are concatenated, so two heads of
    ``d_out=2`` give 4 output columns (the book's chapter 3 convention).
    """

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
        qkv_bias: bool = False, scale: Scale = True, backend: Backend = "explicit",
    ):
        super().__init__()
        if num_heads < 1:
            raise ValueError(f"num_heads must be at least 1, got {num_heads}")
        self.heads = nn.ModuleList(
            [CausalAttention(d_in, d_out, context_length, dropout, qkv_bias, scale, backend)
             for _ in range(num_heads)]
        )

    def forward(self, x: torch.Tensor, key_padding_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Every head's context vectors, concatenated: ``(B, T, num_heads · d_out)``."""
        return torch.cat([head(x, key_padding_mask) for head in self.heads], dim=-1)  # (B, T, H*d_out)


class MultiHeadAttention(nn.Module):
    """Efficient multi-head causal attention: project once, split into heads by reshaping.

    ``d_out`` is the total width; each of the ``num_heads`` heads works in its own
    ``d_out / num_heads``-dimensional subspace. An output projection mixes the heads.

    ``num_kv_heads`` (default ``num_heads``) below ``num_heads`` gives grouped-query attention
    (Ainslie et al. 2023, as in Llama and Qwen): ``W_key`` and ``W_value`` are only
    ``num_kv_heads · d`` wide, and each key/value head is shared by ``num_heads / num_kv_heads``
    query heads (:func:`attend` pairs them), so a KV cache holds that many times fewer values.
    With the default the module is the book's, weight for weight.
    """

    def __init__(
        self, d_in: int, d_out: int, context_length: int, dropout: float, num_heads: int,
        qkv_bias: bool = False, scale: Scale = True, backend: Backend = "explicit",
        num_kv_heads: Optional[int] = None,
    ):
        super().__init__()
        if num_heads < 1 or d_out % num_heads != 0:
            raise ValueError(
                f"d_out ({d_out}) must be divisible by num_heads ({num_heads}): "
                "each head gets d_out / num_heads dimensions"
            )
        kv_heads = num_heads if num_kv_heads is None else num_kv_heads
        if kv_heads < 1 or num_heads % kv_heads != 0:
            raise ValueError(
                f"num_kv_heads ({kv_heads}) must divide num_heads ({num_heads}): "
                "each key/value head is shared by an equal group of query heads"
            )
        _check_dropout(dropout)
        self.d_out = d_out
        self.num_heads = num_heads
        self.num_kv_heads = kv_heads
        self.head_dim = d_out // num_heads
        self.context_length = context_length
        self.W_query = nn.Linear(d_in, d_out, bias=qkv_bias)
        self.W_key = nn.Linear(d_in, kv_heads * self.head_dim, bias=qkv_bias)
        self.W_value = nn.Linear(d_in, kv_heads * self.head_dim, bias=qkv_bias)
        self.out_proj = nn.Linear(d_out, d_out)
        self.dropout = nn.Dropout(dropout)
        self.register_buffer("mask", torch.triu(torch.ones(context_length, context_length), diagonal=1))
        self.scale = scale
        self.backend = backend

    def split_heads(self, t: torch.Tensor, heads: Optional[int] = None) -> torch.Tensor:
        """``(B, T, heads · d)`` → ``(B, heads, T, d)``: each head gets its own ``d = d_out / H`` columns.

        ``heads`` defaults to the query heads ``H``; the keys and values pass ``num_kv_heads``.
        """
        b, num_tokens, _ = t.shape
        t = t.view(b, num_tokens, heads or self.num_heads, self.head_dim)  # (B, T, heads, d)
        return t.transpose(1, 2)  # (B, heads, T, d)

    def forward(
        self,
        x: torch.Tensor,
        key_padding_mask: Optional[torch.Tensor] = None,
        need_weights: bool = False,
    ) -> Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """Each token's context vector ``(B, T, d_out)``, heads merged; ``(out, weights)`` with ``need_weights``."""
        if x.dim() != 3:
            raise ValueError(f"MultiHeadAttention expects input (B, T, d_in), got {tuple(x.shape)}")
        b, num_tokens, _ = x.shape
        _check_length(num_tokens, self.context_length, type(self).__name__)
        queries = self.split_heads(self.W_query(x))  # (B, H, T, d)
        keys = self.split_heads(self.W_key(x), self.num_kv_heads)  # (B, H_kv, T, d)
        values = self.split_heads(self.W_value(x), self.num_kv_heads)  # (B, H_kv, T, d)
        visible = ~self.mask.bool()[:num_tokens, :num_tokens]  # (T, T), True = may attend
        context, weights = attend(
            queries, keys, values, causal=True, key_padding_mask=key_padding_mask,
            scale=self.scale, dropout_p=self.dropout.p if self.training else 0.0,
            backend=self.backend, need_weights=need_weights, causal_mask=visible,
        )
        context = context.transpose(1, 2)  # (B, T, H, d)
        # reshape, not view: the transpose left the memory non-contiguous
        context = context.reshape(b, num_tokens, self.d_out)  # (B, T, H, d) -> (B, T, d_out): heads merged
        out = self.out_proj(context)
        return (out, weights) if need_weights else out


def _finish(
    context: torch.Tensor, weights: Optional[torch.Tensor], squeeze: bool, need_weights: bool
) -> Union[torch.Tensor, tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """Undo :func:`_as_batch`'s added batch axis; return the weights only when asked for."""
    if squeeze:
        context = context.squeeze(0)  # (T, d_out)
        weights = weights.squeeze(0) if weights is not None else None  # (T, T)
    return (context, weights) if need_weights else context


def _check_length(num_tokens: int, context_length: int, who: str) -> None:
    if num_tokens > context_length:
        raise ValueError(
            f"{who}: input has {num_tokens} tokens but the context length is {context_length}; "
            f"shorten the input or build the layer with context_length >= {num_tokens}"
        )


def _check_dropout(p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {p}")
