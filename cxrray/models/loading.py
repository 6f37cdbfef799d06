"""Load a trained model of any family from a URI: safetensors + JSON, never pickle.

Accepted URIs: a checkpoint directory (has `COMPLETE`), a pretraining output (has `latest.json`,
resolved to its latest complete checkpoint) — both `file://`/plain paths or `s3://` — and MLflow
model URIs (`models:/NAME/VERSION`, `models:/NAME@ALIAS`, `models:/NAME/latest` or `models:/NAME@latest`
(MLflow reserves "latest" as an alias name, so it means the newest version), `runs:/RUN/model`), whose artifacts are the
checkpoint's `ema.safetensors` and `state.json`. Every job, the Serve app and the MLflow pyfunc load
through here.
"""
from __future__ import annotations

import contextlib
import json
import tempfile
from dataclasses import dataclass
from pathlib import Path

from cxrray import __version__
from cxrray.data.storage import Storage
from cxrray.families import Family, get_family
from cxrray.io.checkpoint import load_weights, read_state, resolve_checkpoint  # noqa: F401 (re-exported)

MLFLOW_SCHEMES = ("models:/", "runs:/")
#: identity fields that may be shown to API clients and written into provenance
PUBLIC = ("name", "family", "version", "images_shown", "z_dim", "image_size", "cxrray")


@dataclass
class LoadedModel:
    model: object  # torch.nn.Module in eval mode
    family: Family
    state: dict  # the checkpoint's state.json
    identity: dict  # PUBLIC fields + "checkpoint"


def model_config(state: dict):
    """The typed model config recorded in a checkpoint's state.json (checkpoints before families: diffae)."""
    spec = {"family": "diffae", **state["model"]}
    return get_family(spec["family"]).config(**spec)


def checkpoint_config(uri: str):
    """The typed model config of the checkpoint named by `uri` (a directory or a pretraining output)."""
    return model_config(read_state(uri))


def _identity(state: dict, name: str, version: str, where: str) -> dict:
    cfg = model_config(state)
    return {"name": name, "family": cfg.family, "version": version, "images_shown": int(state.get("images_shown", 0)),
            "z_dim": getattr(cfg, "z_dim", None), "image_size": cfg.image_size, "cxrray": __version__,
            "checkpoint": where}


@contextlib.contextmanager
def mlflow_uris(tracking_uri: str | None):
    """Point MLflow's tracking and registry at `tracking_uri` for the block, then restore both: they
    are process-global, and a stale registry URI would send later registrations to a dead server."""
    import mlflow

    if not tracking_uri:
        yield
        return
    before = (mlflow.get_tracking_uri(), mlflow.get_registry_uri())
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(before[0])
        mlflow.set_registry_uri(before[1])


def _mlflow_fetch(uri: str, weights: str, into: Path, tracking_uri: str | None) -> tuple[dict, dict]:
    with mlflow_uris(tracking_uri):
        return _mlflow_fetch_here(uri, weights, into)


def _mlflow_fetch_here(uri: str, weights: str, into: Path) -> tuple[dict, dict]:
    import mlflow
    from mlflow.tracking import MlflowClient

    if uri.lower().endswith("@latest"):  # MLflow reserves the alias "latest"; its own form is NAME/latest
        uri = uri[: -len("@latest")] + "/latest"
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(into)))
    found = {name: sorted(local.rglob(name)) for name in ("state.json", weights)}
    for name, paths in found.items():
        if len(paths) != 1:
            raise FileNotFoundError(f"{uri}: expected one {name} among the model's artifacts, found {len(paths)}")
    (into / weights).write_bytes(found[weights][0].read_bytes())
    state = json.loads(found["state.json"][0].read_text())
    name, version = f"cxrray-{model_config(state).family}", uri
    if uri.startswith("models:/"):
        name, _, version = uri[len("models:/"):].partition("/")
        if "@" in name and not version:
            name, alias = name.split("@", 1)
            version = MlflowClient().get_model_version_by_alias(name, alias).version
        elif version.lower() == "latest":
            version = max(int(v.version) for v in MlflowClient().search_model_versions(f"name='{name}'"))
    else:
        version = "run-" + uri[len("runs:/"):].split("/")[0]
    return state, _identity(state, name, str(version), uri)


def model_identity(uri: str, *require: str) -> dict:
    """Name/version facts of a checkpoint for provenance (reads state.json only). Each capability in
    `require` must be the family's, else CapabilityError names the one missing (before any work starts)."""
    store = resolve_checkpoint(uri)
    state = json.loads(store.read_bytes("state.json"))
    family = model_config(state).family
    for capability in require:
        get_family(family).require(capability)
    return _identity(state, f"cxrray-{family}", f"{int(state.get('images_shown', 0))}-images", store.uri)


def load_model(uri: str, weights: str = "ema.safetensors", tracking_uri: str | None = None) -> LoadedModel:
    """The model (EMA weights unless `weights="model.safetensors"`) in eval mode, with its family,
    state and identity."""
    with tempfile.TemporaryDirectory() as tmp:
        if uri.startswith(MLFLOW_SCHEMES):
            state, identity = _mlflow_fetch(uri, weights, Path(tmp), tracking_uri)
        else:
            store = resolve_checkpoint(uri)
            (Path(tmp) / weights).write_bytes(store.read_bytes(weights))
            state = json.loads(store.read_bytes("state.json"))
            identity = model_identity(store.uri)
        cfg = model_config(state)
        family = get_family(cfg.family)
        model = family.build(cfg)
        load_weights(model, Path(tmp) / weights)
    return LoadedModel(model.eval(), family, state, identity)


def load_ema(uri: str, weights: str = "ema.safetensors"):
    """Just the model (EMA weights) in eval mode."""
    return load_model(uri, weights).model
