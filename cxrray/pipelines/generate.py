"""Generation job: rows of conditions -> synthetic images as shards in exactly the format ingest writes.

Rows come from a method's front end (`cohorts.generate.generate_cohort`: a drawn cohort spec;
`cheff.generate.generate_prompts`: report prompts) as {"index", "conditions", "given", "meta"}; any family
that `generate`s takes them (`generate_rows`). The driver cuts them into
shards of `generate.shard_samples`. Each shard is one work unit of the
shared fan-out (`fanout.py`): an actor loads the model once, samples the shard's rows from a generator
seeded by (spec seed, shard index), writes the tar and then its part record (`shards.write_shard`).
A shard whose part record carries this run's fingerprint is skipped, so a killed run, rerun, writes
every sample exactly once, and each shard is byte-identical to the one an uninterrupted run writes
(same rows, same seed, same batches). `manifest.json` is written last from the part records.

Each sample: dataset `synthetic`, split `synthetic`, its own synthetic patient id, what it was asked for
(a cohort's covariates and the labels they imply under the CheXchoNet thresholds; a prompt as its
`report`), and provenance (model, version, seed, conditions, sampler, steps, guidance) in its JSON and in
the PNG's `cxrray:provenance` text chunk.
"""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np

from cxrray import __version__
from cxrray.data import shards
from cxrray.data.storage import Storage
from cxrray.models.loading import PUBLIC, checkpoint_config, model_identity
from cxrray.pipelines.fanout import fan_out
from cxrray.pipelines.settings import GenerateConfig
from cxrray.runtime import configure_data, ensure_ray

DATASET = SPLIT = "synthetic"


def unit_seed(seed: int, shard_index: int) -> int:
    """The torch seed of one shard: a hash of (cohort seed, shard index), so shards never share noise."""
    return int.from_bytes(hashlib.sha256(f"cxrray-generate:{seed}:{shard_index}".encode()).digest()[:8], "big") >> 1


class ShardGenerator:
    """Actor: loads the EMA model once; each call samples one shard's rows and writes the shard."""

    def __init__(self, checkpoint: str, output_uri: str, cfg: dict, model: dict, fingerprint: str, findings: list[str],
                 sr: str | None = None):
        import torch

        from cxrray.models.loading import load_model

        self.cfg = GenerateConfig(**cfg)
        self.device = torch.device("cuda" if self.cfg.use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        loaded = load_model(checkpoint)
        self.model, self.family = loaded.model.to(self.device), loaded.family
        self.sr = load_model(sr) if sr else None  # the cascade's last stage: each batch upscaled
        if self.sr is not None:
            self.sr.model.to(self.device)
        self.out, self.identity, self.fingerprint, self.findings = Storage(output_uri), model, fingerprint, findings

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        unit = json.loads(batch["unit"][0])
        images = self._sample(unit["rows"], unit["seed"])
        samples = [self._sample_record(row, image, unit["seed"]) for row, image in zip(unit["rows"], images)]
        shards.write_shard(self.out, unit["shard"], self.fingerprint, samples, [], self.findings)
        return {"images": np.array([len(samples)]), "seconds": np.array([time.perf_counter() - start])}

    def _sample(self, rows: list[dict], seed: int) -> np.ndarray:
        import torch

        from cxrray.diffusion.ddim import stage_generator
        from cxrray.families import GenerateRequest

        generator = torch.Generator(device="cpu").manual_seed(seed)
        sr_generator = stage_generator(seed, 1)  # the SR stage's own noise, independent of the latent model's
        names = sorted(self.family.conditions(self.model.cfg))
        out = []
        for i in range(0, len(rows), self.cfg.batch_size):
            chunk = rows[i:i + self.cfg.batch_size]
            conditions = {name: [r["conditions"].get(name) for r in chunk] for name in names}
            made = self.family.generate(self.model, GenerateRequest(
                n=len(chunk), steps=self.cfg.steps, generator=generator, conditions=conditions,
                guidance=self.cfg.guidance, sampler=self.cfg.sampler)).images
            if self.sr is not None:
                made = self.sr.family.upscale(self.sr.model, made, self.cfg.sr_steps, sr_generator)
            out.append(made[:, 0].float().cpu().numpy())
        return np.concatenate(out)

    def _sample_record(self, row: dict, image: np.ndarray, seed: int) -> tuple[str, bytes, dict, dict]:
        from cxrray.pipelines.derived import png16

        key = f"syn-{self.fingerprint}-{row['index']:07d}"
        meta = row["meta"]
        made = {"model": self.identity, "shard_seed": seed, "index": row["index"], "sampler": self.cfg.sampler,
                "steps": self.cfg.steps, "guidance": self.cfg.guidance, **row["conditions"]}
        upscaled = (f", upscaled by SR3 model {self.sr.identity['name']} version {self.sr.identity['version']} "
                    f"({self.cfg.sr_steps} DDIM steps from the bicubic upsample noised to "
                     f"{self.sr.model.cfg.sample_start:g} T)") if self.sr is not None else ""
        if self.sr is not None:
            made["upscaled_by"] = {k: self.sr.identity[k] for k in PUBLIC if self.sr.identity.get(k) is not None}
            made["sr_steps"] = self.cfg.sr_steps
        text = (f"SYNTHETIC - {self.cfg.sampler.upper()} sample ({self.cfg.steps} steps, guidance {self.cfg.guidance:g}, "
                f"seed {seed}, image {row['index']}) given {row['given']} by model {self.identity['name']} "
                f"version {self.identity['version']}{upscaled} - cxrray {__version__}; not an acquired radiograph")
        meta = {"key": key, "dataset": DATASET, "patient": key, "study": key, "view": None, "sex": meta.get("sex"),
                "age": meta.get("age"), "labels": meta.get("labels", []), "covariates": meta.get("covariates", {}),
                "report": meta.get("report"), "split": SPLIT, "source": {"synthetic": made, "provenance": text},
                **({"prompt_from": meta["prompt_from"]} if "prompt_from" in meta else {})}
        return key, png16(image, text), meta, {}


def plan(rows: list[dict], seed: int, fingerprint: str, per_shard: int) -> list[dict]:
    """One unit per shard: its name, seed and rows."""
    return [{"shard": f"synthetic-{fingerprint}-{i:05d}.tar", "seed": unit_seed(seed, i),
             "rows": rows[start:start + per_shard]}
            for i, start in enumerate(range(0, len(rows), per_shard))]


def generate_rows(checkpoint: str, rows: list[dict], output_uri: str, cfg: GenerateConfig, *, seed: int,
                  request: dict, findings: list[str], covariates: list[str], described: dict,
                  timing: dict | None = None, sr: str | None = None) -> dict:
    """Generate `rows` (each {"index", "conditions", "given", "meta"}) into shards under `output_uri`, each
    batch upscaled by the super-resolution model `sr` when given."""
    identity = model_identity(checkpoint, "generate")
    model_cfg = checkpoint_config(checkpoint)
    public = {k: identity[k] for k in PUBLIC if identity.get(k) is not None}
    settings = {"model": public, "checkpoint": identity["checkpoint"], **request,
                "sampler": cfg.sampler, "steps": cfg.steps, "guidance": cfg.guidance,
                "shard_samples": cfg.shard_samples, "batch_size": cfg.batch_size}
    size = model_cfg.image_size
    if sr:
        sr_identity = model_identity(sr, "upscale")
        sr_cfg = checkpoint_config(sr)
        settings.update(sr={k: sr_identity[k] for k in PUBLIC if sr_identity.get(k) is not None},
                        sr_checkpoint=sr_identity["checkpoint"], sr_steps=cfg.sr_steps)
        size = sr_cfg.image_size
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    out = Storage(output_uri)
    units = plan(rows, seed, fingerprint, cfg.shard_samples)
    out.remove_partial()
    todo = [u for u in units if shards.reusable_part(out, u["shard"], fingerprint) is None]
    print(f"[generate] {len(units) - len(todo)}/{len(units)} shards already written; generating {len(todo)} "
          f"({sum(len(u['rows']) for u in todo):,} images, {cfg.sampler} {cfg.steps} steps) -> {out.uri}", flush=True)
    if todo:
        ensure_ray()
        configure_data()
        result = fan_out("generate", [{"unit": json.dumps(u)} for u in todo], ShardGenerator,
                {"checkpoint": checkpoint, "output_uri": out.uri, "cfg": cfg.model_dump(), "model": public,
                 "fingerprint": fingerprint, "findings": findings, "sr": sr}, cfg, out,
                         count="images", what="images")
        if timing is not None:
            timing.update(seconds=result.seconds, images=result.counted)
    parts = [shards.load_part(out, u["shard"]) for u in units]
    missing = [u["shard"] for u, p in zip(units, parts) if p is None or p["fingerprint"] != fingerprint]
    if missing:
        raise RuntimeError(f"[generate] shards not written: {missing[:5]}")
    manifest, _ = shards.build_manifest(
        parts, [], dataset=DATASET, findings=findings, covariates=covariates,
        preprocessing={"size": size, "fit": "synthetic", "png_bits": 16, "photometric": "MONOCHROME2",
                       "model_range": [-1.0, 1.0]},
        split_rule={"level": "synthetic", "split": SPLIT}, version=__version__)
    manifest["generation"] = {**settings, "fingerprint": fingerprint, **described}
    for local in ("checkpoint", "sr_checkpoint"):  # a local path says nothing to a reader of the shards
        manifest["generation"].pop(local, None)
    shards.write_if_changed(out, shards.REJECTS, b"")
    shards.write_if_changed(out, shards.MANIFEST, shards.dumps(manifest))
    removed = shards.remove_stale(out, {u["shard"] for u in units})
    print(f"[generate] wrote {manifest['samples']:,} images in {len(units)} shards -> {out.uri}/{shards.MANIFEST}"
          + (f"; removed {removed} objects of an earlier run" if removed else ""), flush=True)
    return manifest
