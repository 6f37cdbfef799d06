"""DICOM -> shards throughput: cxrray's Ray ingest vs a plain single-process pydicom loop doing the
same decode + LUTs + resize + PNG-16 encode over the same files, in the same run. `cxrray_img_s` is a
warm run (Ray workers already started); `cxrray_cold_img_s` includes worker start-up.

    python bench/ingest.py [--n 400] [--dicom-size 512] [--size 256]
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from _common import phantoms, report


def plain_loop(files: list[Path], size: int) -> float:
    """Baseline: one process, no Ray; returns images/s."""
    import numpy as np
    import pydicom
    from pydicom.pixels import apply_modality_lut, apply_voi_lut

    from cxrray.data.imaging import encode_png16, fit_square

    start = time.perf_counter()
    for path in files:
        ds = pydicom.dcmread(path)
        arr = apply_voi_lut(apply_modality_lut(ds.pixel_array, ds), ds).astype(np.float64)
        arr = (arr - arr.min()) / (arr.max() - arr.min())
        if ds.PhotometricInterpretation == "MONOCHROME1":
            arr = 1 - arr
        encode_png16(fit_square(arr.astype(np.float32), size, "pad"))
    return len(files) / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=400)
    parser.add_argument("--dicom-size", type=int, default=512)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "cxrray-bench-ingest"))
    args = parser.parse_args()

    from cxrray.config import load_config
    from cxrray.data.ingest import ingest
    from cxrray.runtime import ensure_ray

    root = phantoms(Path(args.workdir) / f"dicom-{args.n}-{args.dicom_size}", args.n, args.dicom_size)
    files = sorted((root / "images").glob("*.dcm"))
    plain = plain_loop(files, args.size)
    ensure_ray()
    cores = int(__import__("ray").cluster_resources().get("CPU", 1))
    cfg = load_config("tiny", [f"ingest.size={args.size}", f"ingest.shard_samples={max(1, args.n // (4 * cores))}"])
    rates = []
    for attempt in range(2):  # the first run starts Ray's worker processes (cold); the second is warm
        out = Path(args.workdir) / f"shards-{time.time_ns()}"
        start = time.perf_counter()
        manifest = ingest(root, f"file://{out}", cfg.ingest, source="folder", metadata=root / "labels.csv",
                          progress=lambda line: None)
        rates.append(manifest["samples"] / (time.perf_counter() - start))
    cold, ours = rates
    report({"bench": "ingest", "images": manifest["samples"], "dicom_size": args.dicom_size, "size": args.size,
            "cores": cores, "plain_loop_img_s": round(plain, 1), "cxrray_img_s": round(ours, 1),
            "cxrray_cold_img_s": round(cold, 1),
            "ratio": round(ours / plain, 3), "ratio_per_core": round(ours / plain / cores, 3)})


if __name__ == "__main__":
    main()
