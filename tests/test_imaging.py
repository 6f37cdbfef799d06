"""Square fitting (pad keeps everything, crop fills) and the PNG-16 codec."""
from __future__ import annotations

import numpy as np
from PIL import Image
import io

from cxrray.data.imaging import decode_png16, encode_png16, fit_square, png16_to_model


def test_pad_keeps_aspect_with_zero_bands_and_crop_fills():
    tall = np.ones((200, 100), np.float32)  # portrait: pad adds left/right bands
    padded = fit_square(tall, 64, "pad")
    assert padded.shape == (64, 64)
    assert np.all(padded[:, :15] == 0) and np.all(padded[:, -15:] == 0) and np.all(padded[:, 20:44] > 0.99)
    cropped = fit_square(tall, 64, "crop")
    assert cropped.shape == (64, 64) and np.all(cropped > 0.99)
    ramp = np.tile(np.linspace(0, 1, 300, dtype=np.float32), (100, 1))  # landscape ramp: crop keeps the centre
    centre = fit_square(ramp, 50, "crop")
    assert 0.3 < centre.min() and centre.max() < 0.7


def test_png16_roundtrip_and_model_range_and_provenance_text():
    pixels = np.linspace(0, 1, 64 * 64, dtype=np.float32).reshape(64, 64)
    data = encode_png16(pixels, text={"cxrray:provenance": "SYNTHETIC test"})
    values = decode_png16(data)
    assert values.dtype == np.uint16 and values.min() == 0 and values.max() == 65535
    assert np.abs(values / 65535 - pixels).max() <= 0.5 / 65535 + 1e-7
    model = png16_to_model(values)
    assert model.min() == -1.0 and model.max() == 1.0
    assert Image.open(io.BytesIO(data)).text["cxrray:provenance"] == "SYNTHETIC test"
