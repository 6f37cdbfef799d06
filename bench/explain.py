"""Encode / invert / decode throughput of cxrray's functions against diffusers' own DDIM loop (the loop
its docs and pipelines run: `for t in scheduler.timesteps: eps = unet(x, t); x = scheduler.step(...)`)
with the same U-Net in the same run, and counterfactuals per second (invert + shift + decode).

    python bench/explain.py                                   # CPU: tiny at 64², batch 16
    python bench/explain.py --preset paper --device cuda --bf16 --batch 32 --steps 100 --invert-steps 250

Each figure is the best of --repeats timed runs after one warm-up (this machine is noisy).
A random-init model is used: throughput does not depend on the weights.
"""
from __future__ import annotations

import argparse
import contextlib

from _common import best_rate, paired_rates, report


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="tiny")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20, help="DDIM decode steps (the job default is 100)")
    parser.add_argument("--invert-steps", type=int, default=20, help="inversion steps (the job default is 250)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from cxrray.config import ExplainConfig, load_config
    from cxrray.diffusion.ddim import ddim_invert, ddim_sample
    from cxrray.diffusion.schedule import make_scheduler
    from cxrray.families.diffae.network import DiffAE
    from cxrray.pipelines.diffchest.counterfactual import counterfactuals
    from cxrray.pipelines.diffchest.head import LinearHead

    torch.set_num_threads(args.threads)
    cfg = load_config(args.preset)
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = DiffAE(cfg.model).to(device).eval()
    s, b = cfg.model.image_size, args.batch
    x0 = torch.rand(b, 1, s, s, device=device) * 2 - 1
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if args.bf16 else contextlib.nullcontext())

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    with torch.no_grad(), autocast:
        z = model.encode(x0).float()

    def diffusers_loop(kind: str, x: torch.Tensor, steps: int) -> torch.Tensor:
        sched = make_scheduler(kind)
        sched.set_timesteps(steps, device=device)
        with torch.no_grad(), autocast:
            for t in sched.timesteps:
                eps = model(x, t.expand(x.shape[0]), z).float()
                x = sched.step(eps, t, x).prev_sample
        sync()
        return x

    def ours(fn, *a, **kw):
        with autocast:
            out = fn(*a, **kw)
        sync()
        return out

    def encode_direct():
        with torch.no_grad(), autocast:
            model.encode(x0)
        sync()

    weight = torch.randn(1, z.shape[1]).numpy()
    head = LinearHead(["finding"], weight, torch.zeros(1).numpy(), z.mean(0).cpu().numpy(),
                      (z.std(0) + 1e-6).cpu().numpy(), pattern=weight)
    ecfg = ExplainConfig(steps=args.steps, invert_steps=args.invert_steps)
    r = args.repeats
    figures = {"bench": "explain", "preset": args.preset, "image_size": s, "batch": b, "device": str(device) if
               device.type == "cpu" else torch.cuda.get_device_name(), "bf16": args.bf16,
               "steps": args.steps, "invert_steps": args.invert_steps,
               "encode_img_s": round(best_rate(encode_direct, b, r), 1)}
    inv = paired_rates(lambda: ours(ddim_invert, model, x0, z, steps=args.invert_steps),
                       lambda: diffusers_loop("ddim_inverse", x0, args.invert_steps), b, r)
    dec = paired_rates(lambda: ours(ddim_sample, model, z, x0, steps=args.steps),
                       lambda: diffusers_loop("ddim", x0, args.steps), b, r)
    figures.update({"invert_img_s": round(inv[0], 2), "invert_diffusers_loop_img_s": round(inv[1], 2),
                    "decode_img_s": round(dec[0], 2), "decode_diffusers_loop_img_s": round(dec[1], 2)})
    figures["invert_overhead"] = round(figures["invert_diffusers_loop_img_s"] / figures["invert_img_s"] - 1, 4)
    figures["decode_overhead"] = round(figures["decode_diffusers_loop_img_s"] / figures["decode_img_s"] - 1, 4)
    figures["counterfactual_img_s"] = round(best_rate(
        lambda: ours(counterfactuals, model, head, x0, "finding", ecfg), b, max(1, r - 1)), 3)
    report(figures)


if __name__ == "__main__":
    main()
