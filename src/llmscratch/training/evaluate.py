"""Held-out numbers: loss, perplexity and bits per byte, during training and of a saved run on any text.

Bits per byte = summed cross-entropy in bits / UTF-8 bytes of the target tokens' text: unlike
the loss per token, it compares models whose tokenizers cut text differently.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

from ..data.corpus import bits_per_byte, encode_text, eval_windows, load_corpus, token_dtype
from ..data.tokenizer import Tokenizer
from ..errors import ConfigError
from ..runtime import Runtime, setup_runtime
from ..store.checkpoint import load_run
from .distributed import Group


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    byte_lengths: torch.Tensor,
    runtime: Runtime,
    group: Optional[Group] = None,
) -> dict[str, float]:
    """Loss, perplexity and bits per byte over batches of ``(x, y)`` windows ``(B, T)``.

    With a group of several processes, each passes its own batches and the sums are added
    across ranks, so the numbers are the whole set's.
    """
    was_training = model.training
    model.eval()
    total_nats = torch.zeros((), dtype=torch.float64, device=runtime.device)
    total_tokens = torch.zeros((), dtype=torch.float64, device=runtime.device)
    total_bytes = torch.zeros((), dtype=torch.float64, device=runtime.device)
    lengths = byte_lengths.to(runtime.device)
    for x, y in batches:
        x, y = x.to(runtime.device), y.to(runtime.device)  # (B, T) each
        with runtime.autocast():
            logits = model(x)  # (B, T, V)
        nats = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
        )  # (B·T, V) against (B·T,)
        total_nats += nats.double()
        kept = y[y != -100]  # targets of -100 (padding, see distributed.shard_batches) count nowhere
        total_tokens += kept.numel()
        total_bytes += lengths[kept].sum().double()
    if group is not None:
        for t in (total_nats, total_tokens, total_bytes):
            group.all_reduce_sum(t)
    model.train(was_training)
    n_tokens = max(1.0, total_tokens.item())
    loss = total_nats.item() / n_tokens
    return {
        "loss": loss,
        "ppl": math.exp(min(loss, 50.0)),  # capped: an untrained or diverged model would overflow
        "bpb": bits_per_byte(total_nats.item(), max(1, int(total_bytes.item()))),
        "tokens": int(total_tokens.item()),
    }


def byte_lengths_for(tokenizer: Tokenizer, vocab_size: int) -> torch.Tensor:
    """``(vocab_size,)``: the UTF-8 bytes each token id stands for. The model's vocabulary may be
    larger than the tokenizer's: those ids are never targets (0 bytes)."""
    lengths = torch.as_tensor(tokenizer.token_byte_lengths(), dtype=torch.int64)
    return torch.nn.functional.pad(lengths, (0, max(0, vocab_size - len(lengths))))


def evaluate_text(run_dir: str | Path, data: str, encoding: str = "utf-8", device: str = "auto",
                  batch_size: int = 16) -> dict[str, float]:
    """Loss, perplexity and bits per byte of a saved run on any text (every window of it)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"the evaluation batch size (--batch-size) must be a positive integer, got {batch_size!r}")
    corpus = load_corpus(data, encoding=encoding)
    runtime = setup_runtime(device, "auto")
    model, tokenizer, _ = load_run(run_dir, device=runtime.device, need_tokenizer=data)
    ids = encode_text(corpus.text, tokenizer, token_dtype(tokenizer.vocab_size)).astype(np.int64)
    if len(ids) < 2:
        raise ConfigError(f"{data} is too short to evaluate: it has {len(ids)} token(s), at least 2 are needed")
    windows = eval_windows(ids, model.cfg.context_length, n_windows=None, batch_size=batch_size)
    byte_lengths = byte_lengths_for(tokenizer, model.cfg.vocab_size)
    result = evaluate(model, windows, byte_lengths, runtime)
    result["bytes"] = int(byte_lengths[torch.as_tensor(ids[1:])].sum())
    return result
