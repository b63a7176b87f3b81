"""``llmscratch …``: a thin command-line layer over the package's typed functions.

Each subcommand is a pair: ``_add_<name>(subparsers)`` declares its options (every option
has help text), ``_run_<name>(args)`` calls the library function that does the work.
Imports of heavy modules happen inside ``_run_*`` so ``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from typing import TYPE_CHECKING, Callable, Optional, Sequence

from .errors import LLMScratchError

if TYPE_CHECKING:
    from .train import TrainConfig

COMMANDS: dict[str, tuple[Callable, Callable]] = {}


def command(name: str) -> Callable[[Callable], Callable]:
    """Register ``_add_<name>`` / ``_run_<name>`` as a subcommand."""

    def wrap(add: Callable) -> Callable:
        run = globals()[add.__name__.replace("_add_", "_run_")]
        COMMANDS[name] = (add, run)
        return add

    return wrap


# --------------------------------------------------------------------------- explain


def _run_explain(args: argparse.Namespace) -> int:
    from .inspect import explain, explain_run

    from .errors import ConfigError
    from .tokenizer import check_utf8

    if args.max_values < 0:
        raise ConfigError(f"--max-values must be >= 0 (0: shapes only), got {args.max_values}")
    check_utf8(args.sentence, "the sentence")
    toy = {"--batch": args.batch, "--heads": args.heads, "--d-out": args.d_out, "--seed": args.seed,
           "--no-scale": args.no_scale or None}
    if args.run:
        given = [name for name, value in toy.items() if value is not None]
        if given:
            raise ConfigError(f"--run traces the run's own first attention layer, whose shape and weights are its "
                              f"own: {', '.join(given)} cannot apply; drop them")
        explain_run(args.run, args.sentence, max_values=args.max_values, out=sys.stdout)
        return 0
    explain(
        args.sentence, batch=1 if args.batch is None else args.batch, heads=2 if args.heads is None else args.heads,
        d_out=4 if args.d_out is None else args.d_out, seed=123 if args.seed is None else args.seed,
        scale=not args.no_scale, max_values=args.max_values, out=sys.stdout,
    )
    return 0


@command("explain")
def _add_explain(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "explain",
        help="print a step-by-step shape trace of causal multi-head attention",
        description="Trace one pass of causal multi-head self-attention, printing every tensor's "
        "name, shape and meaning (inputs → Q, K, V → heads → scores → mask → weights → context → output).",
    )
    p.add_argument("sentence", nargs="?", default="Your journey starts with one step",
                   help="the text to trace, one token per whitespace-separated word (default: the book's sentence)")
    p.add_argument("--batch", type=int, default=None,
                   help="batch size: the sentence, then its words rotated by 1, 2, ... (default 1)")
    p.add_argument("--heads", type=int, default=None, help="number of attention heads (default 2)")
    p.add_argument("--d-out", type=int, default=None, help="total output width, split across heads (default 4)")
    p.add_argument("--seed", type=int, default=None, help="seed for the projection weights (default 123)")
    p.add_argument("--run", metavar="RUN_DIR",
                   help="trace a trained model's first attention layer on its real tokens and weights")
    p.add_argument("--no-scale", action="store_true", help="leave out the 1/sqrt(d_k) scaling of the scores")
    p.add_argument("--max-values", type=int, default=144, metavar="N",
                   help="values to print: the scores, mask and weights as one T×T table per batch entry and "
                   "head whenever there are at most 16 tokens (however many elements they have), any other "
                   "tensor when it has at most N elements (default 144); 0 prints shapes only. Lines fit "
                   "the terminal's width ($COLUMNS; 100 when piped)")


# --------------------------------------------------------------------------- train

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

    from .errors import ConfigError

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

    from .errors import ConfigError
    from .model import GPTConfig
    from .train import TrainConfig

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
    from .errors import ConfigError

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
    from .errors import ConfigError

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
    from .errors import ConfigError
    from .train import TrainConfig

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
    from .errors import ConfigError

    if args.nproc is not None and args.nproc < 1:
        raise ConfigError(f"--nproc is the number of processes to launch: at least 1, got {args.nproc}")
    options = train_options_from_args(args)
    if isinstance(options.get("sample_prompt"), str):  # checked now, not at the first sample after training
        from .tokenizer import check_utf8

        check_utf8(options["sample_prompt"], "--sample-prompt")
    if args.print_config:  # what would run, as a --config file holds it; nothing is trained or launched
        import yaml

        from .train import resolved_options

        resolved = resolved_options(_train_config(options, args), set(options))
        print("# llmscratch train: the resolved options (defaults, then --config, then the command line); "
              "`llmscratch train --config FILE` runs them")
        print(yaml.safe_dump(resolved, sort_keys=False, allow_unicode=True, width=1000), end="")
        return 0
    if args.nproc and args.nproc > 1 and "LOCAL_RANK" not in os.environ:
        from .distributed import launch_torchrun, micro_batch_size

        cfg = _train_config(options, args)  # a bad option is reported once, here, not by every process
        if not cfg.resume:  # (a resumed run's batch is its own, read by each process)
            micro_batch_size(cfg.batch_size, cfg.grad_accum, args.nproc, cfg.micro_batch)
        return launch_torchrun(args.nproc, sys.argv[1:])
    from .train import train

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


# --------------------------------------------------------------------------- generate


def read_prompt_file(path: str) -> str:
    """The whole of a prompt file (``-``: standard input) as one prompt; a clear error if it cannot be read."""
    from pathlib import Path

    from .errors import ConfigError

    if path == "-":
        data, where = sys.stdin.buffer.read(), "standard input (--prompt-file -)"
    else:
        p = Path(path)
        if p.is_dir():
            raise ConfigError(f"--prompt-file {path} is a folder: give a text file (or - for standard input)")
        if not p.exists():
            raise ConfigError(f"--prompt-file {path} does not exist")
        try:  # a pipe, <(...) or /dev/stdin is read as a file is
            data, where = p.read_bytes(), f"--prompt-file {path}"
        except OSError as err:
            raise ConfigError(f"cannot read --prompt-file {path}: {err.strerror or err}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise ConfigError(f"{where} is not UTF-8 text (byte 0x{data[err.start]:02x} at offset {err.start}): "
                          f"save it as UTF-8") from None


def _run_generate(args: argparse.Namespace) -> int:
    from .checkpoint import load_run
    from .errors import ConfigError, LLMScratchError
    import dataclasses

    from .generate import SamplingConfig, choose_weight_layout, decodable_limit, generate_text, stream_text
    from .runtime import setup_runtime
    from .tokenizer import check_utf8

    if args.num_samples < 1:
        raise ConfigError(f"--num-samples must be at least 1, got {args.num_samples}")
    if args.greedy and args.temperature is not None:  # (--top-k and --top-p agree with it: the top token is in both)
        raise ConfigError(f"--greedy is temperature 0 (always the most likely token), so --temperature "
                          f"{args.temperature} contradicts it: give one of them")
    for stop in args.stop or []:
        check_utf8(stop, f"--stop {stop!r}")
    # The sampling options are checked now, before the run is loaded; the tokenizer's ids come later.
    sampling = SamplingConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=0.0 if args.greedy else 0.8 if args.temperature is None else args.temperature,
        top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        repetition_penalty=args.repetition_penalty, stop=tuple(args.stop or ()),
    )
    given = args.prompts or [("--prompt", "")]  # (option, value) in command-line order
    if given.count(("--prompt-file", "-")) > 1:
        raise ConfigError("--prompt-file - reads standard input, which holds one prompt: give it once")
    texts = [read_prompt_file(value) if option == "--prompt-file" else value for option, value in given]
    for i, (option, text) in enumerate(given):  # a file's text was decoded as UTF-8 already
        if option == "--prompt":
            check_utf8(text, "--prompt" + (f" (prompt {i + 1})" if len(given) > 1 else ""))
    # How an error names each prompt.
    named = [f"--prompt-file {value}" if option == "--prompt-file" else
             f"--prompt {value!r}" if len(value) <= 30 else f"--prompt {value[:27]!r}..." for option, value in given]
    runtime = setup_runtime(args.device, "fp32" if args.device in (None, "auto", "cpu") else "auto")
    model, tokenizer, _ = load_run(args.run_dir, device=runtime.device, need_tokenizer="the prompt")
    # One row per prompt and sample, prompt by prompt: row i samples with seed + i, so each row
    # prints exactly what a run of its prompt alone with --seed (seed + i) prints.
    rows = [(p, text, n) for p, text in enumerate(texts) for n in range(args.num_samples)]
    if not args.no_cache:  # on a CPU: each weight shape stored or packed the way decoding multiplies it fastest (timed)
        choose_weight_layout(model, rows=len(rows))
    empty = [tokenizer.eot_id if tokenizer.eot_id is not None else 0]  # an empty prompt starts from end-of-text
    encoded = []
    for text, name in zip(texts, named):
        try:
            encoded.append(tokenizer.encode(text) or empty)
        except LLMScratchError as err:
            raise LLMScratchError(f"{name}{f' (prompt {len(encoded) + 1})' if len(texts) > 1 else ''}: {err}; "
                                  f"leave those characters out") from None
    prompts = [encoded[p] for p, _, _ in rows]
    sampling = dataclasses.replace(sampling, eos_id=None if args.ignore_eos else tokenizer.eot_id,
                                   vocab_limit=decodable_limit(tokenizer.vocab_size, model.cfg.vocab_size))
    if len(rows) > 1:  # one batch (prompts of different lengths are left-padded), printed when all are done
        outputs = generate_text(model, prompts, sampling, tokenizer.decode, use_cache=not args.no_cache)
        for i, ((p, text, n), new_text) in enumerate(zip(rows, outputs)):
            label = [f"prompt {p + 1}"] if len(texts) > 1 else []
            label += [f"sample {n + 1}"] if args.num_samples > 1 else []
            print(f"--- {', '.join(label)} (seed {args.seed + i}) ---")
            print(text + new_text)
        return 0
    sys.stdout.write(texts[0])
    # Text as it becomes safe to show: never half a character, never any of a stop string.
    for piece in stream_text(model, prompts[0], sampling, tokenizer.decode, use_cache=not args.no_cache):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


@command("generate")
def _add_generate(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="generate text from a trained or imported run, streaming",
                       description="Generate text from a run directory, printing tokens as they come. Several "
                                   "prompts (--prompt and --prompt-file, each as often as needed) or --num-samples "
                                   "above 1 decode as one batch, printed when all rows are done.")
    p.add_argument("run_dir", help="a run directory (from `llmscratch train` or `llmscratch import`)")
    # Both options add to one list, so that the prompts keep the order they were given in.
    p.add_argument("--prompt", action="append", dest="prompts", type=lambda v: ("--prompt", v), metavar="TEXT",
                   help="text to continue; give it again for more prompts in one batch (none: the text "
                        "starts from the end-of-text token, as GPT-2's unconditional samples)")
    p.add_argument("--prompt-file", action="append", dest="prompts", type=lambda v: ("--prompt-file", v),
                   metavar="PATH", help="a UTF-8 file whose whole text is one prompt (- reads standard input); "
                                        "may be repeated; prompts are numbered in the order given")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate (default 200)")
    p.add_argument("--temperature", type=float, default=None, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument("--top-k", type=int, default=None, help="sample only among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample from the smallest set of tokens with this probability mass")
    p.add_argument("--repetition-penalty", type=float, default=1.0, metavar="P",
                   help="make tokens already in the text (prompt included) less likely, as Hugging Face transformers "
                        "does: their logits are divided by P (multiplied if negative); above 1 discourages repeats, "
                        "e.g. 1.2 (default 1.0: off)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="end a row when its text contains TEXT, which is not printed; give it again for more stop "
                        "strings (default: none; a newline in bash: --stop $'\\n')")
    p.add_argument("--greedy", action="store_true", help="always take the most likely token (temperature 0)")
    p.add_argument("--seed", type=int, default=1337,
                   help="random seed (default 1337); row i of a batch (prompt by prompt, sample by sample) uses seed + i")
    p.add_argument("--num-samples", type=int, default=1,
                   help="how many samples to draw of each prompt, in one batch (printed when all are done)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    p.add_argument("--no-cache", action="store_true", help="recompute the whole window every step (no KV cache)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")


# --------------------------------------------------------------------------- info


def _run_info(args: argparse.Namespace) -> int:
    from .runs import format_runs, is_runs_folder, list_runs
    from .train import describe_run

    if is_runs_folder(args.run_dir):  # the folder of runs itself (runs/): the listing of `llmscratch runs`
        print(format_runs(list_runs(args.run_dir), args.run_dir))
        return 0
    print(describe_run(args.run_dir))
    return 0


@command("info")
def _add_info(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="print a run's config, size, training progress and best validation numbers",
                       description="Describe a run directory: model config, parameter count, tokenizer, "
                       "training progress and the best validation numbers. Given the folder of runs "
                       "(runs/), list its runs as `llmscratch runs` does.")
    p.add_argument("run_dir", help="a run directory (or the folder of runs, to list them)")


# --------------------------------------------------------------------------- runs


def _run_runs(args: argparse.Namespace) -> int:
    from .runs import format_runs, list_runs

    print(format_runs(list_runs(args.folder), args.folder))
    return 0


@command("runs")
def _add_runs(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("runs", help="list the runs in a folder: step, best validation bits per byte, size, date",
                       description="List the runs saved in FOLDER, one line each: name, step (of the steps asked "
                       "for), best validation bits per byte, size on disk and when it was last saved; `latest` is "
                       "marked, and a folder that is not a run says what it is.")
    p.add_argument("folder", nargs="?", default="runs", metavar="FOLDER",
                   help="the folder of runs (train's --out-dir; default runs)")


# --------------------------------------------------------------------------- eval


def _run_eval(args: argparse.Namespace) -> int:
    from .train import evaluate_text

    result = evaluate_text(args.run_dir, args.data, encoding=args.encoding, device=args.device,
                           batch_size=args.batch_size)
    print(f"{result['tokens']:,} tokens, {result['bytes']:,} bytes: loss {result['loss']:.4f}, "
          f"perplexity {result['ppl']:.2f}, {result['bpb']:.4f} bits per byte")
    return 0


@command("eval")
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="loss, perplexity and bits per byte of a run on any text",
                       description="Evaluate a run on a text file, folder or glob: every window of the "
                       "text, cross-entropy loss, perplexity and bits per byte.")
    p.add_argument("run_dir", help="a run directory")
    p.add_argument("--data", required=True, help="a text file, a folder of .txt files or a glob")
    p.add_argument("--encoding", default="utf-8", help="text encoding (default utf-8)")
    p.add_argument("--batch-size", type=int, default=16, help="windows per forward pass (default 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")


# --------------------------------------------------------------------------- import / export


def _run_import(args: argparse.Namespace) -> int:
    from .checkpoint import import_checkpoint

    import_checkpoint(
        args.source, args.run_dir, heads=args.heads, preset=args.preset, tokenizer_dir=args.tokenizer_dir,
        no_tokenizer=args.no_tokenizer, overwrite=args.force, log=print,
    )
    return 0


@command("import")
def _add_import(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "import", help="turn Hugging Face GPT-2 or book weights into a run directory",
        description="Import weights into a run directory (config.json, model.safetensors, tokenizer). "
        "SOURCE is a Hugging Face GPT-2 directory (config.json + model.safetensors or pytorch_model.bin, "
        "save_pretrained's layout or the hub's), a state-dict file (.pt/.pth) of the book's GPTModel, or "
        "gpt2 / gpt2-medium / gpt2-large / gpt2-xl (downloaded from the hub where the network is reachable).",
    )
    p.add_argument("source",
                   help="a Hugging Face directory, a book .pt/.pth file, or gpt2/gpt2-medium/gpt2-large/gpt2-xl")
    p.add_argument("run_dir", help="the run directory to create")
    p.add_argument("--heads", type=int, default=None,
                   help="number of attention heads (book format only: it is not stored in the weights)")
    p.add_argument("--preset", default=None,
                   help="model preset whose head count and dropout to use for a book file, e.g. gpt2-124m")
    p.add_argument("--tokenizer-dir", default=None,
                   help="folder with GPT-2's tokenizer files (vocab.bpe + encoder.json or merges.txt + vocab.json) "
                   "for a book file; default $LLMSCRATCH_GPT2_DIR, then tiktoken's cache")
    p.add_argument("--no-tokenizer", action="store_true",
                   help="import the weights even where no tokenizer is found (the run cannot take text prompts)")
    p.add_argument("--force", action="store_true", help="overwrite a run directory that already holds a model")


def _run_export(args: argparse.Namespace) -> int:
    from .checkpoint import export_checkpoint

    export_checkpoint(args.run_dir, args.out, args.format, log=print)
    return 0


@command("export")
def _add_export(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="write a run's model as Hugging Face GPT-2 or as the book's state dict",
        description="Export a run's weights: --format hf writes a directory that "
        "transformers.GPT2LMHeadModel.from_pretrained loads (with the run's GPT-2 tokenizer files); "
        "--format book writes one torch.save file for the book's GPTModel (mask buffers included); "
        "--format run writes an ordinary run directory (an --fsdp run's sharded checkpoint made whole).",
    )
    p.add_argument("run_dir", help="the run directory to export")
    p.add_argument("out", help="output: a directory for --format hf and --format run, a file (e.g. model.pth) "
                   "for --format book; never an existing file or a non-empty directory")
    p.add_argument("--format", choices=("hf", "book", "run"), default="hf",
                   help="output format (default hf); run: an ordinary run directory, consolidated from the "
                   "sharded checkpoint of an --fsdp run")


# --------------------------------------------------------------------------- attention


def _run_attention(args: argparse.Namespace) -> int:
    from pathlib import Path

    from .checkpoint import load_run
    from .inspect import attention_maps, write_attention_outputs
    from .runtime import setup_runtime
    from .tokenizer import check_utf8

    check_utf8(args.prompt, "--prompt")
    runtime = setup_runtime(args.device, "fp32")
    model, tokenizer, _ = load_run(args.run_dir, device=runtime.device)
    maps = attention_maps(model, tokenizer, args.prompt)
    out = Path(args.out) if args.out else Path(args.run_dir) / "attention"
    written = write_attention_outputs(maps, out, layers=args.layer, heads=args.head, html_page=args.html,
                                      json_file=args.json, title=f"Attention of {args.run_dir} on {args.prompt!r}")
    print(f"{len(maps.tokens)} tokens, {maps.n_layers} layers × {maps.n_heads} heads; wrote:")
    for path in written:
        print(f"  {path}")
    return 0


@command("attention")
def _add_attention(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "attention", help="draw what a trained or imported model attends to, for one prompt",
        description="Run a model on a prompt and write its attention weights: grid.png (layers × heads, "
        "token labels on both axes), one PNG per chosen --layer/--head, and on request a self-contained "
        "HTML page (--html) and bertviz head_view JSON (--json).",
    )
    p.add_argument("run_dir", help="a run directory (from `llmscratch train` or `llmscratch import`)")
    p.add_argument("--prompt", required=True, help="the text whose attention to show (at most the model's context)")
    p.add_argument("--out", default=None, help="folder for the outputs (default RUN_DIR/attention)")
    p.add_argument("--layer", type=int, nargs="+", default=None,
                   help="layer(s) to draw one large PNG per head for (with --head: only those heads)")
    p.add_argument("--head", type=int, nargs="+", default=None,
                   help="head(s) to draw one large PNG each for (with --layer: in those layers; else in every layer)")
    p.add_argument("--html", action="store_true",
                   help="also write attention.html, opening on the first --layer and --head given: pick a layer "
                   "and head, hover or click a token (or use the keyboard); works offline from disk")
    p.add_argument("--json", action="store_true",
                   help='also write attention.json: {"tokens", "attention": per layer (1, heads, T, T)}, bertviz\'s layout')
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda, mps")


# --------------------------------------------------------------------------- experiment


def _run_experiment(args: argparse.Namespace) -> int:
    from .errors import ConfigError
    from .experiments import NAMES, run_experiment, summaries

    if args.list:
        width = max(map(len, NAMES))
        for name, summary in summaries().items():
            print(f"{name:<{width}}  {summary}")
        return 0
    if args.name is None:
        raise ConfigError(f"name an experiment ({', '.join(NAMES)}) or pass --list")
    if args.quick and args.tiny:
        raise ConfigError("--quick and --tiny are two sizes: pick one")
    if args.seed is not None and not 0 <= args.seed < 2**32:
        raise ConfigError(f"--seed must be in [0, 2**32), as NumPy's seed, got {args.seed}")
    mode = "quick" if args.quick else "tiny" if args.tiny else "full"
    report = run_experiment(args.name, mode, args.out, device=args.device, seed=args.seed, data=args.data,
                            encoding=args.encoding)
    folder = f"{args.out}/{args.name}"
    for table in report.tables:
        print(table.markdown() + "\n")
    print("findings:")
    for finding in report.findings:
        print(f"- {finding}")
    print(f"\nreport: {folder}/report.md  (results.json and the plots beside it)")
    return 0


@command("experiment")
def _add_experiment(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "experiment", help="run one of the attention experiments (scaling, positions, heads, batching)",
        description="Train a few small models that differ in one thing and write OUT/NAME/report.md, "
        "results.json and PNG plots. The default size is meant for a GPU; --quick takes a few minutes on a "
        "2-core CPU; --tiny takes seconds (for tests).",
    )
    p.add_argument("name", nargs="?", default=None, help="the experiment: scaling, positions, heads or batching")
    p.add_argument("--list", action="store_true", help="list the experiments, one line each")
    p.add_argument("--quick", action="store_true", help="small models and short training: a few minutes on a CPU")
    p.add_argument("--tiny", action="store_true", help="a synthetic corpus and a few steps: seconds (smoke test)")
    p.add_argument("--out", default="experiments", help="parent folder of the reports (default experiments)")
    p.add_argument("--device", default="auto", help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N, mps")
    p.add_argument("--seed", type=int, default=1337, help="random seed (default 1337)")
    p.add_argument("--data", default=None, help="a text file, folder or glob to use instead of the built-in corpus")
    p.add_argument("--encoding", default="utf-8", help="text encoding of the --data files (default utf-8)")


# --------------------------------------------------------------------------- bench


def _run_bench(args: argparse.Namespace) -> int:
    import torch

    from . import bench
    from .errors import ConfigError
    from .model import GPTConfig
    from .runtime import resolve_precision, setup_runtime

    counts = {"--batch": args.batch, "--steps": args.steps, "--repeats": args.repeats, "--new-tokens": args.new_tokens,
              "--context": args.context, "--threads": args.threads,
              "--decode-batches": min(args.decode_batches, default=None)}
    for option, value in counts.items():  # before anything is measured: no traceback, no half table
        if value is not None and value < 1:
            raise ConfigError(f"{option} must be at least 1, got {value}")
    if args.json:
        bench.check_json_path(args.json)
    if args.threads:
        torch.set_num_threads(args.threads)
    runtime = setup_runtime(args.device, "fp32" if args.device == "cpu" else "auto")
    device = runtime.device
    precision = resolve_precision(args.precision, device)
    cfg = GPTConfig.from_preset(args.preset, drop_rate=0.0)
    context = args.context or cfg.context_length
    if args.what in ("decode", "all") and cfg.pos_emb == "learned" and 8 + args.new_tokens > cfg.context_length:
        raise ConfigError(f"--new-tokens {args.new_tokens} and the 8-token prompt do not fit the {cfg.context_length}-"
                          f"token context of preset {args.preset} (learned positions): give --new-tokens "
                          f"{cfg.context_length - 8} or less")
    peers = bench.available_peers() if args.peers else []
    compile_ = device.type == "cuda" if args.compile is None else args.compile
    record: dict = {"environment": bench.environment(device), "preset": args.preset, "batch": args.batch,
                    "context": context, "precision": precision, "peers": peers}
    print(f"llmscratch bench on {record['environment']['device']} (torch {torch.__version__}), preset "
          f"{args.preset}, batch {args.batch}, context {context}, {precision}, peers: {', '.join(peers) or 'none'}")
    what = args.what
    if what in ("attention", "all"):
        shape = (args.batch, cfg.n_heads, context, cfg.head_dim)
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
        rows = bench.bench_attention(device, *shape, dtype=dtype, repeats=args.repeats)
        record["attention"] = rows
        print(f"\nattention op, B {shape[0]}, {bench.count(shape[1], 'head')}, T {shape[2]}, d {shape[3]}, causal, "
              f"{precision}, fwd+bwd:")
        print(bench.format_attention(rows))
        if args.json:  # after every section's table, so a run cut short or a failed write keeps it
            bench.write_json(args.json, record)
    if what in ("train", "all"):
        names = ["ours"] + [p for p in peers if p in bench.PEERS]
        rows = bench.bench_train(cfg, device, args.batch, context, precision, names, compile=compile_,
                                 steps=args.steps, repeats=args.repeats, loss_impl=args.loss)
        record["train"] = rows
        record["peak_tflops_measured"] = bench.measure_peak_tflops(device) if device.type == "cuda" else None
        print(f"\ntraining, {args.preset}, batch {args.batch}, context {context}, {precision}, AdamW "
              f"(median of {bench.count(args.repeats, 'run')} of {bench.count(args.steps, 'step')}):")
        print(bench.format_train(rows))
        if args.json:  # after every section's table, so a run cut short or a failed write keeps it
            bench.write_json(args.json, record)
    if what in ("decode", "all"):
        decode_peers = [p for p in ("book", "hf") if args.peers and
                        (p == "hf" and "hf" in peers or p != "hf" and "book" in peers)]
        rows = bench.bench_decode(cfg, device, batches=tuple(args.decode_batches), new_tokens=args.new_tokens,
                                  repeats=args.repeats, peers=decode_peers)
        record["decode"] = rows
        print(f"\ngreedy decoding, {args.preset}, prompt 8 tokens, {bench.count(args.new_tokens, 'new token')} "
              f"(median of {bench.count(args.repeats, 'run')}):")
        print(bench.format_decode(rows))
        if args.json:  # after every section's table, so a run cut short or a failed write keeps it
            bench.write_json(args.json, record)
    if args.json:
        bench.write_json(args.json, record)
        print(f"\nwrote {args.json}")
    return 0


@command("bench")
def _add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="measure training throughput and MFU, decode speed and the attention op",
        description="Benchmark llmscratch on this device with random weights and tokens, and the peers "
        "(the book's GPTModel/GPTModelFast, transformers' GPT-2) in the same run with --peers. "
        "Prints tables; --json writes every number with the date, device and versions.",
    )
    p.add_argument("what", nargs="?", default="all", choices=["train", "decode", "attention", "all"],
                   help="what to measure (default all)")
    p.add_argument("--preset", default="cpu", help="model preset, e.g. cpu (default), nanogpt-124m, gpt2-124m")
    p.add_argument("--batch", type=int, default=16, help="training (and attention) batch size (default 16)")
    p.add_argument("--context", type=int, default=None, help="training context length (default: the preset's)")
    p.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16", "fp16"],
                   help="precision of training and of the attention op (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--peers", action="store_true", help="also measure the installed peers, reported as ratios")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="also train a torch.compile'd llmscratch model (default: on CUDA only)")
    p.add_argument("--steps", type=int, default=5, help="training steps per timed run (default 5)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default 3)")
    p.add_argument("--loss", default="auto", choices=["auto", "plain", "chunked", "kernel"],
                   help="how our model computes the head and loss in training (as in `llmscratch train --loss`)")
    p.add_argument("--new-tokens", type=int, default=200, help="tokens to decode (default 200)")
    p.add_argument("--decode-batches", type=int, nargs="+", default=[1, 8], help="decode batch sizes (default 1 8)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, metavar="OUT", help="write all results as JSON to this file")


def _version() -> str:
    """``llmscratch 0.1.0 (torch 2.13.0+cpu, Python 3.11.7)``: what a bug report needs, without importing torch."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    from . import __version__

    try:
        torch_version = version("torch")
    except PackageNotFoundError:
        torch_version = "not installed"
    return f"llmscratch {__version__} (torch {torch_version}, Python {platform.python_version()})"


def build_parser() -> argparse.ArgumentParser:
    """The ``llmscratch`` argument parser, one subcommand per ``@command`` registered above."""
    parser = argparse.ArgumentParser(
        prog="llmscratch",
        description="A GPT-style language model from first principles: attention, training, generation, inspection.",
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for add, _ in COMMANDS.values():
        add(sub)
    return parser


def _rank_tag() -> str:
    """`` (rank 1 of 2)`` in a process of a torchrun job, so that each rank's error says whose it is."""
    world = os.environ.get("WORLD_SIZE", "1")
    return f" (rank {os.environ.get('RANK', '?')} of {world})" if world.isdigit() and int(world) > 1 else ""


# What makes each command need less memory, for the out-of-memory message.
_SMALLER = {
    "train": "a smaller model (--preset test or cpu, --emb-dim, --n-layers, --context-length, --vocab-size) "
             "or fewer windows per forward pass (--micro-batch, --batch-size)",
    "explain": "a smaller --d-out, a smaller --batch or a shorter sentence",
    "generate": "fewer --num-samples or --max-new-tokens, or a smaller model",
    "attention": "a shorter --prompt, or a smaller model",
    "eval": "a smaller --batch-size",
    "bench": "a smaller --batch, --context, --decode-batches or --preset",
    "experiment": "--quick or --tiny",
}
# The CPU allocator's message (c10/core/impl/alloc_cpu.cpp): "... DefaultCPUAllocator: can't allocate memory: you
# tried to allocate 12000000000000 bytes. Error code 12 (Cannot allocate memory)".
_CPU_OOM = re.compile(r"DefaultCPUAllocator: can't allocate memory: you tried to allocate (\d+) bytes")


def _out_of_memory(err: BaseException, command: str) -> Optional[str]:
    """The one-line message for ``err`` if it means the device ran out of memory, else None.

    ``torch.OutOfMemoryError`` (CUDA; ``torch.cuda.OutOfMemoryError`` before torch 2.5), the CPU
    allocator's RuntimeError (matched by its message; no other RuntimeError) and MemoryError.
    """
    torch = sys.modules.get("torch")  # an error from torch means torch was imported
    oom_types: tuple = (MemoryError,)
    if torch is not None:
        oom_types += tuple(t for t in (getattr(torch, "OutOfMemoryError", None),
                                       getattr(getattr(torch, "cuda", None), "OutOfMemoryError", None)) if t)
    cpu = _CPU_OOM.search(str(err)) if isinstance(err, RuntimeError) else None
    if not (cpu or isinstance(err, oom_types)):
        return None
    if cpu:
        where = f"the CPU (one allocation of {int(cpu.group(1)) / 2**30:,.1f} GiB failed)"
    elif isinstance(err, MemoryError):
        where = "the CPU"
    else:  # "CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of ..."
        tried = re.search(r"Tried to allocate ([\d.]+ \w+)", str(err))
        where = "the GPU" + (f" (one allocation of {tried.group(1)} failed)" if tried else "")
    smaller = _SMALLER.get(command, "a smaller model")
    return f"out of memory on {where}: the sizes asked for do not fit this machine; try {smaller}"


def _one_line_warnings(command: str) -> Callable[..., None]:
    """Show this package's own warnings (a damaged cache rebuilt, say) as one line, as errors are
    shown; other libraries' keep Python's format. Returns the handler it replaced."""
    import warnings

    package = os.path.dirname(os.path.abspath(__file__)) + os.sep
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        if os.path.abspath(filename).startswith(package):
            print(f"llmscratch {command}: warning: {message}", file=file or sys.stderr)
        else:
            previous(message, category, filename, lineno, file, line)

    warnings.showwarning = show
    return previous


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one subcommand and return its exit status: bad input gives a one-line error and 2, not a traceback."""
    import warnings

    parser = build_parser()
    args = parser.parse_args(argv)
    _, run = COMMANDS[args.command]
    previous_warnings = _one_line_warnings(args.command)
    try:
        return int(run(args) or 0)
    except KeyboardInterrupt as err:  # Ctrl-C; or errors.Stopped, which training raises for SIGTERM too
        signum = getattr(err, "signum", signal.SIGINT)
        if not getattr(err, "saved", False):  # a training run that saved has said where
            print("interrupted" if signum == signal.SIGINT else "terminated", file=sys.stderr)
        return 128 + signum  # as a shell reports a command that the signal ended: 130, 143
    except LLMScratchError as err:  # bad input: a clear message, no traceback
        print(f"llmscratch {args.command}{_rank_tag()}: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # output piped into `head` and the like: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except OSError as err:  # a path that is a file, a full disk, no permission: the OS names the file
        print(f"llmscratch {args.command}: error: {err}", file=sys.stderr)
        return 2
    except (RuntimeError, MemoryError) as err:  # sizes too large for memory: 2, as for other sizes the user chose
        message = _out_of_memory(err, args.command)
        if message is None:
            raise  # any other RuntimeError is a bug: keep its traceback
        print(f"llmscratch {args.command}{_rank_tag()}: error: {message}", file=sys.stderr)
        return 2
    finally:
        warnings.showwarning = previous_warnings


if __name__ == "__main__":
    sys.exit(main())
