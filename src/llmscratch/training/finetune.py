"""Fine-tuning: a new run that starts from a trained (or imported) one and learns a task.

Shared by every fine-tuning task (instructions, ``instruct.py``; classes, the classification
task): the task brings its data, batches, loss and held-out numbers (a :class:`FinetuneTask`,
i.e. a ``tasks.Task`` with a few hooks); this module does the rest, the same way ``train`` does:

```
load the base run (store's loaders: any run `generate` can load)
make the new run directory: finetune.json (the base run, the task, the options), the tokenizer
the task adapts the model (a class head, say); --train picks what learns (all, last-block, lora)
AdamW on what learns; run_loop(run, task): steps, evaluations, checkpoints, Ctrl-C (loop.py)
the task's closing work (held-out loss after, test responses), loss.png
```

The new run directory holds ``config.json``, ``model.safetensors`` and the tokenizer like any
other, so ``generate``, ``chat``, ``serve``, ``export`` and ``eval`` use it as it is; its
``finetune.json`` records the base run it came from. ``--resume`` continues it exactly, as
``train --resume`` does (same batches, same optimizer state).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch
import torch.nn as nn

from ..errors import CheckpointError, ConfigError, Stopped
from ..nn.lora import has_lora, merge_lora
from ..nn.model import GPT, loss_label
from ..runtime import Runtime, seed_everything, setup_runtime
from ..store import checkpoint as ckpt
from ..store.convert import load_pretrained
from ..store.rundir import FINETUNE_FILE, RunDir, new_run_dir
from . import distributed as dist
from .config import TrainConfig
from .loop import LoopState, run_loop
from .setup import NewRun, Run
from .signals import SIGNAL_NAMES, StopFlag, TermAsInterrupt
from .step import build_optimizer
from .tasks import Task

Log = Callable[[str], None]

TASKS = ("instruct", "classify")
TRAIN_MODES = ("all", "last-block", "lora")


@dataclass
class FinetuneOptions:
    """The options every fine-tuning task shares (the command line's common ones); ``extra`` holds
    the task's own (``--template``, ``--mask-prompt``, …), saved with them in ``finetune.json``.

    ``steps`` or ``epochs`` (``None`` both: ``DEFAULT_EPOCHS`` epochs); ``lr`` ``None``: 5e-5
    (the book's, for all weights) or 5e-4 for LoRA adapters. The learning rate is constant after
    ``warmup_steps`` as in the book, unless ``min_lr`` is given (then a cosine decay to it).
    """

    task: str = "instruct"
    base: Optional[str] = None  # the run fine-tuned (None only with resume)
    data: Optional[str] = None
    out_dir: str = "runs"
    name: Optional[str] = None
    steps: Optional[int] = None
    epochs: Optional[float] = None
    lr: Optional[float] = None
    min_lr: Optional[float] = None
    warmup_steps: int = 0
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 8
    grad_accum: int = 1
    micro_batch: Optional[int] = None
    seed: int = 123
    device: str = "auto"
    precision: str = "auto"
    train: str = "all"
    lora_rank: int = 16
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: Optional[str] = None
    eval_every: int = 50
    eval_batches: Optional[int] = 5
    log_every: int = 10
    checkpoint_every: int = 500
    resume: Optional[str] = None
    time_budget: Optional[float] = None
    stop_at: Optional[int] = None
    progress: bool = True
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"--task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.train not in TRAIN_MODES:
            raise ConfigError(f"--train must be one of {', '.join(TRAIN_MODES)}, got {self.train!r}")
        for name in ("batch_size", "grad_accum", "eval_every", "log_every", "checkpoint_every", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.steps is not None and self.epochs is not None:
            raise ConfigError("give --steps or --epochs, not both")
        if self.steps is not None and self.steps < 1:
            raise ConfigError(f"--steps must be a positive integer, got {self.steps}")
        if self.epochs is not None and not self.epochs > 0:
            raise ConfigError(f"--epochs must be positive, got {self.epochs}")
        if self.lr is not None and not self.lr > 0:
            raise ConfigError(f"--lr must be positive, got {self.lr}")
        if self.eval_batches is not None and self.eval_batches < 1:
            raise ConfigError(f"--eval-batches must be a positive integer, got {self.eval_batches}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ConfigError(f"--lora-dropout must be in [0, 1), got {self.lora_dropout}")
        if not self.lora_alpha > 0:
            raise ConfigError(f"--lora-alpha must be positive, got {self.lora_alpha}")
        if self.resume is None and (self.base is None or self.data is None):
            raise ConfigError("give the run to fine-tune (RUN) and --data FILE, or --resume RUN_DIR")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else (5e-4 if self.train == "lora" else 5e-5)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# Options a --resume may change (how far and how it runs, never what or how it learns); the
# rest come from the run's finetune.json.
RESUME_MAY_CHANGE = ("steps", "epochs", "device", "precision", "eval_every", "log_every", "checkpoint_every",
                     "time_budget", "stop_at", "progress", "resume", "extra.max_new_tokens", "extra.test_limit",
                     "extra.judge", "extra.judge_model")
DEFAULT_EPOCHS = 1.0


class FinetuneTask(Task, Protocol):
    """A :class:`tasks.Task` with what a fine-tuning run asks of it besides batches and losses."""

    train_examples: int  # examples in the training split (for --epochs)
    data_sha: str  # a fingerprint of the data files (a resume must see the same)

    def adapt(self, model: GPT) -> GPT:
        """The model to fine-tune made from the base one (a class head in place of the LM head, say);
        called on a new run before anything is frozen or wrapped, and on a resume before its weights load.
        A task with new parameters may also define ``new_parameters(model) -> list`` (they learn under
        every ``--train``)."""

    def before(self, run: Run) -> None:
        """At the start of a new run, before the first step (the held-out numbers before, say)."""

    def after(self, run: Run, state: LoopState) -> None:
        """After the last step (not after Ctrl-C): the held-out numbers after, test outputs."""


TaskFactory = Callable[[FinetuneOptions, Any, Runtime, Log], FinetuneTask]  # (options, tokenizer, runtime, log)


def data_fingerprint(*paths: Optional[str]) -> str:
    """SHA-256 over the bytes of the given files (None skipped): what a resume checks it trains on."""
    h = hashlib.sha256()
    for p in paths:
        if p is None:
            continue
        h.update(str(Path(p).name).encode() + b"\0")
        h.update(Path(p).read_bytes())
    return h.hexdigest()


def read_finetune_file(run_dir: Path) -> dict[str, Any]:
    """The ``finetune.json`` of a fine-tuned run: what ``--resume`` and ``info`` read."""
    path = Path(run_dir) / FINETUNE_FILE
    if not path.is_file():
        raise ConfigError(f"--resume {run_dir}: no {FINETUNE_FILE} there, so it is not a fine-tuning run "
                          f"(continue a pretraining run with `llmscratch train --resume {run_dir}`)")
    return ckpt.read_json(path)


def resumed_options(opts: FinetuneOptions, given: set[str]) -> FinetuneOptions:
    """The saved options of the run ``opts.resume`` continues, with those given that a resume may change;
    any other given option unlike the saved one is refused, not ignored."""
    run = Path(opts.resume)
    if not run.is_dir():
        raise ConfigError(f"--resume {run}: no such folder; give a fine-tuned run directory")
    saved = read_finetune_file(run)["options"]
    now = {**opts.to_dict(), **{f"extra.{k}": v for k, v in opts.extra.items()}}
    saved_all = {**saved, **{f"extra.{k}": v for k, v in saved.get("extra", {}).items()}}
    clash = sorted(k for k in given - set(RESUME_MAY_CHANGE)
                   if k in saved_all and now[k] != saved_all[k] and k not in ("extra", "base"))
    if clash:
        raise ConfigError(f"--resume continues {run} as it was set up; these options differ from it and cannot "
                          "change: " + ", ".join(f"--{k.replace('_', '-')} {now[k]!r} (the run has {saved[k]!r})"
                                                 for k in clash) + "; drop them, or start a new fine-tuning run")
    merged = {**saved, **{k: now[k] for k in RESUME_MAY_CHANGE if k in given}}
    merged["extra"] = {**saved.get("extra", {}),
                       **{k: v for k, v in opts.extra.items() if f"extra.{k}" in given and f"extra.{k}" in RESUME_MAY_CHANGE}}
    if "steps" in given:
        merged["epochs"] = None
    if "epochs" in given:
        merged["steps"] = None
    merged.update(resume=str(run), time_budget=opts.time_budget, stop_at=opts.stop_at, progress=opts.progress)
    return FinetuneOptions(**merged)


def total_steps(opts: FinetuneOptions, train_examples: int) -> int:
    """``--steps``, or the steps of ``--epochs`` passes over the training examples (at least 1)."""
    if opts.steps is not None:
        return opts.steps
    per_epoch = max(1, train_examples // (opts.batch_size * opts.grad_accum))  # the book drops the last part-batch
    return max(1, math.ceil(per_epoch * (opts.epochs if opts.epochs is not None else DEFAULT_EPOCHS)))


def train_config_for(opts: FinetuneOptions, steps: int, run_dir: RunDir) -> TrainConfig:
    """The loop's settings (``TrainConfig``) for this fine-tuning run: AdamW, the given schedule."""
    lr = opts.peak_lr
    return TrainConfig(
        data=opts.data, steps=steps, batch_size=opts.batch_size, grad_accum=opts.grad_accum,
        micro_batch=opts.micro_batch, lr=lr, min_lr=lr if opts.min_lr is None else min(opts.min_lr, lr),
        warmup_steps=opts.warmup_steps, weight_decay=opts.weight_decay, beta1=0.9, beta2=0.999,
        grad_clip=opts.grad_clip, optimizer="adamw", eval_interval=opts.eval_every, log_interval=opts.log_every,
        checkpoint_interval=opts.checkpoint_every, sample_tokens=0, device=opts.device, precision=opts.precision,
        seed=opts.seed, out_dir=str(run_dir.path.parent), name=run_dir.path.name,
        resume=str(run_dir) if opts.resume else None, init_from=None if opts.resume else opts.base,
        time_budget=opts.time_budget,
        stop_at=opts.stop_at, progress=opts.progress)


def choose_trainable(model: GPT, opts: FinetuneOptions, log: Log, new: Sequence[nn.Parameter] = ()) -> dict[str, Any]:
    """Freeze what ``--train`` leaves alone; return what was chosen (for finetune.json and the log).

    ``all``: every weight. ``last-block``: the last transformer block and the final norm (the
    book's chapter 6 choice; a task's own new layers stay trainable). ``lora``: low-rank adapters
    on the chosen linear layers, everything else frozen (``nn/lora.py``). ``new``: the task's own new
    parameters (a class head), which learn whatever ``--train`` says.
    """
    if opts.train == "all":
        return {"train": "all"}
    if opts.train == "last-block":
        keep = {id(p) for m in (model.blocks[-1], model.final_norm) for p in m.parameters()}
        for p in model.parameters():
            p.requires_grad_(id(p) in keep)
        chosen = {"train": "last-block"}
    else:
        chosen = add_adapters(model, opts, log)
    for p in new:
        p.requires_grad_(True)
    return chosen


def add_adapters(model: GPT, opts: FinetuneOptions, log: Log) -> dict[str, Any]:
    """``--train lora``: adapters from ``nn/lora.py`` on ``--lora-targets``; AdamW updates them alone.

    The run then saves the adapters only, with a reference to the base run (``store/lora.py``):
    ``load_model`` puts them back on the base, so every command loads the run as it is, and
    ``llmscratch export RUN OUT --merge`` folds them into plain weights.
    """
    from ..nn import lora
    from ..store.lora import set_base_run

    if ckpt.folder_kind(opts.base) != "run":
        raise ConfigError(f"--train lora saves adapters with a reference to the run they adapt, and {opts.base} is "
                          f"not a run directory: make one first (`llmscratch import {opts.base} RUN_DIR`)")
    targets = tuple(t.strip() for t in opts.lora_targets.split(",") if t.strip()) if opts.lora_targets else None
    info = lora.add_lora(model, rank=opts.lora_rank, alpha=opts.lora_alpha, dropout=opts.lora_dropout,
                         **({"targets": targets} if targets else {}))
    set_base_run(model, opts.base)
    return {"train": "lora", "lora": info.config.to_dict(), "lora_layers": len(info.layers)}


def trainable_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def load_base(base: str, device: torch.device) -> tuple[GPT, Any]:
    """The base run's model and tokenizer, through the loaders every command uses."""
    if not Path(base).exists():
        raise ConfigError(f"{base}: no such run directory; give the run to fine-tune (runs/NAME, runs/latest, or "
                          f"a folder made by `llmscratch import`)")
    model = load_pretrained(base)
    if not ckpt.has_tokenizer_files(base):
        raise ckpt.no_tokenizer_error(base, "the fine-tuning data")
    from ..data.tokenizer import load_tokenizer

    return model.to(device), load_tokenizer(Path(base))


def finetune(opts: FinetuneOptions, make_task: TaskFactory, log: Log = print,
             given: Optional[set[str]] = None) -> Path:
    """Fine-tune ``opts.base`` on ``opts.data`` with the task ``make_task`` builds; return the new run directory.

    A new run that fails or is stopped before it saved anything leaves no folder; Ctrl-C (or
    SIGTERM) saves a checkpoint at the end of the step and raises :class:`errors.Stopped`, and
    ``--resume`` continues from it exactly.
    """
    new_run, stop = NewRun(), StopFlag()
    with TermAsInterrupt():
        try:
            return _finetune(opts, make_task, log, given or set(), new_run, stop)
        except BaseException:
            new_run.remove_if_nothing_saved(log)
            raise
        finally:
            stop.release()


def _finetune(opts: FinetuneOptions, make_task: TaskFactory, log: Log, given: set[str], new_run: NewRun,
              stop: StopFlag) -> Path:
    t_start = time.time()
    state = None
    if opts.resume:
        opts = resumed_options(opts, given)
        run_dir = RunDir(opts.resume)
        state = ckpt.load_training_state(run_dir.path)
        if state is None:
            raise CheckpointError(f"{run_dir}: no training_state.pt to resume from: the run stopped before its "
                                  "first checkpoint; start it again")
    else:
        run_dir = new_run_dir(opts.out_dir, opts.name)
        new_run.claim(run_dir.path)
    runtime = setup_runtime(opts.device, opts.precision)
    seed_everything(opts.seed)
    model, tokenizer = load_base(opts.base, runtime.device)
    if has_lora(model):  # a LoRA run as the base: its adapters folded in first, as `train --init-from` does
        merge_lora(model)
        log(f"{opts.base} holds LoRA adapters: merged into its base weights before fine-tuning")
    task = make_task(opts, tokenizer, runtime, log)
    model = task.adapt(model)
    chosen = choose_trainable(model, opts, log, getattr(task, "new_parameters", lambda m: [])(model))
    steps = total_steps(opts, task.train_examples)
    cfg = train_config_for(opts, steps, run_dir)
    if state is not None:
        if state.get("corpus_sha256") != task.data_sha:
            raise ConfigError(f"the data files are not what {run_dir} started on (their SHA-256 changed): resuming "
                              "would train on other batches; restore them, or start a new fine-tuning run")
        if steps <= int(state["step"]):
            raise ConfigError(f"{run_dir} is already at step {state['step']}, so {steps} steps leave nothing to "
                              f"train; give --steps above {state['step']} to train further")
        load_checkpoint_weights(model, run_dir, state, lora_run=opts.train == "lora")
    model.to(runtime.device)
    run = Run(cfg=cfg, run_dir=run_dir, group=dist.Group(), runtime=runtime, tokenizer=tokenizer, splits=None,
              corpus_sha=task.data_sha, model=model, train_model=model, forward=model,
              optimizer=build_optimizer(model, cfg, runtime.device),
              scaler=torch.amp.GradScaler(runtime.device.type) if runtime.needs_grad_scaler else None,
              batch_gen=torch.Generator().manual_seed(opts.seed),
              micro_size=dist.micro_batch_size(cfg.batch_size, cfg.grad_accum, 1, cfg.micro_batch),
              log=log, t_start=t_start, new_run=new_run, state=state,
              extra={"options": opts, "chosen": chosen, "task": task})
    run.loss_label = loss_label(model.loss_implementation(runtime.device), runtime.device)
    if hasattr(task, "start"):
        task.start(run, int(state["step"]) if state else 0)
    if state is None:
        start_directory(run, opts, chosen)
    else:
        run_dir.keep_metrics_up_to(int(state["step"]))
    log(f"fine-tuning {opts.base} ({opts.task}, --train {opts.train}: {trainable_count(model):,} of "
        f"{sum(p.numel() for p in model.parameters()):,} parameters learn) for {steps} steps of "
        f"{cfg.batch_size * cfg.grad_accum} examples, lr {cfg.lr:g}; device {runtime.device} ({runtime.precision})")
    log(f"run directory: {run_dir}")
    if state is None:
        task.before(run)
    st = run_loop(run, task, stop)
    if st.stopped_by:
        log(f"stopped by {st.stopped_by} at step {st.step}; checkpoint saved in {run_dir} "
            f"(continue with: llmscratch finetune --resume {run_dir})")
    else:
        task.after(run, st)
    from .train import peak_memory

    log(f"peak memory: {peak_memory(runtime.device)}")
    try:
        from .train import plot_metrics

        plot_metrics(run_dir)
    except Exception as err:  # a plot must never lose a run
        log(f"(could not draw {run_dir.plot.name}: {err})")
    if st.stopped_by in SIGNAL_NAMES.values():
        raise Stopped(st.signum or signal.SIGINT, saved=True)
    return run_dir.path


def start_directory(run: Run, opts: FinetuneOptions, chosen: dict[str, Any]) -> None:
    """The new run's folder: its settings, what it was fine-tuned from, and the tokenizer."""
    from ..files import write_text_atomic

    run.run_dir.path.mkdir(parents=True, exist_ok=True)
    run.run_dir.write_train_config(run.cfg.to_dict())
    record = {"task": opts.task, "base": str(Path(opts.base).resolve()), "base_as_given": opts.base,
              "base_step": ckpt.checkpoint_step(opts.base), **chosen, "options": opts.to_dict()}
    write_text_atomic(run.run_dir.path / FINETUNE_FILE, json.dumps(record, indent=2, default=str))
    run.tokenizer.save(run.run_dir.path)


def load_checkpoint_weights(model: GPT, run_dir: RunDir, state: dict, lora_run: bool = False) -> None:
    """A resumed run's weights, saved with its training state, into the (adapted) model: a LoRA run's
    file holds its adapters (the base weights are the base run's), any other's every weight."""
    ckpt.check_saved_together(run_dir.path, state)
    tensors = ckpt.read_safetensors(run_dir.weights)
    if lora_run:
        from ..nn import lora

        extra = {k: v for k, v in tensors.items() if ".lora." not in k}  # a task's new layers (a class head)
        lora.load_lora_state_dict(model, {k: v for k, v in tensors.items() if ".lora." in k})
        if extra:
            model.load_state_dict(extra, strict=False)
        return
    if model.cfg.tie_weights and "tok_emb.weight" in tensors:
        tensors.setdefault("out_head.weight", tensors["tok_emb.weight"])
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if unexpected or missing:
        raise CheckpointError(f"{run_dir.weights} does not fit the model this fine-tuning run builds "
                              f"(missing {missing[:4]}, unexpected {unexpected[:4]}); start a new run")


def finetuned_from(run_dir: Path) -> Optional[str]:
    """The base run a fine-tuned run records, or None for any other run."""
    path = Path(run_dir) / FINETUNE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8")).get("base")
    except (OSError, ValueError):
        return None

