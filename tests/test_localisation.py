"""Scoring a change map against ground-truth masks (cxrray.eval.localisation) on cases with known answers."""
from __future__ import annotations

import numpy as np
import pytest

from cxrray.eval.localisation import dilate, energy_ratio, ssim_outside


def test_energy_ratio_is_inside_over_outside_per_pixel_and_one_when_spread_evenly():
    rng = np.random.default_rng(0)
    masks = np.zeros((12, 32, 32), bool)
    masks[:, 8:16, 8:16] = True  # 64 of 1024 pixels
    concentrated = np.where(masks, 0.4, 0.1)  # exactly 4x per pixel
    r = energy_ratio(concentrated, masks, n_boot=100)
    assert r["ratio"] == pytest.approx(4.0) and r["ci"] == pytest.approx([4.0, 4.0]) and r["images"] == 12
    even = energy_ratio(rng.normal(0, 0.1, masks.shape), masks, n_boot=200)
    assert 0.85 < even["ratio"] < 1.15 and even["ci"][0] < 1 < even["ci"][1]
    empty = masks.copy()
    empty[:6] = False  # images without a mask are left out, not counted as zero
    assert energy_ratio(concentrated, empty, n_boot=10)["images"] == 6


def test_dilate_grows_by_the_given_pixels_and_ssim_outside_ignores_the_masked_change():
    masks = np.zeros((2, 20, 20), bool)
    masks[:, 10, 10] = True
    assert dilate(masks, 2).sum() == 2 * 25 and dilate(masks, 0).sum() == 2
    rng = np.random.default_rng(1)
    a = rng.uniform(-1, 1, (4, 48, 48)).astype(np.float32)
    region = np.zeros(a.shape, bool)
    region[:, 10:30, 10:30] = True
    b = np.where(region, -a, a)  # a large change, but only inside the region
    assert np.allclose(ssim_outside(a, b, dilate(region, 6)), 1.0, atol=1e-4)
    assert (ssim_outside(a, b, np.zeros_like(region)) < 0.9).all()  # without the mask the change counts
