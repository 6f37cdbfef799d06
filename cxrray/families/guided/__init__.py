"""DAug's noise-aware classifier f(y | x_t, t) over super-classes, as a family: trained by the one Ray Train loop
on x_t at random t (`cxrray pretrain --set model.family=guided`), it guides a pixel DDPM's translation.

Torch-free at import (the config composes it); the network and task load on first use."""
from __future__ import annotations

from cxrray.families.base import Family, lazy
from cxrray.families.guided.config import PRESETS, GuidedConfig

TASK = "cxrray.families.guided.task"
FAMILY = Family(
    name="guided", config=GuidedConfig, presets=PRESETS,
    description="DAug: a t-conditioned classifier over super-classes whose gradient guides a pixel DDPM",
    build=lazy("cxrray.families.guided.network", "build"),
    loss=lazy(TASK, "loss"), evaluate=lazy(TASK, "evaluate"), export=lazy(TASK, "export"),
    prepare=lazy(TASK, "prepare"), capabilities=frozenset({"guide"}),
)

__all__ = ["FAMILY", "PRESETS", "GuidedConfig"]
