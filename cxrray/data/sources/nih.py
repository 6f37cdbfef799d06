"""NIH ChestX-ray14 adapter.

Reads `Data_Entry_2017.csv` (or `_v2020`): `Image Index, Finding Labels, Follow-up #, Patient ID, Patient Age,
Patient Gender, View Position, ...`. `Finding Labels` is `|`-separated; "No Finding" means every finding negative
and labels are exhaustive (unlisted -> 0). The vocabulary is every distinct finding except "No Finding", sorted.
`Patient Age` is years, sometimes written "058Y"; > 120 or unparseable -> NaN. If `test_list.txt` (one image name
a line) lies beside the CSV, those images are "test" and the other patients are split over the remaining
fractions (train/val, renormalised). Paths are the bare `Image Index`; the dataset has no study ids.
"""
from __future__ import annotations

import os
from typing import Literal, Mapping

from cxrray.data.sources.base import SourceTable
from cxrray.data.sources.common import (
    CsvRows, RowError, assign_splits, check_options, collect, make_table, multi_hot, norm_sex, norm_view, parse_age,
    required, sibling,
)
from cxrray.data.splits import DEFAULT_FRACTIONS
from cxrray.errors import InputError

NO_FINDING = "No Finding"
TEST_LIST = "test_list.txt"


def load_nih(
    metadata: str | os.PathLike,
    *,
    seed: int = 0,
    fractions: Mapping[str, float] = DEFAULT_FRACTIONS,
    uncertain: Literal["nan", "positive", "negative"] = "nan",
) -> SourceTable:
    check_options(fractions, uncertain)  # NIH labels have no uncertain value; the option is only validated
    rows = CsvRows(metadata, required=("Image Index", "Finding Labels", "Patient ID"))
    test_file = sibling(rows.path, TEST_LIST)
    test_images = set(test_file.read_text().split()) if test_file else set()
    if test_file:
        fractions = {name: f for name, f in fractions.items() if name != "test"}
        if not fractions:
            raise InputError(f"{test_file} fixes the test split: fractions need another split, e.g. train/val")

    def parse(row: dict[str, str], n: int) -> tuple[dict, set[str]]:
        image = required(row, "Image Index")
        text = required(row, "Finding Labels")
        findings = {f.strip() for f in text.split("|")} - {"", NO_FINDING}
        if not findings and NO_FINDING not in text:
            raise RowError(f"column 'Finding Labels': no findings in {text!r}")
        record = {
            "path": image, "patient": required(row, "Patient ID"), "view": norm_view(row.get("View Position", "")),
            "sex": norm_sex(row.get("Patient Gender", "")), "age": parse_age(row.get("Patient Age", "")),
            "split": "test" if image in test_images else None,
        }
        return record, findings

    parsed, rejects = collect(rows, parse)
    records = [record for record, _ in parsed]
    vocabulary, labels = multi_hot([findings for _, findings in parsed])
    assign_splits(records, fractions, seed)
    return make_table("nih", vocabulary, records, labels, rejects)
