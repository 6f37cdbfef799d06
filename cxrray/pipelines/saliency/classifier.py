"""The classifier saliency maps explain: `judges.FindingJudge` (a small CNN, one logit per finding) trained on
a split's images with its labels (unknown labels masked out of the loss), early-stopped on another split,
stored as safetensors + JSON (never pickled)."""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cxrray.errors import InputError
from cxrray.pipelines.judges import FindingJudge, apply_batched, masked_bce, train_epochs
from cxrray.pipelines.settings import SaliencyConfig
from cxrray.pipelines.truth import TruthSet

WEIGHTS, META = "classifier.safetensors", "classifier.json"


def train_classifier(train: TruthSet, val: TruthSet, cfg: SaliencyConfig, progress=print) -> tuple[FindingJudge, dict]:
    """-> (the classifier at its best validation BCE, its record: findings, epochs, val BCE, per-finding
    validation AUROC where both classes occur)."""
    from sklearn.metrics import roc_auc_score

    torch.manual_seed(cfg.seed)
    net = FindingJudge(len(train.findings), cfg.width)
    val_images, val_labels = torch.from_numpy(val.images), torch.from_numpy(val.labels)
    start = time.perf_counter()

    def validate(model) -> float:
        model.eval()
        return float(masked_bce(apply_batched(model, val_images), val_labels))

    def report(m: dict) -> None:
        progress(f"[saliency] classifier epoch {m['epoch']}/{cfg.epochs}: val BCE {m['val_nll']:.4f} "
                 f"(best {m['best_val_nll']:.4f} at {m['best_epoch']}), {time.perf_counter() - start:.0f} s")

    data = {"image": torch.from_numpy(train.images), "labels": torch.from_numpy(train.labels)}
    state, best, epoch, _ = train_epochs(net, net, data, lambda m, b: masked_bce(m(b["image"]), b["labels"]),
                                         validate, cfg, cfg.seed, report=report)
    net.load_state_dict(state)
    net.eval()
    probs = torch.sigmoid(apply_batched(net, val_images)).numpy()
    auroc = {}
    for j, name in enumerate(train.findings):
        y = val.labels[:, j]
        known = ~np.isnan(y)
        if len(set(y[known])) == 2:
            auroc[name] = float(roc_auc_score(y[known], probs[known, j]))
    return net, {"findings": train.findings, "best_epoch": epoch, "val_bce": best, "val_auroc": auroc,
                 "train_images": len(train.keys), "width": cfg.width, "image_size": int(train.images.shape[-1])}


def save_classifier(net: FindingJudge, record: dict, folder: str | Path) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(folder / WEIGHTS))
    (folder / META).write_text(json.dumps({"format": "cxrray-saliency-classifier/1", **record}, indent=1))
    return folder


def load_classifier(folder: str | Path) -> tuple[FindingJudge, dict]:
    folder = Path(folder)
    if not (folder / META).is_file():
        raise InputError(f"{folder}: no {META} (not a saliency classifier folder)")
    record = json.loads((folder / META).read_text())
    net = FindingJudge(len(record["findings"]), record["width"])
    net.load_state_dict(load_file(str(folder / WEIGHTS)))
    return net.eval(), record
