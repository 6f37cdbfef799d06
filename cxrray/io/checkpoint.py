"""Checkpoint files without pickle: tensors in safetensors, everything else in JSON.

A checkpoint directory holds

| file                          | written by | content                                                  |
|-------------------------------|------------|----------------------------------------------------------|
| model.safetensors             | rank 0     | fp32 weights of the trained module                       |
| ema.safetensors               | rank 0     | EMA weights (same keys)                                  |
| optimizer-rank{r}.safetensors | every rank | that rank's optimizer state (ZeRO partition or full)     |
| optimizer-rank{r}.json        | every rank | non-tensor part of the optimizer state                   |
| optimizer-full.safetensors/.json | rank 0  | every objective's Adam state by parameter name, whole    |
|                               |            | (gathered from ZeRO's partitions: loads at any world size) |
| rng-rank{r}.safetensors/.json | every rank | torch / numpy / python RNG states                        |
| state.json                    | rank 0     | images_shown, step, world_size, strategy, config, stats  |
| COMPLETE                      | rank 0     | written last by rank 0: marks its part of the directory  |

Ray Train merges the ranks' files into one directory in storage and registers the checkpoint only
after every rank has reported, so a registered checkpoint is complete. Loading never unpickles:
safetensors and `json` only.
"""
from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, load_file, save_file

from cxrray.data.storage import Storage

TENSOR = "__tensor__"


def flatten_state(obj: Any, prefix: str = "") -> tuple[Any, dict[str, torch.Tensor]]:
    """Nested dict/list state -> (JSON skeleton with tensor placeholders, {key: tensor})."""
    tensors: dict[str, torch.Tensor] = {}

    def walk(node: Any, path: str) -> Any:
        if isinstance(node, torch.Tensor):
            tensors[path] = node.detach().cpu().contiguous()
            return {TENSOR: path}
        if isinstance(node, dict):
            return {"__dict__": [[_key(k), walk(v, f"{path}.{k}")] for k, v in node.items()]}
        if isinstance(node, (list, tuple)):
            return [walk(v, f"{path}.{i}") for i, v in enumerate(node)]
        if node is None or isinstance(node, (bool, int, float, str)):
            return node
        raise TypeError(f"cannot store {type(node).__name__} at {path!r} without pickle")

    return walk(obj, prefix or "s"), tensors


def _key(k: Any) -> list:
    if isinstance(k, bool) or not isinstance(k, (int, str)):
        raise TypeError(f"state dict key {k!r} must be int or str")
    return ["int", k] if isinstance(k, int) else ["str", k]


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict) and TENSOR in skeleton:
        return tensors[skeleton[TENSOR]]
    if isinstance(skeleton, dict) and "__dict__" in skeleton:
        return {(int(k) if kind == "int" else k): unflatten_state(v, tensors) for (kind, k), v in skeleton["__dict__"]}
    if isinstance(skeleton, list):
        return [unflatten_state(v, tensors) for v in skeleton]
    return skeleton


def save_state(obj: Any, folder: Path, name: str) -> None:
    skeleton, tensors = flatten_state(obj)
    save_file(tensors, str(folder / f"{name}.safetensors"))
    (folder / f"{name}.json").write_text(json.dumps(skeleton))


def load_state(folder: Path, name: str) -> Any:
    tensors = load_file(str(folder / f"{name}.safetensors"))
    return unflatten_state(json.loads((folder / f"{name}.json").read_text()), tensors)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(), "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]]}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_weights(module: torch.nn.Module, path: Path) -> None:
    state = {k: (v.float() if v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in module.state_dict().items()}
    save_file(state, str(path))


def load_weights(module: torch.nn.Module, path: Path) -> None:
    module.load_state_dict(load_file(str(path)))


def resolve_checkpoint(uri: str) -> Storage:
    """The complete checkpoint directory named by `uri` (directly or through latest.json)."""
    store = Storage(uri)
    if store.exists("COMPLETE"):
        return store
    if store.exists("latest.json"):
        latest = json.loads(store.read_bytes("latest.json")).get("latest_checkpoint")
        if not latest:
            raise FileNotFoundError(f"{store.uri}: pretraining has not written a checkpoint yet (latest.json has none)")
        return resolve_checkpoint(latest)
    raise FileNotFoundError(f"{store.uri} is not a complete cxrray checkpoint (no COMPLETE marker) "
                            f"nor a pretraining output (no latest.json)")


def read_state(uri: str) -> dict:
    """state.json of the complete checkpoint named by `uri` (a directory or a pretraining output)."""
    return json.loads(resolve_checkpoint(uri).read_bytes("state.json"))


def read_weights(uri: str, weights: str = "ema.safetensors") -> dict[str, torch.Tensor]:
    """The tensors of one weights file of the checkpoint named by `uri` (file:// or s3://), read in memory."""
    return load(resolve_checkpoint(uri).read_bytes(weights))
