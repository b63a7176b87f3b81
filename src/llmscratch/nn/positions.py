"""Ways to tell attention where a token is.

Attention itself is blind to order: permuting the tokens permutes the outputs. A GPT
therefore adds position information, in one of two families:

* **Absolute**: a vector per position added to the token embedding.
  - ``learned`` (GPT-2): an ``nn.Embedding(context_length, C)``; it has no vector for
    positions past the training context, so it caps the sequence length.
  - ``sinusoidal`` ("Attention Is All You Need"): fixed sines and cosines of
    geometrically spaced frequencies, defined for any position.
* **Relative**: attention scores depend on the distance between query and key.
  - ``rope`` (RoFormer): rotate each (q, k) pair of dimensions by an angle proportional
    to the position; the dot product then depends only on the distance.
  - ``alibi`` (Press et al.): add ``-slope_h · (i - j)`` to the scores of head ``h``.
* ``none``: no position signal at all; a causal model can still infer some order from
  the mask (it sees how many tokens precede it).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch

POSITION_KINDS = ("learned", "sinusoidal", "rope", "alibi", "none")


def sinusoidal_embedding(positions: torch.Tensor, dim: int, base: float = 10000.0) -> torch.Tensor:
    """Sinusoidal vectors for integer positions: ``(...,)`` → ``(..., dim)``.

    Even columns hold ``sin(p / base^(2i/dim))``, odd columns the matching cosine.
    """
    half = dim // 2
    freqs = torch.exp(
        -math.log(base) * torch.arange(half, device=positions.device, dtype=torch.float32) / half
    )  # (dim/2,): base^(-2i/dim), from 1 down towards 1/base
    angles = positions.to(torch.float32).unsqueeze(-1) * freqs  # (...,) -> (..., 1) -> (..., dim/2)
    out = torch.zeros(*positions.shape, dim, device=positions.device)
    out[..., 0 : 2 * half : 2] = torch.sin(angles)
    out[..., 1 : 2 * half : 2] = torch.cos(angles)
    return out  # (..., dim)


def rope_cos_sin(
    positions: torch.Tensor, head_dim: int, base: float = 10000.0, scaling: Optional[Mapping[str, Any]] = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation angles for RoPE: ``positions (B, T)`` or ``(T,)`` → ``cos, sin`` of shape ``(..., T, head_dim)``.

    Uses the "rotate half" layout (GPT-NeoX, Llama): dimension ``i`` pairs with ``i + d/2``.
    ``scaling``: Llama 3's stretch of the low frequencies (see :func:`llama3_inv_freq`).
    """
    if head_dim % 2 != 0:
        raise ValueError(f"RoPE needs an even head dimension, got {head_dim}")
    inv_freq = 1.0 / (
        base ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=torch.float32) / head_dim)
    )  # (d/2,)
    if scaling is not None:
        inv_freq = llama3_inv_freq(inv_freq, scaling)
    angles = positions.to(torch.float32).unsqueeze(-1) * inv_freq  # (..., T) -> (..., T, 1) -> (..., T, d/2)
    angles = torch.cat([angles, angles], dim=-1)  # (..., T, d): dimensions i and i + d/2 share an angle
    return angles.cos(), angles.sin()


def llama3_inv_freq(inv_freq: torch.Tensor, scaling: Mapping[str, Any]) -> torch.Tensor:
    """RoPE's frequencies ``(d/2,)`` as Llama 3 stretches them to reach past its training context.

    A frequency whose wavelength (2π / frequency) is short next to the original context
    (``original_max_position_embeddings / high_freq_factor``) is kept: it encodes nearby order.
    One whose wavelength is long (past ``original / low_freq_factor``) never completed a turn in
    training; it is slowed by ``factor``, so longer contexts stay within the angles it saw.
    Between the two, the frequency is blended linearly in ``original / wavelength``.
    """
    factor, low, high = float(scaling["factor"]), float(scaling["low_freq_factor"]), float(scaling["high_freq_factor"])
    original = float(scaling["original_max_position_embeddings"])
    wavelength = 2 * math.pi / inv_freq  # (d/2,)
    blend = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)  # 0: slowed by factor, 1: kept
    return (1 - blend) * inv_freq / factor + blend * inv_freq


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate queries or keys ``x (B, H, T, d)`` by the angles from :func:`rope_cos_sin`.

    Each pair ``(x1, x2) = (x[i], x[i + d/2])`` becomes ``(x1·cos − x2·sin, x2·cos + x1·sin)``,
    a 2-D rotation; rotating q and k by their own positions makes q·k depend on the distance.
    """
    if cos.dim() == 3:  # per-row positions (B, T, d): broadcast over heads
        cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, d)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # (B, H, T, d/2) each
    rotated = torch.cat([-x2, x1], dim=-1)  # (B, H, T, d)
    return (x * cos + rotated * sin).to(x.dtype)  # cos and sin are float32: back to x's dtype


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The per-head slopes of ALiBi: a geometric sequence starting at 2^(-8/n).

    For a head count that is not a power of two, the slopes of the next lower power of
    two are followed by every other slope of the next higher one (as in the paper's code).
    """

    def power_of_two_slopes(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two_slopes(n_heads)
    else:
        lower = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two_slopes(lower) + power_of_two_slopes(2 * lower)[0::2][: n_heads - lower]
    return torch.tensor(slopes, dtype=torch.float32)


def alibi_bias(slopes: torch.Tensor, q_len: int, k_len: int, device: torch.device) -> torch.Tensor:
    """ALiBi's additive score bias ``(H, Tq, Tk)``: ``-slope_h · (i - j)`` for query ``i``, key ``j``.

    Queries are aligned to the end of the keys (a KV cache holds earlier keys).
    Entries with ``j > i`` are positive but always hidden by the causal mask.
    """
    q_pos = torch.arange(k_len - q_len, k_len, device=device, dtype=torch.float32)  # (Tq,)
    k_pos = torch.arange(k_len, device=device, dtype=torch.float32)  # (Tk,)
    distance = q_pos[:, None] - k_pos[None, :]  # (Tq, Tk)
    return -slopes.to(device)[:, None, None] * distance  # (H, Tq, Tk)
