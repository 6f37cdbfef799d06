"""MLflow: one run per pretraining output, continued across resumes.

Embedded default: a SQLite file `mlflow.db` in the working directory with artifacts under
`mlartifacts/`; `MLFLOW_TRACKING_URI` (or `tracking.uri`) points at a server instead. Workers log
through `MlflowClient` with an explicit run id, so no global active-run state crosses processes.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from cxrray.config import TrackingConfig


def tracking_uri(cfg: TrackingConfig) -> str:
    return cfg.uri or os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{Path.cwd() / 'mlflow.db'}"


def client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return out


PARAM_LIMIT = 6000  # MLflow's longest param value


def _param(value: str) -> str:
    """A param value, or for one too long to log (a tokenizer's JSON) its size and digest: a truncated blob
    would look like the value and is not."""
    if len(value) <= PARAM_LIMIT:
        return value
    import hashlib

    return f"<{len(value):,} characters, sha256 {hashlib.sha256(value.encode()).hexdigest()[:16]}; saved with the model>"


def start_run(cfg: TrackingConfig, params: Mapping[str, Any], run_name: str, run_id: str | None = None) -> str:
    """Create (or continue) a run; params are the full config, flattened (`train.lr`, ...)."""
    uri = tracking_uri(cfg)
    mlflow = client(uri)
    if run_id:
        mlflow.update_run(run_id, status="RUNNING")
        return run_id
    experiment = mlflow.get_experiment_by_name(cfg.experiment)
    if experiment is None:
        location = None
        if uri.startswith("sqlite:") or uri.startswith("file:") or "://" not in uri:
            location = (Path.cwd() / "mlartifacts").resolve().as_uri()
        experiment_id = mlflow.create_experiment(cfg.experiment, artifact_location=location)
    else:
        experiment_id = experiment.experiment_id
    run = mlflow.create_run(experiment_id, run_name=run_name)
    flat = _flatten(params)
    items = sorted(flat.items())
    from mlflow.entities import Param

    for start in range(0, len(items), 100):
        mlflow.log_batch(run.info.run_id, params=[Param(k, _param(v)) for k, v in items[start:start + 100]])
    return run.info.run_id


class RunLogger:
    """Picklable handle workers use to log metrics and artifacts into one run."""

    def __init__(self, uri: str, run_id: str):
        self.uri, self.run_id = uri, run_id

    def metrics(self, values: Mapping[str, float], step: int) -> None:
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        client(self.uri).log_batch(self.run_id, metrics=[Metric(k, float(v), now, step) for k, v in values.items()])

    def artifact(self, path: str | os.PathLike, folder: str | None = None) -> None:
        client(self.uri).log_artifact(self.run_id, str(path), folder)

    def finish(self, status: str = "FINISHED") -> None:
        client(self.uri).set_terminated(self.run_id, status=status)
