"""Schedules, DDIM sampling and inversion: stateless functions over diffusers schedulers."""
from cxrray.diffusion.ddim import ddim_invert, ddim_sample, reconstruct, sample
from cxrray.diffusion.schedule import T, make_scheduler, training_loss

__all__ = ["T", "make_scheduler", "training_loss", "ddim_sample", "ddim_invert", "sample", "reconstruct"]
