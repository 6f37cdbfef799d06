"""The Cheff cascade object on tiny untrained stages: sampling with and without the SR stage, inpainting that
keeps the known latents exactly, outpainting as the inverted mask, D(E(x)), export per stage, and refusals.
(That the stages learn is tested where they train: test_latents.)"""
from __future__ import annotations

import pytest
import torch

from conftest import write_checkpoint
from cxrray.diffusion.ddim import walk
from cxrray.errors import InputError
from cxrray.families import get_family
from cxrray.pipelines.cheff import Cheff
from test_families import tiny

PROMPT = "Large pleural effusion in the right lower lung."


@pytest.fixture(scope="module")
def cascade(tmp_path_factory):
    root = tmp_path_factory.mktemp("cheff")
    torch.manual_seed(0)
    ldm = get_family("ldm").build(tiny("ldm"))
    sr_cfg = get_family("sr").config(**{**tiny("sr").model_dump(), "image_size": 64, "low_size": 32,
                                        "attention_resolutions": []})
    sr = get_family("sr").build(sr_cfg)
    write_checkpoint(ldm, root / "ldm", images_shown=0)
    write_checkpoint(sr, root / "sr", images_shown=0)
    return root, Cheff.load(str(root / "ldm"), str(root / "sr"), device="cpu")


def images(n: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.linspace(-1, 1, 32)
    image = (x[None, :] * x[:, None]).expand(n, 1, 32, 32).clone()
    mask = torch.zeros_like(image)
    mask[..., 4:14, 18:30] = 1.0  # a "device" in the upper right
    return image, mask


def test_the_known_region_is_the_original_after_every_step_and_exactly_at_the_end():
    """walk(known=...): where keep is 1 the result is x0 itself; elsewhere the sampler's own."""
    ldm = get_family("ldm").build(tiny("ldm")).eval()
    z0 = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    keep = torch.ones(2, 1, 8, 8)
    keep[..., 2:5, 2:6] = 0
    context = ldm.context(None, 2)

    def run(seed, known):
        z_T = torch.randn(z0.shape, generator=torch.Generator().manual_seed(seed))
        return walk(ldm, "ddim", z_T, context, 4, None, generator=torch.Generator().manual_seed(seed + 100),
                    known=known, eta=0.0)

    out = run(0, (z0, keep))
    assert torch.equal(out * keep, z0 * keep)
    assert float((out - z0).abs()[..., 2:5, 2:6].mean()) > 0.1  # the hole is generated, not copied
    assert torch.equal(out, run(0, (z0, keep)))  # seeded
    free = run(0, None)
    assert not torch.equal(out[..., 2:5, 2:6], free[..., 2:5, 2:6])  # the known region steers the hole


def test_the_cascade_samples_upscales_and_says_how(cascade):
    _, cheff = cascade
    made = cheff.sample(PROMPT, n=2, seed=3, steps=3, guidance=2.0, sr_steps=2)
    assert tuple(made.images.shape) == (2, 1, 64, 64) and cheff.output_size == 64
    assert float(made.images.abs().max()) <= 1.0 + 1e-6
    assert "report-conditioned" in made.how and "upscaled 32 -> 64 by SR3 model cxrray-sr" in made.how
    again = cheff.sample(PROMPT, n=2, seed=3, steps=3, guidance=2.0, sr_steps=2)
    assert torch.equal(made.images, again.images)
    low = cheff.sample(None, n=1, seed=3, steps=3, sr_steps=0)
    assert tuple(low.images.shape) == (1, 1, 32, 32) and low.how.startswith("unconditional")


def test_inpainting_keeps_what_is_known_and_outpainting_inverts_the_mask(cascade):
    _, cheff = cascade
    image, mask = images()
    recon = cheff.reconstruct(image)
    assert tuple(recon.shape) == (2, 1, 32, 32)
    # nothing masked: every latent is the original's at the end, so the result is D(E(x)) exactly
    kept = cheff.inpaint(image, torch.zeros_like(mask), seed=1, steps=3)
    assert torch.equal(kept.images, recon)
    # everything masked: inpainting is sampling from the same noise
    whole = cheff.inpaint(image, torch.ones_like(mask), PROMPT, seed=1, steps=3)
    assert torch.equal(whole.images, cheff.sample(PROMPT, n=2, seed=1, steps=3, sr_steps=0).images)
    part = cheff.inpaint(image, mask, PROMPT, seed=1, steps=3)
    assert "inpainting" in part.how and tuple(part.images.shape) == (2, 1, 32, 32)
    inside = (part.images - recon).abs()[mask.bool()].mean()
    assert float(inside) > 0.05  # the masked region is redrawn
    out = cheff.outpaint(image, mask, PROMPT, seed=1, steps=3)
    assert torch.equal(out.images, cheff.inpaint(image, 1 - mask, PROMPT, seed=1, steps=3).images)
    assert "outpainting" in out.how
    with pytest.raises(InputError, match="mask's shape"):
        cheff.inpaint(image, mask[:, :, :16], seed=1, steps=3)
    with pytest.raises(InputError, match="must be 32x32"):
        cheff.inpaint(image[..., :16, :16], mask[..., :16, :16], seed=1, steps=3)


def test_the_cascade_exports_each_stage_as_diffusers_folders(cascade, tmp_path):
    _, cheff = cascade
    notes = cheff.export(tmp_path)
    assert set(notes) == {"ldm", "sr"}
    for folder in ("ldm/unet", "ldm/vae", "ldm/text_encoder", "ldm/tokenizer", "ldm/scheduler", "sr/unet", "sr/scheduler"):
        assert (tmp_path / folder).is_dir(), folder


def test_the_cascade_refuses_stages_of_the_wrong_family(cascade):
    root, _ = cascade
    with pytest.raises(InputError, match="must be a latent diffusion model"):
        Cheff.load(str(root / "sr"))
    with pytest.raises(InputError, match="cannot upscale"):
        Cheff.load(str(root / "ldm"), str(root / "ldm"))
