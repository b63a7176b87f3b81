"""A run directory: the one place that spells the names of a run's files.

```
runs/
  latest -> 20261206-101500          the newest run with a checkpoint (a relative symlink)
  20261206-101500/
    config.json                      the model's complete GPTConfig
    model.safetensors                the weights (tied weights stored once), with the save tag
    training_state.pt                optimizer, step, RNG: what --resume needs
    train_config.json                the TrainConfig the run was started with
    metrics.jsonl                    one JSON record per log or evaluation step
    loss.png                         the curves so far
    tokenizer files                  as the tokenizer saves them
    adapter.json                     a LoRA run: its adapters' settings and the base run (then
                                     model.safetensors holds the adapters only; store/lora.py)
    finetune.json                    a fine-tuned run: its base run, task and options
    labels.json                      a classifier's classes, pooling and base run (finetune --task classify)
    best/                            the best validation weights, with the tokenizer
    sharded/                         an FSDP checkpoint (every rank's shard), until consolidated
```

Everything else reads and writes these files through :class:`RunDir` (the checkpoint code
through the names below), so a name is written once.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError
from ..files import PathLike, write_text_atomic

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TRAINING_STATE_FILE = "training_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"
LABELS_FILE = "labels.json"
BEST_DIR = "best"
SHARDED_DIR = "sharded"
LATEST = "latest"
FINETUNE_FILE = "finetune.json"
ADAPTER_CONFIG_FILE = "adapter.json"


@dataclass(frozen=True)
class RunDir:
    """The folder of one run, and the path of each of its files."""

    path: Path

    def __init__(self, path: PathLike):
        object.__setattr__(self, "path", Path(path))

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    @property
    def config(self) -> Path:
        return self.path / CONFIG_FILE

    @property
    def weights(self) -> Path:
        return self.path / WEIGHTS_FILE

    @property
    def training_state(self) -> Path:
        return self.path / TRAINING_STATE_FILE

    @property
    def train_config(self) -> Path:
        return self.path / TRAIN_CONFIG_FILE

    @property
    def metrics(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def plot(self) -> Path:
        return self.path / PLOT_FILE

    @property
    def adapter_config(self) -> Path:
        return self.path / ADAPTER_CONFIG_FILE

    @property
    def finetune(self) -> Path:
        return self.path / FINETUNE_FILE

    @property
    def labels(self) -> Path:
        return self.path / LABELS_FILE

    @property
    def best(self) -> "RunDir":
        return RunDir(self.path / BEST_DIR)

    @property
    def sharded(self) -> Path:
        return self.path / SHARDED_DIR

    def is_resumable(self) -> bool:
        """Whether a checkpoint to continue is here (an ordinary or a sharded one)."""
        return self.training_state.is_file() or self.sharded.is_dir()

    def write_train_config(self, options: dict[str, Any]) -> None:
        write_text_atomic(self.train_config, json.dumps(options, indent=2))

    # ------------------------------------------------------------------------ metrics

    def read_metrics(self) -> list[dict[str, Any]]:
        """The records of ``metrics.jsonl`` (none if there is no file); a line that is not a JSON
        object (the half-written last line of a killed run) is skipped."""
        if not self.metrics.is_file():
            return []
        records = []
        for line in self.metrics.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(record, dict):
                records.append(record)
        return records

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Add one record as a line; after a killed run's half-written line, start a line of our own."""
        with open(self.metrics, "ab+") as f:
            f.seek(0, os.SEEK_END)
            if f.tell() > 0:
                f.seek(-1, os.SEEK_END)
                if f.read(1) != b"\n":
                    f.write(b"\n")
            f.write((json.dumps(record) + "\n").encode("utf-8"))

    def keep_metrics_up_to(self, step: int) -> None:
        """Drop the records past ``step`` (a run killed after its checkpoint wrote them; the resumed
        run writes them again): one record of each step stays."""
        if self.metrics.exists():
            kept = [r for r in self.read_metrics() if r.get("step", 0) <= step]
            write_text_atomic(self.metrics, "".join(json.dumps(r) + "\n" for r in kept))

    def best_evaluation(self) -> Optional[dict[str, Any]]:
        """The evaluation record with the lowest validation bits per byte during training, if any."""
        evals = [r for r in self.read_metrics() if "val_bpb" in r and not r.get("final")]
        return min(evals, key=lambda r: r["val_bpb"], default=None)

    def final_evaluation(self) -> Optional[dict[str, Any]]:
        """The record of the evaluation on the whole validation split at the end, if the run got there."""
        finals = [r for r in self.read_metrics() if r.get("final")]
        return finals[-1] if finals else None

    # ------------------------------------------------------------------------ the runs folder

    def point_latest(self) -> None:
        """Make ``latest`` beside this run a symlink to it (best effort: a folder that refuses links
        loses only the shortcut)."""
        latest = self.path.parent / LATEST
        try:
            tmp = self.path.parent / f".{LATEST}.{os.getpid()}"
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            tmp.symlink_to(self.path.name, target_is_directory=True)
            os.replace(tmp, latest)
        except OSError:
            pass


def new_run_dir(out_dir: PathLike, name: Optional[str]) -> RunDir:
    """The folder for a new run under ``out_dir``: ``name``, or the date and time (with ``-2``, ``-3``
    where taken). A named run never takes a folder that holds anything."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out-dir {out} is a file: give the folder that holds run directories (default runs)")
    stamp = name or time.strftime("%Y%m%d-%H%M%S")
    run = RunDir(out / stamp)
    if name is not None and run.path.exists() and (not run.path.is_dir() or any(run.path.iterdir())):
        raise ConfigError(f"{run} already exists; a new run never writes into another one: choose another "
                          + (f"--name, delete it, or continue it with --resume {run}" if run.is_resumable() else
                             "--name, or delete it: it holds no checkpoint to continue (a run killed before its "
                             "first one?)"))
    suffix = 1
    while run.path.exists() and name is None:
        suffix += 1
        run = RunDir(out / f"{stamp}-{suffix}")
    return run
