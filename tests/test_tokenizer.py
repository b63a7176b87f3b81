"""Tokenizers: round trips, errors, save/load, and GPT-2's BPE against an independent reference.

GPT-2's real files are never downloaded: a tiny BPE (a few hundred merges) is learned here
with the textbook algorithm and written in GPT-2's two formats (encoder.json + vocab.bpe,
or Hugging Face's vocab.json + merges.txt).
"""

import collections
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import regex

from llmscratch.errors import TokenizerError
from llmscratch.data.tokenizer import (
    EOT,
    GPT2_URLS,
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    build_tokenizer,
    load_tokenizer,
    split_for_encoding,
)
from tiny_files import bytes_to_unicode

TRAIN_TEXT = (
    "In the beginning God created the heaven and the earth. And the earth was without form, and void; "
    "and darkness was upon the face of the deep. It's what they'll say: we've 12 or 345 reasons!\n"
    "Café crème, naïve résumé — déjà vu. 東京は日本の首都です。 Emoji: 🙂🚀.\n\n  indented line\ttab\n"
) * 8
TRICKY = [
    "Hello, world!",
    "  leading spaces and trailing   ",
    "line one\nline two\n\n\nthree blank\r\nwindows",
    "Ünïcödé àccents, 中文字符, 日本語のテキスト, 한국어, emoji 🤖🎉👩‍👩‍👧",
    "don't won't it's we'll they've I'm you'd",
    "numbers 1234567890 3.14159 and symbols ~!@#$%^&*()_+{}|:<>?",
    "",
]


# --------------------------------------------------------------------------- a tiny GPT-2-format BPE


GPT2_SPLIT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")


def learn_tiny_bpe(text: str, n_merges: int):
    """Textbook BPE: repeatedly merge the most frequent adjacent pair (ties: smallest pair)."""
    b2u = bytes_to_unicode()
    words = collections.Counter(
        tuple(b2u[b] for b in piece.encode("utf-8")) for piece in GPT2_SPLIT.findall(text)
    )
    vocab = {ch: i for i, ch in enumerate(b2u.values())}
    merges = []
    banned = set()
    while len(merges) < n_merges:
        pairs = collections.Counter()
        for word, freq in words.items():
            for pair in zip(word, word[1:]):
                if pair not in banned:
                    pairs[pair] += freq
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        if best[0] + best[1] in vocab:  # keep every token made by exactly one merge
            banned.add(best)
            continue
        merges.append(best)
        vocab[best[0] + best[1]] = len(vocab)
        merged = {}
        for word, freq in words.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + freq
        words = merged
    vocab[EOT] = len(vocab)
    return vocab, merges


@pytest.fixture(scope="module")
def tiny_bpe():
    return learn_tiny_bpe(TRAIN_TEXT, 300)


def write_gpt2_files(directory: Path, vocab, merges, names=("vocab.bpe", "encoder.json")) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    merges_name, vocab_name = names
    (directory / merges_name).write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8"
    )
    (directory / vocab_name).write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    return directory


@pytest.fixture
def openai_dir(tmp_path, tiny_bpe):
    return write_gpt2_files(tmp_path / "openai", *tiny_bpe)


@pytest.fixture
def hf_dir(tmp_path, tiny_bpe):
    d = write_gpt2_files(tmp_path / "hf", *tiny_bpe, names=("merges.txt", "vocab.json"))
    # A Hugging Face tokenizer_config.json has no "kind": it must not be mistaken for ours.
    (d / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 1024}), encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def hf_reference(tmp_path_factory, tiny_bpe):
    """transformers' GPT-2 tokenizer loaded from the same tiny files: the independent reference."""
    transformers = pytest.importorskip("transformers")
    d = write_gpt2_files(tmp_path_factory.mktemp("ref"), *tiny_bpe, names=("merges.txt", "vocab.json"))
    return transformers.GPT2Tokenizer.from_pretrained(str(d))


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(TRAIN_TEXT, vocab_size=400)


# --------------------------------------------------------------------------- char


def test_char_vocab_is_sorted_characters_and_round_trips():
    tok = CharTokenizer.from_text("hello world")
    assert tok.chars == sorted(set("hello world"))
    assert tok.vocab_size == 8 and tok.eot_id is None
    ids = tok.encode("hello world")
    assert ids[:2] == [tok.chars.index("h"), tok.chars.index("e")]
    assert tok.decode(ids) == "hello world"


def test_char_unknown_characters_raise_naming_them():
    tok = CharTokenizer.from_text("abc ")
    with pytest.raises(TokenizerError) as info:
        tok.encode("abc é€ a€")
    message = str(info.value)
    assert "'é'" in message and "'€'" in message and "training text" in message
    assert not isinstance(info.value, KeyError)


def test_char_save_and_load(tmp_path):
    tok = CharTokenizer.from_text("Ünïcödé 🙂 text\n")
    tok.save(tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["kind"] == "char"
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, CharTokenizer) and loaded.chars == tok.chars
    assert loaded.encode("🙂 text") == tok.encode("🙂 text")


# --------------------------------------------------------------------------- bpe


@pytest.mark.parametrize("text", TRICKY)
def test_bpe_round_trips_any_text(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_learns_the_requested_vocab_and_compresses(bpe):
    assert bpe.kind == "bpe" and bpe.vocab_size == 400
    assert bpe.encode(EOT) == [bpe.eot_id]
    sample = "In the beginning God created the heaven and the earth."
    assert len(bpe.encode(sample)) < len(sample.encode("utf-8")) / 2


def test_bpe_vocab_size_too_small():
    with pytest.raises(TokenizerError, match="at least 257"):
        BPETokenizer.train("some text", vocab_size=100)


def test_bpe_save_and_load(tmp_path, bpe):
    bpe.save(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    loaded = load_tokenizer(tmp_path)
    assert isinstance(loaded, BPETokenizer)
    for text in TRICKY:
        assert loaded.encode(text) == bpe.encode(text)
    assert loaded.fingerprint() == bpe.fingerprint()


def test_batch_encoding_of_pieces_equals_whole_text(bpe):
    text = "a b\nc  \nd\n\n e\nf\t\ng" + "".join(TRICKY) + "\n".join(TRICKY)
    pieces = split_for_encoding(text)
    assert "".join(pieces) == text and len(pieces) > 3
    assert [i for ids in bpe.encode_batch(pieces) for i in ids] == bpe.encode(text)


@pytest.mark.parametrize("kind", ["char", "bpe"])
def test_token_byte_lengths_count_the_utf8_bytes(kind):
    tok = build_tokenizer(kind, TRAIN_TEXT, vocab_size=350)
    lengths = tok.token_byte_lengths()
    assert lengths.shape == (tok.vocab_size,)
    text = TRAIN_TEXT[:500]
    assert lengths[tok.encode(text)].sum() == len(text.encode("utf-8"))
    if tok.eot_id is not None:
        assert lengths[tok.eot_id] == 0


def test_decode_rejects_ids_outside_the_vocabulary(bpe):
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        bpe.decode([1, bpe.vocab_size])


def test_build_tokenizer_rejects_unknown_kind_and_missing_text():
    with pytest.raises(TokenizerError, match="unknown tokenizer kind"):
        build_tokenizer("wordpiece", "text")
    with pytest.raises(TokenizerError, match="trained on text"):
        build_tokenizer("bpe", None)


# --------------------------------------------------------------------------- gpt2


def test_gpt2_round_trips_and_matches_reference(openai_dir, hf_reference, tiny_bpe):
    tok = GPT2Tokenizer.find(openai_dir)
    vocab, merges = tiny_bpe
    assert tok.kind == "gpt2" and tok.vocab_size == 256 + len(merges) + 1
    assert tok.eot_id == vocab[EOT] == 256 + len(merges)
    for text in TRICKY + [TRAIN_TEXT[:300], f"one{EOT}two"]:
        ids = tok.encode(text)
        assert tok.decode(ids) == text
        assert ids == hf_reference(text)["input_ids"], text
    assert len(tok.encode("the earth")) < len("the earth")  # merges are applied
    texts = TRICKY + [f"one{EOT}two"]
    assert tok.encode_batch(texts) == [hf_reference(t)["input_ids"] for t in texts]  # what data.encode_text uses


def test_gpt2_ranks_equal_tiktokens_own_loader(openai_dir, monkeypatch):
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")  # read the files directly, no cache copy
    expected = data_gym_to_mergeable_bpe_ranks(str(openai_dir / "vocab.bpe"), str(openai_dir / "encoder.json"))
    tok = GPT2Tokenizer.find(openai_dir)
    assert tok.encoding._mergeable_ranks == expected


def test_gpt2_token_byte_lengths(openai_dir):
    tok = GPT2Tokenizer.find(openai_dir)
    lengths = tok.token_byte_lengths()
    assert lengths[tok.eot_id] == 0 and lengths[:256].tolist() == [1] * 256
    text = TRICKY[3]
    assert lengths[tok.encode(text)].sum() == len(text.encode("utf-8"))


def test_gpt2_save_copies_its_files_and_loads_back(openai_dir, tmp_path):
    tok = GPT2Tokenizer.find(openai_dir)
    run = tmp_path / "run"
    tok.save(run)
    assert (run / "vocab.bpe").read_bytes() == (openai_dir / "vocab.bpe").read_bytes()
    assert (run / "encoder.json").read_bytes() == (openai_dir / "encoder.json").read_bytes()
    loaded = load_tokenizer(run)
    assert isinstance(loaded, GPT2Tokenizer)
    assert loaded.encode(TRICKY[3]) == tok.encode(TRICKY[3])


def test_load_tokenizer_on_hugging_face_vocab_and_merges(hf_dir, hf_reference, tmp_path):
    tok = load_tokenizer(hf_dir)
    assert tok.kind == "gpt2"
    assert tok.encode(TRICKY[4]) == hf_reference(TRICKY[4])["input_ids"]
    # What checkpoint.py does when importing a Hugging Face directory into a run directory.
    tok.save(tmp_path / "run")
    again = load_tokenizer(tmp_path / "run")
    assert again.kind == "gpt2" and again.encode(TRICKY[3]) == tok.encode(TRICKY[3])


def test_load_tokenizer_on_hugging_face_tokenizer_json(hf_reference, tmp_path, openai_dir):
    d = tmp_path / "hf_json"
    hf_reference.save_pretrained(str(d))
    for name in ("vocab.json", "merges.txt"):
        (d / name).unlink(missing_ok=True)
    assert (d / "tokenizer.json").is_file()
    tok = load_tokenizer(d)
    assert tok.kind == "bpe"
    gpt2 = GPT2Tokenizer.find(openai_dir)
    assert tok.eot_id == gpt2.eot_id and tok.vocab_size == gpt2.vocab_size
    for text in TRICKY:
        assert tok.encode(text) == gpt2.encode(text)
        assert tok.decode(tok.encode(text)) == text
    tok.save(tmp_path / "run")
    assert load_tokenizer(tmp_path / "run").encode(TRICKY[3]) == tok.encode(TRICKY[3])


def test_gpt2_search_order_env_var_and_tiktoken_cache(openai_dir, tmp_path, monkeypatch):
    monkeypatch.delenv("LLMSCRATCH_GPT2_DIR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "empty_cache"))
    monkeypatch.setenv("LLMSCRATCH_GPT2_DIR", str(openai_dir))
    assert build_tokenizer("gpt2").vocab_size == GPT2Tokenizer.find(openai_dir).vocab_size

    monkeypatch.delenv("LLMSCRATCH_GPT2_DIR")
    cache = tmp_path / "cache"
    cache.mkdir()
    for name in ("vocab.bpe", "encoder.json"):
        shutil.copy(openai_dir / name, cache / hashlib.sha1(GPT2_URLS[name].encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(cache))
    assert build_tokenizer("gpt2").encode("the earth") == GPT2Tokenizer.find(openai_dir).encode("the earth")


def test_gpt2_offline_without_files_says_where_to_put_them(tmp_path, monkeypatch):
    monkeypatch.delenv("LLMSCRATCH_GPT2_DIR", raising=False)
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path / "no_cache"))
    with pytest.raises(TokenizerError) as info:
        build_tokenizer("gpt2", run_dir=tmp_path)
    message = str(info.value)
    for needle in ("vocab.bpe", "encoder.json", "merges.txt", "vocab.json", "LLMSCRATCH_GPT2_DIR",
                   "openaipublic.blob.core.windows.net", str(tmp_path), "no_cache"):
        assert needle in message, needle
    assert f"(or put them in {tmp_path})" in message
    with pytest.raises(TokenizerError) as info:
        build_tokenizer("gpt2")  # as `train` asks: no run directory to put them in, so none is suggested
    assert "put them in" not in str(info.value) and "LLMSCRATCH_GPT2_DIR=/that/folder." in str(info.value)


def test_gpt2_mismatched_files_raise(openai_dir):
    vocab = json.loads((openai_dir / "encoder.json").read_text(encoding="utf-8"))
    vocab.pop(next(k for k, v in vocab.items() if v == 300))
    (openai_dir / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(TokenizerError, match="do not follow the merges"):
        GPT2Tokenizer.find(openai_dir)


@pytest.mark.parametrize("damage, message", [
    (lambda vocab: [], "must be a JSON object of tokens and their integer ids"),
    (lambda vocab: {**vocab, "<|endoftext|>": "x"}, "must be a JSON object of tokens and their integer ids"),
    (lambda vocab: {**vocab, "<|endoftext|>": None}, "must be a JSON object of tokens and their integer ids"),
    (lambda vocab: {**vocab, "<|endoftext|>": True}, "must be a JSON object of tokens and their integer ids"),
    (lambda vocab: {**vocab, "<|endoftext|>": len(vocab) + 500}, "must come right after the"),  # a gap of ids
    (lambda vocab: {**vocab, "<|endoftext|>": 3}, "must come right after the"),  # a merge's id
])
def test_a_damaged_gpt2_vocabulary_is_named_not_a_python_error(openai_dir, damage, message):
    vocab = json.loads((openai_dir / "encoder.json").read_text(encoding="utf-8"))
    (openai_dir / "encoder.json").write_text(json.dumps(damage(vocab)), encoding="utf-8")
    with pytest.raises(TokenizerError, match=message) as err:
        GPT2Tokenizer.find(openai_dir)
    assert "encoder.json" in str(err.value)


def test_load_tokenizer_on_a_folder_without_one(tmp_path):
    with pytest.raises(TokenizerError, match="no tokenizer in"):
        load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match="not found"):
        load_tokenizer(tmp_path / "missing")


@pytest.mark.parametrize("kind", ["char", "bpe", "gpt2"])
def test_a_saved_tokenizer_whose_files_are_missing_names_them_and_says_what_to_do(kind, bpe, openai_dir, tmp_path):
    tok = {"char": lambda: CharTokenizer.from_text(TRAIN_TEXT), "bpe": lambda: bpe,
           "gpt2": lambda: GPT2Tokenizer.find(openai_dir)}[kind]()
    run = tmp_path / "half2"
    tok.save(run)
    files = {"char": ["chars.json"], "bpe": ["tokenizer.json"], "gpt2": ["vocab.bpe", "encoder.json"]}[kind]
    for name in files:
        (run / name).unlink()
    with pytest.raises(TokenizerError) as err:
        load_tokenizer(run)
    missing = " and ".join(str(run / name) for name in files)
    assert str(err.value) == (
        f"{missing} {'is' if len(files) == 1 else 'are'} missing: {run / 'tokenizer_config.json'} says the tokenizer "
        f"is {kind!r}, whose vocabulary is kept in {' + '.join(files)}; copy the tokenizer's files "
        f"({', '.join(files)}, tokenizer_config.json) into {run} from the run it came from, or train or import the "
        "run again")


def test_bpe_load_of_a_missing_file_says_what_to_give(tmp_path):
    with pytest.raises(TokenizerError, match=f"^{tmp_path / 'tokenizer.json'} is missing; give a tokenizer.json "
                                             r"\(ours or a Hugging Face one\) or the folder that holds it$"):
        BPETokenizer.load(tmp_path)


# --------------------------------------------------------------------------- text that is not UTF-8

# Bytes that are not UTF-8 in a command-line argument (`--prompt $'the \xff'`) reach Python as
# lone surrogates ("surrogateescape"): 0xff becomes U+DCFF.
NOT_UTF8 = "the \udcff end"
NOT_UTF8_MESSAGE = r"the text is not valid UTF-8: byte 0xff at position 4 \(after 'the '\); give the text as UTF-8"


@pytest.mark.parametrize("kind", ["char", "bpe", "gpt2"])
def test_text_that_is_not_utf8_is_one_clear_error_from_every_tokenizer(kind, bpe, openai_dir):
    tok = {"char": lambda: CharTokenizer.from_text(TRAIN_TEXT), "bpe": lambda: bpe,
           "gpt2": lambda: GPT2Tokenizer.find(openai_dir)}[kind]()
    with pytest.raises(TokenizerError, match=NOT_UTF8_MESSAGE):
        tok.encode(NOT_UTF8)  # bpe: the library's TypeError; gpt2: tiktoken silently encoded U+FFFD
    with pytest.raises(TokenizerError, match=r"is not valid UTF-8: byte 0xc3 at position 1") as info:
        tok.encode_batch(["the", "a\udcc3"])
    assert kind == "char" or str(info.value).startswith("text 1 of 2 ")  # the batch encoders say which text
    with pytest.raises(TokenizerError, match=r"the lone surrogate U\+D800 at position 0"):  # from JSON's "\ud800"
        tok.encode("\ud800")
    assert tok.decode(tok.encode("the end")) == "the end"  # valid text is untouched
