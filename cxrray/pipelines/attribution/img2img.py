"""Text-guided img2img (SDEdit, Meng et al.; the attribution paper's inference): encode the image with the
latent model's frozen autoencoder, noise its latent to `strength` of the schedule, denoise toward a prompt
with classifier-free guidance against the empty report (DDIM or PNDM, diffusers' schedulers), decode.

strength 0 returns D(E(x)) (the autoencoder's reconstruction: the floor of any map), strength 1 samples from
noise under the prompt. Images are float32 [n, 1, S, S] in [-1, 1]; maps float32 [n, S, S]. Image i's noise
comes from its own seed and both samplers are deterministic after it (DDIM at eta 0, PLMS), so a counterpart
does not depend on the batch it is walked in beyond floating-point summation order (<= 1e-5 on a CPU).
"""
from __future__ import annotations

import numpy as np
import torch

from cxrray.errors import InputError
from cxrray.pipelines.seeds import item_noise
from cxrray.pipelines.settings import AttributionConfig

BATCH = 32  # images walked together: the batch amortises each step's per-call overhead on a CPU


@torch.no_grad()
def healthy_counterparts(model, images: torch.Tensor, prompt: str, cfg: AttributionConfig,
                         seeds: list[int]) -> torch.Tensor:
    """The counterparts of `images` under `prompt` ("" = unconditional) with `cfg`'s strength, guidance,
    steps and scheduler, image i noised from `seeds[i]`; [n, 1, S, S] in [-1, 1] on the images' grid."""
    from cxrray.diffusion.ddim import walk
    from cxrray.families.ldm.task import prompt_ids

    if prompt and not model.cfg.text:
        raise InputError("this latent diffusion model is unconditional: it cannot be guided by a prompt")
    if len(seeds) != len(images):
        raise ValueError(f"one seed per image: {len(seeds)} seeds for {len(images)} images")
    device = next(model.unet.parameters()).device
    z = model.latents(images.to(device).float())
    noise = item_noise(seeds, tuple(z.shape[1:])).to(device) if cfg.strength > 0.0 else None
    if cfg.strength >= 1.0:  # all the way: a sample from noise under the prompt (walk takes x as x_T at 1)
        z = noise
    if cfg.strength > 0.0:
        n = len(images)
        ids = prompt_ids(model, [prompt] * n, device) if prompt else None
        null = model.context(None, n) if cfg.guidance != 1.0 and model.cfg.text else None
        extra = {"eta": 0.0} if cfg.scheduler == "ddim" else {}
        z = walk(model, cfg.scheduler, z, model.context(ids, n), cfg.steps, None, clip=False, guidance=cfg.guidance,
                 null=null, start=cfg.strength, noise=noise, **extra)
    out = model.decode(z).clamp(-1, 1)
    if out.shape[-1] != images.shape[-1]:  # the autoencoder's own side: back onto the images' grid
        out = torch.nn.functional.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return out


def attribution_maps(model, images: np.ndarray, prompt: str, cfg: AttributionConfig, seeds: list[int],
                     batch: int = BATCH) -> tuple[np.ndarray, np.ndarray]:
    """(signed maps reference - counterpart, counterparts) [n, S, S], the reference being the image or its
    reconstruction D(E(x)) (`cfg.reference`); image i's noise from `seeds[i]` alone, `batch` images a walk."""
    images = np.asarray(images, np.float32)
    well = _counterparts_batched(model, images, prompt, cfg, seeds, batch)
    return reference_images(model, images, cfg, batch) - well, well


def reference_images(model, images: np.ndarray, cfg: AttributionConfig, batch: int = BATCH) -> np.ndarray:
    """[n, S, S]: the images themselves, or (reference="reconstruction") D(E(x)) on their grid."""
    images = np.asarray(images, np.float32)
    if cfg.reference == "image":
        return images[:, 0]
    return _counterparts_batched(model, images, "", cfg.model_copy(update={"strength": 0.0}), [0] * len(images), batch)


def _counterparts_batched(model, images: np.ndarray, prompt: str, cfg: AttributionConfig, seeds: list[int],
                          batch: int) -> np.ndarray:
    """`healthy_counterparts` over float32 [n, 1, S, S], `batch` images a call -> float32 [n, S, S]."""
    return np.concatenate([
        healthy_counterparts(model, torch.from_numpy(images[i:i + batch]), prompt, cfg, seeds[i:i + batch])[:, 0]
        .cpu().numpy() for i in range(0, len(images), batch)]).astype(np.float32)
