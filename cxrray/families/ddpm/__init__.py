"""cxr_ddpm: pixel-space DDPM conditioned on tabular covariates (age, sex, echo measurements).

Torch-free at import (the config composes it); the network and task load on first use."""
from __future__ import annotations

from cxrray.families.base import Family, lazy
from cxrray.families.ddpm.config import COVARIATES, PRESETS, RANGES, DDPMConfig, conditions

TASK = "cxrray.families.ddpm.task"
FAMILY = Family(
    name="ddpm", config=DDPMConfig, presets=PRESETS, description="covariate-conditioned pixel DDPM (cxr_ddpm): synthetic cohorts",
    build=lazy("cxrray.families.ddpm.network", "CovariateDDPM"),
    loss=lazy(TASK, "loss"), evaluate=lazy(TASK, "evaluate"), export=lazy(TASK, "export"),
    prepare=lazy(TASK, "prepare"), generate=lazy(TASK, "generate"), conditions=conditions,
    capabilities=frozenset({"sample", "generate"}),
)

__all__ = ["COVARIATES", "DDPMConfig", "FAMILY", "PRESETS", "RANGES"]
