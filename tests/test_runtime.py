"""Device, precision and the CPU allocator setting."""

import os
import subprocess
import sys

import pytest
import torch

from llmscratch.errors import ConfigError
from llmscratch.runtime import resolve_device, resolve_precision, setup_runtime


def test_cpu_resolves_to_float32_and_rejects_fp16():
    runtime = setup_runtime("cpu", "auto")
    assert runtime.device == torch.device("cpu") and runtime.precision == "fp32"
    assert runtime.autocast_dtype is None and not runtime.needs_grad_scaler
    with pytest.raises(ConfigError, match="fp16 needs a GPU"):
        resolve_precision("fp16", torch.device("cpu"))
    with pytest.raises(ConfigError, match="precision must be one of"):
        resolve_precision("fp8", torch.device("cpu"))


def test_unknown_or_missing_devices_are_named():
    with pytest.raises(ConfigError, match="unknown device 'tpu9'"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_llmscratch_device_is_what_auto_means(monkeypatch):
    monkeypatch.setenv("LLMSCRATCH_DEVICE", "cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")  # a named device is not overridden
    monkeypatch.setenv("LLMSCRATCH_DEVICE", "auto")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    monkeypatch.setenv("LLMSCRATCH_DEVICE", "tpu9")
    with pytest.raises(ConfigError, match="LLMSCRATCH_DEVICE=tpu9: unknown device 'tpu9'"):
        resolve_device("auto")
    resolve_device("cpu")  # only `auto` reads the variable
    if not torch.cuda.is_available():
        monkeypatch.setenv("LLMSCRATCH_DEVICE", "cuda")
        with pytest.raises(ConfigError, match="LLMSCRATCH_DEVICE=cuda: .*no CUDA GPU"):
            resolve_device("auto")


# A fresh process per setting: malloc's settings are process-wide and cannot be undone.
FAULTS = """
import resource, sys, torch
from llmscratch.runtime import keep_freed_memory
from llmscratch.nn.model import GPT, GPTConfig
if sys.argv[1] == "tuned":
    assert keep_freed_memory()
torch.manual_seed(0)
model = GPT(GPTConfig.from_preset("cpu"))
model.loss_impl = "plain"  # the plain loss: 16 MB logits, log-softmax and gradient, each a fresh block
x = torch.randint(0, 4096, (16, 64))  # the default run's batch: 16 MB of logits
def step():
    model(x, x).backward()
    model.zero_grad(set_to_none=True)
step(); step()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(10):
    step()
print((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) // 10)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="malloc tuning is for Linux with glibc")
def test_keep_freed_memory_stops_training_steps_page_faulting_their_tensors_afresh():
    def faults_per_step(mode: str) -> int:
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True,
                             env={**os.environ, "OMP_NUM_THREADS": "1"})
        return int(out.stdout.strip().splitlines()[-1])

    default, tuned = faults_per_step("default"), faults_per_step("tuned")
    # glibc adapts its own mmap threshold after a while, so the default varies: 2,000-15,000 measured.
    assert default > 1024  # over 4 MB of fresh 4 KB pages every step
    assert tuned < default / 2  # measured: 0-800, and at least 8 times fewer
