"""Procedural chest-radiograph phantoms with planted, labelled findings, written as real DICOM.

Every image is a pure function of ``(PhantomConfig, index)``: ``sample_case`` draws identity,
demographics, echo covariates, labels and pose; ``render`` draws the density image; ``write_dicom``
encodes it (MONOCHROME1/2, uncompressed explicit/implicit VR, RLE or JPEG 2000 lossless). So any
image can be regenerated on its own and sets can be generated in parallel by index ranges.

Modules: ``config`` (labels, config, confounders), ``cases`` (sampling), ``anatomy`` / ``findings``
/ ``drawing`` (render), ``masks`` (the case without a finding; ground-truth masks), ``dicom`` (writing),
``names`` (fictional identity pools).
"""
from __future__ import annotations

from importlib import import_module

from .config import DEVICES, FINDINGS, LABELS, Confounder, PhantomConfig, parse_confounder

#: the rest loads on first use (numpy, pandas, pydicom): `cxrray.config` imports only the config
_LAZY = {
    "dataset": ("COLUMNS", "HEALTHY_COLUMN", "LUNGS", "TRUTH", "generate", "healthy_name", "image_name", "mask_column",
                "mask_name"),
    "cases": ("DLV_CM", "SLVH_CM", "Patient", "PhantomCase", "Pose", "sample_case"),
    "dicom": ("BITS_STORED", "MAX_VALUE", "build_dataset", "decode", "dicom_bytes", "quantize", "stored_values", "write_dicom"),
    "drawing": ("image_shape", "render"),
    "report": ("PHI_CATEGORIES", "PhantomReport", "compose_report"),
    "masks": ("DRAWN", "counterpart", "finding_masks", "healthy", "lung_mask", "region", "with_label"),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = sorted(["DEVICES", "FINDINGS", "LABELS", "Confounder", "PhantomConfig", "parse_confounder", *_WHERE])


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module 'cxrray.data.phantom' has no attribute {name!r}")
    module = import_module(f"cxrray.data.phantom.{_WHERE[name]}")
    # bind all of the module's names now: importing `render` also set the package attribute `render`
    # to the submodule, which must not shadow the function of that name
    globals().update({n: getattr(module, n) for n in _LAZY[_WHERE[name]]})
    return globals()[name]
