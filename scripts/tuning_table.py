"""python scripts/tuning_table.py outputs/tuning/<method> [--md docs/tuning/<method>.md]

Every trial of a tuning study (`experiment=tune method=<m>`) as one markdown table: the proposed
knobs, the objective per tuning seed and their mean, best first; then the best parameters from the
sweeper's optimization_results.yaml. Reads the trials' tune.json and .hydra/overrides.yaml only.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml


def trials(sweep: Path) -> list[dict]:
    rows = []
    for done in sorted(sweep.glob("*/tune.json")):
        t = json.loads(done.read_text())
        overrides = yaml.safe_load((done.parent / ".hydra" / "overrides.yaml").read_text())
        knobs = dict(o.split("=", 1) for o in overrides if o.startswith("method."))
        rows.append({"knobs": {k.removeprefix("method."): v for k, v in sorted(knobs.items())},
                     "value": t["value"], "objective": t["objective"],
                     "per_seed": [p["value"] for p in t["per_seed"]],
                     "diverged": sum("diverged" in p for p in t["per_seed"])})
    return sorted(rows, key=lambda r: r["value"])


def _fmt(v: str) -> str:
    try:
        x = float(v)
    except ValueError:
        return v
    return v if x.is_integer() and "." not in v else f"{x:.4g}"


def markdown(sweep: Path) -> str:
    rows = trials(sweep)
    if not rows:
        raise SystemExit(f"tuning_table: no tune.json under {sweep}")
    names = list(rows[0]["knobs"])
    lines = [f"{len(rows)} trials, best first; objective `{rows[0]['objective']}` in % (the mean over the "
             "tuning seeds, then each seed's).", "",
             "| " + " | ".join(names) + " | objective % | per seed % |",
             "|" + "---|" * (len(names) + 2)]
    for r in rows:
        seeds = ", ".join(f"{100 * v:.2f}" for v in r["per_seed"])
        mark = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        lines.append("| " + " | ".join(_fmt(r["knobs"].get(n, "")) for n in names)
                     + f" | {100 * r['value']:.2f}{mark} | {seeds} |")
    best = sweep / "optimization_results.yaml"
    if best.exists():
        lines += ["", "Best (`optimization_results.yaml`):", "", "```yaml", best.read_text().strip(), "```"]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep", type=Path)
    parser.add_argument("--md", type=Path)
    args = parser.parse_args()
    text = markdown(args.sweep)
    if args.md:
        args.md.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
