"""Independent judges shared by the methods: small classifiers trained here, on images, by code no generative
model shares, and the feature spaces their image-quality figures are read in.

`conv_trunk` (image -> features), `FindingJudge` (a multi-label classifier on that trunk), `train_epochs`
(Adam with early stopping, the loop every judge and detector trains with), `apply_batched` (a judge over many
images without gradients), `ScriptedFeatures` (a user's TorchScript feature network, e.g. FID's Inception,
from a local path) and `image_quality` (FID and KID between sets from precomputed features), `frechet` (FID between two feature sets).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from cxrray.errors import InputError
from cxrray.families.parts import masked_bce  # noqa: F401 (re-exported: the judges' loss)
from cxrray.families.sr.network import resize
from cxrray.pipelines.settings import SyntheticAuditConfig


def conv_trunk(width: int, blocks: int = 3) -> tuple[nn.Sequential, int]:
    """image [B, 1, S, S] -> features [B, width * 2**(blocks-1)] (conv-GN-SiLU pairs, max-pooled, then
    global average); returns (module, feature size)."""
    layers, channels = [], 1
    for b in range(blocks):
        out = width * 2 ** b
        layers += [nn.Conv2d(channels, out, 3, padding=1), nn.GroupNorm(min(8, out), out), nn.SiLU(),
                   nn.Conv2d(out, out, 3, padding=1), nn.GroupNorm(min(8, out), out), nn.SiLU(), nn.MaxPool2d(2)]
        channels = out
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten()), channels


def train_epochs(model, net, train: dict, loss, validate, cfg, seed: int, rank: int = 0,
                 world: int = 1, report=lambda metrics: None) -> tuple[dict, float, int, list[dict]]:
    """Adam (cfg.lr; cfg also gives epochs, patience, batch_size) on `loss(model, batch)` over this rank's share of each epoch's shuffled `train` rows
    (cfg.batch_size in all), `validate(net)` after each epoch, stopping after cfg.patience epochs without a
    better value -> (best state dict, best value, its epoch, history). `model` may be `net` wrapped in DDP."""
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    order = torch.Generator().manual_seed(seed)
    n = len(next(iter(train.values())))
    best, best_epoch, best_state, history, waited = float("inf"), 0, None, [], 0
    for epoch in range(1, cfg.epochs + 1):
        model.train()
        mine = torch.randperm(n, generator=order)[rank::world]
        per_rank = max(1, cfg.batch_size // world)
        losses = []
        for start in range(0, len(mine) - per_rank + 1, per_rank):  # drop the ragged tail: ranks step together
            value = loss(model, {k: v[mine[start:start + per_rank]] for k, v in train.items()})
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            losses.append(float(value.detach()))
        score = validate(net)
        if score < best - 1e-4:
            best, best_epoch, waited = score, epoch, 0
            best_state = {k: v.detach().cpu().clone() for k, v in net.state_dict().items()}
        else:
            waited += 1
        history.append({"epoch": epoch, "train_loss": float(np.mean(losses)) if losses else None, "val": score})
        report({"epoch": epoch, "val_nll": score, "best_val_nll": best, "best_epoch": best_epoch})
        if waited >= cfg.patience:
            break
    return best_state, best, best_epoch, history


@torch.no_grad()
def apply_batched(fn, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """`fn` (a judge, its feature trunk, a scripted extractor) over `images` in batches, without gradients."""
    if not len(images):
        return torch.zeros(0)
    with torch.no_grad():
        return torch.cat([fn(images[i:i + batch]) for i in range(0, len(images), batch)])


class ScriptedFeatures(nn.Module):
    """A user's TorchScript feature network (e.g. the FID Inception) as a second feature space:
    [N, 1, S, S] in [-1, 1] -> uint8 RGB [N, 3, 299, 299] -> its features [N, D]. Loaded with torch.jit.load
    from a local file the user trusts (TorchScript runs the file's code): never from shards or uploads."""

    def __init__(self, path: str):
        super().__init__()
        if not Path(path).is_file():
            raise InputError(f"--features-model {path}: no such file")
        self.net = torch.jit.load(path, map_location="cpu").eval()
        self.num_features = int(self._run(torch.zeros(1, 1, 8, 8)).shape[-1])

    def _run(self, images: torch.Tensor) -> torch.Tensor:
        rgb = nn.functional.interpolate(images.float(), size=(299, 299), mode="bilinear", align_corners=False)
        rgb = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).repeat(1, 3, 1, 1)
        try:
            return self.net(rgb, return_features=True)
        except RuntimeError:  # a plain feature network: forward(images) -> [N, D]
            return self.net(rgb)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._run(images).flatten(1).float()


class _Precomputed(nn.Module):
    """Hands torchmetrics features computed once per set (its FID and KID would each run the network)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


def frechet(a: torch.Tensor, b: torch.Tensor) -> float:
    """The Frechet distance between two sets of features [N, F] (torchmetrics' FID on given features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=_Precomputed(a.shape[1]), normalize=True)
    fid.update(b.double(), real=True)
    fid.update(a.double(), real=False)
    return float(fid.compute())


def image_quality(features: dict[str, torch.Tensor], cfg: SyntheticAuditConfig) -> dict:
    """FID and KID (mean, sd over subsets) for synthetic-vs-train, synthetic-vs-test and train-vs-test, from
    each set's features [N, F] (computed once per set by the caller)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    features = {name: f.double() for name, f in features.items()}
    given = _Precomputed(next(iter(features.values())).shape[1])
    out = {}
    for a, b in (("synthetic", "train"), ("synthetic", "test"), ("train", "test")):
        subset = min(cfg.kid_subset, len(features[a]), len(features[b]))
        fid = FrechetInceptionDistance(feature=given, normalize=True)
        kid = KernelInceptionDistance(feature=given, normalize=True, subset_size=subset, subsets=cfg.kid_subsets)
        torch.manual_seed(cfg.seed)  # KID's subsets
        for metric in (fid, kid):
            metric.update(features[b], real=True)
            metric.update(features[a], real=False)
        kid_mean, kid_sd = kid.compute()
        out[f"{a}_vs_{b}"] = {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_sd": float(kid_sd),
                              "kid_subset": subset}
    return out


class _Resized(nn.Module):
    def __init__(self, size: int | None):
        super().__init__()
        self.size = size

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return image if self.size is None else resize(image, self.size)


class FindingJudge(nn.Module):
    """image [B, 1, S, S] in [-1, 1] -> logits [B, labels + sides]: one per label, then one per lateral label
    (its side, 1 = right); `features(image)` [B, F] is the FID / KID space. Images are first resized to
    `size` (None: read as given), as Inception reads every image at 299²."""

    def __init__(self, labels: int, width: int, size: int | None = None):
        super().__init__()
        trunk, channels = conv_trunk(width)
        self.features = nn.Sequential(_Resized(size), *trunk)
        self.head = nn.Linear(channels, labels)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))


