"""Corpora, token files and batches: errors, caching, window arithmetic, bits per byte."""

import math
import os
import re
import stat
import warnings

import numpy as np
import pytest
import torch

from llmscratch.data.corpus import (
    BUILTIN_VERSES,
    Corpus,
    SlidingWindowDataset,
    TokenSplits,
    bits_per_byte,
    builtin_corpus_path,
    check_split_sizes,
    eval_windows,
    gather_windows,
    load_corpus,
    prepare_tokens,
    random_windows,
    read_builtin_corpus,
    sliding_window_loader,
    split_text,
    token_dtype,
    window_starts,
)
from llmscratch.errors import ConfigError, CorpusError
from llmscratch.data.tokenizer import BPETokenizer, CharTokenizer

TEXT = "".join(f"Verse {i}: the quick brown fox jumps over the lazy dog, naïvely.\n" for i in range(200))


@pytest.fixture
def char_tok():
    return CharTokenizer.from_text(TEXT)


def tokens_array(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 1000, size=n).astype(np.uint16)


# --------------------------------------------------------------------------- corpora


def test_builtin_corpus_is_the_king_james_bible():
    assert builtin_corpus_path().name == "kjv.jsonl"
    text = read_builtin_corpus()
    assert text.count("\n") + 1 == BUILTIN_VERSES == 31_103
    assert len(text.encode("utf-8")) == 4_137_451
    assert text.startswith("In the beginning God created the heaven and the earth.\n")
    corpus = load_corpus(None)
    assert corpus.name == "kjv" and corpus.text == text


def test_single_file(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text("Ünïcödé text\n", encoding="utf-8")
    corpus = load_corpus(path)
    assert corpus.text == "Ünïcödé text\n" and corpus.sources == [path] and corpus.name == "book"


def test_folder_of_txt_files_sorted_and_joined(tmp_path):
    (tmp_path / "b.txt").write_text("second", encoding="utf-8")
    (tmp_path / "a.txt").write_text("first", encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "c.txt").write_text("third", encoding="utf-8")
    corpus = load_corpus(tmp_path)
    assert corpus.text == "first\n\nsecond\n\nthird"
    assert [p.name for p in corpus.sources] == ["a.txt", "b.txt", "c.txt"]


@pytest.mark.parametrize("encoding", ["utf-8", "UTF8", "utf_8"])
def test_a_utf8_byte_order_mark_is_not_text(tmp_path, encoding):
    (tmp_path / "a.txt").write_bytes("\ufefffirst".encode("utf-8"))  # as some Windows editors save
    (tmp_path / "b.txt").write_bytes("\ufeffsecond \ufeff inside".encode("utf-8"))  # one inside the text stays
    assert load_corpus(tmp_path, encoding=encoding).text == "first\n\nsecond \ufeff inside"
    assert load_corpus(tmp_path / "a.txt", encoding="latin-1").text == "ï»¿first"  # other encodings: as decoded


def test_glob_pattern(tmp_path):
    for name in ("x1.txt", "x2.txt", "y.txt"):
        (tmp_path / name).write_text(name, encoding="utf-8")
    corpus = load_corpus(str(tmp_path / "x*.txt"))
    assert corpus.text == "x1.txt\n\nx2.txt"


def test_glob_without_match(tmp_path):
    with pytest.raises(CorpusError, match="no file matched the pattern"):
        load_corpus(str(tmp_path / "*.txt"))


def test_missing_path_is_named(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(CorpusError, match="corpus not found") as info:
        load_corpus(missing)
    assert str(missing) in str(info.value)


def test_folder_without_txt_files(tmp_path):
    (tmp_path / "a.csv").write_text("1,2", encoding="utf-8")
    with pytest.raises(CorpusError, match="no .txt files"):
        load_corpus(tmp_path)


def test_empty_corpus(tmp_path):
    (tmp_path / "blank.txt").write_text(" \n\n ", encoding="utf-8")
    with pytest.raises(CorpusError, match="empty") as info:
        load_corpus(tmp_path / "blank.txt")
    assert "blank.txt" in str(info.value)


def test_non_utf8_file_names_file_and_offset(tmp_path):
    path = tmp_path / "latin.txt"
    path.write_bytes("caf".encode() + "é au lait".encode("latin-1"))
    with pytest.raises(CorpusError) as info:
        load_corpus(path)
    message = str(info.value)
    assert str(path) in message and "byte offset 3" in message and "--encoding" in message and "0xe9" in message
    assert load_corpus(path, encoding="latin-1").text == "café au lait"


def test_unknown_encoding_name(tmp_path):
    (tmp_path / "a.txt").write_text("abc", encoding="utf-8")
    with pytest.raises(CorpusError, match="unknown text encoding"):
        load_corpus(tmp_path / "a.txt", encoding="no-such-codec")


# --------------------------------------------------------------------------- token files


def test_split_is_the_text_tail():
    train, val = split_text("0123456789", 0.2)
    assert (train, val) == ("01234567", "89")
    for bad in (0.0, 1.0, -0.1):
        with pytest.raises(ConfigError, match="val_fraction"):
            split_text("abc", bad)


def test_token_dtype_fits_the_vocabulary():
    assert token_dtype(256) == np.uint16 and token_dtype(65_535) == np.uint16
    assert token_dtype(65_536) == np.uint32 and token_dtype(100_000) == np.uint32


def test_prepare_tokens_splits_the_text_and_records_sizes(tmp_path, char_tok):
    corpus = Corpus(TEXT, [], "t")
    splits = prepare_tokens(corpus, char_tok, tmp_path, val_fraction=0.25)
    cut = int(len(TEXT) * 0.75)
    assert splits.train.dtype == np.uint16 and isinstance(splits.train, np.memmap)
    assert char_tok.decode(splits.train) == TEXT[:cut]
    assert char_tok.decode(splits.val) == TEXT[cut:]
    assert splits.meta["n_train_tokens"] == cut and splits.meta["n_val_tokens"] == len(TEXT) - cut
    assert splits.train_bytes == len(TEXT[:cut].encode()) and splits.val_bytes == len(TEXT[cut:].encode())


def test_prepare_tokens_reads_the_cache_without_tokenizing(tmp_path, monkeypatch):
    tok = BPETokenizer.train(TEXT, vocab_size=300)
    corpus = Corpus(TEXT, [], "t")
    first = prepare_tokens(corpus, tok, tmp_path)
    assert np.array_equal(first.train, tok.encode(TEXT[: int(len(TEXT) * 0.9)]))

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again instead of reading the cache")

    monkeypatch.setattr(tok, "encode", fail)
    monkeypatch.setattr(tok, "encode_batch", fail)
    second = prepare_tokens(corpus, tok, tmp_path)
    assert second.cache_dir == first.cache_dir
    assert np.array_equal(second.train, first.train) and np.array_equal(second.val, first.val)
    # Other text or another val fraction is another cache entry, so it tokenizes again.
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare_tokens(corpus, tok, tmp_path, val_fraction=0.2)
    with pytest.raises(AssertionError, match="tokenized again"):
        prepare_tokens(Corpus(TEXT + "more", [], "t"), tok, tmp_path)


def test_prepare_tokens_cache_depends_on_the_tokenizer(tmp_path):
    corpus = Corpus(TEXT, [], "t")
    a = prepare_tokens(corpus, CharTokenizer.from_text(TEXT), tmp_path)
    b = prepare_tokens(corpus, CharTokenizer.from_text(TEXT + "~"), tmp_path)
    assert a.cache_dir != b.cache_dir
    assert not np.array_equal(a.train, b.train)


def test_incomplete_cache_is_rebuilt(tmp_path, char_tok):
    corpus = Corpus(TEXT, [], "t")
    first = prepare_tokens(corpus, char_tok, tmp_path)
    expected = np.array(first.train)
    del first
    (tmp_path / next(p.name for p in tmp_path.iterdir()) / "train.bin").write_bytes(b"\0\0")  # truncated
    again = prepare_tokens(corpus, char_tok, tmp_path)
    assert np.array_equal(again.train, expected)


@pytest.mark.parametrize("split", ["train", "val"])
def test_a_cache_file_of_the_right_size_with_ids_outside_the_vocabulary_is_rebuilt(tmp_path, char_tok, split):
    """Random bytes of the right size used to pass as a cache and fail deep in training with
    ``IndexError: index out of range`` (an id >= the vocabulary in the embedding lookup)."""
    corpus = Corpus(TEXT, [], "t")
    first = prepare_tokens(corpus, char_tok, tmp_path)
    expected, folder = np.array(getattr(first, split)), first.cache_dir
    del first
    path = folder / f"{split}.bin"
    garbage = np.random.default_rng(0).integers(0, 2**16, size=expected.size, dtype=np.uint16)
    assert garbage.max() >= char_tok.vocab_size and garbage.nbytes == path.stat().st_size  # the right size
    path.write_bytes(garbage.tobytes())
    with pytest.warns(UserWarning, match="damaged") as record:
        again = prepare_tokens(corpus, char_tok, tmp_path)
    assert len(record) == 1 and str(folder) in str(record[0].message) and f"{split}.bin" in str(record[0].message)
    assert again.cache_dir == folder and np.array_equal(getattr(again, split), expected)
    assert np.array_equal(np.fromfile(path, dtype=np.uint16), expected)  # rewritten on disk
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # read again: whole now, no warning, no tokenizing
        assert np.array_equal(getattr(prepare_tokens(corpus, char_tok, tmp_path), split), expected)


@pytest.mark.skipif(os.name != "posix", reason="file modes and umask are POSIX")
def test_the_token_cache_files_are_shared_as_open_would_share_them_not_private(tmp_path, char_tok):
    """A cache folder shared by several users (``$LLMSCRATCH_CACHE``) must be readable by them:
    the cache files used to keep the 0600 of their temporary files."""
    old = os.umask(0o022)
    try:
        splits = prepare_tokens(Corpus(TEXT, [], "t"), char_tok, tmp_path)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in splits.cache_dir.iterdir()}
    assert modes == {"train.bin": 0o644, "val.bin": 0o644, "meta.json": 0o644}


def test_check_split_sizes_names_the_small_split():
    splits = TokenSplits(tokens_array(100), tokens_array(10), {"train_bytes": 100, "val_bytes": 10})
    check_split_sizes(splits, context_length=9)
    with pytest.raises(CorpusError) as info:
        check_split_sizes(splits, context_length=10)
    message = str(info.value)
    assert "validation split has 10 tokens" in message and "10+1" in message and "--val-fraction" in message
    for meta, named in [({"corpus": "kjv"}, "the built-in corpus"),
                        ({"corpus": "a", "sources": ["books/a.txt"], "n_sources": 1}, "the corpus books/a.txt"),
                        ({"corpus": "books", "sources": ["books/a.txt", "books/b.txt"], "n_sources": 2},
                         "the corpus books (2 files)")]:
        with pytest.raises(CorpusError, match=f"^{re.escape(named)} is too small: its validation split"):
            check_split_sizes(TokenSplits(tokens_array(100), tokens_array(10), meta), context_length=10)
    with pytest.raises(CorpusError, match=r"fewer than one window of 10\+1; use more text$"):
        check_split_sizes(splits, context_length=10, val_fraction_option=False)
    small_train = TokenSplits(tokens_array(5), tokens_array(100), {"train_bytes": 5, "val_bytes": 100})
    with pytest.raises(CorpusError, match="training split has 5 tokens"):
        check_split_sizes(small_train, context_length=8)


# --------------------------------------------------------------------------- random windows


def test_random_windows_targets_are_inputs_shifted_by_one():
    tokens = tokens_array(500)
    g = torch.Generator().manual_seed(0)
    starts = window_starts(len(tokens), 6, 16, torch.Generator().manual_seed(0))
    x, y = random_windows(tokens, 6, 16, g)
    assert x.shape == y.shape == (6, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for b, s in enumerate(starts.tolist()):
        assert x[b].tolist() == tokens[s : s + 16].tolist()
        assert y[b].tolist() == tokens[s + 1 : s + 17].tolist()


def test_random_windows_reproducible_under_the_same_generator_state():
    tokens = tokens_array(1000)
    g = torch.Generator().manual_seed(42)
    state = g.get_state()
    x1, y1 = random_windows(tokens, 8, 32, g)
    x_next, _ = random_windows(tokens, 8, 32, g)
    g.set_state(state)
    x2, y2 = random_windows(tokens, 8, 32, g)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x_next)


def test_window_starts_stay_in_range_and_slices_are_disjoint_per_rank():
    starts = window_starts(100, 4096, 20, torch.Generator().manual_seed(1))
    # Every start from 0 to the last one whose target window ends at the last token, each drawn:
    # 4096 draws from 80 values miss one with probability below 1e-20.
    assert set(starts.tolist()) == set(range(100 - 20))
    tokens = torch.arange(100)
    x, y = gather_windows(tokens, starts[:8], 20)
    world = [gather_windows(tokens, starts[rank * 4 : rank * 4 + 4], 20) for rank in range(2)]
    assert torch.equal(torch.cat([w[0] for w in world]), x) and torch.equal(torch.cat([w[1] for w in world]), y)
    assert torch.equal(y, x + 1)


def test_random_windows_need_one_window_of_tokens():
    with pytest.raises(CorpusError, match="fewer than one context window"):
        random_windows(tokens_array(16), 2, 16, torch.Generator().manual_seed(0))


# --------------------------------------------------------------------------- sliding windows


@pytest.mark.parametrize("n, max_length, stride", [(100, 10, 10), (100, 10, 3), (101, 10, 10), (11, 10, 1), (10, 10, 1), (257, 32, 7)])
def test_sliding_window_counts_match_the_book(n, max_length, stride):
    from llms_from_scratch.ch02 import GPTDatasetV1

    tokens = tokens_array(n)

    class StubTokenizer:  # GPTDatasetV1 only calls .encode
        def encode(self, text, allowed_special=None):
            return tokens.tolist()

    ours = SlidingWindowDataset(tokens, max_length, stride)
    book = GPTDatasetV1("unused", StubTokenizer(), max_length, stride)
    assert len(ours) == len(book) == max(0, math.ceil((n - max_length) / stride))
    for i in range(len(ours)):
        x, y = ours[i]
        assert torch.equal(x, book[i][0].long()) and torch.equal(y, book[i][1].long())


def test_sliding_window_loader_batches_and_seeded_shuffle():
    tokens = tokens_array(200)
    loader = sliding_window_loader(tokens, batch_size=4, max_length=8, stride=8, shuffle=True, seed=7)
    batches = list(loader)
    assert len(batches) == len(SlidingWindowDataset(tokens, 8, 8)) // 4 == 6
    x, y = batches[0]
    assert x.shape == (4, 8) and torch.equal(x[:, 1:], y[:, :-1])
    again = list(sliding_window_loader(tokens, batch_size=4, max_length=8, stride=8, shuffle=True, seed=7))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again))
    ordered = list(sliding_window_loader(tokens, batch_size=4, max_length=8, stride=8, shuffle=False))
    assert ordered[0][0][0].tolist() == tokens[:8].tolist()


# --------------------------------------------------------------------------- evaluation windows


@pytest.mark.parametrize("n", [65, 64, 200, 10])
def test_eval_windows_cover_the_whole_split(n):
    tokens = tokens_array(n)
    batches = eval_windows(tokens, context_length=16, batch_size=3)
    xs = torch.cat([x.flatten() for x, _ in batches])
    ys = torch.cat([y.flatten() for _, y in batches])
    assert xs.tolist() == tokens[:-1].tolist()
    assert ys.tolist() == tokens[1:].tolist()
    assert all(x.shape[1] == 16 for x, _ in batches[:-1])


@pytest.mark.parametrize("n", [2, 17, 18, 33, 34, 66])
def test_eval_windows_make_every_token_after_the_first_a_target_exactly_once(n):
    """The promise, checked position by position, including splits whose last window holds a
    single target (18, 34, 66 with context 16) and none at all (17, 33)."""
    tokens = np.arange(n, dtype=np.int64)  # each token is its own position
    targets = []
    for x, y in eval_windows(tokens, context_length=16, batch_size=2):
        assert torch.equal(x + 1, y)  # each target is predicted from the token just before it
        targets += y.flatten().tolist()
    assert sorted(targets) == list(range(1, n))  # every position after the first ...
    assert len(targets) == len(set(targets))  # ... exactly once


def test_eval_windows_sample_is_fixed_and_seeded():
    tokens = tokens_array(5000)
    a = eval_windows(tokens, 32, n_windows=20, batch_size=8)
    b = eval_windows(tokens, 32, n_windows=20, batch_size=8)
    assert [x.shape[0] for x, _ in a] == [8, 8, 4]
    assert all(torch.equal(p[0], q[0]) and torch.equal(p[1], q[1]) for p, q in zip(a, b))
    c = eval_windows(tokens, 32, n_windows=20, generator=torch.Generator().manual_seed(5), batch_size=8)
    assert not torch.equal(a[0][0], c[0][0])


# --------------------------------------------------------------------------- bits per byte


def test_bits_per_byte():
    # A uniform guess over 256 byte values costs exactly 8 bits per byte.
    assert bits_per_byte(1000 * math.log(256), 1000) == pytest.approx(8.0)
    # Two-byte characters: the same loss spread over twice the bytes.
    tok = CharTokenizer.from_text("éa")
    targets = torch.tensor(tok.encode("éééé"))
    n_bytes = int(tok.token_byte_lengths()[targets.numpy()].sum())
    assert n_bytes == 8
    assert bits_per_byte(4 * math.log(2), n_bytes) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_an_empty_corpus_names_its_file_in_a_sentence(tmp_path):
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(CorpusError, match=r"the corpus is empty: .*blank.txt holds no text"):
        load_corpus(str(tmp_path / "blank.txt"))
    (tmp_path / "blank2.txt").write_text("\n")
    with pytest.raises(CorpusError, match=r"blank2.txt hold no text"):
        load_corpus(str(tmp_path / "*.txt"))
