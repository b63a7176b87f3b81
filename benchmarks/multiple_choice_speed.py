"""``eval --task`` against lm-evaluation-harness's ``hf`` backend: the same log-likelihoods, and how fast.

The run is exported once with ``llmscratch export --format hf``; questions are made from the
built-in corpus (a context of verses, four candidate endings each). Each round scores every
(context, ending) pair with ours (``multiple_choice.loglikelihoods``) and with the harness's
``HFLM.loglikelihood`` on the same model, alternating, both in float32 on the CPU, both loaded
before the clock starts; the largest difference of a log-likelihood is printed too.

    python benchmarks/multiple_choice_speed.py RUN_DIR --questions 40 --rounds 3 --batch 16
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path


def make_questions(n: int, seed: int = 0) -> list[tuple[str, list[str]]]:
    """``n`` (context, four endings) from the built-in corpus's lines: the true next line and three others."""
    from llmscratch.data.corpus import load_corpus

    lines = [line.strip() for line in load_corpus(None).text.splitlines() if 40 < len(line.strip()) < 160]
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(len(lines) - 1)
        endings = [lines[i + 1]] + rng.sample(lines, 3)
        out.append((lines[i], endings))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a run directory with a Hugging Face tokenizer or GPT-2 tokenizer files")
    parser.add_argument("--questions", type=int, default=40)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    for name in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ[name] = "1"
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from llmscratch.runtime import setup_runtime
    from llmscratch.store.checkpoint import load_run
    from llmscratch.store.convert import export_checkpoint
    from llmscratch.training.multiple_choice import encode_pair, loglikelihoods

    model, tokenizer, _ = load_run(args.run)
    runtime = setup_runtime("cpu", "fp32")
    questions = make_questions(args.questions)
    texts = [(context, " " + ending) for context, endings in questions for ending in endings]
    with tempfile.TemporaryDirectory() as tmp:
        export_checkpoint(args.run, Path(tmp) / "hf", "hf")
        lm = HFLM(pretrained=str(Path(tmp) / "hf"), device="cpu", batch_size=args.batch, dtype="float32")
        requests = [Instance(request_type="loglikelihood", doc={}, arguments=pair, idx=i)
                    for i, pair in enumerate(texts)]
        print(f"# {args.run}: {len(questions)} questions, {len(texts)} endings, batch {args.batch}, fp32, "
              f"{torch.get_num_threads()} threads; {platform.machine()}, shared machine; {time.strftime('%Y-%m-%d')}")
        ours_s, theirs_s, ratios = [], [], []
        for r in range(args.rounds):
            t0 = time.perf_counter()
            ours = loglikelihoods(model, [encode_pair(tokenizer, c, e) for c, e in texts], runtime, args.batch)
            t1 = time.perf_counter()
            theirs = [ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)]
            t2 = time.perf_counter()
            ours_s.append(t1 - t0)
            theirs_s.append(t2 - t1)
            ratios.append((t2 - t1) / (t1 - t0))
            diff = max(abs(a - b) for a, b in zip(ours, theirs))
            print(f"round {r + 1}: llmscratch {t1 - t0:.2f} s, lm-eval hf {t2 - t1:.2f} s, "
                  f"lm-eval / llmscratch {ratios[-1]:.2f}; largest log-likelihood difference {diff:.2e}")
    print(f"median: llmscratch {statistics.median(ours_s):.2f} s ({len(texts) / statistics.median(ours_s):.1f} "
          f"endings/s), lm-eval hf {statistics.median(theirs_s):.2f} s; median ratio {statistics.median(ratios):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
