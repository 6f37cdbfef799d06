"""Grad-CAM and integrated gradients of a finding's logit (captum computes both). Maps are float32 [N, S, S]
on the input grid, larger = more evidence for the finding; Grad-CAM is ReLU'd and upsampled bilinearly from
the last convolution block's grid, integrated gradients is |attribution| against a mid-grey (0) baseline."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn


class _Logit(nn.Module):
    """net restricted to one output: images -> logit [N] (captum attributes one target at a time)."""

    def __init__(self, net: nn.Module, index: int):
        super().__init__()
        self.net, self.index = net, index

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)[:, self.index]


def _last_activation(net: nn.Module) -> nn.Module:
    """The last SiLU of the classifier's trunk: its finest map that still sees the whole finding."""
    return [m for m in net.features.modules() if isinstance(m, nn.SiLU)][-1]


def grad_cam(net: nn.Module, images: np.ndarray, index: int, batch: int = 32) -> np.ndarray:
    from captum.attr import LayerAttribution, LayerGradCam

    cam = LayerGradCam(_Logit(net, index), _last_activation(net))
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start:start + batch]).float()
        low = cam.attribute(x, relu_attributions=True)
        out.append(LayerAttribution.interpolate(low, tuple(x.shape[-2:]), "bilinear")[:, 0].detach())
    return torch.cat(out).numpy().astype(np.float32)


def integrated_gradients(net: nn.Module, images: np.ndarray, index: int, steps: int = 32, batch: int = 16) -> np.ndarray:
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(_Logit(net, index))
    out = []
    for start in range(0, len(images), batch):
        x = torch.from_numpy(images[start:start + batch]).float()
        attribution = ig.attribute(x, baselines=torch.zeros_like(x), n_steps=steps, internal_batch_size=batch * 8)
        out.append(attribution.abs()[:, 0].detach())
    return torch.cat(out).numpy().astype(np.float32)
