"""Training objectives, evaluation and export of the KL autoencoder (torch side).

The loss balances as Cheff's (taming-transformers') does, divided by the pixel count so it is of order
one: per-pixel L1 + ssim_weight x (1 - SSIM) [+ perceptual] + kl_weight x KL(per image, summed) / pixels,
plus, from step `disc_start`, the generator's hinge term -D(x_hat) weighted by disc_weight x the ratio
of the reconstruction and adversarial gradient norms at the decoder's last layer. The discriminator is
a second objective with its own optimiser (the loop steps it after this one on the same batch).
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

from cxrray.families.base import Evaluation
from cxrray.families.vae.network import KLAutoencoder


def loss(model: KLAutoencoder, batch: dict, generator: torch.Generator | None = None) -> torch.Tensor:
    cfg = model.cfg
    x = batch["image"]
    posterior = model.posterior(x)
    z = posterior.sample(generator=generator)
    x_hat = model.decode(z)
    pixels = x[0].numel()
    rec = reconstruction_loss(model, x, x_hat)
    total = rec + cfg.kl_weight * posterior.kl().mean() / pixels
    adversarial = _adversarial(model)
    if model.training:
        _track(model, z.detach())
    if adversarial:
        g = -model.discriminator(x_hat).mean()
        total = total + _adaptive_weight(model, rec, g) * g
    return total


def reconstruction_loss(model: KLAutoencoder, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Per-pixel L1 + ssim_weight x (1 - SSIM) on [0, 1] (+ perceptual_weight x the feature distance)."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    cfg = model.cfg
    rec = F.l1_loss(x_hat.float(), x.float())
    if cfg.ssim_weight:
        ssim = structural_similarity_index_measure(((x_hat.float() + 1) / 2), ((x.float() + 1) / 2), data_range=1.0)
        rec = rec + cfg.ssim_weight * (1 - ssim)
    if cfg.perceptual_model and cfg.perceptual_weight:
        rec = rec + cfg.perceptual_weight * perceptual_distance(cfg.perceptual_model, x, x_hat)
    return rec


def perceptual_distance(path: str, x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """LPIPS without its learned channel weights: the mean squared distance of channel-normalised features
    of a local TorchScript network (one tensor or a list of per-layer tensors per call; images [-1, 1])."""
    net = _feature_network(path).to(x.device)
    fa, fb = net(x.float()), net(x_hat.float())
    fa, fb = (fa, fb) if isinstance(fa, (list, tuple)) else ([fa], [fb])
    unit = lambda f: f / (f.norm(dim=1, keepdim=True) + 1e-10)  # noqa: E731
    return torch.stack([((unit(a) - unit(b)) ** 2).sum(1).mean() for a, b in zip(fa, fb)]).mean()


@lru_cache(maxsize=2)
def _feature_network(path: str) -> torch.jit.ScriptModule:
    if not Path(path).is_file():
        from cxrray.errors import InputError

        raise InputError(f"model.perceptual_model {path}: no such file (a local TorchScript feature network)")
    net = torch.jit.load(path, map_location="cpu").eval()
    for p in net.parameters():
        p.requires_grad_(False)
    return net


def discriminator_loss(model: KLAutoencoder, batch: dict) -> torch.Tensor:
    """Hinge loss of the patch discriminator on real images and (fresh, detached) reconstructions; an exact
    zero before `disc_start`, so its optimiser leaves it untouched during the warm-up."""
    if not _adversarial(model):
        return sum(p.sum() for p in model.discriminator.parameters()) * 0.0
    x = batch["image"]
    with torch.no_grad():
        x_hat = model.decode(model.posterior(x).sample())
    real, fake = model.discriminator(x), model.discriminator(x_hat)
    return 0.5 * (F.relu(1 - real).mean() + F.relu(1 + fake).mean())


def discriminator_parameters(model: KLAutoencoder) -> list:
    return list(model.discriminator.parameters())


def _adversarial(model: KLAutoencoder) -> bool:
    """Whether this optimiser step trains adversarially (`model.steps` counts the steps already taken)."""
    return model.cfg.disc_weight > 0 and int(model.steps) >= model.cfg.disc_start


def _adaptive_weight(model: KLAutoencoder, rec: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """disc_weight x |grad rec| / |grad g| at the decoder's output convolution (detached, in [0, 1e4])."""
    if not torch.is_grad_enabled():
        return torch.tensor(model.cfg.disc_weight)
    last = model.autoencoder.decoder.conv_out.weight
    rec_grad, = torch.autograd.grad(rec, last, retain_graph=True)
    g_grad, = torch.autograd.grad(g, last, retain_graph=True)
    return (rec_grad.norm() / (g_grad.norm() + 1e-4)).clamp(0.0, 1e4).detach() * model.cfg.disc_weight


@torch.no_grad()
def _track(model: KLAutoencoder, z: torch.Tensor) -> None:
    """Fold this (micro-)batch's latent std into the running estimate (a batch of the first step sets it)."""
    std = z.float().std()
    first = float(model.steps) == 0
    model.latent_std.copy_(std if first else torch.lerp(model.latent_std, std, model.cfg.latent_std_momentum))


@torch.no_grad()
def count_step(model: KLAutoencoder) -> None:
    """One optimiser step taken (the engine calls it once per step, after every objective)."""
    model.steps.add_(1)


@torch.no_grad()
def evaluate(model: KLAutoencoder, batch: dict, seed: int, steps: int) -> Evaluation:
    """Reconstructions through the posterior mean beside the originals; MSE / PSNR / SSIM on [0, 1] and the
    PSNR of bicubic down/up-sampling to a thumbnail holding as many numbers as the latent."""
    from cxrray.eval.reconstruction import bicubic_roundtrip, equal_values_size, reconstruction_metrics

    device = next(model.parameters()).device
    x = batch["image"].to(device)
    x_hat = model(x)
    cfg = model.cfg
    bicubic = bicubic_roundtrip(x, equal_values_size(cfg.latent_size, cfg.latent_channels, cfg.in_channels))
    metrics = {f"reconstruction_{k}": v for k, v in reconstruction_metrics(x, x_hat).items()}
    metrics["bicubic_psnr"] = reconstruction_metrics(x, bicubic)["psnr"]
    metrics["latent_std"] = float(model.latent_std)
    return Evaluation(metrics, {"reconstructions": [x, x_hat, bicubic]})


def frozen_config(uri: str, setting: str):
    """The VAEConfig of the autoencoder checkpoint at `uri`, which the config field `setting` named (another
    family's frozen stage); InputError if it is not an autoencoder."""
    from cxrray.errors import InputError
    from cxrray.families.vae.config import VAEConfig
    from cxrray.io.checkpoint import read_state

    model = read_state(uri)["model"]
    if model.get("family") != "vae":
        raise InputError(f"{setting} {uri} is a {model.get('family')!r} model, not an autoencoder")
    return VAEConfig(**model)


def export(model: KLAutoencoder, folder: Path) -> list[str]:
    """A diffusers `vae/` folder (AutoencoderKL, `scaling_factor` = 1 / latent_std); the discriminator
    is training-only and left out."""
    folder = Path(folder)
    model.autoencoder.register_to_config(scaling_factor=1.0 / float(model.latent_std))
    model.autoencoder.save_pretrained(folder / "vae", safe_serialization=True)
    return ["patch discriminator: training only, not exported",
            f"latents for diffusion are the posterior mean x scaling_factor ({1.0 / float(model.latent_std):.5f})"]
