"""The cohort experiment (issue 13 part 2): arms, the detector and its label probabilities, the
statistics, and the whole experiment on Ray Train + Tune with kill-free resumption.

The data are shards in ingest's format whose images show the echo measurements directly (a disc whose
radius follows LVIDd and whose rim follows the wall thickness), so a detector can learn them in seconds."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy.stats import norm
from sklearn.metrics import roc_auc_score

from cxrray.config import load_config
from cxrray.data import shards
from cxrray.data.sources.chexchonet import FINDINGS, echo_labels
from cxrray.data.storage import Storage
from cxrray.errors import InputError
from cxrray.eval.stats import at_recall, compare_to_reference, paired_bootstrap
from cxrray.pipelines.derived import png16
from cxrray.pipelines.cohorts.detector import EchoDetector, label_probabilities, nll
from cxrray.pipelines.cohorts.echo_sets import arm_index, load_echo_set

SIZE = 32


def echo_image(echo: tuple[float, float, float], informative: bool, rng) -> np.ndarray:
    """float [SIZE, SIZE] in [-1, 1]: a disc of radius ~ LVIDd with a rim ~ mean wall thickness, plus noise."""
    yy, xx = np.mgrid[:SIZE, :SIZE] - (SIZE - 1) / 2
    r = np.hypot(yy, xx)
    image = np.full((SIZE, SIZE), -0.6, np.float32)
    if informative:
        ivsd, lvidd, lvpwd = echo
        radius, rim = 2.2 * lvidd, 3.0 * (ivsd + lvpwd)
        image[r < radius + rim] = 0.6
        image[r < radius] = -0.1
    return np.clip(image + rng.normal(0, 0.15, image.shape), -1, 1).astype(np.float32)


def write_echo_shards(root, n: int, seed: int, *, splits=None, informative=True, skew=0.0, dataset="phantom",
                      extra=()) -> str:
    """Shards of n rows (patients of 1-2 images); `skew` raises the echo means (in sd) like the paper's cohort;
    `extra` samples ((key, png, meta, {})) are appended as they are."""
    rng = np.random.default_rng(seed)
    samples = []
    for i in range(n):
        sex = "M" if rng.random() < 0.5 else "F"
        echo = (round(float(rng.normal(1.1 + 0.15 * skew, 0.22)), 2), round(float(rng.normal(5.0 + 0.5 * skew, 0.6)), 2),
                round(float(rng.normal(1.05 + 0.15 * skew, 0.2)), 2))
        patient = f"p{seed}-{i // 2}"
        split = splits[(i // 2) % len(splits)] if splits else "synthetic"
        meta = {"key": f"k{seed}-{i}", "dataset": dataset, "patient": patient, "study": f"s{i}", "view": "PA",
                "sex": sex, "age": float(rng.integers(25, 90)), "labels": echo_labels(sex, *echo),
                "covariates": dict(zip(("ivsd", "lvidd", "lvpwd"), echo)), "report": None, "split": split}
        samples.append((meta["key"], png16(echo_image(echo, informative, rng), "test"), meta, {}))
    samples += list(extra)
    n = len(samples)
    store = Storage(f"file://{root}")
    parts = [shards.write_shard(store, f"shard-{k:03d}.tar", "f", samples[k:k + 100], [], FINDINGS)
             for k in range(0, n, 100)]
    manifest, _ = shards.build_manifest(parts, [], dataset=dataset, findings=FINDINGS, covariates=["ivsd", "lvidd", "lvpwd"],
                                        preprocessing={"size": SIZE}, split_rule={}, version="test")
    store.write_bytes(shards.MANIFEST, shards.dumps(manifest))
    return store.uri


# ------------------------------------------------------------------ pieces

def test_arms_have_the_same_size_and_draw_from_their_pool():
    gen_labels = np.zeros((50, 3), np.float32)
    gen_labels[:10, 2] = 1
    for arm in ("base", "gen", "base+gen", "base+gen(pos)"):
        ib, ig = arm_index(arm, 40, gen_labels, "composite_slvh_dlv", 2.0, seed=0)
        assert len(ib) + len(ig) == 80
    assert len(arm_index("base", 40, gen_labels, "composite_slvh_dlv", 2.0, 0)[1]) == 0
    assert len(arm_index("gen", 40, gen_labels, "composite_slvh_dlv", 2.0, 0)[0]) == 0
    ib, ig = arm_index("base+gen(pos)", 40, gen_labels, "composite_slvh_dlv", 2.0, 0)
    assert set(ig) <= set(range(10)) and 0 < len(ig) < 40  # only positives; about 10/50 of the draws
    assert not np.array_equal(arm_index("base", 40, gen_labels, "composite_slvh_dlv", 2.0, 1)[0], ib)  # seeds differ


def test_fits_at_once_are_what_the_cluster_holds():
    from cxrray.pipelines.cohorts.detector_fits import concurrent_fits
    from cxrray.pipelines.settings import ExperimentConfig

    assert concurrent_fits(ExperimentConfig(), {"CPU": 2.0}) == 2  # 20 fits on 2 CPUs: 2 at a time, not 20
    assert concurrent_fits(ExperimentConfig(num_workers=2, cpus_per_worker=1.5), {"CPU": 16.0}) == 5
    assert concurrent_fits(ExperimentConfig(use_gpu=True, num_workers=2), {"CPU": 64.0, "GPU": 8.0}) == 4
    assert concurrent_fits(ExperimentConfig(use_gpu=True), {"CPU": 64.0}) == 1  # never zero: waits for a GPU
    assert concurrent_fits(ExperimentConfig(max_concurrent=3), {"CPU": 2.0}) == 3


def test_label_probabilities_follow_the_thresholds():
    # a man with LVIDd exactly at 5.9 cm and tiny sigma: P(DLV) = 1/2; walls far below 1.5: P(SLVH) ~ 0
    echo_mean, echo_sd = torch.tensor([1.0, 5.0, 1.0]), torch.tensor([0.2, 0.5, 0.2])
    mean = (torch.tensor([[1.0, 5.9, 1.0]]) - echo_mean) / echo_sd
    p = label_probabilities(mean, torch.full((1, 3), -8.0), torch.tensor([1.0]), echo_mean, echo_sd)
    assert p[0, 0] < 1e-6 and abs(p[0, 1] - 0.5) < 1e-6 and abs(p[0, 2] - 0.5) < 1e-6
    # the same values for a woman: above her LVIDd threshold (5.3)
    assert label_probabilities(mean, torch.full((1, 3), -8.0), torch.tensor([0.0]), echo_mean, echo_sd)[0, 1] > 0.999
    # sigma = 1 training sd: P(IVSd > 1.5) = 1 - Phi((1.5 - 1.4) / 0.2) for a man with mean 1.4
    mean = (torch.tensor([[1.4, 5.0, 0.0]]) - echo_mean) / echo_sd
    p = label_probabilities(mean, torch.zeros(1, 3), torch.tensor([1.0]), echo_mean, echo_sd)
    p_ivsd, p_dlv = 1 - norm.cdf(0.5), 1 - norm.cdf((5.9 - 5.0) / 0.5)
    assert abs(float(p[0, 0]) - p_ivsd) < 1e-5  # LVPWd mean 0 cm: never above
    assert abs(float(p[0, 2]) - (1 - (1 - p_ivsd) * (1 - p_dlv))) < 1e-5


def test_detector_shapes_and_nll_minimum():
    mean, log_var = EchoDetector(8)(torch.zeros(4, 1, SIZE, SIZE), torch.zeros(4, 2))
    assert mean.shape == log_var.shape == (4, 3)
    target = torch.randn(1000, 3)
    at = lambda s: float(nll(torch.zeros(1000, 3), torch.full((1000, 3), math.log(s ** 2)), target))  # noqa: E731
    assert at(1.0) < at(0.5) and at(1.0) < at(2.0)  # the NLL is lowest at the true variance


def test_compare_to_reference_matches_paired_bootstrap_and_at_recall():
    rng = np.random.default_rng(0)
    y = (rng.random(300) < 0.3).astype(float)
    good, bad = y + rng.normal(0, 0.6, 300), y + rng.normal(0, 2.0, 300)
    groups = np.arange(300) // 2
    table = compare_to_reference(y, {"base": bad, "new": good}, "base", n_boot=500, seed=1, groups=groups)
    single = paired_bootstrap(y, good, bad, n_boot=500, seed=1, groups=groups)
    assert table["new"]["diff"] == pytest.approx(single["diff"]) and table["new"]["p_value"] == single["p_value"]
    assert table["new"]["p_value"] < 0.01 and table["base"]["value"] == pytest.approx(roc_auc_score(y, bad))
    assert "p_value" not in table["base"] and table["new"]["ci_low"] < table["new"]["value"] < table["new"]["ci_high"]
    point = at_recall(y, good, 0.5)
    called = good >= point["threshold"]
    assert point["recall"] >= 0.5 and point["precision"] == pytest.approx(y[called].mean())
    assert point["specificity"] == pytest.approx(1 - called[y == 0].mean())


def test_echo_sets_relabel_with_the_thresholds_and_refuse_shards_without_echo(tmp_path):
    uri = write_echo_shards(tmp_path / "real", 60, 0, splits=["train", "test"])
    train = load_echo_set(uri, "train")
    assert len(train) == 30 and train.image.shape == (30, SIZE, SIZE) and train.image.dtype == np.uint16
    for sex, echo, labels in zip(train.sex, train.echo, train.labels):
        assert labels.tolist() == echo_labels("M" if sex else "F", *map(float, echo))
    store = Storage(uri)
    manifest = shards.read_manifest(store)
    store.write_bytes(shards.MANIFEST, shards.dumps({**manifest, "covariates": []}))
    with pytest.raises(InputError, match="no \\['ivsd', 'lvidd', 'lvpwd'\\] covariates"):
        load_echo_set(uri, "train")


# ------------------------------------------------------------------ the experiment on Ray

@pytest.fixture(scope="module")
def experiment_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("experiment")
    real = write_echo_shards(root / "real", 480, 1, splits=["train", "train", "val", "test", "test"])
    good = write_echo_shards(root / "gen", 200, 2, skew=1.0, dataset="synthetic")
    noise = write_echo_shards(root / "noise", 200, 3, informative=False, skew=1.0, dataset="synthetic")
    return root, real, good, noise


def _cfg(tmp_path, *extra):
    return load_config(None, ["experiment.seeds=1", "experiment.epochs=6", "experiment.patience=3",
                              "experiment.width=8", "experiment.bootstrap=200", "experiment.paired_bootstrap=400",
                              f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", *extra])


def test_experiment_fits_the_grid_on_ray_tune_and_reports_paired_comparisons(experiment_data, ray_local, tmp_path):
    """~75 s on 2 cores: each fit is a Ray Train run (worker group start-up dominates the 3 s of training)."""
    from cxrray.pipelines.cohorts.experiment import run_experiment

    root, real, _, noise = experiment_data
    out = f"file://{tmp_path}/out"
    # the "synthetic" set shows nothing: trained on it alone a detector is near chance, and worse than Base
    metrics = run_experiment(real, noise, out, _cfg(tmp_path, "experiment.arms=[base,gen]"), progress=print)
    composite = metrics["overall"]["findings"]["composite_slvh_dlv"]
    assert composite["base"]["auroc"]["value"] > 0.8, composite["base"]
    assert composite["gen"]["auroc"]["value"] < 0.7
    assert composite["gen"]["auroc"]["p_value"] < 0.01 and composite["gen"]["auroc"]["diff"] < -0.1
    assert metrics["data"]["base_images"] == 192 and metrics["data"]["test_images"] == 192
    assert set(metrics["fits"]) == {"base/seed0", "gen/seed0"}
    assert all(f["rows"]["base"] + f["rows"]["gen"] == 384 for f in metrics["fits"].values())
    assert metrics["fits"]["gen/seed0"]["rows"]["base"] == 0
    written = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert written["overall"]["findings"]["composite_slvh_dlv"]["base"]["at_recall"]["recall"] >= 0.5
    subgroups = (tmp_path / "out" / "subgroups.csv").read_text()
    assert "0-60" in subgroups and ",M," in subgroups
    report = (tmp_path / "out" / "report.html").read_text()
    assert "paper" in report and "0.78" in report and "data:image/png;base64" in report
    for name in ("roc.png", "calibration.png", "metrics.csv", "seeds.csv", "fits/base-seed0/detector.safetensors"):
        assert (tmp_path / "out" / name).stat().st_size > 0
    # a rerun fits nothing again and gives the same figures
    mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "out" / "fits").rglob("fit.json")}
    again = run_experiment(real, noise, out, _cfg(tmp_path, "experiment.arms=[base,gen]"), progress=print)
    assert {p: p.stat().st_mtime_ns for p in mtimes} == mtimes and len(mtimes) == 2
    assert again["overall"]["findings"]["composite_slvh_dlv"] == written["overall"]["findings"]["composite_slvh_dlv"]


def test_experiment_cli_refuses_mismatched_sizes_with_exit_2(experiment_data, tmp_path, capsys):
    from cxrray.cli import main

    root, real, _, _ = experiment_data
    other = write_echo_shards(tmp_path / "big", 10, 5, dataset="synthetic")
    store = Storage(other)
    manifest = shards.read_manifest(store)
    # a 64-pixel synthetic set beside 32-pixel real images
    samples = shards.read_tar(store.read_bytes(manifest["shards"][0]["name"]))
    big = [(k, png16(np.zeros((64, 64), np.float32), "t"), m, {}) for k, _, m in samples]
    shards.write_shard(store, manifest["shards"][0]["name"], "f", big, [], FINDINGS)
    code = main(["experiment", "cohorts", "--real", real, "--synthetic", other, "--output", f"file://{tmp_path}/o"])
    assert code == 2 and "differ in size" in capsys.readouterr().err


@pytest.mark.slow  # ~6.5 min (382 s): 4 arms x 2 seeds, a SIGKILL mid-grid and the rerun
def test_experiment_killed_then_rerun_fits_each_arm_and_seed_exactly_once(experiment_data, ray_local, tmp_path):
    import os
    import time

    from conftest import kill_cli_when

    root, real, good, _ = experiment_data
    args = ["experiment", "cohorts", "--real", real, "--synthetic", good, "--output", f"file://{tmp_path}/out",
            "--seeds", "2", "--set", "experiment.epochs=6", "--set", "experiment.width=8",
            "--set", "experiment.bootstrap=100", "--set", "experiment.paired_bootstrap=200",
            "--set", f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    fits = tmp_path / "out" / "fits"
    kill_cli_when(args, env, lambda: bool(list(fits.glob("*/fit.json"))), 300, "no fit finished")
    time.sleep(5)  # Ray tears down the dead driver's trials
    before = {p: p.stat().st_mtime_ns for p in fits.glob("*/fit.json")}
    assert 1 <= len(before) < 8 and not (tmp_path / "out" / "metrics.json").exists()
    from cxrray.cli import main

    assert main(args) == 0
    after = {p: p.stat().st_mtime_ns for p in fits.glob("*/fit.json")}
    assert len(after) == 8 and all(after[p] == t for p, t in before.items()), "finished fits are not refitted"
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    composite = metrics["overall"]["findings"]["composite_slvh_dlv"]
    # the synthetic images show their covariates as the real ones do: Gen alone detects as Base does
    assert composite["gen"]["auroc"]["value"] > composite["base"]["auroc"]["value"] - 0.1
    assert metrics["young_lift"] is not None and "p_value" in metrics["young_lift"]
    assert {r["rows"]["distinct_gen"] > 0 for k, r in metrics["fits"].items() if k.startswith("base+gen(pos)")} == {True}
