"""Synthetic cohorts (issue 13 part 1): cohort specs checked against the model, composition before
generation, the generation job (shards in ingest's format, provenance, kill-and-rerun byte-identical)."""
from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from cxrray.data.shards import read_manifest, read_tar
from cxrray.data.sources.chexchonet import FINDINGS, echo_labels
from cxrray.data.storage import Storage
from cxrray.errors import InputError
from cxrray.families import get_family
from cxrray.families.ddpm.config import DDPMConfig
from cxrray.pipelines.cohorts.spec import CohortSpec, describe, draw, load_spec, resolve
from conftest import kill_cli_when, write_checkpoint

# training statistics as CheXchoNet reports them roughly (years, cm); IVSd and LVPWd correlate strongly
STATS = {"age": (62.0, 16.0), "ivsd": (1.05, 0.2), "lvidd": (4.7, 0.6), "lvpwd": (1.0, 0.18)}
CORR = {"age": {"age": 1.0, "ivsd": 0.2, "lvidd": -0.1, "lvpwd": 0.2},
        "ivsd": {"age": 0.2, "ivsd": 1.0, "lvidd": 0.1, "lvpwd": 0.7},
        "lvidd": {"age": -0.1, "ivsd": 0.1, "lvidd": 1.0, "lvpwd": 0.1},
        "lvpwd": {"age": 0.2, "ivsd": 0.7, "lvidd": 0.1, "lvpwd": 1.0}}
MODEL = DDPMConfig(image_size=32, base_channels=16, channel_mult=(1, 2), layers_per_block=1,
                   attention_resolutions=(16,), norm_groups=8, covariates=("age", "sex", "ivsd", "lvidd", "lvpwd"),
                   covariate_stats=STATS, covariate_corr=CORR)
# the paper's cohort, in z-units of the training statistics (issue 13)
PAPER = {"n": 20_000, "seed": 0, "covariates": {
    "age": {"shift_sd": -0.23, "scale_sd": 0.84}, "ivsd": {"shift_sd": 0.52, "scale_sd": 1.19},
    "lvidd": {"shift_sd": 0.61, "scale_sd": 1.28}, "lvpwd": {"shift_sd": 0.61, "scale_sd": 1.26}}}
ISSUE_EXAMPLE = """n: 200
seed: 0
sex: {M: 0.5, F: 0.5}
covariates:
  age:   {normal: [45, 10], clip: [18, 90]}
  lvidd: {normal: [6.2, 0.3]}
  ivsd:  {shift_sd: 0.52, scale_sd: 1.19}   # relative to the model's training statistics
  lvpwd: {shift_sd: 0.61, scale_sd: 1.26}
"""


def test_the_issue_example_spec_draws_what_it_asks(tmp_path):
    path = tmp_path / "cohort.yaml"
    path.write_text(ISSUE_EXAMPLE)
    rows = draw(load_spec(path), MODEL)
    assert len(rows) == 200 and [r["index"] for r in rows] == list(range(200))
    ages = np.array([r["age"] for r in rows])
    assert ages.min() >= 18 and ages.max() <= 90 and abs(ages.mean() - 45) < 2.5
    lvidd = np.array([r["covariates"]["lvidd"] for r in rows])
    assert abs(lvidd.mean() - 6.2) < 0.06 and abs(lvidd.std() - 0.3) < 0.05
    ivsd = np.array([r["covariates"]["ivsd"] for r in rows])
    assert abs(ivsd.mean() - (1.05 + 0.52 * 0.2)) < 0.04
    for r in rows:  # the labels are the adapter's own thresholds on the requested values
        assert r["labels"] == echo_labels(r["sex"], r["covariates"]["ivsd"], r["covariates"]["lvidd"], r["covariates"]["lvpwd"])
    # LVIDd 6.2 is above both sexes' DLV threshold (5.9 / 5.3) for most rows
    assert describe(rows)["prevalence_pct"]["dlv"] > 80
    assert draw(load_spec(path), MODEL) == rows, "a pure function of the spec and the model"


def test_paper_cohort_composition_and_training_correlations():
    rows = draw(CohortSpec(**PAPER), MODEL)
    summary = describe(rows, MODEL)
    assert abs(summary["age"]["mean"] - (62 - 0.23 * 16)) < 0.5
    assert abs(summary["echo_cm"]["lvidd"]["sd"] - 0.6 * 1.28) < 0.02
    assert 48 < summary["women_pct"] < 52
    base = describe(draw(CohortSpec(n=20_000, seed=0), MODEL))  # the training distribution itself
    assert summary["prevalence_pct"]["slvh"] > 2 * base["prevalence_pct"]["slvh"]
    assert summary["prevalence_pct"]["dlv"] > 2 * base["prevalence_pct"]["dlv"]
    # independent by default (the paper's choice); `correlation: training` keeps IVSd/LVPWd together
    def r(rows):
        return np.corrcoef([x["covariates"]["ivsd"] for x in rows], [x["covariates"]["lvpwd"] for x in rows])[0, 1]
    assert abs(r(rows)) < 0.05
    assert abs(r(draw(CohortSpec(**PAPER, correlation="training"), MODEL)) - 0.7) < 0.05


def test_only_filter_keeps_positives():
    rows = draw(CohortSpec(n=300, seed=1, only=["slvh"]), MODEL)
    assert len(rows) == 300 and all(r["labels"][FINDINGS.index("slvh")] == 1.0 for r in rows)


@pytest.mark.parametrize("spec, field", [
    ({"covariates": {"lvidd": {"normal": [20, 1]}}}, "covariates.lvidd: mean 20 cm is outside"),
    ({"covariates": {"age": {"normal": [-5, 1]}}}, "covariates.age: mean -5 years is outside"),
    ({"covariates": {"height": {"normal": [170, 10]}}}, "covariates.height: unknown covariate"),
    ({"covariates": {"age": {"normal": [50, 5], "clip": [-10, 90]}}}, "covariates.age.clip"),
    ({"view": {"PA": 1.0}}, "view: this model is not conditioned on view"),
    ({"only": ["slvh"], "covariates": {"ivsd": {"normal": [0.8, 0.05]}, "lvpwd": {"normal": [0.8, 0.05]}}},
     "fewer than 1 in 1000"),
])
def test_bad_specs_are_refused_naming_the_field(spec, field):
    with pytest.raises(InputError, match=field.replace(".", r"\.")):
        draw(CohortSpec(n=50, **spec), MODEL)


def test_spec_file_errors_name_file_and_field(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("n: 10\nsex: {M: 0.7, F: 0.7}\ncovariates: {age: {normal: [50, 5], shift_sd: 1}}\n")
    with pytest.raises(InputError) as err:
        load_spec(path)
    assert str(path) in str(err.value) and "sex" in str(err.value) and "covariates.age" in str(err.value)
    no_corr = MODEL.model_copy(update={"covariate_corr": None})
    with pytest.raises(InputError, match="correlation: training"):
        resolve(CohortSpec(n=5, correlation="training"), no_corr)


# ------------------------------------------------------------------ the generation job

@pytest.fixture(scope="module")
def ddpm_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = get_family("ddpm").build(MODEL).eval()
    return f"file://{write_checkpoint(model, tmp_path_factory.mktemp('ddpm') / 'ckpt', 64)}", model


def _spec(tmp_path, n: int = 12):
    path = tmp_path / "cohort.yaml"
    path.write_text(ISSUE_EXAMPLE.replace("n: 200", f"n: {n}"))
    return path


def _shard_digests(root) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.glob("*.tar"))}


GEN = ["--steps", "3", "--set", "generate.shard_samples=3", "--set", "generate.batch_size=2"]


@pytest.fixture(scope="module")
def uninterrupted(ddpm_checkpoint, ray_local, tmp_path_factory):
    """One uninterrupted generation of the 12-image spec (4 shards of 3): (spec path, output folder)."""
    from cxrray.cli import main

    root = tmp_path_factory.mktemp("generated")
    spec, out = _spec(root), root / "syn"
    assert main(["generate", "--checkpoint", ddpm_checkpoint[0], "--cohort", str(spec), "--output", f"file://{out}", *GEN]) == 0
    return spec, out


def test_generate_writes_ingest_format_with_provenance_and_reruns_idempotently(ddpm_checkpoint, uninterrupted):
    from cxrray.cli import main
    from cxrray.data.stream import stream

    (ckpt, model), (spec, out) = ddpm_checkpoint, uninterrupted
    manifest = read_manifest(f"file://{out}")
    assert manifest["dataset"] == "synthetic" and manifest["samples"] == 12 and len(manifest["shards"]) == 4
    assert manifest["splits"] == {"synthetic": {"images": 12, "patients": 12}}
    assert manifest["label_vocabulary"] == FINDINGS and manifest["covariates"] == ["ivsd", "lvidd", "lvpwd"]
    assert manifest["generation"]["expected"]["n"] == 12 and "checkpoint" not in manifest["generation"]
    rows = draw(load_spec(spec), MODEL)
    store = Storage(f"file://{out}")
    samples = [s for shard in manifest["shards"] for s in read_tar(store.read_bytes(shard["name"]))]
    assert sorted(meta["source"]["synthetic"]["index"] for _, _, meta in samples) == list(range(12))
    for key, png, meta in samples:
        row = rows[meta["source"]["synthetic"]["index"]]
        assert meta["covariates"] == row["covariates"] and meta["sex"] == row["sex"] and meta["age"] == row["age"]
        assert meta["labels"] == row["labels"] and meta["split"] == "synthetic" and meta["patient"] == key
        made = meta["source"]["synthetic"]
        assert made["model"]["name"] == "cxrray-ddpm" and made["sampler"] == "ddim" and made["steps"] == 3
        with Image.open(io.BytesIO(png)) as img:
            text = img.text["cxrray:provenance"]
        assert text.startswith("SYNTHETIC") and "cxrray-ddpm" in text and f"lvidd {row['covariates']['lvidd']:g} cm" in text
        assert text == meta["source"]["provenance"]
    # the stream takes synthetic shards like real ones (covariates and labels by name)
    batches = list(stream(f"file://{out}", "synthetic", batch_size=12).iter_batches(batch_size=None))
    assert sum(len(b["image"]) for b in batches) == 12 and batches[0]["image"].shape[1:] == (1, 32, 32)
    lvidd = np.concatenate([b["lvidd"] for b in batches])
    np.testing.assert_allclose(np.sort(lvidd), np.sort([r["covariates"]["lvidd"] for r in rows]), atol=1e-5)
    # the first shard equals a direct call of the family's sampler with the shard's seed and rows
    from cxrray.families import GenerateRequest
    from cxrray.pipelines.generate import unit_seed
    from cxrray.data.imaging import decode_png16, png16_to_model

    gen = torch.Generator().manual_seed(unit_seed(0, 0))
    direct = []
    for chunk in (rows[0:2], rows[2:3]):
        cond = {"age": [r["age"] for r in chunk], "sex": [r["sex"] for r in chunk],
                **{c: [r["covariates"][c] for r in chunk] for c in ("ivsd", "lvidd", "lvpwd")}}
        direct.append(get_family("ddpm").generate(model, GenerateRequest(n=len(chunk), steps=3, generator=gen, conditions=cond)).images)
    first = sorted(read_tar(store.read_bytes(manifest["shards"][0]["name"])), key=lambda s: s[2]["source"]["synthetic"]["index"])
    np.testing.assert_allclose(np.stack([png16_to_model(decode_png16(p)) for _, p, _ in first]),
                               torch.cat(direct)[:, 0].numpy(), atol=2 / 65535)
    before = {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert main(["generate", "--checkpoint", ckpt, "--cohort", str(spec), "--output", f"file://{out}", *GEN]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()} == before, "a rerun rewrites nothing"


def test_generate_killed_then_rerun_is_byte_identical_to_an_uninterrupted_run(ddpm_checkpoint, uninterrupted, ray_local,
                                                                              tmp_path):
    from cxrray.cli import main

    (ckpt, _), (spec, whole) = ddpm_checkpoint, uninterrupted
    killed = tmp_path / "killed"
    env = {**os.environ, "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    kill_cli_when(["generate", "--checkpoint", ckpt, "--cohort", str(spec), "--output", f"file://{killed}", *GEN], env,
                  lambda: bool(list(killed.glob("_parts/*.json"))), 120, "generate wrote no shard")
    first = _shard_digests(killed)
    assert 1 <= len(first) < 4, "the kill must land mid-job"
    assert not (killed / "manifest.json").exists()
    assert main(["generate", "--checkpoint", ckpt, "--cohort", str(spec), "--output", f"file://{killed}", *GEN]) == 0
    assert _shard_digests(killed) == _shard_digests(whole) and len(_shard_digests(whole)) == 4
    assert (killed / "manifest.json").read_bytes() == (whole / "manifest.json").read_bytes()
    keys = [meta["key"] for p in sorted(killed.glob("*.tar")) for _, _, meta in read_tar(p.read_bytes())]
    assert len(keys) == len(set(keys)) == 12, "every sample exactly once"


def test_cli_cohort_describe_and_bad_input_exit_2(ddpm_checkpoint, tmp_path, capsys):
    from cxrray.cli import main

    ckpt, _ = ddpm_checkpoint
    assert main(["cohort", "describe", str(_spec(tmp_path)), "--checkpoint", ckpt]) == 0
    out = capsys.readouterr().out
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["n"] == 12 and "under 60" in out and "training" in out
    bad = tmp_path / "bad.yaml"
    bad.write_text("n: 5\ncovariates: {lvidd: {normal: [20, 1]}}\n")
    for argv in (["cohort", "describe", str(bad), "--checkpoint", ckpt],
                 ["generate", "--checkpoint", ckpt, "--cohort", str(bad), "--output", f"file://{tmp_path}/never"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "covariates.lvidd: mean 20 cm is outside the model's supported range" in err, err
    assert not (tmp_path / "never").exists()


def test_actor_pools_are_fixed_or_autoscaling_and_take_custom_resources():
    from cxrray.config import ConfigError, load_config
    from cxrray.pipelines.fanout import pool_args

    cfg = load_config("tiny", ["generate.actors=3", "generate.min_actors=1", 'generate.actor_resources={"spot_gpu": 1}'])
    assert pool_args(cfg.generate) == {"num_cpus": 1, "concurrency": (1, 3), "resources": {"spot_gpu": 1.0}}
    assert pool_args(load_config("tiny", ["encode.actors=2"]).encode) == {"num_cpus": 1, "concurrency": 2}
    assert pool_args(load_config("tiny", ["explain.actors=4", "explain.use_gpu=true"]).explain) == {"num_gpus": 1, "concurrency": 4}
    with pytest.raises(ConfigError, match="min_actors=2 needs actors"):
        load_config("tiny", ["latents.min_actors=2"])
