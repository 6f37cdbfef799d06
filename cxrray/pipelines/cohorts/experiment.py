"""`cxrray experiment cohorts`: does adding a synthetic cohort help a detector of SLVH / DLV, where,
and by how much (cxr_ddpm's downstream experiment).

Arms (`echo_sets.arm_index`): Base (the real split the generator was trained on), Gen (synthetic only),
Base+Gen, Base+Gen(Pos) (Base plus the synthetic positives); each resampled with replacement to
`size_factor` x |Base|. Per arm, `seeds` detectors are fitted (`detector_fits`: Ray Train per fit, the
grid on Ray Tune) and their test probabilities averaged, as the paper does.

Evaluated on the real test split, patient-clustered throughout (images of one patient move together):
AUROC / AUPRC with 95% CIs and each arm against Base from the same paired redraws (p-values), the same
per age bin and sex, precision and specificity at `recall`, Brier, log-loss, calibration curves.

Output (URI; report files are also logged to MLflow, run "experiment-cohorts"):
  fits/...        per fit (see detector_fits)
  metrics.json    everything below, with the paper's figures
  metrics.csv, subgroups.csv, seeds.csv, roc.png, calibration.png, report.html
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
from sklearn.calibration import calibration_curve
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from cxrray.config import Config
from cxrray.data.shards import dumps, jsonable, read_manifest
from cxrray.data.sources.chexchonet import FINDINGS
from cxrray.data.storage import Storage
from cxrray.errors import InputError
from cxrray.eval import html
from cxrray.eval.stats import age_bins, at_recall, binary_metrics, compare_to_reference
from cxrray.pipelines.cohorts.echo_sets import EchoSet, load_echo_set

NAMES = {"slvh": "SLVH", "dlv": "DLV", "composite_slvh_dlv": "Composite"}
# Streiffer et al., CheXchoNet test set (their table; no significance test reported)
PAPER = {
    "auroc": {"slvh": {"base": .73, "gen": .71, "base+gen": .73, "base+gen(pos)": .75},
              "dlv": {"base": .82, "gen": .80, "base+gen": .82, "base+gen(pos)": .82},
              "composite_slvh_dlv": {"base": .78, "gen": .75, "base+gen": .79, "base+gen(pos)": .80}},
    "auprc": {"composite_slvh_dlv": {"base": .45, "gen": .42, "base+gen": .46, "base+gen(pos)": .48}},
    "under_60_composite_auroc": {"base+gen(pos)": 0.86, "lift_over_base_pct": 3.7},
    "fid": {"gen_vs_train": 9.62, "gen_vs_test": 13.5, "train_vs_test": 4.07},
}


def load_sets(real_uri: str, synthetic_uri: str, cfg) -> dict[str, EchoSet]:
    sets = {"base": load_echo_set(real_uri, cfg.train_split), "val": load_echo_set(real_uri, cfg.val_split),
            "test": load_echo_set(real_uri, cfg.test_split), "gen": load_echo_set(synthetic_uri, None)}
    sizes = {k: s.image.shape[1:] for k, s in sets.items()}
    if len(set(sizes.values())) > 1:
        raise InputError(f"real and synthetic images differ in size: {sizes}; generate at the real shards' size")
    return sets


def base_statistics(base: EchoSet) -> dict:
    """z-units of the detector: Base's age and echo mean / sd."""
    return {"age_mean": float(np.nanmean(base.age)), "age_sd": float(np.nanstd(base.age) or 1.0),
            "echo_mean": base.echo.mean(axis=0).astype(np.float32).tolist(),
            "echo_sd": np.maximum(base.echo.std(axis=0), 1e-3).astype(np.float32).tolist()}


def ensemble(out: Storage, arms: list[str], seeds: int) -> tuple[dict, dict]:
    """-> ({arm: mean test probabilities [N, 3]}, {(arm, seed): test probabilities})."""
    from cxrray.pipelines.cohorts.detector_fits import fit_folder

    each = {}
    for arm in arms:
        for seed in range(seeds):
            with np.load(io.BytesIO(out.read_bytes(f"{fit_folder(arm, seed)}/predictions.npz")), allow_pickle=False) as f:
                each[(arm, seed)] = f["test_prob"]
    return {arm: np.mean([each[(arm, s)] for s in range(seeds)], axis=0) for arm in arms}, each


def evaluate_arms(test: EchoSet, probs: dict, cfg) -> dict:
    """Overall, per-finding metrics of each arm's ensemble with CIs and paired comparisons to Base."""
    arms, groups = list(probs), test.patient
    reference = "base" if "base" in probs else arms[0]
    overall = {}
    for j, finding in enumerate(FINDINGS):
        y = test.labels[:, j]
        scores = {a: probs[a][:, j] for a in arms}
        auroc = compare_to_reference(y, scores, reference, roc_auc_score, cfg.paired_bootstrap, seed=cfg.seed, groups=groups)
        auprc = compare_to_reference(y, scores, reference, average_precision_score, cfg.bootstrap, seed=cfg.seed,
                                     groups=groups)
        overall[finding] = {a: {**binary_metrics(y, scores[a]), "auroc": auroc[a], "auprc": auprc[a],
                                "at_recall": at_recall(y, scores[a], cfg.recall)} for a in arms}
    return {"reference": reference, "findings": overall}


def subgroup_comparisons(test: EchoSet, probs: dict, cfg, reference: str) -> list[dict]:
    """AUROC per arm in each age bin and sex, and each arm against the reference within it (paired)."""
    groups = {"age": age_bins(test.age, cfg.age_bins), "sex": np.where(test.sex > 0.5, "M", "F")}
    rows = []
    for by, values in groups.items():
        for name in sorted(set(values)):
            mask = values == name
            for j, finding in enumerate(FINDINGS):
                y = test.labels[mask, j]
                positives, n = int(np.nansum(y)), int((~np.isnan(y)).sum())
                row = {"by": by, "group": name, "finding": finding, "n": n, "positives": positives}
                if positives < cfg.min_positives or positives == n:
                    rows.append({**row, "note": f"fewer than {cfg.min_positives} positives or no negatives"})
                    continue
                result = compare_to_reference(y, {a: probs[a][mask, j] for a in probs}, reference, roc_auc_score,
                                              cfg.paired_bootstrap, seed=cfg.seed, groups=test.patient[mask])
                for arm, r in result.items():
                    rows.append({**row, "arm": arm, "auroc": r["value"], "ci_low": r["ci_low"], "ci_high": r["ci_high"],
                                 "diff": r.get("diff"), "p_value": r.get("p_value")})
    return rows


def _plots(folder: Path, test: EchoSet, probs: dict) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    for kind in ("roc", "calibration"):
        fig = Figure(figsize=(12, 4))
        FigureCanvasAgg(fig)
        for j, finding in enumerate(FINDINGS):
            ax = fig.add_subplot(1, 3, j + 1)
            ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
            y = test.labels[:, j]
            for arm, p in probs.items():
                if kind == "roc":
                    fpr, tpr, _ = roc_curve(y, p[:, j])
                    ax.plot(fpr, tpr, lw=1, label=f"{arm} ({roc_auc_score(y, p[:, j]):.3f})")
                else:
                    observed, predicted = calibration_curve(y, p[:, j], n_bins=8, strategy="quantile")
                    ax.plot(predicted, observed, marker="o", ms=3, lw=1, label=arm)
            ax.set(title=NAMES[finding], xlim=(0, 1), ylim=(0, 1),
                   xlabel="false-positive rate" if kind == "roc" else "mean predicted probability",
                   ylabel="true-positive rate" if kind == "roc" else "observed fraction positive")
            ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(folder / f"{kind}.png", dpi=100)


def _ci(r: dict) -> str:
    return f"{r['value']:.3f} ({r['ci_low']:.3f}–{r['ci_high']:.3f})"


def _report(metrics: dict, subgroups: list[dict], seeds_table: pd.DataFrame, folder: Path) -> str:
    findings, arms = metrics["overall"]["findings"], metrics["arms"]
    main = []
    for arm in arms:
        row = {"arm": arm}
        for f in FINDINGS:
            row[f"{NAMES[f]} AUROC"] = _ci(findings[f][arm]["auroc"])
            row[f"paper {NAMES[f]}"] = PAPER["auroc"][f].get(arm)
        row["Composite AUPRC"] = _ci(findings["composite_slvh_dlv"][arm]["auprc"])
        row["paper AUPRC"] = PAPER["auprc"]["composite_slvh_dlv"].get(arm)
        main.append(row)
    paired = [{"arm": a, "finding": NAMES[f], "metric": m, "diff vs base": findings[f][a][m]["diff"],
               "95% CI": f"{findings[f][a][m]['diff_ci_low']:+.3f} to {findings[f][a][m]['diff_ci_high']:+.3f}",
               "p": findings[f][a][m]["p_value"]}
              for f in FINDINGS for a in arms if a != metrics["overall"]["reference"] for m in ("auroc", "auprc")]
    operating = [{"arm": a, "finding": NAMES[f], "precision@50%": findings[f][a]["at_recall"]["precision"],
                  "specificity@50%": findings[f][a]["at_recall"]["specificity"], "brier": findings[f][a]["brier"],
                  "log-loss": findings[f][a]["log_loss"]} for f in FINDINGS for a in arms]
    sub = [r for r in subgroups if "arm" in r and r["finding"] == "composite_slvh_dlv"]
    young = metrics.get("young_lift")
    sections = [
        ("Data", html.table([metrics["data"]], list(metrics["data"]), digits=0)),
        ("AUROC / AUPRC on the real test split (95% CI, patient-clustered bootstrap) beside the paper's",
         html.table(main, list(main[0]))),
        ("Each arm against Base (paired bootstrap, same redraws)", html.table(paired, list(paired[0])) if paired else ""),
        ("Composite by age and sex (AUROC, paired against Base)",
         html.table(sub, ["by", "group", "arm", "n", "positives", "auroc", "ci_low", "ci_high", "diff", "p_value"])),
        ("Under 60: Base+Gen(Pos) against Base", html.table([young], list(young)) if young else "not evaluated"),
        ("Operating point, Brier, log-loss", html.table(operating, list(operating[0]))),
        ("Single models (AUROC per seed)", html.table(seeds_table.to_dict("records"), list(seeds_table.columns))),
        ("ROC", html.image(folder / "roc.png")), ("Calibration", html.image(folder / "calibration.png")),
    ]
    note = ("Paper: Streiffer et al. (cxr_ddpm), CheXchoNet test set, no significance test reported. Ours: phantoms "
            "or the data given, labels from the echo thresholds for real and synthetic rows alike; synthetic "
            "labels come from the requested covariates, not from what the image shows.")
    return html.page("Synthetic cohorts: downstream experiment", sections, note)


def run_experiment(real_uri: str, synthetic_uri: str, output_uri: str, cfg: Config, progress=print) -> dict:
    """Fit every (arm, seed) on Ray, evaluate the ensembles on the real test split, write the report;
    returns metrics.json's content."""
    from cxrray.pipelines.cohorts.detector_fits import run_fits
    from cxrray.runtime import ensure_ray
    from cxrray.tracking import RunLogger, start_run, tracking_uri

    ec = cfg.experiment
    sets = load_sets(real_uri, synthetic_uri, ec)
    base, gen = sets["base"], sets["gen"]
    stats = base_statistics(base)
    digest = hashlib.sha256(dumps([read_manifest(real_uri), read_manifest(synthetic_uri)])).hexdigest()
    data = {k: s.arrays() for k, s in sets.items()}
    progress(f"[experiment] Base {len(base)} images ({len(set(base.patient))} patients), Gen {len(gen)}, "
             f"val {len(sets['val'])}, test {len(sets['test'])} ({len(set(sets['test'].patient))} patients); "
             f"{len(ec.arms)} arms x {ec.seeds} seeds")
    ensure_ray()
    out = Storage(output_uri)
    records = run_fits(data, stats, ec, out.uri, digest, progress)
    probs, each = ensemble(out, list(ec.arms), ec.seeds)
    test = sets["test"]
    overall = evaluate_arms(test, probs, ec)
    subgroups = subgroup_comparisons(test, probs, ec, overall["reference"])
    seeds_table = pd.DataFrame([{"arm": a, "seed": s, **{NAMES[f]: roc_auc_score(test.labels[:, j], p[:, j])
                                                         for j, f in enumerate(FINDINGS)},
                                 "best epoch": records[(a, s)]["best_epoch"]} for (a, s), p in each.items()])
    pos = FINDINGS.index(ec.positive)
    young = next((r for r in subgroups if r["by"] == "age" and r["group"] == f"{ec.age_bins[0]:g}-{ec.age_bins[1]:g}"
                  and r["finding"] == "composite_slvh_dlv" and r.get("arm") == "base+gen(pos)"), None)
    metrics = {
        "arms": list(ec.arms), "seeds": ec.seeds, "overall": overall, "paper": PAPER, "statistics": stats,
        "data": {"base_images": len(base), "base_patients": len(set(base.patient)), "gen_images": len(gen),
                 "gen_positives": int(np.nansum(gen.labels[:, pos])), "test_images": len(test),
                 "test_patients": len(set(test.patient)), "base_prevalence_pct": float(100 * np.nanmean(base.labels[:, pos])),
                 "gen_prevalence_pct": float(100 * np.nanmean(gen.labels[:, pos])),
                 "test_prevalence_pct": float(100 * np.nanmean(test.labels[:, pos])),
                 "dropped_without_echo": sum(s.dropped for s in sets.values())},
        "young_lift": None if young is None else {
            "group": young["group"], "auroc_base_gen_pos": young["auroc"], "diff": young["diff"],
            "lift_pct": 100 * young["diff"] / (young["auroc"] - young["diff"]), "p_value": young["p_value"],
            "positives": young["positives"], "paper_auroc": PAPER["under_60_composite_auroc"]["base+gen(pos)"],
            "paper_lift_pct": PAPER["under_60_composite_auroc"]["lift_over_base_pct"]},
        "fits": {f"{a}/seed{s}": {k: r[k] for k in ("best_epoch", "best_val_nll", "epochs_run", "rows")}
                 for (a, s), r in records.items()},
        "real": real_uri, "synthetic": synthetic_uri, "config": ec.model_dump(mode="json"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        _plots(folder, test, probs)
        rows = [{"finding": f, "arm": a, "auroc": v["auroc"]["value"], "auroc_ci_low": v["auroc"]["ci_low"],
                 "auroc_ci_high": v["auroc"]["ci_high"], "auprc": v["auprc"]["value"], "diff_vs_base": v["auroc"].get("diff"),
                 "p_value": v["auroc"].get("p_value"), "brier": v["brier"], "log_loss": v["log_loss"],
                 "precision_at_recall": v["at_recall"]["precision"], "specificity_at_recall": v["at_recall"]["specificity"],
                 "paper_auroc": PAPER["auroc"][f].get(a)}
                for f, per_arm in overall["findings"].items() for a, v in per_arm.items()]
        pd.DataFrame(rows).to_csv(folder / "metrics.csv", index=False)
        pd.DataFrame(subgroups).to_csv(folder / "subgroups.csv", index=False)
        seeds_table.to_csv(folder / "seeds.csv", index=False)
        (folder / "report.html").write_text(_report(metrics, subgroups, seeds_table, folder))
        run_id = start_run(cfg.tracking, {"experiment": metrics["config"], "real": real_uri, "synthetic": synthetic_uri,
                                          "output": out.uri}, run_name="experiment-cohorts")
        metrics["mlflow_run_id"] = run_id
        (folder / "metrics.json").write_text(json.dumps(jsonable(metrics), indent=1))
        logger = RunLogger(tracking_uri(cfg.tracking), run_id)
        logger.metrics({f"auroc/{re.sub(r'[^a-z0-9]+', '_', a)}/{f}": v["auroc"]["value"] for f, per_arm in overall["findings"].items()
                        for a, v in per_arm.items()}, step=0)
        for path in sorted(folder.iterdir()):
            out.write_bytes(path.name, path.read_bytes())
            logger.artifact(path, "experiment")
        logger.finish()
    composite = overall["findings"]["composite_slvh_dlv"]
    progress("[experiment] composite AUROC " + ", ".join(f"{a} {composite[a]['auroc']['value']:.3f}" for a in ec.arms)
             + f"; report {out.url('report.html')}")
    return jsonable(metrics)
