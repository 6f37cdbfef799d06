"""CheXchoNet adapter (chest radiographs paired with echocardiography, PhysioNet).

Reads the metadata CSV: `cxr_filename, patient_id, age, sex, ivsd, lvidd, lvpwd` (+ optional `cxr_path`, used as
the image path when non-blank, and `split` with train/eval/test, overriding the automatic split). The echo
measurements (cm) become `covariates`, and the findings are recomputed from them with the published
sex-specific thresholds (strictly greater than):

- slvh: IVSd or LVPWd > 1.5 (men) / > 1.4 (women)
- dlv: LVIDd > 5.9 (men) / > 5.3 (women)
- composite_slvh_dlv: slvh or dlv

with three-valued logic: a label is NaN when the inputs it needs are missing (or the sex is unknown), but one
known measurement over the threshold is enough for a positive. The metadata has no view column; if one named
`view` is present it is used, else the view is None.
"""
from __future__ import annotations

import math
import os
from typing import Literal, Mapping

from cxrray.data.sources.base import SourceTable
from cxrray.data.sources.common import (
    ECHO_COVARIATES, NAN, CsvRows, assign_splits, check_options, collect, make_table, norm_sex, norm_split,
    norm_view, parse_age, parse_measure, required,
)
from cxrray.data.splits import DEFAULT_FRACTIONS
from cxrray.errors import InputError

FINDINGS = ["slvh", "dlv", "composite_slvh_dlv"]
WALL_THRESHOLD = {"M": 1.5, "F": 1.4}  # IVSd / LVPWd, cm
LVIDD_THRESHOLD = {"M": 5.9, "F": 5.3}  # cm


def _any(values: list[float]) -> float:
    """Kleene OR over 0/1/NaN: 1 if any is 1, NaN if any is unknown, else 0."""
    if any(v == 1.0 for v in values):
        return 1.0
    return NAN if any(math.isnan(v) for v in values) else 0.0


def _above(value: float, threshold: float) -> float:
    return NAN if math.isnan(value) or math.isnan(threshold) else float(value > threshold)


def echo_labels(sex: str | None, ivsd: float, lvidd: float, lvpwd: float) -> list[float]:
    """[slvh, dlv, composite_slvh_dlv] from the measurements (cm) and sex ("M"/"F"/None)."""
    wall, cavity = WALL_THRESHOLD.get(sex, NAN), LVIDD_THRESHOLD.get(sex, NAN)
    slvh = _any([_above(ivsd, wall), _above(lvpwd, wall)])
    dlv = _above(lvidd, cavity)
    return [slvh, dlv, _any([slvh, dlv])]


def load_chexchonet(
    metadata: str | os.PathLike,
    *,
    seed: int = 0,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    uncertain: Literal["nan", "positive", "negative"] = "nan",
) -> SourceTable:
    check_options(fractions, uncertain)  # echo-derived labels are never uncertain; the option is only validated
    rows = CsvRows(metadata, required=("patient_id",) + ECHO_COVARIATES)
    if "cxr_filename" not in rows.columns and "cxr_path" not in rows.columns:
        raise InputError(f"{rows.path}: needs a 'cxr_filename' or 'cxr_path' column; found {rows.columns}")

    def parse(row: dict[str, str], n: int) -> tuple[dict, list[float]]:
        path = row.get("cxr_path") or required(row, "cxr_filename")
        covariates = {c: parse_measure(row[c], c) for c in ECHO_COVARIATES}
        sex = norm_sex(row.get("sex", ""))
        split = row.get("split", "")
        record = {
            "path": path.replace("\\", "/"), "patient": required(row, "patient_id"),
            "view": norm_view(row.get("view", "")), "sex": sex, "age": parse_age(row.get("age", "")),
            "covariates": covariates, "split": norm_split(split) if split else None,
        }
        return record, echo_labels(sex, **covariates)

    parsed, rejects = collect(rows, parse)
    records = [record for record, _ in parsed]
    assign_splits(records, fractions, seed)
    return make_table("chexchonet", FINDINGS, records, [labels for _, labels in parsed], rejects)
