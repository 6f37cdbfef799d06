"""The attribution paper's fine-tune (Siddiqui et al.): DreamBooth (Ruiz et al.) with prior preservation on
class prompts, over a report-conditioned latent diffusion model (Cheff's `ldm`), U-Net and text encoder.

1. The prior: `prior_images` latents sampled once from the *base* model under `prior_prompt` (DDIM), decoded
   for their image member; they stand for what the model knew before any fine-tune.
2. Each stage in order (`dreambooth.stages`: normal, then each disease) gets its own dataset under
   `{output}/data/{stage}`: the train-split latents of its images (no positive finding for the normal class,
   else positive for `finding`; one shard per source shard) with their tokens replaced by the stage prompt's
   (loss weight 1), the val split's likewise (the run's evaluation), and the prior samples, weighted
   lambda x N_instances / N_prior: the latent model's loss is the mean of w_i x MSE_i over the stream, so the
   two terms stand in DreamBooth's ratio L_instance + lambda L_prior whatever the two sets' sizes.
3. The stage trains through `cxrray pretrain` (Ray Train) from the previous stage's checkpoint
   (`model.init_from`; the base for the first) to `{output}/runs/{stage}-{fingerprint}`: the fingerprint covers
   the stage's data, its starting checkpoint and its schedule, so a rerun with anything changed trains anew
   and one with nothing changed answers "nothing to do". Runs register as `cxrray-ldm-dreambooth` (unless
   `tracking.registered_model` is set), never as a new version of the base's name.

`{output}/dreambooth.json` records the stages, their checkpoints and the known-answer measure: the eps (or v)
loss of held-out instances under the stage's prompt and of the prior under the prior prompt, before and after
each stage, on fixed noise. Every dataset and run is written once: a rerun reuses shards whose fingerprint
matches and pretraining answers "nothing to do".
"""
from __future__ import annotations

import hashlib

import numpy as np
import torch

from cxrray.data.members import decode_extra, encode_npy as npy
from cxrray.data.report_tokens import SPECIAL, encode_reports, load_tokenizer
from cxrray.data.shards import (
    MANIFEST, derived_manifest, dumps, load_part, read_manifest, read_tar, reusable_part, write_if_changed, write_shard,
)
from cxrray.data.storage import Storage
from cxrray.errors import InputError
from cxrray.pipelines.settings import DreamBoothConfig, DreamBoothStage

PRIOR_SHARD = "prior-000000.tar"
REGISTERED = "cxrray-ldm-dreambooth"
MEASURE_ROWS = 256  # held-out latents scored before / after a stage (a cap: the measure, not an evaluation)
RECORD = "dreambooth.json"
UNK_ID = SPECIAL.index("[UNK]")


def prompt_tokens(tokenizer, prompt: str) -> np.ndarray:
    """int32 [max_tokens] of one prompt; refuses a prompt with words the tokenizer cannot spell."""
    ids = encode_reports(tokenizer, [prompt])[0]
    if (ids == UNK_ID).any():
        raise InputError(f"prompt {prompt!r} has pieces outside the model's vocabulary ([UNK]): use the reports' words")
    return ids


def selected(meta: dict, stage: DreamBoothStage, findings: list[str]) -> bool:
    """The stage's class: no positive finding (stage.finding None) or positive for stage.finding."""
    labels = dict(zip(findings, meta["labels"]))
    if stage.finding is None:
        return all(v == 0 for v in labels.values())
    return labels.get(stage.finding) == 1


def _order(key: str, seed: int) -> str:
    return hashlib.blake2b(f"{seed}:{key}".encode(), digest_size=8).hexdigest()


def instance_name(index: int) -> str:
    return f"instances-{index:06d}.tar"


def instance_keys(data: Storage, manifest: dict, stage: DreamBoothStage, cap: int | None, seed: int
                  ) -> tuple[dict[str, set[str]], int]:
    """({source shard: keys of its samples that are the stage's instances}, how many are in the train split): the
    train split's (capped at `cap` in a seeded per-key order over all shards) and the val split's (whole: the
    runs' evaluation and the measure)."""
    findings = manifest["label_vocabulary"]
    found = {"train": [], "val": []}
    for shard in manifest["shards"]:
        for key, _, meta in read_tar(data.read_bytes(shard["name"]), shard["name"]):
            if meta.get("split") in found and selected(meta, stage, findings):
                found[meta["split"]].append((key, shard["name"]))
    train = sorted(found["train"], key=lambda k: _order(k[0], seed))[:cap]
    if not train:
        raise InputError(f"stage {stage.name!r}: no train-split image is "
                         f"{'free of every finding' if stage.finding is None else 'positive for ' + stage.finding}")
    keys: dict[str, set[str]] = {}
    for key, shard in train + found["val"]:
        keys.setdefault(shard, set()).add(key)
    return keys, len(train)


def instance_samples(data: Storage, shard: str, keys: set[str], stage: DreamBoothStage, ids: np.ndarray) -> list[tuple]:
    """The samples `keys` of one source shard as the stage's instances: latent kept, tokens the prompt's, weight 1,
    every other extra member (masks, renders) dropped, the report replaced by the prompt."""
    return [(key, png, {**meta, "report": stage.prompt, "dreambooth": {"stage": stage.name, "role": "instance"}},
             {"latent.npy": extras["latent.npy"], "tokens.npy": npy(ids), "weight.npy": npy(np.float32(1.0))})
            for key, png, meta, extras in read_tar(data.read_bytes(shard), shard, extras=True) if key in keys]


def weighted_prior(prior: list[tuple], weight: float) -> list[tuple]:
    return [(key, png, meta, {**extras, "weight.npy": npy(np.float32(weight))}) for key, png, meta, extras in prior]


@torch.no_grad()
def prior_samples(base_uri: str, cfg: DreamBoothConfig, findings: list[str], tokenizer) -> list[tuple]:
    """`cfg.prior_images` samples of the base model under the prior prompt: (key, PNG with provenance, meta,
    {latent, tokens}) in the train split, labels unknown (each stage adds its weight)."""
    from cxrray.families.ldm.task import sample_latents
    from cxrray.models.loading import load_model
    from cxrray.pipelines.derived import png16, provenance

    loaded = load_model(base_uri)
    model, ids = loaded.model, prompt_tokens(tokenizer, cfg.prior_prompt)
    generator = torch.Generator().manual_seed(cfg.seed)
    out = []
    for start in range(0, cfg.prior_images, 32):
        n = min(32, cfg.prior_images - start)
        z = sample_latents(model, torch.as_tensor(np.stack([ids] * n)).long(), n, cfg.prior_steps, generator)
        images = model.decode(z).clamp(-1, 1)[:, 0].numpy()
        for i in range(n):
            key = f"prior-{start + i:06d}"
            text = provenance(f"DreamBooth prior sample {start + i} (DDIM {cfg.prior_steps} steps, seed {cfg.seed}) "
                              f"under {cfg.prior_prompt!r}", loaded.identity)
            meta = {"key": key, "patient": key, "study": key, "split": "train", "labels": [None] * len(findings),
                    "covariates": {}, "report": cfg.prior_prompt, "source": {"provenance": text},
                    "dreambooth": {"role": "prior"}}
            out.append((key, png16(images[i], text), meta, {"latent.npy": npy(z[i].numpy().astype(np.float32)),
                                                            "tokens.npy": npy(ids)}))
    return out


def write_dataset(out: Storage, source: Storage, manifest: dict, shards: dict, fingerprint: str, note: dict) -> str:
    """A shard set under `out`: each named shard (its samples, or a callable making them) written unless its part
    has `fingerprint`, the source's tokenizer file, then the manifest (the source's, with these shards and
    `note` under "dreambooth")."""
    findings = manifest["label_vocabulary"]
    tokenizer = (manifest.get("latents") or {}).get("tokenizer")
    if tokenizer:
        write_if_changed(out, tokenizer, source.read_bytes(tokenizer))
    for name, samples in shards.items():
        if not reusable_part(out, name, fingerprint):
            write_shard(out, name, fingerprint, samples() if callable(samples) else samples, [], findings)
    written = derived_manifest(manifest, [load_part(out, name) for name in shards], dreambooth=note)
    write_if_changed(out, MANIFEST, dumps(written))
    return out.uri


def stage_config(cfg, stage: DreamBoothStage, init_from: str):
    """The `pretrain` config of one stage: the base's model (prepare takes it from `init_from`), the fine-tune's
    schedule (`dreambooth` section) in the `train` section."""
    from cxrray.families import get_family

    db = cfg.dreambooth
    images = stage.steps * db.global_batch
    train = type(cfg.train).model_validate({**cfg.train.model_dump(), **{
        "images": images, "global_batch": db.global_batch, "lr": db.lr, "ema_decay": db.ema_decay, "seed": db.seed,
        "checkpoint_every": images, "eval_every": images, "log_every": max(images // 4, 1), "split": "train",
        "eval_split": "val"}})
    model = get_family("ldm").config(family="ldm", init_from=init_from)
    tracking = cfg.tracking.model_copy(update={"registered_model": cfg.tracking.registered_model or REGISTERED})
    return cfg.model_copy(update={"model": model, "train": train, "tracking": tracking})


@torch.no_grad()
def prompt_losses(model, latents: np.ndarray, ids: np.ndarray, seed: int, repeats: int = 4) -> float:
    """Mean eps (or v) MSE of a latent diffusion model (its conditioning drop-out off) on latents [n, C, s, s]
    under report ids [n, L], over `repeats` draws of (t, noise) fixed by `seed`: the same draws for every model
    compared."""
    from cxrray.families.ldm.task import loss

    values = []
    for r in range(repeats):
        generator = torch.Generator().manual_seed(seed + r)
        for i in range(0, len(latents), 64):
            chunk = {"latent": torch.from_numpy(latents[i:i + 64]), "tokens": torch.from_numpy(ids[i:i + 64])}
            values += [float(loss(model, chunk, generator))] * len(chunk["latent"])
    return float(np.mean(values))


def _columns(data: Storage, names: list[str], split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(latents float32 [n, C, s, s], token ids int64 [n, L]) of the shards' samples in `split` (None: all), at
    most MEASURE_ROWS."""
    samples = [s for name in names for s in read_tar(data.read_bytes(name), name, extras=True)
               if split is None or s[2]["split"] == split][:MEASURE_ROWS]
    if not samples:
        return np.zeros((0,), np.float32), np.zeros((0,), np.int64)
    column = lambda member: np.stack([decode_extra("npy", s[3][member], f"{s[0]}.{member}")  # noqa: E731
                                      for s in samples])
    return column("latent.npy").astype(np.float32), column("tokens.npy").astype(np.int64)


def dreambooth(checkpoint: str, data_uri: str, output_uri: str, cfg, progress=print) -> dict:
    """Fine-tune the report-conditioned latent diffusion model at `checkpoint` on the latent shards `data_uri`
    (made by its autoencoder and tokenizer) stage by stage (module doc); returns the record, also written as
    `{output_uri}/dreambooth.json`: its `checkpoint` is the last stage's (the fine-tuned model)."""
    from cxrray.io.checkpoint import read_state, resolve_checkpoint
    from cxrray.models.loading import model_identity
    from cxrray.train.pretrain import pretrain

    db: DreamBoothConfig = cfg.dreambooth
    base = resolve_checkpoint(checkpoint).uri
    state = read_state(base)["model"]
    if state.get("family") != "ldm" or not state.get("text"):
        raise InputError(f"{checkpoint} is not a report-conditioned latent diffusion model: DreamBooth fine-tunes "
                         "one on class prompts")
    manifest = read_manifest(data_uri)
    section = manifest.get("latents") or {}
    data = Storage(data_uri)
    if not section.get("tokenizer") or data.read_bytes(section["tokenizer"]).decode() != state["tokenizer"]:
        raise InputError(f"{data_uri} holds no latents tokenised by {checkpoint}'s tokenizer: run `cxrray latents` "
                         "with that model's autoencoder")
    unknown = [s.finding for s in db.stages if s.finding is not None and s.finding not in manifest["label_vocabulary"]]
    if unknown:
        raise InputError(f"dreambooth.stages name findings {unknown} that {data_uri} does not label "
                         f"({manifest['label_vocabulary']})")
    tokenizer = load_tokenizer(state["tokenizer"], state["max_tokens"])
    for stage in db.stages:
        prompt_tokens(tokenizer, stage.prompt)
    out = Storage(output_uri)
    identity = model_identity(base)
    prior_print = hashlib.sha256(dumps({"base": identity["checkpoint"], "images_shown": identity["images_shown"],
                                        **db.model_dump(include={"prior_prompt", "prior_images", "prior_weight",
                                                                 "prior_steps", "seed"})})).hexdigest()[:12]
    prior_store = Storage(f"{out.uri}/prior")
    if db.prior_images and not reusable_part(prior_store, PRIOR_SHARD, prior_print):
        progress(f"[dreambooth] prior: {db.prior_images} samples of the base model under {db.prior_prompt!r}")
        write_shard(prior_store, PRIOR_SHARD, prior_print,
                    prior_samples(base, db, manifest["label_vocabulary"], tokenizer), [], manifest["label_vocabulary"])
    prior_bytes = prior_store.read_bytes(PRIOR_SHARD) if db.prior_images else None
    record = {"base": identity, "data": data.uri, "settings": db.model_dump(), "stages": []}
    previous = base
    for number, stage in enumerate(db.stages, 1):
        stage_store = Storage(f"{out.uri}/data/{stage.name}")
        fingerprint = hashlib.sha256(dumps({"data": [s["sha256"] for s in manifest["shards"]], "prior": prior_print,
                                            "stage": stage.model_dump(), "cap": db.instance_images,
                                            "seed": db.seed, "layout": "one instance shard per source shard"}
                                           )).hexdigest()[:12]
        ids = prompt_tokens(tokenizer, stage.prompt)
        keys, n_train = instance_keys(data, manifest, stage, db.instance_images, db.seed)
        names = {shard["name"]: instance_name(i) for i, shard in enumerate(manifest["shards"]) if shard["name"] in keys}
        shards = {name: (lambda source=source: instance_samples(data, source, keys[source], stage, ids))
                  for source, name in names.items()}
        prior_weight = db.prior_weight * n_train / db.prior_images if db.prior_images else None
        if prior_bytes is not None:
            shards[PRIOR_SHARD] = lambda: weighted_prior(read_tar(prior_bytes, PRIOR_SHARD, extras=True), prior_weight)
        write_dataset(stage_store, data, manifest, shards, fingerprint,
                      {"stage": stage.model_dump(), "base": base, "prior": prior_print})
        counts = {split: sum(load_part(stage_store, n)["splits"].get(split, 0) for n in names.values())
                  for split in ("train", "val")}
        train_cfg = stage_config(cfg, stage, previous)
        run_print = hashlib.sha256(dumps({"data": fingerprint, "init_from": previous,
                                          "train": train_cfg.train.model_dump(mode="json")})).hexdigest()[:12]
        progress(f"[dreambooth] {number}/{len(db.stages)} {stage.name}: {counts.get('train', 0)} instances under "
                 f"{stage.prompt!r} + {db.prior_images} prior samples, {stage.steps} steps from {previous}")
        run = pretrain(train_cfg, stage_store.uri, f"{out.uri}/runs/{stage.name}-{run_print}", progress=progress)
        stage_record = {"name": stage.name, "prompt": stage.prompt, "finding": stage.finding, "steps": stage.steps,
                        "instances": counts, "prior_row_weight": prior_weight, "init_from": previous,
                        "checkpoint": run["latest_checkpoint"], "images_shown": run["images_shown"]}
        stage_record["loss"] = _stage_losses(stage_store, list(names.values()), previous, run["latest_checkpoint"], ids,
                                             db.seed, prior_bytes is not None)
        record["stages"].append(stage_record)
        previous = run["latest_checkpoint"]
    record["checkpoint"] = previous
    out.write_bytes(RECORD, dumps(record))
    return record


def _stage_losses(stage_data: Storage, instances: list[str], before: str, after: str, ids: np.ndarray, seed: int,
                  with_prior: bool) -> dict:
    """The known-answer measure of one stage: held-out (val, else train) instance latents under the stage prompt
    and the prior under the prior prompt, before and after, on the same (t, noise) draws."""
    latents, _ = _columns(stage_data, instances, "val")
    held_out = bool(len(latents))
    if not held_out:
        latents, _ = _columns(stage_data, instances, "train")
    from cxrray.models.loading import load_ema

    prompt = np.stack([ids] * len(latents)).astype(np.int64)
    prior, prior_ids = _columns(stage_data, [PRIOR_SHARD]) if with_prior else (None, None)
    result = {"held_out": held_out}
    for when, uri in (("before", before), ("after", after)):  # each model loaded once
        model = load_ema(uri)
        model.cfg.cond_drop = 0.0  # every row under its own prompt
        result[f"instances_{when}"] = prompt_losses(model, latents, prompt, seed)
        if with_prior:
            result[f"prior_{when}"] = prompt_losses(model, prior, prior_ids, seed)
    return result
