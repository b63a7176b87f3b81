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
import re
import sys
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, TextIO

import torch

from ..nn.attention import MultiHeadAttention, Scale, resolve_scale
from ..errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from ..nn.model import GPT
    from ..data.tokenizer import Tokenizer

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


def build_traced_attention(d_out: int, heads: int, context_length: int, seed: int, scale: Scale) -> MultiHeadAttention:
    """The efficient ``MultiHeadAttention`` the trace follows, built right after ``manual_seed(seed)``.

    With ``d_out=2, heads=2, seed=123`` on the book's sentence this is the book's module
    (its first output row is [0.3190, 0.4858]). The global RNG is left as it was.
    """
    if heads < 1:
        raise ConfigError(f"heads must be at least 1, got {heads}")
    if d_out < 1:
        raise ConfigError(f"d_out must be at least 1, got {d_out}")
    if not -(2**63) <= seed < 2**64:  # what torch.manual_seed takes
        raise ConfigError(f"seed (--seed) must be a 64-bit integer, from -2**63 to 2**64 - 1, got {seed}")
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
    b, t, _ = x.shape
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
        t, dims = t.unsqueeze(0), ("", *dims)  # (n,) → (1, n): a row vector
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


@torch.no_grad()
def trace_run(run_dir: str | Path, sentence: str) -> tuple[list[list[str]], list[TraceStep]]:
    """Trace a trained model's first attention layer on the real tokens of ``sentence``.

    Embeddings, the first LayerNorm, the Q/K/V projections (split from the fused ``qkv``
    weight), heads, position handling (RoPE rotation or ALiBi bias), scores, mask, weights,
    context and the output projection, all from the run's own weights. The last step
    equals the first block's attention output inside the model's forward pass.
    """
    from ..store.checkpoint import load_run
    from ..nn.model import INIT_STD
    from ..nn.positions import alibi_bias, apply_rope, rope_cos_sin, sinusoidal_embedding

    model, tokenizer, _ = load_run(run_dir, need_tokenizer="the sentence")
    cfg = model.cfg
    ids = tokenizer.encode(sentence)
    if not ids:
        raise ConfigError("the sentence is empty: give some text to trace")
    ids = ids[-cfg.context_length :]
    labels = [[repr(tokenizer.decode([i]))[1:-1] or "·" for i in ids]]
    idx = torch.tensor([ids])  # (B=1, T)
    b, t = idx.shape
    h, d, c = cfg.n_heads, cfg.head_dim, cfg.emb_dim
    steps: list[TraceStep] = []

    def add(name: str, dims: tuple[str, ...], meaning: str, tensor: torch.Tensor) -> torch.Tensor:
        steps.append(TraceStep(name, tuple(tensor.shape), meaning, tensor.detach().clone(), dims))
        return tensor

    x = add("token embeddings", ("B", "T", "C"), "row idx of tok_emb for each token", model.tok_emb(idx))
    positions = torch.arange(t)
    if cfg.pos_emb == "learned":
        x = add("+ positions", ("B", "T", "C"), "plus row t of the learned pos_emb (absolute, GPT-2)",
                x + model.pos_emb(positions))
    elif cfg.pos_emb == "sinusoidal":
        x = add("+ positions", ("B", "T", "C"), f"plus fixed sines and cosines of the position (× {INIT_STD})",
                x + INIT_STD * sinusoidal_embedding(positions, c))
    block = model.blocks[0]
    x = add("norm1(x)", ("B", "T", "C"), "block 0's LayerNorm: each token's vector to mean 0, variance 1, then a learned "
              "scale and shift", block.norm1(x))
    w_q, w_k, w_v = block.attn.qkv.weight.split(c, dim=0)  # 3 × (C, C), nn.Linear's (out, in) layout
    b_q = b_k = b_v = None
    if block.attn.qkv.bias is not None:
        b_q, b_k, b_v = block.attn.qkv.bias.split(c)  # (3C,) → 3 × (C,)
    q = add("Q = x·W_q", ("B", "T", "C"), "queries (W_q is the first third of the fused qkv weight)", _linear(x, w_q.T, b_q))
    k = add("K = x·W_k", ("B", "T", "C"), "keys (second third)", _linear(x, w_k.T, b_k))
    v = add("V = x·W_v", ("B", "T", "C"), "values (last third)", _linear(x, w_v.T, b_v))

    def split(t_: torch.Tensor) -> torch.Tensor:
        return t_.view(b, t, h, d).transpose(1, 2)  # (B, T, C) → (B, T, H, d) → (B, H, T, d)

    q = add("Q heads", ("B", "H", "T", "d"), f"C split into {h} heads of d = {d}", split(q))
    k = add("K heads", ("B", "H", "T", "d"), "the same split for the keys", split(k))
    v = add("V heads", ("B", "H", "T", "d"), "the same split for the values", split(v))
    if cfg.pos_emb == "rope":
        cos, sin = rope_cos_sin(positions, d, cfg.rope_base)
        q = add("RoPE(Q)", ("B", "H", "T", "d"), "queries rotated by an angle proportional to the position", apply_rope(q, cos, sin))
        k = add("RoPE(K)", ("B", "H", "T", "d"), "keys rotated the same way: q·k now depends on the distance", apply_rope(k, cos, sin))
    scores = add("scores Q·Kᵀ", ("B", "H", "T", "T"), "how well query i matches key j", q @ k.transpose(-2, -1))
    factor = resolve_scale(cfg.scale_attn, d)
    scaled = add("scaled scores", ("B", "H", "T", "T"),
                 f"× {factor:.4f} (1/√{d})" if cfg.scale_attn else "× 1: this model was trained without scaling",
                 scores * factor)
    if cfg.pos_emb == "alibi":
        scaled = add("+ ALiBi bias", ("B", "H", "T", "T"), "minus slope_h × distance: far keys count less",
                     scaled + alibi_bias(model.alibi_slopes, t, t, scaled.device))
    hidden = torch.ones(t, t, dtype=torch.bool).triu(1)  # (T, T), True above the diagonal = future
    masked = add("causal mask", ("B", "H", "T", "T"), "future keys set to -inf", scaled.masked_fill(hidden, float("-inf")))
    weights = add("attention weights", ("B", "H", "T", "T"), "softmax of each row", torch.softmax(masked, dim=-1))
    context = add("context", ("B", "H", "T", "d"), "weights · V", weights @ v)
    merged = context.transpose(1, 2).reshape(b, t, c)  # (B, H, T, d) → (B, T, H, d) → (B, T, C)
    merged = add("merged heads", ("B", "T", "C"), "heads side by side again", merged)
    add("output", ("B", "T", "C"), "merged · W_o + b_o: block 0's attention output (added to the residual)",
        block.attn.out_proj(merged))
    return labels, steps


def explain_run(run_dir: str | Path, sentence: str, *, max_values: int = MAX_VALUES,
                out: Optional[TextIO] = sys.stdout) -> list[TraceStep]:
    """Print :func:`trace_run` for a trained run, checked against the model's own forward pass."""
    from ..store.checkpoint import load_model
    from ..nn.model import _Step
    from ..data.tokenizer import load_tokenizer

    labels, steps = trace_run(run_dir, sentence)
    if out is not None:
        model = load_model(run_dir)
        cfg = model.cfg
        ids = load_tokenizer(run_dir).encode(sentence)
        header = [
            f"The first attention layer of the trained model in {run_dir}, step by step.",
            f"  B = 1   T = tokens ({len(labels[0])})   C = embedding width ({cfg.emb_dim})   "
            f"H = heads ({cfg.n_heads})   d = head width ({cfg.head_dim})   positions: {cfg.pos_emb}",
            "  tokens: " + " | ".join(labels[0]),
            "  ids:    " + " ".join(str(i) for i in ids[-cfg.context_length:]),
            *([f"  (the sentence has {len(ids)} tokens; only its last {cfg.context_length}, the model's context, "
               "are traced)"] if len(ids) > cfg.context_length else []),
            f"  values shown for tensors of at most {max_values} elements" if max_values > 0 else "  shapes only",
            "",
        ]
        out.write(format_trace(steps, labels, header=header, max_values=max_values))
        with torch.no_grad():
            # Block 0's input: the embeddings, plus the position step when positions are absolute.
            x = steps[0].tensor if cfg.pos_emb not in ("learned", "sinusoidal") else steps[1].tensor
            step = _Step()
            if cfg.pos_emb == "rope":
                from ..nn.positions import rope_cos_sin

                step.rope = rope_cos_sin(torch.arange(x.shape[1]), cfg.head_dim, cfg.rope_base)
            elif cfg.pos_emb == "alibi":
                from ..nn.positions import alibi_bias

                step.alibi = alibi_bias(model.alibi_slopes, x.shape[1], x.shape[1], x.device)
            block = model.blocks[0]
            reference = block.attn(block.norm1(x.float()), step)
        diff = (reference - steps[-1].tensor).abs().max().item()
        verdict = "gives the same output" if diff <= 1e-4 else "gives a DIFFERENT output"  # float32 rounding: ~1e-7
        out.write(f"\ncheck: the model's own block-0 attention {verdict} (max |difference| {diff:.1e})\n")
    return steps


def explain(
    sentence: str = BOOK_SENTENCE,
    *,
    batch: int = 1,
    heads: int = 2,
    d_out: int = 4,
    seed: int = 123,
    scale: Scale = True,
    max_values: int = MAX_VALUES,
    out: Optional[TextIO] = sys.stdout,
) -> list[TraceStep]:
    """Print a step-by-step shape trace of causal multi-head self-attention over ``sentence``.

    Builds :class:`~llmscratch.nn.attention.MultiHeadAttention` (d_in 3, dropout 0) right after
    ``torch.manual_seed(seed)``, runs its forward pass by hand from the module's own weights
    and prints every tensor (``out=None`` prints nothing). ``batch`` > 1 adds rows with the
    words rotated; ``scale`` is True (1/√d), False (none) or a float factor. Returns the steps;
    the last one equals the module's output.

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


# --------------------------------------------------------------------------- attention maps
#
# What a trained (or imported) GPT attends to: the weights of every layer and head for one
# prompt, drawn as heatmaps, written as a self-contained HTML page or as bertviz's JSON
# layout, and summarised by numbers the experiments use (score spread, entropy, how
# different the heads are).


from ..errors import LLMScratchError  # noqa: E402  (kept with the part that uses it)


class InspectError(LLMScratchError):
    """A prompt, layer or head that cannot be inspected; the message says what to pass instead."""


@dataclass
class AttentionMaps:
    """One prompt's tokens and the attention weights of every layer.

    ``weights[layer]`` has shape ``(1, H, T, T)``: row ``i`` of head ``h`` is how query
    token ``i`` spreads its attention over key tokens ``0..i`` (each row sums to 1).
    """

    tokens: list[str]
    weights: list[torch.Tensor]

    @property
    def n_layers(self) -> int:
        return len(self.weights)

    @property
    def n_heads(self) -> int:
        return self.weights[0].shape[1]

    def head(self, layer: int, head: int) -> torch.Tensor:
        """The ``(T, T)`` weights of one head."""
        return self.weights[layer][0, head]


def token_strings(tokenizer: Tokenizer, ids: Sequence[int]) -> list[str]:
    """Each token's own text (a byte-level token that is part of a character decodes to '�')."""
    return [tokenizer.decode([i]) for i in ids]


@torch.no_grad()
def attention_maps(model: GPT, tokenizer: Optional[Tokenizer], prompt: str) -> AttentionMaps:
    """Run ``model`` on ``prompt`` and return its tokens and per-layer weights ``(1, H, T, T)``.

    Works for every position kind and for imported models: it only asks the model for
    its weights (``need_weights=True``, which runs the explicit attention path).

    Raises:
        InspectError: an empty prompt, or one longer than the model's context.
    """
    if tokenizer is None:
        raise InspectError("this run has no tokenizer, so a text prompt cannot be turned into tokens; "
                           "import it with its tokenizer files")
    ids = tokenizer.encode(prompt)
    if not ids:
        raise InspectError("the prompt is empty: pass some text with --prompt")
    limit = model.cfg.context_length
    if len(ids) > limit:
        raise InspectError(f"the prompt is {len(ids)} tokens long, more than the model's context of {limit}; "
                           "pass a shorter prompt")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    idx = torch.tensor([ids], dtype=torch.long, device=device)  # (1, T)
    try:
        _, weights = model(idx, need_weights=True)  # [(1, H, T, T)] per layer
    finally:
        model.train(was_training)
    return AttentionMaps(token_strings(tokenizer, ids), [w.float().cpu() for w in weights])


def _check_layer_head(maps: AttentionMaps, layer: int, head: int) -> None:
    if not 0 <= layer < maps.n_layers:
        raise InspectError(f"layer {layer} does not exist: the model has layers 0..{maps.n_layers - 1}")
    if not 0 <= head < maps.n_heads:
        raise InspectError(f"head {head} does not exist: the model has heads 0..{maps.n_heads - 1}")


# ----------------------------------------------------------------- numbers about attention


@torch.no_grad()
def attention_scores(model: GPT, idx: torch.Tensor) -> list[torch.Tensor]:
    """The raw scores each layer feeds to softmax, ``[(B, H, T, T)]``, with −inf where masked.

    Recomputed from each block's own ``qkv`` projection on the block's real input
    (captured with a forward pre-hook), with the model's scale (1/√d or 1), RoPE
    rotation and ALiBi bias applied exactly as the attention does; ``softmax`` of them
    gives the weights ``model(idx, need_weights=True)`` returns.
    """
    from ..nn.attention import build_mask
    from ..nn.positions import alibi_bias, apply_rope, rope_cos_sin

    cfg = model.cfg
    inputs: list[torch.Tensor] = []
    hooks = [block.attn.register_forward_pre_hook(lambda mod, args: inputs.append(args[0]))
             for block in model.blocks]
    was_training = model.training
    model.eval()
    try:
        model(idx)
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    b, t = idx.shape
    positions = torch.arange(t, device=idx.device)  # (T,)
    mask = build_mask(t, t, causal=True, key_padding_mask=None, device=idx.device)  # (T, T), True = visible
    factor = resolve_scale(cfg.scale_attn, cfg.head_dim)
    out = []
    for block, x in zip(model.blocks, inputs):
        qkv = block.attn.qkv(x)  # (B, T, 3C)
        qkv = qkv.view(b, t, 3, cfg.n_heads, cfg.head_dim)  # (B, T, 3, H, d)
        q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 × (B, H, T, d)
        if cfg.pos_emb == "rope":
            cos, sin = rope_cos_sin(positions, cfg.head_dim, cfg.rope_base)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        scores = (q.float() @ k.float().transpose(-2, -1)) * factor  # (B, H, T, T)
        if cfg.pos_emb == "alibi":
            scores = scores + alibi_bias(model.alibi_slopes, t, t, idx.device)  # (H, T, T) broadcasts
        if mask is not None:
            scores = scores.masked_fill(~mask, float("-inf"))
        out.append(scores)
    return out


def score_std(scores: torch.Tensor) -> float:
    """Standard deviation of the visible (finite) scores of one layer: how spread softmax's inputs are."""
    return scores[torch.isfinite(scores)].std().item()


def attention_entropy(weights: torch.Tensor) -> float:
    """Mean entropy (nats) of the attention rows of ``weights (B, H, T, T)``, over rows 1..T-1.

    0 means one-hot (each query looks at one key); ``log(i + 1)`` is uniform over the
    ``i + 1`` visible keys. Row 0 is skipped: it sees one key and always has entropy 0.
    """
    p = weights[..., 1:, :].float()  # (B, H, T-1, T)
    ent = -(p * torch.log(p.clamp_min(1e-12))).sum(-1)  # (B, H, T-1)
    return ent.mean().item()


def uniform_entropy(t: int) -> float:
    """The entropy :func:`attention_entropy` gives for uniform attention over the visible keys."""
    return sum(math.log(i + 1) for i in range(1, t)) / max(t - 1, 1)


def head_diversity(weights: torch.Tensor) -> Optional[float]:
    """Mean pairwise Jensen–Shannon divergence (bits, 0..1) between the heads of ``(B, H, T, T)``.

    For every query row (1..T-1) and every pair of heads, JS(p, q) = ½KL(p‖m) + ½KL(q‖m)
    with m = (p + q)/2; 0 means the two heads attend identically, 1 means to disjoint
    keys. ``None`` for a single head (there is no pair).
    """
    n_heads = weights.shape[1]
    if n_heads < 2:
        return None
    p = weights[..., 1:, :].float()  # (B, H, T-1, T)
    total, pairs = 0.0, 0
    for i in range(n_heads):
        for j in range(i + 1, n_heads):
            a, b = p[:, i], p[:, j]  # (B, T-1, T) each
            m = 0.5 * (a + b)
            kl_a = (a * (torch.log2(a.clamp_min(1e-12)) - torch.log2(m.clamp_min(1e-12)))).sum(-1)
            kl_b = (b * (torch.log2(b.clamp_min(1e-12)) - torch.log2(m.clamp_min(1e-12)))).sum(-1)
            total += (0.5 * (kl_a + kl_b)).mean().item()
            pairs += 1
    return total / pairs


# ----------------------------------------------------------------- pictures


def token_label(token: str) -> str:
    """A token as an axis label: spaces as '␣', newlines and tabs escaped, long ones cut."""
    text = token.replace(" ", "␣").replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r")
    text = text.replace("$", r"\$")  # matplotlib would read $…$ as mathtext
    return text if len(text) <= 12 else text[:11] + "…"


def _label_step(n_tokens: int, room: int) -> int:
    """Show every k-th label so at most ``room`` labels sit on an axis."""
    return max(1, math.ceil(n_tokens / room))


def _draw_head(ax, matrix: torch.Tensor, tokens: Sequence[str], room: int, x_labels: bool, y_labels: bool,
               fontsize: float) -> object:
    t = len(tokens)
    image = ax.imshow(matrix.numpy(), cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    step = _label_step(t, room)
    ticks = list(range(0, t, step))
    labels = [token_label(tokens[i]) for i in ticks]
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels(labels if x_labels else [], rotation=90, fontsize=fontsize)
    ax.set_yticklabels(labels if y_labels else [], fontsize=fontsize)
    ax.tick_params(length=2 if (x_labels or y_labels) else 0)
    return image


def plot_attention_grid(maps: AttentionMaps, path: str | Path, title: str = "") -> None:
    """A PNG grid of heatmaps, one row per layer and one column per head.

    Keys run along x, queries down y; token labels sit on the left column and bottom
    row (every k-th one past about 24 tokens, so they stay readable).
    """
    from .experiments.common import pyplot, save_figure

    plt = pyplot()
    n_l, n_h, t = maps.n_layers, maps.n_heads, len(maps.tokens)
    cell = 2.2 if t <= 24 else 2.8
    fig, axes = plt.subplots(n_l, n_h, figsize=(1.2 + cell * n_h, 1.0 + cell * n_l), squeeze=False)
    room = 24 if n_h <= 4 else 16
    for layer in range(n_l):
        for head in range(n_h):
            ax = axes[layer][head]
            _draw_head(ax, maps.head(layer, head), maps.tokens, room,
                       x_labels=layer == n_l - 1, y_labels=head == 0, fontsize=6)
            ax.set_title(f"layer {layer}, head {head}", fontsize=8)
    title = title.replace("$", r"\$")  # a prompt or path with $…$ is text, not mathtext
    fig.suptitle(title or f"attention weights: {n_l} layers × {n_h} heads, {t} tokens (rows: queries, columns: keys)",
                 fontsize=10)
    fig.tight_layout()
    save_figure(fig, _as_path(path))


def plot_attention_head(maps: AttentionMaps, layer: int, head: int, path: str | Path) -> None:
    """A PNG of one head's weights with every token labelled (every k-th past 48 tokens) and a colour bar."""
    from .experiments.common import pyplot, save_figure

    _check_layer_head(maps, layer, head)
    plt = pyplot()
    t = len(maps.tokens)
    side = min(14.0, 3.0 + 0.28 * min(t, 48))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = _draw_head(ax, maps.head(layer, head), maps.tokens, 48, x_labels=True, y_labels=True, fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(f"layer {layer}, head {head}")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    fig.tight_layout()
    save_figure(fig, _as_path(path))


def _as_path(path: str | Path) -> Path:
    from pathlib import Path

    return Path(path)


# ----------------------------------------------------------------- JSON and HTML


def _rounded(weights: torch.Tensor, digits: int) -> list:
    """A ``(1, H, T, T)`` tensor as nested lists of floats rounded to ``digits`` decimals."""
    return [[[[round(v, digits) for v in row] for row in head] for head in batch] for batch in weights.tolist()]


def attention_json(maps: AttentionMaps, digits: int = 5) -> dict:
    """bertviz's ``head_view`` layout: ``{"tokens": [...], "attention": [layer → (1, H, T, T) lists]}``.

    Load it back with ``head_view([torch.tensor(a) for a in d["attention"]], d["tokens"])``.
    """
    return {
        "tokens": list(maps.tokens),
        "attention": [_rounded(w, digits) for w in maps.weights],  # per layer: (1, H, T, T)
    }


_HTML_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>__TITLE__</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.2em; }
.controls { margin: 0.8em 0; }
.controls label { margin-right: 1.2em; }
.tokens { line-height: 2.2; font-family: ui-monospace, monospace; max-width: 60em; }
.tok { padding: 0.15em 0.25em; margin: 0 1px; border-radius: 3px; cursor: default; white-space: pre;
       border: 1px solid #ddd; }
.tok.query { outline: 2px solid #d33; }
table.map { border-collapse: collapse; margin-top: 1em; font-family: ui-monospace, monospace; font-size: 11px; }
table.map td { width: 16px; height: 16px; padding: 0; }
table.map th { font-weight: normal; white-space: pre; padding: 0 4px; }
table.map th.col { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; }
table.map tr.hl th { color: #d33; font-weight: bold; }
#info { color: #555; margin-top: 0.5em; min-height: 1.2em; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
<div class="controls">
<label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label>
</div>
<p>Hover a token: the others are shaded by how much attention it gives them (its row of the map below).</p>
<div class="tokens" id="tokens"></div>
<div id="info"></div>
<table class="map" id="map"></table>
<script id="attention-data" type="application/json">__DATA__</script>
<script>
(function () {
  var data = JSON.parse(document.getElementById("attention-data").textContent);
  var tokens = data.tokens, attention = data.attention;
  var layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
  var tokBox = document.getElementById("tokens"), info = document.getElementById("info");
  var table = document.getElementById("map");
  function shown(t) {
    return t.replace(/ /g, "\\u2423").replace(/\\n/g, "\\\\n").replace(/\\r/g, "\\\\r").replace(/\\t/g, "\\\\t");
  }
  function colour(w) { var l = Math.round(100 - 55 * w); return "hsl(215, 80%, " + l + "%)"; }
  function option(sel, n) {
    for (var i = 0; i < n; i++) { var o = document.createElement("option"); o.value = i; o.textContent = i; sel.appendChild(o); }
  }
  option(layerSel, attention.length);
  option(headSel, attention[0][0].length);
  function weights() { return attention[+layerSel.value][0][+headSel.value]; }
  var spans = tokens.map(function (t, i) {
    var s = document.createElement("span");
    s.className = "tok"; s.textContent = shown(t);
    s.addEventListener("mouseenter", function () { focus(i); });
    s.addEventListener("mouseleave", clear);
    tokBox.appendChild(s);
    return s;
  });
  function focus(q) {
    var row = weights()[q];
    spans.forEach(function (s, k) {
      s.classList.toggle("query", k === q);
      s.style.background = k <= q ? colour(row[k]) : "";
      s.style.color = k <= q && row[k] > 0.6 ? "#fff" : "";
    });
    var best = 0;
    for (var k = 1; k <= q; k++) { if (row[k] > row[best]) best = k; }
    info.textContent = "token " + q + " \\u201c" + shown(tokens[q]) + "\\u201d attends most to token " + best +
      " \\u201c" + shown(tokens[best]) + "\\u201d (" + row[best].toFixed(3) + ")";
    Array.prototype.forEach.call(table.rows, function (r, i) { r.classList.toggle("hl", i === q + 1); });
  }
  function clear() {
    spans.forEach(function (s) { s.classList.remove("query"); s.style.background = ""; s.style.color = ""; });
    info.textContent = "";
    Array.prototype.forEach.call(table.rows, function (r) { r.classList.remove("hl"); });
  }
  function drawTable() {
    var w = weights();
    table.innerHTML = "";
    var head = table.insertRow(); head.appendChild(document.createElement("th"));
    tokens.forEach(function (t) { var th = document.createElement("th"); th.className = "col"; th.textContent = shown(t); head.appendChild(th); });
    w.forEach(function (row, q) {
      var tr = table.insertRow();
      var th = document.createElement("th"); th.textContent = shown(tokens[q]); tr.appendChild(th);
      row.forEach(function (v, k) {
        var td = tr.insertCell();
        td.style.background = k <= q ? colour(v) : "#fafafa";
        td.title = shown(tokens[q]) + " \\u2192 " + shown(tokens[k]) + ": " + v.toFixed(4);
      });
      tr.addEventListener("mouseenter", function () { focus(q); });
      tr.addEventListener("mouseleave", clear);
    });
  }
  function redraw() { clear(); drawTable(); }  // a new head: nothing stays lit from the old one
  layerSel.addEventListener("change", redraw);
  headSel.addEventListener("change", redraw);
  drawTable();
})();
</script>
</body>
</html>
"""


def attention_html(maps: AttentionMaps, title: str = "Attention weights") -> str:
    """One self-contained HTML page (inline CSS and JavaScript, no network) to explore the maps.

    Pick a layer and a head; hovering a token (or a row of the map) shades every earlier
    token by the weight the hovered one gives it. The data sits in the page as bertviz's
    JSON layout; ``<``, ``>``, ``&`` and ``/`` are escaped so no token can end the script.
    """
    import html
    import json

    data = json.dumps(attention_json(maps, digits=4), ensure_ascii=True, separators=(",", ":"))
    data = data.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("/", "\\/")
    fill = {"__TITLE__": html.escape(title), "__DATA__": data}
    return re.sub("__TITLE__|__DATA__", lambda m: fill[m.group(0)], _HTML_PAGE)  # one pass: no text is filled twice


def write_attention_outputs(
    maps: AttentionMaps,
    out_dir: str | Path,
    *,
    layers: Optional[Sequence[int]] = None,
    heads: Optional[Sequence[int]] = None,
    html_page: bool = False,
    json_file: bool = False,
    title: str = "",
) -> list[Path]:
    """Write ``grid.png``, ``layer{L}_head{H}.png`` for the chosen layers × heads (when any
    is chosen; the other axis defaults to all), and ``attention.html`` / ``attention.json``
    when asked. Returns the paths written."""
    import json

    from ..files import write_text_atomic  # a failed write keeps the previous file whole

    out = _as_path(out_dir)
    chosen_layers = list(layers) if layers else []
    chosen_heads = list(heads) if heads else []
    if chosen_layers or chosen_heads:
        chosen_layers = chosen_layers or list(range(maps.n_layers))
        chosen_heads = chosen_heads or list(range(maps.n_heads))
        for layer in chosen_layers:
            for head in chosen_heads:
                _check_layer_head(maps, layer, head)
    if out.exists() and not out.is_dir():
        raise InspectError(f"--out {out} is a file; the attention maps go into a folder: give a folder's path")
    out.mkdir(parents=True, exist_ok=True)  # only once the request is known to be good
    written = []
    plot_attention_grid(maps, out / "grid.png", title=title)
    written.append(out / "grid.png")
    for layer in chosen_layers:
        for head in chosen_heads:
            path = out / f"layer{layer}_head{head}.png"
            plot_attention_head(maps, layer, head, path)
            written.append(path)
    if html_page:
        path = out / "attention.html"
        write_text_atomic(path, attention_html(maps, title or "Attention weights"))
        written.append(path)
    if json_file:
        path = out / "attention.json"
        write_text_atomic(path, json.dumps(attention_json(maps)))
        written.append(path)
    return written
