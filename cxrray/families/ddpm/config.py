"""Covariate-conditioned pixel DDPM (cxr_ddpm) as typed data: architecture, covariates, statistics.

Torch-free, so `cxrray.config` can compose it without loading torch. The covariate vector the network
sees is built by `covariate_layout`: per numeric covariate (age, IVSd, LVIDd, LVPWd) its z-score under
the training split's mean/std and a present bit; sex as one-hot (M, F). A missing value is never a
silent zero: its present bit (or both sex bits) is 0, so the model learns p(x | the covariates that
were observed); dropping the whole vector with probability `cond_drop` trains the unconditional mode
used for classifier-free guidance.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

#: covariates the family understands; numeric ones are z-scored, sex is one-hot
NUMERIC = ("age", "ivsd", "lvidd", "lvpwd")
COVARIATES = NUMERIC + ("sex",)
#: plausible raw ranges (years, cm): generation requests outside them are refused
RANGES = {"age": (0.0, 120.0), "ivsd": (0.3, 3.5), "lvidd": (2.0, 10.0), "lvpwd": (0.3, 3.5)}


class DDPMConfig(BaseModel):
    """Architecture, conditioning and schedule of a covariate-conditioned DDPM; saved beside the weights."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    family: Literal["ddpm"] = "ddpm"
    image_size: int = Field(64, ge=16, le=1024)
    in_channels: int = Field(1, ge=1)
    base_channels: int = Field(32, ge=1)
    channel_mult: tuple[int, ...] = Field((1, 2, 2), min_length=1)
    layers_per_block: int = Field(2, ge=1)
    attention_resolutions: tuple[int, ...] = (16,)
    norm_groups: int = Field(32, ge=1)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    covariates: tuple[str, ...] = ()  # empty: unconditional
    cond_drop: float = Field(0.1, ge=0.0, le=1.0)  # whole-vector drop-out (classifier-free guidance)
    timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["squaredcos_cap_v2", "linear", "scaled_linear"] = "squaredcos_cap_v2"  # cosine
    # {name: [mean, std]} of the numeric covariates on the training split; filled by pretraining
    covariate_stats: dict[str, tuple[float, float]] | None = None
    # {name: {name: Pearson r}} of the numeric covariates on training rows that have them all (cohort
    # specs draw correlated covariates from it); filled by pretraining
    covariate_corr: dict[str, dict[str, float]] | None = None

    @field_validator("covariates")
    @classmethod
    def _known(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        bad = [c for c in v if c not in COVARIATES]
        if bad:
            raise ValueError(f"unknown covariate(s) {bad}; allowed: {', '.join(COVARIATES)}")
        if len(set(v)) != len(v):
            raise ValueError(f"covariates listed twice: {list(v)}")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> "DDPMConfig":
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size % factor:
            raise ValueError(f"image_size {self.image_size} must be divisible by {factor} ({len(self.channel_mult)} levels)")
        for ch in self.block_channels:
            if ch % self.norm_groups:
                raise ValueError(f"norm_groups {self.norm_groups} must divide every block width {self.block_channels}")
        resolutions = [self.image_size // 2**i for i in range(len(self.channel_mult))]
        bad = [r for r in self.attention_resolutions if r not in resolutions]
        if bad:
            raise ValueError(f"attention_resolutions {bad} are not feature resolutions {resolutions}")
        return self

    @property
    def block_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.base_channels

    def attention_levels(self) -> tuple[bool, ...]:
        return tuple(self.image_size // 2**i in self.attention_resolutions for i in range(len(self.channel_mult)))

    def covariate_layout(self) -> list[tuple[str, str]]:
        """[(covariate, slot)] of the conditioning vector: ("age", "z"), ("age", "present"), ("sex", "M")..."""
        out: list[tuple[str, str]] = []
        for name in self.covariates:
            out += [(name, "M"), (name, "F")] if name == "sex" else [(name, "z"), (name, "present")]
        return out


UNITS = {"age": "years", "ivsd": "cm", "lvidd": "cm", "lvpwd": "cm"}


def conditions(cfg: DDPMConfig) -> dict[str, dict]:
    """JSON schema of each covariate a generation request may set (any may be left out: unobserved)."""
    out: dict[str, dict] = {}
    for name in cfg.covariates:
        if name == "sex":
            out[name] = {"type": "string", "enum": ["M", "F"]}
        else:
            lo, hi = RANGES[name]
            out[name] = {"type": "number", "minimum": lo, "maximum": hi, "unit": UNITS[name]}
    return out


PRESETS: dict[str, dict[str, Any]] = {
    "tiny": {"image_size": 64, "base_channels": 32, "channel_mult": (1, 2, 2), "attention_resolutions": (16,)},
    "small": {"image_size": 128, "base_channels": 64, "channel_mult": (1, 1, 2, 2, 4), "attention_resolutions": (16,)},
    # cxr_ddpm trains at 256² with a diffusers UNet2DModel (128, 128, 256, 256, 512, 512), attention at 16x16
    "paper": {"image_size": 256, "base_channels": 128, "channel_mult": (1, 1, 2, 2, 4, 4), "attention_resolutions": (16,)},
}
