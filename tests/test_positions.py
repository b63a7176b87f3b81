"""Tests of positions.py against the formulas of the papers, written out independently."""

from __future__ import annotations

import math

import pytest
import torch

from llmscratch.nn.positions import (
    alibi_bias,
    alibi_slopes,
    apply_rope,
    rope_cos_sin,
    sinusoidal_embedding,
)


def rope(x: torch.Tensor, position: int) -> torch.Tensor:
    """RoPE of one vector ``x (..., d)`` at an integer position, through our module."""
    cos, sin = rope_cos_sin(torch.tensor([position]), x.shape[-1])  # (1, d) each
    return apply_rope(x.reshape(1, 1, 1, -1), cos, sin).reshape(x.shape)  # (d,)


def rope_complex(x: torch.Tensor, positions: torch.Tensor, base: float = 10000.0) -> torch.Tensor:
    """An independent RoPE: dimensions (i, i + d/2) form the complex number x_i + j·x_{i+d/2},
    which is multiplied by e^{j·pos·θ_i} with θ_i = base^(-2i/d)."""
    d = x.shape[-1]
    half = d // 2
    theta = base ** (-2.0 * torch.arange(half, dtype=torch.float64) / d)  # (d/2,)
    z = torch.complex(x[..., :half].double(), x[..., half:].double())  # (..., T, d/2)
    angle = positions.double()[:, None] * theta[None, :]  # (T, d/2)
    z = z * torch.polar(torch.ones_like(angle), angle)  # (..., T, d/2)
    return torch.cat([z.real, z.imag], dim=-1).float()  # (..., T, d)


def test_rope_matches_complex_rotation():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 16)  # (B, H, T, d)
    positions = torch.tensor([0, 1, 2, 5, 100, 1023, 4000])
    cos, sin = rope_cos_sin(positions, 16)
    out, ref = apply_rope(x, cos, sin), rope_complex(x, positions)
    torch.testing.assert_close(out[..., :4, :], ref[..., :4, :], atol=1e-5, rtol=1e-5)
    # float32 angles of size ~4000 carry ~4000·eps of error, hence the looser bound far out
    torch.testing.assert_close(out, ref, atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("base", [500.0, 500000.0])
def test_rope_base_sets_the_rotation_frequencies(base):
    torch.manual_seed(3)
    x = torch.randn(2, 3, 9, 16)  # (B, H, T, d)
    positions = torch.arange(9)
    cos, sin = rope_cos_sin(positions, 16, base=base)
    torch.testing.assert_close(apply_rope(x, cos, sin), rope_complex(x, positions, base=base), atol=1e-5, rtol=1e-5)


def test_the_models_rope_base_reaches_its_attention():
    """A model built with ``rope_base`` rotates its queries and keys with that base: its attention
    weights are those of Q and K rotated by the independent complex RoPE with the same base."""
    from llmscratch.nn.model import GPT, GPTConfig

    torch.manual_seed(4)
    cfg = GPTConfig.from_preset("test", pos_emb="rope", rope_base=500.0)
    model = GPT(cfg).eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 10))
    seen = []
    handle = model.blocks[0].attn.register_forward_pre_hook(lambda module, args: seen.append(args[0]))
    with torch.no_grad():
        _, weights = model(idx, need_weights=True)
        handle.remove()
        h, d = cfg.n_heads, cfg.head_dim
        qkv = model.blocks[0].attn.qkv(seen[0]).view(2, 10, 3, h, d)  # (B, T, 3, H, d)
        q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)  # (B, H, T, d) each
        q, k = rope_complex(q, torch.arange(10), base=500.0), rope_complex(k, torch.arange(10), base=500.0)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(d)  # (B, H, T, T)
        scores = scores.masked_fill(torch.ones(10, 10, dtype=torch.bool).triu(1), float("-inf"))
        torch.testing.assert_close(weights[0], scores.softmax(dim=-1), atol=1e-5, rtol=1e-4)


def test_rope_per_row_positions_broadcast_over_heads():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 8)  # (B, H, T, d)
    positions = torch.tensor([[0, 1, 2, 3], [7, 8, 9, 10]])  # (B, T)
    cos, sin = rope_cos_sin(positions, 8)  # (B, T, d)
    out = apply_rope(x, cos, sin)
    for row in range(2):
        torch.testing.assert_close(out[row], rope_complex(x[row], positions[row]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("m, n, shift", [(0, 0, 10), (3, 1, 7), (10, 25, 100), (5, 0, 1000)])
def test_rope_dot_product_depends_only_on_distance(m, n, shift):
    torch.manual_seed(2)
    q, k = torch.randn(32), torch.randn(32)
    here = rope(q, m) @ rope(k, n)
    there = rope(q, m + shift) @ rope(k, n + shift)
    torch.testing.assert_close(here, there, atol=1e-4, rtol=1e-4)
    # and it really does depend on the distance
    assert not torch.allclose(here, rope(q, m + 3) @ rope(k, n), atol=1e-3)


def test_rope_at_position_zero_is_identity_and_keeps_norms():
    torch.manual_seed(3)
    x = torch.randn(16)
    torch.testing.assert_close(rope(x, 0), x)
    torch.testing.assert_close(rope(x, 37).norm(), x.norm())


def test_rope_refuses_odd_head_dim():
    with pytest.raises(ValueError, match="even head dimension"):
        rope_cos_sin(torch.arange(3), 7)


def test_alibi_slopes_power_of_two():
    expected = torch.tensor([1 / 2 ** i for i in range(1, 9)])  # 1/2, 1/4, …, 1/256
    torch.testing.assert_close(alibi_slopes(8), expected)
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([1 / 4, 1 / 16, 1 / 64, 1 / 256]))
    torch.testing.assert_close(alibi_slopes(16), torch.tensor([2 ** (-0.5 * i) for i in range(1, 17)]))


def test_alibi_slopes_non_power_of_two_follow_the_paper():
    # 6 heads: the 4 slopes of 4 heads, then every other slope of 8 heads (1/2, 1/8).
    torch.testing.assert_close(alibi_slopes(6), torch.tensor([1 / 4, 1 / 16, 1 / 64, 1 / 256, 1 / 2, 1 / 8]))
    # 12 heads: the 8 slopes of 8 heads, then 2^-0.5, 2^-1.5, 2^-2.5, 2^-3.5 from 16 heads.
    expected = [1 / 2 ** i for i in range(1, 9)] + [2 ** -0.5, 2 ** -1.5, 2 ** -2.5, 2 ** -3.5]
    torch.testing.assert_close(alibi_slopes(12), torch.tensor(expected))
    assert alibi_slopes(3).shape == (3,) and alibi_slopes(25).shape == (25,)


def test_alibi_bias_is_minus_slope_times_distance():
    slopes = alibi_slopes(2)  # 1/16, 1/256
    bias = alibi_bias(slopes, 3, 3, torch.device("cpu"))  # (H, T, T)
    assert bias.shape == (2, 3, 3)
    assert bias[0, 2, 0].item() == pytest.approx(-2 / 16)
    assert bias[1, 1, 0].item() == pytest.approx(-1 / 256)
    assert torch.all(torch.diagonal(bias, dim1=-2, dim2=-1) == 0)
    # With a cache: 1 query after 4 cached keys sits at position 4.
    step = alibi_bias(slopes, 1, 5, torch.device("cpu"))  # (H, 1, 5)
    torch.testing.assert_close(step[0, 0], -torch.tensor([4.0, 3, 2, 1, 0]) / 16)


def test_sinusoidal_known_values():
    dim = 8
    table = sinusoidal_embedding(torch.arange(4), dim)  # (4, dim)
    assert table.shape == (4, dim)
    # position 0: sin 0 = 0 in even columns, cos 0 = 1 in odd columns
    torch.testing.assert_close(table[0], torch.tensor([0.0, 1.0] * 4))
    for pos in range(4):
        for i in range(dim // 2):
            angle = pos / 10000 ** (2 * i / dim)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sinusoidal_batched_positions_and_far_positions():
    positions = torch.tensor([[0, 1, 2], [5, 6, 7]])  # (B, T)
    out = sinusoidal_embedding(positions, 16)
    assert out.shape == (2, 3, 16)
    torch.testing.assert_close(out[1, 0], sinusoidal_embedding(torch.tensor([5]), 16)[0])
    far = sinusoidal_embedding(torch.tensor([100_000]), 16)[0]  # (16,)
    for i in range(8):  # float32 angles near 1e5 carry ~1e-2 of rounding, so this tolerance
        angle = 100_000 / 10000 ** (2 * i / 16)
        assert far[2 * i].item() == pytest.approx(math.sin(angle), abs=2e-2)
        assert far[2 * i + 1].item() == pytest.approx(math.cos(angle), abs=2e-2)
