"""Training: Ray Train loop, DeepSpeed/DDP engines, EMA, checkpoint I/O."""
