"""A classifier's run directory: the GPT's files as any run's, plus ``labels.json``.

``model.safetensors`` holds every weight of the :class:`GPTClassifier` (the class head as
``class_head.weight`` / ``class_head.bias``), saved and checkpointed by the ordinary code;
``labels.json`` names the classes in id order and records how texts are read (pooling, the
padding token, the data's column names) and the run the classifier was fine-tuned from.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Union

import torch

from ..errors import CheckpointError
from ..files import PathLike, write_text_atomic
from ..nn.classifier import GPTClassifier
from ..nn.lora import merge_lora
from ..nn.model import GPTConfig
from . import lora as lora_files
from .checkpoint import (WEIGHTS_FILE, has_tokenizer_files, load_config, load_model, no_tokenizer_error,
                         read_safetensors, refuse_non_finite)
from .rundir import RunDir

LABELS_VERSION = 1


def is_classifier_run(run_dir: PathLike) -> bool:
    """Whether ``run_dir`` holds a classifier (``labels.json`` beside its weights)."""
    return RunDir(run_dir).labels.is_file()


def save_labels(run_dir: PathLike, info: dict[str, Any]) -> None:
    """Write ``labels.json``: ``classes`` (in id order), ``pool``, ``pad_id`` and whatever else ``info`` holds."""
    for key in ("classes", "pool", "pad_id"):
        if key not in info:
            raise ValueError(f"labels.json needs {key!r}")
    RunDir(run_dir).path.mkdir(parents=True, exist_ok=True)
    write_text_atomic(RunDir(run_dir).labels, json.dumps({"version": LABELS_VERSION, **info}, indent=2) + "\n")


def read_labels(run_dir: PathLike) -> dict[str, Any]:
    """``labels.json`` of a classifier run, checked."""
    path = RunDir(run_dir).labels
    if not path.is_file():
        raise CheckpointError(f"{run_dir} is not a classifier (no {path.name}); make one with "
                              f"`llmscratch finetune RUN --task classify --data FILE`")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path} cannot be read ({err}); restore it from the run it was saved with") from err
    classes = info.get("classes") if isinstance(info, dict) else None
    if (not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes)
            or not isinstance(info.get("pool"), str) or not isinstance(info.get("pad_id"), int)):
        raise CheckpointError(f"{path} must hold \"classes\" (at least two names), \"pool\" and \"pad_id\"; "
                              "restore it from the run it was saved with")
    return info


def load_classifier(run_dir: PathLike, device: Union[str, torch.device] = "cpu", *,
                    need_tokenizer: Optional[str] = None) -> tuple[GPTClassifier, Any, dict[str, Any]]:
    """``(classifier in eval mode, tokenizer or None, labels.json)`` of a classifier run."""
    run_dir = Path(run_dir)
    info = read_labels(run_dir)
    if lora_files.is_adapter(run_dir):
        model = _load_lora_classifier(run_dir, info)
    else:
        model = _load_whole_classifier(run_dir, info)
    tokenizer = None
    if has_tokenizer_files(run_dir):
        from ..data.tokenizer import load_tokenizer

        tokenizer = load_tokenizer(run_dir)
    elif need_tokenizer is not None:
        raise no_tokenizer_error(run_dir, need_tokenizer)
    return model.to(device).eval(), tokenizer, info


def _new_classifier(cfg: GPTConfig, run_dir: Path, info: dict[str, Any]) -> GPTClassifier:
    try:
        return GPTClassifier(cfg, len(info["classes"]), info["pool"], info["pad_id"])
    except ValueError as err:
        raise CheckpointError(f"{RunDir(run_dir).labels}: {err}") from err


def _load_lora_classifier(run_dir: Path, info: dict[str, Any]) -> GPTClassifier:
    """A ``--train lora`` classifier: the base run's weights, the adapters and the head of ``run_dir``, merged."""
    adapter = lora_files.read_adapter_config(run_dir)
    base = load_model(adapter.base_run)
    model = _new_classifier(base.cfg, run_dir, info)
    model.load_state_dict(base.state_dict(), strict=False)
    tensors = read_safetensors(run_dir / WEIGHTS_FILE)
    refuse_non_finite(tensors, run_dir / WEIGHTS_FILE, "fine-tune it again")
    head = {k: v for k, v in tensors.items() if ".lora." not in k}
    if sorted(head) != ["class_head.bias", "class_head.weight"]:
        raise CheckpointError(f"{run_dir / WEIGHTS_FILE} holds no class head beside its adapters; fine-tune it again")
    lora_files.load_adapter(model, run_dir, {k: v for k, v in tensors.items() if ".lora." in k})
    model.load_state_dict(head, strict=False)
    merge_lora(model)
    return model


def _load_whole_classifier(run_dir: Path, info: dict[str, Any]) -> GPTClassifier:
    cfg = load_config(run_dir)
    model = _new_classifier(cfg, run_dir, info)
    tensors = read_safetensors(run_dir / WEIGHTS_FILE)
    refuse_non_finite(tensors, run_dir / WEIGHTS_FILE, "fine-tune it again")
    if cfg.tie_weights and "tok_emb.weight" in tensors:
        tensors["out_head.weight"] = tensors["tok_emb.weight"]
    expected = set(model.state_dict())
    missing, extra = sorted(expected - set(tensors)), sorted(set(tensors) - expected)
    if missing or extra:
        raise CheckpointError(f"{run_dir / WEIGHTS_FILE} does not fit its config.json and labels.json: "
                              + (f"missing {missing[:6]} " if missing else "") + (f"unexpected {extra[:6]}" if extra else "")
                              + "; fine-tune it again")
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{run_dir / WEIGHTS_FILE} does not fit its config.json and labels.json: {err}") from err
    return model
