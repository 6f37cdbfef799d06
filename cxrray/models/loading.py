"""Load a trained DiffAE from a checkpoint URI (file:// or s3://): safetensors + JSON, never pickle."""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

from cxrray.data.storage import Storage
from cxrray.models.diffae import DiffAE, DiffAEConfig
from cxrray.train.state import load_weights


def load_ema(checkpoint_uri: str, weights: str = "ema.safetensors") -> DiffAE:
    """The checkpoint's EMA model in eval mode (`weights="model.safetensors"` for the raw weights)."""
    store = Storage(checkpoint_uri)
    if not store.exists("COMPLETE"):
        raise FileNotFoundError(f"{store.uri} is not a complete cxrray checkpoint (no COMPLETE marker)")
    state = json.loads(store.read_bytes("state.json"))
    model = DiffAE(DiffAEConfig(**state["model"]))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / weights
        path.write_bytes(store.read_bytes(weights))
        load_weights(model, path)
    return model.eval()
