"""The one contract every dataset adapter returns (torchxrayvision-style).

`SourceTable.meta` has one row per image, in the same order as `labels` rows:

| column    | type            | meaning                                                              |
|-----------|-----------------|----------------------------------------------------------------------|
| path      | str             | image path relative to the dataset's image root (POSIX separators)   |
| patient   | str             | raw patient id from the metadata (stays in-process; ingest hashes it)|
| study     | str or None     | raw study id, if the dataset has one                                 |
| view      | str or None     | normalised view: "PA", "AP", "LATERAL", or None if unknown          |
| sex       | "M"/"F"/None    |                                                                      |
| age       | float or NaN    | years                                                                |
| split     | str             | patient-level split name ("train"/"val"/"test", or a protocol's own) |
| report    | str or None     | free-text report (MIMIC: FINDINGS, else IMPRESSION)                  |
| covariates| dict[str,float] | tabular covariates (echo measurements in cm), {} if none             |

`labels` is float32 [n_images, n_findings]: 1 positive, 0 negative, NaN unknown, columns aligned
with `findings`. `rejects` lists damaged metadata rows: {"row": 1-based data-row number, "reason": str}.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
from cxrray.errors import InputError

META_COLUMNS = ("path", "patient", "study", "view", "sex", "age", "split", "report", "covariates")
FRONTAL_VIEWS = frozenset({"PA", "AP"})


@dataclass
class SourceTable:
    name: str
    findings: list[str]
    meta: pd.DataFrame
    labels: np.ndarray
    rejects: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        missing = [c for c in META_COLUMNS if c not in self.meta.columns]
        if missing:
            raise InputError(f"{self.name}: metadata table lacks columns {missing}")
        if self.labels.shape != (len(self.meta), len(self.findings)):
            raise InputError(
                f"{self.name}: labels shape {self.labels.shape} != ({len(self.meta)}, {len(self.findings)})"
            )
        self.meta = self.meta.reset_index(drop=True)
        self.labels = self.labels.astype(np.float32, copy=False)

    def __len__(self) -> int:
        return len(self.meta)

    def subset(self, mask: np.ndarray) -> "SourceTable":
        """Rows where `mask` is true, labels kept aligned; rejects carried over."""
        mask = np.asarray(mask, dtype=bool)
        return SourceTable(self.name, list(self.findings), self.meta[mask].copy(), self.labels[mask], list(self.rejects))

    def frontal(self) -> "SourceTable":
        """Frontal (PA/AP) views only."""
        return self.subset(self.meta["view"].isin(FRONTAL_VIEWS).to_numpy())

    def split(self, name: str) -> "SourceTable":
        return self.subset((self.meta["split"] == name).to_numpy())

    def summary(self) -> dict:
        """Counts for `cxrray sources summary` (JSON-serialisable)."""
        splits = {}
        for name, group in self.meta.groupby("split", sort=True):
            splits[str(name)] = {"images": int(len(group)), "patients": int(group["patient"].nunique())}
        positives = np.nansum(self.labels == 1, axis=0) if len(self.findings) else []
        return {
            "source": self.name,
            "images": int(len(self.meta)),
            "patients": int(self.meta["patient"].nunique()),
            "frontal_images": int(self.meta["view"].isin(FRONTAL_VIEWS).sum()),
            "findings": len(self.findings),
            "rejected_rows": len(self.rejects),
            "splits": splits,
            "positives": {f: int(p) for f, p in zip(self.findings, positives)},
        }
