"""Heads: 1, 2, 4, 8 attention heads at a fixed embedding width.

Multi-head attention splits the width C into H heads of C/H dimensions, each with its
own attention pattern, "attending to information from different representation
subspaces". With C fixed, more heads means more patterns but narrower ones, at the same
parameter count. The experiment trains one model per head count on the same batches and
measures the validation loss and how different the heads' patterns are: the mean
pairwise Jensen–Shannon divergence between the heads' attention distributions (in bits,
0 = identical, 1 = disjoint), averaged over query positions, pairs of heads and layers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import torch

from ..inspect import head_diversity
from ...runtime import Runtime
from .common import (
    Log, Progress, Report, Table, base_settings, check_mode, fresh_model, load_data, plot_loss_curves,
    print_progress, probe_batch, pyplot, r4, save_figure, train_model, validation_batches,
)

NAME = "heads"
SUMMARY = "1, 2, 4, 8 heads at a fixed width: validation loss and how different the heads' attention patterns are"

HEAD_COUNTS = {"tiny": (1, 2, 4), "quick": (1, 2, 4, 8), "full": (1, 2, 4, 8, 16)}


@torch.no_grad()
def _diversity(model, x: torch.Tensor) -> list[float | None]:
    """Per layer: the mean pairwise JS divergence between heads on the probe windows ``x (B, T)``."""
    _, weights = model(x, need_weights=True)  # [(B, H, T, T)] per layer
    return [head_diversity(w) for w in weights]


def run(mode: str, out_dir: Path, runtime: Runtime, seed: int = 1337, data_path: str | None = None,
        encoding: str = "utf-8", log: Optional[Log] = print_progress) -> Report:
    """Train one model per head count at a fixed width on the same batches; write the report (loss, head diversity).

    ``log`` gets a line as each model starts and ends (None: silent).
    """
    size = check_mode(mode)
    folder = Path(out_dir) / NAME
    folder.mkdir(parents=True, exist_ok=True)
    data = load_data(size, Path(out_dir) / ".cache", data_path, encoding=encoding)
    val = validation_batches(data, size.context_length, size.eval_windows, seed)
    probe = probe_batch(data, size.context_length, 8, seed).to(runtime.device)  # (8, T)

    runs: list[dict[str, Any]] = []
    progress = Progress(len(HEAD_COUNTS[mode]), log)
    for n_heads in HEAD_COUNTS[mode]:
        cfg = size.model_config(data.vocab_size, n_heads=n_heads)
        model = fresh_model(cfg, seed, runtime)
        div0 = _diversity(model, probe)
        history = train_model(model, data, runtime, steps=size.steps, batch_size=size.batch_size, lr=size.lr,
                              seed=seed, eval_every=size.eval_every, val_batches=val, progress=progress,
                              label=f"heads={n_heads} (head dim {size.emb_dim // n_heads})")
        div1 = _diversity(model, probe)
        mean = None if n_heads == 1 else r4(sum(div1) / len(div1))
        runs.append({
            "n_heads": n_heads, "head_dim": size.emb_dim // n_heads, "params": model.num_parameters(),
            "val_loss": r4(history.final_val_loss),
            "div_init": None if n_heads == 1 else r4(sum(div0) / len(div0)), "div_end": mean,
            "layers": [None if d is None else r4(d) for d in div1],
            "curve": (history.eval_steps, history.val_losses),
        })

    n_layers = size.n_layers
    table = Table(
        "Validation loss and head diversity (mean pairwise Jensen–Shannon divergence between heads, bits)",
        ["heads", "head dim", "parameters", "val loss", "diversity at init", "diversity after training"]
        + [f"layer {i}" for i in range(n_layers)],
        [[r["n_heads"], r["head_dim"], r["params"], r["val_loss"], r["div_init"], r["div_end"]] + r["layers"]
         for r in runs],
    )
    report = Report(
        NAME, "What do several heads buy at a fixed width?",
        f"Models with {', '.join(map(str, HEAD_COUNTS[mode]))} heads and the same embedding width {size.emb_dim} "
        "(so the same parameter count, narrower heads as their number grows) are trained on the same batches from "
        "the same seed. Head diversity is the mean pairwise Jensen–Shannon divergence between the heads' attention "
        "distributions for each query of 8 fixed validation windows, averaged over queries, pairs of heads and "
        "layers: 0 bits means all heads attend alike, 1 bit means they attend to disjoint tokens. A single head has "
        "no pair (n/a).",
        {**base_settings(mode, size, data, runtime, seed), "head counts": ", ".join(map(str, HEAD_COUNTS[mode]))},
        tables=[table], findings=_findings(runs),
    )
    _plot(runs, folder, report)
    report.series = {f"{r['n_heads']}_heads": {"eval_steps": r["curve"][0], "val_loss": [r4(v) for v in r["curve"][1]]}
                     for r in runs}
    report.write(folder)
    return report


def _findings(runs: list[dict[str, Any]]) -> list[str]:
    best = min(runs, key=lambda r: r["val_loss"])
    one = runs[0]
    out = [
        "Validation loss by head count: " + ", ".join(f"{r['n_heads']} → {r['val_loss']}" for r in runs)
        + f"; the best is {best['n_heads']} head{'s' if best['n_heads'] > 1 else ''} "
        + (f"({one['val_loss'] - best['val_loss']:.4f} below a single head)." if best is not one
           else "(more heads did not help at this size and training length).")
        + (" All are within 0.01 nats of each other, too close to call from one seed."
           if max(r["val_loss"] for r in runs) - best["val_loss"] < 0.01 else "")
    ]
    multi = [r for r in runs if r["div_end"] is not None]
    grew = [r for r in multi if r["div_end"] > r["div_init"]]
    out.append(
        "Head diversity after training: " + ", ".join(f"{r['n_heads']} heads {r['div_end']} bits" for r in multi)
        + f" (at initialisation {', '.join(str(r['div_init']) for r in multi)}); training made the heads "
        + ("more different from each other in every model." if len(grew) == len(multi) else
           f"more different in {len(grew)} of {len(multi)} models.")
    )
    if multi:
        last = multi[-1]
        layers = [d for d in last["layers"] if d is not None]
        lo, hi = min(layers), max(layers)
        out.append(f"With {last['n_heads']} heads the layers differ: diversity runs from {lo} to {hi} bits "
                   f"(layer {last['layers'].index(lo)} to layer {last['layers'].index(hi)}).")
    return out


def _plot(runs: list[dict[str, Any]], folder: Path, report: Report) -> None:
    plt = pyplot()
    plot_loss_curves(runs, lambda r: f"{r['n_heads']} head(s) of {r['head_dim']} dims", folder, report,
                     "Validation loss during training, by number of heads")

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    counts = [r["n_heads"] for r in runs]
    axes[0].plot(counts, [r["val_loss"] for r in runs], marker="o")
    axes[0].set_ylabel("final validation loss")
    multi = [r for r in runs if r["div_end"] is not None]
    axes[1].plot([r["n_heads"] for r in multi], [r["div_end"] for r in multi], marker="o", label="after training")
    axes[1].plot([r["n_heads"] for r in multi], [r["div_init"] for r in multi], marker="s", linestyle="--",
                 label="at initialisation")
    axes[1].set_ylabel("head diversity (mean pairwise JS, bits)")
    axes[1].legend()
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts)
        ax.set_xticklabels([str(c) for c in counts])
        ax.set_xlabel("heads")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save_figure(fig, folder / "diversity.png")
    report.plots.append(("diversity.png", "Final validation loss and head diversity against the number of heads"))
