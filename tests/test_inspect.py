"""Tests for the shape trace (llmscratch.tools.inspect.explain and `llmscratch explain`) and the attention page, in a browser."""

from __future__ import annotations

import html
import io
import math
import os
import re
import shutil
import subprocess
import sys
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Optional

import pytest
import torch

from llmscratch.nn.attention import MultiHeadAttention
from llmscratch.errors import ConfigError, LLMScratchError
from llmscratch.tools.inspect import (
    BOOK_SENTENCE,
    BOOK_VECTORS,
    MAP_TOKENS,
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


HANG = 1800  # seconds: a subprocess's timeout only guards against a hang; a slow shared machine must not fail a test


def run_explain(*args, **kwargs) -> tuple[list[TraceStep], str]:
    """``explain``'s steps and printout, 100 columns wide unless ``width`` says otherwise."""
    buf = io.StringIO()
    steps = explain(*args, out=buf, **{"width": 100, **kwargs})
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
    # Q/K/V heads and context (72 elements) print their values, and so do the four (B, H, T, T)
    # steps: 216 elements is over the limit of 144, but 6 tokens make maps small enough to read.
    assert text.count("[batch 1, head 2]") == 8
    assert run_explain(BOOK_SENTENCE, batch=2, heads=3, d_out=6, max_values=1000)[1].count("[batch 1, head 2]") == 8
    assert run_explain(BOOK_SENTENCE, batch=2, heads=3, d_out=6, max_values=0)[1].count("[batch 1, head 2]") == 0


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
    assert "values not shown (shapes only)" in text


def test_maps_of_more_than_map_tokens_follow_the_element_cap():
    words = " ".join(f"w{i}" for i in range(MAP_TOKENS + 1))  # 17 tokens: a 17×17 map per head
    steps, text = run_explain(words, heads=2, d_out=4)
    assert by_name(steps)["attention weights"].shape == (1, 2, 17, 17)
    assert text.count("[batch 0, head 1]") == 4  # Q/K/V heads and context (68 elements) only
    assert f"maps are printed whole up to {MAP_TOKENS} tokens; this sentence has 17" in " ".join(text.split())
    assert run_explain(words, heads=2, d_out=4, max_values=578)[1].count("[batch 0, head 1]") == 8


# --------------------------------------------------------------------------- the README's examples, read whole


def step_section(text: str, name: str) -> list[str]:
    """The lines printed for step ``name``: its row, the meaning's continuation lines and its tables."""
    lines = text.splitlines()
    starts = [i for i, ln in enumerate(lines) if re.match(r"\s*\d+  \S", ln)]
    for here, following in zip(starts, starts[1:] + [len(lines)]):
        if re.match(rf"\s*\d+  {re.escape(name)}  ", lines[here]):
            return lines[here:following]
    raise AssertionError(f"no step {name!r} in:\n{text}")


def printed_maps(section: list[str], t: int) -> dict[tuple[int, int], list[list[str]]]:
    """Each ``[batch b, head h]`` table of a step's section: T rows of (label, value, ...) fields."""
    maps = {}
    for i, line in enumerate(section):
        found = re.fullmatch(r"\s*\[batch (\d+), head (\d+)\]", line)
        if found:
            rows = [ln.split() for ln in section[i + 2: i + 2 + t]]  # after the column labels
            maps[int(found.group(1)), int(found.group(2))] = rows
    return maps


def expected_rows(matrix: torch.Tensor, labels: list[str]) -> list[list[str]]:
    """How a (T, T) matrix reads in the printout: a label, then each value to 4 decimals."""
    def number(v: float) -> str:
        return "-inf" if v == float("-inf") else f"{v:.4f}".replace("-0.0000", "0.0000")
    return [[label, *(number(v) for v in row)] for label, row in zip(labels, matrix.double().tolist())]


def check_maps_printed(text: str, steps: list[TraceStep], tokens: list[list[str]], width: int) -> None:
    """Every head's T×T scores, mask and weights are printed whole, and no line is wider than ``width``."""
    s = by_name(steps)
    for name in ("scores Q·Kᵀ", "scaled scores", "causal mask", "attention weights"):
        b, h, t, _ = s[name].shape
        maps = printed_maps(step_section(text, name), t)
        assert sorted(maps) == [(i, j) for i in range(b) for j in range(h)], name
        for (i, j), rows in maps.items():
            labels = [x.replace(" ", "\u2423") for x in tokens[i]]
            assert rows == expected_rows(s[name].tensor[i, j], labels), (name, i, j)
    too_wide = [ln for ln in text.splitlines() if len(ln) > width]
    assert not too_wide, "\n".join(too_wide)


def test_the_readme_batch_example_prints_every_heads_weights_within_80_columns():
    result = _cli("Your journey starts with one step", "--batch", "2", "--heads", "3", "--d-out", "6", columns=80)
    assert result.returncode == 0, result.stderr
    steps = explain(BOOK_SENTENCE, batch=2, heads=3, d_out=6, out=None)
    tokens, _ = trace_batch(BOOK_SENTENCE, 2)
    check_maps_printed(result.stdout, steps, tokens, 80)


def test_explain_run_prints_every_heads_weights_within_80_columns(tmp_path):
    from llmscratch.tools.inspect import trace_run

    tiny_char_run(tmp_path / "run")
    sentence = "bad cafe"  # 8 tokens; 4 heads: 256 weights, over the element cap of 144
    result = subprocess.run([sys.executable, "-m", "llmscratch", "explain", "--run", "run", sentence],
                            capture_output=True, text=True, timeout=HANG, cwd=tmp_path, env=_env(80))
    assert result.returncode == 0, result.stderr
    labels, steps = trace_run(tmp_path / "run", sentence)
    assert by_name(steps)["attention weights"].shape == (1, 4, 8, 8)
    check_maps_printed(result.stdout, steps, labels, 80)
    assert "gives the same output" in result.stdout


@pytest.mark.parametrize("width", [70, 80, 100, 132])
def test_meanings_wrap_within_their_column(width):
    _, text = run_explain(BOOK_SENTENCE, batch=2, heads=3, d_out=12, max_values=1000, width=width)
    lines = text.splitlines()
    assert max(len(ln) for ln in lines) <= width
    title = next(i for i, ln in enumerate(lines) if ln.split()[:3] == ["#", "step", "shape"])
    column = lines[title].index("meaning")
    row = next(i for i, ln in enumerate(lines) if "causal mask" in ln)
    meaning = [lines[row][column:]]
    for ln in lines[row + 1:]:  # the continuation lines start in the meaning column, blank before it
        if ln[:column].strip() or not ln[column:].strip():
            break
        meaning.append(ln[column:])
    assert " ".join(meaning) == by_name(explain(out=None))["causal mask"].meaning
    assert (len(meaning) > 1) == (width < 132)  # wrapped only where it would not fit


def test_wide_tables_come_in_blocks_of_columns():
    _, text = run_explain(BOOK_SENTENCE, heads=3, d_out=12, width=80)  # W_q: 12 columns of 9 = 108 wide
    section = step_section(text, "W_q")
    assert max(len(ln) for ln in section) <= 80
    headers = [ln.split() for ln in section if ln.strip().startswith("d_out[")]
    assert len(headers) == 2 and sum(headers, []) == [f"d_out[{i}]" for i in range(12)]
    w_q = by_name(explain(heads=3, d_out=12, out=None))["W_q"].tensor
    rows = [ln.split() for ln in section if ln.strip().startswith("d_in[")]
    assert len(rows) == 6  # 3 rows in each block
    for i in range(3):
        assert rows[i][1:] + rows[i + 3][1:] == [f"{v:.4f}" for v in w_q[i].double().tolist()]


def test_a_pipe_gets_100_columns_and_columns_sets_the_width():
    piped = _cli("--batch", "2", "--heads", "3", "--d-out", "6", columns=None)
    assert piped.returncode == 0, piped.stderr
    widths = [len(ln) for ln in piped.stdout.splitlines()]
    assert 80 < max(widths) <= 100
    narrow = _cli("--batch", "2", "--heads", "3", "--d-out", "6", columns=72)
    assert max(len(ln) for ln in narrow.stdout.splitlines()) <= 72


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
        (dict(heads=4, d_out=8, kv_heads=3), r"--kv-heads \(3\) must divide --heads \(4\).*try --kv-heads 1, 2 or 4$"),
        (dict(heads=2, d_out=4, kv_heads=0), r"--kv-heads \(0\) must divide --heads \(2\).*try --kv-heads 1 or 2$"),
        (dict(heads=2, d_out=4, kv_heads=4), r"--kv-heads \(4\) must divide --heads \(2\)"),
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


def _env(columns: Optional[int]) -> dict[str, str]:
    """The environment with ``COLUMNS`` set to ``columns``, or without it (``None``: a plain pipe)."""
    env = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    return env if columns is None else {**env, "COLUMNS": str(columns)}


def _cli(*args: str, columns: Optional[int] = 100) -> subprocess.CompletedProcess:
    """``llmscratch explain ARGS`` in a subprocess whose output is a pipe, ``COLUMNS`` wide."""
    return subprocess.run(
        [sys.executable, "-m", "llmscratch", "explain", *args],
        capture_output=True, text=True, timeout=HANG, env=_env(columns),
    )


def tiny_char_run(path: Path, **config) -> Path:
    """A saved run of a random 2-layer, 4-head character GPT over "abcdefgh "."""
    from llmscratch.store.checkpoint import save_run
    from llmscratch.nn.model import GPT, GPTConfig
    from llmscratch.data.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefgh ")
    torch.manual_seed(0)
    save_run(path, GPT(GPTConfig.from_preset("test", vocab_size=tok.vocab_size, **config)), tokenizer=tok)
    return path


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
    for option in ("--batch", "--heads", "--kv-heads", "--d-out", "--seed", "--no-scale", "--max-values"):
        assert option in result.stdout
    assert f"at most {MAP_TOKENS} tokens" in " ".join(result.stdout.split())  # --max-values says what it caps


# --------------------------------------------------------------------------- explain --kv-heads (grouped-query attention)


@pytest.mark.parametrize("batch, heads, kv_heads, d_out", [(1, 4, 2, 8), (2, 2, 1, 4), (1, 6, 3, 12), (1, 3, 1, 3)])
def test_grouped_trace_equals_the_modules_forward_and_multi_head_attention_with_shared_weights(
        batch, heads, kv_heads, d_out):
    steps, text = run_explain(BOOK_SENTENCE, batch=batch, heads=heads, kv_heads=kv_heads, d_out=d_out)
    _, x = trace_batch(BOOK_SENTENCE, batch)
    module = build_traced_attention(d_out, heads, x.shape[1], 123, True, kv_heads)
    d, groups, t = d_out // heads, heads // kv_heads, x.shape[1]
    s = by_name(steps)
    with torch.no_grad():
        expected, weights = module(x, need_weights=True)
        # The same attention as multi-head attention whose K/V weights repeat each shared head's rows.
        full = MultiHeadAttention(3, d_out, t, 0.0, heads).eval()
        state = module.state_dict()
        for name in ("W_key.weight", "W_value.weight"):
            state[name] = state[name].view(kv_heads, d, 3).repeat_interleave(groups, dim=0).reshape(d_out, 3)
        full.load_state_dict(state)
        torch.testing.assert_close(full(x), expected)
    torch.testing.assert_close(s["output"].tensor, expected)
    torch.testing.assert_close(s["attention weights"].tensor, weights)
    assert s["W_k"].shape == s["W_v"].shape == (3, kv_heads * d) and s["W_k"].dims == ("d_in", "d_kv")
    assert s["K = x·W_k"].shape == (batch, t, kv_heads * d)
    assert s["K heads"].shape == s["V heads"].shape == (batch, kv_heads, t, d)
    assert s["K heads"].dims == ("B", "H_kv", "T", "d")
    assert s["K per query head"].shape == s["Q heads"].shape == (batch, heads, t, d)
    for h in range(heads):  # query head h reads key/value head h // groups
        torch.testing.assert_close(s["K per query head"].tensor[:, h], s["K heads"].tensor[:, h // groups])
        torch.testing.assert_close(s["V per query head"].tensor[:, h], s["V heads"].tensor[:, h // groups])
    flat = " ".join(text.split())
    assert f"H_kv = key/value heads ({kv_heads})" in flat and f"num_kv_heads={kv_heads}" in flat
    assert f"(B={batch}, H_kv={kv_heads}, T={t}, d={d})" in flat
    assert (f"KV cache per token: 2 · layers · H_kv · d = 2 · 1 · {kv_heads} · {d} = {2 * kv_heads * d} values"
            in flat)
    assert f"against 2 · layers · H · d = 2 · 1 · {heads} · {d} = {2 * heads * d} for multi-head attention: " \
           f"{groups}× smaller" in flat
    assert ("shared by all H" if kv_heads == 1 else f"each shared by a group of H / H_kv = {groups} query heads") in flat
    assert "check: MultiHeadAttention.forward(x) gives the same output" in flat


def test_kv_heads_equal_to_heads_is_todays_trace():
    _, plain = run_explain(BOOK_SENTENCE, heads=2, d_out=4)
    steps, same = run_explain(BOOK_SENTENCE, heads=2, d_out=4, kv_heads=2)
    assert same == plain
    assert [s.name for s in steps] == STEP_NAMES
    assert "KV cache" not in plain and "H_kv" not in plain


def test_cli_kv_heads_prints_the_grouped_trace_and_refuses_a_count_that_does_not_divide():
    result = _cli("--heads", "4", "--d-out", "8", "--kv-heads", "2", "--max-values", "0")
    assert result.returncode == 0, result.stderr
    assert "K per query head" in result.stdout and "2× smaller" in " ".join(result.stdout.split())
    bad = _cli("--heads", "4", "--d-out", "8", "--kv-heads", "3")
    assert bad.returncode == 2
    assert "--kv-heads (3) must divide --heads (4)" in bad.stderr and "Traceback" not in bad.stderr


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
    tiny_char_run(tmp_path)
    r = subprocess.run([sys.executable, "-m", "llmscratch", "explain", "--run", str(tmp_path), "bad cafe"],
                       capture_output=True, text=True, timeout=HANG)
    assert r.returncode == 0, r.stderr
    assert "attention weights" in r.stdout
    check = re.search(r"check: the model's own block-0 attention gives the same output \(max \|difference\| (\S+)\)",
                      " ".join(r.stdout.split()))  # however the terminal's width wrapped it
    assert check and float(check.group(1)) < 1e-5, r.stdout[-500:]
    bad = subprocess.run([sys.executable, "-m", "llmscratch", "explain", "--run", str(tmp_path), "xyz"],
                         capture_output=True, text=True, timeout=HANG)
    assert bad.returncode == 2 and "not in the vocabulary" in bad.stderr
    toy = subprocess.run([sys.executable, "-m", "llmscratch", "explain", "--run", str(tmp_path), "bad", "--heads", "3",
                          "--no-scale"], capture_output=True, text=True, timeout=HANG)
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


MODERN_RUNS = {
    "llama (GQA, RMSNorm, SwiGLU, RoPE)": dict(),
    "qwen3 (QK-norm, wide heads, one KV head)": dict(qk_norm=True, head_size=16, n_kv_heads=1),
    "llama 3 RoPE scaling": dict(rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                   high_freq_factor=4.0, original_max_position_embeddings=4)),
    "qwen2 (qkv biases, MHA)": dict(qkv_bias=True, n_kv_heads=None),
    "GQA with ALiBi and LayerNorm": dict(pos_emb="alibi", norm="layernorm", activation="gelu", bias=True),
    "GQA without positions, QK-norm": dict(pos_emb="none", qk_norm=True),
}


def modern_char_run(path: Path, **config) -> Path:
    """A saved run of a random ``test-llama`` character GPT (2 layers, 4 heads over 2 KV heads) over "abcdefgh "."""
    from llmscratch.store.checkpoint import save_run
    from llmscratch.nn.model import GPT, GPTConfig
    from llmscratch.data.tokenizer import CharTokenizer

    tok = CharTokenizer.from_text("abcdefgh ")
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("test-llama", vocab_size=tok.vocab_size, **config)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # far from the init (norm weights too), so every step matters
    save_run(path, model, tokenizer=tok)
    return path


@pytest.mark.parametrize("config", MODERN_RUNS.values(), ids=MODERN_RUNS.keys())
def test_trace_run_of_modern_models_reads_the_model_and_shows_shared_kv_heads(tmp_path, config):
    from llmscratch.store.checkpoint import load_run
    from llmscratch.tools.inspect import explain_run, trace_run

    model, tok, _ = load_run(modern_char_run(tmp_path, **config))
    cfg, attn = model.cfg, model.blocks[0].attn
    h, h_kv, d = cfg.n_heads, cfg.kv_heads, cfg.head_dim
    text = "bad cafe"
    captured = {}
    attn.register_forward_pre_hook(lambda m, args: captured.update(x=args[0]))  # update gives None: args unchanged
    attn.register_forward_hook(lambda m, args, out: captured.update(out=out))
    with torch.no_grad():
        model(torch.tensor([tok.encode(text)]))
    labels, steps = trace_run(tmp_path, text)
    s, t = by_name(steps), len(text)
    torch.testing.assert_close(s["output"].tensor, captured["out"])
    torch.testing.assert_close(s["norm1(x)"].tensor, captured["x"])
    assert s["K heads"].shape == s["V heads"].shape == (1, h_kv, t, d)
    assert s["Q heads"].shape == s["context"].shape == (1, h, t, d)
    assert s["attention weights"].shape == (1, h, t, t)
    assert s["merged heads"].shape == (1, t, h * d)
    torch.testing.assert_close(s["causal mask"].tensor.softmax(-1), s["attention weights"].tensor)
    # The q and k the scores use are the attention's own project(): after QK-norm and RoPE where there are.
    with torch.no_grad():
        q_plain, k_plain, v = attn.project(captured["x"])  # without RoPE
        rope = None
        if cfg.pos_emb == "rope":
            from llmscratch.nn.positions import rope_cos_sin

            rope = rope_cos_sin(torch.arange(t), d, cfg.rope_base, cfg.rope_scaling)
        q, k, _ = attn.project(captured["x"], rope)
    last_q = "RoPE(Q)" if rope is not None else "q_norm(Q)" if cfg.qk_norm else "Q heads"
    last_k = "RoPE(K)" if rope is not None else "k_norm(K)" if cfg.qk_norm else "K heads"
    torch.testing.assert_close(s[last_q].tensor, q)
    torch.testing.assert_close(s[last_k].tensor, k)
    torch.testing.assert_close(s["V heads"].tensor, v)
    if cfg.qk_norm:
        torch.testing.assert_close(s["q_norm(Q)"].tensor, q_plain)
        torch.testing.assert_close(s["k_norm(K)"].tensor, k_plain)
    names = [step.name for step in steps]
    assert ("K per query head" in names) == (h_kv < h) == ("V per query head" in names)
    assert ("q_norm(Q)" in names) == cfg.qk_norm
    out = io.StringIO()
    explain_run(tmp_path, text, out=out, width=100)
    flat = " ".join(out.getvalue().split())
    assert ("RMSNorm" in flat) == (cfg.norm == "rmsnorm")
    check = re.search(r"check: the model's own block-0 attention gives the same output \(max \|difference\| (\S+)\)", flat)
    assert check and float(check.group(1)) < 1e-5, flat[-400:]
    if h_kv < h:
        assert f"H_kv = key/value heads ({h_kv})" in flat
        assert (f"KV cache per token: 2 · layers · H_kv · d = 2 · {cfg.n_layers} · {h_kv} · {d} = "
                f"{2 * cfg.n_layers * h_kv * d} values") in flat
        assert f"for multi-head attention: {h // h_kv}× smaller" in flat
        assert f"(B=1, H_kv={h_kv}, T={t}, d={d})" in flat
    else:
        assert "KV cache" not in flat


def test_the_run_check_catches_scores_that_do_not_give_the_models_weights(tmp_path, monkeypatch):
    import llmscratch.tools.inspect as inspect_module

    modern_char_run(tmp_path)
    monkeypatch.setattr(inspect_module, "resolve_scale", lambda scale, d: 1.0)  # the printed scores, unscaled
    out = io.StringIO()
    inspect_module.explain_run(tmp_path, "bad cafe", out=out, width=100)
    assert "gives a DIFFERENT output" in out.getvalue()


def test_explain_run_and_attention_name_their_own_input_when_the_run_has_no_tokenizer(tmp_path, capsys):
    from llmscratch.cli import main
    from llmscratch.store.checkpoint import save_model
    from llmscratch.nn.model import GPT, GPTConfig

    save_model(tmp_path / "bare", GPT(GPTConfig.from_preset("test-llama")))
    assert main(["explain", "--run", str(tmp_path / "bare"), "bad"]) == 2
    assert "has no tokenizer files" in (err := capsys.readouterr().err)
    assert "so the sentence to trace cannot be turned into tokens" in err
    assert main(["attention", str(tmp_path / "bare"), "--prompt", "bad", "--out", str(tmp_path / "maps")]) == 2
    assert "so the prompt to draw cannot be turned into tokens" in capsys.readouterr().err
    assert not (tmp_path / "maps").exists()


# --------------------------------------------------------------------------- the HTML page, in a real browser
#
# attention_html writes a page whose inline JavaScript draws the map and reacts to the mouse
# and the keyboard. These tests open it from a file:// URL in headless Chromium, driven by
# Selenium: they act as a user does (select a layer and head, hover, click, press keys, resize
# the window), read back what the page shows, and compare it with the same numbers computed
# here from maps.weights. Without chromium and chromedriver (Debian: `apt-get install chromium
# chromium-driver`) or the selenium package they are skipped, saying which is missing.
#
# No test sleeps. Input goes through the DevTools protocol, which returns once the page has
# handled the event; where the browser itself must catch up (hover state, a resize, a frame),
# the test waits for that condition, with a timeout (HANG) that only guards against a hang.

CHROMIUM = next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)
CHROMEDRIVER = shutil.which("chromedriver")
CHROMIUM_FLAGS = (  # no network here: without these Chromium waits on connections it cannot make
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync", "--window-size=1000,900",
)
PINNED_NOTE = " \u2014 pinned: click it again or press Esc to let it go"

# Errors of the page's scripts, collected from before its first line runs.
COLLECT_ERRORS = "window.__errors = []; window.addEventListener('error', function (e) { window.__errors.push(String(e.message)); });"
# Everything the tests read back from the page, as plain JSON.
SNAPSHOT = """
const look = (el) => ({text: el.textContent, className: el.className, background: el.style.backgroundColor,
                       color: el.style.color});
const select = (id) => { const s = document.getElementById(id);
  return {value: s.value, options: Array.from(s.options, (o) => ({value: o.value, text: o.textContent}))}; };
const spans = Array.from(document.getElementById("tokens").children);
return {
  errors: window.__errors, ready: document.body.getAttribute("data-ready"),
  layer: select("layer"), head: select("head"),
  tokens: spans.map((s) => ({...look(s), pressed: s.getAttribute("aria-pressed"), tabIndex: s.tabIndex})),
  focused: spans.indexOf(document.activeElement),
  info: document.getElementById("info").textContent,
  rows: Array.from(document.getElementById("map").rows, (r) => ({className: r.className,
    cells: Array.from(r.cells, (c) => ({tag: c.tagName.toLowerCase(), title: c.title, ...look(c)}))})),
};
"""
NEXT_FRAME = """const done = arguments[arguments.length - 1];
requestAnimationFrame(() => requestAnimationFrame(() => done()));"""


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium for the module's tests, with a fresh profile; its window is 1000×900."""
    if CHROMIUM is None or CHROMEDRIVER is None:
        missing = " and ".join(n for n, p in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if p is None)
        pytest.skip(f"{missing} not on PATH: the HTML page is tested in headless Chromium "
                    "(Debian: apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="the selenium package drives the browser "
                                                                 "(pip install -e '.[test]')")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.add_experimental_option("browserStartupTimeout", HANG * 1000)  # ms; a slow machine starts it slowly
    driver = webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(HANG)
        driver.set_script_timeout(HANG)
        driver.execute_cdp_cmd("Page.addScriptToEvaluateOnNewDocument", {"source": COLLECT_ERRORS})
        yield driver
    finally:
        driver.quit()


def wait_for(browser, condition, what: str):
    """Wait until ``condition(browser)`` is true (it is the browser that must catch up, not the page)."""
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, HANG).until(condition, message=f"waited {HANG} s for {what}")


def open_file(browser, path: Path, *, errors_allowed: bool = False) -> dict:
    """Open the page at ``path`` from its file:// URL, the mouse on its title; its first state."""
    browser.get(path.as_uri())
    wait_for(browser, lambda b: b.execute_script("return document.readyState") == "complete", "the page to load")
    leave(browser)  # wherever the last test left the mouse, it is on no token now
    return state(browser, errors_allowed=errors_allowed)


def open_page(browser, tmp_path: Path, page: str, name: str = "attention.html", *, errors_allowed: bool = False) -> dict:
    """Write ``page`` to a file in ``tmp_path``, open it (:func:`open_file`) and return its first state."""
    path = tmp_path / name
    path.write_text(page, encoding="utf-8")
    return open_file(browser, path, errors_allowed=errors_allowed)


def state(browser, *, errors_allowed: bool = False) -> dict:
    """What the page shows now, once the browser has drawn a frame since the last action."""
    browser.execute_async_script(NEXT_FRAME)
    now = browser.execute_script(SNAPSHOT)
    if not errors_allowed:
        assert now["errors"] == [], f"the page's script failed: {now['errors']}"
        assert now["ready"] == "1", "the page's script did not run to its end"
    return now


def element(browser, css: str, index: int = 0):
    from selenium.webdriver.common.by import By

    return browser.find_elements(By.CSS_SELECTOR, css)[index]


def hover(browser, target) -> None:
    """Move the mouse onto ``target`` (an element), as a user does."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).move_to_element(target).perform()
    wait_for(browser, lambda b: b.execute_script("return arguments[0].matches(':hover')", target), "the hover")


def leave(browser) -> None:
    """Move the mouse off the tokens and the map, onto the page's title."""
    hover(browser, element(browser, "h1"))


def press(browser, *keys: str) -> None:
    """Type ``keys`` into whatever has the keyboard focus."""
    from selenium.webdriver.common.action_chains import ActionChains

    ActionChains(browser).send_keys(*keys).perform()


def choose(browser, select_id: str, value: int) -> None:
    """Pick option ``value`` of a <select>, as a user does (it fires "change")."""
    from selenium.webdriver.support.ui import Select

    Select(element(browser, f"#{select_id}")).select_by_value(str(value))


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


def colour(w: float) -> tuple[int, int, int]:
    """The page's shade for weight ``w``, hsl(215, 80%, L%) with L = round(100 - 55 w), as 0..255 RGB."""
    import colorsys

    return tuple(round(255 * c) for c in colorsys.hls_to_rgb(215 / 360, js_round(100 - 55 * w) / 100, 0.8))


def rgb(css: str) -> Optional[tuple[int, int, int]]:
    """``rgb(r, g, b)`` as the browser writes a colour back, as numbers; ``None`` for no colour."""
    if css == "":
        return None
    found = re.fullmatch(r"rgb\((\d+), (\d+), (\d+)\)", css)
    assert found, css
    return tuple(int(x) for x in found.groups())


def same_colour(css: str, expected: Optional[tuple[int, int, int]]) -> bool:
    """Whether the browser's colour is ``expected``, within the 1/255 by which browsers round HSL."""
    got = rgb(css)
    return got == expected if got is None or expected is None else max(abs(a - b) for a, b in zip(got, expected)) <= 1


def first_max(row: list[float], q: int) -> int:
    """The key ``0..q`` with the largest weight; the first one on ties, as the page's loop picks."""
    best = 0
    for k in range(1, q + 1):
        if row[k] > row[best]:
            best = k
    return best


def info_text(tokens: list[str], row: list[float], q: int) -> str:
    """The line the page writes under the tokens while token ``q`` is the query."""
    b = first_max(row, q)
    return (f"token {q} \u201c{shown(tokens[q])}\u201d attends most to token {b} "
            f"\u201c{shown(tokens[b])}\u201d ({js_fixed(row[b], 3)})")


def check_table(state: dict, maps: AttentionMaps, layer: int, head: int) -> None:
    """The map shows head ``head`` of layer ``layer``: a header row and one row of T cells per query,
    each visible cell shaded by its weight, each masked (future) cell marked as such."""
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
        assert [c["className"] for c in cells] == ["" if k <= q else "masked" for k in range(t)]
        for k, (cell, v) in enumerate(zip(cells, w[q])):
            assert same_colour(cell["background"], colour(v) if k <= q else None), (q, k, cell, v)
        assert [c["title"] for c in cells] == [
            f"{shown(tokens[q])} \u2192 {shown(x)}: " + (js_fixed(v, 4) if k <= q else "masked (a future key)")
            for k, (x, v) in enumerate(zip(tokens, w[q]))]


def check_query(state: dict, maps: AttentionMaps, layer: int, head: int, q: int, pinned: Optional[int] = None) -> None:
    """Token ``q`` is the query shown (hovered, or pinned with nothing hovered) and ``pinned`` is pinned:
    keys ``0..q`` are shaded by its row, later tokens marked as the future, its row of the map lit."""
    w = page_weights(maps, layer, head)[q]
    spans = state["tokens"]
    for k, span in enumerate(spans):
        classes = {"tok"} | {name for name, on in (("query", k == q), ("pinned", k == pinned), ("future", k > q)) if on}
        assert set(span["className"].split()) == classes, (k, span)
        assert same_colour(span["background"], colour(w[k]) if k <= q else None), (k, span)
        assert span["color"] == ("rgb(255, 255, 255)" if k <= q and w[k] > 0.6 else ""), (k, span)
        assert span["pressed"] == ("true" if k == pinned else "false")
    assert state["info"] == info_text(maps.tokens, w, q) + (PINNED_NOTE if q == pinned else "")
    assert [r["className"] for r in state["rows"]] == ["hl" if i == q + 1 else "" for i in range(len(state["rows"]))]


def check_cleared(state: dict) -> None:
    """No query: no token shaded, marked or pinned, no info line, no lit row."""
    assert all(s["className"] == "tok" and s["background"] == "" and s["color"] == "" and s["pressed"] == "false"
               for s in state["tokens"])
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


def test_page_draws_each_head_and_follows_the_mouse(browser, tmp_path):
    maps = tiny_gpt_maps("bad\tcafe\nage fed")
    n_l, n_h, t = maps.n_layers, maps.n_heads, len(maps.tokens)
    assert n_l >= 2 and n_h >= 2
    loaded = open_page(browser, tmp_path, attention_html(maps, "tiny"))  # layer 0, head 0, nothing hovered
    scripts = browser.execute_script("return Array.from(document.scripts, (s) => [s.id || null, s.type || null])")
    assert scripts == [["attention-data", "application/json"], [None, None]]
    assert loaded["layer"] == {"value": "0", "options": [{"value": str(i), "text": str(i)} for i in range(n_l)]}
    assert loaded["head"] == {"value": "0", "options": [{"value": str(i), "text": str(i)} for i in range(n_h)]}
    texts = [s["text"] for s in loaded["tokens"]]
    assert texts == [shown(x) for x in maps.tokens]
    assert (texts[3], texts[8], texts[12]) == ("\\t", "\\n", "\u2423")  # tab, newline, space
    check_cleared(loaded)
    check_table(loaded, maps, 0, 0)

    layer, head = 1, 1
    choose(browser, "layer", layer)
    check_table(state(browser), maps, 1, 0)  # a change redraws the map
    choose(browser, "head", head)
    check_table(state(browser), maps, layer, head)
    bests = set()
    for q in range(t):  # hover every token in turn, then leave it
        hover(browser, element(browser, "#tokens .tok", q))
        hovered = state(browser)
        check_query(hovered, maps, layer, head, q)
        check_table(hovered, maps, layer, head)  # hovering only lights a row
        leave(browser)
        check_cleared(state(browser))
        bests.add(first_max(page_weights(maps, layer, head)[q], q))
    assert len(bests) > 2  # the hovered tokens attend most to different keys, so the argmax is really tested
    hover(browser, element(browser, "#map tr", 5))  # a map row shows its query (4)
    check_query(state(browser), maps, layer, head, 4)


def test_page_opens_on_the_layer_and_head_asked_for(browser, tmp_path):
    from llmscratch.store.checkpoint import load_run
    from llmscratch.cli import main
    from llmscratch.tools.inspect import attention_maps

    run = tiny_char_run(tmp_path / "run")  # 2 layers, 4 heads
    out = tmp_path / "maps"
    assert main(["attention", str(run), "--prompt", "bad cafe", "--layer", "1", "--head", "2", "3", "--html",
                 "--out", str(out)]) == 0
    model, tokenizer, _ = load_run(run)
    maps = attention_maps(model, tokenizer, "bad cafe")
    opened = open_file(browser, out / "attention.html")
    assert opened["layer"]["value"] == "1" and opened["head"]["value"] == "2"  # the first of those asked for
    check_table(opened, maps, 1, 2)
    with pytest.raises(LLMScratchError, match="head 4 does not exist: the model has heads 0..3"):
        attention_html(maps, head=4)


def test_a_click_pins_a_token_until_it_is_clicked_again(browser, tmp_path):
    maps = tiny_gpt_maps("bad cafe")
    open_page(browser, tmp_path, attention_html(maps))
    element(browser, "#tokens .tok", 3).click()
    check_query(state(browser), maps, 0, 0, 3, pinned=3)
    leave(browser)
    check_query(state(browser), maps, 0, 0, 3, pinned=3)  # it stays without the mouse
    hover(browser, element(browser, "#tokens .tok", 6))
    check_query(state(browser), maps, 0, 0, 6, pinned=3)  # hovering shows another, the pin stays marked
    leave(browser)
    check_query(state(browser), maps, 0, 0, 3, pinned=3)
    choose(browser, "head", 2)
    pinned = state(browser)
    check_table(pinned, maps, 0, 2)
    check_query(pinned, maps, 0, 2, 3, pinned=3)  # the pin stays across heads: its row of the new head
    element(browser, "#tokens .tok", 3).click()
    leave(browser)
    check_cleared(state(browser))
    element(browser, "#map tr", 6).click()  # a row of the map pins its query too
    leave(browser)
    check_query(state(browser), maps, 0, 2, 5, pinned=5)


def test_the_keyboard_reaches_pins_and_moves_between_tokens(browser, tmp_path):
    from selenium.webdriver.common.keys import Keys

    maps = tiny_gpt_maps("bad cafe")
    t = len(maps.tokens)
    opened = open_page(browser, tmp_path, attention_html(maps))
    assert [s["tabIndex"] for s in opened["tokens"]] == [0] * t
    browser.execute_script("document.getElementById('head').focus()")
    press(browser, Keys.TAB)  # the tokens come next in the tab order
    assert state(browser)["focused"] == 0
    press(browser, Keys.ENTER)
    check_query(state(browser), maps, 0, 0, 0, pinned=0)
    press(browser, Keys.ARROW_RIGHT, Keys.ARROW_RIGHT)
    now = state(browser)
    assert now["focused"] == 2
    check_query(now, maps, 0, 0, 2, pinned=2)
    press(browser, Keys.END)
    check_query(state(browser), maps, 0, 0, t - 1, pinned=t - 1)
    press(browser, Keys.ARROW_RIGHT)  # past the end: stays on the last token
    check_query(state(browser), maps, 0, 0, t - 1, pinned=t - 1)
    press(browser, Keys.ARROW_LEFT)
    check_query(state(browser), maps, 0, 0, t - 2, pinned=t - 2)
    press(browser, Keys.SPACE)  # Space on the pinned token lets it go
    check_cleared(state(browser))
    press(browser, Keys.HOME)
    check_query(state(browser), maps, 0, 0, 0, pinned=0)
    press(browser, Keys.ESCAPE)
    now = state(browser)
    check_cleared(now)
    assert now["focused"] == 0
    assert browser.execute_script("return window.scrollY") == 0  # Space and the arrows did not scroll the page


def zero_and_masked_maps() -> AttentionMaps:
    """Four tokens whose last query gives some visible keys exactly zero weight."""
    weights = causal_softmax(1, 1, 4, 4)
    weights[0, 0, 3] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # keys 0 and 2: zero weight; none masked in row 3
    return AttentionMaps(list("abcd"), [weights])


def test_masked_cells_are_drawn_apart_from_zero_weights_and_the_legend_says_which_is_which(browser, tmp_path):
    import matplotlib.image

    maps = zero_and_masked_maps()
    open_page(browser, tmp_path, attention_html(maps))
    zero, masked = element(browser, "#map tr", 4).find_elements("css selector", "td")[0], \
        element(browser, "#map tr", 1).find_elements("css selector", "td")[1]
    look = "const s = getComputedStyle(arguments[0]); return [s.backgroundColor, s.backgroundImage];"
    zero_look, masked_look = browser.execute_script(look, zero), browser.execute_script(look, masked)
    assert same_colour(zero_look[0], colour(0.0)) and zero_look[1] == "none"
    assert "repeating-linear-gradient" in masked_look[1]

    def pixels(cell):
        return matplotlib.image.imread(io.BytesIO(cell.screenshot_as_png), format="png")[..., :3]  # (h, w, RGB)

    zero_px, masked_px = pixels(zero), pixels(masked)
    assert zero_px.std() < 0.05 and masked_px.std() > 0.05  # a flat colour against a hatch
    assert abs(zero_px.mean() - masked_px.mean()) > 0.05  # ... and a lighter one

    legend = element(browser, "#legend")
    assert legend.is_displayed()
    assert "weight 0" in legend.text and "masked" in legend.text and "future" in legend.text
    swatch = element(browser, "#legend .swatch.masked")
    assert browser.execute_script(look, swatch)[1] == masked_look[1]  # the legend's swatch is the masked cells' hatch
    bar = browser.execute_script(look, element(browser, "#legend-bar"))[1]
    stops = [tuple(int(x) for x in m) for m in re.findall(r"rgb\((\d+), (\d+), (\d+)\)", bar)]
    assert len(stops) == 5 and same_colour("rgb{}".format(stops[0]), colour(0.0)) \
        and same_colour("rgb{}".format(stops[-1]), colour(1.0))  # from a weight of 0 to a weight of 1

    hover(browser, element(browser, "#tokens .tok", 1))
    spans = state(browser)["tokens"]
    assert ["future" in s["className"] for s in spans] == [False, False, True, True]  # the strip marks the future too


def cell_size(browser) -> tuple[float, float]:
    return tuple(browser.execute_script(
        "const r = document.querySelector('#map td').getBoundingClientRect(); return [r.width, r.height];"))


def fits(browser) -> bool:
    """Whether the map ends inside the page and nothing makes the page scroll sideways."""
    return browser.execute_script(
        "const page = document.documentElement;"
        "return document.getElementById('map').getBoundingClientRect().right <= page.clientWidth"
        " && page.scrollWidth <= page.clientWidth;")


def test_cells_scale_so_the_map_fits_short_and_long_windows(browser, tmp_path):
    torch.manual_seed(4)
    short = AttentionMaps([f"w{i}" for i in range(5)], [causal_softmax(1, 1, 5, 5)])
    long = AttentionMaps([f"w{i}" for i in range(150)], [causal_softmax(1, 1, 150, 150)])
    open_page(browser, tmp_path, attention_html(short), "short.html")
    assert cell_size(browser) == (28, 28) and fits(browser)  # a short window: the largest cells
    opened = open_page(browser, tmp_path, attention_html(long), "long.html")
    width, height = cell_size(browser)
    assert width == height and 1 <= width < 28 and fits(browser)
    labels = [c["text"] for c in opened["rows"][0]["cells"][1:]]
    every = next(i for i, text in enumerate(labels[1:], start=1) if text)  # cells too small for every label
    assert every > 1 and labels == [shown(x) if i % every == 0 else "" for i, x in enumerate(long.tokens)]
    wide = browser.execute_script("return window.innerWidth")
    try:
        browser.set_window_size(700, 900)
        wait_for(browser, lambda b: b.execute_script("return window.innerWidth") < wide, "the narrower window")
        state(browser)
        narrower, _ = cell_size(browser)
        assert narrower < width and fits(browser)  # the map follows the window
    finally:
        browser.set_window_size(1000, 900)


def test_page_picks_the_first_of_tied_weights(browser, tmp_path):
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
    open_page(browser, tmp_path, attention_html(maps, layer=1, head=1))
    infos = []
    for q in range(4):
        hover(browser, element(browser, "#tokens .tok", q))
        now = state(browser)
        check_query(now, maps, 1, 1, q)
        infos.append(now["info"])
    assert infos == ["token 0 \u201ca\u201d attends most to token 0 \u201ca\u201d (1.000)",
                     "token 1 \u201cb\u201d attends most to token 0 \u201ca\u201d (0.500)",
                     "token 2 \u201cc\u201d attends most to token 1 \u201cb\u201d (0.400)",
                     "token 3 \u201cd\u201d attends most to token 0 \u201ca\u201d (0.313)"]
    assert maps.head(1, 1)[2].argmax().item() == 2  # so rounding, not the raw weights, decides
    browser.execute_script("document.getElementById('head').focus()")  # from the keyboard, token 3 still hovered
    press(browser, "0")
    switched = state(browser)
    assert switched["head"]["value"] == "0"
    check_table(switched, maps, 1, 0)
    check_cleared(switched)  # nothing stays lit from the old head


def test_page_shows_tokens_that_look_like_html_exactly(browser, tmp_path):
    """Tokens holding </script>, <!--, quotes and entities reach the script intact and are shown as text."""
    tokens = ["</script>", "<!--", 'say "hi"', "it's", "</SCRIPT >", "-->", "&amp;", "a\\b", "\u2028", " x\n",
              "<script>", "__DATA__", "\r\n"]
    torch.manual_seed(2)
    maps = AttentionMaps(tokens, [causal_softmax(1, 2, len(tokens), len(tokens)) for _ in range(2)])
    title = '</script><!-- "quoted" & more __DATA__ __TITLE__'
    page = attention_html(maps, title=title, head=1)
    assert page.count(f"<title>{html.escape(title)}</title>") == 1  # placeholders in the title stay text
    data = re.search(r'<script id="attention-data" type="application/json">(.*?)</script>', page, re.S).group(1)
    assert "<" not in data  # so nothing in it can start or end a tag while the browser reads the script
    opened = open_page(browser, tmp_path, page)
    assert browser.title == title
    assert browser.execute_script("return Array.from(document.scripts, (s) => s.id || null)") == ["attention-data", None]
    q = 9
    hover(browser, element(browser, "#tokens .tok", q))
    hovered = state(browser)
    assert [s["text"] for s in opened["tokens"]] == [shown(x) for x in tokens]
    assert hovered["tokens"][0]["text"] == "</script>" and hovered["tokens"][2]["text"] == 'say\u2423"hi"'
    check_table(hovered, maps, 0, 1)
    check_query(hovered, maps, 0, 1, q)


@pytest.mark.parametrize("breakage", ["syntax error", "unescaped data", "misspelt property"])
def test_a_broken_page_fails_these_checks(browser, tmp_path, breakage):
    """The checks are not a rubber stamp: a broken script or page fails them."""
    torch.manual_seed(3)
    maps = AttentionMaps(["</script>", "<!--", "b"], [causal_softmax(1, 2, 3, 3) for _ in range(2)])
    page = attention_html(maps)
    broken = {
        "syntax error": page.replace("function show() {", "function show() {{", 1),
        # Every escape undone: the token "</script>" then ends the data early.
        "unescaped data": page.replace("\\u003c", "<").replace("\\u003e", ">").replace("\\/", "/"),
        # Only runs on hover, and a browser takes the misspelt name as a new property: the info line stays empty.
        "misspelt property": page.replace('info.textContent = "token', 'info.textContnt = "token', 1),
    }[breakage]
    assert broken != page
    loaded = open_page(browser, tmp_path, broken, errors_allowed=True)
    if breakage == "misspelt property":
        hover(browser, element(browser, "#tokens .tok", 1))
        with pytest.raises(AssertionError):
            check_query(state(browser), maps, 0, 0, 1)
    else:
        assert loaded["ready"] is None  # the script stopped with an error, or (data cut short) never ran
        with pytest.raises(AssertionError, match="the page's script (failed|did not run to its end)"):
            state(browser)
