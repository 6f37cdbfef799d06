"""Training objective, evaluation, statistics and export of the covariate DDPM (torch side)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from cxrray.families.base import Evaluation, Generated, GenerateRequest
from cxrray.families.ddpm.config import COVARIATES, NUMERIC, DDPMConfig
from cxrray.families.ddpm.network import CovariateDDPM
from cxrray.errors import InputError


def covariate_values(batch: dict) -> dict[str, torch.Tensor]:
    """{name: [B] raw values} from a stream batch (`age`, `sex` and each echo covariate, NaN = missing)."""
    return {k: torch.as_tensor(batch[k]) for k in COVARIATES if k in batch}


def loss(model: CovariateDDPM, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    """eps-MSE at t ~ U{0..T-1} under the model's (cosine) schedule; the covariate vector of each row
    is dropped with probability `cond_drop` (classifier-free guidance)."""
    from cxrray.diffusion.schedule import make_scheduler

    x0 = batch["image"]
    b, device = x0.shape[0], x0.device
    sched = make_scheduler("ddpm", **model.schedule)
    gen_device = generator.device if generator is not None else device
    t = torch.randint(0, model.cfg.timesteps, (b,), generator=generator, device=gen_device).to(device)
    noise = torch.randn(x0.shape, generator=generator, device=gen_device).to(device, x0.dtype)
    drop = torch.rand(b, generator=generator, device=gen_device).to(device) < model.cfg.cond_drop
    c = model.condition({k: v.to(device) for k, v in covariate_values(batch).items()}, drop) if model.cfg.covariates else None
    eps = model(sched.add_noise(x0, noise, t), t, c)
    return F.mse_loss(eps.float(), noise.float())


@torch.no_grad()
def evaluate(model: CovariateDDPM, batch: dict, seed: int, steps: int) -> Evaluation:
    """Samples under the covariates of the eval images (DDIM), beside the real images."""
    from cxrray.diffusion.ddim import sample_conditional

    x0 = batch["image"]
    device = next(model.parameters()).device
    c = model.condition({k: v.to(device) for k, v in covariate_values(batch).items()}) if model.cfg.covariates else None
    generator = torch.Generator(device="cpu").manual_seed(seed)
    samples = sample_conditional(model, x0.shape[0], c, steps=steps, generator=generator)
    return Evaluation({"sample_mean": float(samples.mean()), "sample_std": float(samples.std())},
                      {"samples": [x0.to(device), samples]})


@torch.no_grad()
def generate(model: CovariateDDPM, request: GenerateRequest) -> Generated:
    """n samples (DDIM or DDPM) under covariates given once for all or per image (sex as "M"/"F"; absent
    covariates unobserved), with classifier-free guidance `request.guidance` (1 = plain conditional)."""
    from cxrray.diffusion.ddim import sample_conditional

    unknown = sorted(set(request.conditions) - set(model.cfg.covariates))
    if unknown:
        raise InputError(f"unknown covariate(s) {unknown}; this model is conditioned on {list(model.cfg.covariates)}")
    device = next(model.parameters()).device
    raw = {name: _per_image(name, request.conditions.get(name), request.n).to(device) for name in model.cfg.covariates}
    c = model.condition(raw)
    images = sample_conditional(model, request.n, c, steps=request.steps, generator=request.generator,
                                sampler=request.sampler, guidance=request.guidance)
    per_image = any(isinstance(v, (list, tuple)) for v in request.conditions.values())
    given = ("covariates per image" if per_image else
             ", ".join(f"{k}={v}" for k, v in sorted(request.conditions.items())) or "no covariates (unconditional)")
    return Generated(images, f"DDPM sample ({request.steps} {request.sampler.upper()} steps, guidance "
                             f"{request.guidance:g}) given {given}")


def _per_image(name: str, value, n: int) -> torch.Tensor:
    """[n] raw values of one covariate from a single value (or None: unobserved) or a list of n."""
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise InputError(f"covariate {name!r}: {len(value)} values for {n} images")
        return torch.tensor([_raw(name, v) for v in value], dtype=torch.float32)
    return torch.full((n,), _raw(name, value), dtype=torch.float32)


def _raw(name: str, value) -> float:
    if value is None:
        return float("nan")
    if name == "sex":
        return {"M": 1.0, "F": 0.0}[value]
    return float(value)


class _Moments:
    """Count, mean [k] and co-moment matrix [k, k] (sum of outer products of deviations) of rows added in
    blocks, merged pairwise (Chan, Golub & LeVeque), so no sum of squares is ever subtracted from another."""

    def __init__(self, k: int):
        self.n, self.mean, self.m2 = 0, np.zeros(k), np.zeros((k, k))

    def add(self, block: np.ndarray) -> None:
        if not len(block):
            return
        n, mean = len(block), block.mean(axis=0)
        deviation = block - mean
        delta, total = mean - self.mean, self.n + n
        self.m2 = self.m2 + deviation.T @ deviation + np.outer(delta, delta) * self.n * n / total
        self.mean, self.n = self.mean + delta * n / total, total

    def sd(self) -> list[float]:
        """Population standard deviations; 0 for a constant column (within rounding of its mean)."""
        sd = np.sqrt(np.maximum(np.diag(self.m2) / max(self.n, 1), 0.0))
        return [0.0 if s <= 1e-12 * max(1.0, abs(m)) else float(s) for s, m in zip(sd, self.mean)]


def prepare(cfg: DDPMConfig, data_uri: str) -> DDPMConfig:
    """Mean/std of each numeric covariate on the training rows of the shards, and their correlations on
    the rows that have them all (both stored with the model)."""
    wanted = [c for c in cfg.covariates if c in NUMERIC]
    if not wanted or (cfg.covariate_stats and cfg.covariate_corr):
        return cfg
    from cxrray.data.shards import read_manifest, read_tar
    from cxrray.data.storage import Storage

    store, k = Storage(data_uri), len(wanted)
    # moments merged shard by shard (Chan et al.'s pairwise update: no cancellation, memory flat in the archive):
    # per covariate over its present values; jointly over the rows that have them all (for the correlations)
    single = [_Moments(1) for _ in wanted]
    joint = _Moments(k)
    for shard in read_manifest(store)["shards"]:
        if not shard["splits"].get("train"):
            continue
        table = np.asarray([[_value(meta, c) for c in wanted] for _, _, meta in
                            read_tar(store.read_bytes(shard["name"]), shard["name"]) if meta["split"] == "train"],
                           dtype=np.float64).reshape(-1, k)
        present = np.isfinite(table)
        for i, moments in enumerate(single):
            moments.add(table[present[:, i], i:i + 1])
        joint.add(table[present.all(axis=1)])
    missing = [c for c, m in zip(wanted, single) if m.n < 2]
    if missing:
        raise InputError(f"{data_uri}: covariate(s) {missing} have fewer than 2 values in the train split; "
                         f"drop them from model.covariates")
    stats = cfg.covariate_stats or {c: (float(m.mean[0]), m.sd()[0] or 1.0) for c, m in zip(wanted, single)}
    corr = None
    if joint.n >= 3:
        scale = np.outer(joint.sd(), joint.sd())
        r = np.divide(joint.m2 / joint.n, scale, out=np.zeros_like(scale), where=scale > 0)  # constant: r 0
        r = np.clip((r + r.T) / 2, -1.0, 1.0)  # exactly symmetric, in range (as corrcoef)
        np.fill_diagonal(r, 1.0)
        corr = {a: {b: float(r[i, j]) for j, b in enumerate(wanted)} for i, a in enumerate(wanted)}
    return cfg.model_copy(update={"covariate_stats": stats, "covariate_corr": corr})


def _value(meta: dict, name: str) -> float:
    v = meta.get("age") if name == "age" else (meta.get("covariates") or {}).get(name)
    return float("nan") if v is None else float(v)


def export(model: CovariateDDPM, folder: Path) -> list[str]:
    """diffusers folders `unet/` and `scheduler/`; the covariate MLP is saved beside them."""
    from diffusers import DDPMScheduler
    from safetensors.torch import save_file

    folder = Path(folder)
    model.unet.save_pretrained(folder / "unet", safe_serialization=True)
    DDPMScheduler(num_train_timesteps=model.cfg.timesteps, beta_schedule=model.cfg.beta_schedule,
                  prediction_type="epsilon", clip_sample=True).save_pretrained(folder / "scheduler")
    if model.covariate_proj is None:
        return []
    save_file({k: v.contiguous() for k, v in model.covariate_proj.state_dict().items()},
              str(folder / "covariate_projection.safetensors"))
    (folder / "covariate_layout.json").write_text(json.dumps(
        {"layout": model.cfg.covariate_layout(), "stats": model.cfg.covariate_stats}, indent=1))
    return ["covariate embedding: an MLP (covariate_projection.safetensors, Linear-SiLU-Linear) of the vector in "
            "covariate_layout.json, passed to the UNet as class_labels (class_embed_type='identity')"]
