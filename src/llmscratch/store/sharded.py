"""Sharded (FSDP) checkpoints on disk: which save is the latest, reading one whole, consolidating it.

Every rank of an FSDP run writes its shard through ``torch.distributed.checkpoint`` into
``RUN_DIR/sharded/`` (``training/distributed.py`` does the writing, which needs the process
group); reading one back needs no process group, so it lives here, beside the run directory's
other files, and ``export`` or ``generate`` can read an FSDP run in a single process.
"""

from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Optional, Union

from ..errors import CheckpointError
from ..nn.model import GPT
from . import checkpoint as ckpt

SHARDED_DIR = ckpt.SHARDED_DIR  # the FSDP checkpoint inside a run directory
SHARDED_TMP = ".sharded.tmp"  # where the next one is written before it replaces the last
SHARDED_OLD = ".sharded.old"


def _step_of(state: Optional[dict]) -> int:
    return -1 if state is None else int(state.get("step", -1))


def finish_sharded_swap(run_dir: Union[str, Path]) -> None:
    """Complete a sharded save cut between its two renames (``sharded`` → ``.sharded.old``, then
    ``.sharded.tmp`` → ``sharded``): the new folder if it was whole (its ``training_state.pt``
    is written last), else the previous one goes back in place."""
    run_dir = Path(run_dir)
    final, tmp, old = run_dir / SHARDED_DIR, run_dir / SHARDED_TMP, run_dir / SHARDED_OLD
    if final.exists():
        return
    source = tmp if (tmp / ckpt.TRAINING_STATE_FILE).is_file() else old if old.is_dir() else None
    if source is not None:
        try:
            os.replace(source, final)
        except OSError:  # another rank did it first
            if not final.exists():
                raise


def load_training_state(run_dir: Union[str, Path], prefer_sharded: bool = False) -> Optional[dict]:
    """The newest checkpoint's training state: the ordinary one, or the sharded one when it is newer.

    A sharded state has no ``"optimizer"`` entry: :func:`restore` then reads the weights and
    the optimizer from ``run_dir/sharded``. On a tie the ordinary one wins, unless
    ``prefer_sharded`` (an FSDP job: each rank reads only its shards). A sharded save cut
    between its two renames is completed first (:func:`finish_sharded_swap`).
    """
    run_dir = Path(run_dir)
    finish_sharded_swap(run_dir)
    ordinary = ckpt.load_training_state(run_dir)
    sharded_dir = run_dir / SHARDED_DIR
    sharded = ckpt.load_training_state(sharded_dir) if (sharded_dir / ckpt.TRAINING_STATE_FILE).is_file() else None
    if sharded is not None and (_step_of(sharded) > _step_of(ordinary)
                                or (prefer_sharded and _step_of(sharded) == _step_of(ordinary))):
        sharded.pop("optimizer", None)
        return sharded
    return ordinary


def latest_is_sharded(run_dir: Union[str, Path]) -> bool:
    """Whether the run's newest checkpoint is the sharded one (not yet consolidated)."""
    state = load_training_state(run_dir)
    return state is not None and "optimizer" not in state


def _ids_for_names(saved: dict) -> dict:
    """An optimizer state keyed by parameter name → numbered in group order, as ``optimizer.state_dict()``."""
    index: dict[str, int] = {}
    groups = []
    for g in saved["param_groups"]:
        ids = [index.setdefault(name, len(index)) for name in g["params"]]
        groups.append({**g, "params": ids})
    return {"state": {index[name]: s for name, s in saved["state"].items()}, "param_groups": groups}


def load_sharded(run_dir: Union[str, Path]) -> tuple[GPT, dict]:
    """One process reads ``run_dir/sharded`` whole: ``(model, training state with the optimizer)``.

    The training state is in the ordinary format, so the pair can be saved as an ordinary
    run directory that a single-process ``--resume`` continues.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    run_dir = Path(run_dir)
    sharded = run_dir / SHARDED_DIR
    if not (sharded / ".metadata").is_file():
        raise CheckpointError(f"{sharded} is not a sharded checkpoint (no .metadata file); "
                              "it is written by `llmscratch train --fsdp` under torchrun")
    state = ckpt.load_training_state(sharded)
    if state is None:
        raise CheckpointError(f"{sharded} has no training_state.pt; the save was interrupted: resume from "
                              f"the ordinary checkpoint in {run_dir}")
    full: dict[str, Any] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
        _load_state_dict(full, storage_reader=FileSystemReader(str(sharded)),
                         planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    model = GPT(ckpt.load_config(run_dir))
    try:
        model.load_state_dict(full["model"], strict=True)
    except (KeyError, RuntimeError) as err:
        raise CheckpointError(f"{sharded} does not fit {run_dir / ckpt.CONFIG_FILE}: {err}") from err
    state["optimizer"] = _ids_for_names(full["optimizer"])
    return model.eval(), state


def consolidate(run_dir: Union[str, Path], out_dir: Optional[Union[str, Path]] = None,
                log: Callable[[str], None] = lambda message: None) -> Path:
    """Turn the sharded checkpoint of ``run_dir`` into the ordinary run-directory files.

    In place (``out_dir`` None), as training does at its end on rank 0; or into a new
    ``out_dir`` holding a copy of the run (tokenizer, configs, metrics) without the shards.
    One process, no process group: this is what ``llmscratch export RUN OUT --format run``
    runs for a run stopped before its end.
    """
    run_dir = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run_dir
    ckpt.load_config(run_dir)  # a missing path, or a folder with no config of ours, is named here
    if not (latest_is_sharded(run_dir) or (run_dir / ckpt.WEIGHTS_FILE).is_file()):
        raise CheckpointError(f"{run_dir} holds no checkpoint ({ckpt.WEIGHTS_FILE} or {SHARDED_DIR}/): "
                              "nothing to export; give a training run's directory")
    if out != run_dir:
        if out.resolve() == run_dir.resolve():
            raise CheckpointError(f"{out} is the run being exported; give a new path for the export")
        if out.resolve().is_relative_to(run_dir.resolve()):  # a copy into itself would never end
            raise CheckpointError(f"{out} is inside the run {run_dir}; export to a directory outside it")
        if out.exists() and any(out.iterdir()):
            raise CheckpointError(f"{out} exists and is not empty; choose a new directory for the exported run")
        out.parent.mkdir(parents=True, exist_ok=True)
        shutil.copytree(run_dir, out, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns(SHARDED_DIR, SHARDED_TMP, SHARDED_OLD))
    if latest_is_sharded(run_dir):
        model, state = load_sharded(run_dir)
        ckpt.save_model(out, model)
        ckpt.save_training_state(out, state)
        log(f"consolidated the sharded checkpoint of step {state['step']} into {out}")
    else:
        log(f"{run_dir} holds an ordinary checkpoint already; copied it to {out}" if out != run_dir
            else f"{run_dir} holds an ordinary checkpoint already")
    return out
