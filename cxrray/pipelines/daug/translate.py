"""DAug's image-to-image translation with classifier guidance, and its heatmaps.

An image is noised to the timestep whose alpha_bar is closest to `start_alpha_bar` (schedules differ, so the
start is a noise level, not a step index; DAug: t ~ 500 of 1000, alpha_bar ~ 0.08 on the linear schedule),
then denoised by DDIM with the pixel DDPM, once plainly and once with classifier guidance
eps - sqrt(1 - ab_t) |s| grad log f(y | x_t, t), y = "k" for s > 0 (toward super-class k) or "not k" for s < 0
(away: the multi-label classifier's own complement), from the same noise. The heatmap is the change guidance made: |guided - unguided|, Gaussian-smoothed, scaled to [0, 1]
per image. Images float32 [n, 1, S, S] in [-1, 1]; heatmaps float32 [n, S, S].
"""
from __future__ import annotations

import numpy as np
import torch


def start_fraction(start_alpha_bar: float, schedule: dict | None = None) -> float:
    """The `walk(start=...)` fraction of the timestep whose alpha_bar is closest to `start_alpha_bar`."""
    from cxrray.diffusion.schedule import make_scheduler

    alphas = make_scheduler("ddpm", **(schedule or {})).alphas_cumprod
    t = int(torch.argmin((alphas - start_alpha_bar).abs()))
    return t / (len(alphas) - 1)


def translate(ddpm, classifier, images: torch.Tensor, k: int | list[int], scale: float, start_alpha_bar: float,
              steps: int, seeds: list[int], conditions: torch.Tensor | None = None):
    """(guided, unguided) translations of `images` [n, 1, S, S], image i from the noise of `seeds[i]` alone
    (the same noise for both, and for it in any batch: the classifier's log p is per image); `classifier` is a
    `NoisyClassifier`, `k` its super-class, `scale` the guidance scale (negative: away from k), `conditions`
    [1 or n, width] the DDPM's. With a list of classes `k`, guided is a list (one translation per class) and
    the unguided one is walked once for all."""
    from cxrray.diffusion.ddim import walk
    from cxrray.pipelines.seeds import item_noise

    if len(seeds) != len(images):
        raise ValueError(f"one seed per image: {len(seeds)} seeds for {len(images)} images")
    device = next(ddpm.parameters()).device
    x0 = images.to(device).float()
    noise = item_noise(seeds, tuple(x0.shape[1:])).to(device)
    if conditions is not None:
        conditions = conditions.to(device).expand(len(x0), -1)
    start = min(start_fraction(start_alpha_bar, getattr(ddpm, "schedule", {})), 0.999)  # < 1: walk noises x0

    def guide_toward(k: int):
        def guide(x_t: torch.Tensor, t) -> torch.Tensor:
            x_t = x_t.detach().requires_grad_(True)
            tt = torch.full((len(x_t),), int(t), dtype=torch.long, device=x_t.device)
            logit = classifier(x_t, tt)[:, k]
            log_p = torch.nn.functional.logsigmoid(logit if scale > 0 else -logit).sum()  # log p(k) or log p(not k)
            return abs(scale) * torch.autograd.grad(log_p, x_t)[0]
        return guide

    def run(guide) -> torch.Tensor:
        return walk(ddpm, "ddim", x0, conditions, steps, None, clip=True, start=start, noise=noise, guide=guide,
                    eta=0.0).clamp(-1, 1)

    classes = k if isinstance(k, list) else [k]
    guided = [run(guide_toward(c)) for c in classes]
    return (guided if isinstance(k, list) else guided[0]), run(None)


def heatmaps(guided: torch.Tensor, unguided: torch.Tensor, sigma: float = 1.0) -> np.ndarray:
    """|guided - unguided| smoothed by a Gaussian of `sigma` pixels, each map scaled to [0, 1]."""
    from scipy.ndimage import gaussian_filter

    change = (guided - unguided).abs()[:, 0].detach().cpu().numpy().astype(np.float64)
    maps = np.stack([gaussian_filter(c, sigma) for c in change])
    peak = maps.max(axis=(1, 2), keepdims=True)
    return (maps / np.where(peak > 0, peak, 1.0)).astype(np.float32)
