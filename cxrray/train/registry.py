"""Register a checkpoint's EMA weights as an MLflow model version (pyfunc from code, safetensors)."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from cxrray.config import Config
from cxrray.data.storage import Storage
from cxrray.families import get_family
from cxrray.models.loading import mlflow_uris

MODEL_CODE = Path(__file__).resolve().parents[1] / "models" / "mlflow_pyfunc.py"


def _predict_signature(family: str):
    """For a model whose pyfunc generates (no encode / reconstruct): no input schema (a condition table) and
    the `steps` and `seed` params (MLflow passes predict params only when the signature declares them). None
    for image-input models (a params-only signature makes MLflow reshape their arrays)."""
    if get_family(family).capabilities & {"encode", "reconstruct", "upscale"}:
        return None
    from mlflow.models import ModelSignature
    from mlflow.types import ParamSchema, ParamSpec

    return ModelSignature(inputs=None, params=ParamSchema([ParamSpec("steps", "long", 50), ParamSpec("seed", "long", 0)]))


def register_model(cfg: Config, checkpoint_uri: str, logger) -> str | None:
    """Log `ema.safetensors` + `state.json` (+ the model card) of the checkpoint as the run's model,
    register it as `cxrray-<family>` with tags and the card as description. `models:/cxrray-<family>@latest`
    (or MLflow's own `/latest`) then loads the newest version: MLflow reserves "latest" as an alias name."""
    import mlflow
    from mlflow.tracking import MlflowClient

    store = Storage(checkpoint_uri)
    name = cfg.tracking.model_name(cfg.model.family)
    with tempfile.TemporaryDirectory() as tmp:
        artifacts = {}
        for key, file in (("ema", "ema.safetensors"), ("state", "state.json"), ("card", "README.md")):
            if store.exists(file):
                (Path(tmp) / file).write_bytes(store.read_bytes(file))
                artifacts[key] = str(Path(tmp) / file)
        with mlflow_uris(logger.uri), mlflow.start_run(run_id=logger.run_id):
            info = mlflow.pyfunc.log_model(name="model", python_model=str(MODEL_CODE), artifacts=artifacts,
                                           pip_requirements=["cxrray"], registered_model_name=name,
                                           signature=_predict_signature(cfg.model.family))
    version = info.registered_model_version
    if version is None:
        return None
    state = json.loads(store.read_bytes("state.json"))
    client = MlflowClient(tracking_uri=logger.uri, registry_uri=logger.uri)
    for key, value in {"family": cfg.model.family, "images_shown": state.get("images_shown"),
                       "checkpoint": store.uri, "synthetic_outputs": "true"}.items():
        client.set_model_version_tag(name, str(version), key, str(value))
    if store.exists("README.md"):
        client.update_model_version(name, str(version), description=store.read_bytes("README.md").decode())
    return str(version)
