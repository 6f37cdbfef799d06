"""`cxrray reproduce daug`: DAug (Jin et al.) in miniature, one command.

phantoms with ground-truth masks -> ingest -> pixel DDPM (unconditional) -> the noise-aware classifier over
super-classes (Table 1 analogue: AP per class at several t) -> `cxrray augment` (classifier-guided
translations from alpha_bar ~ 0.08, heatmaps per image) -> where the heatmaps are, against the phantoms' masks
(pixel AUROC and pointing game of the pleural heatmap on effusion, the cardiac heatmap on cardiomegaly — what the
paper does not measure) -> the downstream arms on Ray Train at 100% and 10% of the training patients -> one HTML
page with the paper's Table 1 beside ours.

Presets: `tiny` is sized for a 2-core machine (<= 60 min); `paper` is the cluster configuration and has not
been run. Every stage is resumable: pretraining continues from latest.json, the classifier is reused when its
output exists, augment skips written shards, the downstream arms answer "nothing to do" once trained.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from cxrray.config import Config
from cxrray.eval import html
from cxrray.pipelines.recipes import phantoms_once, write_report

PRESETS = {
    "tiny": {"n": 1200, "overrides": [
        "phantom.masks=true", "phantom.size=96", "ingest.size=32",
        'ingest.split_fractions={"train": 0.6, "val": 0.1, "test": 0.3}',
        "model.family=ddpm", "model.image_size=32", "model.base_channels=32", "model.channel_mult=[1,2,2]",
        "train.images=24000", "train.global_batch=32", "train.checkpoint_every=8000", "train.eval_every=12000",
        "train.log_every=4000", "noisy_classifier.epochs=30", "augment.steps=25", "downstream.images=8000",
        "downstream.model={\"width\": 16, \"embed_dim\": 64}"]},
    "paper": {"n": 200_000, "overrides": [
        "phantom.masks=true", "phantom.size=320", "ingest.size=256", "model.family=ddpm", "model.image_size=256",
        "train.images=20000000", "train.use_gpu=true", "augment.use_gpu=true", "augment.steps=100",
        "downstream.images=2000000"]},
}
HEATMAP_OF = {"pleural": "effusion", "cardiac": "cardiomegaly"}  # heatmap super-class -> the finding's mask


def heatmap_localisation(aug_uri: str, split: str, classes: list[str], seed: int) -> list[dict]:
    """Per heatmap class with a mapped finding: pixel AUROC and pointing game on the images positive for the
    finding, with patient-clustered CIs, beside a random map's (the chance level) and a paired test."""
    from cxrray.eval.localisation import clustered_mean, paired_clustered, pixel_auroc, pointing_game
    from cxrray.pipelines.truth import load_truth

    wanted = [c for c in classes if c in HEATMAP_OF]
    truth = load_truth(aug_uri, split, also=tuple(f"heatmap_{c}.png" for c in wanted))
    rng = np.random.default_rng(seed)
    rows = []
    for c in wanted:
        finding = HEATMAP_OF[c]
        if finding not in truth.masks:
            continue
        idx = truth.positives(finding)
        maps, masks = truth.extra[f"heatmap_{c}.png"][idx].astype(np.float64), truth.masks[finding][idx]
        patients = [truth.patients[i] for i in idx]
        noise = rng.random(maps.shape)
        ours, chance = pixel_auroc(maps, masks), pixel_auroc(noise, masks)
        rows.append({"heatmap": c, "finding": finding, "images": int(len(idx)),
                     "pixel_auroc": clustered_mean(ours, patients, seed=seed),
                     "pointing": clustered_mean(pointing_game(maps, masks), patients, seed=seed),
                     "random_pixel_auroc": clustered_mean(chance, patients, seed=seed),
                     "vs_random": paired_clustered(ours, chance, patients, seed=seed)})
    return rows


def reproduce_daug(cfg: Config, workdir: Path, n: int, shards: str, progress=print) -> dict:
    """Every stage (module doc) under `workdir` / `shards`; returns summary.json's content."""
    from cxrray.data.ingest import ingest
    from cxrray.pipelines.daug.augment import augment
    from cxrray.pipelines.daug.downstream import run_downstream
    from cxrray.pipelines.daug.noisy_classifier import run_noisy_classifier
    from cxrray.train.pretrain import pretrain

    start = time.perf_counter()
    seconds = {}

    def lap(stage: str) -> None:
        seconds[stage] = round(time.perf_counter() - start - sum(seconds.values()), 1)

    workdir.mkdir(parents=True, exist_ok=True)
    real, ddpm, aug = f"{shards}/real", f"{shards}/ddpm", f"{shards}/augmented"
    progress(f"[reproduce] 1/6 phantoms: {n} DICOMs with masks")
    phantoms_once(n, workdir / "phantoms", cfg.phantom, progress)
    ingest(workdir / "phantoms", real, cfg.ingest, source="folder", metadata=workdir / "phantoms" / "labels.csv",
           progress=progress)
    lap("phantoms_ingest")
    progress(f"[reproduce] 2/6 pixel DDPM to {cfg.train.images:,} images -> {ddpm}")
    checkpoint = pretrain(cfg, real, ddpm, progress=progress)["latest_checkpoint"]
    lap("ddpm")
    progress("[reproduce] 3/6 noise-aware classifier (Table 1 analogue)")
    nc_dir = workdir / "noisy_classifier"
    if (nc_dir / "noisy_classifier.json").exists():
        classifier = json.loads((nc_dir / "noisy_classifier.json").read_text())
    else:
        classifier = run_noisy_classifier(real, nc_dir, cfg, progress)
    lap("noisy_classifier")
    progress(f"[reproduce] 4/6 augment: heatmaps {cfg.augment.classes} -> {aug}")
    augment(checkpoint, str(nc_dir), real, aug, cfg.augment)
    lap("augment")
    progress("[reproduce] 5/6 heatmaps against the masks")
    where = heatmap_localisation(aug, "test", cfg.augment.classes, cfg.downstream.seed)
    lap("localisation")
    progress("[reproduce] 6/6 downstream arms on Ray Train")
    downstream = run_downstream(aug, workdir / "downstream", cfg, progress)
    lap("downstream")
    summary = {"real": real, "ddpm": checkpoint, "noisy_classifier": classifier["average_precision"],
               "augment": cfg.augment.model_dump(mode="json", exclude={"actor_resources"}), "heatmap_localisation": where,
               "downstream": downstream, "seconds": seconds}
    page = write_report(workdir, summary, _page(summary))
    progress(f"[reproduce] done in {sum(seconds.values()) / 60:.1f} min: {page}")
    return summary


def _page(summary: dict) -> str:
    from cxrray.pipelines.daug.downstream import table_rows

    ap = summary["noisy_classifier"]
    t_columns = [c for c in ap[0] if c.startswith("ap_t")]
    where = [{"heatmap": r["heatmap"], "finding": r["finding"], "images": r["images"],
              "pixel AUROC": _ci(r["pixel_auroc"]), "pointing game": _ci(r["pointing"]),
              "random map": _ci(r["random_pixel_auroc"]), "p vs random": r["vs_random"]["p_value"]}
             for r in summary["heatmap_localisation"]]
    rows = table_rows(summary["downstream"])
    comparisons = [{"fraction": tag, **c} for tag, per in summary["downstream"]["fractions"].items()
                   for c in per["comparisons"]]
    return html.page("DAug reproduced in miniature (phantoms)", [
        ("Table 1 analogue: the noise-aware classifier's AP per super-class at each t, beside the paper's (MIMIC-CXR)",
         html.table(ap, ["super_class", "positives", "prevalence", *t_columns, "paper_ap"])),
        ("Where the heatmaps are (not in the paper): pixel AUROC and pointing game against the phantoms' masks, "
         "positives of the test split, patient-clustered 95% CIs", html.table(where, list(where[0]) if where else [])),
        ("Downstream arms: class-head AUROC / AP, retrieval mAP@10 and Recall@k (test split)",
         html.table(rows, list(dict.fromkeys(c for r in rows for c in r)))),
        ("heatmaps against each arm: paired, patient-clustered bootstrap (diff = heatmaps - arm)",
         html.table(comparisons, ["fraction", "against", "metric", "diff", "ci_low", "ci_high", "p_value"], 4)),
        ("Stage times (s)", html.table([summary["seconds"]], list(summary["seconds"]), 1))],
        "Ours: phantoms, a tiny pixel DDPM, CPU, 32². Paper: Jin et al., MIMIC-CXR, pretrained backbones. "
        "Figures are reported as measured, whichever way they fall.")


def _ci(stat: dict) -> str:
    if stat["mean"] is None:
        return "n/a"
    return f"{stat['mean']:.3f} ({stat['ci'][0]:.3f}–{stat['ci'][1]:.3f})"
