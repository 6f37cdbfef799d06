"""What an attribution writes per (image, finding, method), every file saying it is derived:

- `{stem}.map.png`: the raw map as a 16-bit greyscale PNG scaled to its maximum (value = png / 65535 x
  `map_scale` from the record), with the provenance chunk;
- `{stem}.overlay.png`: the image in grey with the map in red on top (opacity up to `alpha` at the map's
  maximum), 8-bit RGB, same chunk;
- `{stem}.overlay.dcm`: that overlay as a Secondary Capture (highdicom), ImageType DERIVED\\SECONDARY, fresh
  UIDs, an empty patient module and the provenance as its derivation description — nothing of the input's
  header is copied;
- `{stem}.json`: the record, written last (its presence marks the image done).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image, PngImagePlugin

from cxrray import __version__
from cxrray.data.imaging import encode_png16
from cxrray.pipelines.derived import PROVENANCE_KEY


def stem(key: str, finding: str, method: str) -> str:
    return f"{key}.{finding}.{method}"


def map_png(attribution: np.ndarray, text: str) -> tuple[bytes, float]:
    """Non-negative map [S, S] -> (16-bit PNG of map / max, max)."""
    attribution = np.clip(np.asarray(attribution, np.float32), 0, None)
    scale = max(float(attribution.max()), 1e-12)
    return encode_png16(attribution / scale, text={PROVENANCE_KEY: text, "Software": f"cxrray {__version__}",
                                                   "cxrray:scale": repr(scale)}), scale


def overlay_rgb(image: np.ndarray, attribution: np.ndarray, alpha: float) -> np.ndarray:
    """image [S, S] in [-1, 1] and map [S, S] -> uint8 [S, S, 3]: grey image, red where the map is high."""
    grey = (np.clip(np.asarray(image, np.float32), -1, 1) + 1) / 2
    weight = alpha * np.clip(attribution, 0, None) / max(float(np.max(attribution)), 1e-12)
    rgb = np.stack([grey * (1 - weight) + weight, grey * (1 - weight), grey * (1 - weight)], axis=-1)
    return np.round(rgb * 255).astype(np.uint8)


def overlay_png(rgb: np.ndarray, text: str) -> bytes:
    info = PngImagePlugin.PngInfo()
    info.add_text(PROVENANCE_KEY, text)
    info.add_text("Software", f"cxrray {__version__}")
    buf = io.BytesIO()
    Image.fromarray(rgb, mode="RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def overlay_dicom(rgb: np.ndarray, text: str, description: str) -> bytes:
    """uint8 [S, S, 3] -> a derived RGB Secondary Capture (highdicom) with fresh UIDs and no patient data."""
    import highdicom
    from pydicom.uid import generate_uid

    sc = highdicom.sc.SCImage(
        pixel_array=rgb, photometric_interpretation="RGB", bits_allocated=8, coordinate_system="PATIENT",
        study_instance_uid=generate_uid(), series_instance_uid=generate_uid(), series_number=1,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="cxrray", patient_orientation=("L", "F"))
    sc.ImageType = ["DERIVED", "SECONDARY"]
    sc.ConversionType = "SYN"
    sc.BurnedInAnnotation = "NO"
    sc.DerivationDescription = text[:1024]
    sc.SeriesDescription = description[:64]
    buf = io.BytesIO()
    sc.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
