"""The main job on the embedded default: phantoms -> ingest -> pretrain (tiny) -> held-out report.
Each later stage extends it. Everything lands in local files and the local MLflow."""
from __future__ import annotations

import json
from pathlib import Path

from cxrray.config import Config


def run_demo(cfg: Config, n: int, workdir: Path, shards: str, run: str) -> dict:
    from cxrray.data.ingest import ingest
    from cxrray.data.phantom import generate
    from cxrray.train.pretrain import pretrain

    phantoms = workdir / "phantoms"
    print(f"[demo] 1/4 phantoms: {n} DICOMs -> {phantoms}", flush=True)
    step = max(1, n // 5)
    generate(n, phantoms, cfg.phantom,
             progress=lambda d, t: (d % step == 0 or d == t) and print(f"[phantoms] {d}/{t}", flush=True))
    print(f"[demo] 2/4 ingest -> {shards}", flush=True)
    manifest = ingest(phantoms, shards, cfg.ingest, source="folder", metadata=phantoms / "labels.csv")
    print(f"[demo] 3/4 pretrain {cfg.preset} to {cfg.train.images:,} images -> {run}", flush=True)
    status = pretrain(cfg, shards, run)
    print("[demo] 4/4 held-out reconstruction and samples", flush=True)
    report = held_out_report(cfg, shards, status["latest_checkpoint"], workdir, status["mlflow_run_id"])
    summary = {"shards": {"uri": shards, "samples": manifest["samples"], "rejected": manifest["rejected"],
                          "splits": manifest["splits"]},
               "pretrain": status, "held_out": report}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"[demo] summary: {workdir / 'summary.json'}; grids: {report['grids']}; MLflow: `mlflow ui "
          f"--backend-store-uri sqlite:///mlflow.db` (run {status['mlflow_run_id']})", flush=True)
    return summary


def held_out_report(cfg: Config, shards: str, checkpoint: str, workdir: Path, run_id: str, n: int = 8) -> dict:
    """Reconstruct held-out (test split) images by DDIM inversion + decode with the true z; SSIM."""
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    from cxrray.data.stream import stream
    from cxrray.diffusion.ddim import reconstruct, sample
    from cxrray.eval.grids import save_grid
    from cxrray.models.loading import load_ema
    from cxrray.tracking import RunLogger, tracking_uri

    torch.set_num_threads(1)
    model = load_ema(checkpoint)
    x0 = torch.as_tensor(stream(shards, "test").take_batch(n)["image"])
    steps = 250  # DiffChest: deterministic DDIM inversion with 250 steps
    recon = reconstruct(model, x0, steps=steps)
    samples = sample(model, x0.shape[0], steps=cfg.train.sample_steps, generator=torch.Generator().manual_seed(0),
                     images=x0)
    scores = [float(ssim((r[None].clamp(-1, 1) + 1) / 2, (o[None] + 1) / 2, data_range=1.0)) for r, o in zip(recon, x0)]
    grids = [str(save_grid([x0, recon], workdir / "held_out_reconstructions.png", f"held-out reconstructions, DDIM {steps}")),
             str(save_grid([x0, samples], workdir / "held_out_samples.png",
                           f"samples with held-out z, DDIM {cfg.train.sample_steps}"))]
    logger = RunLogger(tracking_uri(cfg.tracking), run_id)
    for grid in grids:
        logger.artifact(grid, "demo")
    mean = sum(scores) / len(scores)
    logger.metrics({"held_out_recon_ssim": mean}, step=0)
    return {"images": len(scores), "ddim_steps": steps, "recon_ssim_mean": mean, "recon_ssim_min": min(scores),
            "grids": grids}
