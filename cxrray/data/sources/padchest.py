"""PadChest (BIMCV) adapter.

Reads `PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv`: one row per image with `ImageID, ImageDir,
PatientID, PatientBirth, PatientSex_DICOM, Projection, MethodLabel, Labels` (+ optional `StudyID`,
`StudyDate_DICOM` YYYYMMDD, `Report`). `Labels` is a Python-list literal (`"['pleural effusion', ' cardiomegaly']"`)
parsed with `ast.literal_eval`; findings are stripped and lower-cased. Labels are exhaustive per image (listed 1,
otherwise 0), the vocabulary is every distinct finding of the accepted rows, sorted. Image paths are
`{ImageDir}/{ImageID}`.

`protocol="diffchest"` reproduces the DiffChest split: patients with any physician-labelled image are split
70/30 into "finetune"/"test" (the `fractions` option is not used); patients with only `RNN_model` labels are
"pretrain".
"""
from __future__ import annotations

import ast
import os
import re
from typing import Literal, Mapping

from cxrray.data.sources.base import SourceTable
from cxrray.data.sources.common import (
    NAN, CsvRows, RowError, assign_splits, check_options, collect, make_table, multi_hot, norm_sex, norm_view,
    plausible_age, required,
)
from cxrray.data.splits import DEFAULT_FRACTIONS
from cxrray.errors import InputError

DIFFCHEST_FRACTIONS = {"finetune": 0.7, "test": 0.3}
PHYSICIAN = "physician"  # MethodLabel, compared case-insensitively
_YEAR = re.compile(r"^(\d{4})")


def parse_findings(text: str) -> list[str]:
    """Normalised findings of one `Labels` cell; RowError if it is not a list literal of strings."""
    if not text:
        raise RowError("column 'Labels': empty value")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        raise RowError(f"column 'Labels': unparseable list {text!r}") from None
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise RowError(f"column 'Labels': not a list of strings {text!r}")
    return sorted({v.strip().lower() for v in value} - {""})


def _birth_year(text: str) -> float:
    """`PatientBirth` is a year, written '1932' or '1932.0'."""
    try:
        return float(int(float(text)))
    except (ValueError, OverflowError):
        return NAN


def _study_year(text: str) -> float:
    """`StudyDate_DICOM` is YYYYMMDD."""
    match = _YEAR.match(text)
    return float(match.group(1)) if match else NAN


def load_padchest(
    metadata: str | os.PathLike,
    *,
    seed: int = 0,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    uncertain: Literal["nan", "positive", "negative"] = "nan",
    protocol: Literal["random", "diffchest"] = "random",
) -> SourceTable:
    check_options(fractions, uncertain)  # PadChest has no uncertain labels; the option is only validated
    if protocol not in ("random", "diffchest"):
        raise InputError(f"protocol must be one of ['diffchest', 'random'], got {protocol!r}")
    need = ("ImageID", "ImageDir", "PatientID", "Labels") + (("MethodLabel",) if protocol == "diffchest" else ())
    rows = CsvRows(metadata, required=need)

    def parse(row: dict[str, str], n: int) -> tuple[dict, list[str]]:
        findings = parse_findings(row["Labels"])
        age = _study_year(row.get("StudyDate_DICOM", "")) - _birth_year(row.get("PatientBirth", ""))
        record = {
            "path": f"{required(row, 'ImageDir')}/{required(row, 'ImageID')}",
            "patient": required(row, "PatientID"),
            "study": row.get("StudyID") or None,
            "view": norm_view(row.get("Projection", "")),
            "sex": norm_sex(row.get("PatientSex_DICOM", "")),
            "age": plausible_age(age),
            "report": row.get("Report") or None,
            "method": row.get("MethodLabel", ""),
        }
        return record, findings

    parsed, rejects = collect(rows, parse)
    records = [record for record, _ in parsed]
    vocabulary, labels = multi_hot([findings for _, findings in parsed])

    if protocol == "diffchest":
        labelled = {r["patient"] for r in records if r["method"].lower() == PHYSICIAN}
        for r in records:
            r["split"] = None if r["patient"] in labelled else "pretrain"
        fractions = DIFFCHEST_FRACTIONS
    assign_splits(records, fractions, seed)
    return make_table("padchest", vocabulary, records, labels, rejects)
