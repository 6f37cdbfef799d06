"""Pixel geometry and the shard image codec (single-channel 16-bit PNG).

Images are float32 in [0, 1] on the way in; shards store round(x * 65535) as uint16 PNG;
training reads them back as float32 in [-1, 1] (`png16_to_model`).
"""
from __future__ import annotations

import io
from typing import Literal

import numpy as np
from PIL import Image, PngImagePlugin

PNG_MAX = 65535.0


def fit_square(pixels: np.ndarray, size: int, fit: Literal["pad", "crop"]) -> np.ndarray:
    """Resize float [rows, cols] to [size, size]: `pad` keeps the whole image (longer side = size,
    zero-padded and centred), `crop` fills the square (shorter side = size, centre-cropped)."""
    rows, cols = pixels.shape
    scale = size / (max(rows, cols) if fit == "pad" else min(rows, cols))
    new_rows, new_cols = max(1, round(rows * scale)), max(1, round(cols * scale))
    resized = np.asarray(
        Image.fromarray(np.ascontiguousarray(pixels, dtype=np.float32)).resize(
            (new_cols, new_rows), Image.Resampling.LANCZOS, reducing_gap=3.0
        )
    )
    resized = np.clip(resized, 0.0, 1.0)
    out = np.zeros((size, size), dtype=np.float32)
    if fit == "pad":
        top, left = (size - new_rows) // 2, (size - new_cols) // 2
        out[top : top + new_rows, left : left + new_cols] = resized
    else:
        top, left = (new_rows - size) // 2, (new_cols - size) // 2
        out[:] = resized[top : top + size, left : left + size]
    return out


def encode_png16(pixels: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """float [0, 1] -> 16-bit greyscale PNG bytes; `text` becomes tEXt chunks (provenance)."""
    values = np.round(np.clip(pixels, 0.0, 1.0) * PNG_MAX).astype(np.uint16)
    info = None
    if text:
        info = PngImagePlugin.PngInfo()
        for key, value in text.items():
            info.add_text(key, value)
    buf = io.BytesIO()
    Image.fromarray(values).save(buf, format="PNG", compress_level=1, pnginfo=info)
    return buf.getvalue()


def decode_png16(data: bytes) -> np.ndarray:
    """16-bit PNG bytes -> uint16 [rows, cols]."""
    with Image.open(io.BytesIO(data)) as img:
        if img.format != "PNG":
            raise ValueError(f"expected PNG, got {img.format}")
        return np.asarray(img, dtype=np.uint16)


def png16_to_model(values: np.ndarray) -> np.ndarray:
    """uint16 (any shape) -> float32 in [-1, 1]."""
    return values.astype(np.float32) * (2.0 / PNG_MAX) - 1.0


def model_input(pixels: np.ndarray, size: int, fit: Literal["pad", "crop"]) -> np.ndarray:
    """Decoded float [0, 1] image -> float32 [size, size] in [-1, 1], exactly as ingest + stream give it
    (same geometry and 16-bit quantisation as the shard codec)."""
    values = np.round(np.clip(fit_square(pixels, size, fit), 0.0, 1.0) * PNG_MAX).astype(np.uint16)
    return png16_to_model(values)
