"""A GPT with a classification head: the final hidden state of a text → one score per class.

```
token ids (B, T), right-padded with -1
  → the GPT's embeddings, blocks and final norm          hidden states (B, T, C)
  → pool: the last real token (default; the book's method),
          the mean over real tokens (--pool mean),
          or the very last position, padding or not (--pool end: the book's code on padded batches)
  → class head: Linear(C, n_classes)                     logits (B, n_classes)
```

The book (chapter 6) swaps the language-model head for ``Linear(emb_dim, num_classes)`` and
reads the logits of position -1. Its data pads every text on the right to the longest one, so on
a padded row position -1 is a padding token: the model then classifies from a state that has
seen the padding. Because attention is causal, the state at the last *real* token is the same
with or without padding after it, which is what ``pool="last"`` reads. ``pool="end"`` reads
position -1 as the book's code does and reproduces its numbers on the same padded batches.

:class:`GPTClassifier` is a :class:`GPT` (same blocks, same weight names, saved and
checkpointed by the same code) with one more module, ``class_head``; the language-model head
stays in place but unused.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.nn as nn

from .model import GPT, GPTConfig

POOLS = ("last", "mean", "end")
PAD = -1  # marks padding in a batch of token ids; the classifier feeds ``pad_id`` there


class GPTClassifier(GPT):
    """A GPT whose output is ``n_classes`` scores per text, read from its final hidden states."""

    def __init__(self, cfg: GPTConfig, n_classes: int, pool: str = "last", pad_id: int = 0):
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if n_classes < 2:
            raise ValueError(f"a classifier needs at least 2 classes, got {n_classes}")
        if not 0 <= pad_id < cfg.vocab_size:
            raise ValueError(f"pad_id {pad_id} is not a token id of a {cfg.vocab_size}-token vocabulary")
        super().__init__(cfg)
        self.n_classes, self.pool, self.pad_id = n_classes, pool, pad_id
        self.class_head = nn.Linear(cfg.emb_dim, n_classes)

    # A LoRA run saves its adapters only (store/lora.py), and these: the head is new, not the base run's.
    saved_with_adapters = ("class_head.",)

    @classmethod
    def from_gpt(cls, gpt: GPT, n_classes: int, pool: str = "last", pad_id: int = 0, seed: int = 123) -> "GPTClassifier":
        """A classifier on ``gpt``'s weights (copied), with a new head drawn from ``seed``."""
        model = cls(gpt.cfg, n_classes, pool, pad_id)
        model.load_state_dict(gpt.state_dict(), strict=False)  # all but class_head
        with torch.no_grad():
            g = torch.Generator().manual_seed(seed)
            bound = gpt.cfg.emb_dim ** -0.5  # nn.Linear's default init, drawn from our generator
            model.class_head.weight.uniform_(-bound, bound, generator=g)
            model.class_head.bias.uniform_(-bound, bound, generator=g)
        return model.to(next(gpt.parameters()).device)

    def task_parameters(self) -> list[nn.Parameter]:
        """The parameters this model adds to the GPT (the class head): they train whatever ``--train`` freezes."""
        return list(self.class_head.parameters())

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """GPT.forward ends by calling ``self.logits`` on the final hidden states ``(B, T, C)``; here they
        are handed back as they are, for :meth:`forward` to pool and classify."""
        return x

    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None, **kwargs: Any) -> torch.Tensor:
        """Class logits ``(B, n_classes)`` of right-padded token ids ``(B, T)`` (padding: -1);
        with ``targets`` (class ids ``(B,)``), their mean cross-entropy instead."""
        real = idx != PAD  # (B, T)
        lengths = real.sum(dim=1)  # (B,)
        if bool((lengths == 0).any()):
            raise ValueError("a row of the batch has no tokens")
        hidden = super().forward(idx.masked_fill(~real, self.pad_id), **kwargs)  # (B, T, C)
        if isinstance(hidden, tuple):  # need_weights: (hidden, weights)
            hidden = hidden[0]
        pooled = pool_hidden(hidden, real, lengths, self.pool)  # (B, C)
        logits = self.class_head(pooled)  # (B, n_classes)
        if targets is None:
            return logits
        return nn.functional.cross_entropy(logits.float(), targets)


def pool_hidden(hidden: torch.Tensor, real: torch.Tensor, lengths: torch.Tensor, pool: str) -> torch.Tensor:
    """One vector per row of ``hidden (B, T, C)``: at the last real token, the mean over real tokens, or at position -1."""
    if pool == "last":
        rows = torch.arange(hidden.shape[0], device=hidden.device)
        return hidden[rows, lengths - 1]  # (B, C)
    if pool == "mean":
        weights = real.to(hidden.dtype).unsqueeze(-1)  # (B, T, 1)
        return (hidden * weights).sum(dim=1) / lengths.unsqueeze(-1).to(hidden.dtype)  # (B, C)
    return hidden[:, -1]  # (B, C): "end", the book's code


def pad_batch(rows: Sequence[Sequence[int]], length: Optional[int] = None) -> torch.Tensor:
    """``(B, T)`` token ids, each row right-padded with -1 to ``length`` (default: the longest row)."""
    t = max(len(r) for r in rows) if length is None else length
    out = torch.full((len(rows), t), PAD, dtype=torch.long)  # (B, T)
    for i, r in enumerate(rows):
        out[i, : len(r)] = torch.as_tensor(r[:t], dtype=torch.long)
    return out
