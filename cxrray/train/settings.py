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
    num_workers: int = Field(2, ge=1)  # elastic (min_workers set): the most workers, the size the run asks for
    min_workers: int | None = Field(None, ge=1)  # None: num_workers, not elastic; else Ray Train runs on as few as
    # this many while nodes are missing and grows back (checking every resize_check_s)
    resize_check_s: float = Field(60.0, ge=0)
    use_gpu: bool = False
    cpus_per_worker: float = Field(0.5, gt=0)  # fractional on small machines: leaves CPU for Ray Data
    gpus_per_worker: float = Field(1.0, gt=0)
    worker_resources: dict[str, float] = Field(default_factory=dict)  # custom Ray resources each training worker
    # also needs (e.g. {"trainer": 1} to keep training on the nodes that advertise it)
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
    # spot capacity: a node's preemption notice (`ray drain-node --reason DRAIN_NODE_REASON_PREEMPTION`, or SIGTERM
    # to a node's `ray start --block`, which drains it) is checked every preemption_check_every images (a collective;
    # 0: never) and answered with a checkpoint at once, which every rank takes part in (ZeRO's gather), so the
    # node's drain window must cover those images, the watcher's 5-s poll and one checkpoint; reclaims are counted
    # apart from failures (-1: any number)
    preemption_check_every: int = Field(64, ge=0)
    max_preemption_failures: int = Field(-1, ge=-1)
    split: str | None = "train"  # shard split to train on (PadChest DiffChest protocol: "pretrain")
    eval_split: str | None = "val"
    eval_images: int = Field(8, ge=1)
    sample_steps: int = Field(50, ge=1)  # DDIM steps for the eval grids
    seed: int = 0

    @model_validator(mode="after")
    def _every_worker_count_keeps_the_global_batch(self) -> "TrainConfig":
        low = self.min_workers or self.num_workers
        if low > self.num_workers:
            raise ValueError(f"train.min_workers={low} is above train.num_workers={self.num_workers}")
        uneven = [w for w in range(low, self.num_workers + 1) if self.global_batch % w]
        if uneven:
            raise ValueError(f"train.global_batch={self.global_batch} cannot be split evenly over {uneven} workers, "
                             f"which train.min_workers..num_workers ({low}..{self.num_workers}) allows")
        return self

    @property
    def elastic(self) -> bool:
        return self.min_workers is not None and self.min_workers < self.num_workers

    def batch_plan(self, world: int) -> tuple[int, int]:
        """(micro-batch per worker, gradient accumulation steps) for `world` workers, with micro x accumulation
        x world == global_batch exactly, so the schedule in images shown is the same at every size; the
        micro-batch never exceeds global_batch / num_workers (what a worker was sized for)."""
        if self.global_batch % world:
            raise ValueError(f"train.global_batch={self.global_batch} is not divisible by {world} workers")
        share, cap = self.global_batch // world, max(1, self.global_batch // self.num_workers)
        micro = max(d for d in range(1, min(share, cap) + 1) if share % d == 0)
        return micro, share // micro

    @model_validator(mode="after")
    def _channels_last_needs_ddp(self) -> "TrainConfig":
        if self.channels_last and self.strategy == "deepspeed":
            raise ValueError("train.channels_last needs train.strategy=ddp: DeepSpeed broadcasts and flattens the "
                             "parameters as contiguous tensors (a channels_last weight fails its broadcast)")
        return self
