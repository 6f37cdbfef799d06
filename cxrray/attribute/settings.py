"""Config section of `cxrray attribute` (`attribute`): torch-free, composed by `cxrray.config`."""
from __future__ import annotations

from pydantic import Field

from cxrray.pipelines.settings import ActorPoolConfig


class AttributeConfig(ActorPoolConfig):
    """The attribution job's actor pool and batches; the methods' own settings live in their sections
    (`saliency` for Grad-CAM / integrated gradients, `explain` for the DiffChest counterfactual)."""

    batch_size: int = Field(8, ge=1)  # images per unit (one shard's)
    seed: int = 0  # which images `--limit` picks, and the reconstruction's noise
    alpha: float = Field(0.6, ge=0.0, le=1.0)  # overlay: the map's opacity at its maximum
