"""The ``logprobs`` of a completion: how likely the model found each token, and its most likely rivals.

Evaluation harnesses score a multiple-choice answer by the log-probability of its tokens after a
context: lm-evaluation-harness sends the context and answer as one prompt with ``echo: true``,
``max_tokens: 1`` (or 0) and ``logprobs: 1``, and sums ``token_logprobs`` over the answer.

The numbers come from one forward pass over the prompt and the generated tokens together
(teacher forcing): position ``t`` holds ``log softmax(logits[t - 1])[ids[t]]``, the model's raw
distribution (before temperature, top-k or top-p, as OpenAI and vLLM report it). The first token
of a prompt has no position before it: its entry is ``null``, as in OpenAI's answers.
"""

from __future__ import annotations

from typing import Any, Optional

import torch

from ..inference.engine import Engine
from ..inference.generate import decodable_limit


@torch.inference_mode()
def token_logprobs(engine: Engine, ids: list[int], top: int) -> tuple[list[Optional[float]], list[Optional[dict[int, float]]]]:
    """Per position of ``ids``: the log-probability of its token, and the ``top`` most likely ids with theirs
    (the token itself always among them); ``None`` for the first position. ``ids`` fit in the context."""
    model = engine.model
    was_training = model.training
    model.eval()
    try:
        idx = torch.tensor([ids], device=engine.device)  # (1, T)
        logits = model(idx)[0, :-1].float()  # (T - 1, V): position t predicts token t + 1
    finally:
        model.train(was_training)
    limit = decodable_limit(engine.tokenizer.vocab_size, model.cfg.vocab_size)
    if limit is not None:
        logits = logits[:, :limit]  # (T - 1, limit): ids the tokenizer cannot decode are never drawn
    logp = torch.log_softmax(logits, dim=-1)  # (T - 1, V)
    targets = torch.tensor(ids[1:], device=logp.device)  # (T - 1,)
    chosen = logp.gather(1, targets[:, None])[:, 0]  # (T - 1,)
    tops: list[Optional[dict[int, float]]] = [None]
    if top > 0:
        values, indices = logp.topk(min(top, logp.shape[-1]), dim=-1)  # (T - 1, top) each
        for t, (vals, inds) in enumerate(zip(values.tolist(), indices.tolist())):
            entry = dict(zip(inds, vals))
            entry[ids[t + 1]] = chosen[t].item()
            tops.append(entry)
    else:
        tops += [{ids[t + 1]: v} for t, v in enumerate(chosen.tolist())]
    return [None, *chosen.tolist()], tops


def completion_logprobs(engine: Engine, prompt_ids: list[int], new_ids: list[int], top: int,
                        echo: bool) -> dict[str, Any]:
    """OpenAI's ``logprobs`` object of one choice: ``tokens``, ``token_logprobs``, ``top_logprobs``
    (token text → log-probability), ``text_offset``; the prompt's tokens first with ``echo``."""
    ids = prompt_ids + new_ids
    values, tops = token_logprobs(engine, ids, top)
    first = 0 if echo else len(prompt_ids)
    decode = engine.tokenizer.decode
    tokens = [decode([i]) for i in ids[first:]]
    offsets, at = [], 0 if echo else len(decode(prompt_ids))
    for text in tokens:
        offsets.append(at)
        at += len(text)
    top_text = [None if t is None else {decode([i]): v for i, v in t.items()} for t in tops[first:]]
    return {"tokens": tokens, "token_logprobs": values[first:], "top_logprobs": top_text, "text_offset": offsets}
