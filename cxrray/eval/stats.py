"""Statistics for probe evaluation: binary metrics, stratified or patient-clustered bootstrap CIs,
paired bootstrap tests, Fleiss' kappa and subgroup tables.

Conventions: y is a 1-D array of labels in {0, 1} with NaN for "no label"; every function here drops
NaN-label rows itself (so callers pass whole columns). p are scores/probabilities of the same length.
The metrics themselves are scikit-learn's; the bootstrap is written here because no library draws
class-stratified or patient-clustered, paired redraws with a vectorised AUROC. Where patients have
several images, pass `groups` (the patient of each row): an image-level bootstrap treats correlated
images as independent and gives CIs that are too narrow.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import numpy as np
import pandas as pd
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

Metric = Callable[[np.ndarray, np.ndarray], float]


def _clean(y, *scores) -> tuple[np.ndarray, ...]:
    """Drop rows whose label is NaN; check the rest are 0/1 and aligned with the scores."""
    y = np.asarray(y, dtype=np.float64).ravel()
    arrays = [np.asarray(s, dtype=np.float64).ravel() for s in scores]
    for a in arrays:
        if a.shape != y.shape:
            raise ValueError(f"scores have {a.shape[0]} rows, labels {y.shape[0]}")
    keep = ~np.isnan(y)
    y = y[keep]
    if not np.isin(y, (0.0, 1.0)).all():
        raise ValueError("labels must be 0, 1 or NaN")
    return (y.astype(np.int64), *(a[keep] for a in arrays))


def binary_metrics(y, p) -> dict:
    """AUROC, AUPRC (average precision), Brier score and log-loss of probabilities p in [0, 1].
    NaN-label rows are dropped here; AUROC/AUPRC are NaN when only one class remains."""
    y, p = _clean(y, p)
    positives = int(y.sum())
    both = 0 < positives < len(y)
    return {"auroc": float(roc_auc_score(y, p)) if both else math.nan,
            "auprc": float(average_precision_score(y, p)) if both else math.nan,
            "brier": float(brier_score_loss(y, p, labels=[0, 1])) if len(y) else math.nan,
            "log_loss": float(log_loss(y, np.clip(p, 1e-15, 1 - 1e-15), labels=[0, 1])) if len(y) else math.nan,
            "positives": positives, "negatives": int(len(y) - positives), "n": int(len(y))}


def _chunks(n_boot: int, n: int):
    """Redraws per block so one block's index matrix stays near 4M entries."""
    size = max(1, 4_000_000 // max(n, 1))
    for start in range(0, n_boot, size):
        yield min(size, n_boot - start)


def _counts(idx: np.ndarray, n: int) -> np.ndarray:
    """Indices [B, m] in [0, n) -> how often each item was drawn, [B, n]."""
    b = idx.shape[0]
    flat = idx + (np.arange(b) * n)[:, None]
    return np.bincount(flat.ravel(), minlength=b * n).reshape(b, n)


def _auroc_counts(s_pos: np.ndarray, s_neg: np.ndarray, c_pos: np.ndarray, c_neg: np.ndarray) -> np.ndarray:
    """AUROC (Mann-Whitney, ties count 1/2) of each redraw, given how often each positive and each
    negative was drawn ([B, n1], [B, n0]). O(B * n) with no per-redraw sort: sklearn would need one
    call per redraw, too slow for 10,000 paired redraws."""
    order = np.argsort(s_neg, kind="stable")
    sorted_neg = s_neg[order]
    cum = np.zeros((c_neg.shape[0], len(s_neg) + 1), dtype=np.int64)
    np.cumsum(c_neg[:, order], axis=1, out=cum[:, 1:])
    lo = np.searchsorted(sorted_neg, s_pos, side="left")  # negatives strictly below each positive
    hi = np.searchsorted(sorted_neg, s_pos, side="right")  # ... plus the tied ones
    below = cum[:, lo] + 0.5 * (cum[:, hi] - cum[:, lo])
    return (c_pos * below).sum(axis=1) / (c_pos.sum(axis=1) * c_neg.sum(axis=1))


def bootstrap_distribution(y, scores: Sequence, metric: Metric = roc_auc_score, n_boot: int = 1000,
                           seed: int = 0, groups=None) -> np.ndarray:
    """metric on n_boot redraws, [n_boot, len(scores)]; all score vectors share each redraw (paired).

    Without `groups`, class-stratified: positives and negatives are resampled separately with
    replacement (n1 and n0 draws), so every redraw has both classes and the observed prevalence.
    With `groups` (one cluster id per row, e.g. the patient), clustered: the clusters are resampled
    with replacement and each drawn cluster brings all its rows, so images of one patient move
    together and the CI reflects the number of patients, not of images. A clustered redraw that lacks
    a class gives NaN (skip it with nanquantile). metric=roc_auc_score takes a vectorised path."""
    y, *scores = _clean(y, *scores) if groups is None else _clean_grouped(y, groups, *scores)
    if groups is not None:
        scores, cluster = scores[:-1], scores[-1].astype(np.int64)
    pos, neg = np.flatnonzero(y == 1), np.flatnonzero(y == 0)
    if len(pos) == 0 or len(neg) == 0:
        raise ValueError(f"bootstrap needs both classes (positives {len(pos)}, negatives {len(neg)})")
    rng = np.random.default_rng(seed)
    out = np.empty((n_boot, len(scores)))
    row = 0
    n_units = len(y) if groups is None else int(cluster.max()) + 1
    for b in _chunks(n_boot, n_units):
        if groups is None:
            ip, ineg = rng.integers(0, len(pos), (b, len(pos))), rng.integers(0, len(neg), (b, len(neg)))
            c_pos, c_neg = _counts(ip, len(pos)), _counts(ineg, len(neg))
        else:  # how often each row was drawn = how often its cluster was
            per_row = _counts(rng.integers(0, n_units, (b, n_units)), n_units)[:, cluster]
            c_pos, c_neg = per_row[:, pos], per_row[:, neg]
        if metric is roc_auc_score:
            with np.errstate(invalid="ignore", divide="ignore"):
                for k, s in enumerate(scores):
                    out[row:row + b, k] = _auroc_counts(s[pos], s[neg], c_pos, c_neg)
        else:
            for r in range(b):
                take = np.r_[np.repeat(pos, c_pos[r]), np.repeat(neg, c_neg[r])]
                y_star = np.r_[np.ones(c_pos[r].sum(), np.int64), np.zeros(c_neg[r].sum(), np.int64)]
                both = 0 < c_pos[r].sum() and 0 < c_neg[r].sum()
                out[row + r] = [metric(y_star, s[take]) if both else math.nan for s in scores]
        row += b
    return out


def _clean_grouped(y, groups, *scores) -> tuple[np.ndarray, ...]:
    """Like _clean, with the cluster ids (any hashable values) as a last array of codes 0..G-1."""
    groups = np.asarray(groups, dtype=object).ravel()
    y_arr = np.asarray(y, dtype=np.float64).ravel()
    if groups.shape != y_arr.shape:
        raise ValueError(f"groups have {groups.shape[0]} rows, labels {y_arr.shape[0]}")
    keep = ~np.isnan(y_arr)
    codes = pd.factorize(pd.Series(groups[keep]).astype(str))[0].astype(np.float64)
    full = np.full(len(y_arr), np.nan)
    full[keep] = codes
    y_c, *rest = _clean(y_arr, *scores, full)
    return (y_c, *rest)


def bootstrap_ci(y, p, metric: Metric = roc_auc_score, n_boot: int = 1000, alpha: float = 0.05,
                 seed: int = 0, groups=None) -> tuple[float, float]:
    """Percentile bootstrap (1 - alpha) CI of metric(y, p): class-stratified, or clustered by `groups`
    (see bootstrap_distribution)."""
    reps = bootstrap_distribution(y, [p], metric, n_boot, seed, groups)[:, 0]
    low, high = np.nanquantile(reps, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def paired_bootstrap(y, p_a, p_b, metric: Metric = roc_auc_score, n_boot: int = 10_000, alpha: float = 0.05,
                     seed: int = 0, groups=None) -> dict:
    """Compare two models on the same cases: diff = metric(a) - metric(b), its percentile CI from the
    same redraws for both (stratified, or clustered by `groups`), and a two-sided bootstrap p-value
    min(1, 2 * min(#(diff* <= 0) + 1, #(diff* >= 0) + 1) / (n_boot + 1)). Identical models give p = 1."""
    y_c, a, b = _clean(y, p_a, p_b)
    metric_a, metric_b = float(metric(y_c, a)), float(metric(y_c, b))
    reps = bootstrap_distribution(y, [p_a, p_b], metric, n_boot, seed, groups)
    diffs = reps[:, 0] - reps[:, 1]
    diffs = diffs[~np.isnan(diffs)]
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    tail = min(int((diffs <= 0).sum()), int((diffs >= 0).sum())) + 1
    return {"diff": metric_a - metric_b, "ci_low": float(low), "ci_high": float(high),
            "p_value": float(min(1.0, 2 * tail / (len(diffs) + 1))), "a": metric_a, "b": metric_b,
            "n_boot": int(len(diffs)), "clustered": groups is not None}


def fleiss_kappa(counts) -> float:
    """Fleiss' kappa of counts [subjects, categories]: how many raters put each subject in each
    category. Every subject must have the same number (>= 2) of raters. Written here because the
    library that has it (statsmodels) is not a runtime dependency; tests check it against statsmodels."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2 or counts.shape[0] == 0 or (counts < 0).any():
        raise ValueError("counts must be a non-negative [subjects, categories] table")
    raters = counts.sum(axis=1)
    if not np.all(raters == raters[0]):
        raise ValueError(f"every subject needs the same number of raters (got {sorted(set(raters.tolist()))})")
    n = raters[0]
    if n < 2:
        raise ValueError("Fleiss' kappa needs at least 2 raters per subject")
    p_bar = ((counts ** 2).sum(axis=1) - n).mean() / (n * (n - 1))  # observed agreement
    p_e = ((counts.sum(axis=0) / counts.sum()) ** 2).sum()  # agreement by chance
    return float((p_bar - p_e) / (1 - p_e)) if p_e < 1 else math.nan


def age_bins(ages, edges: Sequence[float]) -> np.ndarray:
    """Right-open bins [edges[i], edges[i+1]) labelled "40-60"; NaN or out-of-range ages -> "unknown"."""
    ages = np.asarray(ages, dtype=np.float64)
    edges = sorted(float(e) for e in edges)
    fmt = lambda v: f"{v:g}"  # noqa: E731
    names = np.array([f"{fmt(lo)}-{fmt(hi)}" for lo, hi in zip(edges[:-1], edges[1:])] + ["unknown"], dtype=object)
    which = np.searchsorted(edges, ages, side="right") - 1
    outside = np.isnan(ages) | (which < 0) | (which >= len(edges) - 1)
    return names[np.where(outside, len(names) - 1, which)]


def subgroup_table(frame: pd.DataFrame, by: str, y_col: str, p_col: str, min_positives: int = 1,
                   n_boot: int = 1000, seed: int = 0, cluster_col: str | None = None) -> pd.DataFrame:
    """One row per value of `by` (missing -> "unknown"): group, n, positives, auroc, ci_low, ci_high.
    Rows with NaN y are dropped; AUROC and CI are NaN when a group has fewer than min_positives
    positives or no negatives. `cluster_col` (e.g. patient) makes the CI a clustered bootstrap."""
    data = frame[[by, y_col, p_col] + ([cluster_col] if cluster_col else [])].dropna(subset=[y_col])
    groups = data[by].astype(object).where(data[by].notna(), "unknown").astype(str)
    rows = []
    for name in sorted(groups.unique()):
        part = data[groups == name]
        y, p = part[y_col].to_numpy(np.float64), part[p_col].to_numpy(np.float64)
        positives = int(y.sum())
        auroc = low = high = math.nan
        if max(1, min_positives) <= positives < len(y):
            auroc = float(roc_auc_score(y, p))
            low, high = bootstrap_ci(y, p, n_boot=n_boot, seed=seed,
                                     groups=part[cluster_col].to_numpy(object) if cluster_col else None)
        rows.append({"group": name, "n": len(y), "positives": positives, "auroc": auroc,
                     "ci_low": low, "ci_high": high})
    return pd.DataFrame(rows, columns=["group", "n", "positives", "auroc", "ci_low", "ci_high"])


def compare_to_reference(y, scores: dict, reference: str, metric: Metric = roc_auc_score, n_boot: int = 2000,
                         alpha: float = 0.05, seed: int = 0, groups=None) -> dict[str, dict]:
    """Several models scored on the same cases, each against `reference`, from one set of paired redraws
    (stratified, or clustered by `groups`): {name: value, ci_low, ci_high and, for the others,
    diff = metric(name) - metric(reference), diff_ci_low, diff_ci_high, p_value} with the two-sided
    bootstrap p-value of `paired_bootstrap`."""
    names = list(scores)
    y_c, *cleaned = _clean(y, *(scores[n] for n in names))
    values = {n: float(metric(y_c, s)) for n, s in zip(names, cleaned)}
    reps = bootstrap_distribution(y, [scores[n] for n in names], metric, n_boot, seed, groups)
    ref = reps[:, names.index(reference)]
    out = {}
    for k, name in enumerate(names):
        low, high = np.nanquantile(reps[:, k], [alpha / 2, 1 - alpha / 2])
        row = {"value": values[name], "ci_low": float(low), "ci_high": float(high)}
        if name != reference:
            diffs = reps[:, k] - ref
            diffs = diffs[~np.isnan(diffs)]
            d_low, d_high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
            tail = min(int((diffs <= 0).sum()), int((diffs >= 0).sum())) + 1
            row.update(diff=values[name] - values[reference], diff_ci_low=float(d_low), diff_ci_high=float(d_high),
                       p_value=float(min(1.0, 2 * tail / (len(diffs) + 1))))
        out[name] = row
    return out


def at_recall(y, p, recall: float = 0.5) -> dict:
    """Precision and specificity at the highest threshold whose recall is >= `recall`: the
    ceil(recall * positives)-th highest positive score (ties above it are called positive too)."""
    y, p = _clean(y, p)
    positives = np.sort(p[y == 1])[::-1]
    if len(positives) == 0 or len(positives) == len(y):
        return {"threshold": math.nan, "recall": math.nan, "precision": math.nan, "specificity": math.nan}
    threshold = positives[max(0, math.ceil(recall * len(positives)) - 1)]
    called = p >= threshold
    tp, fp = int((called & (y == 1)).sum()), int((called & (y == 0)).sum())
    tn = int(((~called) & (y == 0)).sum())
    return {"threshold": float(threshold), "recall": tp / len(positives), "precision": tp / (tp + fp),
            "specificity": tn / (tn + fp)}
