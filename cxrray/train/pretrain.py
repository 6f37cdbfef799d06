"""Pretraining driver: `cxrray pretrain` / `jobs/pretrain.py`.

Output layout under the output URI:
    latest.json          the status pointer: images shown + URI of the newest *persisted* checkpoint
    ray/pretrain-<time>/ Ray Train run storage, checkpoints `checkpoint-<images shown>`
`latest.json` moves only in the controller's `after_report` callback, which Ray calls after every
rank's checkpoint files are persisted, so a partially written checkpoint is never pointed at.
A re-submitted job (or a larger `--images`) continues from `latest.json`; a failed worker inside
one run is replaced by Ray Train, which restores the last checkpoint (`FailureConfig`).
"""
from __future__ import annotations

import json
import time
from typing import Callable

from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig, UserCallback

from cxrray.config import Config
from cxrray.data.shards import dumps, read_manifest, sha256
from cxrray.data.storage import Storage
from cxrray.families import get_family
from cxrray.runtime import ensure_ray
from cxrray.train.console import phases
from cxrray.tracking import RunLogger, start_run, tracking_uri
from cxrray.errors import InputError

LATEST = "latest.json"


def read_status(output_uri: str) -> dict | None:
    try:
        return json.loads(Storage(output_uri).read_bytes(LATEST))
    except (FileNotFoundError, OSError):
        return None


class LatestPointer(UserCallback):
    """Runs on the Ray Train controller: records progress and the newest persisted checkpoint."""

    def __init__(self, output_uri: str, run_id: str):
        self.output_uri, self.run_id = output_uri, run_id

    def after_report(self, run_context, metrics, checkpoint):
        status = read_status(self.output_uri) or {}
        report = metrics[0] if metrics else {}
        status.update(mlflow_run_id=self.run_id, last_report=report, updated=time.time())
        if checkpoint is not None:
            scheme = "file" if type(checkpoint.filesystem).__name__ == "LocalFileSystem" else "s3"
            status.update(latest_checkpoint=f"{scheme}://{checkpoint.path}", images_shown=report.get("images_shown"))
        Storage(self.output_uri).write_bytes(LATEST, json.dumps(status, indent=1, sort_keys=True).encode())


def status_summary(output_uri: str) -> dict:
    """What `cxrray status` prints."""
    status = read_status(output_uri)
    if status is None:
        raise FileNotFoundError(f"no {LATEST} under {Storage(output_uri).uri}: nothing trained there yet")
    report = status.get("last_report", {})
    return {"images_shown": status.get("images_shown", 0), "latest_checkpoint": status.get("latest_checkpoint"),
            "loss": report.get("loss"), "images_per_s": report.get("images_per_s"),
            "mlflow_run_id": status.get("mlflow_run_id"), "target_images": status.get("target_images")}


def data_facts(data_uri: str, manifest: dict) -> dict:
    """What a model card and state.json say about the training data."""
    return {"uri": data_uri, "manifest_sha256": sha256(dumps(manifest)), "samples": manifest["samples"],
            "label_vocabulary": manifest["label_vocabulary"], "vocabulary_version": manifest.get("vocabulary_version")}


def _lap(clock: list[float]) -> float:
    """Seconds since the previous lap (clock[0]), which moves to now."""
    now = time.perf_counter()
    elapsed, clock[0] = now - clock[0], now
    return elapsed


def _refuse_another_model(checkpoint: str, model, output_uri: str) -> None:
    """A run continues only the model it started. The requested (prepared) model config must equal the
    checkpoint's, but for the fields its family marks `NOT_THE_MODEL` (initialisation, sampling): a changed
    objective (eps -> v) or schedule would otherwise continue silently on the old weights, or a finished run
    of another model be reported as this one's."""
    from pydantic import ValidationError

    from cxrray.models.loading import checkpoint_config

    try:
        saved = checkpoint_config(checkpoint)
    except ValidationError as err:  # e.g. a field this version no longer has
        raise InputError(f"{output_uri} holds a checkpoint whose model config this version cannot read "
                         f"({err.error_count()} errors, first: {err.errors()[0]['loc']}): train to a new --output") from None
    free = getattr(type(model), "NOT_THE_MODEL", frozenset())
    before, after = saved.model_dump(mode="json"), model.model_dump(mode="json")
    changed = [f"model.{k}: {before.get(k)!r} -> {after.get(k)!r}" for k in sorted(before.keys() | after.keys())
               if k not in free and before.get(k) != after.get(k)]
    if changed:
        raise InputError(f"{output_uri} holds a run of another model ({'; '.join(changed)}): continue it with its "
                         f"own model config, or train this one to a new --output")


def pretrain(cfg: Config, data_uri: str, output_uri: str, progress: Callable[[str], None] = print) -> dict:
    """Train (or continue training) to `cfg.train.images`; returns the status summary."""
    tc = cfg.train
    clock = [time.perf_counter()]
    out = Storage(output_uri)
    previous = read_status(out.uri)
    family = get_family(cfg.model.family)
    manifest = read_manifest(data_uri)
    cfg = cfg.model_copy(update={"model": family.prepare(cfg.model, data_uri)})  # e.g. covariate statistics
    resume = (previous or {}).get("latest_checkpoint")
    if resume:  # before "nothing to do": a finished run of another model must not pass for this one
        _refuse_another_model(resume, cfg.model, out.uri)
    if previous and (previous.get("images_shown") or 0) >= tc.images:
        progress(f"[pretrain] {out.uri} already at {previous['images_shown']:,} >= {tc.images:,} images: nothing to do")
        return status_summary(out.uri)
    # latent shards (`cxrray latents`) are of images at the autoencoder's size, whatever their PNGs' size
    size = (manifest.get("latents") or {}).get("image_size") or manifest["preprocessing"]["size"]
    if size != cfg.model.image_size:
        raise InputError(f"shards at {data_uri} are {size}² but model.image_size is "
                         f"{cfg.model.image_size}: ingest with --size {cfg.model.image_size} or pick another preset")
    startup = {"startup/prepare_s": _lap(clock)}  # status, manifest, the family's preparation (a shard scan for ddpm)
    ensure_ray()
    startup["startup/ray_s"] = _lap(clock)
    from ray.train.torch import TorchConfig, TorchTrainer

    from cxrray.data.stream import head, stream
    from cxrray.train.loop import train_loop_per_worker

    eval_batch = None
    if tc.eval_split and tc.eval_split in manifest["splits"]:
        eval_batch = head(data_uri, tc.eval_split, tc.eval_images, with_keys=False, text=True)
    startup["startup/eval_images_s"] = _lap(clock)
    run_id = start_run(cfg.tracking, {**cfg.model_dump(mode="json"), "data": data_uri, "output": out.uri},
                       run_name=f"pretrain-{family.name}-{cfg.preset}", run_id=(previous or {}).get("mlflow_run_id"))
    logger = RunLogger(tracking_uri(cfg.tracking), run_id)
    startup["startup/mlflow_s"] = _lap(clock)
    initial = {"images_shown": 0, **(previous or {}), "target_images": tc.images, "mlflow_run_id": run_id}
    out.write_bytes(LATEST, json.dumps(initial, indent=1, sort_keys=True).encode())
    workers = f"{tc.min_workers}-{tc.num_workers} (elastic)" if tc.elastic else str(tc.num_workers)
    progress(f"[pretrain] {family.name}: {tc.strategy} x{workers} workers, global batch {tc.global_batch}, "
             f"target {tc.images:,} images" + (f", resuming from {resume}" if resume else ""))
    train_data = stream(data_uri, tc.split, with_keys=False, text=True, shuffle_files=True)
    startup["startup/run_setup_s"] = _lap(clock)  # the status pointer, the training stream's plan
    progress("[pretrain] driver ready: " + phases(startup))
    logger.metrics(startup, step=(previous or {}).get("images_shown") or 0)
    resources = {"CPU": tc.cpus_per_worker, **({"GPU": tc.gpus_per_worker} if tc.use_gpu else {}), **tc.worker_resources}
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.model_dump(mode="json"), "resume_from": resume, "logger": logger,
                           "eval_batch": eval_batch, "data": data_facts(data_uri, manifest),
                           "fit_called_at": time.time()},
        scaling_config=ScalingConfig(num_workers=(tc.min_workers, tc.num_workers) if tc.elastic else tc.num_workers,
                                     elastic_resize_monitor_interval_s=tc.resize_check_s, use_gpu=tc.use_gpu,
                                     resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if tc.use_gpu else "gloo"),
        datasets={"train": train_data},
        run_config=RunConfig(
            name=f"pretrain-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=out.path("ray"),
            storage_filesystem=out.fs, failure_config=FailureConfig(max_failures=tc.max_failures, max_preemption_failures=tc.max_preemption_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=tc.keep_checkpoints),
            callbacks=[LatestPointer(out.uri, run_id)]),
    )
    try:
        trainer.fit()
    except Exception:
        logger.finish("FAILED")
        raise
    summary = status_summary(out.uri)
    from cxrray.train.registry import register_model

    version = register_model(cfg, summary["latest_checkpoint"], logger)
    logger.finish()
    progress(f"[pretrain] done: {summary['images_shown']:,} images shown, checkpoint {summary['latest_checkpoint']}, "
             f"MLflow run {run_id}, registered {cfg.tracking.model_name(family.name)} v{version}")
    return {**summary, "registered_version": version}
