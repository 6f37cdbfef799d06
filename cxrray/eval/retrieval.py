"""Retrieval metrics over a gallery of unit embeddings, per query (so that they can be bootstrapped by patient).

Each image queries all the others (itself left out) by inner product, which faiss's exact `IndexFlatIP` does;
a neighbour is relevant when it shares a positive label with the query (DAug: a positive super-class).
Per query: hit@k (Recall@k as image retrieval reports it: 1 if any of the top k is relevant) and AP@k =
(1 / min(k, relevant in the gallery)) * sum over ranks r <= k of precision@r at each relevant rank. Queries
without a positive label, or with no relevant image in the gallery, are NaN (left out of every mean).
"""
from __future__ import annotations

import numpy as np


def neighbours(embeddings: np.ndarray, k: int) -> np.ndarray:
    """Indices [N, k] of each row's k nearest other rows by inner product (faiss, exact), best first."""
    import faiss

    x = np.ascontiguousarray(embeddings, dtype=np.float32)
    index = faiss.IndexFlatIP(x.shape[1])
    index.add(x)
    _, found = index.search(x, min(k + 1, len(x)))
    out = np.empty((len(x), min(k, len(x) - 1)), np.int64)
    for i, row in enumerate(found):
        others = row[row != i][:out.shape[1]]  # the query itself (usually rank 0, not always on ties) left out
        out[i] = others
    return out


def per_query(embeddings: np.ndarray, positives: np.ndarray, ks: tuple[int, ...] = (1, 5, 10),
              ap_at: int = 10) -> dict[str, np.ndarray]:
    """{"hit@k" for k in ks, "ap@ap_at"}: float [N] each (NaN where the query cannot be scored).
    positives: bool [N, K] (True where the label is known positive)."""
    positives = np.asarray(positives, bool)
    depth = max(max(ks), ap_at)
    found = neighbours(embeddings, depth)
    relevant = (positives[:, None, :] & positives[found]).any(axis=2)  # [N, depth]
    in_gallery = ((positives.astype(np.int64) @ positives.T.astype(np.int64)) > 0).sum(1) - positives.any(1)
    scorable = positives.any(1) & (in_gallery > 0)
    out = {f"hit@{k}": np.where(scorable, relevant[:, :k].any(1), np.nan) for k in ks}
    hits = relevant[:, :ap_at]
    precision = np.cumsum(hits, 1) / np.arange(1, hits.shape[1] + 1)
    ap = (precision * hits).sum(1) / np.maximum(np.minimum(in_gallery, ap_at), 1)
    out[f"ap@{ap_at}"] = np.where(scorable, ap, np.nan)
    return out
