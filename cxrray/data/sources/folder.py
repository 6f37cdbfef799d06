"""Folder + CSV adapter, for a user's own images and for this project's phantoms.

Reads a CSV that lies in the image folder: `path` (relative to the CSV's folder; required) and optional
`patient` (default: the path), `study`, `sex`, `age`, `view`, `split` (train/val/test; overrides the automatic
split when non-blank), `report`. Columns `ivsd`, `lvidd`, `lvpwd` are echo covariates (cm), `ctr` the
cardiothoracic ratio. A column `mask:NAME`
holds the relative path of the image's mask of NAME (a PNG on the image's pixel grid; blank: none), which
ingest carries into the shards as the extra member `mask_NAME`. A column `image:NAME` holds the relative path
of a paired image of the same grid (e.g. `image:healthy`, the phantom's healthy counterpart), decoded and
fitted exactly like the image and carried as the 16-bit extra member `NAME`; a blank cell rejects the row's
image at ingest (a pair is ground truth, never guessed). Every other column is a finding, in file order,
with values 1 / 0 / blank (NaN). Rows with another label value, an absolute path, a path
escaping the folder or a duplicate path are rejected.
"""
from __future__ import annotations

import os
import posixpath
import re
from typing import Literal, Mapping

from cxrray.data.sources.base import SourceTable
from cxrray.data.sources.common import (
    MEASUREMENTS, CsvRows, RowError, assign_splits, check_options, collect, make_table, norm_sex, norm_split,
    norm_view, parse_age, parse_label, parse_measure,
)
from cxrray.data.members import RESERVED
from cxrray.data.splits import DEFAULT_FRACTIONS
from cxrray.errors import InputError

META = ("path", "patient", "study", "sex", "age", "view", "split", "report")
MASK_PREFIX = "mask:"
PAIR_PREFIX = "image:"
_DRIVE = re.compile(r"^[A-Za-z]:")
_MASK_NAME = re.compile(r"^[a-z][a-z0-9_]{0,25}$")


def relative_path(text: str, column: str = "path") -> str:
    """Normalised POSIX path inside the folder; RowError if blank, absolute or escaping it."""
    if not text:
        raise RowError(f"column {column!r}: empty value")
    path = text.replace("\\", "/")
    if path.startswith("/") or _DRIVE.match(path):
        raise RowError(f"column {column!r}: absolute path {text!r}")
    path = posixpath.normpath(path)
    if path == ".." or path.startswith("../"):
        raise RowError(f"column {column!r}: {text!r} escapes the folder")
    if path == ".":
        raise RowError(f"column {column!r}: {text!r} is the folder itself")
    return path


def load_folder(
    metadata: str | os.PathLike,
    *,
    seed: int = 0,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    uncertain: Literal["nan", "positive", "negative"] = "nan",
) -> SourceTable:
    check_options(fractions, uncertain)  # folder labels have no uncertain value; the option is only validated
    rows = CsvRows(metadata, required=("path",))
    covariates = [c for c in rows.columns if c in MEASUREMENTS]
    masks = [c for c in rows.columns if c.startswith(MASK_PREFIX)]
    bad = [c for c in masks if not _MASK_NAME.match(c[len(MASK_PREFIX):])]
    if bad:
        raise InputError(f"{metadata}: mask column(s) {bad}: the name after 'mask:' must be lower-case letters, "
                         f"digits and _ (at most 26)")
    pairs = [c for c in rows.columns if c.startswith(PAIR_PREFIX)]
    bad = [c for c in pairs if not _MASK_NAME.match(c[len(PAIR_PREFIX):]) or c[len(PAIR_PREFIX):] in RESERVED
           or c[len(PAIR_PREFIX):].startswith("mask_")]
    if bad:
        raise InputError(f"{metadata}: paired image column(s) {bad}: the name after 'image:' must be lower-case "
                         f"letters, digits and _ (at most 26), not start with mask_ nor be one of {sorted(RESERVED)}")
    findings = [c for c in rows.columns if c not in META and c not in MEASUREMENTS and c not in masks + pairs]
    first_row: dict[str, int] = {}

    def parse(row: dict[str, str], n: int) -> tuple[dict, list[float]]:
        path = relative_path(row["path"])
        labels = [parse_label(row[f], f) for f in findings]
        record = {
            "path": path, "patient": row.get("patient") or path, "study": row.get("study") or None,
            "view": norm_view(row.get("view", "")), "sex": norm_sex(row.get("sex", "")),
            "age": parse_age(row.get("age", "")), "report": row.get("report") or None,
            "split": norm_split(row["split"]) if row.get("split") else None,
            "covariates": {c: parse_measure(row[c], c) for c in covariates},
            "masks": {c[len(MASK_PREFIX):]: relative_path(row[c], c) for c in masks if row.get(c)},
            "pairs": {c[len(PAIR_PREFIX):]: relative_path(row[c], c) if row.get(c) else None for c in pairs},
        }
        if path in first_row:
            raise RowError(f"column 'path': duplicate path {path!r} (first at row {first_row[path]})")
        first_row[path] = n
        return record, labels

    parsed, rejects = collect(rows, parse)
    records = [record for record, _ in parsed]
    assign_splits(records, fractions, seed)
    return make_table("folder", findings, records, [labels for _, labels in parsed], rejects)
