"""Diffusion-autoencoder networks: presets, shapes, conditioning, config round trip, FLOPs, memory formats."""
from __future__ import annotations

import json

import pytest
import torch
from pydantic import ValidationError

from cxrray.families.diffae.config import PRESETS as DIFFAE_PRESETS
from cxrray.families.diffae.flops import param_count, training_flops_per_image
from cxrray.families.diffae.network import DiffAE, DiffAEConfig, preset_config

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return DiffAE(preset_config("tiny")).eval()


def _inputs(cfg: DiffAEConfig, b: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, cfg.in_channels, cfg.image_size, cfg.image_size, generator=g) * 2 - 1
    t = torch.randint(0, 1000, (b,), generator=g)
    return x, t


@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
def test_presets_instantiate(name):
    cfg = preset_config(name)
    with torch.device("meta"):  # structure and counts only; no memory for the paper-size weights
        model = DiffAE(cfg)
    counts = param_count(model)
    assert counts["encoder"] > 0 and counts["unet"] > 0
    assert counts["encoder"] + counts["unet"] == counts["total"]
    assert len(model.unet.down_blocks) == len(cfg.channel_mult)
    if name == "paper":
        assert cfg.image_size == 256 and cfg.base_channels == 128 and cfg.channel_mult == (1, 1, 2, 2, 4, 4)
        assert cfg.z_dim == 512 and cfg.attention_resolutions == (16,)
        assert 100e6 < counts["total"] < 250e6
    if name == "tiny":
        assert counts["total"] < 5e6


def test_tiny_shapes_and_conditioning(tiny):
    x, t = _inputs(tiny.cfg)
    with torch.no_grad():
        z = tiny.encode(x)
        assert z.shape == (2, 512) and z.dtype == torch.float32
        eps = tiny(x, t, z)
        assert eps.shape == x.shape and torch.isfinite(eps).all()
        # AdaGN by z: another code changes every image's prediction
        z2 = z[[1, 0]]
        assert (tiny(x, t, z2) - eps).abs().flatten(1).amax(1).min() > 1e-4
        # t modulates too
        assert (tiny(x, (t + 400) % 1000, z) - eps).abs().flatten(1).amax(1).min() > 1e-4
        # a scalar t broadcasts over the batch
        assert torch.allclose(tiny(x, 7, z), tiny(x, torch.tensor([7, 7]), z))


@pytest.mark.parametrize("name", ["tiny", "small", "paper"])
def test_encoder_pools_a_4x4_map(name):
    """Diff-AE's encoders go down to 4x4 before the global pool; z then keeps global geometry."""
    cfg = preset_config(name)
    assert cfg.image_size // 2 ** (len(cfg.encoder_channel_mult) - 1) == 4
    with torch.device("meta"):
        enc = DiffAE(cfg).encoder
    seen = {}
    enc.mid_block.register_forward_hook(lambda m, i, o: seen.update(shape=tuple(o.shape)))
    enc(torch.zeros(1, cfg.in_channels, cfg.image_size, cfg.image_size, device="meta"))
    assert seen["shape"] == (1, cfg.encoder_channels[-1], 4, 4)
    # None keeps the U-Net's plan (older configs)
    plain = DiffAEConfig(**{**DIFFAE_PRESETS["tiny"], "encoder_channel_mult": None})
    assert plain.encoder_channels == plain.block_channels


def test_encoder_gradients_flow(tiny):
    x, t = _inputs(tiny.cfg, b=1)
    model = DiffAE(tiny.cfg)
    loss = model(x, t, model.encode(x)).square().mean()
    loss.backward()
    assert model.encoder.proj.weight.grad.abs().sum() > 0
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0


def test_config_round_trip(tiny):
    d = json.loads(json.dumps(tiny.config_dict()))
    assert d["channel_mult"] == [1, 2, 2]
    clone = DiffAE.from_config_dict(d)
    assert clone.cfg == tiny.cfg
    clone.load_state_dict(tiny.state_dict())
    clone.eval()
    x, t = _inputs(tiny.cfg, b=1)
    with torch.no_grad():
        assert torch.equal(clone(x, t, clone.encode(x)), tiny(x, t, tiny.encode(x)))


@pytest.mark.parametrize("field,value", [
    ("image_size", 8), ("image_size", 2048), ("image_size", 66),  # 66 is not divisible by 2**(3-1)
    ("channel_mult", (1, 0, 2)), ("channel_mult", ()), ("norm_groups", 24), ("attention_resolutions", (7,)),
    ("z_dim", 0), ("dropout", 1.5), ("layers_per_block", 0),
    ("encoder_channel_mult", (1, 0)), ("encoder_channel_mult", ()),
    ("encoder_channel_mult", (1,) * 8),  # 64 is not divisible by 2**7
])
def test_invalid_config_names_field(field, value):
    with pytest.raises(ValidationError, match=field):
        DiffAEConfig(**{**DIFFAE_PRESETS["tiny"], field: value})


def test_invalid_config_extra_and_assignment():
    with pytest.raises(ValidationError, match="base_chanels"):
        DiffAEConfig(**DIFFAE_PRESETS["tiny"], base_chanels=8)
    cfg = preset_config("tiny")
    with pytest.raises(ValidationError, match="z_dim"):
        cfg.z_dim = -1
    with pytest.raises(ValueError, match="preset"):
        preset_config("huge")


def test_flops_positive_and_scale_with_area(tiny):
    f64 = training_flops_per_image(tiny, 64)
    f128 = training_flops_per_image(tiny, 128)
    for f in (f64, f128):
        assert f["encoder_forward"] > 0 and f["unet_forward"] > 0
        assert f["forward"] == f["encoder_forward"] + f["unet_forward"]
        assert f["training"] == 3 * f["forward"]
    ratio = f128["forward"] / f64["forward"]
    assert 3.8 < ratio < 5.0, ratio  # convolutions x4, attention x16 at the attention level
    # attention (SDPA) FLOPs are counted
    no_attn = DiffAE(preset_config("tiny", attention_resolutions=()))
    assert training_flops_per_image(no_attn, 64)["forward"] < f64["forward"]


def test_channels_last_matches_default(tiny):
    x, t = _inputs(tiny.cfg, b=1)
    with torch.no_grad():
        ref = tiny(x, t, tiny.encode(x))
        cl = DiffAE(tiny.cfg).eval()
        cl.load_state_dict(tiny.state_dict())
        cl = cl.to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        out = cl(xc, t, cl.encode(xc))
    assert torch.allclose(out, ref, atol=1e-4, rtol=1e-4)


def test_bf16_autocast_runs(tiny):
    x, t = _inputs(tiny.cfg, b=1)
    with torch.no_grad():
        ref = tiny(x, t, tiny.encode(x))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = tiny(x, t, tiny.encode(x))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert (out.float() - ref).abs().mean() < 0.1 * ref.abs().mean()


def test_ema_warmup_follows_early_weights_then_reaches_the_decay():
    import torch

    from cxrray.train.ema import ema_model, warmup_decay

    assert warmup_decay(0.9999, 0) == 0.1 and warmup_decay(0.9999, 10**7) == 0.9999
    net = torch.nn.Linear(2, 1, bias=False)
    ema = ema_model(net, decay=0.999)
    with torch.no_grad():
        net.weight.fill_(0.0)
    ema.update_parameters(net)  # first update copies
    for _ in range(50):
        with torch.no_grad():
            net.weight.fill_(1.0)
        ema.update_parameters(net)
    # a fixed 0.999 decay would still be at ~0.05; the warm-up is within a few percent of 1
    assert float(ema.module.weight.mean()) > 0.9


def test_ema_averages_only_trainable_parameters():
    import torch

    from cxrray.train.ema import ema_model

    net = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    net[0].requires_grad_(False)  # a frozen part (a pretrained VAE, a text encoder)
    frozen_at_start = net[0].weight.detach().clone()
    ema = ema_model(net, decay=0.5)
    ema.update_parameters(net)
    for _ in range(5):
        with torch.no_grad():
            net[0].weight.add_(1.0)  # would be averaged in if the EMA looked at it
            net[1].weight.fill_(3.0)
        ema.update_parameters(net)
    assert torch.equal(ema.module[0].weight, frozen_at_start)
    assert float(ema.module[1].weight.mean()) > 2.5
