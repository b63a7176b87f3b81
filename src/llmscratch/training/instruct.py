"""Instruction fine-tuning (the book's chapter 7): a model learns to answer in a prompt format.

```
data      Alpaca records {"instruction", "input", "output"} (a JSON array or JSONL), or chat records
          {"messages": [{"role", "content"}, ...]} (JSONL) ending with the assistant's answer
split     seeded shuffle, then 85% train, 10% test, 5% validation (the book's order), or given files
format    the book's Alpaca template (data/chat_template.py DEFAULT_TEMPLATE) or the model's own chat
          template: prompt ids = the conversation up to the answer, with the generation prompt;
          then the answer's ids and the end-of-text token
batch     padded with end-of-text to the longest in the batch; targets = inputs shifted by one;
          after the first end-of-text every target is -100, and (--mask-prompt) so is each target
          that is a prompt token, so only responses are learned
evaluate  the mean cross-entropy of the response tokens on held-out examples, before and after;
          the model's greedy answers to the test examples in test_responses.jsonl next to the
          references; --judge scores them 0-100 through an OpenAI-compatible endpoint
```

With ``--no-mask-prompt`` the batches are those of the book's ``custom_collate_fn`` exactly
(tests/test_finetune_instruct.py holds them equal); with the mask, the prompt positions also
read -100 (the book's exercise 7.2, with the ``### Response:`` line counted as prompt).
"""

from __future__ import annotations

import json
import math
import random
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..data.chat_template import DEFAULT_SOURCE, DEFAULT_TEMPLATE, ChatFormat, chat_format
from ..errors import ConfigError, CorpusError, LLMScratchError
from ..files import decode_utf8, write_text_atomic
from ..runtime import Runtime
from .evaluate import byte_lengths_for
from .finetune import FinetuneOptions, data_fingerprint, finetune
from .loop import LoopState, write_metrics
from .setup import Run
from .step import Batch

Log = Callable[[str], None]
IGNORE = -100  # the targets the loss leaves out (F.cross_entropy's ignore_index)
INSTRUCT_DEFAULTS: dict[str, Any] = {"val_data": None, "test_data": None, "template": "auto", "mask_prompt": True,
                                     "max_new_tokens": 256, "test_limit": None, "judge": None,
                                     "judge_model": "llama3", "val_fraction": 0.05, "test_fraction": 0.1}
RESPONSES_FILE = "test_responses.jsonl"


class InstructDataError(CorpusError):
    """Instruction data that cannot be used; the message names the file and the line."""


# --------------------------------------------------------------------------- reading


@dataclass
class Example:
    """One training example: its conversation, its record as read, and where it came from."""

    messages: list[dict[str, str]]
    record: dict[str, Any]
    where: str  # "FILE, line N" (or "FILE, item N" for a one-line JSON array)


def _records(path: Path, text: str) -> list[tuple[Any, int]]:
    """(record, line) pairs of a JSON array or a JSONL file (told apart by the first character)."""
    if text.lstrip().startswith("["):
        decoder, out = json.JSONDecoder(), []
        i = text.index("[") + 1
        while True:
            while i < len(text) and text[i] in " \t\r\n,":
                i += 1
            if i >= len(text):
                raise InstructDataError(f"{path}: the JSON array is not closed with ']' (a cut file?)")
            if text[i] == "]":
                return out
            try:
                obj, end = decoder.raw_decode(text, i)
            except json.JSONDecodeError as err:
                raise InstructDataError(f"{path}, line {err.lineno}: not valid JSON ({err.msg}, column "
                                        f"{err.colno})") from None
            out.append((obj, text.count("\n", 0, i) + 1))
            i = end
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), n))
        except json.JSONDecodeError as err:
            raise InstructDataError(f"{path}, line {n}: not a JSON object ({err.msg}, column {err.colno}); a JSONL "
                                    "file holds one JSON object per line") from None
    return out


def _text_field(record: dict, key: str, where: str, required: bool = True) -> str:
    value = record.get(key, "" if not required else None)
    if value is None:
        raise InstructDataError(f"{where}: no \"{key}\" field; an Alpaca record has \"instruction\", \"input\" "
                                "(may be empty) and \"output\"")
    if not isinstance(value, str):
        raise InstructDataError(f"{where}: \"{key}\" must be a string, got {type(value).__name__}")
    return value


def _example(record: Any, where: str) -> Example:
    if not isinstance(record, dict):
        raise InstructDataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
    if "messages" in record:
        messages = record["messages"]
        if (not isinstance(messages, list) or not messages
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                           for m in messages)):
            raise InstructDataError(f"{where}: \"messages\" must be a list of {{\"role\": ..., \"content\": \"...\"}}")
        if messages[-1]["role"] != "assistant":
            raise InstructDataError(f"{where}: the last message must be the assistant's answer (role "
                                    f"\"assistant\"), not {messages[-1]['role']!r}")
        if not messages[-1]["content"].strip():
            raise InstructDataError(f"{where}: the assistant's answer is empty: nothing to learn")
        return Example([dict(role=m["role"], content=m["content"]) for m in messages], record, where)
    instruction = _text_field(record, "instruction", where)
    extra_input = _text_field(record, "input", where, required=False)
    output = _text_field(record, "output", where)
    if not instruction.strip():
        raise InstructDataError(f"{where}: the \"instruction\" is empty")
    if not output.strip():
        raise InstructDataError(f"{where}: the \"output\" (the response) is empty: nothing to learn")
    return Example([{"role": "user", "content": instruction, "input": extra_input},
                    {"role": "assistant", "content": output}], record, where)


def read_examples(path: str | Path) -> list[Example]:
    """The examples of an Alpaca JSON/JSONL or chat JSONL file; bad ones raise :class:`InstructDataError`
    naming the file and line."""
    path = Path(path)
    if not path.is_file():
        raise InstructDataError(f"{path}: no such file" + (" (a folder)" if path.is_dir() else "")
                                + "; give an Alpaca-style JSON/JSONL or a chat JSONL file")
    text = decode_utf8(path.read_bytes(), str(path), InstructDataError)
    array = text.lstrip().startswith("[")
    examples = [_example(rec, f"{path}, line {line}") for rec, line in _records(path, text)]
    if not examples:
        raise InstructDataError(f"{path}: no examples in it" + (" (an empty JSON array)" if array else ""))
    return examples


def split_examples(examples: list[Example], seed: int, val_fraction: float,
                   test_fraction: float) -> tuple[list[Example], list[Example], list[Example]]:
    """Shuffled with ``seed``, then the book's split: train first, then test, the rest validation."""
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ConfigError(f"--val-fraction {val_fraction} and --test-fraction {test_fraction} must be in [0, 1) "
                          "and leave examples to train on")
    shuffled = list(examples)
    random.Random(seed).shuffle(shuffled)
    n_train = int(len(shuffled) * (1 - val_fraction - test_fraction) + 1e-9)
    n_test = int(len(shuffled) * test_fraction + 1e-9)
    train, test, val = shuffled[:n_train], shuffled[n_train:n_train + n_test], shuffled[n_train + n_test:]
    return train, val, test


# --------------------------------------------------------------------------- prompts and batches


def alpaca_user_text(message: dict[str, str], alpaca: bool) -> str:
    """The user's turn: the instruction and its input (the book's ``### Input:`` section in the Alpaca format)."""
    extra = message.get("input", "")
    if not extra:
        return message["content"]
    return message["content"] + (f"\n\n### Input:\n{extra}" if alpaca else f"\n\n{extra}")


def prompt_format(tokenizer: Any, template: str) -> ChatFormat:
    """``alpaca``: the book's template (the answer's end-of-text added as a token, not as text);
    ``model``: the tokenizer's own chat template; ``auto``: the model's where it has one."""
    own = chat_format(tokenizer)
    if template == "model" and own.is_default:
        raise ConfigError("--template model: this model's tokenizer has no chat template of its own; use "
                          "--template alpaca (the book's format)")
    if template == "alpaca" or (template == "auto" and own.is_default):
        return ChatFormat(template=DEFAULT_TEMPLATE, source=DEFAULT_SOURCE, stop_ids=own.stop_ids,
                          bos_token=own.bos_token, eos_token=None, is_default=True, tokenizer=tokenizer)
    return own


@dataclass
class Encoded:
    """An example as token ids: ``ids`` (prompt, response, end), of which the first ``prompt_len`` are the prompt."""

    ids: list[int]
    prompt_len: int
    where: str
    cut: bool = False


def conversation(example: Example, fmt: ChatFormat) -> list[dict[str, str]]:
    return [{"role": m["role"], "content": alpaca_user_text(m, fmt.is_default) if m["role"] == "user" else m["content"]}
            for m in example.messages]


def encode_example(example: Example, fmt: ChatFormat, context: int) -> Encoded:
    """The example's ids in ``fmt``, cut to ``context + 1`` tokens (one window of inputs and targets).

    The prompt is encoded as a generation prompt alone (as it is at inference); the answer's text
    is what the full conversation adds to it; the answer ends at its last end-of-turn id (a chat
    template's ``<|im_end|>``), or with the end-of-text token appended (the book's).
    """
    tok = fmt.tokenizer
    messages = conversation(example, fmt)
    prompt_ids = fmt.prompt_ids(messages[:-1], add_generation_prompt=True)
    prompt_text = fmt.render(messages[:-1], add_generation_prompt=True)
    full_text = fmt.render(messages)
    answer = full_text[len(prompt_text):] if full_text.startswith(prompt_text) else messages[-1]["content"]
    response = tok.encode(answer)
    ends = [i for i, t in enumerate(response) if t in fmt.stop_ids]
    if ends:
        response = response[:ends[-1] + 1]
    elif tok.eot_id is not None:
        response = response + [tok.eot_id]
    if len(prompt_ids) > context:
        raise InstructDataError(f"{example.where}: the prompt is {len(prompt_ids)} tokens, longer than the model's "
                                f"context ({context}), so none of the response could be learned; shorten it or leave "
                                "the example out")
    ids = prompt_ids + response
    return Encoded(ids[:context + 1], len(prompt_ids), example.where, cut=len(ids) > context + 1)


def collate(examples: Sequence[Encoded], pad_id: int, mask_prompt: bool) -> Batch:
    """Inputs and targets ``(B, L - 1)`` for the longest example's ``L`` ids: padded with ``pad_id``,
    targets shifted by one, -100 after each example's end (and on its prompt with ``mask_prompt``)."""
    longest = max(len(e.ids) for e in examples)
    rows = torch.full((len(examples), longest), pad_id, dtype=torch.long)  # (B, L)
    for i, e in enumerate(examples):
        rows[i, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
    inputs, targets = rows[:, :-1].clone(), rows[:, 1:].clone()  # (B, L - 1) each
    pos = torch.arange(longest - 1)  # (L - 1,): target j is id j + 1
    for i, e in enumerate(examples):
        targets[i, pos >= len(e.ids) - 1] = IGNORE
        if mask_prompt:
            targets[i, pos < e.prompt_len - 1] = IGNORE
    return inputs, targets


# --------------------------------------------------------------------------- the task


class InstructionTask:
    """Next-token loss on the responses of instruction examples: a :class:`training.finetune.FinetuneTask`.

    A step takes ``batch_size × grad_accum`` training examples in the order of a seeded
    permutation per epoch (the book's shuffled loader, dropping the last part-batch), counted
    from the step, so a resumed run takes the same batches.
    """

    def __init__(self, opts: FinetuneOptions, tokenizer: Any, runtime: Runtime, log: Log):
        extra = {**INSTRUCT_DEFAULTS, **opts.extra}
        self.opts, self.extra, self.tokenizer, self.runtime, self.log = opts, extra, tokenizer, runtime, log
        examples = read_examples(opts.data)
        if extra["val_data"] or extra["test_data"]:
            train, val, test = examples, [], []
            if extra["val_data"]:
                val = read_examples(extra["val_data"])
            if extra["test_data"]:
                test = read_examples(extra["test_data"])
            if not extra["val_data"] or not extra["test_data"]:  # the one not given is cut from --data
                train, v, t = split_examples(examples, opts.seed, 0.0 if extra["val_data"] else extra["val_fraction"],
                                             0.0 if extra["test_data"] else extra["test_fraction"])
                val, test = val or v, test or t
        else:
            train, val, test = split_examples(examples, opts.seed, extra["val_fraction"], extra["test_fraction"])
        if not train:
            raise InstructDataError(f"{opts.data}: no examples left to train on after the split ({len(examples)} in "
                                    "all); give more, or smaller --val-fraction / --test-fraction")
        self.train_set, self.val_set, self.test_set = train, val, test
        self.train_examples = len(train)
        self.data_sha = data_fingerprint(opts.data, extra["val_data"], extra["test_data"])
        self.batch_size, self.grad_accum = opts.batch_size, opts.grad_accum
        self.micro_size = opts.micro_batch or opts.batch_size
        self.step = 0
        self.encoded: dict[str, list[Encoded]] = {}

    # the hooks of a fine-tuning task

    def adapt(self, model: nn.Module) -> nn.Module:
        """Encode every split for this model's context (the model itself is used as it is)."""
        context = model.cfg.context_length
        self.fmt = prompt_format(self.tokenizer, self.extra["template"])
        self.pad_id = self.tokenizer.eot_id if self.tokenizer.eot_id is not None else 0
        for name, split in (("train", self.train_set), ("val", self.val_set), ("test", self.test_set)):
            self.encoded[name] = [encode_example(e, self.fmt, context) for e in split]
        cut = sum(e.cut for es in self.encoded.values() for e in es)
        self.log(f"data: {len(self.train_set)} training, {len(self.val_set)} validation, {len(self.test_set)} test "
                 f"examples ({self.opts.data}); prompt format: {self.fmt.source}; "
                 f"{'responses only learned (--mask-prompt)' if self.extra['mask_prompt'] else 'prompts learned too'}"
                 + (f"; {cut} example(s) longer than the context ({context} tokens) cut to it" if cut else ""))
        tokens = sum(len(e.ids) - 1 for e in self.encoded["train"])
        self.tokens_per_step = max(1, round(tokens / max(1, len(self.train_set)) * self.batch_size * self.grad_accum))
        self.local_windows = self.batch_size * self.grad_accum
        self.eval_windows_count = min(len(self.val_set), (self.opts.eval_batches or 10**9) * self.batch_size)
        self.byte_lengths = byte_lengths_for(self.tokenizer, model.cfg.vocab_size)
        return model

    def start(self, run: Run, step: int) -> None:
        """The step the loop starts from (a resume's): the batches go on from there."""
        self.step = step

    def before(self, run: Run) -> None:
        self._held_out(run, "before", step=0)

    def after(self, run: Run, state: LoopState) -> None:
        self._held_out(run, "after", step=state.step)
        if self.test_set:
            path = write_test_responses(run, self)
            if self.extra["judge"]:
                try:
                    judge_file(path, self.extra["judge"], self.extra["judge_model"], run.log)
                except JudgeError as err:
                    raise JudgeError(f"{err} (the fine-tuned run is saved in {run.run_dir}, its test responses in "
                                     f"{path})") from None

    # Task

    def micro_batches(self, generator: torch.Generator) -> list[Batch]:
        per_step = self.batch_size * self.grad_accum
        n = len(self.encoded["train"])
        if per_step > n:
            idx = torch.randperm(n, generator=torch.Generator().manual_seed(self.opts.seed + self.step))
            chosen = idx[torch.arange(per_step) % n].tolist()
        else:
            per_epoch = n // per_step
            epoch, i = divmod(self.step, per_epoch)
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.opts.seed * 1000 + epoch))
            chosen = perm[i * per_step:(i + 1) * per_step].tolist()
        self.step += 1
        examples = [self.encoded["train"][j] for j in chosen]
        self.tokens_per_step = sum(len(e.ids) - 1 for e in examples)  # this step's tokens, no padding (tokens/s)
        return [self._to_device(collate(examples[k:k + self.micro_size], self.pad_id, self.extra["mask_prompt"]))
                for k in range(0, len(examples), self.micro_size)]

    def _to_device(self, batch: Batch) -> Batch:
        return batch[0].to(self.runtime.device), batch[1].to(self.runtime.device)

    def loss(self, forward: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return forward(x, y)

    def evaluate(self, model: nn.Module, final: bool) -> dict[str, float]:
        examples = self.encoded["val"] or self.encoded["train"]
        if not final and self.opts.eval_batches is not None:
            examples = examples[:self.opts.eval_batches * self.batch_size]
        return self.response_loss(model, examples)

    @torch.no_grad()
    def response_loss(self, model: nn.Module, examples: Sequence[Encoded]) -> dict[str, float]:
        """The mean cross-entropy of the learned tokens (with the mask: the responses) of ``examples``,
        their perplexity, bits per byte and count."""
        was_training = model.training
        model.eval()
        nats, count, nbytes = 0.0, 0, 0
        try:
            for k in range(0, len(examples), self.batch_size):
                x, y = self._to_device(collate(examples[k:k + self.batch_size], self.pad_id, self.extra["mask_prompt"]))
                n = int((y != IGNORE).sum())
                if n == 0:
                    continue
                with self.runtime.autocast():
                    loss = model(x, y)
                nats += float(loss) * n
                count += n
                nbytes += int(self.byte_lengths.to(y.device)[y[y != IGNORE]].sum())
        finally:
            model.train(was_training)
        loss = nats / max(1, count)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "bpb": nats / math.log(2) / max(1, nbytes),
                "tokens": count}

    def _held_out(self, run: Run, when: str, step: int) -> None:
        record: dict[str, Any] = {"step": step, when: True}
        parts = []
        for name in ("val", "test"):
            if self.encoded[name]:
                ev = self.response_loss(run.model, self.encoded[name])
                record[f"{name}_response_loss"] = ev["loss"]
                parts.append(f"{name} {ev['loss']:.4f} ({ev['tokens']:,} tokens)")
        if parts:
            write_metrics(run, record)
            run.log(f"held-out response loss {when} fine-tuning: " + ", ".join(parts))


# --------------------------------------------------------------------------- test responses and the judge


def write_test_responses(run: Run, task: InstructionTask) -> Path:
    """The model's greedy answers to the test prompts, with each record and its reference, in
    ``test_responses.jsonl`` (``model_response`` as the book names it)."""
    from ..inference.engine import Engine
    from ..inference.generate import SamplingConfig

    limit = task.extra["test_limit"]
    examples = task.test_set[:limit] if limit else task.test_set
    encoded = task.encoded["test"][:len(examples)]
    engine = Engine(run.model, task.tokenizer)
    sampling = SamplingConfig(max_new_tokens=task.extra["max_new_tokens"], temperature=0.0)
    context = run.model.cfg.context_length
    answers: list[str] = []
    t0 = time.time()
    for k in range(0, len(encoded), task.batch_size):
        prompts = [e.ids[:e.prompt_len][-context:] for e in encoded[k:k + task.batch_size]]
        answers += [a.strip() for a in engine.complete(prompts, sampling)]
    lines = []
    for example, answer in zip(examples, answers):
        record = dict(example.record)
        if "messages" in record:
            record["output"] = example.messages[-1]["content"]
        record["model_response"] = answer
        lines.append(json.dumps(record, ensure_ascii=False))
    path = run.run_dir.path / RESPONSES_FILE
    write_text_atomic(path, "".join(line + "\n" for line in lines))
    run.log(f"test responses: {len(answers)} written to {path} ({time.time() - t0:.0f} s)")
    return path


def judge_prompt(record: dict[str, Any]) -> str:
    """The book's scoring prompt (``llms_from_scratch.ch07.generate_model_scores``)."""
    if "messages" in record:
        user = [m["content"] for m in record["messages"] if m.get("role") == "user"]
        entry = {"instruction": user[-1] if user else "", "input": ""}
    else:
        entry = record
    instruction_text = ("Below is an instruction that describes a task. Write a response that appropriately "
                        f"completes the request.\n\n### Instruction:\n{entry['instruction']}")
    input_text = f"\n\n### Input:\n{entry['input']}" if entry.get("input") else ""
    return (f"Given the input `{instruction_text + input_text}` and correct output `{record['output']}`, "
            f"score the model response `{record['model_response']}` on a scale from 0 to 100, where 100 is the "
            "best score. Respond with the integer number only.")


def chat_completions_url(url: str) -> str:
    """``http://host:port/v1`` (or the full ``…/chat/completions``) → the chat completions endpoint."""
    url = url.rstrip("/")
    if url.endswith("/chat/completions"):
        return url
    return url + ("/chat/completions" if url.endswith("/v1") else "/v1/chat/completions")


def ask_judge(url: str, model: str, prompt: str, timeout: float = 120.0) -> str:
    """One chat completion (temperature 0, seed 123, as the book queries its judge); the answer's text."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": prompt}], "temperature": 0,
                       "seed": 123, "max_tokens": 16}).encode("utf-8")
    request = urllib.request.Request(chat_completions_url(url), data=body, method="POST",
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read().decode("utf-8"))
        return str(answer["choices"][0]["message"]["content"])
    except urllib.error.HTTPError as err:
        raise JudgeError(f"--judge {url}: the endpoint answered HTTP {err.code} ({err.reason}); check the URL and "
                         f"--judge-model {model!r}") from None
    except (urllib.error.URLError, OSError) as err:
        raise JudgeError(f"--judge {url}: cannot reach it ({getattr(err, 'reason', err)}); start the server (Ollama: "
                         "`ollama serve`; ours: `llmscratch serve RUN`) or fix the URL") from None
    except (ValueError, KeyError, IndexError, TypeError):
        raise JudgeError(f"--judge {url}: the answer is not an OpenAI chat completion (no choices[0].message."
                         "content); give an OpenAI-compatible endpoint") from None


class JudgeError(LLMScratchError):
    """The judge endpoint could not be reached or did not answer as an OpenAI-compatible one."""


def judge_file(path: Path, url: str, model: str, log: Log = print) -> dict[str, Any]:
    """Score every response of a ``test_responses.jsonl`` 0-100 with the book's prompt; the scores go
    into the file (``judge_score``, null where the answer was no integer) and the mean is returned."""
    check_judge_url(url)
    records = [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    scores: list[int] = []
    for record in records:
        answer = ask_judge(url, model, judge_prompt(record)).strip()
        try:
            score = int(answer)
        except ValueError:
            record["judge_score"] = None
            log(f"judge: could not read a score from {answer!r}")
            continue
        record["judge_score"] = score
        scores.append(score)
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    result = {"judged": len(scores), "of": len(records),
              "mean_score": sum(scores) / len(scores) if scores else None}
    if scores:
        log(f"judge ({model} at {url}): mean score {result['mean_score']:.2f} of 100 over {len(scores)} responses")
    return result


# --------------------------------------------------------------------------- entry point


def finetune_instruct(opts: FinetuneOptions, log: Log = print, given: Optional[set[str]] = None) -> Path:
    """Instruction fine-tuning of ``opts.base`` on ``opts.data`` (see the module's docstring); the new run directory."""
    extra = {**INSTRUCT_DEFAULTS, **opts.extra}
    unknown = sorted(set(extra) - set(INSTRUCT_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown instruction fine-tuning option(s) {unknown}; known: {sorted(INSTRUCT_DEFAULTS)}")
    if extra["template"] not in ("auto", "alpaca", "model"):
        raise ConfigError(f"--template must be auto, alpaca or model, got {extra['template']!r}")
    if extra["max_new_tokens"] < 1:
        raise ConfigError(f"--max-new-tokens must be a positive integer, got {extra['max_new_tokens']}")
    if extra["judge"]:
        check_judge_url(extra["judge"])
    opts.extra = extra
    return finetune(opts, InstructionTask, log, given)


def check_judge_url(url: str) -> None:
    """``--judge`` is an http(s) address (checked before training, not after it)."""
    from urllib.parse import urlparse

    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ConfigError(f"--judge {url!r} is not an http(s) address; give the endpoint's base URL, such as "
                          "http://localhost:11434/v1 (Ollama) or http://127.0.0.1:8000/v1 (`llmscratch serve`)")
