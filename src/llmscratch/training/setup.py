"""Everything a run needs before its first step: where it lives, its data, its model and optimizer.

:func:`setup` returns a :class:`Run`. A resumed run takes its saved settings (but for those
``--resume`` may change), checks that its corpus is the same text, and restores weights,
optimizer, step and random generators exactly; a new one makes its folder, tokenizer and model.
"""

from __future__ import annotations

import glob
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn

from ..data.corpus import TokenSplits, check_split_sizes, load_corpus, prepare_tokens
from ..data.tokenizer import Tokenizer, build_tokenizer, load_tokenizer
from ..errors import CheckpointError, ConfigError, TokenizerError
from ..files import human_bytes
from ..nn.lora import apply_lora, has_lora, lora_config, merge_lora
from ..nn.model import GPT, GPTConfig, loss_label
from ..runtime import Runtime, seed_everything, setup_runtime
from ..store import checkpoint as ckpt
from ..store import sharded
from ..store.convert import load_pretrained
from ..store.lora import base_run_of, set_base_run
from ..store.rundir import RunDir, new_run_dir
from . import distributed as dist
from .config import RESUME_MAY_CHANGE, TrainConfig
from .step import build_optimizer

Log = Callable[[str], None]


@dataclass
class Run:
    """A run, set up: what the loop and the closing steps work with."""

    cfg: TrainConfig
    run_dir: RunDir
    group: dist.Group
    runtime: Runtime
    tokenizer: Tokenizer
    splits: TokenSplits
    corpus_sha: str
    model: GPT  # the model itself (FSDP: its shards), as saved
    train_model: nn.Module  # the model wrapped for several processes (DDP), or the model
    forward: Callable[..., torch.Tensor]  # what computes the loss: train_model, compiled with --compile
    optimizer: torch.optim.Optimizer
    scaler: Optional[torch.amp.GradScaler]
    batch_gen: torch.Generator
    micro_size: int
    log: Log
    t_start: float
    new_run: "NewRun"
    state: Optional[dict[str, Any]] = None  # the training state resumed from
    loss_label: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


class NewRun:
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

    def remove_if_nothing_saved(self, log: Log) -> None:
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


def given_options(cfg: TrainConfig, given: Optional[set[str]]) -> set[str]:
    """The options the user set: ``given`` as the CLI passes it, else those unlike the defaults."""
    if given is not None:
        return set(given)
    now, defaults = cfg.to_dict(), TrainConfig().to_dict()
    return {k for k, v in now.items() if v != defaults[k]}


def _shown(option: str, value: Any) -> str:
    """An option's value as an error message names it (no --data: the built-in corpus)."""
    return "(the built-in corpus)" if option == "data" and value is None else repr(value)


def check_resumable(run_dir: Path) -> None:
    """A clear error unless ``run_dir`` is a folder a training run wrote its settings in."""
    run = RunDir(run_dir)
    if not run_dir.exists():
        raise ConfigError(f"--resume {run_dir}: no such folder; give a run directory (runs/NAME, or runs/latest)")
    if not run_dir.is_dir():
        raise ConfigError(f"--resume {run_dir} is a file; give the run directory that holds it ({run_dir.parent})")
    if run.finetune.is_file():
        raise ConfigError(f"--resume {run_dir}: a fine-tuning run (it has {run.finetune.name}); continue it with "
                          f"`llmscratch finetune --resume {run_dir}`")
    if not run.train_config.is_file() and run.config.is_file():
        raise ConfigError(f"--resume {run_dir}: these weights were not trained by `llmscratch train` (no "
                          f"{run.train_config.name}: imported?), so there is no run to continue; start one from them "
                          f"with --init-from {run_dir}")


def resumed_config(cfg: TrainConfig, given: Optional[set[str]] = None) -> TrainConfig:
    """The settings a ``--resume`` of ``cfg.resume`` runs with: the run's saved ones, except those that
    ``--resume`` may change (``RESUME_MAY_CHANGE``) that were given; a clash with the others is refused."""
    run = RunDir(cfg.resume)
    check_resumable(run.path)
    saved = ckpt.read_json(run.train_config)
    saved.setdefault("optimizer", "adamw")  # runs saved before the option existed trained with AdamW
    now, given = cfg.to_dict(), given_options(cfg, given)
    clash = sorted(k for k in given - set(RESUME_MAY_CHANGE) if k in saved and now[k] != saved[k])
    if clash:
        raise ConfigError(
            f"--resume continues {run} as it was set up; these options differ from it and cannot change: "
            + ", ".join(f"--{k.replace('_', '-')} {_shown(k, now[k])} (the run has {_shown(k, saved[k])})"
                        for k in clash)
            + "; drop them, or start a new run (--init-from to start from these weights)")
    # The saved settings win, except those the user gave on this command line.
    merged = {**saved, **{k: now[k] for k in RESUME_MAY_CHANGE if k in given and k in now}}
    # Where to stop and how long to wait this time are properties of this command, never of the saved run.
    merged.update(resume=str(run), init_from=None, stop_at=cfg.stop_at, time_budget=cfg.time_budget,
                  progress=cfg.progress, dist_timeout=cfg.dist_timeout)
    try:
        return TrainConfig.from_dict(merged)
    except ConfigError as err:  # what it names came from the run's file, not from this command line
        raise ConfigError(f"{run.train_config}: {err}") from err


def resumed_state(cfg: TrainConfig, group: dist.Group) -> dict:
    """The newest training state of the run ``cfg`` resumes (ordinary or sharded), checked to continue."""
    run = RunDir(cfg.resume)
    state = sharded.load_training_state(run.path, prefer_sharded=cfg.fsdp and group.active)
    if state is None:
        raise CheckpointError(f"{run}: no training_state.pt to resume from: the run stopped before its first "
                              f"checkpoint; start it again (delete {run}, or choose another --name)")
    if cfg.steps <= int(state["step"]):
        raise ConfigError(f"{run} is already at step {state['step']}, so --steps {cfg.steps} leaves nothing "
                          f"to train; give --steps above {state['step']} to train further")
    if "optimizer" in state:  # an ordinary checkpoint: weights and state must come from one save
        ckpt.check_saved_together(run.path, state)
    return state


SHAPE_OPTIONS = ("tokenizer", "vocab_size", "preset", "model")  # what --init-from brings from its folder


def resolved_options(cfg: TrainConfig, given: Optional[set[str]] = None) -> dict[str, Any]:
    """Every option the run that ``cfg`` starts would use, as a ``--config`` file holds them
    (``llmscratch train --print-config``): given back through ``--config`` alone, they resolve to the same.

    A resumed run's are its saved settings with this command's changes. With ``--init-from``,
    the options that shape a new model and tokenizer are left out: they cannot apply.
    """
    options = (resumed_config(cfg, given) if cfg.resume else cfg).to_dict()
    if options.get("init_from"):
        for name in SHAPE_OPTIONS:
            options.pop(name)
    return options


def check_init_from(cfg: TrainConfig, given: Optional[set[str]]) -> None:
    """``--init-from`` names a folder, and no option that would shape a new model or tokenizer is given."""
    if not Path(cfg.init_from).is_dir():
        raise ConfigError(f"--init-from {cfg.init_from}: no such folder; give a run directory (runs/NAME) or a "
                          f"Hugging Face GPT-2 directory (`llmscratch import` makes one a run)")
    moot = sorted(given_options(cfg, given) & set(SHAPE_OPTIONS))
    if moot:
        raise ConfigError(
            f"--init-from {cfg.init_from} brings its own model and tokenizer; "
            + ", ".join(f"--{k.replace('_', '-')}" if k != "model" else "model options" for k in moot)
            + " cannot apply to them: drop them")


def tokenizer_cache_dir() -> Path:
    """Where tokenizers and token files are cached: ``$LLMSCRATCH_CACHE``, else ``~/.cache/llmscratch``."""
    return Path(os.environ.get("LLMSCRATCH_CACHE", Path.home() / ".cache" / "llmscratch"))


def prepare_tokenizer(cfg: TrainConfig, corpus_text: str, cache: Path, group: dist.Group,
                      log: Log = lambda message: None) -> Tokenizer:
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


def prepare_data(cfg: TrainConfig, run_dir: RunDir, state: Optional[dict], group: dist.Group,
                 log: Log) -> tuple[str, Tokenizer, TokenSplits]:
    """The corpus's fingerprint (the same text a resumed run started on), its tokenizer and its token splits."""
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
    cache = tokenizer_cache_dir()
    if cfg.resume:
        tokenizer = load_tokenizer(run_dir.path)
    elif cfg.init_from:
        tokenizer = load_tokenizer(cfg.init_from)
    else:
        tokenizer = prepare_tokenizer(cfg, corpus.text, cache, group, log)
        if cfg.tokenizer == "bpe" and tokenizer.vocab_size < cfg.vocab_size:
            log(f"note: --vocab-size {cfg.vocab_size} asks for more tokens than BPE finds merges for in this corpus: "
                f"the tokenizer has {tokenizer.vocab_size} (more text gives more)")
    if group.is_main:  # rank 0 writes the token cache; then every rank (rank 0 again) reads it
        prepare_tokens(corpus, tokenizer, cache / "tokens", val_fraction=cfg.val_fraction, progress=log)
    group.barrier()
    splits = prepare_tokens(corpus, tokenizer, cache / "tokens", val_fraction=cfg.val_fraction)
    return corpus_sha, tokenizer, splits


def build_model(cfg: TrainConfig, run_dir: RunDir, state: Optional[dict], tokenizer: Tokenizer,
                group: dist.Group, runtime: Runtime) -> GPT:
    """The model to train: resumed, started from ``--init-from``, or new from the preset (seeded);
    under FSDP sharded as it is built."""
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
            return ckpt.load_model(run_dir.path)
        if cfg.init_from:
            return load_pretrained(cfg.init_from)
        torch.manual_seed(cfg.seed)  # the same initial weights as one process
        return GPT(fresh_cfg)

    from_shards = cfg.resume and "optimizer" not in state  # a sharded checkpoint: dist.restore loads the weights
    if cfg.fsdp and group.active:
        return (dist.sharded_model(group, runtime, cfg=ckpt.load_config(run_dir.path)) if from_shards
                else dist.sharded_model(group, runtime, full=whole_model))
    return GPT(ckpt.load_config(run_dir.path)) if from_shards else whole_model()


def adapt_model(cfg: TrainConfig, model: GPT, log: Log) -> None:
    """LoRA (``--lora-rank``): adapters on the frozen weights of ``--init-from``, or a resumed run's own.

    Without ``--lora-rank``, a model that came with adapters (``--init-from`` a LoRA run) has them
    merged into its weights first: every weight then trains, as without LoRA.
    """
    lora = cfg.lora()
    if lora is None:
        if has_lora(model):
            merge_lora(model)
            log(f"--init-from {cfg.init_from} holds LoRA adapters: merged into its base weights, which all train")
        return
    if cfg.resume:
        if lora_config(model) != lora:
            raise ConfigError(f"{cfg.resume}'s saved adapters are not the ones its train_config.json describes "
                              f"({lora_config(model)} against {lora}); restore the run's files")
    else:
        if has_lora(model):
            raise ConfigError(f"--init-from {cfg.init_from} holds LoRA adapters already; new ones go on whole weights: "
                              f"merge them first (`llmscratch export {cfg.init_from} OUT --format run --merge`) and "
                              "--init-from OUT")
        if not (Path(cfg.init_from) / ckpt.CONFIG_FILE).is_file() or ckpt.folder_kind(cfg.init_from) != "run":
            raise ConfigError(f"--lora-rank saves adapters with a reference to the run they adapt, and --init-from "
                              f"{cfg.init_from} is not a run directory: make one first (`llmscratch import "
                              f"{cfg.init_from} RUN_DIR`) and --init-from RUN_DIR")
        apply_lora(model, lora)
        set_base_run(model, cfg.init_from)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    log(f"LoRA rank {lora.rank}, alpha {lora.alpha:g} (x{lora.scale:g}) on {','.join(lora.targets)} of "
        f"{base_run_of(model)}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.2f} %), "
        "AdamW on the adapters")


def setup(cfg: TrainConfig, log: Log, given: Optional[set[str]], new_run: NewRun, group: dist.Group,
          t_start: float) -> Run:
    """Everything the loop needs, from the options: see the module's docstring."""
    state = None
    if cfg.resume:
        cfg = resumed_config(cfg, given)
        state = resumed_state(cfg, group)
        run_dir = RunDir(cfg.resume)
    else:
        if cfg.init_from:
            check_init_from(cfg, given)
        # Rank 0 names the folder and tells the others: a name from each rank's own clock (the
        # default, the date and time) differs where clocks or time zones do, and FSDP's shards
        # would go to two folders.
        run_dir = RunDir(group.decided_by_main(lambda: str(new_run_dir(cfg.out_dir, cfg.name))))
        if group.is_main:
            new_run.claim(run_dir.path)

    runtime = setup_runtime(cfg.device, cfg.precision)
    if group.active and runtime.device.type == "cuda":
        runtime = Runtime(torch.device("cuda", group.local_rank), runtime.precision)  # one GPU per process
    seed_everything(cfg.seed + group.rank)
    corpus_sha, tokenizer, splits = prepare_data(cfg, run_dir, state, group, log)
    model = build_model(cfg, run_dir, state, tokenizer, group, runtime)
    adapt_model(cfg, model, log)
    model.loss_impl = cfg.loss
    try:
        loss_impl = model.loss_implementation(runtime.device)
    except ValueError as err:
        raise ConfigError(f"--loss {cfg.loss}: {err}") from err
    if model.cfg.vocab_size < tokenizer.vocab_size:
        raise ConfigError(f"the model's vocabulary ({model.cfg.vocab_size}) is smaller than the "
                          f"tokenizer's ({tokenizer.vocab_size}); they do not belong together")
    check_split_sizes(splits, model.cfg.context_length)
    model.to(runtime.device)
    train_model = dist.wrap_model(model, group, runtime, fsdp=cfg.fsdp)  # DDP; FSDP sharded it above
    run = Run(cfg=cfg, run_dir=run_dir, group=group, runtime=runtime, tokenizer=tokenizer, splits=splits,
              corpus_sha=corpus_sha, model=model, train_model=train_model,
              forward=torch.compile(train_model) if cfg.compile else train_model,
              optimizer=build_optimizer(model, cfg, runtime.device),
              scaler=torch.amp.GradScaler(runtime.device.type) if runtime.needs_grad_scaler else None,
              batch_gen=torch.Generator().manual_seed(cfg.seed),
              micro_size=dist.micro_batch_size(cfg.batch_size, cfg.grad_accum, group.world_size, cfg.micro_batch),
              log=log, t_start=t_start, new_run=new_run, state=state)
    run.loss_label = loss_label(loss_impl, runtime.device)
    return run
