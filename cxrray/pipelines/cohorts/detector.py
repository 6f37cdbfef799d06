"""The cohort experiment's detector (cxr_ddpm's downstream model, in miniature): a small CNN on the
image plus an MLP on the demographics regresses the three echo measurements as Gaussians, and the
label probabilities follow from the CheXchoNet thresholds.

How measurements become probabilities (one line): each measurement m ~ N(mu, sigma^2) independently, so
P(m > t) = 1 - Phi((t - mu) / sigma); SLVH = 1 - (1 - P(IVSd > t_wall)) (1 - P(LVPWd > t_wall)),
DLV = P(LVIDd > t_cavity), composite = 1 - (1 - SLVH) (1 - DLV), with the patient's sex-specific t.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from cxrray.data.sources.chexchonet import LVIDD_THRESHOLD, WALL_THRESHOLD
from cxrray.pipelines.judges import conv_trunk

LOG_VAR_RANGE = (-9.0, 4.0)  # z-units: sigma from ~0.01 to ~7.4 training sd


class EchoDetector(nn.Module):
    """image [B, 1, S, S] in [-1, 1] and demographics [B, 2] (age z-score, 0 when unknown; sex 1 M / 0 F)
    -> (mean [B, 3], log_var [B, 3]) of (ivsd, lvidd, lvpwd) in z-units of Base's training statistics."""

    def __init__(self, width: int = 16, blocks: int = 3):
        super().__init__()
        self.image, channels = conv_trunk(width, blocks)
        self.demographics = nn.Sequential(nn.Linear(2, 16), nn.SiLU())
        self.head = nn.Sequential(nn.Linear(channels + 16, 64), nn.SiLU(), nn.Linear(64, 6))

    def forward(self, image: torch.Tensor, demographics: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.head(torch.cat([self.image(image), self.demographics(demographics)], dim=1))
        return out[:, :3], out[:, 3:].clamp(*LOG_VAR_RANGE)


class ImageJudge(nn.Module):
    """The synthetic-set audit's judge, from the image alone (it never sees the requested covariates):
    image [B, 1, S, S] in [-1, 1] -> [B, 5]: ivsd, lvidd, lvpwd, age (z-units of its training set) and
    the logit of male sex. `features(image)` [B, F] is the space FID / KID and the memorisation search use."""

    def __init__(self, width: int = 16, blocks: int = 3):
        super().__init__()
        self.features, channels = conv_trunk(width, blocks)
        self.head = nn.Sequential(nn.Linear(channels, 64), nn.SiLU(), nn.Linear(64, 5))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


def nll(mean: torch.Tensor, log_var: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean Gaussian negative log-likelihood per measurement (constant dropped), target in z-units."""
    return (0.5 * (log_var + (target - mean) ** 2 / log_var.exp())).mean()


def label_probabilities(mean: torch.Tensor, log_var: torch.Tensor, sex: torch.Tensor, echo_mean: torch.Tensor,
                        echo_sd: torch.Tensor) -> torch.Tensor:
    """[B, 3] z-unit Gaussians + sex [B] (1 M / 0 F) -> [B, 3] P(slvh), P(dlv), P(composite) (module doc)."""
    mu = mean * echo_sd + echo_mean
    sigma = (0.5 * log_var).exp() * echo_sd
    male = sex > 0.5
    wall = torch.where(male, WALL_THRESHOLD["M"], WALL_THRESHOLD["F"])
    cavity = torch.where(male, LVIDD_THRESHOLD["M"], LVIDD_THRESHOLD["F"])
    threshold = torch.stack([wall, cavity, wall], dim=1)
    above = 0.5 * torch.erfc((threshold - mu) / (sigma * math.sqrt(2.0)))
    slvh = 1 - (1 - above[:, 0]) * (1 - above[:, 2])
    dlv = above[:, 1]
    return torch.stack([slvh, dlv, 1 - (1 - slvh) * (1 - dlv)], dim=1)
