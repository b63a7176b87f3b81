"""LoRA adapters on disk: a few small files that name the run whose weights they adapt.

```
ADAPTER/                       (a LoRA training run's folder is one)
  adapter.json                 {"lora": {rank, alpha, dropout, targets, scaling}, "base_run": "/abs/runs/base",
                                "base_run_relative": "../base", "format": 1}
  model.safetensors            the adapters' A and B only (blocks.0.attn.qkv.lora.query.A, …)
  config.json                  the base model's GPTConfig (what `info` shows)
```

The base weights are not copied: ``adapter.json`` names the base run, by its absolute path and
by its path relative to the adapter folder (tried in that order, so that moving the whole
``runs/`` folder, or copying the adapter elsewhere on the same machine, both still load).
:func:`~llmscratch.store.checkpoint.load_model` reads such a folder as the base model with the
adapters on it, so ``generate``, ``eval``, ``chat`` and ``--resume`` need nothing more;
``llmscratch export RUN OUT --merge`` folds them into plain weights.

This module reads and writes the adapter files; it never loads a base model itself (the
checkpoint code does, then hands the model to :func:`load_adapter`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch
import torch.nn as nn

from ..errors import CheckpointError, LLMScratchError
from ..files import PathLike, write_atomic, write_text_atomic
from ..nn.lora import LoRAConfig, LoRAInfo, apply_lora, has_lora, load_lora_state_dict, lora_config, lora_state_dict
from .rundir import ADAPTER_CONFIG_FILE, CONFIG_FILE, WEIGHTS_FILE

ADAPTER_FORMAT = 1
BASE_ATTRIBUTE = "lora_base_run"  # set on a model whose adapters belong to a base run: where that run is


@dataclass(frozen=True)
class AdapterFile:
    """What ``adapter.json`` says: the adapters' settings and the base run they adapt."""

    config: LoRAConfig
    base_run: Path  # resolved: the folder that exists
    path: Path  # the adapter.json read


def is_adapter(folder: PathLike) -> bool:
    """Whether ``folder`` holds adapters (an ``adapter.json``) rather than whole weights."""
    return (Path(folder) / ADAPTER_CONFIG_FILE).is_file()


def set_base_run(model: nn.Module, base_run: PathLike) -> None:
    """Record on ``model`` the run whose weights its adapters adapt (what a save of it names)."""
    setattr(model, BASE_ATTRIBUTE, str(Path(base_run).resolve()))


def base_run_of(model: nn.Module) -> Optional[str]:
    """The base run recorded by :func:`set_base_run`, or None."""
    return getattr(model, BASE_ATTRIBUTE, None)


def adapter_json(model: nn.Module, folder: PathLike, base_run: PathLike) -> str:
    """The text of ``adapter.json`` for ``model``'s adapters, saved in ``folder``, on ``base_run``."""
    config = lora_config(model)
    if config is None:
        raise CheckpointError("this model has no LoRA adapters to save (add_lora adds them)")
    base = Path(base_run).resolve()
    return json.dumps({"format": ADAPTER_FORMAT, "lora": config.to_dict(), "base_run": str(base),
                       "base_run_relative": os.path.relpath(base, Path(folder).resolve())}, indent=2) + "\n"


def write_adapter_config(folder: PathLike, model: nn.Module) -> None:
    """Write ``folder/adapter.json`` for a model whose base run :func:`set_base_run` recorded."""
    base = base_run_of(model)
    if base is None:
        raise CheckpointError("a model with LoRA adapters is saved with the run its base weights come from, and "
                              "none is recorded on this one: save it with save_adapter(model, folder, base_run)")
    write_text_atomic(Path(folder) / ADAPTER_CONFIG_FILE, adapter_json(model, folder, base))


def save_adapter(model: nn.Module, folder: PathLike, base_run: PathLike) -> None:
    """Write ``model``'s adapters into ``folder``: ``model.safetensors`` (A and B only), ``adapter.json``
    (settings and the base run), ``config.json`` (the base's shape). Each file is staged and renamed."""
    from safetensors.torch import save_file

    base = Path(base_run)
    if not (base / CONFIG_FILE).is_file():
        raise CheckpointError(f"base run {base} has no {CONFIG_FILE}: adapters are saved on a run directory "
                              "(`llmscratch import` makes one from a Hugging Face folder)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    text = adapter_json(model, folder, base)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in lora_state_dict(model).items()}
    write_atomic(folder / WEIGHTS_FILE, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    write_text_atomic(folder / CONFIG_FILE, model.cfg.to_json() + "\n")
    write_text_atomic(folder / ADAPTER_CONFIG_FILE, text)
    set_base_run(model, base)


def read_adapter_config(folder: PathLike) -> AdapterFile:
    """``folder/adapter.json``, checked: its settings, and the base run found where it says."""
    path = Path(folder) / ADAPTER_CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"{path} could not be read ({err}); restore it, or save the adapter again") from err
    if not isinstance(data, dict) or data.get("format") != ADAPTER_FORMAT or not isinstance(data.get("lora"), dict) \
            or not isinstance(data.get("base_run"), str):
        raise CheckpointError(f"{path} is not an llmscratch adapter file (format {ADAPTER_FORMAT} with `lora` and "
                              "`base_run`); save the adapter again")
    try:
        config = LoRAConfig.from_dict(data["lora"])
    except LLMScratchError as err:
        raise CheckpointError(f"{path}: {err}") from err
    tried = [Path(data["base_run"])]
    if isinstance(data.get("base_run_relative"), str):
        tried.append((path.parent / data["base_run_relative"]).resolve())
    base = next((p for p in tried if (p / CONFIG_FILE).is_file()), None)
    if base is None:
        raise CheckpointError(f"{path.parent} holds LoRA adapters on the run {data['base_run']}, which is not there "
                              f"(also looked at {tried[-1]}): put the base run back, or edit `base_run` in {path} "
                              "to where it is now")
    return AdapterFile(config=config, base_run=base, path=path)


def load_adapter(model: nn.Module, folder: PathLike, tensors: Optional[Mapping[str, torch.Tensor]] = None) -> LoRAInfo:
    """Put the adapters saved in ``folder`` on ``model`` (the base run's model, loaded by the caller).

    ``tensors``: the adapter file's tensors where the caller read them already. The model is
    changed in place: adapters added (base frozen, as :func:`~llmscratch.nn.lora.add_lora`
    leaves it), their A and B loaded, the base run recorded for the next save.
    """
    adapter = read_adapter_config(folder)
    if has_lora(model):
        raise CheckpointError(f"cannot load the adapters of {folder} on a model that already has some")
    if tensors is None:
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(Path(folder) / WEIGHTS_FILE), device="cpu")
        except Exception as err:
            raise CheckpointError(f"{Path(folder) / WEIGHTS_FILE} could not be read ({err}); save the adapter "
                                  "again") from err
    info = apply_lora(model, adapter.config)
    try:
        load_lora_state_dict(model, dict(tensors))
    except CheckpointError as err:
        raise CheckpointError(f"{Path(folder) / WEIGHTS_FILE}: {err}") from err
    set_base_run(model, adapter.base_run)
    return info
