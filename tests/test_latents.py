"""The latents job on real phantoms with planted identifiers in every report: latent shards that the stream
reads, a WordPiece tokenizer trained on the de-identified training reports, resumption that writes each
shard once, and no planted identifier in any byte written (shards, tokenizer vocabulary, logs)."""
from __future__ import annotations

import io
import json
import math
import re
import tarfile

import numpy as np
import pytest
import torch

from conftest import write_checkpoint
from cxrray.cli import main
from cxrray.data.deid import sample_key
from cxrray.data.imaging import decode_png16, png16_to_model
from cxrray.data.phantom import TRUTH, PhantomConfig, generate
from cxrray.data.report_tokens import load_tokenizer, shared_words, train_tokenizer
from cxrray.data.shards import read_manifest
from cxrray.data.stream import stream
from cxrray.eval.deid import measure, read_truth
from cxrray.families import get_family

N = 240


def members(path) -> dict[str, bytes]:
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def every_byte(folder) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def job(tmp_path_factory, ray_local):
    """Phantoms (every report carries identifying prose) -> shards at 32² -> latents with a tiny VAE."""
    root = tmp_path_factory.mktemp("latents")
    generate(N, root / "phantoms", PhantomConfig(size=48, report_phi_fraction=1.0, seed=11))
    data = root / "shards"
    assert main(["ingest", "--input", str(root / "phantoms"), "--labels", str(root / "phantoms" / "labels.csv"),
                 "--output", f"file://{data}", "--size", "32", "--set", "ingest.shard_samples=60"]) == 0
    torch.manual_seed(0)
    vae_cfg = get_family("vae").preset("tiny", image_size=16, base_channels=8, norm_groups=8)
    vae = get_family("vae").build(vae_cfg).eval()
    vae.latent_std.fill_(0.5)
    checkpoint = write_checkpoint(vae, root / "vae", images_shown=0)
    out = root / "latents"
    args = ["latents", "--vae", str(checkpoint), "--data", f"file://{data}", "--output", f"file://{out}",
            "--set", "latents.vocab_size=400", "--set", "latents.max_tokens=64"]
    return {"root": root, "data": data, "out": out, "args": args, "vae": vae, "phantoms": root / "phantoms"}


@pytest.fixture(scope="module")
def first_run(job):
    import contextlib

    logs = io.StringIO()
    with contextlib.redirect_stdout(logs), contextlib.redirect_stderr(logs):
        assert main(job["args"]) == 0
    return logs.getvalue()


def test_latent_shards_hold_the_vae_latents_and_the_report_tokens(job, first_run):
    manifest = read_manifest(f"file://{job['out']}")
    source = read_manifest(f"file://{job['data']}")
    assert manifest["samples"] == source["samples"] == N
    assert manifest["splits"] == source["splits"] and manifest["label_vocabulary"] == source["label_vocabulary"]
    section = manifest["latents"]
    assert section["shape"] == [3, 4, 4] and section["image_size"] == 16 and section["latent_std"] == 0.5
    assert section["tokenizer"] == "tokenizer.json" and section["max_tokens"] == 64
    assert {"latent.npy", "tokens.npy"} <= set(manifest["members"])
    tokenizer = load_tokenizer((job["out"] / "tokenizer.json").read_text(), 64)
    assert section["vocab_size"] == tokenizer.get_vocab_size() <= 400
    shard = manifest["shards"][0]["name"]
    files = members(job["out"] / shard)
    keys = sorted({name.split(".", 1)[0] for name in files})
    assert len(files) == 4 * len(keys) == 4 * manifest["shards"][0]["samples"]
    # the latent is the VAE's scaled posterior mean of the image at the VAE's size; tokens encode the report
    key = keys[0]
    image = torch.as_tensor(png16_to_model(decode_png16(files[f"{key}.png"]))[None, None])
    small = torch.nn.functional.interpolate(image, size=(16, 16), mode="bicubic", antialias=True).clamp(-1, 1)
    with torch.no_grad():
        expected = job["vae"].latents(small)[0].numpy()
    latent = np.load(io.BytesIO(files[f"{key}.latent.npy"]), allow_pickle=False)
    assert latent.dtype == np.float32 and latent.shape == (3, 4, 4)
    np.testing.assert_allclose(latent, expected, atol=1e-5)
    tokens = np.load(io.BytesIO(files[f"{key}.tokens.npy"]), allow_pickle=False)
    report = json.loads(files[f"{key}.json"])["report"]
    assert tokens.dtype == np.int32 and tokens.shape == (64,) and tokens[0] == tokenizer.token_to_id("[CLS]")
    assert tokens.tolist() == tokenizer.encode(report).ids
    assert (tokens == 1).mean() < 0.1  # [UNK] is rare: the vocabulary covers the de-identified prose
    # the stream passes them to training as columns
    batch = next(iter(stream(f"file://{job['out']}", "train", batch_size=8).iter_batches(batch_size=8,
                                                                                        batch_format="numpy")))
    assert batch["latent"].shape == (8, 3, 4, 4) and batch["tokens"].shape == (8, 64)
    assert "[latents]" in first_run and "images/s" in first_run


def test_no_planted_identifier_reaches_latents_tokenizer_or_logs(job, first_run):
    manifest = read_manifest(f"file://{job['out']}")
    blobs = every_byte(job["out"])
    corpus = [first_run.encode(), *blobs.values()]
    metas = {}
    for shard in manifest["shards"]:
        files = members(job["out"] / shard["name"])
        corpus += list(files.values())
        metas.update({k[:-5]: json.loads(v) for k, v in files.items() if k.endswith(".json")})
    truth = read_truth(job["phantoms"] / TRUTH)
    import os

    texts = {path: metas[sample_key(path, os.environ["CXRRAY_SALT"])]["report"] for path in truth}
    result = measure(truth, texts, corpus=b"\n".join(corpus))
    assert result["reports"] == N and result["identifiers"] > 10 * N
    assert all(row["removed"] >= 0.99 for row in result["by_category"].values()), result["leak_examples"]
    # the vocabulary: no identifying planted word is an entry. Identifying: in the planted identifiers of at
    # most 2 patients and in no clinical sentence ("year", "old" of "58-year-old" are planted for everyone)
    vocab = json.loads(blobs["tokenizer.json"])["model"]["vocab"]
    words = {w for w in vocab if not w.startswith("##") and len(w) >= 3}
    clinical = {w for record in truth.values() for sentence in record["clinical"]
                for w in re.findall(r"\w+", sentence.lower())}
    patients: dict[str, set] = {}
    for path, record in truth.items():
        for value in (v for values in record["phi"].values() for v in values):
            for w in re.findall(r"\w+", value.lower()):
                patients.setdefault(w, set()).add(metas[sample_key(path, os.environ["CXRRAY_SALT"])]["patient"])
    identifying = {w for w, who in patients.items() if len(who) <= 2 and len(w) >= 3} - clinical
    assert len(identifying) > 200 and not sorted(words & identifying)


def test_the_tokenizer_keeps_only_words_several_patients_use():
    reports = [(f"p{i % 5}", "Small left pleural effusion. Pacemaker in the left chest.") for i in range(20)]
    reports += [("p1", "Seen by Dr Quimbleworth today")] * 30  # one patient, many reports: still one patient
    assert "quimbleworth" not in shared_words(reports, 3) and "effusion" in shared_words(reports, 3)
    tokenizer = train_tokenizer(reports, vocab_size=200, min_patients=3, max_tokens=16)
    assert "quimbleworth" not in tokenizer.get_vocab()
    ids = tokenizer.encode("Large pleural effusion").ids
    assert len(ids) == 16 and ids[-1] == 0 and ids[1] == 1  # "large" was never seen: [UNK]
    assert tokenizer.decode(ids) == "pleural effusion"


@pytest.mark.slow  # ~15 s; resumption of the shared fan-out is also tested for encode and generate
def test_a_rerun_skips_finished_shards_and_a_lost_shard_is_written_once(job, first_run, capfd):
    before = every_byte(job["out"])
    assert main(job["args"]) == 0
    assert every_byte(job["out"]) == before, "a rerun must not change a byte"
    assert "shards already written; encoding 0" in capfd.readouterr().out
    manifest = read_manifest(f"file://{job['out']}")
    lost = manifest["shards"][1]["name"]
    (job["out"] / lost).unlink()  # a job killed while writing this shard: object and record gone
    (job["out"] / "_parts" / f"{lost}.json").unlink()
    assert main(job["args"]) == 0
    assert "encoding 1" in capfd.readouterr().out
    assert every_byte(job["out"]) == before


def test_latents_refuses_a_model_that_is_not_an_autoencoder(job, tmp_path, capsys):
    from test_families import tiny

    ddpm = get_family("ddpm").build(tiny("ddpm"))
    checkpoint = write_checkpoint(ddpm, tmp_path / "ddpm", images_shown=0)
    args = ["latents", "--vae", str(checkpoint), "--data", f"file://{job['data']}", "--output", str(tmp_path / "o")]
    assert main(args) == 2
    assert "cannot latents" in capsys.readouterr().err


LDM = ["model.family=ldm", "model.image_size=16", "model.latent_size=4", "model.base_channels=16",
       "model.channel_mult=[1,2]", "model.attention_resolutions=[2]", "model.head_channels=8", "model.norm_groups=8",
       "model.layers_per_block=1", "model.text_width=32", "model.text_layers=1", "model.text_heads=2",
       "train.global_batch=8", "train.cpus_per_worker=0.5", "train.log_every=8", "train.eval_images=4",
       "train.sample_steps=3", "train.lr=0.001", "train.checkpoint_every=16", "train.strategy=deepspeed",
       "train.zero_stage=1"]


@pytest.fixture(scope="module")
def ldm_run(job, first_run, tmp_path_factory):
    import contextlib

    import os

    out = tmp_path_factory.mktemp("ldm") / "run"
    sets = [*LDM, f"model.vae_checkpoint={job['root'] / 'vae'}", f"tracking.uri=sqlite:///{out.parent}/mlflow.db"]
    args = ["pretrain", "--data", f"file://{job['out']}", "--output", f"file://{out}", "--images", "32"]
    logs, cwd = io.StringIO(), os.getcwd()
    os.chdir(out.parent)  # MLflow's artifacts (mlartifacts/) land beside its database: all of it is grepped
    try:
        with contextlib.redirect_stdout(logs):
            assert main([*args, *[a for s in sets for a in ("--set", s)]]) == 0
    finally:
        os.chdir(cwd)
    return out, logs.getvalue()


def test_latent_diffusion_trains_on_the_latent_shards_with_their_autoencoder_and_tokenizer(job, ldm_run):
    """`cxrray pretrain --set model.family=ldm --set model.vae_checkpoint=URI --data LATENTS`: Ray Train +
    DeepSpeed, 2 workers; the frozen autoencoder is copied in and never trained, the tokenizer and its
    vocabulary travel with the model, and the trained model generates from a report."""
    from safetensors.torch import load_file

    from cxrray.families import GenerateRequest
    from cxrray.models.loading import load_model

    out, logs = ldm_run
    assert "ldm: deepspeed x2 workers" in logs
    first, last = sorted(out.glob("ray/*/checkpoint-*"))
    state = json.loads((last / "state.json").read_text())
    assert state["model"]["tokenizer"] == (job["out"] / "tokenizer.json").read_text()
    assert state["model"]["max_tokens"] == 64 and state["model"]["vae"]["image_size"] == 16
    vae = job["vae"].state_dict()
    for folder in (first, last):
        weights = load_file(folder / "model.safetensors")
        assert all(torch.equal(weights[f"vae.{k}"], v) for k, v in vae.items()), "the autoencoder must stay frozen"
    assert math.isfinite(state["metrics"]["loss"]) and 0 < state["metrics"]["loss"] < 5
    loaded = load_model(str(out))
    made = loaded.family.generate(loaded.model, GenerateRequest(
        n=2, steps=3, generator=torch.Generator().manual_seed(0),
        conditions={"prompt": "Large pleural effusion in the right lower lung."}, guidance=2.0))
    assert tuple(made.images.shape) == (2, 1, 16, 16) and float(made.images.abs().max()) <= 1.0
    assert "report-conditioned latent diffusion" in made.how


def test_no_planted_identifier_reaches_the_trained_model_or_mlflow(job, ldm_run):
    """Every byte of the run (checkpoints with the tokenizer in their config, MLflow's database, params and
    artifacts, the registered model) and its logs, searched for every planted identifier."""
    from mlflow.tracking import MlflowClient

    out, logs = ldm_run
    root = out.parent
    blobs = every_byte(root)
    assert any(name.startswith("mlartifacts/") for name in blobs) and "mlflow.db" in blobs
    truth = read_truth(job["phantoms"] / TRUTH)
    result = measure(truth, {path: "" for path in truth}, corpus=b"\n".join([logs.encode(), *blobs.values()]))
    assert result["identifiers"] > 10 * N
    assert all(row["removed"] >= 0.99 for row in result["by_category"].values()), result["leak_examples"]
    client = MlflowClient(f"sqlite:///{root}/mlflow.db")
    run = client.search_runs([client.get_experiment_by_name("cxrray-pretrain").experiment_id])[0]
    from cxrray.tracking import PARAM_LIMIT, _param

    tokenizer = (job["out"] / "tokenizer.json").read_text()
    assert run.data.params["model.tokenizer"] == _param(tokenizer)  # whole when it fits, else size + digest
    assert _param("x" * (PARAM_LIMIT + 1)).startswith(f"<{PARAM_LIMIT + 1:,} characters, sha256 ")


@pytest.mark.slow  # ~12 s; prompt generation with provenance is also in the cascade test (--prompts-from)
def test_generate_from_report_prompts_writes_shards_with_the_prompt_and_provenance(ldm_run, tmp_path, capfd):
    """`cxrray generate --checkpoint LDM --prompts FILE --n-per-prompt K`: K images per line (an empty line is
    unconditional), each with its prompt as report and provenance in JSON and PNG; a rerun changes no byte."""
    from PIL import Image

    from cxrray.data.shards import read_tar

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("Large pleural effusion in the right lower lung.\n\nA pacemaker in the left upper chest.\n")
    out = tmp_path / "gen"
    args = ["generate", "--checkpoint", str(ldm_run[0]), "--prompts", str(prompts), "--n-per-prompt", "2",
            "--output", f"file://{out}", "--steps", "3", "--guidance", "2", "--set", "generate.shard_samples=4"]
    assert main(args) == 0
    manifest = read_manifest(f"file://{out}")
    assert manifest["samples"] == 6 and len(manifest["shards"]) == 2 and manifest["preprocessing"]["size"] == 16
    samples = sorted((s for shard in manifest["shards"] for s in read_tar((out / shard["name"]).read_bytes())),
                     key=lambda s: s[2]["source"]["synthetic"]["index"])
    lines = prompts.read_text().splitlines()
    assert [m["report"] for _, _, m in samples] == [lines[0]] * 2 + [None] * 2 + [lines[2]] * 2
    images = [decode_png16(png) for _, png, _ in samples]
    assert images[0].shape == (16, 16) and not np.array_equal(images[0], images[1])  # own noise per image
    for _, png, meta in samples:
        with Image.open(io.BytesIO(png)) as img:
            assert img.text["cxrray:provenance"] == meta["source"]["provenance"]
        assert meta["source"]["provenance"].startswith("SYNTHETIC") and "cxrray-ldm" in meta["source"]["provenance"]
        assert meta["source"]["synthetic"]["guidance"] == 2.0
    before = every_byte(out)
    assert main(args) == 0 and every_byte(out) == before
    prompts.write_text("x" * 2001 + "\n")
    assert main(args) == 2 and "longer than 2000 characters" in capfd.readouterr().err


def test_the_cascade_generates_from_a_real_sets_reports_and_upscales(job, ldm_run, tmp_path, capsys):
    """`cxrray generate --prompts-from DATA --split test --sr SR`: the test split's de-identified reports are the
    prompts (key order), each image keeps its source's key and labels, and is upscaled by the SR stage."""
    from cxrray.data.shards import read_tar

    torch.manual_seed(0)
    sr_cfg = get_family("sr").preset("tiny", image_size=32, low_size=16, base_channels=16, channel_mult=[1, 2],
                                      attention_resolutions=[], norm_groups=8, layers_per_block=1)
    sr = write_checkpoint(get_family("sr").build(sr_cfg), tmp_path / "sr", images_shown=0)
    out = tmp_path / "gen"
    args = ["generate", "--checkpoint", str(ldm_run[0]), "--prompts-from", f"file://{job['out']}", "--split", "test",
            "--max-prompts", "3", "--output", f"file://{out}", "--steps", "2", "--sr", str(sr),
            "--set", "generate.sr_steps=2"]
    assert main(args) == 0
    manifest = read_manifest(f"file://{out}")
    assert manifest["samples"] == 3 and manifest["preprocessing"]["size"] == 32
    source = read_manifest(f"file://{job['out']}")
    assert manifest["label_vocabulary"] == source["label_vocabulary"]
    real = {m["key"]: m for shard in source["shards"] for _, _, m in read_tar((job["out"] / shard["name"]).read_bytes())}
    tests = sorted(k for k, m in real.items() if m["split"] == "test" and m.get("report"))
    samples = sorted((s for shard in manifest["shards"] for s in read_tar((out / shard["name"]).read_bytes())),
                     key=lambda s: s[2]["source"]["synthetic"]["index"])
    assert [m["prompt_from"] for _, _, m in samples] == tests[:3]
    for _, png, meta in samples:
        origin = real[meta["prompt_from"]]
        assert meta["report"] == " ".join(origin["report"].split()) and meta["labels"] == origin["labels"]
        assert decode_png16(png).shape == (32, 32)
        assert "upscaled by SR3 model cxrray-sr" in meta["source"]["provenance"]
        assert meta["source"]["synthetic"]["upscaled_by"]["name"] == "cxrray-sr"
    assert manifest["generation"]["labels_from"].startswith("the real sample") and "sr_checkpoint" not in manifest["generation"]
    assert main([*args[:5], "--split", "holdout", *args[7:]]) == 2
    assert "no 'holdout' samples" in capsys.readouterr().err


EVAL = ["generation_eval.images=16", "generation_eval.prompts=16", "generation_eval.unconditional=8",
        "generation_eval.steps=2", "generation_eval.sr_steps=2", "generation_eval.epochs=2", "generation_eval.batch_size=8",
        "generation_eval.inpaint_cases=4", "generation_eval.kid_subset=4", "generation_eval.kid_subsets=5",
        "generation_eval.diversity_pairs=8", "generation_eval.min_positives=2", 'generation_eval.grid_prompts=["", "x"]',
        "generation_eval.guidance_sweep=[1,3]", "generation_eval.sr_starts=[0.5,1.0]"]


def test_img2img_attribution_is_the_autoencoder_at_strength_zero_and_follows_the_prompt_above(job, ldm_run, tmp_path):
    """Issue 29 §2's sampler on the trained tiny latent model: strength 0 returns D(E(x)) exactly (the floor of
    every map), a little strength stays near it, full strength is steered by the prompt, a seed repeats, and
    PNDM runs the same path; `cxrray attribute --method attribution` writes its outputs for a DICOM."""
    from cxrray.config import AttributionConfig
    from cxrray.data.shards import read_tar
    from cxrray.data.imaging import decode_png16, png16_to_model
    from cxrray.models.loading import load_model
    from cxrray.pipelines.attribution.img2img import attribution_maps, healthy_counterparts

    model = load_model(str(ldm_run[0])).model.eval()
    shard = sorted(job["data"].glob("*.tar"))[0]
    images = np.stack([png16_to_model(decode_png16(png)) for _, png, _ in read_tar(shard.read_bytes())[:4]])[:, None]
    x = torch.from_numpy(images)
    seeds = [0, 1, 2, 3]  # one per image
    floor = healthy_counterparts(model, x, "Normal chest radiograph.", AttributionConfig(strength=0.0), seeds)
    expected = torch.nn.functional.interpolate(model.decode(model.latents(x)).clamp(-1, 1), size=(32, 32),
                                               mode="bilinear", align_corners=False)
    assert torch.equal(floor, expected)
    near = healthy_counterparts(model, x, "Normal chest radiograph.", AttributionConfig(strength=0.05, steps=20), seeds)
    far = healthy_counterparts(model, x, "Normal chest radiograph.", AttributionConfig(strength=1.0, steps=5), seeds)
    assert (near - floor).abs().mean() < (far - floor).abs().mean()
    other = healthy_counterparts(model, x, "Large pleural effusion in the right lower lung.",
                                 AttributionConfig(strength=1.0, steps=5), seeds)
    assert (other - far).abs().mean() > 1e-3  # the prompt steers the sample
    half = AttributionConfig(strength=0.5, steps=6)
    signed, well = attribution_maps(model, images, "Normal chest radiograph.", half, [5, 6, 7, 8])
    again, _ = attribution_maps(model, images[1:], "Normal chest radiograph.", half, [6, 7, 8], batch=2)
    assert np.abs(signed[1:] - again).max() < 1e-5 and np.allclose(signed, images[:, 0] - well)  # batching: rounding only
    assert np.abs(signed[0] - signed[1]).max() > 1e-2  # while another image's noise moves it
    # against the reconstruction, strength 0 leaves nothing (the autoencoder's error is not the finding)
    zero, _ = attribution_maps(model, images, "", AttributionConfig(strength=0.0, reference="reconstruction"), [1, 2, 3, 4])
    floor_map, _ = attribution_maps(model, images, "", AttributionConfig(strength=0.0), [1, 2, 3, 4])
    assert np.abs(zero).max() == 0.0 and np.abs(floor_map).max() > 1e-3
    recon, _ = attribution_maps(model, images, "Normal chest radiograph.", half.model_copy(update={"reference": "reconstruction"}),
                                [5, 6, 7, 8])
    assert np.allclose(recon, signed - floor_map, atol=1e-5)  # (D(E(x)) - c) = (x - c) - (x - D(E(x)))
    # strength 1 is a sample from noise: it no longer depends on the image, only on the seed
    a = healthy_counterparts(model, x[:1], "", AttributionConfig(strength=1.0, steps=5), [0])
    b = healthy_counterparts(model, x[1:2], "", AttributionConfig(strength=1.0, steps=5), [0])
    assert torch.allclose(a, b, atol=1e-5)
    for strength in (0.5, 0.99):  # PLMS's warm-up rebuilt for a cut schedule, up to its top
        pndm = healthy_counterparts(model, x, "Normal chest radiograph.",
                                    AttributionConfig(strength=strength, steps=50, scheduler="pndm"), seeds)
        assert torch.isfinite(pndm).all() and pndm.shape == x.shape
    dicom = sorted((job["phantoms"] / "images").glob("*.dcm"))[0]
    out = tmp_path / "attr"
    assert main(["attribute", "--method", "attribution", "--checkpoint", str(ldm_run[0]), "--data", str(dicom),
                 "--finding", "effusion", "--output", f"file://{out}", "--set", "attribution.steps=4",
                 "--set", "attribution.strength=0.5"]) == 0
    record = json.loads(next(out.glob("*.json")).read_text())
    assert record["method"] == "attribution" and record["probability"] is None and record["map_scale"] > 0


def test_the_latent_loss_weights_rows_linearly():
    """Prior preservation's weights: [1, 1] is the plain loss, [2, 2] twice it, [1, 0] + [0, 1] = [1, 1]."""
    from cxrray.families.ldm.task import loss

    cfg = get_family("ldm").preset("tiny", image_size=16, latent_size=4, base_channels=16, channel_mult=(1, 2),
                                   attention_resolutions=(2,), head_channels=8, norm_groups=8, layers_per_block=1,
                                   text=False)
    torch.manual_seed(0)
    model = get_family("ldm").build(cfg).requires_grad_(False)
    batch = {"latent": torch.randn(2, 3, 4, 4)}
    value = lambda w=None: float(loss(model, {**batch, **({"weight": torch.tensor(w)} if w else {})},  # noqa: E731
                                      torch.Generator().manual_seed(3)))
    plain = value()
    assert value([1.0, 1.0]) == pytest.approx(plain, rel=1e-6)
    assert value([2.0, 2.0]) == pytest.approx(2 * plain, rel=1e-6)
    assert value([1.0, 0.0]) + value([0.0, 1.0]) == pytest.approx(plain, rel=1e-6)
    assert value([1.0, 0.0]) != pytest.approx(value([0.0, 1.0]))


def test_dreambooth_fine_tunes_stage_by_stage_with_prior_preservation_and_reruns_nothing(job, ldm_run, tmp_path, capsys):
    """Issue 29 §2, `cxrray dreambooth`: the base model's prior samples (provenance, weight lambda, the prior
    prompt's ids) sit beside each stage's instances (the train split's normal, then effusion-positive, images
    with the stage prompt's ids); each stage trains on Ray Train from the previous one, the autoencoder and
    tokenizer carried over, and learns its prompt (held-out instance loss falls); a rerun writes nothing."""
    from PIL import Image

    from cxrray.data.shards import read_tar

    out = tmp_path / "db"
    stages = ('[{"name": "normal", "prompt": "Normal chest radiograph.", "steps": 6}, '
              '{"name": "effusion", "prompt": "Pleural effusion.", "finding": "effusion", "steps": 3}]')
    sets = [f"tracking.uri=sqlite:///{tmp_path}/mlflow.db", "dreambooth.prior_images=16", "dreambooth.prior_steps=3",
            "dreambooth.prior_weight=0.5", "dreambooth.instance_images=24", "dreambooth.lr=0.002",
            f"dreambooth.stages={stages}", "train.eval_images=4", "train.sample_steps=3"]
    args = ["dreambooth", "--checkpoint", str(ldm_run[0]), "--data", f"file://{job['out']}", "--output", f"file://{out}",
            *[a for s in sets for a in ("--set", s)]]
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    record = json.loads((out / "dreambooth.json").read_text())
    tokenizer = load_tokenizer((job["out"] / "tokenizer.json").read_text(), 64)
    ids = lambda text: tokenizer.encode(text).ids  # noqa: E731
    load = lambda b: np.load(io.BytesIO(b), allow_pickle=False)  # noqa: E731
    source = [s for tar in sorted(job["out"].glob("*.tar")) for s in read_tar(tar.read_bytes(), extras=True)]
    findings = read_manifest(f"file://{job['out']}")["label_vocabulary"]
    priors = []
    for stage, want in (("normal", lambda m: all(v == 0 for v in m["labels"])), ("effusion", lambda m: m["labels"][findings.index("effusion")] == 1)):
        prompt = "Normal chest radiograph." if stage == "normal" else "Pleural effusion."
        rows = [r for tar in sorted((out / "data" / stage).glob("instances-*.tar")) for r in read_tar(tar.read_bytes(), extras=True)]
        train = [r for r in rows if r[2]["split"] == "train"]
        val = [r for r in rows if r[2]["split"] == "val"]
        assert len(train) == min(24, sum(1 for s in source if s[2]["split"] == "train" and want(s[2])))
        assert len(val) == sum(1 for s in source if s[2]["split"] == "val" and want(s[2]))
        latents = {s[0]: s[3]["latent.npy"] for s in source}
        for key, _, meta, extras in rows:
            assert want(meta) and extras["latent.npy"] == latents[key]
            assert list(load(extras["tokens.npy"])) == ids(prompt) and load(extras["weight.npy"]).item() == 1.0
        prior = read_tar((out / "data" / stage / "prior-000000.tar").read_bytes(), extras=True)
        assert len(prior) == 16
        balanced = np.float32(0.5 * len(train) / 16)  # lambda x N_instances / N_prior: DreamBooth's ratio of the terms
        for key, png, meta, extras in prior:
            assert list(load(extras["tokens.npy"])) == ids("Chest radiograph.") and load(extras["weight.npy"]).item() == balanced
            assert Image.open(io.BytesIO(png)).text["cxrray:provenance"].startswith("SYNTHETIC") and meta["split"] == "train"
        priors.append([p[3]["latent.npy"] for p in prior])
    assert priors[0] == priors[1], "one prior, drawn once from the base model, beside every stage"
    normal, effusion = record["stages"]
    assert normal["init_from"] == record["base"]["checkpoint"]
    assert effusion["init_from"] == normal["checkpoint"] and printed["checkpoint"] == effusion["checkpoint"] == record["checkpoint"]
    from cxrray.io.checkpoint import read_state, read_weights

    state, base_state = read_state(record["checkpoint"]), read_state(record["base"]["checkpoint"])
    assert state["model"]["init_from"] == normal["checkpoint"]
    assert state["model"]["tokenizer"] == base_state["model"]["tokenizer"] and state["model"]["vae"] == base_state["model"]["vae"]
    tuned, before = read_weights(record["checkpoint"]), read_weights(record["base"]["checkpoint"])
    assert all(torch.equal(tuned[k], v) for k, v in before.items() if k.startswith("vae."))
    assert any(not torch.equal(tuned[k], v) for k, v in before.items() if k.startswith("text."))  # the encoder trains too
    # the known answer: each stage learns its prompt on images it did not train on (val, when there are any)
    for stage in (normal, effusion):
        assert stage["loss"]["instances_after"] < stage["loss"]["instances_before"], stage
    assert normal["loss"]["held_out"]
    # a rerun: every shard and run reused
    written = {p: p.stat().st_mtime_ns for p in (out / "data").rglob("*.tar")}
    assert main(args) == 0
    assert {p: p.stat().st_mtime_ns for p in (out / "data").rglob("*.tar")} == written
    assert json.loads((out / "dreambooth.json").read_text())["checkpoint"] == record["checkpoint"]
    # the second stage's schedule changed: it alone trains anew (from the same first stage), in a run of its own
    longer = stages.replace('"steps": 3', '"steps": 4')
    assert main([*args, "--set", f"dreambooth.stages={longer}"]) == 0
    again = json.loads((out / "dreambooth.json").read_text())
    assert again["stages"][0]["checkpoint"] == normal["checkpoint"]
    assert again["stages"][1]["init_from"] == normal["checkpoint"] and again["stages"][1]["images_shown"] == 32
    assert again["checkpoint"] != record["checkpoint"]
    # refused before any work, with the reason
    for bad, why in (('dreambooth.stages=[{"name": "x", "prompt": "肺", "steps": 1}]', "vocabulary"),
                     ('dreambooth.stages=[{"name": "x", "prompt": "Normal.", "finding": "tumour", "steps": 1}]', "tumour")):
        capsys.readouterr()
        assert main([*args, "--set", bad]) == 2
        assert why in capsys.readouterr().err


def test_evaluate_generation_writes_the_papers_measures_beside_ours(job, ldm_run, tmp_path, capsys):
    """`cxrray evaluate generation --ldm --sr --sr-base --data --output`: Table 2 rows per stage, FID / KID in the
    judge's space, MS-SSIM, conditioning per label, device removal against the device-free phantom; MLflow run."""
    from cxrray.data.imaging import model_input  # noqa: F401 (the phantoms go through ingest's own path)
    from cxrray.eval.reconstruction import reconstruction_metrics
    from cxrray.families.sr.network import resize
    from cxrray.pipelines.cheff.cascade import Cheff
    from cxrray.pipelines.cheff.evaluate import RealSet, device_phantoms
    from cxrray.pipelines.settings import GenerationEvalConfig

    torch.manual_seed(0)
    sr_cfg = get_family("sr").preset("tiny", image_size=32, low_size=16, base_channels=16, channel_mult=[1, 2],
                                      attention_resolutions=[], norm_groups=8, layers_per_block=1)
    sr = write_checkpoint(get_family("sr").build(sr_cfg), tmp_path / "sr", images_shown=0)
    out = tmp_path / "eval"
    sets = [*EVAL, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
    args = ["evaluate", "generation", "--ldm", str(ldm_run[0]), "--sr", str(sr), "--sr-base", str(sr),
            "--data", f"file://{job['data']}", "--output", f"file://{out}", *[a for x in sets for a in ("--set", x)]]
    assert main(args) == 0
    result = json.loads((out / "generation_eval.json").read_text())
    assert {p.name for p in out.iterdir()} >= {"report.html", "samples.png", "inpainting.png", "outpainting.png"}
    stages = [r["stage"] for r in result["table2"]]
    assert stages == ["autoencoder alone: D(E(x))", "SR alone (as given, from 0.5 T): SR(x)",
                      "SR alone (base, from 0.5 T): SR(x)", "cascade: SR(D(E(x))), from 0.5 T", "bicubic upscaling of x"]
    test = RealSet(f"file://{job['data']}", "test", 32, GenerationEvalConfig().laterality, limit=16)
    cheff = Cheff.load(str(ldm_run[0]))
    low = resize(test.images, 16)
    direct = reconstruction_metrics(low, cheff.reconstruct(low))
    assert result["table2"][0]["psnr"] == pytest.approx(direct["psnr"], abs=1e-4)  # measured on the test images
    assert result["table2"][1]["psnr"] == pytest.approx(result["table2"][2]["psnr"], abs=1e-4)  # same SR twice
    assert result["quality"]["judge_features"]["synthetic_vs_test"]["fid"] > 0
    assert 0 < result["diversity"]["real_test"]["ms_ssim"] < 1 and result["diversity"]["real_test"]["scales"] == 3
    judged = [r for r in result["conditioning"] if "auroc_generated" in r]
    assert judged and all(0 <= r["auroc_generated"] <= 1 and 0 <= r["prevalence_real"] <= 1 for r in judged)
    removal = result["device_removal"]
    assert removal["cases"] == 4 and 0 < removal["mask_fraction"] < 0.5 and removal["error_inside_original"] > 0.02
    # laterality: a row per lateral label; the sided prompts are the test reports' own sides
    with_report = [i for i, r in enumerate(test.reports) if r][:16]
    assert [r["label"] for r in result["laterality"]] == list(GenerationEvalConfig().laterality)
    for j, row in enumerate(result["laterality"]):
        sides = test.sides[with_report, j]
        assert (row["prompts_right"], row["prompts_left"]) == (int((sides == 1).sum()), int((sides == 0).sum()))
        assert "note" in row or (0 <= row["accuracy_generated"] <= 1 and 0 <= row["accuracy_real"] <= 1)
        if "note" not in row:  # the always-the-commoner-side baseline on the same prompts
            commoner = 1.0 if row["train_right"] >= row["train_left"] else 0.0
            assert row["accuracy_majority"] == pytest.approx(float((sides[~np.isnan(sides)] == commoner).mean()))
    assert sum(r["prompts_right"] + r["prompts_left"] for r in result["laterality"]) > 0
    # the latent model judged alone: its decoded samples, its latents' spread, the guidance sweep
    ldm = result["ldm"]
    assert ldm["size"] == 16 and [r["label"] for r in ldm["conditioning"]] == [r["label"] for r in result["conditioning"]]
    every_test = RealSet(f"file://{job['data']}", "test", 32, GenerationEvalConfig().laterality)
    real_latents = cheff.ldm.model.latents(resize(every_test.images, 16))
    assert ldm["latent_std"]["real_test"] == pytest.approx(float(real_latents.std()), rel=1e-4)
    assert ldm["latent_std"]["ratio"] == pytest.approx(ldm["latent_std"]["sampled_conditional"] / ldm["latent_std"]["real_test"])
    assert [r["guidance"] for r in ldm["guidance_sweep"]] == [1.0, 3.0] and all(r["fid"] > 0 for r in ldm["guidance_sweep"])
    assert ldm["quality"]["train_vs_test"] == result["quality"]["judge_features"]["train_vs_test"]  # one reference
    # the SR start sweep: bicubic, then each start with the SR alone's PSNR and the cascade's FID
    sweep = result["sr_start_sweep"]
    assert [r["start"] for r in sweep] == ["bicubic", 0.5, 1.0] and all("cascade_fid" in r for r in sweep[1:])
    assert sweep[0]["psnr"] == pytest.approx(result["table2"][-1]["psnr"], abs=1e-4)  # bicubic, measured once more
    # where each stage errs along its schedule: the eps error's amplification in the clean estimate
    for stage, ts in (("ldm", [50, 250, 500, 750, 894, 980]), ("sr", [100, 500, 1000, 1500, 1900, 1980])):
        rows = result["denoising"][stage]
        assert [r["t"] for r in rows] == ts
        assert all(r["amplification"] == pytest.approx(((1 - r["alpha_bar"]) / r["alpha_bar"]) ** 0.5, rel=1e-4) for r in rows)
    assert result["denoising"]["ldm"][-1]["amplification"] > 400  # Cheff's 0.0295 at t = 980
    # the device-free phantom is the original outside the device's (grown) mask, and differs inside it
    cases = device_phantoms(GenerationEvalConfig(inpaint_cases=4), 16, "pad")
    for case in cases:
        outside = np.abs(case["image"] - case["clean"])[~case["mask"]]
        assert outside.max() < 0.05 and np.abs(case["image"] - case["clean"])[case["mask"]].mean() > 0.02
    assert main([*args[:3], str(sr), *args[4:]]) == 2
    assert "latent diffusion model" in capsys.readouterr().err


def test_latent_diffusion_refuses_data_it_cannot_learn_from(job, first_run, tmp_path, capsys):
    base = ["pretrain", "--output", f"file://{tmp_path / 'x'}", "--images", "8", *[a for s in LDM for a in ("--set", s)]]
    assert main([*base, "--data", f"file://{job['out']}"]) == 2
    assert "model.vae_checkpoint is required" in capsys.readouterr().err
    with_vae = [*base, "--set", f"model.vae_checkpoint={job['root'] / 'vae'}"]
    assert main([*with_vae, "--data", f"file://{job['data']}"]) == 2  # image shards: no tokenised reports
    assert "set model.text=false" in capsys.readouterr().err


def test_the_schedule_leaves_signal_at_T_as_the_paper_says():
    """Cheff: with beta_end 0.0195 structure survives in z_T; 0.0295 removes it. Measured: the regression
    slope of z_T on z_0 over noise draws, against sqrt(alpha_bar_T) of each schedule."""
    from cxrray.diffusion.schedule import make_scheduler

    z0 = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)).expand(4096, -1, -1, -1)
    noise = torch.randn(z0.shape, generator=torch.Generator().manual_seed(1))
    slopes = {}
    for end in (0.0195, 0.0295):
        sched = make_scheduler("ddpm", beta_schedule="scaled_linear", beta_start=0.0015, beta_end=end)
        z_T = sched.add_noise(z0, noise, torch.full((4096,), 999))
        slopes[end] = float((z_T * z0).sum() / (z0 * z0).sum())
        assert abs(slopes[end] - float(sched.alphas_cumprod[-1].sqrt())) < 1.5e-3  # what the schedule implies
    assert slopes[0.0195] > 0.010 and abs(slopes[0.0295]) < 0.004  # measured: 0.0119 vs 0.0018
    assert get_family("ldm").preset("paper").beta_end == 0.0295 == get_family("ldm").preset("tiny").beta_end


SR = ["model.family=sr", "model.image_size=32", "model.low_size=16", "model.base_channels=16",
      "model.channel_mult=[1,2]", "model.attention_resolutions=[]", "model.norm_groups=8", "model.layers_per_block=1",
      "train.global_batch=8", "train.cpus_per_worker=0.5", "train.log_every=8", "train.eval_images=4",
      "train.sample_steps=3", "train.checkpoint_every=16", "train.strategy=deepspeed", "train.zero_stage=1"]


@pytest.mark.slow  # two Ray Train runs (~100 s): the model itself is in the family contract test
def test_super_resolution_trains_on_bicubic_pairs_then_fine_tunes_on_the_autoencoders_outputs(job, tmp_path):
    """Cheff's SR3 schedule of training: a base run on bicubic pairs, then `model.degrade=autoencoder` from
    `model.init_from` (the base weights copied in) with the frozen autoencoder making D(E(x))."""
    from safetensors.torch import load_file

    def run(name, *extra):
        sets = [*SR, *extra, f"tracking.uri=sqlite:///{tmp_path}/mlflow.db"]
        assert main(["pretrain", "--data", f"file://{job['data']}", "--output", f"file://{tmp_path / name}",
                     "--images", "16", *[a for s in sets for a in ("--set", s)]]) == 0
        folder = sorted((tmp_path / name).glob("ray/*/checkpoint-*"))[-1]
        return folder, json.loads((folder / "state.json").read_text())

    base, base_state = run("base")
    assert base_state["model"]["degrade"] == "bicubic" and base_state["model"]["timesteps"] == 2000
    assert base_state["metrics"]["sr_psnr"] > 0 and base_state["metrics"]["bicubic_psnr"] > 0
    tuned, state = run("tuned", "model.degrade=autoencoder", f"model.vae_checkpoint={job['root'] / 'vae'}",
                       f"model.init_from={tmp_path / 'base'}", "train.lr=1e-9")
    assert state["model"]["vae"]["image_size"] == 16
    weights, start = load_file(tuned / "model.safetensors"), load_file(base / "ema.safetensors")
    assert all(torch.equal(weights[f"vae.{k}"], v) for k, v in job["vae"].state_dict().items())
    # at lr 1e-9 the fine-tune's U-Net is still the base model's EMA: it started from it
    assert all(torch.allclose(weights[k], start[k], atol=1e-6) for k in start if k.startswith("unet."))
