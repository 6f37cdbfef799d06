"""Cheff stage 2: latent diffusion over the frozen autoencoder's latents, optionally report-conditioned.

Torch-free at import (the config composes it); the network and task load on first use."""
from __future__ import annotations

from cxrray.families.base import Family, lazy
from cxrray.families.ldm.config import PRESETS, LDMConfig, conditions

TASK = "cxrray.families.ldm.task"
FAMILY = Family(
    name="ldm", config=LDMConfig, presets=PRESETS,
    description="latent diffusion U-Net + report encoder over KL-autoencoder latents (Cheff stage 2)",
    build=lazy("cxrray.families.ldm.network", "LatentDiffusion"),
    loss=lazy(TASK, "loss"), evaluate=lazy(TASK, "evaluate"), export=lazy(TASK, "export"),
    prepare=lazy(TASK, "prepare"), initialise=lazy(TASK, "initialise"), generate=lazy(TASK, "generate"),
    inpaint=lazy(TASK, "inpaint"), conditions=conditions,
    capabilities=frozenset({"sample", "generate", "inpaint"}),
)

__all__ = ["FAMILY", "PRESETS", "LDMConfig"]
