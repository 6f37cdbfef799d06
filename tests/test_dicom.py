"""Decoding and rejection of DICOM/PNG/JPEG: pydicom's bundled files and files written here."""
from __future__ import annotations

import io
import os
import warnings

import numpy as np
import pytest
from PIL import Image
from pathlib import Path

import pydicom.data

from conftest import make_dicom
from cxrray.config import DecodeConfig
from cxrray.data.dicom import RejectError, decode_file

CFG = DecodeConfig()
KNOWN_CODES = {"empty_file", "not_dicom", "unreadable_dicom", "no_pixel_data", "missing_image_attributes",
               "absurd_dimensions", "unsupported_photometric", "colour_image", "burned_in_annotation",
               "multiframe", "pixel_decode_failed", "raster_decode_failed", "non_finite_pixels", "blank_image"}


def _decode(data: bytes, cfg: DecodeConfig = CFG):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return decode_file(data, cfg)


# pydicom's bundled files, read from its package folder: its get_testdata_file() helpers try to
# download files that are not bundled, and tests never leave loopback.
BUNDLED = Path(pydicom.data.__file__).parent / "test_files"


def get_testdata_file(name: str) -> str:
    path = BUNDLED / name
    assert path.is_file(), f"{name} is not bundled with this pydicom"
    return str(path)


def _bundled() -> list[str]:
    return sorted(str(p) for p in BUNDLED.iterdir() if p.is_file() and (p.suffix == ".dcm" or not p.suffix))


@pytest.mark.parametrize("path", _bundled(), ids=os.path.basename)
def test_every_bundled_file_decodes_or_is_rejected_with_a_reason(path):
    data = open(path, "rb").read()
    try:
        img = _decode(data)
    except RejectError as err:
        assert err.code in KNOWN_CODES and err.reason.startswith(err.code)
        return
    assert img.pixels.dtype == np.float32 and img.pixels.ndim == 2
    assert img.pixels.min() == 0.0 and img.pixels.max() == 1.0
    assert list(img.pixels.shape) == img.header["source_shape"]


EXPECTED = {
    "JPEG-lossy.dcm": "pixel_decode_failed",  # damaged JPEG (libjpeg error -1038)
    "MR_truncated.dcm": "pixel_decode_failed",
    "reportsi.dcm": "no_pixel_data",
    "rtplan.dcm": "no_pixel_data",
    "ExplVR_BigEndNoMeta.dcm": "no_pixel_data",  # no preamble: read with force, an RT object
    "examples_palette.dcm": "unsupported_photometric",
    "SC_rgb_jpeg.dcm": "colour_image",
    "examples_ybr_color.dcm": "colour_image",
    "SC_rgb_small_odd.dcm": "absurd_dimensions",
}


@pytest.mark.parametrize("name,code", sorted(EXPECTED.items()))
def test_specific_bundled_rejects(name, code):
    with pytest.raises(RejectError) as err:
        _decode(open(get_testdata_file(name), "rb").read())
    assert err.value.code == code


LOSSLESS_MR = ["MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_expb.dcm", "MR_small_RLE.dcm",
               "MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_padded.dcm"]


@pytest.mark.parametrize("name", LOSSLESS_MR)
def test_transfer_syntaxes_decode_to_identical_pixels(name):
    reference = _decode(open(get_testdata_file("MR_small.dcm"), "rb").read()).pixels
    other = _decode(open(get_testdata_file(name), "rb").read())
    assert other.pixels.shape == (64, 64)
    np.testing.assert_array_equal(other.pixels, reference)


@pytest.mark.parametrize("name,shape", [("JPGExtended.dcm", (1024, 256)), ("JPEG2000.dcm", (1024, 256)),
                                        ("693_J2KI.dcm", (512, 512))])
def test_jpeg_family_decodes(name, shape):
    img = _decode(open(get_testdata_file(name), "rb").read())
    assert img.pixels.shape == shape and img.pixels.std() > 0.05


def test_colour_converted_to_luminance_when_asked():
    data = open(get_testdata_file("SC_rgb_rle.dcm"), "rb").read()
    img = _decode(data, DecodeConfig(color="luminance"))
    assert img.pixels.ndim == 2 and img.pixels.max() == 1.0


def _ramp(rows=64, cols=48, top=4095):
    return (np.linspace(0, top, rows * cols).reshape(rows, cols)).astype(np.uint16)


def test_monochrome1_is_inverted():
    ramp = _ramp()
    m2 = _decode(make_dicom(ramp, photometric="MONOCHROME2")).pixels
    m1 = _decode(make_dicom(ramp, photometric="MONOCHROME1")).pixels
    np.testing.assert_allclose(m1, 1.0 - m2, atol=1e-6)
    assert m2[0, 0] == 0.0 and m1[0, 0] == 1.0


def test_rescale_and_window_are_applied():
    ramp = _ramp()
    # rescale to [-1000, 3095]; window [0, 1000] (centre 500, width 1000) clips both ends
    data = make_dicom(ramp, RescaleSlope=1, RescaleIntercept=-1000, WindowCenter=500, WindowWidth=1000)
    windowed = _decode(data).pixels
    hu = ramp.astype(np.float64) - 1000
    assert (windowed[hu < 0] == 0).all() and (windowed[hu > 1000] == 1).all()
    inside = (hu > 10) & (hu < 990)
    expected = (hu[inside] - hu[inside].min()) / 1000
    assert np.corrcoef(windowed[inside], expected)[0, 1] > 0.999
    raw = _decode(data, DecodeConfig(voi="none")).pixels  # no VOI: the whole range, linear
    np.testing.assert_allclose(raw, ramp / ramp.max(), atol=1e-6)


def test_bits_stored_masks_unused_high_bits():
    ramp = _ramp(top=4095)
    dirty = ramp | np.uint16(0xF000)  # garbage in bits 12-15 must be ignored with BitsStored=12
    np.testing.assert_array_equal(_decode(make_dicom(dirty)).pixels, _decode(make_dicom(ramp)).pixels)


def test_multiframe_policy():
    frames = np.stack([_ramp(), _ramp()[::-1]])
    data = make_dicom(frames)
    with pytest.raises(RejectError, match="multiframe: 2 frames"):
        _decode(data)
    first = _decode(data, DecodeConfig(multiframe="first")).pixels
    np.testing.assert_array_equal(first, _decode(make_dicom(_ramp())).pixels)


def test_bad_inputs_are_rejected_with_specific_reasons(tmp_path):
    good = make_dicom(_ramp())
    cases = {
        b"": "empty_file",
        b"hello, not an image" * 20: "not_dicom",
        good[: len(good) - 500]: "pixel_decode_failed",  # truncated pixel data
        good[:200]: "no_pixel_data",  # cut inside the header
    }
    for data, code in cases.items():
        with pytest.raises(RejectError) as err:
            _decode(data)
        assert err.value.code == code, (len(data), err.value.reason)


def test_absurd_dimensions_rejected_before_decoding():
    data = make_dicom(_ramp(8, 8))
    bomb = data.replace(b"\x28\x00\x10\x00US\x02\x00\x08\x00", b"\x28\x00\x10\x00US\x02\x00\xff\xff")  # Rows=65535
    bomb = bomb.replace(b"\x28\x00\x11\x00US\x02\x00\x08\x00", b"\x28\x00\x11\x00US\x02\x00\xff\xff")
    with pytest.raises(RejectError, match="absurd_dimensions: 65535x65535 exceeds"):
        _decode(bomb)
    with pytest.raises(RejectError, match="below the minimum side"):
        _decode(data)


def test_unsupported_photometric_and_burned_in_annotation():
    with pytest.raises(RejectError, match="unsupported_photometric: HSV"):
        _decode(make_dicom(_ramp(), photometric="HSV"))
    with pytest.raises(RejectError) as err:
        _decode(make_dicom(_ramp(), BurnedInAnnotation="YES"))
    assert err.value.code == "burned_in_annotation"
    assert _decode(make_dicom(_ramp(), BurnedInAnnotation="YES"), DecodeConfig(burned_in_annotation="keep"))


def test_covariates_kept_and_identity_separate():
    img = _decode(make_dicom(_ramp(), PatientSex="F", PatientAge="045Y", ViewPosition="PA",
                             PatientName="DOE^JANE", PatientID="MRN123"))
    assert img.header["sex"] == "F" and img.header["age"] == 45 and img.header["view"] == "PA"
    assert img.identity["patient"] == "MRN123" and "DOE^JANE" in img.identity["known"].names
    assert ("ID", "MRN123") in img.identity["known"].other
    assert "MRN123" not in repr(img.header) and "DOE" not in repr(img.header)
    dated = _decode(make_dicom(_ramp(), PatientBirthDate="19600301", StudyDate="20200229"))
    assert dated.header["age"] == pytest.approx(59.99, abs=0.01)


def _raster(arr: np.ndarray, fmt: str) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt)
    return buf.getvalue()


def test_png_and_jpeg_inputs():
    ramp16 = _ramp(top=65535)
    np.testing.assert_allclose(_decode(_raster(ramp16, "PNG")).pixels, ramp16 / 65535, atol=1e-6)
    ramp8 = (_ramp(top=255)).astype(np.uint8)
    assert _decode(_raster(ramp8, "JPEG")).pixels.shape == (64, 48)
    grey_rgb = np.repeat(ramp8[..., None], 3, axis=2)
    np.testing.assert_allclose(_decode(_raster(grey_rgb, "PNG")).pixels, ramp8 / 255, atol=1e-6)
    colour = grey_rgb.copy()
    colour[..., 0] = 255
    with pytest.raises(RejectError, match="colour_image"):
        _decode(_raster(colour, "PNG"))
    with pytest.raises(RejectError, match="raster_decode_failed"):
        _decode(_raster(ramp8, "PNG")[:100])
