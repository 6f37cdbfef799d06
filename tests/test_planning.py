"""Driver-side planning over shards (issue 28 §4): what `select` picks, with memory bounded by its limit."""
from __future__ import annotations

import hashlib

import pytest

from cxrray.data import shards
from cxrray.data.storage import Storage
from cxrray.errors import InputError
from cxrray.pipelines.diffchest.explain import select
from test_experiment import write_echo_shards


def test_select_takes_the_smallest_seeded_hashes_of_the_matching_samples_in_shard_order(tmp_path):
    uri = write_echo_shards(tmp_path / "s", 250, 5, splits=["train", "test"])  # 3 shards: 100, 100, 50
    store = Storage(uri)
    rows = [(shard["name"], key, meta) for shard in shards.read_manifest(store)["shards"]
            for key, _, meta in shards.read_tar(store.read_bytes(shard["name"]))]
    test = [(name, key) for name, key, meta in rows if meta["split"] == "test"]
    everything, _ = select(uri, "test")
    assert [(s["shard"], s["key"]) for s in everything] == test and len(test) == 124
    rank = lambda key, seed: hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).digest()  # noqa: E731
    for seed in (0, 1):
        picked, _ = select(uri, "test", limit=10, seed=seed)
        expected = sorted(test, key=lambda t: rank(t[1], seed), reverse=True)[-10:]
        assert [(s["shard"], s["key"]) for s in picked] == [t for t in test if t in expected]  # shard order kept
    assert select(uri, "test", limit=10, seed=0)[0] != select(uri, "test", limit=10, seed=1)[0]
    assert select(uri, "test", limit=500)[0] == everything and select(uri, "test", limit=0)[0] == []
    positives, _ = select(uri, "test", label="slvh", value=1.0)
    assert positives and all(meta["labels"][0] == 1.0 for name, key, meta in rows
                             if (name, key) in {(s["shard"], s["key"]) for s in positives})
    with pytest.raises(InputError, match="unknown label"):
        select(uri, "test", label="nope")
