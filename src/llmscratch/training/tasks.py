"""What a run learns from: a task gives each step's batches, the loss of a batch and the held-out numbers.

The training loop (``loop.py``) knows a model only through a task: pretraining here draws
windows of a token file and scores them in bits per byte; a fine-tuning task (instructions,
classes) plugs into the same loop with its own batches, loss and evaluation.
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
import torch.nn as nn

from ..data.corpus import TokenSplits, eval_windows, gather_windows, window_starts
from ..runtime import Runtime
from .distributed import Group, local_micro_batches, shard_batches
from .evaluate import evaluate
from .step import Batch


class Task(Protocol):
    """The seam between the loop and what is learned."""

    tokens_per_step: int  # tokens of one step over all processes (for tokens/s)
    local_windows: int  # windows (sequences) of one step on this process (for the time budget's estimates)
    eval_windows_count: int  # windows of one evaluation during training on this process (the same)

    def micro_batches(self, generator: torch.Generator) -> list[Batch]:
        """This process's micro-batches of the next step, on the device; ``generator`` draws them
        (the same on every process, saved with checkpoints so that a resume draws the same)."""

    def loss(self, forward: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The mean loss of one micro-batch under ``forward`` (the model, wrapped or compiled)."""

    def evaluate(self, model: nn.Module, final: bool) -> dict[str, float]:
        """Held-out numbers: at least ``loss``, ``ppl``, ``bpb`` (the score that picks the best
        weights) and ``tokens``; ``final``: the whole held-out set, not the quick subset."""


class Pretraining:
    """Next-token prediction on windows of a tokenized corpus.

    A step draws ``batch_size × grad_accum`` window starts from the generator (the same on every
    process), and this process takes its part in micro-batches of ``micro_size`` windows.
    Evaluations during training use fixed, seeded validation windows; the final one every
    validation token.
    """

    def __init__(self, splits: TokenSplits, context: int, batch_size: int, grad_accum: int, micro_size: int,
                 byte_lengths: torch.Tensor, runtime: Runtime, group: Group, eval_windows_n: int, seed: int):
        self.splits, self.context, self.runtime, self.group = splits, context, runtime, group
        self.batch_size, self.grad_accum, self.micro_size = batch_size, grad_accum, micro_size
        self.byte_lengths = byte_lengths
        self.tokens_per_step = batch_size * grad_accum * context
        windows = eval_windows(splits.val, context, n_windows=eval_windows_n,
                               generator=torch.Generator().manual_seed(seed + 1))
        self.val_windows = shard_batches(windows, group)
        self.local_windows = batch_size * grad_accum // group.world_size
        self.eval_windows_count = sum(len(x) for x, _ in self.val_windows)

    def micro_batches(self, generator: torch.Generator) -> list[Batch]:
        starts = torch.cat([window_starts(len(self.splits.train), self.batch_size, self.context, generator)
                            for _ in range(self.grad_accum)])  # (batch_size * grad_accum,), same on every rank
        local = local_micro_batches(starts, self.group.rank, self.group.world_size, self.micro_size)
        return [self._to_device(*gather_windows(self.splits.train, s, self.context)) for s in local]

    def _to_device(self, x: torch.Tensor, y: torch.Tensor) -> Batch:
        if self.runtime.device.type == "cuda":
            return (x.pin_memory().to(self.runtime.device, non_blocking=True),
                    y.pin_memory().to(self.runtime.device, non_blocking=True))
        return x.to(self.runtime.device), y.to(self.runtime.device)

    def loss(self, forward: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return forward(x, y)

    def evaluate(self, model: nn.Module, final: bool) -> dict[str, float]:
        if final:
            windows = shard_batches(eval_windows(self.splits.val, self.context, n_windows=None), self.group)
        else:
            windows = self.val_windows
        return evaluate(model, windows, self.byte_lengths, self.runtime,
                        group=self.group if self.group.world_size > 1 else None)
