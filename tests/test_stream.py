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
from cxrray.data.stream import stream

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
    assert covs.shape[1] == 3 and np.all((covs > 0.3) & (covs < 9))  # echo measurements in cm


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
