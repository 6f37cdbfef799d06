"""Where an image change or an attribution map lies, against ground-truth masks: energy inside vs outside,
identity kept, and per-image localisation scores (pixel AUROC, pointing game, energy inside) with
patient-clustered CIs and paired comparisons between methods.

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


# ---- attribution maps against masks (issue 29 §5): one value per image, then patient-clustered CIs ----------

def _scored(masks: np.ndarray, within: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(masks restricted to `within`, the pixels scored [N, H, W]): every pixel when `within` is None."""
    masks = np.asarray(masks, bool)
    within = np.ones_like(masks) if within is None else np.asarray(within, bool)
    return masks & within, within


def _usable(masks: np.ndarray, within: np.ndarray) -> np.ndarray:
    """Images whose scored pixels hold both mask and non-mask (a localisation score needs both)."""
    return masks.any(axis=(1, 2)) & (within & ~masks).any(axis=(1, 2))


def pixel_auroc(maps: np.ndarray, masks: np.ndarray, within: np.ndarray | None = None) -> np.ndarray:
    """Per image, the AUROC of the map's values as a pixel classifier of the mask [N] (Mann-Whitney, ties
    1/2) over the pixels `within` (all by default): 1 = every masked pixel scores above every other, 0.5 =
    chance. NaN where the scored mask is empty or covers every scored pixel."""
    from scipy.stats import rankdata

    maps = np.asarray(maps, np.float64)
    masks, within = _scored(masks, within)
    out = np.full(len(maps), np.nan)
    for i in np.flatnonzero(_usable(masks, within)):
        ranks = rankdata(maps[i][within[i]])
        inside = masks[i][within[i]]
        n1, n0 = inside.sum(), (~inside).sum()
        out[i] = (ranks[inside].sum() - n1 * (n1 + 1) / 2) / (n1 * n0)
    return out


def pointing_game(maps: np.ndarray, masks: np.ndarray, tolerance_px: int = 0,
                  within: np.ndarray | None = None) -> np.ndarray:
    """Per image, 1.0 when the map's maximum over the pixels `within` lies in the mask grown by
    `tolerance_px` (ties: the first in row-major order), else 0.0 [N]; NaN as `pixel_auroc`."""
    maps = np.asarray(maps, np.float64)
    masks, within = _scored(masks, within)
    grown = dilate(masks, tolerance_px)
    out = np.full(len(maps), np.nan)
    for i in np.flatnonzero(_usable(masks, within)):
        out[i] = float(grown[i].ravel()[int(np.argmax(np.where(within[i], maps[i], -np.inf)))])
    return out


def energy_inside(maps: np.ndarray, masks: np.ndarray, within: np.ndarray | None = None) -> np.ndarray:
    """Per image, the share of the map's absolute mass over the pixels `within` that lies in the mask [N] (a
    uniform map scores the mask's share of them); NaN as `pixel_auroc`, or where that mass is zero."""
    maps = np.abs(np.asarray(maps, np.float64))
    masks, within = _scored(masks, within)
    total = (maps * within).sum(axis=(1, 2))
    out = np.full(len(maps), np.nan)
    ok = _usable(masks, within) & (total > 0)
    out[ok] = (maps * masks).sum(axis=(1, 2))[ok] / total[ok]
    return out


def _patient_draws(patients, n_boot: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(image -> patient code [N], how often each patient is drawn in each redraw [n_boot, P])."""
    codes = np.unique(np.asarray(patients, dtype=str), return_inverse=True)[1]
    n_patients = int(codes.max()) + 1 if len(codes) else 0
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, max(n_patients, 1), (n_boot, n_patients))
    counts = np.zeros((n_boot, n_patients), np.int64)
    for b in range(n_boot):
        counts[b] = np.bincount(draws[b], minlength=n_patients)
    return codes, counts


def clustered_mean(values, patients, n_boot: int = 1000, seed: int = 0, alpha: float = 0.05) -> dict:
    """{"mean", "ci", "images", "patients"}: the mean of per-image `values` (NaN left out) with a percentile
    CI from redraws of whole patients (their images move together: the CI counts patients, not images)."""
    values = np.asarray(values, np.float64)
    keep = ~np.isnan(values)
    values, patients = values[keep], np.asarray(patients, dtype=str)[keep]
    if not len(values):
        return {"mean": None, "ci": [None, None], "images": 0, "patients": 0}
    codes, counts = _patient_draws(patients, n_boot, seed)
    weights = counts[:, codes]  # [B, N]: how often each image is drawn
    with np.errstate(invalid="ignore"):
        means = (weights * values).sum(1) / weights.sum(1)
    low, high = np.nanquantile(means, [alpha / 2, 1 - alpha / 2])
    return {"mean": float(values.mean()), "ci": [float(low), float(high)], "images": int(len(values)),
            "patients": int(codes.max()) + 1}


def paired_clustered(a, b, patients, n_boot: int = 2000, seed: int = 0, alpha: float = 0.05) -> dict:
    """Two methods' per-image values on the same images: diff = mean(a) - mean(b) over images where both are
    defined, its percentile CI from patient redraws shared by both, and a two-sided bootstrap p-value
    min(1, 2 (min(#diff* <= 0, #diff* >= 0) + 1) / (n_boot + 1))."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    keep = ~np.isnan(a) & ~np.isnan(b)
    a, b, patients = a[keep], b[keep], np.asarray(patients, dtype=str)[keep]
    if not len(a):
        return {"diff": None, "ci": [None, None], "p_value": None, "images": 0}
    codes, counts = _patient_draws(patients, n_boot, seed)
    weights = counts[:, codes]
    with np.errstate(invalid="ignore"):
        diffs = (weights * (a - b)).sum(1) / weights.sum(1)
    diffs = diffs[~np.isnan(diffs)]
    low, high = np.quantile(diffs, [alpha / 2, 1 - alpha / 2])
    tail = min(int((diffs <= 0).sum()), int((diffs >= 0).sum())) + 1
    return {"diff": float((a - b).mean()), "ci": [float(low), float(high)],
            "p_value": float(min(1.0, 2 * tail / (len(diffs) + 1))), "images": int(len(a))}
