"""Driver-side planning at archive scale (issue 28 §4): time and peak memory of each driver stage against
the number of samples N, on synthetic shards of tiny images (4x4 PNG-16, 1,000 samples a shard) and
synthetic encodings (z of 64 floats).

    python bench/scale.py [--sizes 10000,30000,100000] [--root /tmp/cxrray-scale]

Each stage runs in a fresh process, so its peak RSS (ru_maxrss) is its own; reported as the rise above the
process's RSS after imports. Stages: `manifest` (read it), `select` (explain/audit's planner: 64 test samples,
from the shards), `select_encoded` (the same 64, from the encodings' key/split/labels columns),
`covariate_stats` (the covariate DDPM's training statistics), `probe_load` (every row of the encodings: scalar
columns, z and labels as float32 matrices), `probe_load_capped` (what the probe reads with probe.max_images =
20,000: its fit and test splits only, each sampled by patient part by part).
The goal (issue 28): driver memory flat in N, planning time linear or better. Prints a table, writes a log-log
plot under bench/results/, and one JSON line last.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common  # noqa: E402,F401  (repo on sys.path, OMP_NUM_THREADS=1)

PER_SHARD = 1000
FINDINGS = ["effusion", "cardiomegaly"]
COVARIATES = ["ivsd", "lvidd", "lvpwd"]
STAGES = ("manifest", "select", "select_encoded", "covariate_stats", "probe_load", "probe_load_capped")
CAP = 20_000  # probe.max_images of the probe_load_capped stage


def build(root: Path, n: int) -> tuple[str, str]:
    """Shards and encodings of n synthetic samples under root (once); returns (shards URI, encodings URI)."""
    import numpy as np

    from cxrray.data import shards
    from cxrray.data.imaging import encode_png16
    from cxrray.data.storage import Storage
    from cxrray.pipelines.encodings import FORMAT, INDEX, part_table, write_part

    data, enc = Storage(f"file://{root}/shards-{n}"), Storage(f"file://{root}/encodings-{n}")
    if data.exists(shards.MANIFEST) and enc.exists(INDEX) and json.loads(enc.read_bytes(INDEX)).get("data") == data.uri:
        return data.uri, enc.uri
    png = encode_png16(np.linspace(0, 1, 16, dtype=np.float32).reshape(4, 4))
    rng = np.random.default_rng(0)
    parts, names = [], []
    for s, start in enumerate(range(0, n, PER_SHARD)):
        metas = []
        for i in range(start, min(n, start + PER_SHARD)):
            metas.append({"key": f"k{i:09d}", "dataset": "scale", "patient": f"p{i // 2:09d}", "study": f"s{i}",
                          "view": "PA", "sex": "MF"[i % 2], "age": float(20 + i % 70), "report": None,
                          "split": ("train", "train", "val", "test")[(i // 2) % 4],
                          "labels": [float(rng.random() < 0.2) for _ in FINDINGS],
                          "covariates": {c: round(float(rng.normal(1.0, 0.2)), 2) for c in COVARIATES}})
        name = f"shard-{s:06d}.tar"
        parts.append(shards.write_shard(data, name, "scale", [(m["key"], png, m, {}) for m in metas], [], FINDINGS))
        part = f"shard-{s:06d}-c0000-5ca1e.parquet"  # named as `encode.plan` names parts
        write_part(enc, part, part_table(metas, rng.normal(size=(len(metas), 64)).astype(np.float32), None, COVARIATES))
        names.append(part)
    manifest, _ = shards.build_manifest(parts, [], dataset="scale", findings=FINDINGS, covariates=COVARIATES,
                                        preprocessing={"size": 4}, split_rule={}, version="scale")
    data.write_bytes(shards.MANIFEST, shards.dumps(manifest))
    enc.write_bytes(INDEX, json.dumps({"format": FORMAT, "data": data.uri, "z_dim": 64, "label_vocabulary": FINDINGS,
                                       "covariates": COVARIATES, "parts": names, "rows": n}).encode())
    return data.uri, enc.uri


def run_stage(stage: str, shards_uri: str, encodings_uri: str) -> dict:
    """One stage, in this process: {"seconds", "peak_mb" (rise of peak RSS over the RSS after imports)}."""
    from cxrray.config import load_config
    from cxrray.data.shards import read_manifest
    from cxrray.families.ddpm.task import prepare
    from cxrray.pipelines.encodings import read_matrices
    from cxrray.pipelines.diffchest.explain import select, select_encoded
    from cxrray.pipelines.diffchest.probe import COLUMNS
    from cxrray.pipelines.diffchest.probe import _load as load_probe_rows

    cfg = load_config("tiny", ["model.family=ddpm", "model.covariates=[age,sex,ivsd,lvidd,lvpwd]"]).model
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    started = time.perf_counter()
    if stage == "manifest":
        read_manifest(shards_uri)
    elif stage == "select":
        select(shards_uri, "test", limit=64)
    elif stage == "select_encoded":
        select_encoded(shards_uri, encodings_uri, "test", limit=64)
    elif stage == "covariate_stats":
        prepare(cfg, shards_uri)
    elif stage == "probe_load":
        read_matrices(encodings_uri, COLUMNS, ["labels", "z"])
    elif stage == "probe_load_capped":
        probe_cfg = load_config("tiny", ["probe.fit_splits=[train]", f"probe.max_images={CAP}"])
        load_probe_rows(encodings_uri, probe_cfg)
    seconds = time.perf_counter() - started
    return {"seconds": round(seconds, 3), "peak_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - base, 1)}


def plot(rows: list[dict], stages: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for stage in stages:
        ns = [r["n"] for r in rows]
        axes[0].loglog(ns, [max(r[stage]["seconds"], 1e-3) for r in rows], "o-", label=stage)
        axes[1].loglog(ns, [max(r[stage]["peak_mb"], 0.1) for r in rows], "o-", label=stage)
    axes[0].set(xlabel="samples N", ylabel="seconds", title="driver planning time")
    axes[1].set(xlabel="samples N", ylabel="peak RSS rise (MB)", title="driver peak memory")
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", default="10000,30000,100000")
    parser.add_argument("--root", default="/tmp/cxrray-scale")
    parser.add_argument("--stages", default=",".join(STAGES), help="comma-separated subset of the stages")
    parser.add_argument("--stage", help=argparse.SUPPRESS)  # internal: run one stage in this process
    parser.add_argument("--uris", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.stage:
        print(json.dumps(run_stage(args.stage, *args.uris)))
        return
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        parser.error(f"--stages: unknown {unknown}; stages: {', '.join(STAGES)}")
    rows = []
    for n in (int(s) for s in args.sizes.split(",")):
        started = time.perf_counter()
        uris = build(Path(args.root), n)
        row = {"n": n, "build_s": round(time.perf_counter() - started, 1)}
        for stage in stages:
            out = subprocess.run([sys.executable, __file__, "--stage", stage, "--uris", *uris], capture_output=True,
                                 text=True, check=True)
            row[stage] = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        print(f"N={n:>9,}  " + "  ".join(f"{s}: {row[s]['seconds']:.2f} s {row[s]['peak_mb']:.0f} MB" for s in stages),
              flush=True)
    results = Path(__file__).resolve().parent / "results"
    results.mkdir(exist_ok=True)
    tag = "" if stages == list(STAGES) else "-" + "-".join(stages)  # a subset never overwrites the full plot
    plot(rows, stages, results / f"scale_{time.strftime('%Y-%m-%d')}{tag}.png")
    growth = {s: {"time_x": round(rows[-1][s]["seconds"] / max(rows[0][s]["seconds"], 1e-3), 1),
                  "memory_mb": [r[s]["peak_mb"] for r in rows]} for s in stages}
    print(json.dumps({"bench": "scale", "sizes": [r["n"] for r in rows], "rows": rows, "growth": growth}))


if __name__ == "__main__":
    main()
