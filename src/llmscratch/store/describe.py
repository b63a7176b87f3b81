"""What a run directory holds, in words: ``llmscratch info``.

It describes damaged and partial runs too (a missing tokenizer, damaged weights, a state that
cannot be read): each line says what is wrong and the summary goes on.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.tokenizer import load_tokenizer
from ..errors import CheckpointError, LLMScratchError
from ..files import PathLike
from ..nn.model import GPT
from . import checkpoint as ckpt
from . import lora as lora_files
from . import sharded
from .rundir import BEST_DIR, SHARDED_DIR, RunDir


def describe_run(run_dir: PathLike) -> str:
    """A human-readable summary of a run directory: config, size, tokenizer, progress, best numbers."""
    run = RunDir(run_dir)
    cfg = ckpt.load_config(run.path)
    with torch.device("meta"):  # shapes only: counting needs no memory
        model = GPT(cfg)
    lines = [f"run directory: {run}"]
    lines.append(f"parameters: {model.num_parameters():,} "
                 f"({model.num_parameters(exclude_embeddings=True):,} without embeddings)")
    lines.append("model config:")
    lines += [f"  {k}: {v}" for k, v in sorted(cfg.to_dict().items())]
    lines.append(_tokenizer_line(run.path))
    lines.append(_weights_line(run))
    if lora_files.is_adapter(run.path):
        lines.append(_adapter_line(run))
    lines += _training_lines(run)
    lines += _finetune_lines(run)
    best, final = run.best_evaluation(), run.final_evaluation()
    if best:
        lines.append(f"best validation (during training): step {best['step']}, loss {best['val_loss']:.4f}, "
                     f"ppl {best['val_ppl']:.2f}, {best['val_bpb']:.4f} bits/byte")
    if final:
        lines.append(f"final validation (whole split): loss {final['val_loss']:.4f}, ppl {final['val_ppl']:.2f}, "
                     f"{final['val_bpb']:.4f} bits/byte")
    return "\n".join(lines)


def _finetune_lines(run: RunDir) -> list[str]:
    """What a fine-tuned run records of its base run and task, and its held-out response loss before/after."""
    if not run.finetune.is_file():
        return []
    try:
        record = ckpt.read_json(run.finetune)
    except CheckpointError as err:
        return [f"fine-tuned: {run.finetune.name} cannot be read: {err}"]
    lines = [f"fine-tuned from {record.get('base')} (--task {record.get('task')}, --train {record.get('train')})"]
    metrics = run.read_metrics()
    before = next((r for r in metrics if r.get("before")), None)
    after = next((r for r in reversed(metrics) if r.get("after")), None)
    for name in ("val", "test"):
        key = f"{name}_response_loss"
        if before and after and key in before and key in after:
            lines.append(f"  held-out {name} response loss: {before[key]:.4f} before, {after[key]:.4f} after")
    return lines


def _adapter_line(run: RunDir) -> str:
    """What a LoRA run's adapters are and which run's weights they adapt."""
    try:
        adapter = lora_files.read_adapter_config(run.path)
    except CheckpointError as err:
        return f"LoRA adapters: cannot be used ({err})"
    c = adapter.config
    return (f"LoRA adapters: rank {c.rank}, alpha {c.alpha:g} (scaling {c.scaling}), dropout {c.dropout:g}, on "
            f"{','.join(c.targets)}; the weights file holds only them, on the base run {adapter.base_run} "
            "(`llmscratch export RUN OUT --merge` folds them in)")


def _tokenizer_line(path: Path) -> str:
    if not ckpt.has_tokenizer_files(path):
        return "tokenizer: none (no tokenizer files: text prompts cannot be used)"
    try:
        tok = load_tokenizer(path)
        return f"tokenizer: {tok.kind}, {tok.vocab_size} tokens"
    except LLMScratchError as err:  # info describes a damaged run too: say what is wrong, go on
        return f"tokenizer: cannot be loaded ({err})"


def _weights_line(run: RunDir) -> str:
    if not run.weights.is_file():
        return f"weights: none ({run.weights.name} is missing)"
    try:
        tag = ckpt.weights_tag(run.path)
        return (f"weights: {run.weights.name}, {run.weights.stat().st_size / 1e6:,.1f} MB"
                + (f", saved at step {tag['step']}" if tag.get("step") else ""))
    except CheckpointError as err:
        return f"weights: damaged: {err}"


def _training_lines(run: RunDir) -> list[str]:
    try:
        state = sharded.load_training_state(run.path)  # the newest checkpoint's: ordinary or sharded (--fsdp)
    except CheckpointError as err:  # matters for resuming only: the rest of the summary still stands
        return [f"training: the state cannot be read, so the run cannot be resumed: {err}"]
    if state is not None:
        total, optimizer = None, None
        if run.train_config.exists():
            saved = ckpt.read_json(run.train_config)
            total, optimizer = saved.get("steps"), saved.get("optimizer", "adamw")
            if saved.get("lora_rank"):
                optimizer = "adamw on LoRA adapters"
        lines = [f"training: step {state['step']}" + (f" of {total}" if total else "")
                 + f", {state.get('tokens_seen', 0):,} tokens seen" + (f", {optimizer}" if optimizer else "")]
        if "optimizer" not in state:
            lines.append(f"  (that step's checkpoint is sharded ({SHARDED_DIR}/, from --fsdp): "
                         f"`llmscratch export {run} OUT_DIR --format run` makes it whole)")
        return lines
    parent = RunDir(run.path.parent)
    if run.path.name == BEST_DIR and parent.train_config.is_file():
        best = parent.best_evaluation()
        return [f"training: the best validation weights of the run in {parent}"
                + (f", from step {best['step']} ({best['val_bpb']:.4f} bits/byte)" if best else "")]
    return ["training: none recorded (imported or exported weights)"]
