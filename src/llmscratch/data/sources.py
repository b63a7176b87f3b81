"""Input files as a stream of documents: text, JSONL and Parquet, plain or compressed, never read whole.

```
find_sources(["books/", "web/*.jsonl.zst"])   the files: folders searched, globs expanded, sorted
read_documents(source, ...)                   (text segment, end of document?) pairs, a few MB at most each
source_fingerprint(path)                      size and modification time: what tells a changed input
```

What a document is depends on the format: a JSONL line's text field, a Parquet row's text
column, or the text of a text file between ``<|endoftext|>`` markers (a file without one is one
document). A long document comes in segments cut where tokenizing the pieces gives the same ids
as tokenizing the whole (after a newline that follows a non-space and precedes one, see
``tokenizer.split_for_encoding``), so no document needs to be held whole.

Bad input (bytes that are not UTF-8, a line that is not JSON, a missing or non-text field) is a
:class:`CorpusError` naming the file and the line; with ``skip_bad`` the document is left out and
counted in :class:`BadCounter` instead.
"""

from __future__ import annotations

import codecs
import glob
import gzip
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Iterator, Optional, Sequence

from ..errors import CorpusError
from .tokenizer_base import EOT

GLOB_CHARS = set("*?[")
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd", ".zstd": "zstd"}
FORMATS = {".txt": "text", ".text": "text", ".md": "text", ".jsonl": "jsonl", ".ndjson": "jsonl",
           ".json": "jsonl", ".parquet": "parquet"}
READ_BYTES = 1 << 20  # bytes read from a file at a time
SEGMENT_CHARS = 1 << 20  # a long document is passed on in segments of about this many characters


@dataclass(frozen=True)
class Source:
    """One input file: its path, format ("text", "jsonl", "parquet") and compression (None, "gzip", "zstd")."""

    path: Path
    format: str
    compression: Optional[str] = None


@dataclass
class BadCounter:
    """Documents skipped as bad (``--skip-bad``), and the first few reasons, for the report."""

    count: int = 0
    examples: list[str] = field(default_factory=list)

    def add(self, reason: str) -> None:
        self.count += 1
        if len(self.examples) < 5:
            self.examples.append(reason)


@dataclass
class ReadPosition:
    """How far into the file being read the reading has got, in bytes of the file (compressed or not): for an ETA."""

    raw: Optional[IO[bytes]] = None

    def bytes_read(self) -> int:
        try:
            return self.raw.tell() if self.raw is not None and not self.raw.closed else 0
        except (OSError, ValueError):
            return 0


def classify(path: Path) -> Source:
    """The format and compression of ``path`` from its name: ``web.jsonl.zst`` is zstd-compressed JSONL."""
    suffixes = [s.lower() for s in path.suffixes]
    compression = COMPRESSIONS.get(suffixes[-1]) if suffixes else None
    if compression:
        suffixes = suffixes[:-1]
    fmt = FORMATS.get(suffixes[-1], "text") if suffixes else "text"
    if fmt == "parquet" and compression:
        raise CorpusError(f"{path}: a Parquet file compresses its own columns; decompress it first")
    return Source(path, fmt, compression)


def _known(path: Path) -> bool:
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSIONS:
        suffixes = suffixes[:-1]
    return bool(suffixes) and suffixes[-1] in FORMATS


def find_sources(paths: Sequence[str | os.PathLike]) -> list[Source]:
    """The input files named by ``paths``: a file as is, a folder's files of a known format (``.txt``,
    ``.jsonl``, ``.parquet``, each also ``.gz`` / ``.zst``) below it, sorted, a glob's matches, sorted.
    A file named twice is read once."""
    files: list[Path] = []
    for given in paths:
        text, p = str(given), Path(given).expanduser()
        if p.is_file():
            found = [p]
        elif p.is_dir():
            found = sorted(f for f in p.rglob("*") if f.is_file() and _known(f))
            if not found:
                raise CorpusError(f"the folder {p} has no .txt, .jsonl or .parquet files (plain, .gz or .zst)")
        elif GLOB_CHARS & set(text):
            found = sorted(Path(f) for f in glob.glob(os.path.expanduser(text), recursive=True) if os.path.isfile(f))
            if not found:
                raise CorpusError(f"no file matched the pattern {text!r}")
        else:
            raise CorpusError(f"input not found: {p} is neither a file, a folder nor a glob")
        files.extend(found)
    seen: set[Path] = set()
    unique = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            unique.append(f)
    return [classify(f) for f in unique]


def source_fingerprint(path: Path) -> dict:
    """What tells that an input changed without reading it: its size and modification time."""
    st = path.stat()
    return {"path": str(path), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def open_binary(source: Source, position: Optional[ReadPosition] = None) -> IO[bytes]:
    """The file's bytes, decompressed as a stream; ``position`` follows the file's own offset."""
    try:
        raw = open(source.path, "rb")
    except OSError as e:
        raise CorpusError(f"cannot read {source.path}: {e.strerror or e}") from e
    if position is not None:
        position.raw = raw
    if source.compression == "gzip":
        return gzip.GzipFile(fileobj=raw)  # type: ignore[return-value]
    if source.compression == "zstd":
        try:
            import zstandard
        except ImportError:
            raw.close()
            raise CorpusError(f"{source.path} is zstd-compressed: install zstandard (pip install 'llmscratch[parquet]')") from None
        return io.BufferedReader(zstandard.ZstdDecompressor().stream_reader(raw, closefd=True))  # type: ignore[arg-type]
    return raw


def safe_cut(text: str, lo: int, hi: int) -> int:
    """The last safe cut in ``text[lo:hi]``: just after a newline that follows a non-space and
    precedes one (where ``split_for_encoding`` cuts), or -1."""
    i = text.rfind("\n", lo, hi - 1)
    while i > lo:
        if i + 1 < len(text) and not text[i - 1].isspace() and not text[i + 1].isspace():
            return i + 1
        i = text.rfind("\n", lo, i)
    return -1


def _segments(text: str) -> Iterator[str]:
    """``text`` in segments of about SEGMENT_CHARS, cut only at safe points (a text without one stays whole)."""
    start = 0
    while len(text) - start > SEGMENT_CHARS:
        cut = safe_cut(text, start, start + SEGMENT_CHARS)
        if cut <= start:
            cut = safe_cut(text, start, len(text))  # no cut in this stretch: the last one in the rest
            if cut <= start:
                break
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def _decode_error(source: Source, consumed: bytes, lines_before: int, err: UnicodeDecodeError, offset: int) -> CorpusError:
    line = lines_before + consumed[: err.start].count(b"\n") + 1
    return CorpusError(f"{source.path}, line {line}: not valid UTF-8 (the byte 0x{consumed[err.start]:02x} at byte "
                       f"offset {offset + err.start} cannot be decoded: {err.reason}); convert the file to UTF-8, "
                       "or pass --skip-bad to leave the file out")


def _text_documents(source: Source, skip_bad: bool, bad: BadCounter,
                    position: Optional[ReadPosition] = None) -> Iterator[tuple[str, bool]]:
    """A text file's documents (split at ``<|endoftext|>``), in segments; a file that is not UTF-8 is
    an error naming its line, or with ``skip_bad`` left out from that point on."""
    decoder = codecs.getincrementaldecoder("utf-8-sig")()
    pending = ""  # text of the current document not yet passed on
    offset = lines = 0
    started = False  # the current document has given at least one segment
    with open_binary(source, position) as f:
        while True:
            block = f.read(READ_BYTES)
            try:
                pending += decoder.decode(block, final=not block)
            except UnicodeDecodeError as err:
                error = _decode_error(source, block, lines, err, offset)
                if not skip_bad:
                    raise error from None
                bad.add(str(error))
                if started:  # the document begun before the bad byte ends here
                    yield "", True
                return
            offset += len(block)
            lines += block.count(b"\n")
            # whole documents first
            while True:
                at = pending.find(EOT)
                if at < 0:
                    break
                yield pending[:at], True
                pending, started = pending[at + len(EOT):], False
            # then, for a long document, the segments before its last safe cut (a marker may straddle blocks)
            if len(pending) > SEGMENT_CHARS:
                cut = safe_cut(pending, 0, len(pending) - len(EOT))
                if cut > 0:
                    for seg in _segments(pending[:cut]):
                        yield seg, False
                    pending, started = pending[cut:], True
            if not block:
                break
    if pending or started:
        yield pending, True


def _jsonl_documents(source: Source, text_field: str, skip_bad: bool, bad: BadCounter,
                     position: Optional[ReadPosition] = None) -> Iterator[tuple[str, bool]]:
    with open_binary(source, position) as f:
        for line_no, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
                record = json.loads(line)
            except UnicodeDecodeError as e:
                problem = f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
            except ValueError as e:
                problem = f"not JSON ({e})"
            else:
                value = record.get(text_field) if isinstance(record, dict) else None
                if isinstance(value, str):
                    for seg, last in _with_last(_segments(value)):
                        yield seg, last
                    continue
                if not isinstance(record, dict):
                    problem = f"a JSON {type(record).__name__}, not an object with a {text_field!r} field"
                elif text_field not in record:
                    keys = ", ".join(sorted(record)[:8])
                    problem = f"no {text_field!r} field (it has: {keys or 'no fields'}); choose the field with --text-field"
                else:
                    problem = f"the {text_field!r} field is {type(value).__name__}, not text"
            message = f"{source.path}, line {line_no}: {problem}"
            if not skip_bad:
                raise CorpusError(message + "; fix the line, or pass --skip-bad to skip such lines")
            bad.add(message)


def _parquet_documents(source: Source, text_field: str, skip_bad: bool, bad: BadCounter) -> Iterator[tuple[str, bool]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise CorpusError(f"{source.path} is Parquet: install pyarrow (pip install 'llmscratch[parquet]')") from None
    try:
        pf = pq.ParquetFile(source.path)
    except Exception as e:  # pyarrow raises its own ArrowInvalid / OSError for a damaged file
        raise CorpusError(f"{source.path}: not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise CorpusError(f"{source.path}: no column {text_field!r} (it has: {', '.join(names[:8])}); "
                          "choose the column with --text-field")
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            if isinstance(value, str):
                for seg, last in _with_last(_segments(value)):
                    yield seg, last
                continue
            message = f"{source.path}, row {row}: the {text_field!r} column is {type(value).__name__}, not text"
            if not skip_bad:
                raise CorpusError(message + "; pass --skip-bad to skip such rows")
            bad.add(message)


def _with_last(items: Iterator[str]) -> Iterator[tuple[str, bool]]:
    """Each item with whether it is the last one."""
    prev: Optional[str] = None
    for item in items:
        if prev is not None:
            yield prev, False
        prev = item
    yield (prev if prev is not None else ""), True


def read_documents(source: Source, text_field: str = "text", skip_bad: bool = False,
                   bad: Optional[BadCounter] = None, position: Optional[ReadPosition] = None) -> Iterator[tuple[str, bool]]:
    """The documents of one file as ``(segment, ends_document)`` pairs, read as a stream."""
    bad = bad if bad is not None else BadCounter()
    if source.format == "jsonl":
        return _jsonl_documents(source, text_field, skip_bad, bad, position)
    if source.format == "parquet":
        return _parquet_documents(source, text_field, skip_bad, bad)
    return _text_documents(source, skip_bad, bad, position)
