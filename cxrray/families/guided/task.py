"""The noise-aware classifier's objective (multi-label BCE on x_t at uniformly random t, unknown labels
masked), its periodic evaluation (BCE at fixed t and noise), preparation from the shards, and export."""
from __future__ import annotations

from pathlib import Path

import torch

from cxrray.families.base import Evaluation
from cxrray.families.daug.superclasses import super_labels
from cxrray.families.guided.config import GuidedConfig
from cxrray.families.guided.network import NoisyClassifier, noised
from cxrray.families.parts import masked_bce


def targets(model: NoisyClassifier, labels: torch.Tensor) -> torch.Tensor:
    """Labels [B, F] (NaN unknown) -> super-class targets [B, K] in {0, 1, NaN}."""
    y, _ = super_labels(labels.detach().cpu().numpy(), list(model.cfg.label_vocabulary))
    return torch.as_tensor(y, device=labels.device)


def loss(model: NoisyClassifier, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    x0 = batch["image"].float()
    t = torch.randint(0, model.cfg.train_t_max + 1, (len(x0),), generator=generator)
    x_t = noised(x0.cpu(), t, generator if generator is not None else torch.Generator().manual_seed(
        int(torch.randint(0, 2**31, (1,)))))
    return masked_bce(model(x_t.to(x0.device), t.to(x0.device)), targets(model, batch["labels"]))


@torch.no_grad()
def evaluate(model: NoisyClassifier, batch: dict, seed: int, steps: int) -> Evaluation:
    """The BCE at each of `eval_timesteps`, with noise fixed by `seed` (no images: it generates none)."""
    x0, y = batch["image"].float(), targets(model, batch["labels"])
    out = {}
    for t in model.cfg.eval_timesteps:
        ts = torch.full((len(x0),), int(t), dtype=torch.long)
        x_t = noised(x0.cpu(), ts, torch.Generator().manual_seed(seed * 10_007 + int(t)))
        out[f"bce_t{t}"] = float(masked_bce(model.eval()(x_t.to(x0.device), ts.to(x0.device)), y))
    return Evaluation(out)


def prepare(cfg: GuidedConfig, data_uri: str) -> GuidedConfig:
    """The label vocabulary from the manifest (the super-classes follow)."""
    from cxrray.data.shards import read_manifest
    from cxrray.errors import InputError

    vocabulary = read_manifest(data_uri)["label_vocabulary"]
    prepared = GuidedConfig.model_validate({**cfg.model_dump(), "label_vocabulary": tuple(vocabulary)})
    if not prepared.super_classes:
        raise InputError(f"{data_uri}: labels {vocabulary} fall in none of DAug's super-classes")
    return prepared


def export(model: NoisyClassifier, folder: Path) -> list[str]:
    """The weights as safetensors with the super-class names beside them."""
    import json

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(folder / "noisy_classifier.safetensors"))
    (folder / "noisy_classifier.json").write_text(json.dumps({"super_classes": model.cfg.super_classes,
                                                              "config": model.cfg.model_dump(mode="json")}, indent=1))
    return ["a t-conditioned conv classifier: no diffusers or transformers class holds it (noisy_classifier."
            "safetensors, with noisy_classifier.json: the folder `cxrray augment --classifier` reads)"]
