"""Helpers shared by the benchmarks: phantom inputs and the final JSON line."""
from __future__ import annotations

import json
import os
import sys
import time
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


def best_rate(fn, images: int, repeats: int) -> float:
    return paired_rates(fn, None, images, repeats)[0]


def paired_rates(fa, fb, images: int, repeats: int) -> tuple[float, float | None]:
    """Best images/s of fa and fb, timed alternately (A B A B ...) so machine noise hits both alike."""
    fns = [f for f in (fa, fb) if f is not None]
    for f in fns:
        f()  # warm-up
    times = [[] for _ in fns]
    for _ in range(repeats):
        for i, f in enumerate(fns):
            start = time.perf_counter()
            f()
            times[i].append(time.perf_counter() - start)
    rates = [images / min(t) for t in times]
    return rates[0], (rates[1] if len(rates) > 1 else None)
