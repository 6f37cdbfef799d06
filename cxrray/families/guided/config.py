"""DAug's noise-aware classifier as typed data. Torch-free, so `cxrray.config` can compose it.

It reads x_t on the pixel DDPM's default schedule (linear, 1,000 steps: `diffusion.schedule`), at t drawn
uniformly from 0..train_t_max (the guidance only queries t at or below the translation's start). `prepare`
fills `label_vocabulary` from the shards; the super-classes (one logit each) follow from it.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from cxrray.families.daug.superclasses import super_class_names


class GuidedConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    family: Literal["guided"] = "guided"
    image_size: int = Field(256, ge=8, le=4096)  # the shards' side (the network itself reads any size)
    width: int = Field(16, ge=4, le=256)  # channels of the first block, doubled per block
    blocks: int = Field(3, ge=1, le=8)
    t_dim: int = Field(64, ge=8)
    train_t_max: int = Field(999, ge=0, le=999)
    eval_timesteps: tuple[int, ...] = (0, 250, 500, 750)  # the periodic evaluation's BCE at each t
    label_vocabulary: tuple[str, ...] = ()  # the shards' label names (prepare)

    @property
    def super_classes(self) -> list[str]:
        return super_class_names(list(self.label_vocabulary))


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"image_size": 64, "width": 16, "blocks": 3},
    "small": {"image_size": 256, "width": 32, "blocks": 4},
    "paper": {"image_size": 256, "width": 64, "blocks": 5, "t_dim": 128},
}
