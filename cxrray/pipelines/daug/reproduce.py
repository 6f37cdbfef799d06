"""`cxrray reproduce daug`: DAug (Jin et al.) in miniature, one command.

phantoms with ground-truth masks -> ingest -> pixel DDPM (unconditional) -> the noise-aware classifier over
super-classes (Table 1 analogue: AP per class at several t) -> `cxrray augment` (classifier-guided
translations from alpha_bar ~ 0.08, heatmaps per image) -> where the guided maps are, against the phantoms'
masks, beside Grad-CAM and integrated gradients of a classifier trained here, the oracle and chance (`cxrray
evaluate localisation`: pixel AUROC, pointing game, paired patient bootstraps — what the paper does not
measure) -> the downstream arms on Ray Train at 100% and 10% of the training patients -> one HTML
page with the paper's Table 1 beside ours.

Presets: `tiny` is sized for a 2-core machine (<= 60 min); `paper` is the cluster configuration and has not
been run. Every stage is resumable: pretraining continues from latest.json, the classifier is reused when its
output exists, augment skips written shards, the downstream arms answer "nothing to do" once trained.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from cxrray.config import Config
from cxrray.eval import html
from cxrray.pipelines.recipes import phantoms_once, write_report

PRESETS = {
    "tiny": {"n": 1200, "overrides": [
        "phantom.masks=true", "phantom.size=96", "ingest.size=32", "ingest.shard_samples=256",  # augment: 2 actors
        'ingest.split_fractions={"train": 0.6, "val": 0.1, "test": 0.3}',
        "model.family=ddpm", "model.image_size=32", "model.base_channels=32", "model.channel_mult=[1,2,2]",
        "train.images=24000", "train.global_batch=32", "train.checkpoint_every=8000", "train.eval_every=12000",
        "train.log_every=4000", "noisy_classifier.epochs=30",
        "noisy_classifier.patience=30",  # its val BCE can plateau ~15 epochs before it falls (2026-12-06 run)
        "augment.steps=25", "downstream.images=8000",
        "downstream.model={\"width\": 16, \"embed_dim\": 64}"]},
    "paper": {"n": 200_000, "overrides": [
        "phantom.masks=true", "phantom.size=320", "ingest.size=256", "model.family=ddpm", "model.image_size=256",
        "train.images=20000000", "train.use_gpu=true", "augment.use_gpu=true", "augment.steps=100",
        "downstream.images=2000000"]},
}
def reproduce_daug(cfg: Config, workdir: Path, n: int, shards: str, localise, progress=print) -> dict:
    """Every stage (module doc) under `workdir` / `shards`; returns summary.json's content. `localise(cfg, data,
    output, ddpm, classifier)` is the localisation benchmark (`cxrray evaluate localisation`, a layer above
    the methods: the command passes it in) returning its result."""
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
    progress("[reproduce] 5/6 the guided maps against the masks, beside the baselines")
    local = cfg.model_copy(update={"localisation": cfg.localisation.model_copy(update={
        "methods": ["oracle", "random", "gradcam", "integrated_gradients", "guided"]})})
    where = localise(local, real, workdir / "localisation", checkpoint, str(nc_dir))
    lap("localisation")
    progress("[reproduce] 6/6 downstream arms on Ray Train")
    downstream = run_downstream(aug, workdir / "downstream", cfg, progress)
    lap("downstream")
    where = {k: where[k] for k in ("findings", "seconds")}
    summary = {"real": real, "ddpm": checkpoint, "noisy_classifier": classifier["average_precision"],
               "augment": cfg.augment.model_dump(mode="json", exclude={"actor_resources"}), "localisation": where,
               "downstream": downstream, "seconds": seconds}
    page = write_report(workdir, summary, _page(summary))
    progress(f"[reproduce] done in {sum(seconds.values()) / 60:.1f} min: {page}")
    return summary


def _page(summary: dict) -> str:
    from cxrray.pipelines.daug.downstream import table_rows

    ap = summary["noisy_classifier"]
    t_columns = [c for c in ap[0] if c.startswith("ap_t")]
    where = [{"finding": f, "method": m, "images": v["pixel_auroc"]["images"],
              **{k: v[k]["mean"] for k in ("pixel_auroc", "pointing", "energy_inside")}}
             for f, r in summary["localisation"]["findings"].items() for m, v in r["methods"].items()]
    rows = table_rows(summary["downstream"])
    comparisons = [{"fraction": tag, **c} for tag, per in summary["downstream"]["fractions"].items()
                   for c in per["comparisons"]]
    return html.page("DAug reproduced in miniature (phantoms)", [
        ("Table 1 analogue: the noise-aware classifier's AP per super-class at each t, beside the paper's (MIMIC-CXR)",
         html.table(ap, ["super_class", "positives", "prevalence", *t_columns, "paper_ap"])),
        ("Where the guided maps are (not in the paper): against the phantoms' masks on the test split's positives, "
         "beside the oracle, chance, Grad-CAM and integrated gradients (localisation/report.html: paired tests)",
         html.table(where, list(where[0]) if where else [])),
        ("Downstream arms: class-head AUROC / AP, retrieval mAP@10 and Recall@k (test split)",
         html.table(rows, list(dict.fromkeys(c for r in rows for c in r)))),
        ("heatmaps against each arm: paired, patient-clustered bootstrap (diff = heatmaps - arm)",
         html.table(comparisons, ["fraction", "against", "metric", "diff", "ci_low", "ci_high", "p_value"], 4)),
        ("Stage times (s)", html.table([summary["seconds"]], list(summary["seconds"]), 1))],
        "Ours: phantoms, a tiny pixel DDPM, CPU, 32². Paper: Jin et al., MIMIC-CXR, pretrained backbones. "
        "Figures are reported as measured, whichever way they fall.")

