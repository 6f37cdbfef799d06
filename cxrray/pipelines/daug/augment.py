"""`cxrray augment`: image shards -> the same shards with DAug's heatmaps beside each image.

Each output sample is its input sample (image, metadata, extra members) plus `heatmap_<class>.png` per
super-class of `augment.classes`: the smoothed |guided - unguided| change of a classifier-guided translation
(`translate`), 16-bit, scaled to [0, 1] per image — the channels the downstream model stacks with the image.
The noise of every translation is seeded by (augment.seed, the sample's key) and DDIM runs at eta 0, so a
sample's heatmaps do not depend on the shard it sits in, and the batch it is walked in (`augment.batch_size`
images at once) changes them by summation-order rounding only, carried through the guided walk (<= 2.3e-3 of
the [0, 1] scale on the tiny recipe: `bench/img2img.py`). One input shard is one unit of the fan-out; its output
shard and part record are written atomically, a rerun skips finished shards (a killed job, rerun, writes each
shard exactly once) and the manifest, naming the models, is written last.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import torch

from cxrray.data.imaging import decode_png16, encode_png16, png16_to_model
from cxrray.data.shards import (
    MANIFEST, dumps, load_part, read_manifest, read_tar, remove_stale, reusable_part, write_if_changed, write_shard,
)
from cxrray.data.storage import Storage
from cxrray.errors import InputError
from cxrray.models.loading import load_ema, model_identity
from cxrray.pipelines.daug.noisy_classifier import classifier_fingerprint, load_noisy_classifier
from cxrray.pipelines.daug.translate import heatmaps, translate
from cxrray.pipelines.fanout import fan_out
from cxrray.pipelines.seeds import key_seed
from cxrray.pipelines.settings import AugmentConfig
from cxrray.runtime import ensure_ray


class ShardHeatmaps:
    """Actor: loads the pixel DDPM and the noise-aware classifier once; one input shard -> one output shard."""

    def __init__(self, ddpm: str, classifier: str, data_uri: str, output_uri: str, cfg: dict, findings: list[str]):
        self.cfg = AugmentConfig(**cfg)
        device = torch.device("cuda" if self.cfg.use_gpu and torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            torch.set_num_threads(1)
        self.ddpm = load_ema(ddpm).eval().to(device)
        self.classifier, names = load_noisy_classifier(classifier)
        self.classifier.to(device)
        self.classes = [names.index(c) for c in self.cfg.classes]
        self.conditions = unobserved(self.ddpm)
        self.data, self.out, self.findings = Storage(data_uri), Storage(output_uri), findings

    def maps(self, keys: list[str], images: np.ndarray) -> list[dict[str, bytes]]:
        """Each image's heatmap members, `augment.batch_size` images a walk, image i's noise from its key."""
        device, sign = next(self.ddpm.parameters()).device, 1.0 if self.cfg.direction == "toward" else -1.0
        out = []
        for i in range(0, len(images), self.cfg.batch_size):
            x = torch.from_numpy(images[i:i + self.cfg.batch_size])[:, None].to(device)
            seeds = [key_seed(self.cfg.seed, key) for key in keys[i:i + self.cfg.batch_size]]
            guided, plain = translate(self.ddpm, self.classifier, x, self.classes, sign * self.cfg.scale,
                                      self.cfg.start_alpha_bar, self.cfg.steps, seeds, self.conditions)
            maps = {name: heatmaps(g, plain, self.cfg.sigma) for name, g in zip(self.cfg.classes, guided)}
            out += [{f"heatmap_{name}.png": encode_png16(m[j]) for name, m in maps.items()} for j in range(len(x))]
        return out

    def __call__(self, batch: dict) -> dict:
        rows = []
        for shard, fingerprint in zip(batch["shard"], batch["fingerprint"]):
            samples = read_tar(self.data.read_bytes(shard), source=shard, extras=True)
            images = np.stack([png16_to_model(decode_png16(png)) for _, png, _, _ in samples]) if samples else None
            heat = self.maps([key for key, *_ in samples], images) if samples else []
            out = [(key, png, meta, {**extras, **h}) for (key, png, meta, extras), h in zip(samples, heat)]
            write_shard(self.out, shard, fingerprint, out, [], self.findings)
            rows.append(len(out))
        return {"rows": np.asarray(rows)}


def unobserved(ddpm) -> torch.Tensor | None:
    """The conditioning of a covariate DDPM with every covariate unobserved (None: an unconditional model)."""
    names = getattr(ddpm.cfg, "covariates", ()) or ()
    return ddpm.condition({n: torch.full((1,), float("nan")) for n in names}) if names else None


def augment(ddpm: str, classifier: str, data_uri: str, output_uri: str, cfg: AugmentConfig) -> dict:
    """Write the heatmap-augmented copy of `data_uri` under `output_uri`; returns its manifest."""
    identity = model_identity(ddpm, "sample")
    if identity["family"] != "ddpm":
        raise InputError(f"--ddpm {ddpm}: a pixel DDPM (family ddpm) guides DAug's translation, not {identity['family']}")
    ddpm = identity["checkpoint"]  # resolved once: the actors load exactly what the fingerprint names
    _, names = load_noisy_classifier(classifier)
    unknown = sorted(set(cfg.classes) - set(names))
    if unknown:
        raise InputError(f"augment.classes {unknown}: the noise-aware classifier knows {names}")
    manifest = read_manifest(data_uri)
    size = manifest["preprocessing"]["size"]
    if identity["image_size"] != size:
        raise InputError(f"{ddpm} generates {identity['image_size']}² images, the shards hold {size}²")
    ensure_ray()
    out = Storage(output_uri)
    out.remove_partial()
    named = classifier_fingerprint(classifier)
    settings = {"ddpm": identity["checkpoint"], "classifier": named["uri"], "classifier_sha256": named["sha256"],
                "augment": cfg.model_dump(mode="json", exclude={"actors", "min_actors", "use_gpu", "actor_resources",
                                                                 "batch_size"}),
                "data": {s["name"]: s["sha256"] for s in manifest["shards"]}}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    shard_names = [s["name"] for s in manifest["shards"]]
    todo = [{"shard": n, "fingerprint": fingerprint} for n in shard_names if not reusable_part(out, n, fingerprint)]
    print(f"[augment] {len(shard_names) - len(todo)}/{len(shard_names)} shards already written; heatmaps of "
          f"{cfg.classes} for {len(todo)}", flush=True)
    fan_out("augment", todo, ShardHeatmaps, {"ddpm": ddpm, "classifier": named["uri"], "data_uri": data_uri,
                                             "output_uri": out.uri, "cfg": cfg.model_dump(),
                                             "findings": manifest["label_vocabulary"]}, cfg, out, count="rows",
            what="images")
    parts = [load_part(out, n) for n in shard_names]
    shards = [{k: p[k] for k in ("name", "samples", "sha256", "bytes", "splits")} for p in parts]
    result = {**manifest, "shards": shards, "members": sorted({m for p in parts for m in p.get("members", ())}),
              "augment": {"ddpm": {k: identity[k] for k in ("name", "family", "version", "images_shown", "checkpoint")},
                          "classifier": settings["classifier"], "settings": settings["augment"],
                          "source": Storage(data_uri).uri, "fingerprint": fingerprint}}
    write_if_changed(out, MANIFEST, dumps(result))
    removed = remove_stale(out, set(shard_names))
    print(f"[augment] wrote {sum(s['samples'] for s in shards):,} images with heatmaps {cfg.classes} in {len(shards)} "
          f"shards -> {out.uri}{f' ({removed} stale objects removed)' if removed else ''}", flush=True)
    return result
