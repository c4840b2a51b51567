"""PNG plots a person reads: accuracies of the three models, per-stage weight change."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

KEYS = ("forget_acc", "retain_acc", "test_acc", "mia_efficacy")


def run_plots(m: dict, out: Path) -> None:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.5))
    models = [("original", m["original"]), ("unlearned", m), ("retrained", m["retrain"])]
    width = 0.8 / len(models)
    for i, (name, s) in enumerate(models):
        if s is None:
            continue
        vals = [s.get(k) or 0.0 for k in KEYS]
        ax1.bar([j + i * width for j in range(len(KEYS))], vals, width, label=name)
    ax1.set_xticks([j + width for j in range(len(KEYS))], [k.replace("_", "\n") for k in KEYS])
    ax1.set_ylim(0, 1.05)
    ax1.legend(fontsize=8)
    ax1.set_title(f"{m['method']}: accuracies and MIA")
    stages = list(m["layer_change"])
    ax2.bar(stages, [m["layer_change"][s] for s in stages], color="tab:red")
    ax2.set_ylabel("||W_u - W_o|| / ||W_o||")
    ax2.set_title("relative weight change per stage")
    ax2.tick_params(axis="x", rotation=45)
    fig.tight_layout()
    fig.savefig(out / "summary.png", dpi=100)
    plt.close(fig)


def embedding_plot(before, after, labels, forget_classes, out: Path, seed: int = 0, title: str = "") -> Path:
    """t-SNE of penultimate features, original (left) and unlearned (right), coloured by class.

    Each panel is its own 2-D embedding (seeded, PCA init) of the same images; forgotten classes are
    drawn as large black-edged crosses so a user sees whether their cluster dissolved.
    """
    import numpy as np
    from sklearn.manifold import TSNE

    labels = np.asarray(labels)
    forget = np.isin(labels, forget_classes or [])
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.6))
    cmap = plt.get_cmap("tab10" if labels.max() < 10 else "tab20")
    for ax, feats, name in ((axes[0], before, "original"), (axes[1], after, "unlearned")):
        perplexity = float(min(30, max(2, (len(labels) - 1) // 3)))
        xy = TSNE(2, perplexity=perplexity, init="pca", random_state=seed).fit_transform(np.asarray(feats, dtype=np.float64))
        colours = cmap(labels % cmap.N)
        ax.scatter(xy[~forget, 0], xy[~forget, 1], c=colours[~forget], s=8, alpha=0.7)
        ax.scatter(xy[forget, 0], xy[forget, 1], c=colours[forget], s=40, marker="X", edgecolors="black",
                   linewidths=0.6, label=f"forgotten classes {list(forget_classes)}" if forget.any() else None)
        ax.set_title(f"{name}: t-SNE of penultimate features")
        ax.set_xticks([])
        ax.set_yticks([])
        if forget.any():
            ax.legend(fontsize=8, loc="best")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = out / "embedding.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
