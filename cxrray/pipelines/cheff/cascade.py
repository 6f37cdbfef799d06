"""Cheff's cascade as one object: report -> latent diffusion -> the autoencoder's decoder -> SR3 upscaling.

`Cheff(ldm, sr)` holds a loaded latent diffusion model (family `ldm`, its frozen autoencoder inside) and,
optionally, a super-resolution model (family `sr`). Every method is seeded (a CPU generator from `seed`:
same arguments, same images) and returns `Generated` (images float32 [n, 1, S, S] in [-1, 1] and the
sentence that goes into their provenance). The sampling loops are the families' own (diffusers schedulers
underneath); this object only chains them, so the jobs and Serve that call the families get the same images.

Masks are float [n, 1, S, S] at the LDM's image size: in `inpaint` 1 marks the region to generate (a device
to remove), in `outpaint` 1 marks the region to keep (everything else is generated: the inverted mask).
"""
from __future__ import annotations

from pathlib import Path

import torch

from cxrray.diffusion.ddim import stage_generator
from cxrray.errors import InputError
from cxrray.families import GenerateRequest, Generated
from cxrray.models.loading import LoadedModel, load_model

PAPER_STEPS = 150  # Cheff's DDIM steps for the latent model
SR_STEPS = 100  # our default for the SR3 stage (DDIM, eta 0)


class Cheff:
    """The cascade: `ldm` (a LoadedModel of family ldm) and optionally `sr` (family sr)."""

    def __init__(self, ldm: LoadedModel, sr: LoadedModel | None = None):
        if ldm.family.name != "ldm":
            raise InputError(f"the cascade's first stage must be a latent diffusion model, not family {ldm.family.name!r}")
        if ldm.model.vae is None:
            raise InputError("the latent diffusion model has no autoencoder: it cannot decode")
        if sr is not None:
            sr.family.require("upscale")
        self.ldm, self.sr = ldm, sr
        self.image_size = ldm.model.cfg.image_size

    @classmethod
    def load(cls, ldm: str, sr: str | None = None, device: str | None = None,
             tracking_uri: str | None = None) -> "Cheff":
        """From model URIs (checkpoints, pretraining outputs, models:/NAME@ALIAS), EMA weights, eval mode."""
        device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        stages = [load_model(uri, tracking_uri=tracking_uri) if uri else None for uri in (ldm, sr)]
        for stage in stages:
            if stage is not None:
                stage.model.to(device).eval()
        return cls(*stages)

    @property
    def output_size(self) -> int:
        return self.sr.model.cfg.image_size if self.sr is not None else self.image_size

    def _request(self, n: int, seed: int, steps: int, guidance: float, prompt, sampler: str = "ddim") -> GenerateRequest:
        conditions = {} if prompt is None else {"prompt": prompt}
        return GenerateRequest(n=n, steps=steps, generator=torch.Generator().manual_seed(int(seed)),
                               conditions=conditions, guidance=guidance, sampler=sampler)

    def _then_upscale(self, made: Generated, generator: torch.Generator, sr_steps: int | None,
                      sr_start: float | None = None) -> Generated:
        if self.sr is None or sr_steps == 0:
            return made
        steps = sr_steps or SR_STEPS
        start = self.sr.model.cfg.sample_start if sr_start is None else sr_start
        high = self.sr.family.upscale(self.sr.model, made.images, steps, generator, start=start)
        return Generated(high.float().cpu(), f"{made.how}, upscaled {made.images.shape[-1]} -> {high.shape[-1]} by "
                                             f"SR3 model {self.sr.identity['name']} ({steps} DDIM steps on T, from the "
                                             f"bicubic upsample noised to {start:g} T)")

    def sample(self, prompt: str | list[str] | None = None, n: int = 1, seed: int = 0, steps: int = PAPER_STEPS,
               guidance: float = 1.0, sampler: str = "ddim", sr_steps: int | None = None,
               sr_start: float | None = None) -> Generated:
        """n images from a report (one for all, or one per image; None or "": unconditional), upscaled by
        the SR model when the cascade has one (`sr_steps=0`: not upscaled). The latent model draws from
        `seed`, the SR model from its own noise (`stage_generator(seed, 1)`)."""
        request = self._request(n, seed, steps, guidance, prompt, sampler)
        made = self.ldm.family.generate(self.ldm.model, request)
        return self.upscale_generated(Generated(made.images.float().cpu(), made.how), seed, sr_steps, sr_start)

    def sample_latents(self, prompt: str | list[str] | None = None, n: int = 1, seed: int = 0, steps: int = PAPER_STEPS,
                       guidance: float = 1.0, sampler: str = "ddim") -> torch.Tensor:
        """The latent model's own samples, float32 [n, C, s, s] in its (scaled) latent space: what `sample`
        decodes from the same arguments (`decode(sample_latents(...))` equals `sample(..., sr_steps=0)`)."""
        from cxrray.families.ldm.task import request_latents

        return request_latents(self.ldm.model, self._request(n, seed, steps, guidance, prompt, sampler))[0].float().cpu()

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Latents [n, C, s, s] -> images float32 [n, 1, S, S] through the cascade's autoencoder."""
        device = next(self.ldm.model.unet.parameters()).device
        return self.ldm.model.decode(latents.to(device)).float().cpu()

    def upscale_generated(self, made: Generated, seed: int, sr_steps: int | None = None,
                          sr_start: float | None = None) -> Generated:
        """The cascade's last stage on what the latent model made from `seed` (its own noise: `stage_generator`)."""
        return self._then_upscale(made, stage_generator(seed, 1), sr_steps, sr_start)

    def _images(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = torch.as_tensor(image).float(), torch.as_tensor(mask).float()
        if image.ndim == 2:
            image, mask = image[None, None], mask[None, None] if mask.ndim == 2 else mask
        if image.shape != mask.shape:
            raise InputError(f"the mask's shape {tuple(mask.shape)} differs from the image's {tuple(image.shape)}")
        if image.shape[-1] != self.image_size or image.shape[-2] != self.image_size:
            raise InputError(f"images must be {self.image_size}x{self.image_size} (the model's size), "
                             f"got {tuple(image.shape[-2:])}")
        return image, mask

    def inpaint(self, image: torch.Tensor, mask: torch.Tensor, prompt: str | None = None, seed: int = 0,
                steps: int = PAPER_STEPS, guidance: float = 1.0, sr_steps: int | None = 0) -> Generated:
        """The region where mask is 1 generated anew (under `prompt`), the rest kept (see the family's inpaint)."""
        image, mask = self._images(image, mask)
        request = self._request(image.shape[0], seed, steps, guidance, prompt)
        made = self.ldm.family.inpaint(self.ldm.model, image, mask, request)
        return self.upscale_generated(Generated(made.images.float().cpu(), made.how), seed, sr_steps)

    def outpaint(self, image: torch.Tensor, mask: torch.Tensor, prompt: str | None = None, seed: int = 0,
                 steps: int = PAPER_STEPS, guidance: float = 1.0, sr_steps: int | None = 0) -> Generated:
        """The region where mask is 1 kept, everything around it generated (inpainting the inverted mask)."""
        image, mask = self._images(image, mask)
        made = self.inpaint(image, 1.0 - (mask > 0.5).float(), prompt, seed, steps, guidance, sr_steps)
        return Generated(made.images, made.how.replace("inpainting", "outpainting"))

    @torch.no_grad()
    def reconstruct(self, image: torch.Tensor) -> torch.Tensor:
        """D(E(x)) through the cascade's autoencoder: images [n, 1, S, S] in [-1, 1] -> the same shape."""
        vae = self.ldm.model.vae
        device = next(vae.parameters()).device
        return vae.decode_latents(vae.latents(vae.fit(torch.as_tensor(image).float().to(device)))).float().cpu()

    def upscale(self, image: torch.Tensor, seed: int = 0, steps: int = SR_STEPS, start: float | None = None) -> Generated:
        """Low-resolution images [n, 1, s, s] -> the SR model's size (seeded DDIM from the bicubic upsample
        noised to `start` T; None: the model's own `sample_start`)."""
        if self.sr is None:
            raise InputError("this cascade has no super-resolution model (give one with --sr)")
        image = torch.as_tensor(image).float()
        return self._then_upscale(Generated(image, "given images"), torch.Generator().manual_seed(int(seed)), steps, start)

    def export(self, folder: str | Path) -> dict[str, list[str]]:
        """diffusers folders per stage: `ldm/` (unet, text_encoder, tokenizer, vae, scheduler) and `sr/`;
        returns each stage's notes on what diffusers' classes cannot express."""
        folder = Path(folder)
        notes = {"ldm": self.ldm.family.export(self.ldm.model, folder / "ldm")}
        if self.sr is not None:
            notes["sr"] = self.sr.family.export(self.sr.model, folder / "sr")
        return notes
