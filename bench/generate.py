"""Generation throughput: the cohort job (Ray Data actor pool, shards + provenance) against a plain loop
calling the same sampler in one process over the same count, and our DDIM / DDPM step against
diffusers' own pipelines (`DDIMPipeline`, `DDPMPipeline`) with the same U-Net, in the same run.

    python bench/generate.py                                # CPU: tiny covariate DDPM at 64², 2 actors
    python bench/generate.py --preset paper --use-gpu --n 512 --steps 50

`ratio_per_core` = job images/s / (actors x plain-loop images/s at one thread each); goal >= 0.9.
`job_img_s` is the fan-out's rate (the actors' start-up and model loading included, a fixed cost a real
cohort's thousands of images amortise); `job_wall_img_s` adds drawing the cohort and the manifest.
`*_overhead` = diffusers images/s / ours - 1 (the pipelines are unconditional, so the model here is
too); goal <= 0.05. A random-init model: throughput does not depend on the weights.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from _common import paired_rates, report

PAPER_COHORT = {"age": {"shift_sd": -0.23, "scale_sd": 0.84}, "ivsd": {"shift_sd": 0.52, "scale_sd": 1.19},
                "lvidd": {"shift_sd": 0.61, "scale_sd": 1.28}, "lvpwd": {"shift_sd": 0.61, "scale_sd": 1.26}}
STATS = {"age": (62.0, 16.0), "ivsd": (1.05, 0.2), "lvidd": (4.7, 0.6), "lvpwd": (1.0, 0.18)}


def write_checkpoint(model, folder: Path) -> str:
    import json

    from cxrray.io.checkpoint import save_weights

    folder.mkdir(parents=True)
    save_weights(model, folder / "ema.safetensors")
    (folder / "state.json").write_text(json.dumps({"images_shown": 0, "model": model.cfg.model_dump(mode="json")}))
    (folder / "COMPLETE").write_text("0")
    return f"file://{folder}"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--n", type=int, default=64, help="images of the cohort (job and plain loop)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--use-gpu", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    import torch
    from diffusers import DDIMPipeline, DDPMPipeline

    from cxrray.families import GenerateRequest, get_family
    from cxrray.families.ddpm.config import COVARIATES
    from cxrray.diffusion.ddim import sample_conditional
    from cxrray.diffusion.schedule import make_scheduler
    from cxrray.pipelines.cohorts.spec import CohortSpec, draw
    from cxrray.pipelines.cohorts.generate import generate_cohort
    from cxrray.pipelines.settings import GenerateConfig
    from cxrray.runtime import ensure_ray

    device = torch.device("cuda" if args.use_gpu else "cpu")
    family = get_family("ddpm")
    cfg = family.preset(args.preset, covariates=COVARIATES, covariate_stats=STATS)
    torch.manual_seed(0)
    model = family.build(cfg).eval()
    spec = CohortSpec(n=args.n, seed=0, covariates=PAPER_COHORT)
    gcfg = GenerateConfig(steps=args.steps, batch_size=args.batch, shard_samples=max(1, args.n // (2 * args.actors)),
                          actors=args.actors, use_gpu=args.use_gpu)
    figures = {"bench": "generate", "preset": args.preset, "image_size": cfg.image_size, "n": args.n,
               "steps": args.steps, "batch": args.batch, "actors": args.actors,
               "device": torch.cuda.get_device_name() if args.use_gpu else "cpu"}

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = write_checkpoint(model, Path(tmp) / "ckpt")
        ensure_ray()
        start, timing = time.perf_counter(), {}
        generate_cohort(ckpt, spec, f"file://{tmp}/out", gcfg, timing)
        figures["job_wall_img_s"] = round(args.n / (time.perf_counter() - start), 3)
        figures["job_img_s"] = round(timing["images"] / timing["seconds"], 3)

    # the plain loop: one process, one thread per actor's worth of work, the same sampler and batches
    torch.set_num_threads(1)
    model.to(device)
    rows = draw(spec, cfg)
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for i in range(0, args.n, args.batch):
        chunk = rows[i:i + args.batch]
        conditions = {"sex": [r["sex"] for r in chunk], "age": [r["age"] for r in chunk],
                      **{c: [r["covariates"][c] for r in chunk] for c in ("ivsd", "lvidd", "lvpwd")}}
        family.generate(model, GenerateRequest(n=len(chunk), steps=args.steps, generator=generator, conditions=conditions))
    figures["plain_loop_img_s"] = round(args.n / (time.perf_counter() - start), 3)
    figures["ratio_per_core"] = round(figures["job_img_s"] / (args.actors * figures["plain_loop_img_s"]), 3)

    # per-step cost against diffusers' pipelines, unconditional U-Net of the same size, one batch
    torch.set_num_threads(args.actors)
    plain = family.build(cfg.model_copy(update={"covariates": ()})).eval().to(device)
    for kind, pipeline in (("ddim", DDIMPipeline), ("ddpm", DDPMPipeline)):
        pipe = pipeline(unet=plain.unet, scheduler=make_scheduler(kind, **plain.schedule))
        pipe.set_progress_bar_config(disable=True)
        extra = {"eta": 0.0} if kind == "ddim" else {}
        ours, theirs = paired_rates(
            lambda: sample_conditional(plain, args.batch, None, steps=args.steps, sampler=kind,
                                       generator=torch.Generator().manual_seed(0)),
            lambda: pipe(batch_size=args.batch, num_inference_steps=args.steps, output_type="np",
                         generator=torch.Generator().manual_seed(0), **extra),
            args.batch, args.repeats)
        figures[f"{kind}_img_s"], figures[f"{kind}_diffusers_img_s"] = round(ours, 3), round(theirs, 3)
        figures[f"{kind}_overhead"] = round(theirs / ours - 1, 4)
    report(figures)


if __name__ == "__main__":
    main()
