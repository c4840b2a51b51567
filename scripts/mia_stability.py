"""How much does MIA-efficacy of one fixed model move with the attack's draw? (docs/evaluation.md)

    python scripts/mia_stability.py RUN_DIR [--seeds 20]

RUN_DIR is a finished run (config.yaml, model.safetensors). The model's predictions are computed
once; then `eval.mia_seed` = 0..seeds-1 under each fitting mode: SalUn's single draw
(mia_draws=1), the median of 11 draws, and the fit on all samples with balanced weights
(mia_draws=0, the default). Prints min, max and spread per mode.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import load_file

from mu_runner.evaluation.evaluator import mia_feature
from mu_runner.metrics import functional as MF
from mu_runner.metrics.scoring import predict
from mu_runner.run import load_data, load_weights, make_split, new_net


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("--seeds", type=int, default=20)
    args = parser.parse_args()
    cfg = OmegaConf.load(args.run_dir / "config.yaml")
    data = load_data(cfg)
    split = make_split(cfg, data)
    net = load_weights(new_net(cfg, data), load_file(str(args.run_dir / "model.safetensors")), "model")
    labels, test_labels = data.labels, data.test_labels
    keep = test_labels >= 0
    if split.classes is not None:
        keep = ~(test_labels[:, None] == test_labels.new_tensor(split.classes)).any(1)
    kind = cfg.eval.mia
    members = mia_feature(predict(net, data.images, split.retain), labels[split.retain], kind)
    nonmembers = mia_feature(predict(net, data.test_images)[keep], test_labels[keep], kind)
    target = mia_feature(predict(net, data.images, split.forget), labels[split.forget], kind)
    print(f"{args.run_dir}: {len(members)} members, {len(nonmembers)} non-members, {len(target)} forget samples")
    for name, draws in (("SalUn, one draw (mia_draws=1)", 1), ("median of 11 draws", 11),
                        ("all samples, balanced (mia_draws=0)", 0)):
        start = time.perf_counter()
        values = [MF.mia_efficacy(members, nonmembers, target, seed=s, draws=draws) for s in range(args.seeds)]
        sec = (time.perf_counter() - start) / args.seeds
        print(f"{name:<38} min {min(values):.3f}  max {max(values):.3f}  spread {max(values) - min(values):.3f}"
              f"  ({sec:.2f} s per value)")


if __name__ == "__main__":
    main()
