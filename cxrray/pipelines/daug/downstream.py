"""`cxrray evaluate daug`: DAug's downstream experiment — does a heatmap channel help one model retrieve and
classify? — on the heatmap-augmented shards `cxrray augment` writes.

Arms (one `daug` model each, `families.daug`): `image` [x, x, x]; `heatmaps` [x, h_1, h_2] (DAug); `shuffled`
[x, another image's heatmaps] (the control: if it matches `heatmaps`, the channels carry no information about
the image); `no_text` (heatmaps, the image–report term off: the ablation). Each arm is trained on Ray Train by
`pretrain` (the `train` section's strategy and workers; `downstream.images` images shown, the same for every
arm and fraction) on the full training split and on each smaller fraction of its patients, then scored on
`downstream.split`: per super-class AUROC and AP of the class head, retrieval mAP@10 and Recall@1/5/10
(`eval.retrieval`), and paired, patient-clustered bootstraps of `heatmaps` against each other arm.

Outputs under `output`: runs/<arm>-f<fraction>/ (checkpoints), data-f<fraction>/ (the subset shards),
downstream.json, table.md, report.html; metrics and the page are logged to MLflow. A rerun trains nothing
that finished (pretrain resumes or answers "nothing to do") and rewrites no subset shard.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from cxrray.config import Config
from cxrray.data.shards import (
    MANIFEST, derived_manifest, dumps, load_part, read_manifest, read_tar, reusable_part, write_if_changed, write_shard,
)
from cxrray.data.storage import Storage
from cxrray.errors import InputError

ARMS = {"image": {"channels": "image"}, "heatmaps": {"channels": "heatmaps"}, "shuffled": {"channels": "shuffled"},
        "no_text": {"channels": "heatmaps", "text_weight": 0.0, "tokenizer": None, "vocab_size": None}}  # no encoder
REFERENCE = "heatmaps"
KS = (1, 5, 10)


def _kept(patient: str, fraction: float, seed: int) -> bool:
    draw = int.from_bytes(hashlib.blake2b(f"{seed}\0{patient}".encode(), digest_size=8).digest(), "big")
    return draw < fraction * 2 ** 64


def train_subset(data_uri: str, output_uri: str, fraction: float, seed: int) -> str:
    """A copy of the shards with `fraction` of the train split's patients (a seeded blake2b draw per patient:
    all of a patient's images or none) and every other split whole; 1.0 is `data_uri` itself."""
    if fraction >= 1.0:
        return data_uri
    source, out = Storage(data_uri), Storage(output_uri)
    manifest = read_manifest(source)
    fingerprint = hashlib.sha256(dumps({"data": [s["sha256"] for s in manifest["shards"]], "fraction": fraction,
                                        "seed": seed})).hexdigest()[:12]
    for shard in manifest["shards"]:
        if reusable_part(out, shard["name"], fingerprint):
            continue
        samples = [s for s in read_tar(source.read_bytes(shard["name"]), shard["name"], extras=True)
                   if s[2]["split"] != "train" or _kept(s[2]["patient"], fraction, seed)]
        write_shard(out, shard["name"], fingerprint, samples, [], manifest["label_vocabulary"])
    subset = derived_manifest(manifest, [load_part(out, s["name"]) for s in manifest["shards"]], subset={
        "source": source.uri, "train_fraction": fraction, "seed": seed, "fingerprint": fingerprint})
    write_if_changed(out, MANIFEST, dumps(subset))
    return out.uri


def arm_config(cfg: Config, arm: str, model_cfg):
    """The run config of one arm: the `daug` model with the arm's channels / text weight, the downstream
    schedule in the `train` section."""
    dc = cfg.downstream
    train = type(cfg.train).model_validate({**cfg.train.model_dump(), **{
        "images": dc.images, "global_batch": dc.global_batch, "lr": dc.lr, "ema_decay": dc.ema_decay,
        "checkpoint_every": dc.images, "eval_every": dc.images, "log_every": max(dc.images // 5, 1),
        "split": "train", "eval_split": "val"}})
    model = type(model_cfg).model_validate({**model_cfg.model_dump(), **ARMS[arm]})
    return cfg.model_copy(update={"model": model, "train": train})


def base_model(cfg: Config, data_uri: str, output: Storage):
    """The `daug` preset at the shards' size with `downstream.model`'s overrides, prepared once (label
    vocabulary, the report tokenizer): every arm gets the same tokenizer, kept in the output for reruns."""
    from cxrray.families import get_family

    family = get_family("daug")
    size = read_manifest(data_uri)["preprocessing"]["size"]
    model = family.preset(cfg.preset if cfg.preset in family.presets else "tiny",
                          **{"image_size": size, **cfg.downstream.model})
    if output.exists("tokenizer.json"):
        saved = json.loads(output.read_bytes("tokenizer.json"))
        model = type(model).model_validate({**model.model_dump(), **saved})
    prepared = family.prepare(model, data_uri)
    output.write_bytes("tokenizer.json", dumps({"tokenizer": prepared.tokenizer, "vocab_size": prepared.vocab_size}))
    return prepared


def score(checkpoint: str, truth, seed: int, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(unit embeddings [N, D], P(super-class) [N, K]) of the EMA model on `truth`'s images and heatmaps; the
    shuffled arm's derangement is drawn once over the whole set from `seed`."""
    import torch

    from cxrray.families.daug.task import stack
    from cxrray.models.loading import load_ema

    model = load_ema(checkpoint).eval()
    columns = {"image": torch.from_numpy(truth.images),
               **{name[:-len(".png")]: torch.from_numpy(v.astype(np.float32)) for name, v in truth.extra.items()}}
    with torch.no_grad():
        x = stack(model, columns, torch.Generator().manual_seed(seed))
        embeddings = torch.cat([model.embed(x[i:i + batch]) for i in range(0, len(x), batch)])
        probs = torch.sigmoid(model.class_logits(embeddings))
    return embeddings.numpy(), probs.numpy()


def arm_metrics(embeddings: np.ndarray, probs: np.ndarray, y: np.ndarray, names: list[str], patients: list[str]) -> dict:
    """Per-class AUROC / AP, their macro means over classes with both outcomes, and per-query retrieval (a
    query's own patient's other images left out of its gallery)."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from cxrray.eval.retrieval import per_query

    classes = {}
    for k, name in enumerate(names):
        known = ~np.isnan(y[:, k])
        if len(set(y[known, k].tolist())) == 2:
            classes[name] = {"auroc": float(roc_auc_score(y[known, k], probs[known, k])),
                             "ap": float(average_precision_score(y[known, k], probs[known, k])),
                             "positives": int(np.nansum(y[:, k])), "prevalence": float(np.nanmean(y[:, k]))}
    queries = per_query(embeddings, np.nan_to_num(y) == 1, KS, 10, groups=patients)
    return {"classes": classes, "macro_auroc": float(np.mean([c["auroc"] for c in classes.values()])),
            "macro_ap": float(np.mean([c["ap"] for c in classes.values()])),
            "retrieval": {name: float(np.nanmean(v)) for name, v in queries.items()}, "queries": queries}


def compare(results: dict, probs: dict, y: np.ndarray, names: list[str], patients: list[str], n_boot: int,
            seed: int) -> list[dict]:
    """`heatmaps` against each other arm: per class AUROC (paired, patient-clustered bootstrap) and
    per-query mAP@10 / Recall@1 (paired clustered means)."""
    from cxrray.eval.localisation import paired_clustered
    from cxrray.eval.stats import paired_bootstrap

    rows = []
    for arm in results:
        if arm == REFERENCE:
            continue
        for k, name in enumerate(names):
            if name not in results[REFERENCE]["classes"]:
                continue
            test = paired_bootstrap(y[:, k], probs[REFERENCE][:, k], probs[arm][:, k], n_boot=n_boot, seed=seed,
                                    groups=patients)
            rows.append({"against": arm, "metric": f"AUROC {name}", "diff": test["diff"], "ci_low": test["ci_low"],
                         "ci_high": test["ci_high"], "p_value": test["p_value"]})
        for metric in ("ap@10", "hit@1"):
            test = paired_clustered(results[REFERENCE]["queries"][metric], results[arm]["queries"][metric], patients,
                                    n_boot, seed)
            rows.append({"against": arm, "metric": "mAP@10" if metric == "ap@10" else "Recall@1", "diff": test["diff"],
                         "ci_low": test["ci"][0], "ci_high": test["ci"][1], "p_value": test["p_value"]})
    return rows


def run_downstream(data_uri: str, output_dir: str | Path, cfg: Config, progress=print) -> dict:
    """Train every (arm, fraction), score and compare them (module doc); returns downstream.json's content."""
    from cxrray.families.daug.superclasses import super_labels
    from cxrray.families.daug.task import heatmap_member
    from cxrray.pipelines.truth import load_truth
    from cxrray.train.pretrain import pretrain

    dc = cfg.downstream
    if REFERENCE not in dc.arms:
        raise InputError(f"downstream.arms {dc.arms} must include {REFERENCE!r}: every arm is compared with it")
    out = Storage(str(output_dir))
    model = base_model(cfg, data_uri, out)
    members = tuple(f"{heatmap_member(c)}.png" for c in model.heatmaps)
    truth = load_truth(data_uri, dc.split, need_masks=False, also=members)
    y, names = super_labels(truth.labels, truth.findings)
    progress(f"[downstream] super-classes {names}; {len(truth.keys)} {dc.split} images of {len(set(truth.patients))} "
             f"patients; arms {dc.arms} x fractions {dc.fractions}, {dc.images:,} images shown each")
    result = {"data": Storage(data_uri).uri, "config": dc.model_dump(mode="json"), "super_classes": names,
              "test_images": len(truth.keys), "fractions": {}}
    for fraction in dc.fractions:
        tag = f"f{fraction:g}"
        data = train_subset(data_uri, f"{out.uri}/data-{tag}", fraction, dc.seed)
        train_images = read_manifest(data)["splits"].get("train", {}).get("images", 0)
        if train_images < dc.global_batch:
            raise InputError(f"downstream.fractions {fraction:g}: {train_images} training images under {data}, fewer "
                             f"than one batch ({dc.global_batch})")
        results, probs = {}, {}
        for arm in dc.arms:
            progress(f"[downstream] {tag} ({train_images} training images): arm {arm}")
            status = pretrain(arm_config(cfg, arm, model), data, f"{out.uri}/runs/{arm}-{tag}", progress=progress)
            embeddings, probs[arm] = score(status["latest_checkpoint"], truth, dc.seed)
            results[arm] = arm_metrics(embeddings, probs[arm], y, names, truth.patients)
            progress(f"[downstream] {tag} {arm}: macro AUROC {results[arm]['macro_auroc']:.3f}, mAP@10 "
                     f"{results[arm]['retrieval']['ap@10']:.3f}, Recall@1 {results[arm]['retrieval']['hit@1']:.3f}")
        result["fractions"][tag] = {
            "train_images": train_images,
            "arms": {a: {k: v for k, v in r.items() if k != "queries"} for a, r in results.items()},
            "comparisons": compare(results, probs, y, names, truth.patients, dc.n_boot, dc.seed)}
    _write(out, result, cfg)
    return result


def table_rows(result: dict) -> list[dict]:
    rows = []
    for tag, per in result["fractions"].items():
        for arm, r in per["arms"].items():
            rows.append({"fraction": tag, "arm": arm, "train images": per["train_images"], "macro AUROC": r["macro_auroc"],
                         "macro AP": r["macro_ap"], "mAP@10": r["retrieval"]["ap@10"],
                         **{f"Recall@{k}": r["retrieval"][f"hit@{k}"] for k in KS},
                         **{f"AUROC {c}": v["auroc"] for c, v in r["classes"].items()}})
    return rows


def _write(out: Storage, result: dict, cfg: Config) -> None:
    import tempfile

    from cxrray.eval import html
    from cxrray.tracking import RunLogger, start_run, tracking_uri

    rows = table_rows(result)
    columns = list(dict.fromkeys(c for r in rows for c in r))
    comparisons = [{"fraction": tag, **c} for tag, per in result["fractions"].items() for c in per["comparisons"]]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in columns) + " |"
              for r in rows]
    page = html.page("DAug downstream: heatmap channels for retrieval and classification", [
        ("Arms (test split): class head AUROC / AP per super-class, retrieval mAP@10 and Recall@k", html.table(rows, columns)),
        (f"{REFERENCE} against each arm: paired, patient-clustered bootstrap (diff = {REFERENCE} - arm)",
         html.table(comparisons, ["fraction", "against", "metric", "diff", "ci_low", "ci_high", "p_value"], 4))],
        "Ours: phantoms, heatmaps from a tiny pixel DDPM guided by the noise-aware classifier, CPU. The paper (Jin et "
        "al.) reports its downstream gains on MIMIC-CXR with pretrained backbones; they are not comparable in scale.")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        (folder / "downstream.json").write_text(json.dumps(result, indent=1))
        (folder / "table.md").write_text("\n".join(lines) + "\n")
        (folder / "report.html").write_text(page)
        run_id = start_run(cfg.tracking, {"downstream": result["config"], "data": result["data"]},
                           run_name="evaluate-daug")
        logger = RunLogger(tracking_uri(cfg.tracking), run_id)
        logger.metrics({f"{r['fraction']}/{r['arm']}/{m.replace('@', '_at_').replace(' ', '_')}": r[m] for r in rows
                        for m in ("macro AUROC", "mAP@10", "Recall@1")}, step=0)
        for path in sorted(folder.iterdir()):
            out.write_bytes(path.name, path.read_bytes())
            logger.artifact(path, "daug")
        logger.finish()
