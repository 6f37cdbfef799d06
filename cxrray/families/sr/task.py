"""Training objective, preparation, evaluation and export of the SR3 super-resolution model.

The loss is eps-MSE at t ~ U{0..T-1} under the cosine schedule (T = 2000) on the batch's images (the high
resolution), conditioned on their own degraded copy (`SuperResolution.degrade`)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from cxrray.errors import InputError
from cxrray.families.base import Evaluation
from cxrray.families.sr.config import SRConfig
from cxrray.families.sr.network import SuperResolution, resize


def loss(model: SuperResolution, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    from cxrray.diffusion.schedule import make_scheduler

    high = batch["image"]
    b, device = high.shape[0], high.device
    low = model.degrade(high)
    sched = make_scheduler("ddpm", **model.schedule)
    gen_device = generator.device if generator is not None else device
    t = torch.randint(0, model.cfg.timesteps, (b,), generator=generator, device=gen_device).to(device)
    noise = torch.randn(high.shape, generator=generator, device=gen_device).to(device, high.dtype)
    return F.mse_loss(model(sched.add_noise(high, noise, t), t, low).float(), noise.float())


def prepare(cfg: SRConfig, data_uri: str) -> SRConfig:
    """The autoencoder's config for the D(E(x)) fine-tune (from `vae_checkpoint`); `init_from` and
    `vae_checkpoint` as absolute checkpoint URIs (workers resolve them in another directory)."""
    from cxrray.io.checkpoint import resolve_checkpoint

    if cfg.init_from:
        cfg = SRConfig(**{**cfg.model_dump(), "init_from": resolve_checkpoint(cfg.init_from).uri})
    if cfg.degrade != "autoencoder":
        return cfg
    if not cfg.vae_checkpoint:
        raise InputError("model.degrade=autoencoder needs model.vae_checkpoint (the cascade's autoencoder)")
    from cxrray.families.vae.task import frozen_config

    vae_cfg = frozen_config(cfg.vae_checkpoint, "model.vae_checkpoint")
    return SRConfig(**{**cfg.model_dump(), "vae": vae_cfg, "low_size": vae_cfg.image_size,
                       "vae_checkpoint": resolve_checkpoint(cfg.vae_checkpoint).uri})


def initialise(model: SuperResolution) -> None:
    """Copy in the base model's U-Net (`init_from`: the fine-tune) and the autoencoder's (EMA) weights."""
    from cxrray.io.checkpoint import read_state, read_weights

    if model.cfg.init_from:
        if read_state(model.cfg.init_from)["model"].get("family") != "sr":
            raise InputError(f"model.init_from {model.cfg.init_from} is not a super-resolution model")
        base = read_weights(model.cfg.init_from)
        model.unet.load_state_dict({k[len("unet."):]: v for k, v in base.items() if k.startswith("unet.")})
    if model.vae is not None and model.cfg.vae_checkpoint:
        model.vae.load_state_dict(read_weights(model.cfg.vae_checkpoint))


@torch.no_grad()
def upscale(model: SuperResolution, low: torch.Tensor, steps: int, generator: torch.Generator,
            progress=None, start: float | None = None) -> torch.Tensor:
    """Low-resolution images [B, C, s, s] in [-1, 1] (any s: resized to low_size) -> [B, C, S, S], DDIM (eta 0),
    x0 clipped to [-1, 1], starting from the bicubic upsample noised to t = start * T (`start` None: the
    model's `sample_start`; 1: SR3's start from pure noise). Of `steps` on the whole schedule, those at or
    below the start run."""
    from cxrray.diffusion.ddim import walk

    device = next(model.unet.parameters()).device
    low = resize(low.to(device).float(), model.cfg.low_size)
    start = model.cfg.sample_start if start is None else float(start)
    if not 0.0 < start <= 1.0:
        raise InputError(f"the SR start must be in (0, 1], got {start}")
    if start < 1.0:
        return walk(model, "ddim", resize(low, model.cfg.image_size), low, steps, progress, clip=True, start=start,
                    generator=generator, eta=0.0)
    shape = (low.shape[0], model.cfg.in_channels, model.cfg.image_size, model.cfg.image_size)
    x_T = torch.randn(shape, generator=generator, device=generator.device).to(device)
    return walk(model, "ddim", x_T, low, steps, progress, clip=True, eta=0.0)


@torch.no_grad()
def evaluate(model: SuperResolution, batch: dict, seed: int, steps: int) -> Evaluation:
    """Upscaled degraded eval images beside bicubic upscaling and the originals: PSNR / SSIM of both."""
    from cxrray.eval.reconstruction import reconstruction_metrics

    device = next(model.unet.parameters()).device
    high = batch["image"].to(device).float()
    low = model.degrade(high)
    sr = upscale(model, low, steps, torch.Generator().manual_seed(seed))
    bicubic = resize(low, model.cfg.image_size)
    metrics = {f"sr_{k}": v for k, v in reconstruction_metrics(high, sr).items()}
    metrics.update({f"bicubic_{k}": v for k, v in reconstruction_metrics(high, bicubic).items()})
    return Evaluation(metrics, {"upscaled": [high, bicubic, sr]})


def export(model: SuperResolution, folder: Path) -> list[str]:
    """diffusers folders: `unet/` (UNet2DModel, 2 input channels) and `scheduler/` (DDIM, cosine, T = 2000)."""
    from diffusers import DDIMScheduler

    folder = Path(folder)
    model.unet.save_pretrained(folder / "unet", safe_serialization=True)
    DDIMScheduler(**model.schedule, clip_sample=True, set_alpha_to_one=True, steps_offset=0,
                  timestep_spacing="leading").save_pretrained(folder / "scheduler")
    return ["the U-Net's input is [x_t, bicubic(low) at the output size] along channels (SR3); "
            "diffusers has no SR3 pipeline: the loop is cxrray.families.sr.task.upscale"]
