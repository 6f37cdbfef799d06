"""The audit's statistics (cxrray.eval.confounding) on codes whose truth is known by construction: a tube
planted with the finding (odds ratio ~76, its own dimension of z), a label independent of the finding (its own
dimension, drawn apart), a rare label. The old audit (in-sample probes and pattern, image-level CI, flagged
when its lower bound passed 0.05) is kept here as the baseline the new one is measured against."""
from __future__ import annotations

import functools
import json

import numpy as np
import pytest
from scipy.special import expit, logit

from cxrray.data.storage import Storage
from cxrray.eval.confounding import ConfoundingSettings, _fit, confounding
from cxrray.pipelines.diffchest.audit import mean_ci, odds_ratios

VOCAB = ["effusion", "chest_tube", "hidden", "rare"]


def world(seed: int, patients: int = 300, dims: int = 24):
    """Codes [N, dims] of 1-2 images per patient: effusion (30%), chest tube (80% with effusion, 5% without),
    hidden (30%, independent of both), rare (4 images); each label shifts its own dimension by 2."""
    rng = np.random.default_rng(seed)
    patient = np.repeat(np.arange(patients), rng.integers(1, 3, patients))
    n = len(patient)
    effusion = (rng.random(n) < 0.3).astype(float)
    tube = np.where(effusion == 1, rng.random(n) < 0.8, rng.random(n) < 0.05).astype(float)
    hidden = (rng.random(n) < 0.3).astype(float)
    rare = np.zeros(n)
    rare[rng.choice(n, 4, replace=False)] = 1
    labels = np.column_stack([effusion, tube, hidden, rare])
    z = rng.standard_normal((n, dims))
    z[:, :4] += 2 * labels
    return z, labels, patient.astype(str)


def old_audit(z, labels, patients, seed: int) -> dict[str, bool]:
    """The audit before: probes and pattern fitted in-sample on 80% of patients, 24 effusion-negative images of
    the rest moved in closed form to p 0.9, flagged when the image-level bootstrap CI's lower bound passes 0.05."""
    rng = np.random.default_rng(seed)
    unique = np.unique(patients)
    test = np.isin(patients, rng.permutation(unique)[: len(unique) // 5])
    fit = ~test
    zn = (z - z[fit].mean(0)) / z[fit].std(0)
    w, b = _fit(zn[fit], labels[fit, 0], 10.0)
    centred = zn[fit] - zn[fit].mean(0)
    d = centred.T @ (centred @ w) / (fit.sum() - 1)
    rows = np.flatnonzero(test & (labels[:, 0] == 0))[:24]
    moved = zn[rows] + ((logit(0.9) - (zn[rows] @ w + b)) / (w @ d))[:, None] * d
    flagged = {}
    for j in (1, 2):
        wl, bl = _fit(zn[fit], labels[fit, j], 10.0)
        flagged[VOCAB[j]] = mean_ci(expit(moved @ wl + bl) - expit(zn[rows] @ wl + bl), 1000, seed)[1] > 0.05
    return flagged


def audit_world(seed: int, **settings) -> dict[str, dict]:
    z, labels, patients = world(seed)
    rows = confounding(z, labels, patients, VOCAB, "effusion", ConfoundingSettings(seed=seed, **settings),
                       associations=odds_ratios(labels, VOCAB, "effusion"))
    return {r["label"]: r for r in rows}


def test_the_planted_tube_is_a_confounder_and_a_rare_label_is_underpowered():
    rows = audit_world(0)
    assert list(rows) == ["chest_tube", "hidden", "rare"]
    tube = rows["chest_tube"]
    assert tube["verdict"] == "confounder" and tube["moved"] and tube["direction"] == "raised" and tube["associated"]
    assert tube["effect"] > 0.3 and tube["ci"][0] > 0.2 and tube["p_holm"] < 1e-6
    assert tube["specific_to_finding"]  # random moves of the same size do not raise it
    assert abs(tube["null_permuted"][0]) < 0.05  # a probe on permuted labels is not moved on average
    assert rows["rare"]["verdict"] == "underpowered" and not rows["rare"]["moved"] and rows["rare"]["positives"] == 4
    assert "effect" not in rows["rare"]
    assert not rows["hidden"]["moved"] and rows["hidden"]["verdict"] == "not moved" and not rows["hidden"]["associated"]


@pytest.mark.parametrize("rows, dims, C", [(300, 24, 10.0), (120, 200, 10.0), (400, 16, 0.5)])  # (120, 200): separable
def test_the_batched_solver_reaches_sklearns_optimum_column_by_column(rows, dims, C):
    import warnings

    from sklearn.linear_model import LogisticRegression

    from cxrray.eval.logistic import fit_logistic

    rng = np.random.default_rng(rows)
    x = rng.standard_normal((rows, dims))
    y = np.column_stack([(x[:, 0] + rng.standard_normal(rows) > 0.5), rng.random(rows) < 0.3,
                         np.r_[1.0, np.zeros(rows - 1)]]).astype(float)  # the last: one positive, not fittable
    y[rng.random(rows) < 0.1, 1] = np.nan
    w, b, fitted = fit_logistic(x, y, C)
    assert fitted.tolist() == [True, True, False] and np.isnan(w[2]).all() and np.isnan(b[2])
    for k in (0, 1):
        known = np.isfinite(y[:, k])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            reference = LogisticRegression(C=C, tol=1e-12, max_iter=20000).fit(x[known], y[known, k])

        def objective(wk, bk):
            z = x[known] @ wk + bk
            return C * np.sum(np.logaddexp(0, z) - y[known, k] * z) + wk @ wk / 2

        assert objective(w[k], b[k]) <= objective(reference.coef_[0], reference.intercept_[0]) * (1 + 1e-9)
        np.testing.assert_allclose(w[k], reference.coef_[0], atol=1e-4 * max(1, np.abs(w[k]).max()))
        assert abs(b[k] - reference.intercept_[0]) < 1e-4 * max(1, abs(b[k]))


def test_the_batched_solver_gives_the_same_fits_in_smaller_batches(monkeypatch):
    import cxrray.eval.logistic as logistic

    rng = np.random.default_rng(1)
    x, y = rng.standard_normal((50, 80)), (rng.random((50, 7)) < 0.4).astype(float)
    y[0, 3] = np.nan
    whole = logistic.fit_logistic(x, y, 10.0)
    monkeypatch.setattr(logistic, "MEMORY_BYTES", 8 * 51 * 50 * 2)  # two columns a batch
    for a, b in zip(whole, logistic.fit_logistic(x, y, 10.0)):
        np.testing.assert_allclose(a, b, atol=1e-9)


def test_a_null_without_spread_never_rejects():
    from cxrray.eval.confounding import _z_p

    assert _z_p(0.3, np.array([np.nan, np.nan, 0.1]), 0.0) == 1.0  # one finite draw: no spread to judge by
    assert _z_p(0.3, np.zeros(10), 0.0) == 1.0 and _z_p(float("nan"), np.arange(10.0), 0.0) == 1.0
    assert _z_p(0.0, np.array([-1.0, 1.0]), 0.0) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="patient ids missing"):
        confounding(*world(0)[:2], np.zeros(len(world(0)[0])), VOCAB, "effusion")


@functools.lru_cache(maxsize=1)
def twenty_seeds() -> tuple[dict, dict]:
    """Flags over seeds 0-19 of the new statistics and of the old audit, per label."""
    new, old = {"chest_tube": 0, "hidden": 0}, {"chest_tube": 0, "hidden": 0}
    for seed in range(20):
        rows = audit_world(seed)
        for label in new:
            new[label] += rows[label]["moved"]
        for label, flagged in old_audit(*world(seed), seed).items():
            old[label] += flagged
    return new, old


@pytest.mark.slow
def test_over_20_seeds_the_planted_tube_is_always_flagged():
    new, old = twenty_seeds()
    assert new["chest_tube"] == 20 and old["chest_tube"] == 20


@pytest.mark.slow
def test_over_20_seeds_an_independent_label_is_flagged_at_most_once():
    """The issue's goal: false-flag rate <= 5% over 20 seeds for a label independent of the finding (measured
    2026-12-04: 1 / 20, seed 4, Holm p 0.022, with sklearn's solver and with the batched one alike)."""
    new, _ = twenty_seeds()
    assert new["hidden"] <= 1


def test_the_audit_reads_its_statistics_from_the_probes_encodings(tmp_path):
    """`audit --encodings`: the fit split's codes and labels, the finding's associations, one verdict per label."""
    from cxrray.config import load_config
    from cxrray.pipelines.diffchest.audit import statistics
    from cxrray.pipelines.encodings import INDEX, part_table, write_part

    z, labels, patients = world(3)
    split = np.where(np.arange(len(z)) % 7 == 0, "test", "train")
    metas = [{"key": f"k{i}", "split": s, "patient": p, "labels": list(map(float, row))}
             for i, (s, p, row) in enumerate(zip(split, patients, labels))]
    store = Storage(f"file://{tmp_path}/enc")
    write_part(store, "part-0.parquet", part_table(metas, z, None, []))
    store.write_bytes(INDEX, json.dumps({"parts": ["part-0.parquet"], "label_vocabulary": VOCAB}).encode())
    cfg = load_config("tiny", ["audit.statistics.bootstrap=20", "audit.statistics.permutations=10",
                               "audit.statistics.random_directions=10"])
    train = split == "train"
    associations = {"effusion": odds_ratios(labels[train], VOCAB, "effusion")}
    rows = statistics(store.uri, "train", ["effusion"], associations, cfg)["effusion"]
    assert [r["label"] for r in rows] == ["chest_tube", "hidden", "rare"]
    assert rows[0]["verdict"] == "confounder" and rows[2]["verdict"] == "underpowered"
    assert rows[0]["positives"] == int((labels[train, 1] == 1).sum())  # only the fit split's rows
    with pytest.raises(Exception, match="no 'val' rows"):
        statistics(store.uri, "val", ["effusion"], associations, cfg)


def test_the_audit_page_takes_its_verdicts_from_the_statistics_when_it_has_them(tmp_path):
    """With statistics, the page's verdict sentence is theirs (underpowered included) and the per-image table
    is labelled descriptive; without, the per-image verdicts stand, unvalidated probes included."""
    from cxrray.pipelines.diffchest.audit import report_html

    (tmp_path / "grid.png").write_bytes(b"\x89PNG\r\n")
    candidate = {"label": "rare", "effect": 0.2, "ci": [0.1, 0.3], "verdict": "unvalidated", "probe_auroc": None,
                 "association": None, "effect_image": 0.2, "effect_latent": 0.2}
    finding = {"images": 4, "measure": "latent", "target_effect": 0.5, "candidates": [candidate], "confounders": [],
               "entangled": [], "unvalidated": ["rare"], "regions": {"centre": 1.0}, "grid": str(tmp_path / "grid.png")}
    plain = report_html({"findings": {"effusion": finding}})
    assert "Unvalidated probes, never flagged: rare" in plain and "descriptive verdict" not in plain
    stats = {**finding, "underpowered": ["rare"], "statistics": [
        {"label": "rare", "verdict": "underpowered", "positives": 3, "why": "3 positives"}]}
    page = report_html({"findings": {"effusion": stats}})
    assert "underpowered (too few positives to test): rare" in page and "descriptive verdict" in page
    assert "never flagged" not in page
