"""How much the diffusion autoencoder's decoder reads z, by what the network predicts: eps (Diff-AE,
the baseline) vs v (v = sqrt(ab) eps - sqrt(1 - ab) x0, whose loss weighs eps errors by 1/ab and so
makes the high-noise steps, where only z knows the patient, count).

    make demo && python bench/z_reliance.py                     # the demo's shards, 200 steps each
    python bench/z_reliance.py --steps 400 --lr 1e-4

Trains the tiny preset twice from the same seed on the same batches (plain loop, Adam, EMA with the
product's warm-up), then on test images: the relative change of the predicted x0 when z is another
patient's, per t, and the mean |difference| of two 20-step DDIM decodes from one shared x_T (own z vs
another's). A decoder that ignores z scores ~0; the counterfactual decode can only change the image
as much as the second figure allows. Prints one JSON line. The tiny preset trains v since issue 12.
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


def reliance(model, images) -> dict:
    """x0 change under another patient's z per t, and two 20-step DDIM decodes from one shared x_T."""
    import torch

    from cxrray.diffusion.ddim import ddim_sample
    from cxrray.pipelines.diffchest.cf_eval import z_sensitivity

    with torch.no_grad():
        z = model.encode(images)
    other = torch.roll(z, 1, 0)
    change = z_sensitivity(model, images, {"other": other}, timesteps=(200, 400, 600, 800), seed=1)["other"]
    x_T = torch.randn(images.shape, generator=torch.Generator().manual_seed(1))
    own, theirs = (ddim_sample(model, code, x_T, steps=20, clip=True) for code in (z, other))
    return {"x0_change_other_z": {t: round(v, 4) for t, v in change.items()},
            "decode_diff_other_z": round(float((own - theirs).abs().mean()), 4),
            "decode_vs_own_image": round(float((own - images).abs().mean()), 4)}


def train(prediction_type: str, images, test, args) -> dict:
    """The tiny preset trained with `prediction_type` by a plain loop on the product's loss; seeded."""
    import torch

    from cxrray.diffusion.schedule import training_loss
    from cxrray.families.diffae.network import DiffAE, preset_config
    from cxrray.train.ema import ema_model

    torch.manual_seed(args.seed)
    model = DiffAE(preset_config("tiny", prediction_type=prediction_type))
    ema = ema_model(model, 0.9999)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    g, start = torch.Generator().manual_seed(args.seed), time.perf_counter()
    for step in range(1, args.steps + 1):
        loss = training_loss(model, images[torch.randint(0, len(images), (args.batch,), generator=g)], generator=g)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        ema.update_parameters(model)
        if step % 50 == 0:
            rate = step / (time.perf_counter() - start)
            print(f"[{prediction_type}] step {step}/{args.steps} loss {float(loss):.4f} "
                  f"({rate:.2f} steps/s, ETA {(args.steps - step) / rate:.0f} s)", flush=True)
    return reliance(ema.module, test)


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
    for name, prediction_type in (("eps", "epsilon"), ("v", "v_prediction")):  # eps first: the baseline (Diff-AE)
        for key, value in train(prediction_type, images, test, args).items():
            figures[f"{name}_{key}"] = value
    report(figures)


if __name__ == "__main__":
    main()
