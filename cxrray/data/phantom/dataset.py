"""A phantom data set on disk: DICOMs, labels.csv and the reports' planted truth."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import pandas as pd

from .cases import sample_case
from .config import LABELS, PhantomConfig
from .dicom import write_dicom
from .drawing import render
from .report import compose_report

#: labels.csv columns, in order
COLUMNS = ("path", "patient", "study", "sex", "age", "view", "report", "ivsd", "lvidd", "lvpwd") + LABELS
#: per-image de-identification yardstick beside labels.csv: {"path", "phi": {category: [str]}, "clinical": [str]}
TRUTH = "report_truth.jsonl"


def image_name(index: int) -> str:
    """Relative path of image `index` inside a generated set (carries no identifiers)."""
    return f"images/phantom_{index:06d}.dcm"


def generate(
    n: int,
    out_dir: str | os.PathLike,
    cfg: PhantomConfig | None = None,
    progress: Callable[[int, int], None] | None = None,
    start: int = 0,
) -> pd.DataFrame:
    """Write images ``start .. start+n-1`` to ``out_dir/images/`` plus ``out_dir/labels.csv`` and
    ``out_dir/report_truth.jsonl`` (what each report planted: identifiers and clinical sentences).

    labels.csv plays the role of a hospital label export: `patient` / `study` are the raw
    PatientID / AccessionNumber exactly as in the DICOM headers, `report` the free-text report with
    identifying prose in a fraction of them. Returns the table."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    cfg = cfg or PhantomConfig()
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rows, truth = [], []
    for k, index in enumerate(range(start, start + n)):
        case = sample_case(index, cfg)
        rel = image_name(index)
        write_dicom(case, render(case, cfg), out / rel, cfg)
        report = compose_report(case, cfg.report_phi_fraction)
        rows.append({"path": rel, "report": report.text, **case.row()})
        truth.append(json.dumps({"path": rel, "phi": report.phi, "clinical": report.clinical}))
        if progress is not None:
            progress(k + 1, n)
    table = pd.DataFrame(rows, columns=list(COLUMNS))
    for col in LABELS + ("age",):
        table[col] = table[col].astype(int)
    table.to_csv(out / "labels.csv", index=False)
    (out / TRUTH).write_text("".join(line + "\n" for line in truth))
    return table
