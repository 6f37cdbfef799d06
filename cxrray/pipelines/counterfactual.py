"""Patient-specific counterfactuals from the diffusion autoencoder and the linear probe (DiffChest).

For an image x0 with code z and noise map x_T (deterministic DDIM inversion), the code is moved along
the probe's direction for a target finding and decoded with the same x_T, so everything but the
finding's semantics is kept:

- linear (eq. 5):      zn* = zn + eps * y_t * sqrt(D) * d / |d|     (Diff-AE's manipulation step)
- closed form (eq. 4): zn* = zn + (logit(p_t) - (w.zn + b)) / (w.d) * d   (smallest step along d reaching p_t)

where zn = (z - mean) / std is the probe's normalised code, w its weight, d the direction moved along
(`explain.axis`: the probe's activation pattern Cov(zn) w, or w itself as in DiffChest, where the
closed form is eq. 4 exactly), y_t = +1 (toward the finding) or -1 (away), and p_t = target_probability
(1 - p_t away). With `z_guidance` g > 1 the decode follows
eps(z) + g (eps(z*) - eps(z)) (the code change amplified along the inverted trajectory). Images are
float32 [B, 1, S, S] in [-1, 1].
"""
from __future__ import annotations

import math

import torch

from cxrray.pipelines.settings import ExplainConfig
from cxrray.diffusion.ddim import ddim_invert, ddim_renoise_decode, ddim_sample
from cxrray.pipelines.head import LinearHead, logit


def shift_codes(head: LinearHead, z: torch.Tensor, finding: str, cfg: ExplainConfig, toward: int = 1) -> torch.Tensor:
    """z [B, D] -> z* [B, D] moved toward (+1) or away from (-1) `finding` (see module docstring)."""
    if toward not in (1, -1):
        raise ValueError(f"toward must be +1 or -1, got {toward}")
    w, b = head.direction(finding, z)
    d = head.pattern_of(finding, z) if cfg.axis == "pattern" else w
    zn = head.normalize(z.float())
    if cfg.mode == "linear":
        zn_star = zn + cfg.eps * toward * math.sqrt(zn.shape[1]) * d / d.norm()
    else:
        target = logit(cfg.target_probability if toward == 1 else 1 - cfg.target_probability)
        step = (target - (zn @ w + b)) / w.dot(d)
        zn_star = zn + step[:, None] * d
    return head.denormalize(zn_star)


def counterfactuals(model, head: LinearHead, x0: torch.Tensor, finding: str, cfg: ExplainConfig, toward: int = 1,
                    x_T: torch.Tensor | None = None, with_reference: bool = False) -> dict[str, torch.Tensor]:
    """Counterfactuals of a batch toward/away from `finding`.

    Returns float32 CPU tensors: original, counterfactual [B,1,S,S]; difference = counterfactual - original
    (with `renoise`: counterfactual - reference); z, z_star [B, D]; x_T (inversion only); probs_before (probe
    on z), probs_after (probe on the re-encoded counterfactual), probs_latent (probe on z*) [B, F]; with
    `with_reference` (always with `renoise`), reference = the decode of z itself (the plain reconstruction,
    the baseline against which a counterfactual's changes are measured) and probs_reference.
    """
    device = next(model.parameters()).device
    x0 = x0.to(device).float()
    with torch.no_grad():
        z = model.encode(x0).float()
    z_star = shift_codes(head, z, finding, cfg, toward)
    if cfg.renoise is None:
        if x_T is None:
            x_T = ddim_invert(model, x0, z, steps=cfg.invert_steps)
        x_T = x_T.to(device).float()

        def decode(code, **kw):
            return ddim_sample(model, code, x_T, steps=cfg.steps, **kw).clamp(-1, 1)
    else:  # stochastic encoding: one seeded noise for every decode of this batch
        def decode(code, **kw):
            return ddim_renoise_decode(model, code, x0, cfg.renoise, steps=cfg.steps,
                                       generator=torch.Generator().manual_seed(cfg.seed), **kw).clamp(-1, 1)
    cf = decode(z_star, guidance=cfg.z_guidance, z_from=z)
    with torch.no_grad():
        z_cf = model.encode(cf).float()
    out = {"original": x0, "counterfactual": cf, "difference": cf - x0, "z": z, "z_star": z_star,
           "probs_before": head.probabilities(z), "probs_after": head.probabilities(z_cf),
           "probs_latent": head.probabilities(z_star)}
    if x_T is not None:
        out["x_T"] = x_T
    if with_reference or cfg.renoise is not None:
        ref = decode(z)
        with torch.no_grad():
            out["probs_reference"] = head.probabilities(model.encode(ref).float())
        out["reference"] = ref
        if cfg.renoise is not None:  # the redrawn details are not the code's doing: compare with the reference
            out["difference"] = cf - ref
    return {k: v.detach().cpu() for k, v in out.items()}
