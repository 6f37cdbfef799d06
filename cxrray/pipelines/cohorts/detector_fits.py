"""Fitting the cohort experiment's detectors: one Ray Train run per (arm, seed), the grid fanned out
with Ray Tune so every fit of the grid that the cluster has room for runs at once.

Each fit trains `EchoDetector` on its arm's resampled rows (`echo_sets.arm_index`), stops early on the
real validation split's Gaussian NLL (`experiment.patience`), and rank 0 writes under the output URI:

  fits/<arm>-seed<k>/detector.safetensors   the best epoch's weights
  fits/<arm>-seed<k>/predictions.npz        val_prob/test_prob [N, 3], test_mean/test_log_var [N, 3] (z-units)
  fits/<arm>-seed<k>/fit.json               fingerprint, history, best epoch, rows drawn (written last)

A fit whose fit.json carries the same fingerprint is not run again, so a killed experiment, rerun,
fits each (arm, seed) exactly once. The arrays travel once through the object store (`ray.put`).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
import time

import numpy as np
import torch
from ray.tune import Callback

from cxrray.data.imaging import png16_to_model
from cxrray.data.storage import Storage
from cxrray.pipelines.cohorts.echo_sets import arm_index
from cxrray.pipelines.fanout import eta
from cxrray.pipelines.judges import train_epochs
from cxrray.pipelines.settings import ExperimentConfig

DONE = "fit.json"
TRAINING_FIELDS = ("size_factor", "positive", "width", "epochs", "patience", "batch_size", "lr", "seed")


def fit_folder(arm: str, seed: int) -> str:
    """"base+gen(pos)", 3 -> "fits/base-gen-pos-seed3"."""
    return f"fits/{re.sub(r'[^a-z0-9]+', '-', arm).strip('-')}-seed{seed}"


def fingerprint(cfg: ExperimentConfig, data_digest: str, arm: str, seed: int) -> str:
    """What one fit's result depends on: the training settings, the data and (arm, seed)."""
    fields = {k: getattr(cfg, k) for k in TRAINING_FIELDS}
    text = json.dumps({"cfg": fields, "data": data_digest, "arm": arm, "seed": seed}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def finished(out: Storage, arm: str, seed: int, expected: str) -> dict | None:
    try:
        record = json.loads(out.read_bytes(f"{fit_folder(arm, seed)}/{DONE}"))
    except (FileNotFoundError, OSError):
        return None
    return record if record.get("fingerprint") == expected else None


def demographics(age: np.ndarray, sex: np.ndarray, age_mean: float, age_sd: float) -> np.ndarray:
    """[N, 2] float32: age z-score (0 when unknown) and sex (1 M / 0 F)."""
    z = np.where(np.isnan(age), 0.0, (age - age_mean) / age_sd)
    return np.stack([z, sex], axis=1).astype(np.float32)


def _inputs(part: dict, stats: dict, rows: np.ndarray | None = None) -> dict[str, torch.Tensor]:
    take = slice(None) if rows is None else rows
    return {"image": torch.from_numpy(np.array(part["image"][take])),  # a copy: object-store arrays are read-only
            "demo": torch.from_numpy(demographics(part["age"][take], part["sex"][take], stats["age_mean"], stats["age_sd"])),
            "target": torch.from_numpy(((part["echo"][take] - stats["echo_mean"]) / stats["echo_sd"]).astype(np.float32)),
            "sex": torch.from_numpy(np.array(part["sex"][take]))}


def _concat(a: dict, b: dict) -> dict:
    return {k: torch.cat([a[k], b[k]]) for k in a}


def _forward(model, batch: dict, device) -> tuple[torch.Tensor, torch.Tensor]:
    image = torch.as_tensor(png16_to_model(batch["image"].numpy()))[:, None].to(device)
    return model(image, batch["demo"].to(device))


@torch.no_grad()
def predict(model, data: dict, stats: dict, device, batch_size: int = 256) -> dict[str, np.ndarray]:
    """-> mean, log_var [N, 3] (z-units), prob [N, 3] (slvh, dlv, composite)."""
    from cxrray.pipelines.cohorts.detector import label_probabilities

    model.eval()
    means, log_vars = [], []
    for start in range(0, len(data["image"]), batch_size):
        chunk = {k: v[start:start + batch_size] for k, v in data.items()}
        mean, log_var = _forward(model, chunk, device)
        means.append(mean.float().cpu())
        log_vars.append(log_var.float().cpu())
    mean, log_var = torch.cat(means), torch.cat(log_vars)
    prob = label_probabilities(mean, log_var, data["sex"], torch.as_tensor(stats["echo_mean"]),
                               torch.as_tensor(stats["echo_sd"]))
    return {"mean": mean.numpy(), "log_var": log_var.numpy(), "prob": prob.numpy()}


def fit_detector(data: dict, stats: dict, cfg: ExperimentConfig, arm: str, seed: int, device, rank: int = 0,
                 world: int = 1, wrap=lambda net: net, report=lambda metrics: None) -> dict:
    """One (arm, seed) fit in the calling process (a Ray Train worker, or a plain loop): `wrap` makes the
    training module (DDP), `report` receives each epoch's metrics. -> the best net, its record and its
    val / test predictions."""
    from cxrray.pipelines.cohorts.detector import EchoDetector, nll

    index_base, index_gen = arm_index(arm, len(data["base"]["key"]), data["gen"]["labels"], cfg.positive,
                                      cfg.size_factor, cfg.seed * 1000 + seed)
    train = _concat(_inputs(data["base"], stats, index_base), _inputs(data["gen"], stats, index_gen))
    val, test = _inputs(data["val"], stats), _inputs(data["test"], stats)
    torch.manual_seed(cfg.seed * 1000 + seed)
    net = EchoDetector(cfg.width)
    model = wrap(net)

    def loss(m, batch):
        mean, log_var = _forward(m, batch, device)
        return nll(mean, log_var, batch["target"].to(device))

    def validate(n) -> float:
        seen = predict(n, val, stats, device)
        return float(nll(torch.from_numpy(seen["mean"]), torch.from_numpy(seen["log_var"]), val["target"]))

    best_state, best, best_epoch, history = train_epochs(model, net, train, loss, validate, cfg, cfg.seed * 1000 + seed,
                                                         rank, world, report)
    net.load_state_dict(best_state)
    record = {"arm": arm, "seed": seed, "best_epoch": best_epoch, "best_val_nll": best, "epochs_run": len(history),
              "history": history,
              "rows": {"base": int(len(index_base)), "gen": int(len(index_gen)),
                       "distinct_base": int(len(np.unique(index_base))), "distinct_gen": int(len(np.unique(index_gen)))}}
    return {"net": net, "state": best_state, "record": record, "val": predict(net, val, stats, device),
            "test": predict(net, test, stats, device)}


def fit_worker(config: dict) -> None:
    """Ray Train loop of one fit (see module doc); every rank reports each epoch's validation NLL."""
    import ray
    import ray.train
    import ray.train.torch
    from safetensors.torch import save

    cfg = ExperimentConfig(**config["cfg"])
    arm, seed = config["arm"], config["seed"]
    torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
    ctx = ray.train.get_context()
    fit = fit_detector(ray.get(config["data"][0]), config["stats"], cfg, arm, seed, ray.train.torch.get_device(),
                       ctx.get_world_rank(), ctx.get_world_size(), ray.train.torch.prepare_model, ray.train.report)
    if ctx.get_world_rank() != 0:
        return
    out, folder = Storage(config["output"]), fit_folder(arm, seed)
    buffer = io.BytesIO()
    np.savez(buffer, val_prob=fit["val"]["prob"], test_prob=fit["test"]["prob"], test_mean=fit["test"]["mean"],
             test_log_var=fit["test"]["log_var"])
    out.write_bytes(f"{folder}/predictions.npz", buffer.getvalue())
    out.write_bytes(f"{folder}/detector.safetensors", save(fit["state"], metadata={"arm": arm, "seed": str(seed)}))
    record = {"fingerprint": config["fingerprint"], **fit["record"]}
    out.write_bytes(f"{folder}/{DONE}", json.dumps(record, indent=1).encode())


def _trial(config: dict, data: list, storage: tuple) -> None:
    """Tune function trainable: one fit as a Ray Train run whose reports Tune receives."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    config = {**config, **config["unit"]}
    cfg = ExperimentConfig(**config["cfg"])
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": 1} if cfg.use_gpu else {})}
    TorchTrainer(
        fit_worker, train_loop_config={**config, "data": data},
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=cfg.use_gpu, resources_per_worker=resources),
        torch_config=TorchConfig(backend="nccl" if cfg.use_gpu else "gloo"),
        run_config=RunConfig(name=f"{fit_folder(config['arm'], config['seed']).split('/')[1]}-{time.strftime('%H%M%S')}",
                             storage_path=storage[0], storage_filesystem=storage[1],
                             callbacks=[TuneReportCallback()]),
    ).fit()


def run_fits(data: dict, stats: dict, cfg: ExperimentConfig, output_uri: str, data_digest: str,
             progress=print) -> dict[tuple[str, int], dict]:
    """Fit every (arm, seed) not already finished; returns {(arm, seed): fit.json record}."""
    import ray
    from ray import tune

    out = Storage(output_uri)
    grid = [(arm, seed) for arm in cfg.arms for seed in range(cfg.seeds)]
    prints = {g: fingerprint(cfg, data_digest, *g) for g in grid}
    todo = [g for g in grid if finished(out, *g, prints[g]) is None]
    progress(f"[experiment] {len(grid) - len(todo)}/{len(grid)} fits already done; fitting {len(todo)} "
             f"({', '.join(f'{a} seed {s}' for a, s in todo[:6])}{' ...' if len(todo) > 6 else ''})")
    if todo:
        ref = ray.put(data)
        storage = (out.path("ray"), out.fs)
        # the trial only drives its Ray Train run: no CPU (Tune needs some resource, so a token of memory)
        trainable = tune.with_resources(tune.with_parameters(_trial, data=[ref], storage=storage),
                                        {"CPU": 0, "memory": 2**20})
        tuner = tune.Tuner(
            trainable,
            param_space={"cfg": cfg.model_dump(mode="json"), "stats": stats, "output": out.uri,
                         "unit": tune.grid_search([{"arm": a, "seed": s, "fingerprint": prints[(a, s)]} for a, s in todo])},
            tune_config=tune.TuneConfig(max_concurrent_trials=concurrent_fits(cfg, ray.cluster_resources())),
            run_config=tune.RunConfig(name=f"experiment-{time.strftime('%Y%m%d-%H%M%S')}", storage_path=out.path("ray"),
                                      storage_filesystem=out.fs, verbose=0,
                                      callbacks=[_Progress(len(todo))]),
        )
        results = tuner.fit()
        errors = [str(r.error).splitlines()[0] for r in results if r.error is not None]
        if errors:
            raise RuntimeError(f"[experiment] {len(errors)} of {len(todo)} fits failed; first: {errors[0]}")
    records = {g: finished(out, *g, prints[g]) for g in grid}
    missing = [g for g, r in records.items() if r is None]
    if missing:
        raise RuntimeError(f"[experiment] fits without results: {missing[:5]}")
    return records


def concurrent_fits(cfg: ExperimentConfig, cluster: dict) -> int:
    """Fits at once: `cfg.max_concurrent`, else as many whole fits as the cluster's current CPUs (and GPUs
    with `use_gpu`) hold. Trials hold no CPU, so without this bound Tune starts every fit at once and the
    surplus Ray Train runs time out waiting for workers (measured: 20 fits on 2 CPUs, 0.1 fits/min)."""
    if cfg.max_concurrent:
        return cfg.max_concurrent
    fits = int(cluster.get("CPU", 0) // (cfg.num_workers * cfg.cpus_per_worker))
    if cfg.use_gpu:
        fits = min(fits, int(cluster.get("GPU", 0) // cfg.num_workers))
    return max(1, fits)


class _Progress(Callback):
    """Prints `[experiment] fits i/N  ARM seed k: best val NLL v at epoch e  r fits/min  ETA m:ss`."""

    def __init__(self, total: int):  # no callable kept: Tune pickles its callbacks
        self.total = total
        self.start, self.done = time.perf_counter(), 0

    def on_trial_complete(self, iteration, trials, trial, **info):
        self.done += 1
        last, unit = trial.last_result or {}, trial.config["unit"]
        elapsed = time.perf_counter() - self.start
        print(f"[experiment] fits {self.done}/{self.total}  {unit['arm']} seed {unit['seed']}: best val NLL "
                      f"{last.get('best_val_nll', float('nan')):.3f} at epoch {last.get('best_epoch', '?')}  "
                      f"{self.done / elapsed * 60:.1f} fits/min  ETA {eta(self.done, self.total, elapsed)}", flush=True)
