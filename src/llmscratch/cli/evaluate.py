"""``llmscratch eval``: loss, perplexity and bits per byte of a run on any text."""

from __future__ import annotations

import argparse

from .commands import command


def _run_eval(args: argparse.Namespace) -> int:
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
    cls = p.add_argument_group("a classifier run (finetune --task classify)",
                               "--data is then a labelled CSV, TSV or JSONL file (or testament): accuracy, "
                               "per-class precision and recall, and the confusion matrix")
    cls.add_argument("--text-column", help="the column or field of the texts (default: the run's)")
    cls.add_argument("--label-column", help="the column or field of the labels (default: the run's)")
