"""Schedules, the Diff-AE objective, deterministic DDIM sampling/inversion."""
from __future__ import annotations

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler, DDPMScheduler
from torch import nn

from cxrray.diffusion import T, ddim_invert, ddim_sample, make_scheduler, reconstruct, sample, training_loss
from cxrray.families.diffae.network import DiffAE, DiffAEConfig

torch.set_num_threads(1)

MINI = DiffAEConfig(image_size=32, base_channels=32, channel_mult=(1, 2), layers_per_block=1,
                    attention_resolutions=(16,), z_dim=64)


@pytest.fixture(scope="module")
def mini():
    torch.manual_seed(0)
    return DiffAE(MINI).eval()


def _images(b: int, seed: int = 1, size: int = 32) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, 1, size, size, generator=g) * 2 - 1


class XFree(nn.Module):
    """The real network queried at a fixed probe image: eps depends on (t, z) but not on x_t.

    With such a model every DDIM step is an affine map whose exact inverse is the mirrored inverse step,
    so inversion followed by sampling must return x0 to float precision; any misalignment of alphas or
    model timesteps between the two schedulers shows up as an O(1) error.
    """

    def __init__(self, net: DiffAE):
        super().__init__()
        self.net, self.cfg = net, net.cfg
        self.register_buffer("probe", _images(1, seed=99, size=net.cfg.image_size) * 0.5)

    def encode(self, x):
        return self.net.encode(x)

    def forward(self, x, t, z):
        return self.net(self.probe.expand(x.shape[0], -1, -1, -1), t, z)


class GaussDenoiser(nn.Module):
    """Exact eps* for data x0 ~ N(mu, sd^2) per pixel: a smooth x-dependent model with known behaviour."""

    def __init__(self, mu: float, sd: float):
        super().__init__()
        self.mu, self.sd = mu, sd
        self.dummy = nn.Parameter(torch.zeros(()))
        self.register_buffer("ab", make_scheduler("ddpm").alphas_cumprod.clone())

    def forward(self, x, t, z):
        a = self.ab[t].view(-1, 1, 1, 1)
        return (1 - a).sqrt() * (x - a.sqrt() * self.mu) / (a * self.sd**2 + 1 - a)


def _invert_misaligned(model, x0, z, steps, *, steps_offset=0, set_alpha_to_one=True, model_t_shift=0):
    """A deliberately wrong inversion (what a mis-configured inverse scheduler would do)."""
    sched = DDIMInverseScheduler(**{**make_scheduler("ddim_inverse").config, "steps_offset": steps_offset,
                                    "set_alpha_to_one": set_alpha_to_one})
    sched.set_timesteps(steps)
    x = x0.clone()
    with torch.no_grad():
        for t in sched.timesteps:
            tm = torch.full((x.shape[0],), max(int(t) - model_t_shift, 0), dtype=torch.long)
            x = sched.step(model(x, tm, z), int(t), x, return_dict=False)[0]
    return x


def test_scheduler_betas():
    for kind, cls in [("ddpm", DDPMScheduler), ("ddim", DDIMScheduler), ("ddim_inverse", DDIMInverseScheduler)]:
        s = make_scheduler(kind)
        assert isinstance(s, cls)
        assert T == 1000 and len(s.betas) == T and s.config.num_train_timesteps == T
        assert torch.allclose(s.betas, torch.linspace(1e-4, 0.02, T))
        assert not s.config.clip_sample
    assert make_scheduler("ddim").final_alpha_cumprod == 1.0
    assert make_scheduler("ddim_inverse").initial_alpha_cumprod == 1.0
    with pytest.raises(ValueError, match="kind"):
        make_scheduler("euler")


def test_inversion_mirrors_sampling(mini):
    model = XFree(mini).eval()
    x0 = _images(2)
    with torch.no_grad():
        z = mini.encode(x0)
    steps = 10
    x_T = ddim_invert(model, x0, z, steps)
    assert x_T.shape == x0.shape and not torch.allclose(x_T, x0, atol=0.1)
    good = (ddim_sample(model, z, x_T, steps) - x0).abs().max().item()
    assert good < 1e-4, good
    bad = {
        "different step count": ddim_sample(model, z, ddim_invert(model, x0, z, 2 * steps), steps),
        "grid off by one": ddim_sample(model, z, _invert_misaligned(model, x0, z, steps, steps_offset=1), steps),
        "x0 not at alpha=1": ddim_sample(model, z, _invert_misaligned(model, x0, z, steps, set_alpha_to_one=False),
                                         steps),
        "model queried at source timestep": ddim_sample(
            model, z, _invert_misaligned(model, x0, z, steps, model_t_shift=T // steps), steps),
        "model timestep off by one": ddim_sample(model, z, _invert_misaligned(model, x0, z, steps, model_t_shift=1),
                                                 steps),
        "another z": ddim_sample(model, mini.encode(_images(2, seed=5)).detach(), x_T, steps),
    }
    for what, x_hat in bad.items():
        err = (x_hat - x0).abs().max().item()
        assert err > 100 * good and err > 5e-3, (what, err)


def test_inversion_of_x_dependent_model_converges_with_steps():
    model = GaussDenoiser(mu=0.1, sd=0.3)
    x0 = 0.1 + 0.3 * torch.randn(4, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    errs = {}
    for steps in (25, 100):
        x_T = ddim_invert(model, x0, None, steps)
        errs[steps] = (ddim_sample(model, None, x_T, steps) - x0).abs().max().item()
        assert 0.85 < x_T.std().item() < 1.15  # data inverts to unit-variance noise
    assert errs[100] < 0.1 and errs[100] < errs[25] / 2.5, errs  # first-order discretisation error


def test_ddim_deterministic_batched_and_progress(mini):
    x0 = _images(2)
    calls = []
    a = reconstruct(mini, x0, steps=4, progress=lambda i, n: calls.append((i, n)))
    b = reconstruct(mini, x0, steps=4)
    assert torch.equal(a, b) and a.shape == x0.shape and torch.isfinite(a).all()
    assert calls == [(i, 8) for i in range(1, 9)]
    # batched == one at a time (per-sample independence)
    with torch.no_grad():
        z = mini.encode(x0)
    x_T = ddim_invert(mini, x0, z, steps=4)
    one = ddim_invert(mini, x0[1:], z[1:], steps=4)
    # fp32 kernels block differently for batch 1 and 2: equal up to rounding, not bit for bit (measured
    # here: max |diff| 1.04e-5 on values up to 1.25, just over the 1e-5 this test used to demand)
    assert torch.allclose(x_T[1:], one, rtol=1e-4, atol=1e-5)
    # the model's training flag is restored
    mini.train()
    ddim_sample(mini, z, x_T, steps=2)
    assert mini.training
    mini.eval()
    with pytest.raises(ValueError, match="steps"):
        ddim_sample(mini, z, x_T, steps=0)


def test_sample_from_codes_and_images(mini):
    imgs = _images(3)
    with torch.no_grad():
        z = mini.encode(imgs)
    s1 = sample(mini, 2, steps=3, generator=torch.Generator().manual_seed(0), z=z)
    s2 = sample(mini, 2, steps=3, generator=torch.Generator().manual_seed(0), images=imgs)
    assert s1.shape == (2, 1, 32, 32) and torch.isfinite(s1).all()
    assert torch.allclose(s1, s2, atol=1e-5)  # same codes drawn from the same set with the same generator
    s3 = sample(mini, 2, steps=3, generator=torch.Generator().manual_seed(1), z=z)
    assert not torch.allclose(s1, s3)
    with pytest.raises(ValueError, match="z"):
        sample(mini, 2, steps=3)


def test_training_loss_finite_and_decreases():
    torch.manual_seed(0)
    model = DiffAE(MINI).train()
    x0 = _images(4, seed=3)
    g = lambda: torch.Generator().manual_seed(7)  # noqa: E731  same t and noise each step: a fixed batch
    loss0 = training_loss(model, x0, generator=g())
    assert loss0.ndim == 0 and torch.isfinite(loss0)
    loss0.backward()
    assert model.encoder.proj.weight.grad.abs().sum() > 0  # the objective trains the encoder too
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    opt.zero_grad()
    losses = []
    for _ in range(6):
        loss = training_loss(model, x0, generator=g())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    final = training_loss(model, x0, generator=g()).item()
    assert final < 0.7 * losses[0], (losses, final)


def test_renoise_decode_is_seeded_keeps_the_image_at_low_noise_and_follows_the_code(mini):
    from cxrray.diffusion.ddim import ddim_renoise_decode

    x0 = _images(3)
    with torch.no_grad():
        z = mini.encode(x0)

    def decode(code, start, seed=0, **kw):
        return ddim_renoise_decode(mini, code, x0, start, steps=10, generator=torch.Generator().manual_seed(seed), **kw)

    a, b = decode(z, 0.5), decode(z, 0.5)
    assert torch.equal(a, b) and not torch.equal(a, decode(z, 0.5, seed=1))  # the noise is the generator's
    near, far = (decode(z, 0.02) - x0).abs().mean(), (decode(z, 0.9) - x0).abs().mean()
    assert near < 0.1 * far  # barely noised: the image is kept
    other = torch.roll(z, 1, 0)
    plain, amplified = decode(other, 0.5) - a, decode(other, 0.5, guidance=3.0, z_from=z) - a
    assert plain.abs().mean() > 0  # the code steers the decode
    assert amplified.abs().mean() > 1.5 * plain.abs().mean()  # guidance amplifies the code change
    with pytest.raises(ValueError, match="start"):
        decode(z, 1.0)


def test_z_sensitivity_is_zero_for_the_same_code_and_positive_for_another(mini):
    from cxrray.pipelines.diffchest.cf_eval import z_sensitivity

    x0 = _images(3)
    with torch.no_grad():
        z = mini.encode(x0)
    out = z_sensitivity(mini, x0, {"same": z.clone(), "other": torch.roll(z, 1, 0), "far": z * 5}, timesteps=(100, 900))
    assert out["same"] == {100: 0.0, 900: 0.0}
    assert all(v > 0 for v in out["other"].values()) and out["far"][100] > out["other"][100]


class VFromEps(nn.Module):
    """An eps model re-expressed as the v it implies, v = sqrt(ab) eps - sqrt(1-ab) x0_hat, declared as a
    v_prediction model: every sampler must decode it exactly as it decodes the eps model."""

    def __init__(self, eps_model: GaussDenoiser):
        super().__init__()
        self.eps_model, self.schedule = eps_model, {"prediction_type": "v_prediction"}

    def forward(self, x, t, z):
        a = self.eps_model.ab[t].view(-1, 1, 1, 1)
        eps = self.eps_model(x, t, z)
        return a.sqrt() * eps - (1 - a).sqrt() * (x - (1 - a).sqrt() * eps) / a.sqrt()


def test_v_prediction_samples_and_inverts_exactly_as_the_eps_model_it_equals():
    eps_model = GaussDenoiser(mu=0.1, sd=0.3)
    v_model = VFromEps(eps_model)
    x0 = 0.1 + 0.3 * torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    x_T = ddim_invert(eps_model, x0, None, 20)
    assert torch.allclose(ddim_invert(v_model, x0, None, 20), x_T, atol=1e-4)
    # diffusers' own inverse step converts v with the neighbouring timestep's alpha: not the same walk
    inv = DDIMInverseScheduler(**{**make_scheduler("ddim_inverse").config, "prediction_type": "v_prediction"})
    inv.set_timesteps(20)
    x = x0.clone()
    for t in inv.timesteps:
        x = inv.step(v_model(x, torch.full((2,), int(t)), None), int(t), x, return_dict=False)[0]
    assert (x - x_T).abs().max() > 100 * (ddim_invert(v_model, x0, None, 20) - x_T).abs().max()
    assert torch.allclose(ddim_sample(v_model, None, x_T, 20), ddim_sample(eps_model, None, x_T, 20), atol=1e-4)


def test_v_prediction_loss_regresses_the_velocity():
    torch.manual_seed(0)
    model = DiffAE(MINI.model_copy(update={"prediction_type": "v_prediction"}))
    assert model.schedule == {"prediction_type": "v_prediction"}
    x0 = _images(3, seed=4)
    loss = training_loss(model, x0, generator=torch.Generator().manual_seed(11))
    g = torch.Generator().manual_seed(11)  # the same draws, in the loss's order: t, then noise
    t = torch.randint(0, T, (3,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    ab = make_scheduler("ddpm").alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    with torch.no_grad():
        out = model(x_t, t, model.encode(x0))
    v = ab.sqrt() * noise - (1 - ab).sqrt() * x0
    assert torch.isclose(loss, ((out - v) ** 2).mean(), rtol=1e-4)
    assert not torch.isclose(loss, ((out - noise) ** 2).mean(), rtol=1e-2)


class GaussV(nn.Module):
    """Exact v* for data x0 ~ N(mu, sd^2) per pixel under Cheff's latent schedule rescaled to zero terminal SNR
    (at the top ab = 0: x_t is pure noise, and v* = -mu)."""

    schedule = {"beta_schedule": "scaled_linear", "beta_start": 0.0015, "beta_end": 0.0295, "num_train_timesteps": 1000,
                "prediction_type": "v_prediction", "rescale_betas_zero_snr": True}

    def __init__(self, mu: float, sd: float):
        super().__init__()
        self.mu, self.sd = mu, sd
        self.dummy = nn.Parameter(torch.zeros(()))
        self.register_buffer("ab", make_scheduler("ddpm", **self.schedule).alphas_cumprod.clone())

    def forward(self, x, t, z):
        a = self.ab[t].view(-1, 1, 1, 1)
        x0 = self.mu + a.sqrt() * self.sd**2 * (x - a.sqrt() * self.mu) / (a * self.sd**2 + 1 - a)
        eps = torch.where(a < 1, (x - a.sqrt() * x0) / (1 - a).clamp_min(1e-12).sqrt(), torch.zeros_like(x))
        return a.sqrt() * eps - (1 - a).sqrt() * x0


def test_a_zero_terminal_snr_v_model_samples_from_the_very_top_of_its_schedule():
    """At ab = 0 an eps-form step divides by sqrt(ab): the samplers step on the v output itself there."""
    from cxrray.diffusion.ddim import walk

    model = GaussV(mu=0.3, sd=0.5)
    assert float(model.ab[-1]) == 0.0
    x_T = torch.randn(4, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    out = walk(model, "ddim", x_T, None, 1000, None, eta=0.0)  # every step: the first at t = 999, ab = 0
    assert torch.isfinite(out).all()
    assert abs(float(out.mean()) - 0.3) < 0.02 and abs(float(out.std()) - 0.5) < 0.05
    eps_step = make_scheduler("ddim", **{**model.schedule, "prediction_type": "epsilon"})
    eps_step.set_timesteps(1000)
    # the eps a v model implies at ab = 0 is x_t itself; the eps-form step's x0 estimate divides 0 by 0 there
    assert not torch.isfinite(eps_step.step(x_T, 999, x_T, eta=0.0, return_dict=False)[1]).all()


def test_the_latent_model_trains_v_prediction_and_refuses_zero_snr_with_eps():
    from cxrray.families import get_family
    from cxrray.families.ldm.task import loss
    from test_families import tiny

    with pytest.raises(ValueError, match="zero_terminal_snr needs prediction_type=v_prediction"):
        tiny("ldm").__class__(**{**tiny("ldm").model_dump(), "zero_terminal_snr": True})
    cfg = tiny("ldm").__class__(**{**tiny("ldm").model_dump(), "prediction_type": "v_prediction", "zero_terminal_snr": True})
    torch.manual_seed(0)
    model = get_family("ldm").build(cfg).eval()  # no text drop-out: the two forwards below see one network
    assert model.schedule["prediction_type"] == "v_prediction" and model.schedule["rescale_betas_zero_snr"]
    z0 = torch.randn(3, cfg.latent_channels, cfg.latent_size, cfg.latent_size, generator=torch.Generator().manual_seed(2))
    value = loss(model, {"latent": z0}, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)  # the loss's draws in its order: t, noise, drop-out
    t = torch.randint(0, cfg.timesteps, (3,), generator=g)
    noise = torch.randn(z0.shape, generator=g)
    sched = make_scheduler("ddpm", **model.schedule)
    with torch.no_grad():
        out = model(sched.add_noise(z0, noise, t), t, model.context(None, 3))
    assert torch.isclose(value, ((out - sched.get_velocity(z0, noise, t)) ** 2).mean(), rtol=1e-4)
    assert not torch.isclose(value, ((out - noise) ** 2).mean(), rtol=1e-2)


class KnowsX0(nn.Module):
    """eps of a point mass at x0: exact, so every timestep's noise and clean estimates are exact."""

    def __init__(self, x0: torch.Tensor, kind: str = "epsilon"):
        super().__init__()
        self.x0, self.schedule = x0, {"prediction_type": kind}
        self.dummy = nn.Parameter(torch.zeros(()))
        self.register_buffer("ab", make_scheduler("ddpm").alphas_cumprod.clone())

    def forward(self, x, t, z):
        a = self.ab[t].view(-1, 1, 1, 1)
        eps = (x - a.sqrt() * self.x0) / (1 - a).sqrt()
        return eps if self.schedule["prediction_type"] == "epsilon" else a.sqrt() * eps - (1 - a).sqrt() * self.x0


def test_denoising_error_is_zero_for_an_exact_model_and_grows_with_a_biased_one():
    from cxrray.diffusion.diagnostics import denoising_error

    x0 = _images(2, seed=3)
    for kind in ("epsilon", "v_prediction"):
        rows = denoising_error(KnowsX0(x0, kind), x0, None, [10, 500, 990])
        assert all(r["eps_mse"] < 1e-8 and r["x0_rmse"] < 1e-3 for r in rows)
    biased = KnowsX0(x0)
    biased.forward = lambda x, t, z: KnowsX0.forward(biased, x, t, z) + 0.01  # a small constant eps error
    rows = denoising_error(biased, x0, None, [10, 500, 990])
    assert [r["eps_mse"] for r in rows] == pytest.approx([1e-4] * 3, rel=1e-3)
    # the clean estimate's error is the eps error times the amplification sqrt((1 - ab) / ab)
    assert [r["x0_rmse"] for r in rows] == pytest.approx([0.01 * r["amplification"] for r in rows], rel=1e-3)
    assert rows[-1]["x0_rmse"] > 50 * rows[0]["x0_rmse"]
    # a v model's own error meets sqrt(1 - ab) <= 1 in the clean estimate, whatever t
    v_biased = KnowsX0(x0, "v_prediction")
    v_biased.forward = lambda x, t, z: KnowsX0.forward(v_biased, x, t, z) + 0.01
    rows = denoising_error(v_biased, x0, None, [10, 500, 990])
    assert [r["output_mse"] for r in rows] == pytest.approx([1e-4] * 3, rel=1e-3)
    assert [r["x0_rmse"] for r in rows] == pytest.approx([0.01 * r["output_gain"] for r in rows], rel=1e-3)
    assert all(r["output_gain"] <= 1 for r in rows)


def test_partial_inversion_mirrors_its_decode_and_a_blend_retraces_the_trajectory(mini):
    """`span` stops the inversion part way and starts the decode there (the exact mirror, XFree model); a
    recorded trajectory has one state per step plus the original; blending with an empty mask decodes back to
    the original exactly, with a full mask it is the plain decode, and a half mask is each inside its half."""
    model = XFree(mini).eval()
    x0 = _images(2)
    with torch.no_grad():
        z, other = mini.encode(x0), mini.encode(_images(2, seed=5))
    steps, span = 10, 0.5
    states: list = []
    x_t = ddim_invert(model, x0, z, steps, span=span, record=states)
    assert len(states) == 6 and torch.equal(states[0], x0) and torch.equal(states[-1], x_t)  # t = 0 .. 400 of 1000
    assert (ddim_sample(model, z, x_t, steps, span=span) - x0).abs().max() < 1e-4
    full = ddim_invert(model, x0, z, steps)
    assert (x_t - x0).abs().mean() < (full - x0).abs().mean()  # part of the way
    plain = ddim_sample(model, other, x_t, steps, span=span)
    assert (plain - x0).abs().max() > 1e-2  # another code changes the decode
    empty, whole = torch.zeros(2, 1, 32, 32), torch.ones(2, 1, 32, 32)
    assert torch.equal(ddim_sample(model, other, x_t, steps, span=span, blend=(states, empty)), x0)
    assert torch.allclose(ddim_sample(model, other, x_t, steps, span=span, blend=(states, whole)), plain, atol=1e-6)
    half = torch.zeros(2, 1, 32, 32)
    half[..., 16:] = 1
    mixed = ddim_sample(model, other, x_t, steps, span=span, blend=(states, half))
    assert torch.equal(mixed[..., :16], x0[..., :16])
    with pytest.raises(ValueError, match="trajectory"):
        ddim_sample(model, other, x_t, steps, blend=(states, half))  # the trajectory of another span
    # level alignment: the decode of the inverting code passes through the trajectory's states in reverse, and
    # the model is queried, outside the mask, at exactly the state the blend put there
    from cxrray.diffusion.ddim import walk

    passed: list = []
    walk(model, "ddim", x_t, z, steps, None, span=span, record=passed, eta=0.0)
    for i in range(len(states) - 1):
        assert (passed[i + 1] - states[-2 - i]).abs().max() < 1e-4, i
    seen: list = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner, self.cfg = model, model.cfg

        def forward(self, x, t, code):
            seen.append(x.clone())
            return self.inner(x, t, code)

    ddim_sample(Spy(), other, x_t, steps, span=span, blend=(states, half))
    for i in range(1, len(seen)):
        assert torch.equal(seen[i][..., :16], states[-1 - i][..., :16]), i
