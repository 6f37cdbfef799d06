"""Pretraining throughput: DeepSpeed vs plain DDP (the baseline) in the same run, on the same shards,
with the data-wait fraction of a step and achieved FLOP/s (MFU against the GPU's bf16 peak on a GPU).

    python bench/train.py                         # CPU: tiny at 64², 2 workers
    python bench/train.py --preset paper --use-gpu --workers 1 --precision bf16 --channels-last [--compile]

Throughput is the median of the logged windows after the first (start-up and warm-up excluded).
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
from pathlib import Path

from _common import phantoms, report

PEAK_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L40S": 362e12, "A10": 125e12}  # dense, per GPU


def run(strategy: str, args, shards: str, workdir: Path) -> dict:
    from mlflow.tracking import MlflowClient

    from cxrray.config import load_config
    from cxrray.train.pretrain import pretrain

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    sets = [f"train.strategy={strategy}", f"train.images={args.images}", f"train.num_workers={args.workers}",
            f"train.use_gpu={args.use_gpu}", f"train.precision={args.precision}",
            f"train.channels_last={args.channels_last and strategy == 'ddp'}", f"train.compile={args.compile}",
            f"train.global_batch={args.batch}", f"train.log_every={args.batch * args.log_steps}",
            f"train.checkpoint_every={args.images}", "train.eval_split=null", f"tracking.uri={uri}",
            f"train.cpus_per_worker={args.cpus_per_worker}", "tracking.registered_model=bench"]
    cfg = load_config(args.preset, sets)
    status = pretrain(cfg, shards, f"file://{workdir / strategy}", progress=lambda line: None)
    history = MlflowClient(uri).get_metric_history(status["mlflow_run_id"], "images_per_s")
    waits = MlflowClient(uri).get_metric_history(status["mlflow_run_id"], "data_wait_fraction")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][1:] or [history[-1].value]
    return {"img_s": statistics.median(rates), "data_wait": statistics.median([m.value for m in waits][1:] or [0.0])}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--log-steps", type=int, default=5)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--n", type=int, default=400, help="phantoms to ingest")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "cxrray-bench-train"))
    args = parser.parse_args()

    import torch

    from cxrray.config import load_config
    from cxrray.data.ingest import ingest
    from cxrray.families.diffae.network import DiffAE
    from cxrray.families.diffae.flops import training_flops_per_image

    cfg = load_config(args.preset)
    size = cfg.model.image_size
    workdir = Path(args.workdir) / f"{args.preset}-{os.getpid()}"
    root = phantoms(Path(args.workdir) / f"dicom-{args.n}", args.n, max(64, size))
    shards = f"file://{Path(args.workdir) / f'shards-{args.n}-{size}'}"
    ingest(root, shards, cfg.ingest, source="folder", metadata=root / "labels.csv", progress=lambda line: None)
    results = {strategy: run(strategy, args, shards, workdir) for strategy in ("ddp", "deepspeed")}
    flops = training_flops_per_image(DiffAE(cfg.model))["training"]
    figures = {"bench": "train", "preset": args.preset, "image_size": size, "workers": args.workers,
               "global_batch": args.batch, "device": torch.cuda.get_device_name() if args.use_gpu else "cpu",
               "precision": args.precision, "channels_last_ddp": args.channels_last,  # DeepSpeed: contiguous "compile": args.compile,
               "ddp_img_s": round(results["ddp"]["img_s"], 2), "deepspeed_img_s": round(results["deepspeed"]["img_s"], 2),
               "deepspeed_vs_ddp": round(results["deepspeed"]["img_s"] / results["ddp"]["img_s"], 3),
               "ddp_step_ms": round(1000 * args.batch / results["ddp"]["img_s"], 1),
               "deepspeed_step_ms": round(1000 * args.batch / results["deepspeed"]["img_s"], 1),
               "data_wait_ddp": round(results["ddp"]["data_wait"], 3),
               "data_wait_deepspeed": round(results["deepspeed"]["data_wait"], 3),
               "train_gflop_per_image": round(flops / 1e9, 2),
               "achieved_tflop_s": round(flops * results["deepspeed"]["img_s"] / 1e12, 4)}
    if args.use_gpu:
        name = torch.cuda.get_device_name()
        peak = next((v for k, v in PEAK_BF16.items() if k in name), None)
        if peak:
            figures["mfu"] = round(flops * results["deepspeed"]["img_s"] / (peak * args.workers), 3)
    report(figures)


if __name__ == "__main__":
    main()
