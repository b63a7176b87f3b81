"""``train(cfg)``: one training run, from the options to a saved run directory.

```
setup(cfg)        setup.py: run directory, data, tokenizer, model, optimizer; or the resumed run
run_loop(task)    loop.py: steps (step.py), logging, evaluation, checkpoints, Ctrl-C
finish            the whole validation split, loss.png, FSDP shards consolidated
```

The loop knows the model only through the task (``tasks.py``): pretraining's windows and
next-token loss here, a fine-tuning task's batches and loss elsewhere.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Callable, Optional

import torch

from ..data.tokenizer import Tokenizer
from ..errors import LLMScratchError, Stopped
from ..files import human_bytes
from ..inference.engine import Engine
from ..inference.generate import SamplingConfig
from ..store import sharded
from ..store.rundir import RunDir
from . import distributed as dist
from .config import TrainConfig, warmup_note
from .evaluate import byte_lengths_for
from .loop import LoopState, run_loop, write_metrics
from .setup import NewRun, Run, setup
from .signals import SIGNAL_NAMES, StopFlag, TermAsInterrupt
from .tasks import Pretraining

Log = Callable[[str], None]


def train(cfg: TrainConfig, log: Log = print, given: Optional[set[str]] = None) -> Path:
    """Train a GPT as ``cfg`` says; return the run directory.

    With ``cfg.resume``, continue that run exactly where its last checkpoint left off
    (same batches, same schedule, same RNG): N steps in one go and N/2 + resume + N/2
    give identical weights on the CPU. The saved settings hold, except those that
    ``--resume`` may change (``config.RESUME_MAY_CHANGE``) that were given (``given``: the
    names set by the user, as the CLI passes them; ``None``: those that differ from the
    defaults); any other setting given with a value unlike the saved one is refused, not ignored.

    A new run that fails (or is stopped) before its first checkpoint leaves no folder behind;
    ``<out_dir>/latest`` moves to a new run at its first checkpoint. Ctrl-C (or SIGTERM,
    outside torchrun) saves a checkpoint at the end of the step and then raises
    :class:`errors.Stopped` (a KeyboardInterrupt), so that a caller stops too
    (``llmscratch train && llmscratch generate ...`` does not go on to generate).

    At the end (also after ``--time-budget`` or ``--stop-at``, not after a signal) one sample of
    ``--sample-tokens`` tokens is logged; the evaluations during training log their own, the
    last one's left to it. Under torchrun, a collective that waited ``--dist-timeout`` seconds
    raises :class:`distributed.RankNotAnswering`, naming the rank that stopped answering.
    """
    new_run, stop = NewRun(), StopFlag()
    with TermAsInterrupt():
        try:
            return _train(cfg, log, given, new_run, stop)
        except BaseException as err:
            new_run.remove_if_nothing_saved(log)
            if dist.is_collective_timeout(err):  # name the rank that stopped answering, not this one
                raise dist.explain_timeout(err, cfg.dist_timeout) from err
            raise
        finally:
            stop.release()


def _train(cfg: TrainConfig, log: Log, given: Optional[set[str]], new_run: NewRun, stop: StopFlag) -> Path:
    group = dist.init(cfg.device, cfg.dist_timeout)  # one process unless launched by torchrun
    t_start = time.time()
    if not group.is_main:
        log = lambda *_a, **_k: None  # noqa: E731 - only rank 0 talks
    run = setup(cfg, log, given, new_run, group, t_start)
    cfg = run.cfg  # a resumed run's own settings
    task = Pretraining(run.splits, run.model.cfg.context_length, cfg.batch_size, cfg.grad_accum, run.micro_size,
                       byte_lengths_for(run.tokenizer, run.model.cfg.vocab_size), run.runtime, group,
                       cfg.eval_windows, cfg.seed)
    start_run_directory(run)
    announce(run)
    if cfg.resume and group.is_main:
        # Records past the checkpoint (a run killed after it) are written again by this run: keep one of each.
        run.run_dir.keep_metrics_up_to(int(run.state["step"]))
    sample = None
    if cfg.sample_tokens > 0:
        prompt = sample_prompt_ids(run.tokenizer, cfg.sample_prompt, log if group.is_main else None)
        engine = Engine(run.model, run.tokenizer)  # the model being trained, as it is at each sample
        sample = lambda: sample_text(engine, prompt, cfg.sample_tokens, cfg.seed)  # noqa: E731
    st = run_loop(run, task, stop, sample)
    group.barrier()
    finish(run, task, st, sample)
    if st.stopped_by in SIGNAL_NAMES.values():  # saved and said; the caller stops too (the CLI exits 128 + signum)
        raise Stopped(st.signum or signal.SIGINT, saved=True)
    return run.run_dir.path


def start_run_directory(run: Run) -> None:
    """The run's folder with its settings and tokenizer (rank 0 writes; every rank says where)."""
    if run.group.is_main:
        run.run_dir.path.mkdir(parents=True, exist_ok=True)
        run.run_dir.write_train_config(run.cfg.to_dict())
        run.tokenizer.save(run.run_dir.path)
    run.log(f"run directory: {run.run_dir}")


def announce(run: Run) -> None:
    """What is about to be trained, where and how, in the log's first lines."""
    cfg, model_cfg = run.cfg, run.model.cfg
    if cfg.fsdp and not run.group.active:
        run.log("note: --fsdp shards over the processes torchrun starts; this is one process, so the model is "
                "whole and trained as without it (launch with --nproc N or torchrun to shard)")
    note = warmup_note(cfg)
    if note:
        run.log(f"note: {note}")
    run.log(f"device {run.runtime.device} ({run.runtime.precision}), {run.group.world_size} process(es); "
            f"model {run.model.num_parameters():,} parameters ({model_cfg.n_layers} layers, {model_cfg.n_heads} "
            f"heads, {model_cfg.emb_dim} dims, context {model_cfg.context_length}, {model_cfg.pos_emb} positions, "
            f"{run.loss_label}); tokenizer {run.tokenizer.kind} ({run.tokenizer.vocab_size} tokens); "
            f"{len(run.splits.train):,} training / {len(run.splits.val):,} validation tokens; "
            f"{cfg.batch_size * cfg.grad_accum} windows per step, {run.micro_size} per forward pass on each process")


def finish(run: Run, task: Pretraining, st: LoopState, sample: Optional[Callable[[], str]]) -> None:
    """After the loop: the whole validation split (unless stopped), the closing sample (unless a signal
    stopped the run), loss.png, the FSDP shards made whole."""
    if st.stopped_by:
        run.log(f"stopped by {st.stopped_by} at step {st.step}; checkpoint saved in {run.run_dir} "
                f"(continue with: llmscratch train --resume {run.run_dir})")
    else:
        final = task.evaluate(run.model, final=True)
        write_metrics(run, {"step": st.step, "final": True, "val_loss": final["loss"], "val_ppl": final["ppl"],
                            "val_bpb": final["bpb"], "val_tokens": final["tokens"],
                            "elapsed_s": time.time() - run.t_start})
        run.log(f"final (whole validation split, {final['tokens']:,} tokens): loss {final['loss']:.4f}, "
                f"ppl {final['ppl']:.2f}, {final['bpb']:.4f} bits/byte; {time.time() - run.t_start:.0f} s in all")
    if (sample is not None and st.stopped_by not in SIGNAL_NAMES.values()
            and (run.group.is_main or dist.is_sharded(run.model))):  # the closing sample, once (FSDP: every rank)
        try:
            run.log(f"\n--- generated text ---\n{sample()}\n----------------------")
        except Exception as err:  # the run is saved: a sample that fails must not fail it
            run.log(f"(no sample: {err})")
    run.log(f"peak memory: {peak_memory(run.runtime.device)}")
    if run.group.is_main:  # also after a stop: the curve so far (a resumed run redraws it whole)
        try:
            plot_metrics(run.run_dir)
        except Exception as err:  # a plot must never lose a run
            run.log(f"(could not draw {run.run_dir.plot.name}: {err})")
    dist.cleanup(run.group)
    if run.group.is_main and sharded.latest_is_sharded(run.run_dir.path):
        sharded.consolidate(run.run_dir.path)  # the FSDP shards → the ordinary run-directory files
        run.log(f"consolidated the sharded checkpoint into {run.run_dir}")


def peak_memory(device: torch.device) -> str:
    """The most memory this process held so far: on CUDA the tensors' (``max_memory_allocated``), else
    the process's peak resident memory (``getrusage``'s ``ru_maxrss``: the model, data, Python, all)."""
    if device.type == "cuda":
        return f"{human_bytes(torch.cuda.max_memory_allocated(device))} of GPU memory allocated (CUDA)"
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return f"{human_bytes(peak if sys.platform == 'darwin' else peak * 1024)} resident ({device.type})"


def sample_prompt_ids(tokenizer: Tokenizer, text: str, warn: Optional[Log] = None) -> list[int]:
    """``text`` as tokens for the samples printed while and after training; where the tokenizer
    cannot encode it (characters a char tokenizer never saw) or it is empty, the end-of-text
    token (or token 0) alone, said through ``warn``: a sample must never fail a run that trained."""
    try:
        ids = tokenizer.encode(text)
    except LLMScratchError as err:
        ids = []
        if warn is not None:
            start = tokenizer.eot_id if tokenizer.eot_id is not None else 0
            warn(f"--sample-prompt {text!r} cannot be encoded by this tokenizer: {err}; the samples start "
                 f"from token {start} ({tokenizer.decode([start])!r}) instead")
    return ids or [tokenizer.eot_id if tokenizer.eot_id is not None else 0]


def sample_text(engine: Engine, prompt: list[int], tokens: int, seed: int) -> str:
    """The prompt's last half-context and ``tokens`` sampled after it (temperature 0.8, top-k 50).

    Past the end-of-text token too (``ignore_eos``: every sample is ``tokens`` tokens long); the
    prompt's ids and the new ones are decoded together, in one ``decode``.
    """
    prompt = prompt[-(engine.context_length // 2):]
    sampling = SamplingConfig(max_new_tokens=tokens, temperature=0.8, top_k=50, seed=seed)
    return engine.tokenizer.decode(prompt + engine.generate([prompt], sampling, ignore_eos=True)[0])


def plot_metrics(run_dir: RunDir) -> None:
    """Draw training and validation loss against step from the run's metrics (``loss.png``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = run_dir.read_metrics()
    train_pts = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
    val_pts = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r and not r.get("final")]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    if train_pts:
        ax.plot(*zip(*train_pts), label="train loss")
    if val_pts:
        ax.plot(*zip(*val_pts), marker="o", label="validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = run_dir.plot.with_suffix(".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, run_dir.plot)
