"""Generation job: a cohort spec -> synthetic images as shards in exactly the format ingest writes.

The driver draws the cohort's rows (`cohort.draw`, a pure function of the spec and the model's
statistics) and cuts them into shards of `generate.shard_samples`. Each shard is one work unit of the
shared fan-out (`fanout.py`): an actor loads the model once, samples the shard's rows from a generator
seeded by (spec seed, shard index), writes the tar and then its part record (`shards.write_shard`).
A shard whose part record carries this run's fingerprint is skipped, so a killed run, rerun, writes
every sample exactly once, and each shard is byte-identical to the one an uninterrupted run writes
(same rows, same seed, same batches). `manifest.json` is written last from the part records.

Each sample: dataset `synthetic`, split `synthetic`, its own synthetic patient id, the requested
covariates, labels from them (the CheXchoNet thresholds), and provenance (model, version, seed,
covariates, sampler, steps, guidance) in its JSON and in the PNG's `cxrray:provenance` text chunk.
"""
from __future__ import annotations

import hashlib
import json
import time

import numpy as np

from cxrray import __version__
from cxrray.data import shards
from cxrray.data.sources.chexchonet import FINDINGS
from cxrray.data.storage import Storage
from cxrray.io.loading import PUBLIC, model_config, model_identity, resolve_checkpoint
from cxrray.pipelines.cohort import ECHO, CohortSpec, describe, draw
from cxrray.pipelines.fanout import fan_out
from cxrray.pipelines.settings import GenerateConfig
from cxrray.runtime import configure_data, ensure_ray

DATASET = SPLIT = "synthetic"


def unit_seed(seed: int, shard_index: int) -> int:
    """The torch seed of one shard: a hash of (cohort seed, shard index), so shards never share noise."""
    return int.from_bytes(hashlib.sha256(f"cxrray-generate:{seed}:{shard_index}".encode()).digest()[:8], "big") >> 1


class ShardGenerator:
    """Actor: loads the EMA model once; each call samples one shard's rows and writes the shard."""

    def __init__(self, checkpoint: str, output_uri: str, cfg: dict, model: dict, fingerprint: str):
        import torch

        from cxrray.io.loading import load_model

        self.cfg = GenerateConfig(**cfg)
        self.device = torch.device("cuda" if self.cfg.use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        loaded = load_model(checkpoint)
        self.model, self.family = loaded.model.to(self.device), loaded.family
        self.out, self.identity, self.fingerprint = Storage(output_uri), model, fingerprint

    def __call__(self, batch: dict) -> dict:
        start = time.perf_counter()
        unit = json.loads(batch["unit"][0])
        images = self._sample(unit["rows"], unit["seed"])
        samples = [self._sample_record(row, image, unit["seed"]) for row, image in zip(unit["rows"], images)]
        shards.write_shard(self.out, unit["shard"], self.fingerprint, samples, [], FINDINGS)
        return {"images": np.array([len(samples)]), "seconds": np.array([time.perf_counter() - start])}

    def _sample(self, rows: list[dict], seed: int) -> np.ndarray:
        import torch

        from cxrray.families import GenerateRequest

        generator = torch.Generator(device="cpu").manual_seed(seed)
        out = []
        for i in range(0, len(rows), self.cfg.batch_size):
            chunk = rows[i:i + self.cfg.batch_size]
            conditions = {name: [_condition(r, name) for r in chunk] for name in self.model.cfg.covariates}
            made = self.family.generate(self.model, GenerateRequest(
                n=len(chunk), steps=self.cfg.steps, generator=generator, conditions=conditions,
                guidance=self.cfg.guidance, sampler=self.cfg.sampler))
            out.append(made.images[:, 0].float().cpu().numpy())
        return np.concatenate(out)

    def _sample_record(self, row: dict, image: np.ndarray, seed: int) -> tuple[str, bytes, dict, dict]:
        from cxrray.pipelines.derived import png16

        key = f"syn-{self.fingerprint}-{row['index']:07d}"
        made = {"model": self.identity, "shard_seed": seed, "index": row["index"], "sampler": self.cfg.sampler,
                "steps": self.cfg.steps, "guidance": self.cfg.guidance, "sex": row["sex"], "age": row["age"],
                "covariates": row["covariates"]}
        text = (f"SYNTHETIC - {self.cfg.sampler.upper()} sample ({self.cfg.steps} steps, guidance {self.cfg.guidance:g}, "
                f"seed {seed}, image {row['index']}) given {_covariate_text(row)} by model {self.identity['name']} "
                f"version {self.identity['version']} - cxrray {__version__}; not an acquired radiograph")
        meta = {"key": key, "dataset": DATASET, "patient": key, "study": key, "view": None, "sex": row["sex"],
                "age": row["age"], "labels": row["labels"], "covariates": row["covariates"], "report": None,
                "split": SPLIT, "source": {"synthetic": made, "provenance": text}}
        return key, png16(image, text), meta, {}


def _condition(row: dict, name: str):
    return row["sex"] if name == "sex" else row["age"] if name == "age" else row["covariates"].get(name)


def _covariate_text(row: dict) -> str:
    parts = [f"sex {row['sex']}"] if row["sex"] else []
    parts += [f"age {row['age']:g}"] if row["age"] is not None else []
    parts += [f"{k} {v:g} cm" for k, v in sorted(row["covariates"].items())]
    return ", ".join(parts) or "no covariates"


def plan(rows: list[dict], spec: CohortSpec, fingerprint: str, per_shard: int) -> list[dict]:
    """One unit per shard: its name, seed and rows."""
    return [{"shard": f"synthetic-{fingerprint}-{i:05d}.tar", "seed": unit_seed(spec.seed, i),
             "rows": rows[start:start + per_shard]}
            for i, start in enumerate(range(0, len(rows), per_shard))]


def generate_cohort(checkpoint: str, spec: CohortSpec, output_uri: str, cfg: GenerateConfig,
                    timing: dict | None = None) -> dict:
    """Generate the cohort `spec` describes under `output_uri`; returns the manifest written there.
    `timing`, if given, receives the fan-out's seconds and images (after the actors started)."""
    identity = model_identity(checkpoint, "generate")
    model_cfg = model_config(json.loads(resolve_checkpoint(checkpoint).read_bytes("state.json")))
    rows = draw(spec, model_cfg)
    public = {k: identity[k] for k in PUBLIC if identity.get(k) is not None}
    settings = {"model": public, "checkpoint": identity["checkpoint"], "spec": spec.model_dump(mode="json"),
                "sampler": cfg.sampler, "steps": cfg.steps, "guidance": cfg.guidance,
                "shard_samples": cfg.shard_samples, "batch_size": cfg.batch_size}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    out = Storage(output_uri)
    units = plan(rows, spec, fingerprint, cfg.shard_samples)
    out.remove_partial()
    todo = [u for u in units if shards.reusable_part(out, u["shard"], fingerprint) is None]
    print(f"[generate] {len(units) - len(todo)}/{len(units)} shards already written; generating {len(todo)} "
          f"({sum(len(u['rows']) for u in todo):,} images, {cfg.sampler} {cfg.steps} steps) -> {out.uri}", flush=True)
    if todo:
        ensure_ray()
        configure_data()
        result = fan_out("generate", [{"unit": json.dumps(u)} for u in todo], ShardGenerator,
                {"checkpoint": checkpoint, "output_uri": out.uri, "cfg": cfg.model_dump(), "model": public,
                 "fingerprint": fingerprint}, use_gpu=cfg.use_gpu, actors=cfg.actors, count="images", what="images")
        if timing is not None:
            timing.update(seconds=result.seconds, images=result.counted)
    parts = [shards.load_part(out, u["shard"]) for u in units]
    missing = [u["shard"] for u, p in zip(units, parts) if p is None or p["fingerprint"] != fingerprint]
    if missing:
        raise RuntimeError(f"[generate] shards not written: {missing[:5]}")
    manifest, _ = shards.build_manifest(
        parts, [], dataset=DATASET, findings=list(FINDINGS), covariates=[c for c in ECHO if c in model_cfg.covariates],
        preprocessing={"size": model_cfg.image_size, "fit": "synthetic", "png_bits": 16, "photometric": "MONOCHROME2",
                       "model_range": [-1.0, 1.0]},
        split_rule={"level": "synthetic", "split": SPLIT}, version=__version__)
    manifest["generation"] = {**settings, "fingerprint": fingerprint, "expected": describe(rows, model_cfg),
                              "labels_from": "the requested covariates (CheXchoNet thresholds), not the image"}
    manifest["generation"].pop("checkpoint")  # a local path says nothing to a reader of the shards
    shards.write_if_changed(out, shards.REJECTS, b"")
    shards.write_if_changed(out, shards.MANIFEST, shards.dumps(manifest))
    removed = shards.remove_stale(out, {u["shard"] for u in units})
    print(f"[generate] wrote {manifest['samples']:,} images in {len(units)} shards -> {out.uri}/{shards.MANIFEST}"
          + (f"; removed {removed} objects of an earlier spec" if removed else ""), flush=True)
    return manifest
