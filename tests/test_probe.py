"""Linear-probe job on synthetic encodings with known separability (no Ray, no model)."""
from __future__ import annotations

import contextlib
import io
import json
import math

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression

from cxrray.cli import main
from cxrray.data.storage import Storage
from cxrray.pipelines.encodings import FORMAT, INDEX, part_table, read_encodings, stack, write_part
from cxrray.pipelines.diffchest.head import load_head
from cxrray.pipelines.diffchest.probe import evaluate, fit_head, patient_subset, predict, sampled_patients

# A: perfectly separable on z0; B: weak on z1; C: noise; masked: = A with 40% of positives unlabelled (NaN);
# rare: 5 test positives (< min_positives); unfit: no positive in the fit split.
FINDINGS = ["A", "B", "C", "masked", "rare", "unfit"]
D, FIT_PATIENTS = 6, 300
OPTIONS = ["--set", "probe.min_positives=20", "--set", "probe.bootstrap=200", "--set", "probe.paired_bootstrap=500",
           "--set", "probe.fractions=[0.1, 0.5, 1.0]"]


def write_encodings(root, splits=("finetune", "test", "val"), seed=0) -> str:
    rng = np.random.default_rng(seed)
    metas, zs = [], []
    for split in splits:
        patients = {"finetune": FIT_PATIENTS, "test": 200}.get(split, 20)
        images = [3 if split == "finetune" else 1 + i % 3 for i in range(patients)]
        n = sum(images)
        y = (rng.random((n, len(FINDINGS))) < 0.4).astype(float)
        y[:, 3] = y[:, 0]
        if split == "test":
            y[:, 4] = 0.0
            y[rng.choice(n, 5, replace=False), 4] = 1.0
        else:
            y[:, 5] = 0.0
        z = rng.normal(size=(n, D))
        z[:, 0] = 4 * y[:, 0] - 2 + rng.normal(scale=0.3, size=n)
        z[:, 1] = 0.6 * y[:, 1] + rng.normal(size=n)
        z[:, 2] = 2 * y[:, 4] + rng.normal(size=n)
        z[:, 3] = 1.5 * y[:, 5] + rng.normal(size=n)
        y[rng.random((n, len(FINDINGS))) < 0.1] = np.nan  # sprinkled missing labels
        y[(y[:, 3] == 1) & (rng.random(n) < 0.4), 3] = np.nan  # masked: unlabelled positives
        patient = np.repeat([f"{split}-p{i:03d}" for i in range(patients)], images)
        for i in range(n):
            metas.append({"key": f"{split}-{i:04d}", "split": split, "patient": patient[i],
                          "sex": [None, "M", "F"][i % 3], "view": "PA",
                          "age": None if i % 11 == 0 else float(rng.uniform(18, 95)),
                          "labels": [None if math.isnan(v) else v for v in y[i]]})
        zs.append(z)
    store = Storage(str(root))
    write_part(store, "part-0.parquet", part_table(metas, np.concatenate(zs), None, []))
    store.write_bytes(INDEX, json.dumps({"format": FORMAT, "checkpoint": "file:///ckpt/ema", "z_dim": D,
                                         "image_size": 64, "invert_steps": None, "label_vocabulary": FINDINGS,
                                         "covariates": [], "parts": ["part-0.parquet"], "rows": len(metas)}).encode())
    return store.uri


@pytest.fixture(scope="module")
def probe_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("probe")
    uri = write_encodings(tmp / "enc")
    out = tmp / "out"
    tracking = f"sqlite:///{tmp}/mlflow.db"
    stdout = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout):
        mp.chdir(tmp)  # the experiment's artifact root (mlartifacts/) lands in tmp
        rc = main(["probe", "--encodings", uri, "--output", str(out), *OPTIONS,
                   "--set", f"tracking.uri={tracking}", "--set", "tracking.experiment=probe-test"])
    assert rc == 0, stdout.getvalue()
    text = stdout.getvalue()
    metrics = json.loads((out / "metrics.json").read_text())
    return {"uri": uri, "out": out, "tracking": tracking, "stdout": text, "metrics": metrics, "tmp": tmp,
            "summary": json.loads(text[text.index("\n{") + 1:])}


def test_known_separability(probe_run):
    f = probe_run["metrics"]["findings"]
    a, b, c = f["A"], f["B"], f["C"]
    assert a["evaluated"] and a["auroc"] > 0.95 and 0 <= a["ci_low"] <= a["auroc"] <= a["ci_high"] <= 1
    assert 0.55 < b["auroc"] < 0.85 and b["ci_low"] < b["auroc"] < b["ci_high"]
    assert abs(c["auroc"] - 0.5) < 0.1 and c["ci_low"] < 0.5 < c["ci_high"]
    assert set(a) >= {"auroc", "ci_low", "ci_high", "positives", "auprc", "brier", "log_loss"}
    mean = np.mean([v["auroc"] for v in f.values() if v["evaluated"]])
    assert probe_run["metrics"]["mean_auroc"] == pytest.approx(mean)


def test_rare_and_unfittable_findings(probe_run):
    m = probe_run["metrics"]
    rare, unfit = m["findings"]["rare"], m["findings"]["unfit"]
    assert rare["evaluated"] is False and "auroc" not in rare and rare["positives"] <= 5
    assert "min_positives 20" in rare["reason"]
    assert m["not_fitted"] == ["unfit"] and unfit["evaluated"] is False and "not fitted" in unfit["reason"]
    head = load_head(probe_run["out"])
    j = FINDINGS.index("unfit")
    assert np.isnan(head.bias[j]) and not head.weight[j].any() and head.fitted.sum() == len(FINDINGS) - 1
    with pytest.raises(ValueError, match="no fitted probe"):
        head.index("unfit")


def test_nan_labels_are_ignored(probe_run):
    """`masked` is A with 40% of its positives unlabelled: as 0 they would be high-scoring negatives."""
    frame, _ = read_encodings(probe_run["uri"])
    y = stack(frame[frame["split"] == "test"], "labels")[:, FINDINGS.index("masked")]
    rec = probe_run["metrics"]["findings"]["masked"]
    assert rec["positives"] == int((y == 1).sum()) and rec["negatives"] == int((y == 0).sum())
    assert rec["auroc"] > 0.95


def test_fit_head_is_sklearn_on_labelled_rows_only():
    rng = np.random.default_rng(1)
    z = rng.normal(size=(400, 4)) * [1, 2, 3, 0] + [0, 1, -1, 5]  # last column constant: std floored
    y = (z[:, 0] + rng.normal(size=400) > 0).astype(float)[:, None].repeat(2, axis=1)
    y[y[:, 1] == 1, 1] = np.where(rng.random(int((y[:, 1] == 1).sum())) < 0.5, np.nan, 1)
    head = fit_head(z, y, ["x", "half_unlabelled"], C=10.0)
    keep = ~np.isnan(y[:, 1])
    zn = (z - z.mean(0)) / np.maximum(z.std(0), 1e-6)
    ref = LogisticRegression(C=10.0).fit(zn[keep], y[keep, 1])
    np.testing.assert_allclose(head.weight[1], ref.coef_[0], rtol=1e-3, atol=1e-4)
    assert head.bias[1] == pytest.approx(ref.intercept_[0], rel=1e-3, abs=1e-4)
    assert head.z_std[3] == pytest.approx(1e-6) and np.isfinite(predict(head, z)).all()
    res = evaluate(head, z, y, min_positives=10, n_boot=50)
    assert res["findings"]["half_unlabelled"]["negatives"] == int((y[:, 1] == 0).sum())
    only_pos = np.where(np.isnan(y), np.nan, 1.0)
    assert evaluate(head, z, only_pos, 10, 50)["findings"]["x"]["reason"] == "no test negatives"
    # activation pattern: Cov(zn) w over the finding's labelled rows (Haufe et al. 2014)
    np.testing.assert_allclose(head.pattern[1], np.cov(zn[keep], rowvar=False) @ head.weight[1], rtol=1e-4, atol=1e-5)


def test_pattern_follows_the_data_where_the_weight_follows_noise():
    """Two informative columns, one of them also carrying a large nuisance that a third column measures:
    the probe's weight leans on the nuisance-cancelling column, its pattern points along the signal."""
    rng = np.random.default_rng(0)
    y = rng.random(2000) < 0.5
    signal, nuisance = y * 1.0, rng.normal(size=2000) * 3
    z = np.stack([signal + nuisance + rng.normal(size=2000) * 0.3, nuisance + rng.normal(size=2000) * 0.05,
                  rng.normal(size=2000)], axis=1)
    head = fit_head(z, y[:, None].astype(float), ["f"], C=10.0)
    w, a = head.weight[0], head.pattern[0]
    zn = (z - z.mean(0)) / z.std(0)
    mean_diff = zn[y].mean(0) - zn[~y].mean(0)
    cos = lambda u, v: float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))  # noqa: E731
    assert cos(a, mean_diff) > 0.99, (a, mean_diff)
    # the weight subtracts the nuisance (column 1 ~ -column 0); the pattern barely touches column 1
    assert w[1] < -0.8 * w[0] < 0 and abs(a[1]) < 0.25 * a[0], (w, a)


def test_patient_subsampling_never_splits_a_patient():
    patients = np.repeat([f"p{i:03d}" for i in range(FIT_PATIENTS)], 3)
    np.random.default_rng(0).shuffle(patients)
    masks = {}
    for f, expected in [(0.03, 9), (0.1, 30), (0.5, 150), (1.0, 300), (1e-6, 1)]:
        m = masks[f] = patient_subset(patients, f, seed=0)
        assert len(set(patients[m])) == expected and m.sum() == 3 * expected
        assert not set(patients[m]) & set(patients[~m])
    assert not (masks[0.03] & ~masks[0.1]).any() and not (masks[0.1] & ~masks[0.5]).any()  # nested
    assert set(patients[patient_subset(patients, 0.1, seed=1)]) != set(patients[masks[0.1]])


def test_hashed_patient_sample_is_part_independent_whole_patient_and_seeded():
    patients = np.repeat([f"p{i:04d}" for i in range(2000)], 3).astype(object)
    keys = np.array([f"k{i}" for i in range(len(patients))], dtype=object)
    patients[::7] = None  # no patient id: the image is its own patient
    whole = sampled_patients(patients, keys, 0.25, seed=0)
    parts = np.concatenate([sampled_patients(patients[i:i + 500], keys[i:i + 500], 0.25, seed=0)
                            for i in range(0, len(patients), 500)])
    assert np.array_equal(whole, parts)  # chosen part by part exactly as at once
    assert 0.2 < whole.mean() < 0.3
    named = patients != None  # noqa: E711 (object array)
    chosen = set(patients[whole & named])
    assert not chosen & set(patients[~whole & named])  # a patient is all in or all out
    assert not np.array_equal(whole, sampled_patients(patients, keys, 0.25, seed=1))
    assert sampled_patients(patients, keys, 1.0, seed=0).all()


def test_max_images_bounds_what_the_probe_reads_and_never_reads_other_splits(probe_run, tmp_path):
    out = tmp_path / "capped"
    with contextlib.redirect_stdout(io.StringIO()), pytest.MonkeyPatch.context() as mp:
        mp.chdir(tmp_path)
        assert main(["probe", "--encodings", probe_run["uri"], "--output", str(out), *OPTIONS,
                     "--set", "probe.max_images=300", "--set", f"tracking.uri=sqlite:///{tmp_path}/m.db"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    full = probe_run["metrics"]
    assert set(metrics["read"]) == {"finetune", "test"}  # val is never materialised
    assert metrics["read"]["finetune"]["rows"] == 3 * FIT_PATIENTS and metrics["read"]["finetune"]["fraction"] == 300 / 900
    fit_images = metrics["fractions"]["1.0"]["fit_images"]
    assert 200 <= fit_images <= 400 and fit_images % 3 == 0, fit_images  # whole patients of 3 images, ~300
    assert 200 <= metrics["test_images"] < full["test_images"] == 399
    assert metrics["findings"]["A"]["auroc"] > 0.95  # separable stays separable on the sample
    assert full["read"]["finetune"]["fraction"] == 1.0


def test_fractions_heads_and_normalisation(probe_run):
    out, m = probe_run["out"], probe_run["metrics"]
    frame, _ = read_encodings(probe_run["uri"])
    fit = frame[frame["split"] == "finetune"]
    assert m["fit_split"] == "finetune" and m["test_split"] == "test" and m["checkpoint"] == "file:///ckpt/ema"
    for f, patients in [(0.1, 30), (0.5, 150), (1.0, 300)]:
        rec = m["fractions"][str(f)]
        assert rec["fit_patients"] == patients and rec["fit_images"] == 3 * patients
        assert set(rec) >= {"findings", "mean_auroc", "fit_images", "fit_patients"}
        head = load_head(out / f"fraction-{f}")
        mask = patient_subset(fit["patient"].to_numpy(), f, seed=0)
        z = stack(fit[mask], "z").astype(np.float64)
        np.testing.assert_allclose(head.z_mean, z.mean(0), atol=1e-5)
        np.testing.assert_allclose(head.z_std, z.std(0), rtol=1e-5)
        assert head.info["fit_patients"] == patients and head.info["fraction"] == f
    assert m["fractions"]["0.1"]["findings"]["A"]["auroc"] > 0.9


def test_metrics_json_and_tables(probe_run):
    out, m = probe_run["out"], probe_run["metrics"]
    assert set(m) >= {"findings", "mean_auroc", "fractions", "comparisons", "not_fitted", "fit_split", "test_split",
                      "encodings", "checkpoint", "mlflow_run_id"}
    assert set(m["findings"]) == set(FINDINGS)
    evaluated = {n for n, v in m["findings"].items() if v["evaluated"]}
    assert evaluated == {"A", "B", "C", "masked"}
    pairs = {(c["fraction"], c["finding"]) for c in m["comparisons"]}
    assert pairs == {(f, n) for f in (0.1, 0.5) for n in evaluated}
    assert all(0 < c["p_value"] <= 1 and c["ci_low"] <= c["diff"] <= c["ci_high"] for c in m["comparisons"])
    for name in ("metrics", "comparisons", "subgroups"):
        assert (out / f"{name}.csv").stat().st_size > 0 and (out / f"{name}.md").read_text().startswith("| ")
    subgroups = (out / "subgroups.csv").read_text()
    assert "sex,M," in subgroups and "age,unknown," in subgroups and "age,40-60," in subgroups
    summary = probe_run["summary"]
    assert summary["mean_auroc"] == pytest.approx(m["mean_auroc"]) and summary["evaluated"] == 4
    assert probe_run["stdout"].count("[probe] fraction") == 3


def test_roc_png(probe_run):
    path = probe_run["out"] / "roc.png"
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as img:
        img.verify()
    with Image.open(path) as img:
        assert img.size[0] > 300 and img.size[1] > 300


def test_mlflow_run(probe_run):
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=probe_run["tracking"])
    run = client.get_run(probe_run["metrics"]["mlflow_run_id"])
    assert run.info.run_name == "probe" and run.info.status == "FINISHED"
    assert run.data.metrics["mean_auroc"] == pytest.approx(probe_run["metrics"]["mean_auroc"])
    assert run.data.metrics["auroc/A"] > 0.95 and "auroc/rare" not in run.data.metrics
    assert run.data.params["probe.min_positives"] == "20"
    files = {a.path for a in client.list_artifacts(run.info.run_id, "probe")}
    assert {"probe/metrics.json", "probe/roc.png", "probe/comparisons.md", "probe/subgroups.csv"} <= files
    assert "probe/head/head.safetensors" in {a.path for a in client.list_artifacts(run.info.run_id, "probe/head")}


def test_head_round_trip(probe_run):
    head = load_head(probe_run["out"])
    again = load_head(probe_run["out"] / "fraction-1.0")
    assert head.findings == FINDINGS and head.info["fraction"] == 1.0
    np.testing.assert_array_equal(head.weight, again.weight)
    assert head.pattern.shape == head.weight.shape and np.abs(head.pattern).sum() > 0
    frame, _ = read_encodings(probe_run["uri"])
    z = stack(frame[frame["split"] == "test"], "z")
    import torch

    p = head.probabilities(torch.from_numpy(z)).numpy()
    np.testing.assert_allclose(p, predict(head, z), atol=1e-6)


def test_cli_errors(tmp_path, capsys):
    assert main(["probe", "--encodings", str(tmp_path / "missing"), "--output", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cxrray probe: error:") and "no encodings.json" in err
    uri = write_encodings(tmp_path / "enc", splits=("pretrain", "test"))
    assert main(["probe", "--encodings", uri, "--output", str(tmp_path / "o"), *OPTIONS]) == 2
    err = capsys.readouterr().err
    assert "no fit split" in err and "splits present: pretrain, test" in err and "'finetune', 'train'" in err
    assert main(["probe", "--encodings", uri, "--output", str(tmp_path / "o"), "--fraction", "1.5"]) == 2
    assert "fractions must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_counterfactual_codes_move_along_the_chosen_direction():
    import math

    import torch

    from cxrray.errors import InputError
    from cxrray.pipelines.diffchest.counterfactual import shift_codes
    from cxrray.pipelines.diffchest.head import LinearHead
    from cxrray.pipelines.settings import ExplainConfig

    rng = np.random.default_rng(0)
    weight, pattern = rng.normal(size=(1, 16)).astype(np.float32), rng.normal(size=(1, 16)).astype(np.float32)
    pattern[0] += weight[0]  # w.a > 0, as Cov(zn) w always has
    head = LinearHead(["f"], weight, np.array([-1.0], np.float32), np.full(16, 0.5, np.float32),
                      np.full(16, 2.0, np.float32), pattern=pattern)
    z = torch.as_tensor(rng.normal(size=(5, 16)), dtype=torch.float32)
    for axis, d in (("pattern", pattern[0]), ("filter", weight[0])):
        closed = shift_codes(head, z, "f", ExplainConfig(mode="closed_form", axis=axis, target_probability=0.8))
        np.testing.assert_allclose(head.probabilities(closed)[:, 0].numpy(), 0.8, atol=1e-4)  # reaches p_t exactly
        moved = (head.normalize(closed) - head.normalize(z)).numpy()
        np.testing.assert_allclose(np.abs(moved @ d) / np.linalg.norm(moved, axis=1) / np.linalg.norm(d), 1, atol=1e-4)
        linear = shift_codes(head, z, "f", ExplainConfig(mode="linear", axis=axis, eps=0.5), toward=-1)
        step = (head.normalize(linear) - head.normalize(z)).numpy()
        np.testing.assert_allclose(step, np.broadcast_to(-0.5 * math.sqrt(16) * d / np.linalg.norm(d), step.shape),
                                   atol=1e-4)
    with pytest.raises(InputError, match="explain.axis=filter"):
        shift_codes(LinearHead(["f"], weight, head.bias, head.z_mean, head.z_std), z, "f", ExplainConfig())
    # the effect axis: a linear step is eps findings' worth of the effect itself (not normalised to sqrt(D))
    head.effect = pattern * 0.3
    step = (head.normalize(shift_codes(head, z, "f", ExplainConfig(axis="effect", eps=2.0))) - head.normalize(z)).numpy()
    np.testing.assert_allclose(step, np.broadcast_to(2.0 * head.effect[0], step.shape), atol=1e-4)


def test_effect_holds_the_co_occurring_label_fixed_where_the_pattern_carries_it():
    """z moves with a finding along one axis and with a device planted beside it (odds ratio ~100) along
    another: the finding's pattern leans on the device's axis, its effect (regression on all labels) does not,
    and one unit of it is the finding's own shift."""
    rng = np.random.default_rng(1)
    n = 3000
    finding = rng.random(n) < 0.3
    device = np.where(finding, rng.random(n) < 0.9, rng.random(n) < 0.08)
    z = np.stack([2.0 * finding, 3.0 * device, np.zeros(n), np.zeros(n)], axis=1) + rng.normal(size=(n, 4))
    labels = np.stack([finding, device], axis=1).astype(float)
    head = fit_head(z, labels, ["finding", "device"], C=10.0)
    cos = lambda u, v: float(u @ v / np.linalg.norm(u) / np.linalg.norm(v))  # noqa: E731
    device_axis = np.array([0, 1.0, 0, 0])
    assert cos(head.pattern[0], device_axis) > 0.6, head.pattern[0]
    assert abs(cos(head.effect[0], device_axis)) < 0.1, head.effect[0]
    # in normalised z, the finding's own shift along axis 0 is 2 / sd(z_0)
    assert head.effect[0][0] == pytest.approx(2.0 / z[:, 0].std(), rel=0.1), head.effect[0]
    assert head.effect[1][1] == pytest.approx(3.0 / z[:, 1].std(), rel=0.1), head.effect[1]


def test_effect_is_saved_and_loaded_and_its_absence_is_refused(tmp_path):
    import torch

    from cxrray.errors import InputError
    from cxrray.pipelines.diffchest.head import load_head

    rng = np.random.default_rng(2)
    y = (rng.random((200, 2)) < 0.4).astype(float)
    head = fit_head(rng.normal(size=(200, 6)) + y @ rng.normal(size=(2, 6)), y, ["a", "b"], C=1.0)
    loaded = load_head(head.save(tmp_path / "h"))
    np.testing.assert_array_equal(loaded.effect, head.effect)
    loaded.effect = None
    with pytest.raises(InputError, match="without effect directions"):
        loaded.effect_of("a", torch.zeros(1, 6))
