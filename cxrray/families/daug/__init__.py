"""DAug's downstream model (Jin et al.): one encoder for retrieval and classification over the image stacked
with DAug's heatmaps, trained with the image–report + image–class hybrid contrastive loss.

Torch-free at import (the config composes it); the network and task load on first use."""
from __future__ import annotations

from cxrray.families.base import Family, lazy
from cxrray.families.daug.config import PRESETS, DAugConfig

TASK = "cxrray.families.daug.task"
FAMILY = Family(
    name="daug", config=DAugConfig, presets=PRESETS,
    description="DAug downstream: retrieval + classification from image and heatmap channels (hybrid contrastive loss)",
    build=lazy("cxrray.families.daug.network", "HybridEncoder"),
    loss=lazy(TASK, "loss"), evaluate=lazy(TASK, "evaluate"), export=lazy(TASK, "export"),
    prepare=lazy(TASK, "prepare"), capabilities=frozenset({"embed"}),
)

__all__ = ["FAMILY", "PRESETS", "DAugConfig"]
