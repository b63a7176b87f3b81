"""What every experiment shares: sizes per mode, data, a small training loop, the report.

An experiment is a module with ``NAME``, ``SUMMARY`` and a function
``run(mode, out_dir, runtime, seed, data_path, encoding, log) -> Report`` that trains a few small models
which differ in one thing, measures them, and writes ``out_dir/<name>/``:

* ``report.md``: what was run, the results tables, the plots and a few sentences of
  findings written from the numbers (never canned);
* ``results.json``: the same tables, findings and settings (every number the report
  shows, stored already rounded so the two agree digit for digit), plus the series the
  plots draw;
* the PNG plots.

While it trains it reports each model as it starts and as it ends (``Progress``: a line to
``log``, stdout by default, ``None`` for silence), since a run lasts minutes before the report.

Three sizes (``mode``): ``tiny`` (seconds, a synthetic corpus; the tests use it),
``quick`` (a few minutes on a 2-core CPU, the built-in corpus with a character tokenizer)
and ``full`` (meant for a GPU: bigger models, a BPE tokenizer, more steps).
"""

from __future__ import annotations

import json
import math
import random
import shlex
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import torch
import torch.nn as nn

from ...files import write_atomic, write_text_atomic
from ...data.corpus import (check_split_sizes, eval_windows, gather_windows, load_corpus, prepare_tokens, split_text,
                    window_starts, Corpus, TokenSplits)
from ...errors import ConfigError
from ...nn.model import GPT, GPTConfig
from ...runtime import Runtime, seed_everything
from ...data.tokenizer import Tokenizer, build_tokenizer

if TYPE_CHECKING:
    from types import ModuleType

    from matplotlib.figure import Figure

MODES = ("tiny", "quick", "full")
DEFAULT_SEED = 1337  # `llmscratch experiment`'s --seed when none is given
VAL_FRACTION = 0.1  # the held-out tail of the corpus
REPORT_FILES = ("report.md", "results.json")  # written into out_dir/<name>/, with the plots


# --------------------------------------------------------------------------- sizes


@dataclass(frozen=True)
class Size:
    """The data, model and training sizes of one mode; experiments vary one thing on top."""

    corpus: str  # "synthetic" or "builtin"
    tokenizer: str  # "char" or "bpe"
    vocab_size: int  # for "bpe"
    context_length: int
    emb_dim: int
    n_layers: int
    n_heads: int
    steps: int
    batch_size: int
    lr: float
    eval_every: int
    eval_windows: int  # validation windows per evaluation

    def model_config(self, vocab_size: int, **overrides: Any) -> GPTConfig:
        """A GPTConfig of this size (no dropout, tied embeddings), with ``overrides`` applied."""
        base = dict(
            vocab_size=vocab_size, context_length=self.context_length, emb_dim=self.emb_dim,
            n_layers=self.n_layers, n_heads=self.n_heads, drop_rate=0.0, tie_weights=True,
        )
        return GPTConfig.from_preset("test", **{**base, **overrides})


SIZES: dict[str, Size] = {
    "tiny": Size("synthetic", "char", 0, context_length=16, emb_dim=32, n_layers=2, n_heads=2,
                 steps=20, batch_size=8, lr=3e-3, eval_every=10, eval_windows=16),
    "quick": Size("builtin", "char", 0, context_length=64, emb_dim=64, n_layers=2, n_heads=4,
                  steps=150, batch_size=16, lr=3e-3, eval_every=25, eval_windows=32),
    "full": Size("builtin", "bpe", 4096, context_length=256, emb_dim=512, n_layers=6, n_heads=8,
                 steps=3000, batch_size=32, lr=1e-3, eval_every=250, eval_windows=256),
}


def check_mode(mode: str) -> Size:
    """The sizes of ``mode``; an unknown mode is a ConfigError naming the valid ones."""
    if mode not in SIZES:
        raise ConfigError(f"experiment mode must be one of {MODES}, got {mode!r}")
    return SIZES[mode]


# --------------------------------------------------------------------------- data


SYNTHETIC_WORDS = (
    "the king said unto them and it came to pass that he went into the city of david "
    "with his sons for the lord had spoken these words in the house of israel"
).split()


def synthetic_corpus(n_chars: int = 40_000, seed: int = 0) -> Corpus:
    """A small deterministic text of short sentences from a 30-word vocabulary.

    It has structure a tiny model can learn in seconds (spelling, word order, the period
    and newline after each sentence), so the tiny mode exercises real learning without
    reading the built-in corpus.
    """
    rng = random.Random(seed)
    lines, size = [], 0
    while size < n_chars:
        words = [rng.choice(SYNTHETIC_WORDS) for _ in range(rng.randint(4, 10))]
        line = " ".join(words).capitalize() + "."
        lines.append(line)
        size += len(line) + 1
    return Corpus("\n".join(lines), [], "synthetic")


@dataclass
class ExperimentData:
    """Token splits, the tokenizer, and each token's UTF-8 length (for bits per byte)."""

    splits: TokenSplits
    tokenizer: Tokenizer
    byte_lengths: torch.Tensor  # (vocab_size,) int64
    corpus_name: str
    source: Optional[str] = None  # the --data path, where one was given
    encoding: str = "utf-8"  # how the --data files were read

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size


def load_data(size: Size, cache_dir: Path, data: Optional[str] = None, longest: Optional[int] = None,
              encoding: str = "utf-8") -> ExperimentData:
    """The corpus of ``size`` (or ``data``, read as ``encoding``), its tokenizer, and token files cached under ``cache_dir``.

    CorpusError, naming the corpus, unless each split holds a window of ``longest`` tokens
    (default: the size's context), the longest an experiment reads.
    """
    if data is not None:
        corpus = load_corpus(data, encoding=encoding)
    elif size.corpus == "synthetic":
        corpus = synthetic_corpus()
    else:
        corpus = load_corpus(None)
    # As `llmscratch train`: BPE merges are learned from the training part only, so the held-out
    # text stays unseen; a character vocabulary must cover every character of the corpus.
    text = split_text(corpus.text, VAL_FRACTION)[0] if size.tokenizer == "bpe" else corpus.text
    tokenizer = build_tokenizer(size.tokenizer, text, vocab_size=size.vocab_size or 4096)
    splits = prepare_tokens(corpus, tokenizer, cache_dir, val_fraction=VAL_FRACTION)
    check_split_sizes(splits, longest or size.context_length, val_fraction_option=False)
    lengths = torch.as_tensor(tokenizer.token_byte_lengths(), dtype=torch.int64)
    return ExperimentData(splits, tokenizer, lengths, corpus.name, source=data, encoding=encoding)


def validation_batches(data: ExperimentData, context_length: int, n_windows: int, seed: int,
                       batch_size: int = 16) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed, seeded validation windows of ``context_length`` tokens: the same for every model."""
    gen = torch.Generator().manual_seed(seed + 1)
    return eval_windows(data.splits.val, context_length, n_windows=n_windows, generator=gen, batch_size=batch_size)


# --------------------------------------------------------------------------- training


@dataclass
class TrainLog:
    """What one training run recorded."""

    eval_steps: list[int] = field(default_factory=list)
    val_losses: list[float] = field(default_factory=list)  # at eval_steps
    train_losses: list[float] = field(default_factory=list)  # every step
    grad_norms: list[float] = field(default_factory=list)  # every step, before clipping
    qkv_grad_norms: list[float] = field(default_factory=list)  # every step: the Q, K, V projections
    train_seconds: float = 0.0  # time in training steps only (evaluations excluded)
    tokens: int = 0

    @property
    def final_val_loss(self) -> float:
        return self.val_losses[-1]

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.train_seconds, 1e-9)


Log = Callable[[str], None]  # where progress lines go; None: nowhere


def print_progress(line: str) -> None:
    """The default ``log``: ``line`` on stdout at once (flushed), so a run of minutes shows it is alive."""
    print(line, flush=True)


class Progress:
    """Numbers an experiment's training runs and reports each one's start and end as a line.

    Each run of ``train_model`` writes ``[i/total] label: training N steps of B windows ...``
    as it starts and ``[i/total] label: val loss L, S s`` as it ends (S: wall-clock seconds
    of the run, evaluations included), through ``log``; ``log=None`` keeps it silent.
    """

    def __init__(self, total: int, log: Optional[Log] = print_progress) -> None:
        self.total = total
        self.log = log
        self.started = 0

    def start(self, label: str, steps: int, batch_size: int) -> str:
        """Announce the next run; return its numbered label for :meth:`finish`."""
        self.started += 1
        numbered = f"[{self.started}/{self.total}] {label}"
        if self.log is not None:
            self.log(f"{numbered}: training {steps} steps of {batch_size} windows ...")
        return numbered

    def finish(self, numbered: str, val_loss: float, seconds: float) -> None:
        """Report how the run ended: its final validation loss and wall-clock seconds."""
        if self.log is not None:
            self.log(f"{numbered}: val loss {val_loss:.4f}, {seconds:.1f} s")


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], runtime: Runtime) -> float:
    """Mean next-token cross-entropy (nats per token) over ``batches``."""
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    for x, y in batches:
        x, y = x.to(runtime.device), y.to(runtime.device)  # (B, T) each
        with runtime.autocast():
            logits = model(x)  # (B, T, V)
        total += torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1), reduction="sum"
        ).item()  # (B·T, V) against (B·T,)
        count += y.numel()
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def loss_by_position(model: nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]],
                     runtime: Runtime) -> list[float]:
    """Mean cross-entropy at each position of the windows: ``(T,)`` as a list; leaves the model in eval mode."""
    model.eval()
    total, count = None, 0
    for x, y in batches:
        x, y = x.to(runtime.device), y.to(runtime.device)  # (B, T) each
        with runtime.autocast():
            logits = model(x)  # (B, T, V)
        nll = torch.nn.functional.cross_entropy(
            logits.float().transpose(1, 2), y, reduction="none"  # (B, V, T): classes on dim 1
        )  # (B, T)
        total = nll.sum(0) if total is None else total + nll.sum(0)
        count += y.shape[0]
    return (total / count).tolist()


def _grad_norm(params: list[torch.Tensor]) -> float:
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()


def train_model(
    model: GPT,
    data: ExperimentData,
    runtime: Runtime,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int,
    eval_every: int,
    val_batches: list[tuple[torch.Tensor, torch.Tensor]],
    progress: Optional[Progress] = None,
    label: str = "model",
) -> TrainLog:
    """Train ``model`` on random training windows with AdamW and the project's schedule.

    One step is ``llmscratch train``'s (``training.step.train_step``), with its optimizer and
    schedule (``build_optimizer``, ``lr_at``: warmup then cosine decay to lr/10); gradients
    are clipped to 1.0. The batch
    order depends on ``seed`` only, so models trained with the same seed and batch size
    see the same windows. Validation loss is measured every ``eval_every`` steps and at
    the end; the gradient norm (before clipping) is logged every step. With ``progress``,
    the run is announced under ``label`` (e.g. ``heads=4``) as it starts and ends.
    """
    from ...training.config import TrainConfig, lr_at
    from ...training.step import build_optimizer, set_lr, train_step

    context = model.cfg.context_length
    # The experiments' own optimizer, written out rather than taken from `llmscratch train`'s
    # defaults: those were retuned for the default run (Muon, weight decay 0.6, β 0.8/0.999) after
    # docs/experiments.md was measured, and silently changed every result the page records.
    cfg = TrainConfig(steps=steps, batch_size=batch_size, lr=lr, min_lr=lr / 10,
                      warmup_steps=max(1, steps // 20), grad_clip=1.0,
                      optimizer="adamw", weight_decay=0.1, beta1=0.9, beta2=0.95)
    numbered = progress.start(label, steps, batch_size) if progress is not None else label
    t_start = time.perf_counter()
    model.to(runtime.device).train()
    optimizer = build_optimizer(model, cfg, runtime.device)
    qkv_params = [block.attn.qkv.weight for block in model.blocks]
    gen = torch.Generator().manual_seed(seed)
    log = TrainLog()
    n_train = len(data.splits.train)
    for step in range(steps):
        runtime.synchronize()
        t0 = time.perf_counter()
        set_lr(optimizer, lr_at(step, cfg))
        starts = window_starts(n_train, batch_size, context, gen)
        x, y = gather_windows(data.splits.train, starts, context)  # (B, T) each
        result = train_step(model, model.parameters(), optimizer, [(x.to(runtime.device), y.to(runtime.device))],
                            grad_clip=cfg.grad_clip, autocast=runtime.autocast,
                            before_clip=lambda: log.qkv_grad_norms.append(_grad_norm(qkv_params)))
        log.train_losses.append(result.loss.item())  # the .item() syncs, so the timing is honest
        log.grad_norms.append(float(result.grad_norm))
        log.train_seconds += time.perf_counter() - t0
        log.tokens += batch_size * context
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            log.eval_steps.append(step + 1)
            log.val_losses.append(mean_loss(model, val_batches, runtime))
    model.eval()
    if progress is not None:
        progress.finish(numbered, log.final_val_loss, time.perf_counter() - t_start)
    return log


def fresh_model(cfg: GPTConfig, seed: int, runtime: Runtime) -> GPT:
    """A GPT built right after seeding, so equal configs start from equal weights."""
    seed_everything(seed)
    return GPT(cfg).to(runtime.device)


def probe_batch(data: ExperimentData, context_length: int, batch_size: int, seed: int) -> torch.Tensor:
    """Fixed validation windows ``(B, T)`` for measuring attention (scores, entropy, diversity)."""
    gen = torch.Generator().manual_seed(seed + 2)
    starts = window_starts(len(data.splits.val), batch_size, context_length, gen)
    x, _ = gather_windows(data.splits.val, starts, context_length)
    return x  # (B, T)


# --------------------------------------------------------------------------- numbers and findings


def r4(x: float) -> float:
    """Round to 4 decimals: the precision tables show losses and entropies with."""
    return round(float(x), 4)


def sig(x: float, digits: int = 3) -> float:
    """Round to ``digits`` significant digits (for numbers of any magnitude, e.g. 3.2e-07)."""
    x = float(x)
    if x == 0.0 or not math.isfinite(x):
        return x
    return float(f"{x:.{digits}g}")


def show(value: Any) -> str:
    """How a table cell or a number in a finding is written: ``None`` is ``n/a``."""
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    return str(value)


def pct(new: float, old: float) -> str:
    """``new`` relative to ``old`` as a signed percentage, e.g. ``+3.1%``."""
    if old == 0:
        return "n/a"
    return f"{100.0 * (new - old) / abs(old):+.1f}%"


# --------------------------------------------------------------------------- the report


@dataclass
class Table:
    """A results table: a title, column names and rows of numbers, strings or ``None`` (n/a)."""

    title: str
    columns: list[str]
    rows: list[list[Any]]

    def markdown(self) -> str:
        """The table in Markdown, its title in bold above it; ``None`` cells read ``n/a``."""
        lines = [f"**{self.title}**", "", "| " + " | ".join(self.columns) + " |",
                 "|" + "|".join("---" for _ in self.columns) + "|"]
        lines += ["| " + " | ".join(show(v) for v in row) + " |" for row in self.rows]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """The table as plain data for ``results.json``."""
        return {"title": self.title, "columns": self.columns, "rows": self.rows}


@dataclass
class Report:
    """Everything an experiment writes: text, tables, plots, findings and plotted series."""

    name: str
    title: str
    question: str  # one paragraph: what the experiment asks and how
    settings: dict[str, Any]
    tables: list[Table] = field(default_factory=list)
    plots: list[tuple[str, str]] = field(default_factory=list)  # (file name, caption)
    findings: list[str] = field(default_factory=list)
    series: dict[str, Any] = field(default_factory=dict)  # the data behind the plots

    def markdown(self) -> str:
        """``report.md``: the question, the settings, the tables and plots, the findings and how to rerun."""
        parts = [f"# {self.title}", "", self.question, "", "## What was run", ""]
        parts += [f"- {k}: {show(v)}" for k, v in self.settings.items()]
        parts += ["", "## Results", ""]
        for table in self.tables:
            parts += [table.markdown(), ""]
        for file, caption in self.plots:
            parts += [f"![{caption}]({file})", "", f"*{caption}*", ""]
        parts += ["## Findings", ""]
        parts += [f"- {f}" for f in self.findings]
        parts += ["", f"Rerun: `{self.rerun_command()}`", ""]
        return "\n".join(parts)

    def rerun_command(self) -> str:
        """The ``llmscratch experiment`` command line that runs this report's settings again."""
        words = ["llmscratch", "experiment", self.name]
        words += {"quick": ["--quick"], "tiny": ["--tiny"], "full": []}[self.settings.get("mode", "full")]
        for option in ("data", "encoding"):
            if option in self.settings:
                words += [f"--{option}", str(self.settings[option])]
        if self.settings.get("seed", DEFAULT_SEED) != DEFAULT_SEED:
            words += ["--seed", str(self.settings["seed"])]
        return shlex.join(words)

    def to_dict(self) -> dict[str, Any]:
        """``results.json``: the report's settings, tables and findings, plus the series behind its plots."""
        return {
            "experiment": self.name, "title": self.title, "settings": self.settings,
            "tables": [t.to_dict() for t in self.tables], "findings": self.findings,
            "plots": [file for file, _ in self.plots], "series": self.series,
        }

    def write(self, folder: Path) -> Path:
        """Write ``report.md`` and ``results.json`` into ``folder`` (atomically); return the report's path."""
        folder.mkdir(parents=True, exist_ok=True)
        write_text_atomic(folder / "results.json", json.dumps(self.to_dict(), indent=2) + "\n")
        write_text_atomic(folder / "report.md", self.markdown())
        return folder / "report.md"


def check_output_folder(folder: Path) -> None:
    """Refuse, before any training, an output folder the report could not be written into."""
    for path in (folder, *folder.parents):
        if path.exists() and not path.is_dir():
            raise ConfigError(f"experiment output {folder}: {path} is a file, not a folder; choose another --out")
    for name in REPORT_FILES:
        if (folder / name).is_dir():
            raise ConfigError(f"{folder / name} is a folder, so the report cannot be written there; "
                              "move it or choose another --out")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise ConfigError(f"cannot write the experiment's report into {folder}: {err.strerror or err}; "
                          "choose another --out") from err


def base_settings(mode: str, size: Size, data: ExperimentData, runtime: Runtime, seed: int) -> dict[str, Any]:
    """The settings every report lists: mode, data, model size, training length, device."""
    given = {"data": data.source} if data.source is not None else {}  # named so the report's rerun line has it
    if data.source is not None and data.encoding != "utf-8":
        given["encoding"] = data.encoding
    return {
        "mode": mode,
        **given,
        "corpus": f"{data.corpus_name} ({len(data.splits.train):,} training / {len(data.splits.val):,} validation tokens)",
        "tokenizer": f"{data.tokenizer.kind} ({data.vocab_size} tokens)",
        "model": f"{size.n_layers} layers, {size.emb_dim} dims, context {size.context_length}, no dropout, tied embeddings",
        "training": f"{size.steps} steps of {size.batch_size} windows, AdamW, peak lr {size.lr}, warmup then cosine decay, "
                    "gradient clipping at 1.0",
        "validation": f"{size.eval_windows} fixed windows of the held-out tail of the corpus, loss in nats per token",
        "device": f"{runtime.device} ({runtime.precision})",
        "seed": seed,
    }


# --------------------------------------------------------------------------- plots


def pyplot() -> ModuleType:
    """matplotlib's pyplot on the Agg backend (files only, no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curves(runs: list[dict], label_of: Callable[[dict], str], folder: Path, report: "Report", caption: str,
                     xlabel: str = "step") -> None:
    """``loss_curves.png``: each run's validation loss curve (x as ``xlabel`` says), labelled by ``label_of(run)``."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        ax.plot(*r["curve"], marker="o", markersize=3, label=label_of(r))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("validation loss during training")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save_figure(fig, folder / "loss_curves.png")
    report.plots.append(("loss_curves.png", caption))


def save_figure(fig: Figure, path: Path) -> None:
    """Save a figure as PNG (atomically) and close it."""
    try:
        write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
    finally:
        pyplot().close(fig)

