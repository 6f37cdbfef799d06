"""Dataset adapters: each reads one public dataset's own metadata format and returns a `SourceTable`.

    from cxrray.data.sources import load_source
    table = load_source("chexpert", "/data/CheXpert-v1.0-small/train.csv", uncertain="negative", seed=0)

Every adapter takes the metadata file plus keyword options `seed`, `fractions` (patient-level split fractions)
and `uncertain` ("nan" / "positive" / "negative": what an uncertain label becomes), and some its own
(`padchest`: `protocol`; `mimic`: `reports`, `extension`, `sections`).
"""
from __future__ import annotations

import inspect
import os
from pathlib import Path
from typing import Callable

from cxrray.data.sources.base import SourceTable
from cxrray.data.sources.chexchonet import load_chexchonet
from cxrray.data.sources.chexpert import load_chexpert
from cxrray.data.sources.folder import load_folder
from cxrray.data.sources.mimic import load_mimic
from cxrray.data.sources.nih import load_nih
from cxrray.data.sources.padchest import load_padchest
from cxrray.errors import InputError

SOURCES: dict[str, Callable[..., SourceTable]] = {
    "padchest": load_padchest,
    "chexpert": load_chexpert,
    "mimic": load_mimic,
    "nih": load_nih,
    "chexchonet": load_chexchonet,
    "folder": load_folder,
}


def load_source(name: str, metadata: str | os.PathLike, **options) -> SourceTable:
    """Read `metadata` with the adapter registered as `name`."""
    if name not in SOURCES:
        raise InputError(f"unknown source {name!r}; allowed: {sorted(SOURCES)}")
    if not Path(metadata).is_file():
        raise FileNotFoundError(f"{name} metadata file not found: {metadata}")
    adapter = SOURCES[name]
    allowed = [p for p in inspect.signature(adapter).parameters if p != "metadata"]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise InputError(f"{name}: unknown option(s) {unknown}; allowed: {allowed}")
    return adapter(metadata, **options)


__all__ = ["SOURCES", "SourceTable", "load_source"]
