"""Load a trained DiffAE from a checkpoint URI (file:// or s3://): safetensors + JSON, never pickle.

A URI may name a checkpoint directory (has `COMPLETE`) or a pretraining output (has `latest.json`,
resolved to its latest complete checkpoint).
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from cxrray import __version__
from cxrray.data.storage import Storage
from cxrray.models.diffae import DiffAE, DiffAEConfig
from cxrray.train.state import load_weights

MODEL_NAME = "cxrray-diffae"


def resolve_checkpoint(uri: str) -> Storage:
    """The complete checkpoint directory named by `uri` (directly or through latest.json)."""
    store = Storage(uri)
    if store.exists("COMPLETE"):
        return store
    if store.exists("latest.json"):
        latest = json.loads(store.read_bytes("latest.json"))["latest_checkpoint"]
        return resolve_checkpoint(latest)
    raise FileNotFoundError(f"{store.uri} is not a complete cxrray checkpoint (no COMPLETE marker) "
                            f"nor a pretraining output (no latest.json)")


def load_ema(checkpoint_uri: str, weights: str = "ema.safetensors") -> DiffAE:
    """The checkpoint's EMA model in eval mode (`weights="model.safetensors"` for the raw weights)."""
    store = resolve_checkpoint(checkpoint_uri)
    state = json.loads(store.read_bytes("state.json"))
    model = DiffAE(DiffAEConfig(**state["model"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / weights
        path.write_bytes(store.read_bytes(weights))
        load_weights(model, path)
    return model.eval()


def model_identity(checkpoint_uri: str) -> dict:
    """Name/version facts for provenance: {name, version, images_shown, checkpoint, z_dim, image_size, cxrray}."""
    store = resolve_checkpoint(checkpoint_uri)
    state = json.loads(store.read_bytes("state.json"))
    shown = int(state.get("images_shown", 0))
    return {"name": MODEL_NAME, "version": f"{shown}-images", "images_shown": shown, "checkpoint": store.uri,
            "z_dim": state["model"]["z_dim"], "image_size": state["model"]["image_size"], "cxrray": __version__}
