"""Noise schedule and the diffusion-autoencoder training objective (stateless functions over diffusers schedulers).

All three schedulers share one beta table (default: linear 1e-4 -> 0.02 over T = 1000, as DDPM / Diff-AE).
The DDIM pair uses "leading" spacing with `steps_offset=0` and `set_alpha_to_one=True`, so for n steps
both walk the grid {0, r, 2r, ..., (n-1)r} (r = T // n) and x0 sits at alpha_bar = 1: every inverse step
t_k-r -> t_k is exactly the sampling step t_k -> t_k-r run backwards (same alphas, same model timestep t_k).
"leading" is used because diffusers' `step` derives the neighbouring timestep as t -/+ T // n; "trailing"
disagrees with that when n does not divide T. The price: when n does not divide T the top step is
(n-1)r < T-1 (e.g. 894 for n = 150), alpha_bar there is 3e-4 (vs 4e-5 at T-1): still effectively pure noise.
"""
from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler, PNDMScheduler

T = 1000

SchedulerKind = Literal["ddpm", "ddim", "ddim_inverse", "pndm"]


def make_scheduler(kind: SchedulerKind = "ddpm", beta_schedule: str = "linear", beta_start: float = 1e-4,
                   beta_end: float = 0.02, clip_sample: bool = False, num_train_timesteps: int = T,
                   prediction_type: str = "epsilon", rescale_betas_zero_snr: bool = False):
    """A fresh diffusers scheduler (they are stateful after `set_timesteps`, so never share one across calls).
    `clip_sample` clips the predicted x0 to [-1, 1] at each step: for sampling from random x_T only, since
    it breaks the exact mirror between inversion and decoding. `prediction_type` is what the model outputs
    ("epsilon" or "v_prediction"); the schedulers' `step` converts either. `rescale_betas_zero_snr` rescales
    the betas so that alpha_bar at T - 1 is exactly 0 (Lin et al. 2024; v-prediction only)."""
    common = dict(num_train_timesteps=num_train_timesteps, beta_schedule=beta_schedule, beta_start=beta_start, beta_end=beta_end,
                  clip_sample=clip_sample, prediction_type=prediction_type, rescale_betas_zero_snr=rescale_betas_zero_snr)
    if kind == "ddpm":
        return DDPMScheduler(**common)
    ddim = dict(common, set_alpha_to_one=True, steps_offset=0, timestep_spacing="leading")
    if kind == "ddim":
        return DDIMScheduler(**ddim)
    if kind == "ddim_inverse":
        return DDIMInverseScheduler(**ddim)
    if kind == "pndm":  # PLMS as Stable Diffusion runs it (no Runge-Kutta warm-up); it never clips
        if rescale_betas_zero_snr:
            raise ValueError("the PNDM scheduler has no zero-terminal-SNR rescaling; sample this model with ddim")
        return PNDMScheduler(**{k: v for k, v in common.items() if k not in ("clip_sample", "rescale_betas_zero_snr")},
                             skip_prk_steps=True, set_alpha_to_one=False, steps_offset=0, timestep_spacing="leading")
    raise ValueError(f"scheduler kind must be 'ddpm', 'ddim', 'ddim_inverse' or 'pndm', got {kind!r}")


def training_loss(model, x0: torch.Tensor, generator: torch.Generator | None = None,
                  scheduler: DDPMScheduler | None = None) -> torch.Tensor:
    """Diff-AE's L_simple: z = encode(x0) (gradients reach the encoder), t ~ U{0..T-1}, eps ~ N(0, I),
    x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) eps, loss = mean ||model(x_t, t, z) - target||^2 (a scalar), where
    the target is eps, or v = sqrt(ab_t) eps - sqrt(1 - ab_t) x0 for a model with
    `schedule["prediction_type"] == "v_prediction"` (the scheduler defaults to the model's `schedule`).

    `generator` draws t and eps (it may live on the CPU while x0 is on an accelerator).
    """
    scheduler = scheduler or make_scheduler("ddpm", **getattr(model, "schedule", {}))
    b, device = x0.shape[0], x0.device
    gen_device = generator.device if generator is not None else device
    t = torch.randint(0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=gen_device).to(device)
    noise = torch.randn(x0.shape, generator=generator, device=gen_device, dtype=torch.float32).to(device, x0.dtype)
    z = model.encode(x0)
    x_t = scheduler.add_noise(x0, noise, t)
    target = noise if scheduler.config.prediction_type == "epsilon" else scheduler.get_velocity(x0, noise, t)
    return F.mse_loss(model(x_t, t, z).float(), target.float())


def eps_and_x0(prediction_type: str, alphas_cumprod: torch.Tensor, output: torch.Tensor, x_t: torch.Tensor,
               t: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """The noise and clean image a model output implies at (x_t, t), t the timestep the model was queried at
    (int or [B]): for "epsilon" eps = output, x0 = (x_t - sqrt(1-ab) eps) / sqrt(ab); for "v_prediction"
    eps = sqrt(ab) v + sqrt(1-ab) x_t, x0 = sqrt(ab) x_t - sqrt(1-ab) v (exact for either, since
    x_t = sqrt(ab) x0 + sqrt(1-ab) eps). Written here because diffusers converts only inside `step`, and its
    inverse DDIM step converts v with the neighbouring timestep's ab instead of the queried one."""
    ab = alphas_cumprod.to(x_t.device)[torch.as_tensor(t, device=x_t.device).reshape(-1)].float()
    ab = ab.view(-1, *([1] * (x_t.dim() - 1)))
    if prediction_type == "epsilon":
        return output, (x_t - (1 - ab).sqrt() * output) / ab.sqrt()
    if prediction_type == "v_prediction":
        return ab.sqrt() * output + (1 - ab).sqrt() * x_t, ab.sqrt() * x_t - (1 - ab).sqrt() * output
    raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
