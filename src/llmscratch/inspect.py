"""Looking inside attention.

The shape trace (``llmscratch explain``) lives here: one forward pass of causal multi-head
self-attention, printed step by step with each tensor's name, shape, one line of meaning
and, for small sizes, its values. Later additions (attention-map plots) sit beside it.

Without a trained model each whitespace-separated word is one token, and each token maps
to a 3-dimensional vector with no download: the six words of the book's sentence
"Your journey starts with one step" get the book's own inputs (chapter 3), so a learner
sees the book's numbers; any other word gets a vector derived from a hash of the word.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import sys
from dataclasses import dataclass
from typing import Optional, Sequence, TextIO

import torch

from .attention import MultiHeadAttention, resolve_scale
from .errors import ConfigError

# --------------------------------------------------------------------------- shape trace

BOOK_SENTENCE = "Your journey starts with one step"

#: The book's 6×3 inputs, one row per word of ``BOOK_SENTENCE`` (keys are lowercase).
BOOK_VECTORS: dict[str, tuple[float, float, float]] = {
    "your": (0.43, 0.15, 0.89),
    "journey": (0.55, 0.87, 0.66),
    "starts": (0.57, 0.85, 0.64),
    "with": (0.22, 0.58, 0.33),
    "one": (0.77, 0.25, 0.10),
    "step": (0.05, 0.80, 0.55),
}

EMBED_DIM = 3  # the width of every word vector, d_in
MAX_VALUES = 144  # print a tensor's values when it has at most this many elements


@dataclass
class TraceStep:
    """One tensor of the trace.

    ``dims`` names the axes (``("B", "H", "T", "d")``); the printer uses it to label
    rows and columns with tokens or feature indices.
    """

    name: str
    shape: tuple[int, ...]
    meaning: str
    tensor: torch.Tensor
    dims: tuple[str, ...] = ()


def word_vector(word: str) -> torch.Tensor:
    """The 3-dim vector for one word: the book's for its six words, else one seeded by a hash.

    Matching ignores case. Hashed vectors are drawn from [0, 1) and rounded to 2 decimals,
    like the book's, from a generator seeded with the word's SHA-256, so they are the
    same on every machine and run.
    """
    key = word.lower()
    if key in BOOK_VECTORS:
        return torch.tensor(BOOK_VECTORS[key])
    seed = int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "little")
    g = torch.Generator().manual_seed(seed)
    return torch.round(torch.rand(EMBED_DIM, generator=g), decimals=2)


def trace_batch(sentence: str, batch: int) -> tuple[list[list[str]], torch.Tensor]:
    """Tokens and input vectors for ``batch`` sequences: the sentence, then its words rotated.

    Row ``b`` is the sentence's words rotated left by ``b`` ("journey starts … step Your"),
    a different sequence of the same length, so the batch axis shows in every shape.
    Returns ``(tokens per row, x (B, T, d_in))``.
    """
    words = sentence.split()
    if not words:
        raise ConfigError("the sentence is empty: give at least one word to trace")
    if batch < 1:
        raise ConfigError(f"batch must be at least 1, got {batch}")
    n = len(words)
    rows = [words[b % n:] + words[: b % n] for b in range(batch)]
    x = torch.stack([torch.stack([word_vector(w) for w in row]) for row in rows])  # (B, T, d_in)
    return rows, x


def build_traced_attention(d_out: int, heads: int, context_length: int, seed: int, scale) -> MultiHeadAttention:
    """The efficient ``MultiHeadAttention`` the trace follows, built right after ``manual_seed(seed)``.

    With ``d_out=2, heads=2, seed=123`` on the book's sentence this is the book's module
    (its first output row is [0.3190, 0.4858]). The global RNG is left as it was.
    """
    if heads < 1:
        raise ConfigError(f"heads must be at least 1, got {heads}")
    if d_out < 1:
        raise ConfigError(f"d_out must be at least 1, got {d_out}")
    if d_out % heads != 0:
        suggestion = heads * max(1, round(d_out / heads))
        raise ConfigError(
            f"d_out ({d_out}) must be divisible by heads ({heads}): each head gets d_out / heads "
            f"dimensions; try d_out {suggestion} (--d-out {suggestion} --heads {heads})"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = MultiHeadAttention(EMBED_DIM, d_out, context_length, dropout=0.0, num_heads=heads, scale=scale)
    return module.eval()


@torch.no_grad()
def trace_attention(module: MultiHeadAttention, x: torch.Tensor) -> list[TraceStep]:
    """Run ``module``'s forward pass by hand on ``x (B, T, d_in)``, keeping every tensor.

    Uses the module's own weights, mask rule and scale, so the last step equals ``module(x)``.
    """
    b, t, d_in = x.shape
    h, d = module.num_heads, module.head_dim
    factor = resolve_scale(module.scale, d)
    steps: list[TraceStep] = []

    def add(name: str, dims: tuple[str, ...], meaning: str, tensor: torch.Tensor) -> torch.Tensor:
        steps.append(TraceStep(name, tuple(tensor.shape), meaning, tensor.detach().clone(), dims))
        return tensor

    add("inputs x", ("B", "T", "d_in"), "one vector per token (the token embeddings)", x)
    # nn.Linear stores its weight as (out, in); transposed it is the book's W in x · W.
    w_q = add("W_q", ("d_in", "d_out"), "query projection (learned): what each token looks for",
              module.W_query.weight.T)
    w_k = add("W_k", ("d_in", "d_out"), "key projection (learned): what each token offers to be found by",
              module.W_key.weight.T)
    w_v = add("W_v", ("d_in", "d_out"), "value projection (learned): what each token passes on",
              module.W_value.weight.T)
    q = add("Q = x·W_q", ("B", "T", "d_out"), "queries, one per token", _linear(x, w_q, module.W_query.bias))
    k = add("K = x·W_k", ("B", "T", "d_out"), "keys, one per token", _linear(x, w_k, module.W_key.bias))
    v = add("V = x·W_v", ("B", "T", "d_out"), "values, one per token", _linear(x, w_v, module.W_value.bias))

    def split(t_: torch.Tensor) -> torch.Tensor:
        return t_.view(b, t, h, d).transpose(1, 2)  # (B, T, d_out) → (B, T, H, d) → (B, H, T, d)

    split_note = f"d_out split into {h} head{'s' if h > 1 else ''} of d = {d}, heads moved before T"
    q = add("Q heads", ("B", "H", "T", "d"), split_note, split(q))
    k = add("K heads", ("B", "H", "T", "d"), "the same split for the keys", split(k))
    v = add("V heads", ("B", "H", "T", "d"), "the same split for the values", split(v))

    scores = add("scores Q·Kᵀ", ("B", "H", "T", "T"),
                 "row i, column j: how well query i matches key j (dot product)", q @ k.transpose(-2, -1))
    if module.scale is True:
        scale_note = f"× 1/√d = 1/√{d} = {factor:.4f}, so softmax does not saturate as d grows"
    elif module.scale is False:
        scale_note = "× 1: left unscaled (--no-scale), so softmax is sharper"
    else:
        scale_note = f"× {factor:.4f} (the given scale)"
    scaled = add("scaled scores", ("B", "H", "T", "T"), scale_note, scores * factor)
    hidden = module.mask.bool()[:t, :t]  # (T, T), True above the diagonal = future token
    masked = add("causal mask", ("B", "H", "T", "T"),
                 "future keys (column j > row i) set to -inf: a token sees only itself and the past",
                 scaled.masked_fill(hidden, float("-inf")))
    weights = add("attention weights", ("B", "H", "T", "T"),
                  "softmax of each row: rows sum to 1, zero above the diagonal", torch.softmax(masked, dim=-1))
    context = add("context", ("B", "H", "T", "d"),
                  "weights · V: each token's weighted average of the values it sees", weights @ v)
    merged = context.transpose(1, 2).reshape(b, t, h * d)  # (B, H, T, d) → (B, T, H, d) → (B, T, d_out)
    merged = add("merged heads", ("B", "T", "d_out"), "heads side by side again: transpose back, reshape", merged)
    w_o = add("W_o", ("d_out", "d_out"), "output projection (learned): mixes what the heads found",
              module.out_proj.weight.T)
    b_o = add("b_o", ("d_out",), "output projection bias (learned)", module.out_proj.bias)
    add("output", ("B", "T", "d_out"), "merged · W_o + b_o: one context vector per token", merged @ w_o + b_o)
    return steps


def _linear(x: torch.Tensor, w: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return x @ w if bias is None else x @ w + bias


def format_trace(
    steps: Sequence[TraceStep],
    tokens: Sequence[Sequence[str]],
    *,
    header: Sequence[str] = (),
    max_values: int = MAX_VALUES,
) -> str:
    """The printed trace: a header, then one aligned row per step, each followed by its values
    (rounded to 4 decimals, rows and columns labelled) when it has at most ``max_values`` elements."""
    lines = list(header)
    shapes = [_shape_text(s) for s in steps]
    name_w = max(len("step"), *(len(s.name) for s in steps))
    shape_w = max(len("shape"), *(len(x) for x in shapes))
    num_w = len(str(len(steps)))
    lines.append(f"{'#':>{num_w}}  {'step':<{name_w}}  {'shape':<{shape_w}}  meaning")
    for i, (step, shape) in enumerate(zip(steps, shapes), start=1):
        lines.append(f"{i:>{num_w}}  {step.name:<{name_w}}  {shape:<{shape_w}}  {step.meaning}")
        if step.tensor.numel() <= max_values:
            lines.extend(" " * (num_w + 4) + row for row in _format_values(step, tokens))
    return "\n".join(lines) + "\n"


def _shape_text(step: TraceStep) -> str:
    """``(B=1, T=6, d_in=3)``: each axis named with its size."""
    return "(" + ", ".join(f"{n}={s}" for n, s in zip(step.dims, step.shape)) + ")"


def _format_values(step: TraceStep, tokens: Sequence[Sequence[str]]) -> list[str]:
    """The tensor as labelled 2-D tables, one per leading index (batch, head)."""
    t = step.tensor.double()
    dims = step.dims
    if t.dim() == 1:
        t, dims = t.unsqueeze(0), ("", *dims)  # a row vector
    lead = t.shape[:-2]
    out: list[str] = []
    for index in itertools.product(*(range(n) for n in lead)):  # () once when there is no lead axis
        batch = index[dims.index("B")] if "B" in dims[:-2] else 0
        if index:
            out.append("[" + ", ".join(f"{'batch' if n == 'B' else 'head'} {i}"
                                       for n, i in zip(dims, index)) + "]")
        row_labels = _axis_labels(dims[-2], t.shape[-2], tokens, batch)
        col_labels = _axis_labels(dims[-1], t.shape[-1], tokens, batch)
        out.extend(_table(t[index], row_labels, col_labels))
    return out


def _axis_labels(dim: str, size: int, tokens: Sequence[Sequence[str]], batch: int) -> list[str]:
    if dim == "T":
        return list(tokens[batch])
    if dim == "":
        return [""]
    return [f"{dim}[{i}]" for i in range(size)]


def _table(matrix: torch.Tensor, rows: list[str], cols: list[str]) -> list[str]:
    cells = [[_number(v) for v in row] for row in matrix.tolist()]
    width = max(7, *(len(c) for c in cols), *(len(c) for row in cells for c in row))
    row_w = max(len(r) for r in rows)
    lines = [" " * row_w + "  " + " ".join(f"{c:>{width}}" for c in cols)] if any(cols) else []
    for label, row in zip(rows, cells):
        lines.append(f"{label:<{row_w}}  " + " ".join(f"{c:>{width}}" for c in row))
    return lines


def _number(v: float) -> str:
    if math.isinf(v):
        return "-inf" if v < 0 else "inf"
    text = f"{v:.4f}"
    return "0.0000" if text == "-0.0000" else text


def explain(
    sentence: str = BOOK_SENTENCE,
    *,
    batch: int = 1,
    heads: int = 2,
    d_out: int = 4,
    seed: int = 123,
    scale: bool = True,
    max_values: int = MAX_VALUES,
    out: Optional[TextIO] = sys.stdout,
) -> list[TraceStep]:
    """Print a step-by-step shape trace of causal multi-head self-attention over ``sentence``.

    Builds :class:`~llmscratch.attention.MultiHeadAttention` (d_in 3, dropout 0) right after
    ``torch.manual_seed(seed)``, runs its forward pass by hand from the module's own weights
    and prints every tensor (``out=None`` prints nothing). ``batch`` > 1 adds rows with the
    words rotated. Returns the steps; the last one equals the module's output.

    Raises:
        ConfigError: an empty sentence, or a bad ``batch``/``heads``/``d_out`` (``d_out`` must be
            divisible by ``heads``).
    """
    tokens, x = trace_batch(sentence, batch)
    module = build_traced_attention(d_out, heads, x.shape[1], seed, scale)
    steps = trace_attention(module, x)
    if out is not None:
        out.write(format_trace(steps, tokens, header=_header(tokens, module, seed, max_values), max_values=max_values))
        with torch.no_grad():
            diff = (module(x) - steps[-1].tensor).abs().max().item()
        out.write(f"\ncheck: MultiHeadAttention.forward(x) gives the same output (max |difference| {diff:.1e})\n")
    return steps


def _header(tokens: Sequence[Sequence[str]], module: MultiHeadAttention, seed: int, max_values: int) -> list[str]:
    b, t = len(tokens), len(tokens[0])
    h, d = module.num_heads, module.head_dim
    words = {w.lower() for row in tokens for w in row}
    if words <= BOOK_VECTORS.keys():
        source = "the book's inputs (chapter 3)"
    elif words & BOOK_VECTORS.keys():
        source = "the book's inputs for its six words, hashed vectors for the others"
    else:
        source = "hashed vectors (a word's SHA-256 seeds its vector)"
    lines = [
        "Causal multi-head self-attention, one forward pass, step by step.",
        f"  B = batch size ({b})   H = heads ({h})   T = tokens per sequence ({t})",
        f"  d_in = input width ({EMBED_DIM})   d_out = output width ({module.d_out})   "
        f"d = head width = d_out / H ({d})",
        f"  module: MultiHeadAttention(d_in={EMBED_DIM}, d_out={module.d_out}, num_heads={h}, dropout=0), "
        f"built after torch.manual_seed({seed})",
        f"  token vectors: {source}",
    ]
    for i, row in enumerate(tokens):
        lines.append(f"  batch {i}: " + " ".join(row))
    if max_values > 0:
        lines.append(f"  values shown for tensors of at most {max_values} elements, rounded to 4 decimals")
    else:
        lines.append("  values not shown (shapes only)")
    lines.append("")
    return lines
