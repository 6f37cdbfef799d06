"""Per-item seeds: the noise an item gets is a function of (seed, its key) only, never of the batch, unit or
shard it runs in, so a killed-and-rerun job or another batch size draws the same noise for the same image."""
from __future__ import annotations

import hashlib


def key_seed(seed: int, key: str) -> int:
    """A 48-bit seed from (seed, key) (blake2b: the same in every process and library version)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=6).digest(), "big")


def item_seeds(seed: int, keys: list[str] | None, n: int) -> list[int]:
    """One seed per item: from its key, or from its position when there are no keys."""
    return [key_seed(seed, k) for k in keys] if keys is not None else [key_seed(seed, str(i)) for i in range(n)]


def item_noise(seeds: list[int], shape: tuple[int, ...]):
    """float32 [len(seeds), *shape]: row i is N(0, I) from a CPU generator seeded with seeds[i] alone, so an
    item's noise is the same in any batch (a deterministic sampler then gives it the same result, up to
    floating-point summation order)."""
    import torch

    return torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
