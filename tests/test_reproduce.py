"""`cxrray reproduce cxr_ddpm` (issue 13 part 5): the presets compose into valid configs, and (slow, ~57 min)
the tiny preset runs the whole miniature: the shuffled control and Gen-vs-Base criteria are asserted; the
fidelity criterion (r >= 0.8 of the judge's ceiling, over the guidance sweep) is a strict xfail with its measurement (not met at 32²). `cxrray reproduce cheff`
(issue 14): presets that chain, a toy-size run of every stage, and (slow, ~57 min) the tiny miniature's
figures: what it meets asserted, the issue's criteria it misses as strict xfails with their measurements."""
from __future__ import annotations

import json

import pytest

from cxrray.config import load_config
from cxrray.pipelines.cheff.reproduce import CHEFF_PRESETS
from cxrray.pipelines.cohorts.reproduce import PRESETS


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_compose_into_valid_configs(name):
    cfg = load_config(name, PRESETS[name]["overrides"])
    assert cfg.model.family == "ddpm" and list(cfg.model.covariates) == ["age", "sex", "ivsd", "lvidd", "lvpwd"]
    assert cfg.model.image_size == cfg.ingest.size
    assert cfg.phantom.young_positive_keep < 1 and cfg.phantom.disease_age_slope > 0 and cfg.phantom.age_heart > 0.005
    assert cfg.train.global_batch % cfg.train.num_workers == 0


@pytest.mark.parametrize("name", sorted(CHEFF_PRESETS))
def test_cheff_presets_compose_a_cascade_whose_stages_fit_together(name):
    preset = CHEFF_PRESETS[name]
    stages = {k: load_config(name, preset["common"] + extra).model for k, extra in preset["stages"].items()}
    assert [m.family for m in stages.values()] == ["vae", "ldm", "sr", "sr"] and stages["sr"].degrade == "autoencoder"
    assert stages["vae"].image_size == stages["ldm"].image_size == stages["sr"].low_size == stages["sr_base"].low_size
    assert stages["ldm"].beta_end == 0.0295 and stages["sr"].timesteps == 2000


def reproduce_tiny(paper: str, tmp_path_factory) -> tuple[dict, object]:
    """`cxrray reproduce PAPER` at the tiny preset in a fresh folder: its summary.json and output folder."""
    import os

    from cxrray.cli import main

    root = tmp_path_factory.mktemp(f"reproduce-{paper}")
    cwd = os.getcwd()
    os.chdir(root)
    try:
        assert main(["reproduce", paper, "--workdir", str(root / "out"), "--shards", f"file://{root}/shards",
                     "--set", f"tracking.uri=sqlite:///{root}/mlflow.db"]) == 0
    finally:
        os.chdir(cwd)
    return json.loads((root / "out" / "summary.json").read_text()), root / "out"


@pytest.fixture(scope="module")
def tiny_run(ray_local, tmp_path_factory):
    """The tiny preset's whole miniature, once (~57 min on 2 cores): its summary.json and folder."""
    return reproduce_tiny("cxr_ddpm", tmp_path_factory)


@pytest.mark.slow  # the whole miniature: ~57 min on 2 cores
def test_reproduce_tiny_meets_the_issue_criteria(tiny_run):
    summary, out = tiny_run
    fidelity = summary["audit"]["fidelity"]
    for covariate in ("ivsd", "lvidd", "lvpwd"):
        assert abs(fidelity[covariate]["r_shuffled"]) < 0.2, fidelity
    composite = summary["experiment"]["auroc"]["composite_slvh_dlv"]
    assert composite["gen"]["value"] >= composite["base"]["value"] - 0.05, composite
    young = summary["experiment"]["young_lift"]
    assert young is not None and young["p_value"] is not None  # reported, whichever way it falls
    assert (out / "reproduce.html").read_text().count("paper") >= 3


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="issue 27 §4's r >= 0.8 of the judge's real-image r is not met at 32²: measured "
                   "2026-12-05 best 0.783 (guidance 3; 0.628 at guidance 1, shuffled |r| <= 0.06), ceiling 0.749 (README)")
def test_reproduce_tiny_judge_reads_the_requested_lvidd(tiny_run):
    # The phantoms draw the heart from LVIDd + IVSd + LVPWd (its outer diameter) and age, never the walls on
    # their own: with the paper's independent draws no judge can read IVSd or LVPWd apart from the sum, so the
    # goal is asked of LVIDd (most of the sum's variance); the walls' r is reported.
    sweep = tiny_run[0]["audit"]["guidance_sweep"]
    assert max(f["lvidd"]["of_ceiling"] for f in sweep.values()) >= 0.8, sweep


@pytest.mark.slow
def test_reproduce_tiny_guidance_sweep_follows_the_covariates(tiny_run):
    """The same requests and noise at guidance 1 / 2 / 3 / 5: every set's shuffled control stays null, and some
    guidance above 1 reads LVIDd better than guidance 1 (measured 2026-12-05: 0.470 -> 0.565 / 0.587 / 0.540;
    the 0.05 margin was chosen after seeing those numbers, about one standard error of r at n = 256)."""
    sweep = tiny_run[0]["audit"]["guidance_sweep"]
    assert set(sweep) == {"guidance 1", "guidance 2", "guidance 3", "guidance 5"}
    for f in sweep.values():
        assert abs(f["lvidd"]["r_shuffled"]) < 0.2 and f["lvidd"]["r_real_test"] > 0.5, f["lvidd"]
    guided = max(sweep[g]["lvidd"]["r_requested"] for g in ("guidance 2", "guidance 3", "guidance 5"))
    assert guided >= sweep["guidance 1"]["lvidd"]["r_requested"] + 0.05, sweep


@pytest.mark.slow  # ~10 min: every stage of the chain at toy sizes (the figures mean nothing; the plumbing does)
def test_reproduce_chain_runs_end_to_end_at_toy_size(ray_local, tmp_path, monkeypatch):
    from cxrray.cli import main

    monkeypatch.chdir(tmp_path)
    toy = ["train.images=320", "train.checkpoint_every=320", "train.eval_every=320", "train.log_every=160",
           "generate.steps=2", "experiment.seeds=1", "experiment.epochs=1", "experiment.bootstrap=50",
           "experiment.paired_bootstrap=50", "synthetic_audit.epochs=1", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    args = ["reproduce", "cxr_ddpm", "--n", "300", "--workdir", str(tmp_path / "out"), "--shards", f"file://{tmp_path}/shards",
            *[a for item in toy for a in ("--set", item)]]
    assert main(args) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    base = summary["real"]["splits"]["train"]["images"]
    assert summary["experiment"]["data"]["gen_images"] == base and summary["model"]["images_shown"] == 320
    assert set(summary["experiment"]["auroc"]["composite_slvh_dlv"]) == {"base", "gen", "base+gen", "base+gen(pos)"}
    assert summary["composition"]["cohort"]["age"]["mean"] < summary["composition"]["training"]["age"]["mean"]
    assert summary["composition"]["cohort"]["prevalence_pct"]["dlv"] > summary["composition"]["training"]["prevalence_pct"]["dlv"]
    page = (tmp_path / "out" / "reproduce.html").read_text()
    assert "0.78" in page and "experiment/report.html" in page and (tmp_path / "out" / "audit" / "report.html").exists()
    # a rerun reuses every finished stage (phantoms, shards, model, cohort, fits; the audit refits its judge)
    assert main(args) == 0


@pytest.mark.slow  # ~8 min: every Cheff stage at toy sizes (the figures mean nothing; the chain does)
def test_reproduce_cheff_chain_runs_end_to_end_at_toy_size(ray_local, tmp_path, monkeypatch):
    """phantoms -> ingest at 128² and 64² -> vae -> latents -> ldm -> sr base -> sr fine-tune -> evaluation -> page."""
    from cxrray.cli import main

    monkeypatch.chdir(tmp_path)
    toy = ["train.images=32", "train.checkpoint_every=32", "train.eval_every=32", "train.log_every=16",
           "train.eval_images=4", "train.sample_steps=2", "generation_eval.images=8", "generation_eval.prompts=8",
           "generation_eval.unconditional=8", "generation_eval.steps=2", "generation_eval.sr_steps=2",
           "generation_eval.epochs=1", "generation_eval.inpaint_cases=2", "generation_eval.kid_subset=4",
           "generation_eval.kid_subsets=2", "generation_eval.diversity_pairs=4", "generation_eval.min_positives=2",
           "latents.vocab_size=300", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    args = ["reproduce", "cheff", "--n", "200", "--workdir", str(tmp_path / "out"), "--shards", f"file://{tmp_path}/shards",
            *[a for item in toy for a in ("--set", item)]]
    assert main(args) == 0
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["sizes"] == {"ldm": 64, "sr": 128}
    assert all(v["images_shown"] == 32 for v in summary["training"].values()) and len(summary["training"]) == 4
    assert [r["stage"] for r in summary["evaluation"]["table2"]][0] == "autoencoder alone: D(E(x))"
    assert len(summary["evaluation"]["table2"]) == 5 and summary["evaluation"]["device_removal"]["cases"] == 2
    assert [r["label"] for r in summary["evaluation"]["laterality"]] == ["effusion", "pneumothorax", "chest_tube", "pacemaker"]
    assert list(summary["seconds"]) == ["phantoms", "ingest", "vae", "latents", "ldm", "sr_base", "sr", "evaluation"]
    page = (tmp_path / "out" / "reproduce.html").read_text()
    assert "36.8" in page and "11.58" in page and (tmp_path / "out" / "evaluation" / "report.html").exists()


# ---- Cheff, tiny: figures measured 2026-11-30 on 2 cores, alone, at the preset sized to fit the hour
# (`cxrray reproduce cheff` on a fresh clone of 2aff513: 57:14 wall, stages 3,416 s). Each threshold below was set
# from that run, with margin, and says so; the issue's own criteria are strict xfails with their measurements.

@pytest.fixture(scope="module")
def cheff_tiny_run(ray_local, tmp_path_factory):
    """The tiny Cheff miniature, once (~57 min on 2 cores): its summary.json."""
    return reproduce_tiny("cheff", tmp_path_factory)[0]


@pytest.mark.slow
def test_reproduce_cheff_tiny_fits_the_hour_the_autoencoder_beats_bicubic_and_the_judge_reads_real_images(cheff_tiny_run):
    """The hour is the issue's. Measured 3,416 s over the eight stages (2026-11-30; eps latent model, SR from noise):
    autoencoder 26.66 dB held out vs bicubic at the latent size 24.75 dB (Table 2 row: 26.56 dB); the judge on
    real test images AUROC 1.0 effusion, 0.997 cardiomegaly, 1.0 pacemaker (chest tube: 4 of the 64 prompts,
    below min_positives, not judged); FID (judge features) train vs test 0.33, samples vs test 120.1; bicubic
    upscaling 29.96 dB. 2026-12-05 (v latent model, SR from 0.5 T): 3,351 s; 26.95 / 24.75 dB (Table 2: 26.84);
    the judge on real images the same; samples vs test FID 18.5."""
    assert sum(cheff_tiny_run["seconds"].values()) <= 3600, cheff_tiny_run["seconds"]
    e, vae = cheff_tiny_run["evaluation"], cheff_tiny_run["training"]["vae"]["metrics"]
    assert vae["reconstruction_psnr"] > vae["bicubic_psnr"] + 1.0, vae  # the issue's "beats bicubic" (by 1.91 dB)
    assert e["table2"][0]["psnr"] >= 25.5, e["table2"]  # 26.56 measured
    real = {r["label"]: r.get("auroc_real") for r in e["conditioning"]}
    assert all(real[k] >= 0.9 for k in ("effusion", "cardiomegaly", "pacemaker")), real
    q = e["quality"]["judge_features"]
    assert q["train_vs_test"]["fid"] < 2.0 and q["synthetic_vs_test"]["fid"] > 5 * q["train_vs_test"]["fid"], q


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not met at tiny size: measured 26.56 dB (Table 2) / 26.66 dB (held out) at "
                   "5,000 images (7.9 img/s; 12 min of the hour); 26.84 / 26.95 dB on 2026-12-05")
def test_reproduce_cheff_tiny_autoencoder_reaches_30_db(cheff_tiny_run):
    assert cheff_tiny_run["evaluation"]["table2"][0]["psnr"] >= 30.0


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not met at tiny size, guidance 1 (2026-12-05, v + zero terminal SNR): the "
                   "cascade's AUROC effusion 0.74, cardiomegaly 0.70, pacemaker 0.76; chest tube not judged (4 of 64 "
                   "prompts); the judge on real images 1.0 / 0.997 / 1.0 (eps latent model: 0.53 / 0.43 / 0.47)")
def test_reproduce_cheff_tiny_samples_follow_their_reports(cheff_tiny_run):
    auroc = {r["label"]: r.get("auroc_generated") for r in cheff_tiny_run["evaluation"]["conditioning"]}
    # the chest tube counts where it was judged (4 of 64 prompts name one at this size: below min_positives)
    labels = ["effusion", "cardiomegaly", "pacemaker"] + (["chest_tube"] if auroc.get("chest_tube") is not None else [])
    assert all((auroc[k] or 0.0) >= 0.8 for k in labels), auroc


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not met at tiny size (2026-12-05): effusion 0.67 (12 sided prompts; always the "
                   "commoner side 0.33), pneumothorax 0.0 (1 prompt), chest tube 0.0 (4), pacemaker 0.80 (5, equal to "
                   "always answering the commoner side)")
def test_reproduce_cheff_tiny_samples_follow_the_reported_side(cheff_tiny_run):
    rows = [r for r in cheff_tiny_run["evaluation"]["laterality"] if "accuracy_generated" in r]
    # beating "always the commoner side" is asked only where that is below 1 (all prompts one side: unbeatable)
    assert rows and all(r["accuracy_generated"] >= 0.8 and (r["accuracy_majority"] >= 1.0
                                                             or r["accuracy_generated"] > r["accuracy_majority"])
                        for r in rows), rows


# ---- issue 27 §1 on the same miniature: `cxrray reproduce cheff` on a clone of 9627bd4 (2026-12-05; 3,351 s of
# stages, a few minutes of it sharing the CPU with single tests), the latent model predicting v on a zero-terminal-SNR
# schedule. Thresholds are the issue's, fixed before the run.

@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not met: the cascade SR(D(E(x))) from 0.5 T measured 23.28 dB against bicubic "
                   "upscaling of x 29.96 dB; SR alone (base, 1,500 images) 29.04 dB, and PSNR falls as the start rises "
                   "(fine-tuned: 27.48 / 26.05 / 24.61 / 13.43 dB at 0.25 / 0.5 / 0.75 / 1 T): SR3 adds error at every start")
def test_reproduce_cheff_tiny_cascade_beats_bicubic_upscaling(cheff_tiny_run):
    rows = {r["stage"].split(":")[0]: r["psnr"] for r in cheff_tiny_run["evaluation"]["table2"]}
    cascade = next(v for k, v in rows.items() if k.startswith("cascade"))
    assert cascade > rows["bicubic upscaling of x"], rows


@pytest.mark.slow
def test_reproduce_cheff_tiny_latent_model_samples_at_the_latents_scale(cheff_tiny_run):
    """Measured ratio 0.987 (sampled 1.101 against the real test latents' 1.115). With eps prediction it was ~10
    (std 10.7-13.9): an eps error of 0.07 RMS became a clean-latent error of 29 at t = 980 (x425)."""
    assert 0.8 <= cheff_tiny_run["evaluation"]["ldm"]["latent_std"]["ratio"] <= 1.2


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="not met at guidance 1: the latent model alone, AUROC effusion 0.75, cardiomegaly "
                   "0.73, pacemaker 0.69 (17 / 17 / 5 positive prompts of 64)")
def test_reproduce_cheff_tiny_latent_model_alone_follows_its_reports(cheff_tiny_run):
    auroc = {r["label"]: r.get("auroc_generated") for r in cheff_tiny_run["evaluation"]["ldm"]["conditioning"]}
    assert all((auroc[k] or 0.0) >= 0.8 for k in ("effusion", "cardiomegaly", "pacemaker")), auroc


@pytest.mark.slow
def test_reproduce_cheff_tiny_latent_model_follows_its_reports_under_guidance(cheff_tiny_run):
    """The issue's 0.8, at every guidance >= 2 of the sweep (no pick among them). Measured: effusion / cardiomegaly /
    pacemaker 0.85 / 0.87 / 0.85 at 2, 0.88 / 0.93 / 0.88 at 4, 0.86 / 0.91 / 0.89 at 7.5 (5 positive pacemaker
    prompts: a wide CI; each prompt's noise is the same at every guidance, so these are correlated readings). FID
    24.2 / 16.7 / 15.9 / 20.5 at 1 / 2 / 4 / 7.5."""
    sweep = {r["guidance"]: r for r in cheff_tiny_run["evaluation"]["ldm"]["guidance_sweep"]}
    guided = [r for g, r in sweep.items() if g >= 2]
    assert len(guided) == 3 and all(r[f"auroc_{k}"] >= 0.8 for r in guided
                                    for k in ("effusion", "cardiomegaly", "pacemaker")), guided
    assert all(r["fid"] < sweep[1.0]["fid"] for r in guided), sweep


@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_daug_presets_compose_an_unconditional_ddpm_at_the_shards_size_with_masks(name):
    """`cxrray reproduce daug`: the pixel DDPM reads the ingested size, the phantoms carry masks for the
    localisation stage, and the downstream arms' batch splits over the training workers."""
    from cxrray.families import get_family
    from cxrray.pipelines.daug.reproduce import PRESETS as DAUG

    cfg = load_config(name, DAUG[name]["overrides"])
    assert cfg.model.family == "ddpm" and not cfg.model.covariates and cfg.model.image_size == cfg.ingest.size
    assert cfg.phantom.masks and set(cfg.augment.classes) <= {"cardiac", "pleural"}
    assert cfg.downstream.global_batch % cfg.train.num_workers == 0
    daug = get_family("daug").preset("tiny", image_size=cfg.ingest.size, **cfg.downstream.model)
    assert cfg.ingest.size % 2 ** daug.blocks == 0 and set(daug.heatmaps) <= set(cfg.augment.classes)


@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_attribution_presets_compose_a_latent_model_at_the_shards_size_with_a_zero_shot_finding_left(name):
    """`cxrray reproduce attribution`: autoencoder and latent model at the ingested size, phantoms with masks and
    healthy renders, the img2img prompt is the normal stage's, every fine-tuned finding is a phantom label, and
    cardiomegaly (judged by the localisation benchmark and induced) is fine-tuned on by no stage: zero-shot."""
    from cxrray.pipelines.attribution.reproduce import PRESETS

    preset = PRESETS[name]
    cfg = load_config(name, preset["common"])
    stages = {k: load_config(name, preset["common"] + extra).model for k, extra in preset["stages"].items()}
    assert [m.family for m in stages.values()] == ["vae", "ldm"] and stages["ldm"].text
    assert stages["vae"].image_size == cfg.ingest.size and cfg.phantom.masks
    normal = next(s for s in cfg.dreambooth.stages if s.finding is None)
    assert cfg.attribution.prompt == normal.prompt and cfg.dreambooth.stages[0] is normal
    fine_tuned = {s.finding for s in cfg.dreambooth.stages if s.finding}
    assert fine_tuned and "cardiomegaly" not in fine_tuned and "cardiomegaly" in cfg.localisation.findings
    assert {spec["finding"] for spec in cfg.img2img.induction} >= {"cardiomegaly", *fine_tuned}
    assert cfg.dreambooth.lr == 5e-5  # the paper's
