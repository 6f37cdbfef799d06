"""Latents job: image shards -> latent shards for latent diffusion (Cheff stage 2 and the attribution paper's
fine-tune train on these: shared by both methods).

Each output sample is its input sample (the 16-bit image, its metadata, its extra members) plus

| member       | value                                                                            |
|--------------|----------------------------------------------------------------------------------|
| latent.npy   | float32 [latent_channels, s, s]: the frozen VAE's posterior mean / latent_std     |
| tokens.npy   | int32 [max_tokens]: the report's WordPiece ids, 0-padded (only when reports exist) |

so a latent shard is still an image shard (evaluation compares samples to its images). Images are
resized to the VAE's size (bicubic, antialiased) before encoding when ingest used another size.
`tokenizer.json` (the `tokenizers` file) sits beside `manifest.json` (and `_tokenizer.json`, what it was
trained on), whose `latents` section names the
VAE, the latent shape and scale, and the tokenizer. The tokenizer is trained on the driver from the
`tokenizer_split`'s de-identified reports (`report_tokens.py`: only words that several patients use).

One input shard is one unit of the fan-out (`fanout.py`): its output shard and part record are written
atomically; a rerun with the same VAE, data and tokenizer skips finished shards (a killed job, rerun,
writes each shard exactly once), and the manifest is written last.
"""
from __future__ import annotations

import hashlib
import json

import numpy as np
import ray
import torch

from cxrray.data.imaging import decode_png16, png16_to_model
from cxrray.data.members import encode_npy as npy
from cxrray.data.report_tokens import encode_reports, load_tokenizer, train_tokenizer
from cxrray.data.shards import (
    MANIFEST, dumps, load_part, read_manifest, read_tar, remove_stale, reusable_part, sha256, write_shard,
)
from cxrray.data.storage import Storage
from cxrray.models.loading import load_ema, model_identity
from cxrray.pipelines.fanout import fan_out
from cxrray.pipelines.settings import LatentsConfig
from cxrray.runtime import ensure_ray

TOKENIZER = "tokenizer.json"
TOKENIZER_RECORD = "_tokenizer.json"  # what the tokenizer was trained on (reuse on rerun)


@ray.remote(num_cpus=1)
def shard_reports(data_uri: str, shard: str, split: str) -> list[tuple[str, str]]:
    """(patient, report) of the `split` samples of one shard that have a report."""
    samples = read_tar(Storage(data_uri).read_bytes(shard), source=shard)
    return [(meta["patient"], meta["report"]) for _, _, meta in samples
            if meta.get("split") == split and meta.get("report")]


def fit_tokenizer(data_uri: str, manifest: dict, cfg: LatentsConfig, out: Storage) -> str | None:
    """The tokenizer file (JSON text) trained on the de-identified reports of `cfg.tokenizer_split`; None if
    that split has no reports (the latents then carry no tokens: unconditional diffusion). `tokenizers`
    breaks ties between equally frequent merges in hash order, so training twice can give two vocabularies:
    a tokenizer already under `out` that was trained on the same reports and settings is reused."""
    shards = [s["name"] for s in manifest["shards"] if s["splits"].get(cfg.tokenizer_split)]
    reports = [r for part in ray.get([shard_reports.remote(data_uri, s, cfg.tokenizer_split) for s in shards])
               for r in part]
    if not reports:
        return None
    inputs = sha256(json.dumps({"reports": sorted(reports), "vocab_size": cfg.vocab_size,
                                "min_patients": cfg.min_patients}).encode())
    if out.exists(TOKENIZER) and out.exists(TOKENIZER_RECORD):
        record = json.loads(out.read_bytes(TOKENIZER_RECORD))
        text = out.read_bytes(TOKENIZER)
        if record.get("inputs") == inputs and record.get("sha256") == sha256(text):
            print(f"[latents] tokenizer: reused (trained on the same {len(reports):,} reports)", flush=True)
            return text.decode()
    tokenizer = train_tokenizer(reports, vocab_size=cfg.vocab_size, min_patients=cfg.min_patients,
                                max_tokens=cfg.max_tokens)
    print(f"[latents] tokenizer: {tokenizer.get_vocab_size():,} pieces from {len(reports):,} "
          f"{cfg.tokenizer_split} reports (words of >= {cfg.min_patients} patients)", flush=True)
    text = tokenizer.to_str()
    out.write_bytes(TOKENIZER, text.encode())
    out.write_bytes(TOKENIZER_RECORD, dumps({"inputs": inputs, "sha256": sha256(text.encode())}))
    return text


class ShardLatents:
    """Actor: loads the frozen VAE (and the tokenizer) once; turns one input shard into one latent shard."""

    def __init__(self, vae: str, data_uri: str, output_uri: str, cfg: dict, findings: list[str]):
        self.cfg = LatentsConfig(**cfg)
        self.device = torch.device("cuda" if self.cfg.use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        self.vae = load_ema(vae).to(self.device)
        self.data, self.out, self.findings = Storage(data_uri), Storage(output_uri), findings
        self.tokenizer = (load_tokenizer(self.out.read_bytes(TOKENIZER).decode(), self.cfg.max_tokens)
                          if self.out.exists(TOKENIZER) else None)

    @torch.no_grad()
    def encode(self, pngs: list[bytes]) -> np.ndarray:
        x = torch.as_tensor(png16_to_model(np.stack([decode_png16(p) for p in pngs]))[:, None]).to(self.device)
        return self.vae.latents(self.vae.fit(x)).float().cpu().numpy()

    def __call__(self, batch: dict) -> dict:
        rows = []
        for shard, fingerprint in zip(batch["shard"], batch["fingerprint"]):
            samples = read_tar(self.data.read_bytes(shard), source=shard, extras=True)
            latents = np.concatenate([self.encode([s[1] for s in samples[i:i + self.cfg.batch_size]])
                                      for i in range(0, len(samples), self.cfg.batch_size)])
            tokens = (encode_reports(self.tokenizer, [meta.get("report") or "" for _, _, meta, _ in samples])
                      if self.tokenizer else None)
            out = [(key, png, meta, {**extras, "latent.npy": npy(latents[i]),
                                     **({"tokens.npy": npy(tokens[i])} if tokens is not None else {})})
                   for i, (key, png, meta, extras) in enumerate(samples)]
            write_shard(self.out, shard, fingerprint, out, [], self.findings)
            rows.append(len(out))
        return {"rows": np.asarray(rows)}


def latents(vae: str, data_uri: str, output_uri: str, cfg: LatentsConfig) -> dict:
    """Encode every shard under `data_uri` with the VAE at `vae` into latent shards under `output_uri`;
    returns the output manifest."""
    identity = model_identity(vae, "latents")
    ensure_ray()
    manifest = read_manifest(data_uri)
    out = Storage(output_uri)
    out.remove_partial()
    tokenizer = fit_tokenizer(data_uri, manifest, cfg, out)
    if tokenizer is None:
        for name in (TOKENIZER, TOKENIZER_RECORD):
            if out.exists(name):
                out.delete(name)
    loaded = load_ema(vae)
    vae_cfg = loaded.cfg
    settings = {"vae": identity["checkpoint"], "images_shown": identity["images_shown"],
                "tokenizer": sha256(tokenizer.encode()) if tokenizer else None, "max_tokens": cfg.max_tokens,
                "data": {s["name"]: s["sha256"] for s in manifest["shards"]}}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    names = [s["name"] for s in manifest["shards"]]
    todo = [{"shard": n, "fingerprint": fingerprint} for n in names if not reusable_part(out, n, fingerprint)]
    print(f"[latents] {len(names) - len(todo)}/{len(names)} shards already written; encoding {len(todo)}", flush=True)
    fan_out("latents", todo, ShardLatents, {"vae": vae, "data_uri": data_uri, "output_uri": out.uri,
                                            "cfg": cfg.model_dump(), "findings": manifest["label_vocabulary"]},
            cfg, out, count="rows", what="images")
    parts = [load_part(out, n) for n in names]
    shards = [{k: p[k] for k in ("name", "samples", "sha256", "bytes", "splits")} for p in parts]
    members = sorted({m for p in parts for m in p.get("members", ())})
    size = vae_cfg.latent_size
    result = {**manifest, "shards": shards, "members": members, "latents": {
        "vae": {k: identity[k] for k in ("name", "family", "version", "images_shown", "checkpoint")},
        "image_size": vae_cfg.image_size, "shape": [vae_cfg.latent_channels, size, size],
        "latent_std": float(loaded.latent_std), "source": Storage(data_uri).uri,
        "tokenizer": TOKENIZER if tokenizer else None, "max_tokens": cfg.max_tokens if tokenizer else None,
        "vocab_size": load_tokenizer(tokenizer, cfg.max_tokens).get_vocab_size() if tokenizer else None,
        "fingerprint": fingerprint}}
    out.write_bytes(MANIFEST, dumps(result))
    removed = remove_stale(out, set(names))
    print(f"[latents] wrote {sum(s['samples'] for s in shards):,} latents {result['latents']['shape']} in "
          f"{len(shards)} shards -> {out.uri}{f' ({removed} stale objects removed)' if removed else ''}", flush=True)
    return result
