"""The attribution methods behind one call: `Mapper.maps(images, finding) -> float32 [n, S, S]`, non-negative,
larger = more of the finding there, on the input grid. Each loads its model once:

- `gradcam`, `integrated_gradients`: a saliency classifier folder (`pipelines.saliency.classifier`);
- `counterfactual`: a DiffChest checkpoint + probe, |counterfactual away from the finding - image| (the
  `explain` settings); `reconstruction`: the checkpoint alone, |image - a seeded stochastic decode of its z|;
- `attribution`: a report-conditioned latent diffusion checkpoint (Cheff's `ldm`), |image - its img2img
  counterpart toward `attribution.prompt`| (`pipelines.attribution`); `empty_prompt`: the same toward the
  empty report (the baseline that shows what the prompt adds). Not finding-specific: the prompt is healthy.
- `guided`: DAug — a pixel DDPM checkpoint + a noise-aware classifier folder; the smoothed |guided - unguided|
  change of a classifier-guided translation for the finding's super-class (`pipelines.daug.translate`, with
  the `augment` section's scale, start, steps, direction and smoothing), scaled to [0, 1] per image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from cxrray.config import Config
from cxrray.errors import ConfigError, InputError

SALIENCY = ("gradcam", "integrated_gradients")
DIFFCHEST = ("counterfactual", "reconstruction")
GENERATIVE = ("attribution", "empty_prompt")  # img2img toward `attribution.prompt`, and toward no prompt
GUIDED = ("guided",)
METHODS = SALIENCY + DIFFCHEST + GENERATIVE + GUIDED


def method_name(text: str) -> str:
    """CLI spelling (integrated-gradients) -> the method's name; ConfigError for an unknown one."""
    name = text.replace("-", "_")
    if name not in METHODS:
        raise ConfigError(f"--method {text!r}: one of {', '.join(m.replace('_', '-') for m in METHODS)}")
    return name


@dataclass
class Mapper:
    """One method with its model(s) loaded: `classifier` (net, record) for saliency, `diffchest` (model,
    head or None) for the DiffChest methods; `identity` names the model for provenance."""

    method: str
    cfg: Config
    classifier: tuple | None = None
    diffchest: tuple | None = None
    ldm: object | None = None
    guided: tuple | None = None  # (pixel DDPM, noise-aware classifier, its super-class names)
    identity: dict = field(default_factory=dict)

    @property
    def image_size(self) -> int | None:
        if self.classifier is not None:
            return self.classifier[1].get("image_size")
        if self.ldm is not None:
            return self.ldm.cfg.image_size
        if self.guided is not None:
            return self.guided[0].cfg.image_size
        return self.diffchest[0].cfg.image_size if self.diffchest else None

    def findings(self) -> list[str]:
        if self.guided is not None:
            return list(self.guided[2])
        if self.classifier is not None:
            return list(self.classifier[1]["findings"])
        head = self.diffchest[1] if self.diffchest else None
        return list(head.findings) if head is not None else []

    def check(self, finding: str) -> None:
        """Refuse a finding the method cannot attribute, before any work."""
        known = self.findings()
        if self.guided is not None:
            from cxrray.families.daug.superclasses import super_class_of

            if super_class_of(finding) not in known:
                raise InputError(f"--finding {finding!r} is in none of the noise-aware classifier's super-classes "
                                 f"{', '.join(known)}")
            return
        if self.method not in ("reconstruction",) + GENERATIVE and finding not in known:
            raise InputError(f"--finding {finding!r}: the {self.method} model knows {', '.join(known)}")

    def maps(self, images: np.ndarray, finding: str, keys: list[str] | None = None) -> np.ndarray:
        """images float32 [n, 1, S, S] in [-1, 1] -> maps float32 [n, S, S]; the stochastic methods draw each
        image's noise from (attribute.seed, its key) (`pipelines.seeds`) and the samplers are deterministic after it,
        so batching changes a map by float rounding only, carried through the walk (`bench/img2img.py`: img2img
        1.5e-6, DAug's guided heatmaps 2.3e-3 of their [0, 1] scale; GPU kernels may differ more)."""
        from cxrray.pipelines.seeds import item_seeds

        seeds = item_seeds(self.cfg.attribute.seed, keys, len(images))
        from cxrray.pipelines.saliency.maps import grad_cam, integrated_gradients

        if self.method in SALIENCY:
            net, record = self.classifier
            index = record["findings"].index(finding)
            if self.method == "gradcam":
                return grad_cam(net, images, index)
            return integrated_gradients(net, images, index, self.cfg.saliency.ig_steps)
        if self.method in GENERATIVE:
            from cxrray.pipelines.attribution.img2img import attribution_maps

            prompt = self.cfg.attribution.prompt if self.method == "attribution" else ""
            return np.abs(attribution_maps(self.ldm, images, prompt, self.cfg.attribution, seeds)[0])
        if self.method in GUIDED:
            return _guided_maps(images, finding, self.guided, self.cfg, seeds)
        return _diffchest_maps(self.method, images, finding, self.diffchest, self.cfg, seeds)

    def probabilities(self, images: np.ndarray, finding: str) -> np.ndarray | None:
        """The explained model's P(finding) per image [n] (saliency: the classifier; counterfactual: the probe
        on z), or None."""
        with torch.no_grad():
            if self.classifier is not None:
                net, record = self.classifier
                x = torch.from_numpy(images).float().to(_device(net))
                return torch.sigmoid(net(x)[:, record["findings"].index(finding)]).cpu().numpy()
            if self.diffchest is None or self.diffchest[1] is None:
                return None
            model, head = self.diffchest
            z = model.encode(torch.from_numpy(images).float().to(_device(model))).float().cpu()
            return head.probabilities(z)[:, head.index(finding)].numpy()

    def to(self, device: torch.device) -> "Mapper":
        """The method's models on `device` (inputs follow the models)."""
        for model in (self.classifier[0] if self.classifier else None, self.diffchest[0] if self.diffchest else None,
                      self.ldm, *(self.guided[:2] if self.guided else ())):
            if model is not None:
                model.to(device)
        return self


def load_mapper(method: str, checkpoint: str, probe: str | None, cfg: Config) -> Mapper:
    """The method's models from `checkpoint` (a saliency classifier folder, or a DiffChest checkpoint) and,
    for `counterfactual`, `probe`."""
    from cxrray.models.loading import model_identity

    if method in SALIENCY:
        from cxrray.pipelines.saliency.classifier import load_classifier

        net, record = load_classifier(checkpoint)
        return Mapper(method, cfg, classifier=(net, record), identity={
            "name": "cxrray-saliency-classifier", "version": record.get("format", "1"), "checkpoint": str(checkpoint)})
    if method in GENERATIVE:
        from cxrray.models.loading import load_model

        loaded = load_model(checkpoint)
        if loaded.family.name != "ldm":
            raise InputError(f"--method {method} needs a latent diffusion (ldm) checkpoint, {checkpoint} is "
                             f"{loaded.family.name}")
        return Mapper(method, cfg, ldm=loaded.model.eval(), identity=model_identity(checkpoint))
    if method in GUIDED:
        return load_guided(checkpoint, probe, cfg)
    if method == "counterfactual" and not probe:
        raise ConfigError("--method counterfactual needs --probe (the linear probe the counterfactual moves along)")
    return Mapper(method, cfg, diffchest=load_diffchest(checkpoint, probe if method == "counterfactual" else None),
                  identity=model_identity(checkpoint))


def load_guided(ddpm: str, classifier: str | None, cfg: Config) -> Mapper:
    """DAug's pair: a pixel DDPM checkpoint and a `cxrray evaluate noisy-classifier` folder."""
    from cxrray.models.loading import load_ema, model_identity
    from cxrray.pipelines.daug.noisy_classifier import load_noisy_classifier

    if not classifier:
        raise ConfigError("--method guided needs --classifier (a `cxrray evaluate noisy-classifier` output folder)")
    identity = model_identity(ddpm, "sample")
    if identity["family"] != "ddpm":
        raise InputError(f"--method guided translates with a pixel DDPM (family ddpm), {ddpm} is {identity['family']}")
    net, names = load_noisy_classifier(classifier)
    return Mapper("guided", cfg, guided=(load_ema(identity["checkpoint"]).eval(), net, names),
                  identity={**identity, "classifier": str(classifier)})


def load_diffchest(checkpoint: str, probe: str | None, image_size: int | None = None):
    """(model, head or None) of a DiffChest checkpoint; with `image_size`, refused unless it reads that size."""
    from cxrray.models.loading import load_model
    from cxrray.pipelines.diffchest.head import load_head

    loaded = load_model(checkpoint)
    loaded.family.require("counterfactual")
    if image_size is not None and loaded.model.cfg.image_size != image_size:
        raise InputError(f"{checkpoint} reads {loaded.model.cfg.image_size}² images, the shards hold {image_size}²")
    return loaded.model.eval(), load_head(probe) if probe else None


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _guided_maps(images: np.ndarray, finding: str, guided: tuple, cfg: Config, seeds: list[int]) -> np.ndarray:
    """Each image's translation from its own seed, `augment.batch_size` at a time, as `cxrray augment` makes a
    heatmap."""
    from cxrray.families.daug.superclasses import super_class_of
    from cxrray.pipelines.daug.augment import unobserved
    from cxrray.pipelines.daug.translate import heatmaps, translate

    ddpm, classifier, names = guided
    ac, k = cfg.augment, names.index(super_class_of(finding))
    conditions, sign = unobserved(ddpm), 1.0 if cfg.augment.direction == "toward" else -1.0
    out = []
    for start in range(0, len(images), ac.batch_size):
        x = torch.from_numpy(images[start:start + ac.batch_size]).float().to(_device(ddpm))
        guided_x, plain = translate(ddpm, classifier, x, k, sign * ac.scale, ac.start_alpha_bar, ac.steps,
                                    seeds[start:start + ac.batch_size], conditions)
        out.append(heatmaps(guided_x, plain, ac.sigma))
    return np.concatenate(out).astype(np.float32)


def _diffchest_maps(method: str, images: np.ndarray, finding: str, diffchest, cfg: Config, seeds: list[int]
                    ) -> np.ndarray:
    from cxrray.diffusion.ddim import ddim_sample
    from cxrray.pipelines.diffchest.counterfactual import counterfactuals
    from cxrray.pipelines.seeds import item_noise

    model, head = diffchest
    if method == "counterfactual" and head is None:
        raise ConfigError("the counterfactual method needs --probe")
    ec, out, device = cfg.explain, [], _device(model)
    for start in range(0, len(images), ec.batch_size):
        x0 = torch.from_numpy(images[start:start + ec.batch_size]).float().to(device)
        if method == "counterfactual":
            change = counterfactuals(model, head, x0, finding, ec, toward=-1)["difference"]
        else:
            noise = item_noise(seeds[start:start + ec.batch_size], x0.shape[1:]).to(device)
            with torch.no_grad():
                change = ddim_sample(model, model.encode(x0).float(), noise, ec.steps, clip=True) - x0
        out.append(change.abs()[:, 0].cpu().numpy())
    return np.concatenate(out).astype(np.float32)
