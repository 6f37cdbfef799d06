"""A split's images with the ground truth ingest carried beside them (issue 29 §1): per-finding masks
(`mask_NAME.png`), the lung fields (`mask_lungs.png`) and the healthy counterpart (`healthy.png`), read in
this process for evaluation. Only the members named here are decoded; nothing is unpickled.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cxrray.data.imaging import decode_png16, png16_to_model
from cxrray.data.shards import read_manifest, read_tar
from cxrray.data.storage import Storage
from cxrray.errors import InputError

HEALTHY, LUNGS = "healthy.png", "mask_lungs.png"


@dataclass
class TruthSet:
    """N images of one split in shard order. images float32 [N, 1, S, S] in [-1, 1]; labels float32 [N, F]
    (NaN: unknown) named by `findings`; masks {finding: bool [N, S, S]} for the findings the shards carry
    masks of; lungs bool [N, S, S] or None; healthy float32 [N, S, S] in [-1, 1] or None; keys and
    patients (salted ids) [N]; extra {member: raw decoded PNG [N, S, S]} for the members asked for by `also`."""

    images: np.ndarray
    labels: np.ndarray
    findings: list[str]
    masks: dict[str, np.ndarray]
    lungs: np.ndarray | None
    healthy: np.ndarray | None
    keys: list[str]
    patients: list[str]
    extra: dict[str, np.ndarray] = field(default_factory=dict)

    def positives(self, finding: str) -> np.ndarray:
        """Indices of images labelled positive for `finding` whose mask is not empty."""
        j = self.findings.index(finding)
        has = self.masks[finding].any(axis=(1, 2)) if finding in self.masks else np.zeros(len(self.keys), bool)
        return np.flatnonzero((self.labels[:, j] == 1) & has)


def load_truth(data_uri: str, split: str, limit: int | None = None, need_masks: bool = True,
               also: tuple[str, ...] = ()) -> TruthSet:
    """The first `limit` images of `split` (all with None) with their labels and ground-truth members.
    With `need_masks`, shards without any `mask_*` member are an InputError (ingest them from a folder CSV
    with `mask:NAME` columns, e.g. phantoms made with phantom.masks=true)."""
    store = Storage(data_uri)
    manifest = read_manifest(store)
    members = set(manifest.get("members", []))
    mask_names = sorted(m[len("mask_"):-len(".png")] for m in members if m.startswith("mask_") and m != LUNGS)
    if need_masks and not mask_names:
        raise InputError(f"{store.uri} carries no masks (members: {sorted(members) or 'none'}); ingest "
                         f"phantoms made with phantom.masks=true, or a folder CSV with mask:NAME columns")
    findings = list(manifest["label_vocabulary"])
    absent = sorted(set(also) - members)
    if absent:
        raise InputError(f"{store.uri} has no {absent} members (members: {sorted(members) or 'none'})")
    rows: list[tuple] = []
    for shard in manifest["shards"]:
        if not shard["splits"].get(split):
            continue
        for key, png, meta, extra in read_tar(store.read_bytes(shard["name"]), store.url(shard["name"]), extras=True):
            if meta["split"] == split:
                rows.append((key, png, meta, extra))
            if limit is not None and len(rows) >= limit:
                break
        if limit is not None and len(rows) >= limit:
            break
    if not rows:
        raise InputError(f"{store.uri}: no images in split {split!r}")

    def stack(member: str) -> np.ndarray:
        return np.stack([decode_png16(extra[member]) for *_, extra in rows])

    labels = np.asarray([[np.nan if v is None else v for v in meta["labels"]] for _, _, meta, _ in rows], np.float32)
    return TruthSet(
        images=png16_to_model(np.stack([decode_png16(png) for _, png, _, _ in rows]))[:, None],
        labels=labels.reshape(len(rows), len(findings)), findings=findings,
        masks={name: stack(f"mask_{name}.png") > 0 for name in mask_names},
        lungs=stack(LUNGS) > 0 if LUNGS in members else None,
        healthy=png16_to_model(stack(HEALTHY)) if HEALTHY in members else None,
        keys=[key for key, *_ in rows], patients=[meta["patient"] for _, _, meta, _ in rows],
        extra={member: stack(member) for member in also})
