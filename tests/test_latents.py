"""The latents job on real phantoms with planted identifiers in every report: latent shards that the stream
reads, a WordPiece tokenizer trained on the de-identified training reports, resumption that writes each
shard once, and no planted identifier in any byte written (shards, tokenizer vocabulary, logs)."""
from __future__ import annotations

import io
import json
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
