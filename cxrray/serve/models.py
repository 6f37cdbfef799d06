"""The model side of the service: `ModelService` (plain Python: EMA DiffAE + linear probe) and the two
Serve deployments around it, `Classifier` (dynamic batching with `@serve.batch`) and `Explainer`
(counterfactuals and seeded generation, one at a time per replica).

Model URIs: a checkpoint (`file://`, a path, `s3://`; a checkpoint directory or a pretraining output)
or an MLflow model (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `runs:/RUN_ID/model`), whose
`ema.safetensors` + `state.json` artifacts are downloaded and loaded the same way (no pickle).
Inputs arrive already validated and preprocessed by the ingress (float32 [S, S] in [-1, 1]).
"""
from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import torch
from ray import serve

from cxrray.config import ExplainConfig
from cxrray.families.diffae.network import DiffAE
from cxrray.io.loading import PUBLIC
from cxrray.io.loading import load_model as load_any
from cxrray.pipelines.head import load_head
from cxrray.pipelines import derived as outputs

def load_model(uri: str, tracking_uri: str | None = None) -> tuple[DiffAE, dict]:
    """(EMA model in eval mode, public identity {name, family, version, images_shown, z_dim, image_size, cxrray,
    capabilities}); /v1/models lists it."""
    loaded = load_any(uri, tracking_uri=tracking_uri)
    loaded.family.require("encode")  # the classify/explain service reads z
    return loaded.model, {**{k: loaded.identity[k] for k in PUBLIC}, "capabilities": sorted(loaded.family.capabilities)}


class ModelService:
    """EMA DiffAE + probe head on one device; every method takes preprocessed model-range images."""

    def __init__(self, checkpoint: str, probe: str, tracking_uri: str | None = None, device: str | None = None):
        model, self.identity = load_model(checkpoint, tracking_uri)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device)
        self.head = load_head(probe)
        if self.head.z_mean.shape[0] != self.identity["z_dim"]:
            raise ValueError(f"probe {probe} is for z_dim {self.head.z_mean.shape[0]}, "
                             f"the model's z_dim is {self.identity['z_dim']}")
        self.fitted = [i for i, ok in enumerate(self.head.fitted) if ok]
        self.model_ref = {"name": self.identity["name"], "version": self.identity["version"]}

    def info(self) -> dict:
        return {"model": dict(self.identity), "findings": [self.head.findings[i] for i in self.fitted],
                "unfitted": [f for i, f in enumerate(self.head.findings) if i not in self.fitted]}

    def _probs(self, p: torch.Tensor) -> dict[str, float]:
        return {self.head.findings[i]: float(p[i]) for i in self.fitted}

    def classify(self, images: list[np.ndarray]) -> list[dict[str, float]]:
        x = torch.from_numpy(np.stack(images))[:, None].to(self.device)
        with torch.no_grad():
            probs = self.head.probabilities(self.model.encode(x).float()).cpu()
        return [self._probs(p) for p in probs]

    def explain(self, image: np.ndarray, finding: str, cfg: dict, toward: int, fmt: str) -> dict:
        from cxrray.pipelines.counterfactual import counterfactuals

        ecfg = ExplainConfig(**cfg)
        x0 = torch.from_numpy(np.array(image, dtype=np.float32))[None, None]  # a copy: Ray's arrays are read-only
        out = counterfactuals(self.model, self.head, x0, finding, ecfg, toward=toward)
        direction = "toward" if toward == 1 else "away from"
        text = outputs.provenance(f"counterfactual of an uploaded image {direction} {finding!r} "
                                  f"({ecfg.mode}, eps {ecfg.eps:g}, {ecfg.invert_steps} inversion + {ecfg.steps} "
                                  "DDIM steps)", self.identity)
        cf = out["counterfactual"][0, 0].numpy()
        if fmt == "dicom":
            image_out = {"media_type": "application/dicom",
                         "data": outputs.b64(outputs.secondary_capture(cf, text, self.identity, "counterfactual"))}
        else:
            image_out = {"media_type": "image/png", "data": outputs.b64(outputs.png16(cf, text))}
        diff_png, scale = outputs.difference_png(out["difference"][0, 0].numpy(),
                                                 text.replace("counterfactual", "difference map of a counterfactual", 1))
        return {"counterfactual": image_out,
                "difference_map": {"media_type": "image/png", "data": outputs.b64(diff_png), "scale": scale,
                                   "legend": outputs.DIFFERENCE_LEGEND},
                "probabilities": {"before": self._probs(out["probs_before"][0]),
                                  "after": self._probs(out["probs_after"][0])},
                "provenance": text, "model": self.model_ref}

    def generate(self, seed: int, n: int, steps: int) -> dict:
        """n images from one seed: z ~ N(probe z_mean, diag(z_std^2)) then x_T ~ N(0, I), both drawn in that
        order from a CPU generator seeded with `seed` (same seed, n and steps: same images)."""
        from cxrray.diffusion.ddim import sample

        gen = torch.Generator().manual_seed(int(seed))
        mean, std = (torch.as_tensor(a, dtype=torch.float32) for a in (self.head.z_mean, self.head.z_std))
        z = mean + std * torch.randn(n, mean.shape[0], generator=gen)
        images = sample(self.model, n, steps=steps, generator=gen, z=z).cpu()
        text = outputs.provenance(f"image generated from seed {seed} ({steps} DDIM steps, z drawn from the "
                                  "probe's z mean/std)", self.identity)
        return {"images": [{"media_type": "image/png", "data": outputs.b64(outputs.png16(im[0].numpy(), text))}
                           for im in images], "provenance": text, "model": self.model_ref}


@serve.deployment(name="Classifier")
class Classifier:
    def __init__(self, checkpoint: str, probe: str, settings: dict):
        self.service = ModelService(checkpoint, probe, settings.get("tracking_uri"))
        self.classify_batch.set_max_batch_size(settings["max_batch_size"])
        self.classify_batch.set_batch_wait_timeout_s(settings["batch_wait_timeout_s"])
        self.batch_sizes: Counter = Counter()

    def info(self) -> dict:
        return self.service.info()

    def stats(self) -> dict:
        return {"batch_sizes": dict(self.batch_sizes)}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def classify_batch(self, images: list[np.ndarray]) -> list[dict[str, float]]:
        self.batch_sizes[len(images)] += 1
        return await asyncio.to_thread(self.service.classify, images)

    async def classify(self, image: np.ndarray) -> dict:
        """{"probabilities": {finding: p}, "model": {name, version}} for one preprocessed image."""
        return {"probabilities": await self.classify_batch(image), "model": self.service.model_ref}


@serve.deployment(name="Explainer")
class Explainer:
    def __init__(self, checkpoint: str, probe: str, settings: dict):
        self.service = ModelService(checkpoint, probe, settings.get("tracking_uri"))
        self.lock = asyncio.Lock()  # one diffusion run at a time per replica; the rest wait their turn

    def info(self) -> dict:
        return self.service.info()

    async def explain(self, image: np.ndarray, finding: str, cfg: dict, toward: int, fmt: str) -> dict:
        async with self.lock:
            return await asyncio.to_thread(self.service.explain, image, finding, cfg, toward, fmt)

    async def generate(self, seed: int, n: int, steps: int) -> dict:
        async with self.lock:
            return await asyncio.to_thread(self.service.generate, seed, n, steps)
