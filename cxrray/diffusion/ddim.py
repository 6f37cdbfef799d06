"""Deterministic DDIM decoding and inversion for the diffusion autoencoder (eta = 0).

Stateless functions over diffusers' `DDIMScheduler` / `DDIMInverseScheduler` (see `schedule.py` for
why the two are exact mirrors). Every function runs under `torch.no_grad()`, puts the model in eval
mode for the call (and restores its previous mode), keeps the latent in float32 (the model may run
under bf16 autocast; its output is upcast before the scheduler step) and works on batches.

`progress`, when given, is called as `progress(done, total)` after each denoising/inversion step.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch

from cxrray.diffusion.schedule import T, eps_and_x0, make_scheduler

Progress = Callable[[int, int], None] | None


@contextlib.contextmanager
def _eval(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _check_steps(steps: int, timesteps: int = T) -> int:
    """steps as an int in 1..timesteps (the schedule's own T: 2000 for SR3, 1000 by default)."""
    steps = int(steps)
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be in 1..{timesteps} (the model's schedule), got {steps}")
    return steps


def _output(model, sched, x: torch.Tensor, t: torch.Tensor, z: torch.Tensor | None, guidance: float = 1.0,
            null: torch.Tensor | None = None) -> torch.Tensor:
    """What the sampler steps on at (x, t), in the scheduler's `prediction_type`: the model's own output, or
    eps converted from a v model's output at the timestep it was queried at; with guidance != 1,
    classifier-free: out_u + g (out_c - out_u) (the same combination in eps or v, both affine in the output)."""
    tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
    kind = getattr(model, "schedule", {}).get("prediction_type", "epsilon")

    def under(code):
        out = model(x, tt, code).float()
        return out if kind == sched.config.prediction_type else eps_and_x0(kind, sched.alphas_cumprod, out, x, tt)[0]

    out = under(z)
    if guidance != 1.0 and null is not None:
        out_u = under(null)
        out = out_u + guidance * (out - out_u)
    return out


def walk(model, kind: str, x: torch.Tensor, z: torch.Tensor | None, steps: int, progress: Progress,
          clip: bool = False, guidance: float = 1.0, null: torch.Tensor | None = None, start: float = 1.0,
          generator: torch.Generator | None = None, known: tuple[torch.Tensor, torch.Tensor] | None = None,
          span: float = 1.0, record: list | None = None,
          blend: tuple[list[torch.Tensor], torch.Tensor] | None = None, guide=None, noise: torch.Tensor | None = None,
          **step_kwargs) -> torch.Tensor:
    """Run one sampler over `steps` steps ("ddim": x_T -> x0, "ddim_inverse": x0 -> x_T, "ddpm":
    ancestral x_T -> x0, "pndm": PLMS x_T -> x0) under the model's own schedule (`model.schedule`; default linear T = 1000, eps prediction).
    `start` < 1 (ddim, pndm): `x` is a clean image, noised to the first timestep <= start * T with `noise`
    (x's shape; default drawn from `generator`), and only the remaining steps run (SDEdit / Diff-AE's stochastic encoding); at 1, `x` is
    taken as x_T itself.
    `known` = (x0 of the same shape as x, keep mask broadcastable to it, 1 = known): before the first step and
    after each one, where keep is 1 the sample is replaced by x0 forward-noised (fresh noise from `generator`)
    to the timestep the sample is now at, and by x0 itself at the end (inpainting as in LDM / Cheff).
    `span` < 1 (ddim / ddim_inverse): only the timesteps <= span * (T - 1) run, `x` taken as it is (no noise
    added): a partial inversion stops there and its decode starts there (the exact mirror of each other).
    `record` (a list): x before the first step and after each one are appended (an inversion's trajectory,
    record[0] = the clean image). `blend` = (such a trajectory, mask broadcastable to x, 1 = edit): after decode
    step i (1-based), where mask is 0 the sample is replaced by the trajectory's state at the same timestep
    (trajectory[-1 - i]), so outside the mask the decode retraces the inversion back to the original.
    `guide(x_t, t) -> grad` (classifier guidance, Dhariwal & Nichol's DDIM form): each step uses
    eps - sqrt(1 - ab_t) grad, grad = s * d log p(y | x_t, t) / d x_t; only for models stepped in eps."""
    # the forward samplers step on the model's own output (a v model at zero terminal SNR has no eps-form step
    # at the top); the inverse one steps in eps, which `_output` converts at the timestep it queried
    schedule = getattr(model, "schedule", {})
    stepped_as = "epsilon" if kind == "ddim_inverse" else schedule.get("prediction_type", "epsilon")
    sched = make_scheduler(kind, clip_sample=clip, **{**schedule, "prediction_type": stepped_as})
    sched.set_timesteps(_check_steps(steps, sched.config.num_train_timesteps), device=x.device)
    x = x.float()
    timesteps = sched.timesteps
    if span < 1.0:
        timesteps = timesteps[timesteps <= span * (sched.config.num_train_timesteps - 1)]
    if blend is not None and len(blend[0]) != len(timesteps) + 1:
        raise ValueError(f"blend needs the trajectory of a {len(timesteps)}-step inversion over the same span "
                         f"({len(timesteps) + 1} states), got {len(blend[0])}")
    if start < 1.0:
        timesteps = timesteps[timesteps <= start * (sched.config.num_train_timesteps - 1)]
        if kind == "pndm":  # PLMS warms up on its second timestep twice ([t0, t1, t1, t2, ...], as set_timesteps
            kept = torch.unique_consecutive(timesteps)  # lays it out); rebuild that layout for the kept part
            timesteps = torch.cat([kept[:1], kept[1:2], kept[1:]]) if len(kept) > 1 else kept
        if noise is None:
            noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
        elif noise.shape != x.shape:
            raise ValueError(f"noise {tuple(noise.shape)} must have the image's shape {tuple(x.shape)}")
        x = sched.add_noise(x, noise.to(x.device).float(), timesteps[:1].expand(x.shape[0]))
    if kind == "ddpm":
        step_kwargs["generator"] = generator
    paste = _paster(sched, known, generator) if known is not None else None
    if paste is not None:
        x = paste(x, timesteps[0])
    if record is not None:
        record.append(x)
    with _eval(model):
        for i, t in enumerate(timesteps):
            out = _output(model, sched, x, t, z, guidance, null)
            if guide is not None:
                if sched.config.prediction_type != "epsilon":
                    raise ValueError("classifier guidance steps in eps; this model's sampler steps in v")
                with torch.enable_grad():
                    grad = guide(x, t).detach()
                out = out - (1 - sched.alphas_cumprod[int(t)]).sqrt().to(x.device) * grad
            x = sched.step(out, int(t), x, return_dict=False, **step_kwargs)[0]
            if record is not None:
                record.append(x)
            if blend is not None:
                keep = blend[1].to(x.device).float()
                x = keep * x + (1 - keep) * blend[0][-2 - i].to(x.device)
            if paste is not None:
                x = paste(x, timesteps[i + 1] if i + 1 < len(timesteps) else None)
            if progress is not None:
                progress(i + 1, len(timesteps))
    return x


def _paster(sched, known: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator | None):
    """x, t -> x with the known region set to q(x_t | x0) (t None: x0 itself)."""
    x0, keep = known[0].float(), known[1].float()

    def paste(x: torch.Tensor, t) -> torch.Tensor:
        if t is None:
            target = x0.to(x.device)
        else:
            noise = torch.randn(x.shape, generator=generator, device=generator.device if generator else x.device)
            target = sched.add_noise(x0.to(x.device), noise.to(x.device), t.reshape(1).expand(x.shape[0]).to(x.device))
        keep_here = keep.to(x.device)
        return keep_here * target + (1 - keep_here) * x

    return paste


def ddim_sample(model, z: torch.Tensor, x_T: torch.Tensor, steps: int = 100, progress: Progress = None,
                clip: bool = False, guidance: float = 1.0, z_from: torch.Tensor | None = None, span: float = 1.0,
                blend: tuple[list[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Decode x_T -> x0 with deterministic DDIM (eta 0), conditioned on z [B, z_dim]. Returns float32.
    `clip` clips each step's predicted x0 to [-1, 1] (random x_T only; keep it off to decode an inversion).
    With `z_from` (the code x_T was inverted with) and `guidance` g != 1, each step follows
    eps(z_from) + g (eps(z) - eps(z_from)): the change of code, amplified g times (g = 1: plain decode).
    `span` < 1: x_T is a partial inversion's end (`ddim_invert(span=)`, same steps); `blend`: see `walk`."""
    return walk(model, "ddim", x_T, z, steps, progress, clip=clip, guidance=guidance, null=z_from, span=span,
                blend=blend, eta=0.0)


def ddim_renoise_decode(model, z: torch.Tensor, x0: torch.Tensor, start: float, steps: int = 100,
                        generator: torch.Generator | None = None, guidance: float = 1.0,
                        z_from: torch.Tensor | None = None,
                        known: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Noise x0 to t = start * T with noise from `generator`, then DDIM-decode (eta 0) under z: the part
    of the image above that noise level is redrawn under z, the rest kept (Diff-AE's stochastic encoding,
    SDEdit). The same generator seed gives the same noise, so two codes decoded from one seed differ only
    by the code. `guidance`/`z_from` as in `ddim_sample`; `known` = (x0, keep mask) holds the kept region to
    x0 (forward-noised at each step, x0 itself at the end: `walk`), so only the rest is redrawn. Returns float32."""
    if not 0.0 < start < 1.0:
        raise ValueError(f"start must be in (0, 1), got {start}")
    return walk(model, "ddim", x0, z, steps, None, guidance=guidance, null=z_from, start=start,
                generator=generator, known=known, eta=0.0)


def ddim_invert(model, x0: torch.Tensor, z: torch.Tensor, steps: int = 250, progress: Progress = None,
                span: float = 1.0, record: list | None = None) -> torch.Tensor:
    """Deterministic DDIM inversion x0 -> x_T given z (the model is queried at each step's target timestep,
    the mirror of `ddim_sample` with the same `steps`). `span` < 1 stops at the last timestep <= span * (T - 1)
    (partial inversion); `record` collects the trajectory (see `walk`). Returns float32."""
    return walk(model, "ddim_inverse", x0, z, steps, progress, span=span, record=record)


def stage_generator(seed: int, stage: int) -> torch.Generator:
    """A CPU generator for stage `stage` of a cascade seeded by one user `seed`: stages draw independent noise
    (a stage seeded like the one before it would start from the same noise whatever that stage made)."""
    import numpy as np

    return torch.Generator().manual_seed(int(np.random.SeedSequence([int(seed), int(stage)]).generate_state(1)[0]))


def _model_device(model) -> torch.device:
    return next(model.parameters()).device


def sample(model, n: int, steps: int = 100, generator: torch.Generator | None = None, z: torch.Tensor | None = None,
           images: torch.Tensor | None = None, progress: Progress = None) -> torch.Tensor:
    """Draw n images from random x_T ~ N(0, I), each decoded with a semantic code from a given set.

    The codes come from `z` [m, z_dim] or, when `z` is None, from encoding `images` [m, C, S, S] in [-1, 1].
    If m == n the codes are used in order (one per sample); otherwise n codes are drawn from the set with
    replacement using `generator`. (Diff-AE's unconditional sampling of z via a latent DDIM is out of scope.)
    Each step's predicted x0 is clipped to [-1, 1] (DDPM/DDIM practice for sampling from noise).
    Returns float32 images [n, C, S, S].
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    device = _model_device(model)
    if z is None:
        if images is None:
            raise ValueError("sample needs semantic codes: pass z [m, z_dim] or images [m, C, S, S] to encode")
        with _eval(model):
            z = model.encode(images.to(device)).float()
    z = z.to(device)
    gen_device = generator.device if generator is not None else device
    if z.shape[0] != n:
        idx = torch.randint(0, z.shape[0], (n,), generator=generator, device=gen_device).to(device)
        z = z[idx]
    cfg = model.cfg
    shape = (n, cfg.in_channels, cfg.image_size, cfg.image_size)
    x_T = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)
    return ddim_sample(model, z, x_T, steps=steps, progress=progress, clip=True)


def sample_conditional(model, n: int, c: torch.Tensor | None, steps: int = 50, generator: torch.Generator | None = None,
                       sampler: str = "ddim", guidance: float = 1.0, progress: Progress = None) -> torch.Tensor:
    """n images from x_T ~ N(0, I) under a conditioning vector c [n, width] (None: unconditional), with
    DDIM (eta 0) or DDPM ancestral sampling; predicted x0 clipped to [-1, 1]; `guidance` > 1 is
    classifier-free guidance against `model.null_condition`. Seeded by `generator`. float32 [n, C, S, S]."""
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    device = _model_device(model)
    gen_device = generator.device if generator is not None else device
    shape = (n, model.cfg.in_channels, model.cfg.image_size, model.cfg.image_size)
    x_T = torch.randn(shape, generator=generator, device=gen_device, dtype=torch.float32).to(device)
    c = c.to(device) if c is not None else None
    null = model.null_condition(n, device) if guidance != 1.0 and c is not None else None
    extra = {"eta": 0.0} if sampler == "ddim" else {"generator": generator}
    return walk(model, sampler, x_T, c, steps, progress, clip=True, guidance=guidance, null=null, **extra)


def reconstruct(model, x0: torch.Tensor, steps: int = 100, progress: Progress = None) -> torch.Tensor:
    """Autoencode x0: z = encode(x0), x_T = ddim_invert(x0, z, steps), x0_hat = ddim_sample(x_T, z, steps).

    `progress` sees one count over both passes (total = 2 * steps)."""
    steps = _check_steps(steps, getattr(model, "schedule", {}).get("num_train_timesteps", T))
    with _eval(model):
        z = model.encode(x0).float()
    inv_progress = None if progress is None else (lambda i, _n: progress(i, 2 * steps))
    dec_progress = None if progress is None else (lambda i, _n: progress(steps + i, 2 * steps))
    x_T = ddim_invert(model, x0, z, steps=steps, progress=inv_progress)
    return ddim_sample(model, z, x_T, steps=steps, progress=dec_progress)
