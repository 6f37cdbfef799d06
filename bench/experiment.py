"""The cohort experiment's fits on Ray (one Ray Train run per (arm, seed), the grid on Ray Tune) against a
plain loop fitting the same (arm, seed) grid with the same code in one process at one thread.

    python bench/experiment.py --real file://data_shards/demo --synthetic file://data_shards/demo [--seeds 2 --epochs 3]

Any shards with echo covariates and train / val / test splits serve (the demo's phantoms have them; as
"synthetic" the same shards do for timing). Prints fits/min of both and their ratio, per core too.
"""
from __future__ import annotations

import argparse
import tempfile
import time

from _common import report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--real", required=True)
    parser.add_argument("--synthetic", required=True)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--width", type=int, default=8)
    args = parser.parse_args()

    import ray
    import torch

    from cxrray.config import load_config
    from cxrray.pipelines.cohorts.detector_fits import fit_detector, run_fits
    from cxrray.pipelines.cohorts.experiment import base_statistics, load_sets
    from cxrray.runtime import ensure_ray

    cfg = load_config(None, ["experiment.arms=[base,gen]", f"experiment.seeds={args.seeds}",
                             f"experiment.epochs={args.epochs}", f"experiment.patience={args.epochs}",
                             f"experiment.width={args.width}"]).experiment
    sets = load_sets(args.real, args.synthetic, cfg)
    data, stats = {k: s.arrays() for k, s in sets.items()}, base_statistics(sets["base"])
    grid = [(a, s) for a in cfg.arms for s in range(cfg.seeds)]
    torch.set_num_threads(1)
    start = time.perf_counter()
    for arm, seed in grid:
        fit_detector(data, stats, cfg, arm, seed, torch.device("cpu"))
    plain_s = time.perf_counter() - start
    ensure_ray()
    cpus = int(ray.cluster_resources().get("CPU", 1))
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        run_fits(data, stats, cfg, f"file://{tmp}", f"bench-{time.time()}", progress=lambda line: None)
        ray_s = time.perf_counter() - start
    ratio = plain_s / ray_s
    report({"fits": len(grid), "epochs": args.epochs, "base_images": len(sets["base"]),
            "ray_tune_train_fits_per_min": round(60 * len(grid) / ray_s, 2),
            "plain_loop_fits_per_min": round(60 * len(grid) / plain_s, 2), "ratio": round(ratio, 3),
            "ratio_per_core": round(ratio / cpus, 3), "cpus": cpus, "ray_seconds": round(ray_s, 1),
            "plain_seconds": round(plain_s, 1)})


if __name__ == "__main__":
    main()
