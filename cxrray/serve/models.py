"""The model side of the service: `ModelService` (plain Python: a model of any family, plus a linear probe
when the family encodes) and the two Serve deployments around it, `Classifier` (dynamic batching with
`@serve.batch`) and `Explainer` (counterfactuals, seeded generation and in/outpainting, one at a time per
replica).

The service is generic over the family's capabilities (`cxrray.families`): classify needs "encode" and a
probe, explain needs "counterfactual" and a probe, generate needs "sample" (under the family's
conditions), inpaint and outpaint need "inpaint", upscale needs "upscale" (an SR model: the upload is read at
its low-resolution side, `info()["input_size"]`) and reconstruct needs "reconstruct" (an autoencoder: its
forward is D(E(x)), as for the MLflow pyfunc). `info()["endpoints"]` lists what this model can answer; the
ingress refuses the rest.

Model URIs: a checkpoint (`file://`, a path, `s3://`; a checkpoint directory or a pretraining output)
or an MLflow model (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `runs:/RUN_ID/model`), whose
`ema.safetensors` + `state.json` artifacts are downloaded and loaded the same way (no pickle).
Inputs arrive validated by the ingress: classify takes the upload's raw bytes and decodes them in the
classifier replica (off the single ingress path); the rest take images preprocessed by the ingress (float32 [S, S] in
[-1, 1]).
"""
from __future__ import annotations

import asyncio
from collections import Counter

import numpy as np
import torch
from ray import serve

from cxrray.pipelines.settings import ExplainConfig
from cxrray.families import CapabilityError, GenerateRequest
from cxrray.models.loading import PUBLIC
from cxrray.models.loading import load_model as load_any
from cxrray.pipelines.diffchest.head import load_head
from cxrray.pipelines import derived as outputs
from cxrray.data.settings import DecodeConfig
from cxrray.serve.uploads import ApiError, prepare_uploads

#: endpoint -> (capability it needs, whether it needs a probe)
ENDPOINTS = {"classify": ("encode", True), "explain": ("counterfactual", True), "attribute": ("counterfactual", True),
             "generate": ("sample", False),
             "inpaint": ("inpaint", False), "outpaint": ("inpaint", False), "upscale": ("upscale", False),
             "reconstruct": ("reconstruct", False)}


def endpoints_for(family, probe: bool) -> list[str]:
    """The /v1 operations a model of `family` answers (by capability and callable, and a probe where needed)."""
    callables = {"generate": family.generate, "inpaint": family.inpaint, "outpaint": family.inpaint,
                 "upscale": family.upscale}
    return [name for name, (capability, needs_probe) in ENDPOINTS.items()
            if capability in family.capabilities and (probe or not needs_probe) and callables.get(name, True) is not None]


class ModelService:
    """A model of any family (EMA weights) and, for families that encode, a probe head, on one device;
    every method takes preprocessed model-range images."""

    def __init__(self, checkpoint: str, probe: str | None = None, tracking_uri: str | None = None,
                 device: str | None = None, guide: str | None = None):
        loaded = load_any(checkpoint, tracking_uri=tracking_uri)
        self.family, self.cfg = loaded.family, loaded.model.cfg
        self.identity = {**{k: loaded.identity[k] for k in PUBLIC}, "capabilities": sorted(loaded.family.capabilities)}
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = loaded.model.to(self.device)
        self.head = None
        if probe:
            self.family.require("encode")  # a probe reads z
            self.head = load_head(probe)
            if self.head.z_mean.shape[0] != self.identity["z_dim"]:
                raise ValueError(f"probe {probe} is for z_dim {self.head.z_mean.shape[0]}, "
                                 f"the model's z_dim is {self.identity['z_dim']}")
        self.guide = None  # DAug: (noise-aware classifier, its super-classes) guiding this pixel DDPM
        if guide:
            from cxrray.pipelines.daug.noisy_classifier import load_noisy_classifier

            if self.family.name != "ddpm":
                raise ValueError(f"a noise-aware classifier guides a pixel DDPM (family ddpm), not {self.family.name}")
            net, names = load_noisy_classifier(guide)
            self.guide = (net.to(self.device), names)
        # the attribution paper's img2img: a report-conditioned latent diffusion model with its autoencoder
        self.img2img = self.family.name == "ldm" and bool(self.cfg.text) and self.cfg.vae is not None
        self.fitted = [i for i, ok in enumerate(self.head.fitted) if ok] if self.head is not None else []
        self.model_ref = {"name": self.identity["name"], "version": self.identity["version"]}
        self.input_size = self.cfg.low_size if "upscale" in self.family.capabilities else self.cfg.image_size

    def endpoints(self) -> list[str]:
        """The /v1 operations this model can answer (by capability, and the probe where one is needed; a
        guided DDPM attributes too)."""
        names = endpoints_for(self.family, self.head is not None)
        return sorted({*names, "attribute"}, key=list(ENDPOINTS).index) if self.guide or self.img2img else names

    def attribute_methods(self) -> list[str]:
        """The `/v1/attribute` methods of this model: its own counterfactual / reconstruction, DAug's, or the
        attribution paper's img2img (and its empty-prompt baseline)."""
        if self.guide:
            return ["guided"]
        if self.img2img:
            return ["attribution", "empty_prompt"]
        return ["counterfactual", "reconstruction"] if "attribute" in self.endpoints() else []

    def _need(self, endpoint: str) -> None:
        if endpoint not in self.endpoints():
            capability, probe = ENDPOINTS[endpoint]
            self.family.require(capability)
            raise CapabilityError(f"{endpoint} needs a probe: start the service with one")

    def info(self) -> dict:
        findings = self.head.findings if self.head is not None else []
        fitted, unfitted = [findings[i] for i in self.fitted], [f for i, f in enumerate(findings) if i not in self.fitted]
        if self.guide:  # the labels with a super-class the classifier knows, and those super-classes
            from cxrray.families.daug.superclasses import SUPER_CLASSES

            known = self.guide[1]
            fitted = sorted({*known, *(m for sc, members in SUPER_CLASSES.items() if sc in known for m in members
                                       if " " not in m)})
        return {"model": dict(self.identity), "findings": fitted, "unfitted": unfitted,
                "endpoints": self.endpoints(), "attribute_methods": self.attribute_methods(),
                "conditions": self.family.conditions(self.cfg), "input_size": self.input_size}

    def _probs(self, p: torch.Tensor) -> dict[str, float]:
        return {self.head.findings[i]: float(p[i]) for i in self.fitted}

    def classify(self, images: list[np.ndarray]) -> list[dict[str, float]]:
        self._need("classify")
        x = torch.from_numpy(np.stack(images))[:, None].to(self.device)
        with torch.no_grad():
            probs = self.head.probabilities(self.model.encode(x).float()).cpu()
        return [self._probs(p) for p in probs]

    def classify_uploads(self, uploads: list[bytes], fit: str, decode: DecodeConfig, max_pixels: int) -> list[dict]:
        """Raw uploads -> one answer each, in order: {"probabilities": {finding: p}}, or {"status": int, "error":
        {...}} for an upload its decoding refused (`ApiError`); the rest of the batch is classified regardless."""
        prepared = prepare_uploads(uploads, self.input_size, fit, decode, max_pixels)
        good = [x for x in prepared if not isinstance(x, ApiError)]
        probs = iter(self.classify(good) if good else [])
        return [{"status": x.status, "error": x.body()} if isinstance(x, ApiError) else {"probabilities": next(probs)}
                for x in prepared]

    def explain(self, image: np.ndarray, finding: str, cfg: dict, toward: int, fmt: str) -> dict:
        from cxrray.pipelines.diffchest.counterfactual import counterfactuals

        self._need("explain")
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

    def attribute(self, image: np.ndarray, method: str, finding: str, cfg: dict, fmt: str) -> dict:
        """Where `finding` is in one model-range image [S, S]: `method` (counterfactual or reconstruction, this
        model's own, guided: DAug's, or img2img: the attribution paper's; `cxrray.attribute.methods`) -> the raw
        map (16-bit PNG + its scale), the overlay (PNG or a derived RGB Secondary Capture), P(finding) from the
        probe (None without one) and the map's peak. `cfg`: the explain settings the counterfactual decodes with,
        the augment settings of the guided translation, or the attribution settings of img2img."""
        from cxrray.attribute.methods import Mapper
        from cxrray.attribute.outputs import map_png, overlay_dicom, overlay_png, overlay_rgb
        from cxrray.config import AttributionConfig, AugmentConfig, Config

        self._need("attribute")
        if method not in self.attribute_methods():
            raise CapabilityError(f"attribution method {method!r}: this model serves {self.attribute_methods()}")
        if method == "guided":
            mapper = Mapper(method, Config(augment=AugmentConfig(**cfg)), guided=(self.model, *self.guide))
        elif self.img2img:
            mapper = Mapper(method, Config(attribution=AttributionConfig(**cfg)), ldm=self.model)
        else:
            mapper = Mapper(method, Config(explain=ExplainConfig(**cfg)), diffchest=(self.model, self.head))
        x0 = np.array(image, dtype=np.float32)[None, None]  # a copy: Ray's arrays are read-only
        attribution = mapper.maps(x0, finding)[0]
        text = outputs.provenance(f"{method} attribution map of {finding!r} for an uploaded image", self.identity)
        raw, scale = map_png(attribution, text)
        rgb = overlay_rgb(x0[0, 0], attribution, mapper.cfg.attribute.alpha)
        overlay = ({"media_type": "application/dicom", "data": outputs.b64(overlay_dicom(rgb, text, f"{method} {finding}"))}
                   if fmt == "dicom" else {"media_type": "image/png", "data": outputs.b64(overlay_png(rgb, text))})
        peak = np.unravel_index(int(np.argmax(attribution)), attribution.shape)
        probability = mapper.probabilities(x0, finding)
        return {"map": {"media_type": "image/png", "data": outputs.b64(raw), "scale": scale,
                        "meaning": "value = png / 65535 x scale; larger = more of the finding's change there"},
                "overlay": overlay, "peak": [int(peak[0]), int(peak[1])],
                "probability": None if probability is None else float(probability[0]),
                "provenance": text, "model": self.model_ref}

    def generate(self, seed: int, n: int, steps: int, conditions: dict | None = None, guidance: float = 1.0) -> dict:
        """n images from one CPU generator seeded with `seed` (same seed, n, steps, conditions and guidance:
        same images), under the family's conditions (validated by the ingress against `info()`)."""
        self._need("generate")
        prior = (self.head.z_mean, self.head.z_std) if self.head is not None else None
        out = self.family.generate(self.model, GenerateRequest(
            n=n, steps=steps, generator=torch.Generator().manual_seed(int(seed)), conditions=dict(conditions or {}),
            guidance=guidance, z_prior=prior))
        text = outputs.provenance(f"image generated from seed {seed}: {out.how}", self.identity)
        return {"images": [{"media_type": "image/png", "data": outputs.b64(outputs.png16(im[0].numpy(), text))}
                           for im in out.images.cpu()], "provenance": text, "model": self.model_ref}

    def inpaint(self, image: np.ndarray, mask: np.ndarray, seed: int, steps: int, conditions: dict | None = None,
                guidance: float = 1.0, outpaint: bool = False) -> dict:
        """The uploaded image with the masked region (1) generated anew (`outpaint`: the region kept), seeded
        like `generate`; image and mask float32 [S, S] (validated and preprocessed by the ingress)."""
        self._need("outpaint" if outpaint else "inpaint")
        x = torch.from_numpy(np.array(image, dtype=np.float32))[None, None]
        m = torch.from_numpy(np.array(mask, dtype=np.float32))[None, None]
        out = self.family.inpaint(self.model, x, 1.0 - m if outpaint else m, GenerateRequest(
            n=1, steps=steps, generator=torch.Generator().manual_seed(int(seed)), conditions=dict(conditions or {}),
            guidance=guidance))
        how = out.how.replace("inpainting", "outpainting") if outpaint else out.how
        text = outputs.provenance(f"an uploaded image {'outpainted' if outpaint else 'inpainted'} from seed {seed}: "
                                  f"{how}", self.identity)
        return {"image": {"media_type": "image/png", "data": outputs.b64(outputs.png16(out.images[0, 0].cpu().numpy(), text))},
                "provenance": text, "model": self.model_ref}

    def transform(self, image: np.ndarray, operation: str, seed: int = 0, steps: int = 50) -> dict:
        """One preprocessed image (float32 [s, s] at `info()["input_size"]`) -> `operation`'s image: "upscale"
        (SR3 DDIM seeded with `seed`, from the noised bicubic upsample) or "reconstruct" (D(E(x)), deterministic)."""
        self._need(operation)
        x = torch.from_numpy(np.array(image, dtype=np.float32))[None, None].to(self.device)
        with torch.no_grad():
            if operation == "upscale":
                out = self.family.upscale(self.model, x, steps=steps, generator=torch.Generator().manual_seed(int(seed)))
                how = (f"upscaled from {x.shape[-1]}² to {out.shape[-1]}² (SR3, seed {seed}, {steps} DDIM steps from "
                       f"the bicubic upsample noised to {self.cfg.sample_start:g} T)")
            else:
                out = self.model(x)
                how = f"reconstructed through the autoencoder, D(E(x)) at {out.shape[-1]}²"
        text = outputs.provenance(f"an uploaded image {how}", self.identity)
        return {"image": {"media_type": "image/png", "data": outputs.b64(outputs.png16(out[0, 0].float().cpu().numpy(), text))},
                "size": int(out.shape[-1]), "provenance": text, "model": self.model_ref}


@serve.deployment(name="Classifier")
class Classifier:
    def __init__(self, checkpoint: str, probe: str | None, settings: dict):
        self.service = ModelService(checkpoint, probe, settings.get("tracking_uri"))
        self.prepare = (settings["fit"], DecodeConfig(**settings["decode"]), settings["max_pixels"])
        self.classify_batch.set_max_batch_size(settings["max_batch_size"])
        self.classify_batch.set_batch_wait_timeout_s(settings["batch_wait_timeout_s"])
        self.batch_sizes: Counter = Counter()

    def info(self) -> dict:
        return self.service.info()

    def stats(self) -> dict:
        return {"batch_sizes": dict(self.batch_sizes)}

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.01)
    async def classify_batch(self, images: list[np.ndarray]) -> list[dict[str, float]]:
        """Runs on the replica's event loop, not in a thread: Serve seals the next batch after its wait timeout
        whether or not this one is done, so a free loop during the model call yields batches of 1-2 under
        load (bench/serve.py: mean 1.6 at 16 clients); blocked, it seals the next batch when this one ends."""
        self.batch_sizes[len(images)] += 1
        return self.service.classify(images)

    async def classify(self, upload: bytes) -> dict:
        """One upload's raw bytes -> {"probabilities": {finding: p}, "model": {name, version}}, or {"status",
        "error"} when it cannot be decoded. Decoded here, in a thread of this replica (off the single ingress
        path, and a bad upload never fails the batch it would have joined)."""
        (image,) = await asyncio.to_thread(prepare_uploads, [upload], self.service.input_size, *self.prepare)
        if isinstance(image, ApiError):
            return {"status": image.status, "error": image.body(), "model": self.service.model_ref}
        return {"probabilities": await self.classify_batch(image), "model": self.service.model_ref}


@serve.deployment(name="Explainer")
class Explainer:
    def __init__(self, checkpoint: str, probe: str | None, settings: dict):
        self.service = ModelService(checkpoint, probe, settings.get("tracking_uri"), guide=settings.get("guide"))
        self.lock = asyncio.Lock()  # one diffusion run at a time per replica; the rest wait their turn

    def info(self) -> dict:
        return self.service.info()

    async def explain(self, image: np.ndarray, finding: str, cfg: dict, toward: int, fmt: str) -> dict:
        async with self.lock:
            return await asyncio.to_thread(self.service.explain, image, finding, cfg, toward, fmt)

    async def attribute(self, image: np.ndarray, method: str, finding: str, cfg: dict, fmt: str) -> dict:
        async with self.lock:
            return await asyncio.to_thread(self.service.attribute, image, method, finding, cfg, fmt)

    async def generate(self, seed: int, n: int, steps: int, conditions: dict, guidance: float) -> dict:
        async with self.lock:
            return await asyncio.to_thread(self.service.generate, seed, n, steps, conditions, guidance)

    async def inpaint(self, image: np.ndarray, mask: np.ndarray, seed: int, steps: int, conditions: dict,
                      guidance: float, outpaint: bool) -> dict:
        async with self.lock:
            return await asyncio.to_thread(self.service.inpaint, image, mask, seed, steps, conditions, guidance,
                                           outpaint)

    async def transform(self, image: np.ndarray, operation: str, seed: int, steps: int) -> dict:
        async with self.lock:
            return await asyncio.to_thread(self.service.transform, image, operation, seed, steps)
