"""Linear-probe job: logistic regression on z per finding, fitted on fractions of the fit split's
patients, evaluated on the test split with bootstrap CIs, paired comparisons and subgroups.

Output directory (local):
  fraction-<f>/        one LinearHead per data fraction (f as in probe.fractions, e.g. fraction-0.03)
  head.*               the largest fraction's head again, so `--probe DIR` works
  metrics.json         per-finding metrics (largest fraction), per-fraction AUROCs, comparisons
  metrics|comparisons|subgroups .csv/.md, roc.png
and an MLflow run named "probe" in the tracking experiment (its id is in metrics.json).
"""
from __future__ import annotations

import json
import math
import re
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from joblib import Parallel, delayed
from scipy.special import expit
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_curve

from cxrray.config import Config
from cxrray.eval.stats import age_bins, binary_metrics, bootstrap_ci, paired_bootstrap, subgroup_table
from cxrray.data.shards import jsonable
from cxrray.pipelines.encodings import read_matrices, split_counts
from cxrray.pipelines.diffchest.head import LinearHead
from cxrray.errors import InputError

STD_FLOOR = 1e-6  # z dimensions constant on the fit subset are scaled by this instead of 0
COLUMNS = ["key", "split", "patient", "sex", "age"]  # scalars; labels and z are read as matrices


def fraction_key(fraction: float) -> str:
    """0.03 -> "0.03", 1 -> "1.0": the key in metrics.json and the head folder `fraction-<key>`."""
    return str(float(fraction))


def patient_subset(patients, fraction: float, seed: int) -> np.ndarray:
    """Bool mask over rows: the first ceil(fraction * P) (>= 1) of the P sorted unique patients after a
    seeded permutation. All images of a chosen patient are in; smaller fractions nest in larger ones."""
    patients = np.asarray(patients).astype(str)
    unique = np.unique(patients)
    take = max(1, math.ceil(round(fraction * len(unique), 6)))  # round: 0.1 * 300 is 30.000000000000004
    chosen = unique[np.random.default_rng(seed).permutation(len(unique))[:take]]
    return np.isin(patients, chosen)


def fit_head(z: np.ndarray, labels: np.ndarray, findings: list[str], C: float, info: dict | None = None,
             max_iter: int = 1000, n_jobs: int = -1) -> LinearHead:
    """z [N, D], labels [N, F] in {0, 1, NaN} -> LinearHead on z normalised by this set's mean/std.

    One sklearn LogisticRegression (lbfgs, L2 with inverse strength C) per finding on the rows where
    that label is not NaN. This is exactly the multi-label BCE with NaN-masked targets, because that
    loss (and the L2 penalty) is a sum of independent per-finding terms. A finding with fewer than
    2 positives or 2 negatives is not fitted: weight 0, bias NaN, listed in info["not_fitted"].
    Each fitted row also gets its activation pattern Cov(zn) w over its rows, and its effect: its coefficient
    in a ridge regression of zn on all fitted labels over the rows where all of them are known (see
    `cxrray.pipelines.diffchest.head`; zero when fewer rows than labels + 2 are complete).
    Findings are fitted in n_jobs threads (lbfgs spends its time in BLAS, outside the GIL)."""
    z, labels = np.asarray(z, np.float64), np.asarray(labels, np.float64)
    if len(z) == 0:
        raise InputError("no rows to fit the probe on")
    mean, std = z.mean(axis=0), np.maximum(z.std(axis=0), STD_FLOOR)
    zn = (z - mean) / std
    weight, bias = np.zeros((len(findings), z.shape[1])), np.full(len(findings), np.nan)
    pattern = np.zeros_like(weight)
    todo, not_fitted = [], []
    for j, name in enumerate(findings):
        y = labels[~np.isnan(labels[:, j]), j]
        if min(int(y.sum()), int(len(y) - y.sum())) >= 2:
            todo.append(j)
        else:
            not_fitted.append(name)

    def fit_one(j: int) -> LogisticRegression:
        keep = ~np.isnan(labels[:, j])
        return LogisticRegression(C=C, solver="lbfgs", max_iter=max_iter).fit(zn[keep], labels[keep, j].astype(int))

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # recorded in info["not_converged"] instead
        fitted = Parallel(n_jobs=n_jobs, prefer="threads")(delayed(fit_one)(j) for j in todo)
    for j, clf in zip(todo, fitted):
        weight[j], bias[j] = clf.coef_[0], clf.intercept_[0]
        rows = zn[~np.isnan(labels[:, j])]
        pattern[j] = (rows - rows.mean(axis=0)).T @ ((rows - rows.mean(axis=0)) @ weight[j]) / (len(rows) - 1)
    not_converged = [findings[j] for j, clf in zip(todo, fitted) if clf.n_iter_[0] >= max_iter]
    meta = {**(info or {}), "C": C, "not_fitted": not_fitted, "not_converged": not_converged}
    f32 = np.float32
    return LinearHead(list(findings), weight.astype(f32), bias.astype(f32), mean.astype(f32), std.astype(f32), meta,
                      pattern.astype(f32), label_effects(zn, labels, todo).astype(f32))


def label_effects(zn: np.ndarray, labels: np.ndarray, columns: list[int], alpha: float = 1.0) -> np.ndarray:
    """[F, D]: row j (j in `columns`) is label j's coefficient in a ridge regression (sklearn, `alpha`) of zn
    [N, D] on the label columns [N, len(columns)], over the rows where all of them are known; other rows 0."""
    from sklearn.linear_model import Ridge

    out = np.zeros((labels.shape[1], zn.shape[1]))
    complete = ~np.isnan(labels[:, columns]).any(axis=1) if columns else np.zeros(len(zn), bool)
    if complete.sum() < len(columns) + 2:
        return out
    coef = Ridge(alpha=alpha).fit(labels[complete][:, columns], zn[complete]).coef_  # [D, len(columns)]
    out[columns] = coef.T
    return out


def predict(head: LinearHead, z: np.ndarray) -> np.ndarray:
    """Probabilities [N, F] (float64; NaN for unfitted findings) from the head's own logits."""
    logits = head.logits(torch.as_tensor(np.asarray(z, np.float32))).double().numpy()
    return expit(logits)


def evaluate(head: LinearHead, z: np.ndarray, labels: np.ndarray, min_positives: int, n_boot: int,
             seed: int = 0, patients: np.ndarray | None = None) -> dict:
    """Per finding on rows with a label: positives/negatives and, when the finding is fitted and has
    >= min_positives positives and >= 1 negative, AUROC with a percentile-bootstrap 95% CI (resampling
    `patients` when given, else class-stratified over images),
    AUPRC, Brier and log-loss; otherwise "evaluated": false and a "reason". Plus the mean AUROC."""
    probs, labels = predict(head, z), np.asarray(labels, np.float64)
    findings: dict[str, dict] = {}
    for j, name in enumerate(head.findings):
        y = labels[:, j]
        positives, n = int(np.nansum(y)), int((~np.isnan(y)).sum())
        rec = {"evaluated": False, "positives": positives, "negatives": n - positives}
        if not head.fitted[j]:
            rec["reason"] = "not fitted (fewer than 2 positives or 2 negatives in the fit set)"
        elif positives < min_positives:
            rec["reason"] = f"{positives} test positives < min_positives {min_positives}"
        elif n == positives:
            rec["reason"] = "no test negatives"
        else:
            m = binary_metrics(y, probs[:, j])
            low, high = bootstrap_ci(y, probs[:, j], n_boot=n_boot, seed=seed, groups=patients)
            rec.update(evaluated=True, auroc=m["auroc"], ci_low=low, ci_high=high, auprc=m["auprc"],
                       brier=m["brier"], log_loss=m["log_loss"])
        findings[name] = rec
    aurocs = [r["auroc"] for r in findings.values() if r["evaluated"]]
    return {"findings": findings, "mean_auroc": float(np.mean(aurocs)) if aurocs else None, "evaluated": len(aurocs)}


def sampled_patients(patients, keys, fraction: float, seed: int) -> np.ndarray:
    """Bool mask: the rows whose patient (its key when it has none) hashes, under `seed`, below `fraction` of
    the hash range. A pure function of each row's id: the same patients are chosen part by part as at once,
    and a patient's images are all in or all out."""
    import hashlib

    ids = [p if isinstance(p, str) and p else str(k) for p, k in zip(patients, keys)]
    if fraction >= 1.0:
        return np.ones(len(ids), bool)
    limit = int(fraction * 2 ** 64)
    return np.array([int.from_bytes(hashlib.blake2b(f"{seed}\0{i}".encode(), digest_size=8).digest(), "big") < limit
                     for i in ids], bool)


def _load(encodings_uri: str, cfg: Config) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict, str]:
    """(scalar columns, {"labels", "z"} float32 matrices row-aligned with them, index, the fit split). Only the
    fit and test splits' rows are read (Parquet predicate); with probe.max_images, a split holding more is
    sampled by patient (`sampled_patients`) part by part, so at most ~max_images rows of each are ever held."""
    counts = split_counts(encodings_uri)
    present = sorted(counts)
    fit_split = next((s for s in cfg.probe.fit_splits if s in present), None)
    if fit_split is None:
        raise InputError(f"{encodings_uri}: no fit split: none of probe.fit_splits {cfg.probe.fit_splits} is in "
                         f"the encodings (splits present: {', '.join(present) or 'none'})")
    if cfg.probe.test_split not in present:
        raise InputError(f"{encodings_uri}: no rows in probe.test_split {cfg.probe.test_split!r} "
                         f"(splits present: {', '.join(present)})")
    if fit_split == cfg.probe.test_split:
        raise InputError(f"fit split and test split are both {fit_split!r}")
    cap = cfg.probe.max_images
    fractions = {s: (1.0 if cap is None else min(1.0, cap / counts[s])) for s in (fit_split, cfg.probe.test_split)}

    def keep(table) -> np.ndarray:
        split = table.column("split").to_numpy(zero_copy_only=False)
        mask = np.ones(len(split), bool)
        for s, fraction in fractions.items():
            if fraction < 1.0:
                rows = split == s
                mask[rows] = sampled_patients(table.column("patient").to_numpy(zero_copy_only=False)[rows],
                                              table.column("key").to_numpy(zero_copy_only=False)[rows],
                                              fraction, cfg.probe.seed)
        return mask

    frame, matrices, index = read_matrices(encodings_uri, COLUMNS, ["labels", "z"],
                                           filters=[("split", "in", sorted(fractions))], keep=keep)
    index = {**index, "read": {s: {"rows": counts[s], "fraction": f} for s, f in fractions.items()}}
    frame["patient"] = frame["patient"].fillna(frame["key"])  # no patient id: each image its own patient
    return frame, matrices, index, fit_split


def _compare(y: np.ndarray, findings: list[str], probs: dict, heads: dict, evaluated: list[str], largest: float,
             n_boot: int, seed: int, patients: np.ndarray) -> list[dict]:
    """Each smaller fraction against the largest, per finding evaluated at the largest: paired bootstrap."""
    rows = []
    for f in sorted(probs):
        if f == largest:
            continue
        for name in evaluated:
            j = findings.index(name)
            row = {"fraction": f, "reference": largest, "finding": name}
            if not heads[f].fitted[j]:
                rows.append({**row, "note": "not fitted at this fraction"})
                continue
            r = paired_bootstrap(y[:, j], probs[f][:, j], probs[largest][:, j], n_boot=n_boot, seed=seed,
                                 groups=patients)
            rows.append({**row, "auroc": r["a"], "auroc_reference": r["b"], "diff": r["diff"],
                         "ci_low": r["ci_low"], "ci_high": r["ci_high"], "p_value": r["p_value"], "note": ""})
    return rows


def _subgroups(test: pd.DataFrame, y: np.ndarray, p: np.ndarray, findings: list[str], evaluated: list[str],
               cfg: Config) -> pd.DataFrame:
    attributes = {"age": age_bins(test["age"].to_numpy(np.float64), cfg.probe.age_bins),
                  "sex": test["sex"].to_numpy(object)}
    tables = []
    for name in evaluated:
        j = findings.index(name)
        for attr, values in attributes.items():
            t = subgroup_table(pd.DataFrame({attr: values, "y": y[:, j], "p": p[:, j],
                                             "patient": test["patient"].to_numpy(object)}), attr, "y", "p",
                               cfg.probe.min_positives, cfg.probe.bootstrap, cfg.probe.seed, cluster_col="patient")
            tables.append(t.assign(finding=name, attribute=attr))
    cols = ["finding", "attribute", "group", "n", "positives", "auroc", "ci_low", "ci_high"]
    return pd.concat(tables, ignore_index=True)[cols] if tables else pd.DataFrame(columns=cols)


def _markdown(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table (pandas' to_markdown needs `tabulate`, which is not a dependency)."""
    def cell(v) -> str:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            return ""
        return f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(map(str, frame.columns)) + " |", "|" + "---|" * len(frame.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def _plot_roc(path: Path, y: np.ndarray, p: np.ndarray, findings: list[str], result: dict, title: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 7))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
    shown = [n for n in findings if result["findings"][n]["evaluated"]]
    for name in shown:
        j = findings.index(name)
        keep = ~np.isnan(y[:, j])
        fpr, tpr, _ = roc_curve(y[keep, j], p[keep, j])
        ax.plot(fpr, tpr, lw=1, label=f"{name} (AUROC {result['findings'][name]['auroc']:.3f})")
    if shown:
        ax.legend(loc="lower right", fontsize=8 if len(shown) <= 12 else 5, ncol=1 + len(shown) // 30)
    else:
        ax.text(0.5, 0.5, "no finding met the evaluation criteria", ha="center")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=title,
           xlim=(-0.01, 1.01), ylim=(-0.01, 1.01))
    fig.savefig(path, dpi=120)


def _metric_name(finding: str) -> str:
    """MLflow metric names allow letters, digits, _ - . space : / only."""
    return re.sub(r"[^\w\-. :/]", "_", finding)


def run_probe(encodings_uri: str, output_dir: Path, cfg: Config, fractions: list[float] | None = None) -> dict:
    """Fit one head per fraction (cfg.probe.fractions unless given), evaluate, write the report and
    log it to MLflow; returns a short summary (also printed by `cxrray probe`)."""
    from cxrray.tracking import RunLogger, start_run, tracking_uri

    pc = cfg.probe
    fractions = sorted({float(f) for f in (fractions or pc.fractions)})
    if not fractions or not all(0 < f <= 1 for f in fractions):
        raise InputError(f"fractions must be in (0, 1], got {fractions}")
    frame, matrices, index, fit_split = _load(encodings_uri, cfg)
    findings = list(index["label_vocabulary"])
    in_fit, in_test = (frame["split"] == fit_split).to_numpy(), (frame["split"] == pc.test_split).to_numpy()
    fit, test = frame[in_fit], frame[in_test]
    z_fit, y_fit = matrices["z"][in_fit], matrices["labels"][in_fit]
    z_test, y_test = matrices["z"][in_test], matrices["labels"][in_test]
    del matrices
    if y_fit.shape[1] != len(findings):
        raise InputError(f"{encodings_uri}: labels have {y_fit.shape[1]} columns, label_vocabulary {len(findings)}")
    out = Path(output_dir)
    largest = fractions[-1]
    heads, probs, results, per_fraction = {}, {}, {}, {}
    test_patients = test["patient"].to_numpy(object)  # CIs resample patients: they have several images
    for f in fractions:
        mask = patient_subset(fit["patient"].to_numpy(), f, pc.seed)
        info = {"fit_split": fit_split, "fraction": f, "fit_images": int(mask.sum()),
                "fit_patients": int(fit["patient"][mask].nunique()), "encodings": encodings_uri,
                "checkpoint": index.get("checkpoint"), "seed": pc.seed}
        head = heads[f] = fit_head(z_fit[mask], y_fit[mask], findings, pc.C, info)
        head.save(out / f"fraction-{fraction_key(f)}")
        probs[f], results[f] = predict(head, z_test), evaluate(head, z_test, y_test, pc.min_positives, pc.bootstrap,
                                                                pc.seed, test_patients)
        r = results[f]
        per_fraction[fraction_key(f)] = {
            "findings": {n: {k: v[k] for k in ("auroc", "ci_low", "ci_high")} for n, v in r["findings"].items()
                         if v["evaluated"]},
            "mean_auroc": r["mean_auroc"], "fit_images": info["fit_images"], "fit_patients": info["fit_patients"],
            "not_fitted": head.info["not_fitted"]}
        mean = "n/a" if r["mean_auroc"] is None else f"{r['mean_auroc']:.3f}"
        print(f"[probe] fraction {f:g}: {info['fit_images']} images / {info['fit_patients']} patients of "
              f"{fit_split!r}; {int(head.fitted.sum())}/{len(findings)} findings fitted; test mean AUROC {mean} "
              f"over {r['evaluated']} findings", flush=True)
    heads[largest].save(out)
    best = results[largest]
    evaluated = [n for n in findings if best["findings"][n]["evaluated"]]
    comparisons = _compare(y_test, findings, probs, heads, evaluated, largest, pc.paired_bootstrap, pc.seed,
                           test_patients)
    subgroups = _subgroups(test, y_test, probs[largest], findings, evaluated, cfg)

    table = pd.DataFrame([{"finding": n, **best["findings"][n]} for n in findings])
    for f in fractions[:-1]:
        table[f"auroc_fraction_{fraction_key(f)}"] = [results[f]["findings"][n].get("auroc") for n in findings]
    table = table.reindex(columns=["finding", "evaluated", "positives", "negatives", "auroc", "ci_low", "ci_high",
                                   "auprc", "brier", "log_loss", "reason"]
                          + [c for c in table.columns if c.startswith("auroc_fraction_")])
    compare_cols = ["fraction", "reference", "finding", "auroc", "auroc_reference", "diff", "ci_low", "ci_high",
                    "p_value", "note"]
    tables = {"metrics": table, "comparisons": pd.DataFrame(comparisons, columns=compare_cols),
              "subgroups": subgroups}
    for name, t in tables.items():
        t.to_csv(out / f"{name}.csv", index=False)
        (out / f"{name}.md").write_text(_markdown(t))
    _plot_roc(out / "roc.png", y_test, probs[largest], findings, best,
              f"Linear probe, {pc.test_split} split (fit: {fraction_key(largest)} of {fit_split})")

    uri = tracking_uri(cfg.tracking)
    run_id = start_run(cfg.tracking, {"probe": pc.model_dump(mode="json"), "encodings": encodings_uri,
                                      "output": str(out.resolve()), "fit_split": fit_split,
                                      "checkpoint": index.get("checkpoint")}, run_name="probe")
    logger = RunLogger(uri, run_id)
    try:
        values = {f"auroc/{_metric_name(n)}": best["findings"][n]["auroc"] for n in evaluated}
        values.update({f"mean_auroc/fraction-{fraction_key(f)}": results[f]["mean_auroc"] for f in fractions})
        values.update(mean_auroc=best["mean_auroc"], evaluated_findings=len(evaluated))
        logger.metrics({k: v for k, v in values.items() if v is not None}, step=0)
        metrics = {"findings": best["findings"], "mean_auroc": best["mean_auroc"], "evaluated": len(evaluated),
                   "fractions": per_fraction, "comparisons": comparisons,
                   "not_fitted": heads[largest].info["not_fitted"],
                   "fit_split": fit_split, "test_split": pc.test_split, "test_images": len(test),
                   "matrix_bytes_per_sample": 4 * (z_fit.shape[1] + y_fit.shape[1]),  # z and labels, float32
                   "read": index["read"],  # per split: rows in the encodings, fraction of patients read
                   "encodings": encodings_uri, "checkpoint": index.get("checkpoint"),
                   "largest_fraction": largest, "mlflow_run_id": run_id}
        (out / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=1))
        for name in ["metrics.json", "roc.png", *(f"{t}.{ext}" for t in tables for ext in ("csv", "md"))]:
            logger.artifact(out / name, "probe")
        for path in sorted(out.glob("head.*")):
            logger.artifact(path, "probe/head")
    except BaseException:
        logger.finish("FAILED")
        raise
    logger.finish()
    return jsonable({"output": str(out), "metrics": str(out / "metrics.json"), "fit_split": fit_split,
                      "test_split": pc.test_split, "findings": len(findings), "evaluated": len(evaluated),
                      "not_fitted": len(heads[largest].info["not_fitted"]), "mean_auroc": best["mean_auroc"],
                      "mean_auroc_by_fraction": {k: v["mean_auroc"] for k, v in per_fraction.items()},
                      "significant_differences": sum(1 for c in comparisons if c.get("p_value", 1) < 0.05),
                      "mlflow_run_id": run_id})
