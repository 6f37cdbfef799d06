"""`cxrray attribute`: maps of where each finding is, for one file or the images of a shards URI.

A file (DICOM / PNG / JPEG) is read in this process exactly as ingest reads it. A shards URI is planned like
the explain job (a seeded `--limit` sample of `--split`, from encodings when they encode exactly the shards)
and fanned out over one actor pool (`pipelines.fanout`), units of up to `attribute.batch_size` images of one
shard; each actor loads the method's model once. An image's outputs (`outputs`) end with its JSON record,
so a rerun skips what is done and a killed run, rerun, writes every output exactly once.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from cxrray.attribute.methods import Mapper, load_mapper
from cxrray.attribute.outputs import map_png, overlay_dicom, overlay_png, overlay_rgb, stem
from cxrray.attribute.settings import AttributeConfig
from cxrray.config import Config
from cxrray.data.shards import read_tar
from cxrray.data.storage import Storage
from cxrray.errors import InputError
from cxrray.pipelines import derived
from cxrray.pipelines.encode import load_images
from cxrray.pipelines.fanout import fan_out


SECTIONS = ("saliency", "explain", "attribute", "attribution", "augment")  # what the actors' methods read of the config
#: what each method's maps depend on, beside its model: the sections a rerun into the same output must match
DEPENDS = {"gradcam": (), "integrated_gradients": ("saliency",), "counterfactual": ("explain",),
           "reconstruction": ("explain", "attribute"), "attribution": ("attribution", "attribute"),
           "empty_prompt": ("attribution", "attribute"), "guided": ("augment", "attribute")}


def settings_record(method: str, mapper: Mapper, probe: str | None, cfg: Config) -> dict:
    """What the maps of `method` in one output folder were made with (model, probe, settings, overlay)."""
    sections = {name: getattr(cfg, name).model_dump(mode="json") for name in DEPENDS[method]}
    if "attribute" in sections:  # the pool does not change a map
        sections["attribute"] = {"seed": cfg.attribute.seed}
    if "augment" in sections:  # guided: the translation's settings, not augment's pool or classes
        sections["augment"] = {k: v for k, v in sections["augment"].items()
                               if k in ("direction", "scale", "start_alpha_bar", "steps", "sigma")}
    if method == "guided":  # the noise-aware classifier named by its weights, not only its path
        from cxrray.pipelines.daug.noisy_classifier import classifier_fingerprint

        probe = classifier_fingerprint(probe)
    return {"method": method, "model": mapper.identity.get("checkpoint"), "probe": probe, "settings": sections,
            "alpha": cfg.attribute.alpha}


def claim_output(out: Storage, record: dict) -> None:
    """Refuse to mix maps made otherwise into `out`; record how this run makes them (the first run's record
    stays: a rerun with the same settings resumes)."""
    name = f"attribute-{record['method']}.settings"  # JSON; not .json: records are the only .json files
    if out.exists(name):
        before = json.loads(out.read_bytes(name))
        if before != record:
            changed = sorted(k for k in record if before.get(k) != record[k])
            raise InputError(f"{out.uri} holds {record['method']} maps made with other {', '.join(changed)}; "
                             "write to another --output (or remove it)")
        return
    out.write_bytes(name, json.dumps(record, indent=1, sort_keys=True).encode())


class Attributor:
    """A loaded method writing the outputs of image batches (`outputs` module doc)."""

    def __init__(self, mapper: Mapper, output_uri: str, findings: list[str]):
        for finding in findings:
            mapper.check(finding)
        self.mapper, self.out, self.findings = mapper, Storage(output_uri), findings

    def run(self, keys: list[str], images: np.ndarray, extra: list[dict] | None = None) -> list[dict]:
        """images float32 [n, 1, S, S] in [-1, 1] with their keys -> the records written now."""
        size = self.mapper.image_size
        if size is not None and images.shape[-1] != size:
            raise InputError(f"images are {images.shape[-1]}², the {self.mapper.method} model reads {size}²")
        records = []
        for finding in self.findings:
            todo = [i for i, k in enumerate(keys) if not self.out.exists(f"{stem(k, finding, self.mapper.method)}.json")]
            if not todo:
                continue
            maps = self.mapper.maps(images[todo], finding, [keys[i] for i in todo])
            probs = self.mapper.probabilities(images[todo], finding)
            for j, i in enumerate(todo):
                p = None if probs is None else float(probs[j])
                records.append(self._write(keys[i], finding, images[i, 0], maps[j], p, (extra or [{}] * len(keys))[i]))
        return records

    def _write(self, key: str, finding: str, image: np.ndarray, attribution: np.ndarray, probability, extra: dict) -> dict:
        method, ac = self.mapper.method, self.mapper.cfg.attribute
        prefix, what = stem(key, finding, method), f"{method} attribution map of {finding}"
        text = derived.provenance(what, {"version": "-", **self.mapper.identity})
        files = {"map": f"{prefix}.map.png", "overlay": f"{prefix}.overlay.png", "dicom": f"{prefix}.overlay.dcm"}
        raw, scale = map_png(attribution, text)
        rgb = overlay_rgb(image, attribution, ac.alpha)
        self.out.write_bytes(files["map"], raw)
        self.out.write_bytes(files["overlay"], overlay_png(rgb, text))
        self.out.write_bytes(files["dicom"], overlay_dicom(rgb, text, what))
        peak = np.unravel_index(int(np.argmax(attribution)), attribution.shape)
        record = {"key": key, "finding": finding, "method": method, "model": self.mapper.identity, "files": files,
                  "map_scale": scale, "map_mean": float(np.mean(attribution)), "peak": [int(peak[0]), int(peak[1])],
                  "probability": probability, "provenance": text, **extra}
        self.out.write_bytes(f"{prefix}.json", json.dumps(record, indent=1, allow_nan=True).encode())
        return record


class ShardAttributor(Attributor):
    """Ray Data actor: units {shard, keys (JSON list)} -> records written; returns counts."""

    def __init__(self, method: str, checkpoint: str, probe: str | None, cfg: dict, data_uri: str, output_uri: str,
                 findings: list[str]):
        import torch

        from cxrray.config import Config

        config = Config(**cfg)
        device = torch.device("cuda" if config.attribute.use_gpu and torch.cuda.is_available() else "cpu")
        if device.type == "cpu":
            torch.set_num_threads(1)
        super().__init__(load_mapper(method, checkpoint, probe, config).to(device), output_uri, findings)
        self.data = Storage(data_uri)

    def __call__(self, batch: dict) -> dict:
        written = []
        for shard, keys_json in zip(batch["shard"], batch["keys"]):
            wanted = json.loads(keys_json)
            samples = {k: (png, meta) for k, png, meta in read_tar(self.data.read_bytes(shard), source=shard)}
            images = load_images([samples[k][0] for k in wanted]).numpy()
            extra = [{"labels": samples[k][1]["labels"], "split": samples[k][1]["split"]} for k in wanted]
            written.append(len(self.run(wanted, images, extra)))
        return {"written": np.array(written)}


def attribute(method: str, checkpoint: str, probe: str | None, input: str, findings: list[str], output_uri: str,
              cfg: Config, split: str | None = None, limit: int | None = None, encodings: str | None = None) -> dict:
    """Run the job (module doc); returns a summary."""
    if not findings:
        raise InputError("give at least one --finding")
    mapper = load_mapper(method, checkpoint, probe, cfg)  # refuses a bad model or finding before any work
    attributor = Attributor(mapper, output_uri, findings)
    out = Storage(output_uri)
    claim_output(out, settings_record(method, mapper, probe, cfg))
    if Path(input).is_file():
        from cxrray.data.dicom import RejectError
        from cxrray.data.ingest import prepare_image

        data = Path(input).read_bytes()
        size = mapper.image_size
        if size is None:
            raise InputError(f"the {method} model does not record its image size")
        try:
            image = prepare_image(data, cfg.ingest.model_copy(update={"size": size}))
        except RejectError as err:  # its detail may quote the file's header: the code only
            raise InputError(f"the --data file is not an image cxrray reads ({err.code})") from None
        key = "file-" + hashlib.sha256(data).hexdigest()[:16]  # the file name may identify the patient
        attributor.run([key], image[None, None].astype(np.float32))
        records = [json.loads(out.read_bytes(f"{stem(key, f, method)}.json")) for f in findings]
        return {"input": "file", "records": len(records), "output": out.uri,
                "probability": {r["finding"]: r["probability"] for r in records}}
    from cxrray.pipelines.diffchest.explain import select_samples
    from cxrray.runtime import configure_data, ensure_ray

    ac: AttributeConfig = cfg.attribute
    samples = select_samples(input, split, encodings, limit=limit, seed=ac.seed)
    out.remove_partial()
    done = set(out.list())
    pending = [s for s in samples if any(f"{stem(s['key'], f, method)}.json" not in done for f in findings)]
    by_shard: dict[str, list[str]] = {}
    for s in pending:
        by_shard.setdefault(s["shard"], []).append(s["key"])
    units = [{"shard": shard, "keys": json.dumps(keys[i:i + ac.batch_size])}
             for shard, keys in by_shard.items() for i in range(0, len(keys), ac.batch_size)]
    print(f"[attribute] {len(samples) - len(pending)}/{len(samples)} images already complete; {len(pending)} images x "
          f"{len(findings)} findings in {len(units)} units -> {out.uri}", flush=True)
    if units:
        ensure_ray()
        configure_data()
        fan_out("attribute", units, ShardAttributor,
                {"method": method, "checkpoint": checkpoint, "probe": probe,
                 "cfg": {k: getattr(cfg, k).model_dump(mode="json") for k in SECTIONS},
                 "data_uri": input, "output_uri": out.uri, "findings": findings},
                ac, out, count="written", what="images")
    wanted = {f"{stem(s['key'], f, method)}.json" for s in samples for f in findings}
    total = len(wanted & set(out.list()))
    return {"input": "shards", "images": len(samples), "method": method, "findings": findings, "records": total,
            "output": out.uri}
