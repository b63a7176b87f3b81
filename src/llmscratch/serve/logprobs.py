"""The ``logprobs`` of a completion: how likely the model found each token, and its most likely rivals.

Evaluation harnesses score a multiple-choice answer by the log-probability of its tokens after a
context: lm-evaluation-harness sends the context and answer as one prompt with ``echo: true``,
``max_tokens: 1`` (or 0) and ``logprobs: 1``, and sums ``token_logprobs`` over the answer.

The numbers come from one forward pass over the prompt and the generated tokens together
(teacher forcing, the batcher's :func:`prompt_logprobs`): position ``t`` holds ``log softmax(logits[t - 1])[ids[t]]``, the model's raw
distribution (before temperature, top-k or top-p, as OpenAI and vLLM report it). The first token
of a prompt has no position before it: its entry is ``null``, as in OpenAI's answers.
"""

from __future__ import annotations

from typing import Any

from ..inference.batcher import prompt_logprobs
from ..inference.engine import Engine


def completion_logprobs(engine: Engine, prompt_ids: list[int], new_ids: list[int], top: int,
                        echo: bool) -> dict[str, Any]:
    """OpenAI's ``logprobs`` object of one choice: ``tokens``, ``token_logprobs``, ``top_logprobs``
    (token text → log-probability), ``text_offset``; the prompt's tokens first with ``echo``."""
    entries = prompt_logprobs(engine, prompt_ids + new_ids, top)[0 if echo else len(prompt_ids):]
    decode = engine.tokenizer.decode
    tokens = [decode([e.token_id]) for e in entries]
    offsets, at = [], 0 if echo else len(decode(prompt_ids))
    for text in tokens:
        offsets.append(at)
        at += len(text)
    tops = [None if e.logprob is None else _by_text(decode, [*e.top, (e.token_id, e.logprob)]) for e in entries]
    return {"tokens": tokens, "token_logprobs": [e.logprob for e in entries], "top_logprobs": tops,
            "text_offset": offsets}


def _by_text(decode: Any, pairs: list[tuple[int, float]]) -> dict[str, float]:
    """``{token text: log-probability}`` of the rivals and the token itself (always listed, as OpenAI lists it).
    Ids with the same text (bytes of a character cut in two all show as U+FFFD) keep the likeliest."""
    out: dict[str, float] = {}
    for token_id, logprob in pairs:
        text = decode([token_id])
        out[text] = max(logprob, out.get(text, logprob))
    return out
