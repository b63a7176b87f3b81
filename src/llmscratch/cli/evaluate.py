"""``llmscratch eval``: loss, perplexity and bits per byte of a run on any text, or its accuracy on a
multiple-choice task (``--task FILE.jsonl``)."""

from __future__ import annotations

import argparse
import json

from .commands import command


def _run_eval(args: argparse.Namespace) -> int:
    if args.task is not None:
        return _run_task(args)
    from ..store.classifier import is_classifier_run
    from ..training.evaluate import evaluate_text

    if is_classifier_run(args.run_dir):  # a classifier (finetune --task classify): labelled texts
        from .classify import run_classification_eval

        return run_classification_eval(args)

    result = evaluate_text(args.run_dir, args.data, encoding=args.encoding, device=args.device,
                           batch_size=args.batch_size)
    print(f"{result['tokens']:,} tokens, {result['bytes']:,} bytes: loss {result['loss']:.4f}, "
          f"perplexity {result['ppl']:.2f}, {result['bpb']:.4f} bits per byte")
    return 0


def _run_task(args: argparse.Namespace) -> int:
    from ..files import write_text_atomic
    from ..training.multiple_choice import details, evaluate_task, read_task

    result = evaluate_task(args.run_dir, args.task, delimiter=args.delimiter, device=args.device,
                           batch_size=args.batch_size, limit=args.limit)
    print(f"{args.task}: {result.n:,} questions: acc {result.acc:.4f} (± {result.acc_stderr:.4f}), "
          f"acc_norm {result.acc_norm:.4f} (± {result.acc_norm_stderr:.4f})")
    if args.details:
        records = details(read_task(args.task, args.limit), result)
        write_text_atomic(args.details, "".join(json.dumps(r) + "\n" for r in records))
        print(f"per-question log-likelihoods in {args.details}")
    return 0


@command("eval")
def _add_eval(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="a run's loss, perplexity and bits per byte on any text, or its accuracy on "
                       "a multiple-choice task",
                       description="Evaluate a run on a text file, folder or glob (--data: every window of the "
                       "text, cross-entropy loss, perplexity and bits per byte), or on a multiple-choice task "
                       "(--task: a JSONL file of {\"context\", \"endings\", \"label\"} lines, each ending scored "
                       "by its log-likelihood after the context; acc and acc_norm as lm-evaluation-harness "
                       "computes them; docs/finetuning.md).")
    p.add_argument("run_dir", help="a run directory (a LoRA run's adapters are applied on its base run)")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--data", help="a text file, a folder of .txt files or a glob")
    what.add_argument("--task", help="a multiple-choice task: JSONL, one {\"context\": ..., \"endings\": [...], "
                      "\"label\": N} a line (HellaSwag's ctx/endings/label read as is)")
    p.add_argument("--encoding", default="utf-8", help="text encoding (default utf-8)")
    p.add_argument("--batch-size", type=int, default=16, help="windows (--data) or scored endings (--task) per "
                   "forward pass (default 16)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
    p.add_argument("--delimiter", default=" ", help="--task: what goes between a context and each ending "
                   "(default one space, lm-evaluation-harness's target_delimiter)")
    p.add_argument("--limit", type=int, default=None, help="--task: only the first N questions")
    p.add_argument("--details", default=None, help="--task: write every question's log-likelihoods and "
                   "predictions to this JSONL file")
    cls = p.add_argument_group("a classifier run (finetune --task classify)",
                               "--data is then a labelled CSV, TSV or JSONL file (or testament): accuracy, "
                               "per-class precision and recall, and the confusion matrix")
    cls.add_argument("--text-column", help="the column or field of the texts (default: the run's)")
    cls.add_argument("--label-column", help="the column or field of the labels (default: the run's)")
