"""Encode job: shards -> z (EMA semantic encoder) and optionally x_T (deterministic DDIM inversion).

Work units are (shard, chunk) pairs fanned out over an actor pool (`fanout.py`; each actor loads the
model once). Each unit writes one
Parquet part atomically (see `encodings.py`); a rerun lists finished parts and skips them, so after a
kill every key ends up written exactly once. `encodings.json` is written last and lists every part.
"""
from __future__ import annotations

import hashlib
import json
import math
import time

import numpy as np
import torch

from cxrray.pipelines.settings import EncodeConfig
from cxrray.data.imaging import decode_png16, png16_to_model
from cxrray.data.shards import read_manifest, read_tar
from cxrray.data.storage import Storage
from cxrray.diffusion.ddim import ddim_invert
from cxrray.models.loading import load_ema, model_identity
from cxrray.pipelines.encodings import FORMAT, INDEX, finished_parts, part_table, write_part
from cxrray.pipelines.fanout import fan_out
from cxrray.runtime import configure_data, ensure_ray
from cxrray.errors import InputError

def load_images(pngs: list[bytes]) -> torch.Tensor:
    """16-bit PNG bytes -> float32 [N, 1, S, S] in [-1, 1]."""
    return torch.as_tensor(png16_to_model(np.stack([decode_png16(p) for p in pngs]))[:, None])


class ChunkEncoder:
    """Actor: loads the EMA model once, encodes (shard, chunk) units and writes their parts."""

    def __init__(self, checkpoint: str, data_uri: str, output_uri: str, cfg: dict, covariates: list[str]):
        self.cfg = EncodeConfig(**cfg)
        self.device = torch.device("cuda" if self.cfg.use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        self.model = load_ema(checkpoint).to(self.device)
        self.data, self.out, self.covariates = Storage(data_uri), Storage(output_uri), covariates
        self._shard: tuple[str, list] | None = None

    def _samples(self, shard: str) -> list:
        if self._shard is None or self._shard[0] != shard:
            self._shard = (shard, read_tar(self.data.read_bytes(shard), source=shard))
        return self._shard[1]

    def __call__(self, batch: dict) -> dict:
        done = []
        for shard, chunk, part in zip(batch["shard"], batch["chunk"], batch["part"]):
            start = time.perf_counter()
            size = self.cfg.chunk
            samples = self._samples(shard)[int(chunk) * size:(int(chunk) + 1) * size]
            zs, xts = [], []
            for i in range(0, len(samples), self.cfg.batch_size):
                x0 = load_images([png for _, png, _ in samples[i:i + self.cfg.batch_size]]).to(self.device)
                if x0.shape[-1] != self.model.cfg.image_size:
                    raise InputError(f"{shard}: images are {x0.shape[-1]}px but the model expects "
                                     f"{self.model.cfg.image_size}px (ingest with --size {self.model.cfg.image_size})")
                with torch.no_grad():
                    z = self.model.encode(x0).float()
                zs.append(z.cpu().numpy())
                if self.cfg.invert:
                    xts.append(ddim_invert(self.model, x0, z, steps=self.cfg.invert_steps).cpu().numpy())
            table = part_table([meta for _, _, meta in samples], np.concatenate(zs),
                               np.concatenate(xts) if xts else None, self.covariates)
            write_part(self.out, part, table)
            done.append((part, len(samples), time.perf_counter() - start))
        return {"part": np.array([d[0] for d in done]), "rows": np.array([d[1] for d in done]),
                "seconds": np.array([d[2] for d in done])}


def plan(manifest: dict, fingerprint: str, size: int) -> list[dict]:
    """Every (shard, chunk of `size` samples) unit of the manifest with its part name."""
    units = []
    for shard in manifest["shards"]:
        stem = shard["name"].rsplit(".", 1)[0]
        for chunk in range(math.ceil(shard["samples"] / size)):
            units.append({"shard": shard["name"], "chunk": chunk, "part": f"{stem}-c{chunk:04d}-{fingerprint}.parquet",
                          "rows": min(size, shard["samples"] - chunk * size)})
    return units


def encode(checkpoint: str, data_uri: str, output_uri: str, cfg: EncodeConfig) -> dict:
    """Encode every sample under `data_uri` into Parquet parts under `output_uri`; returns the index."""
    identity = model_identity(checkpoint, "encode", *(["invert"] if cfg.invert else []))
    ensure_ray()
    configure_data()
    manifest = read_manifest(data_uri)
    settings = {"checkpoint": identity["checkpoint"], "invert": cfg.invert,
                "invert_steps": cfg.invert_steps if cfg.invert else None, "chunk": cfg.chunk,
                "data": [s["name"] for s in manifest["shards"]]}
    fingerprint = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    out = Storage(output_uri)
    units = plan(manifest, fingerprint, cfg.chunk)
    out.remove_partial()
    finished = finished_parts(out)
    todo = [u for u in units if u["part"] not in finished]
    total_rows = sum(u["rows"] for u in units)
    print(f"[encode] {len(units) - len(todo)}/{len(units)} parts already written; encoding {len(todo)} "
          f"({sum(u['rows'] for u in todo):,} images){' with DDIM inversion' if cfg.invert else ''}", flush=True)
    fan_out("encode", todo, ChunkEncoder, {"checkpoint": checkpoint, "data_uri": data_uri, "output_uri": out.uri,
                                           "cfg": cfg.model_dump(), "covariates": manifest["covariates"]},
            cfg, out, count="rows", what="images")
    index = {"format": FORMAT, "checkpoint": identity["checkpoint"], "model": identity, "data": Storage(data_uri).uri,
             "z_dim": identity["z_dim"], "image_size": manifest["preprocessing"]["size"],
             "invert_steps": settings["invert_steps"], "label_vocabulary": manifest["label_vocabulary"],
             "covariates": manifest["covariates"], "parts": [u["part"] for u in units], "rows": total_rows,
             "fingerprint": fingerprint}
    out.write_bytes(INDEX, json.dumps(index, indent=1).encode())
    stale = finished_parts(out) - set(index["parts"])
    for name in sorted(stale):  # parts of earlier settings: superseded by this index
        out.delete(f"parts/{name}")
    print(f"[encode] wrote {total_rows:,} encodings in {len(units)} parts -> {out.uri}/{INDEX}", flush=True)
    return index

