"""`llmscratch prepare`: streamed inputs, parallel tokenizing, shards, index, resume, and training on the folder."""

from __future__ import annotations

import gzip
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from llmscratch.cli import main
from llmscratch.data import prepare as prep
from llmscratch.data import sources
from llmscratch.data.corpus import corpus_digest, gather_windows, load_corpus
from llmscratch.data.shards import ShardedTokens, is_prepared, load_prepared
from llmscratch.data.tokenizer import BPETokenizer, load_tokenizer
from llmscratch.errors import CorpusError
from tiny_files import write_tiny_gpt2_files

EOT = "<|endoftext|>"
WORDS = ("the of and to in a is that for it as was with be by on not he this are or his from at which but have "
         "an they you were her she there one all we their light darkness earth heaven waters café naïve 東京").split()


def documents(n: int, seed: int = 0) -> list[str]:
    """``n`` documents of varied length: words, sentences, lines and paragraphs."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n):
        lines = []
        for _ in range(rng.randint(1, 6)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(1, 40))]
            lines.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ","]))
        docs.append(rng.choice(["\n", "\n\n", " "]).join(lines))
    return docs


def write_jsonl(path: Path, docs: list[str], field: str = "text") -> Path:
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)), encoding="utf-8")
    return path


@pytest.fixture()
def gpt2_dir(tmp_path: Path) -> Path:
    """A GPT-2-style tokenizer folder (tiktoken runs it), small enough to write here."""
    d = tmp_path / "gpt2"
    write_tiny_gpt2_files(d)
    return d


@pytest.fixture()
def small_units(monkeypatch: pytest.MonkeyPatch) -> None:
    """Units and segments of a few hundred characters, so a tiny corpus makes many of both."""
    monkeypatch.setattr(prep, "UNIT_CHARS", 300)
    monkeypatch.setattr(sources, "SEGMENT_CHARS", 200)


def run(inputs, out: Path, tokenizer: Path | str, **kw) -> dict:
    cfg = prep.PrepareConfig(inputs=[str(i) for i in inputs], out=str(out), tokenizer=str(tokenizer),
                             progress_every=0, workers=kw.pop("workers", 1), **kw)
    return prep.prepare(cfg)


def split_tokens(out: Path, split: str) -> np.ndarray:
    data = load_prepared(out)
    tokens = data.train if split == "train" else data.val
    return tokens[0:len(tokens)]


def shard_bytes(out: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(out.glob("*.bin"))}


def test_shards_are_the_tokens_of_the_concatenated_documents(tmp_path, gpt2_dir, small_units):
    docs = documents(60)
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    index = run([data], tmp_path / "out", gpt2_dir, shard_tokens=500, val_docs=5)
    tok = load_tokenizer(gpt2_dir)
    # independent of the units, segments and shards: the documents joined by <|endoftext|>, encoded at once
    assert split_tokens(tmp_path / "out", "val").tolist() == tok.encode(EOT.join(docs[:5]) + EOT)
    assert split_tokens(tmp_path / "out", "train").tolist() == tok.encode(EOT.join(docs[5:]) + EOT)
    assert index["train"]["documents"] == 55 and index["val"]["documents"] == 5
    assert index["train"]["bytes"] == sum(len(d.encode()) for d in docs[5:])
    lengths = tok.token_byte_lengths()  # what bits per byte counts: the same bytes as the index says
    assert int(lengths[split_tokens(tmp_path / "out", "val").astype(np.int64)].sum()) == index["val"]["bytes"]
    assert len(index["train"]["shards"]) > 2 and all(s["tokens"] == 500 for s in index["train"]["shards"][:-1])
    assert index["dtype"] == "uint16" and index["val_shards"] == [s["file"] for s in index["val"]["shards"]]
    assert (tmp_path / "out" / "tokenizer").is_dir() and is_prepared(tmp_path / "out")


@pytest.mark.slow
def test_the_same_shards_whatever_the_number_of_workers(tmp_path, gpt2_dir, small_units):
    data = write_jsonl(tmp_path / "docs.jsonl", documents(80, seed=1))
    outs = [tmp_path / f"w{n}" for n in (1, 2, 3)]
    for n, out in zip((1, 2, 3), outs):
        run([data], out, gpt2_dir, shard_tokens=700, val_fraction=0.1, workers=n)
    one = shard_bytes(outs[0])
    assert len(one) > 3
    assert shard_bytes(outs[1]) == one and shard_bytes(outs[2]) == one
    assert json.loads((outs[1] / "index.json").read_text())["train"] == json.loads((outs[0] / "index.json").read_text())["train"]


def test_validation_documents_are_chosen_the_same_on_every_run(tmp_path, gpt2_dir, small_units):
    data = write_jsonl(tmp_path / "docs.jsonl", documents(200, seed=2))
    a = run([data], tmp_path / "a", gpt2_dir, val_fraction=0.1)
    run([data], tmp_path / "b", gpt2_dir, val_fraction=0.1)
    assert 5 <= a["val"]["documents"] <= 40  # about 10% of 200
    assert shard_bytes(tmp_path / "a") == shard_bytes(tmp_path / "b")
    run([data], tmp_path / "c", gpt2_dir, val_fraction=0.1, seed=1)  # another seed, other documents
    assert shard_bytes(tmp_path / "c")["val_000000.bin"] != shard_bytes(tmp_path / "a")["val_000000.bin"]


def test_text_jsonl_parquet_gzip_and_zstd_inputs_give_the_same_shards(tmp_path, gpt2_dir, small_units):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    zstandard = pytest.importorskip("zstandard")
    docs = documents(40, seed=3)
    inputs = {"txt": tmp_path / "docs.txt", "jsonl": write_jsonl(tmp_path / "docs.jsonl", docs)}
    inputs["txt"].write_text(EOT.join(docs) + EOT, encoding="utf-8")
    pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet", row_group_size=7)
    inputs["parquet"] = tmp_path / "docs.parquet"
    inputs["gz"] = tmp_path / "docs.jsonl.gz"
    inputs["gz"].write_bytes(gzip.compress(inputs["jsonl"].read_bytes()))
    inputs["zst"] = tmp_path / "docs.txt.zst"
    inputs["zst"].write_bytes(zstandard.ZstdCompressor().compress(inputs["txt"].read_bytes()))
    results = {}
    for name, path in inputs.items():
        run([path], tmp_path / name, gpt2_dir, shard_tokens=400, val_docs=3,
            text_field="body" if name == "parquet" else "text")
        results[name] = shard_bytes(tmp_path / name)
    assert len(results["txt"]) > 2
    for name in inputs:
        assert results[name] == results["txt"], name


def test_a_document_larger_than_a_shard(tmp_path, gpt2_dir, small_units):
    big = "\n".join(documents(30, seed=4))  # one document of many lines, cut into segments as it is read
    docs = ["A short one.", big, "Another short one."]
    (tmp_path / "in.txt").write_text(EOT.join(docs), encoding="utf-8")
    index = run([tmp_path / "in.txt"], tmp_path / "out", gpt2_dir, shard_tokens=256, val_docs=0)
    tok = load_tokenizer(gpt2_dir)
    expected = tok.encode(EOT.join(docs) + EOT)
    assert len(tok.encode(big)) > 3 * 256 and len(index["train"]["shards"]) > 3
    assert split_tokens(tmp_path / "out", "train").tolist() == expected
    assert index["train"]["documents"] == 3


def test_windows_across_a_shard_boundary(tmp_path):
    rng = np.random.default_rng(0)
    parts = [rng.integers(0, 60_000, n).astype(np.uint16) for n in (5, 17, 3, 30)]
    paths = []
    for i, p in enumerate(parts):
        paths.append(tmp_path / f"s{i}.bin")
        p.tofile(paths[-1])
    tokens = ShardedTokens(paths, [len(p) for p in parts], np.uint16)
    whole = np.concatenate(parts)
    assert len(tokens) == len(whole) == 55
    starts = torch.tensor([0, 3, 4, 20, 21, 40])  # windows over one, two and three shards
    x, y = gather_windows(tokens, starts, 12)
    ex, ey = gather_windows(whole, starts, 12)
    assert torch.equal(x, ex) and torch.equal(y, ey)
    assert tokens[20:26].tolist() == whole[20:26].tolist() and tokens[-1] == whole[-1]
    with pytest.raises(IndexError):
        tokens.take(np.array([55]))


def test_a_vocabulary_over_65535_is_stored_as_uint32(tmp_path):
    chars = [chr(c) for c in range(0x100, 0x100 + 70_000) if not 0xD800 <= c <= 0xDFFF][:66_000]
    text = "".join(chars)
    (tmp_path / "in.txt").write_text(text, encoding="utf-8")
    index = run([tmp_path / "in.txt"], tmp_path / "out", "char", val_docs=0, sample_bytes=10**7)
    assert index["dtype"] == "uint32" and index["vocab_size"] > 65_535
    ids = split_tokens(tmp_path / "out", "train")
    assert ids.dtype == np.uint32 and int(ids.max()) > 65_535
    tok = load_tokenizer(tmp_path / "out" / "tokenizer")
    assert tok.decode(ids[:-2].tolist()) == text  # the separator "\n\n" after the one document


def test_a_bpe_tokenizer_is_trained_on_a_sample_of_the_training_documents(tmp_path):
    docs = documents(50, seed=5)
    data = write_jsonl(tmp_path / "docs.jsonl", docs)
    sample = 2000
    run([data], tmp_path / "out", "bpe", vocab_size=300, sample_bytes=sample, val_docs=2)
    got = load_tokenizer(tmp_path / "out" / "tokenizer")
    text = "".join(docs[2:]).encode()[:sample].decode("utf-8", "ignore")  # training documents only, in order
    want = BPETokenizer.train(text, vocab_size=300)
    assert got.backend.get_vocab() == want.backend.get_vocab()


def test_resume_after_a_kill_between_shards(tmp_path, gpt2_dir, small_units, monkeypatch):
    data = write_jsonl(tmp_path / "docs.jsonl", documents(60, seed=6))
    run([data], tmp_path / "whole", gpt2_dir, shard_tokens=400, val_docs=4)
    want = shard_bytes(tmp_path / "whole")

    real_write, writes = prep._write_index, []

    def write_then_die(folder, index):  # killed right after the second checkpoint
        real_write(folder, index)
        writes.append(index)
        if len(writes) == 2:
            (folder / "train_000002.bin.partial").write_bytes(b"\xff" * 64)  # what a killed run wrote past it
            raise KeyboardInterrupt

    monkeypatch.setattr(prep, "_write_index", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        run([data], tmp_path / "out", gpt2_dir, shard_tokens=400, val_docs=4)
    monkeypatch.setattr(prep, "_write_index", real_write)
    assert not load_index(tmp_path / "out")["complete"]
    with pytest.raises(CorpusError, match="not finished"):
        load_prepared(tmp_path / "out")

    encoded = []
    real_encode = prep.encode_unit
    monkeypatch.setattr(prep, "encode_unit", lambda *a: encoded.append(1) or real_encode(*a))
    run([data], tmp_path / "out", gpt2_dir, shard_tokens=400, val_docs=4)
    assert shard_bytes(tmp_path / "out") == want
    total_units = len(encoded)
    encoded.clear()
    run([data], tmp_path / "whole2", gpt2_dir, shard_tokens=400, val_docs=4)
    assert total_units < len(encoded)  # the resumed run did not encode what was already in finished shards
    encoded.clear()
    run([data], tmp_path / "out", gpt2_dir, shard_tokens=400, val_docs=4)  # finished: nothing is redone
    assert encoded == []


def load_index(folder: Path) -> dict:
    return json.loads((folder / "index.json").read_text())


def test_bad_input_is_named_by_file_and_line_or_skipped(tmp_path, gpt2_dir):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": "also fine"}\nnot json\n{"body": "x"}\n{"text": 3}\n', encoding="utf-8")
    with pytest.raises(CorpusError, match=r"bad\.jsonl, line 3: not JSON"):
        run([path], tmp_path / "a", gpt2_dir, val_docs=0)
    index = run([path], tmp_path / "b", gpt2_dir, val_docs=0, skip_bad=True)
    assert index["skipped_bad"] == 3 and index["train"]["documents"] == 2
    assert "line 4: no 'text' field" in index["skipped_examples"][1]
    assert "line 5: the 'text' field is int" in index["skipped_examples"][2]
    latin = tmp_path / "latin.txt"
    latin.write_bytes("first line\nsecond line\ncaf\xe9\n".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"latin\.txt, line 3: not valid UTF-8 .*0xe9"):
        run([latin], tmp_path / "c", gpt2_dir, val_docs=0)


def test_streamed_digest_equals_the_corpus_fingerprint(tmp_path):
    (tmp_path / "a.txt").write_bytes("\ufefffirst\n".encode("utf-8"))
    (tmp_path / "b.txt").write_text("second é\n" * 1000, encoding="utf-8")
    corpus = load_corpus(tmp_path)
    digest = corpus_digest(tmp_path, cache_dir=tmp_path / "cache")
    assert digest.sha256 == corpus.fingerprint() and digest.n_bytes == corpus.n_bytes
    assert digest.n_chars == len(corpus.text)
    (tmp_path / "b.txt").write_text("changed\n", encoding="utf-8")  # another size: read again
    assert corpus_digest(tmp_path, cache_dir=tmp_path / "cache").sha256 == load_corpus(tmp_path).fingerprint()


@pytest.mark.slow
def test_train_on_a_prepared_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "docs.jsonl", documents(120, seed=7))
    assert main(["prepare", "--data", str(data), "--out", str(tmp_path / "prep"), "--tokenizer", "char",
                 "--workers", "1", "--shard-tokens", "2000", "--val-docs", "10", "--quiet"]) == 0
    assert len(load_index(tmp_path / "prep")["train"]["shards"]) > 3
    argv = ["train", "--data", str(tmp_path / "prep"), "--preset", "test", "--context-length", "16",
            "--steps", "3", "--batch-size", "4", "--eval-interval", "3", "--eval-windows", "2",
            "--sample-tokens", "0", "--device", "cpu", "--out-dir", str(tmp_path / "runs"), "--name", "r"]
    assert main(argv) == 0
    run_dir = tmp_path / "runs" / "r"
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    evals = [x for x in lines if "val_bpb" in x or "bpb" in x]
    assert evals and all(np.isfinite(list(v for k, v in e.items() if "bpb" in k)).all() for e in evals)
    assert load_tokenizer(run_dir).fingerprint() == load_tokenizer(tmp_path / "prep" / "tokenizer").fingerprint()


def test_the_implicit_cache_is_tokenized_as_a_stream_with_the_ids_of_the_whole_text(tmp_path, gpt2_dir, small_units):
    from llmscratch.data.corpus import Corpus, encode_text, prepare_tokens, split_text, token_dtype
    from llmscratch.data.tokenizer import build_tokenizer

    text = "\n".join(documents(80, seed=8))
    train, val = split_text(text, 0.1)
    for tok in (load_tokenizer(gpt2_dir), build_tokenizer("char", text), build_tokenizer("bpe", text, vocab_size=300)):
        splits = prepare_tokens(Corpus(text, [], "x"), tok, tmp_path / tok.kind, val_fraction=0.1)
        dtype = token_dtype(tok.vocab_size)
        assert np.array_equal(np.asarray(splits.train), encode_text(train, tok, dtype)), tok.kind
        assert np.array_equal(np.asarray(splits.val), encode_text(val, tok, dtype)), tok.kind
        assert splits.train_bytes == len(train.encode()) and splits.val_bytes == len(val.encode())


def test_resume_after_a_kill_between_a_shard_s_rename_and_the_index(tmp_path, gpt2_dir, small_units, monkeypatch):
    data = write_jsonl(tmp_path / "docs.jsonl", documents(40, seed=9))
    run([data], tmp_path / "whole", gpt2_dir, shard_tokens=300, val_docs=0)
    real_sha, calls = prep._file_sha256, []

    def die_on_third(path):  # the third shard is in place under its name, the index does not list it yet
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_sha(path)

    monkeypatch.setattr(prep, "_file_sha256", die_on_third)
    with pytest.raises(KeyboardInterrupt):
        run([data], tmp_path / "out", gpt2_dir, shard_tokens=300, val_docs=0)
    assert (tmp_path / "out" / "train_000002.bin").exists() and len(load_index(tmp_path / "out")["progress"]["train"]["shards"]) == 2
    monkeypatch.setattr(prep, "_file_sha256", real_sha)
    run([data], tmp_path / "out", gpt2_dir, shard_tokens=300, val_docs=0)
    assert shard_bytes(tmp_path / "out") == shard_bytes(tmp_path / "whole")


def test_a_prepared_folder_without_enough_validation_says_how_to_prepare_it(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMSCRATCH_CACHE", str(tmp_path / "cache"))
    data = write_jsonl(tmp_path / "docs.jsonl", documents(20, seed=10))
    run([data], tmp_path / "prep", "char", val_docs=0)
    argv = ["train", "--data", str(tmp_path / "prep"), "--preset", "test", "--steps", "1", "--device", "cpu",
            "--out-dir", str(tmp_path / "runs")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "its validation split has 0 tokens" in err and "--val-docs" in err, err
