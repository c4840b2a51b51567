"""python -m mu_runner.report DIR [--md FILE] [--baseline DIR2] [--wandb]: tables, a study and plots from a sweep.

Runs are grouped by what was swept other than the seed (method, data, backbone, forget scenario);
each cell is mean ± std over seeds. Writes DIR/summary.csv (one row per run) and DIR/report.md.
Where a method was run at several numbers of forgotten classes k (experiment=forget_scaling), the
report adds the removed-classes study (`mu_runner.study`): per method and k, network change, feature
shift, probe and accuracies with their gap to retrain, Spearman's rho of change against k, where the
change concentrates, and PNG plots. `--baseline DIR2` adds this sweep against another, per method
(e.g. tuned against hand-set defaults). `--wandb` uploads the table and plots as one W&B run.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from mu_runner.study import markdown as study_markdown
from mu_runner.study import mean_std, scaling_groups, upload
from mu_runner.study import plots as study_plots

COLUMNS = ("forget_acc", "retain_acc", "test_acc", "mia_efficacy", "mia_auc", "avg_gap", "acc_gap", "nomus",
           "unlearn_seconds", "prep_seconds")
SECONDS = ("unlearn_seconds", "prep_seconds")
ACCURACIES = ("forget_acc", "retain_acc", "test_acc")


def acc_gap(m: dict) -> float | None:
    """avg_gap without its MIA term: mean |gap| to the paired retrain over forget/retain/test accuracy.

    Shown next to avg_gap because MIA-efficacy is only as informative as the original model's
    generalisation gap (close to none on digits), and its term can dominate avg_gap. Runs write
    it to metrics.json; older runs' files get it computed here, the same way.
    """
    if "acc_gap" in m:
        return m["acc_gap"]
    ref = m.get("retrain") or {}
    if any(m.get(k) is None or ref.get(k) is None for k in ACCURACIES):
        return None
    return sum(abs(m[k] - ref[k]) for k in ACCURACIES) / len(ACCURACIES)


def scenario(m: dict) -> str:
    """A readable forget-set label: `classes k=2` or `random 10%` or `indices n=40`."""
    if m.get("forget_classes") is not None:
        return f"classes k={len(m['forget_classes'])}"
    n = m["n_forget"] + m["n_retain"]
    kind = m.get("forget_kind", "random")
    return f"random {100 * m['n_forget'] / n:.0f}%" if kind == "random" else f"{kind} n={m['n_forget']}"


def load_runs(root: str | Path) -> list[dict]:
    """Flat rows from every finished run (a metrics.json) under `root`, sorted by path."""
    rows = []
    for path in sorted(Path(root).rglob("metrics.json")):
        m = json.loads(path.read_text())
        row = {"run": str(path.parent.relative_to(root)), "method": m["method"], "data": m["data"],
               "backbone": m["backbone"], "scenario": scenario(m), "seed": m["seed"]}
        row.update({k: m.get(k) for k in (*COLUMNS, "test_forget_acc")})
        row["acc_gap"] = acc_gap(m)
        row["k"] = len(m["forget_classes"]) if m.get("forget_classes") is not None else None
        row.update({k: m.get(k) for k in ("weight_change", "probe_forget_acc", "head_only_forgetting",
                                          "reached_target", "stopped_epoch", "epochs_run")})
        row["one_by_one"] = ",".join(s for s, hw in (m.get("stage_sizes") or {}).items() if hw == [1, 1])
        row.update({k: v for k, v in m.items() if k.startswith("umia_")})
        for key in ("layer_change", "feature_shift", "feature_shift_forget", "feature_shift_retain"):
            for name, v in (m.get(key) or {}).items():
                row[f"{key}/{name}"] = v
        for ref in ("original", "retrain"):
            for k, v in (m.get(ref) or {}).items():
                row[f"{ref}/{k}"] = v
        rows.append(row)
    return rows


def group(rows: list[dict]) -> dict[tuple, list[dict]]:
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["data"], r["backbone"], r["scenario"], r["method"]), []).append(r)
    return dict(sorted(groups.items()))


def _cell(values: list, pct: bool) -> str:
    ms = mean_std(values)
    if ms is None:
        return "–"
    scale = 100 if pct else 1
    return f"{ms[0] * scale:.2f} ± {ms[1] * scale:.2f}"


def markdown(rows: list[dict]) -> str:
    """mean ± std per (scenario, method); accuracies, MIA and gap in %, seconds as measured."""
    lines = []
    current = None
    for (data, backbone, scen, method), runs in group(rows).items():
        if (data, backbone, scen) != current:
            current = (data, backbone, scen)
            lines += ["", f"### {data} / {backbone} / {scen}", "",
                      ("| method | seeds | forget acc % | retain acc % | test acc % | MIA-eff. % | MIA AUC % "
                      "| avg gap % | acc gap % | NoMUS % | unlearn s | prep s |"),
                      "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        cells = [_cell([r[k] for r in runs], pct=k not in SECONDS) for k in COLUMNS]
        lines.append(f"| {method}{capped(runs)} | {len(runs)} | " + " | ".join(cells) + " |")
    return "\n".join(lines).lstrip() + "\n"


def capped(runs: list[dict]) -> str:
    """A mark for runs with a forgetting target that hit their epoch cap without reaching it."""
    missed = sum(r.get("reached_target") is False for r in runs)
    return f" ⚠ {missed}/{len(runs)} missed the forget target" if missed else ""


def warnings(rows: list[dict]) -> str:
    """Report-level warnings: stages that worked on 1x1 feature maps (3x3 kernels see padding)."""
    flat = sorted({r["one_by_one"] for r in rows if r.get("one_by_one")})
    if not flat:
        return ""
    n = sum(bool(r.get("one_by_one")) for r in rows)
    return (f"\n> **Warning**: in {n} runs stage(s) {'; '.join(flat)} worked on 1×1 feature maps, where a 3×3 "
            "kernel sees 8 padding taps of 9; layer-wise numbers there say little. A larger `data.image_size` "
            "(e.g. 16 for digits) avoids it.\n\n")


UMIA = ("umia_auc", "umia_tpr_at_1pct_fpr", "umia_tpr_at_5pct_fpr")


def _mean_pct(runs: list[dict], key: str) -> float | None:
    ms = mean_std([r.get(key) for r in runs])
    return None if ms is None else 100 * ms[0]


def _num(v: float | None, digits: int = 2) -> str:
    return "–" if v is None else f"{v:.{digits}f}"


def privacy_markdown(rows: list[dict]) -> str:
    """The per-example attack (eval.umia=lira), where runs have it: AUC of telling the forget set
    from never-seen images (± its standard error, averaged over seeds), TPR at 1 % / 5 % FPR, for
    the unlearned model next to the original and the retrained one; 50 % is chance."""
    rows = [r for r in rows if r.get("umia_auc") is not None]
    if not rows:
        return ""
    lines = ["", "## Per-example attack (U-LiRA style, eval.umia=lira)", "",
             ("AUC of telling the forget set from never-seen images (± Hanley-McNeil standard error), "
             "TPR at 1 % and 5 % FPR; 50 % is chance, the retrained model's AUC is the target."), "",
             ("| scenario | method | seeds | n forget / unseen | AUC % | TPR@1% | TPR@5% | original AUC % "
             "| retrain AUC % | train − test acc (original) |"), "|---|---|---|---|---|---|---|---|---|---|"]
    for (_data, _backbone, scen, method), runs in group(rows).items():
        def pct(key: str, runs=runs) -> str:
            return _num(_mean_pct(runs, key), 1)
        se = mean_std([r.get("umia_auc_se") for r in runs])
        gap = mean_std([(r.get("original/retain_acc") or 0) - (r.get("original/test_acc") or 0) for r in runs])
        n = f"{runs[0].get('umia_n_forget')} / {runs[0].get('umia_n_unseen')}"
        lines.append(f"| {scen} | {method} | {len(runs)} | {n} | {pct('umia_auc')} ± {100 * se[0]:.1f} "
                     f"| {pct('umia_tpr_at_1pct_fpr')} | {pct('umia_tpr_at_5pct_fpr')} | {pct('original/umia_auc')} "
                     f"| {pct('retrain/umia_auc')} | {100 * gap[0]:.1f} |")
    return "\n".join(lines) + "\n"


def compare_markdown(rows: list[dict], baseline: list[dict], name: str = "baseline") -> str:
    """This sweep against another (`--baseline DIR`, e.g. tuned defaults against hand-set ones): per
    (data, backbone, scenario, method) that both have, mean over seeds of the gap to the retrained
    model and of the accuracies, side by side; Δ = this − baseline (negative: closer to retrain)."""
    base = group(baseline)
    both = [(key, base[key], runs) for key, runs in group(rows).items() if key in base]
    if not both:
        return ""
    lines = ["", f"## Against {name}", "",
             f"Mean over seeds, in %; acc gap = mean |forget, retain, test accuracy − retrain's|; Δ = this sweep − {name}.",
             "", (f"| data / backbone / scenario | method | seeds ({name} / this) | acc gap % ({name}) "
                  f"| acc gap % (this) | Δ | forget acc % ({name} → this) | retain acc % ({name} → this) "
                  f"| test acc % ({name} → this) |"), "|---|---|---|---|---|---|---|---|---|"]
    for (data, backbone, scen, method), old_runs, runs in both:
        old, new = _mean_pct(old_runs, "acc_gap"), _mean_pct(runs, "acc_gap")
        delta = "–" if old is None or new is None else f"{new - old:+.2f}"
        arrows = [f"{_num(_mean_pct(old_runs, k))} → {_num(_mean_pct(runs, k))}" for k in ACCURACIES]
        lines.append(f"| {data} / {backbone} / {scen} | {method} | {len(old_runs)} / {len(runs)} | {_num(old)} "
                     f"| {_num(new)} | {delta} | " + " | ".join(arrows) + " |")
    return "\n".join(lines) + "\n"


def failures(root: Path) -> str:
    """Jobs that ended with a user error (error.txt, no metrics.json), one line per distinct message."""
    errors: dict[str, list[str]] = {}
    for path in sorted(Path(root).rglob("error.txt")):
        if not (path.parent / "metrics.json").exists():
            errors.setdefault(path.read_text().strip().splitlines()[0], []).append(path.parent.name)
    if not errors:
        return ""
    lines = ["", f"{sum(map(len, errors.values()))} jobs ended with an error (no metrics.json):", ""]
    lines += [f"- {len(jobs)} × `{message}`" for message, jobs in errors.items()]
    return "\n".join(lines) + "\n"


def write_csv(rows: list[dict], path: Path) -> None:
    keys = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mu_runner.report", description=__doc__)
    parser.add_argument("dir", type=Path, help="a sweep directory (searched recursively)")
    parser.add_argument("--md", type=Path, help="also write the markdown table here")
    parser.add_argument("--title", default="Results", help="heading of the markdown report")
    parser.add_argument("--baseline", type=Path,
                        help="another sweep directory: adds a table of this sweep against it, per method")
    parser.add_argument("--baseline-name", default="baseline", help="what the baseline sweep is called")
    parser.add_argument("--wandb", action="store_true",
                        help="upload summary table and plots as one W&B run (offline unless WANDB_MODE=online)")
    args = parser.parse_args(argv)
    rows = load_runs(args.dir)
    if not rows:
        print(f"mu_runner.report: error: no metrics.json under {args.dir}", file=sys.stderr)
        return 2
    write_csv(rows, args.dir / "summary.csv")
    head = f"# {args.title}\n\n{len(rows)} runs from `{args.dir}`; mean ± std over seeds.\n\n" + warnings(rows)
    head += markdown(rows)
    if args.baseline is not None:
        baseline = load_runs(args.baseline)
        if not baseline:
            print(f"mu_runner.report: error: no metrics.json under {args.baseline}", file=sys.stderr)
            return 2
        head += compare_markdown(rows, baseline, args.baseline_name)
    head += privacy_markdown(rows) + failures(args.dir)
    plots = study_plots(rows, args.dir) if scaling_groups(rows) else []
    text = head + (("\n" + study_markdown(rows, [p.name for p in plots])) if plots else "")
    (args.dir / "report.md").write_text(text)
    if args.md:  # the images go to a folder named after the markdown file, next to it
        args.md.parent.mkdir(parents=True, exist_ok=True)
        folder = args.md.with_suffix("")
        if plots:
            folder.mkdir(exist_ok=True)
            for png in plots:
                (folder / png.name).write_bytes(png.read_bytes())
        args.md.write_text(head + (("\n" + study_markdown(rows, [f"{folder.name}/{p.name}" for p in plots]))
                                   if plots else ""))
    if args.wandb:
        upload(rows, args.dir, plots, args.title)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
