"""Batching: what batches do to the matrix operations, and what they do to training.

A batch stacks B sequences into ``(B, T)``; every matrix product of the model then runs
on ``(B, T, C)`` or ``(B, H, T, T)`` tensors, treating the batch axis as independent
copies. Two questions:

* Training: at a fixed budget of tokens, bigger batches mean fewer, larger steps. How
  do throughput (tokens per second) and the final loss change with the batch size?
* Independence: attention mixes tokens along T, never along B. The outputs for one
  sequence must not change when its batch-mates change. Measured: the largest absolute
  difference of one sequence's logits between batches that share only that sequence,
  for both attention backends, next to a control that changes one of its own tokens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ...nn.model import GPT
from ...runtime import Runtime
from .common import (
    Log, Progress, Report, Table, base_settings, check_mode, fresh_model, load_data, plot_loss_curves,
    print_progress, probe_batch, pyplot, r4, save_figure, sig, train_model, validation_batches,
)

NAME = "batching"
SUMMARY = "throughput and final loss against batch size at a fixed token budget; batch-mates never change a sequence's outputs"

BATCH_SIZES = {"tiny": (4, 8), "quick": (4, 8, 16, 32, 64), "full": (8, 16, 32, 64, 128)}


@torch.no_grad()
def independence(model: GPT, windows: torch.Tensor, others: torch.Tensor) -> list[tuple[str, float]]:
    """Max |difference| of sequence 0's logits between batches that share only that sequence.

    ``windows (B, T)``: sequence 0 and its batch-mates; ``others (B, T)``: different
    windows whose rows 1.. replace the batch-mates. Each comparison is done with the
    fused backend (``model(x)``) and the explicit one (``need_weights=True``). The
    control changes one token of sequence 0 itself, to show the measurement sees a change.
    """
    model.eval()

    def fused(x: torch.Tensor) -> torch.Tensor:
        return model(x)[0].float()  # (T, V): sequence 0's logits

    def explicit(x: torch.Tensor) -> torch.Tensor:
        return model(x, need_weights=True)[0][0].float()  # (T, V)

    swapped = torch.cat([windows[:1], others[1:]])  # (B, T): same sequence 0, new batch-mates
    alone = windows[:1]  # (1, T)
    changed = windows.clone()
    changed[0, 0] = (changed[0, 0] + 1) % model.cfg.vocab_size  # its first token altered
    out = []
    for name, fn in (("fused", fused), ("explicit", explicit)):
        ref = fn(windows)
        out.append((f"batch-mates replaced ({name} attention)", (fn(swapped) - ref).abs().max().item()))
        out.append((f"sequence alone in a batch of 1 ({name} attention)", (fn(alone) - ref).abs().max().item()))
    out.append(("control: one token of the sequence itself changed (fused)",
                (fused(changed) - fused(windows)).abs().max().item()))
    return out


def run(mode: str, out_dir: Path, runtime: Runtime, seed: int = 1337, data_path: str | None = None,
        encoding: str = "utf-8", log: Optional[Log] = print_progress) -> Report:
    """Train one model per batch size on the same token budget, then check batch independence; write the report.

    ``log`` gets a line as each model starts and ends (None: silent).
    """
    size = check_mode(mode)
    folder = Path(out_dir) / NAME
    folder.mkdir(parents=True, exist_ok=True)
    data = load_data(size, Path(out_dir) / ".cache", data_path, encoding=encoding)
    t = size.context_length
    val = validation_batches(data, t, size.eval_windows, seed)
    budget = size.steps * size.batch_size * t  # tokens seen by every model

    runs: list[dict[str, Any]] = []
    model = None
    progress = Progress(len(BATCH_SIZES[mode]), log)
    for b in BATCH_SIZES[mode]:
        steps = max(1, budget // (b * t))
        cfg = size.model_config(data.vocab_size)
        model = fresh_model(cfg, seed, runtime)
        history = train_model(model, data, runtime, steps=steps, batch_size=b, lr=size.lr, seed=seed,
                              eval_every=max(1, steps // 8), val_batches=val, progress=progress,
                              label=f"batch={b}")
        runs.append({
            "batch": b, "steps": steps, "tokens": history.tokens, "val_loss": r4(history.final_val_loss),
            "tok_s": int(round(history.tokens_per_second)), "step_ms": sig(1000 * history.train_seconds / steps),
            "curve": ([s * b * t for s in history.eval_steps], history.val_losses),
        })

    windows = probe_batch(data, t, 8, seed).to(runtime.device)  # (8, T)
    others = probe_batch(data, t, 8, seed + 100).to(runtime.device)  # (8, T), other windows
    checks = [(name, sig(diff)) for name, diff in independence(model, windows, others)]

    train_table = Table(
        f"Training at a fixed budget of {budget:,} tokens (same peak learning rate for every batch size)",
        ["batch size", "steps", "tokens", "val loss", "tokens/s", "ms per step"],
        [[r["batch"], r["steps"], r["tokens"], r["val_loss"], r["tok_s"], r["step_ms"]] for r in runs],
    )
    check_table = Table(
        f"Do batch-mates change a sequence's outputs? Max |difference| of its logits (model trained with batch "
        f"size {runs[-1]['batch']}, 8 windows of {t} tokens)",
        ["comparison", "max abs difference"],
        [[name, diff] for name, diff in checks],
    )
    settings = base_settings(mode, size, data, runtime, seed)
    settings["training"] = (f"{budget:,} tokens per model, batch sizes {', '.join(map(str, BATCH_SIZES[mode]))} "
                            f"(steps = budget / (batch × {t})), AdamW, peak lr {size.lr}, warmup then cosine decay")
    report = Report(
        NAME, "What do batches do?",
        "The same model is trained with different batch sizes on the same number of tokens, so a bigger batch "
        "takes fewer, larger steps; throughput is measured over the training steps only. Then one sequence is "
        "run inside different batches to show that attention never mixes sequences of a batch.",
        settings, tables=[train_table, check_table], findings=_findings(runs, checks),
    )
    _plot(runs, folder, report)
    report.series = {f"batch_{r['batch']}": {"tokens": r["curve"][0], "val_loss": [r4(v) for v in r["curve"][1]]}
                     for r in runs}
    report.write(folder)
    return report


def _findings(runs: list[dict[str, Any]], checks: list[tuple[str, float]]) -> list[str]:
    small, large = runs[0], runs[-1]
    best = min(runs, key=lambda r: r["val_loss"])
    out = [
        f"Throughput rises from {small['tok_s']} tokens/s at batch {small['batch']} to {large['tok_s']} at batch "
        f"{large['batch']} ({large['tok_s'] / max(small['tok_s'], 1):.1f}×): larger matrix products use the "
        "hardware better and the per-step overhead is paid fewer times."
        if large["tok_s"] > small["tok_s"] else
        f"Throughput does not rise with the batch size here ({small['tok_s']} tokens/s at batch {small['batch']}, "
        f"{large['tok_s']} at batch {large['batch']}): the hardware is already saturated by the small batch.",
        "At the same token budget the final validation loss is " + ", ".join(f"{r['val_loss']} (batch {r['batch']})" for r in runs)
        + f": the best is batch {best['batch']}; "
        + ("the largest batch takes too few steps to catch up." if best is not large else
           "more tokens per step did not hurt at this budget."),
    ]
    same = max(diff for name, diff in checks if not name.startswith("control"))
    control = next(diff for name, diff in checks if name.startswith("control"))
    how = ("leaves its logits bit for bit the same (max |difference| 0.0)" if same == 0 else
           f"changes its logits by at most {same}, float32 rounding (matrix kernels may sum in another order "
           "for another batch shape)")
    out.append(
        f"Replacing a sequence's batch-mates or running it alone {how}, while changing one of its own tokens "
        f"changes them by {control}: the sequences of a batch do not see each other."
        if same < 1e-3 else
        f"Replacing a sequence's batch-mates changed its logits by {same}: something mixes the batch, a bug."
    )
    return out


def _plot(runs: list[dict[str, Any]], folder: Path, report: Report) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    sizes = [r["batch"] for r in runs]
    axes[0].plot(sizes, [r["tok_s"] for r in runs], marker="o")
    axes[0].set_ylabel("training throughput (tokens/s)")
    axes[1].plot(sizes, [r["val_loss"] for r in runs], marker="o", color="tab:orange")
    axes[1].set_ylabel("final validation loss")
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.set_xlabel("batch size")
        ax.grid(alpha=0.3)
    fig.suptitle("same number of training tokens for every batch size")
    fig.tight_layout()
    save_figure(fig, folder / "throughput_loss.png")
    report.plots.append(("throughput_loss.png", "Throughput and final validation loss against batch size"))

    plot_loss_curves(runs, lambda r: f"batch {r['batch']}", folder, report,
                     "Validation loss against training tokens seen, by batch size", xlabel="training tokens seen")
