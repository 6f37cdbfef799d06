"""MIMIC-CXR (and MIMIC-CXR-JPG) adapter.

`metadata` is `mimic-cxr-2.0.0-metadata.csv[.gz]` (`dicom_id, subject_id, study_id, ViewPosition[, StudyDate]`).
Beside it, each optional (plain or `.gz`):

- `mimic-cxr-2.0.0-chexpert.csv`: `subject_id, study_id` + the 14 CheXpert findings (1 / 0 / -1 / blank); studies
  without a row get all-NaN labels; a damaged row rejects that study's images. Absent: the 14 findings, all NaN.
- `mimic-cxr-2.0.0-split.csv`: `dicom_id, study_id, subject_id, split` (train/validate/test), overriding the
  automatic split (an image missing from it takes its patient's official split, if the patient has one).
- `patients.csv` (MIMIC-IV hosp): `subject_id, gender, anchor_age[, anchor_year]`; age is
  `anchor_age + StudyDate year - anchor_year` when both years are known, else `anchor_age`.
- reports root (option `reports`, default `files/` beside the metadata): `p{sid[:2]}/p{sid}/s{study}.txt`; the report
  is (option `sections`) the FINDINGS section, else IMPRESSION (`"findings"`, default), or Cheff's FINDINGS and
  IMPRESSION joined by a space, either alone if the other is missing (`"findings+impression"`); else None
  (whitespace collapsed).

Image paths: `files/p{sid[:2]}/p{sid}/s{study}/{dicom_id}{extension}` (`extension=".jpg"` for MIMIC-CXR-JPG).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Literal, Mapping

import numpy as np

from cxrray.data.sources.base import SourceTable
from cxrray.data.sources.common import (
    CHEXPERT_FINDINGS, NAN, CsvRows, RowError, assign_splits, check_options, collect, make_table, norm_sex,
    norm_split, norm_view, parse_age, parse_label, plausible_age, required, sibling,
)
from cxrray.data.splits import DEFAULT_FRACTIONS
from cxrray.errors import InputError

LABEL_FILE = "mimic-cxr-2.0.0-chexpert.csv"
SPLIT_FILE = "mimic-cxr-2.0.0-split.csv"
PATIENTS_FILE = "patients.csv"
_HEADER = re.compile(r"^[ \t]*([A-Z][A-Z0-9 /&(),'-]*?)[ \t]*:", re.MULTILINE)


SECTIONS = ("findings", "findings+impression")


def report_section(text: str, sections: str = "findings") -> str | None:
    """FINDINGS section of a MIMIC report, else IMPRESSION (`sections="findings"`), or both joined by a space
    (`"findings+impression"`, Cheff's text); None when neither is there. Any other `HEADER:` ends a section."""
    matches = list(_HEADER.finditer(text))
    found: dict[str, str] = {}
    for match, following in zip(matches, matches[1:] + [None]):
        body = " ".join(text[match.end(): following.start() if following else len(text)].split())
        name = match.group(1).split()[0]
        if name in ("FINDINGS", "IMPRESSION") and body and name not in found:
            found[name] = body
    if sections == "findings+impression":
        return " ".join(found[n] for n in ("FINDINGS", "IMPRESSION") if n in found) or None
    return found.get("FINDINGS") or found.get("IMPRESSION")


def _year(text: str) -> float:
    return float(text[:4]) if text[:4].isdigit() else NAN


def _digits(row: dict[str, str], column: str) -> str:
    value = required(row, column)
    if not value.isdigit():
        raise RowError(f"column {column!r}: bad value {value!r} (expected digits)")
    return value


def _read_labels(path: Path | None, uncertain: float) -> tuple[list[str], dict[str, object]]:
    """(findings, study_id -> label list, or the reason the study's label row is damaged)."""
    if path is None:
        return list(CHEXPERT_FINDINGS), {}
    rows = CsvRows(path, required=("study_id",))
    findings = [c for c in rows.columns if c in CHEXPERT_FINDINGS]
    by_study: dict[str, object] = {}
    for n, row in rows:
        try:
            labels: object = [parse_label(row[f], f, uncertain) for f in findings]
        except RowError as e:
            labels = f"{path.name} row {n}: {e}"
        by_study.setdefault(row["study_id"], labels)
    return findings, by_study


def _read_splits(path: Path | None) -> tuple[dict[str, str], dict[str, str]]:
    """(dicom_id -> split, subject_id -> split) from the official split file; bad values are skipped."""
    by_dicom: dict[str, str] = {}
    by_subject: dict[str, str] = {}
    if path is None:
        return by_dicom, by_subject
    for _, row in CsvRows(path, required=("dicom_id", "subject_id", "split")):
        try:
            split = norm_split(row["split"])
        except RowError:
            continue
        by_dicom[row["dicom_id"]] = split
        by_subject.setdefault(row["subject_id"], split)
    return by_dicom, by_subject


def _read_patients(path: Path | None) -> dict[str, tuple[str | None, float, float]]:
    """subject_id -> (sex, anchor_age, anchor_year)."""
    patients: dict[str, tuple[str | None, float, float]] = {}
    if path is None:
        return patients
    for _, row in CsvRows(path, required=("subject_id",)):
        patients[row["subject_id"]] = (
            norm_sex(row.get("gender", "")), parse_age(row.get("anchor_age", "")), _year(row.get("anchor_year", "")),
        )
    return patients


def load_mimic(
    metadata: str | os.PathLike,
    *,
    seed: int = 0,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    uncertain: Literal["nan", "positive", "negative"] = "nan",
    reports: str | os.PathLike | None = None,
    extension: str = ".dcm",
    sections: Literal["findings", "findings+impression"] = "findings",
) -> SourceTable:
    uncertain_value = check_options(fractions, uncertain)
    if sections not in SECTIONS:
        raise InputError(f"mimic: option sections={sections!r}; allowed: {list(SECTIONS)}")
    rows = CsvRows(metadata, required=("dicom_id", "subject_id", "study_id"))
    findings, labels_by_study = _read_labels(sibling(rows.path, LABEL_FILE), uncertain_value)
    split_by_dicom, split_by_subject = _read_splits(sibling(rows.path, SPLIT_FILE))
    patients = _read_patients(sibling(rows.path, PATIENTS_FILE))
    report_root = Path(reports) if reports is not None else rows.path.parent / "files"
    report_cache: dict[str, str | None] = {}
    unlabelled = [NAN] * len(findings)

    def report(subject: str, study: str) -> str | None:
        if study not in report_cache:
            file = report_root / f"p{subject[:2]}" / f"p{subject}" / f"s{study}.txt"
            report_cache[study] = report_section(file.read_text(errors="replace"), sections) if file.is_file() else None
        return report_cache[study]

    def parse(row: dict[str, str], n: int) -> tuple[dict, list[float]]:
        dicom, subject, study = required(row, "dicom_id"), _digits(row, "subject_id"), _digits(row, "study_id")
        labels = labels_by_study.get(study, unlabelled)
        if isinstance(labels, str):
            raise RowError(labels)
        sex, age, anchor_year = patients.get(subject, (None, NAN, NAN))
        if not np.isnan(anchor_year) and not np.isnan(_year(row.get("StudyDate", ""))):
            age = plausible_age(age + _year(row["StudyDate"]) - anchor_year)
        record = {
            "path": f"files/p{subject[:2]}/p{subject}/s{study}/{dicom}{extension}",
            "patient": subject, "study": study, "view": norm_view(row.get("ViewPosition", "")), "sex": sex,
            "age": age, "report": report(subject, study),
            "split": split_by_dicom.get(dicom) or split_by_subject.get(subject),
        }
        return record, labels

    parsed, rejects = collect(rows, parse)
    records = [record for record, _ in parsed]
    assign_splits(records, fractions, seed)
    return make_table("mimic", findings, records, [labels for _, labels in parsed], rejects)

