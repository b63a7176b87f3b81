"""One optimizer step, the same for ``llmscratch train``, the experiments and ``bench``.

```
for x, y in micro_batches:                  # a step's windows, split into micro-batches
    loss = loss_fn(x, y) / n_micro          # x, y: (B, T) each, y = x shifted by one
    loss.backward()                         # gradients add up over the micro-batches
clip gradients to grad_clip; optimizer.step(); zero grads
```

Gradient accumulation is the loop over micro-batches: dividing each loss by their number makes
the accumulated gradient the gradient of the whole batch's mean loss (tested against one
backward pass over the whole batch). The step reads nothing back to the host: the loss it
returns stays on the device until someone asks for it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterable, Optional, Sequence

import torch
import torch.nn as nn

from ..nn.lora import has_lora
from ..nn.optim import MuonAdamW, muon_param_groups
from .config import TrainConfig

Batch = tuple[torch.Tensor, torch.Tensor]  # (x, y), (B, T) each


@dataclass
class StepResult:
    """What one step leaves behind, on the device (no host sync): the batch's mean loss, and the
    gradient norm before clipping (None without clipping)."""

    loss: torch.Tensor
    grad_norm: Optional[torch.Tensor]


def train_step(
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    parameters: Iterable[nn.Parameter],
    optimizer: torch.optim.Optimizer,
    micro_batches: Sequence[Batch],
    *,
    grad_clip: float = 1.0,
    autocast: Callable[[], ContextManager] = contextlib.nullcontext,
    scaler: Optional[torch.amp.GradScaler] = None,
    no_sync: Optional[Callable[[bool], ContextManager]] = None,
    before_clip: Optional[Callable[[], None]] = None,
) -> StepResult:
    """One optimizer step over ``micro_batches``, whose losses are averaged into one gradient.

    ``loss_fn(x, y)`` is the model's (or a task's) mean loss of a micro-batch; ``autocast`` the
    precision context; ``scaler`` fp16's GradScaler; ``no_sync(last)`` DDP's/FSDP's context
    that holds back the gradient all-reduce on all but the last micro-batch; ``before_clip``
    runs after the backward passes (the experiments read gradients there). ``grad_clip`` 0:
    no clipping.
    """
    parameters = list(parameters)
    total = torch.zeros((), device=micro_batches[0][0].device)
    n = len(micro_batches)
    for i, (x, y) in enumerate(micro_batches):
        with no_sync(i == n - 1) if no_sync is not None else contextlib.nullcontext():
            with autocast():
                loss = loss_fn(x, y) / n
            (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    if before_clip is not None:
        before_clip()
    if scaler is not None:
        scaler.unscale_(optimizer)
    norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip) if grad_clip > 0 else None
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(total, norm)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every parameter group's learning rate, as the schedule gives it for this step."""
    for group in optimizer.param_groups:
        group["lr"] = lr


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """``cfg.optimizer``: Muon on the hidden matrices and AdamW on the rest (optim.py), or AdamW on
    everything; weight decay on matrices only (not on biases and LayerNorm gains) either way.

    Only the parameters that train (``requires_grad``) are handed over. A model with LoRA
    adapters always gets AdamW: Muon orthogonalizes the update of a whole weight matrix, and
    the adapters' thin ``A (in, r)`` and ``B (r, out)`` are factors of one, not whole matrices.
    """
    if cfg.optimizer == "muon" and not has_lora(model):
        return MuonAdamW(muon_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                         momentum=cfg.muon_momentum)
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) parameters appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # PyTorch's fused kernel: one pass over all parameters instead of a loop over them
    # (docs/performance.md).
    extra = {"fused": True} if device.type in ("cuda", "cpu") else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)
