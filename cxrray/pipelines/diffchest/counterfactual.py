"""Patient-specific counterfactuals from the diffusion autoencoder and the linear probe (DiffChest).

For an image x0 with code z and noise map x_T (deterministic DDIM inversion), the code is moved along
a direction for a target finding and decoded with the same x_T, so everything but the finding's semantics
is kept:

- linear (eq. 5):      zn* = zn + eps * y_t * sqrt(D) * d / |d|     (Diff-AE's manipulation step)
                       zn* = zn + eps * y_t * e                      (effect axis: eps in findings' worth)
- closed form (eq. 4): zn* = zn + (logit(p_t) - (w.zn + b)) / (w.d) * d   (smallest step along d reaching p_t)

where zn = (z - mean) / std is the probe's normalised code, w its weight, d the direction moved along
(`explain.axis`: the probe's activation pattern Cov(zn) w, w itself as in DiffChest, where the closed form
is eq. 4 exactly, or the finding's de-confounded effect e, see `head`), y_t = +1 (toward the finding) or
-1 (away), and p_t = target_probability (1 - p_t away). With `z_guidance` g > 1 the decode follows
eps(z) + g (eps(z*) - eps(z)) (the code change amplified along the inverted trajectory).

Two levers keep the patient: `invert_to` < 1 inverts only part of the way and decodes from there (the
coarse layout above that noise level stays the original's), and `blend` edits only inside a mask the model
itself gives (DiffEdit, Couairon et al. 2023: where the predicted clean image moves with the code),
retracing the inversion trajectory outside it (with `renoise`: redrawn inside it from the noised image, the
original pasted outside at every step, as in inpainting). Images are float32 [B, 1, S, S] in [-1, 1].
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from cxrray.diffusion.ddim import ddim_invert, ddim_renoise_decode, ddim_sample
from cxrray.pipelines.diffchest.head import LinearHead, logit
from cxrray.pipelines.settings import ExplainConfig

MASK_TIMESTEPS = (0.25, 0.5, 0.75)  # fractions of T where the model's edit mask is read (DiffEdit: ~0.5)


def shift_codes(head: LinearHead, z: torch.Tensor, finding: str, cfg: ExplainConfig, toward: int = 1) -> torch.Tensor:
    """z [B, D] -> z* [B, D] moved toward (+1) or away from (-1) `finding` (see module docstring)."""
    if toward not in (1, -1):
        raise ValueError(f"toward must be +1 or -1, got {toward}")
    w, b = head.direction(finding, z)
    d = {"pattern": head.pattern_of, "effect": head.effect_of}[cfg.axis](finding, z) if cfg.axis != "filter" else w
    zn = head.normalize(z.float())
    if cfg.mode == "linear":
        step = d if cfg.axis == "effect" else math.sqrt(zn.shape[1]) * d / d.norm()
        zn_star = zn + cfg.eps * toward * step
    else:
        target = logit(cfg.target_probability if toward == 1 else 1 - cfg.target_probability)
        step = (target - (zn @ w + b)) / w.dot(d)
        zn_star = zn + step[:, None] * d
    return head.denormalize(zn_star)


@dataclass
class Inversion:
    """A batch's deterministic inversion under its own codes, up to `explain.invert_to`: `states` is the
    trajectory x0 .. x_t0 when a blend needs it, else just its end."""

    states: list[torch.Tensor]

    @property
    def end(self) -> torch.Tensor:
        return self.states[-1]


def invert(model, x0: torch.Tensor, z: torch.Tensor, cfg: ExplainConfig) -> Inversion:
    """The inversion every decode of this batch under `cfg` starts from (renoise settings need none)."""
    if cfg.blend == "none":
        return Inversion([ddim_invert(model, x0, z, steps=cfg.invert_steps, span=cfg.invert_to)])
    states: list[torch.Tensor] = []
    ddim_invert(model, x0, z, steps=cfg.invert_steps, span=cfg.invert_to, record=states)
    return Inversion(states)


def edit_mask(change: torch.Tensor, cfg: ExplainConfig) -> torch.Tensor:
    """|change| [B, 1, S, S] -> mask [B, 1, S, S] in {0, 1}: blurred by `mask_blur` px, scaled to each image's
    maximum, above `mask_threshold`, dilated by `mask_dilate` px (DiffEdit's recipe)."""
    from scipy.ndimage import gaussian_filter

    from cxrray.eval.localisation import dilate

    a = change.abs().float().cpu().numpy()[:, 0]
    if cfg.mask_blur > 0:
        a = np.stack([gaussian_filter(m, cfg.mask_blur) for m in a])
    a = a / np.maximum(a.reshape(len(a), -1).max(axis=1), 1e-12)[:, None, None]
    return torch.from_numpy(dilate(a > cfg.mask_threshold, cfg.mask_dilate).astype(np.float32))[:, None]


def model_change(model, x0: torch.Tensor, z: torch.Tensor, z_star: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """DiffEdit's map: mean over `MASK_TIMESTEPS` of |x0_hat(x_t, t, z*) - x0_hat(x_t, t, z)| [B, 1, S, S], x_t the
    image noised with one seeded noise per t, x0_hat the clean image the model's output implies."""
    from cxrray.diffusion.schedule import eps_and_x0, make_scheduler

    sched = make_scheduler("ddpm", **getattr(model, "schedule", {}))
    kind, gen = sched.config.prediction_type, torch.Generator().manual_seed(seed)
    total = torch.zeros_like(x0, dtype=torch.float32)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for fraction in MASK_TIMESTEPS:
            t = torch.full((x0.shape[0],), int(fraction * (sched.config.num_train_timesteps - 1)), device=x0.device)
            x_t = sched.add_noise(x0, torch.randn(x0.shape, generator=gen).to(x0.device), t)
            x0_hat = [eps_and_x0(kind, sched.alphas_cumprod, model(x_t, t, code).float(), x_t, t)[1]
                      for code in (z_star, z)]
            total += (x0_hat[0] - x0_hat[1]).abs()
    model.train(was_training)
    return total / len(MASK_TIMESTEPS)


def decode_pair(model, x0: torch.Tensor, z: torch.Tensor, z_star: torch.Tensor, cfg: ExplainConfig,
                inversion: Inversion | None = None, with_reference: bool = False,
                reference: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """{"counterfactual"} decoded from z*, with "reference" (the decode of z itself under the same inversion,
    noise and mask: the reconstruction the counterfactual differs from by the code change alone) when asked,
    when renoising or when the mask is read from it, and "mask" when blending (1 = edited).
    `reference`: the plain (unmasked) decode of z, already made from the same inversion or noise."""
    out: dict[str, torch.Tensor] = {}
    shifted = dict(guidance=cfg.z_guidance, z_from=z)
    if cfg.renoise is not None:  # stochastic encoding: one seeded noise for every decode of this batch
        def redraw(code, **kw):
            return ddim_renoise_decode(model, code, x0, cfg.renoise, steps=cfg.steps,
                                       generator=torch.Generator().manual_seed(cfg.seed), **kw).clamp(-1, 1)
        if cfg.blend == "none":
            return {"reference": reference if reference is not None else redraw(z),
                    "counterfactual": redraw(z_star, **shifted)}
        change = (redraw(z_star, **shifted) - (reference if reference is not None else redraw(z))
                  if cfg.blend == "decoded" else model_change(model, x0, z, z_star, cfg.seed))
        mask = edit_mask(change, cfg).to(x0.device)  # redrawn inside, the original outside
        # the reference under the same mask: the two then differ by the code change alone
        return {"mask": mask, "reference": redraw(z, known=(x0, 1 - mask)),
                "counterfactual": redraw(z_star, known=(x0, 1 - mask), **shifted)}
    inversion = inversion or invert(model, x0, z, cfg)

    def decode(code, **kw):
        return ddim_sample(model, code, inversion.end.to(x0.device), steps=cfg.steps, span=cfg.invert_to,
                           **kw).clamp(-1, 1)

    if cfg.blend == "none":
        out["counterfactual"] = decode(z_star, **shifted)
        if reference is not None or with_reference:
            out["reference"] = reference if reference is not None else decode(z)
        return out
    change = (decode(z_star, **shifted) - (reference if reference is not None else decode(z))
              if cfg.blend == "decoded" else model_change(model, x0, z, z_star, cfg.seed))
    mask = out["mask"] = edit_mask(change, cfg).to(x0.device)
    if with_reference or cfg.blend == "decoded":  # the reference under the same mask (see the renoise case)
        out["reference"] = decode(z, blend=(inversion.states, mask))
    out["counterfactual"] = decode(z_star, blend=(inversion.states, mask), **shifted)
    return out


def counterfactuals(model, head: LinearHead, x0: torch.Tensor, finding: str, cfg: ExplainConfig, toward: int = 1,
                    inversion: Inversion | None = None, with_reference: bool = False) -> dict[str, torch.Tensor]:
    """Counterfactuals of a batch toward/away from `finding`.

    Returns float32 CPU tensors: original, counterfactual [B,1,S,S]; difference = counterfactual - original
    (with `renoise`: counterfactual - reference); z, z_star [B, D]; probs_before (probe on z), probs_after
    (probe on the re-encoded counterfactual), probs_latent (probe on z*) [B, F]; with `with_reference`
    (always with `renoise`), reference = the decode of z itself (the plain reconstruction, the baseline
    against which a counterfactual's changes are measured) and probs_reference; with `blend`, mask [B,1,S,S].
    `inversion`: this batch's `invert(...)` under `cfg`, when several findings share it.
    """
    device = next(model.parameters()).device
    x0 = x0.to(device).float()
    with torch.no_grad():
        z = model.encode(x0).float()
    z_star = shift_codes(head, z, finding, cfg, toward)
    decoded = decode_pair(model, x0, z, z_star, cfg, inversion, with_reference)
    cf = decoded["counterfactual"]
    with torch.no_grad():
        z_cf = model.encode(cf).float()
    out = {"original": x0, "counterfactual": cf, "difference": cf - x0, "z": z, "z_star": z_star,
           "probs_before": head.probabilities(z), "probs_after": head.probabilities(z_cf),
           "probs_latent": head.probabilities(z_star)}
    if "mask" in decoded:
        out["mask"] = decoded["mask"]
    if with_reference or cfg.renoise is not None:
        ref = decoded["reference"]
        with torch.no_grad():
            out["probs_reference"] = head.probabilities(model.encode(ref).float())
        out["reference"] = ref
        if cfg.renoise is not None:  # the redrawn details are not the code's doing: compare with the reference
            out["difference"] = cf - ref
    return {k: v.detach().cpu() for k, v in out.items()}
