"""The one Ray Train worker loop, for every model family (`cxrray.families`).

The family builds the network and owns the objective (`loss(model, batch)` on the whole batch dict);
the loop owns everything else, once: the images-shown schedule, EMA, optimiser/DeepSpeed, periodic
evaluation, checkpoints, restore and metrics.

Every rank runs the same schedule, counted in images shown (`global_batch` per optimizer step), so
the metric/eval/checkpoint reports (which are barriers) line up across ranks. Restore order: the
checkpoint Ray hands back after a worker failure, else `resume_from` (the output's latest pointer).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch

from cxrray.config import Config
from cxrray.families import get_family
from cxrray.io import checkpoint as ckpt_io
from cxrray.io.card import model_card
from cxrray.train.console import phases, say
from cxrray.train.ema import ema_model
from cxrray.train.engine import build_engine
from cxrray.train.optimizer_state import full_state, load_full_state
from cxrray.train.evaluate import evaluate


def crossed(before: int, after: int, every: int) -> bool:
    """True when a multiple of `every` lies in (before, after]."""
    return after // every > before // every


def to_torch(batch: dict, device: torch.device | None = None) -> dict:
    """A numpy stream batch -> the dict a family's loss gets: numeric columns as tensors (on `device`),
    text columns (report, .txt members) as lists of str."""
    out = {}
    for name, value in batch.items():
        value = np.asarray(value)
        if value.dtype == object or value.dtype.kind in "US":
            out[name] = [str(v) for v in value]
        else:
            # Ray Data hands read-only arrays; torch warns on those (and a write through the tensor would fail)
            tensor = torch.as_tensor(value if value.flags.writeable else value.copy())
            out[name] = tensor.to(device, non_blocking=True) if device is not None else tensor
    return out


def train_loop_per_worker(config: dict) -> None:
    # start-up phases (wall clock: comparable with the driver's on one machine, skewed across nodes); a restart
    # from Ray's checkpoint after a failure does not report them (a restart before any checkpoint would count the
    # failed attempt in its first phase)
    restored = ray.train.get_checkpoint()
    clock = None if restored else {"fit_called": config.get("fit_called_at") or time.time(), "worker_started": time.time()}
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    cfg = Config.model_validate(config["config"])
    tc = cfg.train
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.manual_seed(tc.seed * 1000 + rank)
    np.random.seed(tc.seed * 1000 + rank)

    family = get_family(cfg.model.family)
    model = family.build(cfg.model)
    _tick(clock, "model_built")
    checkpoint = restored or _checkpoint_at(config.get("resume_from"))
    progress = {"images_shown": 0, "step": 0, "ema_updates": 0}
    with (checkpoint.as_directory() if checkpoint else contextlib.nullcontext()) as folder:
        saved = json.loads((Path(folder) / "state.json").read_text()) if folder else None
        if saved:
            ckpt_io.load_weights(model, Path(folder) / "model.safetensors")
        else:
            family.initialise(model)  # parts trained elsewhere (a frozen autoencoder)
        ema = ema_model(model, tc.ema_decay)
        engine = build_engine(model, family, tc, world, device)
        ema.to(device)
        if saved:
            progress.update({k: saved[k] for k in progress})
            ckpt_io.load_weights(ema.module, Path(folder) / "ema.safetensors")
            ema.n_averaged.fill_(max(1, saved["ema_updates"]))
            same_layout = (saved["world_size"], saved["strategy"], saved["zero_stage"]) == (world, tc.strategy, tc.zero_stage)
            change = (f"from {saved['world_size']} {saved['strategy']} workers (ZeRO {saved['zero_stage']}) to {world} "
                      f"{tc.strategy} (ZeRO {tc.zero_stage})")
            if same_layout and (Path(folder) / f"optimizer-rank{rank}.json").exists():  # exact, RNG included
                for name, optimizer in engine.optimizers().items():
                    optimizer.load_state_dict(ckpt_io.load_state(Path(folder), f"{name}-rank{rank}"))
                ckpt_io.set_rng_state(ckpt_io.load_state(Path(folder), f"rng-rank{rank}"))
            elif (Path(folder) / "optimizer-full.json").exists():  # another layout: the gathered state, spread again
                restored = load_full_state(engine, ckpt_io.load_state(Path(folder), "optimizer-full"))
                if rank == 0:
                    say(f"[pretrain] optimizer state re-partitioned {change}: {', '.join(restored) or 'none saved'}")
            elif rank == 0:
                say(f"[pretrain] optimizer state not restored: layout changed {change}")
            if rank == 0:
                say(f"[pretrain] resumed at {progress['images_shown']:,} images shown")

    _tick(clock, "engine_ready")
    logger = config.get("logger")
    eval_batch = to_torch(config["eval_batch"]) if config.get("eval_batch") else None
    micro, accumulation = tc.batch_plan(world)  # exact global batch at whatever size the run has now
    if rank == 0:  # at every (re)start of the worker group: an elastic run's size, as it changes
        say(f"[pretrain] {world} workers: micro-batch {micro} x accumulation {accumulation} x {world} = "
            f"global batch {tc.global_batch}")
    shard = ray.train.get_dataset_shard("train")
    window = {"loss": 0.0, "steps": 0, "wait": 0.0, "busy": 0.0, "start": time.perf_counter(), "grad": 0.0, "extra": {}}
    last_metrics: dict = {}
    data_facts = config.get("data") or {}  # recorded with every checkpoint
    noticed: set[str] = set()  # nodes whose preemption notice was answered with a checkpoint
    epoch = 0
    while progress["images_shown"] < tc.images:
        epoch += 1
        fetched = time.perf_counter()
        batches = shard.iter_batches(batch_size=micro, batch_format="numpy", drop_last=True,
                                     local_shuffle_buffer_size=4 * micro * accumulation,
                                     local_shuffle_seed=tc.seed + epoch + progress["step"])
        for group in _groups(batches, accumulation):
            started = time.perf_counter()
            window["wait"] += started - fetched
            _tick(clock, "first_batch")
            loss, grad = engine.step([to_torch(batch, device) for batch in group])
            if clock is not None and "first_step" not in clock:
                _tick(clock, "first_step")
                if rank == 0:
                    _report_startup(clock, logger, progress["images_shown"])
            ema.update_parameters(engine.model)
            before = progress["images_shown"]
            progress["images_shown"] += tc.global_batch
            progress["step"] += 1
            progress["ema_updates"] += 1
            window["loss"] += loss
            window["grad"] += grad if math.isfinite(grad) else 0.0
            for name, value in engine.last.items():  # further objectives' losses and grad norms
                window["extra"][name] = window["extra"].get(name, 0.0) + (value if math.isfinite(value) else 0.0)
            window["steps"] += 1
            fetched = time.perf_counter()
            window["busy"] += fetched - started
            now, done = progress["images_shown"], progress["images_shown"] >= tc.images
            if crossed(before, now, tc.log_every) or done:
                last_metrics = _window_metrics(window, progress, tc)
                if rank == 0:
                    _print_progress(last_metrics, tc.images)
                    if logger:
                        logger.metrics(last_metrics, step=now)
            if rank == 0 and eval_batch is not None and (crossed(before, now, tc.eval_every) or done):
                scores = evaluate(family, ema.module, eval_batch, cfg, now, logger)
                last_metrics.update(scores)
            checkpointed = crossed(before, now, tc.checkpoint_every) or done
            if checkpointed:
                _save_and_report(engine, ema, progress, last_metrics, cfg, rank, world, data_facts)
            elif crossed(before, now, tc.log_every):
                ray.train.report(last_metrics)
            if tc.preemption_check_every and crossed(before, now, tc.preemption_check_every) and not done:
                notice = ray.train.get_preemption_info()  # a collective: every rank asks at the same step
                if notice is not None and not set(notice.preempted_node_ids) <= noticed:
                    noticed.update(notice.preempted_node_ids)
                    if rank == 0:
                        say(_preemption_line(notice, now, checkpointed))
                    if not checkpointed:  # the run restarts from it when the node goes
                        _save_and_report(engine, ema, progress, last_metrics, cfg, rank, world, data_facts)
            if done:
                break


def _groups(batches, size: int):
    """Consecutive lists of `size` batches; an incomplete last list is dropped (as drop_last drops a short batch)."""
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []


def _tick(clock: dict | None, phase: str) -> None:
    """Record when `phase` ended (its first occurrence only); no-op without a clock."""
    if clock is not None:
        clock.setdefault(phase, time.time())


def _report_startup(clock: dict, logger, step: int) -> None:
    """Print and log (once, rank 0) where the time went between `trainer.fit()` and the first optimizer step."""
    marks = list(clock.items())
    startup = {f"startup/{name}_s": t - marks[i][1] for i, (name, t) in enumerate(marks[1:])}
    say("[pretrain] first step after " + phases(startup))
    if logger:
        logger.metrics(startup, step=step)


def _window_metrics(window: dict, progress: dict, tc) -> dict:
    elapsed = max(time.perf_counter() - window["start"], 1e-9)
    steps = max(window["steps"], 1)
    metrics = {"loss": window["loss"] / steps, "images_per_s": steps * tc.global_batch / elapsed,
               "data_wait_fraction": window["wait"] / max(window["wait"] + window["busy"], 1e-9),
               "grad_norm": window["grad"] / steps, "lr": tc.lr,
               "images_shown": progress["images_shown"], "step": progress["step"],
               **{name: total / steps for name, total in window["extra"].items()}}
    window.update(loss=0.0, steps=0, wait=0.0, busy=0.0, grad=0.0, extra={}, start=time.perf_counter())
    return metrics


def _print_progress(m: dict, target: int) -> None:
    eta = max(target - m["images_shown"], 0) / max(m["images_per_s"], 1e-9)
    say(f"[pretrain] {m['images_shown']:,}/{target:,} images  loss {m['loss']:.4f}  {m['images_per_s']:.1f} img/s  "
        f"data-wait {100 * m['data_wait_fraction']:.0f}%  ETA {int(eta // 60)}m{int(eta % 60):02d}s")


def _preemption_line(notice, images_shown: int, already_saved: bool) -> str:
    left = f"{max(0.0, notice.deadline_ms / 1000 - time.time()):.0f} s" if notice.deadline_ms else "no deadline"
    nodes = ", ".join(f"{node[:8]} (ranks {ranks})" for node, ranks in sorted(notice.preempted_node_to_ranks.items()))
    action = "just checkpointed" if already_saved else "checkpoint now"
    return f"[pretrain] preemption notice: node {nodes} reclaimed in {left}; {action} at {images_shown:,} images shown"


def _save_and_report(engine, ema, progress: dict, metrics: dict, cfg: Config, rank: int, world: int,
                     data: dict) -> None:
    with tempfile.TemporaryDirectory(prefix="cxrray-ckpt-") as tmp:
        folder = Path(tmp)
        for name, optimizer in engine.optimizers().items():
            ckpt_io.save_state(optimizer.state_dict(), folder, f"{name}-rank{rank}")
        ckpt_io.save_state(ckpt_io.rng_state(), folder, f"rng-rank{rank}")
        whole = full_state(engine, keep=rank == 0)  # collective: every rank takes part in ZeRO's gathers
        if rank == 0:
            ckpt_io.save_state(whole, folder, "optimizer-full")
            ckpt_io.save_weights(engine.model, folder / "model.safetensors")
            ckpt_io.save_weights(ema.module, folder / "ema.safetensors")
            state = {**progress, "world_size": world, "strategy": cfg.train.strategy,
                     "zero_stage": cfg.train.zero_stage, "metrics": metrics,
                     "model": cfg.model.model_dump(mode="json"), "config": cfg.model_dump(mode="json")}
            (folder / "state.json").write_text(json.dumps({**state, "data": data}, indent=1))
            family = get_family(cfg.model.family)
            (folder / "README.md").write_text(model_card(family.name, family.description, state["model"], data,
                                                         progress["images_shown"], metrics))
            (folder / "COMPLETE").write_text(str(progress["images_shown"]))
        ray.train.report({**metrics, "images_shown": progress["images_shown"]},
                         checkpoint=ray.train.Checkpoint.from_directory(tmp),
                         checkpoint_dir_name=f"checkpoint-{progress['images_shown']:012d}")


def _checkpoint_at(uri: str | None):
    if not uri:
        return None
    from cxrray.data.storage import Storage

    store = Storage(uri)
    return ray.train.Checkpoint(path=store.path(), filesystem=store.fs)

