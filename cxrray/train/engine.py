"""Optimizer steps behind one interface for both strategies: DeepSpeed (the default) and plain PyTorch
DDP (the baseline). The trained module stays fp32; bf16 is autocast on GPU, so weights and optimizer
state checkpoint exactly.

A family trains one main objective (`Family.loss` over every trainable parameter no other objective
claims) through the strategy's engine, and optionally further objectives (`Family.objectives`, e.g. a
VAE's discriminator), each with its own torch Adam over its own parameters and an explicit gradient
all-reduce across workers (DeepSpeed's engine owns exactly one optimizer). All are stepped in order on
the same batch, so the loop never branches on how many there are.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Callable

import torch
from torch import nn

from cxrray.train.settings import TrainConfig
from cxrray.families import Family, Objective

MAIN = "main"


class LossModule(nn.Module):
    """Wraps the model so one objective's whole training forward (`loss(model, batch)`) runs inside
    `forward`, as DDP and DeepSpeed require for gradient synchronisation."""

    def __init__(self, model: nn.Module, loss_fn: Callable[[nn.Module, dict], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn

    def forward(self, batch: dict) -> torch.Tensor:
        return self.loss_fn(self.model, batch)


@dataclass
class ObjectiveStep:
    """One objective: its forward wrapper, the torch optimizer whose state is checkpointed, its parameters."""

    name: str
    wrapped: nn.Module  # DeepSpeed engine, DDP(LossModule) or the LossModule itself
    optimizer: torch.optim.Optimizer
    params: list[nn.Parameter]
    engine: str  # "deepspeed" or "torch"


@dataclass
class Engine:
    strategy: str
    model: nn.Module  # the bare model (fp32 weights to checkpoint)
    objectives: list[ObjectiveStep]  # the main objective first
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager]
    grad_clip: float
    world_size: int = 1
    after_step: Callable[[nn.Module], None] = lambda model: None  # the family's, once per optimizer step
    last: dict[str, float] = field(default_factory=dict)

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The main objective's torch optimizer."""
        return self.objectives[0].optimizer

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        """Checkpoint name -> optimizer: the main one as `optimizer`, the others as `optimizer-{name}`."""
        return {("optimizer" if o.name == MAIN else f"optimizer-{o.name}"): o.optimizer for o in self.objectives}

    def step(self, batches: dict | list[dict]) -> tuple[float, float]:
        """One optimizer step of every objective over this worker's micro-batches (a batch dict or a list of
        them, gradients accumulated over the list) -> (main loss, mean over the micro-batches; main grad
        norm); the others' in `self.last`."""
        batches = [batches] if isinstance(batches, dict) else batches
        self.last = {}
        result = (float("nan"), float("nan"))
        for objective in self.objectives:
            loss, norm = self._step(objective, batches)
            if objective.name == MAIN:
                result = (loss, norm)
            else:
                self.last.update({f"loss_{objective.name}": loss, f"grad_norm_{objective.name}": norm})
        self.after_step(self.model)
        return result

    def _step(self, o: ObjectiveStep, batches: list[dict]) -> tuple[float, float]:
        if len(self.objectives) > 1:  # grads another objective's backward left on these parameters
            for p in o.params:
                p.grad = None
        if o.engine == "deepspeed" and len(batches) != o.wrapped.gradient_accumulation_steps():
            # DeepSpeed steps at its own boundary only: any other count would silently skip or split the update
            raise ValueError(f"{len(batches)} micro-batches for a DeepSpeed engine built for "
                             f"{o.wrapped.gradient_accumulation_steps()} (train.batch_plan)")
        total = 0.0
        # DDP all-reduces on the last micro-batch's backward only; DeepSpeed keeps its own boundary (and
        # refuses step() inside its no_sync)
        torch_ddp = o.engine == "torch" and hasattr(o.wrapped, "no_sync")
        for i, batch in enumerate(batches):
            last = i == len(batches) - 1
            sync = o.wrapped.no_sync() if torch_ddp and not last else contextlib.nullcontext()
            with sync:
                with self.autocast():
                    loss = o.wrapped(batch)
                total += float(loss.detach())
                if o.engine == "deepspeed":
                    o.wrapped.backward(loss)  # scaled by 1 / gradient_accumulation_steps inside
                    o.wrapped.step()  # applies the update at the accumulation boundary only
                else:
                    (loss / len(batches)).backward()
        if o.engine == "deepspeed":
            norm = o.wrapped.get_global_grad_norm()
        else:
            if o.name != MAIN and self.world_size > 1:
                _all_reduce_mean([p.grad for p in o.params if p.grad is not None], self.world_size)
            norm = torch.nn.utils.clip_grad_norm_(o.params, self.grad_clip)
            o.optimizer.step()
            o.optimizer.zero_grad(set_to_none=True)
        return total / len(batches), float(norm if norm is not None else float("nan"))


def _all_reduce_mean(grads: list[torch.Tensor], world_size: int) -> None:
    import torch.distributed as dist

    for g in grads:
        dist.all_reduce(g)
        g.div_(world_size)


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    micro, accumulation = cfg.batch_plan(world_size)
    return {
        "train_batch_size": cfg.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": cfg.grad_clip,
        # torch_adam: no JIT-compiled fused/CPU Adam (65 s on CPU); adam_w_mode off: plain Adam, no decay
        "optimizer": {"type": "Adam", "params": {"lr": cfg.lr, "betas": [0.9, 0.999], "eps": 1e-8,
                                                 "weight_decay": 0.0, "torch_adam": True, "adam_w_mode": False}},
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": False},
        "fp16": {"enabled": False},
        "steps_per_print": 2**31 - 1,
    }


def partition(model: nn.Module, family: Family) -> list[tuple[Objective | None, list[nn.Parameter]]]:
    """[(objective, its parameters)], the main objective (None) first with every trainable parameter that
    no further objective claims. Raises if two objectives claim one parameter or one claims nothing."""
    claimed: dict[int, str] = {}
    extra = []
    for objective in family.objectives:
        params = [p for p in objective.parameters(model) if p.requires_grad]
        if not params:
            raise ValueError(f"objective {objective.name!r} of family {family.name!r} has no trainable parameters")
        for p in params:
            if id(p) in claimed:
                raise ValueError(f"objectives {claimed[id(p)]!r} and {objective.name!r} claim the same parameter")
            claimed[id(p)] = objective.name
        extra.append((objective, params))
    main = [p for p in model.parameters() if p.requires_grad and id(p) not in claimed]
    return [(None, main)] + extra


def build_engine(model: nn.Module, family: Family, cfg: TrainConfig, world_size: int, device: torch.device) -> Engine:
    """`model` must already hold the weights to start from (fresh or restored)."""
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")
    autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    deepspeed_config(cfg, world_size)  # batch validation for both strategies
    parts = partition(model, family)
    main_params = parts[0][1]
    main_module = LossModule(model, family.loss)
    if cfg.strategy == "deepspeed":
        if device.type == "cpu":
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        import deepspeed

        wrapped, optimizer, _, _ = deepspeed.initialize(model=main_module, model_parameters=main_params,
                                                        config=deepspeed_config(cfg, world_size), dist_init_required=False)
        steps = [ObjectiveStep(MAIN, wrapped, getattr(optimizer, "optimizer", optimizer), main_params, "deepspeed")]
    else:
        wrapped = main_module
        if world_size > 1:  # plain DDP on the process group Ray Train (or a test) has set up
            others = {n for n, p in main_module.named_parameters() if p.requires_grad and
                      not any(p is q for q in main_params)}
            if others:  # further objectives reduce their own gradients
                nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(main_module, others)
            wrapped = nn.parallel.DistributedDataParallel(main_module, device_ids=[device.index] if device.type == "cuda" else None)
        steps = [ObjectiveStep(MAIN, wrapped, torch.optim.Adam(main_params, lr=cfg.lr, weight_decay=0.0), main_params,
                               "torch")]
    for objective, params in parts[1:]:
        steps.append(ObjectiveStep(objective.name, LossModule(model, objective.loss),
                                   torch.optim.Adam(params, lr=cfg.lr * objective.lr_scale, weight_decay=0.0), params,
                                   "torch"))
    if cfg.compile:
        for o in steps:
            o.wrapped.compile() if hasattr(o.wrapped, "compile") else None
    return Engine(cfg.strategy, model, steps, device, autocast, cfg.grad_clip, world_size, family.after_step)
