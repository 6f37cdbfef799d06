"""Explain job: counterfactuals for many images x findings, fanned out over a Ray Data actor pool.

Input is either one file (DICOM/PNG/JPEG, processed in-process) or a shards URI (every sample of a
split, optionally filtered to negatives/positives of a label and capped). Work units are groups of
up to `explain.batch_size` samples of one shard; an actor inverts each image once (x_T) and decodes
one counterfactual per finding. For each (key, finding, direction) it writes, under the output URI:

  {key}.{finding}.{direction}.original.png        PNG-16 (model input, not synthetic)
  {key}.{finding}.{direction}.counterfactual.png  PNG-16 with provenance
  {key}.{finding}.{direction}.counterfactual.dcm  DICOM Secondary Capture, ImageType DERIVED
  {key}.{finding}.{direction}.difference.png      colour-coded signed difference (counterfactual - original)
  {key}.{finding}.{direction}.reference.png       PNG-16 with provenance, the plain reconstruction (with `reference`)
  {key}.{finding}.{direction}.json                record: probabilities before/after for every finding, ...

The JSON record is written last, so it marks a complete output; a rerun skips keys that have it,
which makes a killed job, rerun, produce every output exactly once.
"""
from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

import numpy as np
import torch

from cxrray.config import Config
from cxrray.pipelines.settings import ExplainConfig
from cxrray.data.imaging import encode_png16
from cxrray.data.shards import read_manifest, read_tar
from cxrray.data.storage import Storage
from cxrray.models.loading import load_ema, model_identity
from cxrray.pipelines import derived
from cxrray.pipelines.diffchest.counterfactual import counterfactuals, invert
from cxrray.pipelines.encode import load_images
from cxrray.pipelines.fanout import fan_out
from cxrray.pipelines.diffchest.head import load_head
from cxrray.runtime import configure_data, ensure_ray
from cxrray.errors import InputError

DIRECTIONS = {1: "toward", -1: "away"}


def stem(key: str, finding: str, toward: int = 1) -> str:
    """Common prefix of one (key, finding, direction)'s outputs; its record is `{stem}.json`."""
    return f"{key}.{finding}.{DIRECTIONS[toward]}"


def regions(difference: np.ndarray) -> dict[str, float]:
    """Share of |difference| mass in a 3x3 grid (image orientation: the patient's right is image left)."""
    a = np.abs(np.asarray(difference, np.float64))
    total = a.sum() or 1.0
    rows, cols = np.array_split(np.arange(a.shape[0]), 3), np.array_split(np.arange(a.shape[1]), 3)
    names = (("upper", "middle", "lower"), ("image-left", "centre", "image-right"))
    return {f"{names[0][i]} {names[1][j]}": float(a[np.ix_(r, c)].sum() / total)
            for i, r in enumerate(rows) for j, c in enumerate(cols)}


class Explainer:
    """Loads the EMA model and the probe once; turns image batches into written counterfactual outputs."""

    def __init__(self, checkpoint: str, probe: str, output_uri: str, cfg: dict, findings: list[str], toward: int,
                 reference: bool = False):
        self.cfg = ExplainConfig(**cfg)
        self.device = torch.device("cuda" if self.cfg.use_gpu and torch.cuda.is_available() else "cpu")
        if self.device.type == "cpu":
            torch.set_num_threads(1)
        self.model = load_ema(checkpoint).to(self.device)
        self.head = load_head(probe)
        for finding in findings:
            self.head.index(finding)  # unknown/unfitted findings fail here, before any work
        self.identity, self.out = model_identity(checkpoint), Storage(output_uri)
        self.findings, self.toward, self.reference = findings, toward, reference

    def run(self, keys: list[str], x0: torch.Tensor, extra: list[dict] | None = None,
            findings: list[str] | None = None) -> list[dict]:
        """x0 [B, 1, S, S] in [-1, 1] with their keys; writes outputs for the findings (default: all of the
        explainer's) not done yet."""
        todo = [f for f in (findings or self.findings)
                if any(not self.out.exists(f"{stem(k, f, self.toward)}.json") for k in keys)]
        if not todo:
            return []
        x0 = x0.to(self.device)
        with torch.no_grad():
            z = self.model.encode(x0).float()
        inversion = invert(self.model, x0, z, self.cfg)
        records, reference = [], None
        for finding in todo:
            result = counterfactuals(self.model, self.head, x0, finding, self.cfg, self.toward, inversion=inversion,
                                     with_reference=self.reference and reference is None)
            if self.reference and reference is None:
                reference = {"image": result["reference"], "probs": result["probs_reference"]}
            for i, key in enumerate(keys):
                if not self.out.exists(f"{stem(key, finding, self.toward)}.json"):
                    records.append(self._write(key, finding, result, i, reference, (extra or [{}] * len(keys))[i]))
        return records

    def _write(self, key: str, finding: str, r: dict, i: int, reference: dict | None, extra: dict) -> dict:
        prefix, what = stem(key, finding, self.toward), f"counterfactual {DIRECTIONS[self.toward]} {finding}"
        text = derived.provenance(what, self.identity)
        cf, original = r["counterfactual"][i, 0].numpy(), r["original"][i, 0].numpy()
        files = {"original": f"{prefix}.original.png", "counterfactual": f"{prefix}.counterfactual.png",
                 "dicom": f"{prefix}.counterfactual.dcm", "difference": f"{prefix}.difference.png"}
        self.out.write_bytes(files["original"], encode_png16((original + 1) / 2))  # the model input, not synthetic
        self.out.write_bytes(files["counterfactual"], derived.png16(cf, text))
        self.out.write_bytes(files["dicom"], derived.secondary_capture(cf, text, self.identity, what))
        self.out.write_bytes(files["difference"], derived.difference_png(r["difference"][i, 0].numpy(), text)[0])
        names = self.head.findings
        record = {"key": key, "finding": finding, "direction": DIRECTIONS[self.toward], "model": self.identity,
                  "explain": self.cfg.model_dump(mode="json"), "files": files,
                  "probs_before": dict(zip(names, r["probs_before"][i].tolist())),
                  "probs_after": dict(zip(names, r["probs_after"][i].tolist())),
                  "probs_latent": dict(zip(names, r["probs_latent"][i].tolist())),
                  "difference_mean_abs": float(np.abs(r["difference"][i, 0].numpy()).mean()),
                  "regions": regions(r["difference"][i, 0].numpy()), **extra}
        if reference is not None:
            ref = reference["image"][i, 0].numpy()
            files["reference"] = f"{prefix}.reference.png"  # the plain reconstruction decode(z, x_T): the baseline
            self.out.write_bytes(files["reference"], derived.png16(ref, derived.provenance("reconstruction", self.identity)))
            record["probs_reference"] = dict(zip(names, reference["probs"][i].tolist()))
            record["regions_vs_reference"] = regions(cf - ref)
        self.out.write_bytes(f"{prefix}.json", json.dumps(record, indent=1, allow_nan=True).encode())
        return record


class ShardExplainer(Explainer):
    """Ray Data actor: units {shard, keys, findings (JSON lists)} -> records written; returns counts."""

    def __init__(self, data_uri: str, **kwargs):
        super().__init__(**kwargs)
        self.data = Storage(data_uri)

    def __call__(self, batch: dict) -> dict:
        written = []
        for shard, keys_json, findings_json in zip(batch["shard"], batch["keys"], batch["findings"]):
            wanted = json.loads(keys_json)
            samples = {k: (png, meta) for k, png, meta in read_tar(self.data.read_bytes(shard), source=shard)}
            x0 = load_images([samples[k][0] for k in wanted])
            extra = [{"labels": samples[k][1]["labels"], "split": samples[k][1]["split"]} for k in wanted]
            written.append(len(self.run(wanted, x0, extra, findings=json.loads(findings_json))))
        return {"written": np.array(written)}


class _Pick:
    """All matching samples, or with `limit` the `limit` of smallest seeded hash of their key (a uniform sample
    that depends neither on the shards' order nor their count), in a heap of `limit` entries; returned in
    archive order (the `order` tuples given)."""

    def __init__(self, limit: int | None, seed: int):
        self.limit, self.seed, self.kept = limit, seed, []

    def add(self, order: tuple, sample: dict) -> None:
        import heapq

        if self.limit is None:
            self.kept.append((0, order, sample))
            return
        rank = -int.from_bytes(hashlib.blake2b(f"{self.seed}:{sample['key']}".encode(), digest_size=8).digest(), "big")
        if len(self.kept) < self.limit:
            heapq.heappush(self.kept, (rank, order, sample))
        elif self.kept and rank > self.kept[0][0]:
            heapq.heapreplace(self.kept, (rank, order, sample))

    def samples(self) -> list[dict]:
        return [sample for _, _, sample in sorted(self.kept, key=lambda entry: entry[1])]


def _matches(label_value, value) -> bool:
    """labels[label] == value, an unknown label (JSON null, Parquet NaN) matching value None."""
    unknown = label_value is None or label_value != label_value
    return unknown if value is None else (not unknown and label_value == value)


def _label_index(vocab: list[str], label: str | None) -> int | None:
    if label is not None and label not in vocab:
        raise InputError(f"unknown label {label!r}; the shards have: {', '.join(vocab)}")
    return None if label is None else vocab.index(label)


def select(data_uri: str, split: str | None, label: str | None = None, value: float | None = None,
           limit: int | None = None, seed: int = 0) -> tuple[list[dict], dict]:
    """Samples of `split` (optionally with labels[label] == value): [{shard, key}] in shard order, and the
    manifest; with `limit`, a seeded uniform sample of `limit` of them (`_Pick`). Reads every shard of the
    split, one at a time: memory does not grow with the archive, time does (see `select_encoded`)."""
    store, manifest = Storage(data_uri), read_manifest(data_uri)
    j = _label_index(manifest["label_vocabulary"], label)
    pick = _Pick(limit, seed)
    for s, shard in enumerate(manifest["shards"]):
        if split is not None and not shard["splits"].get(split):
            continue
        for i, (key, _, meta) in enumerate(read_tar(store.read_bytes(shard["name"]), source=shard["name"])):
            if (split is None or meta["split"] == split) and (j is None or _matches(meta["labels"][j], value)):
                pick.add((s, i), {"shard": shard["name"], "key": key})
    return pick.samples(), manifest


def encodes_other(index: dict, manifest: dict, data_uri: str) -> str | None:
    """Why encodings (their `index`) are not of exactly these shards, or None: another data URI, another label
    vocabulary, another sample count, or a part for a shard the manifest does not list (a re-ingest)."""
    if index.get("data") != data_uri:
        return f"they encode {index.get('data')}"
    if index.get("label_vocabulary") != manifest["label_vocabulary"]:
        return "their label vocabulary differs from the manifest's"
    if index.get("rows") != manifest["samples"]:
        return f"they hold {index.get('rows')} rows, the manifest {manifest['samples']} samples"
    stems = {shard["name"].rsplit(".", 1)[0]: shard["samples"] for shard in manifest["shards"]}
    matched = [PART_NAME.match(p) for p in index.get("parts", ())]
    if not all(m and m["stem"] in stems for m in matched) or {m["stem"] for m in matched} != set(stems):
        return "their parts do not name exactly the manifest's shards"
    return None


PART_NAME = re.compile(r"^(?P<stem>.+)-c(?P<chunk>\d{4,})-[0-9a-f]+\.parquet$")  # encode.plan's part names


def select_encoded(data_uri: str, encodings_uri: str, split: str | None, label: str | None = None,
                   value: float | None = None, limit: int | None = None, seed: int = 0) -> tuple[list[dict], dict]:
    """`select`, the same samples in the same order, read from the encodings of `data_uri` instead of its
    shards: per part only the key, split and labels columns, rows of other splits filtered in the Parquet
    reader. No image byte is read; memory is one part's three columns plus the `limit` kept."""
    import pyarrow.parquet as pq

    from cxrray.pipelines.encodings import PARTS, read_index

    store, manifest, enc = Storage(data_uri), read_manifest(data_uri), Storage(encodings_uri)
    index = read_index(enc)
    why = encodes_other(index, manifest, store.uri)
    if why:
        raise InputError(f"{enc.uri} cannot stand for {store.uri}: {why}")
    j = _label_index(manifest["label_vocabulary"], label)
    order = {shard["name"].rsplit(".", 1)[0]: (s, shard["name"]) for s, shard in enumerate(manifest["shards"])}
    pick = _Pick(limit, seed)
    for part in index["parts"]:
        m = PART_NAME.match(part)
        if not m or m["stem"] not in order:
            raise InputError(f"{enc.uri}: part {part!r} names no shard of {store.uri}")
        s, shard = order[m["stem"]]
        table = pq.read_table(enc.path(f"{PARTS}/{part}"), filesystem=enc.fs, columns=["key", "labels"],
                              filters=None if split is None else [("split", "==", split)])
        keys = table.column("key").to_pylist()
        labels = None if j is None else table.column("labels").to_pylist()
        for i, key in enumerate(keys):
            if j is None or _matches(labels[i][j], value):
                pick.add((s, int(m["chunk"]), i), {"shard": shard, "key": key})
    return pick.samples(), manifest


def select_samples(data_uri: str, split: str | None, encodings: str | None = None, **kwargs) -> list[dict]:
    """`select_encoded` when `encodings` encode exactly the shards of `data_uri` (no shard is read), else
    `select` (every shard of the split is read), saying why; kwargs as `select`."""
    from cxrray.pipelines.encodings import read_index

    why = "no encodings given"
    if encodings:
        try:
            why = encodes_other(read_index(encodings), read_manifest(data_uri), Storage(data_uri).uri)
        except FileNotFoundError as error:
            why = str(error)
        if why is None:
            return select_encoded(data_uri, encodings, split, **kwargs)[0]
        print(f"[select] planning from the shards of {data_uri}: {encodings} cannot stand for them ({why})",
              flush=True)
    return select(data_uri, split, **kwargs)[0]


def explain_shards(checkpoint: str, probe: str, data_uri: str, findings: list[str], output_uri: str, cfg: Config,
                   samples: list[dict], toward: int = 1, reference: bool = False) -> int:
    """Fan out counterfactuals for `samples` ([{shard, key, findings?}]) over one actor pool; a sample's own
    `findings` (a subset of `findings`) replaces the full list for it. Returns records written now."""
    ensure_ray()
    configure_data()
    out = Storage(output_uri)
    out.remove_partial()
    done = set(out.list())
    wanted = [(s, tuple(s.get("findings") or findings)) for s in samples]
    pending = [(s, fs) for s, fs in wanted if any(f"{stem(s['key'], f, toward)}.json" not in done for f in fs)]
    units, groups = [], {}
    for s, fs in pending:
        groups.setdefault((s["shard"], fs), []).append(s["key"])
    for (shard, fs), keys in groups.items():
        for i in range(0, len(keys), cfg.explain.batch_size):
            units.append({"shard": shard, "keys": json.dumps(keys[i:i + cfg.explain.batch_size]),
                          "findings": json.dumps(list(fs))})
    print(f"[explain] {len(samples) - len(pending)}/{len(samples)} images already complete; "
          f"{len(pending)} images x up to {len(findings)} findings in {len(units)} units -> {out.uri}", flush=True)
    result = fan_out("explain", units, ShardExplainer,
                     {"data_uri": data_uri, "checkpoint": checkpoint, "probe": probe, "output_uri": out.uri,
                      "cfg": cfg.explain.model_dump(), "findings": findings, "toward": toward, "reference": reference},
                     cfg.explain, out, count="written", what="counterfactuals")
    written = result.counted
    print(f"[explain] wrote {written} counterfactual records (PNG, DICOM, difference map, JSON each) -> {out.uri}",
          flush=True)
    return written


def explain_file(checkpoint: str, probe: str, path: Path, findings: list[str], output_uri: str, cfg: Config,
                 toward: int = 1) -> list[dict]:
    """One DICOM/PNG/JPEG file, in-process: preprocess exactly like ingest, then counterfactuals."""
    from cxrray.data.ingest import prepare_image

    identity = model_identity(checkpoint)
    data = Path(path).read_bytes()
    image = prepare_image(data, cfg.ingest.model_copy(update={"size": identity["image_size"]}))
    key = "file-" + hashlib.sha256(data).hexdigest()[:16]  # the file name may identify the patient
    explainer = Explainer(checkpoint, probe, output_uri, cfg.explain.model_dump(), findings, toward)
    return explainer.run([key], torch.as_tensor(image)[None, None]) or [
        json.loads(Storage(output_uri).read_bytes(f"{stem(key, f, toward)}.json")) for f in findings]


def explain(checkpoint: str, probe: str, input: str, findings: list[str], output_uri: str, cfg: Config,
            split: str | None = None, limit: int | None = None, toward: int = 1, encodings: str | None = None) -> dict:
    """`cxrray explain`: a file or a shards URI (optionally one split, capped at `limit` images). Shards are
    planned from `encodings` (default: the ones the probe was fitted on) when they encode exactly the input."""
    if not findings:
        raise InputError("give at least one --finding")
    model_identity(checkpoint, "counterfactual")
    head = load_head(probe)
    for finding in findings:
        head.index(finding)
    if Path(input).is_file():
        records = explain_file(checkpoint, probe, Path(input), findings, output_uri, cfg, toward)
        return {"input": "file", "records": len(records), "output": Storage(output_uri).uri,
                "probabilities": {r["finding"]: {"before": r["probs_before"][r["finding"]],
                                                 "after": r["probs_after"][r["finding"]]} for r in records}}
    samples = select_samples(input, split, encodings or head.info.get("encodings"), limit=limit,
                             seed=cfg.explain.seed)
    written = explain_shards(checkpoint, probe, input, findings, output_uri, cfg, samples, toward)
    total = sum(1 for n in Storage(output_uri).list() if n.endswith(f".{DIRECTIONS[toward]}.json"))
    return {"input": "shards", "images": len(samples), "findings": findings, "written_now": written,
            "records": total, "output": Storage(output_uri).uri}
