"""Classification fine-tuning: the task the training loop runs, and the numbers of a classifier on labelled texts.

```
step:     batch_size × grad_accum texts drawn (with replacement, from the loop's generator)
          → right-padded with -1 → GPTClassifier → cross-entropy against the class ids
evaluate: every validation text → loss (mean over texts) and accuracy
report:   accuracy, per-class precision and recall, the confusion matrix (rows: true, columns: predicted)
```

The numbers are the book's (chapter 6, ``calc_accuracy_loader`` / ``calc_loss_loader``): the
accuracy is the fraction of texts whose highest logit is their class; the loss is the mean
cross-entropy over texts (the book's is the mean of its batches' means: the same when every
batch is full).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn as nn

from ..data.labelled import Encoded
from ..nn.classifier import POOLS, GPTClassifier, pad_batch
from ..nn.model import GPT
from ..runtime import Runtime
from ..store.classifier import save_labels
from .distributed import Group, local_micro_batches
from .step import Batch


@dataclass
class ClassScores:
    """A classifier's numbers on a labelled set."""

    loss: float
    accuracy: float
    confusion: list[list[int]]  # [true class][predicted class]
    predictions: list[int] = field(default_factory=list)

    def precision_recall(self) -> list[tuple[float, float]]:
        """``(precision, recall)`` of each class (NaN where a class is never predicted / never present)."""
        n = len(self.confusion)
        out = []
        for c in range(n):
            hit = self.confusion[c][c]
            predicted = sum(self.confusion[r][c] for r in range(n))
            present = sum(self.confusion[c])
            out.append((hit / predicted if predicted else math.nan, hit / present if present else math.nan))
        return out


@torch.no_grad()
def score(model: nn.Module, data: Encoded, runtime: Runtime, batch_size: int = 8,
          pad_to: Optional[int] = None) -> ClassScores:
    """Loss, accuracy and the confusion matrix of ``model`` (a GPTClassifier) on encoded texts.

    ``pad_to``: pad every batch to this length (the book pads all texts to the longest training
    text; it matters only for ``pool="end"``), else to each batch's longest text.
    """
    was_training = model.training
    model.eval()
    n = model.n_classes
    confusion = [[0] * n for _ in range(n)]
    total, predictions = 0.0, []
    for i in range(0, len(data.ids), batch_size):
        x = pad_batch(data.ids[i : i + batch_size], pad_to).to(runtime.device)  # (B, T)
        y = torch.as_tensor(data.labels[i : i + batch_size], device=runtime.device)  # (B,)
        with runtime.autocast():
            logits = model(x).float()  # (B, n_classes)
        total += nn.functional.cross_entropy(logits, y, reduction="sum").item()
        for t, p in zip(y.tolist(), logits.argmax(dim=-1).tolist()):
            confusion[t][p] += 1
            predictions.append(p)
    model.train(was_training)
    count = max(1, len(data.ids))
    hits = sum(confusion[c][c] for c in range(n))
    return ClassScores(loss=total / count, accuracy=hits / count, confusion=confusion, predictions=predictions)


class ClassificationTask:
    """The loop's task for a classifier: batches of labelled texts, their cross-entropy, validation accuracy."""

    def __init__(self, train: Encoded, val: Encoded, batch_size: int, grad_accum: int, micro_size: int,
                 runtime: Runtime, group: Group, pad_to: Optional[int] = None, eval_texts: Optional[int] = None,
                 on_eval: Optional[Callable[[ClassScores, bool], None]] = None):
        self.train, self.val, self.runtime, self.group = train, val, runtime, group
        self.batch_size, self.grad_accum, self.micro_size, self.pad_to = batch_size, grad_accum, micro_size, pad_to
        mean_len = sum(len(r) for r in train.ids) / max(1, len(train.ids))
        self.tokens_per_step = int(batch_size * grad_accum * mean_len)
        self.local_windows = batch_size * grad_accum // group.world_size
        self.eval_texts = eval_texts
        self.eval_windows_count = len(val.ids) if eval_texts is None else min(eval_texts, len(val.ids))
        self.on_eval = on_eval
        self.last_scores: Optional[ClassScores] = None

    def micro_batches(self, generator: torch.Generator) -> list[Batch]:
        picks = torch.randint(len(self.train.ids), (self.batch_size * self.grad_accum,), generator=generator)
        local = local_micro_batches(picks, self.group.rank, self.group.world_size, self.micro_size)
        batches = []
        for part in local:
            rows = [self.train.ids[i] for i in part.tolist()]
            x = pad_batch(rows, self.pad_to)  # (B, T)
            y = torch.as_tensor([self.train.labels[i] for i in part.tolist()])  # (B,)
            batches.append((x.to(self.runtime.device), y.to(self.runtime.device)))
        return batches

    def loss(self, forward: Callable[..., torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return forward(x, y)

    def evaluate(self, model: nn.Module, final: bool) -> dict[str, float]:
        data = self.val
        if not final and self.eval_texts is not None:
            data = Encoded(self.val.ids[: self.eval_texts], self.val.labels[: self.eval_texts], 0)
        scores = score(model, data, self.runtime, batch_size=max(1, self.micro_size), pad_to=self.pad_to)
        self.last_scores = scores
        if self.on_eval is not None:
            self.on_eval(scores, final)
        # "bpb" is the score that picks the best weights: here the validation loss.
        return {"loss": scores.loss, "ppl": math.exp(min(scores.loss, 50.0)), "bpb": scores.loss,
                "tokens": len(data.ids), "accuracy": scores.accuracy}


def format_report(scores: ClassScores, classes: Sequence[str]) -> str:
    """Accuracy, per-class precision and recall, and the confusion matrix, as a table for people."""
    total = sum(map(sum, scores.confusion))
    width = max(9, *(len(c) for c in classes))
    lines = [f"{total:,} texts: accuracy {100 * scores.accuracy:.2f}%, loss {scores.loss:.4f}", "",
             f"{'class':<{width}}  precision  recall  support"]
    for name, (p, r), row in zip(classes, scores.precision_recall(), scores.confusion):
        lines.append(f"{name:<{width}}  {_pct(p):>9}  {_pct(r):>6}  {sum(row):>7,}")
    lines += ["", "confusion matrix (rows: true class, columns: predicted)",
              " " * width + "  " + "  ".join(f"{c:>{max(6, len(c))}}" for c in classes)]
    for name, row in zip(classes, scores.confusion):
        lines.append(f"{name:<{width}}  " + "  ".join(f"{v:>{max(6, len(c))},}" for v, c in zip(row, classes)))
    return "\n".join(lines)


def _pct(x: float) -> str:
    return "n/a" if math.isnan(x) else f"{100 * x:.1f}%"


# ============================================================================ the fine-tuning task

CLASSIFY_DEFAULTS = {"text_column": "text", "label_column": "label", "balance": False, "pool": "last",
                     "val_fraction": 0.1, "test_fraction": 0.2}


@dataclass
class LabelledSplits:
    """The data of a classification run: classes in id order, the encoded splits, and what was cut."""

    classes: list[str]
    train: Encoded
    val: Encoded
    test: Encoded
    sources: list[str]
    notes: list[str]


def prepare_splits(extra: dict, data: str, tokenizer, max_tokens: int, seed: int) -> LabelledSplits:
    """Read, balance (``--balance``) and split (70/10/20 by default, or ``--val-data``/``--test-data``)
    the labelled texts, map labels to ids and encode them, cut to ``max_tokens`` (counted in ``notes``)."""
    from ..data import labelled as lab
    from ..errors import ConfigError

    options = {**CLASSIFY_DEFAULTS, **{k: v for k, v in extra.items() if v is not None}}
    cols = (options["text_column"], options["label_column"])
    examples = lab.load_examples(data, *cols)
    val_file, test_file = options.get("val_data"), options.get("test_data")
    if options["balance"] or (data in lab.BUILTIN_DATA and not Path(data).exists()):  # testament: always balanced
        examples = lab.balance(examples, seed=seed)
    val_frac, test_frac = float(options["val_fraction"]), float(options["test_fraction"])
    if not (0 <= val_frac < 1 and 0 <= test_frac < 1 and val_frac + test_frac < 1):
        raise ConfigError(f"--val-fraction {val_frac} and --test-fraction {test_frac} must leave texts to train on")
    if val_file or test_file:  # what is not given as a file is cut from --data
        held = (0.0 if val_file else val_frac) + (0.0 if test_file else test_frac)
        train, val, test = lab.split(examples, 1.0 - held, 0.0 if val_file else val_frac, seed=seed)
        val = lab.load_examples(val_file, *cols) if val_file else val
        test = lab.load_examples(test_file, *cols) if test_file else test
    else:
        train, val, test = lab.split(examples, 1.0 - val_frac - test_frac, val_frac, seed=seed)
    if not train or not val:
        raise ConfigError(f"{data}: {len(examples)} labelled texts leave {len(train)} to train on and {len(val)} to "
                          "validate with; give more texts (at least a few per class)")
    classes = lab.label_map(train, data)
    notes, encoded = [], []
    for name, part, src in (("training", train, data), ("validation", val, val_file or data),
                            ("test", test, test_file or data)):
        enc = lab.encode(part, tokenizer, classes, max_tokens)
        if enc.cut:
            notes.append(f"{enc.cut:,} of the {len(part):,} {name} texts of {src} are longer than the model's context "
                         f"({max_tokens} tokens) and were cut to it")
        encoded.append(enc)
    sources = [s for s in (data, val_file, test_file) if s]
    return LabelledSplits(classes, *encoded, sources=sources, notes=notes)


class ClassifyFinetuneTask(ClassificationTask):
    """``finetune --task classify``: a class head on the base run's GPT, trained on labelled texts.

    The data is read in :meth:`adapt`, once the base model's context length (where texts are cut)
    is known; the finetune flow asks for ``train_examples`` and ``data_sha`` after that.
    """

    def __init__(self, opts: Any, tokenizer: Any, runtime: Runtime, log: Callable[[str], None]):
        from ..errors import ConfigError
        from .distributed import micro_batch_size

        self.opts, self.tokenizer, self.log = opts, tokenizer, log
        self.options = {**CLASSIFY_DEFAULTS, **{k: v for k, v in opts.extra.items() if v is not None}}
        if self.options["pool"] not in POOLS:
            raise ConfigError(f"--pool must be one of {', '.join(POOLS)}, got {self.options['pool']!r}")
        self.pad_id = tokenizer.eot_id if tokenizer.eot_id is not None else 0
        self._runtime = runtime
        self._micro = micro_batch_size(opts.batch_size, opts.grad_accum, 1, opts.micro_batch)
        self.splits: Optional[LabelledSplits] = None
        self.train_examples, self.data_sha = 0, ""
        self.run: Any = None

    def adapt(self, model: GPT) -> GPTClassifier:
        """Read the data (cut to the model's context), then the base GPT with a new class head."""
        self.splits = prepare_splits(self.options, self.opts.data, self.tokenizer, model.cfg.context_length,
                                     self.opts.seed)
        for note in self.splits.notes:
            self.log(f"note: {note}")
        pad_to = max(len(r) for r in self.splits.train.ids) if self.options["pool"] == "end" else None
        eval_texts = None if self.opts.eval_batches is None else self.opts.eval_batches * self.opts.batch_size
        super().__init__(self.splits.train, self.splits.val, self.opts.batch_size, self.opts.grad_accum, self._micro,
                         self._runtime, Group(), pad_to=pad_to, eval_texts=eval_texts, on_eval=self._on_eval)
        self.train_examples = len(self.splits.train.ids)
        self.data_sha = data_sha(self.splits.sources, self.options)
        counts = [self.splits.train.labels.count(i) for i in range(len(self.splits.classes))]
        self.log(f"data: {len(self.splits.train.ids):,} training, {len(self.splits.val.ids):,} validation and "
                 f"{len(self.splits.test.ids):,} test texts; classes "
                 + ", ".join(f"{c} ({n:,})" for c, n in zip(self.splits.classes, counts)))
        return GPTClassifier.from_gpt(model, len(self.splits.classes), self.options["pool"], self.pad_id,
                                      seed=self.opts.seed)

    def new_parameters(self, model: GPTClassifier) -> list:
        """The class head: it learns whatever ``--train`` freezes."""
        return model.task_parameters()

    def labels_info(self) -> dict[str, Any]:
        """What ``labels.json`` records: the classes, how texts are read, where the run came from."""
        return {"classes": self.splits.classes, "pool": self.options["pool"], "pad_id": self.pad_id,
                "pad_to": self.pad_to, "text_column": self.options["text_column"],
                "label_column": self.options["label_column"], "data": self.opts.data,
                "base": str(Path(self.opts.base).resolve()) if self.opts.base else None, "train": self.opts.train}

    def start(self, run: Any, step: int) -> None:
        self.run = run
        save_labels(run.run_dir.path, self.labels_info())

    def before(self, run: Any) -> None:
        scores = score(run.model, self.val, self.runtime, batch_size=self.micro_size, pad_to=self.pad_to)
        self.log(f"before fine-tuning: validation accuracy {100 * scores.accuracy:.2f}%, loss {scores.loss:.4f}")

    def _on_eval(self, scores: ClassScores, final: bool) -> None:
        if self.run is None:
            return
        self.log(f"  validation accuracy {100 * scores.accuracy:.2f}%")
        save_labels(self.run.run_dir.best.path, self.labels_info())  # best/ loads as a classifier too

    def after(self, run: Any, state: Any) -> None:
        """The whole validation and test splits, scored; the test report printed and kept in metrics.jsonl."""
        val = score(run.model, self.val, self.runtime, batch_size=self.micro_size, pad_to=self.pad_to)
        record: dict[str, Any] = {"step": state.step, "val_accuracy": val.accuracy, "val_class_loss": val.loss}
        self.log(f"after fine-tuning: validation accuracy {100 * val.accuracy:.2f}%, loss {val.loss:.4f}")
        if self.splits.test.ids:
            test = score(run.model, self.splits.test, self.runtime, batch_size=self.micro_size, pad_to=self.pad_to)
            record.update(test_accuracy=test.accuracy, test_loss=test.loss, test_confusion=test.confusion)
            self.log("test split: " + format_report(test, self.splits.classes))
        run.run_dir.append_metrics(record)


def data_sha(sources: Sequence[str], options: dict[str, Any]) -> str:
    """SHA-256 of the data files (the built-in corpus for ``testament``) and the options that read them."""
    import hashlib
    import json

    from ..data.corpus import builtin_corpus_path
    from ..data.labelled import BUILTIN_DATA

    h = hashlib.sha256(json.dumps({k: options.get(k) for k in sorted(CLASSIFY_DEFAULTS)}, sort_keys=True).encode())
    for src in sources:
        path = builtin_corpus_path() if src in BUILTIN_DATA and not Path(src).exists() else Path(src)
        h.update(src.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def make_classify_task(opts: Any, tokenizer: Any, runtime: Runtime, log: Callable[[str], None]) -> ClassifyFinetuneTask:
    """The task factory ``training.finetune.finetune`` calls."""
    return ClassifyFinetuneTask(opts, tokenizer, runtime, log)


def evaluate_labelled(run_dir: str | Path, data: str, text_column: Optional[str] = None,
                      label_column: Optional[str] = None, device: str = "auto",
                      batch_size: int = 16) -> tuple[ClassScores, list[str], list[str]]:
    """A classifier run's scores on every text of a labelled file (or ``testament``), the classes, and notes
    (texts cut to the context). The columns default to those the run was fine-tuned with."""
    from ..data import labelled as lab
    from ..errors import ConfigError
    from ..runtime import setup_runtime
    from ..store.classifier import load_classifier

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"--batch-size must be a positive integer, got {batch_size!r}")
    runtime = setup_runtime(device, "auto")
    model, tokenizer, info = load_classifier(run_dir, device=runtime.device, need_tokenizer="the texts")
    examples = lab.load_examples(data, text_column or info.get("text_column", "text"),
                                 label_column or info.get("label_column", "label"))
    encoded = lab.encode(examples, tokenizer, info["classes"], model.cfg.context_length)
    notes = [f"{encoded.cut:,} of the {len(examples):,} texts of {data} are longer than the model's context "
             f"({model.cfg.context_length} tokens) and were cut to it"] if encoded.cut else []
    scores = score(model, encoded, runtime, batch_size=batch_size, pad_to=info.get("pad_to"))
    return scores, list(info["classes"]), notes
