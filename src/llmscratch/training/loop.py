"""The training loop: steps, and around them logging, evaluation, checkpoints and stopping.

```
while step < steps:
    lr = schedule(step)
    train_step(the task's micro-batches, its loss)        # step.py: one optimizer step
    at log steps: the mean training loss, tokens/s        # one host sync, there only
    at eval steps: the task's held-out numbers; best/ weights when they improve
    at checkpoint steps (and on Ctrl-C, SIGTERM, --time-budget, --stop-at): save, resumably
```

A non-finite loss is recorded on the device as it happens (no host sync per step) and stops
the run at the next log step, naming the step and keeping the last good checkpoint.
"""

from __future__ import annotations

import signal
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Optional

import torch

from ..errors import LLMScratchError
from ..store.checkpoint import has_tokenizer_files
from . import distributed as dist
from .config import lr_at
from .setup import Run
from .signals import SIGNAL_NAMES, StopFlag
from .step import set_lr, train_step
from .budget import TimeBudget, save_guess_s
from .tasks import Task


class TrainingDiverged(LLMScratchError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


@dataclass
class LoopState:
    """What changes from step to step (and what a checkpoint saves of it)."""

    step: int
    best_bpb: float
    last_good: Optional[int]  # the step of the last checkpoint written (or resumed from)
    bad_step: torch.Tensor  # the first step whose loss was not finite, -1 for none (on the device)
    loss_sum: torch.Tensor  # training losses since the last log step (on the device)
    loss_count: int = 0
    t_log: float = 0.0
    tokens_since_log: int = 0
    stopped_by: Optional[str] = None  # "Ctrl-C", "SIGTERM", "time budget", "--stop-at"
    signum: Optional[int] = None


class Due(NamedTuple):
    """What is due after a step."""

    log: bool
    eval: bool
    checkpoint: bool
    out_of_time: bool
    stop_now: bool


def start_state(run: Run) -> LoopState:
    """Step 0, or where the resumed checkpoint left off (its random generators restored)."""
    device = run.runtime.device
    st = LoopState(step=0, best_bpb=float("inf"), last_good=None,
                   bad_step=torch.full((), -1, dtype=torch.int64, device=device),
                   loss_sum=torch.zeros((), device=device), t_log=time.time())
    if run.state is not None:
        dist.restore(run.run_dir.path, run.model, run.optimizer, run.state)  # the optimizer (and sharded weights)
        st.step = st.last_good = int(run.state["step"])
        st.best_bpb = float(run.state.get("best_val_bpb", float("inf")))
        set_rng_state(run.state["rng"], run.batch_gen, run)
        if run.scaler is not None and "scaler" in run.state:
            run.scaler.load_state_dict(run.state["scaler"])
    return st


def rng_state(batch_gen: torch.Generator, run: Run) -> dict[str, Any]:
    state = {"batches": batch_gen.get_state(), "torch": torch.get_rng_state()}
    if run.runtime.device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(run.runtime.device)
    return state


def set_rng_state(state: dict[str, Any], batch_gen: torch.Generator, run: Run) -> None:
    batch_gen.set_state(state["batches"])
    torch.set_rng_state(state["torch"])
    if run.runtime.device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], run.runtime.device)


def run_loop(run: Run, task: Task, stop: StopFlag, sample: Optional[Callable[[], str]] = None) -> LoopState:
    """Train from the run's step to ``cfg.steps`` (or until stopped); ``sample()`` text is shown at evaluations
    (but the last: the closing sample follows it)."""
    from tqdm.auto import tqdm

    cfg = run.cfg
    st = start_state(run)
    # The bar only on a terminal: piped into a file its carriage returns run into the log lines.
    # Without it, the training loss is logged every --log-interval steps instead. Its rate is the
    # log's (tokens/s over the last --log-interval steps, set at each log step), not tqdm's own
    # steps per second, so that the two never disagree.
    show_bar = cfg.progress and run.group.is_main and sys.stderr.isatty()
    bar = tqdm(total=cfg.steps, initial=st.step, disable=not show_bar, dynamic_ncols=True, unit="step",
               bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}{postfix}]")
    say = bar.write if show_bar else run.log  # above the progress bar, or as a line
    budget = TimeBudget(cfg.time_budget, run.t_start, save_guess_s(run.model, dist.is_sharded(run.model)),
                        eval_windows=task.eval_windows_count, step_windows=task.local_windows,
                        sample_tokens=cfg.sample_tokens)
    run.model.train()
    with stop:
        while st.step < cfg.steps:
            t_step = time.time()
            lr = lr_at(st.step, cfg)
            set_lr(run.optimizer, lr)
            result = train_step(
                lambda x, y: task.loss(run.forward, x, y), run.model.parameters(), run.optimizer,
                task.micro_batches(run.batch_gen), grad_clip=cfg.grad_clip, autocast=run.runtime.autocast,
                scaler=run.scaler, no_sync=lambda last: dist.maybe_no_sync(run.train_model, run.group, last))
            record_step(st, result.loss, task.tokens_per_step)
            bar.update(1)
            budget.took("step", time.time() - t_step)
            due = what_is_due(run, st, stop, budget)
            if due.log or due.eval or due.checkpoint:
                check_finite(run, st, bar)
            if due.log:
                log_training(run, st, lr, bar, show_bar)
            if due.eval:
                closing = st.step == cfg.steps or due.out_of_time  # the closing sample follows: none here
                evaluate_now(run, task, st, say, None if closing else sample, budget)
            if due.checkpoint:
                t_save = time.time()
                save_checkpoint(run, st)
                budget.took("save", time.time() - t_save)
            if due.stop_now:
                st.signum = stop.signum or signal.SIGINT  # another rank's Ctrl-C: no signal here
                st.stopped_by = SIGNAL_NAMES[st.signum]
                stop.stopping = True  # a Ctrl-C that reaches this rank from now on is this same request
                break
            if due.out_of_time:
                st.stopped_by = "--stop-at" if cfg.stop_at is not None and st.step >= cfg.stop_at else "time budget"
                break
    bar.close()
    return st


def record_step(st: LoopState, loss: torch.Tensor, tokens: int) -> None:
    """Count the step; note (on the device: no host sync) the first one whose loss was not finite."""
    bad_now = ~torch.isfinite(loss)
    st.bad_step = torch.where(bad_now & (st.bad_step < 0), torch.full_like(st.bad_step, st.step), st.bad_step)
    st.loss_sum += loss
    st.loss_count += 1
    st.step += 1
    st.tokens_since_log += tokens


def what_is_due(run: Run, st: LoopState, stop: StopFlag, budget: TimeBudget) -> Due:
    cfg, step = run.cfg, st.step
    at_eval = step % cfg.eval_interval == 0 or step == cfg.steps
    at_ckpt = step % cfg.checkpoint_interval == 0 or step == cfg.steps
    out_of_time = step < cfg.steps and budget.stop_now(time.time(), at_eval=at_eval, at_ckpt=at_ckpt,
                                                         next_eval=(step + 1) % cfg.eval_interval == 0)
    if cfg.stop_at is not None and cfg.stop_at <= step < cfg.steps:
        out_of_time = True
    # Read the Ctrl-C flag once per step: a signal that lands later in this step (during
    # logging, say) is acted on at the next one, never after the checkpoint was skipped.
    # Ctrl-C and the clock are per rank; all ranks must stop at the same step (with one
    # process, any() returns the flags as they are).
    out_of_time, stop_now = run.group.any(out_of_time, stop.requested)
    stopping = out_of_time or stop_now
    return Due(log=stopping or step % cfg.log_interval == 0 or step == cfg.steps, eval=at_eval,
               checkpoint=stopping or at_ckpt, out_of_time=out_of_time, stop_now=stop_now)


def check_finite(run: Run, st: LoopState, bar: Any) -> None:
    """Stop with :class:`TrainingDiverged` if a loss since the last check was not finite (one host sync)."""
    first_bad = int(st.bad_step.item())
    if first_bad < 0:
        return
    where = (f"the last good checkpoint (step {st.last_good}) is kept in {run.run_dir}"
             if st.last_good is not None else "no checkpoint was written"
             + (f" (the best weights so far are in {run.run_dir.best})" if run.new_run.saved else ""))
    bar.close()
    raise TrainingDiverged(f"the training loss became NaN or infinite at step {first_bad + 1}; {where}. "
                           "Try a lower --lr, a smaller --grad-clip, or fp32 precision.")


def log_training(run: Run, st: LoopState, lr: float, bar: Any, show_bar: bool) -> None:
    """The mean training loss since the last log step, over all processes, and tokens/s."""
    group = run.group
    train_loss = (group.all_reduce_sum(st.loss_sum) / (max(1, st.loss_count) * group.world_size)).item()
    tok_s = st.tokens_since_log / max(time.time() - st.t_log, 1e-9)
    bar.set_postfix_str(f"loss {train_loss:.4f}, {tok_s:,.0f} tokens/s")
    if not show_bar:
        run.log(f"step {st.step}: train loss {train_loss:.4f}, lr {lr:.2e}, {tok_s:,.0f} tokens/s")
    write_metrics(run, {"step": st.step, "train_loss": train_loss, "lr": lr, "tokens_per_s": tok_s,
                        "elapsed_s": time.time() - run.t_start})
    st.loss_sum.zero_()
    st.loss_count, st.t_log, st.tokens_since_log = 0, time.time(), 0


def evaluate_now(run: Run, task: Task, st: LoopState, say: Callable[[str], Any],
                 sample: Optional[Callable[[], str]], budget: TimeBudget) -> None:
    """The held-out numbers (and a sample); the best weights saved to ``best/`` when they improve."""
    t_eval = time.time()
    ev = task.evaluate(run.model, final=False)
    budget.took("eval", time.time() - t_eval)
    write_metrics(run, {"step": st.step, "val_loss": ev["loss"], "val_ppl": ev["ppl"], "val_bpb": ev["bpb"],
                        "elapsed_s": time.time() - run.t_start})
    improved = ev["bpb"] < st.best_bpb
    st.best_bpb = min(st.best_bpb, ev["bpb"])
    msg = f"step {st.step}: val loss {ev['loss']:.4f}, ppl {ev['ppl']:.2f}, {ev['bpb']:.4f} bits/byte"
    if sample is not None and (run.group.is_main or dist.is_sharded(run.model)):  # FSDP: all ranks run it
        t_sample = time.time()
        try:
            msg += f"\n  sample: {sample()!r}"
        except Exception as err:  # a sample must never cost the checkpoint saved after it
            msg += f"\n  (no sample: {err})"
        budget.took("sample", time.time() - t_sample)
    say(msg)
    if improved:
        best = run.run_dir.best
        dist.save_weights(best.path, run.model, run.group)
        if run.group.is_main and not has_tokenizer_files(best.path):
            run.tokenizer.save(best.path)  # so that best/ generates on its own
        run.new_run.saved = True


def save_checkpoint(run: Run, st: LoopState) -> None:
    """Weights, optimizer and everything a resume needs, saved whole or not at all (every rank: FSDP saves shards)."""
    state = {"step": st.step, "rng": rng_state(run.batch_gen, run), "best_val_bpb": st.best_bpb,
             "tokens_seen": st.step * run.cfg.batch_size * run.cfg.grad_accum * run.model.cfg.context_length,
             "corpus_sha256": run.corpus_sha}
    if run.scaler is not None:
        state["scaler"] = run.scaler.state_dict()
    dist.save_checkpoint(run.run_dir.path, run.model, run.optimizer, state, run.group)
    if run.group.is_main and not run.cfg.resume and not run.new_run.checkpointed:
        run.run_dir.point_latest()  # the newest run with a checkpoint
    run.new_run.saved = run.new_run.checkpointed = True
    st.last_good = st.step


def write_metrics(run: Run, record: dict[str, Any]) -> None:
    if run.group.is_main:
        run.run_dir.append_metrics(record)
