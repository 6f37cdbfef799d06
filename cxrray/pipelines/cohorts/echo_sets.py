"""Echo-labelled image sets for the cohort experiment: shards -> in-memory arrays, and the arms.

Labels are recomputed from each row's echo measurements with the CheXchoNet adapter's own thresholds
(`echo_labels`), for real and synthetic rows alike, so every arm is labelled by one function. Rows
without all three measurements or without a sex are left out and counted.

Arrays (N rows): image uint16 [N, S, S] (16-bit PNG values; `png16_to_model` gives [-1, 1]),
age float32 [N] years (NaN unknown), sex float32 [N] (1 M, 0 F), echo float32 [N, 3] cm
(ivsd, lvidd, lvpwd), labels float32 [N, 3] (slvh, dlv, composite), patient str [N], key str [N].
Held in memory: at the miniature's sizes (thousands of 64² images) that is megabytes; a paper-scale run
(71k images at 224²) needs ~7 GB per node, which the Ray object store shares between fits.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from cxrray.data.imaging import decode_png16
from cxrray.data.shards import read_manifest, read_tar
from cxrray.data.sources.chexchonet import FINDINGS, echo_labels
from cxrray.data.storage import Storage
from cxrray.errors import InputError

ECHO = ("ivsd", "lvidd", "lvpwd")
SEX = {"M": 1.0, "F": 0.0}


@dataclass
class EchoSet:
    image: np.ndarray
    age: np.ndarray
    sex: np.ndarray
    echo: np.ndarray
    labels: np.ndarray
    patient: np.ndarray
    key: np.ndarray
    dropped: int = 0  # rows without echo measurements or sex

    def __len__(self) -> int:
        return len(self.key)

    def take(self, index: np.ndarray) -> "EchoSet":
        index = np.asarray(index, dtype=np.int64)
        return EchoSet(*(getattr(self, f)[index] for f in ARRAYS), dropped=0)

    def arrays(self) -> dict[str, np.ndarray]:
        return {f: getattr(self, f) for f in ARRAYS}

    @staticmethod
    def concat(parts: list["EchoSet"]) -> "EchoSet":
        return EchoSet(*(np.concatenate([getattr(p, f) for p in parts]) for f in ARRAYS),
                       dropped=sum(p.dropped for p in parts))


ARRAYS = ("image", "age", "sex", "echo", "labels", "patient", "key")


def load_echo_set(uri: str, split: str | None) -> EchoSet:
    """Every sample of `split` (None: all) under the shards at `uri`, in manifest order."""
    store = Storage(uri)
    manifest = read_manifest(store)
    missing = [c for c in ECHO if c not in manifest.get("covariates", [])]
    if missing:
        raise InputError(f"{store.uri}: the shards carry no {missing} covariates (found {manifest.get('covariates')}); "
                         "the cohort experiment needs echo measurements (CheXchoNet, phantoms, or generated cohorts)")
    images, rows, dropped = [], [], 0
    for shard in manifest["shards"]:
        if split is not None and not shard["splits"].get(split):
            continue
        for key, png, meta in read_tar(store.read_bytes(shard["name"]), store.url(shard["name"])):
            if split is not None and meta["split"] != split:
                continue
            echo = [meta["covariates"].get(c) for c in ECHO]
            if any(v is None for v in echo) or meta.get("sex") not in SEX:
                dropped += 1
                continue
            images.append(decode_png16(png))
            rows.append((meta.get("age"), SEX[meta["sex"]], echo, echo_labels(meta["sex"], *echo), meta["patient"], key))
    if not rows:
        raise InputError(f"{store.uri}: no samples with echo measurements and sex in split {split!r} "
                         f"({dropped} without; splits: {sorted(manifest['splits'])})")
    age, sex, echo, labels, patient, key = zip(*rows)
    return EchoSet(np.stack(images), np.array([np.nan if a is None else a for a in age], np.float32),
                   np.array(sex, np.float32), np.array(echo, np.float32), np.array(labels, np.float32),
                   np.array(patient, dtype=object), np.array(key, dtype=object), dropped)


def arm_index(arm: str, n_base: int, gen_labels: np.ndarray, positive: str, size_factor: float,
              seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into Base, into Gen) of one arm's training rows for one seed: the arm's pool (Base, Gen,
    Base + Gen, or Base + Gen's `positive` rows) resampled with replacement to round(size_factor * n_base)."""
    pos = np.flatnonzero(gen_labels[:, FINDINGS.index(positive)] == 1)
    n_gen = len(gen_labels)
    pools = {"base": (np.arange(n_base), np.empty(0, np.int64)), "gen": (np.empty(0, np.int64), np.arange(n_gen)),
             "base+gen": (np.arange(n_base), np.arange(n_gen)), "base+gen(pos)": (np.arange(n_base), pos)}
    base_pool, gen_pool = pools[arm]
    pool = len(base_pool) + len(gen_pool)
    if pool == 0:
        raise InputError(f"arm {arm!r} has no rows (Base {n_base}, Gen {n_gen}, Gen positives {len(pos)})")
    draw = np.random.default_rng([seed, list(pools).index(arm)]).integers(0, pool, round(size_factor * n_base))
    from_base = draw < len(base_pool)
    return np.sort(base_pool[draw[from_base]]), np.sort(gen_pool[draw[~from_base] - len(base_pool)])
