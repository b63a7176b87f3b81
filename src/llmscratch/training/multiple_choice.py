"""Multiple-choice evaluation (HellaSwag, ARC, PIQA style): which ending does the model find likeliest?

A task is a JSONL file, one question a line:

```
{"context": "A man is sitting on a roof. He", "endings": ["starts pulling up roofing.", "is ..."], "label": 0}
```

``context`` (HellaSwag's ``ctx`` is read too): the text before the answer; ``endings``: two or
more candidate continuations; ``label``: the index of the right one (an integer, or a string
of digits as HellaSwag's files write it). Other fields are ignored.

Each ending is scored by its total log-likelihood given the context, exactly as
lm-evaluation-harness scores a ``multiple_choice`` task (and tested against its ``hf`` backend):

* the continuation is ``delimiter + ending`` (``target_delimiter``, one space by default);
  spaces at the end of the context move to the start of the continuation;
* the tokens are those of ``context + continuation`` encoded whole; the continuation's are
  what follows the context's own encoding (so a merge across the boundary is scored as the
  model would read the text); an empty context is the BOS (else end-of-text) token;
* ``log P(continuation | context)`` = the sum over the continuation's tokens of
  ``log softmax(logits)[token]``; a sequence longer than the context window loses its oldest
  tokens (the last ``context_length + 1`` are kept, the last one only as a target).

``acc``: the fraction of questions whose highest-scoring ending is the right one. ``acc_norm``:
the same with each score divided by the ending's length in characters (the ending alone,
without the delimiter), lm-evaluation-harness's ``acc_norm``; it stops long endings from
losing just for having more tokens to pay for. Ties go to the first ending (``np.argmax``).

Fast: all (question, ending) pairs are sorted by length and run in padded batches of at most
``batch_size`` sequences, and the log-softmax is taken only over the rows of the continuation
tokens, never over every position of a (B, T, vocabulary) tensor.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..data.tokenizer import Tokenizer
from ..errors import ConfigError
from ..runtime import Runtime, setup_runtime
from ..store.checkpoint import load_run

# Logit rows (tokens × vocabulary) one batch may hold at once: 2²⁷ floats = 512 MiB.
MAX_LOGITS = 2 ** 27


@dataclass(frozen=True)
class Question:
    """One line of a task: the context, the candidate endings, the index of the right one."""

    context: str
    endings: tuple[str, ...]
    label: int


@dataclass
class MultipleChoiceResult:
    """``acc`` and ``acc_norm`` over ``n`` questions, with every ending's log-likelihood (``scores[i][j]``)."""

    n: int
    acc: float
    acc_norm: float
    scores: list[list[float]] = field(default_factory=list)
    predictions: list[int] = field(default_factory=list)
    predictions_norm: list[int] = field(default_factory=list)

    @property
    def acc_stderr(self) -> float:
        """The standard error of ``acc`` (sample standard deviation / √n, as lm-evaluation-harness)."""
        return _stderr(self.acc, self.n)

    @property
    def acc_norm_stderr(self) -> float:
        return _stderr(self.acc_norm, self.n)


def _stderr(p: float, n: int) -> float:
    return math.sqrt(p * (1 - p) * n / (n - 1) / n) if n > 1 else float("nan")


def read_task(path: str | Path, limit: Optional[int] = None) -> list[Question]:
    """The questions of a JSONL task file (see the module's docstring), the first ``limit`` of them."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--task {path}: no such file; give a JSONL file with one question a line "
                          "({\"context\": ..., \"endings\": [...], \"label\": N})")
    questions = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            questions.append(_question(line, f"{path}, line {number}"))
            if limit is not None and len(questions) >= limit:
                break
    if not questions:
        raise ConfigError(f"--task {path} holds no questions: write one JSON object a line")
    return questions


def _question(line: str, where: str) -> Question:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as err:
        raise ConfigError(f"{where} is not JSON ({err.msg}): write one JSON object a line") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{where} must be a JSON object with context, endings and label")
    context = doc.get("context", doc.get("ctx"))
    endings, label = doc.get("endings"), doc.get("label")
    if not isinstance(context, str):
        raise ConfigError(f"{where}: `context` (or HellaSwag's `ctx`) must be a string, got {context!r}")
    if not isinstance(endings, list) or len(endings) < 2 or not all(isinstance(e, str) and e for e in endings):
        raise ConfigError(f"{where}: `endings` must be a list of two or more non-empty strings, got {endings!r}")
    if isinstance(label, str) and label.strip().isdigit():
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < len(endings):
        raise ConfigError(f"{where}: `label` must be the index of the right ending, 0 to {len(endings) - 1}, "
                          f"got {label!r}")
    return Question(context, tuple(endings), label)


def encode_pair(tokenizer: Tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """``(context ids, continuation ids)`` as lm-evaluation-harness cuts them (see the module's docstring)."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    if not context:
        start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eot_id
        if start is None:
            raise ConfigError("an empty context needs a start token, and this tokenizer has no BOS or end-of-text "
                              "token: give every question a context")
        return [start], tokenizer.prompt_ids(continuation)
    whole = tokenizer.prompt_ids(context + continuation)
    context_ids = tokenizer.prompt_ids(context)
    return context_ids, whole[len(context_ids):]


@torch.no_grad()
def loglikelihoods(model: torch.nn.Module, pairs: list[tuple[list[int], list[int]]], runtime: Runtime,
                   batch_size: int = 32) -> list[float]:
    """``log P(continuation | context)`` of each ``(context ids, continuation ids)`` pair, in their order."""
    window = model.cfg.context_length
    vocab = model.cfg.vocab_size
    rows = []  # per pair: the input ids, and where its continuation's targets start
    for context, continuation in pairs:
        if not continuation:
            raise ConfigError("an ending encodes to no tokens after its context; check the task's endings")
        if len(continuation) > window:
            raise ConfigError(f"an ending of {len(continuation)} tokens does not fit the model's context of "
                              f"{window} tokens")
        ids = (context + continuation)[-(window + 1):]  # the newest window + 1 tokens
        rows.append((ids[:-1], ids[1:], len(continuation)))  # inputs, targets, how many targets to score
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # longest first: little padding
    out = [0.0] * len(rows)
    per_batch = max(1, min(batch_size, MAX_LOGITS // (vocab * max(len(rows[order[0]][0]), 1))))
    was_training = model.training
    model.eval()
    for start in range(0, len(order), per_batch):
        chunk = order[start:start + per_batch]
        width = len(rows[chunk[0]][0])
        x = torch.zeros(len(chunk), width, dtype=torch.long)  # (B, T), padded on the right: causal, so harmless
        for b, i in enumerate(chunk):
            x[b, :len(rows[i][0])] = torch.as_tensor(rows[i][0])
        with runtime.autocast():
            logits = model(x.to(runtime.device))  # (B, T, V)
        for b, i in enumerate(chunk):
            inputs, targets, n = rows[i]
            picked = logits[b, len(inputs) - n:len(inputs)].float()  # (n, V): the positions predicting the ending
            logp = F.log_softmax(picked, dim=-1)  # (n, V)
            wanted = torch.as_tensor(targets[-n:], device=logp.device)  # (n,)
            out[i] = float(logp.gather(1, wanted[:, None]).sum())
    model.train(was_training)
    return out


def evaluate_choices(model: torch.nn.Module, tokenizer: Tokenizer, questions: list[Question], runtime: Runtime,
                     delimiter: str = " ", batch_size: int = 32) -> MultipleChoiceResult:
    """Score every ending of every question; ``acc`` and ``acc_norm`` as lm-evaluation-harness computes them."""
    pairs = [encode_pair(tokenizer, q.context, delimiter + ending) for q in questions for ending in q.endings]
    lls = loglikelihoods(model, pairs, runtime, batch_size)
    scores, preds, preds_norm, correct, correct_norm, k = [], [], [], 0, 0, 0
    for q in questions:
        ll = np.array(lls[k:k + len(q.endings)])
        k += len(q.endings)
        lengths = np.array([float(len(e)) for e in q.endings])  # characters of the ending alone
        pred, pred_norm = int(np.argmax(ll)), int(np.argmax(ll / lengths))
        correct += pred == q.label
        correct_norm += pred_norm == q.label
        scores.append(ll.tolist())
        preds.append(pred)
        preds_norm.append(pred_norm)
    n = len(questions)
    return MultipleChoiceResult(n=n, acc=correct / n, acc_norm=correct_norm / n, scores=scores,
                                predictions=preds, predictions_norm=preds_norm)


def evaluate_task(run_dir: str | Path, task: str | Path, *, delimiter: str = " ", device: str = "auto",
                  batch_size: int = 32, limit: Optional[int] = None) -> MultipleChoiceResult:
    """``llmscratch eval RUN --task FILE``: a saved run (with its adapters, if any) on a multiple-choice task."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"the evaluation batch size (--batch-size) must be a positive integer, got {batch_size!r}")
    if limit is not None and limit < 1:
        raise ConfigError(f"--limit must be a positive number of questions, got {limit}")
    questions = read_task(task, limit)
    runtime = setup_runtime(device, "auto")
    model, tokenizer, _ = load_run(run_dir, device=runtime.device, need_tokenizer="the questions")
    return evaluate_choices(model, tokenizer, questions, runtime, delimiter, batch_size)


def details(questions: list[Question], result: MultipleChoiceResult) -> list[dict[str, Any]]:
    """One record a question: its label, every ending's log-likelihood, the two predictions."""
    return [{"label": q.label, "loglikelihoods": s, "prediction": p, "prediction_norm": pn}
            for q, s, p, pn in zip(questions, result.scores, result.predictions, result.predictions_norm)]
