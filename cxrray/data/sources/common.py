"""Helpers shared by the dataset adapters: CSV rows with row-level rejects, value parsing, table assembly.

Every adapter reads its metadata through `CsvRows` (all cells as stripped strings, `.gz` accepted), parses each
row with a function that raises `RowError` for damaged data, and lets `collect` turn those errors into
`{"row": n, "reason": ...}` rejects, `n` being the 1-based data-row number (header excluded, blank lines skipped).
"""
from __future__ import annotations

import csv
import gzip
import math
import numbers
import os
import re
from pathlib import Path
from typing import Callable, Iterator, Mapping

import numpy as np
import pandas as pd

from cxrray.data.sources.base import META_COLUMNS, SourceTable
from cxrray.data.splits import patient_split
from cxrray.errors import InputError

NAN = float("nan")
UNCERTAIN_POLICIES = {"nan": NAN, "positive": 1.0, "negative": 0.0}
CHEXPERT_FINDINGS = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
ECHO_COVARIATES = ("ivsd", "lvidd", "lvpwd")
#: numeric measurements a folder CSV may carry as covariates: the echo ones (cm) and the cardiothoracic
#: ratio (phantoms record the one they drew)
MEASUREMENTS = ECHO_COVARIATES + ("ctr",)

_SEXES = {"M": "M", "MALE": "M", "F": "F", "FEMALE": "F"}
_VIEWS = {"PA": "PA", "AP": "AP", "AP_HORIZONTAL": "AP", "L": "LATERAL", "LL": "LATERAL", "LATERAL": "LATERAL"}
_SPLITS = {"train": "train", "val": "val", "valid": "val", "validate": "val", "validation": "val", "eval": "val",
           "test": "test"}
_AGE = re.compile(r"^(\d+(?:\.\d*)?)\s*([YMWD]?)$", re.IGNORECASE)
_AGE_UNIT_YEARS = {"": 1.0, "Y": 1.0, "M": 1 / 12, "W": 7 / 365.25, "D": 1 / 365.25}
MAX_AGE = 120.0


class RowError(ValueError):
    """A damaged metadata row; the message names the column and the bad value."""


# ---------------------------------------------------------------- options and files

def check_options(fractions: Mapping[str, float], uncertain: str) -> float:
    """Validate the common options; returns the value that an uncertain (-1) label becomes."""
    if uncertain not in UNCERTAIN_POLICIES:
        raise InputError(f"uncertain must be one of {sorted(UNCERTAIN_POLICIES)}, got {uncertain!r}")
    if not isinstance(fractions, Mapping) or not fractions:
        raise InputError(f"fractions must be a non-empty mapping of split name -> fraction, got {fractions!r}")
    values = list(fractions.values())
    if any(not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 for v in values) or sum(values) <= 0:
        raise InputError(f"fractions must be finite, >= 0 and sum to > 0, got {dict(fractions)}")
    return UNCERTAIN_POLICIES[uncertain]


def existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"metadata file not found: {path}")
    return path


def sibling(path: Path, name: str) -> Path | None:
    """`name` (or `name.gz`) in the folder of `path`, if it exists."""
    for candidate in (path.parent / name, path.parent / f"{name}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _open_text(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    return open(path, encoding="utf-8-sig", newline="")


class CsvRows:
    """Rows of a CSV file as {column: stripped string}; malformed rows are recorded in `self.rejects`."""

    def __init__(self, path: str | os.PathLike, required: tuple[str, ...] = ()):
        self.path = existing_file(path)
        with _open_text(self.path) as f:
            self.columns = [c.strip() for c in next(csv.reader(f), [])]
        missing = [c for c in required if c not in self.columns]
        if missing:
            raise InputError(f"{self.path}: missing required column(s) {missing}; found {self.columns}")
        self.rejects: list[dict] = []

    def __iter__(self) -> Iterator[tuple[int, dict[str, str]]]:
        width = len(self.columns)
        with _open_text(self.path) as f:
            reader = csv.reader(f)
            next(reader, None)
            n = 0
            try:
                for fields in reader:
                    if not fields:
                        continue
                    n += 1
                    if len(fields) > width and not any(x.strip() for x in fields[width:]):
                        fields = fields[:width]
                    if len(fields) != width:
                        self.rejects.append({"row": n, "reason": f"row has {len(fields)} fields, header has {width}"})
                        continue
                    yield n, dict(zip(self.columns, (x.strip() for x in fields)))
            except csv.Error as e:  # e.g. an unterminated quote swallowing the rest of the file
                self.rejects.append({"row": n + 1, "reason": f"unreadable CSV from here on: {e}"})


def collect(rows: CsvRows, parse: Callable[[dict[str, str], int], object]) -> tuple[list, list[dict]]:
    """`parse(row, n)` for every row; RowErrors become rejects. Returns (results, rejects in row order)."""
    results, rejects = [], rows.rejects
    for n, row in rows:
        try:
            results.append(parse(row, n))
        except RowError as e:
            rejects.append({"row": n, "reason": str(e)})
    rejects.sort(key=lambda r: r["row"])
    return results, rejects


# ---------------------------------------------------------------- cell values

def required(row: dict[str, str], column: str) -> str:
    value = row.get(column, "")
    if not value:
        raise RowError(f"column {column!r}: empty value")
    return value


def parse_label(text: str, column: str, uncertain: float | None = None) -> float:
    """'1' -> 1, '0' -> 0, blank -> NaN, '-1' -> `uncertain` when the dataset has uncertain labels (else rejected)."""
    if not text:
        return NAN
    try:
        value = float(text)
    except ValueError:
        value = NAN
    if value in (0.0, 1.0):
        return value
    if value == -1.0 and uncertain is not None:
        return uncertain
    allowed = "1, 0, -1 or blank" if uncertain is not None else "1, 0 or blank"
    raise RowError(f"column {column!r}: bad label value {text!r} (expected {allowed})")


def parse_measure(text: str, column: str) -> float:
    """Non-negative number (e.g. an echo measurement in cm); blank -> NaN, anything else -> RowError."""
    if not text:
        return NAN
    try:
        value = float(text)
    except ValueError:
        raise RowError(f"column {column!r}: non-numeric value {text!r}") from None
    if not math.isfinite(value) or value < 0:
        raise RowError(f"column {column!r}: bad value {text!r} (expected a finite number >= 0)")
    return value


def parse_age(text: str) -> float:
    """Age in years from '58', '58.5' or DICOM-style '058Y'/'006M'; implausible (> 120) or unparseable -> NaN."""
    match = _AGE.match(text or "")
    if not match:
        return NAN
    years = float(match.group(1)) * _AGE_UNIT_YEARS[match.group(2).upper()]
    return years if years <= MAX_AGE else NAN


def plausible_age(years: float) -> float:
    return years if 0 <= years <= MAX_AGE else NAN


def norm_sex(text: str) -> str | None:
    return _SEXES.get((text or "").upper())


def norm_view(text: str) -> str | None:
    return _VIEWS.get((text or "").upper())


def norm_split(text: str, column: str = "split") -> str:
    split = _SPLITS.get(text.lower())
    if split is None:
        raise RowError(f"column {column!r}: bad split {text!r} (expected train/val/test)")
    return split


# ---------------------------------------------------------------- table assembly

def assign_splits(records: list[dict], fractions: Mapping[str, float], seed: int | str) -> None:
    """Fill `split` where it is None with the patient-level split (one hash per patient)."""
    cache: dict[str, str] = {}
    for record in records:
        if record.get("split") is None:
            patient = record["patient"]
            if patient not in cache:
                cache[patient] = patient_split(patient, fractions, seed)
            record["split"] = cache[patient]


def multi_hot(finding_lists: list) -> tuple[list[str], np.ndarray]:
    """(sorted vocabulary, 0/1 matrix) for exhaustive per-image finding lists: listed -> 1, not listed -> 0."""
    vocabulary = sorted(set().union(*finding_lists))
    column = {f: i for i, f in enumerate(vocabulary)}
    labels = np.zeros((len(finding_lists), len(vocabulary)), dtype=np.float32)
    for i, findings in enumerate(finding_lists):
        labels[i, [column[f] for f in findings]] = 1.0
    return vocabulary, labels


def make_table(name: str, findings: list[str], records: list[dict], labels, rejects: list[dict]) -> SourceTable:
    """SourceTable from per-image records (keys of META_COLUMNS; missing ones get their empty value)."""
    columns = {c: pd.Series([r.get(c) for r in records], dtype=object) for c in META_COLUMNS}
    columns["age"] = pd.Series([r.get("age", NAN) for r in records], dtype=np.float64)
    columns["covariates"] = pd.Series([r.get("covariates") or {} for r in records], dtype=object)
    if any(r.get("masks") for r in records):  # {name: path relative to the input folder} per image
        columns["masks"] = pd.Series([r.get("masks") or {} for r in records], dtype=object)
    if any(r.get("pairs") for r in records):  # {name: path relative to the input folder, or None} per image
        columns["pairs"] = pd.Series([r.get("pairs") or {} for r in records], dtype=object)
    labels = np.asarray(labels, dtype=np.float32).reshape(len(records), len(findings))
    return SourceTable(name, list(findings), pd.DataFrame(columns), labels, rejects)
