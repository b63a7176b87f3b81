"""``--time-budget``: stop training early enough that the whole command ends within the budget.

After each step the run goes on only if one more step (with its evaluation, where it has one),
a checkpoint and the closing sample still fit. Each is estimated by how long it took last time
in this run; before the first time, a checkpoint from its size in bytes (at
:data:`SAVE_BYTES_PER_S`), an evaluation and a sample from the step's time (a forward pass of
one window costs about a third of a training step's per window). Not counted: drawing
``loss.png`` and, for a run that reaches ``--steps``, its final evaluation on the whole
validation split.
"""

from __future__ import annotations

from typing import Optional

import torch.nn as nn

SAVE_BYTES_PER_S = 100e6  # a first checkpoint's guessed write speed: slow disks and network file systems included


class TimeBudget:
    """The seconds left, and what the rest of the run is expected to cost."""

    def __init__(self, seconds: Optional[float], start: float, save_guess_s: float, eval_windows: int,
                 step_windows: int, sample_tokens: int) -> None:
        self.seconds, self.start = seconds, start
        self._took = {"save": save_guess_s}
        self._eval_windows, self._step_windows, self._sample_tokens = eval_windows, step_windows, sample_tokens

    def took(self, what: str, seconds: float) -> None:
        """How long ``what`` (step, eval, sample, save) took this time."""
        self._took[what] = seconds

    def _s(self, what: str) -> float:
        if what in self._took:
            return self._took[what]
        per_window = self._took.get("step", 0.0) / (3 * max(1, self._step_windows))
        return {"eval": self._eval_windows, "sample": self._sample_tokens}[what] * per_window

    def stop_now(self, now: float, at_eval: bool, at_ckpt: bool, next_eval: bool) -> bool:
        """Whether to stop after this step: one more (its evaluation and checkpoint, then the ending) would not fit."""
        if self.seconds is None:
            return False
        this = (self._s("eval") + self._s("sample") if at_eval else 0.0) + (self._s("save") if at_ckpt else 0.0)
        another = self._s("step") + (self._s("eval") + self._s("sample") if next_eval else 0.0)
        ending = self._s("save") + self._s("sample")
        return now - self.start + this + another + ending > self.seconds


def save_guess_s(model: nn.Module, sharded: bool) -> float:
    """A guess at a checkpoint's seconds before the first one: the weights and two optimizer moments per
    weight at :data:`SAVE_BYTES_PER_S`; sharded (FSDP) twice, for the consolidation at the end."""
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters())
    return 3 * local / SAVE_BYTES_PER_S * (2 if sharded else 1)
