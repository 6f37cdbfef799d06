"""Register a checkpoint's EMA weights as an MLflow model version (pyfunc from code, safetensors)."""
from __future__ import annotations

import tempfile
from pathlib import Path

from cxrray.config import Config
from cxrray.data.storage import Storage

MODEL_CODE = Path(__file__).resolve().parents[1] / "models" / "mlflow_pyfunc.py"


def register_model(cfg: Config, checkpoint_uri: str, logger) -> str | None:
    """Log `ema.safetensors` + `state.json` of the checkpoint as the run's model and register it."""
    import mlflow

    store = Storage(checkpoint_uri)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {}
        for key, name in (("ema", "ema.safetensors"), ("state", "state.json")):
            (Path(tmp) / name).write_bytes(store.read_bytes(name))
            artifacts[key] = str(Path(tmp) / name)
        mlflow.set_tracking_uri(logger.uri)
        with mlflow.start_run(run_id=logger.run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=str(MODEL_CODE), artifacts=artifacts,
                                           pip_requirements=["cxrray"],
                                           registered_model_name=cfg.tracking.registered_model)
    return str(info.registered_model_version) if info.registered_model_version is not None else None
