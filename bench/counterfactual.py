"""Counterfactual images against phantom ground truth, DiffChest's plain decode (z guidance 1, the
baseline) beside amplified decodes, on the same images in the same run (`cxrray.pipelines.cf_eval`).

    make demo && python bench/counterfactual.py                  # the demo's model, probe and phantoms
    python bench/counterfactual.py --finding cardiomegaly --axis pattern --eps 1 2 --guidance 1 3
    python bench/counterfactual.py --renoise 0.4 0.6 --guidance 1 3   # baseline + stochastic encodings

Reads the demo's outputs (demo_out/, data_shards/demo, data_shards/demo-pretrain); prints per setting the
image effect, the energy ratio inside/outside the region the finding can occupy, and SSIM outside it,
then one JSON line. Grids go to demo_out/cf_eval_<finding>_g<guidance>.png.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from _common import report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--finding", default="effusion")
    parser.add_argument("--guidance", type=float, nargs="+", default=[1.0, 3.0, 10.0])
    parser.add_argument("--renoise", type=float, nargs="*", default=[],
                        help="also decode from the image noised to these fractions of T (stochastic encoding)")
    parser.add_argument("--images", type=int, default=24)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--invert-steps", type=int, default=50)
    parser.add_argument("--mode", default="linear", choices=["closed_form", "linear"])
    parser.add_argument("--axis", nargs="+", default=["filter", "pattern"], choices=["filter", "pattern"],
                        help="filter: the probe's weight (DiffChest, the baseline); pattern: Cov(z) w")
    parser.add_argument("--eps", type=float, nargs="+", default=[0.3, 1.0, 2.0, 3.0])
    parser.add_argument("--workdir", default="demo_out")
    parser.add_argument("--shards", default="file://data_shards/demo")
    parser.add_argument("--checkpoint", default="file://data_shards/demo-pretrain")
    parser.add_argument("--n", type=int, default=1200, help="phantom images of the demo set")
    parser.add_argument("--dilate", type=int, default=2)
    parser.add_argument("--salt", default=None, help="the salt the demo ingested with (default: the demo's own, "
                                                     "used when CXRRAY_SALT was not set for `make demo`)")
    args = parser.parse_args()

    import torch

    from cxrray.cli import DEMO_OVERRIDES, DEMO_SALT
    from cxrray.config import load_config
    from cxrray.pipelines.cf_eval import evaluate, setting_tag
    from cxrray.pipelines.settings import ExplainConfig

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_config("tiny", DEMO_OVERRIDES)
    decodes = ([(None, 1.0)] + [(t, g) for t in args.renoise for g in args.guidance] if args.renoise
               else [(None, g) for g in args.guidance])  # DiffChest's plain decode of the inversion: the baseline
    settings = [cfg.explain.model_copy(update={"z_guidance": g, "mode": args.mode, "eps": eps, "renoise": t,
                                               "axis": a, "steps": args.steps, "invert_steps": args.invert_steps})
                for a in args.axis for eps in args.eps for t, g in decodes]
    start = time.perf_counter()
    results = evaluate(args.checkpoint, str(Path(args.workdir) / "probe"), args.shards, args.finding, settings,
                       phantom_cfg=cfg.phantom, phantom_count=args.n, images=args.images, dilate_px=args.dilate,
                       grid=Path(args.workdir) / f"cf_eval_{args.finding}.png",
                       salt=args.salt or DEMO_SALT)
    figures = {"finding": args.finding, "images": results[0]["images"], "mode": args.mode,
               "steps": args.steps, "invert_steps": args.invert_steps, "seconds": round(time.perf_counter() - start, 1)}
    for r in results:
        g = setting_tag(ExplainConfig(**r["explain"]))
        figures.update({f"{g}_latent_effect": round(r["latent_effect"]["mean"], 3),
                        f"{g}_image_effect": round(r["image_effect"]["mean"], 3),
                        f"{g}_image_effect_ci": [round(v, 3) for v in r["image_effect"]["ci"]],
                        f"{g}_energy_ratio": None if r["energy_ratio"]["ratio"] is None else round(r["energy_ratio"]["ratio"], 2),
                        f"{g}_energy_ratio_ci": [None if v is None else round(v, 2) for v in r["energy_ratio"]["ci"]],
                        f"{g}_ssim_outside": round(r["ssim_outside"]["mean"], 3),
                        f"{g}_mean_abs_change": round(r["mean_abs_change"], 4),
                        f"{g}_image_effect_top3": sorted(((round(v, 3), k) for k, v in r["image_effect_by_label"].items()
                                                           if k != args.finding), reverse=True)[:3]})
    # how much the decoder reads z at all: relative x0 change when z is another patient's, per t
    figures["x0_change_other_patient_z"] = {t: round(v, 4) for t, v in results[0]["x0_change_other_patient_z"].items()}
    report(figures)


if __name__ == "__main__":
    main()
