"""Networks only (no training loops). Attributes load lazily: `cxrray.models.architecture` (typed config)
must stay importable without torch/diffusers."""
from importlib import import_module

_EXPORTS = {"DIFFAE_PRESETS": ("architecture", "PRESETS"), "DiffAEConfig": ("architecture", "DiffAEConfig"),
            "preset_config": ("architecture", "preset_config"), "DiffAE": ("diffae", "DiffAE"),
            "param_count": ("flops", "param_count"), "training_flops_per_image": ("flops", "training_flops_per_image")}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cxrray.models' has no attribute {name!r}")
    module, attr = _EXPORTS[name]
    return getattr(import_module(f"cxrray.models.{module}"), attr)
