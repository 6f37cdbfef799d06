"""Networks only (no training loops)."""
from cxrray.models.diffae import PRESETS as DIFFAE_PRESETS
from cxrray.models.diffae import DiffAE, DiffAEConfig, preset_config
from cxrray.models.flops import param_count, training_flops_per_image

__all__ = ["DIFFAE_PRESETS", "DiffAE", "DiffAEConfig", "preset_config", "param_count", "training_flops_per_image"]
