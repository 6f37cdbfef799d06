"""Latent diffusion training on precomputed latents (`cxrray latents`) against encoding images with the
frozen autoencoder on the fly, in the same run, through the same `cxrray pretrain` (Ray Train + DeepSpeed),
plus the latents job's own rate.

    python bench/latents.py                      # CPU: tiny autoencoder (64² -> 3 x 16²) and LDM, 2 workers
    python bench/latents.py --preset paper --use-gpu --workers 1 --images 4096 --batch 32

Both arms train the unconditional model (`model.text=false`: image shards carry no token ids), from a
random-initialised autoencoder (throughput does not depend on its weights). Throughput is the median of
the logged windows after the first. `speedup` = precomputed images/s / on-the-fly images/s.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _common import phantoms, report


def train_rate(args, data: str, vae: str, workdir: Path, name: str) -> dict:
    from mlflow.tracking import MlflowClient

    from cxrray.config import load_config
    from cxrray.train.pretrain import pretrain

    uri = f"sqlite:///{workdir / 'mlflow.db'}"
    sets = ["model.family=ldm", "model.text=false", f"model.vae_checkpoint={vae}", f"train.images={args.images}",
            f"train.num_workers={args.workers}", f"train.use_gpu={args.use_gpu}", f"train.global_batch={args.batch}",
            f"train.log_every={args.batch * args.log_steps}", f"train.checkpoint_every={args.images}",
            "train.eval_split=null", f"tracking.uri={uri}", f"train.cpus_per_worker={args.cpus_per_worker}",
            "tracking.registered_model=bench", "train.strategy=deepspeed"]
    status = pretrain(load_config(args.preset, sets), data, f"file://{workdir / name}", progress=lambda line: None)
    history = MlflowClient(uri).get_metric_history(status["mlflow_run_id"], "images_per_s")
    rates = [m.value for m in sorted(history, key=lambda m: m.step)][1:] or [history[-1].value]
    return {"img_s": statistics.median(rates)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--n", type=int, default=256, help="phantom images")
    parser.add_argument("--images", type=int, default=384, help="training images per arm")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--log-steps", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--cpus-per-worker", type=float, default=0.5)  # leave CPUs for the Ray Data reads
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--workdir", default=None)
    args = parser.parse_args()

    import torch

    from cxrray.cli import main as cli
    from cxrray.config import load_config
    from cxrray.families import get_family
    from cxrray.io.checkpoint import save_weights
    from cxrray.pipelines.latents import latents

    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench-latents-"))
    cfg = load_config(args.preset, ["model.family=ldm"])
    size = cfg.model.image_size
    source = phantoms(work / "phantoms", args.n, size + size // 2)
    images = f"file://{work / 'shards'}"
    if not (work / "shards" / "manifest.json").exists():
        assert cli(["ingest", "--input", str(source), "--labels", str(source / "labels.csv"), "--output", images,
                    "--size", str(size)]) == 0
    vae_cfg = get_family("vae").preset(args.preset, image_size=size)
    vae_dir = work / "vae"
    if not (vae_dir / "COMPLETE").exists():
        torch.manual_seed(0)
        vae = get_family("vae").build(vae_cfg)
        vae_dir.mkdir(parents=True, exist_ok=True)
        for name in ("ema.safetensors", "model.safetensors"):
            save_weights(vae, vae_dir / name)
        (vae_dir / "state.json").write_text(json.dumps({"images_shown": 0, "model": vae_cfg.model_dump(mode="json")}))
        (vae_dir / "COMPLETE").write_text("0")
    started = time.perf_counter()
    load = load_config(args.preset, [f"latents.use_gpu={args.use_gpu}"]).latents
    manifest = latents(str(vae_dir), images, f"file://{work / 'latents'}", load)
    job_s = time.perf_counter() - started
    precomputed = train_rate(args, f"file://{work / 'latents'}", str(vae_dir), work, "precomputed")
    on_the_fly = train_rate(args, images, str(vae_dir), work, "on_the_fly")
    report({"bench": "latents", "preset": args.preset, "workers": args.workers, "use_gpu": args.use_gpu,
            "latent_shape": manifest["latents"]["shape"], "latents_job_img_s": round(manifest["samples"] / job_s, 2),
            "precomputed_img_s": round(precomputed["img_s"], 2), "on_the_fly_img_s": round(on_the_fly["img_s"], 2),
            "speedup": round(precomputed["img_s"] / on_the_fly["img_s"], 2)})


if __name__ == "__main__":
    main()
