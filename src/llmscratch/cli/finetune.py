"""``llmscratch finetune RUN --task instruct|classify --data FILE``: a new run fine-tuned from RUN.

The options every task shares are declared here (the run, the data, steps or epochs, the
optimizer, what learns: ``--train all|last-block|lora``); each task adds its own and runs
through ``training/finetune.py``: instructions from ``training/instruct.py``, classes from
``cli/finetune_classify.py`` (imported lazily, only for ``--task classify``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from .commands import command

# (dest, default) of the shared options: what FinetuneOptions gets when the user gave them.
_SHARED = ("data", "out_dir", "name", "steps", "epochs", "lr", "min_lr", "warmup_steps", "weight_decay", "grad_clip",
           "batch_size", "grad_accum", "micro_batch", "seed", "device", "precision", "train", "lora_rank",
           "lora_alpha", "lora_dropout", "lora_targets", "eval_every", "eval_batches", "log_every",
           "checkpoint_every", "resume", "time_budget", "stop_at")
# The instruction task's own options (saved in finetune.json's options.extra).
_INSTRUCT = ("val_data", "test_data", "template", "mask_prompt", "max_new_tokens", "test_limit", "judge",
             "judge_model", "val_fraction", "test_fraction")


def options_from_args(args: argparse.Namespace) -> tuple[Any, set[str]]:
    """``FinetuneOptions`` from the parsed arguments, and the names of the options given."""
    from ..training.finetune import FinetuneOptions

    values = {k: getattr(args, k) for k in _SHARED if getattr(args, k, None) is not None}
    if args.no_progress:
        values["progress"] = False
    extra = {k: getattr(args, k) for k in _INSTRUCT if getattr(args, k, None) is not None}
    given = set(values) | {f"extra.{k}" for k in extra}
    if args.task == "instruct":
        from ..training.instruct import INSTRUCT_DEFAULTS

        extra = {**INSTRUCT_DEFAULTS, **extra}
    return FinetuneOptions(task=args.task, base=args.run, extra=extra, **values), given


def _task(args: argparse.Namespace) -> str:
    """The task asked for; with ``--resume`` and no ``--task``, the one the run was fine-tuned for."""
    from ..errors import ConfigError
    from ..training.finetune import read_finetune_file

    if args.resume is None:
        return args.task or "instruct"
    recorded = read_finetune_file(args.resume).get("task", "instruct")
    if args.task is not None and args.task != recorded:
        raise ConfigError(f"--resume {args.resume}: that run was fine-tuned with --task {recorded}, "
                          f"not --task {args.task}; drop --task to continue it")
    return recorded


def _run_finetune(args: argparse.Namespace) -> int:
    from ..errors import ConfigError

    if args.run is not None and args.resume is not None:
        raise ConfigError("give the run to fine-tune (RUN) or --resume RUN_DIR, not both")
    args.task = _task(args)
    opts, given = options_from_args(args)
    if args.task == "classify":
        from .finetune_classify import run_classify

        run_dir = run_classify(args, opts, given)
    else:
        from ..training.instruct import finetune_instruct

        run_dir = finetune_instruct(opts, given=given)
    if args.task == "classify":
        print(f"saved in {run_dir}  (try it: llmscratch classify {run_dir} \"...\")")
    else:
        print(f"saved in {run_dir}  (try it: llmscratch generate {run_dir} --chat \"...\")")
    return 0


@command("finetune")
def _add_finetune(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "finetune", help="fine-tune a run on instructions (--task instruct) or classes (--task classify)",
        description="Fine-tune RUN (a run directory, or one made by `llmscratch import`) into a new run "
        "directory that generate, chat, serve, export and eval use like any other; it records its base run "
        "in finetune.json. Ctrl-C saves a checkpoint; --resume continues it.")
    p.add_argument("run", nargs="?", help="the run to start from (omit with --resume)")
    p.add_argument("--task", choices=("instruct", "classify"), default=None,
                   help="instruct: follow instructions (Alpaca JSON/JSONL or chat JSONL); classify: label texts "
                   "(default instruct; with --resume, the run's own task)")
    data = p.add_argument_group("data")
    data.add_argument("--data", help="the training examples (the task says the format)")
    run = p.add_argument_group("run directory")
    run.add_argument("--out-dir", help="parent folder of the new run (default runs)")
    run.add_argument("--name", help="the new run's name (default: date and time)")
    run.add_argument("--resume", help="continue this fine-tuning run where its last checkpoint stopped")
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--steps", type=int, help="optimizer steps (instead of --epochs)")
    opt.add_argument("--epochs", type=float, help="passes over the training examples (default 1)")
    opt.add_argument("--lr", type=float, help="learning rate, constant after the warmup (default 5e-5; 5e-4 "
                     "with --train lora)")
    opt.add_argument("--min-lr", type=float, help="decay to this learning rate by the end (cosine; default: none)")
    opt.add_argument("--warmup-steps", type=int, help="linear warmup steps (default 0)")
    opt.add_argument("--weight-decay", type=float, help="AdamW's decoupled weight decay on matrices (default 0.1)")
    opt.add_argument("--grad-clip", type=float, help="clip the gradient norm to this (0: none; default 1)")
    opt.add_argument("--batch-size", type=int, help="examples per step, padded to the longest (default 8)")
    opt.add_argument("--grad-accum", type=int, help="multiplies the examples per step (default 1)")
    opt.add_argument("--micro-batch", type=int, help="examples per forward pass (default --batch-size)")
    opt.add_argument("--seed", type=int, help="random seed: the split, the batches (default 123)")
    what = p.add_argument_group("what learns")
    what.add_argument("--train", choices=("all", "last-block", "lora"),
                      help="all weights; the last block and final norm; or LoRA adapters (default all)")
    what.add_argument("--lora-rank", type=int, help="rank of the LoRA adapters (default 16)")
    what.add_argument("--lora-alpha", type=float, help="LoRA's scale numerator: updates scaled by alpha/rank "
                      "(default 16)")
    what.add_argument("--lora-dropout", type=float, help="dropout on the adapters' input (default 0)")
    what.add_argument("--lora-targets", help="comma-separated layers to adapt: query, key, value, qkv, out, "
                      "mlp_in, gate, up, mlp_out (default query,value)")
    ev = p.add_argument_group("evaluation and checkpoints")
    ev.add_argument("--eval-every", type=int, help="held-out loss every N steps (default 50)")
    ev.add_argument("--eval-batches", type=int, help="validation batches per evaluation during training "
                    "(default 5; the whole split before and after)")
    ev.add_argument("--log-every", type=int, help="log the training loss every N steps (default 10)")
    ev.add_argument("--checkpoint-every", type=int, help="save a checkpoint every N steps, and at the end "
                    "(default 500)")
    rt = p.add_argument_group("runtime")
    rt.add_argument("--device", help="auto, cpu, cuda, cuda:N, mps (default auto)")
    rt.add_argument("--precision", choices=("auto", "fp32", "bf16", "fp16"), help="(default auto)")
    rt.add_argument("--time-budget", type=float, help="seconds for the whole command; stops early, saved")
    rt.add_argument("--stop-at", type=int, help="stop (and save) at this step as if interrupted")
    rt.add_argument("--no-progress", action="store_true", help="no progress bar: log lines instead")
    inst = p.add_argument_group("--task instruct")
    inst.add_argument("--val-data", help="validation examples (default: 5%% of --data, seeded)")
    inst.add_argument("--test-data", help="test examples (default: 10%% of --data, seeded)")
    inst.add_argument("--val-fraction", type=float, help="share of --data held out for validation (default 0.05)")
    inst.add_argument("--test-fraction", type=float, help="share of --data held out for testing (default 0.1)")
    inst.add_argument("--template", choices=("auto", "alpaca", "model"),
                      help="prompt format: the book's Alpaca template, or the model's own chat template; auto: "
                      "the model's where it has one (default auto)")
    inst.add_argument("--mask-prompt", dest="mask_prompt", action="store_const", const=True,
                      help="learn the responses only: prompt tokens are left out of the loss (the default)")
    inst.add_argument("--no-mask-prompt", dest="mask_prompt", action="store_const", const=False,
                      help="learn the prompt tokens too, as the book's chapter 7 does")
    inst.add_argument("--max-new-tokens", type=int, help="longest test response generated (default 256)")
    inst.add_argument("--test-limit", type=int, help="generate responses for the first N test examples only "
                      "(default: all)")
    inst.add_argument("--judge", help="score the test responses 0-100 with the book's prompt at this "
                      "OpenAI-compatible URL (e.g. http://localhost:11434/v1 for Ollama, or `llmscratch serve`)")
    inst.add_argument("--judge-model", help="the judge's model name (default llama3)")
    try:
        from .finetune_classify import add_classify_options

        add_classify_options(p.add_argument_group("--task classify"))
    except ImportError:  # pragma: no cover - the module ships with the package
        print("llmscratch: the classify options could not be loaded", file=sys.stderr)
