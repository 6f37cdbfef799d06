"""Ingest settings (`ingest` section) as torch- and pydicom-free typed data, beside the data plane that
uses them; `cxrray.config` composes them with the other sections."""
from __future__ import annotations

import os
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr

from cxrray.data.text_deid import TextDeidConfig
from cxrray.errors import ConfigError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DecodeConfig(StrictModel):
    """How pixels become a float image in [0, 1] (MONOCHROME2: bright = dense)."""

    voi: Literal["auto", "none"] = "auto"  # auto: VOI LUT or window from the header when present
    color: Literal["reject", "luminance"] = "reject"  # RGB/YBR inputs
    multiframe: Literal["reject", "first"] = "reject"
    burned_in_annotation: Literal["reject", "keep"] = "reject"  # BurnedInAnnotation == YES
    max_pixels: int = Field(64_000_000, ge=1)  # rows*cols above this is rejected before decoding
    min_side: int = Field(32, ge=1)


class IngestConfig(StrictModel):
    size: int = Field(64, ge=16, le=4096)  # output square side, pixels
    fit: Literal["pad", "crop"] = "pad"  # pad: keep aspect, zero-pad (DiffChest); crop: centre crop (Cheff)
    shard_samples: int = Field(1000, ge=1)  # target samples per shard
    dataset: str = "custom"
    split_seed: int = 0
    split_fractions: dict[str, float] = Field(default_factory=lambda: {"train": 0.8, "val": 0.1, "test": 0.1})
    salt: SecretStr | None = None  # de-identification salt; never written out
    salt_env: str = "CXRRAY_SALT"
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    text: TextDeidConfig = Field(default_factory=TextDeidConfig)  # reports and other free text


def resolve_salt(cfg: IngestConfig) -> str:
    """The de-identification salt from the config or the environment; it is never written out."""
    if cfg.salt is not None and cfg.salt.get_secret_value():
        return cfg.salt.get_secret_value()
    value = os.environ.get(cfg.salt_env, "")
    if not value:
        raise ConfigError(
            f"no de-identification salt: set the environment variable {cfg.salt_env} "
            "(or ingest.salt) to a secret string; keep it to make reruns produce the same hashes"
        )
    return value
