"""The `train` config section (pretraining schedule and strategy): typed data owned by the train loop.

Torch-free; `cxrray.config` composes it."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from cxrray.data.settings import StrictModel


class TrainConfig(StrictModel):
    """Pretraining schedule, counted in images shown with an explicit global batch, so the schedule
    does not change with the number of workers."""

    strategy: Literal["deepspeed", "ddp"] = "deepspeed"  # ddp: plain PyTorch DDP baseline
    zero_stage: int = Field(1, ge=0, le=2)  # 3 partitions parameters, which the EMA needs whole
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)  # fractional on small machines: leaves CPU for Ray Data
    gpus_per_worker: float = Field(1.0, gt=0)
    global_batch: int = Field(16, ge=1)  # images per optimizer step over all workers
    images: int = Field(20_000, ge=1)  # training length (the paper: 200M)
    lr: float = Field(1e-4, gt=0)  # Adam, no weight decay (DiffChest)
    grad_clip: float = Field(1.0, gt=0)
    ema_decay: float = Field(0.9999, ge=0, lt=1)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on GPU, fp32 on CPU
    channels_last: bool = False  # ddp only: DeepSpeed broadcasts and flattens parameters as contiguous tensors
    compile: bool = False
    checkpoint_every: int = Field(5_000, ge=1)  # images
    eval_every: int = Field(10_000, ge=1)  # images
    log_every: int = Field(500, ge=1)  # images
    keep_checkpoints: int = Field(3, ge=1)
    max_failures: int = Field(3, ge=0)  # worker failures survived by restoring the last checkpoint
    split: str | None = "train"  # shard split to train on (PadChest DiffChest protocol: "pretrain")
    eval_split: str | None = "val"
    eval_images: int = Field(8, ge=1)
    sample_steps: int = Field(50, ge=1)  # DDIM steps for the eval grids
    seed: int = 0

    @model_validator(mode="after")
    def _channels_last_needs_ddp(self) -> "TrainConfig":
        if self.channels_last and self.strategy == "deepspeed":
            raise ValueError("train.channels_last needs train.strategy=ddp: DeepSpeed broadcasts and flattens the "
                             "parameters as contiguous tensors (a channels_last weight fails its broadcast)")
        return self
