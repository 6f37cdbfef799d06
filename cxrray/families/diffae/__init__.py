"""DiffChest: diffusion autoencoder (semantic encoder p(z|x0) + z-conditioned U-Net eps(x_t, t, z)).

Torch-free at import (the config composes it); the network and task load on first use."""
from __future__ import annotations

from cxrray.families.base import Family, lazy
from cxrray.families.diffae.config import PRESETS, DiffAEConfig, preset_config

TASK = "cxrray.families.diffae.task"
FAMILY = Family(
    name="diffae", config=DiffAEConfig, presets=PRESETS, description="diffusion autoencoder (DiffChest): self-supervised z, counterfactual explanations",
    build=lazy("cxrray.families.diffae.network", "DiffAE"),
    loss=lazy(TASK, "loss"), evaluate=lazy(TASK, "evaluate"), export=lazy(TASK, "export"),
    generate=lazy(TASK, "generate"),
    capabilities=frozenset({"encode", "sample", "invert", "counterfactual"}),
)

__all__ = ["DiffAEConfig", "FAMILY", "PRESETS", "preset_config"]
