"""Tests of generate.py: sampling filters, seeds, eos, batching, the KV cache and the window rule."""

from __future__ import annotations

import re

import pytest
import torch

from llmscratch.errors import ConfigError
from llmscratch.inference.generate import (
    RowText,
    SamplingConfig,
    apply_repetition_penalty,
    crop_window,
    decode_steps,
    generate,
    generate_text,
    make_generators,
    sample_next,
    stream,
    stream_text,
    token_presence,
    top_k_filter,
    top_p_filter,
)
from llmscratch.nn.model import GPT, GPTConfig
from llmscratch.nn.positions import POSITION_KINDS
from tiny_files import varied_gpt

PROMPTS = [[1, 2, 3], [5, 6, 7, 8, 9, 10, 11], [42], [7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7, 7]]
GREEDY = SamplingConfig(max_new_tokens=20, temperature=0.0)


def make_model(pos_emb: str = "learned", seed: int = 0, **overrides) -> GPT:
    """A "test" preset GPT with weights large enough (std 0.1) that positions change the output."""
    return varied_gpt(seed, pos_emb=pos_emb, **overrides)


@pytest.fixture(scope="module")
def model() -> GPT:
    return make_model()


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "field, value",
    [
        ("max_new_tokens", -1), ("max_new_tokens", 2.5), ("temperature", -0.1),
        ("temperature", float("nan")), ("top_k", 0), ("top_k", True), ("top_p", 0.0),
        ("top_p", 1.5), ("seed", "abc"), ("seed", 2**63), ("repetition_penalty", 0.0),
        ("repetition_penalty", -1.2), ("repetition_penalty", float("inf")), ("repetition_penalty", True),
        ("stop", ""), ("stop", ["\n", ""]), ("stop", [3]),
    ],
)
def test_sampling_config_rejects_bad_values_naming_the_option_then_the_field(field, value):
    option = "--" + field.replace("_", "-")
    with pytest.raises(ConfigError, match=f"^{option} \\({field}\\) must"):
        SamplingConfig(**{field: value})


def test_sampling_config_fields_without_an_option_are_named_as_fields():
    with pytest.raises(ConfigError, match="eos_id"):
        SamplingConfig(eos_id=-3)


def test_one_stop_string_counts_as_one_not_as_its_characters():
    assert SamplingConfig(stop="\n\n").stop == ("\n\n",)
    assert SamplingConfig(stop=["a", "bc"]).stop == ("a", "bc")


def test_bad_prompts_are_refused(model):
    with pytest.raises(ValueError, match="empty"):
        generate(model, [[]], GREEDY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, [[1, 300]], GREEDY)


# --------------------------------------------------------------------------- sampling


def test_temperature_zero_is_argmax():
    torch.manual_seed(1)
    logits = torch.randn(5, 50)
    cfg = SamplingConfig(temperature=0.0, top_k=3, top_p=0.5)
    assert torch.equal(sample_next(logits, cfg), logits.argmax(-1))


def test_top_k_never_leaves_the_k_largest():
    torch.manual_seed(2)
    logits = torch.randn(1, 30).repeat(4000, 1)  # (4000, 30): one distribution, many draws
    allowed = set(torch.topk(logits[0], 5).indices.tolist())
    generator = torch.Generator().manual_seed(0)
    tokens = sample_next(logits, SamplingConfig(temperature=2.0, top_k=5), generator)
    seen = set(tokens.tolist())
    assert seen <= allowed
    assert len(seen) == 5  # with temperature 2 every one of the five shows up
    assert torch.isinf(top_k_filter(logits[:1], 5)).sum() == 25


def test_top_p_respects_its_mass():
    probs = torch.tensor([[0.5, 0.25, 0.15, 0.06, 0.04]])
    logits = probs.log().repeat(4000, 1)  # (4000, 5)
    generator = torch.Generator().manual_seed(0)
    # 0.5 + 0.25 = 0.75 < 0.8, so the nucleus needs the third token too: {0, 1, 2}.
    tokens = sample_next(logits, SamplingConfig(top_p=0.8), generator)
    assert set(tokens.tolist()) == {0, 1, 2}
    # Kept tokens are renormalised: token 0 has probability 0.5 / 0.9.
    share = (tokens == 0).float().mean().item()
    assert abs(share - 0.5 / 0.9) < 0.04
    # A tiny p keeps only the argmax.
    tokens = sample_next(logits, SamplingConfig(top_p=0.01), generator)
    assert set(tokens.tolist()) == {0}
    # p = 1 keeps everything.
    assert not torch.isinf(top_p_filter(logits[:1], 1.0)).any()


def test_top_p_at_exact_boundary_keeps_the_smallest_set():
    """Tokens whose mass equals p exactly are the whole nucleus: the next one is dropped."""
    # Probabilities 1/2, 1/4, 1/8, 1/8, exact in float64 (checked), so each boundary is exact; in
    # float32 the logs round and the first token's mass is 0.5 + 4.8e-10, past the boundary.
    logits = torch.tensor([[4.0, 2.0, 1.0, 1.0]], dtype=torch.float64).log()
    assert torch.softmax(logits, dim=-1).tolist() == [[0.5, 0.25, 0.125, 0.125]]
    for p, n_kept in ((0.5, 1), (0.75, 2), (0.875, 3)):
        kept = ~torch.isinf(top_p_filter(logits, p))
        assert kept.tolist() == [[True] * n_kept + [False] * (4 - n_kept)], p
    # Equal logits: every probability is exactly 1/4 in any precision.
    assert (~torch.isinf(top_p_filter(torch.zeros(1, 4), 0.5))).sum() == 2


def test_fixed_seed_gives_fixed_tokens(model):
    cfg = SamplingConfig(max_new_tokens=30, temperature=1.5, top_k=50, seed=123)
    first = generate(model, PROMPTS[:2], cfg)
    again = generate(model, PROMPTS[:2], cfg)
    other = generate(model, PROMPTS[:2], SamplingConfig(max_new_tokens=30, temperature=1.5, top_k=50, seed=7))
    assert first == again
    assert first != other


@pytest.mark.parametrize("use_cache", [True, False])
def test_a_batched_row_samples_what_its_prompt_samples_alone_with_seed_plus_row(model, use_cache):
    """Each row draws from its own generator (seed + row): batching changes no row's tokens,
    whatever the other prompts are and however the rows are padded."""
    cfg = SamplingConfig(max_new_tokens=25, temperature=1.3, top_k=40, seed=11)
    batched = generate(model, PROMPTS, cfg, use_cache=use_cache)
    for row, prompt in enumerate(PROMPTS):
        alone = SamplingConfig(max_new_tokens=25, temperature=1.3, top_k=40, seed=11 + row)
        assert generate(model, [prompt], alone, use_cache=use_cache)[0] == batched[row], row
    assert len({tuple(r) for r in generate(model, [PROMPTS[0]] * 3, cfg)}) == 3  # same prompt, 3 streams


def test_per_row_generators_must_match_the_rows():
    logits = torch.zeros(3, 10)
    with pytest.raises(ValueError, match="2 generators for 3 rows"):
        sample_next(logits, SamplingConfig(), make_generators(0, 2, "cpu"))
    one = sample_next(logits[:1], SamplingConfig(), make_generators(4, 1, "cpu"))
    assert torch.equal(one, sample_next(logits[:1], SamplingConfig(), torch.Generator().manual_seed(4)))


def test_sampling_leaves_the_global_rng_alone(model):
    torch.manual_seed(99)
    expected = torch.rand(3)
    torch.manual_seed(99)
    generate(model, [[1, 2]], SamplingConfig(max_new_tokens=10, seed=5))
    generate(model, [[1, 2]], SamplingConfig(max_new_tokens=10))  # no seed: its own random seed
    assert torch.equal(torch.rand(3), expected)


# --------------------------------------------------------------------------- stopping


def test_eos_stops_a_row_and_is_not_returned(model):
    free = generate(model, PROMPTS, GREEDY)
    eos = free[0][4]  # the fifth token row 0 produces greedily
    stopped = generate(model, PROMPTS, SamplingConfig(max_new_tokens=20, temperature=0.0, eos_id=eos))
    for row, tokens in zip(free, stopped):
        expected = row[: row.index(eos)] if eos in row else row
        assert tokens == expected
    assert len(stopped[0]) == free[0].index(eos) <= 4
    assert list(stream(model, PROMPTS[0], SamplingConfig(max_new_tokens=20, temperature=0.0, eos_id=eos))) == stopped[0]


def test_max_new_tokens(model):
    assert [len(r) for r in generate(model, PROMPTS, SamplingConfig(max_new_tokens=7, temperature=0))] == [7] * 4
    assert generate(model, PROMPTS, SamplingConfig(max_new_tokens=0)) == [[]] * 4


def test_stream_yields_the_same_tokens_as_generate(model):
    cfg = SamplingConfig(max_new_tokens=15, temperature=0.8, seed=3)
    assert list(stream(model, PROMPTS[1], cfg)) == generate(model, [PROMPTS[1]], cfg)[0]


def test_training_mode_restored_and_no_gradients():
    model = make_model()
    model.train()
    out = generate(model, [[1, 2, 3]], GREEDY)
    assert model.training
    assert len(out[0]) == 20
    model.eval()
    generate(model, [[1, 2, 3]], GREEDY)
    assert not model.training
    # Gradients are off inside the steps (no graph is recorded through the weights) and only
    # there, not in the caller's code between them.
    from llmscratch.inference.generate import decode_steps

    model.train()
    assert all(p.requires_grad for p in model.parameters())
    steps = decode_steps(model, [[1, 2, 3]], GREEDY)
    first = next(steps)
    assert not first.logits.requires_grad and first.logits.grad_fn is None
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    steps.close()
    it = stream(model, [1, 2], GREEDY)
    next(it)
    assert torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
    it.close()


# --------------------------------------------------------------------------- batching and cache


@pytest.mark.parametrize("use_cache", [True, False])
def test_batched_rows_equal_generating_alone(model, use_cache):
    batched = list(decode_steps(model, PROMPTS, GREEDY, use_cache=use_cache))
    for row, prompt in enumerate(PROMPTS):
        alone = list(decode_steps(model, [prompt], GREEDY, use_cache=use_cache))
        assert [s.tokens[row].item() for s in batched] == [s.tokens[0].item() for s in alone]
        for b, a in zip(batched, alone):
            torch.testing.assert_close(b.logits[row], a.logits[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pos_emb", POSITION_KINDS)
def test_cache_equals_no_cache_past_the_context(pos_emb):
    """Greedy tokens equal, token for token, far past context_length (32) under the window rule."""
    model = make_model(pos_emb)
    cfg = SamplingConfig(max_new_tokens=90, temperature=0.0)
    cached = list(decode_steps(model, PROMPTS, cfg, use_cache=True))
    uncached = list(decode_steps(model, PROMPTS, cfg, use_cache=False))
    assert torch.equal(torch.stack([s.tokens for s in cached]), torch.stack([s.tokens for s in uncached]))
    for c, u in zip(cached, uncached):
        torch.testing.assert_close(c.logits, u.logits, atol=1e-4, rtol=1e-4)
    # And each row is still what it generates alone, with and without the cache.
    tokens = generate(model, PROMPTS, cfg)
    assert tokens == [generate(model, [p], cfg, use_cache=False)[0] for p in PROMPTS]
    assert len(set(tokens[0])) > 5  # a real sequence, not one token repeated


@pytest.mark.parametrize("new_tokens, expected", [(5, 12 + 5 - 1), (1, 12), (90, 32)])
def test_the_kv_cache_is_as_long_as_the_decode_can_fill(monkeypatch, new_tokens, expected):
    """The longest prompt and every new token but the last (never fed back), at most the context (32):
    not the whole context for a short decode (SmolLM2's 8,192 positions at batch 8: 3 GB zeroed a call)."""
    from llmscratch.inference import generate as gen

    lengths = []
    real = gen.KVCache.for_model

    def recording(cfg, batch, max_len=None, **kw):
        lengths.append(max_len)
        return real(cfg, batch, max_len, **kw)

    monkeypatch.setattr(gen.KVCache, "for_model", recording)
    model = make_model("rope")
    cfg = SamplingConfig(max_new_tokens=new_tokens, temperature=0.0)
    assert generate(model, PROMPTS, cfg) == generate(model, PROMPTS, cfg, use_cache=False)
    assert lengths == [expected]  # the longest prompt has 12 tokens (the uncached run has no cache)


@pytest.mark.parametrize("pos_emb", POSITION_KINDS)
def test_long_prompts_follow_the_window_rule(pos_emb):
    """A prompt past the context is cut to its last half; both paths agree with running that cut."""
    model = make_model(pos_emb, seed=1)
    long_prompt = [(7 * i) % 256 for i in range(50)]  # 50 > context 32
    cfg = SamplingConfig(max_new_tokens=40, temperature=0.0)
    cached = generate(model, [long_prompt, [3]], cfg, use_cache=True)
    assert cached == generate(model, [long_prompt, [3]], cfg, use_cache=False)
    assert cached[0] == generate(model, [long_prompt[-16:]], cfg)[0]


def test_positions_matter_so_the_cache_tests_mean_something():
    outs = {kind: tuple(generate(make_model(kind), [PROMPTS[1]], GREEDY)[0]) for kind in POSITION_KINDS}
    assert len(set(outs.values())) == len(POSITION_KINDS)


def test_learned_positions_stay_in_range_far_past_the_context():
    model = make_model("learned", context_length=8)
    cfg = SamplingConfig(max_new_tokens=60, temperature=0.0)
    assert generate(model, [[1, 2, 3]], cfg) == generate(model, [[1, 2, 3]], cfg, use_cache=False)


def test_crop_window_rule():
    assert crop_window(list(range(32)), 32) == list(range(32))
    assert crop_window(list(range(33)), 32) == list(range(17, 33))
    assert crop_window([1, 2], 1) == [2]


def test_cached_equals_uncached_with_sampling(model):
    cfg = SamplingConfig(max_new_tokens=60, temperature=1.0, top_p=0.9, seed=11)
    assert generate(model, PROMPTS, cfg, use_cache=True) == generate(model, PROMPTS, cfg, use_cache=False)


# --------------------------------------------------------------------------- the book's generate


@pytest.mark.parametrize("qkv_bias", [False, True])
def test_greedy_matches_the_books_generate(qkv_bias):
    from llms_from_scratch.ch04 import GPTModel, generate_text_simple
    from llms_from_scratch.ch05 import generate as book_generate

    book_cfg = dict(vocab_size=97, context_length=24, emb_dim=48, n_heads=4, n_layers=2,
                    drop_rate=0.0, qkv_bias=qkv_bias)
    torch.manual_seed(5)
    book = GPTModel(book_cfg).eval()
    with torch.no_grad():
        for p in book.parameters():
            p.normal_(0.0, 0.1)  # biases and norms random too, so a wrong mapping shows
    ours = GPT(GPTConfig.from_preset("gpt2-124m", **book_cfg)).eval()
    copy_book_weights(book, ours)

    prompt = [[3, 14, 15, 92, 65]]
    idx = torch.tensor(prompt)
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), book(idx), atol=1e-5, rtol=1e-5)
    n_new = book_cfg["context_length"] - len(prompt[0])  # stay within the context
    expected = generate_text_simple(book, idx, n_new, book_cfg["context_length"])[0, 5:].tolist()
    expected_ch05 = book_generate(book, idx, n_new, book_cfg["context_length"])[0, 5:].tolist()
    cfg = SamplingConfig(max_new_tokens=n_new, temperature=0.0)
    assert expected == expected_ch05
    assert generate(ours, prompt, cfg) == [expected]
    assert generate(ours, prompt, cfg, use_cache=False) == [expected]


def copy_book_weights(book: torch.nn.Module, ours: GPT) -> None:
    """Copy the book's ``GPTModel`` weights into our GPT by hand (the map the test relies on)."""
    b = book.state_dict()
    with torch.no_grad():
        ours.tok_emb.weight.copy_(b["tok_emb.weight"])
        ours.pos_emb.weight.copy_(b["pos_emb.weight"])
        for i, block in enumerate(ours.blocks):
            pre = f"trf_blocks.{i}."
            block.attn.qkv.weight.copy_(torch.cat(
                [b[pre + f"att.{n}.weight"] for n in ("W_query", "W_key", "W_value")], dim=0
            ))  # (3C, C)
            if block.attn.qkv.bias is not None:
                block.attn.qkv.bias.copy_(torch.cat(
                    [b[pre + f"att.{n}.bias"] for n in ("W_query", "W_key", "W_value")], dim=0
                ))  # (3C,)
            block.attn.out_proj.weight.copy_(b[pre + "att.out_proj.weight"])
            block.attn.out_proj.bias.copy_(b[pre + "att.out_proj.bias"])
            block.ff.fc_in.weight.copy_(b[pre + "ff.layers.0.weight"])
            block.ff.fc_in.bias.copy_(b[pre + "ff.layers.0.bias"])
            block.ff.fc_out.weight.copy_(b[pre + "ff.layers.2.weight"])
            block.ff.fc_out.bias.copy_(b[pre + "ff.layers.2.bias"])
            for norm in ("norm1", "norm2"):
                getattr(block, norm).weight.copy_(b[pre + f"{norm}.scale"])
                getattr(block, norm).bias.copy_(b[pre + f"{norm}.shift"])
        ours.final_norm.weight.copy_(b["final_norm.scale"])
        ours.final_norm.bias.copy_(b["final_norm.shift"])
        ours.out_head.weight.copy_(b["out_head.weight"])


def test_cli_refuses_zero_samples_before_loading_anything(tmp_path, capsys):
    from llmscratch.cli import main

    assert main(["generate", str(tmp_path / "no-such-run"), "--num-samples", "0"]) == 2
    assert "--num-samples must be at least 1, got 0" in capsys.readouterr().err


# --------------------------------------------------------------------------- repetition penalty


def test_repetition_penalty_equals_transformers_logits_processor():
    """Against transformers' own processor on random logits of both signs, sequences with repeats."""
    from transformers import RepetitionPenaltyLogitsProcessor

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 50, generator=gen) * 3  # (B, V)
    logits[0, 7] = 0.0  # a zero logit stays zero
    ids = torch.randint(0, 50, (4, 30), generator=gen)  # (B, T): about half the ids, many repeated
    ids[0, 0] = 7
    for penalty in (1.3, 0.7, 1.0):
        expected = RepetitionPenaltyLogitsProcessor(penalty)(ids, logits.clone())
        seen = token_presence(ids.tolist(), 50, "cpu")  # (B, V)
        torch.testing.assert_close(apply_repetition_penalty(logits, seen, penalty), expected, rtol=0, atol=0)
        greedy = SamplingConfig(temperature=0.0, repetition_penalty=penalty)
        assert torch.equal(sample_next(logits, greedy, seen=seen), expected.argmax(-1))
    assert not torch.equal(apply_repetition_penalty(logits, seen, 1.3), logits)


EOS = 39  # the tiny transformers GPT-2's end-of-text id (its last)


def _hf_gpt2_and_ours(directory, vocab: int = 40, ctx: int = 32):
    """A tiny random transformers GPT-2 and our GPT with its weights, through the real converter."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from llmscratch.store.checkpoint import load_hf_model

    torch.manual_seed(3)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=ctx, n_embd=24, n_head=3, n_layer=2,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
                                    bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS)).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0.0, 0.3)
    hf.save_pretrained(directory)
    return hf, load_hf_model(directory).eval()


def test_greedy_with_repetition_penalty_equals_transformers_generate(tmp_path):
    """The whole decode loop (batched, left-padded, cached or not) against ``GPT2LMHeadModel.generate``
    with ``repetition_penalty`` on the same weights: the penalty counts the prompt and every new token."""
    hf, ours = _hf_gpt2_and_ours(tmp_path)
    prompts = [[1, 2, 3, 1], [5, 6], [9, 9, 9, 8, 7, 6, 5]]
    n = 16
    for penalty in (1.8, 0.6):
        expected = []
        for prompt in prompts:
            with torch.no_grad():
                out = hf.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=n,
                                  repetition_penalty=penalty)[0, len(prompt):].tolist()
            expected.append(out[: out.index(EOS)] if EOS in out else out)  # it stops at eos, as ours
        cfg = SamplingConfig(max_new_tokens=n, temperature=0.0, repetition_penalty=penalty, eos_id=EOS)
        assert generate(ours, prompts, cfg) == expected, penalty
        assert generate(ours, prompts, cfg, use_cache=False) == expected, penalty
        plain = generate(ours, prompts, SamplingConfig(max_new_tokens=n, temperature=0.0, eos_id=EOS))
        assert plain != expected  # the penalty changed the tokens: the comparison means something


def test_static_decoder_applies_the_repetition_penalty_as_generate_does():
    from llmscratch.inference.generate import StaticDecoder

    model = _tiny("rope", context_length=16)
    prompts = [[1, 2, 3, 1], [4, 4, 4, 5]]
    for cfg in (SamplingConfig(max_new_tokens=10, temperature=0.0, repetition_penalty=1.5),
                SamplingConfig(max_new_tokens=10, temperature=1.2, seed=3, repetition_penalty=1.5)):
        out = StaticDecoder(model, batch=2).generate(torch.tensor(prompts), cfg)
        assert out.tolist() == generate(model, prompts, cfg)
    greedy = SamplingConfig(max_new_tokens=10, temperature=0.0)
    assert generate(model, prompts, greedy) != generate(model, prompts, cfg)  # it changes something


# --------------------------------------------------------------------------- stop strings


def two_letters(ids: list[int]) -> str:
    """A decode whose tokens are two characters each, so a stop string can begin inside a token."""
    return "".join(chr(97 + t // 26 % 26) + chr(97 + t % 26) for t in ids)


def utf8_bytes(ids: list[int]) -> str:
    """A decode whose tokens are bytes, as a byte-level BPE's: a character may need several tokens."""
    return bytes(ids).decode("utf-8", errors="replace")


def test_row_text_holds_back_what_could_begin_a_stop_string():
    pieces = {0: "x", 1: "E", 2: "N", 3: "D", 4: "Q", 5: "abENDcd", 6: "--"}
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    row = RowText(decode, ["END", "--"])
    assert [row.push(t) for t in (0, 1, 2)] == ["x", "", ""]  # "EN" may become "END": held
    assert row.push(4) == "ENQ" and not row.stopped  # it did not
    assert [row.push(t) for t in (1, 2, 3)] == ["", "", ""] and row.stopped  # it did: never shown
    assert row.text == "xENQ" and row.push(0) == "" and row.finish() == ""
    row = RowText(decode, ["END", "--"])
    assert row.push(5) == "ab" and row.stopped  # a stop string inside one token
    row = RowText(decode, ["END", "xE"])
    assert row.push(0) == "" and row.push(2) == "xN" and row.push(1) == ""
    assert row.finish() == "E"  # the row ends: what it held back is released
    row = RowText(decode, ["D", "NDQ"])
    assert row.push(2) == "" and row.push(3) == "N" and row.stopped  # "NDQ" might have come: "D" did
    row = RowText(decode, ["cd", "ND"])
    assert row.push(5) == "abE" and row.stopped  # the earliest in the text wins, not the first given


def test_row_text_waits_for_the_rest_of_a_multibyte_character():
    row = RowText(utf8_bytes, ["\n"])
    text = "añ€\nz".encode()
    assert [row.push(b) for b in text] == ["a", "", "ñ", "", "", "€", "", ""]
    assert row.stopped and row.text == "añ€"
    row = RowText(utf8_bytes)
    assert row.push(0xC3) == "" and row.finish() == "\ufffd"  # cut off mid-character: shown as the decoder shows it


@pytest.mark.parametrize("use_cache", [True, False])
def test_stop_strings_end_each_row_of_a_batch_on_its_own(model, use_cache):
    """Each row's text is its text without stop strings, cut before the first one (which may span
    tokens or begin inside one); rows without it run on; sampled rows keep seed + row."""
    cfg = dict(max_new_tokens=20, temperature=1.2, seed=9)
    free = generate_text(model, PROMPTS, SamplingConfig(**cfg), two_letters, use_cache=use_cache)
    stops = (free[0][7:12], free[2][3:6])  # start mid-token in row 0, at a token in row 2
    stopped = generate_text(model, PROMPTS, SamplingConfig(**cfg, stop=stops), two_letters, use_cache=use_cache)
    for row, text in enumerate(free):
        cuts = [i for i in (text.find(s) for s in stops) if i >= 0]
        assert stopped[row] == text[: min(cuts, default=len(text))], row
    assert stopped[0] == free[0][:7] and stopped[2] == free[2][:3]
    for row, prompt in enumerate(PROMPTS):  # a row samples as alone, with seed + row
        alone = SamplingConfig(**{**cfg, "seed": 9 + row}, stop=stops)
        assert generate_text(model, [prompt], alone, two_letters, use_cache=use_cache) == [stopped[row]]


def test_a_stopped_row_ends_the_decode_loop():
    model = make_model()
    free = generate(model, [PROMPTS[1]], GREEDY)[0]
    text = two_letters(free)
    stop = text[9:13]  # completed by the 7th token (characters 12, 13)
    steps = list(decode_steps(model, [PROMPTS[1]], SamplingConfig(max_new_tokens=20, temperature=0.0, stop=stop),
                              decode=two_letters))
    assert len(steps) == 7
    assert "".join(s.text[0] for s in steps) == text[:9]


@pytest.mark.parametrize("use_cache", [True, False])
def test_streamed_text_never_shows_any_of_a_stop_string(model, use_cache):
    sampling = SamplingConfig(max_new_tokens=20, temperature=0.0)
    free = generate_text(model, [PROMPTS[0]], sampling, two_letters)[0]
    for start in (2, 5, 8):  # each stop spans tokens and starts at or inside one
        stop = free[start : start + 5]
        with_stop = SamplingConfig(max_new_tokens=20, temperature=0.0, stop=(stop, "never"))
        shown = ""
        for piece in stream_text(model, PROMPTS[0], with_stop, two_letters, use_cache=use_cache):
            shown += piece
            assert free[: free.find(stop)].startswith(shown), (stop, shown)
        assert shown == free[: free.find(stop)]


def test_the_eos_token_and_the_end_release_the_held_back_text(model):
    free = generate(model, [PROMPTS[0]], GREEDY)[0]
    k = next(i for i in range(3, len(free)) if free[i] not in free[:i])  # eos = free[k] ends the row there
    held = two_letters(free[k - 1 : k])
    stop = held + "zz"  # begins with the last token's text, which is held back until the row ends
    cfg = SamplingConfig(max_new_tokens=20, temperature=0.0, eos_id=free[k], stop=stop)
    pieces = list(stream_text(model, PROMPTS[0], cfg, two_letters))
    assert pieces[-1].endswith(held) and "".join(pieces) == two_letters(free[:k])
    cfg = SamplingConfig(max_new_tokens=k, temperature=0.0, stop=stop)  # no eos: the last step releases it
    assert generate_text(model, [PROMPTS[0]], cfg, two_letters) == [two_letters(free[:k])]


def test_stop_strings_need_text_not_tokens(model):
    cfg = SamplingConfig(max_new_tokens=5, stop="\n")
    with pytest.raises(ConfigError, match="generate_text"):
        generate(model, PROMPTS, cfg)
    with pytest.raises(ConfigError, match="stream_text"):
        list(stream(model, PROMPTS[0], cfg))
    with pytest.raises(ConfigError, match="pass decode"):
        list(decode_steps(model, PROMPTS, cfg))
    from llmscratch.inference.generate import StaticDecoder

    with pytest.raises(ValueError, match="stop on strings"):
        StaticDecoder(model, batch=1).generate(torch.tensor([[1, 2]]), cfg)


# --------------------------------------------------------------------------- the command line


CORPUS = "the quick brown fox jumps over the lazy dog, and god said let there be light.\n" * 3


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> str:
    """A run directory: a character tokenizer and a random "test" GPT (std 0.1: varied text)."""
    from llmscratch.store.checkpoint import save_run
    from llmscratch.data.tokenizer import CharTokenizer

    tokenizer = CharTokenizer.from_text(CORPUS)
    directory = tmp_path_factory.mktemp("run")
    save_run(directory, make_model(vocab_size=tokenizer.vocab_size), tokenizer)
    return str(directory)


def cli_generate(capsys, run_dir: str, *argv: str) -> str:
    from llmscratch.cli import main

    status = main(["generate", run_dir, "--max-new-tokens", "30", "--device", "cpu", *argv])
    out, err = capsys.readouterr()
    assert status == 0, err
    return out


@pytest.mark.parametrize("cache", [[], ["--no-cache"]])
def test_cli_stop_cuts_the_streamed_text_before_the_stop_string(run_dir, capsys, cache):
    free = cli_generate(capsys, run_dir, "--prompt", "the", "--seed", "5", *cache)
    assert free.startswith("the") and free.endswith("\n")
    new = free[3:-1]
    stop = new[4:7]
    out = cli_generate(capsys, run_dir, "--prompt", "the", "--seed", "5", "--stop", stop, "--stop", "@@", *cache)
    assert out == "the" + new[: new.find(stop)] + "\n"


def test_cli_stop_ends_each_prompt_and_sample_on_its_own(run_dir, capsys):
    batch = ["--prompt", "the", "--prompt", "god", "--num-samples", "2", "--seed", "3", "--stop", "e", "--stop", " "]
    out = cli_generate(capsys, run_dir, *batch)
    blocks = re.split(r"^--- .* ---\n", out, flags=re.M)[1:]
    assert len(blocks) == 4
    for row, block in enumerate(blocks):
        prompt = "the" if row < 2 else "god"
        alone = cli_generate(capsys, run_dir, "--prompt", prompt, "--seed", str(3 + row), "--stop", "e",
                             "--stop", " ")
        assert block == alone, row
        assert " " not in block and "e" not in block[3:]


def test_cli_repetition_penalty_is_the_library_s(run_dir, capsys):
    from llmscratch.store.checkpoint import load_run

    model, tokenizer, _ = load_run(run_dir)
    prompt = tokenizer.encode("the")
    for penalty in ("1.0", "1.6"):
        out = cli_generate(capsys, run_dir, "--prompt", "the", "--greedy", "--repetition-penalty", penalty)
        cfg = SamplingConfig(max_new_tokens=30, temperature=0.0, repetition_penalty=float(penalty))
        assert out == "the" + tokenizer.decode(generate(model, [prompt], cfg)[0]) + "\n"
    assert out != cli_generate(capsys, run_dir, "--prompt", "the", "--greedy")


@pytest.mark.parametrize("argv, message", [
    (["--top-k", "0"], "--top-k (top_k) must be an integer >= 1 (leave it out to keep every token), got 0"),
    (["--top-p", "1.5"], "--top-p (top_p) must be a number in (0, 1]"),
    (["--temperature", "-1"], "--temperature (temperature) must be a finite number >= 0"),
    (["--max-new-tokens", "-2"], "--max-new-tokens (max_new_tokens) must be an integer >= 0, got -2"),
    (["--seed", str(2**63)], "--seed (seed) must be a 64-bit signed integer"),
    (["--repetition-penalty", "0"], "--repetition-penalty (repetition_penalty) must be a finite number > 0"),
    (["--repetition-penalty", "nan"], "--repetition-penalty (repetition_penalty) must be a finite number > 0"),
    (["--stop", "\n", "--stop", ""], "--stop (stop) must not be empty, got ''"),
])
def test_cli_sampling_errors_name_the_option_before_anything_is_loaded(tmp_path, capsys, argv, message):
    from llmscratch.cli import main

    assert main(["generate", str(tmp_path / "no-such-run"), "--prompt", "the", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("llmscratch generate: error: ") and message in err, err
    assert "SamplingConfig" not in err and err.count("\n") == 1


def test_cli_generate_help_states_the_defaults_of_the_new_options(capsys):
    from llmscratch.cli import main

    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default 1.0: off)" in out and "(default: none;" in out


# --------------------------------------------------------------------------- weight layout for decoding


def _fake_clock(monkeypatch, times: dict[str, float]) -> list[tuple[int, str]]:
    """Replace the timer: a pass takes ``times[way]`` s; each pass is run once to see which way it multiplies."""
    import llmscratch.inference.generate as gen
    import llmscratch.nn.model as model_module
    from llmscratch.nn.model import weight_layout

    calls: list[tuple[int, str]] = []
    linear, packed = torch.nn.functional.linear, model_module._packed_product

    def seconds(runs, repeats):
        out = {}
        for name, run in runs.items():
            seen = set()

            def spy_linear(x, w, *rest):  # which layout is the pass multiplying by?
                seen.add(weight_layout(w))
                return linear(x, w, *rest)

            def spy_packed(*args):
                seen.add("packed")
                return packed(*args)

            monkeypatch.setattr(torch.nn.functional, "linear", spy_linear)
            monkeypatch.setattr(model_module, "_packed_product", spy_packed)
            try:
                run()
            finally:
                monkeypatch.setattr(torch.nn.functional, "linear", linear)
                monkeypatch.setattr(model_module, "_packed_product", packed)
            assert seen == {name}, (name, seen)  # the pass named `name` multiplies that way only
            calls.append((repeats, name))
            out[name] = times[name]
        return out

    monkeypatch.setattr(gen, "_seconds", seconds)
    return calls


def _ways(model) -> dict[tuple[int, int], set[str]]:
    from llmscratch.nn.model import weight_layout

    return {shape: {"packed" if layer.is_packed() else weight_layout(layer.weight) for layer in layers}
            for shape, layers in model.linear_layers().items()}


@pytest.mark.parametrize("column, packed, expected", [
    (0.7, 0.9, "column"),  # column-major if 5 % faster than row-major or more
    (0.97, 1.2, "row"),
    (1.3, 0.96, "row"),  # packed if 5 % faster than the better of those or more (it costs memory)
    (1.0, 0.5, "packed"),
    (0.9, 0.6, "packed"),
    (0.9, 0.86, "column"),
    (0.97, 0.94, "packed"),
])
def test_choose_weight_layout_keeps_the_fastest_way_per_shape_and_the_same_tokens(monkeypatch, column, packed,
                                                                                 expected):
    from llmscratch.inference.generate import choose_weight_layout

    model = make_model()
    before = generate(model, PROMPTS, GREEDY)
    calls = _fake_clock(monkeypatch, {"row": 1.0, "column": column, "packed": packed})
    chosen = choose_weight_layout(model, rows=4)
    shapes = set(model.linear_layers())
    assert chosen == {shape: expected for shape in shapes}
    assert sorted(way for _, way in calls) == sorted(["row", "column", "packed"] * len(shapes))  # each timed 3 ways
    assert _ways(model) == {shape: {expected} for shape in shapes}  # every layer of a shape alike
    monkeypatch.undo()
    assert generate(model, PROMPTS, GREEDY) == before


def test_choose_weight_layout_packs_nothing_when_told_not_to_or_short_of_memory(monkeypatch):
    import llmscratch.inference.generate as gen
    from llmscratch.inference.generate import choose_weight_layout

    model = make_model()
    shapes = set(model.linear_layers())
    calls = _fake_clock(monkeypatch, {"row": 1.0, "column": 0.8, "packed": 0.1})
    assert choose_weight_layout(model, pack=False) == {shape: "column" for shape in shapes}
    assert "packed" not in {way for _, way in calls}
    monkeypatch.setattr(gen, "_available_memory", lambda: 10_000)  # bytes: less than twice any shape's weights
    assert choose_weight_layout(model) == {shape: "column" for shape in shapes}
    assert "packed" not in {way for _, way in calls}
    monkeypatch.setattr(gen, "_available_memory", lambda: 1 << 40)
    assert choose_weight_layout(model) == {shape: "packed" for shape in shapes}
    model.unpack_weights()
    assert all(ways <= {"row", "column"} for ways in _ways(model).values())


def test_choose_weight_layout_keeps_the_default_where_packing_fails(monkeypatch):
    from llmscratch.inference.generate import choose_weight_layout
    from llmscratch.nn.model import Linear

    model = make_model()
    calls = _fake_clock(monkeypatch, {"row": 1.0, "column": 1.0, "packed": 0.1})
    monkeypatch.setattr(Linear, "pack", lambda self, rows=None: False)  # a PyTorch without oneDNN, say
    assert set(choose_weight_layout(model).values()) == {"row"}
    assert {way for _, way in calls} == {"row", "column"}


def test_choose_weight_layout_on_the_real_clock_changes_no_token():
    from llmscratch.inference.generate import choose_weight_layout

    model = make_model(tie_weights=True)
    before = generate(model, PROMPTS, GREEDY)
    chosen = choose_weight_layout(model, rows=1, repeats=1)
    assert set(chosen) == set(model.linear_layers()) and set(chosen.values()) <= {"row", "column", "packed"}
    assert generate(model, PROMPTS, GREEDY) == before
    with torch.device("meta"):
        assert choose_weight_layout(GPT(GPTConfig.from_preset("test"))) == {}  # not a CPU: left alone


# --------------------------------------------------------------------------- what sampling refuses to do


def test_vocab_limit_never_draws_an_id_the_tokenizer_cannot_decode():
    from llmscratch.inference.generate import sample_next

    logits = torch.zeros(4, 10)
    logits[:, 8:] = 5.0  # the likeliest ids lie past the limit
    assert sample_next(logits, SamplingConfig(temperature=0, vocab_limit=8)).lt(8).all()
    draws = sample_next(logits.repeat(50, 1), SamplingConfig(temperature=2.0, vocab_limit=8),
                        generator=torch.Generator().manual_seed(0))  # sample_next draws from what it is given
    assert draws.lt(8).all() and len(set(draws.tolist())) > 1
    assert sample_next(logits, SamplingConfig(temperature=0)).ge(8).all()  # without it they win
    with pytest.raises(ConfigError, match="vocab_limit"):
        SamplingConfig(vocab_limit=0)


def test_a_tiny_temperature_is_greedy_not_nan():
    from llmscratch.inference.generate import sample_next

    logits = torch.randn(3, 50) * 30
    for temperature in (1e-42, 1e-50, 5e-324):  # the last two round to 0 in float32
        picked = sample_next(logits, SamplingConfig(temperature=temperature, seed=0))
        assert torch.equal(picked, logits.argmax(dim=-1)), temperature


def test_broken_weights_and_bad_prompts_are_named_not_sampled_from():
    model = make_model()
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        generate(model, [[1, 999]], GREEDY)
    with pytest.raises(ConfigError, match="empty"):
        generate(model, [[]], GREEDY)
    with torch.no_grad():
        model.final_norm.weight.fill_(float("nan"))
    with pytest.raises(ConfigError, match="logits for the prompt are not finite"):
        generate(model, [[1, 2]], GREEDY)


# --------------------------------------------------------------------------- audit: independent references


def _tiny(pos_emb: str, backend: str = "fused", context_length: int = 6, seed: int = 0) -> GPT:
    """A float64 GPT small enough for many decode steps: every weight random, biases and norms too."""
    torch.manual_seed(seed)
    cfg = GPTConfig.from_preset("test", pos_emb=pos_emb, attn_backend=backend, vocab_size=64, emb_dim=16,
                                n_heads=2, n_layers=2, context_length=context_length, qkv_bias=True)
    model = GPT(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() == 2 else 0.2)
    return model.eval()


def _window_reference(model: GPT, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """Last-position logits ``(V,)`` before each of ``tokens``, from the plain uncached forward pass of
    one row: no padding, default positions 0..T-1, the window rule applied here by hand (a window that
    would pass the context keeps its last ``max(1, context // 2)`` tokens)."""
    ctx = model.cfg.context_length
    keep = max(1, ctx // 2)
    window = list(prompt) if len(prompt) <= ctx else list(prompt)[-keep:]
    out = []
    with torch.no_grad():
        for token in tokens:
            out.append(model(torch.tensor([window]))[0, -1])  # (V,)
            window.append(token)
            if len(window) > ctx:
                window = window[-keep:]
    return out


AUDIT_PROMPTS = [[1, 2], [3, 4, 5, 6, 7, 8], [9], [10, 11, 12, 13, 14, 15, 16, 17, 18]]  # 9 > context 6


@pytest.mark.parametrize("backend", ["fused", "explicit"])
@pytest.mark.parametrize("pos_emb", POSITION_KINDS)
def test_every_step_equals_the_uncached_forward_of_its_own_window(pos_emb, backend):
    """Batched, left-padded, cached or not, past the context: each row's logits at every step are the
    plain forward pass of that row's window alone (float64, so any mask or position slip shows)."""
    model = _tiny(pos_emb, backend)
    cfg = SamplingConfig(max_new_tokens=8, temperature=0.0)
    for use_cache in (True, False):
        steps = list(decode_steps(model, AUDIT_PROMPTS, cfg, use_cache=use_cache))
        tokens = torch.stack([s.tokens for s in steps])  # (N, B)
        for row, prompt in enumerate(AUDIT_PROMPTS):
            reference = _window_reference(model, prompt, tokens[:, row].tolist())
            for step, ref in zip(steps, reference):
                torch.testing.assert_close(step.logits[row].double(), ref, atol=1e-10, rtol=1e-10)
                assert step.tokens[row].item() == int(ref.argmax())


@pytest.mark.parametrize("backend", ["fused", "explicit"])
@pytest.mark.parametrize("pos_emb", ["learned", "sinusoidal", "rope", "none"])
def test_static_decoder_equals_the_uncached_forward(pos_emb, backend):
    """The static preallocated cache (eager step): greedy tokens are the reference's, and a second call
    on the same decoder (slots holding the first call's keys) is not disturbed by them."""
    from llmscratch.inference.generate import StaticDecoder

    model = _tiny(pos_emb, backend, context_length=8)
    decoder = StaticDecoder(model, batch=2)  # max_len = context 8
    for prompts, n in (([[1, 2, 3], [4, 5, 6]], 6), ([[7, 8], [9, 9]], 7)):  # 3 + 6 - 1 = 8, 2 + 7 - 1 = 8
        out = decoder.generate(torch.tensor(prompts), SamplingConfig(max_new_tokens=n, temperature=0.0))
        for row, prompt in enumerate(prompts):
            window, expected = list(prompt), []
            with torch.no_grad():
                for _ in range(n):
                    expected.append(int(model(torch.tensor([window]))[0, -1].argmax()))
                    window.append(expected[-1])
            assert out[row].tolist() == expected, (prompts, row)
    with pytest.raises(ValueError, match="do not fit"):
        decoder.generate(torch.tensor([[1, 2, 3], [4, 5, 6]]), SamplingConfig(max_new_tokens=7, temperature=0.0))


def test_static_decoder_samples_what_generate_samples_and_refuses_what_it_cannot_do():
    from llmscratch.inference.generate import StaticDecoder

    model = _tiny("rope", context_length=16)
    prompts = [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    cfg = SamplingConfig(max_new_tokens=10, temperature=1.5, top_k=20, top_p=0.9, seed=21)
    out = StaticDecoder(model, batch=3).generate(torch.tensor(prompts), cfg)
    assert out.tolist() == generate(model, prompts, cfg)  # row i draws with seed + i on both paths
    with pytest.raises(ValueError, match="past the context length"):
        StaticDecoder(_tiny("learned", context_length=8), batch=1, max_len=9)
    with pytest.raises(ValueError, match="alibi"):  # at construction, not at the first call
        StaticDecoder(_tiny("alibi"), batch=1)


@pytest.mark.parametrize("pos_emb", POSITION_KINDS)
def test_sampled_rows_are_batch_independent_for_every_position_kind(pos_emb):
    """Rows of different lengths (one past the context), sampled with all filters on: row i of the batch
    is what its prompt samples alone with seed + i, cached and uncached, through several window cuts."""
    model = _tiny(pos_emb, context_length=6)
    cfg = dict(max_new_tokens=10, temperature=1.3, top_k=30, top_p=0.95)
    for use_cache in (True, False):
        batched = generate(model, AUDIT_PROMPTS, SamplingConfig(seed=4, **cfg), use_cache=use_cache)
        for row, prompt in enumerate(AUDIT_PROMPTS):
            alone = generate(model, [prompt], SamplingConfig(seed=4 + row, **cfg), use_cache=use_cache)[0]
            assert alone == batched[row], (use_cache, row)
    assert len({tuple(r) for r in batched}) == len(AUDIT_PROMPTS)  # the rows really are sampled


def test_sampled_frequencies_follow_temperature_top_k_and_top_p():
    """The draws follow the distribution written out from the definitions: softmax(logits / T),
    cut to the k largest, then to the smallest most-likely set reaching p, renormalised."""
    logits = torch.tensor([2.0, 1.5, 1.0, 0.2, 0.1, -1.0, -3.0, 0.9])
    n = 20000
    for temperature, k, p in [(0.7, 5, 0.8), (1.3, 4, None), (3.0, None, None), (0.5, None, 0.9)]:
        probs = torch.softmax(logits.double() / temperature, dim=0)  # (8,)
        ranked = probs.argsort(descending=True).tolist()[: k or 8]
        nucleus, mass = [], 0.0
        for token in ranked:
            nucleus.append(token)
            mass += (probs[token] / probs[ranked].sum()).item()
            if p is not None and mass >= p:
                break
        expected = torch.zeros(8, dtype=torch.float64)
        expected[nucleus] = probs[nucleus] / probs[nucleus].sum()

        draws = sample_next(logits.repeat(n, 1), SamplingConfig(temperature=temperature, top_k=k, top_p=p),
                            torch.Generator().manual_seed(3))  # (n,)
        freq = torch.bincount(draws, minlength=8).double() / n
        assert set(draws.unique().tolist()) == set(nucleus), (temperature, k, p)
        assert (freq - expected).abs().max() < 4 * (0.25 / n) ** 0.5, (temperature, k, p)  # < 4 std devs


def test_vocab_limit_holds_through_generate_and_the_static_decoder():
    """Ids past vocab_limit never come out of a whole generation, even where the model prefers them."""
    from llmscratch.inference.generate import StaticDecoder

    model = _tiny("rope", context_length=24)
    with torch.no_grad():  # hidden feature 0 is 5 at every position; ids 60..63 read it with weight 20
        model.final_norm.weight[0], model.final_norm.bias[0] = 0.0, 5.0
        model.out_head.weight[60:, 0] = 20.0
    prompts = [[1, 2, 3], [4, 5, 6]]
    assert all(t >= 60 for row in generate(model, prompts, GREEDY) for t in row)  # unlimited, they win
    for cfg in (SamplingConfig(max_new_tokens=15, temperature=0.0, vocab_limit=60),
                SamplingConfig(max_new_tokens=15, temperature=5.0, seed=1, vocab_limit=60)):
        for use_cache in (True, False):
            rows = generate(model, prompts, cfg, use_cache=use_cache)
            assert all(len(r) == 15 and max(r) < 60 for r in rows)
        assert StaticDecoder(model, batch=2).generate(torch.tensor(prompts), cfg).max() < 60


# --------------------------------------------------------------------------- audit: bugs found


def test_top_p_one_keeps_every_token_of_positive_probability():
    # Exact: token 0's probability rounds to 1.0 in float32, the nine others are 7.6e-10 each.
    tiny_tail = torch.tensor([[0.0] + [-21.0] * 9])
    assert not torch.isinf(top_p_filter(tiny_tail, 1.0)).any()
    # Just below 1: the tail's mass (6.9e-9) lies above the missing 1e-12, so every token stays,
    # which a float32 running sum (1.0 after the first token) cannot tell.
    assert not torch.isinf(top_p_filter(tiny_tail, 1.0 - 1e-12)).any()
    assert torch.isinf(top_p_filter(tiny_tail, 1.0 - 1e-8)).sum() == 9  # token 0's mass (1 − 6.9e-9) reaches it
    # Realistic: random logits over GPT-2's vocabulary.
    logits = torch.randn(4, 50257, generator=torch.Generator().manual_seed(0)) * 5
    positive = torch.softmax(logits, dim=-1) > 0
    assert not (torch.isinf(top_p_filter(logits, 1.0)) & positive).any()


def test_a_weight_edited_in_place_after_packing_is_what_decoding_uses():
    """An in-place edit under no_grad bumps the weight's version: the packed copy is dropped. An edit
    through ``.data`` cannot be seen (PyTorch keeps no version for it), so Linear's docstring says to
    unpack after one; unpacking then gives the edited weight."""
    model = _tiny("learned", context_length=8).float()
    x = torch.tensor([[1, 2, 3]])
    if not model.out_head.pack(rows=1):
        pytest.skip("this PyTorch cannot pack for oneDNN")
    with torch.no_grad():
        model.out_head.weight.zero_()  # every logit is now 0
        assert torch.equal(model(x), torch.zeros(1, 3, model.cfg.vocab_size))
        model.out_head.weight.normal_()
        assert model.out_head.pack(rows=1)
        model.out_head.weight.data.zero_()
        model.unpack_weights()
        assert torch.equal(model(x), torch.zeros(1, 3, model.cfg.vocab_size))
