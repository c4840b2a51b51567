"""`make bench` (`python -m bench.cpu`): three figures on this machine's CPU, in one process.

1. Training throughput (images/s) of ResNet-18 (conf/backbone/resnet18.yaml) on digits (8x8x1,
   10 classes, train=fast) and on CIFAR-shaped synthetic data (32x32x3, 100 classes, train=sgd):
   the plain baseline vs the project's path (bench/common.py), ratio ours / baseline.
2. The evaluation's cost: the default run (`make run`: salun on digits) timed whole, eval_seconds
   against the run's time; and eval_seconds vs unlearn_seconds per method from a results sweep
   (`make results`' directory if there is one; `--run-methods` runs each method instead).
3. The trainings a methods x k sweep performs (the study's methods and k, one seed), counted from
   the runner's own cache keys, without training.

Prints each ratio and writes them all to outputs/bench/bench.json (`--out`). Docs: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

START = time.perf_counter()

from bench.common import (  # noqa: E402
    CIFAR_SHAPED,
    ROOT,
    compose_cfg,
    count_trainings,
    ours_train,
    plain_train,
    throughput,
)

SWEEP = ROOT / "outputs" / "multiruns" / "method_table"  # make results
STUDY = {"methods": ["random_label", "weight_reset", "salun"], "ks": [1, 2, 3, 4, 5],
         "overrides": ["experiment=forget_scaling"]}  # make study's sweep (conf/experiment/forget_scaling.yaml), seed 0
EXCLUDED = ("original", "retrain")


def machine() -> dict:
    import torch
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "load_average_start": os.getloadavg()}


# --------------------------------------------------------------------------- 1. throughput


def bench_throughput(name: str, overrides: list[str], repeats: int, epochs: int, warmup_batches: int,
                     layouts: bool = False) -> dict:
    import torch

    from mu_runner.run import load_data

    cfg = compose_cfg(["trainer.enable_progress_bar=false", "logger=none", *overrides])
    data = load_data(cfg)
    c, h, w = data.source.shape
    print(f"\n[{name}] {cfg.backbone.name}, {len(data.pool)} images {h}x{w}x{c}, "
          f"{data.num_classes} classes, batch {cfg.train.batch_size}, {epochs} epoch(s) per training, "
          f"median of {repeats}", flush=True)
    cpu = torch.device("cpu")
    variants = {"baseline": lambda c, d, n, i: plain_train(c, d, n, i, cpu, int(c.train.epochs)),
                "ours": lambda c, d, n, i: ours_train(c, d, n, i)}
    if layouts:  # which memory format pays at this image size: each path in the other one too
        variants["baseline_cl"] = lambda c, d, n, i: plain_train(c, d, n, i, cpu, int(c.train.epochs), True)
        variants["ours_nchw"] = lambda c, d, n, i: ours_train(c, d, n.to(memory_format=torch.contiguous_format), i)
    out = throughput(cfg, data, cpu, repeats=repeats, epochs=epochs, warmup_batches=warmup_batches,
                     variants=variants)
    ips = out["images_per_s"]
    print(f"[{name}] baseline {ips['baseline']:.1f} images/s, ours {ips['ours']:.1f} images/s: "
          f"ours / baseline = {out['ratio']['ours']:.2f}x (target >= 1.0x)", flush=True)
    if layouts:
        print(f"[{name}] memory format: baseline channels-last / contiguous = "
              f"{ips['baseline_cl'] / ips['baseline']:.2f}x; ours contiguous / channels-last = "
              f"{ips['ours_nchw'] / ips['ours']:.2f}x", flush=True)
    return {"overrides": overrides, "image_shape": [c, h, w], "classes": data.num_classes, **out}


# --------------------------------------------------------------------------- 2. evaluation's cost


def timed_run(overrides: list[str], out_dir: Path, cache_dir: Path) -> dict:
    """One whole run (mu_runner.run.run) timed, with the seconds spent training originals and
    references (0 when they come from the cache) measured apart."""
    import mu_runner.run as R

    shutil.rmtree(out_dir, ignore_errors=True)  # a directory with metrics.json would be skipped
    cfg = compose_cfg(["trainer.enable_progress_bar=false", f"paths.output_dir={out_dir}",
                       f"paths.cache_dir={cache_dir}", *overrides])
    trained: list[float] = []
    real = R.fit_supervised

    def timed_fit(*args, **kwargs):
        t = time.perf_counter()
        try:
            return real(*args, **kwargs)
        finally:
            trained.append(time.perf_counter() - t)

    R.fit_supervised = timed_fit
    try:
        start = time.perf_counter()
        R.run(cfg)
        wall = time.perf_counter() - start
    finally:
        R.fit_supervised = real
    m = json.loads((out_dir / "metrics.json").read_text())
    ev, un, prep = m["eval_seconds"], m["unlearn_seconds"], m.get("prep_seconds") or 0.0
    warm = wall - sum(trained)
    return {"overrides": overrides, "run_seconds": wall, "training_seconds": sum(trained), "trainings": len(trained),
            "cache_hits": m.get("cache_hits"), "eval_seconds": ev, "unlearn_seconds": un, "prep_seconds": prep,
            "eval_share_of_run": ev / wall, "eval_share_of_warm_run": ev / warm, "eval_over_unlearn": ev / un}


def bench_default_run(imports: float, cache_dir: Path) -> dict:
    print("\n[default run] make run's experiment (salun on digits, ResNet-18, train=fast), timed whole "
          f"(imports excluded); original and reference from {cache_dir} if there", flush=True)
    r = timed_run([], ROOT / "outputs" / "bench" / "default_run", cache_dir)
    r["imports_seconds"] = imports
    warm = r["run_seconds"] - r["training_seconds"]  # the run with original and reference from the cache
    r["eval_share_of_make_run"] = r["eval_seconds"] / (imports + warm)  # + the imports `make run` pays
    print(f"[default run] {r['run_seconds']:.1f} s, of which {r['training_seconds']:.1f} s training "
          f"({r['trainings']} trainings; cache hits {r['cache_hits']}), unlearning {r['unlearn_seconds']:.1f} s, "
          f"evaluation {r['eval_seconds']:.1f} s", flush=True)
    cold = f"evaluation / this run = {r['eval_share_of_run']:.0%}; " if r["trainings"] else ""
    print(f"[default run] {cold}evaluation / run with original and reference cached = "
          f"{r['eval_share_of_warm_run']:.0%} (target <= 50 %); with the {imports:.0f} s of imports "
          f"(make run) = {r['eval_share_of_make_run']:.0%}; evaluation / unlearning = "
          f"{r['eval_over_unlearn']:.2f}", flush=True)
    return r


def method_costs_from_sweep(sweep: Path) -> dict:
    """Median eval_seconds and unlearn_seconds per method (and forget kind) of a sweep's jobs."""
    rows: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(sweep.glob("*/metrics.json")):
        m = json.loads(path.read_text())
        if m.get("method") in EXCLUDED or m.get("eval_seconds") is None or not m.get("unlearn_seconds"):
            continue
        rows.setdefault((m["method"], m.get("forget_kind", "?")), []).append(m)
    table = {}
    for (method, kind), ms in sorted(rows.items()):
        ev = statistics.median(m["eval_seconds"] for m in ms)
        un = statistics.median(m["unlearn_seconds"] for m in ms)
        table[f"{method}/{kind}"] = {"method": method, "forget": kind, "jobs": len(ms), "eval_seconds": ev,
                                     "unlearn_seconds": un, "eval_over_unlearn": ev / un,
                                     "eval_share": ev / (ev + un)}
    return table


def method_costs_run(methods: list[str], cache_dir: Path) -> dict:
    table = {}
    for method in methods:
        r = timed_run([f"method={method}", "eval.embedding=none"], ROOT / "outputs" / "bench" / f"method_{method}",
                      cache_dir)
        table[f"{method}/classes"] = {"method": method, "forget": "classes", "jobs": 1,
                                      "eval_seconds": r["eval_seconds"], "unlearn_seconds": r["unlearn_seconds"],
                                      "eval_over_unlearn": r["eval_over_unlearn"],
                                      "eval_share": r["eval_seconds"] / (r["eval_seconds"] + r["unlearn_seconds"])}
    return table


def bench_methods(sweep: Path, run_methods: bool, cache_dir: Path) -> dict:
    methods = sorted(p.stem for p in (ROOT / "conf" / "method").glob("*.yaml") if p.stem not in EXCLUDED)
    if run_methods:
        print(f"\n[methods] running each of {len(methods)} methods on digits (default config) ...", flush=True)
        table, source = method_costs_run(methods, cache_dir), "run here (--run-methods)"
    elif sweep.is_dir() and any(sweep.glob("*/metrics.json")):
        table, source = method_costs_from_sweep(sweep), str(sweep)
        commits = sorted({str(json.loads(p.read_text()).get("git_commit")) for p in sweep.glob("*/metrics.json")})
        source += f" (made by commit {', '.join(c[:12] for c in commits)})"
    else:
        print(f"\n[methods] no sweep at {sweep} (make results makes one; or: python -m bench.cpu --run-methods)")
        return {"source": None, "table": {}}
    print(f"\n[methods] evaluation vs unlearning, median over jobs, from {source}:")
    print(f"  {'method':<16} {'forget':<8} {'jobs':>4} {'unlearn s':>10} {'eval s':>8} {'eval/unlearn':>13} {'eval share':>11}")
    for row in table.values():
        print(f"  {row['method']:<16} {row['forget']:<8} {row['jobs']:>4} {row['unlearn_seconds']:>10.2f} "
              f"{row['eval_seconds']:>8.2f} {row['eval_over_unlearn']:>13.2f} {row['eval_share']:>10.0%}")
    seen = {row["method"] for row in table.values()}
    missing = [m for m in methods if m not in seen]
    if missing:
        print(f"  (no finished job for: {', '.join(missing)})")
    return {"source": source, "table": table, "missing": missing}


# --------------------------------------------------------------------------- 3. trainings of a sweep


def bench_trainings(methods: list[str], ks: list[int], overrides: list[str]) -> dict:
    r = count_trainings(methods, ks, overrides)
    print(f"\n[sweep] {' '.join(overrides)} method={','.join(methods)} forget.k={','.join(map(str, ks))} "
          "(seed 0; each seed repeats it):", flush=True)
    print(f"[sweep] {r['line']}", flush=True)
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cpu", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "outputs" / "bench" / "bench.json"))
    p.add_argument("--repeats", type=int, default=3, help="timed trainings per side (median)")
    p.add_argument("--digits-epochs", type=int, default=1)
    p.add_argument("--cifar-images", type=int, default=256, help="CIFAR-shaped training images (batches of 128)")
    p.add_argument("--sweep", default=str(SWEEP), help="a results sweep to read eval/unlearn seconds from")
    p.add_argument("--cache-dir", default=str(ROOT / "outputs" / "cache"),
                   help="the cache of originals and references of the runs (make run's by default)")
    p.add_argument("--run-methods", action="store_true", help="run every method here instead of reading a sweep")
    p.add_argument("--layouts", action="store_true",
                   help="also each path in the other memory format (channels-last vs contiguous)")
    p.add_argument("--backbone", default="resnet18", help="backbone of the throughput parts (smoke tests: test_resnet)")
    p.add_argument("--only", default="digits,cifar,run,methods,sweep",
                   help="comma list of parts: digits, cifar, run, methods, sweep")
    args = p.parse_args(argv)
    parts = set(args.only.split(","))

    import mu_runner.run  # noqa: F401 - Lightning, timm, torch: the imports a run pays once
    from mu_runner.utils.console import quiet_libraries
    quiet_libraries()
    imports = time.perf_counter() - START
    result: dict = {"machine": machine(), "imports_seconds": imports}
    print(f"bench on {result['machine']['cpu']} ({result['machine']['cores']} cores, torch "
          f"{result['machine']['torch']}, {result['machine']['torch_threads']} threads); load average "
          f"{result['machine']['load_average_start'][0]:.2f} at start", flush=True)
    if "digits" in parts:
        result["digits"] = bench_throughput("digits", ["data=digits", "train=fast", f"backbone={args.backbone}"], args.repeats,
                                            args.digits_epochs, warmup_batches=2, layouts=args.layouts)
    if "cifar" in parts:
        result["cifar_shaped"] = bench_throughput(
            "cifar-shaped", [*CIFAR_SHAPED, f"data.source.n_train={args.cifar_images}", "train=sgd",
             f"backbone={args.backbone}"],
            args.repeats, 1, warmup_batches=1, layouts=args.layouts)
    if "run" in parts:
        result["default_run"] = bench_default_run(imports, Path(args.cache_dir))
    if "methods" in parts:
        result["methods"] = bench_methods(Path(args.sweep), args.run_methods, Path(args.cache_dir))
    if "sweep" in parts:
        result["sweep_trainings"] = bench_trainings(STUDY["methods"], STUDY["ks"], STUDY["overrides"])
    result["machine"]["load_average_end"] = os.getloadavg()
    result["total_seconds"] = time.perf_counter() - START
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"\nbench: {result['total_seconds']:.0f} s in all; {out}")
    for key in ("digits", "cifar_shaped"):
        if key in result:
            print(f"  {key:<13} ours / baseline = {result[key]['ratio']['ours']:.2f}x (images/s)")
    if "default_run" in result:
        print(f"  default run   evaluation = {result['default_run']['eval_share_of_warm_run']:.0%} of the run "
              "(original and reference cached)")
    if "sweep_trainings" in result:
        print(f"  sweep         {result['sweep_trainings']['line']}")
    load = result["machine"]["load_average_start"][0]  # before this process's own load
    if load > 0.5:
        print(f"  note: load average {load:.2f} on {os.cpu_count()} cores when the bench started: other work was "
              "running, so these are not a quiet machine's figures")
    return 0


if __name__ == "__main__":
    sys.exit(main())
