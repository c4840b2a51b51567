"""The removed-classes study (Liao & Lin, IEEE ISM 2024) from the rows of `mu_runner.report`.

Does the network change more as more classes are removed, where does the change sit, and do the
features still encode the forgotten classes? For every method run at several k (class forgetting):
a table per k (mean ± std over seeds, gap to the paired retrain), Spearman's ρ of the change
against k, the stage ranking of the change, and four PNG plots. Plain rows in, text and files out.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path

STAGE_KEYS = ("layer_change", "feature_shift_retain", "feature_shift_forget")
ACCS = ("forget_acc", "retain_acc", "test_acc")


def mean_std(values: list) -> tuple[float, float] | None:
    """(mean, sample std) of the non-None values; std 0 for one value; None for none."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None
    return statistics.fmean(vals), (statistics.stdev(vals) if len(vals) > 1 else 0.0)


def scaling_groups(rows: list[dict]) -> dict[tuple[str, str, str], list[dict]]:
    """(data, backbone, method) -> its class-forgetting runs, for methods run at two or more k."""
    groups: dict[tuple[str, str, str], list[dict]] = {}
    for r in rows:
        if r.get("k") is not None:
            groups.setdefault((r["data"], r["backbone"], r["method"]), []).append(r)
    return {key: runs for key, runs in sorted(groups.items()) if len({r["k"] for r in runs}) >= 2}


def stages(runs: list[dict], key: str = "layer_change") -> list[str]:
    """Stage names of `key/<stage>` columns, in network order (first seen)."""
    return list(dict.fromkeys(c.split("/", 1)[1] for r in runs for c in r if c.startswith(key + "/")))


def spearman(x: list[float], y: list[float]) -> tuple[float, float]:
    """Spearman's ρ and its two-sided p-value; nan where either side is constant."""
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y, strict=True) if a is not None and b is not None]
    if len(pairs) < 3 or len({a for a, _ in pairs}) < 2 or len({b for _, b in pairs}) < 2:
        return math.nan, math.nan
    res = spearmanr([a for a, _ in pairs], [b for _, b in pairs])
    return float(res.statistic), float(res.pvalue)


def _mean(values) -> float | None:
    ms = mean_std(list(values))
    return None if ms is None else ms[0]


def _std(values) -> float:
    ms = mean_std(list(values))
    return 0.0 if ms is None else ms[1]


def by_k(runs: list[dict]) -> dict[int, list[dict]]:
    out: dict[int, list[dict]] = {}
    for r in runs:
        out.setdefault(int(r["k"]), []).append(r)
    return dict(sorted(out.items()))


def mean_shift(r: dict, key: str) -> float | None:
    """Mean over stages of one run's feature shift on `key` (retain or forget samples)."""
    return _mean(v for c, v in r.items() if c.startswith(key + "/"))


def trend(runs: list[dict], metric) -> tuple[float, float]:
    """Spearman's ρ of metric(run) against k over every run (seeds included)."""
    return spearman([r["k"] for r in runs], [metric(r) for r in runs])


def verdict(rho: float, p: float, what: str) -> str:
    if math.isnan(rho):
        return f"{what}: no statistic (constant or too few runs)"
    if p < 0.05:
        shown = "p < 0.001" if p < 0.001 else f"p = {p:.3f}"
        return f"{what} {'increases' if rho > 0 else 'decreases'} with k (Spearman's ρ = {rho:+.2f}, {shown})"
    return f"{what} shows no monotone trend in k (Spearman's ρ = {rho:+.2f}, p = {p:.2f})"


def concentration(runs: list[dict]) -> tuple[list[tuple[str, float]], float]:
    """Stages by mean relative change over all runs (largest first) and Spearman's ρ(depth, change)."""
    names = stages(runs)
    means = [(s, _mean(r.get(f"layer_change/{s}") for r in runs) or 0.0) for s in names]
    rho, _ = spearman(list(range(len(names))), [m for _, m in means])
    return sorted(means, key=lambda t: -t[1]), rho


def _num(values) -> str:
    m = _mean(values)
    return "–" if m is None else f"{m:.2f} ± {_std(values):.2f}"


def _reached(runs: list[dict]) -> str:
    """How many seeds reached the forgetting target ("–" without a target)."""
    flags = [r.get("reached_target") for r in runs if r.get("reached_target") is not None]
    if not flags:
        return "–"
    return f"{sum(flags)}/{len(flags)}" + ("" if all(flags) else " ⚠")


def _pct(values) -> str:
    m = _mean(values)
    return "–" if m is None else f"{100 * m:.1f} ± {100 * _std(values):.1f}"


def markdown(rows: list[dict], images: list[str]) -> str:
    """The study section of report.md: per-k table, trends in words, concentration, plots."""
    groups = scaling_groups(rows)
    lines = ["## The removed-classes study", "",
             ("Per method and number of forgotten classes k: mean ± std over seeds. *weight change* = "
             "‖W_u − W_o‖/‖W_o‖ over the whole network; *shift* = 1 − linear CKA between original and "
             "unlearned stage features, averaged over stages, on retained-class (retain) and forgotten-class "
             "(forget) test images; *probe* = linear-probe accuracy of the forgotten classes on the penultimate "
             "features (retrain's in brackets: what a model that never saw them gets); acc gap = mean "
             "|forget, retain, test accuracy − retrain's|. All in %. *epochs* = epochs to the forgetting target "
             "(callbacks.forget_target; the cap where it was missed); *reached target* = seeds that reached it."), ""]
    for (data, backbone, method), runs in groups.items():
        lines += [f"### {method} on {data} / {backbone}", "",
                  ("| k | seeds | weight change | shift retain | shift forget | probe (retrain) | forget acc | "
                  "retain acc | test acc | acc gap | epochs | reached target |"),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for k, rs in by_k(runs).items():
            probe = _pct([r.get("probe_forget_acc") for r in rs])
            ref = _mean(r.get("retrain/probe_forget_acc") for r in rs)
            probe += "" if ref is None else f" ({100 * ref:.1f})"
            cells = [_pct([r.get("weight_change") for r in rs]),
                     _pct([mean_shift(r, "feature_shift_retain") for r in rs]),
                     _pct([mean_shift(r, "feature_shift_forget") for r in rs]), probe,
                     *[_pct([r.get(a) for r in rs]) for a in ACCS], _pct([r.get("acc_gap") for r in rs]),
                     _num([r.get("stopped_epoch") if r.get("reached_target") else r.get("epochs_run") for r in rs]),
                     _reached(rs)]
            lines.append(f"| {k} | {len(rs)} | " + " | ".join(cells) + " |")
        ranked, depth_rho = concentration(runs)
        top = ", ".join(f"{s} {100 * v:.1f} %" for s, v in ranked[:3])
        low = ranked[-1]
        fade = ("is the same in every stage" if math.isnan(depth_rho) else
                "grows from earlier to later stages" if depth_rho > 0.5 else
                "grows from later to earlier stages" if depth_rho < -0.5 else "has no clear order in depth")
        small = by_k(runs)[min(by_k(runs))]
        shift_small = max((v for r in small for c, v in r.items()
                           if c.startswith("feature_shift_retain/") and v is not None), default=None)
        per_stage = ", ".join(f"{st} {trend(runs, lambda r, st=st: r.get(f'layer_change/{st}'))[0]:+.2f}"
                              for st in stages(runs))
        lines += ["", f"- {verdict(*trend(runs, lambda r: r.get('weight_change')), 'Weight change')}.",
                  f"- Per stage, Spearman's ρ(k, change): {per_stage}.",
                  f"- {verdict(*trend(runs, lambda r: mean_shift(r, 'feature_shift_retain')), 'Feature shift on retained classes')}.",
                  f"- {verdict(*trend(runs, lambda r: mean_shift(r, 'feature_shift_forget')), 'Feature shift on forgotten classes')}.",
                  f"- Where: the largest relative change is in {top}; the smallest in {low[0]} ({100 * low[1]:.2f} %). "
                  f"Change {fade}" + ("." if math.isnan(depth_rho) else f" (Spearman's ρ(depth, change) = {depth_rho:+.2f})."),
                  ]
        if shift_small is not None:
            lines.append(f"- At the smallest k = {min(by_k(runs))} the largest feature shift of any stage on "
                         f"retained classes is {100 * shift_small:.1f} %.")
        lines.append("")
    lines += ["Plots: " + ", ".join(f"![{Path(i).stem}]({i})" for i in images), ""]
    return "\n".join(lines)


def _panels(n: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.6 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.flat[n:]:
        ax.set_visible(False)
    return plt, fig, list(axes.flat[:n])


def _curve(ax, runs: list[dict], column: str, **kw) -> None:
    ks = list(by_k(runs))
    groups = list(by_k(runs).values())
    means = [_mean(r.get(column) for r in g) for g in groups]
    if all(m is None for m in means):
        return
    ax.errorbar(ks, [m if m is not None else math.nan for m in means],
                yerr=[_std([r.get(column) for r in g]) for g in groups], capsize=2, marker="o", ms=3, **kw)


def plots(rows: list[dict], out: Path) -> list[Path]:
    """weight_change_vs_k, feature_shift_vs_k, accuracy_vs_k and layer_heatmap PNGs in `out`."""
    groups = scaling_groups(rows)
    names = [f"{m}" if len({(d, b) for d, b, _ in groups}) == 1 else f"{m} ({d}/{b})" for d, b, m in groups]
    paths = []

    plt, fig, axes = _panels(len(groups))
    for ax, name, runs in zip(axes, names, groups.values(), strict=True):
        for s in stages(runs):
            _curve(ax, runs, f"layer_change/{s}", label=s)
        _curve(ax, runs, "weight_change", label="whole net", color="black", ls="--")
        ax.set(title=name, xlabel="forgotten classes k", ylabel="‖ΔW‖/‖W‖")
        ax.legend(fontsize=7)
    paths.append(_save(plt, fig, out / "weight_change_vs_k.png"))

    plt, fig, axes = _panels(len(groups))
    for ax, name, runs in zip(axes, names, groups.values(), strict=True):
        for i, s in enumerate(stages(runs, "feature_shift_retain")):
            colour = f"C{i}"
            _curve(ax, runs, f"feature_shift_retain/{s}", label=f"{s} retain", color=colour)
            _curve(ax, runs, f"feature_shift_forget/{s}", label=f"{s} forget", color=colour, ls=":")
        ax.set(title=name, xlabel="forgotten classes k", ylabel="1 − linear CKA")
        ax.legend(fontsize=6, ncol=2)
    paths.append(_save(plt, fig, out / "feature_shift_vs_k.png"))

    plt, fig, axes = _panels(len(groups))
    for ax, name, runs in zip(axes, names, groups.values(), strict=True):
        for i, a in enumerate(ACCS):
            _curve(ax, runs, a, label=a.removesuffix("_acc"), color=f"C{i}")
            _curve(ax, runs, f"retrain/{a}", label=f"retrain {a.removesuffix('_acc')}", color=f"C{i}", ls="--")
        _curve(ax, runs, "probe_forget_acc", label="probe forget", color="C3")
        ax.set(title=name, xlabel="forgotten classes k", ylabel="accuracy", ylim=(-0.03, 1.03))
        ax.legend(fontsize=6, ncol=2)
    paths.append(_save(plt, fig, out / "accuracy_vs_k.png"))

    plt, fig, axes = _panels(len(groups))
    for ax, name, runs in zip(axes, names, groups.values(), strict=True):
        names_s, ks = stages(runs), list(by_k(runs))
        grid = [[_mean(r.get(f"layer_change/{s}") for r in by_k(runs)[k]) or 0.0 for k in ks] for s in names_s]
        im = ax.imshow(grid, aspect="auto", cmap="magma")
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_yticks(range(len(names_s)), names_s)
        for i, row in enumerate(grid):
            for j, v in enumerate(row):
                ax.text(j, i, f"{100 * v:.1f}", ha="center", va="center", fontsize=7,
                        color="white" if v < 0.6 * max(max(grid)) else "black")
        ax.set(title=f"{name}: ‖ΔW‖/‖W‖ (%)", xlabel="forgotten classes k")
        fig.colorbar(im, ax=ax)
    paths.append(_save(plt, fig, out / "layer_heatmap.png"))
    return paths


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def upload(rows: list[dict], sweep_dir: Path, images: list[Path], title: str) -> None:
    """One W&B run (job_type `report`, group = the sweep's name, as its runs): the summary table,
    Spearman's ρ per method, and the plots. Offline unless WANDB_MODE=online; files under
    `sweep_dir/wandb/` (`wandb sync` uploads them later)."""
    import wandb

    columns = list(dict.fromkeys(c for r in rows for c in r))
    table = wandb.Table(columns=columns, data=[[_cell(r.get(c)) for c in columns] for r in rows])
    run = wandb.init(project="mu_runner", group=sweep_dir.name, job_type="report", name=f"report-{sweep_dir.name}",
                     dir=str(sweep_dir), mode=os.environ.get("WANDB_MODE", "offline"), config={"title": title})
    try:
        metrics: dict = {"summary_table": table}
        for (_data, _backbone, method), runs in scaling_groups(rows).items():
            rho, p = trend(runs, lambda r: r.get("weight_change"))
            metrics[f"study/rho_weight_change/{method}"] = rho
            metrics[f"study/p_weight_change/{method}"] = p
        metrics.update({f"plots/{p.stem}": wandb.Image(str(p)) for p in images})
        run.log(metrics)
    finally:
        run.finish()


def _cell(v):
    return v if v is None or isinstance(v, (int, float, str, bool)) else str(v)
