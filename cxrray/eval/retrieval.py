"""Retrieval metrics over a gallery of unit embeddings, per query (so that they can be bootstrapped by patient).

Each image queries all the others by inner product, which faiss's exact `IndexFlatIP` does, leaving out itself
and, with `groups`, every image of its own patient (near-duplicates with the same labels would otherwise make
every method look good); a neighbour is relevant when it shares a positive label with the query (DAug: a
positive super-class). Per query: hit@k (Recall@k as image retrieval reports it: 1 if any of the top k is
relevant) and AP@k = (1 / min(k, relevant in the gallery)) * sum over ranks r <= k of precision@r at each
relevant rank. Queries without a positive label, or with no relevant image in the gallery, are NaN (left out
of every mean).
"""
from __future__ import annotations

from collections import Counter

import numpy as np


def neighbours(embeddings: np.ndarray, k: int, groups=None) -> np.ndarray:
    """Indices [N, k] of each row's k nearest rows by inner product (faiss, exact), best first, leaving out the
    row itself and the rows of its group; -1 pads where fewer remain."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    groups = np.arange(len(x)) if groups is None else np.unique(np.asarray(groups, dtype=str), return_inverse=True)[1]
    largest = int(np.bincount(groups).max()) if len(x) else 1
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, found = index.search(x, min(k + largest, len(x)))
    out = np.full((len(x), k), -1, np.int64)
    for i, row in enumerate(found):
        others = row[(row >= 0) & (groups[row] != groups[i])][:k]
        out[i, :len(others)] = others
    return out


def relevant_in_gallery(positives: np.ndarray, groups=None) -> np.ndarray:
    """Per query, how many gallery images (not itself, not its group) share a positive label [N]; counted by
    label pattern (at most 2^K), never as an N x N matrix."""
    patterns = [tuple(np.flatnonzero(row)) for row in positives]
    counts = Counter(patterns)
    shares = {p: sum(n for q, n in counts.items() if set(p) & set(q)) for p in counts}
    out = np.array([shares[p] - (1 if p else 0) for p in patterns], np.int64)
    if groups is not None:  # the query's own patient's other images are not in its gallery
        groups = np.asarray(groups, dtype=str)
        for g in np.unique(groups):
            members = np.flatnonzero(groups == g)
            if len(members) > 1:
                block = positives[members]
                shared = (block.astype(np.int64) @ block.T.astype(np.int64)) > 0
                out[members] -= shared.sum(1) - block.any(1)
    return out


def per_query(embeddings: np.ndarray, positives: np.ndarray, ks: tuple[int, ...] = (1, 5, 10),
              ap_at: int = 10, groups=None) -> dict[str, np.ndarray]:
    """{"hit@k" for k in ks, "ap@ap_at"}: float [N] each (NaN where the query cannot be scored).
    positives: bool [N, K] (True where the label is known positive); groups: the patient of each row, or None."""
    positives = np.asarray(positives, bool)
    depth = max(max(ks), ap_at)
    found = neighbours(embeddings, depth, groups)
    relevant = (positives[:, None, :] & positives[np.maximum(found, 0)]).any(axis=2) & (found >= 0)  # [N, depth]
    in_gallery = relevant_in_gallery(positives, groups)
    scorable = positives.any(1) & (in_gallery > 0)
    out = {f"hit@{k}": np.where(scorable, relevant[:, :k].any(1), np.nan) for k in ks}
    hits = relevant[:, :ap_at]
    precision = np.cumsum(hits, 1) / np.arange(1, hits.shape[1] + 1)
    ap = (precision * hits).sum(1) / np.maximum(np.minimum(in_gallery, ap_at), 1)
    out[f"ap@{ap_at}"] = np.where(scorable, ap, np.nan)
    return out
