"""Confounder audit: what does moving an image toward a finding drag along?

For each audited finding F: take up to `audit.images` images negative for F (labels[F] == 0) from a
split, make counterfactuals toward F (`audit.mode`, by default the closed form: the smallest move
that makes the probe say F) (the explain job, with the plain reconstruction as reference),
and for every other label L measure the per-image change of the probe's probability of L:

- image measure:  p_L(encode(counterfactual)) - p_L(encode(reconstruction))
- latent measure: p_L(z*) - p_L(z)

The effect is the mean change with a 95% percentile bootstrap CI over images; candidates are ranked
by effect. Each gets a verdict:

- "unvalidated": L's own probe has no test AUROC (too few test positives, or no metrics.json) or one
  below `audit.min_probe_auroc`; its direction may be noise, so it is never flagged;
- "confounder": the CI's lower bound exceeds `audit.min_effect` and L co-occurs with F in the labels
  of the split the probe was fitted on (odds ratio's 95% CI above 1): the data confounds them;
- "entangled": it moves as much, without such co-occurrence: the representation mixes F and L
  (overlap in the image or in z), which is a property of the model, not of the data;
- "not moved": otherwise.

`flagged` lists confounders and entangled labels; the JSON and HTML say which is which, with the numbers.
Where the image changes is summarised as the share of |counterfactual - reconstruction| in a 3x3 grid.
Outputs: `audit.json` ({findings: {F: {candidates: [{label, effect, ci, flagged, ...}], ...}}}),
`audit.html` (tables + grids), grids as PNG; all logged to MLflow.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from cxrray.config import Config
from cxrray.data.imaging import decode_png16, png16_to_model
from cxrray.data.storage import Storage
from cxrray.eval import html
from cxrray.eval.grids import save_grid
from cxrray.models.loading import model_identity
from cxrray.pipelines.diffchest.explain import explain_shards, select_samples, stem
from cxrray.pipelines.diffchest.head import load_head
from cxrray.errors import InputError

GRID_IMAGES = 8


def mean_ci(values: np.ndarray, n_boot: int, seed: int) -> tuple[float, float, float]:
    """Mean and 95% percentile-bootstrap CI of per-image changes."""
    values = np.asarray(values, np.float64)
    rng = np.random.default_rng(seed)
    means = values[rng.integers(0, len(values), size=(n_boot, len(values)))].mean(axis=1)
    return float(values.mean()), float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))


def probe_metrics(probe: str) -> dict:
    """The probe directory's metrics.json ({} when it has none)."""
    store = Storage(str(probe))
    return json.loads(store.read_bytes("metrics.json")) if store.exists("metrics.json") else {}


def probe_aurocs(probe: str) -> dict[str, float]:
    """Test AUROC per label from the probe directory's metrics.json ({} when it has none)."""
    findings = probe_metrics(probe).get("findings", {})
    return {k: float(v["auroc"]) for k, v in findings.items() if v.get("auroc") is not None}


def odds_ratios(labels: np.ndarray, vocab: list[str], finding: str) -> dict[str, dict]:
    """Co-occurrence of `finding` with every other label over label rows [N, F] (1/0/NaN; rows where
    either is NaN are left out): odds ratio with a 95% Woolf CI (0.5 added to empty cells, statsmodels)."""
    from statsmodels.stats.contingency_tables import Table2x2

    f = labels[:, vocab.index(finding)]
    out = {}
    for j, label in enumerate(vocab):
        if label == finding:
            continue
        known = np.isfinite(f) & np.isfinite(labels[:, j])
        a, b = f[known] == 1, labels[known, j] == 1
        cells = np.array([[np.sum(a & b), np.sum(a & ~b)], [np.sum(~a & b), np.sum(~a & ~b)]], dtype=np.float64)
        table = Table2x2(cells, shift_zeros=True)
        low, high = table.oddsratio_confint()
        out[label] = {"odds_ratio": float(table.oddsratio), "ci": [float(low), float(high)], "images": int(known.sum()),
                      "both": int(cells[0, 0]), f"p_{label}_given_{finding}": float(cells[0, 0] / max(cells[0].sum(), 1)),
                      f"p_{label}_given_no_{finding}": float(cells[1, 0] / max(cells[1].sum(), 1))}
    return out


def split_labels(data_uri: str, split: str) -> tuple[np.ndarray, list[str]]:
    """Label rows [N, F] of every image of `split` in the shards, and the vocabulary."""
    from cxrray.data.shards import read_manifest, read_tar

    store, manifest = Storage(data_uri), read_manifest(data_uri)
    rows = [[np.nan if v is None else v for v in meta["labels"]]
            for shard in manifest["shards"] if shard["splits"].get(split)
            for _, _, meta in read_tar(store.read_bytes(shard["name"]), shard["name"]) if meta["split"] == split]
    vocab = manifest["label_vocabulary"]
    return np.asarray(rows, np.float64).reshape(-1, len(vocab)), vocab


def candidates(records: list[dict], finding: str, labels: list[str], cfg: Config,
               aurocs: dict[str, float] | None = None, associations: dict[str, dict] | None = None) -> list[dict]:
    """Every label but `finding`, ranked by effect, with its verdict (see module docstring). `aurocs`: the
    probes' test AUROCs; `associations`: `odds_ratios` of `finding` on the probe's fit split."""
    out, aurocs, associations = [], aurocs or {}, associations or {}
    for label in labels:
        if label == finding:
            continue
        image = np.array([r["probs_after"][label] - r["probs_reference"][label] for r in records])
        latent = np.array([r["probs_latent"][label] - r["probs_before"][label] for r in records])
        if not np.isfinite(image).all():  # label without a fitted probe
            continue
        chosen = image if cfg.audit.measure == "image" else latent
        effect, low, high = mean_ci(chosen, cfg.audit.bootstrap, cfg.audit.seed)
        auroc, association = aurocs.get(label), associations.get(label)
        co_occurs = association is not None and association["ci"][0] > 1.0
        if auroc is None:
            verdict, why = "unvalidated", "its probe has no test AUROC (too few test positives or no evaluation)"
        elif auroc < cfg.audit.min_probe_auroc:
            verdict, why = "unvalidated", f"its probe's test AUROC {auroc:.3f} < audit.min_probe_auroc {cfg.audit.min_probe_auroc:g}"
        elif low <= cfg.audit.min_effect:
            verdict, why = "not moved", f"effect CI lower bound {low:+.3f} <= audit.min_effect {cfg.audit.min_effect:g}"
        elif co_occurs:
            verdict, why = "confounder", (f"moved by {effect:+.3f} and co-occurs with {finding} in the probe's fit split "
                                          f"(odds ratio {association['odds_ratio']:.2f}, CI {association['ci'][0]:.2f}-"
                                          f"{association['ci'][1]:.2f})")
        else:
            verdict, why = "entangled", (f"moved by {effect:+.3f} without co-occurring with {finding} in the labels"
                                         + (f" (odds ratio {association['odds_ratio']:.2f}, CI {association['ci'][0]:.2f}-"
                                            f"{association['ci'][1]:.2f})" if association else " (no labels to test)")
                                         + ": the representation mixes them")
        out.append({"label": label, "effect": effect, "ci": [low, high], "verdict": verdict, "why": why,
                    "flagged": verdict in ("confounder", "entangled"), "probe_auroc": auroc,
                    "association": association,
                    "effect_image": float(image.mean()), "effect_latent": float(latent.mean())})
    return sorted(out, key=lambda c: c["effect"], reverse=True)


def _grid(records: list[dict], store: Storage, path: Path, finding: str) -> str:
    """Rows: original, counterfactual, |difference| amplified (grey), for the first GRID_IMAGES images."""
    def load(name):
        return torch.as_tensor(png16_to_model(decode_png16(store.read_bytes(name))))[None, None]

    picked = records[:GRID_IMAGES]
    orig = torch.cat([load(r["files"]["original"]) for r in picked])
    cf = torch.cat([load(r["files"]["counterfactual"]) for r in picked])
    diff = (cf - orig).abs()
    diff = diff / (diff.amax() + 1e-8) * 2 - 1
    return str(save_grid([orig, cf, diff], path, f"counterfactuals toward {finding}: original / counterfactual / |diff|"))


def negatives(data_uri: str, finding: str, cfg: Config, encodings: str | None = None) -> list[dict]:
    """Up to `audit.images` images of `audit.split` negative for `finding` ([{shard, key}], seeded): picked from
    the encodings' key, split and labels columns when they encode these shards (no shard is read), else from
    the shards."""
    samples = select_samples(data_uri, cfg.audit.split, encodings, label=finding, value=0.0,
                             limit=cfg.audit.images, seed=cfg.audit.seed)
    if len(samples) < 2:
        raise InputError(f"audit of {finding!r}: only {len(samples)} images negative for it in split "
                         f"{cfg.audit.split!r}; need at least 2")
    return samples


def counterfactuals_toward(checkpoint: str, probe: str, data_uri: str, plan: dict[str, list[dict]],
                           store: Storage, cfg: Config) -> None:
    """Every finding's counterfactuals in one explain fan-out (one actor pool, each image inverted once)."""
    merged: dict[tuple[str, str], dict] = {}
    for finding, samples in plan.items():
        print(f"[audit] {finding}: counterfactuals toward it from {len(samples)} negative images", flush=True)
        for s in samples:
            merged.setdefault((s["shard"], s["key"]), {**s, "findings": []})["findings"].append(finding)
    cfg = cfg.model_copy(update={"explain": cfg.explain.model_copy(update={"mode": cfg.audit.mode})})
    explain_shards(checkpoint, probe, data_uri, list(plan), store.uri, cfg, list(merged.values()), toward=1,
                   reference=True)


def summarise(finding: str, samples: list[dict], store: Storage, labels: list[str], aurocs: dict[str, float],
              associations: dict[str, dict], out: Path, cfg: Config) -> dict:
    """Ranked candidates with verdicts, target effect, regions and grid of one finding's counterfactuals."""
    records = [json.loads(store.read_bytes(f"{stem(s['key'], finding)}.json")) for s in samples]
    ranked = candidates(records, finding, labels, cfg, aurocs, associations)
    shares = {k: float(np.mean([r["regions_vs_reference"][k] for r in records])) for k in records[0]["regions_vs_reference"]}
    after, before = ("probs_latent", "probs_before") if cfg.audit.measure == "latent" else ("probs_after",
                                                                                           "probs_reference")
    target = np.array([r[after][finding] - r[before][finding] for r in records])
    return {"finding": finding, "images": len(records), "measure": cfg.audit.measure,
            "target_effect": float(target.mean()), "candidates": ranked,
            "flagged": [c["label"] for c in ranked if c["flagged"]],
            "confounders": [c["label"] for c in ranked if c["verdict"] == "confounder"],
            "entangled": [c["label"] for c in ranked if c["verdict"] == "entangled"],
            "unvalidated": [c["label"] for c in ranked if c["verdict"] == "unvalidated"],
            "regions": dict(sorted(shares.items(), key=lambda kv: -kv[1])),
            "grid": _grid(records, store, out / f"audit_{finding}.png", finding)}


def report_html(result: dict) -> str:
    sections = []
    for finding, r in result["findings"].items():
        rows = [{"label": c["label"], "effect": c["effect"], "ci low": c["ci"][0], "ci high": c["ci"][1],
                 "verdict": c["verdict"], "probe AUROC": c["probe_auroc"],
                 "odds ratio (fit split)": (c["association"] or {}).get("odds_ratio"),
                 "OR ci": "" if not c["association"] else f"{c['association']['ci'][0]:.2f}-{c['association']['ci'][1]:.2f}",
                 "image effect": c["effect_image"],
                 "latent effect": c["effect_latent"]} for c in r["candidates"]]
        top = ", ".join(f"{k} {v:.0%}" for k, v in list(r["regions"].items())[:3])
        if "statistics" in r:  # the verdicts are the statistics'; the per-image table is descriptive
            for row in rows:
                row["descriptive verdict"] = row.pop("verdict")
            verdicts = (f"Verdicts, from the statistics below: confounders (moved beyond the nulls and co-occurring "
                        f"in the labels): {html.esc(', '.join(r['confounders']) or 'none')}; entangled (moved without "
                        f"co-occurring): {html.esc(', '.join(r['entangled']) or 'none')}; underpowered (too few "
                        f"positives to test): {html.esc(', '.join(r['underpowered']) or 'none')}.")
        else:
            verdicts = (f"Confounders (co-occur in the labels): {html.esc(', '.join(r['confounders']) or 'none')}. "
                        f"Entangled (moved without co-occurring: the representation mixes them): "
                        f"{html.esc(', '.join(r['entangled']) or 'none')}. Unvalidated probes, never flagged: "
                        f"{html.esc(', '.join(r['unvalidated']) or 'none')}.")
        body = (f"<p>{r['images']} images negative for {html.esc(finding)}; measure: {r['measure']}; "
                f"change of the target's own probability: {r['target_effect']:+.3f}. {verdicts} "
                f"Where the image changes: {html.esc(top)}.</p>"
                + html.table(rows, list(rows[0]) if rows else ["label"]) + html.image(r["grid"], "original / counterfactual / |difference|"))
        if "statistics" in r:
            stat_rows = [{"label": x["label"], "verdict": x["verdict"], "effect": x.get("effect"), "ci": x.get("ci"),
                          "Holm p": x.get("p_holm"), "p bootstrap": x.get("p_bootstrap"), "p permuted": x.get("p_permuted"),
                          "p random direction": x.get("p_random_direction"), "positives": x["positives"], "why": x["why"]}
                         for x in r["statistics"]]
            body += ("<p>The verdicts: cross-fitted probes and covariance (fit and measured on disjoint patients), "
                     "a patient bootstrap of the whole procedure, permuted-label and random-direction nulls, Holm "
                     "over labels (the per-image table above is descriptive).</p>"
                     + html.table(stat_rows, list(stat_rows[0]) if stat_rows else ["label"]))
        sections.append((f"Counterfactuals toward {finding}", body))
    return html.page("cxrray confounder audit", sections,
                     "Candidate confounders: labels whose probe probability rises when an image is moved toward the "
                     "finding. Synthetic images: not acquired radiographs.")


def statistics(encodings: str, split: str, findings: list[str], associations: dict[str, dict[str, dict]],
               cfg: Config) -> dict[str, list[dict]]:
    """Per finding, `cxrray.eval.confounding` over the encodings of `split` (the probe's fit split): every label
    tested with cross-fitted probes, a patient bootstrap of the whole procedure, two nulls and Holm."""
    from cxrray.eval.confounding import confounding
    from cxrray.pipelines.encodings import read_encodings, stack

    frame, index = read_encodings(encodings, columns=["split", "patient", "labels", "z"])
    rows = frame[frame["split"] == split]
    if rows.empty:
        raise InputError(f"{encodings} has no {split!r} rows (the probe's fit split)")
    vocab = list(index.get("label_vocabulary") or [])
    z, labels = stack(rows, "z"), np.array([[np.nan if v is None else v for v in r] for r in rows["labels"]], np.float64)
    return {f: confounding(z, labels, rows["patient"].to_numpy(), vocab, f, cfg.audit.statistics, cfg.probe.C,
                           cfg.explain.target_probability, associations[f]) for f in findings}


def audit(checkpoint: str, probe: str, data_uri: str, findings: list[str], output_dir: Path, cfg: Config,
          encodings: str | None = None) -> dict:
    """Audit each finding; writes audit.json, audit.html and grids under `output_dir` and logs to MLflow. With
    `encodings` (the probe's input), the verdicts come from `statistics` (module doc of cxrray.eval.confounding);
    without, from the per-image effects' CIs as described above (descriptive: in-sample, no null)."""
    from cxrray.tracking import RunLogger, start_run, tracking_uri

    if not findings:
        raise InputError("give at least one --finding")
    model_identity(checkpoint, "counterfactual")
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    head = load_head(probe)
    for finding in findings:
        head.index(finding)  # unknown or unfitted: fail before any work
    labels = [f for f, ok in zip(head.findings, head.fitted) if ok]
    metrics = probe_metrics(probe)
    aurocs = probe_aurocs(probe)
    fit_split = metrics.get("fit_split") or head.info.get("fit_split") or "train"
    fit_labels, vocab = split_labels(data_uri, fit_split)
    associations = {f: odds_ratios(fit_labels, vocab, f) for f in findings}
    plan = {f: negatives(data_uri, f, cfg, encodings) for f in findings}
    store = Storage(str((out / "counterfactuals").resolve()))
    counterfactuals_toward(checkpoint, probe, data_uri, plan, store, cfg)
    result = {"checkpoint": checkpoint, "probe": str(probe), "data": data_uri,
              "audit": cfg.audit.model_dump(mode="json"), "explain": cfg.explain.model_dump(mode="json"),
              "association_split": fit_split, "association_images": len(fit_labels),
              "findings": {f: summarise(f, plan[f], store, labels, aurocs, associations[f], out, cfg) for f in findings}}
    if encodings:
        for finding, rows in statistics(encodings, fit_split, findings, associations, cfg).items():
            r = result["findings"][finding]
            r["statistics"] = rows
            r.update(flagged=[x["label"] for x in rows if x["moved"]],
                     confounders=[x["label"] for x in rows if x["verdict"] == "confounder"],
                     entangled=[x["label"] for x in rows if x["verdict"] == "entangled"],
                     underpowered=[x["label"] for x in rows if x["verdict"] == "underpowered"])
    (out / "audit.json").write_text(json.dumps(result, indent=1))
    (out / "audit.html").write_text(report_html(result))
    run_id = start_run(cfg.tracking, {"audit": cfg.audit.model_dump(mode="json"), "checkpoint": checkpoint,
                                      "findings": ",".join(findings)}, run_name="audit")
    logger = RunLogger(tracking_uri(cfg.tracking), run_id)
    for f, r in result["findings"].items():
        if r["candidates"]:
            logger.metrics({f"audit_top_effect/{f}": r["candidates"][0]["effect"]}, step=0)
        logger.artifact(r["grid"], "audit")
    for name in ("audit.json", "audit.html"):
        logger.artifact(out / name, "audit")
    logger.finish()
    result["mlflow_run_id"] = run_id
    for f, r in result["findings"].items():
        top = r["candidates"][0] if r["candidates"] else None
        last = (f"underpowered: {', '.join(r['underpowered']) or 'none'} (verdicts from the statistics)" if "statistics" in r
                else f"unvalidated: {', '.join(r['unvalidated']) or 'none'}")
        print(f"[audit] {f}: top candidate {top['label'] if top else '-'} effect {top['effect'] if top else 0:+.3f}; "
              f"confounders: {', '.join(r['confounders']) or 'none'}; entangled: {', '.join(r['entangled']) or 'none'}; "
              f"{last}", flush=True)
    return result
