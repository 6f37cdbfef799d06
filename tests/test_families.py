"""The family contract, once for every registered family: tiny build, one CPU loss step on a stream-shaped
batch, checkpoint round trip (weights and EMA equal), seeded evaluation and generation deterministic,
load_model from a checkpoint and from the MLflow registry by alias, diffusers export loads to 1e-5.
(Invert/sample mirroring of DiffAE is tested in test_diffusion, the one family that inverts.)
A new family gets all of it by adding its registry line."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cxrray.config import load_config
from cxrray.families import FAMILIES, CapabilityError, get_family
from cxrray.io.checkpoint import save_weights
from cxrray.models.loading import load_model, model_identity

SMALL = {"image_size": 32, "base_channels": 16, "channel_mult": [1, 2], "layers_per_block": 1,
         "attention_resolutions": [16], "norm_groups": 8}
EXTRA = {"diffae": {"z_dim": 32}, "ddpm": {"covariates": ["age", "sex", "ivsd", "lvidd", "lvpwd"],
                                           "covariate_stats": {"age": [60.0, 15.0], "ivsd": [1.0, 0.2],
                                                               "lvidd": [5.0, 0.5], "lvpwd": [0.95, 0.2]}},
         "vae": {"disc_start": 0, "disc_channels": 8},  # the adversarial terms from the first step
         "sr": {"low_size": 16},
         "guided": {"width": 8, "blocks": 2, "label_vocabulary": ["cardiomegaly", "effusion", "chest_tube"]}}


REPORTS = ["Small left pleural effusion.", "Pacemaker in the left upper chest.", "Heart size is enlarged.",
           "Large pleural effusion in the right lower lung.", "No acute findings."]


def ldm_extra() -> dict:
    """The latent diffusion model at the test size: a 32² autoencoder (8² latents) and a tokenizer trained
    on a few reports (as `cxrray latents` would give it)."""
    from cxrray.data.report_tokens import train_tokenizer

    tokenizer = train_tokenizer([(f"p{i}", r) for i in range(3) for r in REPORTS], vocab_size=120, min_patients=1,
                                max_tokens=16)
    vae = get_family("vae").config(**{**{k: v for k, v in SMALL.items() if k in ("image_size", "base_channels",
                                                                               "layers_per_block", "norm_groups")},
                                      "channel_mult": [1, 2, 2]})
    return {"latent_size": 8, "attention_resolutions": [4], "head_channels": 8, "text_width": 32, "text_layers": 1,
            "text_heads": 2, "max_tokens": 16, "tokenizer": tokenizer.to_str(), "vocab_size": tokenizer.get_vocab_size(),
            "vae": vae.model_dump()}


def daug_extra() -> dict:
    """DAug's downstream model at the test size: the [x, x, x] arm (the contract batch has no heatmaps), the
    batch's three labels and the reports' tokenizer."""
    text = {k: v for k, v in ldm_extra().items() if k in ("text_layers", "text_heads", "max_tokens", "tokenizer",
                                                          "vocab_size")}
    return {"channels": "image", "width": 8, "blocks": 2, "embed_dim": 16, "text_width": 32, **text,
            "label_vocabulary": ["cardiomegaly", "effusion", "chest_tube"]}


def tiny(name: str):
    """The family's config at the test size (SMALL's fields it has, then its EXTRA)."""
    config = get_family(name).config
    extra = ldm_extra() if name == "ldm" else daug_extra() if name == "daug" else EXTRA.get(name, {})
    return config(**{**{k: v for k, v in SMALL.items() if k in config.model_fields}, **extra, "family": name})


def batch(n: int = 4, seed: int = 0) -> dict:
    """What the stream yields: images in [-1, 1], labels with NaN, covariates by name (some missing)."""
    rng = np.random.default_rng(seed)
    out = {"image": torch.as_tensor(rng.uniform(-1, 1, (n, 1, 32, 32)), dtype=torch.float32),
           "labels": torch.as_tensor(np.where(rng.random((n, 3)) < 0.2, np.nan, rng.integers(0, 2, (n, 3))), dtype=torch.float32),
           "age": torch.tensor([45.0, np.nan, 70.0, 90.0][:n]), "sex": torch.tensor([1.0, 0.0, np.nan, 1.0][:n])}
    for k, mean in (("ivsd", 1.0), ("lvidd", 5.0), ("lvpwd", 0.95)):
        out[k] = torch.as_tensor(mean + rng.normal(0, 0.1, n), dtype=torch.float32)
    out["covariates"] = torch.stack([out["ivsd"], out["lvidd"], out["lvpwd"]], 1)
    return out


def write_checkpoint(model, folder: Path, shown: int = 64) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    save_weights(model, folder / "model.safetensors")
    save_weights(model, folder / "ema.safetensors")
    (folder / "state.json").write_text(json.dumps({"images_shown": shown, "model": model.cfg.model_dump(mode="json")}))
    (folder / "COMPLETE").write_text(str(shown))
    return str(folder)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_contract(name, tmp_path):
    family = get_family(name)
    assert family.name == name and family.capabilities and set(family.presets) >= {"tiny", "small", "paper"}
    assert all(family.preset(preset).family == name for preset in family.presets)  # every preset composes
    torch.manual_seed(0)
    model = family.build(tiny(name))
    # one loss step changes the weights and lowers nothing to NaN
    before = {k: v.clone() for k, v in model.state_dict().items()}
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    loss = family.loss(model, batch(), torch.Generator().manual_seed(1))
    assert loss.ndim == 0 and torch.isfinite(loss) and 0.1 < float(loss) < 10
    loss.backward()
    opt.step()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    # checkpoint round trip: load_model gives the same weights, family and identity
    ckpt = write_checkpoint(model, tmp_path / "ckpt")
    loaded = load_model(ckpt)
    assert loaded.family is family and loaded.identity["family"] == name and loaded.identity["images_shown"] == 64
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in model.state_dict().items())
    assert model_identity(ckpt)["name"] == f"cxrray-{name}"
    # evaluation is seeded: the same call twice gives the same images
    first = family.evaluate(loaded.model, batch(2), seed=3, steps=3)
    again = family.evaluate(loaded.model, batch(2), seed=3, steps=3)
    for title, rows in first.grids.items():
        assert all(torch.equal(a, b) for a, b in zip(rows, again.grids[title])), title
        assert tuple(rows[-1].shape) == (2, 1, 32, 32)
    if "sample" in family.capabilities:
        assert float(first.grids["samples"][-1].abs().max()) <= 1.0 + 1e-5  # sampling from noise clips x0
    # generation (Serve's /v1/generate) is seeded, takes the family's own conditions and refuses others
    if family.generate is not None:
        images = [family.generate(loaded.model, generate_request(family, loaded.model)).images for _ in range(2)]
        assert torch.equal(images[0], images[1]) and tuple(images[0].shape) == (2, 1, 32, 32)
        with pytest.raises(Exception, match="nope"):
            family.generate(loaded.model, generate_request(family, loaded.model, nope=1.0))
    # capabilities are enforced with a message naming the missing one
    missing = sorted({"encode", "sample", "invert", "counterfactual", "generate"} - family.capabilities)
    if missing:
        with pytest.raises(CapabilityError, match=missing[0]):
            family.require(missing[0])


def generate_request(family, model, **extra):
    """A seeded request with a valid value for each of the family's conditions (mid-range, first choice)."""
    from cxrray.families import GenerateRequest

    conditions = {k: spec["enum"][0] if "enum" in spec else spec["examples"][0] if "examples" in spec
                  else (spec["minimum"] + spec["maximum"]) / 2 for k, spec in family.conditions(model.cfg).items()}
    prior = (torch.zeros(model.cfg.z_dim), torch.ones(model.cfg.z_dim)) if "encode" in family.capabilities else None
    return GenerateRequest(n=2, steps=3, generator=torch.Generator().manual_seed(5), conditions={**conditions, **extra},
                           guidance=2.0, z_prior=prior)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_loads_from_the_mlflow_registry_by_alias(name, tmp_path, monkeypatch):
    """Registered as cxrray-<family>; `models:/cxrray-<family>@latest` loads the same weights."""
    from types import SimpleNamespace

    from mlflow.tracking import MlflowClient

    from cxrray.train.registry import register_model

    monkeypatch.chdir(tmp_path)
    family = get_family(name)
    torch.manual_seed(0)
    model = family.build(tiny(name))
    ckpt = write_checkpoint(model, tmp_path / "ckpt", shown=96)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.create_run(client.create_experiment("contract", artifact_location=(tmp_path / "art").as_uri()))
    cfg = load_config("tiny", [f"model.family={name}"])
    assert register_model(cfg, ckpt, SimpleNamespace(uri=uri, run_id=run.info.run_id)) == "1"
    loaded = load_model(f"models:/cxrray-{name}@latest", tracking_uri=uri)
    assert loaded.family is family and loaded.identity["images_shown"] == 96
    assert loaded.identity["name"] == f"cxrray-{name}" and loaded.identity["version"] == "1"
    assert all(torch.equal(v, loaded.model.state_dict()[k]) for k, v in model.state_dict().items())
    if family.capabilities & {"encode", "reconstruct", "upscale", "embed", "guide"}:  # the pyfunc answers images
        import mlflow

        from cxrray.models.loading import mlflow_uris

        images = batch(2)["image"].repeat(1, model.cfg.in_channels if name == "daug" else 1, 1, 1)
        with mlflow_uris(uri):
            out = mlflow.pyfunc.load_model(f"models:/cxrray-{name}@latest").predict(images.numpy())
        with torch.no_grad():
            if "upscale" in family.capabilities:  # the pyfunc's DDIM: 50 steps from seed 0
                from cxrray.families.sr.task import upscale

                expected = upscale(model.eval(), images, 50, torch.Generator().manual_seed(0))
            elif "guide" in family.capabilities:  # logits at t = 0 (the pyfunc's default)
                expected = model.eval()(images, torch.zeros(len(images), dtype=torch.long))
            elif "embed" in family.capabilities:
                embeddings = model.eval().embed(images)
                expected = torch.cat([embeddings, model.class_logits(embeddings)], 1)
            else:
                expected = model.eval().encode(images) if "encode" in family.capabilities else model.eval()(images)
        np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)
    elif family.generate is not None:  # ... and a generator a table of conditions with images, as generate does
        import mlflow
        import pandas as pd

        from cxrray.families import GenerateRequest
        from cxrray.models.loading import mlflow_uris

        request = generate_request(family, model)
        table = pd.DataFrame([request.conditions] * 2)
        with mlflow_uris(uri):
            out = mlflow.pyfunc.load_model(f"models:/cxrray-{name}@latest").predict(table, params={"steps": 3, "seed": 4})
        expected = family.generate(model.eval(), GenerateRequest(
            n=2, steps=3, generator=torch.Generator().manual_seed(4),
            conditions={k: [v, v] for k, v in request.conditions.items()})).images
        np.testing.assert_allclose(out, expected.numpy(), atol=1e-5)


@pytest.mark.parametrize("name", list(FAMILIES))
def test_diffusers_export_loads_with_diffusers_and_matches(name, tmp_path):
    family = get_family(name)
    torch.manual_seed(0)
    model = family.build(tiny(name)).eval()
    notes = family.export(model, tmp_path)
    exported = {"vae": _exported_vae, "ldm": _exported_ldm, "sr": _exported_sr, "daug": _exported_daug,
                "guided": _exported_guided}.get(name, _exported_unet)
    ours, theirs = exported(name, model, tmp_path)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert notes and all(isinstance(n, str) for n in notes)  # what diffusers cannot express is named


def _exported_unet(name: str, model, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """eps of our model and of diffusers' UNet2DModel loaded from the export, same inputs."""
    from diffusers import DDIMScheduler, DDPMScheduler, UNet2DModel

    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = (DDPMScheduler if name == "ddpm" else DDIMScheduler).from_pretrained(folder / "scheduler")
    assert scheduler.config.num_train_timesteps == 1000
    x = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([10, 500])
    b = batch(2)
    with torch.no_grad():
        if name == "diffae":
            cond = model.encode(b["image"])
            ours, labels = model(x, t, cond), model.z_proj(cond)
        else:
            cond = model.condition({k: b[k] for k in ("age", "sex", "ivsd", "lvidd", "lvpwd")})
            ours, labels = model(x, t, cond), model.covariate_proj(cond)
        return ours, unet(x, t, class_labels=labels).sample


def _exported_ldm(name: str, model, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """eps of ours and of diffusers' UNet2DConditionModel + transformers' BertModel and fast tokenizer loaded
    from the export, for a prompt; the exported autoencoder and scheduler load too."""
    from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
    from transformers import AutoTokenizer, BertModel

    from cxrray.families.ldm.task import prompt_ids

    unet = UNet2DConditionModel.from_pretrained(folder / "unet").eval()
    text = BertModel.from_pretrained(folder / "text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    assert (scheduler.config.beta_end, scheduler.config.beta_schedule) == (0.0295, "scaled_linear")
    assert AutoencoderKL.from_pretrained(folder / "vae").config.latent_channels == 3
    prompt = [REPORTS[0], ""]
    ids = tokenizer(prompt, padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    assert torch.equal(ids["input_ids"], prompt_ids(model, prompt))
    z, t = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([10, 500])
    with torch.no_grad():
        ours = model(z, t, model.context(prompt_ids(model, prompt)))
        hidden = text(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state
        theirs = unet(z, t, encoder_hidden_states=hidden, encoder_attention_mask=ids["attention_mask"].bool()).sample
    return ours, theirs


def _exported_guided(name: str, model, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of ours and of the exported folder as `cxrray augment --classifier` loads it, at t = 10 and 500."""
    from cxrray.pipelines.daug.noisy_classifier import load_noisy_classifier

    loaded, names = load_noisy_classifier(str(folder))
    assert names == model.cfg.super_classes
    x, t = batch(2)["image"], torch.tensor([10, 500])
    with torch.no_grad():
        return model(x, t), loaded(x, t)


def _exported_daug(name: str, model, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Report embeddings of ours and of transformers' BertModel + fast tokenizer loaded from the export (the
    image encoder has no library class: its safetensors hold exactly our image-side weights)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertModel

    text = BertModel.from_pretrained(folder / "text_encoder").eval()
    tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer")
    image = load_file(str(folder / "image_encoder.safetensors"))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in image.items()) and "prototypes" in image
    ids = tokenizer(REPORTS[:2], padding="max_length", max_length=16, truncation=True, return_tensors="pt")
    with torch.no_grad():
        ours = model.embed_reports(ids["input_ids"])
        hidden = text(input_ids=ids["input_ids"], attention_mask=ids["attention_mask"]).last_hidden_state[:, 0]
        return ours, torch.nn.functional.normalize(model.text_proj(hidden), dim=1)


def _exported_sr(name: str, model, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """eps of ours and of diffusers' UNet2DModel from the export on [x_t, bicubic(low)] (SR3's input)."""
    from diffusers import DDIMScheduler, UNet2DModel

    from cxrray.families.sr.network import resize

    unet = UNet2DModel.from_pretrained(folder / "unet").eval()
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    assert (scheduler.config.num_train_timesteps, scheduler.config.beta_schedule) == (2000, "squaredcos_cap_v2")
    x, low = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0)), batch(2)["image"][..., ::2, ::2]
    t = torch.tensor([10, 1500])
    with torch.no_grad():
        return model(x, t, low), unet(torch.cat([x, resize(low, 32)], 1), t).sample


def _exported_vae(name: str, model, folder: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Scaled latents and reconstructions of ours and of diffusers' AutoencoderKL loaded from the export
    (latents x its scaling_factor, as diffusers' pipelines scale them)."""
    from diffusers import AutoencoderKL

    model.latent_std.fill_(2.5)
    family = get_family(name)
    family.export(model, folder)
    vae = AutoencoderKL.from_pretrained(folder / "vae").eval()
    assert abs(vae.config.scaling_factor - 0.4) < 1e-6
    x = batch(2)["image"]
    with torch.no_grad():
        z = vae.encode(x).latent_dist.mode() * vae.config.scaling_factor
        theirs = torch.cat([z.flatten(1), vae.decode(z / vae.config.scaling_factor).sample.clamp(-1, 1).flatten(1)], 1)
        ours = torch.cat([model.latents(x).flatten(1), model(x).flatten(1)], 1)
    return ours, theirs


def test_config_picks_the_family_and_its_presets():
    cfg = load_config("tiny", ["model.family=ddpm", "model.covariates=[age,sex,ivsd,lvidd,lvpwd]"])
    assert cfg.model.family == "ddpm" and cfg.model.covariates == ("age", "sex", "ivsd", "lvidd", "lvpwd")
    assert cfg.model.image_size == 64 and cfg.model.beta_schedule == "squaredcos_cap_v2"
    assert load_config("tiny").model.family == "diffae"
    assert load_config("paper", ["model.family=ddpm"]).model.image_size == 256
    assert cfg.tracking.model_name("ddpm") == "cxrray-ddpm"
    from cxrray.config import ConfigError

    with pytest.raises(ConfigError, match="unknown 'nope'"):
        load_config("tiny", ["model.family=nope"])
    with pytest.raises(ConfigError, match="covariate"):
        load_config("tiny", ["model.family=ddpm", "model.covariates=[age,height]"])
    with pytest.raises(ConfigError, match="z_dim"):  # a diffae field on a ddpm model
        load_config("tiny", ["model.family=ddpm", "model.z_dim=8"])


def test_ddpm_covariate_statistics_come_from_the_training_rows_only(tmp_path):
    """`prepare` stores each covariate's mean/sd over the train split (val/test rows excluded) and their
    correlations, which cohorts draw from; checked against numpy on the rows written."""
    from cxrray.data import shards
    from cxrray.data.storage import Storage
    from cxrray.families.ddpm.task import prepare
    from test_experiment import write_echo_shards

    uri = write_echo_shards(tmp_path / "s", 60, 7, splits=["train", "val", "test"])
    rows = [(m["age"], *m["covariates"].values()) for shard in shards.read_manifest(Storage(uri))["shards"]
            for _, _, m in shards.read_tar(Storage(uri).read_bytes(shard["name"]), shard["name"]) if m["split"] == "train"]
    table = np.asarray(rows)
    assert len(table) == 20
    cfg = prepare(tiny("ddpm").model_copy(update={"covariate_stats": None, "covariate_corr": None}), uri)
    assert list(cfg.covariate_stats) == ["age", "ivsd", "lvidd", "lvpwd"]
    for i, name in enumerate(cfg.covariate_stats):
        assert cfg.covariate_stats[name] == pytest.approx((table[:, i].mean(), table[:, i].std()))
    assert cfg.covariate_corr["ivsd"]["lvidd"] == pytest.approx(np.corrcoef(table[:, 1], table[:, 2])[0, 1])
    assert cfg.covariate_corr["lvidd"]["ivsd"] == cfg.covariate_corr["ivsd"]["lvidd"] and cfg.covariate_corr["age"]["age"] == 1.0


def test_covariate_moments_merged_by_shard_match_numpy_far_from_zero_and_on_constant_columns():
    from cxrray.families.ddpm.task import _Moments

    rng = np.random.default_rng(3)
    data = np.column_stack([1e6 + rng.normal(size=500), rng.normal(size=500) * 3, np.full(500, 1.1)])
    moments = _Moments(3)
    for start in range(0, 500, 37):  # uneven blocks, as shards are
        moments.add(data[start:start + 37])
    assert moments.n == 500 and moments.mean == pytest.approx(data.mean(0), rel=1e-12)
    sd = moments.sd()
    assert sd[:2] == pytest.approx(data[:, :2].std(0), rel=1e-9) and sd[2] == 0.0  # not ~1e-8 from cancellation
    assert moments.m2[0, 1] / 500 == pytest.approx(np.cov(data[:, 0], data[:, 1], bias=True)[0, 1], rel=1e-9)


def test_missing_covariates_are_masked_not_zeroed():
    model = get_family("ddpm").build(tiny("ddpm"))
    c = model.condition({"age": torch.tensor([60.0, np.nan]), "sex": torch.tensor([np.nan, 0.0]),
                         "ivsd": torch.tensor([1.2, 1.0]), "lvidd": torch.tensor([5.0, np.nan]),
                         "lvpwd": torch.tensor([0.95, 0.95])})
    layout = model.cfg.covariate_layout()
    row = {slot: dict(zip(layout, c[i].tolist())) for i, slot in enumerate(("a", "b"))}
    assert row["a"][("age", "z")] == 0.0 and row["a"][("age", "present")] == 1.0  # 60 is the mean
    assert row["b"][("age", "present")] == 0.0 and row["b"][("lvidd", "present")] == 0.0
    assert row["a"][("sex", "M")] == row["a"][("sex", "F")] == 0.0 and row["b"][("sex", "F")] == 1.0
    assert abs(row["a"][("ivsd", "z")] - 1.0) < 1e-6  # (1.2 - 1.0) / 0.2
    dropped = model.condition({k: torch.tensor([1.0]) for k in ("age", "sex", "ivsd", "lvidd", "lvpwd")},
                              drop=torch.tensor([True]))
    assert torch.equal(dropped, model.null_condition(1))


def test_the_loss_gets_the_whole_batch_numbers_as_tensors_and_text_as_str():
    import numpy as np
    import torch

    from cxrray.train.loop import to_torch

    batch = to_torch({"image": np.zeros((2, 1, 4, 4), np.float32), "age": np.array([50.0, np.nan], np.float32),
                      "report": np.array(["Cardiomegaly.", ""], dtype=object), "mask": np.ones((2, 4, 4), np.float32)})
    assert torch.is_tensor(batch["image"]) and batch["image"].shape == (2, 1, 4, 4)
    assert torch.isnan(batch["age"][1]) and batch["mask"].sum() == 32
    assert batch["report"] == ["Cardiomegaly.", ""]


def test_every_stage_refuses_a_family_without_the_capability_naming_it(tmp_path, capsys):
    """encode/explain/audit on a ddpm checkpoint: exit 2 before any work, naming the missing capability."""
    from cxrray.cli import main

    ckpt = write_checkpoint(get_family("ddpm").build(tiny("ddpm")), tmp_path / "ddpm")
    runs = {"encode": ["encode", "--checkpoint", ckpt, "--data", str(tmp_path / "shards"), "--output", str(tmp_path / "e")],
            "counterfactual": ["explain", "--checkpoint", ckpt, "--probe", str(tmp_path / "p"), "--input",
                               str(tmp_path / "shards"), "--finding", "effusion", "--output", str(tmp_path / "x")]}
    runs["counterfactual (audit)"] = ["audit", "--checkpoint", ckpt, "--probe", str(tmp_path / "p"), "--data",
                                      str(tmp_path / "shards"), "--finding", "effusion", "--output", str(tmp_path / "a")]
    for capability, argv in runs.items():
        assert main(argv) == 2, capability
        err = capsys.readouterr().err
        assert f"model family 'ddpm' cannot {capability.split()[0]}" in err and "generate, sample" in err, err
    assert not any((tmp_path / d).exists() for d in ("e", "x", "a"))


@pytest.mark.parametrize("name", list(FAMILIES))
def test_periodic_evaluation_takes_the_batch_the_loss_takes_text_included(name, tmp_path):
    from cxrray.train.evaluate import evaluate
    from cxrray.train.loop import to_torch

    family = get_family(name)
    model = family.build(tiny(name))
    numpy_batch = {k: v.numpy() for k, v in batch(2).items()}
    numpy_batch["report"] = np.array(["Small left effusion.", ""], dtype=object)
    cfg = load_config("tiny", [f"model.family={name}", "train.sample_steps=2"])
    metrics = evaluate(family, model, to_torch(numpy_batch), cfg, images_shown=16)
    assert metrics and all(np.isfinite(v) for v in metrics.values())
