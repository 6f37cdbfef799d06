"""Where is the disease (issue 29): `cxrray attribute` on a file and on shards (each output exactly once, with
provenance, no identifiers), and the localisation benchmark (§5): its per-image scores and patient-clustered
CIs on known answers, and the benchmark run on ingested phantoms with masks and healthy counterparts, where
`oracle` (|image - true healthy|) must score near 1 and `random` at chance — the checks that the scoring itself
can be trusted before any method is judged by it."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

from cxrray.cli import main
from cxrray.config import load_config
from cxrray.eval.localisation import clustered_mean, energy_inside, paired_clustered, pixel_auroc, pointing_game


def _masks(n: int = 12, size: int = 16, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    masks = np.zeros((n, size, size), bool)
    for i in range(n):
        r, c = rng.integers(0, size - 5, 2)
        masks[i, r:r + 4, c:c + 5] = True
    return masks


def test_scores_give_the_known_answers():
    masks = _masks()
    perfect, inverted = masks * 1.0, ~masks * 1.0
    np.testing.assert_allclose(pixel_auroc(perfect, masks), 1.0)
    np.testing.assert_allclose(pixel_auroc(inverted, masks), 0.0)
    np.testing.assert_allclose(pointing_game(perfect + 1e-3 * np.arange(256).reshape(16, 16), masks), 1.0)
    np.testing.assert_allclose(energy_inside(perfect, masks), 1.0)
    noise = np.random.default_rng(1).random(masks.shape)
    for i in range(len(masks)):  # ties and all: the per-image AUROC is sklearn's
        assert pixel_auroc(noise[i:i + 1], masks[i:i + 1])[0] == pytest.approx(roc_auc_score(masks[i].ravel(), noise[i].ravel()))
    assert abs(np.nanmean(pixel_auroc(noise, masks)) - 0.5) < 0.1
    np.testing.assert_allclose(energy_inside(np.ones(masks.shape), masks), masks.mean(axis=(1, 2)))  # area share
    empty = np.zeros_like(masks)
    assert np.isnan(pixel_auroc(noise, empty)).all() and np.isnan(pointing_game(noise, empty)).all()
    # scored within a region (the lung fields): pixels outside it neither count as negatives nor win the
    # pointing game, so noise stays at chance whatever the map does outside
    within = np.zeros_like(masks)
    within[:, :, :10] = True
    outside_zero = np.where(within, noise, 0.0)
    assert abs(np.nanmean(pixel_auroc(outside_zero, masks, within)) - 0.5) < 0.12
    np.testing.assert_array_equal(pixel_auroc(outside_zero, masks, within), pixel_auroc(noise, masks, within))
    loud_outside = np.where(within, perfect, 10.0)
    inner = (masks & within).any(axis=(1, 2)) & (within & ~masks).any(axis=(1, 2))
    np.testing.assert_allclose(pointing_game(loud_outside + 1e-3 * np.arange(256).reshape(16, 16), masks,
                                             within=within)[inner], 1.0)
    np.testing.assert_allclose(energy_inside(loud_outside, masks, within)[inner], 1.0)


def test_clustered_ci_counts_patients_and_paired_comparison_is_exact_for_identical_methods():
    values = np.r_[np.full(20, 1.0), np.full(20, 0.0)]
    one_patient_each = clustered_mean(values, [str(i) for i in range(40)], n_boot=2000)
    two_patients = clustered_mean(values, ["a"] * 20 + ["b"] * 20, n_boot=2000)
    assert one_patient_each["mean"] == two_patients["mean"] == 0.5
    # 40 independent images give a narrow CI; the same images from 2 patients cannot: the CI spans 0..1
    assert one_patient_each["ci"][1] - one_patient_each["ci"][0] < 0.4
    assert two_patients["ci"] == [0.0, 1.0] and two_patients["patients"] == 2
    same = paired_clustered(values, values, [str(i) for i in range(40)])
    assert same["diff"] == 0.0 and same["p_value"] == 1.0
    better = paired_clustered(values + 0.1, values, [str(i) for i in range(40)])
    assert better["diff"] == pytest.approx(0.1) and better["p_value"] < 0.01


@pytest.fixture(scope="module")
def phantom_shards(ray_local, tmp_path_factory):
    """160 phantoms with masks and healthy counterparts, ingested at 48² (the salt set for the module)."""
    root = tmp_path_factory.mktemp("localisation")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("CXRRAY_SALT", "localisation-test")
        assert main(["phantoms", "--n", "160", "--out", str(root / "ph"), "--set", "phantom.masks=true",
                     "--set", "phantom.size=96"]) == 0
        assert main(["ingest", "--input", str(root / "ph"), "--labels", str(root / "ph" / "labels.csv"), "--output",
                     f"file://{root}/shards", "--set", "ingest.size=48",
                     "--set", 'ingest.split_fractions={"train": 0.5, "val": 0.15, "test": 0.35}']) == 0
        yield root


def test_benchmark_scores_the_oracle_near_one_and_random_at_chance(phantom_shards, capsys):
    out = phantom_shards / "out"
    assert main(["evaluate", "localisation", "--data", f"file://{phantom_shards}/shards", "--output", str(out),
                 "--set", "saliency.epochs=2", "--set", "localisation.n_boot=200"]) == 0
    result = json.loads((out / "localisation.json").read_text())
    for finding in ("effusion", "cardiomegaly"):
        r = result["findings"][finding]
        assert r["images"] >= 4, finding
        oracle, random = r["methods"]["oracle"], r["methods"]["random"]
        assert oracle["pixel_auroc"]["mean"] > 0.95 and oracle["pointing"]["mean"] >= 0.75, (finding, oracle)
        assert 0.4 < random["pixel_auroc"]["mean"] < 0.6, (finding, random)
        vs = next(p for p in r["paired"] if (p["a"], p["b"]) == ("oracle", "random"))
        assert vs["pixel_auroc"]["diff"] > 0.3 and vs["pixel_auroc"]["p_value"] < 0.05
        for method in ("gradcam", "integrated_gradients"):  # measured, not judged here (a 2-epoch classifier)
            assert 0.0 <= r["methods"][method]["pixel_auroc"]["mean"] <= 1.0
    assert (out / "maps.png").stat().st_size > 0 and "oracle" in (out / "report.html").read_text()
    assert (out / "classifier" / "classifier.safetensors").is_file()
    assert "| effusion | oracle |" in (out / "table.md").read_text()


def test_shards_without_masks_are_refused_with_a_reason(phantom_shards, tmp_path, capsys):
    assert main(["phantoms", "--n", "12", "--out", str(tmp_path / "plain"), "--set", "phantom.size=64"]) == 0
    assert main(["ingest", "--input", str(tmp_path / "plain"), "--labels", str(tmp_path / "plain" / "labels.csv"),
                 "--output", f"file://{tmp_path}/plain-shards", "--set", "ingest.size=32"]) == 0
    capsys.readouterr()
    assert main(["evaluate", "localisation", "--data", f"file://{tmp_path}/plain-shards", "--output",
                 str(tmp_path / "out")]) == 2
    assert "carries no masks" in capsys.readouterr().err


def test_diffchest_methods_run_from_a_checkpoint_and_probe_and_are_refused_without_them(phantom_shards, capsys):
    """The counterfactual and reconstruction maps through the CLI on a random-init DiffChest at the shards'
    size (plumbing and contracts only: an untrained model localises nothing), and clear refusals."""
    import torch

    from cxrray.data.shards import read_manifest
    from cxrray.families.diffae.config import DiffAEConfig
    from cxrray.families.diffae.network import DiffAE
    from cxrray.pipelines.diffchest.head import LinearHead
    from conftest import write_checkpoint

    torch.manual_seed(0)
    model = DiffAE(DiffAEConfig(image_size=48, base_channels=32, channel_mult=(1, 2), layers_per_block=1,
                                attention_resolutions=(), z_dim=16)).eval()
    ckpt = write_checkpoint(model, phantom_shards / "ckpt", 1)
    vocab = read_manifest(f"file://{phantom_shards}/shards")["label_vocabulary"]
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(len(vocab), 16)).astype(np.float32)
    LinearHead(vocab, weight, np.zeros(len(vocab), np.float32), np.zeros(16, np.float32), np.ones(16, np.float32),
               {"fit_split": "train"}, pattern=weight).save(phantom_shards / "probe")
    common = ["evaluate", "localisation", "--data", f"file://{phantom_shards}/shards", "--checkpoint", f"file://{ckpt}",
              "--set", "localisation.findings=[effusion]", "--set", "localisation.n_boot=100",
              "--set", "explain.steps=3", "--set", "explain.invert_steps=3"]
    out = phantom_shards / "out-diffchest"
    assert main([*common, "--probe", str(phantom_shards / "probe"), "--output", str(out),
                 "--set", "localisation.methods=[oracle,counterfactual,reconstruction]"]) == 0
    methods = json.loads((out / "localisation.json").read_text())["findings"]["effusion"]["methods"]
    for method in ("counterfactual", "reconstruction"):
        assert 0.0 <= methods[method]["pixel_auroc"]["mean"] <= 1.0 and methods[method]["pixel_auroc"]["images"] >= 4
    capsys.readouterr()
    assert main([*common, "--output", str(out), "--set", "localisation.methods=[counterfactual]"]) == 2
    assert "needs --probe" in capsys.readouterr().err


def test_dAugs_guided_maps_join_the_benchmark_with_a_ddpm_and_a_noise_aware_classifier(phantom_shards, capsys):
    """`--ddpm` + `--classifier` add the guided method (random-init models: plumbing, not quality), paired with
    the oracle on the same images; without the pair it is refused."""
    import torch
    from safetensors.torch import save_file

    from conftest import write_checkpoint
    from cxrray.families.ddpm.config import DDPMConfig
    from cxrray.families.ddpm.network import CovariateDDPM
    from cxrray.pipelines.daug.noisy_classifier import NoisyClassifier

    torch.manual_seed(0)
    ddpm = write_checkpoint(CovariateDDPM(DDPMConfig(image_size=48, base_channels=16, channel_mult=(1, 2),
                                                     layers_per_block=1, attention_resolutions=(), norm_groups=8)),
                            phantom_shards / "ddpm", 1)
    folder = phantom_shards / "noisy"
    folder.mkdir(exist_ok=True)
    save_file(NoisyClassifier(2, width=8).state_dict(), str(folder / "noisy_classifier.safetensors"))
    (folder / "noisy_classifier.json").write_text(json.dumps({"super_classes": ["cardiac", "pleural"], "config": {"width": 8}}))
    common = ["evaluate", "localisation", "--data", f"file://{phantom_shards}/shards", "--output",
              str(phantom_shards / "out-guided"), "--set", "localisation.methods=[oracle,guided]",
              "--set", "localisation.n_boot=100", "--set", "augment.steps=4", "--set", "localisation.images=40"]
    assert main([*common, "--ddpm", f"file://{ddpm}", "--classifier", str(folder)]) == 0
    result = json.loads((phantom_shards / "out-guided" / "localisation.json").read_text())
    for finding in ("effusion", "cardiomegaly"):
        r = result["findings"][finding]
        assert 0.0 <= r["methods"]["guided"]["pixel_auroc"]["mean"] <= 1.0
        assert any({p["a"], p["b"]} == {"oracle", "guided"} for p in r["paired"])
    capsys.readouterr()
    assert main(common) == 2 and "needs --ddpm and --classifier" in capsys.readouterr().err


# ---- `cxrray attribute` (issue 29 §4): a file or shards in, maps with provenance out, each exactly once ----

@pytest.fixture(scope="module")
def classifier(phantom_shards):
    """The saliency classifier `cxrray classifier` trains on the shards (2 epochs: plumbing, not accuracy)."""
    folder = phantom_shards / "classifier"
    assert main(["classifier", "--data", f"file://{phantom_shards}/shards", "--output", str(folder),
                 "--set", "saliency.epochs=2"]) == 0
    return folder


def test_attribute_a_dicom_file_writes_derived_outputs_without_identifiers_and_reruns_nothing(phantom_shards, classifier):
    import pydicom
    from PIL import Image

    dicom = sorted((phantom_shards / "ph" / "images").glob("*.dcm"))[0]
    header = pydicom.dcmread(dicom)
    out = phantom_shards / "attr-file"
    args = ["attribute", "--method", "gradcam", "--checkpoint", str(classifier), "--data", str(dicom),
            "--finding", "effusion", "--finding", "cardiomegaly", "--output", f"file://{out}"]
    assert main(args) == 0
    records = sorted(out.glob("*.json"))
    assert len(records) == 2
    rec = json.loads(records[0].read_text())
    assert rec["method"] == "gradcam" and 0 <= rec["probability"] <= 1 and rec["map_scale"] > 0
    with Image.open(out / rec["files"]["map"]) as img:
        assert img.mode.startswith("I") and "SYNTHETIC" in img.text["cxrray:provenance"]  # raw map, 16-bit
        raw = np.asarray(img, np.float64) / 65535 * float(img.text["cxrray:scale"])
    assert raw.max() == pytest.approx(rec["map_scale"], rel=1e-3) and raw.shape == (48, 48)
    with Image.open(out / rec["files"]["overlay"]) as img:
        assert img.mode == "RGB" and "SYNTHETIC" in img.text["cxrray:provenance"]
    ds = pydicom.dcmread(out / rec["files"]["dicom"])
    assert list(ds.ImageType) == ["DERIVED", "SECONDARY"] and ds.ConversionType == "SYN"
    assert ds.PhotometricInterpretation == "RGB" and "SYNTHETIC" in ds.DerivationDescription
    everything = b"".join(p.read_bytes() for p in out.iterdir())
    for value in (str(header.PatientName), str(header.PatientID), str(header.AccessionNumber), dicom.name,
                  str(header.StudyInstanceUID), str(header.SOPInstanceUID)):
        assert value.encode() not in everything, f"identifier {value!r} leaked into the outputs"
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main(args) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == mtimes


def test_attribute_shards_killed_then_rerun_writes_each_output_once(phantom_shards, classifier, ray_local, tmp_path):
    import os

    from conftest import kill_cli_when

    out, limit = tmp_path / "attr", 12
    common = ["--method", "integrated-gradients", "--checkpoint", str(classifier), "--data",
              f"file://{phantom_shards}/shards", "--split", "test", "--limit", str(limit), "--finding", "effusion",
              "--output", f"file://{out}", "--set", "attribute.batch_size=2", "--set", "saliency.ig_steps=64"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address, "CXRRAY_SALT": "localisation-test"}
    kill_cli_when(["attribute", *common], env, lambda: out.exists() and len(list(out.glob("*.json"))) >= 1, 120,
                  "attribute made no output")
    done = [p.name[:-len(".json")] for p in out.glob("*.json") if not p.name.startswith("attribute-")]
    killed = {p.name: p.stat().st_mtime_ns for p in out.iterdir() if any(p.name.startswith(d) for d in done)}
    assert 1 <= len(done) < limit, "the kill must land mid-job"
    assert main(["attribute", *common]) == 0
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*.json")) if not p.name.startswith("attribute-")]
    assert len(records) == len({r["key"] for r in records}) == limit
    for name, mtime in killed.items():
        assert (out / name).stat().st_mtime_ns == mtime, "a finished output was rewritten"
    # a rerun with other settings into the same folder is refused, never mixed in
    assert main(["attribute", *common[:-2], "--set", "saliency.ig_steps=32"]) == 2
    kinds = [p.name.split(".", 3)[-1] for p in out.iterdir() if not p.name.endswith((".json", ".settings"))]
    assert json.loads((out / "attribute-integrated_gradients.settings").read_text())["settings"] == {
        "saliency": load_config("tiny", ["saliency.ig_steps=64"]).saliency.model_dump(mode="json")}
    assert {k: kinds.count(k) for k in set(kinds)} == {"map.png": limit, "overlay.png": limit, "overlay.dcm": limit}
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    assert {r["split"] for r in records} == {"test"}


def test_img2img_study_sweeps_ablates_and_induces_judged_by_a_classifier_trained_here(phantom_shards, classifier,
                                                                                       tmp_path, capsys):
    """`cxrray evaluate img2img` on a random-init tiny latent model (the plumbing and its known answers, not
    quality): every sweep cell per finding; at strength 0 the counterpart is the autoencoder's reconstruction
    whatever the guidance; the unchanged reference has SSIM 1 to its input; the base model given as itself
    repeats the full method exactly (same seeds); induction reports each prompt and, for a side, a share."""
    from conftest import write_checkpoint
    from cxrray.families import get_family
    from test_families import tiny

    torch.manual_seed(0)
    ldm = write_checkpoint(get_family("ldm").build(tiny("ldm")).eval(), tmp_path / "ldm", 5)
    out = tmp_path / "study"
    args = ["evaluate", "img2img", "--data", f"file://{phantom_shards}/shards", "--ldm", str(ldm), "--base-ldm",
            str(ldm), "--judge", str(classifier), "--output", str(out), "--set", "img2img.images=3",
            "--set", "img2img.strengths=[0.0, 0.5]", "--set", "img2img.guidances=[1.0, 3.0]",
            "--set", "attribution.steps=4", "--set", "attribution.strength=0.5", "--set", "attribution.guidance=3.0"]
    assert main(args) == 0
    result = json.loads((out / "img2img.json").read_text())
    sweep = {(r["finding"], r["strength"], r["guidance"]): r for r in result["sweep"]}
    assert set(sweep) == {(f, s, g) for f in ("effusion", "cardiomegaly") for s in (0.0, 0.5) for g in (1.0, 3.0)}
    for finding in ("effusion", "cardiomegaly"):
        assert sweep[(finding, 0.0, 1.0)] == {**sweep[(finding, 0.0, 3.0)], "guidance": 1.0}  # D(E(x)) both times
        assert sweep[(finding, 0.5, 1.0)]["SSIM"] != sweep[(finding, 0.5, 3.0)]["SSIM"]  # guidance reaches the walk
        assert all(0.0 <= sweep[(finding, 0.5, g)]["pixel AUROC"] <= 1.0 for g in (1.0, 3.0))
    ablation = {r["set"]: r for r in result["ablation"]}
    assert ablation["abnormal (reference: unchanged)"]["SSIM to input"] == pytest.approx(1.0)
    assert {k: v for k, v in ablation["no fine-tune (base model)"].items() if k != "set"} == \
        {k: v for k, v in ablation["full (text + image prior)"].items() if k != "set"}
    assert ablation["no image prior (strength 1)"]["SSIM to input"] < ablation["full (text + image prior)"]["SSIM to input"]
    assert all(r["FID to real healthy"] >= 0 for r in result["ablation"])
    induction = {r["induce"]: r for r in result["induction"]}
    assert set(induction) == {"effusion", "cardiomegaly", "left effusion", "right effusion"}
    assert all(0.0 <= induction[s]["change on the named side"] <= 1.0 for s in ("left effusion", "right effusion"))
    assert "Ablation" in (out / "report.html").read_text() and (out / "grid.png").stat().st_size > 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["ablation"]["neither"] == ablation["neither"]["FID to real healthy"]


def test_the_share_of_a_change_on_the_patients_side_follows_the_radiographic_convention():
    """The patient's left is the image's right: a change on the image's right half is all on the patient's left."""
    from cxrray.benchmarks.img2img import side_share

    change = np.zeros((2, 8, 8))
    change[0, :, 4:] = 1.0  # image right
    change[1, :, :4] = 2.0  # image left
    assert side_share(change, "left").tolist() == [1.0, 0.0] and side_share(change, "right").tolist() == [0.0, 1.0]
    change[0, :, :4] = 3.0  # a quarter of the change is on the image's right
    assert side_share(change, "left")[0] == pytest.approx(0.25)
