"""Where an image change lies, against ground-truth masks: energy inside vs outside, and identity kept.

Arrays are float [N, H, W] (images in [-1, 1], differences in the same units) and bool masks [N, H, W].
Written by hand because no library scores a change map against a region mask this way; the bootstrap and
SSIM come from numpy and torchmetrics.
"""
from __future__ import annotations

import numpy as np
from scipy import ndimage


def dilate(masks: np.ndarray, pixels: int) -> np.ndarray:
    """Each mask [N, H, W] grown by `pixels` (a square structuring element); 0 leaves it as is."""
    masks = np.asarray(masks, bool)
    if pixels <= 0:
        return masks
    structure = np.ones((1, 2 * pixels + 1, 2 * pixels + 1), bool)
    return ndimage.binary_dilation(masks, structure=structure)


def energy_ratio(differences: np.ndarray, masks: np.ndarray, n_boot: int = 1000, seed: int = 0) -> dict:
    """Mean |difference| per pixel inside the masks over mean |difference| per pixel outside, pooled over
    images, with a 95% percentile-bootstrap CI resampling images. > 1: the change concentrates in the masks;
    1: it is spread evenly. Images whose mask is empty (or full) are left out."""
    d, m = np.abs(np.asarray(differences, np.float64)), np.asarray(masks, bool)
    keep = m.any(axis=(1, 2)) & (~m).any(axis=(1, 2))
    d, m = d[keep], m[keep]
    if not len(d):
        return {"ratio": None, "ci": [None, None], "images": 0}
    inside, n_in = (d * m).sum(axis=(1, 2)), m.sum(axis=(1, 2))
    outside, n_out = (d * ~m).sum(axis=(1, 2)), (~m).sum(axis=(1, 2))

    def ratio(idx):
        return (inside[idx].sum() / n_in[idx].sum()) / max(outside[idx].sum() / n_out[idx].sum(), 1e-12)

    rng = np.random.default_rng(seed)
    boots = [ratio(rng.integers(0, len(d), len(d))) for _ in range(n_boot)]
    return {"ratio": float(ratio(np.arange(len(d)))), "ci": [float(np.percentile(boots, 2.5)),
                                                               float(np.percentile(boots, 97.5))], "images": int(len(d))}


def ssim_outside(a: np.ndarray, b: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per-image mean of the SSIM map between a and b (in [-1, 1]) over the pixels outside the masks [N]."""
    import torch
    from torchmetrics.functional.image import structural_similarity_index_measure as ssim

    ta, tb = (torch.as_tensor((np.asarray(x, np.float32) + 1) / 2)[:, None] for x in (a, b))
    _, full = ssim(ta, tb, data_range=1.0, reduction="none", return_full_image=True)
    full = full[:, 0].numpy()
    m = np.asarray(masks, bool)
    # torchmetrics crops the map's border by half the kernel: align the mask to the map's size
    dh, dw = (m.shape[1] - full.shape[1]) // 2, (m.shape[2] - full.shape[2]) // 2
    m = m[:, dh:dh + full.shape[1], dw:dw + full.shape[2]]
    return np.array([full[i][~m[i]].mean() if (~m[i]).any() else np.nan for i in range(len(full))])
