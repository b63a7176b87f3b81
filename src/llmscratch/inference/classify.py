"""Label texts with a classifier run: each text's class and its probability."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..nn.classifier import GPTClassifier, pad_batch
from ..runtime import Runtime


@dataclass
class Prediction:
    """The most probable class of a text, its probability, and every class's; ``cut``: the text was
    longer than the model's context and only its first tokens were read."""

    label: str
    probability: float
    probabilities: dict[str, float]
    cut: bool = False


@torch.no_grad()
def classify_texts(model: GPTClassifier, tokenizer: Any, texts: Sequence[str], info: dict[str, Any],
                   runtime: Runtime, batch_size: int = 16) -> list[Prediction]:
    """Predictions for ``texts`` (each cut to the model's context; ``info``: the run's labels.json)."""
    classes, context, pad_to = info["classes"], model.cfg.context_length, info.get("pad_to")
    out: list[Prediction] = []
    for i in range(0, len(texts), batch_size):
        ids = [tokenizer.encode(t) or [model.pad_id] for t in texts[i : i + batch_size]]
        cut = [len(r) > context for r in ids]
        x = pad_batch([r[:context] for r in ids], pad_to).to(runtime.device)  # (B, T)
        with runtime.autocast():
            probs = torch.softmax(model(x).float(), dim=-1)  # (B, n_classes)
        for row, was_cut in zip(probs.tolist(), cut):
            best = max(range(len(classes)), key=row.__getitem__)
            out.append(Prediction(classes[best], row[best], dict(zip(classes, row)), was_cut))
    return out
