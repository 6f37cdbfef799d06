"""CheXpert adapter.

Reads `train.csv` / `valid.csv`: `Path, Sex, Age, Frontal/Lateral, AP/PA` + the 14 findings columns, values
1.0 / 0.0 / -1.0 (uncertain, mapped by the `uncertain` policy) / blank (NaN). Findings are the known finding
columns present in the file, in file order. Patient and study come from the path
(`CheXpert-v1.0-small/train/patient00001/study1/view1_frontal.jpg`); the leading `CheXpert-v1.0*` folder is dropped,
so paths are relative to the folder holding the CSV (`train/patient00001/study1/view1_frontal.jpg`), and the study
id is patient-qualified (`patient00001/study1`) because CheXpert numbers studies per patient.
"""
from __future__ import annotations

import os
import re
from typing import Literal, Mapping

from cxrray.data.sources.base import SourceTable
from cxrray.data.sources.common import (
    CHEXPERT_FINDINGS, CsvRows, RowError, assign_splits, check_options, collect, make_table, norm_sex, parse_age,
    parse_label, required,
)
from cxrray.data.splits import DEFAULT_FRACTIONS

_PATIENT = re.compile(r"^patient\d+$")
_STUDY = re.compile(r"^study\d+$")


def parse_path(text: str) -> tuple[str, str, str | None]:
    """(relative path, patient, study or None) from a CheXpert `Path` cell."""
    parts = [p for p in text.replace("\\", "/").split("/") if p not in ("", ".")]
    if parts and parts[0].startswith("CheXpert-v1.0"):
        parts = parts[1:]
    where = next((i for i, p in enumerate(parts) if _PATIENT.match(p)), None)
    if where is None:
        raise RowError(f"column 'Path': no patient folder (patientNNNNN) in {text!r}")
    study = parts[where + 1] if where + 1 < len(parts) and _STUDY.match(parts[where + 1]) else None
    return "/".join(parts), parts[where], f"{parts[where]}/{study}" if study else None


def _view(row: dict[str, str]) -> str | None:
    kind = row.get("Frontal/Lateral", "").lower()
    if kind == "lateral":
        return "LATERAL"
    projection = row.get("AP/PA", "").upper()
    return projection if kind == "frontal" and projection in ("AP", "PA") else None


def load_chexpert(
    metadata: str | os.PathLike,
    *,
    seed: int = 0,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    uncertain: Literal["nan", "positive", "negative"] = "nan",
) -> SourceTable:
    uncertain_value = check_options(fractions, uncertain)
    rows = CsvRows(metadata, required=("Path",))
    findings = [c for c in rows.columns if c in CHEXPERT_FINDINGS]

    def parse(row: dict[str, str], n: int) -> tuple[dict, list[float]]:
        path, patient, study = parse_path(required(row, "Path"))
        labels = [parse_label(row[f], f, uncertain_value) for f in findings]
        record = {"path": path, "patient": patient, "study": study, "view": _view(row),
                  "sex": norm_sex(row.get("Sex", "")), "age": parse_age(row.get("Age", ""))}
        return record, labels

    parsed, rejects = collect(rows, parse)
    records = [record for record, _ in parsed]
    assign_splits(records, fractions, seed)
    return make_table("chexpert", findings, records, [labels for _, labels in parsed], rejects)
