"""``llmscratch finetune --task classify``: the classification task's options and run (a placeholder).

The classification task plugs in here; ``cli/finetune.py`` imports this module lazily and calls:

- ``add_classify_options(group)``: add the task's own options to the ``finetune`` parser
  (an ``argparse`` argument group; use option names no other task uses, e.g. ``--num-classes``,
  ``--label-field``), each with help;
- ``run_classify(args, opts, log) -> Path``: fine-tune with ``opts`` (a
  ``training.finetune.FinetuneOptions``, the shared options already parsed; put the task's own
  in ``opts.extra`` so that ``finetune.json`` saves them and ``--resume`` restores them) by
  calling ``training.finetune.finetune(opts, make_task)`` with a factory that builds a
  ``FinetuneTask`` (``tasks.Task`` plus ``train_examples``, ``data_sha``, ``adapt(model)``,
  ``before(run)``, ``after(run, state)``; see ``training/instruct.py`` for the instruction task).

Until the classification task lands, both exist and ``run_classify`` says it is not available.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any, Callable


def add_classify_options(group: argparse._ArgumentGroup) -> None:
    """The classification task's own options (none yet)."""


def run_classify(args: argparse.Namespace, opts: Any, log: Callable[[str], None] = print) -> Path:
    """Fine-tune for classification (not available in this version)."""
    from ..errors import ConfigError

    raise ConfigError("--task classify is not available in this version of llmscratch; use --task instruct")
