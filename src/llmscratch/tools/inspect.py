"""Looking inside attention.

The shape trace (``llmscratch explain``) lives here: one forward pass of causal multi-head
self-attention, printed step by step with each tensor's name, shape, one line of meaning
and, for small sizes, its values. Later additions (attention-map plots) sit beside it.

The attention maps (scores, mask, weights: one T×T matrix per batch entry and head) are what
the trace is for, so they are printed whenever T is small enough to read, however many
elements the whole tensor has; ``max_values`` caps only the other tensors. The printout
fits the terminal's width: the meaning column wraps within itself and wide tables are cut
into blocks of columns, so nothing wraps where the terminal would break the alignment.

Without a trained model each whitespace-separated word is one token, and each token maps
to a 3-dimensional vector with no download: the six words of the book's sentence
"Your journey starts with one step" get the book's own inputs (chapter 3), so a learner
sees the book's numbers; any other word gets a vector derived from a hash of the word.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import math
import re
import shutil
import sys
import textwrap
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence, TextIO

import torch

from ..nn.attention import MultiHeadAttention, Scale, resolve_scale
from ..errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path

    from matplotlib.figure import Figure

    from ..nn.model import GPT
    from ..data.tokenizer import Tokenizer
    from ..inference.engine import Engine

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
MAX_VALUES = 144  # print a tensor's values when it has at most this many elements (the T×T maps aside)
MAP_TOKENS = 16  # print every head's T×T scores, mask and weights when T is at most this, whatever their size
DEFAULT_WIDTH = 100  # columns of the printout when it does not go to a terminal (a pipe, a file)
MIN_MEANING_WIDTH = 24  # the meaning column never gets narrower than this, however narrow the terminal


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


def build_traced_attention(d_out: int, heads: int, context_length: int, seed: int, scale: Scale,
                           kv_heads: Optional[int] = None) -> MultiHeadAttention:
    """The efficient ``MultiHeadAttention`` the trace follows, built right after ``manual_seed(seed)``.

    With ``d_out=2, heads=2, seed=123`` on the book's sentence this is the book's module
    (its first output row is [0.3190, 0.4858]). ``kv_heads`` (default ``heads``) below ``heads``
    makes it grouped-query attention: ``W_k`` and ``W_v`` are ``kv_heads · d`` wide. The global
    RNG is left as it was.
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
    kv_heads = heads if kv_heads is None else kv_heads
    if kv_heads < 1 or heads % kv_heads != 0:
        divisors = [str(n) for n in range(1, heads + 1) if heads % n == 0]
        choices = " or ".join(divisors) if len(divisors) < 3 else ", ".join(divisors[:-1]) + " or " + divisors[-1]
        raise ConfigError(
            f"--kv-heads ({kv_heads}) must divide --heads ({heads}): each key/value head is shared by an equal "
            f"group of heads / kv-heads query heads; try --kv-heads {choices}"
        )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = MultiHeadAttention(EMBED_DIM, d_out, context_length, dropout=0.0, num_heads=heads, scale=scale,
                                    num_kv_heads=kv_heads)
    return module.eval()


def _add(steps: list[TraceStep], name: str, dims: tuple[str, ...], meaning: str, tensor: torch.Tensor) -> torch.Tensor:
    """Append ``tensor`` (a copy) to ``steps`` as a step; return it, so a computation can go on from it."""
    steps.append(TraceStep(name, tuple(tensor.shape), meaning, tensor.detach().clone(), dims))
    return tensor


def per_query_head(kv: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Keys or values ``(B, H_kv, T, d)`` repeated for the query heads that share them: ``(B, H, T, d)``.

    Query head ``h`` reads key/value head ``h // (H / H_kv)``, as :func:`~llmscratch.nn.attention.attend`
    pairs them; attention shares the heads without copying, this copy is for showing and
    for scores computed outside the model. With as many key/value heads as query heads, ``kv`` itself.
    """
    groups = n_heads // kv.shape[1]
    return kv if groups == 1 else kv.repeat_interleave(groups, dim=1)  # (B, H, T, d)


def _kv_head_notes(width: str, heads: int, kv_heads: int, head_dim: int) -> tuple[str, str]:
    """The meanings of the "K heads" and "V heads" steps of grouped-query attention: the split of
    the ``width``-wide keys and values, and which query heads share each head."""
    if kv_heads == 1:
        return (f"{width} is one key head of d = {head_dim}, shared by all H = {heads} query heads (multi-query "
                "attention: grouped-query with one group)",
                f"the same for the values: one value head, shared by all {heads} query heads")
    shared = f"each shared by a group of H / H_kv = {heads // kv_heads} query heads"
    return (f"{width} split into {kv_heads} key heads of d = {head_dim}, {shared} (grouped-query attention)",
            f"the same split for the values: {kv_heads} value heads, {shared}")


def kv_cache_line(layers: int, heads: int, kv_heads: int, head_dim: int) -> str:
    """One line comparing the KV cache per token with grouped-query and with multi-head attention."""
    grouped, full = 2 * layers * kv_heads * head_dim, 2 * layers * heads * head_dim
    return (f"KV cache per token: 2 · layers · H_kv · d = 2 · {layers} · {kv_heads} · {head_dim} = {grouped:,} values "
            f"(a key and a value per layer and key/value head), against 2 · layers · H · d = 2 · {layers} · {heads} · "
            f"{head_dim} = {full:,} for multi-head attention: {heads // kv_heads}× smaller")


@torch.no_grad()
def trace_attention(module: MultiHeadAttention, x: torch.Tensor) -> list[TraceStep]:
    """Run ``module``'s forward pass by hand on ``x (B, T, d_in)``, keeping every tensor.

    Uses the module's own weights, mask rule and scale, so the last step equals ``module(x)``.
    With fewer key/value heads than heads (grouped-query attention) K and V get their own,
    narrower width ``d_kv = H_kv · d``, and two steps show each K and V head repeated for the
    query heads of its group.
    """
    b, t, _ = x.shape
    h, h_kv, d = module.num_heads, module.num_kv_heads, module.head_dim
    groups = h // h_kv
    kv_width = "d_kv" if groups > 1 else "d_out"
    factor = resolve_scale(module.scale, d)
    steps: list[TraceStep] = []
    add = functools.partial(_add, steps)

    add("inputs x", ("B", "T", "d_in"), "one vector per token (the token embeddings)", x)
    # nn.Linear stores its weight as (out, in); transposed it is the book's W in x · W.
    w_q = add("W_q", ("d_in", "d_out"), "query projection (learned): what each token looks for",
              module.W_query.weight.T)
    narrower = f", {h_kv} head{'s' if h_kv > 1 else ''} wide, not {h}" if groups > 1 else ""  # {h} > 1 here
    w_k = add("W_k", ("d_in", kv_width), f"key projection (learned): what each token offers to be found by{narrower}",
              module.W_key.weight.T)
    w_v = add("W_v", ("d_in", kv_width), f"value projection (learned): what each token passes on{narrower}",
              module.W_value.weight.T)
    q = add("Q = x·W_q", ("B", "T", "d_out"), "queries, one per token", _linear(x, w_q, module.W_query.bias))
    k = add("K = x·W_k", ("B", "T", kv_width), "keys, one per token", _linear(x, w_k, module.W_key.bias))
    v = add("V = x·W_v", ("B", "T", kv_width), "values, one per token", _linear(x, w_v, module.W_value.bias))

    def split(t_: torch.Tensor, n: int) -> torch.Tensor:
        return t_.view(b, t, n, d).transpose(1, 2)  # (B, T, n·d) → (B, T, n, d) → (B, n, T, d)

    split_note = f"d_out split into {h} head{'s' if h > 1 else ''} of d = {d}, heads moved before T"
    q = add("Q heads", ("B", "H", "T", "d"), split_note, split(q, h))
    if groups == 1:
        k = add("K heads", ("B", "H", "T", "d"), "the same split for the keys", split(k, h))
        v = add("V heads", ("B", "H", "T", "d"), "the same split for the values", split(v, h))
    else:
        k_note, v_note = _kv_head_notes("d_kv", h, h_kv, d)
        k = add("K heads", ("B", "H_kv", "T", "d"), k_note, split(k, h_kv))
        v = add("V heads", ("B", "H_kv", "T", "d"), v_note, split(v, h_kv))
        k = add("K per query head", ("B", "H", "T", "d"), f"each K head repeated for the {groups} query heads of its "
                f"group: query head h reads K head h // {groups} (attention shares it without copying)",
                per_query_head(k, h))
        v = add("V per query head", ("B", "H", "T", "d"), f"the same for V: query head h reads V head h // {groups}",
                per_query_head(v, h))

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


def output_width() -> int:
    """The printout's width in columns: ``$COLUMNS``, else the terminal's width, else ``DEFAULT_WIDTH``.

    A pipe or a file is no terminal, so it gets ``DEFAULT_WIDTH``; ``COLUMNS=80`` forces 80.
    """
    return shutil.get_terminal_size((DEFAULT_WIDTH, 24)).columns


def shows_values(step: TraceStep, max_values: int) -> bool:
    """Whether the trace prints ``step``'s values, not only its shape.

    The T×T maps (scores, mask, weights) whenever T ≤ ``MAP_TOKENS``; any tensor of at most
    ``max_values`` elements; nothing at all when ``max_values`` is 0 (shapes only).
    """
    if max_values <= 0:
        return False
    is_map = step.dims[-2:] == ("T", "T")
    return step.tensor.numel() <= max_values or (is_map and step.shape[-1] <= MAP_TOKENS)


def values_note(max_values: int, tokens: int) -> str:
    """The header line that says which values the trace prints."""
    if max_values <= 0:
        return "values not shown (shapes only)"
    if tokens <= MAP_TOKENS:
        return (f"values rounded to 4 decimals: every head's T×T scores, mask and weights, and the other "
                f"tensors of at most {max_values} elements")
    return (f"values rounded to 4 decimals for tensors of at most {max_values} elements (each head's T×T "
            f"maps are printed whole up to {MAP_TOKENS} tokens; this sentence has {tokens})")


def wrap_lines(lines: Sequence[str], width: int) -> list[str]:
    """``lines`` with each one longer than ``width`` wrapped, continuations indented 2 more.

    A line of fields set apart by three spaces (``B = 1   T = tokens (8)   …``) breaks between
    fields where they fit; other text breaks at spaces. A word longer than the line (a long
    path) is kept whole rather than cut.
    """
    out: list[str] = []
    for line in lines:
        if len(line) <= width:
            out.append(line)
            continue
        lead = " " * (len(line) - len(line.lstrip(" ")))
        indent = lead + "  "
        fields = line.strip().split("   ")
        if len(fields) > 1 and all(len(indent) + len(f) <= width for f in fields):
            current = lead + fields[0]
            for field in fields[1:]:
                if len(current) + 3 + len(field) <= width:
                    current += "   " + field
                else:
                    out.append(current)
                    current = indent + field
            out.append(current)
            continue
        out.extend(textwrap.wrap(line, width, subsequent_indent=indent, break_long_words=False,
                                 break_on_hyphens=False))
    return out


def format_trace(
    steps: Sequence[TraceStep],
    tokens: Sequence[Sequence[str]],
    *,
    header: Sequence[str] = (),
    max_values: int = MAX_VALUES,
    width: int = DEFAULT_WIDTH,
) -> str:
    """The printed trace: a header, then one aligned row per step (number, name, shape, meaning),
    each followed by its values when :func:`shows_values` says so (rounded to 4 decimals, rows
    and columns labelled, one table per batch entry and head).

    Every line fits in ``width`` columns: the meaning wraps within its own column and a table
    too wide for the line is printed as blocks of columns. (Only a terminal narrower than the
    name and shape columns plus ``MIN_MEANING_WIDTH``, or a single token label longer than the
    line, can push a line past ``width``.)
    """
    lines = wrap_lines(header, width)
    shapes = [_shape_text(s) for s in steps]
    name_w = max(len("step"), *(len(s.name) for s in steps))
    shape_w = max(len("shape"), *(len(x) for x in shapes))
    num_w = len(str(len(steps)))
    meaning_at = num_w + 2 + name_w + 2 + shape_w + 2  # the column where every meaning starts
    meaning_w = max(MIN_MEANING_WIDTH, width - meaning_at)
    values_at = num_w + 4  # tables are indented under the step's name
    lines.append(f"{'#':>{num_w}}  {'step':<{name_w}}  {'shape':<{shape_w}}  meaning")
    for i, (step, shape) in enumerate(zip(steps, shapes), start=1):
        meaning = textwrap.wrap(step.meaning, meaning_w, break_long_words=False, break_on_hyphens=False) or [""]
        lines.append(f"{i:>{num_w}}  {step.name:<{name_w}}  {shape:<{shape_w}}  {meaning[0]}")
        lines.extend(" " * meaning_at + more for more in meaning[1:])
        if shows_values(step, max_values):
            lines.extend(" " * values_at + row for row in _format_values(step, tokens, width - values_at))
    return "\n".join(lines) + "\n"


def _shape_text(step: TraceStep) -> str:
    """``(B=1, T=6, d_in=3)``: each axis named with its size."""
    return "(" + ", ".join(f"{n}={s}" for n, s in zip(step.dims, step.shape)) + ")"


_AXIS_WORDS = {"B": "batch", "H": "head", "H_kv": "kv head"}  # how a table's heading names its leading indices


def _format_values(step: TraceStep, tokens: Sequence[Sequence[str]], width: int) -> list[str]:
    """The tensor as labelled 2-D tables, one per leading index (batch, head), each at most ``width`` wide."""
    t = step.tensor.double()
    dims = step.dims
    if t.dim() == 1:
        t, dims = t.unsqueeze(0), ("", *dims)  # (n,) → (1, n): a row vector
    lead = t.shape[:-2]
    out: list[str] = []
    for index in itertools.product(*(range(n) for n in lead)):  # () once when there is no lead axis
        batch = index[dims.index("B")] if "B" in dims[:-2] else 0
        if index:
            out.append("[" + ", ".join(f"{_AXIS_WORDS.get(n, 'head')} {i}" for n, i in zip(dims, index)) + "]")
        row_labels = _axis_labels(dims[-2], t.shape[-2], tokens, batch)
        col_labels = _axis_labels(dims[-1], t.shape[-1], tokens, batch)
        out.extend(_table(t[index], row_labels, col_labels, width))
    return out


def _axis_labels(dim: str, size: int, tokens: Sequence[Sequence[str]], batch: int) -> list[str]:
    if dim == "T":
        return [token.replace(" ", "\u2423") for token in tokens[batch]]  # a space token shows as '␣', not blank
    if dim == "":
        return [""]
    return [f"{dim}[{i}]" for i in range(size)]


def _table(matrix: torch.Tensor, rows: list[str], cols: list[str], width: int) -> list[str]:
    """``matrix`` as right-aligned columns under ``cols``, one line per row labelled with ``rows``.

    When all the columns do not fit in ``width``, they come in blocks that do, each block
    with its own column labels (the way numpy prints a wide array).
    """
    cells = [[_number(v) for v in row] for row in matrix.tolist()]
    cell_w = max(7, *(len(c) for c in cols), *(len(c) for row in cells for c in row))
    row_w = max(len(r) for r in rows)
    per_block = max(1, (width - row_w - 1) // (cell_w + 1))  # a line is row_w + 1 + n · (cell_w + 1) wide
    lines = []
    for start in range(0, len(cols), per_block):
        block = slice(start, start + per_block)
        if any(cols):
            lines.append(" " * row_w + "  " + " ".join(f"{c:>{cell_w}}" for c in cols[block]))
        for label, row in zip(rows, cells):
            lines.append(f"{label:<{row_w}}  " + " ".join(f"{c:>{cell_w}}" for c in row[block]))
    return lines


def _number(v: float) -> str:
    if math.isinf(v):
        return "-inf" if v < 0 else "inf"
    text = f"{v:.4f}"
    return "0.0000" if text == "-0.0000" else text


@dataclass
class RunTrace:
    """A trained model's first attention layer on one sentence, as :func:`trace_engine` traced it.

    ``labels``: one row of token labels (B = 1); ``ids``: the token ids traced (the sentence's
    last ``context_length``) out of ``total`` in the whole sentence; ``difference``: the largest
    gap between what the printed steps give when carried on by hand (softmax of the masked
    scores, times V, merged, through W_o) and the weights and output the model computed.
    """

    labels: list[list[str]]
    ids: list[int]
    total: int
    steps: list[TraceStep]
    difference: float


def load_for_trace(run_dir: str | Path) -> Engine:
    """The run's model and tokenizer through the inference :class:`~llmscratch.inference.engine.Engine`,
    on the CPU in float32 (no decoding, so no weight layout is timed); a run without a
    tokenizer is refused with the Engine's message, naming "the sentence to trace"."""
    from ..inference.engine import Engine

    return Engine.load(run_dir, "cpu", use_cache=False, purpose="the sentence to trace")


def trace_run(run_dir: str | Path, sentence: str) -> tuple[list[list[str]], list[TraceStep]]:
    """Trace a trained model's first attention layer on the real tokens of ``sentence``: ``(labels, steps)``.

    See :func:`trace_engine`; the last step equals the first block's attention output
    inside the model's forward pass (it is that output).
    """
    traced = trace_engine(load_for_trace(run_dir), sentence)
    return traced.labels, traced.steps


@torch.no_grad()
def trace_engine(engine: Engine, sentence: str) -> RunTrace:
    """Trace the first attention layer of ``engine``'s model on ``sentence`` (its last context's worth of tokens).

    One forward pass with ``need_weights=True`` and the model's trace hook gives the per-head
    q, k, v (after QK-norm and RoPE, where the model has them), the weights, the context and
    the output: the attention arithmetic is the model's own, written once. Around them the
    trace shows what leads there (embeddings, positions, the first norm, the Q/K/V
    projections and their split into heads, QK-norm and RoPE by the layer's own modules), the
    scores softmax turns into the weights, and with grouped-query attention each K and V
    head repeated for the query heads that share it.

    Raises:
        ConfigError: an empty sentence.
        TokenizerError: text the tokenizer cannot encode (the Engine's message, naming "the sentence").
    """
    if not sentence:
        raise ConfigError("the sentence is empty: give some text to trace")
    model, cfg = engine.model, engine.model.cfg
    ids = engine.encode([sentence], names=["the sentence"])[0]
    kept = ids[-cfg.context_length:]
    labels = [[repr(engine.tokenizer.decode([i]))[1:-1] or "·" for i in kept]]
    seen = _capture_first_layer(model, torch.tensor([kept], device=engine.device))  # idx (B=1, T)
    steps: list[TraceStep] = []
    _input_steps(steps, model, seen)
    q, k, v = _head_steps(steps, model, seen)
    masked = _score_steps(steps, model, q, k)
    difference = _output_steps(steps, model, seen, masked, v)
    return RunTrace(labels, kept, len(ids), steps, difference)


def _capture_first_layer(model: GPT, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    """One forward pass of ``model`` on ``idx (B, T)``, keeping what its first layer sees and computes.

    The trace hook gives block 0's ``q``, ``k``, ``v``, ``weights``, ``context`` and
    ``output``; forward hooks catch the token embeddings, block 0's input (after the
    positions) and its attention's input (after the first norm), so nothing is recomputed.
    """
    seen: dict[str, torch.Tensor] = {}
    block = model.blocks[0]

    def keep(name: str, tensor: torch.Tensor) -> None:
        seen[name] = tensor.detach().float().cpu().clone()

    handles = [
        model.tok_emb.register_forward_hook(lambda module, args, out: keep("embeddings", out)),
        block.register_forward_pre_hook(lambda module, args: keep("block input", args[0])),
        block.attn.register_forward_pre_hook(lambda module, args: keep("attention input", args[0])),
    ]
    was_training = model.training
    model.eval()
    try:
        model(idx, need_weights=True, trace=lambda layer, name, t: keep(name, t) if layer == 0 else None)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return seen


def _input_steps(steps: list[TraceStep], model: GPT, seen: dict[str, torch.Tensor]) -> None:
    """Token embeddings, the positions added to them (absolute kinds only), block 0's first norm."""
    from ..nn.model import INIT_STD

    cfg = model.cfg
    _add(steps, "token embeddings", ("B", "T", "C"), "row idx of tok_emb for each token", seen["embeddings"])
    if cfg.pos_emb == "learned":
        _add(steps, "+ positions", ("B", "T", "C"), "plus row t of the learned pos_emb (absolute, GPT-2)",
             seen["block input"])
    elif cfg.pos_emb == "sinusoidal":
        _add(steps, "+ positions", ("B", "T", "C"), "plus fixed sines and cosines of the position "
             f"(× {INIT_STD})", seen["block input"])
    if cfg.norm == "rmsnorm":
        meaning = ("block 0's RMSNorm: each token's vector divided by its root mean square, then a learned scale "
                   "(no mean subtracted, no shift)")
    else:
        meaning = "block 0's LayerNorm: each token's vector to mean 0, variance 1, then a learned scale and shift"
    _add(steps, "norm1(x)", ("B", "T", "C"), meaning, seen["attention input"])


def _head_steps(steps: list[TraceStep], model: GPT, seen: dict[str, torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Q/K/V projections, their split into heads, QK-norm and RoPE; returns q ``(B, H, T, d)``
    and k, v repeated per query head ``(B, H, T, d)``, as the scores and the context use them."""
    cfg, attn = model.cfg, model.blocks[0].attn
    x = seen["attention input"]
    b, t, _ = x.shape
    h, h_kv, d = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    grouped = h_kv != h
    gpt2 = not grouped and h * d == cfg.emb_dim  # GPT-2's shape: Q, K and V each C wide
    q_dim, kv_dim = ("C", "C") if gpt2 else ("H·d", "H_kv·d" if grouped else "H·d")
    bias = ", plus its bias" if cfg.qkv_bias else ""
    q, k, v = attn.qkv(x).split([h * d, h_kv * d, h_kv * d], dim=-1)  # (B, T, H·d), 2 × (B, T, H_kv·d)
    if gpt2:
        notes = ("queries (W_q is the first third of the fused qkv weight)", "keys (second third)",
                 "values (last third)")
    else:
        notes = (f"queries (W_q: the first H·d = {h * d} rows of the fused qkv weight{bias})",
                 f"keys (W_k: the next {kv_dim} = {h_kv * d} rows{': fewer key heads than query heads' if grouped else ''})",
                 f"values (W_v: the last {h_kv * d} rows)")
    q = _add(steps, "Q = x·W_q", ("B", "T", q_dim), notes[0], q)
    k = _add(steps, "K = x·W_k", ("B", "T", kv_dim), notes[1], k)
    _add(steps, "V = x·W_v", ("B", "T", kv_dim), notes[2], v)

    def split(t_: torch.Tensor, n: int) -> torch.Tensor:
        return t_.view(b, t, n, d).transpose(1, 2)  # (B, T, n·d) → (B, T, n, d) → (B, n, T, d)

    # The q and k the layer multiplies are the trace hook's; the forms before QK-norm and RoPE are shown on the way.
    changed = cfg.qk_norm or cfg.pos_emb == "rope"
    kv_dims = ("B", "H_kv", "T", "d") if grouped else ("B", "H", "T", "d")
    q = _add(steps, "Q heads", ("B", "H", "T", "d"), f"{q_dim} split into {h} heads of d = {d}",
             split(q, h) if changed else seen["q"])
    k_note, v_note = (_kv_head_notes(kv_dim, h, h_kv, d) if grouped else
                      ("the same split for the keys", "the same split for the values"))
    k = _add(steps, "K heads", kv_dims, k_note, split(k, h_kv) if changed else seen["k"])
    v = _add(steps, "V heads", kv_dims, v_note, seen["v"])
    if cfg.qk_norm:
        rope = cfg.pos_emb == "rope"
        norm_note = ("QK-norm: each head's {} RMS-normalised on its own, then a learned scale per dimension "
                     "(keeps the scores from growing large)")
        q = _add(steps, "q_norm(Q)", ("B", "H", "T", "d"), norm_note.format("query"),
                 attn.q_norm(q) if rope else seen["q"])
        k = _add(steps, "k_norm(K)", kv_dims, norm_note.format("key"), attn.k_norm(k) if rope else seen["k"])
    if cfg.pos_emb == "rope":
        stretched = "; the slow frequencies stretched as Llama 3 does" if cfg.rope_scaling else ""
        q = _add(steps, "RoPE(Q)", ("B", "H", "T", "d"),
                 f"queries rotated by an angle proportional to the position{stretched}", seen["q"])
        k = _add(steps, "RoPE(K)", kv_dims, "keys rotated the same way: q·k now depends on the distance", seen["k"])
    if grouped:
        g = h // h_kv
        k = _add(steps, "K per query head", ("B", "H", "T", "d"), f"each K head repeated for the {g} query heads of "
                 f"its group: query head h reads K head h // {g} (the model shares it without copying)",
                 per_query_head(k, h))
        v = _add(steps, "V per query head", ("B", "H", "T", "d"),
                 f"the same for V: query head h reads V head h // {g}", per_query_head(v, h))
    return q, k, v


def _score_steps(steps: list[TraceStep], model: GPT, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """Scores, scaled, ALiBi's bias (where the model has it), the causal mask; returns the masked scores."""
    cfg = model.cfg
    parts = score_parts(model, q, k)
    _add(steps, "scores Q·Kᵀ", ("B", "H", "T", "T"), "how well query i matches key j", parts["raw"])
    factor = resolve_scale(cfg.scale_attn, cfg.head_dim)
    _add(steps, "scaled scores", ("B", "H", "T", "T"),
         f"× {factor:.4f} (1/√{cfg.head_dim})" if cfg.scale_attn else "× 1: this model was trained without scaling",
         parts["scaled"])
    if "biased" in parts:
        _add(steps, "+ ALiBi bias", ("B", "H", "T", "T"), "minus slope_h × distance: far keys count less",
             parts["biased"])
    return _add(steps, "causal mask", ("B", "H", "T", "T"), "future keys set to -inf", parts["masked"])


def _output_steps(steps: list[TraceStep], model: GPT, seen: dict[str, torch.Tensor], masked: torch.Tensor,
                  v: torch.Tensor) -> float:
    """The model's weights, context and output, the heads merged between; returns the check's difference.

    The check carries the printed steps on by hand (softmax of the masked scores, times V,
    merged, through the layer's W_o) and compares them with what the model computed.
    """
    attn = model.blocks[0].attn
    weights = _add(steps, "attention weights", ("B", "H", "T", "T"), "softmax of each row", seen["weights"])
    shared = " (each query head with its group's V)" if model.cfg.kv_heads != model.cfg.n_heads else ""
    context = _add(steps, "context", ("B", "H", "T", "d"), f"weights · V{shared}", seen["context"])
    b, h, t, d = context.shape
    merged = context.transpose(1, 2).reshape(b, t, h * d)  # (B, H, T, d) → (B, T, H, d) → (B, T, H·d)
    merged = _add(steps, "merged heads", ("B", "T", "H·d" if h * d != model.cfg.emb_dim else "C"),
                  "heads side by side again", merged)
    plus_bias = " + b_o" if attn.out_proj.bias is not None else ""
    output = _add(steps, "output", ("B", "T", "C"),
                  f"merged · W_o{plus_bias}: block 0's attention output (added to the residual)", seen["output"])
    by_hand = torch.softmax(masked, dim=-1)  # (B, H, T, T)
    again = (by_hand @ v).transpose(1, 2).reshape(b, t, h * d)  # (B, H, T, d) → (B, T, H, d) → (B, T, H·d)
    again = attn.out_proj(again.to(attn.out_proj.weight.dtype)).float()  # (B, T, C)
    return max((by_hand - weights).abs().max().item(), (again - output).abs().max().item())


def explain_run(run_dir: str | Path, sentence: str, *, max_values: int = MAX_VALUES,
                out: Optional[TextIO] = sys.stdout, width: Optional[int] = None) -> list[TraceStep]:
    """Print :func:`trace_run` for a trained run, checked against the model's own forward pass.

    ``max_values`` and ``width`` (``None``: :func:`output_width`) are :func:`format_trace`'s.
    A grouped-query model's header compares its KV cache per token with multi-head attention's.
    """
    engine = load_for_trace(run_dir)
    traced = trace_engine(engine, sentence)
    if out is None:
        return traced.steps
    cfg = engine.model.cfg
    t = len(traced.ids)
    grouped = cfg.kv_heads != cfg.n_heads
    kv_count = f"H_kv = key/value heads ({cfg.kv_heads})   " if grouped else ""
    header = [
        f"The first attention layer of the trained model in {run_dir}, step by step.",
        f"  B = 1   T = tokens ({t})   C = embedding width ({cfg.emb_dim})   H = heads ({cfg.n_heads})   "
        f"{kv_count}d = head width ({cfg.head_dim})   positions: {cfg.pos_emb}",
        "  tokens: " + " | ".join(traced.labels[0]),
        "  ids:    " + " ".join(str(i) for i in traced.ids),
        *([f"  (the sentence has {traced.total} tokens; only its last {cfg.context_length}, the model's context, "
           "are traced)"] if traced.total > cfg.context_length else []),
        *(["  " + kv_cache_line(cfg.n_layers, cfg.n_heads, cfg.kv_heads, cfg.head_dim)] if grouped else []),
        "  " + values_note(max_values, t),
        "",
    ]
    width = output_width() if width is None else width
    out.write(format_trace(traced.steps, traced.labels, header=header, max_values=max_values, width=width))
    diff = traced.difference
    verdict = "gives the same output" if diff <= 1e-4 else "gives a DIFFERENT output"  # float32 rounding: ~1e-7
    check = (f"check: the model's own block-0 attention {verdict} (max |difference| {diff:.1e}): softmax of the "
             "masked scores above, times V, merged and through W_o, against the weights and output it computed")
    out.write("\n" + "\n".join(wrap_lines([check], width)) + "\n")
    return traced.steps


def explain(
    sentence: str = BOOK_SENTENCE,
    *,
    batch: int = 1,
    heads: int = 2,
    d_out: int = 4,
    seed: int = 123,
    scale: Scale = True,
    kv_heads: Optional[int] = None,
    max_values: int = MAX_VALUES,
    out: Optional[TextIO] = sys.stdout,
    width: Optional[int] = None,
) -> list[TraceStep]:
    """Print a step-by-step shape trace of causal multi-head self-attention over ``sentence``.

    Builds :class:`~llmscratch.nn.attention.MultiHeadAttention` (d_in 3, dropout 0) right after
    ``torch.manual_seed(seed)``, runs its forward pass by hand from the module's own weights
    and prints every tensor (``out=None`` prints nothing). ``batch`` > 1 adds rows with the
    words rotated; ``scale`` is True (1/√d), False (none) or a float factor; ``kv_heads``
    (default ``heads``) fewer than ``heads`` traces grouped-query attention and compares its
    KV cache with multi-head attention's. ``max_values`` and ``width`` (``None``:
    :func:`output_width`) are :func:`format_trace`'s. Returns the steps; the last one equals
    the module's output.

    Raises:
        ConfigError: an empty sentence, or a bad ``batch``/``heads``/``d_out``/``kv_heads``
            (``d_out`` must be divisible by ``heads``, ``kv_heads`` must divide ``heads``).
    """
    tokens, x = trace_batch(sentence, batch)
    module = build_traced_attention(d_out, heads, x.shape[1], seed, scale, kv_heads)
    steps = trace_attention(module, x)
    if out is not None:
        width = output_width() if width is None else width
        header = _header(tokens, module, seed, max_values)
        out.write(format_trace(steps, tokens, header=header, max_values=max_values, width=width))
        with torch.no_grad():
            diff = (module(x) - steps[-1].tensor).abs().max().item()
        check = f"check: MultiHeadAttention.forward(x) gives the same output (max |difference| {diff:.1e})"
        out.write("\n" + "\n".join(wrap_lines([check], width)) + "\n")
    return steps


def _header(tokens: Sequence[Sequence[str]], module: MultiHeadAttention, seed: int, max_values: int) -> list[str]:
    b, t = len(tokens), len(tokens[0])
    h, h_kv, d = module.num_heads, module.num_kv_heads, module.head_dim
    grouped = h_kv != h
    words = {w.lower() for row in tokens for w in row}
    if words <= BOOK_VECTORS.keys():
        source = "the book's inputs (chapter 3)"
    elif words & BOOK_VECTORS.keys():
        source = "the book's inputs for its six words, hashed vectors for the others"
    else:
        source = "hashed vectors (a word's SHA-256 seeds its vector)"
    kv_count = f"H_kv = key/value heads ({h_kv})   " if grouped else ""
    kv_width = f"   d_kv = key/value width = H_kv · d ({h_kv * d})" if grouped else ""
    kv_arg = f", num_kv_heads={h_kv}" if grouped else ""
    lines = [
        "Causal multi-head self-attention, one forward pass, step by step." if not grouped else
        "Causal grouped-query self-attention, one forward pass, step by step.",
        f"  B = batch size ({b})   H = heads ({h})   {kv_count}T = tokens per sequence ({t})",
        f"  d_in = input width ({EMBED_DIM})   d_out = output width ({module.d_out})   "
        f"d = head width = d_out / H ({d}){kv_width}",
        f"  module: MultiHeadAttention(d_in={EMBED_DIM}, d_out={module.d_out}, num_heads={h}{kv_arg}, dropout=0), "
        f"built after torch.manual_seed({seed})",
        f"  token vectors: {source}",
    ]
    if grouped:
        lines.append("  " + kv_cache_line(1, h, h_kv, d))
    for i, row in enumerate(tokens):
        lines.append(f"  batch {i}: " + " ".join(row))
    lines.append("  " + values_note(max_values, t))
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
def attention_maps(model: GPT, tokenizer: Optional[Tokenizer], prompt: str, name: Optional[str] = None) -> AttentionMaps:
    """Run ``model`` on ``prompt`` and return its tokens and per-layer weights ``(1, H, T, T)``.

    Works for every position kind, grouped-query attention (one map per query head) and
    imported models: it only asks the model for its weights (``need_weights=True``, which
    runs the explicit attention path). The prompt is encoded by the inference
    :class:`~llmscratch.inference.engine.Engine`, so text the tokenizer cannot encode gets its
    message, naming the prompt by ``name`` (default: the text, shortened).

    Raises:
        InspectError: no tokenizer, an empty prompt, or one longer than the model's context.
        TokenizerError: text the tokenizer cannot encode.
    """
    from ..inference.engine import Engine

    if tokenizer is None:
        raise InspectError("this run has no tokenizer, so a text prompt cannot be turned into tokens; "
                           "import it with its tokenizer files")
    if not prompt:
        raise InspectError("the prompt is empty: pass some text with --prompt")
    ids = Engine(model, tokenizer, use_cache=False).encode([prompt], None if name is None else [name])[0]
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

    The per-head q and k come from the model's own attention (its trace hook: after QK-norm
    and RoPE, exactly what the layer multiplies; k with its ``H_kv`` heads, each repeated for
    the query heads that share it); :func:`score_parts` applies the model's scale (1/√d or 1),
    ALiBi bias and causal mask, so ``softmax`` of them gives the weights ``model(idx,
    need_weights=True)`` returns.
    """
    seen: dict[tuple[int, str], torch.Tensor] = {}
    was_training = model.training
    model.eval()
    try:
        model(idx, trace=lambda layer, name, t: seen.__setitem__((layer, name), t) if name in ("q", "k") else None)
    finally:
        model.train(was_training)
    return [score_parts(model, seen[(layer, "q")], seen[(layer, "k")])["masked"] for layer in range(model.cfg.n_layers)]


def score_parts(model: GPT, q: torch.Tensor, k: torch.Tensor) -> dict[str, torch.Tensor]:
    """One layer's scores on their way to softmax, from its q ``(B, H, T, d)`` and k ``(B, H_kv, T, d)``.

    ``raw`` Q·Kᵀ, ``scaled`` by the model's factor, ``biased`` by ALiBi (only where the model
    uses it) and ``masked`` (−inf above the diagonal), each ``(B, H, T, T)`` in float32.
    Query head ``h`` meets key head ``h // (H / H_kv)`` (:func:`per_query_head`).
    """
    cfg = model.cfg
    t = q.shape[-2]
    k = per_query_head(k, q.shape[1])  # (B, H, T, d)
    raw = q.float() @ k.float().transpose(-2, -1)  # (B, H, T, T)
    parts = {"raw": raw, "scaled": raw * resolve_scale(cfg.scale_attn, cfg.head_dim)}
    last = parts["scaled"]
    if cfg.pos_emb == "alibi":
        from ..nn.positions import alibi_bias

        last = parts["biased"] = last + alibi_bias(model.alibi_slopes, t, t, q.device)  # (H, T, T) broadcasts
    future = torch.ones(t, t, dtype=torch.bool, device=q.device).triu(1)  # (T, T), True above the diagonal
    parts["masked"] = last.masked_fill(future, float("-inf"))
    return parts


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


MASKED_GREY = "#d0d0d0"  # the colour of masked (future) cells in the PNGs: apart from every weight's colour


def _draw_head(ax, matrix: torch.Tensor, tokens: Sequence[str], room: int, x_labels: bool, y_labels: bool,
               fontsize: float) -> object:
    """One head's ``(T, T)`` weights on ``ax``: viridis from 0 to 1, the masked future keys grey.

    Returns the image, for a colour bar.
    """
    import matplotlib
    import numpy as np

    t = len(tokens)
    future = np.triu(np.ones((t, t), dtype=bool), k=1)  # (T, T), True above the diagonal
    cmap = matplotlib.colormaps["viridis"].with_extremes(bad=MASKED_GREY)
    image = ax.imshow(np.ma.masked_array(matrix.numpy(), mask=future), cmap=cmap, vmin=0.0, vmax=1.0,
                      interpolation="nearest")
    step = _label_step(t, room)
    ticks = list(range(0, t, step))
    labels = [token_label(tokens[i]) for i in ticks]
    ax.set_xticks(ticks)
    ax.set_yticks(ticks)
    ax.set_xticklabels(labels if x_labels else [], rotation=90, fontsize=fontsize)
    ax.set_yticklabels(labels if y_labels else [], fontsize=fontsize)
    ax.tick_params(length=2 if (x_labels or y_labels) else 0)
    return image


def attention_grid_figure(maps: AttentionMaps, title: str = "") -> Figure:
    """The figure of :func:`plot_attention_grid`: one heatmap per layer (rows) and head (columns).

    Keys run along x, queries down y, as the axis labels say; token labels sit on the left
    column and bottom row (every k-th one past about 24 tokens, so they stay readable). One
    colour bar on the right gives the weight of a colour; masked (future) cells are grey.
    """
    from .experiments.common import pyplot

    plt = pyplot()
    n_l, n_h, t = maps.n_layers, maps.n_heads, len(maps.tokens)
    cell = 2.2 if t <= 24 else 2.8
    fig, axes = plt.subplots(n_l, n_h, figsize=(2.0 + cell * n_h, 1.4 + cell * n_l), squeeze=False,
                             layout="constrained")
    room = 24 if n_h <= 4 else 16
    image = None
    for layer in range(n_l):
        for head in range(n_h):
            ax = axes[layer][head]
            image = _draw_head(ax, maps.head(layer, head), maps.tokens, room,
                               x_labels=layer == n_l - 1, y_labels=head == 0, fontsize=6)
            ax.set_title(f"layer {layer}, head {head}", fontsize=8)
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=min(1.0, 0.9 / n_l + 0.3), label="attention weight")
    fig.supxlabel("key (attended to)", fontsize=9)
    fig.supylabel("query (attending)", fontsize=9)
    title = title.replace("$", r"\$")  # a prompt or path with $…$ is text, not mathtext
    fig.suptitle((title or f"attention weights: {n_l} layers × {n_h} heads, {t} tokens") + "  (grey: masked future keys)",
                 fontsize=10)
    return fig


def plot_attention_grid(maps: AttentionMaps, path: str | Path, title: str = "") -> None:
    """Save :func:`attention_grid_figure` as a PNG at ``path``."""
    from .experiments.common import save_figure

    save_figure(attention_grid_figure(maps, title), _as_path(path))


def attention_head_figure(maps: AttentionMaps, layer: int, head: int) -> Figure:
    """The figure of :func:`plot_attention_head`: one head's weights, every token labelled (every
    k-th past 48 tokens), query and key axes named, a colour bar, masked (future) cells grey."""
    from .experiments.common import pyplot

    _check_layer_head(maps, layer, head)
    plt = pyplot()
    t = len(maps.tokens)
    side = min(14.0, 3.0 + 0.28 * min(t, 48))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = _draw_head(ax, maps.head(layer, head), maps.tokens, 48, x_labels=True, y_labels=True, fontsize=8)
    ax.set_xlabel("key (attended to)")
    ax.set_ylabel("query (attending)")
    ax.set_title(f"layer {layer}, head {head}  (grey: masked future keys)")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="attention weight")
    fig.tight_layout()
    return fig


def plot_attention_head(maps: AttentionMaps, layer: int, head: int, path: str | Path) -> None:
    """Save :func:`attention_head_figure` as a PNG at ``path``."""
    from .experiments.common import save_figure

    save_figure(attention_head_figure(maps, layer, head), _as_path(path))


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
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>
body { font-family: system-ui, sans-serif; margin: 1.5em; color: #222; }
h1 { font-size: 1.2em; overflow-wrap: anywhere; }
.controls, .legend { display: flex; flex-wrap: wrap; align-items: center; gap: 0.5em 1.5em; margin: 0.8em 0; }
.legend { font-size: 0.85em; color: #444; }
.legend .item { display: inline-flex; align-items: center; gap: 0.4em; }
.legend .bar { display: inline-block; width: 12em; height: 1em; border: 1px solid #999; }
.legend .swatch { display: inline-block; width: 1em; height: 1em; border: 1px solid #999; }
.legend .swatch.query { border: 2px solid #d33; background: #fff; }
.masked { background: repeating-linear-gradient(135deg, #b8b8b8 0 1px, #efefef 1px 4px); }
.tokens { display: flex; flex-wrap: wrap; gap: 0.4em 2px; font-family: ui-monospace, monospace; }
.tok { padding: 0.15em 0.25em; border-radius: 3px; cursor: pointer; white-space: pre; border: 1px solid #ccc; }
.tok:focus-visible { outline: 2px solid #222; outline-offset: 2px; }
.tok.query { outline: 2px solid #d33; }
.tok.pinned { outline: 3px solid #d33; font-weight: bold; }
.tok.future { color: #888; border-style: dashed; }
#info { color: #555; margin-top: 0.5em; min-height: 1.2em; }
#mapbox { width: 100%; overflow-x: auto; margin-top: 1em; }
table.map { --cell: 16px; border-collapse: collapse; font-family: ui-monospace, monospace; font-size: 11px; }
table.map td { width: var(--cell); min-width: var(--cell); max-width: var(--cell); height: var(--cell);
               padding: 0; box-shadow: inset 0 0 0 0.5px rgba(0, 0, 0, 0.12); }
table.map.dense td { box-shadow: none; }
table.map th { font-weight: normal; white-space: pre; padding: 0 4px; line-height: var(--cell); }
table.map th.row { text-align: right; max-width: 12em; overflow: hidden; text-overflow: ellipsis; }
table.map.sparse th.row { overflow: visible; }
table.map th.col { writing-mode: vertical-rl; transform: rotate(180deg); text-align: left; padding: 4px 0;
                   max-height: 9em; }
table.map tr.hl th { color: #d33; font-weight: bold; }
table.map tr.hl td { box-shadow: inset 0 1px #d33, inset 0 -1px #d33; }
</style>
</head>
<body>
<h1>__TITLE__</h1>
<div class="controls">
<label>layer <select id="layer"></select></label>
<label>head <select id="head"></select></label>
</div>
<div class="legend" id="legend">
<span class="item">weight 0 <span class="bar" id="legend-bar"></span> 1</span>
<span class="item"><span class="swatch masked"></span> masked: a future key, which the query cannot see</span>
<span class="item"><span class="swatch query"></span> the query token (hovered or pinned)</span>
</div>
<p>Hover a token (or a row of the map) to shade every token by the attention it gives them. Click it, or
press Enter or Space on it, to pin it; &larr; and &rarr; move the pin, Esc lets it go.</p>
<div class="tokens" id="tokens"></div>
<div id="info"></div>
<div id="mapbox"><table class="map" id="map"></table></div>
<script id="attention-data" type="application/json">__DATA__</script>
<script>
(function () {
  "use strict";
  var MAX_CELL = 28, LABEL_PX = 9;  // the largest cell, and the room one label needs (px)
  var data = JSON.parse(document.getElementById("attention-data").textContent);
  var tokens = data.tokens, attention = data.attention, T = tokens.length;
  var layerSel = document.getElementById("layer"), headSel = document.getElementById("head");
  var tokBox = document.getElementById("tokens"), info = document.getElementById("info");
  var table = document.getElementById("map"), box = document.getElementById("mapbox");
  var pinned = null, hovered = null;  // token indices; the hovered one is shown while there is one

  function shown(t) {
    return t.replace(/ /g, "\\u2423").replace(/\\n/g, "\\\\n").replace(/\\r/g, "\\\\r").replace(/\\t/g, "\\\\t");
  }
  function colour(w) { var l = Math.round(100 - 55 * w); return "hsl(215, 80%, " + l + "%)"; }
  function option(sel, n) {
    for (var i = 0; i < n; i++) { var o = document.createElement("option"); o.value = i; o.textContent = i; sel.appendChild(o); }
  }
  option(layerSel, attention.length);
  option(headSel, attention[0][0].length);
  layerSel.value = String(data.selected.layer);
  headSel.value = String(data.selected.head);
  document.getElementById("legend-bar").style.background =
    "linear-gradient(to right, " + [0, 0.25, 0.5, 0.75, 1].map(colour).join(", ") + ")";
  function weights() { return attention[+layerSel.value][0][+headSel.value]; }

  var spans = tokens.map(function (t, i) {
    var s = document.createElement("span");
    s.className = "tok"; s.textContent = shown(t); s.tabIndex = 0;
    s.setAttribute("role", "button"); s.setAttribute("aria-pressed", "false");
    s.addEventListener("mouseenter", function () { hover(i); });
    s.addEventListener("mouseleave", function () { hover(null); });
    s.addEventListener("click", function () { togglePin(i); });
    s.addEventListener("keydown", function (e) { onKey(e, i); });
    tokBox.appendChild(s);
    return s;
  });

  function hover(q) { hovered = q; show(); }
  function togglePin(q) { pinned = pinned === q ? null : q; show(); }
  function onKey(e, i) {  // Enter/Space pin or unpin; arrows, Home and End move the pin; Esc unpins
    var to = {ArrowLeft: i - 1, ArrowRight: i + 1, Home: 0, End: T - 1}[e.key];
    if (e.key === "Enter" || e.key === " ") {
      togglePin(i);
    } else if (e.key === "Escape") {
      pinned = null; show();
    } else if (to !== undefined) {
      pinned = Math.max(0, Math.min(T - 1, to)); spans[pinned].focus(); show();
    } else {
      return;
    }
    e.preventDefault();  // Space would scroll the page, arrows too
  }
  function show() {
    var q = hovered !== null ? hovered : pinned;
    var row = q === null ? null : weights()[q];
    spans.forEach(function (s, k) {
      var seen = q !== null && k <= q;
      s.classList.toggle("query", k === q);
      s.classList.toggle("pinned", k === pinned);
      s.classList.toggle("future", q !== null && k > q);
      s.setAttribute("aria-pressed", String(k === pinned));
      s.style.background = seen ? colour(row[k]) : "";
      s.style.color = seen && row[k] > 0.6 ? "#fff" : "";
    });
    Array.prototype.forEach.call(table.rows, function (r, i) { r.classList.toggle("hl", q !== null && i === q + 1); });
    if (q === null) { info.textContent = ""; return; }
    var best = 0;
    for (var k = 1; k <= q; k++) { if (row[k] > row[best]) best = k; }
    info.textContent = "token " + q + " \\u201c" + shown(tokens[q]) + "\\u201d attends most to token " + best +
      " \\u201c" + shown(tokens[best]) + "\\u201d (" + row[best].toFixed(3) + ")" +
      (q === pinned ? " \\u2014 pinned: click it again or press Esc to let it go" : "");
  }

  function drawTable() {
    var w = weights();
    table.innerHTML = "";
    var head = table.insertRow(); head.appendChild(document.createElement("th"));
    tokens.forEach(function () { var th = document.createElement("th"); th.className = "col"; head.appendChild(th); });
    w.forEach(function (row, q) {
      var tr = table.insertRow();
      var th = document.createElement("th"); th.className = "row"; tr.appendChild(th);
      row.forEach(function (v, k) {
        var td = tr.insertCell();
        var pair = shown(tokens[q]) + " \\u2192 " + shown(tokens[k]) + ": ";
        if (k <= q) { td.style.background = colour(v); td.title = pair + v.toFixed(4); }
        else { td.className = "masked"; td.title = pair + "masked (a future key)"; }
      });
      tr.addEventListener("mouseenter", function () { hover(q); });
      tr.addEventListener("mouseleave", function () { hover(null); });
      tr.addEventListener("click", function () { togglePin(q); });
    });
    fit();
  }
  function label(every) {  // tokens on both axes; only every k-th one when the cells are too small for all
    for (var i = 0; i < T; i++) {
      var text = i % every === 0 ? shown(tokens[i]) : "";
      table.rows[0].cells[i + 1].textContent = text;
      table.rows[i + 1].cells[0].textContent = text;
    }
  }
  function fit() {  // square cells as large as the page's width allows for T of them, at most MAX_CELL
    table.style.setProperty("--cell", MAX_CELL + "px"); table.style.fontSize = "11px"; label(1);
    var labels = T ? table.rows[1].cells[0].offsetWidth : 0;  // the widest the label column gets
    var cell = Math.max(1, Math.min(MAX_CELL, Math.floor((box.clientWidth - labels - 1) / Math.max(T, 1))));
    table.style.setProperty("--cell", cell + "px");
    table.style.fontSize = Math.min(11, Math.max(8, cell - 2)) + "px";
    var every = Math.ceil(LABEL_PX / cell);
    table.classList.toggle("dense", cell < 6);
    table.classList.toggle("sparse", every > 1);  // a label may then spill into its blank neighbours
    label(every);
  }
  function redraw() { hovered = null; drawTable(); show(); }  // a new head: the pin stays, its row redrawn
  layerSel.addEventListener("change", redraw);
  headSel.addEventListener("change", redraw);
  window.addEventListener("resize", fit);
  drawTable();
  show();
  document.body.setAttribute("data-ready", "1");
})();
</script>
</body>
</html>
"""


def attention_html(maps: AttentionMaps, title: str = "Attention weights", *, layer: int = 0, head: int = 0) -> str:
    """One self-contained HTML page (inline CSS and JavaScript, no network) to explore the maps.

    It opens on ``layer`` and ``head``; the selectors pick any other. Hovering a token (or a
    row of the map) shades every earlier token by the weight the hovered one gives it;
    clicking it, or Enter or Space on it (tokens take the keyboard focus), pins it, and the
    arrow keys move the pin. Masked cells (future keys) are hatched grey, apart from the
    white of a zero weight; a legend says so. Cells are square and sized so the map fits the
    page's width (at most 28 px), on load and whenever the window is resized.

    The data sits in the page as bertviz's JSON layout (plus the opening ``selected`` layer
    and head); ``<``, ``>``, ``&`` and ``/`` are escaped so no token can end the script.

    Raises:
        InspectError: ``layer`` or ``head`` does not exist.
    """
    import html
    import json

    _check_layer_head(maps, layer, head)
    page_data = {**attention_json(maps, digits=4), "selected": {"layer": layer, "head": head}}
    data = json.dumps(page_data, ensure_ascii=True, separators=(",", ":"))
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
    is chosen; the other axis defaults to all), and ``attention.html`` (opening on the first
    chosen layer and head) / ``attention.json`` when asked. Returns the paths written."""
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
        first = {"layer": chosen_layers[0] if chosen_layers else 0, "head": chosen_heads[0] if chosen_heads else 0}
        write_text_atomic(path, attention_html(maps, title or "Attention weights", **first))
        written.append(path)
    if json_file:
        path = out / "attention.json"
        write_text_atomic(path, json.dumps(attention_json(maps)))
        written.append(path)
    return written
