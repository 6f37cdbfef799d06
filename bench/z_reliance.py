"""How much the diffusion autoencoder's decoder reads z, by what the network predicts: eps (Diff-AE,
the baseline) vs v (v = sqrt(ab) eps - sqrt(1 - ab) x0, whose loss weighs eps errors by 1/ab and so
makes the high-noise steps, where only z knows the patient, count).

    make demo && python bench/z_reliance.py                     # the demo's shards, 200 steps each
    python bench/z_reliance.py --steps 400 --lr 1e-4

Trains the tiny preset twice from the same seed on the same batches (plain loop, Adam, EMA with the
product's warm-up), then on test images: the relative change of the predicted x0 when z is another
patient's, per t, and the mean |difference| of two 20-step DDIM decodes from one shared x_T (own z vs
another's). A decoder that ignores z scores ~0; the counterfactual decode can only change the image
as much as the second figure allows. Prints one JSON line. The product trains eps today (issue 12).
"""
from __future__ import annotations

import argparse
import os
import time

from _common import report


def load_split(uri: str, split: str, limit: int):
    import numpy as np
    import torch

    from cxrray.data.imaging import decode_png16, png16_to_model
    from cxrray.data.shards import read_manifest, read_tar
    from cxrray.data.storage import Storage

    store, out = Storage(uri), []
    for shard in read_manifest(uri)["shards"]:
        if split in shard["splits"]:
            out += [decode_png16(png) for _, png, meta in read_tar(store.read_bytes(shard["name"]), shard["name"])
                    if meta.get("split", split) == split]
        if len(out) >= limit:
            break
    return torch.as_tensor(png16_to_model(np.stack(out[:limit])))[:, None]


def x0_from(prediction: str, out, x_t, ab):
    """The network's output -> its x0 estimate."""
    if prediction == "eps":
        return (x_t - (1 - ab).sqrt() * out) / ab.sqrt()
    return ab.sqrt() * x_t - (1 - ab).sqrt() * out


def reliance(model, prediction: str, images, sched, timesteps=(200, 400, 600, 800)) -> dict:
    import torch

    alphas_cumprod = sched.alphas_cumprod
    with torch.no_grad():
        z = model.encode(images)
        other = torch.roll(z, 1, 0)
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
        change = {}
        for t in timesteps:
            tt = torch.full((len(images),), t)
            x_t = sched.add_noise(images, noise, tt)
            ab = alphas_cumprod[t]
            own, theirs = (x0_from(prediction, model(x_t, tt, c), x_t, ab) for c in (z, other))
            change[t] = round(float((own - theirs).norm() / own.norm()), 4)

        def decode(code):  # deterministic DDIM, 20 steps, from the shared x_T
            x, ts = noise.clone(), list(range(999, -1, -50))
            for i, t in enumerate(ts):
                ab = alphas_cumprod[t]
                ab_prev = alphas_cumprod[ts[i + 1]] if i + 1 < len(ts) else torch.tensor(1.0)
                x0 = x0_from(prediction, model(x, torch.full((len(x),), t), code), x, ab).clamp(-1, 1)
                x = ab_prev.sqrt() * x0 + (1 - ab_prev).sqrt() * (x - ab.sqrt() * x0) / (1 - ab).sqrt()
            return x

        own_decode = decode(z)
        return {"x0_change_other_z": change,
                "decode_diff_other_z": round(float((own_decode - decode(other)).abs().mean()), 4),
                "decode_vs_own_image": round(float((own_decode - images).abs().mean()), 4)}


def train(prediction: str, images, test, args) -> dict:
    import torch

    from cxrray.diffusion.schedule import make_scheduler
    from cxrray.families.diffae.network import DiffAE, preset_config
    from cxrray.train.ema import ema_model

    torch.manual_seed(args.seed)
    sched = make_scheduler("ddpm")
    alphas_cumprod = sched.alphas_cumprod
    model = DiffAE(preset_config("tiny"))
    ema = ema_model(model, 0.9999)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    g, start = torch.Generator().manual_seed(args.seed), time.perf_counter()
    for step in range(1, args.steps + 1):
        x0 = images[torch.randint(0, len(images), (args.batch,), generator=g)]
        t = torch.randint(0, 1000, (args.batch,), generator=g)
        noise = torch.randn(x0.shape, generator=g)
        ab = alphas_cumprod[t].view(-1, 1, 1, 1)
        target = noise if prediction == "eps" else ab.sqrt() * noise - (1 - ab).sqrt() * x0
        loss = torch.nn.functional.mse_loss(model(sched.add_noise(x0, noise, t), t, model.encode(x0)), target)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update_parameters(model)
        if step % 50 == 0:
            rate = step / (time.perf_counter() - start)
            print(f"[{prediction}] step {step}/{args.steps} loss {float(loss):.4f} "
                  f"({rate:.2f} steps/s, ETA {(args.steps - step) / rate:.0f} s)", flush=True)
    return reliance(ema.module, prediction, test, sched)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shards", default="file://data_shards/demo")
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-images", type=int, default=600)
    parser.add_argument("--test-images", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    images, test = load_split(args.shards, "train", args.train_images), load_split(args.shards, "test", args.test_images)
    figures = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "test_images": len(test)}
    for prediction in ("eps", "v"):  # eps first: the baseline, Diff-AE's own parameterisation
        for key, value in train(prediction, images, test, args).items():
            figures[f"{prediction}_{key}"] = value
    report(figures)


if __name__ == "__main__":
    main()
