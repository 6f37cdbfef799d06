"""Text-guided img2img (SDEdit, Meng et al.; the attribution paper's inference): encode the image with the
latent model's frozen autoencoder, noise its latent to `strength` of the schedule, denoise toward a prompt
with classifier-free guidance against the empty report (DDIM or PNDM, diffusers' schedulers), decode.

strength 0 returns D(E(x)) (the autoencoder's reconstruction: the floor of any map), strength 1 samples from
noise under the prompt. Images are float32 [n, 1, S, S] in [-1, 1]; maps float32 [n, S, S].
"""
from __future__ import annotations

import numpy as np
import torch

from cxrray.errors import InputError
from cxrray.pipelines.settings import AttributionConfig


@torch.no_grad()
def healthy_counterparts(model, images: torch.Tensor, prompt: str, cfg: AttributionConfig,
                         generator: torch.Generator) -> torch.Tensor:
    """The counterparts of `images` under `prompt` ("" = unconditional) with `cfg`'s strength, guidance,
    steps and scheduler; [n, 1, S, S] in [-1, 1] on the images' grid."""
    from cxrray.diffusion.ddim import walk
    from cxrray.families.ldm.task import prompt_ids

    if prompt and not model.cfg.text:
        raise InputError("this latent diffusion model is unconditional: it cannot be guided by a prompt")
    device = next(model.unet.parameters()).device
    z = model.latents(images.to(device).float())
    if cfg.strength >= 1.0:  # all the way: a sample from noise under the prompt (walk takes x as x_T at 1)
        z = torch.randn(z.shape, generator=generator, device=generator.device).to(device)
    if cfg.strength > 0.0:
        n = len(images)
        ids = prompt_ids(model, [prompt] * n, device) if prompt else None
        null = model.context(None, n) if cfg.guidance != 1.0 and model.cfg.text else None
        extra = {"eta": 0.0} if cfg.scheduler == "ddim" else {}
        z = walk(model, cfg.scheduler, z, model.context(ids, n), cfg.steps, None, clip=False, guidance=cfg.guidance,
                 null=null, start=cfg.strength, generator=generator, **extra)
    out = model.decode(z).clamp(-1, 1)
    if out.shape[-1] != images.shape[-1]:  # the autoencoder's own side: back onto the images' grid
        out = torch.nn.functional.interpolate(out, size=images.shape[-2:], mode="bilinear", align_corners=False)
    return out


def attribution_maps(model, images: np.ndarray, prompt: str, cfg: AttributionConfig, seeds: list[int]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(signed maps reference - counterpart, counterparts) [n, S, S], the reference being the image or its
    reconstruction D(E(x)) (`cfg.reference`); image i's noise from `seeds[i]` alone (one image per call: a map
    never depends on its batch)."""
    healthy = []
    for image, seed in zip(np.asarray(images, np.float32), seeds):
        x = torch.from_numpy(image[None])
        healthy.append(healthy_counterparts(model, x, prompt, cfg, torch.Generator().manual_seed(seed))[:, 0].cpu().numpy())
    well = np.concatenate(healthy).astype(np.float32)
    return reference_images(model, images, cfg) - well, well


def reference_images(model, images: np.ndarray, cfg: AttributionConfig) -> np.ndarray:
    """[n, S, S]: the images themselves, or (reference="reconstruction") D(E(x)) on their grid."""
    images = np.asarray(images, np.float32)
    if cfg.reference == "image":
        return images[:, 0]
    floor = cfg.model_copy(update={"strength": 0.0})
    return np.concatenate([healthy_counterparts(model, torch.from_numpy(image[None]), "", floor, torch.Generator())[:, 0]
                           .cpu().numpy() for image in images]).astype(np.float32)
