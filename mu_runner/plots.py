"""PNG plots a person reads: accuracies of the three models, per-stage weight change."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

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
