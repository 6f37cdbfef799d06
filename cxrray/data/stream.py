"""Stream shards into training: Ray Data `read_webdataset` with this project's own decoder.

The decoder accepts `.png` (16-bit) and `.json` members plus the extra members of `members.py`
(NAME.png / NAME.npy without pickle / NAME.txt) and refuses anything else, so nothing is ever
unpickled. Batches (`batch_format="numpy"`, or torch via `iter_torch_batches` when `with_keys=False`
and `text=False`) hold:

| column     | dtype / shape                 | meaning                                   |
|------------|-------------------------------|-------------------------------------------|
| image      | float32 [B, 1, S, S], [-1, 1] | MONOCHROME2 radiograph                    |
| labels     | float32 [B, F]                | 1 / 0 / NaN, F = manifest label vocabulary |
| covariates | float32 [B, C]                | manifest covariates order, NaN if missing  |
| <name>     | float32 [B]                   | each covariate by name (ivsd ...), NaN    |
| age        | float32 [B]                   | years (90 = 90 or older), NaN if unknown   |
| sex        | float32 [B]                   | 1 = M, 0 = F, NaN if unknown               |
| key        | str [B]                       | sample key (unless `with_keys=False`)      |
| report     | str [B]                       | de-identified report text, "" if none (`text`) |
| <extra>    | float32 [B, ...] / str [B]    | each extra member by name (text: `text`)   |

The dataset is lazy and streamed: read tasks decode as the consumer pulls batches. A read task covers a
range of one shard's samples (`ShardRanges`), so read parallelism is not bounded by the shard count: a
shard is split when there are fewer shards than ~4 tasks per CPU. Each task streams its shard from the
start and stops after its range (a shard split in k reads about (k+1)/2 of its bytes); the last range of
a shard reads to the end and checks every member. Each task yields model-ready blocks of `batch_size` rows
directly: one Ray Data operator, decoding in batches, no per-sample rows between operators.
"""
from __future__ import annotations

import json
import math
import random
from functools import partial
from typing import Any, Iterator

import numpy as np
import ray
from ray.data.block import BlockAccessor, BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from cxrray.data.imaging import decode_png16, png16_to_model
from cxrray.data.members import decode_extra, split_member
from cxrray.data.shards import read_manifest
from cxrray.data.storage import Storage
from cxrray.data.tar import read_exact, skip, tar_files
from cxrray.runtime import ensure_ray
from cxrray.errors import InputError

SEX_CODE = {"M": 1.0, "F": 0.0}


def decode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Ray `read_webdataset` decoder: PNG -> uint16 array, JSON kept as text, extra members decoded by
    `members.decode_extra`; any other member raises."""
    out = {"__key__": sample["__key__"]}
    for ext, value in sample.items():
        if ext.startswith("__"):
            continue
        where = f"{sample['__key__']}.{ext}"
        name, kind = split_member(ext, where)
        if ext == "png":
            out["png"] = decode_png16(value)
        elif ext == "json":
            out["json"] = value.decode("utf-8") if isinstance(value, bytes) else value
        else:
            out[ext] = decode_extra(kind, value, where)
    return out


def to_batch(batch: dict[str, np.ndarray], split: str | None, covariates: list[str],
             with_keys: bool = True, text: bool = True) -> dict[str, np.ndarray]:
    """Decoded rows -> model-ready numpy batch (see module docstring); rows of other splits dropped."""
    metas = [json.loads(m) for m in batch["json"]]
    keep = [i for i, m in enumerate(metas) if split is None or m["split"] == split]
    images = np.stack([batch["png"][i] for i in keep]) if keep else np.zeros((0, 1, 1), np.uint16)
    labels = [[np.nan if v is None else v for v in metas[i]["labels"]] for i in keep]
    covs = [[_num(metas[i]["covariates"].get(c)) for c in covariates] for i in keep]
    out = {
        "image": png16_to_model(images)[:, None],
        "labels": np.asarray(labels, dtype=np.float32).reshape(len(keep), -1),
        "covariates": np.asarray(covs, dtype=np.float32).reshape(len(keep), len(covariates)),
    }
    out.update({name: out["covariates"][:, j] for j, name in enumerate(covariates)})
    out["age"] = np.asarray([_num(metas[i].get("age")) for i in keep], dtype=np.float32)
    out["sex"] = np.asarray([SEX_CODE.get(metas[i].get("sex"), np.nan) for i in keep], dtype=np.float32)
    if with_keys:
        out["key"] = np.asarray([metas[i]["key"] for i in keep], dtype=object)
    if text:
        out["report"] = np.asarray([metas[i].get("report") or "" for i in keep], dtype=object)
    for ext in sorted(e for e in batch if e not in ("png", "json") and not e.startswith("__")):
        name, kind = ext.rpartition(".")[0], ext.rpartition(".")[2]
        values = [batch[ext][i] for i in keep]
        if kind == "txt":
            if text:
                out[name] = np.asarray(values, dtype=object)
            continue
        shapes = {np.shape(v) for v in values}
        if len(shapes) > 1:
            raise InputError(f"extra member {ext!r} has different shapes within one batch: {sorted(shapes)[:3]}")
        out[name] = np.stack(values).astype(np.float32) if values else np.zeros((0,), np.float32)
    return out


def _columns(samples: list[dict]) -> dict[str, np.ndarray]:
    """Decoded samples -> the {member: object array} batch `to_batch` takes."""
    return {c: np.asarray([s[c] for s in samples] + [None], dtype=object)[:-1] for c in samples[0]}


def _num(value) -> float:
    return np.nan if value is None else float(value)


def head(data_uri: str, split: str | None, n: int, *, with_keys: bool = True, text: bool | None = None
         ) -> dict[str, np.ndarray]:
    """The first `n` rows of `split` in shard order (fewer if the split holds fewer), as one batch of the
    same columns `stream` gives, read in this process: a few evaluation images without starting a Ray Data
    pipeline (~10 s of tasks and workers on 2 cores for four images)."""
    from cxrray.data.shards import read_tar

    store = Storage(data_uri)
    manifest = read_manifest(store)
    names = [s["name"] for s in manifest["shards"] if split is None or s["splits"].get(split)]
    if not names:
        raise InputError(f"{store.uri}: no shard holds split {split!r} (splits: {sorted(manifest['splits'])})")
    kwargs = {"split": split, "covariates": manifest["covariates"], "with_keys": with_keys,
              "text": with_keys if text is None else text}
    parts, rows = [], 0
    for name in names:
        samples = []
        for key, png, meta, extra in read_tar(store.read_bytes(name), store.url(name), extras=True):
            if rows + len(samples) >= n:
                break
            if split is None or meta["split"] == split:  # decode only the rows returned
                samples.append(decode_sample({"__key__": key, "png": png, "json": json.dumps(meta), **extra}))
        if samples:
            parts.append(to_batch(_columns(samples), **kwargs))
            rows += len(samples)
        if rows >= n:
            break
    if not parts:
        raise InputError(f"{store.uri}: no rows of split {split!r} to take (n = {n})")
    return {c: np.concatenate([p[c] for p in parts])[:n] for c in parts[0]}


def _tar_samples(fileobj, source: str, want) -> Iterator[tuple[int, dict]]:
    """(index, {"__key__", ext: bytes}) of a tar's samples in stored order, read as a stream; members of an
    index `want(index)` rejects are checked but not read. Every member's extension is checked (`split_member`)."""
    index, sample = -1, None
    for name, size in tar_files(fileobj, source):
        key, _, ext = name.partition(".")
        split_member(ext, f"{name} (in {source})")
        if sample is None or key != sample["__key__"]:
            if sample is not None:
                yield index, sample
            index, sample = index + 1, {"__key__": key}
        if want(index):
            sample[ext] = read_exact(fileobj, size, source)
        else:
            skip(fileobj, size, source)
    if sample is not None:
        yield index, sample


def _meta(sample: dict, source: str) -> dict:
    try:
        return json.loads(sample["json"])
    except ValueError:  # JSONDecodeError, UnicodeDecodeError
        raise InputError(f"{source}: sample {sample['__key__']!r} has a .json member that is not JSON") from None


def read_range(fs, path: str, first: int, stop: int, last: bool, rows: int, kwargs: dict) -> Iterator:
    """One read task: the rows of `kwargs["split"]` among samples [first, stop) of the shard at `path`, as
    model-ready blocks of up to `rows` rows (never an empty one). `last`: read to the end and refuse a shard
    holding more or fewer samples than `stop` (the manifest's count)."""
    split, kept, seen = kwargs["split"], [], first - 1
    batch_kwargs = {**kwargs, "split": None}  # filtered here, before the PNG is decoded
    with fs.open_input_stream(path) as f:
        for index, sample in _tar_samples(f, path, lambda i: first <= i < stop):
            if index >= stop:
                if not last:
                    break
                raise InputError(f"{path}: more samples than the manifest's {stop} (sample {sample['__key__']!r})")
            seen = index
            if index < first:
                continue
            if not {"png", "json"} <= set(sample):
                raise InputError(f"{path}: sample {sample['__key__']!r} lacks a .png or .json member")
            meta = _meta(sample, path)  # a corrupt .json is refused here, whatever the split
            if split is not None and meta.get("split") != split:
                continue
            kept.append(decode_sample(sample))
            if len(kept) == rows:
                yield BlockAccessor.batch_to_block(to_batch(_columns(kept), **batch_kwargs))
                kept = []
    if seen != stop - 1:  # a range ends at `stop` (the next sample or the archive's end): fewer is a short shard
        raise InputError(f"{path}: {seen + 1} samples, the manifest says at least {stop}")
    if kept:
        yield BlockAccessor.batch_to_block(to_batch(_columns(kept), **batch_kwargs))


class ShardRanges(Datasource):
    """Read tasks over ranges of samples of the manifest's shards (see the module docstring)."""

    def __init__(self, store: Storage, shards: list[dict], rows: int, kwargs: dict, shuffle: bool):
        super().__init__()
        self.fs, self.rows, self.kwargs, self.shuffle = store.fs, rows, kwargs, shuffle
        self.shards = [(store.path(s["name"]), s["samples"], s["bytes"]) for s in shards]

    def estimate_inmemory_data_size(self) -> int:
        return sum(size for _, _, size in self.shards)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None) -> list[ReadTask]:
        total = sum(n for _, n, _ in self.shards)
        per_task = max(self.rows, math.ceil(total / max(parallelism, 1)))
        tasks = []
        for path, n, size in self.shards:
            k = max(1, math.ceil(n / per_task))
            bounds = [round(i * n / k) for i in range(k + 1)]
            for i in range(k):
                first, stop = bounds[i], bounds[i + 1]
                tasks.append(ReadTask(partial(read_range, self.fs, path, first, stop, i == k - 1, self.rows, self.kwargs),
                                      BlockMetadata(num_rows=None, size_bytes=size * (stop - first) // max(n, 1),
                                                    input_files=[path], exec_stats=None)))
        if self.shuffle:
            random.shuffle(tasks)  # a new order for each execution (epoch), as a file shuffle would
        return tasks


def stream(data_uri: str, split: str | None = None, *, batch_size: int = 64, shuffle_files: bool = False,
           with_keys: bool = True, text: bool | None = None) -> ray.data.Dataset:
    """Lazy Ray Dataset of model-ready batches from the shards under `data_uri` (see module doc).
    `with_keys=False` drops the key column and, unless `text=True`, the text columns (report, .txt
    members) too, so `iter_torch_batches` yields tensors only."""
    ensure_ray()
    store = Storage(data_uri)
    manifest = read_manifest(store)
    shards = [s for s in manifest["shards"] if split is None or s["splits"].get(split)]
    if not shards:
        raise InputError(f"{store.uri}: no shard holds split {split!r} (splits: {sorted(manifest['splits'])})")
    kwargs = {"split": split, "covariates": manifest["covariates"], "with_keys": with_keys,
              "text": with_keys if text is None else text}
    cpus = int(ray.cluster_resources().get("CPU", 1))
    return ray.data.read_datasource(ShardRanges(store, shards, batch_size, kwargs, shuffle_files),
                                    override_num_blocks=max(len(shards), 4 * cpus))
