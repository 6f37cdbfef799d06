"""Ingest: inputs (a folder, optionally with a dataset's metadata table) -> de-identified shards.

Plan (driver): list inputs in a fixed order, group them by split (when the metadata gives it)
into shard tasks of `shard_samples` inputs, each named by a fingerprint of its inputs and settings.
Build (Ray Data `map`, one task per shard, in parallel): read -> decode -> de-identify -> fit to
a square -> PNG-16 -> tar -> atomic write -> part record. A shard whose part record carries the
same fingerprint is reused, so reruns and resumed crashed runs redo only missing work.
Finish (driver): manifest.json + rejects.jsonl from the part records, then drop stale objects.
"""
from __future__ import annotations

import io
import json
import os
import time
from pathlib import Path
from typing import Callable

import numpy as np
import ray

from cxrray import __version__
from cxrray.data.settings import DecodeConfig, IngestConfig, resolve_salt
from cxrray.data import shards
from cxrray.data.deid import salted_hash, sample_key
from cxrray.data.dicom import RejectError, decode_file, header_identifiers
from cxrray.data.imaging import encode_png16, fit_square
from cxrray.data.splits import patient_split
from cxrray.data.text_deid import (
    KnownIdentifiers, TextDeidConfig, cap_age, for_patient, known_from_row, scrub_message,
)
from cxrray.data.storage import Storage
from cxrray.runtime import ensure_ray

Progress = Callable[[str], None]


def ingest(input_dir: str | os.PathLike, output_uri: str, cfg: IngestConfig, *, source: str | None = None,
           metadata: str | os.PathLike | None = None, source_options: dict | None = None,
           progress: Progress = print) -> dict:
    """Run one ingest; returns the manifest written to `output_uri`."""
    root = Path(input_dir).expanduser().resolve()
    if not root.is_dir():
        raise NotADirectoryError(f"--input {input_dir}: not a directory")
    salt = resolve_salt(cfg)
    store = Storage(output_uri)
    table = None
    if source:
        from cxrray.data.sources import load_source

        table = load_source(source, metadata, seed=cfg.split_seed, fractions=cfg.split_fractions,
                            **(source_options or {}))
    findings = list(table.findings) if table is not None else []
    covariates = sorted({k for c in table.meta["covariates"] for k in c}) if table is not None else []
    masks = sorted({k for m in table.meta["masks"] for k in m}) if table is not None and "masks" in table.meta else []
    pairs = sorted({k for m in table.meta["pairs"] for k in m}) if table is not None and "pairs" in table.meta else []
    dataset = table.name if table is not None and cfg.dataset == "custom" else cfg.dataset
    preprocessing = {"size": cfg.size, "fit": cfg.fit, "decode": cfg.decode.model_dump(mode="json"),
                     "png_bits": 16, "photometric": "MONOCHROME2", "model_range": [-1.0, 1.0]}
    split_rule = {"level": "patient", "seed": cfg.split_seed, "fractions": cfg.split_fractions,
                  "from_metadata": table is not None}
    items = _list_inputs(root, table)
    ensure_ray()
    text_cfg = cfg.text.resolved()
    context = {"root": str(root), "out": store.uri, "salt": salt, "dataset": dataset, "findings": findings,
               "text": text_cfg.model_dump(),
               "size": cfg.size, "fit": cfg.fit, "decode": cfg.decode.model_dump(), "masks": masks,
               "pairs": pairs,
               "split_seed": cfg.split_seed, "split_fractions": cfg.split_fractions}
    tasks = _plan(items, root, cfg.shard_samples, fingerprint_base={
        "format": shards.FORMAT, "preprocessing": preprocessing, "split_rule": split_rule, "dataset": dataset,
        "findings": findings, "masks": masks, "pairs": pairs, "salt_tag": salted_hash("fingerprint", salt, "salt"),
        "text_deid": salted_hash(json.dumps(text_cfg.model_dump(), sort_keys=True), salt, "text")})
    progress(f"[ingest] {len(items)} inputs -> {len(tasks)} shards at {store.uri}")
    parts = _run_tasks(tasks, context, progress)
    meta_rejects = [{"path": None, "row": r["row"], "code": "metadata_row", "reason": f"metadata_row: {r['reason']}"}
                    for r in (table.rejects if table is not None else [])]
    manifest, rejects = shards.build_manifest(
        parts, meta_rejects, dataset=dataset, findings=findings, covariates=covariates,
        preprocessing=preprocessing, split_rule=split_rule, version=__version__)
    shards.write_if_changed(store, shards.REJECTS, b"".join(json.dumps(r, sort_keys=True).encode() + b"\n" for r in rejects))
    shards.write_if_changed(store, shards.MANIFEST, shards.dumps(manifest))
    removed = shards.remove_stale(store, {t["shard"] for t in tasks})
    progress(f"[ingest] wrote {manifest['samples']} samples in {len(manifest['shards'])} shards, "
             f"{manifest['rejected']} rejected {manifest['rejects_by_reason']}"
             + (f", removed {removed} stale objects" if removed else ""))
    return manifest


def _list_inputs(root: Path, table) -> list[dict]:
    """Without a table every regular, non-hidden file under root is an input; with one, its rows."""
    if table is None:
        files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*")
                       if p.is_file() and not any(part.startswith(".") for part in p.relative_to(root).parts))
        return [{"rel": rel, "row": None} for rel in files]
    items = []
    for i, row in enumerate(table.meta.to_dict("records")):
        row = {k: (None if _is_nan(v) else v) for k, v in row.items()}
        row["labels"] = [float(x) for x in table.labels[i]]
        items.append({"rel": row.pop("path"), "row": row})
    return sorted(items, key=lambda it: it["rel"])


def _is_nan(value) -> bool:
    return isinstance(value, float) and value != value


def _plan(items: list[dict], root: Path, shard_samples: int, fingerprint_base: dict) -> list[dict]:
    groups: dict[str, list[dict]] = {}
    for item in items:
        split = (item["row"] or {}).get("split") or "all"
        groups.setdefault(split, []).append(item)
    tasks = []
    for split in sorted(groups):
        group = groups[split]
        for n, start in enumerate(range(0, len(group), shard_samples)):
            chunk = group[start : start + shard_samples]
            stats = [(rel, *_stat(root / rel)) for it in chunk
                     for rel in [it["rel"], *sorted(((it["row"] or {}).get("masks") or {}).values()),
                                 *sorted(p for p in ((it["row"] or {}).get("pairs") or {}).values() if p)]]
            fp = shards.sha256(json.dumps({"base": fingerprint_base, "stats": stats,
                                           "rows": [it["row"] for it in chunk]}, sort_keys=True, default=str).encode())
            # content-addressed name: an older manifest never points at a shard a later run rewrote
            tasks.append({"shard": f"{split}-{n:06d}-{fp[:12]}.tar", "fingerprint": fp, "items": chunk})
    return tasks


def _stat(path: Path) -> tuple[int, int]:
    """(size, mtime_ns) of an input, (-1, -1) if missing: part of the shard fingerprint."""
    try:
        st = path.stat()
    except OSError:
        return -1, -1
    return st.st_size, st.st_mtime_ns


def _run_tasks(tasks: list[dict], context: dict, progress: Progress) -> list[dict]:
    if not tasks:
        return []
    started = time.time()
    ds = ray.data.from_items([{"task": json.dumps(t)} for t in tasks], override_num_blocks=len(tasks))
    ds = ds.map(build_shard, fn_kwargs={"context": context}, num_cpus=1)
    parts, done_inputs = [], 0
    for row in ds.iter_rows():
        part = json.loads(row["part"])
        parts.append(part)
        done_inputs += part["samples"] + len(part["rejects"])
        rate = done_inputs / max(time.time() - started, 1e-9)
        progress(f"[ingest] {part['name']}: {part['samples']} samples, {len(part['rejects'])} rejected"
                 f"{' (reused)' if part.get('reused') else ''} [{len(parts)}/{len(tasks)} shards, {rate:.0f} inputs/s]")
    return sorted(parts, key=lambda p: p["name"])


def build_shard(row: dict, context: dict) -> dict:
    """Ray Data map function: one shard task (JSON) -> its part record (JSON)."""
    task = json.loads(row["task"])
    store = Storage(context["out"])
    name = task["shard"]
    existing = shards.reusable_part(store, name, task["fingerprint"])
    if existing:
        return {"part": json.dumps({**existing, "reused": True})}
    samples, rejects = [], []
    for item in task["items"]:
        try:
            samples.append(_make_sample(item, context))
        except RejectError as err:
            rejects.append({"path": item["rel"], "code": err.code, "reason": err.reason})
        except Exception as exc:  # never lose the rest of the shard to one input
            reason = scrub_message(f"internal_error: {type(exc).__name__}: {str(exc)[:200]}",
                                   known_from_row(item["row"] or {}))
            rejects.append({"path": item["rel"], "code": "internal_error", "reason": reason})
    part = shards.write_shard(store, name, task["fingerprint"], samples, rejects, context["findings"])
    return {"part": json.dumps(part)}


def _make_sample(item: dict, context: dict) -> tuple[str, bytes, dict, dict[str, bytes]]:
    rel, row = item["rel"], item["row"] or {}
    try:
        data = Path(context["root"], rel).read_bytes()
    except FileNotFoundError:
        raise RejectError("missing_file", "listed in the metadata but not found under --input") from None
    except IsADirectoryError:
        raise RejectError("missing_file", "is a directory") from None
    try:
        decoded = decode_file(data, DecodeConfig(**context["decode"]))
    except RejectError as err:  # a decoder's message may quote header values
        raise RejectError(err.code, scrub_message(err.detail, header_identifiers(data) + known_from_row(row))) from None
    pixels = fit_square(decoded.pixels, context["size"], context["fit"])
    salt, header, identity = context["salt"], decoded.header, decoded.identity
    patient_raw = row.get("patient") or identity.get("patient") or rel
    study_raw = row.get("study") or identity.get("study") or rel
    split = row.get("split") or patient_split(str(patient_raw), context["split_fractions"], context["split_seed"])
    deidentify = for_patient(TextDeidConfig(**context["text"]), identity.get("known", KnownIdentifiers()) + known_from_row(row),
                             str(patient_raw), salt)
    meta = {
        "key": sample_key(rel, salt),
        "dataset": context["dataset"],
        "patient": salted_hash(str(patient_raw), salt, "patient"),
        "study": salted_hash(str(study_raw), salt, "study"),
        "view": row.get("view") or header.get("view"),
        "sex": row.get("sex") or header.get("sex"),
        "age": cap_age(row.get("age") if row.get("age") is not None else header.get("age")),
        "labels": row.get("labels", []),
        "covariates": row.get("covariates") or {},
        "report": deidentify(row.get("report")),
        "split": split,
        "source": {"sha256": shards.sha256(data), "shape": header.get("source_shape"),
                   "photometric": header.get("photometric"), "transfer_syntax": header.get("transfer_syntax")},
    }
    extras = {**_masks(row.get("masks") or {}, decoded.pixels.shape, context),
              **_pairs(row.get("pairs") or {}, decoded.pixels.shape, context, known_from_row(row))}
    return meta["key"], encode_png16(pixels), meta, extras


def _pairs(pairs: dict[str, str | None], shape: tuple[int, int], context: dict, known: list) -> dict[str, bytes]:
    """Each paired image (`image:NAME`: same grid as the image) decoded and fitted exactly like the image ->
    extra member `NAME.png` (16-bit). Only its pixels are read: no header value of it leaves ingest. A blank,
    missing, undecodable or misaligned pair rejects the sample."""
    out = {}
    for name in context["pairs"]:
        rel = pairs.get(name)
        if not rel:
            raise RejectError("missing_pair", f"no paired image {name!r} (blank image:{name} cell)")
        try:
            data = Path(context["root"], rel).read_bytes()
            decoded = decode_file(data, DecodeConfig(**context["decode"]))
        except (FileNotFoundError, IsADirectoryError):
            raise RejectError("missing_pair", f"paired image {name!r} ({rel}) not found under --input") from None
        except RejectError as err:
            raise RejectError("invalid_pair", scrub_message(f"paired image {name!r}: {err.detail}",
                                                            header_identifiers(data) + known)) from None
        except Exception as exc:  # a decoder's or the OS's message may quote the pair's header or path
            detail = f"paired image {name!r}: {type(exc).__name__}: {str(exc)[:200]}"
            raise RejectError("invalid_pair", scrub_message(detail, _pair_identifiers(rel, context) + known)) from None
        if decoded.pixels.shape != tuple(shape):
            raise RejectError("invalid_pair", f"paired image {name!r} is {decoded.pixels.shape[0]}x"
                                              f"{decoded.pixels.shape[1]}, the image {shape[0]}x{shape[1]}")
        out[f"{name}.png"] = encode_png16(fit_square(decoded.pixels, context["size"], context["fit"]))
    return out


def _pair_identifiers(rel: str, context: dict) -> list:
    """The identifiers in a paired file's header, if it can be read at all (for scrubbing messages)."""
    try:
        return header_identifiers(Path(context["root"], rel).read_bytes())
    except Exception:  # unreadable: its message carries no header value
        return []


def _masks(masks: dict[str, str], shape: tuple[int, int], context: dict) -> dict[str, bytes]:
    """Each mask PNG (on the source image's pixel grid) through the image's own geometry -> extra member
    `mask_NAME.png` (8-bit, 255 inside), for every mask name of the ingest (a blank cell: an empty mask, so
    every sample has the same members). A missing or misaligned mask rejects the sample."""
    from PIL import Image

    out = {}
    for name in context["masks"]:
        rel = masks.get(name)
        if rel is None:
            out[f"mask_{name}.png"] = _png8(np.zeros((context["size"], context["size"]), bool))
            continue
        try:
            mask = np.asarray(Image.open(Path(context["root"], rel)).convert("L")) > 127
        except (OSError, ValueError) as exc:
            raise RejectError("invalid_mask", f"mask {name!r} ({rel}) is not a readable PNG: {type(exc).__name__}") from None
        if mask.shape != tuple(shape):
            raise RejectError("invalid_mask", f"mask {name!r} is {mask.shape[0]}x{mask.shape[1]}, "
                                              f"the image {shape[0]}x{shape[1]}")
        out[f"mask_{name}.png"] = _png8(fit_square(mask.astype(np.float32), context["size"], context["fit"]) > 0.5)
    return out


def _png8(mask: np.ndarray) -> bytes:
    """bool [S, S] -> 8-bit PNG, 255 inside."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buf, format="PNG")
    return buf.getvalue()


def prepare_image(data: bytes, cfg: IngestConfig) -> "np.ndarray":
    """One uploaded/explained file (DICOM, PNG, JPEG bytes) -> float32 [S, S] in [-1, 1], exactly what
    ingest + stream would give the model (same decoder, geometry and 16-bit quantisation). Raises
    RejectError like ingest does; the header and identity are dropped here."""
    from cxrray.data.imaging import model_input

    return model_input(decode_file(data, cfg.decode).pixels, cfg.size, cfg.fit)
