"""``llmscratch classify RUN "text…"``: the class of each text, with its probability, from a classifier run."""

from __future__ import annotations

import argparse

from .commands import command


def _read_lines(path: str) -> list[str]:
    """The non-empty lines of a UTF-8 file (one text a line)."""
    from pathlib import Path

    from ..errors import ConfigError
    from ..files import decode_utf8

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--file {path}: no such file; give a text file with one text a line")
    text = decode_utf8(p.read_bytes(), f"--file {path}", ConfigError)
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise ConfigError(f"--file {path} holds no text (one text a line)")
    return lines


def _run_classify(args: argparse.Namespace) -> int:
    from ..errors import ConfigError
    from ..inference.classify import classify_texts
    from ..runtime import setup_runtime
    from ..store.classifier import load_classifier

    texts = list(args.texts)
    if args.file:
        texts += _read_lines(args.file)
    if not texts:
        raise ConfigError("give the text to classify (llmscratch classify RUN \"text\") or --file FILE")
    for i, t in enumerate(texts):
        if not t.strip():
            raise ConfigError(f"text {i + 1} is empty: give a text to classify")
    runtime = setup_runtime(args.device, "auto")
    model, tokenizer, info = load_classifier(args.run_dir, device=runtime.device, need_tokenizer="the texts")
    predictions = classify_texts(model, tokenizer, texts, info, runtime)
    cut = sum(p.cut for p in predictions)
    for text, p in zip(texts, predictions):
        if args.all:
            scores = "  ".join(f"{name} {100 * v:.1f}%" for name, v in p.probabilities.items())
            print(f"{p.label}\t{scores}" + (f"\t{text}" if len(texts) > 1 else ""))
        elif len(texts) == 1:
            print(f"{p.label} ({100 * p.probability:.1f}%)")
        else:
            print(f"{p.label}\t{100 * p.probability:.1f}%\t{text}")
    if cut:
        import sys

        print(f"note: {cut} text(s) longer than the model's context ({model.cfg.context_length} tokens) were read "
              "only up to it", file=sys.stderr)
    return 0


def run_classification_eval(args: argparse.Namespace) -> int:
    """``llmscratch eval`` on a classifier run: its numbers on a labelled file (``--data``)."""
    from ..training.classify import evaluate_labelled, format_report

    scores, classes, notes = evaluate_labelled(args.run_dir, args.data, text_column=args.text_column,
                                               label_column=args.label_column, device=args.device,
                                               batch_size=args.batch_size)
    for note in notes:
        print(f"note: {note}")
    print(format_report(scores, classes))
    return 0


@command("classify")
def _add_classify(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("classify", help="label texts with a classifier run (finetune --task classify)",
                       description="Print the most probable class of each text and its probability, from a run "
                       "made by `llmscratch finetune RUN --task classify`.")
    p.add_argument("run_dir", help="a classifier run directory")
    p.add_argument("texts", nargs="*", help="the text(s) to classify")
    p.add_argument("--file", help="a UTF-8 text file: one text a line")
    p.add_argument("--all", action="store_true", help="print every class's probability")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, mps")
