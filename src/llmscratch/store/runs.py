"""The runs in a folder, one line each: what ``llmscratch runs`` and ``llmscratch info runs/`` print.

A training run lives in ``<out_dir>/<name>`` (``runs/`` by default) and ``<out_dir>/latest``
points at the newest one that saved a checkpoint. :func:`list_runs` gives a row per folder
there: its step (of the steps asked for), the best validation bits per byte, its size on
disk and when it was last saved, with ``latest`` marked. A folder that is not a run is
listed with what it is instead (:func:`checkpoint.folder_kind`, the same classification
as the errors of loading one). Everything comes from file headers and small files: no
weights or optimizer state are read, so a listing of large runs stays quick.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from . import checkpoint as ckpt
from .rundir import LATEST, TRAIN_CONFIG_FILE, RunDir
from ..errors import CheckpointError
from ..files import PathLike, human_bytes


@dataclass(frozen=True)
class RunRow:
    """One folder of a runs folder, as a listing shows it.

    ``kind``: ``"run"``, or what the folder is instead (then the numbers are None).
    ``step``: the newest checkpoint's step (None for weights that were not trained here,
    such as an import); ``steps``: the steps the training was asked for (train_config.json);
    ``best_bpb``: the best validation bits per byte during training (metrics.jsonl);
    ``size``: bytes of every file under the folder; ``saved``: when its weights were last
    written (seconds since the epoch); ``latest``: ``<folder>/latest`` points here.
    """

    name: str
    path: Path
    kind: str
    latest: bool = False
    step: Optional[int] = None
    steps: Optional[int] = None
    best_bpb: Optional[float] = None
    size: int = 0
    saved: Optional[float] = None


def is_runs_folder(folder: PathLike) -> bool:
    """Whether ``folder`` holds runs rather than being one: no config.json of its own, and a
    ``latest`` link or a subfolder that is (or was started as) a run."""
    folder = Path(folder)
    if not folder.is_dir() or (folder / ckpt.CONFIG_FILE).exists():
        return False
    if (folder / LATEST).is_symlink():
        return True
    return any(child.is_dir() and ((child / ckpt.CONFIG_FILE).is_file() or (child / TRAIN_CONFIG_FILE).is_file())
               for child in folder.iterdir() if not child.name.startswith("."))


def list_runs(folder: PathLike = "runs") -> list[RunRow]:
    """A row per folder in ``folder``, oldest save first (so ``latest`` is usually near the end).

    Files and hidden entries are left out; a folder that is not a run is a row saying what it
    is. Raises CheckpointError when ``folder`` does not exist or is itself a run.
    """
    folder = Path(folder)
    if not folder.is_dir():
        where = "is a file" if folder.exists() else "does not exist"
        raise CheckpointError(f"{folder} {where}: give the folder runs are saved in (train's --out-dir, "
                              "default runs)")
    if (folder / ckpt.CONFIG_FILE).is_file():
        raise CheckpointError(f"{folder} is a run, not a folder of runs: `llmscratch info {folder}` describes it, "
                              f"`llmscratch runs {folder.parent}` lists it with the others")
    latest = folder / LATEST
    target = (folder / os.readlink(latest)).resolve() if latest.is_symlink() else None
    rows = []
    for child in sorted(folder.iterdir()):
        if child.name.startswith(".") or child == latest and target is not None and target.is_dir():
            continue  # `latest` itself is a mark on its target's row, unless its target is gone
        if not child.is_dir() and not child.is_symlink():
            continue
        rows.append(_row(child, latest=target is not None and child.resolve() == target))
    return sorted(rows, key=lambda r: (r.kind != "run", r.saved or 0.0, r.name))


def _row(path: Path, latest: bool) -> RunRow:
    kind = ckpt.folder_kind(path)
    if kind != "run":
        return RunRow(path.name, path, kind, latest=latest, size=_size(path) if path.is_dir() else 0)
    try:
        step = ckpt.checkpoint_step(path)
    except CheckpointError:
        step = None
    steps = None
    if (path / TRAIN_CONFIG_FILE).is_file():
        try:
            steps = ckpt.read_json(path / TRAIN_CONFIG_FILE).get("steps")
        except CheckpointError:
            pass
    weights = path / ckpt.WEIGHTS_FILE
    saved = (weights if weights.is_file() else path / ckpt.CONFIG_FILE).stat().st_mtime
    return RunRow(path.name, path, kind, latest=latest, step=step, steps=steps if isinstance(steps, int) else None,
                  best_bpb=_best_bpb(RunDir(path)), size=_size(path), saved=saved)


def _best_bpb(run: RunDir) -> Optional[float]:
    """The lowest validation bits per byte recorded during training (not the final whole-split one)."""
    values = [r["val_bpb"] for r in run.read_metrics()
              if isinstance(r.get("val_bpb"), (int, float)) and not r.get("final")]
    return min(values, default=None)


def _size(path: Path) -> int:
    """Bytes of every file under ``path`` (links not followed)."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # removed meanwhile
                pass
    return total


def format_runs(rows: list[RunRow], folder: PathLike) -> str:
    """The listing as text: a header, then a line per row with its columns aligned; ``latest`` marked.

    A folder that is not a run shows its name and what it is instead.
    """
    if not rows:
        return f"no runs in {folder} (`llmscratch train --out-dir {folder}` saves them there)"
    header = ("name", "step", "best val bpb", "size", "saved")
    table = []
    for r in rows:
        if r.kind != "run":
            continue
        step = "imported" if r.step is None and r.steps is None else (
            f"{r.step if r.step is not None else '?'}" + (f" of {r.steps}" if r.steps else ""))
        table.append((r.name, step, f"{r.best_bpb:.4f}" if r.best_bpb is not None else "-", human_bytes(r.size),
                      time.strftime("%Y-%m-%d %H:%M", time.localtime(r.saved)) if r.saved else ""))
    widths = [max(len(row[i]) for row in [header, *table]) for i in range(5)]
    widths[0] = max(widths[0], *(len(r.name) for r in rows))  # the other folders' names line up too
    lines = [f"runs in {folder}:", "  " + "  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    cells = iter(table)
    for r in rows:
        if r.kind == "run":
            name, step, bpb, size, saved = next(cells)
            line = "  ".join([name.ljust(widths[0]), step.rjust(widths[1]), bpb.ljust(widths[2]),
                              size.rjust(widths[3]), saved.ljust(widths[4])])
        else:
            line = f"{r.name.ljust(widths[0])}  ({r.kind})"
        lines.append("  " + (line.rstrip() + ("  latest" if r.latest else "")))
    return "\n".join(lines)
