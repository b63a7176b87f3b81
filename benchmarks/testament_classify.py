"""Does pretraining help? Old or New Testament, from a pretrained run and from random weights: a table.

Fine-tunes two classifiers on the built-in ``testament`` task (King James verses, balanced,
split 70/10/20 with seed 123) with the same options and the same number of steps:

- from ``--base`` (a run of ``llmscratch train``, e.g. ``runs/latest``);
- from the same architecture and tokenizer with freshly initialised weights (seeded).

and prints each one's test accuracy (the 3,184 test verses, never fine-tuned on). Accuracy, not speed: the
two runs need not be interleaved. Usage::

    python benchmarks/testament_classify.py --base runs/latest --steps 300 --train all
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from llmscratch import cli
from llmscratch.nn.model import GPT
from llmscratch.store.checkpoint import checkpoint_step, load_config
from llmscratch.store.rundir import RunDir


def random_twin(base: Path, out: Path, seed: int) -> Path:
    """A run with ``base``'s config and tokenizer and freshly initialised weights."""
    from llmscratch.data.tokenizer import load_tokenizer
    from llmscratch.store.checkpoint import save_run

    torch.manual_seed(seed)
    save_run(out, GPT(load_config(base)), load_tokenizer(base))
    return out


def finetune(base: Path, out_dir: Path, name: str, args: argparse.Namespace) -> dict:
    """Fine-tune ``base`` on the testament task; its last record with the test numbers, and the seconds its
    training took (from its metrics). A run that already finished in ``out_dir`` is read, not run again."""
    if not _finished(out_dir / name):
        _run(base, out_dir, name, args)
    records = RunDir(out_dir / name).read_metrics()
    seconds = max((r["elapsed_s"] for r in records if "elapsed_s" in r), default=float("nan"))
    return {**_finished(out_dir / name)[-1], "seconds": seconds}


def _finished(run: Path) -> list[dict]:
    return [r for r in RunDir(run).read_metrics() if "test_accuracy" in r] if run.is_dir() else []


def _run(base: Path, out_dir: Path, name: str, args: argparse.Namespace) -> None:
    status = cli.main(["finetune", str(base), "--task", "classify", "--data", "testament", "--out-dir", str(out_dir),
                       "--name", name, "--steps", str(args.steps), "--train", args.train, "--lr", str(args.lr),
                       "--batch-size", str(args.batch_size), "--eval-every", str(args.steps), "--no-progress",
                       "--device", "cpu", "--pool", args.pool])
    if status != 0:
        raise SystemExit(f"fine-tuning {base} failed ({status})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="a pretrained run (llmscratch train)")
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps of each (default 300)")
    p.add_argument("--train", default="all", choices=("all", "last-block", "lora"), help="what learns (default all)")
    p.add_argument("--lr", type=float, default=5e-4, help="learning rate (default 5e-4)")
    p.add_argument("--batch-size", type=int, default=8, help="verses per step (default 8)")
    p.add_argument("--pool", default="last", choices=("last", "mean", "end"), help="(default last)")
    p.add_argument("--seed", type=int, default=123, help="the random twin's initialisation (default 123)")
    p.add_argument("--out", help="keep the runs here (default: a temporary folder); runs that finished there "
                   "before are read, not run again")
    p.add_argument("--json", help="also write the results to this JSON file")
    args = p.parse_args()
    base = Path(args.base).resolve()
    step = checkpoint_step(base)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        twin = out / "random-init"
        if not _finished(out / "from-random"):
            random_twin(base, twin, args.seed)
        results = {"pretrained": finetune(base, out, "from-pretrained", args),
                   "random init": finetune(twin, out, "from-random", args)}
    cfg = load_config(base)
    print(f"\ntestament classification (test split), {args.steps} steps of {args.batch_size} verses, --train "
          f"{args.train}, lr {args.lr:g}, --pool {args.pool}; model {cfg.n_layers} layers, {cfg.emb_dim} dims, "
          f"context {cfg.context_length}" + (f"; base trained {step} steps" if step else ""))
    print(f"{'start':<12} {'test acc':>9} {'test loss':>10} {'val acc':>8} {'seconds':>8}")
    for name, r in results.items():
        print(f"{name:<12} {100 * r['test_accuracy']:>8.2f}% {r['test_loss']:>10.4f} {100 * r['val_accuracy']:>7.2f}% "
              f"{r['seconds']:>8.0f}")
    gain = results["pretrained"]["test_accuracy"] - results["random init"]["test_accuracy"]
    print(f"pretraining adds {100 * gain:+.2f} points of test accuracy")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2, default=str))


if __name__ == "__main__":
    main()
