"""Healthy counterparts per second, walked a batch at a time (what `attribution_maps` and DAug's `translate` do
now) against one image per call (what they did before), same model, same images, same per-image seeds, timed
alternately in one run; and the largest difference between the two (batching changes rounding only).

    python bench/img2img.py --ldm reproduce_out/attribution/runs/effusion-*/ --data file://data_shards/attribution/real
    python bench/img2img.py --ddpm data_shards/daug/ddpm --classifier reproduce_out/daug/noisy_classifier \
        --data file://data_shards/daug/real

Trained checkpoints from `cxrray reproduce attribution` / `reproduce daug` (any of the right family serves:
throughput does not depend on the weights). Each figure is the best of --repeats runs after one warm-up.
"""
from __future__ import annotations

import argparse

import numpy as np
from _common import paired_rates, report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ldm", help="a latent diffusion checkpoint (img2img attribution)")
    parser.add_argument("--ddpm", help="a pixel DDPM checkpoint (DAug's guided translation, with --classifier)")
    parser.add_argument("--classifier", help="a `cxrray evaluate noisy-classifier` folder")
    parser.add_argument("--data", required=True, help="image shards (the test split is read)")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=50, help="sampler steps over the whole schedule")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import torch

    from cxrray.config import load_config
    from cxrray.pipelines.seeds import item_seeds
    from cxrray.pipelines.truth import load_truth

    torch.set_num_threads(args.threads)
    cfg = load_config("tiny", [])
    images = load_truth(args.data, "test", args.images, need_masks=False).images[:args.images]
    seeds = item_seeds(0, None, len(images))
    if args.ldm:
        from cxrray.models.loading import load_ema
        from cxrray.pipelines.attribution.img2img import attribution_maps

        model, ac = load_ema(args.ldm).eval(), cfg.attribution.model_copy(update={"steps": args.steps})
        walk = lambda batch: attribution_maps(model, images, ac.prompt, ac, seeds, batch)[0]  # noqa: E731
        what = {"method": "attribution img2img", "strength": ac.strength, "guidance": ac.guidance}
    elif args.ddpm and args.classifier:
        from dataclasses import replace

        from cxrray.attribute.methods import load_guided

        mapper = load_guided(args.ddpm, args.classifier, cfg)
        ac = cfg.augment.model_copy(update={"steps": args.steps})

        def walk(batch: int) -> np.ndarray:
            settings = cfg.model_copy(update={"augment": ac.model_copy(update={"batch_size": batch})})
            return replace(mapper, cfg=settings).maps(images, "effusion")
        what = {"method": "DAug guided translation", "start_alpha_bar": ac.start_alpha_bar, "scale": ac.scale}
    else:
        parser.error("give --ldm, or --ddpm with --classifier")
    batched, single = walk(args.batch), walk(1)
    rate_batched, rate_single = paired_rates(lambda: walk(args.batch), lambda: walk(1), len(images), args.repeats)
    report({**what, "images": len(images), "image_size": int(images.shape[-1]), "steps": args.steps,
            "batch": args.batch, "threads": args.threads, "images_per_s_batched": round(rate_batched, 2),
            "images_per_s_one_per_call": round(rate_single, 2), "speedup": round(rate_batched / rate_single, 2),
            "max_abs_map_difference": float(np.abs(batched - single).max())})


if __name__ == "__main__":
    main()
