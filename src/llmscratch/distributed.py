"""Multi-process training on PyTorch's own engine (torchrun + DistributedDataParallel).

Kept out of the model and out of the loop's logic: the training loop asks this module
for a :class:`Group` (who am I, how many are we), wraps the model once, and uses
:func:`maybe_no_sync` so gradient accumulation all-reduces only on the last micro-step.

Launched without torchrun, everything here is a no-op for a group of one process.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass
from typing import ContextManager

import torch
import torch.distributed as torch_dist
import torch.nn as nn


@dataclass
class Group:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str = ""  # "nccl", "gloo", or "" when not distributed

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.active:
            torch_dist.barrier()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over all processes, in place (gloo needs CPU tensors, NCCL GPU ones)."""
        if self.active:
            torch_dist.all_reduce(tensor, op=torch_dist.ReduceOp.SUM)
        return tensor


def init() -> Group:
    """Join the process group torchrun set up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``…).

    NCCL when CUDA GPUs are present (one GPU per process, chosen by ``LOCAL_RANK``),
    gloo on the CPU. Without those variables: a group of one, nothing initialised.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Group()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch_dist.is_initialized():
        return Group(rank, local_rank, world_size, torch_dist.get_backend())
    use_cuda = torch.cuda.is_available() and os.environ.get("LLMSCRATCH_DEVICE", "") != "cpu"
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
    timeout = datetime.timedelta(seconds=int(os.environ.get("LLMSCRATCH_DIST_TIMEOUT", "600")))
    torch_dist.init_process_group(backend=backend, timeout=timeout)
    return Group(rank, local_rank, world_size, backend)


def wrap_model(model: nn.Module, group: Group, runtime) -> nn.Module:
    """DistributedDataParallel around ``model`` in a multi-process job; the model itself otherwise."""
    if not group.active:
        return model
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [runtime.device.index if runtime.device.index is not None else group.local_rank] \
        if runtime.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


def maybe_no_sync(model: nn.Module, group: Group, last: bool) -> ContextManager:
    """Skip the gradient all-reduce on every micro-step but the last of an accumulation."""
    if group.active and not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


def cleanup(group: Group) -> None:
    if group.active and torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def launch_torchrun(nproc: int, argv: list[str]) -> int:
    """Re-run this ``llmscratch`` command under ``torchrun --nproc_per_node nproc`` on this machine.

    ``--nproc N`` is dropped from the arguments; torchrun sets ``RANK``/``WORLD_SIZE`` for
    each process. If any process fails, torchrun stops the others and reports its error.
    """
    import subprocess
    import sys

    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a == "--nproc":
            skip = True
            continue
        if a.startswith("--nproc="):
            continue
        args.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "llmscratch", *args]
    print("launching:", " ".join(cmd), flush=True)
    return subprocess.call(cmd)
