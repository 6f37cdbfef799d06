"""`cxrray reproduce cxr_ddpm | cheff`: a paper's headline experiment in miniature, one command.

cheff (`reproduce_cheff`): phantoms with reports -> ingest at the SR's size and at the latent model's ->
KL autoencoder -> latent shards + tokenizer -> report-conditioned latent diffusion -> SR3 on bicubic pairs,
then fine-tuned on D(E(x)) -> `cxrray evaluate generation` -> one HTML page (its report, the stages'
training figures). Below, cxr_ddpm:

phantoms (age visible in the heart, disease rising with age, young patients with heart disease thinned
out) -> ingest -> covariate DDPM (age, sex, IVSd, LVIDd, LVPWd) -> the paper's cohort (age -0.23 sd x0.84,
echo means raised, independent draws) -> generation -> the Base / Gen / Base+Gen / Base+Gen(Pos)
experiment -> the synthetic-set audit -> one HTML page with the paper's tables beside ours.

Presets: `tiny` is sized for a make-demo-class machine (2 CPU cores, <= 60 min); `paper` is the cluster
configuration (GPU workers, 256², 1000-step DDPM sampling) and has not been run by the session that
wrote it. Every stage is resumable: a rerun skips what is finished (pretraining continues from
latest.json, generation skips written shards, the experiment skips finished fits).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from cxrray.config import Config
from cxrray.eval import html

# the paper's cohort, in z-units of the model's training statistics (issue 13; Streiffer et al.)
PAPER_COHORT = {"seed": 0, "sex": {"M": 0.5, "F": 0.5}, "correlation": "independent", "covariates": {
    "age": {"shift_sd": -0.23, "scale_sd": 0.84, "clip": [18, 90]}, "ivsd": {"shift_sd": 0.52, "scale_sd": 1.19},
    "lvidd": {"shift_sd": 0.61, "scale_sd": 1.28}, "lvpwd": {"shift_sd": 0.61, "scale_sd": 1.26}}}
COVARIATES = ["age", "sex", "ivsd", "lvidd", "lvpwd"]

PRESETS = {
    "tiny": {"n": 2000, "overrides": [
        "model.family=ddpm", f"model.covariates=[{','.join(COVARIATES)}]", "model.image_size=32",
        "model.base_channels=32", "model.channel_mult=[1,2,2]", "ingest.size=32", "phantom.size=96",
        "phantom.age_heart=0.04", "phantom.disease_age_slope=1.0", "phantom.young_positive_keep=0.3",
        'ingest.split_fractions={"train": 0.6, "val": 0.1, "test": 0.3}',
        "train.images=24000", "train.global_batch=32", "train.checkpoint_every=8000", "train.eval_every=12000",
        "train.log_every=1600", "generate.steps=25", "generate.shard_samples=100", "generate.batch_size=50",
        "experiment.seeds=5", "experiment.width=8", "experiment.epochs=12", "experiment.patience=3",
        "synthetic_audit.epochs=15"],
        # issue 27 §4: the same requests sampled at each classifier-free guidance, judged by the audit's judge
        "guidance_sweep": {"images": 256, "guidance": [1.0, 2.0, 3.0, 5.0]}},
    "paper": {"n": 200_000, "overrides": [
        "model.family=ddpm", f"model.covariates=[{','.join(COVARIATES)}]", "model.image_size=256", "ingest.size=256",
        "phantom.size=320", "phantom.age_heart=0.04", "phantom.disease_age_slope=1.0", "phantom.young_positive_keep=0.3",
        "train.images=20000000", "train.use_gpu=true", "generate.sampler=ddpm", "generate.steps=1000",
        "generate.use_gpu=true", "experiment.use_gpu=true", "experiment.width=32", "experiment.epochs=50"],
        "guidance_sweep": {"images": 2000, "guidance": [1.0, 2.0, 3.0, 5.0]}},
}


def reproduce_cxr_ddpm(cfg: Config, workdir: Path, n: int, shards: str, sweep: dict | None = None,
                       progress=print) -> dict:
    """Run every stage (module doc) under `workdir` / `shards`; returns the summary written to
    workdir/summary.json, the page at workdir/reproduce.html. `sweep` ({"images", "guidance": [w, ...]}):
    the paper's cohort drawn again (seed 1, `images` rows) and sampled at each guidance w with the same
    noise, for the audit's judge to read (summary["audit"]["guidance_sweep"])."""
    from cxrray.data.ingest import ingest
    from cxrray.pipelines.cohort import CohortSpec, describe, draw
    from cxrray.pipelines.experiment import run_experiment
    from cxrray.pipelines.generate import generate_cohort
    from cxrray.pipelines.synthetic_audit import run_synthetic_audit
    from cxrray.io.loading import checkpoint_config
    from cxrray.train.pretrain import pretrain

    workdir.mkdir(parents=True, exist_ok=True)
    real, run, synthetic = f"{shards}/real", f"{shards}/ddpm", f"{shards}/synthetic"
    phantoms = workdir / "phantoms"
    progress(f"[reproduce] 1/7 phantoms: {n} DICOMs (age_heart {cfg.phantom.age_heart}, disease_age_slope "
             f"{cfg.phantom.disease_age_slope}, young_positive_keep {cfg.phantom.young_positive_keep})")
    _phantoms(n, phantoms, cfg.phantom, progress)
    progress(f"[reproduce] 2/7 ingest -> {real}")
    manifest = ingest(phantoms, real, cfg.ingest, source="folder", metadata=phantoms / "labels.csv", progress=progress)
    progress(f"[reproduce] 3/7 covariate DDPM to {cfg.train.images:,} images -> {run}")
    status = pretrain(cfg, real, run, progress=progress)
    checkpoint = status["latest_checkpoint"]
    model = checkpoint_config(checkpoint)
    base_images = manifest["splits"][cfg.experiment.train_split]["images"]
    spec = CohortSpec(n=base_images, **PAPER_COHORT)
    composition = {"cohort": describe(draw(spec, model), model),
                   "training": describe(draw(CohortSpec(n=base_images, seed=0), model), model)}
    progress(f"[reproduce] 4/7 the paper's cohort: {base_images} images, SLVH {composition['cohort']['prevalence_pct']['slvh']:.1f}% "
             f"/ DLV {composition['cohort']['prevalence_pct']['dlv']:.1f}% (training distribution: "
             f"{composition['training']['prevalence_pct']['slvh']:.1f}% / {composition['training']['prevalence_pct']['dlv']:.1f}%)")
    progress(f"[reproduce] 5/7 generate -> {synthetic}")
    generate_cohort(checkpoint, spec, synthetic, cfg.generate)
    swept = {}
    if sweep:
        again = CohortSpec(n=sweep["images"], **{**PAPER_COHORT, "seed": 1})
        for w in sweep["guidance"]:
            uri = swept[f"guidance {w:g}"] = f"{shards}/guidance/w{w:g}"
            progress(f"[reproduce] 5/7 guidance sweep: {sweep['images']} images at guidance {w:g} -> {uri}")
            generate_cohort(checkpoint, again, uri, cfg.generate.model_copy(update={"guidance": w}))
    progress("[reproduce] 6/7 experiment: Base / Gen / Base+Gen / Base+Gen(Pos)")
    experiment = run_experiment(real, synthetic, f"file://{(workdir / 'experiment').resolve()}", cfg, progress)
    progress("[reproduce] 7/7 audit of the synthetic set" + (" and of the guidance sweep" if swept else ""))
    audit = run_synthetic_audit(synthetic, real, f"file://{(workdir / 'audit').resolve()}", cfg, also=swept,
                                progress=progress)
    summary = {"real": {"uri": real, "samples": manifest["samples"], "splits": manifest["splits"]},
               "model": {"checkpoint": checkpoint, "images_shown": status["images_shown"]},
               "composition": composition, "synthetic": synthetic, "experiment": _headline(experiment),
               "audit": {"fidelity": audit["fidelity"], "guidance_sweep": audit["fidelity_also"], "quality": audit["quality"],
                         "memorisation": audit["memorisation"]}}
    page = _write(workdir, summary, _page(summary))
    progress(f"[reproduce] done: {page} (experiment/report.html, audit/report.html beside it)")
    return summary


def _phantoms(n: int, folder: Path, phantom_cfg, progress) -> None:
    """n phantom DICOMs under `folder`, unless the folder already holds exactly n (a rerun)."""
    from cxrray.data.phantom import generate

    labels = folder / "labels.csv"
    if not labels.exists() or len(labels.read_text().splitlines()) != n + 1:
        step = max(1, n // 5)
        generate(n, folder, phantom_cfg, progress=lambda d, t: (d % step == 0 or d == t) and progress(f"[phantoms] {d}/{t}"))


def _write(workdir: Path, summary: dict, page_html: str) -> Path:
    """summary.json and reproduce.html under `workdir`; returns the page's path."""
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    page = workdir / "reproduce.html"
    page.write_text(page_html)
    return page


def _headline(metrics: dict) -> dict:
    findings = metrics["overall"]["findings"]
    return {"auroc": {f: {a: v["auroc"] for a, v in per.items()} for f, per in findings.items()},
            "auprc_composite": {a: v["auprc"] for a, v in findings["composite_slvh_dlv"].items()},
            "young_lift": metrics["young_lift"], "data": metrics["data"], "paper": metrics["paper"]}


def _page(summary: dict) -> str:
    from cxrray.pipelines.experiment import NAMES
    from cxrray.pipelines.synthetic_audit import FIDELITY_COLUMNS, fidelity_rows

    e, a = summary["experiment"], summary["audit"]
    rows = []
    for arm in e["auroc"]["composite_slvh_dlv"]:
        row = {"arm": arm}
        for f, name in NAMES.items():
            ours = e["auroc"][f][arm]
            row[f"{name} ours"] = f"{ours['value']:.3f} ({ours['ci_low']:.3f}–{ours['ci_high']:.3f})"
            row[f"{name} paper"] = e["paper"]["auroc"][f].get(arm)
            if arm != "base":
                row[f"{name} p vs base"] = ours.get("p_value")
        auprc = e["auprc_composite"][arm]
        row["AUPRC ours"] = f"{auprc['value']:.3f} ({auprc['ci_low']:.3f}–{auprc['ci_high']:.3f})"
        row["AUPRC paper"] = e["paper"]["auprc"]["composite_slvh_dlv"].get(arm)
        rows.append(row)
    cohort = [{"set": k, "n": v["n"], "age": v["age"]["mean"], "% under 60": v["age"]["under_60_pct"], "% women": v["women_pct"],
               **{f"% {f}": p for f, p in v["prevalence_pct"].items()}} for k, v in summary["composition"].items()]
    fidelity = [{"covariate": k, **v} for k, v in a["fidelity"].items() if k != "sex"]
    sweep = a.get("guidance_sweep") or {}
    sections = [
        ("Cohort composition (requested) against the training distribution", html.table(cohort, list(cohort[0]), 1)),
        ("Table: test AUROC (95% CI, patient-clustered) and paired p against Base, beside the paper's",
         html.table(rows, list(rows[0]))),
        ("Under 60, composite: Base+Gen(Pos) against Base (paper: 0.86, +3.7%)",
         html.table([e["young_lift"]], list(e["young_lift"])) if e["young_lift"] else "too few young positives"),
        ("Fidelity (image-only judge; issue 27's goal: r_requested >= 0.8 of the judge's ceiling r_real_test)",
         html.table(fidelity, ["covariate", "r_requested", "r_shuffled", "r_real_test", "of_ceiling"])
         + html.table([{"covariate": "sex", **a["fidelity"]["sex"]}], ["covariate", *a["fidelity"]["sex"]])),
        *([("Classifier-free guidance sweep: the same requests and noise at each guidance, the same judge",
            html.table(fidelity_rows(sweep), FIDELITY_COLUMNS))] if sweep else []),
        ("FID / KID in the judge's feature space (the paper's Inception FIDs 9.62 / 13.5 / 4.07 are not comparable in scale)",
         html.table([{"pair": p, **v} for p, v in a["quality"]["judge_features"].items()], ["pair", "fid", "kid", "kid_sd"], 4)),
        ("Memorisation", html.table([{"space": s, **m} for s, m in a["memorisation"].items()],
                                    ["space", "flagged", "flagged_pct", "expected_pct", "p_value_more_than_expected"], 4)),
        ("Details", '<p><a href="experiment/report.html">experiment report</a> · <a href="audit/report.html">audit report</a></p>'),
    ]
    return html.page("cxr_ddpm reproduced in miniature (phantoms)", sections,
                     "Ours: phantoms, a tiny covariate DDPM, CPU. Paper: Streiffer et al., CheXchoNet (71,589 images), "
                     "1000-step DDPM. Figures are reported as measured, whichever way they fall.")


# Cheff in miniature: per stage, the model and its training length (each stage's own `--set`s)
CHEFF_PRESETS = {
    # sized from rates measured on 2 cores to fit the hour, not from the figures: autoencoder 7.4 img/s at 64²,
    # latent model ~10, SR3 4.1 (base) / 3.4 (fine-tune) img/s training and 7.5 images x DDIM steps / s sampling
    # at 128² on both cores; the judge reads 64² (7 s/epoch; 40 s at 128²). Every stage is short of
    # convergence, and the page says so. (The first sizing, 6,000 / 10,000 / 2,000 / 1,000 images and a 128²
    # judge on one thread, took ~136 min.)
    "tiny": {"n": 2000, "common": ["phantom.size=160", 'ingest.split_fractions={"train": 0.7, "val": 0.1, "test": 0.2}',
                                   "train.global_batch=16", "train.lr=0.0005", "generation_eval.images=24",
                                   "generation_eval.prompts=64", "generation_eval.unconditional=32",
                                   "generation_eval.sr_steps=20", "generation_eval.judge_size=64"],
             "stages": {"vae": ["model.family=vae", "train.images=5000", "train.checkpoint_every=2500",
                                "train.eval_every=2500", "train.log_every=1000"],
                        # v + zero terminal SNR: with eps the clean-latent error is amplified ~426x at t = 980
                        # and sampled latents had std 10.7-13.9 against the real 1.09 (README, "Where sampling failed")
                        "ldm": ["model.family=ldm", "model.prediction_type=v_prediction", "model.zero_terminal_snr=true",
                                "train.images=8000", "train.checkpoint_every=4000",
                                "train.eval_every=4000", "train.log_every=1000"],
                        "sr_base": ["model.family=sr", "train.images=1500", "train.checkpoint_every=1500",
                                    "train.eval_every=1500", "train.log_every=500", "train.sample_steps=20"],
                        "sr": ["model.family=sr", "model.degrade=autoencoder", "train.images=500",
                               "train.checkpoint_every=500", "train.eval_every=500", "train.log_every=250",
                               "train.sample_steps=20"]}},
    "paper": {"n": 200_000, "common": ["phantom.size=1024", "train.use_gpu=true", "generation_eval.steps=150",
                                       "generation_eval.images=2000", "generation_eval.prompts=2000",
                                       "generation_eval.unconditional=2000"],
              "stages": {"vae": ["model.family=vae", "train.images=10000000"],
                         "ldm": ["model.family=ldm", "train.images=50000000"],
                         "sr_base": ["model.family=sr", "train.images=10000000"],
                         "sr": ["model.family=sr", "model.degrade=autoencoder", "train.images=5000000"]}},
}


def reproduce_cheff(source: str, overrides: list[str], preset: dict, workdir: Path, n: int, shards: str,
                    progress=print) -> dict:
    """Every Cheff stage (module doc) under `workdir` / `shards`, each with the preset's common and stage
    `--set`s then the user's `overrides`; returns summary.json's content, the page at workdir/reproduce.html."""
    from cxrray.config import load_config
    from cxrray.data.ingest import ingest
    from cxrray.io.loading import read_state
    from cxrray.pipelines.generation_eval import run_generation_eval
    from cxrray.pipelines.latents import latents
    from cxrray.train.pretrain import pretrain

    def config(stage: str | None = None, *extra: str):
        return load_config(source, preset["common"] + (preset["stages"][stage] if stage else []) + list(extra)
                           + list(overrides))

    cfg = config()
    workdir.mkdir(parents=True, exist_ok=True)
    low = config("ldm").model.image_size
    high = config("sr_base").model.image_size
    uri = {k: f"{shards}/{k}" for k in ("real_high", "real_low", "vae", "latents", "ldm", "sr_base", "sr")}
    phantoms = workdir / "phantoms"
    seconds, since = {}, [time.perf_counter()]

    def lap(stage: str) -> None:  # wall seconds per stage (a reused stage: its check only)
        now = time.perf_counter()
        seconds[stage], since[0] = round(now - since[0], 1), now

    progress(f"[reproduce cheff] 1/8 phantoms: {n} DICOMs with reports")
    _phantoms(n, phantoms, cfg.phantom, progress)
    lap("phantoms")
    progress(f"[reproduce cheff] 2/8 ingest at {high}² and {low}²")
    for key, size in (("real_high", high), ("real_low", low)):
        ingest(phantoms, uri[key], config(None, f"ingest.size={size}").ingest, source="folder",
               metadata=phantoms / "labels.csv", progress=progress)
    lap("ingest")
    runs = {}
    progress("[reproduce cheff] 3/8 KL autoencoder")
    runs["vae"] = pretrain(config("vae"), uri["real_low"], uri["vae"], progress=progress)
    lap("vae")
    progress("[reproduce cheff] 4/8 latent shards + report tokenizer")
    latents(uri["vae"], uri["real_low"], uri["latents"], cfg.latents)
    lap("latents")
    progress("[reproduce cheff] 5/8 report-conditioned latent diffusion")
    runs["ldm"] = pretrain(config("ldm", f"model.vae_checkpoint={uri['vae']}"), uri["latents"], uri["ldm"], progress=progress)
    lap("ldm")
    progress("[reproduce cheff] 6/8 SR3 on bicubic pairs")
    runs["sr_base"] = pretrain(config("sr_base"), uri["real_high"], uri["sr_base"], progress=progress)
    lap("sr_base")
    progress("[reproduce cheff] 7/8 SR3 fine-tuned on D(E(x))")
    runs["sr"] = pretrain(config("sr", f"model.vae_checkpoint={uri['vae']}", f"model.init_from={uri['sr_base']}"),
                          uri["real_high"], uri["sr"], progress=progress)
    lap("sr")
    progress("[reproduce cheff] 8/8 evaluate generation")
    evaluation = run_generation_eval(uri["ldm"], uri["real_high"], f"file://{(workdir / 'evaluation').resolve()}", cfg,
                                     sr=uri["sr"], sr_base=uri["sr_base"], progress=progress)
    lap("evaluation")

    def last_metrics(run: dict) -> dict:
        return read_state(run["latest_checkpoint"]).get("metrics", {})

    summary = {"sizes": {"ldm": low, "sr": high}, "phantoms": n, "seconds": seconds,
               "training": {k: {"images_shown": r["images_shown"], "metrics": last_metrics(r)} for k, r in runs.items()},
               "evaluation": {k: evaluation[k] for k in ("table2", "sr_start_sweep", "ldm", "denoising", "quality", "diversity",
                                                         "conditioning", "laterality", "device_removal", "paper",
                                                         "not_measured")}}
    page = _write(workdir, summary, _cheff_page(summary))
    progress(f"[reproduce cheff] done: {page} (evaluation/report.html beside it)")
    return summary


def _cheff_page(summary: dict) -> str:
    e = summary["evaluation"]
    training = [{"stage": k, "images_shown": v["images_shown"],
                 **{m: v["metrics"].get(m) for m in ("loss", "psnr", "ssim", "sr_psnr", "bicubic_psnr")}}
                for k, v in summary["training"].items()]
    auroc = [{"label": r["label"], "prompts with": r.get("prompts_with"), "ours": r.get("auroc_generated"),
              "ci": r.get("auroc_ci"), "judge on real": r.get("auroc_real"),
              "target": 0.8 if r["label"] in ("effusion", "cardiomegaly", "chest_tube", "pacemaker") else None,
              "note": r.get("note")}
             for r in e["conditioning"]]
    q = e["quality"]["judge_features"]["synthetic_vs_test"]
    ldm = e["ldm"]
    ldm_auroc = [{"label": r["label"], "prompts with": r.get("prompts_with"), "ours": r.get("auroc_generated"),
                  "ci": r.get("auroc_ci"), "judge on real": r.get("auroc_real"),
                  "target": 0.8 if r["label"] in ("effusion", "cardiomegaly", "pacemaker") else None, "note": r.get("note")}
                 for r in ldm["conditioning"]]
    sweep_cols = ["guidance", "fid", "kid", *sorted({k for r in ldm["guidance_sweep"] for k in r if k.startswith("auroc_")})]
    sections = [
        ("Table 2 analogue (ours beside the paper's)", html.table(e["table2"], ["stage", "size", "mse", "psnr", "ssim",
                                                                              "paper_psnr", "paper_ssim"], 4)),
        ("SR3 start: from the bicubic upsample noised to start x T (1 = from pure noise, as SR3); SR alone on real "
         "images and the cascade's FID", html.table(e["sr_start_sweep"], ["start", "psnr", "ssim", "cascade_fid",
                                                                          "cascade_kid"], 4)),
        (f"The latent model alone ({ldm['size']}², decoded; target AUROC 0.8, latent std within 20% of the real "
         "latents')", html.table(ldm_auroc, list(ldm_auroc[0]), 3) + html.table([ldm["latent_std"]], list(ldm["latent_std"]), 3)),
        ("The latent model alone: classifier-free guidance sweep", html.table(ldm["guidance_sweep"], sweep_cols, 3)),
        ("Generation", html.table([{"": "ours (judge features, vs real test)", "fid": q["fid"], "kid": q["kid"]},
                                   {"": "paper, Cheff (Inception)", "fid": e["paper"]["fid"], "kid": e["paper"]["kid"]},
                                   {"": "paper, pixel-space cascade", "fid": e["paper"]["pixel_cascade_fid"],
                                    "kid": e["paper"]["pixel_cascade_kid"]}], ["", "fid", "kid"], 4)),
        ("Report conditioning through the whole cascade: the judge's AUROC on samples from test reports",
         html.table(auroc, list(auroc[0]), 3)),
        ("Laterality: the judge's side of samples whose report gives one (target 0.8)",
         html.table([{k: r.get(k) for k in ("label", "prompts_right", "prompts_left", "accuracy_generated", "accuracy_ci",
                                            "accuracy_majority", "accuracy_real", "note")} for r in e["laterality"]],
                    ["label", "prompts_right", "prompts_left", "accuracy_generated", "accuracy_ci", "accuracy_majority",
                     "accuracy_real", "note"], 3)),
        ("Device removal by inpainting", html.table([e["device_removal"]], [k for k in e["device_removal"] if k != "devices"], 4)),
        ("Training", html.table(training, list(training[0]), 4)),
        ("Wall time per stage, this run (s; a stage a rerun reused shows its check only)",
         html.table([summary["seconds"]], list(summary["seconds"]), 1)),
        ("Details", '<p><a href="evaluation/report.html">evaluation report (grids, FID/KID, diversity, prevalence)</a></p>'),
    ]
    return html.page(f"Cheff reproduced in miniature (phantoms, {summary['sizes']['ldm']}² -> {summary['sizes']['sr']}²)",
                     sections, "Ours: phantoms, tiny models, CPU. Paper: Weber et al., MaCheX (~650k images), 256² -> 1024². "
                     "Figures are reported as measured, whichever way they fall. Not measured: " + "; ".join(e["not_measured"]))
