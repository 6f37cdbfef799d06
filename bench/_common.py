"""Helpers shared by the benchmarks: phantom inputs and the final JSON line."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("CXRRAY_SALT", "bench-salt")


def phantoms(folder: Path, n: int, size: int, seed: int = 0) -> Path:
    """Generate (once) n phantom DICOMs of nominal height `size` under folder."""
    from cxrray.data.phantom import PhantomConfig, generate

    if not (folder / "labels.csv").exists() or len((folder / "labels.csv").read_text().splitlines()) != n + 1:
        generate(n, folder, PhantomConfig(size=size, seed=seed))
    return folder


def report(figures: dict) -> None:
    """Human-readable lines, then the figures as one JSON object on the last line."""
    for key, value in figures.items():
        print(f"  {key:>24}: {value}")
    print(json.dumps(figures, sort_keys=True))
