"""Fixed start-up of one `cxrray pretrain` (issue 27 §5): a one-step run, each in a fresh process as a user
starts it, against the same step in one plain process (the baseline: import, build the model, read the same
images, one optimizer step). The run's own phase timings come from its MLflow metrics (`startup/*`).

    python bench/startup.py [--preset tiny] [--size 32] [--repeats 2]
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import phantoms, report

REPO = Path(__file__).resolve().parents[1]
TINY32 = ["model.image_size=32", "model.base_channels=16", "model.channel_mult=[1,2]", "model.norm_groups=8",
          "model.z_dim=64", "train.cpus_per_worker=0.5", "train.eval_images=4", "train.sample_steps=4"]

DIRECT = """
import sys, torch
from cxrray.config import load_config
from cxrray.data.stream import head
from cxrray.families import get_family
from cxrray.train.engine import build_engine
from cxrray.train.loop import to_torch
cfg = load_config(sys.argv[1], sys.argv[3:] + ["train.strategy=ddp"])
family = get_family(cfg.model.family)
model = family.build(cfg.model)
engine = build_engine(model, family, cfg.train, 1, torch.device("cpu"))
batch = head(sys.argv[2], "train", cfg.train.global_batch, with_keys=False, text=True)
print(engine.step(to_torch(batch))[0])
"""


def timed(command: list[str], env: dict) -> float:
    started = time.perf_counter()
    subprocess.run(command, check=True, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--size", type=int, default=32, help="32: the tests' model (TINY32); 64: the preset's own")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "cxrray-bench-startup"))
    args = parser.parse_args()
    from mlflow.tracking import MlflowClient

    from cxrray.cli import main as cli
    from cxrray.train.pretrain import read_status

    workdir = Path(args.workdir)
    sources = phantoms(workdir / "in", 96, 64, seed=21)
    shards = f"file://{workdir / f'shards{args.size}'}"
    if not (workdir / f"shards{args.size}" / "manifest.json").exists():
        assert cli(["ingest", "--input", str(sources), "--labels", str(sources / "labels.csv"), "--output", shards,
                    "--size", str(args.size), "--set", "ingest.shard_samples=24"]) == 0
    sets = (TINY32 if args.size == 32 else []) + [f"train.global_batch={args.batch}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    runs, direct, phases = [], [], {}
    for repeat in range(args.repeats):  # alternately, so the machine's noise hits both alike
        out, uri = workdir / f"run{repeat}", f"sqlite:///{workdir}/mlflow{repeat}.db"
        for stale in (out, workdir / f"mlflow{repeat}.db"):
            subprocess.run(["rm", "-rf", str(stale)], check=True)
        runs.append(timed([str(Path(sys.executable).parent / "cxrray"), "pretrain", "--data", shards,
                           "--output", f"file://{out}", "--images", str(args.batch),
                           *[a for s in sets + [f"tracking.uri={uri}"] for a in ("--set", s)]], env))
        metrics = MlflowClient(uri).get_run(read_status(f"file://{out}")["mlflow_run_id"]).data.metrics
        for name, value in metrics.items():
            if name.startswith("startup/"):
                phases.setdefault(name[8:-2], []).append(round(value, 1))
        direct.append(timed([sys.executable, "-c", DIRECT, args.preset, shards, *sets], env))
    report({"one_step_pretrain_s": [round(t, 1) for t in runs], "one_step_plain_process_s": [round(t, 1) for t in direct],
            "fixed_overhead_s": round(min(runs) - min(direct), 1), "phases_s": phases,
            "preset": args.preset, "size": args.size, "workers": 2})


if __name__ == "__main__":
    main()
