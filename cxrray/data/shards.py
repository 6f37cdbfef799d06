"""Shard format: WebDataset tars of `{key}.png` (16-bit, MONOCHROME2) + `{key}.json` (meta), plus
`manifest.json` and `rejects.jsonl` beside them, and one `_parts/{shard}.json` record per shard.

A part record is written only after its shard object is complete, and the manifest only from part
records, so the manifest never counts an incomplete shard. Everything is byte-deterministic
(fixed tar mtime/owner, sorted JSON) so a rerun of the same ingest rewrites identical bytes.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from collections import Counter
from typing import Any, Iterable

import numpy as np
import webdataset as wds

from cxrray.data.members import split_member
from cxrray.data.tar import read_exact, tar_files
from cxrray.data.storage import Storage
from cxrray.errors import InputError

FORMAT = "cxrray-shards/1"
MANIFEST = "manifest.json"
REJECTS = "rejects.jsonl"
PARTS = "_parts"


def dumps(obj: Any) -> bytes:
    """Canonical JSON (sorted keys, no NaN: NaN/inf become null)."""
    return json.dumps(jsonable(obj), sort_keys=True, indent=1, allow_nan=False).encode("utf-8")


def jsonable(obj: Any) -> Any:
    """Nested data -> plain JSON types: NaN/inf -> None, numpy scalars / arrays -> Python, keys -> str."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple, np.ndarray)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def write_tar(samples: Iterable[tuple]) -> bytes:
    """(key, png_bytes, meta[, extras]) -> tar bytes, deterministic. `extras` maps extra member names
    (`members.py`: "NAME.png" / "NAME.npy" / "NAME.txt") to their bytes."""
    buf = io.BytesIO()
    with wds.TarWriter(buf, user="cxrray", group="cxrray", encoder=False, mtime=0.0) as sink:
        for key, png, meta, *rest in samples:
            extras = rest[0] if rest else {}
            for ext in extras:
                split_member(ext, f"{key}.{ext}")  # refuse to write what the readers would refuse
            sink.write({"__key__": key, "png": png, "json": json.dumps(jsonable(meta), sort_keys=True).encode(),
                        **dict(sorted(extras.items()))})
    return buf.getvalue()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def part_name(shard: str) -> str:
    return f"{PARTS}/{shard}.json"


def load_part(store: Storage, shard: str) -> dict | None:
    try:
        return json.loads(store.read_bytes(part_name(shard)))
    except (FileNotFoundError, OSError, ValueError):
        return None


def reusable_part(store: Storage, shard: str, fingerprint: str) -> dict | None:
    """The part record of `shard` if a run with the same `fingerprint` completed it (object present, same size)."""
    existing = load_part(store, shard)
    if existing and existing["fingerprint"] == fingerprint and (
            existing["samples"] == 0 or (store.exists(shard) and store.size(shard) == existing["bytes"])):
        return existing
    return None


def write_shard(store: Storage, name: str, fingerprint: str, samples: list[tuple], rejects: list[dict],
                findings: list[str]) -> dict:
    """Write the tar of `samples` ((key, png, meta, extras)), then its part record (counts per split,
    patients, positives, members); returns the record. The record is written last: it marks the shard done."""
    part = {"name": name, "fingerprint": fingerprint, "samples": len(samples), "rejects": rejects,
            "sha256": None, "bytes": 0, "splits": {}, "patients": {}, "positives": {}}
    if samples:
        data = write_tar(samples)
        store.write_bytes(name, data)
        part.update(sha256=sha256(data), bytes=len(data))
        part["members"] = sorted({m for *_, extras in samples for m in extras})
        patients: dict[str, set] = {}
        for _, _, meta, _ in samples:
            split = meta["split"]
            part["splits"][split] = part["splits"].get(split, 0) + 1
            patients.setdefault(split, set()).add(meta["patient"])
            for finding, value in zip(findings, meta["labels"]):
                if value == 1:
                    part["positives"][finding] = part["positives"].get(finding, 0) + 1
        part["patients"] = {s: sorted(p) for s, p in patients.items()}
    store.write_bytes(part_name(name), dumps(part))
    return part


def write_if_changed(store: Storage, name: str, data: bytes) -> None:
    """Write unless the object already holds exactly `data` (reruns leave finished outputs untouched)."""
    try:
        if store.read_bytes(name) == data:
            return
    except (FileNotFoundError, OSError):
        pass
    store.write_bytes(name, data)


def remove_stale(store: Storage, shard_names: set[str]) -> int:
    """Delete shard tars / part records of earlier plans that this manifest does not list."""
    keep = shard_names | {part_name(s) for s in shard_names}
    stale = [n for n in store.list() if (n.endswith(".tar") or n.startswith(PARTS + "/")) and n not in keep]
    for name in stale:
        store.delete(name)
    return len(stale)


def build_manifest(parts: list[dict], meta_rejects: list[dict], *, dataset: str, findings: list[str],
                   covariates: list[str], preprocessing: dict, split_rule: dict, version: str) -> tuple[dict, list[dict]]:
    """Manifest + sorted reject records from the part records of one ingest plan."""
    rejects = sorted(meta_rejects + [r for p in parts for r in p["rejects"]],
                     key=lambda r: (r.get("path") or "", r.get("row") or 0))
    split_images: Counter = Counter()
    split_patients: dict[str, set] = {}
    positives: Counter = Counter()
    for part in parts:
        split_images.update(part["splits"])
        for split, patients in part["patients"].items():
            split_patients.setdefault(split, set()).update(patients)
        positives.update(part["positives"])
    shards = [{k: p[k] for k in ("name", "samples", "sha256", "bytes", "splits")} for p in parts if p["samples"]]
    manifest = {
        "format": FORMAT,
        "cxrray_version": version,
        "dataset": dataset,
        "samples": sum(p["samples"] for p in parts),
        "inputs": sum(p["samples"] for p in parts) + len(rejects),
        "rejected": len(rejects),
        "rejects_by_reason": dict(sorted(Counter(r["code"] for r in rejects).items())),
        "shards": shards,
        "label_vocabulary": findings,
        "vocabulary_version": sha256(json.dumps(findings).encode())[:12],
        "covariates": covariates,
        "positives": {f: positives.get(f, 0) for f in findings},
        "splits": {s: {"images": split_images[s], "patients": len(split_patients.get(s, ()))}
                   for s in sorted(split_images)},
        "split_rule": split_rule,
        "preprocessing": preprocessing,
    }
    members = sorted({m for p in parts for m in p.get("members", ())})
    if members:  # extra per-sample members some samples carry (e.g. mask_effusion.png)
        manifest["members"] = members
    return manifest, rejects


def derived_manifest(manifest: dict, parts: list[dict], **extra) -> dict:
    """The manifest of a shard set derived from another's (`manifest`: its vocabulary, preprocessing, latents
    section): its own shards (the part records with samples), sample count, members, positives and per-split
    images and patients from the part records (no rejects: the source's are its own), plus `extra` sections
    saying how it was derived."""
    splits: dict[str, dict] = {}
    for part in parts:
        for split, n in part["splits"].items():
            entry = splits.setdefault(split, {"images": 0, "patients": set()})
            entry["images"] += n
            entry["patients"].update(part["patients"].get(split, ()))
    shards = [{k: p[k] for k in ("name", "samples", "sha256", "bytes", "splits")} for p in parts if p["samples"]]
    members = sorted({m for p in parts for m in p.get("members", ())})
    positives: Counter = Counter()
    for part in parts:
        positives.update(part["positives"])
    samples = sum(s["samples"] for s in shards)
    return {**manifest, "shards": shards, "samples": samples, "inputs": samples, "rejected": 0, "rejects_by_reason": {},
            "positives": {f: positives.get(f, 0) for f in manifest["label_vocabulary"]},
            **({"members": members} if members else {}),
            "splits": {s: {"images": v["images"], "patients": len(v["patients"])} for s, v in sorted(splits.items())},
            **extra}


def read_manifest(uri: str | Storage) -> dict:
    store = uri if isinstance(uri, Storage) else Storage(uri)
    try:
        manifest = json.loads(store.read_bytes(MANIFEST))
    except FileNotFoundError:
        raise FileNotFoundError(f"no {MANIFEST} under {store.uri}: run `cxrray ingest` first") from None
    if manifest.get("format") != FORMAT:
        raise InputError(f"{store.url(MANIFEST)}: format {manifest.get('format')!r}, expected {FORMAT}")
    return manifest


def read_tar(data: bytes, source: str = "shard", extras: bool = False) -> list[tuple]:
    """Tar bytes written by `write_tar` -> [(key, png_bytes, meta)] in stored order, or with `extras`
    [(key, png_bytes, meta, {"NAME.KIND": bytes})]. Only `.png`, `.json` and the extra members of
    `members.py` are accepted (anything else raises: nothing is ever unpickled)."""
    samples: dict[str, dict[str, bytes]] = {}
    f = io.BytesIO(data)
    for name, size in tar_files(f, source):
        key, _, ext = name.partition(".")
        split_member(ext, f"{source}:{name}")
        samples.setdefault(key, {})[ext] = read_exact(f, size, source)
    missing = [k for k, v in samples.items() if not {"png", "json"} <= set(v)]
    if missing:
        raise InputError(f"{source}: samples without both .png and .json: {missing[:5]}")
    if extras:
        return [(k, v.pop("png"), json.loads(v.pop("json")), v) for k, v in samples.items()]
    return [(k, v["png"], json.loads(v["json"])) for k, v in samples.items()]
