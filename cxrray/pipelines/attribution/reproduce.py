"""`cxrray reproduce attribution`: latent-diffusion visual attribution (Siddiqui et al.) in miniature, one command.

phantoms with reports, masks and healthy renders -> ingest at the latent model's size -> KL autoencoder ->
latent shards + tokenizer -> report-conditioned latent diffusion (the Stable Diffusion stand-in) -> DreamBooth
with prior preservation on class prompts (normal, then effusion; cardiomegaly left out: the paper's zero-shot) ->
where the maps are, against the masks, beside Grad-CAM, integrated gradients, the empty-prompt baseline, the
oracle and chance, for the fine-tuned model, for the base, and against D(E(x)) rather than the image (the
autoencoder's own error out of the map) -> the img2img study (strength x guidance
sweep, the paper's ablation as FID, zero-shot and localised induction) -> one HTML page with the paper's
figures beside ours.

The localisation benchmark and the img2img study sit a layer above the methods: the command passes them in.
Presets: `tiny` is sized for a 2-core machine (<= 60 min); `paper` is the cluster configuration and has not been
run. Every stage is resumable: pretraining continues from latest.json, latents and DreamBooth skip written shards.
"""
from __future__ import annotations

import time
from pathlib import Path

from cxrray.eval import html
from cxrray.pipelines.recipes import phantoms_once, write_report

# the autoencoder and latent model as `reproduce cheff`'s tiny preset (rates measured there: 7.4 and ~10 img/s);
# DreamBooth at the paper's lr for a quarter of its steps (1200 / 500)
PRESETS = {
    "tiny": {"n": 1600, "common": [
        "phantom.masks=true", "phantom.size=160", "ingest.size=64",
        'ingest.split_fractions={"train": 0.7, "val": 0.1, "test": 0.2}', "train.global_batch=16", "train.lr=0.0005",
        "dreambooth.prior_images=128", "dreambooth.prior_steps=50",
        'dreambooth.stages=[{"name": "normal", "prompt": "Normal chest radiograph.", "steps": 300}, '
        '{"name": "effusion", "prompt": "Pleural effusion.", "finding": "effusion", "steps": 125}]',
        "attribution.steps=50", "img2img.images=24"],
        "stages": {"vae": ["model.family=vae", "train.images=5000", "train.checkpoint_every=2500",
                           "train.eval_every=2500", "train.log_every=1000"],
                   "ldm": ["model.family=ldm", "model.prediction_type=v_prediction", "model.zero_terminal_snr=true",
                           "train.images=8000", "train.checkpoint_every=4000", "train.eval_every=4000",
                           "train.log_every=1000"]}},
    "paper": {"n": 200_000, "common": [
        "phantom.masks=true", "phantom.size=320", "ingest.size=256", "train.use_gpu=true", "attribution.steps=75",
        'dreambooth.stages=[{"name": "normal", "prompt": "Normal chest radiograph.", "steps": 1200}, '
        '{"name": "effusion", "prompt": "Pleural effusion.", "finding": "effusion", "steps": 500}]',
        "img2img.images=500"],
        "stages": {"vae": ["model.family=vae", "train.images=10000000"],
                   "ldm": ["model.family=ldm", "train.images=50000000"]}},
}
PAPER = {"settings": "strength 0.55 / guidance 4 (text: most effective); 0.85 / 7.5, 75 steps (a figure)",
         "ssim": 0.80, "ms_ssim": 0.83, "ablation_fid": {"full": 92, "neither": 113}}


def reproduce_attribution(source: str, overrides: list[str], preset: dict, workdir: Path, n: int, shards: str,
                          localise, study, progress=print) -> dict:
    """Every stage (module doc) under `workdir` / `shards`; returns summary.json's content. `localise(cfg, data,
    output, ldm)` is the localisation benchmark and `study(cfg, data, output, ldm, judge, base)` the img2img
    study (`cxrray evaluate localisation` / `img2img`), each returning its result."""
    from cxrray.config import load_config
    from cxrray.data.ingest import ingest
    from cxrray.pipelines.attribution.dreambooth import dreambooth
    from cxrray.pipelines.latents import latents
    from cxrray.train.pretrain import pretrain

    def config(stage: str | None = None, *extra: str):
        return load_config(source, preset["common"] + (preset["stages"][stage] if stage else []) + list(extra)
                           + list(overrides))

    cfg = config()
    start, seconds = time.perf_counter(), {}

    def lap(stage: str) -> None:
        seconds[stage] = round(time.perf_counter() - start - sum(seconds.values()), 1)

    workdir.mkdir(parents=True, exist_ok=True)
    uri = {k: f"{shards}/{k}" for k in ("real", "vae", "latents", "ldm", "dreambooth")}
    progress(f"[reproduce attribution] 1/7 phantoms: {n} DICOMs with reports, masks and healthy renders")
    phantoms_once(n, workdir / "phantoms", cfg.phantom, progress)
    ingest(workdir / "phantoms", uri["real"], cfg.ingest, source="folder", metadata=workdir / "phantoms" / "labels.csv",
           progress=progress)
    lap("phantoms_ingest")
    progress("[reproduce attribution] 2/7 KL autoencoder")
    pretrain(config("vae"), uri["real"], uri["vae"], progress=progress)
    lap("vae")
    progress("[reproduce attribution] 3/7 latent shards + report tokenizer")
    latents(uri["vae"], uri["real"], uri["latents"], cfg.latents)
    lap("latents")
    progress("[reproduce attribution] 4/7 report-conditioned latent diffusion")
    base = pretrain(config("ldm", f"model.vae_checkpoint={uri['vae']}"), uri["latents"], uri["ldm"],
                    progress=progress)["latest_checkpoint"]
    lap("ldm")
    progress(f"[reproduce attribution] 5/7 DreamBooth: {[s.name for s in cfg.dreambooth.stages]}")
    tuned = dreambooth(base, uri["latents"], uri["dreambooth"], cfg, progress)
    lap("dreambooth")
    progress("[reproduce attribution] 6/7 where the maps are, against the masks (fine-tuned, then the base model)")
    methods = ["oracle", "random", "gradcam", "integrated_gradients", "attribution", "empty_prompt"]
    where = localise(_with_methods(cfg, methods), uri["real"], workdir / "localisation", tuned["checkpoint"])
    # the base model's maps and the D(E(x)) lever: the paper's method alone (its baselines are in the first run)
    where_base = localise(_with_methods(cfg, ["oracle", "attribution"]), uri["real"], workdir / "localisation_base", base)
    # the lever: the counterpart against D(E(x)), not the image, so the autoencoder's own error leaves the map
    recon = _with_methods(cfg, ["oracle", "attribution"])
    recon = recon.model_copy(update={"attribution": recon.attribution.model_copy(update={"reference": "reconstruction"})})
    where_recon = localise(recon, uri["real"], workdir / "localisation_reconstruction", tuned["checkpoint"])
    lap("localisation")
    progress("[reproduce attribution] 7/7 img2img: sweep, ablation, induction")
    examined = study(cfg, uri["real"], workdir / "img2img", tuned["checkpoint"], str(workdir / "localisation" / "classifier"),
                     base)
    lap("img2img")
    fine_tuned = {s.finding for s in cfg.dreambooth.stages if s.finding}
    summary = {"real": uri["real"], "ldm": base, "dreambooth": {"checkpoint": tuned["checkpoint"], "stages": [
                   {k: s[k] for k in ("name", "prompt", "finding", "steps", "instances", "loss")} for s in tuned["stages"]]},
               "localisation": {"fine_tuned": {k: where[k] for k in ("findings", "seconds")},
                                "base": {k: where_base[k] for k in ("findings", "seconds")},
                                "fine_tuned_vs_reconstruction": {k: where_recon[k] for k in ("findings", "seconds")}},
               "img2img": {**{k: examined[k] for k in ("sweep", "ablation", "seconds")}, "induction": [
                   {**r, "not fine-tuned on": r["finding"] not in fine_tuned}
                   for r in examined["induction"]]},
               "attribution": cfg.attribution.model_dump(mode="json"), "paper": PAPER, "seconds": seconds}
    page = write_report(workdir, summary, _page(summary))
    progress(f"[reproduce attribution] done in {sum(seconds.values()) / 60:.1f} min: {page}")
    return summary


def _with_methods(cfg, methods: list[str]):
    return cfg.model_copy(update={"localisation": cfg.localisation.model_copy(update={"methods": methods})})


def _where_rows(result: dict, model: str) -> list[dict]:
    return [{"model": model, "finding": f, "method": m, "images": v["pixel_auroc"]["images"],
             **{k: v[k]["mean"] for k in ("pixel_auroc", "pointing", "energy_inside")},
             "pixel_auroc CI": v["pixel_auroc"]["ci"]}
            for f, r in result["findings"].items() for m, v in r["methods"].items()]


def _page(summary: dict) -> str:
    where = (_where_rows(summary["localisation"]["fine_tuned"], "fine-tuned")
             + [r for r in _where_rows(summary["localisation"]["base"], "base") if r["method"] != "oracle"]
             + [r for r in _where_rows(summary["localisation"]["fine_tuned_vs_reconstruction"], "fine-tuned, D(E(x)) - "
                                       "counterpart") if r["method"] != "oracle"])
    paired = [{"finding": f, "a": p["a"], "b": p["b"], "diff": p["pixel_auroc"]["diff"], "CI": p["pixel_auroc"]["ci"],
               "p": p["pixel_auroc"]["p_value"]}
              for f, r in summary["localisation"]["fine_tuned"]["findings"].items() for p in r["paired"]
              if "attribution" in (p["a"], p["b"])]
    stages = [{"stage": s["name"], "prompt": s["prompt"], "train instances": s["instances"].get("train"),
               **{k: v for k, v in s["loss"].items()}} for s in summary["dreambooth"]["stages"]]
    im = summary["img2img"]
    a = summary["attribution"]
    paper = summary["paper"]
    return html.page("Latent-diffusion visual attribution reproduced in miniature (phantoms)", [
        ("DreamBooth stages: the loss of held-out instances under the stage's prompt and of the prior under the prior "
         "prompt, before and after (same noise)", html.table(stages, list(dict.fromkeys(c for r in stages for c in r)), 4)),
        (f"Where the maps are (not in the paper): pixel AUROC, pointing game, energy inside the mask, test positives; "
         f"img2img at strength {a['strength']:g}, guidance {a['guidance']:g}, {a['steps']} {a['scheduler'].upper()} steps",
         html.table(where, list(where[0]) if where else [])),
        ("The attribution map against each other method (fine-tuned model; paired patient bootstrap, pixel AUROC)",
         html.table(paired, list(paired[0]) if paired else [])),
        (f"Strength x guidance sweep (paper: {paper['settings']}; SSIM to the image ~{paper['ssim']})",
         html.table(im["sweep"], list(im["sweep"][0]))),
        (f"Ablation (paper, FID with Inception: full ~{paper['ablation_fid']['full']}, neither "
         f"~{paper['ablation_fid']['neither']}; ours in the judge's feature space)",
         html.table(im["ablation"], list(im["ablation"][0]))),
        ("Induction on healthy images ('not fine-tuned on': no DreamBooth stage trained on the finding, the paper's "
         "zero-shot; our base model did read it in reports, which the paper's Stable Diffusion had not)",
         html.table(im["induction"], list(dict.fromkeys(c for r in im["induction"] for c in r)))),
        ("Stage times (s)", html.table([summary["seconds"]], list(summary["seconds"]), 1)),
        ("Details", '<p><a href="localisation/report.html">localisation report</a> · '
                    '<a href="img2img/report.html">img2img report (grid)</a></p>')],
        "Ours: phantoms, a tiny autoencoder and latent model trained from scratch on CPU, 64². Paper: Siddiqui et al., "
        "Stable Diffusion with a radiology BERT, CheXpert / MIMIC-CXR. Figures are reported as measured, whichever "
        "way they fall.")
