"""`cxrray deid report`: how well reports are de-identified, on a set with planted truth.

Without shards it applies exactly what ingest applies to each row's report (the DICOM header's and
the metadata row's identifiers, the pattern rules, the configured date mode) and measures the result;
with `shards_uri` it measures what ingest actually wrote: each sample's report (found by its salted
key) and, for leaks, every byte of every object under the URI (shards, manifest, rejects, parts).
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from cxrray.data.settings import IngestConfig, resolve_salt
from cxrray.data.deid import sample_key
from cxrray.data.dicom import header_identifiers
from cxrray.data.shards import read_tar
from cxrray.data.storage import Storage
from cxrray.data.text_deid import for_patient, known_from_row
from cxrray.eval.deid import concat, measure, read_truth
from cxrray.errors import InputError


def deid_report(input_dir: str | os.PathLike, labels: str | os.PathLike, truth: str | os.PathLike,
                cfg: IngestConfig, shards_uri: str | None = None, header_identifiers_too: bool = True) -> dict:
    """Removal per identifier category and clinical retention (see `cxrray.eval.deid.measure`)."""
    root = Path(input_dir)
    planted = read_truth(truth)
    with open(labels, newline="") as fh:
        rows = {row["path"]: row for row in csv.DictReader(fh) if row.get("path") in planted}
    if not rows:
        raise InputError(f"--labels {labels}: no row whose path is in the truth file {truth}")
    salt = resolve_salt(cfg)
    if shards_uri is None:
        text_cfg = cfg.text.resolved()
        texts = {}
        for path, row in rows.items():
            known = known_from_row(row)
            if header_identifiers_too and (root / path).is_file():
                known = header_identifiers((root / path).read_bytes()) + known
            texts[path] = for_patient(text_cfg, known, str(row.get("patient") or path), salt)(row.get("report"))
        result = measure(planted, texts)
    else:
        store = Storage(shards_uri)
        blobs, by_key = [], {}
        for name in store.list():
            data = store.read_bytes(name)
            blobs.append(data)
            if name.endswith(".tar"):
                for key, _, meta in read_tar(data, name):
                    by_key[key] = meta.get("report")
        texts = {path: by_key[sample_key(path, salt)] for path in rows if sample_key(path, salt) in by_key}
        result = measure(planted, texts, corpus=concat(blobs))
    result["mode"] = ("shards" if shards_uri else "ingest rules") + (
        "" if header_identifiers_too or shards_uri else ", pattern rules only (no header identifiers)")
    return result

