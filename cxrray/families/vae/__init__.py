"""Cheff stage 1: KL-regularised autoencoder (factor 4) whose latents the latent diffusion model learns.

Torch-free at import (the config composes it); the network and task load on first use."""
from __future__ import annotations

from cxrray.families.base import Family, Objective, lazy
from cxrray.families.vae.config import PRESETS, VAEConfig

TASK = "cxrray.families.vae.task"
FAMILY = Family(
    name="vae", config=VAEConfig, presets=PRESETS,
    description="KL autoencoder, factor 4 (Cheff stage 1): latents for latent diffusion",
    build=lazy("cxrray.families.vae.network", "KLAutoencoder"),
    loss=lazy(TASK, "loss"), evaluate=lazy(TASK, "evaluate"), export=lazy(TASK, "export"),
    after_step=lazy(TASK, "count_step"),
    objectives=(Objective("discriminator", lazy(TASK, "discriminator_loss"), lazy(TASK, "discriminator_parameters")),),
    capabilities=frozenset({"reconstruct", "latents"}),
)

__all__ = ["FAMILY", "PRESETS", "VAEConfig"]
