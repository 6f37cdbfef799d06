"""Serving /v1/classify (tiny model, CPU): latency and throughput through Ray Serve with dynamic batching
off (max_batch_size 1) and on, under one and concurrent clients, and Serve's added latency against the
same decode + model + head called directly in this process.

    python bench/serve.py                      # 200 requests per setting, 16 concurrent, batch 1 vs 8
    python bench/serve.py --no-access-log      # the same with Serve's per-request access log off

Inputs are phantom DICOMs (nominal height 256, cycled); the model is the tiny preset (64²) with seeded
random weights and a random probe (speed does not depend on training). Serve runs on a local Ray with
its proxy on 127.0.0.1 and one ingress + one classifier replica; every request is a real multipart
upload, parsed by the ingress and decoded in the batched Classifier replica. "direct" is the same work
sequentially in one process, no HTTP; "direct_model_b<B>" is the model + head alone at batch B (ms per
image: the most batching can win on this CPU); "healthz" is the proxy + ingress hops with no model call;
"handle" drives the Classifier deployment alone through its handle (raw uploads, no HTTP), which
isolates what dynamic batching changes from the ingress and proxy costs.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import phantoms, report

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def build_artifacts(root: Path, files: list[bytes], size: int) -> tuple[str, str]:
    """A tiny-preset checkpoint (seeded random init) and a random probe head over the phantom findings."""
    import numpy as np
    import torch

    from cxrray.config import DecodeConfig, load_config
    from cxrray.data.phantom import FINDINGS
    from cxrray.families.diffae.network import DiffAE
    from cxrray.pipelines.diffchest.head import LinearHead
    from cxrray.serve.uploads import prepare_image
    from cxrray.io.checkpoint import save_weights

    cfg = load_config("tiny", [f"model.image_size={size}"])
    torch.manual_seed(0)
    model = DiffAE(cfg.model).eval()
    ckpt = root / "ckpt"
    ckpt.mkdir(parents=True, exist_ok=True)
    for name in ("ema.safetensors", "model.safetensors"):
        save_weights(model, ckpt / name)
    (ckpt / "state.json").write_text(json.dumps({"images_shown": 0, "model": cfg.model.model_dump(mode="json")}))
    (ckpt / "COMPLETE").write_text("")
    x = torch.from_numpy(np.stack([prepare_image(f, size, "pad", DecodeConfig(), 10**8) for f in files[:8]]))[:, None]
    with torch.no_grad():
        z = model.encode(x).numpy()
    rng = np.random.default_rng(0)
    weight = rng.normal(size=(len(FINDINGS), z.shape[1])).astype(np.float32) / 8
    LinearHead(list(FINDINGS), weight, np.zeros(len(FINDINGS), np.float32), z.mean(0), z.std(0) + 1e-3,
               pattern=weight).save(root / "probe")
    return str(ckpt), str(root / "probe")


def mean_batch(before: dict, after: dict) -> float:
    """Mean classifier batch size between two snapshots of its {size: count} histogram."""
    counts = {int(k): v - before.get(k, 0) for k, v in after.items()}
    return round(sum(k * v for k, v in counts.items()) / max(1, sum(counts.values())), 2)


def stats(latencies: list[float], wall: float) -> dict:
    ms = sorted(1000 * t for t in latencies)
    return {"p50_ms": round(statistics.median(ms), 1), "p99_ms": round(ms[min(len(ms) - 1, int(0.99 * len(ms)))], 1),
            "req_s": round(len(ms) / wall, 1)}


def direct(files: list[bytes], ckpt: str, probe: str, size: int, n: int) -> dict:
    from cxrray.config import DecodeConfig
    from cxrray.serve.models import ModelService
    from cxrray.serve.uploads import prepare_image

    service = ModelService(ckpt, probe)
    for f in files[:5]:
        service.classify([prepare_image(f, size, "pad", DecodeConfig(), 10**8)])
    latencies, start = [], time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        service.classify([prepare_image(files[i % len(files)], size, "pad", DecodeConfig(), 10**8)])
        latencies.append(time.perf_counter() - t)
    return stats(latencies, time.perf_counter() - start)


def direct_model(files: list[bytes], ckpt: str, probe: str, size: int, batch: int, n: int) -> float:
    """Model + head alone on preprocessed images at `batch`: median ms per image over n // batch calls."""
    from cxrray.config import DecodeConfig
    from cxrray.serve.models import ModelService
    from cxrray.serve.uploads import prepare_image

    service = ModelService(ckpt, probe)
    xs = [prepare_image(f, size, "pad", DecodeConfig(), 10**8) for f in files]
    batches = [[xs[(i + j) % len(xs)] for j in range(batch)] for i in range(0, n, batch)]
    service.classify(batches[0])
    times = []
    for b in batches:
        t = time.perf_counter()
        service.classify(b)
        times.append(1000 * (time.perf_counter() - t) / batch)
    return round(statistics.median(times), 2)


def drive(base: str, files: list[bytes], n: int, concurrency: int, route: str = "/v1/classify") -> dict:
    import requests

    local = threading.local()

    def one(i: int) -> float:
        session = getattr(local, "s", None) or requests.Session()
        local.s = session
        t = time.perf_counter()
        r = (session.post(base + route, files={"file": ("x.dcm", files[i % len(files)])}, timeout=120)
             if route.startswith("/v1") else session.get(base + route, timeout=120))
        if r.status_code != 200:
            raise RuntimeError(f"{r.status_code}: {r.text[:200]}")
        return time.perf_counter() - t

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        latencies = list(pool.map(one, range(n)))
    return stats(latencies, time.perf_counter() - start)


def drive_handle(files: list[bytes], n: int, concurrency: int) -> dict:
    """The Classifier deployment alone, through its Serve handle from this process (no HTTP): waves of
    `concurrency` raw uploads, so batching is measured where it acts."""
    from ray import serve

    xs = files
    handle = serve.get_deployment_handle("Classifier", app_name="cxrray")
    latencies, start = [], time.perf_counter()
    for first in range(0, n, concurrency):
        t = time.perf_counter()
        responses = [handle.classify.remote(xs[i % len(xs)]) for i in range(first, min(n, first + concurrency))]
        for r in responses:
            r.result()
            latencies.append(time.perf_counter() - t)
    return stats(latencies, time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="max_batch_size of the batched setting")
    parser.add_argument("--wait-ms", type=float, default=10.0, help="batch_wait_timeout_s of the batched setting, ms")
    parser.add_argument("--size", type=int, default=64, help="model image size")
    parser.add_argument("--no-access-log", action="store_true", help="serve.access_log=false")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "cxrray-bench-serve"))
    args = parser.parse_args()

    workdir = Path(args.workdir)
    root = phantoms(workdir / "dicom-16", 16, 256)
    files = [p.read_bytes() for p in sorted((root / "images").glob("*.dcm"))]
    ckpt, probe = build_artifacts(workdir / f"model-{os.getpid()}", files, args.size)
    results = {"direct": direct(files, ckpt, probe, args.size, args.requests)}
    model_ms = {b: direct_model(files, ckpt, probe, args.size, b, args.requests) for b in (1, args.batch)}

    from ray import serve

    from cxrray.config import load_config
    from cxrray.runtime import ensure_ray
    from cxrray.serve.app import make_app

    ensure_ray()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    batch_sizes = {}
    try:
        for batch in (1, args.batch):
            cfg = load_config("tiny", [f"model.image_size={args.size}", f"serve.max_batch_size={batch}",
                                       f"serve.batch_wait_timeout_s={args.wait_ms / 1000}",
                                       "serve.deployments.ingress.replicas=[1,1]", "serve.deployments.classifier.replicas=[1,1]",
                                       f"serve.access_log={not args.no_access_log}"])
            serve.run(make_app(ckpt, probe, cfg), name="cxrray", route_prefix="/")
            drive(base, files, 20, 4)  # warm-up
            if batch == 1:
                results["healthz_sequential"] = drive(base, files, args.requests, 1, "/healthz")
            results[f"serve_batch{batch}_sequential"] = drive(base, files, args.requests, 1)
            handle = serve.get_deployment_handle("Classifier", app_name="cxrray")
            before = handle.stats.remote().result()["batch_sizes"]
            results[f"serve_batch{batch}_c{args.concurrency}"] = drive(base, files, args.requests, args.concurrency)
            after_http = handle.stats.remote().result()["batch_sizes"]
            results[f"handle_batch{batch}_c{args.concurrency}"] = drive_handle(files, args.requests, args.concurrency)
            after = handle.stats.remote().result()["batch_sizes"]
            batch_sizes[batch] = {"http": mean_batch(before, after_http), "handle": mean_batch(after_http, after)}
    finally:
        serve.shutdown()

    print(f"\n  {'setting':<24}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8}")
    for name, r in results.items():
        print(f"  {name:<24}{r['p50_ms']:>9}{r['p99_ms']:>9}{r['req_s']:>8}")
    figures = {"bench": "serve", "image_size": args.size, "requests": args.requests, "concurrency": args.concurrency,
               "device": "cpu", "cpus": os.cpu_count(), "batch": args.batch, "batch_wait_ms": args.wait_ms,
               "access_log": not args.no_access_log,
               **{f"direct_model_b{b}_ms_per_image": v for b, v in model_ms.items()},
               "model_batching_ceiling": round(model_ms[1] / model_ms[args.batch], 2),
               **{f"{name}_{k}": v for name, r in results.items() for k, v in r.items()},
               "mean_batch_http": batch_sizes[args.batch]["http"],
               "mean_batch_handle": batch_sizes[args.batch]["handle"],
               "serve_added_p50_ms": round(results["serve_batch1_sequential"]["p50_ms"] - results["direct"]["p50_ms"], 1),
               "serve_added_p50_ms_batched": round(results[f"serve_batch{args.batch}_sequential"]["p50_ms"]
                                                   - results["direct"]["p50_ms"], 1),
               "batching_speedup_http": round(results[f"serve_batch{args.batch}_c{args.concurrency}"]["req_s"]
                                              / results[f"serve_batch1_c{args.concurrency}"]["req_s"], 2),
               "batching_speedup_handle": round(results[f"handle_batch{args.batch}_c{args.concurrency}"]["req_s"]
                                                / results[f"handle_batch1_c{args.concurrency}"]["req_s"], 2)}
    report(figures)


if __name__ == "__main__":
    main()
