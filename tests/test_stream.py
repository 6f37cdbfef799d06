"""Streaming reader: decoded batches, split filtering, refusal of foreign members, Ray Train feed."""
from __future__ import annotations

import io
import json
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np
import pytest
import ray.cloudpickle

from cxrray.cli import main
from cxrray.data.phantom import PhantomConfig, generate
from cxrray.data.shards import read_manifest
from cxrray.data.stream import head, stream

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the train loop below runs on workers


@pytest.fixture(scope="module")
def shards(ray_local, tmp_path_factory):
    root = tmp_path_factory.mktemp("stream")
    generate(48, root / "in", PhantomConfig(size=64, seed=11))
    out = root / "out"
    assert main(["ingest", "--input", str(root / "in"), "--labels", str(root / "in" / "labels.csv"),
                 "--output", str(out), "--size", "32", "--set", "ingest.shard_samples=10"]) == 0
    return out


def test_batches_are_model_ready_and_split_filtered(shards):
    manifest = read_manifest(str(shards))
    for split, counts in manifest["splits"].items():
        batches = list(stream(str(shards), split, batch_size=16).iter_batches(batch_size=None))
        keys = np.concatenate([b["key"] for b in batches])
        assert len(keys) == len(set(keys)) == counts["images"]
    batch = next(iter(stream(str(shards), batch_size=16).iter_batches(batch_size=None)))
    image, labels, covs = batch["image"], batch["labels"], batch["covariates"]
    assert image.dtype == np.float32 and image.shape[1:] == (1, 32, 32)
    assert image.min() >= -1.0 and image.max() <= 1.0 and image.min() == -1.0
    assert labels.shape[1] == len(manifest["label_vocabulary"]) and set(np.unique(labels)) <= {0.0, 1.0}
    assert manifest["covariates"] == ["ctr", "ivsd", "lvidd", "lvpwd"] and covs.shape[1] == 4
    assert np.all((covs[:, 0] > 0.3) & (covs[:, 0] < 0.8))  # cardiothoracic ratio
    assert np.all((covs[:, 1:] > 0.3) & (covs[:, 1:] < 9))  # echo measurements in cm


def test_shards_split_into_sample_ranges_yield_every_sample_once_and_unchanged(shards):
    """Batches smaller than a shard split each shard over several read tasks: every key exactly once, each
    image and its labels as `head` reads them in this process."""
    from cxrray.data.stream import ShardRanges
    from cxrray.data.storage import Storage

    manifest = read_manifest(str(shards))
    store = Storage(str(shards))
    tasks = ShardRanges(store, manifest["shards"], 3, {"split": None, "covariates": [], "with_keys": True,
                                                      "text": False}, False).get_read_tasks(8)
    assert len(tasks) > len(manifest["shards"])  # 48 samples in 10-sample shards, 6 per task: split
    batches = list(stream(str(shards), batch_size=3).iter_batches(batch_size=None))
    keys = np.concatenate([b["key"] for b in batches])
    assert len(keys) == len(set(keys)) == manifest["samples"]
    streamed = {k: (img, lab) for b in batches for k, img, lab in zip(b["key"], b["image"], b["labels"])}
    direct = head(str(shards), None, manifest["samples"])
    assert set(direct["key"]) == set(streamed)
    for k, img, lab in zip(direct["key"], direct["image"], direct["labels"]):
        assert np.array_equal(streamed[k][0], img) and np.array_equal(streamed[k][1], lab, equal_nan=True)


def test_the_tar_reader_checks_header_checksums_and_reads_pax_names(tmp_path):
    from cxrray.data.tar import tar_files
    from cxrray.errors import InputError

    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in (("a" * 120 + ".json", b"{}"), ("k.png", b"x" * 700)):  # a name only pax can hold
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 0.5  # a float mtime: a pax header, as webdataset writes
            tar.addfile(info, io.BytesIO(data))
    raw = buf.getvalue()
    f = io.BytesIO(raw)
    got = []
    for name, size in tar_files(f, "t.tar"):
        got.append((name, f.read(size)))
    assert got == [("a" * 120 + ".json", b"{}"), ("k.png", b"x" * 700)]
    corrupt = bytearray(raw)
    corrupt[1024 + 130] ^= 1  # the first file's own header (after its pax header), size field
    with pytest.raises(InputError, match="checksum"):
        list(tar_files(io.BytesIO(bytes(corrupt)), "t.tar"))


def test_truncated_or_malformed_tars_are_refused_not_read_short(shards, tmp_path):
    """A shard cut anywhere, a pax record that would loop a naive parser, or fewer samples than the manifest
    counts: an InputError naming the shard, never a shorter stream."""
    from cxrray.data.storage import Storage
    from cxrray.data.shards import read_tar
    from cxrray.data.stream import read_range
    from cxrray.data.tar import tar_files
    from cxrray.errors import InputError

    shard = read_manifest(str(shards))["shards"][0]
    raw = (shards / shard["name"]).read_bytes()
    kwargs = {"split": None, "covariates": [], "with_keys": True, "text": False}
    store = Storage(str(tmp_path))
    for cut in (700, 1024 + 512 + 100, len(raw) // 2):  # in a header, in a member, anywhere
        (tmp_path / "cut.tar").write_bytes(raw[:cut])
        with pytest.raises(InputError, match="truncated|samples"):
            list(read_range(store.fs, store.path("cut.tar"), 0, shard["samples"], True, 4, kwargs))
        with pytest.raises(InputError, match="truncated"):  # the whole-shard reader shares the parser
            read_tar(raw[:cut], "cut.tar")
    (tmp_path / "whole.tar").write_bytes(raw)
    n = shard["samples"]
    with pytest.raises(InputError, match=f"{n} samples, the manifest says at least {n + 1}"):
        list(read_range(store.fs, store.path("whole.tar"), 0, n + 1, True, 4, kwargs))
    pax = bytearray(tarfile.TarInfo("x").tobuf())
    pax[156:157] = b"x"
    pax[124:136] = b"%011o\0" % 9
    pax[148:156] = b"        "
    pax[148:156] = b"%06o\0 " % sum(pax)
    with pytest.raises(InputError, match="malformed pax record"):
        list(tar_files(io.BytesIO(bytes(pax) + b"0 a=b\n\n".ljust(512, b"\0") + bytes(1024)), "p.tar"))


def test_a_range_with_no_rows_of_the_split_yields_nothing(shards):
    from cxrray.data.storage import Storage
    from cxrray.data.stream import read_range

    manifest = read_manifest(str(shards))
    store = Storage(str(shards))
    shard = next(s for s in manifest["shards"] if set(s["splits"]) == {"train"})
    kwargs = {"split": "test", "covariates": manifest["covariates"], "with_keys": True, "text": False}
    assert list(read_range(store.fs, store.path(shard["name"]), 0, shard["samples"], True, 3, kwargs)) == []


def test_foreign_members_are_refused_never_unpickled(ray_local, shards, tmp_path):
    import pickle
    import shutil

    evil = tmp_path / "evil"
    shutil.copytree(shards, evil)
    name = read_manifest(str(evil))["shards"][0]["name"]
    with tarfile.open(evil / name, "a") as tar:
        payload = pickle.dumps({"boom": 1})
        info = tarfile.TarInfo("zzzz.pkl")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    with pytest.raises(Exception, match="refusing shard member zzzz.pkl"):
        stream(str(evil), batch_size=8).take_all()


def _add_members(folder: Path, members: dict) -> None:
    """Rewrite every shard with `{key}.{ext}` members (bytes, or a function of the key) added to each
    sample, members of one sample adjacent as WebDataset requires."""
    for shard in read_manifest(str(folder))["shards"]:
        with tarfile.open(folder / shard["name"]) as tar:
            entries = [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
        keys = list(dict.fromkeys(name.split(".")[0] for name, _ in entries))
        for key in keys:
            entries += [(f"{key}.{ext}", make(key) if callable(make) else make) for ext, make in members.items()]
        with tarfile.open(folder / shard["name"], "w") as tar:
            for name, data in sorted(entries, key=lambda e: keys.index(e[0].split(".")[0])):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_extra_members_pass_through_and_report_text_reaches_the_batch(ray_local, shards, tmp_path):
    import shutil

    from PIL import Image

    def mask(key: str) -> bytes:  # an 8-bit label mask whose value encodes the key
        buf = io.BytesIO()
        Image.fromarray(np.full((32, 32), sum(key.encode()) % 200, np.uint8)).save(buf, format="PNG")
        return buf.getvalue()

    def features(key: str) -> bytes:
        buf = io.BytesIO()
        np.save(buf, np.arange(4, dtype=np.float64) + len(key), allow_pickle=False)
        return buf.getvalue()

    extra = tmp_path / "extra"
    shutil.copytree(shards, extra)
    _add_members(extra, {"mask.png": mask, "feat.npy": features, "note.txt": lambda k: f"note for {k}".encode()})
    rows = 0
    for batch in stream(str(extra), batch_size=16).iter_batches(batch_size=None):
        for i, key in enumerate(batch["key"]):
            assert np.all(batch["mask"][i] == sum(key.encode()) % 200)  # raw stored values, not rescaled
            assert batch["feat"][i].tolist() == (np.arange(4) + len(key)).tolist()
            assert batch["note"][i] == f"note for {key}"
            assert isinstance(batch["report"][i], str) and len(batch["report"][i]) > 20  # phantom report text
        rows += len(batch["key"])
    assert rows == read_manifest(str(extra))["samples"]
    tensors = next(iter(stream(str(extra), batch_size=8, with_keys=False).iter_torch_batches(batch_size=None)))
    assert set(tensors) >= {"image", "mask", "feat"} and "note" not in tensors and "report" not in tensors
    _head_equals_stream(extra)


def _head_equals_stream(folder: Path) -> None:
    """`head` (in-process) gives the stream's columns and values for the first rows of a split in shard order."""
    manifest = read_manifest(str(folder))
    split = "train"
    expected_keys = [json.loads(m)["key"] for s in manifest["shards"] if s["splits"].get(split)
                     for m in _metas(folder / s["name"]) if json.loads(m)["split"] == split][:13]
    rows = {}
    for batch in stream(str(folder), split, batch_size=16).iter_batches(batch_size=None):
        for i, key in enumerate(batch["key"]):
            rows[key] = {c: batch[c][i] for c in batch}
    got = head(str(folder), split, 13)
    assert got["key"].tolist() == expected_keys and len(expected_keys) == 13
    assert set(got) == set(next(iter(rows.values())))
    for i, key in enumerate(got["key"]):
        for column, value in rows[key].items():
            np.testing.assert_equal(np.asarray(got[column][i]), np.asarray(value), err_msg=f"{key} {column}")
    assert set(head(str(folder), split, 4, with_keys=False, text=True)) == set(got) - {"key"}
    assert len(head(str(folder), split, 10 ** 6)["image"]) == manifest["splits"][split]["images"]


def _metas(tar_path: Path) -> list[str]:
    with tarfile.open(tar_path) as tar:
        return [tar.extractfile(m).read().decode() for m in tar if m.isfile() and m.name.endswith(".json")]


@pytest.mark.parametrize("ext, payload, reason", [
    ("feat.npy", lambda: _npy_object(), "not a valid .npy"),  # allow_pickle=False refuses object arrays
    ("image.png", lambda: b"x", "refusing shard member"),  # may not shadow the stream's own columns
    ("feat.pkl", lambda: b"x", "refusing shard member"),
])
def test_unsafe_or_unknown_extra_members_are_refused(ray_local, shards, tmp_path, ext, payload, reason):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    _add_members(bad, {ext: payload()})
    with pytest.raises(Exception, match=reason):
        stream(str(bad), batch_size=8).take_all()


def _npy_object() -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.array([{"boom": 1}], dtype=object), allow_pickle=True)
    return buf.getvalue()


def count_rows_loop(config):
    """Ray Train worker: consume the stream as torch batches; all-reduce the counts."""
    import torch
    import torch.distributed as dist

    import ray.train

    rows, pixel_sum = 0, 0.0
    for batch in ray.train.get_dataset_shard("train").iter_torch_batches(batch_size=8):
        assert batch["image"].dtype == torch.float32 and batch["image"].shape[1:] == (1, 32, 32)
        rows += batch["image"].shape[0]
        pixel_sum += float(batch["image"].sum())
    totals = torch.tensor([rows, pixel_sum], dtype=torch.float64)
    dist.all_reduce(totals)
    metrics = {"rows": int(totals[0]), "pixel_sum": float(totals[1]), "world": dist.get_world_size()}
    with tempfile.TemporaryDirectory() as tmp:  # Train V2 keeps metrics only with a checkpoint
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            (Path(tmp) / "counts.json").write_text(json.dumps(metrics))
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


@pytest.mark.slow  # ~40 s; every pretraining test streams shards into Ray Train workers (the suite is held to 20 min)
def test_stream_feeds_ray_train_workers(shards, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    manifest = read_manifest(str(shards))
    expected = manifest["splits"]["train"]["images"]
    reference = sum(float(b["image"].sum()) for b in stream(str(shards), "train").iter_batches(batch_size=None))
    trainer = TorchTrainer(
        count_rows_loop,
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 0.5}),
        datasets={"train": stream(str(shards), "train", with_keys=False)},
        run_config=RunConfig(storage_path=str(tmp_path), name="stream"),
    )
    result = trainer.fit()
    assert result.error is None
    with result.checkpoint.as_directory() as folder:
        assert json.loads((Path(folder) / "counts.json").read_text()) == result.metrics
    # Ray Train splits datasets equally across workers, dropping at most world_size - 1 rows per epoch
    assert result.metrics["world"] == 2 and result.metrics["rows"] == 2 * (expected // 2)
    mean_image = reference / (expected * 32 * 32)
    assert result.metrics["pixel_sum"] / (result.metrics["rows"] * 32 * 32) == pytest.approx(mean_image, abs=0.05)
