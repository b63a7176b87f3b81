"""The training loop: batches in, optimizer steps out, with evaluation and checkpoints.

The loop knows the model only through ``model(x, targets) -> loss`` and
``model(x) -> logits``. Everything else here is generic: the optimizer (Muon with AdamW, or
AdamW alone; optim.py) and schedule, precision, gradient accumulation and clipping, evaluation
in bits per byte, checkpoints that resume bit-exactly, Ctrl-C and NaN handling.

One step:

```
for x, y in this process's micro-batches:   # batch_size × grad_accum windows per step in all,
    loss = model(x, y) / n_micro            #   split into micro-batches over the processes
    loss.backward()                         # x, y: (B, T) each, y = x shifted by one
clip gradients to grad_clip; optimizer.step() with lr = schedule(step); zero grads
```
"""

from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import shutil
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
import torch.nn as nn

from ..store import checkpoint as ckpt
from ..store import convert
from ..store import sharded
from . import distributed as dist
from ..data.corpus import (
    bits_per_byte,
    check_split_sizes,
    encode_text,
    eval_windows,
    gather_windows,
    load_corpus,
    prepare_tokens,
    token_dtype,
    window_starts,
)
from ..errors import ConfigError, LLMScratchError, Stopped, TokenizerError
from ..files import human_bytes, write_text_atomic
from ..nn.model import GPT, LOSS_IMPLS, GPTConfig, PRESETS, check_field_types, numbers_from_strings
from ..nn.model import loss_label as model_loss_label
from ..nn.optim import MuonAdamW, muon_param_groups
from ..runtime import Runtime, seed_everything, setup_runtime
from ..data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer


class TrainingDiverged(LLMScratchError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _named(name: str) -> str:
    """How an error message names a TrainConfig field: the field and the option that sets it."""
    option = {"model": "`model:` in --config", "progress": "--no-progress"}.get(name, f"--{name.replace('_', '-')}")
    return f"TrainConfig.{name} ({option})"


@dataclass
class TrainConfig:
    """Every setting of a training run; saved as ``train_config.json`` in the run directory.

    The defaults are the run `llmscratch train` does with no arguments: the built-in
    corpus (King James Bible), a 4096-token byte-level BPE and the ``cpu`` preset
    (4 layers, 128 dims, context 64, RoPE, squared-ReLU MLP), 1400 steps of 16 windows with
    Muon on the blocks' matrices and AdamW on the rest: about 4 minutes on a 2-core CPU,
    data preparation included. The optimizer settings (Muon momentum 0.9; AdamW β₁ 0.8,
    β₂ 0.999; weight decay 0.6) won runs at equal steps at this small batch (docs/default_run.md);
    for GPT-2-size runs with AdamW, nanoGPT's ``beta1=0.9, beta2=0.95, weight_decay=0.1`` are the usual choice.
    """

    # data
    data: Optional[str] = None  # a file, folder of .txt files or glob; None = built-in corpus
    encoding: str = "utf-8"
    val_fraction: float = 0.1
    tokenizer: str = "bpe"  # "char", "bpe" or "gpt2"
    vocab_size: int = 4096  # for "bpe"
    # model
    preset: str = "cpu"
    model: dict[str, Any] = field(default_factory=dict)  # GPTConfig overrides
    # optimisation
    steps: int = 1400
    batch_size: int = 16
    grad_accum: int = 1  # global batch per step = batch_size × grad_accum windows, whatever the world size
    micro_batch: Optional[int] = None  # windows per forward pass on each process; None = batch_size
    lr: float = 3e-3
    min_lr: float = 1e-4
    warmup_steps: int = 30
    weight_decay: float = 0.6
    beta1: float = 0.8
    beta2: float = 0.999
    grad_clip: float = 1.0
    optimizer: str = "muon"  # "muon": Muon on the blocks' matrices, AdamW on the rest; "adamw": AdamW on all
    muon_momentum: float = 0.9
    # evaluation, logging, checkpoints
    eval_interval: int = 350
    eval_windows: int = 64
    log_interval: int = 20
    checkpoint_interval: int = 700
    sample_tokens: int = 48
    sample_prompt: str = "And God said"
    # runtime
    device: str = "auto"
    precision: str = "auto"
    compile: bool = False
    loss: str = "auto"  # how the head and loss are computed (GPT.loss_impl): auto, plain, chunked, kernel
    fsdp: bool = False  # under torchrun: shard weights, gradients and optimizer state (FSDP) instead of DDP
    dist_timeout: float = dist.DEFAULT_TIMEOUT_S  # under torchrun: seconds a collective waits for a stopped rank
    seed: int = 1337
    time_budget: Optional[float] = None  # seconds for the whole command; training stops early enough to save
    stop_at: Optional[int] = None  # stop (and save) at this step, as if interrupted; --resume continues
    # where
    out_dir: str = "runs"
    name: Optional[str] = None
    resume: Optional[str] = None  # a run directory to continue exactly
    init_from: Optional[str] = None  # a run directory or Hugging Face GPT-2 directory to start from
    progress: bool = True

    def __post_init__(self) -> None:
        check_field_types(self, lambda name, wanted, value: f"{_named(name)} must be {wanted}, got {value!r}")
        positive = ("steps", "batch_size", "grad_accum", "eval_interval", "eval_windows",
                    "log_interval", "checkpoint_interval", "vocab_size")
        for name in positive:
            value = getattr(self, name)
            if value < 1:
                raise ConfigError(f"{_named(name)} must be a positive integer, got {value!r}")
        unknown = sorted(set(self.model) - {f.name for f in dataclasses.fields(GPTConfig)})
        if unknown:
            raise ConfigError(f"unknown model option(s) {unknown} under `model:`; known: "
                              f"{sorted(f.name for f in dataclasses.fields(GPTConfig))}")
        if self.grad_clip < 0:
            raise ConfigError(f"{_named('grad_clip')} must be >= 0 (0: no clipping), got {self.grad_clip}")
        if self.sample_tokens < 0:
            raise ConfigError(f"{_named('sample_tokens')} must be >= 0 (0: no samples), "
                              f"got {self.sample_tokens}")
        if self.name is not None and (not self.name or self.name in (".", "..", "latest")
                                      or "/" in self.name or os.sep in self.name):
            raise ConfigError(f"--name {self.name!r} must be one folder name (no '/', not '.', '..' or 'latest'): "
                              f"a run lives in --out-dir/NAME")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"{_named('seed')} must be in [0, 2**32), as NumPy's seed, got {self.seed}")
        if self.stop_at is not None and self.stop_at < 1:
            raise ConfigError(f"{_named('stop_at')} must be a step >= 1, got {self.stop_at}")
        if self.stop_at is not None and self.stop_at > self.steps:
            raise ConfigError(f"{_named('stop_at')} {self.stop_at} is past the run's last step ({_named('steps')} "
                              f"{self.steps}): it would never stop there; give a step up to {self.steps}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{_named('warmup_steps')} must be >= 0, got {self.warmup_steps}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{_named('val_fraction')} must be in (0, 1), got {self.val_fraction}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"{_named('lr')} must be > 0 and {_named('min_lr')} in [0, lr], got lr={self.lr}, "
                              f"min_lr={self.min_lr}")
        for name in ("beta1", "beta2", "muon_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{_named(name)} must be in [0, 1), got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"{_named('weight_decay')} must be >= 0, got {self.weight_decay!r}")
        if self.optimizer not in ("muon", "adamw"):
            raise ConfigError(f"{_named('optimizer')} must be muon or adamw, got {self.optimizer!r}")
        if self.optimizer == "muon" and self.fsdp:
            raise ConfigError("--fsdp shards each weight matrix over the GPUs, and Muon needs whole matrices: "
                              "add --optimizer adamw")
        if self.loss not in LOSS_IMPLS:
            raise ConfigError(f"{_named('loss')} must be one of {', '.join(LOSS_IMPLS)}, got {self.loss!r}")
        if self.tokenizer not in ("char", "bpe", "gpt2"):
            raise ConfigError(f"{_named('tokenizer')} must be char, bpe or gpt2, got {self.tokenizer!r}")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r} (--preset); choose one of {sorted(PRESETS)}")
        GPTConfig.from_preset(self.preset, **self.model)  # a bad model option is named now, before any work
        if self.resume and self.init_from:
            raise ConfigError("--resume continues a run; --init-from starts a new one from weights: pick one")
        if self.micro_batch is not None and (not isinstance(self.micro_batch, int) or self.micro_batch < 1):
            raise ConfigError(f"{_named('micro_batch')} must be a positive integer or None, got {self.micro_batch!r}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ConfigError(f"{_named('time_budget')} must be positive seconds, got {self.time_budget}")
        if self.dist_timeout <= 0:
            raise ConfigError(f"{_named('dist_timeout')} must be positive seconds, got {self.dist_timeout}")

    def to_dict(self) -> dict[str, Any]:
        """Every option as a plain mapping: what ``train_config.json`` holds and ``--resume`` compares against."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TrainConfig":
        """From a mapping (a config file's); a number written as a string is read as a number.

        YAML 1.1, which PyYAML reads, takes ``lr: 3e-3`` (no dot) for the string ``"3e-3"``.
        """
        fields = sorted(f.name for f in dataclasses.fields(cls))
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"unknown training option(s) {unknown}; known: {fields}")
        data = numbers_from_strings(cls, data)
        if isinstance(data.get("model"), dict):  # saved as numbers in train_config.json too
            data["model"] = numbers_from_strings(GPTConfig, data["model"])
        return cls(**data)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to ``lr`` over ``warmup_steps``, then cosine decay to ``min_lr`` at ``steps``.

    ``step`` counts from 0: step ``warmup_steps - 1``, the last of the warmup, is the first at
    ``lr``; the decay starts from ``lr`` at step ``warmup_steps``. So a run decays only if it
    trains past step ``warmup_steps`` (``steps > warmup_steps + 1``).
    """
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    span = max(1, cfg.steps - cfg.warmup_steps)
    progress = min(1.0, (step - cfg.warmup_steps) / span)
    return cfg.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """``cfg.optimizer``: Muon on the hidden matrices and AdamW on the rest (optim.py), or AdamW on
    everything; weight decay on matrices only (not on biases and LayerNorm gains) either way."""
    if cfg.optimizer == "muon":
        return MuonAdamW(muon_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                         momentum=cfg.muon_momentum)
    decay, no_decay = [], []
    for p in model.parameters():  # shared (tied) parameters appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    # PyTorch's fused kernel: one pass over all parameters (on a 2-core CPU 2.5 ms a step
    # against 7.9 ms for its per-tensor loop at the cpu preset).
    extra = {"fused": True} if device.type in ("cuda", "cpu") else {}
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), **extra)


# ---------------------------------------------------------------------------- evaluation


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
    byte_lengths: torch.Tensor,
    runtime: Runtime,
    group: Optional[dist.Group] = None,
) -> dict[str, float]:
    """Loss, perplexity and bits per byte over batches of ``(x, y)`` windows ``(B, T)``.

    Bits per byte = summed cross-entropy in bits / UTF-8 bytes of the target tokens'
    text, so tokenizers with different vocabularies can be compared. With a group of
    several processes, each passes its own batches and the sums are added across ranks.
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


# ---------------------------------------------------------------------------- the run


def sample_prompt_ids(tokenizer: Tokenizer, text: str, warn: Optional[Callable[[str], None]] = None) -> list[int]:
    """``text`` as tokens for the samples printed while and after training; where the tokenizer
    cannot encode it (characters a char tokenizer never saw) or it is empty, the end-of-text
    token (or token 0) alone, said through ``warn``: a sample must never fail a run that trained."""
    try:
        ids = tokenizer.encode(text)
    except LLMScratchError as err:
        ids = []
        if warn is not None:
            start = tokenizer.eot_id if tokenizer.eot_id is not None else 0
            warn(f"--sample-prompt {text!r} cannot be encoded by this tokenizer: {err}; the samples start "
                 f"from token {start} ({tokenizer.decode([start])!r}) instead")
    return ids or [tokenizer.eot_id if tokenizer.eot_id is not None else 0]


def _warmup_note(cfg: TrainConfig) -> Optional[str]:
    """What to say of a warmup that leaves the schedule no decay (:func:`lr_at`), or None."""
    warmup, steps = cfg.warmup_steps, cfg.steps
    if warmup > steps:
        return (f"the warmup (--warmup-steps {warmup}) is longer than the run (--steps {steps}): the learning rate "
                f"rises to {lr_at(steps - 1, cfg):.3g}, never to --lr {cfg.lr:g}, and never decays; give a warmup "
                "shorter than the run")
    if warmup > 0 and warmup >= steps - 1:
        return (f"the warmup (--warmup-steps {warmup}) leaves the run (--steps {steps}) no step to decay: the "
                f"learning rate reaches --lr {cfg.lr:g} at step {warmup} of {steps}"
                + (" (the last)" if warmup == steps else "")
                + " and never decays; give a warmup shorter than the run by at least 2 steps")
    return None


def _new_run_dir(cfg: TrainConfig) -> Path:
    out = Path(cfg.out_dir)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out-dir {out} is a file: give the folder that holds run directories (default runs)")
    name = cfg.name or time.strftime("%Y%m%d-%H%M%S")
    run_dir = out / name
    if cfg.name is not None and run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
        resumable = (run_dir / ckpt.TRAINING_STATE_FILE).is_file() or (run_dir / ckpt.SHARDED_DIR).is_dir()
        raise ConfigError(f"{run_dir} already exists; a new run never writes into another one: choose another "
                          + (f"--name, delete it, or continue it with --resume {run_dir}" if resumable else
                             "--name, or delete it: it holds no checkpoint to continue (a run killed before its "
                             "first one?)"))
    suffix = 1
    while run_dir.exists() and cfg.name is None:
        suffix += 1
        run_dir = out / f"{name}-{suffix}"
    return run_dir


def _check_resumable(run_dir: Path) -> None:
    """A clear error unless ``run_dir`` is a folder a training run wrote its settings in."""
    if not run_dir.exists():
        raise ConfigError(f"--resume {run_dir}: no such folder; give a run directory (runs/NAME, or runs/latest)")
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {run_dir} is a file; give the run directory that holds it ({run_dir.parent})")
    if not (run_dir / "train_config.json").is_file() and (run_dir / "config.json").is_file():
        raise ConfigError(f"--resume {run_dir}: these weights were not trained by `llmscratch train` (no "
                          f"train_config.json: imported?), so there is no run to continue; start one from them "
                          f"with --init-from {run_dir}")


def _point_latest(run_dir: Path) -> None:
    """Make ``<out_dir>/latest`` a symlink to the newest run (best effort)."""
    latest = run_dir.parent / "latest"
    try:
        tmp = run_dir.parent / f".latest.{os.getpid()}"
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(run_dir.name, target_is_directory=True)
        os.replace(tmp, latest)
    except OSError:
        pass


def _tokenizer_cache_dir() -> Path:
    return Path(os.environ.get("LLMSCRATCH_CACHE", Path.home() / ".cache" / "llmscratch"))


def _prepare_tokenizer(cfg: TrainConfig, corpus_text: str, cache: Path, group: "dist.Group",
                       log: Callable[[str], None] = lambda message: None) -> Tokenizer:
    """Train (or load the cached) tokenizer for this corpus and settings.

    Rank 0 trains it into ``cache`` and every rank reads it from there, so every machine of a
    job must see the same cache (a shared ``$LLMSCRATCH_CACHE``, or one prepared on each
    machine from the same inputs: the key below); a rank that does not find it says so.
    """
    import hashlib

    key = hashlib.sha256(
        f"tokenizer-v2:{cfg.tokenizer}:{cfg.vocab_size}:{cfg.val_fraction}:".encode() + corpus_text.encode("utf-8")
    ).hexdigest()[:16]
    tok_dir = cache / "tokenizers" / key
    if cfg.tokenizer == "gpt2":
        return build_tokenizer("gpt2")
    # Only the main rank looks for the cached tokenizer: had every rank looked on its own, a
    # rank arriving after the main one had saved it would skip the barrier below that the main
    # one waits in, and the ranks' later collectives would pair up wrongly and hang.
    if group.is_main and (tok_dir / "tokenizer_config.json").exists():
        try:
            load_tokenizer(tok_dir)
        except TokenizerError as err:  # damaged outside this program: made again below, as if never cached
            warnings.warn(f"the cached tokenizer in {tok_dir} could not be read ({err}); training it again")
            shutil.rmtree(tok_dir, ignore_errors=True)
    if group.is_main and not (tok_dir / "tokenizer_config.json").exists():
        # BPE merges are learned from the training part only, so the validation text stays
        # unseen (byte-level BPE still encodes any text). A character vocabulary must cover
        # every character of the corpus, or validation text could not be encoded at all.
        text = corpus_text
        if cfg.tokenizer == "bpe":
            text = corpus_text[: int(len(corpus_text) * (1.0 - cfg.val_fraction))]
        log(f"data: training the {cfg.tokenizer} tokenizer" + (f" ({cfg.vocab_size} tokens)" if cfg.tokenizer == "bpe"
            else "") + f" on {human_bytes(len(text.encode('utf-8', 'surrogatepass')))} of text")
        tokenizer = build_tokenizer(cfg.tokenizer, text, vocab_size=cfg.vocab_size)
        tok_dir.mkdir(parents=True, exist_ok=True)
        tokenizer.save(tok_dir)
    group.barrier()
    if not group.is_main and not (tok_dir / "tokenizer_config.json").is_file():
        raise ConfigError(
            f"rank {group.rank} of {group.world_size} cannot find the tokenizer that rank 0 trained: {tok_dir} is not "
            f"in this machine's cache ($LLMSCRATCH_CACHE, here {cache}). Every machine of the job must read the "
            "same cache: point $LLMSCRATCH_CACHE at a folder they share, or prepare the cache on each machine "
            "first with the same corpus text, --tokenizer, --vocab-size and --val-fraction (all are in its key; "
            "a one-process run with --steps 1 prepares it)")
    return load_tokenizer(tok_dir)


def _under_torchrun() -> bool:
    """Whether torchrun started this process: it sends its ranks SIGTERM itself, to end them."""
    return "LOCAL_RANK" in os.environ


SIGNAL_NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class _StopFlag:
    """Turns the first Ctrl-C (SIGINT) or SIGTERM (``kill``, ``timeout``, a job scheduler) into a
    request to save and stop at the end of the step; a second one stops at once.

    Under torchrun only Ctrl-C: torchrun's own SIGTERM ends ranks when another one failed, and
    a rank waiting on a dead peer to save with it would hang.

    Once the loop stopped for a signal (``stopping``: this rank's, or another rank's that they
    agreed on), the handlers stay until :meth:`release` (the end of the run), not only to the
    end of the loop: torchrun passes a terminal's Ctrl-C to the ranks one after another, so it
    may reach a rank after that rank already stopped for another's. Then it is the same
    request, said and absorbed, not a KeyboardInterrupt in the middle of the last save.
    """

    def __init__(self) -> None:
        self.signum: Optional[int] = None  # the signal that asked to stop
        self.stopping = False  # the loop stopped for a signal
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self) -> "_StopFlag":
        def handler(signum, frame):
            if self.requested:  # a second signal: stop now
                raise Stopped(signum)
            self.signum = signum
            name = SIGNAL_NAMES[signum]
            doing = ("the run is stopping already, its checkpoint saved" if self.stopping
                     else "saving a checkpoint at the end of this step")
            print(f"\n{name}: {doing} ({name} again to abort)", file=sys.stderr, flush=True)

        signals = [signal.SIGINT] if _under_torchrun() else [signal.SIGINT, signal.SIGTERM]
        try:
            self._previous = {signum: signal.signal(signum, handler) for signum in signals}
        except ValueError:  # not in the main thread: no handlers
            self._previous = {}
        return self

    def __exit__(self, *exc) -> None:
        if not self.stopping:
            self.release()

    def release(self) -> None:
        """Put back the handlers this replaced (once)."""
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}


class _Budget:
    """``--time-budget``: stop training early enough that the command ends within the budget,
    the checkpoint and the closing sample written after the last step included.

    After each step, the run goes on only if one more step (with its evaluation, where it has
    one), a checkpoint and the closing sample still fit. Each is estimated by how long it took
    last time in this run; before the first time, a checkpoint from its size in bytes (at
    :data:`_SAVE_BYTES_PER_S`), an evaluation and a sample from the step's time (a forward pass
    of one window costs about a third of a training step's per window). Not counted: drawing
    ``loss.png`` and, for a run that reaches ``--steps``, its final evaluation on the whole
    validation split.
    """

    def __init__(self, seconds: Optional[float], start: float, save_guess_s: float, eval_windows: int,
                 step_windows: int, sample_tokens: int) -> None:
        self.seconds, self.start = seconds, start
        self._took = {"save": save_guess_s}
        self._eval_windows, self._step_windows, self._sample_tokens = eval_windows, step_windows, sample_tokens

    def took(self, what: str, seconds: float) -> None:
        """How long ``what`` (step, eval, sample, save) took this time."""
        self._took[what] = seconds

    def _s(self, what: str) -> float:
        if what in self._took:
            return self._took[what]
        per_window = self._took.get("step", 0.0) / (3 * max(1, self._step_windows))
        return {"eval": self._eval_windows, "sample": self._sample_tokens}[what] * per_window

    def stop_now(self, now: float, at_eval: bool, at_ckpt: bool, next_eval: bool) -> bool:
        """Whether to stop after this step: one more (its evaluation and checkpoint, then the ending) would not fit."""
        if self.seconds is None:
            return False
        this = (self._s("eval") + self._s("sample") if at_eval else 0.0) + (self._s("save") if at_ckpt else 0.0)
        another = self._s("step") + (self._s("eval") + self._s("sample") if next_eval else 0.0)
        ending = self._s("save") + self._s("sample")
        return now - self.start + this + another + ending > self.seconds


_SAVE_BYTES_PER_S = 100e6  # a first checkpoint's guessed write speed: slow disks and network file systems included


def _save_guess_s(model: nn.Module, sharded: bool) -> float:
    """A guess at a checkpoint's seconds before the first one: the weights and two optimizer moments per
    weight at :data:`_SAVE_BYTES_PER_S`; sharded (FSDP) twice, for the consolidation at the end."""
    local = sum((p.to_local() if hasattr(p, "to_local") else p).numel() * p.element_size() for p in model.parameters())
    return 3 * local / _SAVE_BYTES_PER_S * (2 if sharded else 1)


class _TermAsInterrupt:
    """SIGTERM outside the training loop (preparing data, say) raises :class:`Stopped` as Ctrl-C
    raises KeyboardInterrupt, so that a new run with nothing saved removes its folder."""

    def __enter__(self) -> "_TermAsInterrupt":
        def handler(signum, frame):
            raise Stopped(signum)

        self._previous = None
        if not _under_torchrun():
            try:
                self._previous = signal.signal(signal.SIGTERM, handler)
            except ValueError:  # not in the main thread
                pass
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)


def _rng_state(batch_gen: torch.Generator, runtime: Runtime) -> dict[str, Any]:
    state = {"batches": batch_gen.get_state(), "torch": torch.get_rng_state()}
    if runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(runtime.device)
    return state


def _set_rng_state(state: dict[str, Any], batch_gen: torch.Generator, runtime: Runtime) -> None:
    batch_gen.set_state(state["batches"])
    torch.set_rng_state(state["torch"])
    if runtime.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], runtime.device)


# What a resumed run may change: how far and how it runs, never what it learns from or how.
RESUME_MAY_CHANGE = ("steps", "time_budget", "stop_at", "progress", "device", "precision", "compile", "loss",
                     "sample_tokens", "sample_prompt", "dist_timeout",
                     "eval_interval", "checkpoint_interval", "log_interval", "micro_batch", "fsdp", "resume")


def _shown(option: str, value: Any) -> str:
    """An option's value as an error message names it (no --data: the built-in corpus)."""
    return "(the built-in corpus)" if option == "data" and value is None else repr(value)


class _NewRun:
    """A new run's folder, removed again if the run fails before it saved anything.

    Otherwise a run that diverged at step 2, or was stopped while it tokenized, would leave a
    folder with a tokenizer and no weights: one that ``generate`` cannot load, ``--resume``
    cannot continue, and whose name a new run may not take.
    """

    def __init__(self) -> None:
        self.folder: Optional[Path] = None  # set once this process created or took the folder
        self.existed = False  # an empty folder given by --name: emptied, not removed
        self.saved = False  # a checkpoint or best/ weights exist: the folder is kept
        self.checkpointed = False  # a checkpoint exists (and `latest` points here)

    def claim(self, folder: Path) -> None:
        """The run's folder, about to be made (or an empty one, made before this run)."""
        self.folder, self.existed = folder, folder.exists()

    def remove_if_nothing_saved(self, log: Callable[[str], None]) -> None:
        """Remove what the run put in its folder, unless it saved weights; an empty folder made before stays."""
        if self.folder is None or self.saved or not self.folder.is_dir():
            return
        if self.existed:
            for entry in self.folder.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    shutil.rmtree(entry)
                else:
                    entry.unlink()
        else:
            shutil.rmtree(self.folder, ignore_errors=True)
        log(f"removed {self.folder}: the run stopped before it saved anything")


def train(cfg: TrainConfig, log: Callable[[str], None] = print, given: Optional[set[str]] = None) -> Path:
    """Train a GPT as ``cfg`` says; return the run directory.

    With ``cfg.resume``, continue that run exactly where its last checkpoint left off
    (same batches, same schedule, same RNG): N steps in one go and N/2 + resume + N/2
    give identical weights on the CPU. The saved settings hold, except those of
    :data:`RESUME_MAY_CHANGE` that were given (``given``: the names set by the user, as the
    CLI passes them; ``None``: those that differ from the defaults); any other setting
    given with a value unlike the saved one is refused, not ignored.

    A new run that fails (or is stopped) before its first checkpoint leaves no folder behind
    (:class:`_NewRun`); ``<out_dir>/latest`` moves to a new run at its first checkpoint. Ctrl-C
    (or SIGTERM, outside torchrun) saves a checkpoint at the end of the step and then raises
    :class:`errors.Stopped` (a KeyboardInterrupt), so that a caller stops too
    (``llmscratch train && llmscratch generate ...`` does not go on to generate).

    At the end (also after ``--time-budget`` or ``--stop-at``, not after a signal) one sample of
    ``--sample-tokens`` tokens is logged; the evaluations during training log their own, the
    last one's left to it. Under torchrun, a collective that waited ``--dist-timeout`` seconds
    raises :class:`distributed.RankNotAnswering`, naming the rank that stopped answering.
    """
    new_run, stop = _NewRun(), _StopFlag()
    with _TermAsInterrupt():
        try:
            return _train(cfg, log, given, new_run, stop)
        except BaseException as err:
            new_run.remove_if_nothing_saved(log)
            if dist.is_collective_timeout(err):  # name the rank that stopped answering, not this one
                raise dist.explain_timeout(err, cfg.dist_timeout) from err
            raise
        finally:
            stop.release()


def _given(cfg: TrainConfig, given: Optional[set[str]]) -> set[str]:
    """The options the user set: ``given``, or where it is None those that differ from the defaults."""
    if given is not None:
        return set(given)
    now, defaults = cfg.to_dict(), TrainConfig().to_dict()
    return {k for k, v in now.items() if v != defaults[k]}


def resumed_config(cfg: TrainConfig, given: Optional[set[str]] = None) -> TrainConfig:
    """The settings a ``--resume`` of ``cfg.resume`` runs with: the run's saved ones, except those of
    :data:`RESUME_MAY_CHANGE` that were given (see :func:`train`); a clash with the others is refused."""
    run_dir = Path(cfg.resume)
    _check_resumable(run_dir)
    saved = ckpt.read_json(run_dir / "train_config.json")
    saved.setdefault("optimizer", "adamw")  # runs saved before the option existed trained with AdamW
    now, given = cfg.to_dict(), _given(cfg, given)
    clash = sorted(k for k in given - set(RESUME_MAY_CHANGE) if k in saved and now[k] != saved[k])
    if clash:
        raise ConfigError(
            f"--resume continues {run_dir} as it was set up; these options differ from it and cannot change: "
            + ", ".join(f"--{k.replace('_', '-')} {_shown(k, now[k])} (the run has {_shown(k, saved[k])})"
                        for k in clash)
            + "; drop them, or start a new run (--init-from to start from these weights)")
    # The saved settings win, except those the user gave on this command line.
    merged = {**saved, **{k: now[k] for k in RESUME_MAY_CHANGE if k in given and k in now}}
    # Where to stop and how long to wait this time are properties of this command, never of the saved run.
    merged.update(resume=str(run_dir), init_from=None, stop_at=cfg.stop_at, time_budget=cfg.time_budget,
                  progress=cfg.progress, dist_timeout=cfg.dist_timeout)
    try:
        return TrainConfig.from_dict(merged)
    except ConfigError as err:  # what it names came from the run's file, not from this command line
        raise ConfigError(f"{run_dir / 'train_config.json'}: {err}") from err


def resolved_options(cfg: TrainConfig, given: Optional[set[str]] = None) -> dict[str, Any]:
    """Every option the run that ``cfg`` starts would use, as a ``--config`` file holds them
    (``llmscratch train --print-config``): given back through ``--config`` alone, they resolve to the same.

    A resumed run's are its saved settings with this command's changes. With ``--init-from``,
    the options that shape a new model and tokenizer are left out: they cannot apply.
    """
    options = (resumed_config(cfg, given) if cfg.resume else cfg).to_dict()
    if options.get("init_from"):
        for name in _SHAPE_OPTIONS:
            options.pop(name)
    return options


_SHAPE_OPTIONS = ("tokenizer", "vocab_size", "preset", "model")  # what --init-from brings from its folder


def _train(cfg: TrainConfig, log: Callable[[str], None], given: Optional[set[str]], new_run: _NewRun,
           stop: "_StopFlag") -> Path:
    group = dist.init(cfg.device, cfg.dist_timeout)  # one process unless launched by torchrun
    t_start = time.time()
    if not group.is_main:
        log = lambda *_a, **_k: None  # noqa: E731 - only rank 0 talks

    # ---------------------------------------------------------------- where, resume
    state: Optional[dict[str, Any]] = None
    if cfg.resume:
        run_dir = Path(cfg.resume)
        cfg = resumed_config(cfg, given)
        state = sharded.load_training_state(run_dir, prefer_sharded=cfg.fsdp and group.active)  # the newest one
        if state is None:
            raise ckpt.CheckpointError(f"{run_dir}: no training_state.pt to resume from: the run stopped before "
                                       f"its first checkpoint; start it again (delete {run_dir}, or choose "
                                       f"another --name)")
        if cfg.steps <= int(state["step"]):
            raise ConfigError(f"{run_dir} is already at step {state['step']}, so --steps {cfg.steps} leaves nothing "
                              f"to train; give --steps above {state['step']} to train further")
        if "optimizer" in state:  # an ordinary checkpoint: weights and state must come from one save
            ckpt.check_saved_together(run_dir, state)
    else:
        if cfg.init_from and not Path(cfg.init_from).is_dir():
            raise ConfigError(f"--init-from {cfg.init_from}: no such folder; give a run directory (runs/NAME) or a "
                              f"Hugging Face GPT-2 directory (`llmscratch import` makes one a run)")
        if cfg.init_from:  # the model and tokenizer come from there: options that would shape new ones cannot apply
            moot = sorted(_given(cfg, given) & set(_SHAPE_OPTIONS))
            if moot:
                raise ConfigError(
                    f"--init-from {cfg.init_from} brings its own model and tokenizer; "
                    + ", ".join(f"--{k.replace('_', '-')}" if k != "model" else "model options" for k in moot)
                    + " cannot apply to them: drop them")
        # Rank 0 names the folder and tells the others: a name from each rank's own clock (the
        # default, the date and time) differs where clocks or time zones do, and FSDP's shards
        # would go to two folders.
        run_dir = Path(group.decided_by_main(lambda: str(_new_run_dir(cfg))))
        if group.is_main:
            new_run.claim(run_dir)

    runtime = setup_runtime(cfg.device, cfg.precision)
    if group.active and runtime.device.type == "cuda":
        runtime = Runtime(torch.device("cuda", group.local_rank), runtime.precision)  # one GPU per process
    seed_everything(cfg.seed + group.rank)

    # ---------------------------------------------------------------- data
    if cfg.resume and cfg.data and not Path(cfg.data).is_absolute() and not glob.glob(cfg.data):
        raise ConfigError(f"{run_dir} was started with --data {cfg.data}, a path relative to the folder it was "
                          f"started in, which is not {Path.cwd()}: resume from that folder")
    log(f"data: reading {cfg.data or 'the built-in corpus'}")
    corpus = load_corpus(cfg.data, encoding=cfg.encoding)
    corpus_sha = corpus.fingerprint()
    if state is not None and state.get("corpus_sha256", corpus_sha) != corpus_sha:
        raise ConfigError(
            f"the text of {cfg.data or 'the built-in corpus'} is not what {run_dir} started on (its SHA-256 "
            f"changed): resuming would train on other batches. Restore that text, or start a new run from these "
            f"weights with --init-from {run_dir}")
    cache = _tokenizer_cache_dir()
    if cfg.resume:
        tokenizer = load_tokenizer(run_dir)
    elif cfg.init_from:
        tokenizer = load_tokenizer(cfg.init_from)
    else:
        tokenizer = _prepare_tokenizer(cfg, corpus.text, cache, group, log)
        if cfg.tokenizer == "bpe" and tokenizer.vocab_size < cfg.vocab_size:
            log(f"note: --vocab-size {cfg.vocab_size} asks for more tokens than BPE finds merges for in this corpus: "
                f"the tokenizer has {tokenizer.vocab_size} (more text gives more)")
    if group.is_main:  # rank 0 writes the token cache; then every rank (rank 0 again) reads it
        prepare_tokens(corpus, tokenizer, cache / "tokens", val_fraction=cfg.val_fraction, progress=log)
    group.barrier()
    splits = prepare_tokens(corpus, tokenizer, cache / "tokens", val_fraction=cfg.val_fraction)

    # ---------------------------------------------------------------- model
    fresh_cfg = None
    if not cfg.resume and not cfg.init_from:
        fresh_cfg = GPTConfig.from_preset(cfg.preset, **{"vocab_size": tokenizer.vocab_size, **cfg.model})
        if fresh_cfg.vocab_size < tokenizer.vocab_size:
            raise ConfigError(
                f"model vocab_size {fresh_cfg.vocab_size} is smaller than the tokenizer's {tokenizer.vocab_size}"
            )

    def whole_model() -> GPT:
        """The model to start from, whole (under FSDP built by rank 0 alone: dist.sharded_model)."""
        if cfg.resume:
            return ckpt.load_model(run_dir)
        if cfg.init_from:
            return convert.load_pretrained(cfg.init_from)
        torch.manual_seed(cfg.seed)  # the same initial weights as one process
        return GPT(fresh_cfg)

    from_shards = cfg.resume and "optimizer" not in state  # a sharded checkpoint: dist.restore loads the weights
    if cfg.fsdp and group.active:
        model = (dist.sharded_model(group, runtime, cfg=ckpt.load_config(run_dir)) if from_shards
                 else dist.sharded_model(group, runtime, full=whole_model))
    else:
        model = GPT(ckpt.load_config(run_dir)) if from_shards else whole_model()
    model_cfg = model.cfg
    model.loss_impl = cfg.loss
    try:
        loss_impl = model.loss_implementation(runtime.device)
    except ValueError as err:
        raise ConfigError(f"--loss {cfg.loss}: {err}") from err
    loss_label = model_loss_label(loss_impl, runtime.device)
    if model_cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"the model's vocabulary ({model_cfg.vocab_size}) is smaller than the "
                          f"tokenizer's ({tokenizer.vocab_size}); they do not belong together")
    check_split_sizes(splits, model_cfg.context_length)
    model.to(runtime.device)
    context = model_cfg.context_length

    train_model = dist.wrap_model(model, group, runtime, fsdp=cfg.fsdp)  # DDP; FSDP sharded it above
    optimizer = build_optimizer(model, cfg, runtime.device)
    scaler = torch.amp.GradScaler(runtime.device.type) if runtime.needs_grad_scaler else None
    batch_gen = torch.Generator().manual_seed(cfg.seed)
    step = 0
    best_bpb = float("inf")
    if state is not None:
        dist.restore(run_dir, model, optimizer, state)  # the optimizer, and the weights of a sharded checkpoint
        step = int(state["step"])
        best_bpb = float(state.get("best_val_bpb", float("inf")))
        _set_rng_state(state["rng"], batch_gen, runtime)
        if scaler is not None and "scaler" in state:
            scaler.load_state_dict(state["scaler"])

    forward = torch.compile(train_model) if cfg.compile else train_model

    # Fixed, seeded validation windows for evaluations during training.
    val_windows = eval_windows(splits.val, context, n_windows=cfg.eval_windows,
                               generator=torch.Generator().manual_seed(cfg.seed + 1))
    val_windows = dist.shard_batches(val_windows, group)
    byte_lengths = torch.as_tensor(tokenizer.token_byte_lengths(), dtype=torch.int64)
    # The model's vocabulary may be larger than the tokenizer's: those ids are never targets (0 bytes).
    byte_lengths = torch.nn.functional.pad(byte_lengths, (0, max(0, model_cfg.vocab_size - len(byte_lengths))))

    micro_size = dist.micro_batch_size(cfg.batch_size, cfg.grad_accum, group.world_size, cfg.micro_batch)
    tokens_per_step = cfg.batch_size * cfg.grad_accum * context

    if group.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        write_text_atomic(run_dir / "train_config.json", json.dumps(cfg.to_dict(), indent=2))
        tokenizer.save(run_dir)
    log(f"run directory: {run_dir}")
    if cfg.fsdp and not group.active:
        log("note: --fsdp shards over the processes torchrun starts; this is one process, so the model is "
            "whole and trained as without it (launch with --nproc N or torchrun to shard)")
    warmup_note = _warmup_note(cfg)
    if warmup_note:
        log(f"note: {warmup_note}")
    log(f"device {runtime.device} ({runtime.precision}), {group.world_size} process(es); "
        f"model {model.num_parameters():,} parameters ({model_cfg.n_layers} layers, {model_cfg.n_heads} heads, "
        f"{model_cfg.emb_dim} dims, context {context}, {model_cfg.pos_emb} positions, {loss_label}); "
        f"tokenizer {tokenizer.kind} ({tokenizer.vocab_size} tokens); "
        f"{len(splits.train):,} training / {len(splits.val):,} validation tokens; "
        f"{cfg.batch_size * cfg.grad_accum} windows per step, {micro_size} per forward pass on each process")

    metrics_path = run_dir / "metrics.jsonl"
    if cfg.resume and group.is_main and metrics_path.exists():
        # Records past the checkpoint (a run killed after it) are written again by this run: keep one of each.
        kept = [r for r in read_metrics(metrics_path) if r.get("step", 0) <= step]
        write_text_atomic(metrics_path, "".join(json.dumps(r) + "\n" for r in kept))

    def write_metrics(record: dict[str, Any]) -> None:
        if group.is_main:
            with open(metrics_path, "ab+") as f:
                f.seek(0, os.SEEK_END)
                if f.tell() > 0:  # after a killed run's half-written line, start a line of our own
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                f.write((json.dumps(record) + "\n").encode("utf-8"))

    def save_checkpoint(at_step: int) -> None:
        training_state = {
            "step": at_step,
            "rng": _rng_state(batch_gen, runtime),
            "best_val_bpb": best_bpb,
            "tokens_seen": at_step * tokens_per_step,
            "corpus_sha256": corpus_sha,
        }
        if scaler is not None:
            training_state["scaler"] = scaler.state_dict()
        dist.save_checkpoint(run_dir, model, optimizer, training_state, group)  # every rank: FSDP saves shards
        if group.is_main and not cfg.resume and not new_run.checkpointed:
            _point_latest(run_dir)  # the newest run with a checkpoint
        new_run.saved = new_run.checkpointed = True

    sample_prompt = sample_prompt_ids(tokenizer, cfg.sample_prompt, log if cfg.sample_tokens and group.is_main else None)

    def sample_text() -> str:
        from ..inference.generate import SamplingConfig, decodable_limit, generate

        prompt = sample_prompt[-(context // 2):]  # the last half-context of the prompt
        sampling = SamplingConfig(max_new_tokens=cfg.sample_tokens, temperature=0.8, top_k=50, seed=cfg.seed,
                                  vocab_limit=decodable_limit(tokenizer.vocab_size, model_cfg.vocab_size))
        new = generate(model, [prompt], sampling)[0]
        return tokenizer.decode(prompt + new)

    # ---------------------------------------------------------------- the loop
    from tqdm.auto import tqdm

    # The bar only on a terminal: piped into a file its carriage returns run into the log lines.
    # Without it, the training loss is logged every --log-interval steps instead. Its rate is the
    # log's (tokens/s over the last --log-interval steps, set at each log step), not tqdm's own
    # steps per second, so that the two never disagree.
    show_bar = cfg.progress and group.is_main and sys.stderr.isatty()
    bar = tqdm(total=cfg.steps, initial=step, disable=not show_bar, dynamic_ncols=True, unit="step",
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]")
    bad_step = torch.full((), -1, dtype=torch.int64, device=runtime.device)  # first step with a non-finite loss
    loss_sum = torch.zeros((), device=runtime.device)
    loss_count = 0
    t_log, tokens_since_log = time.time(), 0
    last_good = step if cfg.resume else None
    local_windows = cfg.batch_size * cfg.grad_accum // group.world_size
    budget = _Budget(cfg.time_budget, t_start, save_guess_s=_save_guess_s(model, dist.is_sharded(model)),
                     eval_windows=sum(len(x) for x, _ in val_windows), step_windows=local_windows,
                     sample_tokens=cfg.sample_tokens)
    model.train()
    stopped_by = None
    with stop:
        while step < cfg.steps:
            t_step = time.time()
            lr = lr_at(step, cfg)
            for g in optimizer.param_groups:
                g["lr"] = lr
            step_loss = torch.zeros((), device=runtime.device)
            global_starts = torch.cat([window_starts(len(splits.train), cfg.batch_size, context, batch_gen)
                                       for _ in range(cfg.grad_accum)])  # (batch_size * grad_accum,), same on every rank
            micro_starts = dist.local_micro_batches(global_starts, group.rank, group.world_size, micro_size)
            for micro, starts in enumerate(micro_starts):  # this rank's part of the global batch
                x, y = gather_windows(splits.train, starts, context)  # (B_local, T) each
                if runtime.device.type == "cuda":
                    x = x.pin_memory().to(runtime.device, non_blocking=True)
                    y = y.pin_memory().to(runtime.device, non_blocking=True)
                else:
                    x, y = x.to(runtime.device), y.to(runtime.device)
                with dist.maybe_no_sync(train_model, group, last=micro == len(micro_starts) - 1):
                    with runtime.autocast():
                        loss = forward(x, y) / len(micro_starts)
                    if scaler is not None:
                        scaler.scale(loss).backward()
                    else:
                        loss.backward()
                step_loss += loss.detach()
            if scaler is not None:
                scaler.unscale_(optimizer)
            if cfg.grad_clip > 0:  # 0: no clipping
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            # Record the first non-finite loss on the device: no host sync every step.
            bad_now = ~torch.isfinite(step_loss)
            bad_step = torch.where(bad_now & (bad_step < 0), torch.full_like(bad_step, step), bad_step)
            loss_sum += step_loss
            loss_count += 1
            step += 1
            tokens_since_log += tokens_per_step
            bar.update(1)
            budget.took("step", time.time() - t_step)

            at_log = step % cfg.log_interval == 0 or step == cfg.steps
            at_eval = step % cfg.eval_interval == 0 or step == cfg.steps
            at_ckpt = step % cfg.checkpoint_interval == 0 or step == cfg.steps
            out_of_time = step < cfg.steps and budget.stop_now(
                time.time(), at_eval=at_eval, at_ckpt=at_ckpt, next_eval=(step + 1) % cfg.eval_interval == 0)
            if cfg.stop_at is not None and step >= cfg.stop_at and step < cfg.steps:
                out_of_time = True
            # Read the Ctrl-C flag once per step: a signal that lands later in this step (during
            # logging, say) is acted on at the next one, never after the checkpoint was skipped.
            # Ctrl-C and the clock are per rank; all ranks must stop at the same step (with one
            # process, any() returns the flags as they are).
            out_of_time, stop_now = group.any(out_of_time, stop.requested)
            if out_of_time or stop_now:
                at_log = at_ckpt = True
            closing = step == cfg.steps or out_of_time  # the closing sample follows: none at this evaluation
            if at_log or at_eval or at_ckpt:
                first_bad = int(bad_step.item())  # the one host sync, at log steps only
                if first_bad >= 0:
                    where = (f"the last good checkpoint (step {last_good}) is kept in {run_dir}"
                             if last_good is not None else "no checkpoint was written"
                             + (f" (the best weights so far are in {run_dir / 'best'})" if new_run.saved else ""))
                    bar.close()
                    raise TrainingDiverged(
                        f"the training loss became NaN or infinite at step {first_bad + 1}; {where}. "
                        "Try a lower --lr, a smaller --grad-clip, or fp32 precision."
                    )
            if at_log:
                train_loss = (group.all_reduce_sum(loss_sum) / (max(1, loss_count) * group.world_size)).item()
                elapsed = time.time() - t_log
                tok_s = tokens_since_log / max(elapsed, 1e-9)
                bar.set_postfix_str(f"loss {train_loss:.4f}, {tok_s:,.0f} tokens/s")
                if not show_bar:
                    log(f"step {step}: train loss {train_loss:.4f}, lr {lr:.2e}, {tok_s:,.0f} tokens/s")
                write_metrics({"step": step, "train_loss": train_loss, "lr": lr, "tokens_per_s": tok_s,
                               "elapsed_s": time.time() - t_start})
                loss_sum.zero_()
                loss_count, t_log, tokens_since_log = 0, time.time(), 0
            if at_eval:
                t_eval = time.time()
                ev = evaluate(model, val_windows, byte_lengths, runtime, group=group if group.world_size > 1 else None)
                budget.took("eval", time.time() - t_eval)
                record = {"step": step, "val_loss": ev["loss"], "val_ppl": ev["ppl"], "val_bpb": ev["bpb"],
                          "elapsed_s": time.time() - t_start}
                write_metrics(record)
                improved = ev["bpb"] < best_bpb
                best_bpb = min(best_bpb, ev["bpb"])
                msg = f"step {step}: val loss {ev['loss']:.4f}, ppl {ev['ppl']:.2f}, {ev['bpb']:.4f} bits/byte"
                if cfg.sample_tokens > 0 and not closing and (group.is_main or dist.is_sharded(model)):
                    t_sample = time.time()  # FSDP: all ranks run it
                    try:
                        msg += f"\n  sample: {sample_text()!r}"
                    except Exception as err:  # a sample must never cost the checkpoint saved below
                        msg += f"\n  (no sample: {err})"
                    budget.took("sample", time.time() - t_sample)
                if show_bar:
                    bar.write(msg)  # above the progress bar
                else:
                    log(msg)
                if improved:
                    dist.save_weights(run_dir / "best", model, group)
                    if group.is_main and not ckpt.has_tokenizer_files(run_dir / "best"):
                        tokenizer.save(run_dir / "best")  # so that best/ generates on its own
                    new_run.saved = True
            if at_ckpt:
                t_save = time.time()
                save_checkpoint(step)
                budget.took("save", time.time() - t_save)
                last_good = step
            if stop_now:
                stopped_by = SIGNAL_NAMES[stop.signum or signal.SIGINT]  # another rank's Ctrl-C: no signal here
                stop.stopping = True  # a Ctrl-C that reaches this rank from now on is this same request
                break
            if out_of_time:
                stopped_by = "--stop-at" if cfg.stop_at is not None and step >= cfg.stop_at else "time budget"
                break
    bar.close()
    group.barrier()

    if stopped_by:
        log(f"stopped by {stopped_by} at step {step}; checkpoint saved in {run_dir} "
            f"(continue with: llmscratch train --resume {run_dir})")
    else:
        # Final evaluation over the whole validation split.
        windows = eval_windows(splits.val, context, n_windows=None)
        windows = dist.shard_batches(windows, group)
        final = evaluate(model, windows, byte_lengths, runtime, group=group if group.world_size > 1 else None)
        write_metrics({"step": step, "final": True, "val_loss": final["loss"], "val_ppl": final["ppl"],
                       "val_bpb": final["bpb"], "val_tokens": final["tokens"], "elapsed_s": time.time() - t_start})
        log(f"final (whole validation split, {final['tokens']:,} tokens): loss {final['loss']:.4f}, "
            f"ppl {final['ppl']:.2f}, {final['bpb']:.4f} bits/byte; {time.time() - t_start:.0f} s in all")
    if (cfg.sample_tokens > 0 and stopped_by not in SIGNAL_NAMES.values()
            and (group.is_main or dist.is_sharded(model))):  # the closing sample, once (FSDP: every rank runs it)
        try:
            log(f"\n--- generated text ---\n{sample_text()}\n----------------------")
        except Exception as err:  # the run is saved: a sample that fails must not fail it
            log(f"(no sample: {err})")
    if group.is_main:  # also after a stop: the curve so far (a resumed run redraws it whole)
        try:
            plot_metrics(metrics_path, run_dir / "loss.png")
        except Exception as err:  # a plot must never lose a run
            log(f"(could not draw loss.png: {err})")
    dist.cleanup(group)
    if group.is_main and sharded.latest_is_sharded(run_dir):
        sharded.consolidate(run_dir)  # the FSDP shards → the ordinary run-directory files
        log(f"consolidated the sharded checkpoint into {run_dir}")
    if stopped_by in SIGNAL_NAMES.values():  # saved and said above; the caller stops too (the CLI exits 128 + signum)
        raise Stopped(stop.signum or signal.SIGINT, saved=True)
    return run_dir


def read_metrics(metrics_path: Path) -> list[dict[str, Any]]:
    """The records of ``metrics.jsonl``; a line that is not a JSON object (the half-written last
    line of a killed run) is skipped."""
    records = []
    for line in Path(metrics_path).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def plot_metrics(metrics_path: Path, out_png: Path) -> None:
    """Draw training and validation loss against step from ``metrics.jsonl``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train_pts, val_pts = [], []
    for r in read_metrics(metrics_path):
        if "train_loss" in r:
            train_pts.append((r["step"], r["train_loss"]))
        if "val_loss" in r and not r.get("final"):
            val_pts.append((r["step"], r["val_loss"]))
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train_pts:
        ax.plot(*zip(*train_pts), label="train loss")
    if val_pts:
        ax.plot(*zip(*val_pts), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = out_png.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, out_png)


def evaluate_text(run_dir: str | Path, data: str, encoding: str = "utf-8", device: str = "auto",
                  batch_size: int = 16) -> dict[str, float]:
    """Loss, perplexity and bits per byte of a saved run on any text (every window of it)."""
    if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
        raise ConfigError(f"the evaluation batch size (--batch-size) must be a positive integer, got {batch_size!r}")
    corpus = load_corpus(data, encoding=encoding)
    runtime = setup_runtime(device, "auto")
    model, tokenizer, _ = ckpt.load_run(run_dir, device=runtime.device, need_tokenizer=data)
    ids = encode_text(corpus.text, tokenizer, token_dtype(tokenizer.vocab_size)).astype(np.int64)
    if len(ids) < 2:
        raise ConfigError(f"{data} is too short to evaluate: it has {len(ids)} token(s), at least 2 are needed")
    windows = eval_windows(ids, model.cfg.context_length, n_windows=None, batch_size=batch_size)
    byte_lengths = torch.as_tensor(tokenizer.token_byte_lengths(), dtype=torch.int64)
    byte_lengths = torch.nn.functional.pad(byte_lengths, (0, max(0, model.cfg.vocab_size - len(byte_lengths))))
    result = evaluate(model, windows, byte_lengths, runtime)
    result["bytes"] = int(byte_lengths[torch.as_tensor(ids[1:])].sum())
    return result


def describe_run(run_dir: str | Path) -> str:
    """A human-readable summary of a run directory: config, size, tokenizer, progress, best numbers."""
    run_dir = Path(run_dir)
    cfg = ckpt.load_config(run_dir)
    with torch.device("meta"):  # shapes only: counting needs no memory
        model = GPT(cfg)
    lines = [f"run directory: {run_dir}"]
    lines.append(f"parameters: {model.num_parameters():,} "
                 f"({model.num_parameters(exclude_embeddings=True):,} without embeddings)")
    lines.append("model config:")
    lines += [f"  {k}: {v}" for k, v in sorted(cfg.to_dict().items())]
    if not ckpt.has_tokenizer_files(run_dir):
        lines.append("tokenizer: none (no tokenizer files: text prompts cannot be used)")
    else:
        try:
            tok = load_tokenizer(run_dir)
            lines.append(f"tokenizer: {tok.kind}, {tok.vocab_size} tokens")
        except LLMScratchError as err:  # info describes a damaged run too: say what is wrong, go on
            lines.append(f"tokenizer: cannot be loaded ({err})")
    weights = run_dir / ckpt.WEIGHTS_FILE
    if not weights.is_file():
        lines.append(f"weights: none ({weights.name} is missing)")
    else:
        try:
            tag = ckpt.weights_tag(run_dir)
            lines.append(f"weights: {weights.name}, {weights.stat().st_size / 1e6:,.1f} MB"
                         + (f", saved at step {tag['step']}" if tag.get("step") else ""))
        except ckpt.CheckpointError as err:
            lines.append(f"weights: damaged: {err}")
    train_cfg_path = run_dir / "train_config.json"
    try:
        state = sharded.load_training_state(run_dir)  # the newest checkpoint's: ordinary or sharded (--fsdp)
    except ckpt.CheckpointError as err:  # matters for resuming only: the rest of the summary still stands
        state = None
        lines.append(f"training: the state cannot be read, so the run cannot be resumed: {err}")
    if state is not None:
        total, optimizer = None, None
        if train_cfg_path.exists():
            saved = ckpt.read_json(train_cfg_path)
            total, optimizer = saved.get("steps"), saved.get("optimizer", "adamw")
        lines.append(f"training: step {state['step']}" + (f" of {total}" if total else "")
                     + f", {state.get('tokens_seen', 0):,} tokens seen" + (f", {optimizer}" if optimizer else ""))
        if "optimizer" not in state:
            lines.append(f"  (that step's checkpoint is sharded ({ckpt.SHARDED_DIR}/, from --fsdp): "
                         f"`llmscratch export {run_dir} OUT_DIR --format run` makes it whole)")
    elif run_dir.name == "best" and (run_dir.parent / "train_config.json").is_file():
        evals = [r for r in read_metrics(run_dir.parent / "metrics.jsonl") if "val_bpb" in r and not r.get("final")] \
            if (run_dir.parent / "metrics.jsonl").is_file() else []
        best = min(evals, key=lambda r: r["val_bpb"], default=None)
        lines.append(f"training: the best validation weights of the run in {run_dir.parent}"
                     + (f", from step {best['step']} ({best['val_bpb']:.4f} bits/byte)" if best else ""))
    elif not lines[-1].startswith("training:"):
        lines.append("training: none recorded (imported or exported weights)")
    metrics = run_dir / "metrics.jsonl"
    if metrics.exists():
        records = read_metrics(metrics)
        evals = [r for r in records if "val_bpb" in r and not r.get("final")]
        finals = [r for r in records if r.get("final")]
        if evals:
            best = min(evals, key=lambda r: r["val_bpb"])
            lines.append(f"best validation (during training): step {best['step']}, loss {best['val_loss']:.4f}, "
                         f"ppl {best['val_ppl']:.2f}, {best['val_bpb']:.4f} bits/byte")
        if finals:
            f = finals[-1]
            lines.append(f"final validation (whole split): loss {f['val_loss']:.4f}, ppl {f['val_ppl']:.2f}, "
                         f"{f['val_bpb']:.4f} bits/byte")
    return "\n".join(lines)
