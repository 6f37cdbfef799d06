"""Is a label moved by counterfactuals toward a finding beyond what chance and overfitting give? (audit statistics)

The counterfactual of a code z toward finding F is the closed-form move along F's activation pattern
d_F = Cov(zn) w_F to F's target probability (`cxrray.pipelines.diffchest.counterfactual`); a label L's effect is the
mean change of L's probe probability over images negative for F. Measured in-sample, with probes that nearly
reproduce their labels (C = 10, 512 dimensions, hundreds of rows), that effect is a function of the labels'
co-occurrence, so "moved" and "co-occurs" were one finding counted twice. Here:

- cross-fitting: the probes and the covariance are fitted on one half of the patients and the effect is
  measured on the other half's images (both ways, pooled);
- a patient-level bootstrap of the whole procedure (probes and covariance refitted) gives the effect's
  standard error and percentile CI;
- nulls: L's probe refitted on L's labels permuted across rows (the effect a label unrelated to the
  images would show through overfitting) and random directions with the same step along w_F and the same
  length as d_F (the effect of any move of that size that reaches the target: "specific to the finding");
- "moved" needs both the bootstrap z-test and the permutation-null z-test to reject (the larger p is
  kept), Holm-adjusted over the labels; both signs count (raised or lowered);
- a label with fewer than `min_positives` positives or negatives among the rows is "underpowered" and
  never tested (an under-fitted probe's direction is noise).

Written here because no library does counterfactual-effect inference over refitted probes; the parts are
sklearn's objective (solved batched, `cxrray.eval.logistic`), statsmodels' Holm correction and scipy's
normal distribution.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from cxrray.eval.logistic import fit_logistic

STD_FLOOR = 1e-6


class ConfoundingSettings(BaseModel):
    """`audit.statistics`: patient folds of the cross-fit; replicates of the bootstrap and of each null; the
    family-wise alpha (Holm); the fewest positives (and negatives) a label is tested with."""

    model_config = ConfigDict(extra="forbid")

    folds: int = Field(2, ge=2)
    bootstrap: int = Field(50, ge=10)
    permutations: int = Field(30, ge=10)
    random_directions: int = Field(30, ge=10)
    alpha: float = Field(0.05, gt=0, lt=1)
    min_positives: int = Field(10, ge=2)
    seed: int = 0


def _fit(zn: np.ndarray, y: np.ndarray, C: float) -> tuple[np.ndarray, float] | None:
    """(w, b) of an L2 logistic regression on the rows where y is known; None with < 2 of either class."""
    return _fit_columns(zn, y[:, None], C)[0]


def _fit_columns(zn: np.ndarray, y: np.ndarray, C: float) -> list[tuple[np.ndarray, float] | None]:
    """`_fit` of every column of y [N, K] at once (`cxrray.eval.logistic`: one batched Newton solve)."""
    w, b, fitted = fit_logistic(zn, y, C)
    return [(w[k], float(b[k])) if fitted[k] else None for k in range(y.shape[1])]


def _change(zn: np.ndarray, moved: np.ndarray, probe: tuple[np.ndarray, float] | None) -> np.ndarray:
    """Per-image change of a probe's probability from zn to moved (NaN without a probe)."""
    from scipy.special import expit

    if probe is None:
        return np.full(len(zn), np.nan)
    w, b = probe
    return expit(moved @ w + b) - expit(zn @ w + b)


def _folds(patients: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    unique = np.unique(patients)
    fold_of = dict(zip(unique[rng.permutation(len(unique))], np.arange(len(unique)) % k))
    return np.array([fold_of[p] for p in patients])


@dataclass(frozen=True)
class _Move:
    """How codes are moved and probes fitted: the probes' inverse L2 strength (the probe job's C) and the
    finding's probability the closed-form move reaches (explain.target_probability)."""

    C: float
    target_probability: float


@dataclass
class _Fold:
    """One cross-fit half: normalised codes of the fit rows and of the measured images, F's probe, the
    counterfactual codes, and the pieces the random-direction null needs."""

    fit: np.ndarray  # bool over rows
    zn_fit: np.ndarray
    zn: np.ndarray  # measured images (F-negative, held out)
    moved: np.ndarray
    w_f: np.ndarray
    d_f: np.ndarray
    step: np.ndarray  # per measured image, the step along d_F


def _fold(z: np.ndarray, labels: np.ndarray, f: int, fit: np.ndarray, move: _Move) -> _Fold | None:
    from scipy.special import logit

    measure = ~fit & (labels[:, f] == 0)
    mean, std = z[fit].mean(0), np.maximum(z[fit].std(0), STD_FLOOR)
    zn_fit, zn = (z[fit] - mean) / std, (z[measure] - mean) / std
    probe = _fit(zn_fit, labels[fit, f], move.C)
    if probe is None or not measure.any():
        return None
    w, b = probe
    centred = zn_fit - zn_fit.mean(0)
    d = centred.T @ (centred @ w) / (len(zn_fit) - 1)  # F's activation pattern Cov(zn) w
    step = (logit(move.target_probability) - (zn @ w + b)) / (w @ d)
    return _Fold(fit, zn_fit, zn, zn + step[:, None] * d, w, d, step)


def _effects(z, labels, patients, f, cfg, move, rng, columns: list[int]
             ) -> tuple[dict[int, float], list[_Fold], list[dict[int, tuple | None]]]:
    """Cross-fitted mean effect per label column (pooled over folds' measured images), the folds, and each
    fold's label probes (column -> (w, b) or None)."""
    fold_ids = _folds(patients, cfg.folds, rng)
    folds = [fold for k in range(cfg.folds) if (fold := _fold(z, labels, f, fold_ids != k, move)) is not None]
    probes = [dict(zip(columns, _fit_columns(fd.zn_fit, labels[fd.fit][:, columns], move.C))) for fd in folds]
    effects = {}
    for j in columns:
        changes = np.concatenate([_change(fd.zn, fd.moved, probe[j]) for fd, probe in zip(folds, probes)])
        effects[j] = float(np.mean(changes)) if len(changes) and np.isfinite(changes).all() else float("nan")
    return effects, folds, probes


def _bootstrap(z, labels, patients, f, cfg, move, rng, columns) -> dict[int, np.ndarray]:
    """Effects per label over patient-level resamples of the whole procedure. A patient drawn twice counts
    twice but keeps one id, so its copies sit in one fold (else the cross-fit would measure images it fitted)."""
    unique = np.unique(patients)
    rows_of = {p: np.flatnonzero(patients == p) for p in unique}
    out = {j: [] for j in columns}
    for _ in range(cfg.bootstrap):
        rows = np.concatenate([rows_of[p] for p in rng.choice(unique, len(unique), replace=True)])
        effects, _, _ = _effects(z[rows], labels[rows], patients[rows], f, cfg, move, rng, columns)
        for j in columns:
            out[j].append(effects[j])
    return {j: np.asarray(v, float) for j, v in out.items()}


def _permutation_null(labels, folds, j, cfg, move, rng) -> np.ndarray:
    """L's effect with its probe refitted on its labels permuted among the fit rows, per replicate."""
    permuted = [[] for _ in folds]  # per fold, one column per replicate
    for _ in range(cfg.permutations):
        for columns, fd in zip(permuted, folds):
            y = labels[fd.fit, j].copy()
            known = np.flatnonzero(np.isfinite(y))
            y[known] = y[rng.permutation(known)]
            columns.append(y)
    probes = [_fit_columns(fd.zn_fit, np.column_stack(columns), move.C) for columns, fd in zip(permuted, folds)]
    return np.asarray([float(np.nanmean(np.concatenate([_change(fd.zn, fd.moved, fold_probes[r])
                                                          for fd, fold_probes in zip(folds, probes)])))
                       for r in range(cfg.permutations)])


def _random_direction_null(folds, probes, cfg, rng) -> np.ndarray:
    """L's effect when each image moves by d = (d_F's part along w_F) + a random direction orthogonal to w_F
    with the length of d_F's orthogonal part: the same step reaches F's target, the rest of the move is random.
    `probes`: L's probe per fold."""
    values = []
    for _ in range(cfg.random_directions):
        changes = []
        for fd, probe in zip(folds, probes):
            unit = fd.w_f / np.linalg.norm(fd.w_f)
            along = (fd.d_f @ unit) * unit
            u = rng.standard_normal(len(unit))
            u -= (u @ unit) * unit
            d = along + u / np.linalg.norm(u) * np.linalg.norm(fd.d_f - along)
            changes.append(_change(fd.zn, fd.zn + fd.step[:, None] * d, probe))
        values.append(float(np.mean(np.concatenate(changes))))
    return np.asarray(values)


def _z_p(effect: float, null: np.ndarray, centre: float) -> float:
    """Two-sided normal p of (effect - centre) / sd(null) (a normal approximation: more resolution than the
    replicates' ranks give)."""
    from scipy.stats import norm

    finite = np.asarray(null, float)[np.isfinite(null)]
    sd = float(finite.std(ddof=1)) if len(finite) > 1 else float("nan")
    if not (np.isfinite(effect) and np.isfinite(centre) and sd > 0):
        return 1.0  # no usable null: never a rejection
    return float(2 * norm.sf(abs(effect - centre) / sd))


def confounding(z: np.ndarray, labels: np.ndarray, patients, vocab: list[str], finding: str,
                cfg: ConfoundingSettings = ConfoundingSettings(), C: float = 10.0, target_probability: float = 0.9,
                associations: dict[str, dict] | None = None) -> list[dict]:
    """Per label other than `finding`: the cross-fitted effect, its patient-bootstrap SE and CI, both nulls,
    Holm-adjusted p, and a verdict (module doc). z [N, D] codes, labels [N, F] in {1, 0, NaN} aligned with
    `vocab`, patients [N] ids; C and target_probability as the probe and the counterfactuals use. `associations`: `odds_ratios` of the finding (label -> {"ci": [lo, hi]});
    with them a moved label is a "confounder" (associated the same way) or "entangled" (not associated)."""
    from statsmodels.stats.multitest import multipletests

    z, labels, patients = np.asarray(z, np.float64), np.asarray(labels, np.float64), np.asarray(patients).astype(str)
    if len(np.unique(patients)) < 2 * cfg.folds:
        raise ValueError(f"{len(np.unique(patients))} distinct patients: the cross-fit needs at least {2 * cfg.folds} "
                         "(are the encodings' patient ids missing?)")
    f = vocab.index(finding)
    move = _Move(C, target_probability)
    rng = np.random.default_rng(cfg.seed)
    rows, testable = [], []
    for j, name in enumerate(vocab):
        if j == f:
            continue
        y = labels[:, j]
        positives, negatives = int((y == 1).sum()), int((y == 0).sum())
        row = {"label": name, "positives": positives, "negatives": negatives}
        if min(positives, negatives) < cfg.min_positives:
            rows.append({**row, "verdict": "underpowered", "moved": False,
                         "why": f"{min(positives, negatives)} {'positives' if positives < negatives else 'negatives'} "
                                f"< {cfg.min_positives}: its probe's direction cannot be told from noise"})
            continue
        rows.append(row)
        testable.append((len(rows) - 1, j))
    columns = [j for _, j in testable]
    if not columns:
        return rows
    effects, folds, probes = _effects(z, labels, patients, f, cfg, move, rng, columns)
    boots = _bootstrap(z, labels, patients, f, cfg, move, rng, columns)
    p_values = []
    for (i, j) in testable:
        effect, boot = effects[j], boots[j]
        perm = _permutation_null(labels, folds, j, cfg, move, rng)
        rand = _random_direction_null(folds, [probe[j] for probe in probes], cfg, rng)
        p_boot, p_perm = _z_p(effect, boot, 0.0), _z_p(effect, perm, float(np.nanmean(perm)))
        rows[i].update(effect=effect, se=float(np.nanstd(boot, ddof=1)),
                       ci=[float(np.nanpercentile(boot, 2.5)), float(np.nanpercentile(boot, 97.5))],
                       null_permuted=[float(np.nanmean(perm)), float(np.nanstd(perm, ddof=1))],
                       null_random_direction=[float(np.nanmean(rand)), float(np.nanstd(rand, ddof=1))],
                       p_bootstrap=p_boot, p_permuted=p_perm,
                       p_random_direction=_z_p(effect, rand, float(np.nanmean(rand))))
        p_values.append(max(p_boot, p_perm))  # both must reject; _z_p never returns NaN
    adjusted = multipletests(p_values, alpha=cfg.alpha, method="holm")[1]
    for (i, _), p in zip(testable, adjusted):
        row = rows[i]
        moved = bool(p < cfg.alpha)
        sign = "raised" if row["effect"] > 0 else "lowered"
        association = (associations or {}).get(row["label"])
        associated = association is not None and (association["ci"][0] > 1 or association["ci"][1] < 1)
        same_way = associated and (association["ci"][0] > 1) == (row["effect"] > 0)
        specific = bool(row["p_random_direction"] < cfg.alpha)
        if moved and same_way:
            verdict = "confounder"
        elif moved:
            verdict = "entangled"
        else:
            verdict = "associated, not moved" if associated else "not moved"
        row.update(p_holm=float(p), moved=moved, direction=sign if moved else None, associated=associated,
                   specific_to_finding=specific, verdict=verdict,
                   why=(f"{sign} by {row['effect']:+.3f} (Holm p {p:.3g}: beyond the patient bootstrap and the "
                        f"permuted-label null)" if moved else f"effect {row['effect']:+.3f}, Holm p {p:.3g} >= {cfg.alpha:g}")
                   + (", associated in the labels" if associated else "")
                   + (", beyond random moves of the same size" if moved and specific else ""))
    return rows
