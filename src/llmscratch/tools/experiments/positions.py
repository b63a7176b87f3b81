"""Positions: learned absolute, sinusoidal, RoPE, ALiBi and no position signal at equal size.

Attention is blind to order, so a GPT adds position information (see ``positions.py``).
The models here differ only in that: same width, depth, heads, initial seed and batches.
Besides the validation loss at the training context T, each model is evaluated on
windows 2× and 4× longer than anything it saw in training. Learned absolute embeddings
have no vector past position T-1, so they cannot be run there (reported as n/a); the
others can, and the loss at each position shows whether they still work past T.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ...nn.positions import POSITION_KINDS
from ...runtime import Runtime
from .common import (
    Log, Progress, Report, Table, base_settings, check_mode, fresh_model, load_data, loss_by_position, mean_loss,
    print_progress, pyplot, r4, plot_loss_curves, save_figure, train_model, validation_batches,
)

NAME = "positions"
SUMMARY = "learned, sinusoidal, RoPE, ALiBi and no positions at equal size: loss, and loss past the training context"

LONGER = (2, 4)  # evaluation windows this many times the training context


def run(mode: str, out_dir: Path, runtime: Runtime, seed: int = 1337, data_path: str | None = None,
        encoding: str = "utf-8", log: Optional[Log] = print_progress) -> Report:
    """Train one model per position kind, evaluate it at and past the training context; write the report.

    ``log`` gets a line as each model starts and ends (None: silent).
    """
    size = check_mode(mode)
    folder = Path(out_dir) / NAME
    folder.mkdir(parents=True, exist_ok=True)
    data = load_data(size, Path(out_dir) / ".cache", data_path, encoding=encoding, longest=max(LONGER) * size.context_length)
    t = size.context_length
    val = validation_batches(data, t, size.eval_windows, seed)
    # Longer windows, as many tokens in all as the normal validation set (at least 4 windows).
    longer = {k: validation_batches(data, k * t, max(4, size.eval_windows // k), seed) for k in LONGER}

    runs: list[dict[str, Any]] = []
    progress = Progress(len(POSITION_KINDS), log)
    for kind in POSITION_KINDS:
        cfg = size.model_config(data.vocab_size, pos_emb=kind)
        model = fresh_model(cfg, seed, runtime)
        history = train_model(model, data, runtime, steps=size.steps, batch_size=size.batch_size, lr=size.lr,
                              seed=seed, eval_every=size.eval_every, val_batches=val, progress=progress,
                              label=f"positions={kind}")
        row: dict[str, Any] = {"kind": kind, "params": model.num_parameters(), "val_loss": r4(history.final_val_loss),
                               "curve": (history.eval_steps, history.val_losses)}
        for k in LONGER:
            row[f"loss_{k}x"] = None if kind == "learned" else r4(mean_loss(model, longer[k], runtime))
        if kind == "learned":
            row["past_t"] = None
            row["by_position"] = loss_by_position(model, val, runtime)
        else:
            by_pos = loss_by_position(model, longer[LONGER[-1]], runtime)
            row["by_position"] = by_pos
            row["past_t"] = r4(sum(by_pos[t:]) / len(by_pos[t:]))
        runs.append(row)

    k_max = LONGER[-1]
    table = Table(
        f"Validation loss (nats/token) at the training context T = {t} and on longer windows",
        ["positions", "parameters", f"loss, T = {t}"] + [f"loss, {k}T = {k * t}" for k in LONGER]
        + [f"loss at positions ≥ T in {k_max}T windows"],
        [[r["kind"], r["params"], r["val_loss"]] + [r[f"loss_{k}x"] for k in LONGER] + [r["past_t"]] for r in runs],
    )
    report = Report(
        NAME, "Which way of telling attention about positions works, and which still works past the training length?",
        "Five models that differ only in their position signal are trained on the same batches from the same "
        "seed: learned absolute embeddings (GPT-2), fixed sinusoidal embeddings, RoPE, ALiBi, and none at all. "
        f"Each is evaluated at the training context and on windows {' and '.join(f'{k}×' for k in LONGER)} "
        "longer; learned embeddings have no vectors past the context, so they get n/a there.",
        base_settings(mode, size, data, runtime, seed),
        tables=[table], findings=_findings(runs, t, k_max),
    )
    _plot(runs, folder, report, t, k_max)
    report.series = {r["kind"]: {"eval_steps": r["curve"][0], "val_loss": [r4(v) for v in r["curve"][1]],
                                 "loss_by_position": [r4(v) for v in r["by_position"]]} for r in runs}
    report.write(folder)
    return report


def _findings(runs: list[dict[str, Any]], t: int, k_max: int) -> list[str]:
    ranked = sorted(runs, key=lambda r: r["val_loss"])
    out = [
        "At the training context the order is " + ", ".join(f"{r['kind']} {r['val_loss']}" for r in ranked)
        + f" (best to worst; the spread is {ranked[-1]['val_loss'] - ranked[0]['val_loss']:.4f} nats)."
    ]
    none = next(r for r in runs if r["kind"] == "none")
    best_other = min((r for r in runs if r["kind"] != "none"), key=lambda r: r["val_loss"])
    out.append(
        f"With no position signal the loss is {none['val_loss']}, "
        + (f"{none['val_loss'] - best_other['val_loss']:.4f} above the best ({best_other['kind']}): "
           "the causal mask alone leaves the model some sense of order but not all of it."
           if none["val_loss"] > best_other["val_loss"] + 0.02 else
           f"within 0.02 nats of the best ({best_other['kind']}, {best_other['val_loss']}): at this size and training "
           "length the causal mask alone gives the model nearly all the sense of order it uses.")
    )
    extrap = [r for r in runs if r["past_t"] is not None]
    held = [r["kind"] for r in extrap if r["past_t"] <= r["val_loss"] + 0.05]
    broke = [f"{r['kind']} ({r['val_loss']} → {r['past_t']})" for r in extrap if r["past_t"] > r["val_loss"] + 0.05]
    sentence = f"Past the training length (positions ≥ T in {k_max}T windows), "
    sentence += (f"{', '.join(held)} stay within 0.05 nats of their loss at T" if held else "no method stays within 0.05 nats of its loss at T")
    sentence += (f", while {', '.join(broke)} degrade" if broke else "") + "; learned embeddings cannot be run there at all."
    out.append(sentence)
    return out


def _plot(runs: list[dict[str, Any]], folder: Path, report: Report, t: int, k_max: int) -> None:
    plt = pyplot()
    plot_loss_curves(runs, lambda r: r["kind"], folder, report,
                     "Validation loss during training, by position method")

    fig, ax = plt.subplots(figsize=(8, 4.2))
    for r in runs:
        by_pos = r["by_position"]
        k = max(1, t // 16)  # a moving average over k positions
        smooth = [sum(by_pos[max(0, i - k + 1): i + 1]) / len(by_pos[max(0, i - k + 1): i + 1]) for i in range(len(by_pos))]
        ax.plot(range(len(by_pos)), smooth, label=r["kind"] + (" (cannot go past T)" if r["kind"] == "learned" else ""))
    ax.axvline(t - 0.5, color="black", linestyle=":", label=f"training context T = {t}")
    ax.set_xlabel("position in the window")
    ax.set_ylabel("loss (nats/token, moving average)")
    ax.set_title(f"loss by position on windows {k_max}× the training context")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, folder / "loss_by_position.png")
    report.plots.append(("loss_by_position.png", f"Loss at each position of {k_max}T-token windows; the dotted line is the training context"))
