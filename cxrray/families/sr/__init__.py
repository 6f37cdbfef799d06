"""Cheff stage 3: SR3 super-resolution of the decoded latent-diffusion samples.

Torch-free at import (the config composes it); the network and task load on first use."""
from __future__ import annotations

from cxrray.families.base import Family, lazy
from cxrray.families.sr.config import PRESETS, SRConfig

TASK = "cxrray.families.sr.task"
FAMILY = Family(
    name="sr", config=SRConfig, presets=PRESETS,
    description="SR3 super-resolution, cosine T = 2000, bicubic pairs or D(E(x)) fine-tune (Cheff stage 3)",
    build=lazy("cxrray.families.sr.network", "SuperResolution"),
    loss=lazy(TASK, "loss"), evaluate=lazy(TASK, "evaluate"), export=lazy(TASK, "export"),
    prepare=lazy(TASK, "prepare"), initialise=lazy(TASK, "initialise"), upscale=lazy(TASK, "upscale"),
    capabilities=frozenset({"upscale"}),
)

__all__ = ["FAMILY", "PRESETS", "SRConfig"]
