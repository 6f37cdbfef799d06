"""Encodings: the encode job's output, one Parquet part per (shard, chunk), plus `encodings.json`.

Columns of every part (one row per sample, keyed by the shard's sample key):

| column     | type               | meaning                                                  |
|------------|--------------------|----------------------------------------------------------|
| key        | string             | sample key (salted hash, as in the shards)               |
| split      | string             | patient-level split from the manifest                    |
| patient    | string             | salted patient hash (for patient-level subsampling)      |
| sex, view  | string (nullable)  |                                                          |
| age        | float64 (NaN)      | years                                                    |
| labels     | list<float32>      | aligned with `label_vocabulary`; 1 / 0 / NaN             |
| covariates | list<float32>      | aligned with `covariates`; NaN if missing                |
| z          | list<float32>      | semantic code, length `z_dim`                            |
| x_T        | list<float32>      | DDIM-inverted noise map, C*S*S values (only with invert) |

A part is written in one atomic object write, so a reader sees whole parts or none; parts are
named by their input shard, chunk index and a fingerprint of the encoding settings, so a rerun
with the same settings skips them and writes every key exactly once.
"""
from __future__ import annotations

import io
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from cxrray.data.storage import Storage

FORMAT = "cxrray-encodings/1"
INDEX = "encodings.json"
PARTS = "parts"
META_COLUMNS = ("key", "split", "patient", "sex", "view", "age")


def part_table(metas: list[dict], z: np.ndarray, x_T: np.ndarray | None, covariates: list[str]) -> pa.Table:
    """Build one part: `metas` are the shards' meta.json dicts, z [N, D], x_T [N, C, S, S] or None."""
    f32 = pa.list_(pa.float32())
    columns = {
        "key": pa.array([m["key"] for m in metas], pa.string()),
        "split": pa.array([m.get("split") for m in metas], pa.string()),
        "patient": pa.array([m.get("patient") for m in metas], pa.string()),
        "sex": pa.array([m.get("sex") for m in metas], pa.string()),
        "view": pa.array([m.get("view") for m in metas], pa.string()),
        "age": pa.array([np.nan if m.get("age") is None else float(m["age"]) for m in metas], pa.float64()),
        "labels": pa.array([[np.nan if v is None else float(v) for v in m["labels"]] for m in metas], f32),
        "covariates": pa.array([[np.nan if (m.get("covariates") or {}).get(c) is None else float(m["covariates"][c])
                                 for c in covariates] for m in metas], f32),
        "z": pa.array(list(np.asarray(z, np.float32)), f32),
    }
    if x_T is not None:
        columns["x_T"] = pa.array(list(np.asarray(x_T, np.float32).reshape(len(metas), -1)), f32)
    return pa.table(columns)


def write_part(store: Storage, name: str, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf, compression="zstd")
    store.write_bytes(f"{PARTS}/{name}", buf.getvalue())


def finished_parts(store: Storage) -> set[str]:
    """Names of complete parts (temporary files of an interrupted write are not listed)."""
    return {n.rsplit("/", 1)[-1] for n in store.list(PARTS) if n.endswith(".parquet")}


def read_index(uri: str | Storage) -> dict:
    store = uri if isinstance(uri, Storage) else Storage(uri)
    if not store.exists(INDEX):
        raise FileNotFoundError(f"{store.uri}: no {INDEX} (not an encodings output, or the encode job has not finished)")
    return json.loads(store.read_bytes(INDEX))


def read_encodings(uri: str | Storage, columns: list[str] | None = None) -> tuple[pd.DataFrame, dict]:
    """All parts listed in the index as one DataFrame (list columns as numpy arrays), and the index.
    Use `stack(df, "z")` to get a float32 matrix."""
    store = uri if isinstance(uri, Storage) else Storage(uri)
    index = read_index(store)
    tables = [pq.read_table(io.BytesIO(store.read_bytes(f"{PARTS}/{p}")), columns=columns) for p in index["parts"]]
    frame = pa.concat_tables(tables).to_pandas() if tables else pd.DataFrame(columns=columns or [])
    return frame.reset_index(drop=True), index


def split_counts(uri: str | Storage) -> dict[str, int]:
    """{split: rows} over every part, reading only the split column (memory: one part's column)."""
    import pyarrow.compute as pc

    store = uri if isinstance(uri, Storage) else Storage(uri)
    counts: dict[str, int] = {}
    for name in read_index(store)["parts"]:
        column = pq.read_table(store.path(f"{PARTS}/{name}"), filesystem=store.fs, columns=["split"]).column("split")
        for entry in pc.value_counts(column).to_pylist():
            if entry["values"] is not None:
                counts[entry["values"]] = counts.get(entry["values"], 0) + entry["counts"]
    return counts


def read_matrices(uri: str | Storage, columns: list[str], matrices: list[str], filters: list | None = None,
                  keep=None) -> tuple[pd.DataFrame, dict[str, np.ndarray], dict]:
    """The parts listed in the index as a DataFrame of the scalar `columns`, float32 [N, L] matrices of the
    list columns `matrices` (row-aligned with the frame), and the index. The matrices come from Arrow's flat
    value buffers, never a Python object per row: memory per sample is 4 bytes per matrix value plus the
    scalar columns (about twice the matrices' size at the peak, while the parts are joined). `filters`: a
    Parquet predicate (rows it rejects are never materialised); `keep(table) -> bool mask`: a further row
    choice made part by part, so only the rows kept are ever held together."""
    store = uri if isinstance(uri, Storage) else Storage(uri)
    index = read_index(store)
    frames, parts = [], {m: [] for m in matrices}
    for name in index["parts"]:
        table = pq.read_table(io.BytesIO(store.read_bytes(f"{PARTS}/{name}")), columns=columns + matrices,
                              filters=filters)
        if keep is not None:
            table = table.filter(pa.array(keep(table), pa.bool_()))
        frames.append(table.select(columns).to_pandas())
        for m in matrices:
            parts[m].append(_matrix(table.column(m), f"{store.uri} {name} column {m}"))
        del table
    frame = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=columns)
    widths = {m: {p.shape[1] for p in parts[m] if len(p)} for m in matrices}
    ragged = {m: sorted(w) for m, w in widths.items() if len(w) > 1}
    if ragged:
        raise ValueError(f"{store.uri}: list columns of different lengths across parts: {ragged}")
    return frame, {m: np.concatenate([p for p in parts[m] if len(p)] or [np.zeros((0, 0), np.float32)])
                   for m in matrices}, index


def _matrix(column: pa.ChunkedArray, where: str) -> np.ndarray:
    """A list<float32> column of equal-length lists -> float32 [N, L] (null values NaN)."""
    import pyarrow.compute as pc

    array = column.combine_chunks()
    if len(array) == 0:
        return np.zeros((0, 0), np.float32)
    lengths = pc.list_value_length(array).to_numpy(zero_copy_only=False)
    if array.null_count or lengths.min() != lengths.max():
        raise ValueError(f"{where}: missing or different-length lists (lengths {lengths.min()}..{lengths.max()})")
    values = array.flatten().to_numpy(zero_copy_only=False)
    return values.astype(np.float32, copy=False).reshape(len(array), int(lengths[0]))


def stack(frame: pd.DataFrame, column: str) -> np.ndarray:
    """A list column -> float32 [N, L]."""
    if len(frame) == 0:
        return np.zeros((0, 0), np.float32)
    return np.stack(frame[column].to_numpy()).astype(np.float32)
