"""Model families: the registry. A family is one package here plus one line below.

`FAMILIES` maps a family name to its package; the package defines `FAMILY` (`cxrray.families.base.
Family`). Packages and their config modules import without torch, so `cxrray.config` can build the
`model` union from them at start-up.
"""
from __future__ import annotations

from functools import lru_cache
from importlib import import_module

from cxrray.families.base import CAPABILITIES, CapabilityError, Evaluation, Family, Generated, GenerateRequest, Objective

FAMILIES: dict[str, str] = {
    "diffae": "cxrray.families.diffae",  # DiffChest: semantic encoder + z-conditioned U-Net
    "ddpm": "cxrray.families.ddpm",  # cxr_ddpm: covariate-conditioned pixel DDPM
    "vae": "cxrray.families.vae",  # Cheff stage 1: KL autoencoder, factor 4
    "ldm": "cxrray.families.ldm",  # Cheff stage 2: report-conditioned latent diffusion
    "sr": "cxrray.families.sr",  # Cheff stage 3: SR3 super-resolution
    "guided": "cxrray.families.guided",  # DAug: the noise-aware classifier that guides a pixel DDPM
    "daug": "cxrray.families.daug",  # DAug downstream: retrieval + classification over heatmap channels
}


@lru_cache(maxsize=None)
def get_family(name: str) -> Family:
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; registered: {', '.join(FAMILIES)}")
    return import_module(FAMILIES[name]).FAMILY


def family_of(model) -> Family:
    """The family of a built model (every family's network keeps its config as `.cfg`)."""
    return get_family(model.cfg.family)


__all__ = ["CAPABILITIES", "FAMILIES", "CapabilityError", "Evaluation", "Family", "GenerateRequest", "Generated", "Objective",
           "family_of", "get_family"]
