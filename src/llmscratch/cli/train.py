"""``llmscratch train``: options from the command line and config files, then one training run."""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from .commands import command

if TYPE_CHECKING:
    from ..training.train import TrainConfig


_MODEL_OPTIONS = {  # command-line option → GPTConfig field
    "n_layers": "n_layers", "n_heads": "n_heads", "emb_dim": "emb_dim",
    "context_length": "context_length", "pos_emb": "pos_emb", "dropout": "drop_rate",
    "attn_backend": "attn_backend", "activation": "activation",
}
_TRAIN_OPTIONS = (
    "data", "encoding", "val_fraction", "tokenizer", "vocab_size", "preset", "steps", "batch_size",
    "grad_accum", "lr", "min_lr", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip", "optimizer",
    "muon_momentum", "eval_interval",
    "eval_windows", "log_interval", "checkpoint_interval", "sample_tokens", "sample_prompt", "device",
    "precision", "compile", "seed", "time_budget", "stop_at", "out_dir", "name", "resume", "init_from",
    "micro_batch", "fsdp", "loss", "dist_timeout",
)


def load_config_file(path: str) -> dict:
    """Read training options from a YAML or JSON file (keys as in TrainConfig; ``model:`` for GPTConfig)."""
    import json
    from pathlib import Path

    from ..errors import ConfigError

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"config file {path} is a folder: give the path of a YAML or JSON file (--config)")
    if not p.is_file():
        raise ConfigError(f"config file {path} does not exist")
    if p.suffix.lower() not in (".yaml", ".yml", ".json"):
        raise ConfigError(f"config file {path}: a config file is YAML (.yaml, .yml) or JSON (.json), "
                          f"told apart by its name's ending; rename it")
    data_bytes = p.read_bytes()
    try:
        text = data_bytes.decode("utf-8-sig")  # a byte-order mark, as some editors write, is not part of the text
    except UnicodeDecodeError as err:
        raise ConfigError(f"config file {path} is not UTF-8 text (byte 0x{data_bytes[err.start]:02x} at offset "
                          f"{err.start}): save it as UTF-8") from None
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text) or {}
    except Exception as err:
        raise ConfigError(f"config file {path} could not be parsed: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of option names to values")
    _check_names(data, f"config file {path}", "steps: 100")
    model = data.get("model")
    if model is not None and not isinstance(model, dict):
        raise ConfigError(f"config file {path}: `model:` must be a mapping of model options to values "
                          f"(e.g. `model: {{n_layers: 4, layer_norm_eps: 1.0e-5}}`), got {type(model).__name__} "
                          f"{model!r}")
    if model:
        _check_names(model, f"config file {path}, under `model:`,", "n_layers: 4")
    _check_known(data, model or {}, path)
    data = _underscored(data, f"config file {path}")  # `batch-size:` as on the command line
    if model:
        data["model"] = _underscored(model, f"config file {path}, under `model:`,")
    return data


# Command-line flags that a config file spells another way (or cannot hold), and how.
_FILE_SPELLINGS = {
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


def _check_known(data: dict, model: dict, path: str) -> None:
    """Every key of a config file (``data``, its ``model:`` mapping) is an option, as written or with ``-`` for ``_``.

    An unknown one is named as written, with what to write instead.
    """
    import dataclasses
    import difflib

    from ..errors import ConfigError
    from ..nn.model import GPTConfig
    from ..training.train import TrainConfig

    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    model_fields = {f.name for f in dataclasses.fields(GPTConfig)}

    def hint(name: str, known: set[str], other: set[str], other_place: str, other_where: str) -> str:
        if name in _FILE_SPELLINGS:
            return _FILE_SPELLINGS[name]
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
    from ..errors import ConfigError

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
    from ..errors import ConfigError

    bad = [k for k in mapping if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"{where} has keys that are not option names: {bad!r}; "
                          f"write option names such as `{example}`")


def train_config_from_args(args: argparse.Namespace) -> TrainConfig:
    """Merge defaults, the ``--config`` file and the command line (which wins)."""
    return _train_config(train_options_from_args(args), args)


def _train_config(options: dict, args: argparse.Namespace) -> TrainConfig:
    """``TrainConfig.from_dict(options)``; an error that the ``--config`` file causes names the file.

    The file is at fault where the command line alone gives a valid config: the message's
    ``(--lr)`` is then no option the user typed, and the file is where to look.
    """
    from ..errors import ConfigError
    from ..training.train import TrainConfig

    try:
        return TrainConfig.from_dict(options)
    except ConfigError as err:
        if not args.config:
            raise
        try:
            TrainConfig.from_dict(train_options_from_args(args, with_file=False))
        except ConfigError:
            raise err from None  # the command line is wrong on its own: its error stands as it is
        raise ConfigError(f"config file {args.config}: {err}") from err


def train_options_from_args(args: argparse.Namespace, with_file: bool = True) -> dict:
    """The training options the user set, in the ``--config`` file or on the command line (which wins)."""
    values: dict = load_config_file(args.config) if args.config and with_file else {}
    model = dict(values.pop("model", {}) or {})
    for name in _TRAIN_OPTIONS:
        v = getattr(args, name, None)
        if v is not None:
            values[name] = v
    for opt, fld in _MODEL_OPTIONS.items():
        v = getattr(args, opt, None)
        if v is not None:
            model[fld] = v
    if args.no_scale_attn:
        model["scale_attn"] = False
    if args.no_progress:
        values["progress"] = False
    if model:
        values["model"] = model
    return values


def _run_train(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc is the number of processes to launch: at least 1, got {args.nproc}")
    options = train_options_from_args(args)
    if isinstance(options.get("sample_prompt"), str):  # checked now, not at the first sample after training
        from ..data.tokenizer import check_utf8

        check_utf8(options["sample_prompt"], "--sample-prompt")
    if args.print_config:  # what would run, as a --config file holds it; nothing is trained or launched
        import yaml

        from ..training.train import resolved_options

        resolved = resolved_options(_train_config(options, args), set(options))
        print("# llmscratch train: the resolved options (defaults, then --config, then the command line); "
              "`llmscratch train --config FILE` runs them")
        print(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True, width=1000), end="")
        return 0
    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        from ..training.distributed import launch_torchrun, micro_batch_size

        cfg = _train_config(options, args)  # a bad option is reported once, here, not by every process
        if not cfg.resume:  # (a resumed run's batch is its own, read by each process)
            micro_batch_size(cfg.batch_size, cfg.grad_accum, args.nproc, cfg.micro_batch)
        return launch_torchrun(args.nproc, sys.argv[1:])
    from ..training.train import train

    run_dir = train(_train_config(options, args), given=set(options))  # it prints the closing sample, once
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"saved in {run_dir}  (generate more: llmscratch generate {run_dir} --prompt \"...\")")
    return 0


@command("train")
def _add_train(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train a GPT on a corpus (default: the built-in King James Bible)",
        description="Train a GPT. With no arguments: the built-in corpus, a 4096-token BPE and the `cpu` "
        "preset, sized to finish in about 4 minutes on a 2-core CPU. The run is saved in "
        "runs/<name>, with runs/latest pointing at the newest.",
    )
    g = p.add_argument_group("data")
    g.add_argument("--data", help="a text file, a folder of .txt files or a glob (default: built-in corpus)")
    g.add_argument("--encoding", help="text encoding of the corpus files (default utf-8)")
    g.add_argument("--val-fraction", type=float, help="fraction of the corpus tail held out for validation (default 0.1)")
    g.add_argument("--tokenizer", choices=["char", "bpe", "gpt2"], help="tokenizer kind (default bpe)")
    g.add_argument("--vocab-size", type=int, help="vocabulary size of a trained BPE tokenizer (default 4096)")
    g = p.add_argument_group("model")
    g.add_argument("--preset", help="model preset: cpu (default), cpu-wide, test, gpt2-124m, nanogpt-124m, gpt2-medium, …")
    g.add_argument("--n-layers", type=int, help="number of transformer blocks")
    g.add_argument("--n-heads", type=int, help="attention heads per block")
    g.add_argument("--emb-dim", type=int, help="embedding width C")
    g.add_argument("--context-length", type=int, help="tokens per training window")
    g.add_argument("--pos-emb", choices=["learned", "sinusoidal", "rope", "alibi", "none"], help="position embedding kind")
    g.add_argument("--activation", choices=["gelu", "relu2"], help="feed-forward nonlinearity (GPT-2: gelu)")
    g.add_argument("--dropout", type=float, help="dropout rate")
    g.add_argument("--attn-backend", choices=["fused", "explicit"], help="attention implementation")
    g.add_argument("--no-scale-attn", action="store_true", help="train without the 1/sqrt(d_head) score scaling")
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, help="optimizer steps (default 1400)")
    g.add_argument("--batch-size", type=int,
                   help="windows of --context-length tokens per step, times --grad-accum: a step trains on "
                   "batch-size × grad-accum windows, shared out over all processes (the log's \"windows per "
                   "step\") (default 16)")
    g.add_argument("--grad-accum", type=int,
                   help="multiplies the windows per step (batch-size × grad-accum); their gradients are added up "
                   "over micro-batches (--micro-batch) before each update (default 1)")
    g.add_argument("--micro-batch", type=int,
                   help="windows per forward pass on each process (default --batch-size); the global batch "
                   "stays batch-size × grad-accum and accumulation adapts to the number of processes")
    g.add_argument("--lr", type=float, help="peak learning rate (default 3e-3)")
    g.add_argument("--min-lr", type=float, help="learning rate at the end of the cosine decay (default 1e-4)")
    g.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 30)")
    g.add_argument("--weight-decay", type=float, help="decoupled weight decay on matrices (default 0.6)")
    g.add_argument("--beta1", type=float, help="AdamW's first-moment decay, for the parameters AdamW updates (default 0.8)")
    g.add_argument("--beta2", type=float, help="AdamW's second-moment decay (default 0.999)")
    g.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (default 1.0; 0: no clipping)")
    g.add_argument("--optimizer", choices=["muon", "adamw"],
                   help="muon (default): Muon on the blocks' weight matrices, AdamW on embeddings, head, gains "
                   "and biases; adamw: AdamW on everything (needed with --fsdp)")
    g.add_argument("--muon-momentum", type=float, help="Muon's momentum (default 0.9)")
    g = p.add_argument_group("evaluation and checkpoints")
    g.add_argument("--eval-interval", type=int, help="evaluate every N steps (default 350)")
    g.add_argument("--eval-windows", type=int, help="validation windows per evaluation during training (default 64)")
    g.add_argument("--log-interval", type=int, help="log the training loss every N steps (default 20): on the progress "
                   "bar, or as a line without one (--no-progress, or output not a terminal); always in metrics.jsonl")
    g.add_argument("--checkpoint-interval", type=int, help="save a checkpoint every N steps (default 700), and at the end")
    g.add_argument("--sample-tokens", type=int,
                   help="tokens of the sample text printed at each evaluation and once at the end (default 48; "
                   "0: none)")
    g.add_argument("--sample-prompt", help="prompt of the printed samples (default \"And God said\")")
    g = p.add_argument_group("runtime")
    g.add_argument("--device", help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    g.add_argument("--precision", choices=["auto", "fp32", "bf16", "fp16"], help="auto: bf16 on CUDA, fp32 on CPU")
    g.add_argument("--compile", action="store_const", const=True, help="torch.compile the model")
    g.add_argument("--loss", choices=["auto", "plain", "chunked", "kernel"],
                   help="how the head and loss are computed: plain (logits, then F.cross_entropy: the readable "
                        "path), chunked (fused, a chunk of tokens at a time), kernel (our Triton kernel on CUDA; on "
                        "the CPU its PyTorch reference); "
                        "auto (default): chunked on the CPU, kernel on CUDA with Triton, else plain")
    g.add_argument("--seed", type=int, help="random seed (default 1337)")
    g.add_argument("--time-budget", type=float,
                   help="seconds for the whole command, from its start (data preparation included) to its end: "
                   "training stops early enough that the checkpoint and the closing sample fit too (their time "
                   "estimated from this run's earlier ones); --resume continues")
    g.add_argument("--stop-at", type=int, help="stop (and save) at this step (at most --steps) as if interrupted; --resume continues")
    g.add_argument("--nproc", type=int, help="launch this many processes with torchrun (DDP) on this machine")
    g.add_argument("--fsdp", action="store_const", const=True,
                   help="under torchrun: shard weights, gradients and optimizer state with FSDP instead of DDP "
                   "(see docs/distributed.md)")
    g.add_argument("--dist-timeout", type=float,
                   help="under torchrun: seconds a process waits in a collective for the others before it gives "
                   "up and names the one that stopped answering (default 600); longer than any healthy wait, "
                   "such as rank 0 preparing the data while the others wait")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bar: the training loss is printed every --log-interval steps instead")
    g = p.add_argument_group("run directory")
    g.add_argument("--out-dir", help="parent folder of run directories (default runs)")
    g.add_argument("--name", help="run name (default: date and time)")
    g.add_argument("--resume", help="continue the run in this directory exactly where it stopped")
    g.add_argument("--init-from", help="start a new run from the weights of a run directory or Hugging Face GPT-2 directory")
    g.add_argument("--config", help="a YAML or JSON file of options; command-line options override it")
    g.add_argument("--print-config", action="store_true",
                   help="print the resolved options (defaults, --config and the command line merged; a --resume's "
                   "as the run would continue) as YAML that --config accepts, and exit without training")
