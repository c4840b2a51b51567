"""weight_filter on digits/resnet18, every class c in turn from ONE trained filter: forget and retain accuracy.

    python scripts/weight_filter_per_class.py SEED [overrides]      (D_f / D_r; SPLIT=val: validation images)

The filter comes from (or goes to) outputs/cache, like a run's. Prints per class c: accuracy on class c, and
on every other class pooled, next to the original's (the issue-4 target: forget <= 1 %, retain within 3 points).
"""

import os
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from mu_runner.metrics.scoring import predict
from mu_runner.run import build

seed = int(sys.argv[1]) if len(sys.argv) > 1 else 0
with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
    cfg = compose("config", overrides=["method=weight_filter", "reference=none", "save_model=false", "logger=none",
                                       f"seed={seed}", "paths.output_dir=/tmp/weight_filter_per_class", *sys.argv[2:]])
stage = build(cfg)
filt = stage.module.filter.eval()
labels = stage.data.labels.cpu()
images = stage.data.val if os.environ.get("SPLIT") == "val" else stage.data.pool
y = labels[images]
count = (y[:, None] == torch.arange(10)).sum(0).float()


def per_class(rows):
    filt.rows = rows
    pred = predict(filt, stage.data.images, images).argmax(1)
    return torch.stack([(pred[y == k] == k).float().mean() for k in range(10)])


base = per_class(None)
print(f"filter training {stage.module.prep_seconds:.1f} s (cached: {stage.module.prep_cached})")
for c in range(10):
    acc, others = per_class([c]), torch.arange(10) != c
    retain = (acc[others] * count[others]).sum() / count[others].sum()
    retain0 = (base[others] * count[others]).sum() / count[others].sum()
    print(f"class {c}: forget {acc[c]:.4f}  retain {retain:.4f} (original {retain0:.4f}, {100 * (retain - retain0):+.2f} pts)")
