"""Parameter and FLOP accounting for the diffusion autoencoder (used for throughput / MFU figures).

FLOPs are counted by `torch.utils.flop_counter.FlopCounterMode` on a batch of one, on the meta device
(no memory, no compute). On meta, SDPA decomposes into counted matmuls; the CPU fused SDPA kernel has
no formula in torch, so one is registered here for the CPU fallback path.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def param_count(model: nn.Module) -> dict[str, int]:
    """Parameters of the semantic encoder, of the denoiser (U-Net + z projection) and in total."""
    total = _params(model)
    encoder = _params(model.encoder)
    return {"encoder": encoder, "unet": total - encoder, "total": total}


def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop(query_shape, key_shape, value_shape)


_CUSTOM = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _CUSTOM[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flop


def _meta_clone(model: nn.Module) -> nn.Module:
    cfg = getattr(model, "cfg", None)
    if cfg is not None:
        with torch.device("meta"):
            return type(model)(cfg)
    return model


@torch.no_grad()
def training_flops_per_image(model: nn.Module, image_size: int | None = None) -> dict[str, float]:
    """Forward FLOPs of encoder and U-Net for one image, and training FLOPs (3 x forward: fwd + bwd).

    `image_size` may differ from the config's (the networks are fully convolutional) to see how cost
    scales at a fixed architecture. Counts multiply-adds as 2 FLOPs.
    """
    m = _meta_clone(model)
    device = next(m.parameters()).device
    cfg = m.cfg
    size = int(image_size or cfg.image_size)
    x = torch.zeros(1, cfg.in_channels, size, size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        z = m.encode(x)
    enc = counter.get_total_flops()
    with FlopCounterMode(display=False, custom_mapping=_CUSTOM) as counter:
        m(x, t, z)
    unet = counter.get_total_flops()
    fwd = enc + unet
    return {"image_size": size, "encoder_forward": float(enc), "unet_forward": float(unet),
            "forward": float(fwd), "training": float(3 * fwd)}
