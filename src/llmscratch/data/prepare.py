"""Tokenize a corpus of any size into token shards, in parallel, as a stream: ``llmscratch prepare``.

```
inputs ──read_documents──▶ units of ~1 MB of whole or safely cut documents (train or validation)
       ──N worker processes, batch encoders──▶ token arrays, back in input order
       ──ShardWriter──▶ train_000000.bin …, val_000000.bin … of --shard-tokens ids each
                        index.json: shards, token / byte / document counts, tokenizer, sources
```

The units are cut by the reader alone, and the results are written in the order of the units, so
the shards are the same bytes whatever the number of workers. Each document is followed by the
end-of-text token (a tokenizer without one: the text "\\n\\n"). A document goes to validation by a
hash of its number (``--val-fraction``) or as one of the first ``--val-docs``: the same documents on
every run over the same inputs.

Memory stays flat: at most ``2 × workers + 2`` units are in flight and the shards are written as
they fill. ``index.json`` is rewritten after every finished shard with where the reading had got
to, so an interrupted run resumes at its first unfinished shard; a finished folder whose inputs
(sizes and times), tokenizer and settings are unchanged is not prepared again.
"""

from __future__ import annotations

import collections
import hashlib
import json
import multiprocessing
import os
import shutil
import struct
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from ..errors import ConfigError, CorpusError, TokenizerError
from ..files import human_bytes, write_text_atomic
from .shards import INDEX_FILE, INDEX_FORMAT
from .sources import BadCounter, ReadPosition, Source, find_sources, read_documents, safe_cut, source_fingerprint
from .tokenizer import BUILDABLE_KINDS, DEFAULT_BPE_VOCAB_SIZE, Tokenizer, build_tokenizer, load_tokenizer
from .tokenizer_base import EOT, check_utf8_batch

PREPARE_VERSION = 1  # bump when the shards' content for the same inputs and settings changes
UNIT_CHARS = 1 << 20  # characters of text in one unit of work
TOKENIZER_DIR = "tokenizer"

Log = Callable[[str], None]


@dataclass
class PrepareConfig:
    """What ``llmscratch prepare`` does; :meth:`validate` checks it in one place."""

    inputs: list[str]
    out: str
    tokenizer: str = "gpt2"  # "gpt2", "bpe", "char", or a folder holding a saved tokenizer
    vocab_size: int = DEFAULT_BPE_VOCAB_SIZE
    sample_bytes: int = 64_000_000  # UTF-8 bytes of text a bpe / char tokenizer is trained on
    text_field: str = "text"
    workers: int = field(default_factory=lambda: os.cpu_count() or 1)
    shard_tokens: int = 100_000_000
    val_fraction: float = 0.001
    val_docs: Optional[int] = None  # the first N documents instead of a fraction
    skip_bad: bool = False
    seed: int = 0  # of the validation choice
    progress_every: float = 5.0  # seconds between progress lines (0: none)
    per_worker: bool = False  # progress lines per worker too

    def validate(self) -> "PrepareConfig":
        if not self.inputs:
            raise ConfigError("give at least one input with --data (a file, a folder or a glob)")
        if self.workers < 1:
            raise ConfigError(f"--workers must be at least 1, got {self.workers}")
        if self.shard_tokens < 1:
            raise ConfigError(f"--shard-tokens must be at least 1, got {self.shard_tokens}")
        if self.val_docs is None and not 0.0 <= self.val_fraction < 1.0:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.val_docs is not None and self.val_docs < 0:
            raise ConfigError(f"--val-docs must be 0 or more, got {self.val_docs}")
        if self.sample_bytes < 1:
            raise ConfigError(f"--sample-bytes must be at least 1, got {self.sample_bytes}")
        if self.tokenizer not in BUILDABLE_KINDS and not Path(self.tokenizer).is_dir():
            raise ConfigError(f"--tokenizer {self.tokenizer!r}: choose {', '.join(BUILDABLE_KINDS)} or give the folder "
                              "of a saved tokenizer (a run directory, a Hugging Face tokenizer folder)")
        return self


# --------------------------------------------------------------------------- documents → units


def _is_val(doc: int, cfg: PrepareConfig) -> bool:
    """Whether document number ``doc`` is a validation document: the same on every run."""
    if cfg.val_docs is not None:
        return doc < cfg.val_docs
    if cfg.val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(struct.pack("<qq", cfg.seed, doc), digest_size=8).digest()
    return int.from_bytes(digest, "little") < cfg.val_fraction * 2.0**64


@dataclass
class Unit:
    """Some text of one split: segments, and after which of them a document ends."""

    split: str
    segments: list[str]
    ends: list[bool]


class Reading:
    """The inputs read in order: the units of work, and how far the reading has got (for progress)."""

    def __init__(self, sources: Sequence[Source], cfg: PrepareConfig, bad: BadCounter):
        self.sources, self.cfg, self.bad = sources, cfg, bad
        self.files_done = 0  # bytes of the files already read whole
        self.position = ReadPosition()  # where the reading is in the file being read

    @property
    def input_done(self) -> int:
        """Bytes of the input files read so far (as stored: compressed bytes for a compressed file)."""
        return self.files_done + self.position.bytes_read()

    def units(self) -> Iterator[Unit]:
        buffers: dict[str, Unit] = {s: Unit(s, [], []) for s in ("train", "val")}
        chars = {"train": 0, "val": 0}
        doc, split = 0, None
        for source in self.sources:
            self.position.raw = None
            for segment, ends in read_documents(source, self.cfg.text_field, self.cfg.skip_bad, self.bad, self.position):
                if split is None:
                    split = "val" if _is_val(doc, self.cfg) else "train"
                buf = buffers[split]
                buf.segments.append(segment)
                buf.ends.append(ends)
                chars[split] += len(segment)
                if ends:
                    doc, done = doc + 1, split
                    split = None
                    if chars[done] >= UNIT_CHARS:
                        yield buf
                        buffers[done], chars[done] = Unit(done, [], []), 0
                elif chars[split] >= UNIT_CHARS:  # a long document goes on in the next unit
                    yield buf
                    buffers[split], chars[split] = Unit(split, [], []), 0
            self.files_done += source.path.stat().st_size
        for s in ("train", "val"):
            if buffers[s].segments:
                yield buffers[s]


# --------------------------------------------------------------------------- the workers

_worker_tokenizer: Optional[Tokenizer] = None
_worker_sep: list[int] = []


def _init_worker(tokenizer_dir: str) -> None:
    """Load the tokenizer once per worker process; one thread per worker (the processes are the parallelism)."""
    global _worker_tokenizer, _worker_sep
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    _worker_tokenizer = load_tokenizer(tokenizer_dir)
    _worker_sep = document_separator(_worker_tokenizer)


def document_separator(tokenizer: Tokenizer) -> list[int]:
    """The ids after each document: the end-of-text token, else the tokenizer's "\\n\\n" (if it has it)."""
    if tokenizer.eot_id is not None:
        return [int(tokenizer.eot_id)]
    try:
        return list(tokenizer.encode("\n\n"))
    except TokenizerError:
        return []


def _encode_batch(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """The batch encoder, on one thread: tiktoken's for GPT-2, the `tokenizers` library's for the others."""
    encoding = getattr(tokenizer, "encoding", None)
    if encoding is not None:  # GPT2Tokenizer: tiktoken, one thread
        check_utf8_batch(texts)
        return encoding.encode_batch(texts, num_threads=1, allowed_special={EOT}, disallowed_special=())
    return tokenizer.encode_batch(texts)


def encode_segments(tokenizer: Tokenizer, sep: Sequence[int], segments: list[str], ends: list[bool], dtype: str,
                    one_thread: bool = True) -> np.ndarray:
    """The ids of ``segments`` in order, ``sep`` after each one that ends a document."""
    ids = _encode_batch(tokenizer, segments) if one_thread else tokenizer.encode_batch(segments)
    sep_ids = np.asarray(sep, dtype=dtype)
    parts = []
    for piece, end in zip(ids, ends):
        parts.append(np.asarray(piece, dtype=dtype))
        if end:
            parts.append(sep_ids)
    return np.concatenate(parts) if parts else np.zeros(0, dtype=dtype)


def encode_unit(segments: list[str], ends: list[bool], dtype: str) -> tuple[np.ndarray, int, int, float]:
    """In a worker: (ids, UTF-8 bytes, worker pid, seconds spent) of one unit."""
    t0 = time.perf_counter()
    assert _worker_tokenizer is not None, "the worker's tokenizer was not loaded"
    out = encode_segments(_worker_tokenizer, _worker_sep, segments, ends, dtype)
    n_bytes = sum(len(s.encode("utf-8", "surrogatepass")) for s in segments)
    return out, n_bytes, os.getpid(), time.perf_counter() - t0


def tokenize_text_stream(pieces: Iterable[str], cut: int, tokenizer: Tokenizer, dtype: np.dtype,
                         train_file: BinaryIO, val_file: BinaryIO) -> dict[str, int]:
    """A text given in pieces, tokenized unit by unit into two files: its first ``cut`` characters
    (training) and the rest (validation), with the ids that encoding each part whole gives.

    How ``train --data corpus.txt`` fills its token cache: no separator is added (the text is one
    stream), each part is cut only at safe points (``sources.safe_cut``), so no more than a few
    units of text and ids are ever in memory.
    """
    counts = {"train_tokens": 0, "val_tokens": 0, "train_chars": 0, "val_chars": 0, "train_bytes": 0, "val_bytes": 0}
    files = {"train": train_file, "val": val_file}

    def emit(split: str, text: str) -> None:
        if text:
            ids = encode_segments(tokenizer, [], [text], [False], dtype.name, one_thread=False)
            files[split].write(ids.tobytes())
            counts[f"{split}_tokens"] += ids.size
            counts[f"{split}_chars"] += len(text)
            counts[f"{split}_bytes"] += len(text.encode("utf-8", "surrogatepass"))

    buffer, split, seen = "", "train", 0
    for piece in pieces:
        if split == "train" and seen + len(piece) >= cut:  # the piece that holds the cut
            head, piece = piece[: cut - seen], piece[cut - seen:]
            emit("train", buffer + head)
            buffer, split = "", "val"
            seen = cut
        seen += len(piece)
        buffer += piece
        if len(buffer) >= UNIT_CHARS:
            at = safe_cut(buffer, 0, len(buffer))
            if at > 0:
                emit(split, buffer[:at])
                buffer = buffer[at:]
    emit(split, buffer)
    return counts


# --------------------------------------------------------------------------- shards


def shard_name(split: str, i: int) -> str:
    return f"{split}_{i:06d}.bin"


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


class ShardWriter:
    """One split's shards: ids appended to an open ``.partial`` file, renamed when it holds ``shard_tokens``."""

    def __init__(self, folder: Path, split: str, shard_tokens: int, dtype: np.dtype, state: Optional[dict] = None):
        self.folder, self.split, self.shard_tokens, self.dtype = folder, split, shard_tokens, dtype
        state = state or {}
        self.shards: list[dict] = list(state.get("shards", []))
        self.open_tokens = int(state.get("open_tokens", 0))
        self.tokens = int(state.get("tokens", 0))
        self.bytes = int(state.get("bytes", 0))
        self.documents = int(state.get("documents", 0))
        self.closed_one = False  # a shard was finished since the last checkpoint
        path, final = self.partial_path, folder / shard_name(split, len(self.shards))
        if not path.exists() and final.exists():  # killed after finishing this shard, before the index said so
            os.replace(final, path)
        self.file = open(path, "r+b" if path.exists() else "wb")
        self.file.truncate(self.open_tokens * dtype.itemsize)  # what a killed run wrote past its checkpoint goes
        self.file.seek(0, os.SEEK_END)

    @property
    def partial_path(self) -> Path:
        return self.folder / (shard_name(self.split, len(self.shards)) + ".partial")

    def write(self, ids: np.ndarray) -> None:
        while ids.size:
            take = ids[: self.shard_tokens - self.open_tokens]
            self.file.write(take.tobytes())
            self.open_tokens += take.size
            self.tokens += take.size
            ids = ids[take.size:]
            if self.open_tokens == self.shard_tokens:
                self._close_shard()

    def _close_shard(self) -> None:
        self.file.close()
        partial, name = self.partial_path, shard_name(self.split, len(self.shards))
        os.replace(partial, self.folder / name)
        self.shards.append({"file": name, "tokens": self.open_tokens, "sha256": _file_sha256(self.folder / name)})
        self.open_tokens, self.closed_one = 0, True
        self.file = open(self.partial_path, "wb")

    def finish(self) -> None:
        """Close the last, shorter shard (none if empty)."""
        if self.open_tokens:
            self._close_shard()
        self.file.close()
        self.partial_path.unlink(missing_ok=True)

    def state(self) -> dict:
        return {"shards": self.shards, "open_tokens": self.open_tokens, "tokens": self.tokens,
                "bytes": self.bytes, "documents": self.documents}

    def summary(self) -> dict:
        return {"shards": self.shards, "tokens": self.tokens, "bytes": self.bytes, "documents": self.documents}


# --------------------------------------------------------------------------- the tokenizer


def _sample_text(sources: Sequence[Source], cfg: PrepareConfig, bad: BadCounter) -> Iterator[str]:
    """Training documents' text, in order, until ``sample_bytes`` UTF-8 bytes: what a tokenizer learns from."""
    got, doc, split = 0, 0, None
    for source in sources:
        for segment, ends in read_documents(source, cfg.text_field, cfg.skip_bad, bad):
            if split is None:
                split = "val" if _is_val(doc, cfg) else "train"
            if split == "train":
                take = segment.encode("utf-8", "surrogatepass")[: cfg.sample_bytes - got].decode("utf-8", "ignore")
                got += len(take.encode("utf-8", "surrogatepass"))
                yield take
                if got >= cfg.sample_bytes:
                    return
            if ends:
                doc, split = doc + 1, None


def make_tokenizer(cfg: PrepareConfig, sources: Sequence[Source], log: Log) -> Tokenizer:
    """GPT-2's, a saved one (a folder), or a bpe / char tokenizer trained on a sample of the training documents."""
    if cfg.tokenizer == "gpt2":
        return build_tokenizer("gpt2")
    if cfg.tokenizer not in BUILDABLE_KINDS:
        return load_tokenizer(cfg.tokenizer)
    log(f"prepare: training the {cfg.tokenizer} tokenizer on up to {human_bytes(cfg.sample_bytes)} of the training documents")
    sample = list(_sample_text(sources, cfg, BadCounter()))
    if not any(sample):
        raise CorpusError("the training documents hold no text to train the tokenizer on")
    if cfg.tokenizer == "char":
        sample.append("\n")  # the document separator of a tokenizer without an end-of-text token
        return build_tokenizer("char", sample)
    return build_tokenizer("bpe", "".join(sample), vocab_size=cfg.vocab_size)


# --------------------------------------------------------------------------- prepare


def _settings(cfg: PrepareConfig) -> dict:
    """The settings that decide the shards' content (not how many workers make them)."""
    return {"version": PREPARE_VERSION, "unit_chars": UNIT_CHARS, "text_field": cfg.text_field,
            "shard_tokens": cfg.shard_tokens, "val_fraction": cfg.val_fraction, "val_docs": cfg.val_docs,
            "seed": cfg.seed, "skip_bad": cfg.skip_bad}


def _tokenizer_settings(cfg: PrepareConfig) -> dict:
    kind = cfg.tokenizer if cfg.tokenizer in BUILDABLE_KINDS else str(Path(cfg.tokenizer).resolve())
    return {"tokenizer": kind, "vocab_size": cfg.vocab_size if cfg.tokenizer == "bpe" else None,
            "sample_bytes": cfg.sample_bytes if cfg.tokenizer in ("bpe", "char") else None}


def _read_index(folder: Path) -> Optional[dict]:
    try:
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        return index if index.get("format") == INDEX_FORMAT else None
    except (OSError, ValueError, AttributeError):
        return None


def _write_index(folder: Path, index: dict) -> None:
    write_text_atomic(folder / INDEX_FILE, json.dumps(index, indent=1) + "\n")


def _remove_outputs(folder: Path) -> None:
    """The shards and index of an earlier, different preparation in ``folder``."""
    for f in list(folder.glob("train_*.bin*")) + list(folder.glob("val_*.bin*")):
        f.unlink()
    (folder / INDEX_FILE).unlink(missing_ok=True)


class Progress:
    """Bytes and tokens per second, an ETA, and (on request) each worker's share."""

    def __init__(self, total_input: int, every: float, per_worker: bool, log: Log):
        self.total_input, self.every, self.per_worker, self.log = total_input, every, per_worker, log
        self.t0 = self.last = time.perf_counter()
        self.bytes = self.tokens = 0
        self.workers: dict[int, list[float]] = collections.defaultdict(lambda: [0, 0, 0.0])  # bytes, tokens, busy s

    def add(self, n_bytes: int, n_tokens: int, pid: int, busy: float) -> None:
        self.bytes += n_bytes
        self.tokens += n_tokens
        w = self.workers[pid]
        w[0] += n_bytes
        w[1] += n_tokens
        w[2] += busy

    def maybe_log(self, input_done: int, force: bool = False) -> None:
        now = time.perf_counter()
        if not self.every or (not force and now - self.last < self.every):
            return
        self.last = now
        elapsed = max(now - self.t0, 1e-9)
        rate = self.bytes / elapsed
        done = min(max(input_done, 0), self.total_input)
        left = (self.total_input - done) / (done / elapsed) if done else float("nan")
        eta = f"ETA {_duration(left)}" if left == left else "ETA --"
        self.log(f"prepare: {human_bytes(self.bytes)} of text, {self.tokens:,} tokens in {_duration(elapsed)}: "
                 f"{human_bytes(rate)}/s, {self.tokens / elapsed / 1e6:.2f} M tokens/s; "
                 f"input {100 * done / max(self.total_input, 1):.0f}% read, {eta}")
        if self.per_worker:
            for pid, (b, t, busy) in sorted(self.workers.items()):
                self.log(f"  worker {pid}: {human_bytes(b)}, {int(t):,} tokens, busy {100 * busy / elapsed:.0f}%, "
                         f"{human_bytes(b / max(busy, 1e-9))}/s while busy")


def _duration(s: float) -> str:
    s = int(round(s))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def prepare(cfg: PrepareConfig, log: Log = lambda message: None) -> dict:
    """Tokenize ``cfg.inputs`` into shards in ``cfg.out``; returns the finished index (see the module's docstring)."""
    cfg.validate()
    folder = Path(cfg.out)
    if folder.exists() and not folder.is_dir():
        raise ConfigError(f"--out {folder} is a file; give a folder for the shards")
    sources = find_sources(cfg.inputs)
    fingerprints = [source_fingerprint(s.path) for s in sources]
    folder.mkdir(parents=True, exist_ok=True)
    old = _read_index(folder)
    tok_settings = _tokenizer_settings(cfg)
    tok_dir = folder / TOKENIZER_DIR

    same_inputs = old is not None and old.get("sources") == fingerprints
    if same_inputs and old.get("tokenizer", {}).get("settings") == tok_settings and tok_dir.is_dir():
        tokenizer = load_tokenizer(tok_dir)  # a resumed or repeated run: the tokenizer it trained
    else:
        tokenizer = make_tokenizer(cfg, sources, log)
        if tok_dir.exists():
            shutil.rmtree(tok_dir)
        tokenizer.save(tok_dir)
    dtype = np.dtype(np.uint16 if tokenizer.vocab_size <= 65_535 else np.uint32)
    key_src = json.dumps({"settings": _settings(cfg), "sources": fingerprints, "tokenizer": tokenizer.fingerprint()},
                         sort_keys=True)
    key = hashlib.sha256(key_src.encode()).hexdigest()

    if old is not None and old.get("key") == key and old.get("complete"):
        log(f"prepare: {folder} already holds these inputs prepared with this tokenizer and these settings")
        return old
    resume = old.get("progress") if old is not None and old.get("key") == key else None
    if resume is None:
        _remove_outputs(folder)
    else:
        log(f"prepare: resuming {folder} after {sum(len(resume[s]['shards']) for s in ('train', 'val'))} finished shards")

    index: dict[str, Any] = {
        "format": INDEX_FORMAT, "version": PREPARE_VERSION, "complete": False, "key": key,
        "dtype": dtype.name, "vocab_size": tokenizer.vocab_size, "eot_id": tokenizer.eot_id,
        "tokenizer": {"kind": tokenizer.kind, "dir": TOKENIZER_DIR, "fingerprint": tokenizer.fingerprint(),
                      "settings": tok_settings},
        "settings": _settings(cfg), "sources": fingerprints,
    }
    writers = {s: ShardWriter(folder, s, cfg.shard_tokens, dtype, (resume or {}).get(s)) for s in ("train", "val")}
    skip = int(resume["units"]) if resume else 0
    bad = BadCounter()
    reading = Reading(sources, cfg, bad)
    total_input = sum(f["size"] for f in fingerprints)
    progress = Progress(total_input, cfg.progress_every, cfg.per_worker, log)
    log(f"prepare: {len(sources)} input file(s), {human_bytes(total_input)}, {cfg.workers} worker(s), "
        f"tokenizer {tokenizer.kind} ({tokenizer.vocab_size:,} tokens, {dtype.name} shards of {cfg.shard_tokens:,})")

    def checkpoint(units_done: int) -> None:
        index["progress"] = {"units": units_done, **{s: w.state() for s, w in writers.items()}}
        _write_index(folder, index)
        for w in writers.values():
            w.closed_one = False

    def done(unit: Unit, result: tuple[np.ndarray, int, int, float], units_done: int) -> None:
        ids, n_bytes, pid, busy = result
        w = writers[unit.split]
        w.write(ids)
        w.bytes += n_bytes
        w.documents += sum(unit.ends)
        progress.add(n_bytes, ids.size, pid, busy)
        if any(x.closed_one for x in writers.values()):
            checkpoint(units_done)
        progress.maybe_log(reading.input_done)

    for_workers = enumerate(reading.units())
    if cfg.workers == 1:
        _run_inline(tok_dir, for_workers, skip, dtype, done)
    else:
        _run_pool(tok_dir, cfg.workers, for_workers, skip, dtype, done)
    for w in writers.values():
        w.finish()
    progress.maybe_log(total_input, force=True)
    index.pop("progress", None)
    index.update(complete=True, train=writers["train"].summary(), val=writers["val"].summary(),
                 val_shards=[s["file"] for s in writers["val"].shards],
                 skipped_bad=bad.count, skipped_examples=bad.examples)
    _write_index(folder, index)
    if bad.count:
        log(f"prepare: skipped {bad.count:,} bad document(s) or file(s), e.g. {bad.examples[0]}")
    t, v = index["train"], index["val"]
    log(f"prepare: wrote {folder}: train {t['tokens']:,} tokens ({t['documents']:,} documents, {len(t['shards'])} "
        f"shards), validation {v['tokens']:,} tokens ({v['documents']:,} documents, {len(v['shards'])} shards)")
    return index


def _run_inline(tok_dir: Path, units: Iterator[tuple[int, Unit]], skip: int, dtype: np.dtype,
                done: Callable[[Unit, tuple, int], None]) -> None:
    """One worker: this process encodes each unit itself."""
    global _worker_tokenizer, _worker_sep
    _worker_tokenizer = load_tokenizer(tok_dir)
    _worker_sep = document_separator(_worker_tokenizer)
    for i, unit in units:
        if i >= skip:
            done(unit, encode_unit(unit.segments, unit.ends, dtype.name), i + 1)


def _run_pool(tok_dir: Path, workers: int, units: Iterator[tuple[int, Unit]], skip: int, dtype: np.dtype,
              done: Callable[[Unit, tuple, int], None]) -> None:
    """Several workers: units go out in order, at most ``2 × workers + 2`` at a time, and come back in order."""
    ctx = multiprocessing.get_context("spawn")  # no fork of a process that may hold threads (torch, tokenizers)
    in_flight: collections.deque = collections.deque()
    with ctx.Pool(workers, initializer=_init_worker, initargs=(str(tok_dir),)) as pool:
        for i, unit in units:
            if i < skip:
                continue
            in_flight.append((i, unit, pool.apply_async(encode_unit, (unit.segments, unit.ends, dtype.name))))
            while len(in_flight) >= 2 * workers + 2:
                j, u, result = in_flight.popleft()
                done(u, result.get(), j + 1)
        while in_flight:
            j, u, result = in_flight.popleft()
            done(u, result.get(), j + 1)


def describe(index: dict) -> str:
    """One line about a prepared folder's index, for logs."""
    t, v = index["train"], index["val"]
    return (f"{t['tokens']:,} training tokens ({human_bytes(t['bytes'])} of text, {t['documents']:,} documents) and "
            f"{v['tokens']:,} validation tokens ({v['documents']:,} documents), tokenizer {index['tokenizer']['kind']}")


if __name__ == "__main__":  # pragma: no cover - run through `llmscratch prepare`
    sys.exit("use: llmscratch prepare --data PATH --out DIR")
