"""DAug's noise-aware classifier f(y | x_t, t): a t-conditioned conv encoder trained on x_t at uniformly random
t with multi-label BCE over the super-classes (unknown labels masked), on the pixel DDPM's noise schedule (the
default linear 1,000-step one). Its average precision per super-class at several t is the paper's Table 1
analogue: how much of each class survives the noise that guidance will start from (DAug starts near t = 500).

Images float32 [B, 1, S, S] in [-1, 1]; t long [B] in 0..T-1; logits [B, K].
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from cxrray.families.daug.superclasses import PAPER_AP, super_labels
from cxrray.families.guided.network import NoisyClassifier, noised
from cxrray.errors import InputError
from cxrray.pipelines.judges import masked_bce, train_epochs
from cxrray.pipelines.settings import NoisyClassifierConfig


def _at(images: torch.Tensor, t: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t of every image at one t, with noise fixed by `seed` and t, and the t column)."""
    ts = torch.full((len(images),), int(t), dtype=torch.long)
    return noised(images, ts, torch.Generator().manual_seed(seed * 10_007 + int(t))), ts


@torch.no_grad()
def logits_at(net: NoisyClassifier, images: torch.Tensor, t: int, seed: int, batch: int = 256) -> torch.Tensor:
    x_t, ts = _at(images, t, seed)
    net.eval()
    return torch.cat([net(x_t[i:i + batch], ts[i:i + batch]) for i in range(0, len(images), batch)])


def train_noisy_classifier(train_images: np.ndarray, train_y: np.ndarray, val_images: np.ndarray, val_y: np.ndarray,
                           cfg: NoisyClassifierConfig, progress=print) -> tuple[NoisyClassifier, dict]:
    """Adam with early stopping on the validation BCE averaged over `cfg.timesteps` (fixed noise)."""
    torch.manual_seed(cfg.seed)
    net = NoisyClassifier(train_y.shape[1], cfg.width)
    generator = torch.Generator().manual_seed(cfg.seed)
    val_x, val_t = torch.from_numpy(val_images), torch.from_numpy(val_y)

    def loss(model, batch: dict) -> torch.Tensor:
        t = torch.randint(0, cfg.train_t_max + 1, (len(batch["image"]),), generator=generator)
        return masked_bce(model(noised(batch["image"], t, generator), t), batch["labels"])

    def validate(model) -> float:
        return float(np.mean([float(masked_bce(logits_at(model, val_x, t, cfg.seed), val_t)) for t in cfg.timesteps]))

    start = time.perf_counter()

    def report(m: dict) -> None:
        progress(f"[noisy classifier] epoch {m['epoch']}/{cfg.epochs}: val BCE over t {m['val_nll']:.4f} "
                 f"(best {m['best_val_nll']:.4f} at {m['best_epoch']}), {time.perf_counter() - start:.0f} s")

    data = {"image": torch.from_numpy(train_images), "labels": torch.from_numpy(train_y)}
    state, best, epoch, history = train_epochs(net, net, data, loss, validate, cfg, cfg.seed, report=report)
    net.load_state_dict(state)
    return net.eval(), {"best_epoch": epoch, "val_bce": best, "history": history}


def average_precision_by_t(net: NoisyClassifier, images: np.ndarray, y: np.ndarray, names: list[str],
                           timesteps: list[int], seed: int) -> list[dict]:
    """One row per super-class: positives, then AP at each t (NaN where the class lacks positives or negatives)."""
    from sklearn.metrics import average_precision_score

    x = torch.from_numpy(images)
    probs = {t: torch.sigmoid(logits_at(net, x, t, seed)).numpy() for t in timesteps}
    rows = []
    for k, name in enumerate(names):
        known = ~np.isnan(y[:, k])
        row = {"super_class": name, "positives": int(np.nansum(y[:, k])), "paper_ap": PAPER_AP.get(name)}
        both = len(set(y[known, k].tolist())) == 2
        for t in timesteps:
            row[f"ap_t{t}"] = float(average_precision_score(y[known, k], probs[t][known, k])) if both else None
        row["prevalence"] = float(np.nanmean(y[:, k])) if known.any() else None  # AP of a constant score
        rows.append(row)
    return rows


def load_noisy_classifier(source: str) -> tuple[NoisyClassifier, list[str]]:
    """(classifier in eval mode, its super-class names) from a `cxrray evaluate noisy-classifier` output folder
    (or a `guided` export, the same files), or from a checkpoint of the `guided` family (its EMA weights)."""
    from safetensors.torch import load

    from cxrray.data.storage import Storage
    from cxrray.errors import InputError

    store = Storage(str(source))
    if not store.exists("noisy_classifier.json"):
        from cxrray.models.loading import load_ema, model_identity

        try:
            identity = model_identity(str(source))
        except (InputError, FileNotFoundError, OSError, ValueError):
            identity = None
        if identity is None or identity["family"] != "guided":
            raise InputError(f"{store.uri}: neither a `cxrray evaluate noisy-classifier` folder (noisy_classifier.json)"
                             " nor a checkpoint of the guided family")
        net = load_ema(identity["checkpoint"]).eval()
        return net, net.cfg.super_classes
    record = json.loads(store.read_bytes("noisy_classifier.json"))
    c = record["config"]
    net = NoisyClassifier(len(record["super_classes"]), c["width"], c.get("blocks", 3), c.get("t_dim", 64))
    net.load_state_dict(load(store.read_bytes("noisy_classifier.safetensors")))
    return net.eval(), list(record["super_classes"])


def classifier_fingerprint(source: str) -> dict:
    """What names a noise-aware classifier's weights for provenance and rerun checks: its URI and a sha256."""
    import hashlib

    from cxrray.data.storage import Storage

    store = Storage(str(source))
    if store.exists("noisy_classifier.safetensors"):
        return {"uri": store.uri, "sha256": hashlib.sha256(store.read_bytes("noisy_classifier.safetensors")).hexdigest()}
    from cxrray.models.loading import model_identity

    checkpoint = Storage(model_identity(str(source))["checkpoint"])
    return {"uri": checkpoint.uri, "sha256": hashlib.sha256(checkpoint.read_bytes("ema.safetensors")).hexdigest()}


def run_noisy_classifier(data_uri: str, output_dir: str | Path, cfg, progress=print, checkpoint: str | None = None) -> dict:
    """`cxrray evaluate noisy-classifier`: train on the train split (early-stopped on val) — or take `checkpoint`,
    a `guided` family model trained on Ray Train (`cxrray pretrain --set model.family=guided`) — then AP per
    super-class at each of `noisy_classifier.timesteps` on the test split; writes noisy_classifier.json, table.md
    and the weights (safetensors) under `output_dir`: the folder `augment`, `attribute` and Serve read."""
    from cxrray.pipelines.truth import load_truth

    nc = cfg.noisy_classifier
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    wanted = ("test",) if checkpoint else ("train", "val", "test")
    splits = {s: load_truth(data_uri, s, nc.train_images if s == "train" else None, need_masks=False) for s in wanted}
    labels = {s: super_labels(v.labels, v.findings) for s, v in splits.items()}
    names = labels["test"][1]
    progress(f"[noisy classifier] super-classes {names}; images " +
             ", ".join(f"{s} {len(v.keys)}" for s, v in splits.items()))
    if checkpoint:
        net, trained = load_noisy_classifier(checkpoint)
        if trained != names:
            raise InputError(f"{checkpoint} classifies {trained}; the labels of {data_uri} give {names}")
        record = {"checkpoint": classifier_fingerprint(checkpoint)}
        architecture = net.cfg.model_dump(mode="json")
    else:
        net, record = train_noisy_classifier(splits["train"].images, labels["train"][0], splits["val"].images,
                                             labels["val"][0], nc, progress)
        architecture = {"width": nc.width}
    rows = average_precision_by_t(net, splits["test"].images, labels["test"][0], names, nc.timesteps, nc.seed)
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(out / "noisy_classifier.safetensors"))
    result = {"data": data_uri, "super_classes": names, "config": {**nc.model_dump(mode="json"), **architecture},
              "training": record, "test_images": len(splits["test"].keys), "average_precision": rows}
    (out / "noisy_classifier.json").write_text(json.dumps(result, indent=1))
    columns = ["super_class", "positives", "prevalence", *(f"ap_t{t}" for t in nc.timesteps), "paper_ap"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join("" if r[c] is None else (f"{r[c]:.3f}" if isinstance(r[c], float) else str(r[c]))
                                for c in columns) + " |" for r in rows]
    (out / "table.md").write_text("\n".join(lines) + "\n")
    return result
