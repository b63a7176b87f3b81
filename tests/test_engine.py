"""Tests of inference/engine.py: the Engine feeds the decode loop and changes none of its tokens.

Every completion is checked against ``generate()`` of the same ids, row by row, so that the
Engine's encoding, batching, seeds and sampling settings are the library's, not a copy of them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmscratch.data.tokenizer import CharTokenizer, Tokenizer
from llmscratch.errors import CheckpointError, TokenizerError
from llmscratch.inference.engine import Engine
from llmscratch.inference.generate import SamplingConfig, generate
from llmscratch.nn.model import GPT, GPTConfig
from tiny_files import varied_gpt

CORPUS = "the quick brown fox jumps over the lazy dog, and god said let there be light.\n"
LONG = "and god said let there be light, and there was light. " * 2  # 108 tokens: past the context of 32
PROMPTS = ["the", "god said let", "", LONG]
GREEDY = dict(max_new_tokens=12, temperature=0.0)
SAMPLED = dict(max_new_tokens=12, temperature=1.5, top_k=20, seed=11)


class ByteTokenizer(Tokenizer):
    """A byte-level tokenizer: one token per UTF-8 byte, so a character may take several tokens."""

    kind = "byte"
    vocab_size = 256

    def __init__(self, eot_id: int | None = None):
        self.eot_id = eot_id

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8", errors="replace")  # half a character: U+FFFD, as a BPE decoder shows it

    def token_byte_lengths(self) -> np.ndarray:
        return np.ones(self.vocab_size, dtype=np.int64)

    def _save_files(self, directory) -> dict:
        return {}


def make_model(vocab_size: int = 256, seed: int = 0) -> GPT:
    """A "test" preset GPT (context 32) with weights large enough (std 0.1) to give varied tokens."""
    return varied_gpt(seed, vocab_size=vocab_size)


@pytest.fixture(scope="module")
def chars() -> CharTokenizer:
    return CharTokenizer.from_text(CORPUS)


@pytest.fixture(scope="module")
def engine(chars) -> Engine:
    """A character tokenizer (decoding is one-to-one, so equal text is equal tokens) on a model of its vocabulary."""
    return Engine(make_model(chars.vocab_size), chars)


def alone(engine: Engine, text: str, cfg: dict, row: int) -> str:
    """What ``generate()`` makes of one prompt alone, with the seed of batch row ``row``, as text."""
    ids = engine.tokenizer.encode(text) or [0]  # the character tokenizer has no end-of-text token
    seed = None if cfg.get("seed") is None else cfg["seed"] + row
    return engine.tokenizer.decode(generate(engine.model, [ids], SamplingConfig(**{**cfg, "seed": seed}))[0])


# --------------------------------------------------------------------------- batches and seeds


@pytest.mark.parametrize("cfg", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_a_batch_completes_each_row_as_generate_does_its_prompt_alone(engine, cfg, use_cache):
    """Row i of one batch (an empty prompt and one past the context among them) is its prompt alone with seed + i."""
    engine = Engine(engine.model, engine.tokenizer, use_cache=use_cache)
    batch = engine.complete(PROMPTS, SamplingConfig(**cfg))
    assert batch == [alone(engine, text, cfg, row) for row, text in enumerate(PROMPTS)]
    assert len(set(batch)) == len(batch)  # the prompts matter: no row copies another


def test_samples_of_each_prompt_are_rows_prompt_by_prompt(engine):
    both = engine.complete(PROMPTS[:2], SamplingConfig(**SAMPLED), samples=3)
    expected = [alone(engine, text, SAMPLED, row) for row, text in enumerate(t for t in PROMPTS[:2] for _ in range(3))]
    assert both == expected and len(set(both)) == 6
    tokens = engine.generate(PROMPTS[:2], SamplingConfig(**SAMPLED), samples=3)
    assert [engine.tokenizer.decode(ids) for ids in tokens] == expected


# --------------------------------------------------------------------------- streaming and stop strings


@pytest.mark.parametrize("cfg", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_streamed_pieces_add_up_to_the_completion(engine, cfg):
    for text in PROMPTS:
        pieces = list(engine.stream(text, SamplingConfig(**cfg)))
        assert len(pieces) > 1 and "".join(pieces) == engine.complete([text], SamplingConfig(**cfg))[0]


def test_a_stop_string_cuts_the_completion_and_the_stream(engine):
    free = engine.complete(PROMPTS, SamplingConfig(**SAMPLED))
    stop = free[1][4:6]  # in row 1; perhaps elsewhere too
    cut = engine.complete(PROMPTS, SamplingConfig(**SAMPLED, stop=(stop, "@@")))
    assert cut == [text[: text.find(stop)] if stop in text else text for text in free]
    assert cut[1] == free[1][:4]
    shown = ""
    for piece in engine.stream(PROMPTS[1], SamplingConfig(**{**SAMPLED, "seed": SAMPLED["seed"] + 1}, stop=stop)):
        shown += piece
        assert cut[1].startswith(shown)  # never a character past the cut, not even for a while
    assert shown == cut[1]


def bigram_model(cycle: bytes) -> GPT:
    """A GPT that always continues byte ``cycle[i]`` with ``cycle[i + 1]`` (and the last with the first).

    Every block adds nothing (all its weights are 0) and positions are 0, so the logits are those
    of the last token's embedding, one-hot per byte of the cycle, after the final norm: the head
    row of its successor points the same way, 50 times over (the next byte by ~280 logits).
    """
    model = GPT(GPTConfig.from_preset("test", vocab_size=256))
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        model.final_norm.weight.fill_(1.0)
        for i, byte in enumerate(cycle):
            model.tok_emb.weight[byte, i] = 1.0
            model.out_head.weight[cycle[(i + 1) % len(cycle)], i] = 50.0
    return model.eval()


@pytest.mark.parametrize("cfg", [GREEDY, SAMPLED], ids=["greedy", "sampled"])
def test_a_character_split_across_tokens_is_never_shown_half(cfg):
    engine = Engine(bigram_model("añ€".encode()), ByteTokenizer())  # 61 | c3 b1 | e2 82 ac
    pieces = list(engine.stream("a", SamplingConfig(**cfg)))  # 12 tokens: two rounds of ñ € a
    assert pieces == ["ñ", "€", "a"] * 2  # nothing while a character still misses bytes, then all of it
    assert engine.complete(["a"], SamplingConfig(**cfg)) == ["ñ€a" * 2]
    assert engine.generate(["a"], SamplingConfig(**cfg))[0] == list("ñ€a".encode() * 2)  # 2 + 3 + 1 tokens each


# --------------------------------------------------------------------------- prompts, end-of-text, vocabulary


def test_empty_prompts_start_from_the_end_of_text_token(engine):
    assert engine.encode(["", "the"]) == [[0], engine.tokenizer.encode("the")]  # no end-of-text token: token 0
    assert engine.encode("the") == engine.encode(["the"])  # one string is one prompt
    assert Engine(engine.model, ByteTokenizer(eot_id=7)).encode(["", "a", [3, 4], []]) == [[7], [97], [3, 4], [7]]


def test_a_prompt_the_tokenizer_cannot_encode_is_named_before_anything_is_decoded(engine):
    with pytest.raises(TokenizerError, match=r"^'Zürich' \(prompt 2\): characters not in the vocabulary: 'Z', 'ü' "
                                             r".*; leave those characters out$"):
        engine.complete(["the", "Zürich"], SamplingConfig(**GREEDY))
    with pytest.raises(TokenizerError, match=r"^--prompt 'Zü' \(prompt 2\): characters"):
        engine.generate(["the", "Zü"], SamplingConfig(**GREEDY), names=["--prompt 'the'", "--prompt 'Zü'"])
    with pytest.raises(TokenizerError, match=r"^'Über alles, und so weiter u'\.\.\.: characters"):
        engine.stream("Über alles, und so weiter und so fort", SamplingConfig(**GREEDY))  # raised by the call itself


def test_the_tokenizer_decides_the_end_of_text_token_and_the_ids_drawn(chars):
    model = make_model(256)  # a vocabulary padded far past the character tokenizer's
    engine = Engine(model, chars)
    hot = SamplingConfig(max_new_tokens=40, temperature=5.0, seed=0)
    assert engine.sampling_for(hot).vocab_limit == chars.vocab_size
    assert max(max(ids) for ids in engine.generate(PROMPTS, hot)) < chars.vocab_size
    assert all(len(text) == 40 for text in engine.complete(PROMPTS, hot))  # (an id past it could not be decoded)

    free = generate(model, [[1, 2, 3]], SamplingConfig(**GREEDY))[0]
    k = next(i for i in range(3, len(free)) if free[i] not in free[:i])
    ends = Engine(model, ByteTokenizer(eot_id=free[k]))
    assert ends.generate([[1, 2, 3]], SamplingConfig(**GREEDY)) == [free[:k]]  # the end-of-text token ends the row
    assert ends.generate([[1, 2, 3]], SamplingConfig(**GREEDY), ignore_eos=True) == [free]


# --------------------------------------------------------------------------- loading a run


def test_a_saved_run_loads_and_completes_as_the_model_in_memory(engine, tmp_path):
    from llmscratch.store.checkpoint import save_run

    save_run(tmp_path / "run", engine.model, engine.tokenizer)
    for use_cache in (True, False):
        loaded = Engine.load(tmp_path / "run", "cpu", use_cache=use_cache, rows=len(PROMPTS))
        assert loaded.device.type == "cpu" and loaded.context_length == 32 and loaded.use_cache == use_cache
        assert loaded.complete(PROMPTS, SamplingConfig(**SAMPLED)) == engine.complete(PROMPTS, SamplingConfig(**SAMPLED))


def test_a_run_without_a_tokenizer_is_refused_with_the_command_line_s_message(tmp_path, capsys):
    from llmscratch.cli import main
    from llmscratch.store.checkpoint import save_run

    save_run(tmp_path / "run", make_model())
    with pytest.raises(CheckpointError, match="has no tokenizer files .* so the prompt cannot be turned into tokens; "
                                              "copy them from the run") as refused:
        Engine.load(tmp_path / "run", "cpu")
    assert main(["generate", str(tmp_path / "run"), "--prompt", "the", "--device", "cpu"]) == 2
    assert capsys.readouterr().err == f"llmscratch generate: error: {refused.value}\n"
    # Another command names its own text.
    with pytest.raises(CheckpointError, match="so the sentence to trace cannot be turned into tokens; "):
        Engine.load(tmp_path / "run", "cpu", purpose="the sentence to trace")


# --------------------------------------------------------------------------- training's samples


def test_training_samples_are_the_tokens_generate_gives_the_last_half_context(chars):
    from llmscratch.training.train import sample_text

    model = make_model(256)
    prompt = chars.encode(LONG[:40])  # 40 tokens: the sample starts from the last 16
    cut = prompt[-16:]
    reference = SamplingConfig(max_new_tokens=20, temperature=0.8, top_k=50, seed=3, vocab_limit=chars.vocab_size)
    expected = generate(model, [cut], reference)[0]
    assert sample_text(Engine(model, chars), prompt, 20, 3) == chars.decode(cut + expected)
    # No end-of-text stop: a sample is as long as asked, whatever its tokens.
    bytes_model = make_model(256)
    expected = generate(bytes_model, [cut], SamplingConfig(**{**vars(reference), "vocab_limit": None}))[0]
    engine = Engine(bytes_model, ByteTokenizer(eot_id=expected[2]))
    assert sample_text(engine, prompt, 20, 3) == engine.tokenizer.decode(cut + expected)
