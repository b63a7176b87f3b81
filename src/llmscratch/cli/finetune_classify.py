"""``llmscratch finetune RUN --task classify --data FILE``: a classifier fine-tuned from RUN.

``cli/finetune.py`` imports this module lazily: :func:`add_classify_options` adds the task's
options to the ``finetune`` parser, :func:`run_classify` runs it through the shared
fine-tuning run (``training/finetune.py``) with the task of ``training/classify.py``. The
task's options go into ``opts.extra`` (saved in ``finetune.json``; ``--resume`` restores them).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable

# The classification task's own options (dest names), kept in finetune.json's options.extra.
CLASSIFY_OPTIONS = ("text_column", "label_column", "balance", "pool")
# Options of the instruction group that classify reads too (held-out files and fractions).
SHARED_EXTRA = ("val_data", "test_data", "val_fraction", "test_fraction")


def add_classify_options(group: argparse._ArgumentGroup) -> None:
    """``--text-column``, ``--label-column``, ``--balance``, ``--pool`` (``--val-data``, ``--test-data`` and the
    fractions are the instruction group's, read by both tasks)."""
    group.add_argument("--text-column", help="the column (CSV/TSV header) or field (JSONL) of the texts "
                       "(default text)")
    group.add_argument("--label-column", help="the column or field of the labels (default label)")
    group.add_argument("--balance", action="store_const", const=True,
                       help="sample every class down to the smallest class's size (seeded), as the book does "
                       "(always on for --data testament)")
    group.add_argument("--pool", choices=("last", "mean", "end"),
                       help="what the class head reads: the last real token's state (the book's method), the mean "
                       "over the text's tokens, or the last position of a batch padded to the longest training text "
                       "(the book's code exactly) (default last)")


def run_classify(args: argparse.Namespace, opts: Any, given: set[str], log: Callable[[str], None] = print) -> Path:
    """Fine-tune a classifier with the shared options ``opts`` (``given``: the names of those the command line
    gave) and this task's from ``args``; the new run's folder.

    Split by default 70 % / 10 % / 20 % (train / validation / test, seeded, as the book);
    ``--val-fraction``/``--test-fraction`` change it, ``--val-data``/``--test-data`` give files.
    """
    from ..training.classify import make_classify_task
    from ..training.finetune import finetune
    mine = {k: getattr(args, k) for k in CLASSIFY_OPTIONS if getattr(args, k, None) is not None}
    opts.extra.update(mine)
    given = set(given)
    if mine:
        given.add("extra")
    return finetune(opts, make_classify_task, log, given)
