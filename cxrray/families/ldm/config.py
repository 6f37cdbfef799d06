"""Cheff stage 2 as typed data: a latent diffusion U-Net over the frozen autoencoder's latents, optionally
conditioned on the report through a BERT-style encoder trained from scratch with it.

Torch-free, so `cxrray.config` can compose it. Defaults follow Cheff (Weber et al.) and its public
code: U-Net base 224, mult (1, 2, 4, 4), 2 residual layers, attention at latent resolutions 32/16/8,
T = 1000, LDM's "linear" schedule (sqrt(beta) linear, diffusers' `scaled_linear`) from 0.0015 to
0.0295 (0.0195 leaves structure in z_T: `tests/test_ldm.py` measures the signal left at T for both),
reports of up to 150 WordPiece tokens. Conditioning drop-out (`cond_drop`) for classifier-free guidance
is our addition (guidance 1 = off, as theirs).

`prepare` fills `vae` (the autoencoder's config), `tokenizer` (the `tokenizers` JSON of the latent
shards), `vocab_size` and `max_tokens` from the data, so all of it is saved with the model.
"""
from __future__ import annotations

from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cxrray.families.vae.config import VAEConfig


class LDMConfig(BaseModel):
    """Architecture, schedule and conditioning of the latent diffusion model; saved beside the weights."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
    # how a run starts, not what it trains: a continued run may change it (cxrray.train.pretrain)
    NOT_THE_MODEL: ClassVar[frozenset[str]] = frozenset({"init_from"})

    family: Literal["ldm"] = "ldm"
    image_size: int = Field(256, ge=16, le=4096)  # the autoencoder's image side (filled from `vae`)
    latent_channels: int = Field(3, ge=1)
    latent_size: int = Field(64, ge=4)  # latent side (image_size / the autoencoder's factor)
    in_channels: int = Field(1, ge=1)  # image channels the cascade produces
    base_channels: int = Field(224, ge=8)
    channel_mult: tuple[int, ...] = Field((1, 2, 4, 4), min_length=1)
    layers_per_block: int = Field(2, ge=1)
    attention_resolutions: tuple[int, ...] = (32, 16, 8)  # latent resolutions with (cross-)attention
    head_channels: int = Field(32, ge=1)  # channels per attention head
    norm_groups: int = Field(32, ge=1)
    timesteps: int = Field(1000, ge=2)
    beta_schedule: Literal["scaled_linear", "linear", "squaredcos_cap_v2"] = "scaled_linear"
    beta_start: float = Field(0.0015, gt=0, lt=1)
    beta_end: float = Field(0.0295, gt=0, lt=1)
    # the top of the schedule: at t near T an eps model's x0 estimate multiplies its error by sqrt((1-ab)/ab)
    # (~426x at t = 980 with 0.0295); Lin et al. 2024's answer is a zero-terminal-SNR rescale of the betas with
    # v-prediction (eps is undefined at SNR 0). Both off: Cheff's schedule.
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"
    zero_terminal_snr: bool = False
    # report conditioning: a BertModel built from this config (no download), trained with the U-Net
    text: bool = True
    text_width: int = Field(512, ge=8)
    text_layers: int = Field(4, ge=1)
    text_heads: int = Field(8, ge=1)
    max_tokens: int = Field(150, ge=4, le=512)
    vocab_size: int | None = Field(None, ge=8)  # from the tokenizer (prepare)
    tokenizer: str | None = None  # the `tokenizers` JSON (prepare), saved with the model
    cond_drop: float = Field(0.1, ge=0.0, le=1.0)  # report replaced by the empty report (CFG)
    # the frozen autoencoder: its checkpoint (weights copied in at the start of training) and config
    vae_checkpoint: str | None = None
    vae: VAEConfig | None = None
    # a fine-tune (the attribution paper's DreamBooth): every weight copied in from this latent diffusion model,
    # whose architecture, schedule, autoencoder and tokenizer the run takes over (prepare)
    init_from: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "LDMConfig":
        resolutions = [self.latent_size // 2**i for i in range(len(self.channel_mult))]
        if self.latent_size % 2 ** (len(self.channel_mult) - 1):
            raise ValueError(f"latent_size {self.latent_size} must be divisible by 2^{len(self.channel_mult) - 1}")
        bad = [r for r in self.attention_resolutions if r not in resolutions]
        if bad:
            raise ValueError(f"attention_resolutions {bad} are not latent resolutions {resolutions}")
        for ch in self.block_channels:
            if ch % self.norm_groups or ch % self.head_channels:
                raise ValueError(f"norm_groups {self.norm_groups} and head_channels {self.head_channels} must "
                                 f"divide every block width {self.block_channels}")
        if self.zero_terminal_snr and self.prediction_type != "v_prediction":
            raise ValueError("zero_terminal_snr needs prediction_type=v_prediction (eps is undefined at SNR 0)")
        if self.text_width % self.text_heads:
            raise ValueError(f"text_heads {self.text_heads} must divide text_width {self.text_width}")
        if self.vae is not None and (self.vae.latent_size, self.vae.latent_channels, self.vae.image_size) != (
                self.latent_size, self.latent_channels, self.image_size):
            raise ValueError(f"the autoencoder gives {self.vae.latent_channels} x {self.vae.latent_size}² latents of "
                             f"{self.vae.image_size}² images; this model is set for {self.latent_channels} x "
                             f"{self.latent_size}² of {self.image_size}²")
        return self

    @property
    def block_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    def attention_levels(self) -> tuple[bool, ...]:
        return tuple(self.latent_size // 2**i in self.attention_resolutions for i in range(len(self.channel_mult)))

    @property
    def schedule(self) -> dict[str, Any]:
        return {"beta_schedule": self.beta_schedule, "beta_start": self.beta_start, "beta_end": self.beta_end,
                "num_train_timesteps": self.timesteps, "prediction_type": self.prediction_type,
                "rescale_betas_zero_snr": self.zero_terminal_snr}


def conditions(cfg: LDMConfig) -> dict[str, dict]:
    """A report-conditioned model takes a `prompt` (report text; "" or absent: unconditional)."""
    return {"prompt": {"type": "string", "maxLength": 2000,
                       "examples": ["Large pleural effusion in the right lower lung. A pacemaker in the left upper chest."]}
            } if cfg.text else {}


PRESETS: dict[str, dict[str, Any]] = {
    # this machine: 64² images -> 3 x 16² latents (the tiny autoencoder), a small U-Net and a 2-layer encoder
    "tiny": {"image_size": 64, "latent_size": 16, "base_channels": 64, "channel_mult": (1, 2, 2),
             "attention_resolutions": (8, 4), "head_channels": 32, "text_width": 128, "text_layers": 2,
             "text_heads": 4, "max_tokens": 64},
    "small": {"image_size": 256, "latent_size": 64, "base_channels": 128, "channel_mult": (1, 2, 4, 4),
              "text_width": 256, "text_layers": 4, "text_heads": 4, "max_tokens": 150},
    # Cheff: 256² -> 3 x 64², base 224, (1, 2, 4, 4), 2 layers, attention at 32/16/8, 0.0015 -> 0.0295; the
    # encoder's width/depth follow LDM's text-to-image BERT embedder (1280 x 32), assumed for Cheff's
    "paper": {"image_size": 256, "latent_size": 64, "text_width": 1280, "text_layers": 32, "text_heads": 16,
              "max_tokens": 150},
}
