"""Generation job: rows of conditions -> synthetic images as shards in exactly the format ingest writes.

Rows come from a cohort spec (`generate_cohort`: `cohort.draw`, a pure function of the spec and a
covariate DDPM's statistics) or from report prompts (`generate_prompts`: each prompt K times for a
report-conditioned latent diffusion model; an empty prompt is unconditional). The driver cuts them into
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
from cxrray.data.sources.chexchonet import FINDINGS
from cxrray.data.storage import Storage
from cxrray.errors import InputError
from cxrray.io.loading import PUBLIC, checkpoint_config, model_identity
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

    def __init__(self, checkpoint: str, output_uri: str, cfg: dict, model: dict, fingerprint: str, findings: list[str],
                 sr: str | None = None):
        import torch

        from cxrray.io.loading import load_model

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


def cohort_row(row: dict) -> dict:
    """A drawn cohort row -> a generation row: the covariates as conditions, labels and covariates as metadata."""
    conditions = {"sex": row["sex"], "age": row["age"], **row["covariates"]}
    parts = [f"sex {row['sex']}"] if row["sex"] else []
    parts += [f"age {row['age']:g}"] if row["age"] is not None else []
    parts += [f"{k} {v:g} cm" for k, v in sorted(row["covariates"].items())]
    return {"index": row["index"], "conditions": {k: v for k, v in conditions.items() if v is not None},
            "given": ", ".join(parts) or "no covariates",
            "meta": {k: row[k] for k in ("sex", "age", "labels", "covariates")}}


def prompt_rows(prompts: list[str], per_prompt: int, sources: list[dict] | None = None) -> list[dict]:
    """Each prompt `per_prompt` times, in order ("" = unconditional). With `sources` (one per prompt: the real
    sample whose report it is, {"key", "labels"}), each row keeps that sample's key and labels."""
    rows = []
    for p, prompt in enumerate(prompts):
        source = sources[p] if sources else {}
        for _ in range(per_prompt):
            rows.append({"index": len(rows), "conditions": {"prompt": prompt} if prompt else {},
                         "given": f"the report prompt #{p} ({len(prompt)} characters)" if prompt else "no prompt",
                         "meta": {"report": prompt or None, "prompt_index": p, "labels": source.get("labels", []),
                                  **({"prompt_from": source["key"]} if source else {})}})
    return rows


def report_prompts(data_uri: str, split: str, limit: int | None = None) -> tuple[list[str], list[dict], list[str]]:
    """The de-identified reports of a shard set's `split` as prompts, in sample-key order (first `limit`):
    (prompts, sources [{"key", "labels"}], the set's findings). Samples without a report are skipped."""
    from cxrray.data.shards import read_manifest, read_tar

    store = Storage(data_uri)
    manifest = read_manifest(store)
    names = [s["name"] for s in manifest["shards"] if s.get("splits", {}).get(split)]
    if not names:
        raise InputError(f"{data_uri} has no {split!r} samples; its splits: {sorted(manifest.get('splits', {}))}")
    found = sorted((meta["key"], " ".join(meta["report"].split()), meta.get("labels", []))
                   for name in names for _, _, meta in read_tar(store.read_bytes(name), name)
                   if meta.get("split") == split and (meta.get("report") or "").strip())
    if not found:
        raise InputError(f"{data_uri}: no {split!r} sample has a report")
    found = found[:limit] if limit else found
    return [p for _, p, _ in found], [{"key": k, "labels": labels} for k, _, labels in found], \
        list(manifest.get("label_vocabulary", []))


def plan(rows: list[dict], seed: int, fingerprint: str, per_shard: int) -> list[dict]:
    """One unit per shard: its name, seed and rows."""
    return [{"shard": f"synthetic-{fingerprint}-{i:05d}.tar", "seed": unit_seed(seed, i),
             "rows": rows[start:start + per_shard]}
            for i, start in enumerate(range(0, len(rows), per_shard))]


def generate_cohort(checkpoint: str, spec: CohortSpec, output_uri: str, cfg: GenerateConfig,
                    timing: dict | None = None) -> dict:
    """Generate the cohort `spec` describes under `output_uri`; returns the manifest written there.
    `timing`, if given, receives the fan-out's seconds and images (after the actors started)."""
    model_cfg = checkpoint_config(checkpoint)
    drawn = draw(spec, model_cfg)
    return generate_rows(checkpoint, [cohort_row(r) for r in drawn], output_uri, cfg, seed=spec.seed,
                         request={"spec": spec.model_dump(mode="json")}, findings=list(FINDINGS),
                         covariates=[c for c in ECHO if c in model_cfg.covariates], timing=timing,
                         described={"expected": describe(drawn, model_cfg), "labels_from":
                                    "the requested covariates (CheXchoNet thresholds), not the image"})


def generate_prompts(checkpoint: str, prompts: list[str], per_prompt: int, output_uri: str, cfg: GenerateConfig,
                     seed: int = 0, sr: str | None = None, sources: list[dict] | None = None,
                     findings: list[str] | None = None) -> dict:
    """Generate `per_prompt` images for each report prompt ("" = unconditional) with a report-conditioned
    model, upscaled by the SR model `sr` when given (the cascade); returns the manifest. Each sample's
    `report` is its prompt; with `sources` (prompts from a real set, `report_prompts`), its labels are
    those of the real sample whose report it is (`findings` names them)."""
    model_cfg = checkpoint_config(checkpoint)
    from cxrray.families import get_family

    if any(prompts) and "prompt" not in get_family(model_cfg.family).conditions(model_cfg):
        raise InputError(f"{checkpoint}: a {model_cfg.family} model does not take report prompts")
    limit = get_family(model_cfg.family).conditions(model_cfg).get("prompt", {}).get("maxLength", 0)
    long = [i for i, p in enumerate(prompts) if len(p) > limit]
    if long:
        raise InputError(f"prompts {long[:5]} are longer than {limit} characters")
    request = {"prompts": prompts, "per_prompt": per_prompt, "seed": seed,
               **({"prompts_from": [s["key"] for s in sources]} if sources else {})}
    labels_from = ("the real sample whose de-identified report is the prompt (prompt_from)" if sources
                   else "none: each sample's report is its prompt")
    return generate_rows(checkpoint, prompt_rows(prompts, per_prompt, sources), output_uri, cfg, seed=seed,
                         request=request, findings=list(findings or []) if sources else [], covariates=[],
                         described={"labels_from": labels_from}, sr=sr)


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
