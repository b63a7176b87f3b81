"""Experiments that turn open questions about attention into runs anyone can repeat.

Each module trains a few small models that differ in one thing and writes a report
(``report.md``, ``results.json``, PNG plots) under ``out_dir/<name>/``:

* ``scaling``   – with and without the 1/√d_k factor, at several head sizes;
* ``positions`` – learned, sinusoidal, RoPE, ALiBi and no positions, also past the training context;
* ``heads``     – 1, 2, 4, 8 heads at a fixed width, and how different the heads' patterns are;
* ``batching``  – throughput and loss against batch size at a fixed token budget, and proof
  that the sequences of a batch do not see each other.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Optional

from ...errors import ConfigError
from .common import MODES, Log, Report, check_output_folder, print_progress

NAMES = ("scaling", "positions", "heads", "batching")


def summaries() -> dict[str, str]:
    """Each experiment's one-line description, by name."""
    return {name: importlib.import_module(f"{__name__}.{name}").SUMMARY for name in NAMES}


def run_experiment(name: str, mode: str = "full", out_dir: str | Path = "experiments", device: str = "auto",
                   seed: int = 1337, data: Optional[str] = None, encoding: str = "utf-8",
                   log: Optional[Log] = print_progress) -> Report:
    """Run one experiment and return its report (also written to ``out_dir/<name>/``).

    ``data``: a text file, folder or glob read as ``encoding`` instead of the size's own corpus.
    ``log``: where the progress lines go (one as each model starts training, one as it ends);
    stdout by default, ``None`` to run silently.
    """
    from ...runtime import setup_runtime

    if name not in NAMES:
        raise ConfigError(f"unknown experiment {name!r}; choose one of {', '.join(NAMES)} (see --list)")
    if mode not in MODES:
        raise ConfigError(f"experiment mode must be one of {MODES}, got {mode!r}")
    check_output_folder(Path(out_dir) / name)
    runtime = setup_runtime(device, "auto")
    module = importlib.import_module(f"{__name__}.{name}")
    return module.run(mode, Path(out_dir), runtime, seed=seed, data_path=data, encoding=encoding, log=log)
