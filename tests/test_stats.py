"""cxrray.eval.stats against published values, scipy, statsmodels and scikit-learn."""
from __future__ import annotations

import time

import numpy as np
import pandas as pd
import pytest
from scipy import stats as sps
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

from cxrray.eval.stats import (age_bins, binary_metrics, bootstrap_ci, bootstrap_distribution, fleiss_kappa,
                               paired_bootstrap, subgroup_table)

# Fleiss (1971) worked example as tabulated on Wikipedia ("Fleiss' kappa"): 10 subjects, 14 raters, 5 categories.
FLEISS_TABLE = [[0, 0, 0, 0, 14], [0, 2, 6, 4, 2], [0, 0, 3, 5, 6], [0, 3, 9, 2, 0], [2, 2, 8, 1, 1],
                [7, 7, 0, 0, 0], [3, 2, 6, 3, 0], [2, 5, 3, 2, 2], [6, 5, 2, 1, 0], [0, 2, 2, 3, 7]]


def _scores(n, shift, seed=0, prevalence=0.4):
    rng = np.random.default_rng(seed)
    y = (rng.random(n) < prevalence).astype(float)
    return y, y * shift + rng.normal(size=n)


def test_fleiss_kappa_worked_example():
    assert fleiss_kappa(FLEISS_TABLE) == pytest.approx(0.2099, abs=5e-4)


def test_fleiss_kappa_equals_statsmodels_on_random_tables():
    from statsmodels.stats.inter_rater import fleiss_kappa as sm_kappa

    rng = np.random.default_rng(1)
    for trial in range(20):
        subjects, categories, raters = rng.integers(2, 40), rng.integers(2, 7), rng.integers(2, 12)
        # skewed category probabilities so kappa is not always ~0
        table = np.stack([rng.multinomial(raters, rng.dirichlet(np.full(categories, 0.5))) for _ in range(subjects)])
        assert fleiss_kappa(table) == pytest.approx(sm_kappa(table, method="fleiss"), abs=1e-12), trial


def test_fleiss_kappa_rejects_unequal_raters():
    with pytest.raises(ValueError, match="same number of raters"):
        fleiss_kappa([[1, 2], [2, 2]])
    with pytest.raises(ValueError, match="at least 2 raters"):
        fleiss_kappa([[1, 0], [0, 1]])


def test_binary_metrics_equal_sklearn_and_drop_nan_labels():
    y, s = _scores(400, 1.0, seed=2)
    p = 1 / (1 + np.exp(-s))
    y_nan = y.copy()
    y_nan[::7] = np.nan
    m = binary_metrics(y_nan, p)
    keep = ~np.isnan(y_nan)
    assert m["n"] == keep.sum() and m["positives"] == int(y[keep].sum()) and m["negatives"] == m["n"] - m["positives"]
    assert m["auroc"] == pytest.approx(roc_auc_score(y[keep], p[keep]), abs=1e-12)
    assert m["auprc"] == pytest.approx(average_precision_score(y[keep], p[keep]), abs=1e-12)
    assert m["brier"] == pytest.approx(brier_score_loss(y[keep], p[keep]), abs=1e-12)
    assert m["log_loss"] == pytest.approx(log_loss(y[keep], p[keep]), abs=1e-12)
    assert m["auroc"] != pytest.approx(roc_auc_score(np.nan_to_num(y_nan), p), abs=1e-4)  # NaN is not 0


def test_vectorised_auroc_equals_sklearn_per_redraw_with_ties():
    y, s = _scores(150, 0.8, seed=3)
    s = np.round(s, 1)  # many ties
    fast = bootstrap_distribution(y, [s, -s], roc_auc_score, n_boot=50, seed=4)
    slow = bootstrap_distribution(y, [s, -s], lambda a, b: roc_auc_score(a, b), n_boot=50, seed=4)
    np.testing.assert_allclose(fast, slow, atol=1e-12)
    assert fast.std() > 0.01  # redraws differ


def test_bootstrap_ci_matches_scipy_percentile():
    """Stratified bootstrap = scipy's independent resampling of the two samples (positive, negative scores)."""
    y, s = _scores(600, 1.0, seed=5, prevalence=0.5)
    pos, neg = s[y == 1], s[y == 0]

    def auc(a, b):
        return (a[:, None] > b[None, :]).mean() + 0.5 * (a[:, None] == b[None, :]).mean()

    ref = sps.bootstrap((pos, neg), auc, vectorized=False, paired=False, n_resamples=3000, method="percentile",
                        confidence_level=0.95, random_state=np.random.default_rng(0)).confidence_interval
    low, high = bootstrap_ci(y, s, n_boot=3000, seed=1)
    assert low == pytest.approx(ref.low, abs=0.008) and high == pytest.approx(ref.high, abs=0.008)


def test_bootstrap_ci_contains_estimate_and_narrows_with_n():
    widths = []
    for n in (100, 400, 1600):
        y, s = _scores(n, 1.0, seed=n)
        low, high = bootstrap_ci(y, s, n_boot=500, seed=0)
        assert 0 <= low < roc_auc_score(y, s) < high <= 1
        widths.append(high - low)
    assert widths[0] > 1.5 * widths[1] > 2.25 * widths[2]


def test_bootstrap_is_stratified_by_class():
    """One positive in 40: an unstratified redraw lacks it ~37% of the time and sklearn would raise."""
    y = np.zeros(40)
    y[7] = 1
    s = np.linspace(0, 1, 40)
    reps = bootstrap_distribution(y, [s], lambda a, b: roc_auc_score(a, b), n_boot=300)
    assert np.isfinite(reps).all() and reps.min() < reps.max()


def test_bootstrap_ci_with_another_metric_and_single_class():
    y, s = _scores(200, 1.0, seed=6)
    low, high = bootstrap_ci(y, s, metric=average_precision_score, n_boot=100)
    assert low < average_precision_score(y, s) < high
    with pytest.raises(ValueError, match="both classes"):
        bootstrap_ci(np.ones(10), np.arange(10.0))


def test_paired_bootstrap_identical_models():
    y, s = _scores(300, 1.0, seed=7)
    r = paired_bootstrap(y, s, s.copy(), n_boot=2000)
    assert r["diff"] == 0 and r["ci_low"] == 0 and r["ci_high"] == 0 and r["p_value"] == 1.0


def test_paired_bootstrap_detects_a_better_model():
    rng = np.random.default_rng(8)
    y = (rng.random(300) < 0.5).astype(float)
    good, bad = y * 2.0 + rng.normal(size=300), y * 0.5 + rng.normal(size=300)
    r = paired_bootstrap(y, good, bad, n_boot=10_000, seed=1)
    assert r["diff"] > 0.15 and r["p_value"] < 0.01 and r["ci_low"] > 0
    assert r["diff"] == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, bad))
    flipped = paired_bootstrap(y, bad, good, n_boot=2000, seed=1)
    assert flipped["diff"] < 0 and flipped["ci_high"] < 0 and flipped["p_value"] < 0.01


def test_paired_bootstrap_noisy_copy_is_not_significant():
    rng = np.random.default_rng(9)
    y = (rng.random(300) < 0.5).astype(float)
    s = y + rng.normal(size=300)
    r = paired_bootstrap(y, s, s + rng.normal(scale=0.05, size=300), n_boot=5000)
    assert r["p_value"] > 0.2 and r["ci_low"] < 0 < r["ci_high"]


def test_paired_bootstrap_is_fast():
    y, s = _scores(1000, 1.0, seed=10)
    start = time.perf_counter()
    paired_bootstrap(y, s, s + np.random.default_rng(0).normal(size=1000), n_boot=10_000)
    assert time.perf_counter() - start < 3.0


def test_age_bins():
    labels = age_bins([np.nan, 0, 39.9, 40, 59, 60, 85, 250, -1], [0, 40, 60, 80, 200])
    assert list(labels) == ["unknown", "0-40", "0-40", "40-60", "40-60", "60-80", "80-200", "unknown", "unknown"]


def test_subgroup_table():
    rng = np.random.default_rng(11)
    n = 600
    frame = pd.DataFrame({"sex": rng.choice(["M", "F", None], n, p=[0.45, 0.45, 0.1]),
                          "y": (rng.random(n) < 0.3).astype(float)})
    frame["p"] = frame["y"] * 1.5 + rng.normal(size=n)
    frame.loc[frame.index[::10], "y"] = np.nan
    table = subgroup_table(frame, "sex", "y", "p", min_positives=30, n_boot=200)
    assert list(table.columns) == ["group", "n", "positives", "auroc", "ci_low", "ci_high"]
    assert set(table["group"]) == {"F", "M", "unknown"}
    for row in table.itertuples():
        part = frame[frame["sex"].fillna("unknown") == row.group].dropna(subset=["y"])
        assert row.n == len(part) and row.positives == int(part["y"].sum())
        if row.positives >= 30:
            assert row.auroc == pytest.approx(roc_auc_score(part["y"], part["p"]))
            assert row.ci_low < row.auroc < row.ci_high
        else:
            assert np.isnan(row.auroc) and np.isnan(row.ci_low)
    assert table.set_index("group").loc["unknown", "positives"] < 30  # the small group is not evaluated


def test_clustered_bootstrap_counts_patients_not_images():
    """Known answer: every patient imaged k times with identical scores. Resampling patients gives the
    CI of the k=1 data; resampling images treats the copies as independent and shrinks it by ~sqrt(k)."""
    rng = np.random.default_rng(4)
    n, k = 150, 6
    y1 = (rng.random(n) < 0.4).astype(float)
    p1 = y1 * 0.7 + rng.normal(0, 0.6, n)
    y, p, patients = np.repeat(y1, k), np.repeat(p1, k), np.repeat(np.arange(n), k)

    def width(ci):
        return ci[1] - ci[0]

    one_image = width(bootstrap_ci(y1, p1, n_boot=2000, seed=1, groups=np.arange(n)))
    clustered = width(bootstrap_ci(y, p, n_boot=2000, seed=1, groups=patients))
    naive = width(bootstrap_ci(y, p, n_boot=2000, seed=1))
    assert abs(clustered / one_image - 1) < 0.1, (clustered, one_image)
    assert abs(naive * np.sqrt(k) / one_image - 1) < 0.2, (naive, one_image)
    # the paired test on the same data: clustered p-values are larger (fewer independent units)
    q1 = y1 * 0.55 + rng.normal(0, 0.6, n)
    q = np.repeat(q1, k)
    naive_p = paired_bootstrap(y, p, q, n_boot=2000, seed=2)["p_value"]
    clustered_r = paired_bootstrap(y, p, q, n_boot=2000, seed=2, groups=patients)
    assert clustered_r["clustered"] and clustered_r["p_value"] >= naive_p
    # subgroup tables take the cluster column
    frame = pd.DataFrame({"sex": np.where(patients % 2, "F", "M"), "y": y, "p": p, "patient": patients})
    table = subgroup_table(frame, "sex", "y", "p", n_boot=500, cluster_col="patient")
    assert list(table["group"]) == ["F", "M"] and (table["ci_high"] > table["ci_low"]).all()
