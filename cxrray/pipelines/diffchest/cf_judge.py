"""The counterfactuals' independent judge: a classifier that never saw the confounder beside the finding.

A counterfactual scored by the encoder and probe that built it proves nothing: the probe was fitted where
a chest tube co-occurs with effusion, so drawing a tube satisfies it. This judge is trained on phantoms of
other patients (the set's phantom settings under another seed) drawn with no planted confounder (every
device at its base prevalence, independent of the findings), read through ingest's own decoder and
geometry so it sees the model's pixels. It gives one probability per drawn label (`LABELS`), so a
counterfactual toward effusion is judged both on effusion and on the chest tube it should not draw.

The true paired renders give what an ideal counterfactual would reach: each test patient re-rendered with
the finding drawn in (`with_label`: the largest version), everything else bit-identical.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from cxrray.data.phantom import DEVICES, FINDINGS, PhantomConfig
from cxrray.data.settings import IngestConfig
from cxrray.pipelines.settings import CounterfactualJudgeConfig

LABELS = FINDINGS + DEVICES  # what the judge reads: every label drawn in the image
WEIGHTS, META = "judge.safetensors", "judge.json"


def model_image(case, phantom_cfg: PhantomConfig, ingest_cfg: IngestConfig) -> np.ndarray:
    """float32 [S, S] in [-1, 1]: the case rendered, written as its DICOM and read back exactly as ingest
    and the stream give it to the model (`prepare_image`)."""
    from cxrray.data.ingest import prepare_image
    from cxrray.data.phantom import dicom_bytes, render

    return prepare_image(dicom_bytes(case, render(case, phantom_cfg)), ingest_cfg)


def judge_phantoms(phantom_cfg: PhantomConfig, cfg: CounterfactualJudgeConfig) -> PhantomConfig:
    """The judge's own phantom settings: the set's, under another seed, with no planted confounder."""
    return phantom_cfg.model_copy(update={"confounder": None, "seed": phantom_cfg.seed + cfg.seed_offset})


def _render_set(start: int, n: int, phantom_cfg: PhantomConfig, ingest_cfg: IngestConfig) -> tuple[torch.Tensor, torch.Tensor]:
    from cxrray.data.phantom import sample_case

    cases = [sample_case(i, phantom_cfg) for i in range(start, start + n)]
    images = torch.from_numpy(np.stack([model_image(c, phantom_cfg, ingest_cfg) for c in cases]))[:, None]
    labels = torch.tensor([[c.labels[k] for k in LABELS] for c in cases], dtype=torch.float32)
    return images, labels


@dataclass
class CounterfactualJudge:
    """A `FindingJudge` over `LABELS` (images [B, 1, S, S] in [-1, 1] -> probabilities [B, len(LABELS)])."""

    net: torch.nn.Module
    record: dict

    def probabilities(self, images: torch.Tensor) -> np.ndarray:
        from cxrray.pipelines.judges import apply_batched

        self.net.eval()
        with torch.no_grad():
            return torch.sigmoid(apply_batched(self.net, images.float().cpu())).numpy()

    def save(self, out: str | Path) -> Path:
        from safetensors.torch import save_file

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, str(out / WEIGHTS))
        (out / META).write_text(json.dumps({"format": "cxrray-cf-judge/1", "labels": list(LABELS), **self.record},
                                           indent=1))
        return out


def load_judge(path: str | Path) -> CounterfactualJudge:
    from safetensors.torch import load_file

    from cxrray.pipelines.judges import FindingJudge

    meta = json.loads((Path(path) / META).read_text())
    if meta.get("labels") != list(LABELS):
        raise ValueError(f"{path}: a judge of {meta.get('labels')}, expected {list(LABELS)}")
    net = FindingJudge(len(LABELS), meta["config"]["width"])
    net.load_state_dict(load_file(str(Path(path) / WEIGHTS)))
    return CounterfactualJudge(net.eval(), {k: v for k, v in meta.items() if k not in ("format", "labels")})


def train_counterfactual_judge(phantom_cfg: PhantomConfig, ingest_cfg: IngestConfig, cfg: CounterfactualJudgeConfig,
                               progress=print) -> CounterfactualJudge:
    """Render the judge's phantoms (`judge_phantoms`), train to the best held-out BCE, and record its held-out
    AUROC per label (NaN where the held-out images lack a class)."""
    from sklearn.metrics import roc_auc_score

    from cxrray.pipelines.judges import train_epochs
    from cxrray.pipelines.judges import FindingJudge

    own = judge_phantoms(phantom_cfg, cfg)
    start = time.perf_counter()
    train_x, train_y = _render_set(0, cfg.images, own, ingest_cfg)
    val_x, val_y = _render_set(cfg.images, cfg.val_images, own, ingest_cfg)
    progress(f"[cf judge] rendered {cfg.images} + {cfg.val_images} unconfounded phantoms (seed {own.seed}) in "
             f"{time.perf_counter() - start:.0f} s")
    torch.manual_seed(cfg.seed)
    net = FindingJudge(len(LABELS), cfg.width)
    bce = torch.nn.functional.binary_cross_entropy_with_logits

    def validate(model) -> float:
        judge = CounterfactualJudge(model, {})
        p = torch.from_numpy(judge.probabilities(val_x)).clamp(1e-6, 1 - 1e-6)
        return float(torch.nn.functional.binary_cross_entropy(p, val_y))

    def report(m: dict) -> None:
        progress(f"[cf judge] epoch {m['epoch']}/{cfg.epochs}: val BCE {m['val_nll']:.4f} (best {m['best_val_nll']:.4f} "
                 f"at {m['best_epoch']}), {time.perf_counter() - start:.0f} s")

    state, best, epoch, _ = train_epochs(net, net, {"image": train_x, "labels": train_y},
                                         lambda m, b: bce(m(b["image"]), b["labels"]), validate, cfg, cfg.seed,
                                         report=report)
    net.load_state_dict(state)
    judge = CounterfactualJudge(net.eval(), {})
    p, y = judge.probabilities(val_x), val_y.numpy()
    auroc = {label: float(roc_auc_score(y[:, j], p[:, j])) if 0 < y[:, j].sum() < len(y) else float("nan")
             for j, label in enumerate(LABELS)}
    judge.record = {"config": cfg.model_dump(mode="json"), "phantom_seed": own.seed, "best_epoch": epoch,
                    "best_val_bce": best, "val_auroc": auroc,
                    "val_positives": {label: int(y[:, j].sum()) for j, label in enumerate(LABELS)}}
    progress("[cf judge] held-out AUROC " + ", ".join(f"{k} {v:.3f}" for k, v in auroc.items()))
    return judge


def paired_renders(cases, label: str, phantom_cfg: PhantomConfig, ingest_cfg: IngestConfig) -> torch.Tensor:
    """[N, 1, S, S]: each case with `label` drawn in (its largest version, everything else bit-identical), as
    the model would read it: the ideal counterfactual toward `label`."""
    from cxrray.data.phantom import with_label

    return torch.from_numpy(np.stack([model_image(with_label(c, label), phantom_cfg, ingest_cfg)
                                      for c in cases]))[:, None]
