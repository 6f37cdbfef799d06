"""Counterfactual images against phantom ground truth, DiffChest's plain decode (z guidance 1, the
baseline) beside amplified decodes, on the same images in the same run (`cxrray.pipelines.diffchest.cf_eval`).

    make demo && python bench/counterfactual.py                  # the demo's model, probe and phantoms
    python bench/counterfactual.py --finding cardiomegaly --axis pattern --eps 1 2 --guidance 1 3
    python bench/counterfactual.py --renoise 0.4 0.6 --guidance 1 3   # baseline + stochastic encodings
    python bench/counterfactual.py --judge demo_out/cf_judge \
        --setting axis=pattern,eps=2 axis=effect,eps=1,blend=model,invert_to=0.6   # issue 27's levers, judged

With `--judge DIR` the independent judge (`cxrray.pipelines.diffchest.cf_judge`, trained once into DIR) reads every
counterfactual and the true paired renders, and each setting is checked against `cf_eval.GOALS`. `--setting`
gives explain settings as comma-separated overrides of the demo's (replacing the --axis/--eps/... grid).

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


def _r3(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


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
    parser.add_argument("--setting", nargs="+", default=[], help="explain overrides, e.g. axis=effect,eps=1,blend=model")
    parser.add_argument("--oracle-setting", nargs="*", default=[],
                        help="decode the true paired render's own code also under these overrides (known-answer check)")
    parser.add_argument("--probe", default=None, help="probe directory (default: <workdir>/probe)")
    parser.add_argument("--judge", default=None, help="independent judge directory (trained there when absent)")
    parser.add_argument("--salt", default=None, help="the salt the demo ingested with (default: the demo's own, "
                                                     "used when CXRRAY_SALT was not set for `make demo`)")
    args = parser.parse_args()

    import torch

    from cxrray.cli import DEMO_OVERRIDES, DEMO_SALT
    from cxrray.config import load_config
    from cxrray.pipelines.diffchest.cf_eval import evaluate, setting_tag
    from cxrray.pipelines.settings import ExplainConfig

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    cfg = load_config("tiny", DEMO_OVERRIDES)
    decodes = ([(None, 1.0)] + [(t, g) for t in args.renoise for g in args.guidance] if args.renoise
               else [(None, g) for g in args.guidance])  # DiffChest's plain decode of the inversion: the baseline
    base = {"mode": args.mode, "steps": args.steps, "invert_steps": args.invert_steps}
    def parsed(text: str) -> ExplainConfig:
        return ExplainConfig(**{**cfg.explain.model_dump(), **base, **dict(kv.split("=", 1) for kv in text.split(","))})

    if args.setting:
        settings = [parsed(text) for text in args.setting]
    else:
        settings = [cfg.explain.model_copy(update={**base, "z_guidance": g, "eps": eps, "renoise": t, "axis": a})
                    for a in args.axis for eps in args.eps for t, g in decodes]
    start = time.perf_counter()
    judge = None
    if args.judge:
        from cxrray.pipelines.diffchest.cf_judge import load_judge, train_counterfactual_judge

        judge = (load_judge(args.judge) if (Path(args.judge) / "judge.json").exists() else
                 train_counterfactual_judge(cfg.phantom, cfg.ingest, cfg.cf_judge))
        judge.save(args.judge)
    results = evaluate(args.checkpoint, args.probe or str(Path(args.workdir) / "probe"), args.shards, args.finding,
                       settings, phantom_cfg=cfg.phantom, phantom_count=args.n, images=args.images,
                       dilate_px=args.dilate, grid=Path(args.workdir) / f"cf_eval_{args.finding}.png",
                       salt=args.salt or DEMO_SALT, judge=judge, ingest_cfg=cfg.ingest,
                       oracle_settings=[parsed(text) for text in args.oracle_setting])
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
        if "judged" in r:
            j, v = r["judged"], r["vs_original"]
            figures.update({f"{g}_judge_effect": round(j["effect_vs_original"]["mean"], 3),
                            f"{g}_judge_effect_ci": [round(x, 3) for x in j["effect_vs_original"]["ci"]],
                            f"{g}_judge_effect_vs_recon": round(j["effect_vs_reconstruction"]["mean"], 3),
                            f"{g}_judge_confounder_move": _r3(j["confounder_move_vs_original"]),
                            f"{g}_l1_ratio_vs_original": None if v["l1_ratio"]["ratio"] is None
                            else round(v["l1_ratio"]["ratio"], 2),
                            f"{g}_ssim_outside_vs_original": round(v["ssim_outside"]["mean"], 3),
                            f"{g}_goals": r["goals"]})
        if "mask_fraction" in r:
            figures[f"{g}_mask_fraction"] = round(r["mask_fraction"], 3)
    if judge is not None:
        ideal = results[0]["judged"]["ideal"]
        oracle = ideal["oracle_code"]
        figures.update({"judge_val_auroc": {k: round(v, 3) for k, v in judge.record["val_auroc"].items()},
                        "ideal_judge_effect": round(ideal["effect_vs_original"]["mean"], 3),
                        "ideal_confounder_move": _r3(ideal["confounder_move_vs_original"]),
                        "oracle_code_judge_effect": round(oracle["judged"]["effect_vs_original"]["mean"], 3),
                        "oracle_code_confounder_move": _r3(oracle["judged"]["confounder_move_vs_original"]),
                        "oracle_code_mean_abs_change": round(oracle["mean_abs_change"], 4),
                        "oracle_mean_step_in_effects": oracle["mean_step_in_effects"] and round(oracle["mean_step_in_effects"], 2),
                        "oracle_mean_step_cosine": {k: round(v, 2) for k, v in oracle["mean_step_cosine"].items()}})
        for d in oracle["decodes"]:
            ratio = d["vs_original"]["l1_ratio"]["ratio"]
            figures[f"oracle_code_{d['tag']}"] = {
                "judge_effect": round(d["judged"]["effect_vs_original"]["mean"], 3),
                "confounder_move": _r3(d["judged"]["confounder_move_vs_original"]),
                "l1_ratio": None if ratio is None else round(ratio, 2),
                "ssim_outside": round(d["vs_original"]["ssim_outside"]["mean"], 3)}
    # how much the decoder reads z at all: relative x0 change when z is another patient's, per t
    figures["x0_change_other_patient_z"] = {t: round(v, 4) for t, v in results[0]["x0_change_other_patient_z"].items()}
    report(figures)


if __name__ == "__main__":
    main()
