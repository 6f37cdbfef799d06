"""Training levers on this CPU (issue 27 §5): the tiny preset's optimizer step (`build_engine`, plain torch,
one process) in fp32 — the baseline, in the same run — against bf16 autocast, channels_last and torch.compile,
timed round-robin (A B C D A B C D ...) so machine noise hits all alike, with a correctness check: the same
initialisation, batches, timesteps and noise for `--check-steps` steps, mean loss within 5% of fp32's.

    python bench/train_levers.py                      # tiny DiffAE, 64², batch 16 (the demo's step)
    python bench/train_levers.py --levers bf16 channels_last

Ray Train, data loading and DeepSpeed are left out on purpose: this is the model step alone (bench/train.py
measures the whole pretraining path). Prints each lever's images/s and speed-up, then one JSON line.
"""
from __future__ import annotations

import argparse
import statistics
import time

from _common import report

LEVERS = {"fp32": {}, "bf16": {"precision": "bf16"}, "channels_last": {"channels_last": True},
          "compile": {"compile": True}}


def engine_for(lever: str, size: int, batch: int):
    import torch

    from cxrray.families import get_family
    from cxrray.train.engine import build_engine
    from cxrray.train.settings import TrainConfig

    family = get_family("diffae")
    torch.manual_seed(0)
    model = family.build(family.preset("tiny", image_size=size))
    cfg = TrainConfig(**{"strategy": "ddp", "precision": "fp32", "global_batch": batch, "num_workers": 1, "lr": 1e-3,
                         **LEVERS[lever]})
    return build_engine(model, family, cfg, 1, torch.device("cpu"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--levers", nargs="+", default=list(LEVERS)[1:], choices=list(LEVERS)[1:])
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--check-steps", type=int, default=20)
    args = parser.parse_args()

    import torch

    names = ["fp32"] + args.levers
    images = torch.randn(64, 1, args.size, args.size).clamp(-1, 1)
    batches = [{"image": images[torch.randperm(64, generator=torch.Generator().manual_seed(i))[:args.batch]]}
               for i in range(args.check_steps)]
    losses, engines, warmup = {}, {}, {}
    for name in names:  # correctness first: the same start, batches and (global-RNG) timesteps and noise
        engine = engine_for(name, args.size, args.batch)
        torch.manual_seed(1)
        start = time.perf_counter()
        losses[name] = [engine.step(batch)[0] for batch in batches]
        warmup[name] = time.perf_counter() - start  # includes torch.compile's compilation
        engines[name] = engine
    times = {name: [] for name in names}
    for _ in range(args.rounds):
        for name in names:
            start = time.perf_counter()
            engines[name].step(batches[0])
            times[name].append(time.perf_counter() - start)
    rate = {name: args.batch / statistics.median(times[name]) for name in names}
    base = statistics.fmean(losses["fp32"])
    figures = {"bench": "train_levers", "preset": "tiny", "image_size": args.size, "batch": args.batch,
               "threads": torch.get_num_threads(), "fp32_img_s": round(rate["fp32"], 2)}
    for name in args.levers:
        figures[f"{name}_img_s"] = round(rate[name], 2)
        figures[f"{name}_speedup"] = round(rate[name] / rate["fp32"], 3)
        figures[f"{name}_loss_rel_diff"] = round(abs(statistics.fmean(losses[name]) - base) / base, 4)
        figures[f"{name}_first_{args.check_steps}_steps_s"] = round(warmup[name], 1)
    report(figures)


if __name__ == "__main__":
    main()
