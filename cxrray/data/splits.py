"""Deterministic patient-level splits.

A patient's split depends only on (patient id, seed, fractions), never on which other patients are
present, so adding data never moves an existing patient to another split (no leakage across runs).
"""
from __future__ import annotations

import hashlib
from cxrray.errors import InputError
from typing import Mapping

DEFAULT_FRACTIONS: Mapping[str, float] = {"train": 0.8, "val": 0.1, "test": 0.1}


def unit_hash(text: str, seed: int | str = 0) -> float:
    """Uniform number in [0, 1) from a string: sha256-based, stable across processes and machines."""
    digest = hashlib.sha256(f"{seed}\x1f{text}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def patient_split(patient: str, fractions: Mapping[str, float] = DEFAULT_FRACTIONS, seed: int | str = 0) -> str:
    """Split name for one patient; `fractions` are normalised, iterated in the given order."""
    total = float(sum(fractions.values()))
    if total <= 0:
        raise InputError(f"split fractions must sum to > 0, got {dict(fractions)}")
    u = unit_hash(patient, seed) * total
    acc = 0.0
    name = next(iter(fractions))
    for name, frac in fractions.items():
        acc += frac
        if u < acc:
            return name
    return name
