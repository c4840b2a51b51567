"""`bench/gpu.sh` (`python -m bench.gpu`): ResNet-18 at 32x32 on one GPU, in one process.

1. Images/s of the plain baseline (per-sample Dataset + DataLoader, float32, no compile; see
   bench/common.py) and of the project's path with `trainer=gpu` (bf16-mixed autocast, the
   backbone's channels-last), optionally also with the network `torch.compile`d (`--compile`:
   the project has no compile option; this variant hands `fit_supervised` a compiled network).
   Whole trainings and the steady state (per-training set-up cancelled, see `throughput`).
   Targets: >= 30,000 images/s and >= 5x the baseline.
2. The time to train the CIFAR recipe (conf/train/sgd.yaml: 50 epochs of SGD, batch 128) on
   CIFAR-shaped synthetic data (45,000 training images 32x32x3, 100 classes, CIFAR's 4-px shift
   and flip) with the project's path as `get_original` runs it; if the throughput says it would
   exceed `--recipe-budget` seconds, fewer epochs are trained and the whole is extrapolated (the
   JSON says so).
3. A torch.profiler table of a few of ours' steps (`gpu_profile.txt`), to see where a step's time
   goes (host syncs, kernel launches).

Numbers go to $OUT/bench_gpu.json (or --out). Without CUDA it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

START = time.perf_counter()

import torch  # noqa: E402

from bench.common import (  # noqa: E402
    CIFAR_SHAPED,
    ROOT,
    compose_cfg,
    ours_train,
    plain_train,
    throughput,
    with_epochs,
)

TARGET_IPS, TARGET_RATIO = 30_000, 5.0


def write(path: Path, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"bench_gpu: wrote {path}", flush=True)


def test_accuracy(net: torch.nn.Module, data, device: torch.device) -> float:
    net = net.to(device).eval()
    correct = 0
    with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for i in range(0, len(data.test_labels), 1024):
            x = data.test_images[i:i + 1024].to(device).float().div(255)
            correct += int((net(x).argmax(1) == data.test_labels[i:i + 1024].to(device)).sum())
    return correct / max(1, len(data.test_labels))


def profile_steps(cfg, data, device: torch.device, out_dir: Path, batches: int = 30) -> str:
    """A torch.profiler table of one short training of ours (`batches` steps)."""
    from torch.profiler import ProfilerActivity, profile

    from mu_runner.run import new_net

    c1 = with_epochs(cfg, 1)
    pool = data.pool[: batches * int(cfg.train.batch_size)]
    batches = math.ceil(len(pool) / int(cfg.train.batch_size))
    cuda = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if cuda else [])]) as prof:
        ours_train(c1, data, new_net(cfg, data), pool, checkpoint=False)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    path = out_dir / "gpu_profile.txt"
    path.write_text(f"ours, {batches} steps of batch {cfg.train.batch_size} (one training, set-up included)\n\n"
                    + table + ("\n\nby CUDA time:\n\n"
                    + prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25) if cuda else "") + "\n")
    return str(path)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    out_dir = Path(os.environ.get("OUT") or ROOT / "outputs" / "bench")
    p.add_argument("--out", default=str(out_dir / "bench_gpu.json"))
    p.add_argument("--n-train", type=int, default=50_000, help="synthetic training images (10 %% go to validation)")
    p.add_argument("--images", type=int, default=25_600, help="images per epoch of the throughput trainings")
    p.add_argument("--epochs", type=int, default=3, help="epochs per throughput training (steady state: >= 2)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--compile", action="store_true", help="also time ours with torch.compile(network)")
    p.add_argument("--recipe-budget", type=float, default=240.0, help="seconds allowed for the recipe's training")
    p.add_argument("--no-recipe", action="store_true")
    p.add_argument("--no-profile", action="store_true")
    p.add_argument("--device", default="cuda", help="cpu: a smoke test of this script's plumbing (trainer=cpu)")
    p.add_argument("--backbone", default="resnet18", help="smoke tests: test_resnet")
    args = p.parse_args(argv)
    out = Path(args.out)

    result: dict = {"torch": torch.__version__, "cuda_available": torch.cuda.is_available()}
    smoke = args.device == "cpu"
    if not torch.cuda.is_available() and not smoke:
        print("bench_gpu: torch.cuda.is_available() is False (no GPU, or a CPU-only torch build): nothing measured",
              flush=True)
        result["error"] = "no CUDA device"
        write(out, result)
        return 2
    if smoke:
        device = torch.device("cpu")
        result["device"] = {"name": "cpu (smoke test of the script, not a GPU figure)"}
    else:
        device = torch.device("cuda", 0)
        props = torch.cuda.get_device_properties(device)
        result["device"] = {"name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
                            "capability": f"{props.major}.{props.minor}", "bf16": torch.cuda.is_bf16_supported(),
                            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version()}
    print(f"bench_gpu: {result['device']['name']}, torch {torch.__version__}, CUDA {torch.version.cuda}", flush=True)

    from mu_runner.run import load_data, new_net
    from mu_runner.utils.console import quiet_libraries
    quiet_libraries()

    overrides = [*CIFAR_SHAPED, f"data.source.n_train={args.n_train}", "data.val_fraction=0.1", "train=sgd",
                 "trainer=cpu" if smoke else "trainer=gpu", "trainer.enable_progress_bar=false", "logger=none",
                 f"backbone={args.backbone}"]
    cfg = compose_cfg(overrides)
    t = time.perf_counter()
    data = load_data(cfg)
    result["data"] = {"overrides": overrides, "pool": len(data.pool), "shape": list(data.source.shape),
                      "classes": data.num_classes, "seconds_to_make": time.perf_counter() - t}
    result["settings"] = {"precision": str(cfg.trainer.precision), "channels_last": True,
                          "batch_size": int(cfg.train.batch_size), "compile": "only the --compile variant"}
    print(f"bench_gpu: {len(data.pool)} images 32x32x3, 100 classes; ours: precision {cfg.trainer.precision}, "
          f"channels-last; baseline: float32, contiguous, per-sample DataLoader", flush=True)

    # 1. throughput
    pool = data.pool[: min(args.images, len(data.pool))]
    variants = {"baseline": lambda c, d, n, i: plain_train(c, d, n, i, device, int(c.train.epochs)),
                "ours": lambda c, d, n, i: ours_train(c, d, n, i)}
    if args.compile:
        def compiled(c, d, n, i):
            return ours_train(c, d, torch.compile(n), i)
        try:
            t = time.perf_counter()
            compiled(with_epochs(cfg, 1), data, new_net(cfg, data), pool[: 4 * int(cfg.train.batch_size)])
            result["compile_warmup_seconds"] = time.perf_counter() - t
            variants["ours_compiled"] = compiled
        except Exception as err:  # noqa: BLE001 - a compiler failure is reported, the rest still measured
            result["compile_error"] = f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"
            print(f"bench_gpu: torch.compile failed ({result['compile_error']}); measuring without it", flush=True)
    print(f"\n[throughput] {len(pool)} images per epoch, {args.epochs} epochs per training, median of "
          f"{args.repeats}; steady state = (T({args.epochs} epochs) - T(1 epoch)) / {args.epochs - 1}", flush=True)
    tp = throughput(cfg, data, device, repeats=args.repeats, epochs=args.epochs, warmup_batches=10,
                    variants=variants, pool=pool, steady=args.epochs >= 2)
    result["throughput"] = tp
    for name in tp["images_per_s"]:
        steady = tp.get("steady_images_per_s", {}).get(name)
        print(f"[throughput] {name:>13}: {tp['images_per_s'][name]:9.0f} images/s whole trainings"
              + (f", {steady:9.0f} steady, {tp['overhead_seconds'][name]:.2f} s set-up per training" if steady else ""),
              flush=True)
    best = max((v for k, v in tp.get("steady_images_per_s", tp["images_per_s"]).items() if k != "baseline"))
    ratio = max(tp.get("steady_ratio", tp["ratio"]).values())
    result["targets"] = {"images_per_s": TARGET_IPS, "ratio": TARGET_RATIO, "best_images_per_s": best,
                         "best_ratio": ratio, "met": best >= TARGET_IPS and ratio >= TARGET_RATIO}
    print(f"[throughput] ours / baseline = {ratio:.2f}x, {best:.0f} images/s (targets: >= {TARGET_IPS} images/s, "
          f">= {TARGET_RATIO:.0f}x)", flush=True)
    write(out, result)  # what is measured so far survives a later failure

    # 2. the CIFAR recipe
    if not args.no_recipe:
        epochs = int(cfg.train.epochs)
        ips = tp.get("steady_images_per_s", tp["images_per_s"])["ours"]
        estimate = epochs * len(data.pool) / ips
        run_epochs = epochs if estimate <= args.recipe_budget else max(
            1, math.floor(args.recipe_budget * ips / len(data.pool)))
        print(f"\n[recipe] train=sgd: {epochs} epochs x {len(data.pool)} images, batch {cfg.train.batch_size}; "
              f"estimate {estimate:.0f} s; training {run_epochs} epochs", flush=True)
        net = new_net(cfg, data)
        seconds = ours_train(with_epochs(cfg, run_epochs), data, net, data.pool)
        acc = test_accuracy(net, data, device)
        whole = seconds * epochs / run_epochs
        result["recipe"] = {"epochs": epochs, "epochs_trained": run_epochs, "images": len(data.pool),
                            "seconds": seconds, "seconds_for_the_recipe": whole,
                            "extrapolated": run_epochs < epochs, "test_acc": acc,
                            "note": "schedule shortened to the epochs trained" if run_epochs < epochs else None}
        print(f"[recipe] {run_epochs} epochs in {seconds:.1f} s ({run_epochs * len(data.pool) / seconds:.0f} "
              f"images/s); the recipe: {whole:.0f} s{' (extrapolated)' if run_epochs < epochs else ''}; "
              f"test accuracy {acc:.3f}", flush=True)
        write(out, result)

    # 3. where a step's time goes
    if not args.no_profile:
        try:
            result["profile"] = profile_steps(cfg, data, device, out.parent)
            print(f"\n[profile] {result['profile']}", flush=True)
        except Exception as err:  # noqa: BLE001 - the profile is an extra; its failure is reported
            result["profile_error"] = f"{type(err).__name__}: {err}"
    result["total_seconds"] = time.perf_counter() - START
    write(out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
