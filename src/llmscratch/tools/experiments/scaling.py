"""Scaling: train identical models with and without the 1/√d_k factor on the scores.

Why the factor: with queries and keys of unit-variance entries, a dot product over d
dimensions has variance d, so the scores' spread grows like √d. Wide-spread scores push
softmax towards one-hot, where its gradient vanishes. Dividing by √d keeps the spread
near 1 whatever the head size.

The experiment keeps the embedding width fixed and changes the number of heads, so the
head dimension changes while the parameter count stays the same; each head dimension is
trained twice from the same initial weights and the same batches, once with and once
without the scaling. It measures the validation loss curves, the standard deviation of
the pre-softmax scores (at initialisation and after training), the entropy of the
attention weights per layer (how close softmax is to one-hot) and the gradient norms.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from ..inspect import attention_entropy, attention_scores, score_std, uniform_entropy
from ...runtime import Runtime
from .common import (
    ExperimentData, Log, Progress, Report, Table, base_settings, check_mode, fresh_model, load_data, pct,
    print_progress, probe_batch, pyplot, r4, save_figure, sig, train_model, validation_batches,
)

NAME = "scaling"
SUMMARY = "train with and without the 1/sqrt(d_k) score scaling at several head sizes: loss, score spread, entropy, gradients"

HEAD_DIMS = {"tiny": (8, 32), "quick": (8, 16, 64), "full": (16, 64, 256)}


def _measure(model, x) -> tuple[list[float], list[float]]:
    """Per layer: the std of the visible pre-softmax scores and the attention entropy (nats)."""
    scores = attention_scores(model, x)  # [(B, H, T, T)] per layer
    stds = [score_std(s) for s in scores]
    entropies = [attention_entropy(s.softmax(dim=-1)) for s in scores]
    return stds, entropies


def run(mode: str, out_dir: Path, runtime: Runtime, seed: int = 1337, data_path: str | None = None,
        encoding: str = "utf-8", log: Optional[Log] = print_progress) -> Report:
    """Train each head size with and without the 1/√d_k factor from the same start; write the report.

    ``log`` gets a line as each model starts and ends (None: silent).
    """
    size = check_mode(mode)
    folder = Path(out_dir) / NAME
    folder.mkdir(parents=True, exist_ok=True)
    data: ExperimentData = load_data(size, Path(out_dir) / ".cache", data_path, encoding=encoding)
    val = validation_batches(data, size.context_length, size.eval_windows, seed)
    probe = probe_batch(data, size.context_length, 8, seed).to(runtime.device)  # (8, T)

    runs: list[dict[str, Any]] = []
    progress = Progress(2 * len(HEAD_DIMS[mode]), log)
    for head_dim in HEAD_DIMS[mode]:
        n_heads = size.emb_dim // head_dim
        for scaled in (True, False):
            cfg = size.model_config(data.vocab_size, n_heads=n_heads, scale_attn=scaled)
            model = fresh_model(cfg, seed, runtime)
            std0, _ = _measure(model, probe)
            history = train_model(model, data, runtime, steps=size.steps, batch_size=size.batch_size, lr=size.lr,
                                  seed=seed, eval_every=size.eval_every, val_batches=val, progress=progress,
                                  label=f"d_k={head_dim} ({n_heads} head{'s' if n_heads > 1 else ''}), "
                                        f"{'scaled' if scaled else 'unscaled'}")
            std1, ent1 = _measure(model, probe)
            half = len(history.grad_norms) // 2
            runs.append({
                "head_dim": head_dim, "n_heads": n_heads, "scaled": scaled,
                "val_loss": r4(history.final_val_loss),
                "std_init": sig(sum(std0) / len(std0)), "std_end": sig(sum(std1) / len(std1)),
                "entropy": r4(sum(ent1) / len(ent1)),
                "grad_norm": sig(sum(history.grad_norms[half:]) / max(1, len(history.grad_norms) - half)),
                "qkv_grad_norm": sig(sum(history.qkv_grad_norms[half:]) / max(1, len(history.qkv_grad_norms) - half)),
                "layers": [(i, sig(s), r4(e)) for i, (s, e) in enumerate(zip(std1, ent1))],
                "curve": (history.eval_steps, history.val_losses),
                "grad_curve": history.grad_norms, "qkv_grad_curve": history.qkv_grad_norms,
            })

    uniform = r4(uniform_entropy(size.context_length))
    summary = Table(
        "Summary (score std and entropy: mean over layers; gradient norms: mean over the second half of training)",
        ["head dim", "heads", "scaled", "val loss", "score std at init", "score std after", "entropy (nats)",
         "grad norm", "Q/K/V grad norm"],
        [[r["head_dim"], r["n_heads"], r["scaled"], r["val_loss"], r["std_init"], r["std_end"], r["entropy"],
          r["grad_norm"], r["qkv_grad_norm"]] for r in runs],
    )
    per_layer = Table(
        f"Per layer, after training (uniform attention over the visible keys would have entropy {uniform})",
        ["head dim", "scaled", "layer", "score std", "entropy (nats)"],
        [[r["head_dim"], r["scaled"], layer, s, e] for r in runs for layer, s, e in r["layers"]],
    )
    report = Report(
        NAME, "Does the 1/√d_k scaling matter?",
        "Identical models (same width, same initial weights, same batches) are trained with the attention "
        "scores multiplied by 1/√d_k and without it, at several head dimensions d_k (the number of heads "
        "changes with d_k so the parameter count stays the same). Compared: validation loss, the spread "
        "of the scores that go into softmax, how peaked the attention weights are (entropy), and the "
        "gradient norms.",
        {**base_settings(mode, size, data, runtime, seed), "head dimensions": ", ".join(map(str, HEAD_DIMS[mode]))},
        tables=[summary, per_layer],
        findings=_findings(runs, uniform),
    )
    _plot(runs, folder, report)
    report.series = {
        f"d{r['head_dim']}_{'scaled' if r['scaled'] else 'unscaled'}": {
            "eval_steps": r["curve"][0], "val_loss": [r4(v) for v in r["curve"][1]],
            "grad_norm": [sig(v) for v in r["grad_curve"]], "qkv_grad_norm": [sig(v) for v in r["qkv_grad_curve"]],
        } for r in runs
    }
    report.write(folder)
    return report


def _findings(runs: list[dict[str, Any]], uniform: float) -> list[str]:
    by = {(r["head_dim"], r["scaled"]): r for r in runs}
    dims = sorted({r["head_dim"] for r in runs})
    small, big = dims[0], dims[-1]
    s_small, u_small, s_big, u_big = by[small, True], by[small, False], by[big, True], by[big, False]
    out = []
    growth = u_big["std_init"] / max(s_big["std_init"], 1e-12)
    out.append(
        f"At initialisation the unscaled scores spread {growth:.1f}× wider than the scaled ones at d_k = {big} "
        f"(std {u_big['std_init']} vs {s_big['std_init']}); from d_k = {small} to {big} the unscaled spread goes "
        f"from {u_small['std_init']} to {u_big['std_init']} ({u_big['std_init'] / max(u_small['std_init'], 1e-12):.1f}×, "
        f"√({big}/{small}) = {(big / small) ** 0.5:.1f}×) and the scaled one from {s_small['std_init']} to "
        f"{s_big['std_init']}."
    )
    verdicts = []
    for d in dims:
        s, u = by[d, True], by[d, False]
        diff = u["val_loss"] - s["val_loss"]
        word = "worse" if diff > 0 else "better"
        verdicts.append(f"d_k = {d}: {u['val_loss']} without vs {s['val_loss']} with ({abs(diff):.4f} {word})")
    gaps = [by[d, False]["val_loss"] - by[d, True]["val_loss"] for d in dims]
    trend = ("the cost of leaving the scaling out grows with the head dimension" if gaps[-1] > max(gaps[0], 0)
             else "at this training length leaving the scaling out costs nothing that grows with the head dimension")
    out.append("Validation loss without the scaling, " + "; ".join(verdicts) + f"; {trend}.")
    out.append(
        f"After training, attention entropy at d_k = {big} is {u_big['entropy']} nats without the scaling and "
        f"{s_big['entropy']} with it (uniform would be {uniform}); the score spread is {u_big['std_end']} vs "
        f"{s_big['std_end']}, and the mean Q/K/V gradient norm {u_big['qkv_grad_norm']} vs {s_big['qkv_grad_norm']} "
        f"({pct(u_big['qkv_grad_norm'], s_big['qkv_grad_norm'])}): "
        + ("the unscaled model's attention is more peaked."
           if u_big["entropy"] < s_big["entropy"] else "the unscaled model's attention is not more peaked here.")
    )
    return out


def _plot(runs: list[dict[str, Any]], folder: Path, report: Report) -> None:
    plt = pyplot()
    dims = sorted({r["head_dim"] for r in runs})
    colours = dict(zip(dims, plt.rcParams["axes.prop_cycle"].by_key()["color"]))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        steps, losses = r["curve"]
        ax.plot(steps, losses, color=colours[r["head_dim"]], linestyle="-" if r["scaled"] else "--",
                marker="o", markersize=3,
                label=f"d_k={r['head_dim']} ({r['n_heads']} heads), {'scaled' if r['scaled'] else 'unscaled'}")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    ax.set_title("validation loss: solid = 1/√d_k, dashed = no scaling")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, folder / "loss_curves.png")
    report.plots.append(("loss_curves.png", "Validation loss during training, with (solid) and without (dashed) the scaling"))

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    n_layers = len(runs[0]["layers"])
    width = 0.8 / len(runs)
    for i, r in enumerate(runs):
        xs = [layer + (i - len(runs) / 2 + 0.5) * width for layer in range(n_layers)]
        style = dict(color=colours[r["head_dim"]], hatch="" if r["scaled"] else "//", edgecolor="black",
                     label=f"d_k={r['head_dim']} {'scaled' if r['scaled'] else 'unscaled'}")
        axes[0].bar(xs, [s for _, s, _ in r["layers"]], width, **style)
        axes[1].bar(xs, [e for _, _, e in r["layers"]], width, **style)
    for ax, label in zip(axes, ("std of pre-softmax scores", "attention entropy (nats)")):
        ax.set_xticks(range(n_layers))
        ax.set_xticklabels([f"layer {i}" for i in range(n_layers)])
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, axis="y")
    axes[1].legend(fontsize=7)
    fig.suptitle("after training: score spread and attention entropy per layer (hatched = no scaling)")
    fig.tight_layout()
    save_figure(fig, folder / "scores_entropy.png")
    report.plots.append(("scores_entropy.png", "Spread of the scores and entropy of the weights per layer, after training"))

    fig, ax = plt.subplots(figsize=(7, 4.2))
    for r in runs:
        curve = r["qkv_grad_curve"]
        k = max(1, len(curve) // 40)  # a moving average keeps the plot readable
        smooth = [sum(curve[max(0, i - k + 1): i + 1]) / len(curve[max(0, i - k + 1): i + 1]) for i in range(len(curve))]
        ax.plot(range(1, len(curve) + 1), smooth, color=colours[r["head_dim"]],
                linestyle="-" if r["scaled"] else "--", label=f"d_k={r['head_dim']} {'scaled' if r['scaled'] else 'unscaled'}")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm of the Q/K/V projections")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, folder / "grad_norms.png")
    report.plots.append(("grad_norms.png", "Gradient norm of the Q/K/V projection weights per step (moving average)"))
