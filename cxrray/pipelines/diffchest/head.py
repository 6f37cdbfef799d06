"""The linear probe head on z: logits = W @ ((z - mean) / std) + b, one row per finding.

Stored as a directory: `head.safetensors` (weight [F, D], bias [F], z_mean [D], z_std [D], pattern [F, D],
effect [F, D], all float32) and `head.json` (findings, which rows are fitted, training facts). No pickle. A finding whose
row is not fitted (too few positives/negatives in the fit set) has weight 0 and bias NaN and is refused as
a counterfactual target.

Two directions per finding, both in normalised-z space: the weight w (the "filter": what the probe reads)
and the pattern a = Cov(zn) w over the fit rows (Haufe et al. 2014, "On the interpretation of weight vectors
of linear models in multivariate neuroimaging": the direction along which the data vary with the probe's
output; for a well-specified model proportional to the class-mean difference). With few fit images per
z dimension w is dominated by low-variance directions the decoder does not render; a is not.
A third, the effect e: the finding's coefficient in a (ridge) regression of zn on all fitted labels over the
fit rows, i.e. how the code moves with the finding when every other label is held fixed. Unlike a and w it
does not carry what co-occurs with the finding (a planted chest tube), and one unit of it is one finding's
worth of change (the de-confounded direction).
"""
from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file, save_file

from cxrray.data.storage import Storage
from cxrray.errors import InputError

WEIGHTS = "head.safetensors"
META = "head.json"


@dataclass
class LinearHead:
    findings: list[str]
    weight: np.ndarray  # [F, D] in normalised-z space
    bias: np.ndarray  # [F]; NaN where not fitted
    z_mean: np.ndarray  # [D], fine-tune set
    z_std: np.ndarray  # [D], fine-tune set (> 0)
    info: dict = field(default_factory=dict)
    pattern: np.ndarray | None = None  # [F, D] Cov(zn) @ w per finding; None for heads saved before it existed
    effect: np.ndarray | None = None  # [F, D] regression coefficient of zn on all labels; None before it existed

    @property
    def fitted(self) -> np.ndarray:
        return np.isfinite(self.bias)

    def index(self, finding: str) -> int:
        if finding not in self.findings:
            raise InputError(f"unknown finding {finding!r}; the probe knows: {', '.join(self.findings)}")
        i = self.findings.index(finding)
        if not self.fitted[i]:
            raise InputError(f"finding {finding!r} has no fitted probe (too few positives or negatives in the fit set)")
        return i

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        return (z - self._t(self.z_mean, z)) / self._t(self.z_std, z)

    def denormalize(self, zn: torch.Tensor) -> torch.Tensor:
        return zn * self._t(self.z_std, zn) + self._t(self.z_mean, zn)

    def logits(self, z: torch.Tensor) -> torch.Tensor:
        """z [B, D] (raw encoder output) -> logits [B, F] (NaN for unfitted findings)."""
        return self.normalize(z.float()) @ self._t(self.weight, z).T + self._t(self.bias, z)

    def probabilities(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logits(z))

    def direction(self, finding: str, z_like: torch.Tensor) -> tuple[torch.Tensor, float]:
        """(w [D], b) of one finding, in normalised-z space, on z_like's device."""
        i = self.index(finding)
        return self._t(self.weight[i], z_like), float(self.bias[i])

    def pattern_of(self, finding: str, z_like: torch.Tensor) -> torch.Tensor:
        """The finding's activation pattern a [D] (normalised-z space), on z_like's device."""
        return self._row("pattern", "activation patterns", "filter", finding, z_like)

    def effect_of(self, finding: str, z_like: torch.Tensor) -> torch.Tensor:
        """The finding's de-confounded effect e [D] (normalised-z space, one finding's worth), on z_like's device."""
        return self._row("effect", "effect directions", "pattern", finding, z_like)

    def _row(self, name: str, what: str, instead: str, finding: str, z_like: torch.Tensor) -> torch.Tensor:
        i, rows = self.index(finding), getattr(self, name)
        if rows is None:
            raise InputError(f"this probe was saved without {what} (before they existed): refit it "
                             f"with `cxrray probe`, or set explain.axis={instead}")
        return self._t(rows[i], z_like)

    @staticmethod
    def _t(a: np.ndarray, like: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(a, dtype=torch.float32, device=like.device)

    def save(self, out: str | Path) -> Path:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        arrays = {"weight": self.weight, "bias": self.bias, "z_mean": self.z_mean, "z_std": self.z_std}
        for name in ("pattern", "effect"):
            if getattr(self, name) is not None:
                arrays[name] = getattr(self, name)
        save_file({k: np.ascontiguousarray(v, np.float32) for k, v in arrays.items()}, str(out / WEIGHTS))
        (out / META).write_text(json.dumps({"format": "cxrray-probe/1", "findings": self.findings,
                                            "fitted": self.fitted.tolist(), **self.info}, indent=1))
        return out


def load_head(uri: str | Path) -> LinearHead:
    """Load a head directory (local path, file:// or s3://)."""
    store = Storage(str(uri))
    for name in (WEIGHTS, META):
        if not store.exists(name):
            raise FileNotFoundError(f"{store.uri} is not a probe directory (no {name})")
    meta = json.loads(store.read_bytes(META))
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / WEIGHTS
        path.write_bytes(store.read_bytes(WEIGHTS))
        arrays = load_file(str(path))
    head = LinearHead(list(meta["findings"]), arrays["weight"], arrays["bias"], arrays["z_mean"], arrays["z_std"],
                      {k: v for k, v in meta.items() if k not in ("findings", "fitted", "format")}, arrays.get("pattern"), arrays.get("effect"))
    for name, array in (("weight", head.weight), ("pattern", head.pattern), ("effect", head.effect)):
        if array is not None and array.shape != (len(head.findings), head.z_mean.shape[0]):
            raise InputError(f"{store.uri}: {name} shape {array.shape} does not match "
                             f"{len(head.findings)} findings x z_dim {head.z_mean.shape[0]}")
    return head


def logit(p: float) -> float:
    return math.log(p / (1 - p))
