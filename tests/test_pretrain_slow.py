"""Slow (`pytest -m slow`, ~10 min on 2 cores): the `tiny` preset trained on phantoms reconstructs
held-out images by DDIM inversion (250 steps) + decode with the true z at SSIM >= 0.9, and its
samples from random x_T have the chest layout of the training images."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from cxrray.cli import main
from cxrray.config import load_config
from cxrray.data.phantom import PhantomConfig, generate

pytestmark = pytest.mark.slow


def test_tiny_preset_reconstructs_held_out_phantoms_and_samples_look_like_chests(ray_local, tmp_path):
    from cxrray.data.stream import stream
    from cxrray.demo import held_out_report
    from cxrray.models.loading import load_ema
    from cxrray.diffusion.ddim import sample

    generate(400, tmp_path / "in", PhantomConfig(size=128, seed=31))
    shards = f"file://{tmp_path / 'shards'}"
    assert main(["ingest", "--input", str(tmp_path / "in"), "--labels", str(tmp_path / "in" / "labels.csv"),
                 "--output", shards, "--size", "64"]) == 0
    cfg = load_config("tiny", [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"])
    from cxrray.train.pretrain import pretrain

    status = pretrain(cfg, shards, f"file://{tmp_path / 'run'}")
    report = held_out_report(cfg, shards, status["latest_checkpoint"], tmp_path, status["mlflow_run_id"])
    assert report["ddim_steps"] == 250 and report["recon_ssim_mean"] >= 0.9, report

    model = load_ema(status["latest_checkpoint"])
    train = np.concatenate([b["image"] for b in stream(shards, "train").iter_batches(batch_size=None)])
    template = train.mean(axis=0)[0].ravel()
    images = torch.as_tensor(train[:8])
    samples = sample(model, 8, steps=50, generator=torch.Generator().manual_seed(0), images=images).numpy()
    corr = [np.corrcoef(s[0].ravel(), template)[0, 1] for s in samples]
    noise_corr = np.corrcoef(np.random.default_rng(0).standard_normal(template.size), template)[0, 1]
    assert min(corr) > 0.6 and abs(noise_corr) < 0.1, corr  # lungs, heart, body outline where chests have them
