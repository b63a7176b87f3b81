"""Labelled texts for classification: read from CSV, TSV or JSON Lines, balanced, split, tokenized.

```
file (CSV / TSV / JSONL)  ──read──▶ [(text, label, line)]      --text-column, --label-column
                          ──balance (optional)──▶ every class cut to the smallest's size, seeded
                          ──split──▶ train 70 % / val 10 % / test 20 %, seeded (or separate files)
                          ──encode──▶ token ids, cut to the context (counted and reported)
```

The balancing and the split reproduce the book's chapter 6 (``create_balanced_dataset``,
``random_split``): pandas' ``sample(random_state=seed)`` draws ``RandomState(seed).choice(n, k,
replace=False)``, and so do we, without pandas. With the spam data and seed 123 the three
splits hold the very rows of the book's.

The built-in ``testament`` data needs no download: the King James verses of the built-in corpus,
each labelled with its testament (Old: Genesis to Malachi; New: Matthew to Revelation).
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..errors import LLMScratchError
from ..files import decode_utf8

BUILTIN_DATA = ("testament",)
FIRST_NEW_TESTAMENT_BOOK = "Matthew"


class LabelledDataError(LLMScratchError, ValueError):
    """A labelled data file that cannot be used as it is (its name and line in the message)."""


@dataclass(frozen=True)
class Example:
    """One labelled text, and where it came from (``line``: 1-based line of the file)."""

    text: str
    label: str
    source: str
    line: int


def _format(path: Path) -> str:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json", ".ndjson"):
        return "jsonl"
    if suffix in (".tsv", ".tab"):
        return "tsv"
    if suffix == ".csv":
        return "csv"
    raise LabelledDataError(f"{path}: unknown format {suffix or '(no extension)'}; give a .csv, .tsv or .jsonl file")


def _rows(path: Path, text: str, fmt: str, text_column: str, label_column: str) -> list[tuple[int, object, object]]:
    """``(line, text value, label value)`` for each row of the file."""
    rows: list[tuple[int, object, object]] = []
    if fmt == "jsonl":
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise LabelledDataError(f"{path}, line {n}: not JSON ({e.msg})") from None
            if not isinstance(record, dict):
                raise LabelledDataError(f"{path}, line {n}: each line must be a JSON object, got {type(record).__name__}")
            for column in (text_column, label_column):
                if column not in record:
                    raise LabelledDataError(f"{path}, line {n}: no {column!r} field (it has {sorted(record)}); "
                                            f"name the fields with --text-column and --label-column")
            rows.append((n, record[text_column], record[label_column]))
        return rows
    reader = csv.reader(io.StringIO(text, newline=""), delimiter="\t" if fmt == "tsv" else ",")
    header = next(reader, None)
    if header is None:
        raise LabelledDataError(f"{path} is empty: it needs a header line naming the columns and one row per text")
    for column in (text_column, label_column):
        if column not in header:
            raise LabelledDataError(f"{path}, line 1: no column {column!r} in the header {header}; name the "
                                    f"columns with --text-column and --label-column")
    ti, li = header.index(text_column), header.index(label_column)
    for row in reader:
        n = reader.line_num
        if not row or row == [""]:
            continue
        if len(row) <= max(ti, li):
            raise LabelledDataError(f"{path}, line {n}: {len(row)} field(s), but the header has {len(header)}")
        rows.append((n, row[ti], row[li]))
    return rows


def read_labelled(path: str | Path, text_column: str = "text", label_column: str = "label") -> list[Example]:
    """The labelled texts of a CSV, TSV or JSONL file; an empty text or label names its line."""
    path = Path(path)
    if not path.is_file():
        raise LabelledDataError(f"{path}: no such file; give a .csv, .tsv or .jsonl file with a text and a label "
                                f"column (or --data testament, the built-in task)")
    text = decode_utf8(path.read_bytes(), str(path), LabelledDataError)
    rows = _rows(path, text, _format(path), text_column, label_column)
    examples = []
    for n, text, label in rows:
        if not isinstance(text, str) or not text.strip():
            raise LabelledDataError(f"{path}, line {n}: the text ({text_column!r}) is empty; remove the line or "
                                    "give it a text")
        if isinstance(label, (dict, list)) or label is None or not str(label).strip():
            raise LabelledDataError(f"{path}, line {n}: the label ({label_column!r}) is empty or not a single value")
        examples.append(Example(text, str(label).strip(), str(path), n))
    if not examples:
        raise LabelledDataError(f"{path} holds no labelled texts")
    return examples


def testament_examples() -> list[Example]:
    """Every King James verse of the built-in corpus, labelled ``Old`` or ``New`` by its testament."""
    from .corpus import builtin_corpus_path

    path = builtin_corpus_path()
    examples, label = [], "Old"
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, start=1):
            if not line.strip():
                continue
            verse = json.loads(line)
            if verse["book"] == FIRST_NEW_TESTAMENT_BOOK:
                label = "New"
            examples.append(Example(verse["text"], label, "testament", n))
    return examples


def load_examples(data: str, text_column: str = "text", label_column: str = "label") -> list[Example]:
    """A file's labelled texts, or the built-in task's (``testament``)."""
    if data == "testament" and not Path(data).exists():
        return testament_examples()
    return read_labelled(data, text_column, label_column)


def label_map(examples: Sequence[Example], source: str) -> list[str]:
    """The class names in id order: sorted (numerically when every label is a number); at least two."""
    names = sorted({e.label for e in examples})
    if len(names) < 2:
        raise LabelledDataError(f"{source}: every text has the label {names[0]!r}; a classifier needs at least "
                                "two classes")
    try:
        return sorted(names, key=float)
    except ValueError:
        return names


def balance(examples: Sequence[Example], seed: int = 123) -> list[Example]:
    """Every class sampled down to the smallest class's size, as the book's ``create_balanced_dataset``.

    In order of first appearance, each class but the smallest is sampled (``RandomState(seed)
    .choice``, as pandas' ``sample(n, random_state=seed)``); the smallest follows as it is.
    """
    by_class: dict[str, list[Example]] = {}
    for e in examples:
        by_class.setdefault(e.label, []).append(e)
    smallest = min(by_class, key=lambda k: len(by_class[k]))
    n = len(by_class[smallest])
    out: list[Example] = []
    for name, members in by_class.items():
        if name != smallest:
            picks = np.random.RandomState(seed).choice(len(members), size=n, replace=False)
            out.extend(members[i] for i in picks)
    return out + by_class[smallest]


def split(examples: Sequence[Example], train_frac: float = 0.7, val_frac: float = 0.1,
          seed: int = 123) -> tuple[list[Example], list[Example], list[Example]]:
    """Shuffled (seeded) and cut into train, validation and test, as the book's ``random_split``."""
    order = np.random.RandomState(seed).choice(len(examples), size=len(examples), replace=False)
    shuffled = [examples[i] for i in order]
    train_end = int(len(shuffled) * train_frac)
    val_end = train_end + int(len(shuffled) * val_frac)
    return shuffled[:train_end], shuffled[train_end:val_end], shuffled[val_end:]


@dataclass
class Encoded:
    """Token ids and class ids of a set of examples; ``cut``: how many texts were cut to fit."""

    ids: list[list[int]]
    labels: list[int]
    cut: int


def encode(examples: Sequence[Example], tokenizer, classes: Sequence[str], max_tokens: int,
           source: Optional[str] = None) -> Encoded:
    """Token ids of each text, cut to ``max_tokens`` (the model's context); a label not among ``classes``
    names its file and line."""
    index = {name: i for i, name in enumerate(classes)}
    ids, labels, cut = [], [], 0
    for e in examples:
        if e.label not in index:
            raise LabelledDataError(f"{e.source}, line {e.line}: label {e.label!r} is not one of the run's classes "
                                    f"{list(classes)}")
        tokens = tokenizer.encode(e.text)
        if not tokens:
            raise LabelledDataError(f"{e.source}, line {e.line}: the text encodes to no tokens")
        if len(tokens) > max_tokens:
            tokens, cut = tokens[:max_tokens], cut + 1
        ids.append(tokens)
        labels.append(index[e.label])
    return Encoded(ids, labels, cut)
