"""One optimizer step behind one interface for both strategies: DeepSpeed (the default) and plain
PyTorch DDP (the baseline). The trained module stays fp32; bf16 is autocast on GPU, so weights and
optimizer state checkpoint exactly."""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from cxrray.config import TrainConfig


class LossModule(nn.Module):
    """Wraps the model so the family's whole training forward (`loss(model, batch)`) runs inside
    `forward`, as DDP and DeepSpeed require for gradient synchronisation."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


@dataclass
class Engine:
    strategy: str
    wrapped: nn.Module  # DeepSpeed engine or DDP(LossModule)
    model: nn.Module  # the bare model (fp32 weights to checkpoint)
    optimizer: torch.optim.Optimizer  # the underlying torch optimizer (its state is checkpointed)
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    grad_clip: float

    def step(self, batch: dict) -> tuple[float, float]:
        """Forward + backward + clipped optimizer step on this worker's micro-batch (the whole batch
        dict: image, labels, covariates ...) -> (loss, grad norm)."""
        with self.autocast():
            loss = self.wrapped(batch)
        if self.strategy == "deepspeed":
            self.wrapped.backward(loss)
            self.wrapped.step()
            norm = self.wrapped.get_global_grad_norm()
        else:
            loss.backward()
            norm = torch.nn.utils.clip_grad_norm_(self.wrapped.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach()), float(norm if norm is not None else float("nan"))


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    if cfg.global_batch % world_size:
        raise ValueError(f"train.global_batch={cfg.global_batch} is not divisible by {world_size} workers")
    return {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": cfg.global_batch // world_size,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": cfg.grad_clip,
        # torch_adam: no JIT-compiled fused/CPU Adam (65 s on CPU); adam_w_mode off: plain Adam, no decay
        "optimizer": {"type": "Adam", "params": {"lr": cfg.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                 "weight_decay": 0.0, "torch_adam": True, "adam_w_mode": False}},
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
    }


def build_engine(loss_module: LossModule, cfg: TrainConfig, world_size: int, device: torch.device) -> Engine:
    """`loss_module.model` must already hold the weights to start from (fresh or restored)."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    loss_module.to(device)
    if cfg.channels_last:
        loss_module.to(memory_format=torch.channels_last)
    if cfg.strategy == "deepspeed":
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        wrapped, optimizer, _, _ = deepspeed.initialize(
            model=loss_module, model_parameters=[p for p in loss_module.parameters() if p.requires_grad],
            config=deepspeed_config(cfg, world_size), dist_init_required=False)
        base = getattr(optimizer, "optimizer", optimizer)  # ZeRO wraps the torch optimizer
    else:
        import ray.train.torch

        deepspeed_config(cfg, world_size)  # same batch validation
        wrapped = ray.train.torch.prepare_model(loss_module, move_to_device=False) if world_size > 1 else loss_module
        trainable = [p for p in loss_module.parameters() if p.requires_grad]
        base = optimizer = torch.optim.Adam(trainable, lr=cfg.lr, weight_decay=0.0)
    if cfg.compile:
        wrapped.compile() if hasattr(wrapped, "compile") else None
    return Engine(cfg.strategy, wrapped, loss_module.model, base, device, autocast, cfg.grad_clip)
