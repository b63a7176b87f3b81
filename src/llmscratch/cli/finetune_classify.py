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

What the shared run (``training/finetune.py``) does with a task, in order: ``task = make_task(opts,
tokenizer, runtime, log)``; ``model = task.adapt(model)`` (swap in a class head here); the task's
``new_parameters(model)`` if it has one (they learn under every ``--train``: all, last-block, lora);
``task.start(run, step)`` if it has one (a resume's first step, for the batch order); ``task.before(run)``
on a new run; ``run_loop``; ``task.after(run, state)`` unless stopped. ``task.evaluate`` returns at
least ``loss``, ``ppl``, ``bpb`` and ``tokens``: ``bpb`` is what picks ``best/`` (lower is better; a
classifier may put its loss or error rate there). ``task.data_sha`` must change when the data do
(``finetune.data_fingerprint``). Note that a LoRA run's weights file holds the adapters only (the
lora branch's ``store/lora.py``): a new head must be saved another way. A new head also changes
the model ``config.json`` describes: ``load_model`` must be able to rebuild it.

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
