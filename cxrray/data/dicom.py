"""Decode one radiograph file (DICOM, PNG or JPEG) into a float image, or reject it with a reason.

Output contract: `DecodedImage.pixels` is float32 [rows, cols] in [0, 1], MONOCHROME2 (bright =
dense), after the Modality LUT (rescale) and VOI LUT / window, min-max stretched. Header values
that are kept are non-identifying covariates only (`header`); the raw patient/study identifiers
are returned separately in `identity` so the caller can hash them at once and drop them.
"""
from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from datetime import date

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut

from cxrray.data.settings import DecodeConfig
from cxrray.data.text_deid import KnownIdentifiers

GRAY = ("MONOCHROME1", "MONOCHROME2")
COLOUR = ("RGB", "YBR_FULL", "YBR_FULL_422", "YBR_ICT", "YBR_RCT", "YBR_PARTIAL_420")
VIEWS = {"PA": "PA", "AP": "AP", "LL": "LATERAL", "RL": "LATERAL", "LATERAL": "LATERAL", "LAT": "LATERAL"}


class RejectError(Exception):
    """An input that cannot become a training sample; `code` is stable, `detail` is for people."""

    def __init__(self, code: str, detail: str = ""):
        super().__init__(f"{code}: {detail}" if detail else code)
        self.code = code
        self.detail = detail

    @property
    def reason(self) -> str:
        return str(self)


@dataclass
class DecodedImage:
    pixels: np.ndarray  # float32 [rows, cols], [0, 1], MONOCHROME2
    header: dict = field(default_factory=dict)  # sex, age, view, modality, photometric, transfer_syntax, ...
    identity: dict = field(default_factory=dict)  # raw ids and `known` identifiers: hash/scrub at once, never store


def decode_file(data: bytes, cfg: DecodeConfig) -> DecodedImage:
    """Dispatch on the file's magic bytes; raise RejectError for anything unusable."""
    if not data:
        raise RejectError("empty_file", "0 bytes")
    if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff":
        return decode_raster(data, cfg)
    return decode_dicom(data, cfg)


def decode_dicom(data: bytes, cfg: DecodeConfig) -> DecodedImage:
    ds = _read_dataset(data)
    if "PixelData" not in ds and "FloatPixelData" not in ds and "DoubleFloatPixelData" not in ds:
        sop = getattr(ds.get("SOPClassUID"), "name", None)
        detail = f"non-image object ({sop})" if sop else "no SOP class and no pixels: not an image, or truncated"
        raise RejectError("no_pixel_data", detail)
    _check_geometry(ds, cfg)
    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric not in GRAY + COLOUR:
        raise RejectError("unsupported_photometric", photometric or "missing PhotometricInterpretation")
    if photometric in COLOUR and cfg.color == "reject":
        raise RejectError("colour_image", f"{photometric} (set decode.color=luminance to convert)")
    if str(ds.get("BurnedInAnnotation", "")).upper() == "YES" and cfg.burned_in_annotation == "reject":
        raise RejectError("burned_in_annotation", "BurnedInAnnotation=YES may show identifiers in pixels")
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if frames > 1 and cfg.multiframe == "reject":
        raise RejectError("multiframe", f"{frames} frames (set decode.multiframe=first to keep frame 0)")

    try:
        arr = ds.pixel_array
    except Exception as exc:
        raise RejectError("pixel_decode_failed", _short(exc)) from None
    if frames > 1:
        arr = arr[0]
    if photometric in COLOUR:
        arr = arr.astype(np.float64) @ np.array([0.299, 0.587, 0.114])  # pixel_array gives RGB
    else:
        arr = apply_modality_lut(arr, ds)
        if cfg.voi == "auto" and ("WindowCenter" in ds or "VOILUTSequence" in ds):
            arr = apply_voi_lut(arr, ds)
    pixels = _stretch(np.asarray(arr, dtype=np.float64))
    if photometric == "MONOCHROME1":
        pixels = 1.0 - pixels
    header = {
        "sex": _sex(ds.get("PatientSex")),
        "age": _age(ds),
        "view": VIEWS.get(str(ds.get("ViewPosition", "")).strip().upper()),
        "modality": str(ds.get("Modality", "")) or None,
        "photometric": photometric,
        "transfer_syntax": ds.file_meta.get("TransferSyntaxUID", pydicom.uid.ImplicitVRLittleEndian).name
        if hasattr(ds, "file_meta") else None,
        "bits_stored": int(ds.get("BitsStored", 0) or 0) or None,
        "source_shape": [int(ds.Rows), int(ds.Columns)],
    }
    identity = {
        "patient": _text(ds.get("PatientID")),
        "study": _text(ds.get("StudyInstanceUID")) or _text(ds.get("AccessionNumber")),
        "known": known_identifiers(ds),
    }
    return DecodedImage(pixels.astype(np.float32), header, identity)


def _read_dataset(data: bytes) -> pydicom.Dataset:
    """Parse a DICOM file; files without the 128-byte preamble (old ACR-NEMA style) are tried
    again with `force` and kept only if they hold image attributes."""
    try:
        return pydicom.dcmread(io.BytesIO(data))
    except InvalidDicomError:
        pass
    except Exception as exc:  # truncated header, bad VR lengths...
        raise RejectError("unreadable_dicom", _short(exc)) from None
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=True)
        if "SOPClassUID" in ds or ("Rows" in ds and "PixelData" in ds):
            return ds
    except Exception:
        pass
    raise RejectError("not_dicom", "no DICOM header and not PNG/JPEG")


def decode_raster(data: bytes, cfg: DecodeConfig) -> DecodedImage:
    """PNG/JPEG (8 or 16 bit); grey, or colour per `cfg.color`. No identifiers in these."""
    try:
        img = Image.open(io.BytesIO(data))
        cols, rows = img.size
        _check_dims(rows, cols, cfg)
        img.load()
    except RejectError:
        raise
    except Exception as exc:
        raise RejectError("raster_decode_failed", _short(exc)) from None
    arr = np.asarray(img)
    if arr.ndim == 3:
        rgb = arr[..., :3].astype(np.float64)
        if np.all(rgb == rgb[..., :1]):
            arr = rgb[..., 0]
        elif cfg.color == "reject":
            raise RejectError("colour_image", f"{img.mode} raster (set decode.color=luminance to convert)")
        else:
            arr = rgb @ np.array([0.299, 0.587, 0.114])
    pixels = _stretch(np.asarray(arr, dtype=np.float64)).astype(np.float32)
    return DecodedImage(pixels, {"photometric": "MONOCHROME2", "source_shape": [rows, cols], "format": img.format})


#: header elements whose values are removed wherever they appear in free text, by placeholder type
NAME_TAGS = ("PatientName", "OtherPatientNames", "PatientBirthName", "PatientMotherBirthName",
             "ReferringPhysicianName", "PerformingPhysicianName", "OperatorsName", "NameOfPhysiciansReadingStudy",
             "PhysiciansOfRecord", "RequestingPhysician", "ResponsiblePerson")
OTHER_TAGS = {"ID": ("PatientID", "OtherPatientIDs", "AccessionNumber", "StudyID", "DeviceSerialNumber",
                     "StationName", "PatientTelephoneNumbers", "MilitaryRank", "MedicalRecordLocator"),
              "DATE": ("PatientBirthDate",),
              "ADDRESS": ("PatientAddress", "InstitutionAddress", "ReferringPhysicianAddress"),
              "INSTITUTION": ("InstitutionName", "IssuerOfPatientID", "InstitutionalDepartmentName")}


def known_identifiers(ds: pydicom.Dataset) -> KnownIdentifiers:
    """The header's identifiers, for removal from free text such as reports and error messages."""
    def values(tag: str) -> list[str]:
        value = ds.get(tag)
        items = value if isinstance(value, (list, pydicom.multival.MultiValue)) else [value]
        return [str(v).strip() for v in items if v is not None and str(v).strip()]

    names = [v for tag in NAME_TAGS for v in values(tag)]
    other = [(kind, v) for kind, tags in OTHER_TAGS.items() for tag in tags for v in values(tag)]
    return KnownIdentifiers(names, other)


def header_identifiers(data: bytes) -> KnownIdentifiers:
    """Identifiers of a DICOM file read from its header alone (nothing if it is not DICOM or unreadable),
    for scrubbing a reject reason of a file that failed to decode."""
    if data[:8] == b"\x89PNG\r\n\x1a\n" or data[:3] == b"\xff\xd8\xff":
        return KnownIdentifiers()
    try:
        return known_identifiers(pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True, force=True))
    except Exception:
        return KnownIdentifiers()


def _check_geometry(ds: pydicom.Dataset, cfg: DecodeConfig) -> None:
    try:
        rows, cols = int(ds.Rows), int(ds.Columns)
    except Exception:
        raise RejectError("missing_image_attributes", "Rows/Columns absent or not integers") from None
    _check_dims(rows, cols, cfg)
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    if rows * cols * max(frames, 1) > cfg.max_pixels * 4:
        raise RejectError("absurd_dimensions", f"{frames} frames of {rows}x{cols}")


def _check_dims(rows: int, cols: int, cfg: DecodeConfig) -> None:
    if rows < cfg.min_side or cols < cfg.min_side:
        raise RejectError("absurd_dimensions", f"{rows}x{cols} is below the minimum side {cfg.min_side}")
    if rows * cols > cfg.max_pixels:
        raise RejectError("absurd_dimensions", f"{rows}x{cols} exceeds decode.max_pixels={cfg.max_pixels}")


def _stretch(arr: np.ndarray) -> np.ndarray:
    if not np.all(np.isfinite(arr)):
        raise RejectError("non_finite_pixels", "NaN or infinite values after LUTs")
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        raise RejectError("blank_image", f"constant pixel value {lo:g}")
    return (arr - lo) / (hi - lo)


def _short(exc: Exception, limit: int = 200) -> str:
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    return text[:limit]


def _text(value) -> str | None:
    text = str(value).strip() if value is not None else ""
    return text or None


def _sex(value) -> str | None:
    text = str(value or "").strip().upper()[:1]
    return text if text in ("M", "F") else None


_AGE = re.compile(r"^(\d{1,3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}


def _age(ds: pydicom.Dataset) -> float | None:
    """Age in years from PatientAge, else from birth and study dates (neither date is kept)."""
    match = _AGE.match(str(ds.get("PatientAge", "")).strip().upper())
    if match:
        return round(int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2)], 2)
    born, seen = _date(ds.get("PatientBirthDate")), _date(ds.get("StudyDate"))
    if born and seen and seen >= born:
        return round((seen - born).days / 365.25, 2)
    return None


def _date(value) -> date | None:
    text = str(value or "").strip()
    try:
        return date(int(text[:4]), int(text[4:6]), int(text[6:8])) if len(text) >= 8 else None
    except ValueError:
        return None
