"""The benchmark scripts keep running: the GPU check's calls, and CPU dry runs of the scripts.

A GPU machine is lent for minutes at a time, so ``benchmarks/gpu_check.sh`` must not be the first
place a renamed option or a broken import shows up. These tests check, on the CPU, that the
script is valid bash, that every option it passes exists, that it selects GPU tests, and they
run the benchmark scripts at tiny sizes.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from llmscratch.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
BENCHMARKS = ROOT / "benchmarks"
GPU_CHECK = BENCHMARKS / "gpu_check.sh"


def run_script(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """A benchmark script run as gpu_check.sh runs it: from the source tree."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src")})


def gpu_check_commands() -> list[str]:
    """The script's lines with continuations joined."""
    return GPU_CHECK.read_text().replace("\\\n", " ").splitlines()


def test_the_gpu_check_is_valid_bash():
    result = subprocess.run(["bash", "-n", str(GPU_CHECK)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_every_option_the_gpu_check_gives_a_benchmark_script_exists():
    calls = [re.search(r"python3 (benchmarks/\S+\.py)(.*)", line) for line in gpu_check_commands()]
    calls = [c for c in calls if c]
    assert {c.group(1) for c in calls} == {"benchmarks/loss_kernel.py", "benchmarks/gpu_train_variants.py"}
    for call in calls:
        options = set(re.findall(r"(?<!\S)(--[a-z][a-z-]*)", call.group(2).split("2>&1")[0]))
        assert options, call.group(0)
        shown = run_script(call.group(1), "--help", timeout=120)
        assert shown.returncode == 0, shown.stderr
        missing = [o for o in options if o not in shown.stdout]
        assert not missing, f"{call.group(1)} has no option {missing}"


def test_the_gpu_check_s_bench_command_parses():
    lines = gpu_check_commands()
    array = next(line for line in lines if line.startswith("BENCH_ARGS=("))
    bench_args = shlex.split(array.split("(", 1)[1].split(")", 1)[0])
    line = next(line for line in lines if "-m llmscratch bench" in line)
    words = shlex.split(line.split("-m llmscratch ", 1)[1].split("2>&1")[0])
    argv = []
    for word in words:
        if word == "${BENCH_ARGS[@]}":
            argv += bench_args
        elif word.startswith("${BENCH:-"):
            argv.append(word[len("${BENCH:-"):-1])  # the default: train
        else:
            argv.append(word.replace("$OUT", "/tmp/out"))
    args = build_parser().parse_args(argv)  # SystemExit (status 2) on an unknown option
    assert (args.command, args.preset, args.batch, args.context) == ("bench", "nanogpt-124m", 16, 1024)


def test_the_gpu_check_selects_gpu_tests_in_each_file_it_names():
    line = next(line for line in gpu_check_commands() if "pytest -m gpu" in line)
    files = re.findall(r"tests/\S+\.py", line)
    assert files
    listed = subprocess.run([sys.executable, "-m", "pytest", "-o", "addopts=--import-mode=importlib",
                             "--collect-only", "-q", "-m", "gpu", "-p", "no:cacheprovider", *files],
                            capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert listed.returncode == 0, listed.stdout[-2000:]
    for name in files:
        assert any(line.startswith(f"{name}::") for line in listed.stdout.splitlines()), (name, listed.stdout[-2000:])


@pytest.mark.slow
def test_the_training_variants_dry_run_on_the_cpu(tmp_path):
    """Every variant of our model starts from the same weights and batch: the same first loss."""
    result = run_script("benchmarks/gpu_train_variants.py", "--smoke", "--out", str(tmp_path), "--no-peers")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    record = json.loads((tmp_path / "variants.json").read_text())
    rows = record["rows"]
    assert len(rows) >= 5 and not record["skipped"]
    assert all(r["tokens_per_s"] > 0 and r["step_ms"] > 0 for r in rows)
    at_batch_2 = [r["first_loss"] for r in rows if r["batch"] == 2]
    assert max(at_batch_2) - min(at_batch_2) < 1e-4, at_batch_2
    assert (tmp_path / "profile.md").read_text().strip()


def test_the_decoding_scripts_run_at_a_tiny_size():
    speed = run_script("benchmarks/generation_speed.py", "--preset", "test", "--new-tokens", "5", "--repeats", "1",
                       "--device", "cpu")
    assert speed.returncode == 0, speed.stderr[-3000:]
    assert re.search(r"^cache\s+[\d.]+", speed.stdout, re.M) and "speed-up from the cache" in speed.stdout
    layout = run_script("benchmarks/cpu_decode_weights.py", "--preset", "test", "--new-tokens", "5", "--repeats", "1",
                        "--batches", "1", "2")
    assert layout.returncode == 0, layout.stderr[-3000:]
    rows = [line for line in layout.stdout.splitlines() if re.match(r"\| (as built|laid out)", line)]
    assert len(rows) == 6, layout.stdout  # three ways of holding the weights × two batch sizes


@pytest.mark.slow
def test_the_default_run_benchmark_reads_its_run(tmp_path):
    out = tmp_path / "default.json"
    result = run_script("benchmarks/train_default.py", "--json", str(out), "--", "--steps", "4", "--eval-interval", "2",
                        "--log-interval", "1", "--sample-tokens", "0", "--tokenizer", "char")
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    record = json.loads(out.read_text())
    assert record["steps"] == 4 and record["tokenizer"] == "char" and record["sample"] is None
    assert record["tokens_per_s_median"] > 0 and 0 < record["val_bpb"] < 10
    assert record["val_tokens"] > 0 and record["model"]["pos_emb"] == "rope"
    assert f"| val_bpb | {record['val_bpb']} |" in result.stdout
