"""A one-shot class method on digits/resnet18, every class c in turn: forget and retain accuracy vs the original.

    python scripts/per_class.py METHOD SEED [overrides]        e.g. python scripts/per_class.py mnemonic 0

For each class c a run with forget.classes=[c] (no retrained reference, nothing written but the cache):
accuracy on D_f (class c's training images) and on D_r, next to the original's, and what the method chose
(metrics.json's `method_choices`). The issue-4 target for mnemonic: forget <= 1 %, retain within 3 points.
"""

import logging
import sys
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir

from mu_runner.metrics.scoring import predict
from mu_runner.run import build

logging.disable(logging.WARNING)
method, seed = sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 0


def accuracy(net, stage, indices) -> float:
    with torch.no_grad():
        pred = predict(net.eval(), stage.data.images, indices).argmax(1).cpu()
    return float((pred == stage.data.labels.cpu()[indices]).float().mean())


met = 0
for c in range(10):
    with initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        cfg = compose("config", overrides=[f"method={method}", "reference=none", "save_model=false", "logger=none",
                                           "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
                                           f"seed={seed}", f"forget.classes=[{c}]",
                                           f"paths.output_dir=/tmp/per_class_{method}", *sys.argv[3:]])
    stage = build(cfg)
    stage.fit()
    f0, r0 = accuracy(stage.original, stage, stage.split.forget), accuracy(stage.original, stage, stage.split.retain)
    f1, r1 = accuracy(stage.module.net, stage, stage.split.forget), accuracy(stage.module.net, stage, stage.split.retain)
    ok = f1 <= 0.01 and r1 >= r0 - 0.03
    met += ok
    print(f"class {c}: forget {f1:.4f} (original {f0:.4f})  retain {r1:.4f} (original {r0:.4f}, "
          f"{100 * (r1 - r0):+.2f} pts)  {'met' if ok else 'MISSED'}  {stage.module.choices()}", flush=True)
print(f"{met} of 10 classes meet forget <= 1 % and retain within 3 points")
