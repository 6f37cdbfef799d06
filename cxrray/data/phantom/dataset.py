"""A phantom data set on disk: DICOMs, labels.csv, the reports' planted truth and, with
`PhantomConfig.masks`, the ground truth of where findings are: each drawn label's mask and the lung fields
(8-bit PNG, 255 inside; columns `mask:NAME`) and the healthy counterpart (the case without its findings,
devices kept, as a DICOM windowed like the image so both decode on one intensity scale; column
`image:healthy`)."""
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
from .masks import DRAWN, finding_masks, healthy, lung_mask
from .report import compose_report

#: labels.csv columns, in order
COLUMNS = ("path", "patient", "study", "sex", "age", "view", "report", "ivsd", "lvidd", "lvpwd", "ctr") + LABELS
#: per-image de-identification yardstick beside labels.csv: {"path", "phi": {category: [str]}, "clinical": [str]}
TRUTH = "report_truth.jsonl"


def image_name(index: int) -> str:
    """Relative path of image `index` inside a generated set (carries no identifiers)."""
    return f"images/phantom_{index:06d}.dcm"


def mask_name(index: int, label: str) -> str:
    """Relative path of image `index`'s mask of `label`."""
    return f"masks/phantom_{index:06d}.{label}.png"


def healthy_name(index: int) -> str:
    """Relative path of image `index`'s healthy counterpart (a DICOM)."""
    return f"counterparts/phantom_{index:06d}.healthy.dcm"


#: the masks written beside the drawn labels', and the paired-image column of the healthy counterpart
LUNGS, HEALTHY_COLUMN = "lungs", "image:healthy"


def mask_column(label: str) -> str:
    """The labels.csv column holding `label`'s mask path (blank when the image has none)."""
    return f"mask:{label}"


def _write_mask(mask, path: Path) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype("uint8") * 255).save(path, format="PNG")


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
        image = render(case, cfg)
        write_dicom(case, image, out / rel, cfg)
        report = compose_report(case, cfg.report_phi_fraction)
        row = {"path": rel, "report": report.text, **case.row()}
        if cfg.masks:
            masks = {**finding_masks(case, cfg, image), LUNGS: lung_mask(case, cfg)}
            for label, mask in masks.items():
                _write_mask(mask, out / mask_name(index, label))
                row[mask_column(label)] = mask_name(index, label)
            well = healthy(case)
            write_dicom(well, render(well, cfg), out / healthy_name(index), cfg, window_of=image)
            row[HEALTHY_COLUMN] = healthy_name(index)
        rows.append(row)
        truth.append(json.dumps({"path": rel, "phi": report.phi, "clinical": report.clinical}))
        if progress is not None:
            progress(k + 1, n)
    ground_truth = [mask_column(k) for k in (*DRAWN, LUNGS)] + [HEALTHY_COLUMN]
    table = pd.DataFrame(rows, columns=list(COLUMNS) + (ground_truth if cfg.masks else []))
    for col in LABELS + ("age",):
        table[col] = table[col].astype(int)
    table.to_csv(out / "labels.csv", index=False)
    (out / TRUTH).write_text("".join(line + "\n" for line in truth))
    return table
