"""Where a denoiser fails along its schedule: the error of its noise and clean-image estimates per timestep.

A sampler from pure noise starts where an eps model's clean-image estimate multiplies its noise error by
sqrt((1 - ab) / ab) (hundreds near T on Cheff's latent schedule); this measures, on real data, how large the
estimate's error is at each t, so a failing sampler can be told from a model that has not learnt.
"""
from __future__ import annotations

import torch

from cxrray.diffusion.schedule import eps_and_x0, make_scheduler


@torch.no_grad()
def denoising_error(model, x0: torch.Tensor, condition, timesteps: list[int], seed: int = 0) -> list[dict]:
    """x0 [B, C, S, S] (the model's own space), `condition` what the model takes beside (x_t, t); per t in
    `timesteps`: alpha_bar; the noise estimate's MSE; the clean estimate's RMSE (unclipped); the amplification
    sqrt((1 - ab) / ab) an eps error meets in it (None at ab = 0); and the model's own output against its own
    target (eps or v): `output_mse`, and `output_gain`, what that error is multiplied by in the clean estimate
    (eps: the amplification; v: sqrt(1 - ab) <= 1), so x0_rmse ~ output_gain * sqrt(output_mse)."""
    schedule = getattr(model, "schedule", {})
    sched = make_scheduler("ddpm", **schedule)
    kind = schedule.get("prediction_type", "epsilon")
    was_training = model.training
    model.eval()
    rows = []
    try:
        for t in timesteps:
            noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(seed + int(t))).to(x0.device)
            tt = torch.full((x0.shape[0],), int(t), dtype=torch.long, device=x0.device)
            x_t = sched.add_noise(x0, noise, tt)
            output = model(x_t, tt, condition).float()
            eps, x0_hat = eps_and_x0(kind, sched.alphas_cumprod, output, x_t, tt)
            target = noise if kind == "epsilon" else sched.get_velocity(x0, noise, tt)
            ab = float(sched.alphas_cumprod[int(t)])
            amplification = ((1 - ab) / ab) ** 0.5 if ab > 0 else None  # None, not inf: the rows go to JSON
            rows.append({"t": int(t), "alpha_bar": ab, "eps_mse": float(((eps - noise) ** 2).mean()),
                         "x0_rmse": float(((x0_hat - x0) ** 2).mean().sqrt()), "amplification": amplification,
                         "output_mse": float(((output - target) ** 2).mean()),
                         "output_gain": amplification if kind == "epsilon" else (1 - ab) ** 0.5})
    finally:
        model.train(was_training)
    return rows
