"""Tests for the shape trace (llmscratch.tools.inspect.explain and `llmscratch explain`) and the attention page's script."""

from __future__ import annotations

import html
import io
import json
import math
import re
import shutil
import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import pytest
import torch

from llmscratch.nn.attention import MultiHeadAttention
from llmscratch.errors import ConfigError, LLMScratchError
from llmscratch.tools.inspect import (
    BOOK_SENTENCE,
    BOOK_VECTORS,
    AttentionMaps,
    TraceStep,
    attention_html,
    build_traced_attention,
    explain,
    trace_attention,
    trace_batch,
    word_vector,
)

BOOK_INPUTS = torch.tensor(
    [
        [0.43, 0.15, 0.89],
        [0.55, 0.87, 0.66],
        [0.57, 0.85, 0.64],
        [0.22, 0.58, 0.33],
        [0.77, 0.25, 0.10],
        [0.05, 0.80, 0.55],
    ]
)

STEP_NAMES = [
    "inputs x", "W_q", "W_k", "W_v", "Q = x·W_q", "K = x·W_k", "V = x·W_v",
    "Q heads", "K heads", "V heads", "scores Q·Kᵀ", "scaled scores", "causal mask",
    "attention weights", "context", "merged heads", "W_o", "b_o", "output",
]


def run_explain(*args, **kwargs) -> tuple[list[TraceStep], str]:
    buf = io.StringIO()
    steps = explain(*args, out=buf, **kwargs)
    return steps, buf.getvalue()


def by_name(steps: list[TraceStep]) -> dict[str, TraceStep]:
    return {s.name: s for s in steps}


# --------------------------------------------------------------------------- inputs


def test_book_sentence_uses_the_books_vectors():
    tokens, x = trace_batch(BOOK_SENTENCE, 1)
    assert tokens == [BOOK_SENTENCE.split()]
    assert x.shape == (1, 6, 3)
    torch.testing.assert_close(x[0], BOOK_INPUTS, rtol=0, atol=0)
    steps, text = run_explain(BOOK_SENTENCE)
    torch.testing.assert_close(steps[0].tensor[0], BOOK_INPUTS, rtol=0, atol=0)
    assert "the book's inputs" in text


def test_any_sentence_made_of_the_books_words_uses_their_vectors():
    _, x = trace_batch("step one with starts journey Your", 1)
    torch.testing.assert_close(x[0], BOOK_INPUTS.flip(0), rtol=0, atol=0)
    assert torch.equal(word_vector("YOUR"), torch.tensor(BOOK_VECTORS["your"]))


def test_other_words_get_deterministic_hashed_vectors():
    a, b = word_vector("cat"), word_vector("cat")
    assert torch.equal(a, b)
    assert a.shape == (3,) and torch.all((a >= 0) & (a <= 1))
    assert not torch.equal(word_vector("cat"), word_vector("dog"))
    torch.manual_seed(0)  # the global RNG plays no part
    c = word_vector("cat")
    torch.manual_seed(1)
    assert torch.equal(c, word_vector("cat")) and torch.equal(c, a)


def test_batch_two_adds_a_different_rotated_sequence():
    tokens, x = trace_batch(BOOK_SENTENCE, 2)
    assert tokens[1] == "journey starts with one step Your".split()
    assert x.shape == (2, 6, 3)
    torch.testing.assert_close(x[1], BOOK_INPUTS.roll(-1, dims=0), rtol=0, atol=0)
    assert not torch.equal(x[0], x[1])


# --------------------------------------------------------------------------- the trace is the module's forward


@pytest.mark.parametrize(
    "sentence,batch,heads,d_out,seed,scale",
    [
        (BOOK_SENTENCE, 1, 2, 4, 123, True),
        (BOOK_SENTENCE, 2, 3, 6, 7, True),
        ("the quick brown fox jumps", 3, 1, 5, 0, False),
        ("a b", 2, 4, 8, 1, True),
        ("alone", 1, 2, 2, 5, False),
    ],
)
def test_trace_output_equals_the_modules_forward(sentence, batch, heads, d_out, seed, scale):
    steps, _ = run_explain(sentence, batch=batch, heads=heads, d_out=d_out, seed=seed, scale=scale)
    _, x = trace_batch(sentence, batch)
    torch.manual_seed(seed)  # built independently, the way a learner would
    module = MultiHeadAttention(3, d_out, x.shape[1], 0.0, heads, scale=scale).eval()
    with torch.no_grad():
        expected, weights = module(x, need_weights=True)
        fused = MultiHeadAttention(3, d_out, x.shape[1], 0.0, heads, scale=scale, backend="fused")
        fused.load_state_dict(module.state_dict())
        expected_fused = fused(x)
    s = by_name(steps)
    torch.testing.assert_close(s["output"].tensor, expected)
    torch.testing.assert_close(s["output"].tensor, expected_fused, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(s["attention weights"].tensor, weights)
    # The weight steps are the module's own weights in the book's x·W orientation.
    torch.testing.assert_close(s["W_q"].tensor, module.W_query.weight.T)
    torch.testing.assert_close(s["W_o"].tensor, module.out_proj.weight.T)
    torch.testing.assert_close(s["b_o"].tensor, module.out_proj.bias)


def test_books_multi_head_numbers_appear():
    """d_out 2, two heads, seed 123 on the book's sentence: the book's [0.3190, 0.4858]."""
    steps, text = run_explain(BOOK_SENTENCE, heads=2, d_out=2, seed=123)
    first = [round(v, 4) for v in steps[-1].tensor[0, 0].double().tolist()]
    assert first == [0.3190, 0.4858]
    assert "0.3190" in text and "0.4858" in text


def test_intermediate_steps_follow_the_definitions():
    steps, _ = run_explain(BOOK_SENTENCE, batch=2, heads=2, d_out=4)
    s = by_name(steps)
    x, q, k = s["inputs x"].tensor, s["Q heads"].tensor, s["K heads"].tensor
    torch.testing.assert_close(s["Q = x·W_q"].tensor, x @ s["W_q"].tensor)
    torch.testing.assert_close(q[:, 1], s["Q = x·W_q"].tensor[..., 2:4])  # head 1 = columns 2..3
    torch.testing.assert_close(s["scores Q·Kᵀ"].tensor, q @ k.transpose(-2, -1))
    torch.testing.assert_close(s["scaled scores"].tensor, s["scores Q·Kᵀ"].tensor / math.sqrt(2))
    masked = s["causal mask"].tensor
    future = torch.ones(6, 6, dtype=torch.bool).triu(1)
    assert torch.all(masked[..., future] == float("-inf"))
    assert torch.isfinite(masked[..., ~future]).all()
    w = s["attention weights"].tensor
    torch.testing.assert_close(w.sum(-1), torch.ones(2, 2, 6))
    assert torch.all(w[..., future] == 0)
    torch.testing.assert_close(s["context"].tensor, w @ s["V heads"].tensor)
    torch.testing.assert_close(s["merged heads"].tensor[..., :2], s["context"].tensor[:, 0])


def test_no_scale_leaves_scores_unscaled():
    steps, text = run_explain(BOOK_SENTENCE, scale=False)
    s = by_name(steps)
    torch.testing.assert_close(s["scaled scores"].tensor, s["scores Q·Kᵀ"].tensor)
    assert "unscaled" in text


# --------------------------------------------------------------------------- shapes and text


def test_shapes_for_batch_2_heads_3_d_out_6():
    steps, text = run_explain(BOOK_SENTENCE, batch=2, heads=3, d_out=6)
    B, H, T, d, d_in, d_out = 2, 3, 6, 2, 3, 6
    expected = {
        "inputs x": (B, T, d_in),
        "W_q": (d_in, d_out), "W_k": (d_in, d_out), "W_v": (d_in, d_out),
        "Q = x·W_q": (B, T, d_out), "K = x·W_k": (B, T, d_out), "V = x·W_v": (B, T, d_out),
        "Q heads": (B, H, T, d), "K heads": (B, H, T, d), "V heads": (B, H, T, d),
        "scores Q·Kᵀ": (B, H, T, T), "scaled scores": (B, H, T, T), "causal mask": (B, H, T, T),
        "attention weights": (B, H, T, T),
        "context": (B, H, T, d), "merged heads": (B, T, d_out),
        "W_o": (d_out, d_out), "b_o": (d_out,), "output": (B, T, d_out),
    }
    assert [s.name for s in steps] == STEP_NAMES
    for step in steps:
        assert step.shape == expected[step.name], step.name
        assert tuple(step.tensor.shape) == step.shape
        assert len(step.dims) == len(step.shape)
        assert step.meaning
    assert "(B=2, H=3, T=6, T=6)" in text
    assert "(B=2, H=3, T=6, d=2)" in text
    assert "batch 1: journey starts with one step Your" in text
    # Q/K/V heads and context (72 elements) print their values; the (B, H, T, T) steps
    # (216 elements) are over the default limit of 144 and show their shapes only.
    assert text.count("[batch 1, head 2]") == 4
    assert run_explain(BOOK_SENTENCE, batch=2, heads=3, d_out=6, max_values=1000)[1].count("[batch 1, head 2]") == 8


def test_same_seed_same_text_and_different_seed_different_text():
    _, a = run_explain(BOOK_SENTENCE, seed=5)
    _, b = run_explain(BOOK_SENTENCE, seed=5)
    _, c = run_explain(BOOK_SENTENCE, seed=6)
    assert a == b
    assert a != c


def test_global_rng_is_left_alone():
    torch.manual_seed(42)
    expected = torch.rand(3)
    torch.manual_seed(42)
    run_explain(BOOK_SENTENCE)
    assert torch.equal(torch.rand(3), expected)


def test_printed_text_is_readable():
    _, text = run_explain(BOOK_SENTENCE)
    lines = text.splitlines()
    assert any("B = batch size" in ln and "H = heads" in ln and "T = tokens" in ln for ln in lines)
    assert any("d = head width" in ln for ln in lines)
    # The step rows line up: every step's shape starts in the same column.
    rows = [ln for ln in lines if ln[:2].strip().isdigit() and "(" in ln]
    assert len(rows) == len(STEP_NAMES)
    columns = {ln.index("(") for ln in rows}
    assert len(columns) == 1
    # Values: rounded to 4 decimals, rows labelled with tokens, -inf for the mask.
    assert "Your      0.4300  0.1500  0.8900" in text
    assert "-inf" in text
    assert "max |difference| 0.0e+00" in text


def test_values_hidden_for_big_tensors():
    _, text = run_explain(BOOK_SENTENCE, max_values=0)
    assert "0.4300" not in text
    for name in STEP_NAMES:
        assert name in text


def test_out_none_prints_nothing(capsys):
    steps = explain(BOOK_SENTENCE, out=None)
    assert len(steps) == len(STEP_NAMES)
    assert capsys.readouterr().out == ""


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(heads=2, d_out=5), r"d_out \(5\) must be divisible by heads \(2\).*--d-out 4 --heads 2"),
        (dict(heads=4, d_out=6), r"d_out \(6\) must be divisible by heads \(4\)"),
        (dict(heads=0), r"heads must be at least 1, got 0"),
        (dict(d_out=0), r"d_out must be at least 1, got 0"),
        (dict(batch=0), r"batch must be at least 1, got 0"),
        (dict(seed=2**64), r"seed \(--seed\) must be a 64-bit integer, from -2\*\*63 to 2\*\*64 - 1, got 18446744073709551616"),
        (dict(seed=-(2**63) - 1), r"seed \(--seed\) must be a 64-bit integer"),
    ],
)
def test_bad_settings_raise_config_error(kwargs, pattern):
    with pytest.raises(ConfigError, match=pattern):
        explain(BOOK_SENTENCE, out=None, **kwargs)


def test_empty_sentence():
    with pytest.raises(ConfigError, match=r"the sentence is empty"):
        explain("   ", out=None)


def test_config_error_is_an_llmscratch_error():
    with pytest.raises(LLMScratchError):
        build_traced_attention(5, 2, 6, 123, True)


def test_trace_attention_needs_no_printing():
    module = build_traced_attention(4, 2, 6, 123, True)
    _, x = trace_batch(BOOK_SENTENCE, 1)
    steps = trace_attention(module, x)
    with torch.no_grad():
        torch.testing.assert_close(steps[-1].tensor, module(x))


# --------------------------------------------------------------------------- the command line


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "llmscratch", "explain", *args],
        capture_output=True, text=True, timeout=120,
    )


def test_cli_prints_the_steps():
    result = _cli("Your journey starts with one step", "--batch", "2", "--heads", "3", "--d-out", "6",
                  "--seed", "7")
    assert result.returncode == 0, result.stderr
    for name in STEP_NAMES:
        assert name in result.stdout
    assert "(B=2, H=3, T=6, d=2)" in result.stdout
    _, expected = run_explain(BOOK_SENTENCE, batch=2, heads=3, d_out=6, seed=7)
    assert result.stdout == expected


def test_cli_bad_heads_d_out_pair_exits_2_with_a_clear_message():
    result = _cli("--heads", "3", "--d-out", "4")
    assert result.returncode == 2
    assert "d_out (4) must be divisible by heads (3)" in result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_cli_help_lists_the_options():
    result = _cli("--help")
    assert result.returncode == 0
    for option in ("--batch", "--heads", "--d-out", "--seed", "--no-scale", "--max-values"):
        assert option in result.stdout


# --------------------------------------------------------------------------- explain --run


@pytest.mark.parametrize("pos_emb", ["learned", "sinusoidal", "rope", "alibi", "none"])
def test_trace_run_equals_the_models_own_first_attention_layer(tmp_path, pos_emb):
    from llmscratch.store.checkpoint import save_run
    from llmscratch.tools.inspect import trace_run
    from llmscratch.nn.model import GPT, GPTConfig
    from llmscratch.data.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefgh ")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("test", vocab_size=tok.vocab_size, pos_emb=pos_emb, qkv_bias=True)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # far from the init, so every step matters
    save_run(tmp_path, model, tokenizer=tok)

    captured = {}
    model.blocks[0].attn.register_forward_hook(lambda m, i, o: captured.setdefault("out", o))
    text = "bad cafe"
    with torch.no_grad():
        model(torch.tensor([tok.encode(text)]))
    labels, steps = trace_run(tmp_path, text)
    assert labels == [list(text)]
    torch.testing.assert_close(steps[-1].tensor, captured["out"], rtol=1e-5, atol=1e-5)
    names = [s.name for s in steps]
    assert ("RoPE(Q)" in names) == (pos_emb == "rope")
    assert ("+ ALiBi bias" in names) == (pos_emb == "alibi")
    assert ("+ positions" in names) == (pos_emb in ("learned", "sinusoidal"))


def test_explain_run_cli_prints_the_check(tmp_path):
    from llmscratch.store.checkpoint import save_run
    from llmscratch.nn.model import GPT, GPTConfig
    from llmscratch.data.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefgh ")
    torch.manual_seed(0)
    save_run(tmp_path, GPT(GPTConfig.from_preset("test", vocab_size=tok.vocab_size)), tokenizer=tok)
    r = subprocess.run([sys.executable, "-m", "llmscratch", "explain", "--run", str(tmp_path), "bad cafe"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "attention weights" in r.stdout
    check = re.search(r"check: the model's own block-0 attention gives the same output \(max \|difference\| (\S+)\)",
                      r.stdout)
    assert check and float(check.group(1)) < 1e-5, r.stdout[-500:]
    bad = subprocess.run([sys.executable, "-m", "llmscratch", "explain", "--run", str(tmp_path), "xyz"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "not in the vocabulary" in bad.stderr
    toy = subprocess.run([sys.executable, "-m", "llmscratch", "explain", "--run", str(tmp_path), "bad", "--heads", "3",
                          "--no-scale"], capture_output=True, text=True, timeout=120)
    assert toy.returncode == 2 and "--heads, --no-scale cannot apply" in toy.stderr



def test_explain_run_says_when_a_long_sentence_is_cut_to_the_context(tmp_path):
    import io

    from llmscratch.store.checkpoint import save_run
    from llmscratch.tools.inspect import explain_run
    from llmscratch.nn.model import GPT, GPTConfig
    from llmscratch.data.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefgh ")
    torch.manual_seed(0)
    save_run(tmp_path, GPT(GPTConfig.from_preset("test", vocab_size=tok.vocab_size, context_length=8)), tokenizer=tok)
    for sentence, cut in (("bad cafe", False), ("bad cafe bead", True)):
        out = io.StringIO()
        explain_run(tmp_path, sentence, out=out)
        note = f"(the sentence has {len(sentence)} tokens; only its last 8, the model's context, are traced)"
        assert (note in out.getvalue()) == cut


# --------------------------------------------------------------------------- the HTML page's script, run by Node
#
# attention_html writes a page whose inline JavaScript draws the map and reacts to the mouse.
# tests/js/dom_shim.js runs that script with Node against a small hand-written DOM, performs
# events (choose a layer/head, hover a token or a row) and reports what the page shows; the
# tests compare that with the same numbers computed here from maps.weights.

NODE = shutil.which("node")
DOM_SHIM = Path(__file__).parent / "js" / "dom_shim.js"
needs_node = pytest.mark.skipif(NODE is None, reason="Node.js (`node`) is not on PATH: the HTML page's script "
                                                     "is run with node against tests/js/dom_shim.js")
BLANK = "#fafafa"  # the page's background for cells above the diagonal (future keys)


def run_page(tmp_path: Path, page: str, actions: list[dict]) -> dict:
    """Write ``page``, run its script with the DOM shim performing ``actions``; the shim's report."""
    page_path, actions_path = tmp_path / "attention.html", tmp_path / "actions.json"
    page_path.write_text(page, encoding="utf-8")
    actions_path.write_text(json.dumps(actions), encoding="utf-8")
    result = subprocess.run([NODE, str(DOM_SHIM), str(page_path), str(actions_path)],
                            capture_output=True, text=True, encoding="utf-8", timeout=30)
    assert result.returncode == 0, f"the page's script failed under node:\n{result.stderr}"
    return json.loads(result.stdout)


def shown(token: str) -> str:
    """A token as the page shows it: spaces as '␣', newlines, carriage returns and tabs as backslash escapes."""
    return token.replace(" ", "\u2423").replace("\n", "\\n").replace("\r", "\\r").replace("\t", "\\t")


def page_weights(maps: AttentionMaps, layer: int, head: int) -> list[list[float]]:
    """One head's ``(T, T)`` weights as the page holds them: rounded to 4 decimals (its JSON)."""
    return [[round(v, 4) for v in row] for row in maps.head(layer, head).tolist()]


def js_round(x: float) -> int:
    """JavaScript's ``Math.round`` (halves go up) for the non-negative numbers the page rounds."""
    return int(Decimal(x).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def js_fixed(x: float, digits: int) -> str:
    """JavaScript's ``x.toFixed(digits)`` for ``x >= 0``: exact value, halves go up (0.3125 → '0.313')."""
    return str(Decimal(x).quantize(Decimal(1).scaleb(-digits), rounding=ROUND_HALF_UP))


def colour(w: float) -> str:
    """The page's shade for weight ``w``."""
    return f"hsl(215, 80%, {js_round(100 - 55 * w)}%)"


def first_max(row: list[float], q: int) -> int:
    """The key ``0..q`` with the largest weight; the first one on ties, as the page's loop picks."""
    best = 0
    for k in range(1, q + 1):
        if row[k] > row[best]:
            best = k
    return best


def info_text(tokens: list[str], row: list[float], q: int) -> str:
    """The line the page writes under the tokens while token ``q`` is hovered."""
    b = first_max(row, q)
    return (f"token {q} \u201c{shown(tokens[q])}\u201d attends most to token {b} "
            f"\u201c{shown(tokens[b])}\u201d ({js_fixed(row[b], 3)})")


def check_table(state: dict, maps: AttentionMaps, layer: int, head: int) -> None:
    """The map shows head ``head`` of layer ``layer``: a header row and one row of T cells per query."""
    tokens, w, t = maps.tokens, page_weights(maps, layer, head), len(maps.tokens)
    rows = state["rows"]
    assert len(rows) == t + 1
    header = rows[0]["cells"]
    assert [c["tag"] for c in header] == ["th"] * (t + 1)
    assert [c["text"] for c in header] == [""] + [shown(x) for x in tokens]
    assert all(c["className"] == "col" for c in header[1:])
    for q, row in enumerate(rows[1:]):
        label, cells = row["cells"][0], row["cells"][1:]
        assert label["tag"] == "th" and label["text"] == shown(tokens[q])
        assert [c["tag"] for c in cells] == ["td"] * t
        assert [c["background"] for c in cells] == [colour(v) if k <= q else BLANK for k, v in enumerate(w[q])]
        assert [c["title"] for c in cells] == [f"{shown(tokens[q])} \u2192 {shown(x)}: {js_fixed(v, 4)}"
                                               for x, v in zip(tokens, w[q])]


def check_focused(state: dict, maps: AttentionMaps, layer: int, head: int, q: int) -> None:
    """Token ``q`` is hovered: it alone is the query, keys ``0..q`` are shaded by its row, its row is lit."""
    w = page_weights(maps, layer, head)[q]
    spans = state["tokens"]
    assert [s["className"] for s in spans] == ["tok query" if k == q else "tok" for k in range(len(spans))]
    assert [s["background"] for s in spans] == [colour(w[k]) if k <= q else "" for k in range(len(spans))]
    assert [s["color"] for s in spans] == ["#fff" if k <= q and w[k] > 0.6 else "" for k in range(len(spans))]
    assert state["info"] == info_text(maps.tokens, w, q)
    assert [r["className"] for r in state["rows"]] == ["hl" if i == q + 1 else "" for i in range(len(state["rows"]))]


def check_cleared(state: dict) -> None:
    """Nothing is hovered: no query, no shading, no info line, no lit row."""
    assert all(s["className"] == "tok" and s["background"] == "" and s["color"] == "" for s in state["tokens"])
    assert state["info"] == ""
    assert all(r["className"] == "" for r in state["rows"])


def tiny_gpt_maps(prompt: str) -> AttentionMaps:
    """Maps of a random 2-layer, 4-head character GPT whose weights are spread wide (so heads differ)."""
    from llmscratch.tools.inspect import attention_maps
    from llmscratch.nn.model import GPT, GPTConfig
    from llmscratch.data.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefgh \n\t")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("test", vocab_size=tok.vocab_size)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.6)
    return attention_maps(model, tok, prompt)


def causal_softmax(*shape: int) -> torch.Tensor:
    """Random causal attention weights of shape ``(..., T, T)``: rows sum to 1 over keys ``0..i``."""
    t = shape[-1]
    future = torch.ones(t, t, dtype=torch.bool).triu(1)
    return torch.softmax(torch.randn(*shape).masked_fill(future, float("-inf")), -1)


@needs_node
def test_html_page_script_draws_and_follows_the_mouse(tmp_path):
    maps = tiny_gpt_maps("bad\tcafe\nage fed")
    n_l, n_h, t = maps.n_layers, maps.n_heads, len(maps.tokens)
    assert n_l >= 2 and n_h >= 2
    layer, head = 1, 1
    actions = [{"event": "change", "target": "layer", "value": layer},
               {"event": "change", "target": "head", "value": head}]
    for q in range(t):  # hover every token in turn, then leave it
        actions += [{"event": "mouseenter", "target": "token", "index": q},
                    {"event": "mouseleave", "target": "token", "index": q}]
    actions += [{"event": "mouseenter", "target": "row", "index": 5}]  # a map row focuses its query (4)
    report = run_page(tmp_path, attention_html(maps, "tiny"), actions)
    assert [(s["id"], s["type"]) for s in report["scripts"]] == [("attention-data", "application/json"), (None, None)]
    states = report["states"]
    assert len(states) == len(actions) + 1

    loaded = states[0]  # as opened: layer 0, head 0, nothing hovered
    assert loaded["layer"] == {"value": "0", "options": [{"value": str(i), "text": str(i)} for i in range(n_l)]}
    assert loaded["head"] == {"value": "0", "options": [{"value": str(i), "text": str(i)} for i in range(n_h)]}
    assert [s["text"] for s in loaded["tokens"]] == [shown(x) for x in maps.tokens]
    texts = [s["text"] for s in loaded["tokens"]]
    assert (texts[3], texts[8], texts[12]) == ("\\t", "\\n", "\u2423")  # tab, newline, space
    check_cleared(loaded)
    check_table(loaded, maps, 0, 0)

    assert states[1]["layer"]["value"] == "1" and states[1]["head"]["value"] == "0"
    check_table(states[1], maps, 1, 0)  # a change redraws the map
    assert states[2]["head"]["value"] == "1"
    check_table(states[2], maps, layer, head)
    assert states[2]["rows"][2]["cells"][3]["background"] == BLANK  # query 1, key 2: the future

    bests = set()
    for q in range(t):
        hovered, left = states[3 + 2 * q], states[4 + 2 * q]
        check_focused(hovered, maps, layer, head, q)
        check_table(hovered, maps, layer, head)  # hovering only lights a row
        check_cleared(left)
        bests.add(first_max(page_weights(maps, layer, head)[q], q))
    assert len(bests) > 2  # the hovered tokens attend most to different keys, so the argmax is really tested
    check_focused(states[-1], maps, layer, head, 4)


@needs_node
def test_html_page_script_picks_the_first_of_tied_weights(tmp_path):
    """Ties in the page's rounded JSON go to the earliest key, even where the unrounded weights differ."""
    torch.manual_seed(1)
    weights = [causal_softmax(1, 2, 4, 4) for _ in range(2)]
    weights[1][0, 1] = torch.tensor([
        [1.0, 0.0, 0.0, 0.0],
        [0.5, 0.5, 0.0, 0.0],  # an exact tie: token 0
        [0.2, 0.39996, 0.40004, 0.0],  # both round to 0.4: token 1, not the unrounded argmax 2
        [0.3125, 0.3125, 0.3125, 0.0625],  # 0.3125 shows as "0.313" (toFixed rounds halves up)
    ])
    maps = AttentionMaps(list("abcd"), weights)
    actions = [{"event": "change", "target": "layer", "value": 1}, {"event": "change", "target": "head", "value": 1}]
    actions += [{"event": "mouseenter", "target": "token", "index": q} for q in range(4)]
    actions.append({"event": "change", "target": "head", "value": 0})  # from the keyboard, token 3 still hovered
    states = run_page(tmp_path, attention_html(maps), actions)
    states, switched = states["states"][:-1], states["states"][-1]
    check_cleared(switched)  # nothing stays lit from the old head
    check_table(switched, maps, 1, 0)
    infos = [s["info"] for s in states[3:]]
    assert infos == ["token 0 \u201ca\u201d attends most to token 0 \u201ca\u201d (1.000)",
                     "token 1 \u201cb\u201d attends most to token 0 \u201ca\u201d (0.500)",
                     "token 2 \u201cc\u201d attends most to token 1 \u201cb\u201d (0.400)",
                     "token 3 \u201cd\u201d attends most to token 0 \u201ca\u201d (0.313)"]
    assert infos == [info_text(maps.tokens, page_weights(maps, 1, 1)[q], q) for q in range(4)]
    assert maps.head(1, 1)[2].argmax().item() == 2  # so rounding, not the raw weights, decides
    for q, state in enumerate(states[3:]):
        check_focused(state, maps, 1, 1, q)


@needs_node
def test_html_page_script_shows_tokens_that_look_like_html_exactly(tmp_path):
    """Tokens holding </script>, <!--, quotes and entities reach the script intact and are shown as text."""
    tokens = ["</script>", "<!--", 'say "hi"', "it's", "</SCRIPT >", "-->", "&amp;", "a\\b", "\u2028", " x\n",
              "<script>", "__DATA__", "\r\n"]
    torch.manual_seed(2)
    maps = AttentionMaps(tokens, [causal_softmax(1, 2, len(tokens), len(tokens)) for _ in range(2)])
    title = '</script><!-- "quoted" & more __DATA__ __TITLE__'
    page = attention_html(maps, title=title)
    assert page.count(f"<title>{html.escape(title)}</title>") == 1  # placeholders in the title stay text
    q = 9
    actions = [{"event": "change", "target": "head", "value": 1},
               {"event": "mouseenter", "target": "token", "index": q}]
    report = run_page(tmp_path, page, actions)
    assert [s["id"] for s in report["scripts"]] == ["attention-data", None]  # no token ended a script early
    hovered = report["states"][-1]
    assert [s["text"] for s in hovered["tokens"]] == [shown(x) for x in tokens]
    assert hovered["tokens"][0]["text"] == "</script>" and hovered["tokens"][2]["text"] == 'say\u2423"hi"'
    check_table(hovered, maps, 0, 1)
    check_focused(hovered, maps, 0, 1, q)


@needs_node
@pytest.mark.parametrize("breakage", ["syntax error", "unescaped data", "misspelt property"])
def test_dom_shim_fails_on_a_broken_page(tmp_path, breakage):
    """The harness is not a rubber stamp: a broken script or page makes node fail."""
    torch.manual_seed(3)
    maps = AttentionMaps(["</script>", "<!--", "b"], [causal_softmax(1, 2, 3, 3) for _ in range(2)])
    page = attention_html(maps)
    broken = {
        "syntax error": page.replace("function focus(q) {", "function focus(q) {{", 1),
        "unescaped data": page.replace("\\u003c", "<"),
        # Only runs on hover: a listener's error must fail the run too.
        "misspelt property": page.replace("info.textContent = \"token", "info.textContnt = \"token", 1),
    }[breakage]
    assert broken != page
    (tmp_path / "page.html").write_text(broken, encoding="utf-8")
    (tmp_path / "actions.json").write_text(json.dumps([{"event": "mouseenter", "target": "token", "index": 1}]))
    result = subprocess.run([NODE, str(DOM_SHIM), str(tmp_path / "page.html"), str(tmp_path / "actions.json")],
                            capture_output=True, text=True, timeout=30)
    assert result.returncode == 1 and result.stdout == ""
    assert result.stderr.strip()
