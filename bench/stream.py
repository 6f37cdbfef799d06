"""Shards -> torch batches throughput: cxrray's Ray Data stream vs a plain `webdataset` loop over the
same shards (PNG-16 decode, JSON parse, batch to float [-1, 1]) in the same run, alternating epochs;
figures are medians of the timed epochs after a warm-up epoch (Ray worker start-up excluded).

    python bench/stream.py [--data URI] [--batch 64]   (without --data: ingests 800 phantoms at 256², 8 shards)
    python bench/stream.py --size 64 --images 4000 --render 96 --shard-samples 2000   (64², 2 shards)
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _common import phantoms, report


def plain_loop(urls: list[str], batch: int) -> tuple[int, float]:
    """Baseline: webdataset in one process; returns (images, images/s)."""
    import numpy as np
    import torch
    import webdataset as wds

    from cxrray.data.imaging import decode_png16, png16_to_model

    start, n, buf = time.perf_counter(), 0, []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        buf.append(decode_png16(sample["png"]))
        json.loads(sample["json"])
        if len(buf) == batch:
            n += torch.from_numpy(png16_to_model(np.stack(buf))[:, None]).shape[0]
            buf = []
    n += len(buf)
    return n, n / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data", default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=3, help="timed passes after one warm-up pass each")
    parser.add_argument("--size", type=int, default=256, help="ingested image side (without --data)")
    parser.add_argument("--images", type=int, default=800, help="phantoms to ingest (without --data)")
    parser.add_argument("--render", type=int, default=320, help="phantoms' nominal height (without --data)")
    parser.add_argument("--shard-samples", type=int, default=100, help="samples per shard (without --data)")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "cxrray-bench-stream"))
    args = parser.parse_args()

    from cxrray.config import load_config
    from cxrray.data.ingest import ingest
    from cxrray.data.shards import read_manifest
    from cxrray.data.storage import Storage
    from cxrray.data.stream import stream
    from cxrray.runtime import ensure_ray

    ensure_ray()
    data = args.data
    if data is None:
        root = phantoms(Path(args.workdir) / f"dicom-{args.images}-{args.render}", args.images, args.render)
        data = f"file://{Path(args.workdir) / f'shards-{args.images}-{args.size}-{args.shard_samples}'}"
        ingest(root, data, load_config("paper", [f"ingest.shard_samples={args.shard_samples}",
                                                 f"ingest.size={args.size}"]).ingest, source="folder",
               metadata=root / "labels.csv", progress=lambda line: None)
    store = Storage(data)
    manifest = read_manifest(store)
    urls = [store.url(s["name"]) if store.scheme == "s3" else store.path(s["name"]) for s in manifest["shards"]]
    plain_loop(urls, args.batch)  # warm-up: page cache, imports
    plain_rates, our_rates = [], []
    dataset = stream(data, with_keys=False)
    for epoch in range(args.epochs + 1):  # epoch 0 warms Ray workers up and is not counted
        plain_n, plain = plain_loop(urls, args.batch)
        start, n = time.perf_counter(), 0
        for batch in dataset.iter_torch_batches(batch_size=args.batch):
            n += batch["image"].shape[0]
        assert n == plain_n == manifest["samples"], (n, plain_n, manifest["samples"])
        if epoch:
            plain_rates.append(plain)
            our_rates.append(n / (time.perf_counter() - start))
    plain, ours = sorted(plain_rates)[len(plain_rates) // 2], sorted(our_rates)[len(our_rates) // 2]
    report({"bench": "stream", "images": n, "epochs": args.epochs, "size": manifest["preprocessing"]["size"],
            "batch": args.batch, "shards": len(urls), "cores": int(__import__("ray").cluster_resources().get("CPU", 1)),
            "plain_webdataset_img_s": round(plain, 1), "cxrray_img_s": round(ours, 1), "ratio": round(ours / plain, 3)})


if __name__ == "__main__":
    main()
