"""Image grids as 8-bit PNG with a provenance text chunk (synthetic images must say so)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, PngImagePlugin

from cxrray import __version__


def save_grid(rows: list[torch.Tensor], path: str | Path, provenance: str, pad: int = 2) -> Path:
    """rows: each [B, 1, H, W] in [-1, 1] (same B, H, W); one grid row per tensor."""
    tiles = [[((t[i, 0].float().clamp(-1, 1) + 1) * 127.5).round().byte().cpu().numpy() for i in range(t.shape[0])]
             for t in rows]
    h, w = tiles[0][0].shape
    cols = max(len(r) for r in tiles)
    canvas = np.zeros((len(tiles) * (h + pad) + pad, cols * (w + pad) + pad), dtype=np.uint8)
    for r, row in enumerate(tiles):
        for c, tile in enumerate(row):
            canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = tile
    info = PngImagePlugin.PngInfo()
    info.add_text("cxrray:provenance", f"SYNTHETIC - {provenance} - cxrray {__version__}; not an acquired radiograph")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(canvas).save(path, pnginfo=info)
    return path
