"""Every setting of a training run, declared once: its default, its help, its group, and whether
``--resume`` may change it.

``TrainConfig``'s fields carry that in ``dataclasses.field(metadata=...)`` (see :func:`option`):
the command line's ``train`` parser is built from it, the resume rule reads it, and the help's
``(default …)`` is the field's default, so no option is declared twice. The model's own options
(``--n-layers``, ``--pos-emb``, …) set :class:`GPTConfig` fields; :data:`MODEL_OPTIONS` lists
them, their choices taken from the model's constants.

Config files (YAML or JSON) hold the same options by name (:func:`load_config_file`).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from ..errors import ConfigError
from ..nn.attention import BACKENDS
from ..nn.lora import DEFAULT_TARGETS, SCALINGS, TARGETS, LoRAConfig
from ..nn.model import ACTIVATIONS, FIELD_OPTIONS, LOSS_IMPLS, PRESETS, GPTConfig, check_field_types, \
    numbers_from_strings
from ..nn.positions import POSITION_KINDS
from ..store.rundir import LATEST
from .distributed import DEFAULT_TIMEOUT_S

TOKENIZERS = ("char", "bpe", "gpt2")
OPTIMIZERS = ("muon", "adamw")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
GROUPS = ("data", "model", "optimisation", "LoRA", "evaluation and checkpoints", "runtime", "run directory")


def option(default: Any, group: str, help: str, *, resume: bool = False, choices: Optional[tuple] = None,
           flag: str = "value", show_default: bool = True, factory: Any = None) -> Any:
    """A :class:`TrainConfig` field with what the command line and ``--resume`` need to know of it.

    ``flag``: ``"value"`` (``--lr 1e-3``), ``"on"`` (``--compile`` sets True) or ``"off"``
    (``--no-progress`` sets False); ``resume``: a resumed run may change it (how far and how it
    runs, never what or how it learns); ``show_default``: the help ends with ``(default …)``.
    """
    metadata = {"group": group, "help": help, "resume": resume, "choices": choices, "flag": flag,
                "show_default": show_default}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


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
    data: Optional[str] = option(None, "data", "a text file, a folder of .txt files or a glob (default: the "
                                 "built-in corpus)", show_default=False)
    encoding: str = option("utf-8", "data", "text encoding of the corpus files")
    val_fraction: float = option(0.1, "data", "fraction of the corpus tail held out for validation")
    tokenizer: str = option("bpe", "data", "tokenizer kind", choices=TOKENIZERS)
    vocab_size: int = option(4096, "data", "vocabulary size of a trained BPE tokenizer")
    # model
    preset: str = option("cpu", "model", "model preset: " + ", ".join(PRESETS))
    model: dict[str, Any] = option(None, "model", "GPTConfig overrides (`model:` in a config file)",
                                   factory=dict)
    # optimisation
    steps: int = option(1400, "optimisation", "optimizer steps", resume=True)
    batch_size: int = option(16, "optimisation", "windows of --context-length tokens per step, times --grad-accum: "
                             "a step trains on batch-size × grad-accum windows, shared out over all processes (the "
                             "log's \"windows per step\")")
    grad_accum: int = option(1, "optimisation", "multiplies the windows per step (batch-size × grad-accum); their "
                             "gradients are added up over micro-batches (--micro-batch) before each update")
    micro_batch: Optional[int] = option(None, "optimisation", "windows per forward pass on each process (default "
                                        "--batch-size); the step stays batch-size × grad-accum windows and "
                                        "accumulation adapts to the number of processes", resume=True,
                                        show_default=False)
    lr: float = option(3e-3, "optimisation", "peak learning rate")
    min_lr: float = option(1e-4, "optimisation", "learning rate at the end of the cosine decay")
    warmup_steps: int = option(30, "optimisation", "linear warmup steps")
    weight_decay: float = option(0.6, "optimisation", "decoupled weight decay on matrices")
    beta1: float = option(0.8, "optimisation", "AdamW's first-moment decay, for the parameters AdamW updates")
    beta2: float = option(0.999, "optimisation", "AdamW's second-moment decay")
    grad_clip: float = option(1.0, "optimisation", "clip the gradient norm to this (0: no clipping)")
    optimizer: str = option("muon", "optimisation", "muon: Muon on the blocks' weight matrices, AdamW on "
                            "embeddings, head, gains and biases; adamw: AdamW on everything (needed with --fsdp)",
                            choices=OPTIMIZERS)
    muon_momentum: float = option(0.9, "optimisation", "Muon's momentum")
    # LoRA: low-rank adapters on the frozen weights of --init-from (nn/lora.py, docs/finetuning.md)
    lora_rank: int = option(0, "LoRA", "train LoRA adapters of this rank on the frozen weights of --init-from "
                            "(AdamW on the adapters alone; the run saves them and a reference to the base run); "
                            "0: train every weight")
    lora_alpha: float = option(16.0, "LoRA", "the adapters' alpha: their update is multiplied by alpha/rank "
                               "(--lora-scaling alpha: by alpha, as the book's appendix E)")
    lora_dropout: float = option(0.0, "LoRA", "dropout on the adapters' input during training")
    lora_targets: str = option(",".join(DEFAULT_TARGETS), "LoRA", "the projections to adapt in every block, "
                               "comma-separated: " + ", ".join(TARGETS) + " (query/key/value: those rows of the "
                               "fused attention input; qkv: all of it; gate/up: the SwiGLU halves of mlp_in)")
    lora_scaling: str = option("alpha/rank", "LoRA", "alpha/rank: the LoRA paper's and PEFT's; alpha: the book's",
                               choices=SCALINGS)
    # evaluation, logging, checkpoints
    eval_interval: int = option(350, "evaluation and checkpoints", "evaluate every N steps", resume=True)
    eval_windows: int = option(64, "evaluation and checkpoints", "validation windows per evaluation during "
                               "training")
    log_interval: int = option(20, "evaluation and checkpoints", "log the training loss every N steps: on the "
                               "progress bar, or as a line without one (--no-progress, or output not a terminal); "
                               "always in metrics.jsonl", resume=True)
    checkpoint_interval: int = option(700, "evaluation and checkpoints", "save a checkpoint every N steps, and at "
                                      "the end", resume=True)
    sample_tokens: int = option(48, "evaluation and checkpoints", "tokens of the sample text printed at each "
                                "evaluation and once at the end (0: none)", resume=True)
    sample_prompt: str = option("And God said", "evaluation and checkpoints", "prompt of the printed samples",
                                resume=True)
    # runtime
    device: str = option("auto", "runtime", "auto (cuda, then mps, then cpu), cpu, cuda, cuda:N, mps", resume=True)
    precision: str = option("auto", "runtime", "auto: bf16 on CUDA, fp32 on CPU", resume=True, choices=PRECISIONS)
    compile: bool = option(False, "runtime", "torch.compile the model", resume=True, flag="on", show_default=False)
    loss: str = option("auto", "runtime", "how the head and loss are computed: plain (logits, then "
                       "F.cross_entropy: the readable path), chunked (fused, a chunk of tokens at a time), kernel "
                       "(our Triton kernel on CUDA; on the CPU its PyTorch reference); auto: chunked on the CPU, "
                       "kernel on CUDA with Triton, else plain", resume=True, choices=LOSS_IMPLS)
    fsdp: bool = option(False, "runtime", "under torchrun: shard weights, gradients and optimizer state with FSDP "
                        "instead of DDP (see docs/distributed.md)", resume=True, flag="on", show_default=False)
    dist_timeout: float = option(DEFAULT_TIMEOUT_S, "runtime", "under torchrun: seconds a process waits in a "
                                 "collective for the others before it gives up and names the one that stopped "
                                 "answering; longer than any healthy wait, such as rank 0 preparing the data while "
                                 "the others wait", resume=True)
    seed: int = option(1337, "runtime", "random seed")
    time_budget: Optional[float] = option(None, "runtime", "seconds for the whole command, from its start (data "
                                          "preparation included) to its end: training stops early enough that the "
                                          "checkpoint and the closing sample fit too (their time estimated from this "
                                          "run's earlier ones); --resume continues", resume=True, show_default=False)
    stop_at: Optional[int] = option(None, "runtime", "stop (and save) at this step (at most --steps) as if "
                                    "interrupted; --resume continues", resume=True, show_default=False)
    progress: bool = option(True, "runtime", "no progress bar: the training loss is printed every --log-interval "
                            "steps instead", resume=True, flag="off", show_default=False)
    # where
    out_dir: str = option("runs", "run directory", "parent folder of run directories")
    name: Optional[str] = option(None, "run directory", "run name (default: date and time)", show_default=False)
    resume: Optional[str] = option(None, "run directory", "continue the run in this directory exactly where it "
                                   "stopped", resume=True, show_default=False)
    init_from: Optional[str] = option(None, "run directory", "start a new run from the weights of a run directory "
                                      "or Hugging Face GPT-2 directory", show_default=False)

    def __post_init__(self) -> None:
        check_field_types(self, lambda name, wanted, value: f"{named(name)} must be {wanted}, got {value!r}")
        for name in ("steps", "batch_size", "grad_accum", "eval_interval", "eval_windows", "log_interval",
                     "checkpoint_interval", "vocab_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{named(name)} must be a positive integer, got {getattr(self, name)!r}")
        for f in dataclasses.fields(self):
            choices = f.metadata.get("choices")
            if choices and getattr(self, f.name) not in choices:
                raise ConfigError(f"{named(f.name)} must be one of {', '.join(choices)}, got {getattr(self, f.name)!r}")
        self._check_ranges()
        self._check_combinations()

    def _check_ranges(self) -> None:
        if self.grad_clip < 0:
            raise ConfigError(f"{named('grad_clip')} must be >= 0 (0: no clipping), got {self.grad_clip}")
        if self.sample_tokens < 0:
            raise ConfigError(f"{named('sample_tokens')} must be >= 0 (0: no samples), got {self.sample_tokens}")
        if self.name is not None and (not self.name or self.name in (".", "..", LATEST)
                                      or "/" in self.name or os.sep in self.name):
            raise ConfigError(f"--name {self.name!r} must be one folder name (no '/', not '.', '..' or 'latest'): "
                              f"a run lives in --out-dir/NAME")
        if not 0 <= self.seed < 2**32:
            raise ConfigError(f"{named('seed')} must be in [0, 2**32), as NumPy's seed, got {self.seed}")
        if self.stop_at is not None and self.stop_at < 1:
            raise ConfigError(f"{named('stop_at')} must be a step >= 1, got {self.stop_at}")
        if self.warmup_steps < 0:
            raise ConfigError(f"{named('warmup_steps')} must be >= 0, got {self.warmup_steps}")
        if not 0.0 < self.val_fraction < 1.0:
            raise ConfigError(f"{named('val_fraction')} must be in (0, 1), got {self.val_fraction}")
        if not (self.lr > 0 and 0 <= self.min_lr <= self.lr):
            raise ConfigError(f"{named('lr')} must be > 0 and {named('min_lr')} in [0, lr], got lr={self.lr}, "
                              f"min_lr={self.min_lr}")
        for name in ("beta1", "beta2", "muon_momentum"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"{named(name)} must be in [0, 1), got {getattr(self, name)!r}")
        if self.weight_decay < 0:
            raise ConfigError(f"{named('weight_decay')} must be >= 0, got {self.weight_decay!r}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ConfigError(f"{named('micro_batch')} must be a positive integer or None, got {self.micro_batch!r}")
        if self.time_budget is not None and self.time_budget <= 0:
            raise ConfigError(f"{named('time_budget')} must be positive seconds, got {self.time_budget}")
        if self.dist_timeout <= 0:
            raise ConfigError(f"{named('dist_timeout')} must be positive seconds, got {self.dist_timeout}")

    def _check_combinations(self) -> None:
        if self.stop_at is not None and self.stop_at > self.steps:
            raise ConfigError(f"{named('stop_at')} {self.stop_at} is past the run's last step ({named('steps')} "
                              f"{self.steps}): it would never stop there; give a step up to {self.steps}")
        if self.optimizer == "muon" and self.fsdp:
            raise ConfigError("--fsdp shards each weight matrix over the GPUs, and Muon needs whole matrices: "
                              "add --optimizer adamw")
        if self.preset not in PRESETS:
            raise ConfigError(f"unknown preset {self.preset!r} (--preset); choose one of {sorted(PRESETS)}")
        unknown = sorted(set(self.model) - {f.name for f in dataclasses.fields(GPTConfig)})
        if unknown:
            raise ConfigError(f"unknown model option(s) {unknown} under `model:`; known: "
                              f"{sorted(f.name for f in dataclasses.fields(GPTConfig))}")
        GPTConfig.from_preset(self.preset, **self.model)  # a bad model option is named now, before any work
        if self.resume and self.init_from:
            raise ConfigError("--resume continues a run; --init-from starts a new one from weights: pick one")
        self._check_lora()

    def _check_lora(self) -> None:
        if self.lora_rank < 0:
            raise ConfigError(f"{named('lora_rank')} must be >= 0 (0: no LoRA, every weight trains), "
                              f"got {self.lora_rank}")
        if not self.lora_rank:
            return
        self.lora()  # LoRAConfig checks the LoRA options, naming each
        if not (self.init_from or self.resume):
            raise ConfigError("--lora-rank adapts trained weights, which a new random model has not: give "
                              "--init-from RUN (a run directory; `llmscratch import` makes one)")
        if self.fsdp:
            raise ConfigError("--lora-rank trains adapters far smaller than the model, and is not wired for --fsdp: "
                              "drop --fsdp (DDP under torchrun works)")

    def lora(self) -> Optional[LoRAConfig]:
        """The adapters this run trains (``--lora-rank`` and the other LoRA options), or None."""
        if not self.lora_rank:
            return None
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, dropout=self.lora_dropout,
                          targets=self.lora_targets, scaling=self.lora_scaling)

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


def flag_of(name: str) -> str:
    """The command-line option that sets TrainConfig field ``name``: ``--lr``, ``--no-progress``."""
    f = _FIELDS[name]
    return ("--no-" if f.metadata.get("flag") == "off" else "--") + name.replace("_", "-")


def named(name: str) -> str:
    """How an error message names a TrainConfig field: the field and the option that sets it."""
    where = "`model:` in --config" if name == "model" else flag_of(name)
    return f"TrainConfig.{name} ({where})"


_FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# What a resumed run may change: how far and how it runs, never what it learns from or how.
RESUME_MAY_CHANGE = tuple(f.name for f in dataclasses.fields(TrainConfig) if f.metadata.get("resume"))

# Command-line options that set GPTConfig fields: (field, help, type, choices). The option's name is
# the model's own (nn.model.FIELD_OPTIONS, which its error messages name).
MODEL_OPTIONS = (
    ("n_layers", "number of transformer blocks", int, None),
    ("n_heads", "attention heads per block", int, None),
    ("emb_dim", "embedding width C", int, None),
    ("context_length", "tokens per training window", int, None),
    ("pos_emb", "position embedding kind", str, POSITION_KINDS),
    ("activation", "feed-forward nonlinearity (GPT-2: gelu)", str, ACTIVATIONS),
    ("drop_rate", "dropout rate", float, None),
    ("attn_backend", "attention implementation", str, BACKENDS),
    ("scale_attn", "train without the 1/sqrt(d_head) score scaling", bool, None),
)
assert {f for f, *_ in MODEL_OPTIONS} == set(FIELD_OPTIONS), "every model option has a flag in nn.model"


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


def warmup_note(cfg: TrainConfig) -> Optional[str]:
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


# ---------------------------------------------------------------------------- config files

# Command-line flags that a config file spells another way (or cannot hold), and how.
FILE_SPELLINGS = {
    "no_progress": "write `progress: false`",
    "no_scale_attn": "write `scale_attn: false` under `model:`",
    "dropout": "write `drop_rate:` under `model:` (--dropout sets GPTConfig.drop_rate)",
    "nproc": "--nproc launches processes: give it on the command line",
    "config": "a config file cannot name another one: give --config on the command line",
    "print_config": "--print-config prints the options instead of training: give it on the command line",
    # nanoGPT's names for the same settings
    "learning_rate": "write `lr:`",
    "max_iters": "write `steps:`",
    "n_embd": "write `emb_dim:` under `model:`",
    "block_size": "write `context_length:` under `model:`",
}


def load_config_file(path: str | Path) -> dict:
    """Training options from a YAML or JSON file (keys as in TrainConfig, ``-`` or ``_``; ``model:`` for GPTConfig)."""
    data = _read_mapping(Path(path))
    _check_names(data, f"config file {path}", "steps: 100")
    model = data.get("model")
    if model is not None and not isinstance(model, dict):
        raise ConfigError(f"config file {path}: `model:` must be a mapping of model options to values "
                          f"(e.g. `model: {{n_layers: 4, layer_norm_eps: 1.0e-5}}`), got {type(model).__name__} "
                          f"{model!r}")
    if model:
        _check_names(model, f"config file {path}, under `model:`,", "n_layers: 4")
    _check_known(data, model or {}, str(path))
    data = _underscored(data, f"config file {path}")  # `batch-size:` as on the command line
    if model:
        data["model"] = _underscored(model, f"config file {path}, under `model:`,")
    return data


def _read_mapping(p: Path) -> dict:
    if p.is_dir():
        raise ConfigError(f"config file {p} is a folder: give the path of a YAML or JSON file (--config)")
    if not p.is_file():
        raise ConfigError(f"config file {p} does not exist")
    if p.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {p}: a config file is YAML (.yaml, .yml) or JSON (.json), "
                          f"told apart by its name's ending; rename it")
    data_bytes = p.read_bytes()
    try:
        text = data_bytes.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not part of the text
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {p} is not UTF-8 text (byte 0x{data_bytes[err.start]:02x} at offset "
                          f"{err.start}): save it as UTF-8") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as err:
        raise ConfigError(f"config file {p} could not be parsed: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {p} must hold a mapping of option names to values")
    return data


def _check_known(data: dict, model: dict, path: str) -> None:
    """Every key of a config file (``data``, its ``model:`` mapping) is an option, as written or with ``-`` for ``_``.

    An unknown one is named as written, with what to write instead.
    """
    train_fields = set(_FIELDS)
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)}

    def hint(name: str, known: set[str], other: set[str], other_place: str, other_where: str) -> str:
        if name in FILE_SPELLINGS:
            return FILE_SPELLINGS[name]
        if name in other:
            return f"it is {other_place}"
        close = difflib.get_close_matches(name, sorted(known | other), n=1)  # a misspelling in either place
        if close:
            return f"did you mean `{close[0]}`{'' if close[0] in known else ' ' + other_where}?"
        return f"known: {', '.join(sorted(known))}"

    def name(key: str) -> str:
        return key.replace("-", "_")

    problems = [f"`{key}`: " + hint(name(key), train_fields, model_fields - train_fields,
                                      "a model option: put it under `model:`", "under `model:`")
                for key in data if name(key) not in train_fields]
    problems += [f"`{key}` under `model:`: " + hint(name(key), model_fields, train_fields - model_fields,
                                                    "a training option: put it at the top level, not under `model:`",
                                                    "at the top level")
                 for key in model if name(key) not in model_fields]
    if problems:
        raise ConfigError(f"config file {path} has unknown option(s): " + "; ".join(problems))


def _underscored(mapping: dict, where: str) -> dict:
    """``mapping`` with ``-`` in its keys read as ``_``; a key given both ways is an error, not a silent pick."""
    out: dict = {}
    for key, value in mapping.items():
        name = key.replace("-", "_")
        if name in out:
            both = [k for k in mapping if k.replace("-", "_") == name]
            raise ConfigError(f"{where} sets {name} twice, as {' and '.join(map(repr, both))}: keep one")
        out[name] = value
    return out


def _check_names(mapping: dict, where: str, example: str) -> None:
    """Every key of a config file's mapping is an option name (YAML reads ``1: 2`` as the number 1)."""
    bad = [k for k in mapping if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where} has keys that are not option names: {bad!r}; "
                          f"write option names such as `{example}`")
