"""Multi-process training on PyTorch's own engine: torchrun, DistributedDataParallel and FSDP.

Kept out of the model and out of the loop's logic. The training loop asks this module for a
:class:`Group` (who am I, how many are we), wraps the model once (:func:`wrap_model`: DDP; with
``--fsdp``, :func:`sharded_model` builds it sharded, whole on rank 0 alone), takes this rank's share of every global batch
(:func:`local_micro_batches`), syncs gradients only on the last micro-step
(:func:`maybe_no_sync`), and saves and restores checkpoints through the functions here.

The global batch of a step is ``batch_size × grad_accum`` windows, drawn from one seeded
generator on every rank, so it is the same whatever the world size; each rank takes a
disjoint, equal part and runs it in micro-batches of ``micro_batch`` windows (default
``batch_size``): accumulation adapts to the number of processes, the arithmetic does not.

Checkpoints:

* one process or DDP: rank 0 writes the ordinary run directory (``model.safetensors``,
  ``training_state.pt`` with the optimizer), the unwrapped model, readable by one process;
* FSDP: every rank writes its shard through ``torch.distributed.checkpoint`` into
  ``run_dir/sharded/`` (model, optimizer and a ``training_state.pt`` without the optimizer);
  at the end of training rank 0 consolidates it into the ordinary files (:func:`consolidate`,
  also what ``llmscratch export --format run`` does for a run that crashed).

Resuming reads whichever checkpoint is newer, on any number of processes.
Launched without torchrun, everything here acts for a group of one process.

What one rank decides for all (the run directory's name, from its clock) it sends to the
others (:meth:`Group.decided_by_main`): ranks on machines whose clocks or time zones differ
would otherwise name different folders. A rank that stops answering is named, not the one
that waited for it: a collective that times out (``--dist-timeout``) asks the job's store
which ranks timed out too, and the one that did not is reported (:func:`explain_timeout`), in
the waiting rank's error and in the launcher's summary line (:func:`run_torchrun`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import re
import shutil
import signal
import sys
import threading
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Optional, Sequence, TypeVar, Union

import torch
import torch.distributed as torch_dist
import torch.nn as nn

from ..store import checkpoint as ckpt
from ..store.sharded import SHARDED_DIR, SHARDED_OLD, SHARDED_TMP
from ..errors import ConfigError, LLMScratchError
from ..files import write_text_atomic
from ..nn.model import GPT, GPTConfig

if TYPE_CHECKING:
    from ..runtime import Runtime

DEFAULT_TIMEOUT_S = 600.0  # how long a collective waits for the other ranks (--dist-timeout)

T = TypeVar("T")


class RankNotAnswering(LLMScratchError):
    """Another rank stopped answering: a collective waited ``--dist-timeout`` seconds for it."""

    def __init__(self, message: str, silent: Optional[list[int]]):
        super().__init__(message)
        self.silent = silent  # the ranks that did not answer ([]: every rank timed out; None: could not be told)


@dataclass
class Group:
    """This process's place in the job."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str = ""  # "nccl", "gloo", or "" when not distributed
    device: str = "cpu"  # where collective tensors live: the rank's GPU for NCCL, the CPU for gloo

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

    def any(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over all processes, in one collective.

        For rank-local reasons to stop (Ctrl-C, a time budget): every rank must stop at the
        same step, or the others would wait forever in the next collective.
        """
        if not self.active:
            return tuple(bool(f) for f in flags)
        t = torch.tensor([int(bool(f)) for f in flags], dtype=torch.int32, device=self.device)
        torch_dist.all_reduce(t, op=torch_dist.ReduceOp.MAX)
        return tuple(bool(v) for v in t.tolist())

    def decided_by_main(self, decide: Callable[[], T]) -> T:
        """``decide()`` on rank 0 alone, its result sent to every rank; an error it raises is raised on every rank.

        For what depends on a rank's own view (its clock, its time zone, which folders exist
        when it looks): ranks that decided on their own could disagree. The error is sent as
        well, so that no rank waits for a result that rank 0 never sends.
        """
        if not self.active:
            return decide()
        shared: list[Any] = [None]
        if self.is_main:
            try:
                shared[0] = ("ok", decide())
            except LLMScratchError as err:
                shared[0] = ("error", type(err), str(err))
                torch_dist.broadcast_object_list(shared, src=0)
                raise
        torch_dist.broadcast_object_list(shared, src=0)
        if shared[0][0] == "error":
            _, kind, message = shared[0]
            raise (kind if issubclass(kind, LLMScratchError) else LLMScratchError)(message)
        return shared[0][1]


def init(device: str = "auto", timeout_s: float = DEFAULT_TIMEOUT_S) -> Group:
    """Join the process group torchrun set up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``…).

    NCCL when CUDA GPUs are present and ``device`` does not ask for the CPU (one GPU per
    process, chosen by ``LOCAL_RANK``), gloo otherwise. Without those variables: a group of
    one, nothing initialised. ``timeout_s`` (``--dist-timeout``) bounds how long a collective
    waits for a rank that stopped answering; it must also cover the longest wait of a healthy
    job (the other ranks wait while rank 0 prepares the data or consolidates a checkpoint).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return Group()
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if "TORCHELASTIC_RUN_ID" in os.environ:  # started by torchrun: stop if it is killed
        die_with_parent()
    wants_cpu = device.startswith(("cpu", "mps")) or os.environ.get("LLMSCRATCH_DEVICE", "") == "cpu"
    use_cuda = torch.cuda.is_available() and not wants_cpu
    if use_cuda:
        torch.cuda.set_device(local_rank)
    collective_device = f"cuda:{local_rank}" if use_cuda else "cpu"
    if torch_dist.is_initialized():
        return Group(rank, local_rank, world_size, torch_dist.get_backend(), collective_device)
    backend = "nccl" if use_cuda else "gloo"
    torch_dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
    return Group(rank, local_rank, world_size, backend, collective_device)


# =========================================================================== a rank that stopped answering

# What a collective that waited too long raises: gloo's "Timed out waiting 600000ms for recv
# operation to complete", NCCL's "Watchdog caught collective operation timeout" (when it is raised
# in Python rather than aborting the process), c10d's own "... timed out ...".
_TIMEOUT_TEXT = re.compile(r"timed out|timeout", re.IGNORECASE)
_TIMED_OUT_KEY = "llmscratch/timed-out/"


def is_collective_timeout(err: BaseException) -> bool:
    """Whether ``err`` is a collective of this job's process group giving up on a rank."""
    return (isinstance(err, RuntimeError) and torch_dist.is_available() and torch_dist.is_initialized()
            and bool(_TIMEOUT_TEXT.search(str(err))))


def explain_timeout(err: BaseException, timeout_s: float, grace_s: Optional[float] = None) -> RankNotAnswering:
    """Which rank(s) did not answer when a collective of this rank timed out, as an error to raise.

    The message of the collective itself names no peer (gloo: "Timed out waiting 600000ms for
    recv operation"). So every rank whose collective timed out says so in the job's key-value
    store (torchrun's, which outlives a stuck rank 0) and waits ``grace_s`` (default: the
    timeout, at most 30 s) for the others to do the same: healthy ranks wait in the same
    collective and time out within about a step of each other; the ranks that never say so are
    the ones that stopped answering. The finding also goes into torchrun's error file for this
    rank, from which :func:`run_torchrun` writes its summary line.
    """
    rank, world = torch_dist.get_rank(), torch_dist.get_world_size()
    grace_s = min(30.0, timeout_s) if grace_s is None else grace_s
    silent: Optional[list[int]] = None
    try:
        from torch.distributed.distributed_c10d import _get_default_store

        store = _get_default_store()
        store.set_timeout(datetime.timedelta(seconds=grace_s + 10))  # a store that is gone too must not hang here
        store.set(f"{_TIMED_OUT_KEY}{rank}", "1")
        others = [r for r in range(world) if r != rank]
        deadline = time.monotonic() + grace_s
        while True:
            silent = [r for r in others if not store.check([f"{_TIMED_OUT_KEY}{r}"])]
            if not silent or time.monotonic() >= deadline:
                break
            time.sleep(0.2)
    except Exception:  # the store is gone too: who stopped cannot be told
        silent = None
    message = describe_timeout(rank, world, timeout_s, silent)
    if silent:
        who = " and ".join(f"rank {r}" for r in silent)
        message += (f". Find out what stopped {who} (a stuck GPU, a lost machine, a paused process); "
                    "--resume continues from the last checkpoint")
    message += f" [{str(err).splitlines()[0] if str(err) else repr(err)}]"
    _tell_torchrun(message, {"silent": silent, "timeout_s": timeout_s, "waiting": rank, "world_size": world})
    return RankNotAnswering(message, silent)


def describe_timeout(rank: int, world_size: int, timeout_s: float, silent: Optional[list[int]]) -> str:
    """The sentence for a collective of ``rank`` that waited ``timeout_s`` for the ranks in ``silent``
    (``[]``: every rank timed out; ``None``: who did not answer could not be told)."""
    waited = f"{timeout_s:g} s (--dist-timeout, default {DEFAULT_TIMEOUT_S:g} s: a smaller one ends a stuck job sooner)"
    if silent is None:
        return (f"a collective of rank {rank} of {world_size} waited {waited} for another rank and gave up; "
                "which rank stopped answering could not be told (the job's store did not answer either)")
    if not silent:
        return (f"a collective of rank {rank} of {world_size} waited {waited} for the other ranks and gave up; "
                "every rank timed out, so none stopped: they waited in different collectives, or for one "
                "operation slower than the timeout")
    who = f"rank {silent[0]}" if len(silent) == 1 else f"ranks {', '.join(map(str, silent))}"
    return (f"{who} of {world_size} stopped answering: rank {rank} waited {waited} for "
            f"{'it' if len(silent) == 1 else 'them'} in a collective and gave up")


def _tell_torchrun(message: str, facts: dict[str, Any]) -> None:
    """Write ``message`` (and ``facts``) into torchrun's error file for this rank, where torchrun reads a rank's failure."""
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if not path:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(Path(path), json.dumps({"message": message, "timestamp": int(time.time()),
                                                  "llmscratch": facts}))
    except OSError:
        pass


def cleanup(group: Group) -> None:
    """Leave the process group, on the normal path only (not after an error: a rank that died
    would never reach the barrier). Every rank first waits for the others, so none tears down
    its connections while another still sends on them: gloo aborts a rank whose peer has gone
    (seen as "terminate called without an active exception" at the end of a 2-rank FSDP run)."""
    if group.active and torch_dist.is_initialized():
        torch_dist.barrier()
        torch_dist.destroy_process_group()


# =========================================================================== the global batch


def micro_batch_size(batch_size: int, grad_accum: int, world_size: int, micro_batch: Optional[int] = None) -> int:
    """Windows per forward pass on each process, checked to cut the global batch evenly.

    The global batch is ``batch_size × grad_accum`` windows; each of ``world_size`` processes
    takes an equal part and runs it in micro-batches of ``micro_batch`` windows (default
    ``batch_size``, what one process would run; smaller when a part is smaller than that).
    """
    global_batch = batch_size * grad_accum
    if global_batch % world_size != 0:
        raise ConfigError(
            f"the global batch of {global_batch} windows (batch_size {batch_size} × grad_accum {grad_accum}) "
            f"does not split evenly over {world_size} processes; make it a multiple of {world_size}"
        )
    per_rank = global_batch // world_size
    micro = min(micro_batch or batch_size, per_rank)
    if per_rank % micro != 0:
        raise ConfigError(
            f"each of the {world_size} processes gets {per_rank} windows per step, which micro-batches of "
            f"{micro} do not divide; choose a --micro-batch that divides {per_rank}"
        )
    return micro


def local_micro_batches(global_starts: torch.Tensor, rank: int, world_size: int, micro: int) -> list[torch.Tensor]:
    """This rank's disjoint part of a step's global batch of window starts, cut into micro-batches.

    ``global_starts`` (G,) is the same on every rank; rank ``r`` takes the ``r``-th of
    ``world_size`` equal consecutive parts and cuts it into ``part / micro`` micro-batches.
    With one process this is the global batch in micro-batches, in order.
    """
    per_rank = len(global_starts) // world_size
    mine = global_starts[rank * per_rank : (rank + 1) * per_rank]  # (G / world_size,)
    return list(mine.split(micro))  # [(micro,), …]: window starts, one tensor per micro-batch


def shard_batches(batches: list[tuple[torch.Tensor, torch.Tensor]], group: Group) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's evaluation batches: every ``world_size``-th one, padded to the same count on every rank.

    Ranks of a sharded (FSDP) model must run the same number of forward passes; a rank short
    of a batch gets a copy of the first with every target set to -100 (ignored, counted nowhere).
    """
    if not group.active:
        return list(batches)
    mine = list(batches[group.rank :: group.world_size])
    needed = -(-len(batches) // group.world_size)
    while len(mine) < needed:
        x, y = batches[0]
        mine.append((x, torch.full_like(y, -100)))
    return mine


# =========================================================================== wrapping


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` was sharded by FSDP's ``fully_shard`` (its forward is then a collective)."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrap_model(model: nn.Module, group: Group, runtime: Runtime, fsdp: bool = False) -> nn.Module:
    """The model to train: DDP around it, or (``fsdp``) the model itself sharded in place
    (as it is if :func:`sharded_model` built it sharded).

    Call before building the optimizer: ``fully_shard`` replaces the parameters by sharded
    DTensors. With one process the model is returned as it is.
    """
    if not group.active:
        return model
    if fsdp:
        return model if is_sharded(model) else _fully_shard(model, group, runtime)
    from torch.nn.parallel import DistributedDataParallel as DDP

    device_ids = [runtime.device.index if runtime.device.index is not None else group.local_rank] \
        if runtime.device.type == "cuda" else None
    return DDP(model, device_ids=device_ids)


def sharded_model(group: Group, runtime: Runtime, full: Optional[Callable[[], GPT]] = None,
                  cfg: Optional[GPTConfig] = None) -> GPT:
    """An FSDP-sharded model that no rank but rank 0 ever holds whole.

    Every rank builds the model on the meta device (shapes, no memory), shards it and
    allocates only its own shards on its device. With ``full`` (how to get the whole model: a
    fresh initialisation, pretrained weights, a full checkpoint), rank 0 alone calls it, on the
    CPU as one process would, and sends each rank its shards; its config reaches the other
    ranks with them. With ``cfg`` instead, the shards are left uninitialised for the caller
    to load (a sharded checkpoint, :func:`restore`).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    whole = full() if full is not None and group.is_main else None
    if full is not None:
        shared = [whole.cfg.to_dict() if whole is not None else None]
        torch_dist.broadcast_object_list(shared, src=0)
        cfg = GPTConfig.from_dict(shared[0])
    with torch.device("meta"):
        model = GPT(cfg)
    _fully_shard(model, group, runtime)
    model.to_empty(device=runtime.device)
    model.reset_buffers()
    if full is not None:
        set_model_state_dict(model, whole.state_dict() if whole is not None else {},
                             options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    return model


def _fully_shard(model: nn.Module, group: Group, runtime) -> nn.Module:
    """FSDP2: each transformer block is one unit (gathered for its forward, freed after), the rest the root.

    Mixed precision follows the run's precision: bf16 gathers and computes in bfloat16 and
    reduces gradients in float32; fp32 keeps everything in float32.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    if runtime.precision == "fp16":
        raise ConfigError("--fsdp trains in bf16 or fp32, not fp16 (no gradient scaler for sharded "
                          "gradients here); use --precision bf16 or fp32")
    mesh = init_device_mesh(runtime.device.type, (group.world_size,))
    policy = MixedPrecisionPolicy(
        param_dtype=torch.bfloat16 if runtime.precision == "bf16" else None,
        reduce_dtype=torch.float32,
    )
    for block in getattr(model, "blocks", []):
        fully_shard(block, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def maybe_no_sync(model: nn.Module, group: Group, last: bool) -> ContextManager:
    """Skip the gradient all-reduce on every micro-step but the last of an accumulation.

    DDP: its ``no_sync()`` context. FSDP: ``set_requires_gradient_sync(last)``, so gradients
    stay unsharded and local until the last micro-step reduce-scatters them.
    """
    if not group.active:
        return contextlib.nullcontext()
    if is_sharded(model):
        model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()
    if not last and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


# =========================================================================== checkpoints


def _full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every rank calls: the whole model's state dict on rank 0's CPU (empty on the others)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def save_weights(directory: Union[str, Path], model: nn.Module, group: Group) -> None:
    """Every rank calls: rank 0 writes ``config.json`` and ``model.safetensors`` of the unwrapped model.

    A sharded model is gathered first (a collective, to rank 0's CPU one tensor at a time).
    """
    state = _full_model_state(model) if is_sharded(model) else None
    if group.is_main:
        ckpt.save_model(directory, model, state_dict=state)


def save_checkpoint(run_dir: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    training_state: dict[str, Any], group: Group) -> None:
    """Every rank calls. ``training_state`` holds everything but the weights and the optimizer.

    Ordinary (one process, DDP): rank 0 writes the weights and ``training_state.pt`` with
    ``optimizer.state_dict()`` in it. Sharded (FSDP): each rank writes its shards of the weights
    and the optimizer through ``torch.distributed.checkpoint`` into a temporary folder, rank 0
    adds ``training_state.pt`` and ``config.json`` and swaps it in for ``run_dir/sharded``.
    """
    if not is_sharded(model):
        if group.is_main:  # staged, then renamed: a kill at any moment leaves one whole pair
            ckpt.save_checkpoint(run_dir, model, {**training_state, "optimizer": optimizer.state_dict()})
        return
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    tmp, final, old = run_dir / SHARDED_TMP, run_dir / SHARDED_DIR, run_dir / SHARDED_OLD
    if group.is_main:
        shutil.rmtree(tmp, ignore_errors=True)  # a save that crashed half-way
    group.barrier()
    model_state, optim_state = get_state_dict(model, optimizer)
    dcp.save({"model": model_state, "optimizer": optim_state}, checkpoint_id=str(tmp))
    if group.is_main:
        ckpt.save_training_state(tmp, training_state)
        write_text_atomic(run_dir / ckpt.CONFIG_FILE, model.cfg.to_json() + "\n")
        shutil.rmtree(old, ignore_errors=True)
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    group.barrier()


def restore(run_dir: Union[str, Path], model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load the optimizer state (and, from a sharded checkpoint, the weights) into a wrapped model.

    Every rank calls, after :func:`wrap_model` and building the optimizer; any world size
    reads any checkpoint (``torch.distributed.checkpoint`` reshards).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    if "optimizer" not in state:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        saved = {"model": model_state, "optimizer": optim_state}
        with warnings.catch_warnings():  # one process reading a sharded checkpoint is intended
            warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
            dcp.load(saved, checkpoint_id=str(Path(run_dir) / SHARDED_DIR))
        set_state_dict(model, optimizer, model_state_dict=saved["model"], optim_state_dict=saved["optimizer"])
    elif is_sharded(model):
        by_name = _names_for_ids(model, optimizer, state["optimizer"])
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])


def _names_for_ids(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> dict:
    """``optimizer.state_dict()`` (parameters numbered in group order) → keyed by parameter name."""
    name_of = {p: name for name, p in model.named_parameters()}
    names = [name_of[p] for g in optimizer.param_groups for p in g["params"]]
    return {
        "state": {names[i]: s for i, s in saved["state"].items()},
        "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in saved["param_groups"]],
    }


# =========================================================================== launching


def launch_torchrun(nproc: int, argv: list[str], program: Sequence[str] = ("-m", "llmscratch")) -> int:
    """Re-run this ``llmscratch`` command under ``torchrun --standalone --nproc_per_node nproc`` on this machine.

    ``--nproc N`` is dropped from the arguments; torchrun sets ``RANK``/``WORLD_SIZE`` for
    each process. If any process fails, torchrun stops the others and the job exits non-zero:
    the failing rank's error is printed, then one line from :func:`run_torchrun` (not
    torchrun's traceback) says which rank failed and how. ``OMP_NUM_THREADS``, unless set,
    shares this machine's cores out among the processes (torchrun's own default is 1).

    Ctrl-C reaches torchrun too (the same process group), which passes it on to every rank:
    they agree on a step, save a checkpoint and stop. So the first Ctrl-C here only waits for
    that (torchrun kills ranks that take over 30 s); a second one stops waiting. SIGTERM sent to
    this process alone (``kill``, ``timeout``, a job scheduler) is turned into that Ctrl-C for
    torchrun, so it too saves and stops (exit status 143); a second SIGTERM stops waiting. Under
    torchrun a rank does not take SIGTERM as "save and stop": torchrun itself ends ranks with it
    after a failure. Should this process be killed outright, torchrun and then the ranks get
    SIGTERM (:func:`die_with_parent`) rather than train on unseen.

    ``program``: what each process runs (``-m llmscratch``, or a script: the tests' failing rank).
    """
    import subprocess

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
    torchrun_args = ["--standalone", f"--nproc_per_node={nproc}", *program, *args]
    env = dict(os.environ, LLMSCRATCH_LAUNCHER_PID=str(os.getpid()))
    if "OMP_NUM_THREADS" not in env:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        env["OMP_NUM_THREADS"] = str(max(1, cores // nproc))
    print(f"launching: torchrun {' '.join(torchrun_args)}  (OMP_NUM_THREADS={env['OMP_NUM_THREADS']})", flush=True)
    proc = subprocess.Popen([sys.executable, "-m", "llmscratch.training.distributed", *torchrun_args], env=env)
    terms = []  # the SIGTERMs received

    def on_sigterm(signum: int, frame: Any) -> None:
        terms.append(signum)
        if len(terms) == 1:
            print("SIGTERM: the processes save a checkpoint and stop (SIGTERM again to stop waiting)",
                  file=sys.stderr, flush=True)
            proc.send_signal(signal.SIGINT)  # what torchrun passes on as Ctrl-C
        else:
            proc.terminate()

    previous = signal.signal(signal.SIGTERM, on_sigterm) if threading.current_thread() is threading.main_thread() \
        else None
    try:
        try:
            rc = proc.wait()
            if terms:
                return 128 + signal.SIGTERM
            return rc if rc >= 0 else 128 - rc  # killed by a signal: the shell's convention
        except KeyboardInterrupt:
            print("waiting for the processes to save a checkpoint (Ctrl-C again to stop waiting)",
                  file=sys.stderr, flush=True)
        try:
            proc.wait()
            return 130
        except KeyboardInterrupt:
            proc.terminate()
            raise
    finally:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def die_with_parent(parent_pid: Optional[int] = None) -> bool:
    """Have Linux send this process SIGTERM when its parent dies; whether it could be arranged.

    torchrun starts every rank in a session of its own, so a launcher killed outright (SIGKILL,
    which it cannot pass on) would leave the ranks training with no one to collect them. With
    this, they stop at once (the last checkpoint, written atomically, stays whole). On other
    systems, nothing is done. ``parent_pid``: the parent expected; if it has already gone
    (this process was adopted before the call), exit now.
    """
    if not sys.platform.startswith("linux"):
        return False
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1  # <linux/prctl.h>
        if libc.prctl(pr_set_pdeathsig, int(signal.SIGTERM), 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if parent_pid is not None and os.getppid() != parent_pid:
        os._exit(128 + int(signal.SIGTERM))  # the parent died before the request was made
    return True


def describe_failure(rank: int, world_size: int, exitcode: int, signal_name: str) -> str:
    """One line for a rank that failed, as :func:`run_torchrun` prints it."""
    of = f" of {world_size}" if world_size else ""
    if exitcode >= 0:
        return f"rank {rank}{of} exited with code {exitcode} (its error is above)"
    hint = " (out of memory?)" if signal_name == "SIGKILL" else ""
    return f"rank {rank}{of} was killed by {signal_name}{hint}"


def summarize_failures(failures: dict[int, Any], first: int, world_size: int) -> str:
    """The summary line of a failed job, from torchrun's ``ProcessFailure`` of each rank (``exitcode``,
    ``signal_name()``, ``error_file_data``) and the rank that failed first.

    A rank that stopped answering is named as such, with the timeout that noticed it, rather
    than the rank that waited for it and gave up: the waiting rank said who it waited for in
    its error file (:func:`explain_timeout`).
    """
    facts = next((f.error_file_data.get("llmscratch") for f in failures.values()
                  if isinstance(getattr(f, "error_file_data", None), dict)
                  and isinstance(f.error_file_data.get("llmscratch"), dict)), None)
    if facts and facts.get("silent"):
        silent = [int(r) for r in facts["silent"]]
        line = describe_timeout(int(facts["waiting"]), int(facts.get("world_size", world_size)),
                                float(facts["timeout_s"]), silent)
        ended = sorted(r for r in silent if r in failures)
        if ended:
            line += f"; torchrun then ended rank {', '.join(map(str, ended))}"
        return line
    failure = failures[first]
    line = describe_failure(first, world_size, failure.exitcode, failure.signal_name())
    also = sorted(r for r, f in failures.items() if r != first and f.exitcode > 0)
    # torchrun ends the other ranks with SIGTERM, and SIGKILL those still there after its shutdown
    # timeout: a rank that outlived SIGTERM was not running (paused, or stuck in the kernel or a GPU).
    killed = sorted(r for r, f in failures.items() if r != first and f.exitcode == -signal.SIGKILL)
    stopped = sorted(r for r, f in failures.items() if r != first and f.exitcode < 0 and r not in killed)
    if also:
        line += f"; so did rank {', '.join(map(str, also))}"
    if stopped:
        line += f"; torchrun stopped rank {', '.join(map(str, stopped))}"
    if killed:
        line += (f"; rank {', '.join(map(str, killed))} did not end when torchrun asked (SIGTERM) and was killed: "
                 "it had stopped answering, and may be what the others waited for")
    return line


def _world_size(args: Any) -> int:
    """The job's number of processes from torchrun's parsed arguments (0 where it cannot tell)."""
    nodes = str(args.nnodes).split(":")[-1]
    per_node = str(args.nproc_per_node)
    return int(nodes) * int(per_node) if nodes.isdigit() and per_node.isdigit() else 0


def run_torchrun(argv: list[str]) -> int:
    """torchrun (``torch.distributed.run``) with ``argv``, reporting a failure in one line.

    torchrun ends a failed job with its own traceback and a box of every rank's exit code,
    which bury the error the failing rank printed; here the ranks' own output stands, followed
    by which rank failed first and how (or, when a rank stopped answering, that rank rather
    than the one that gave up waiting for it: :func:`summarize_failures`), and the job's exit
    status is the first failed rank's. Run by :func:`launch_torchrun` as
    ``python -m llmscratch.training.distributed``.
    """
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    import logging

    launcher = os.environ.get("LLMSCRATCH_LAUNCHER_PID")
    die_with_parent(int(launcher) if launcher else None)
    # torchrun logs each failed rank's exit code as an error; the line printed below says it once
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(
        lambda record: not str(record.msg).startswith("failed (exitcode"))
    args = parse_args(argv)
    try:
        run(args)
        return 0
    except ChildFailedError as err:
        first, failure = err.get_first_failure()
        print(f"llmscratch: {summarize_failures(err.failures, first, _world_size(args))}", file=sys.stderr, flush=True)
        return failure.exitcode if failure.exitcode > 0 else 128 + abs(failure.exitcode)
    except SignalException as err:  # Ctrl-C or SIGTERM: torchrun has passed it on to the ranks and waited
        return 128 + int(err.sigval)


if __name__ == "__main__":
    sys.exit(run_torchrun(sys.argv[1:]))
