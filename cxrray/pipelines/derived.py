"""Synthetic and counterfactual image outputs (the explain job's files and the Serve API's answers):
every one says what it is.

- PNG-16 (greyscale, the shard codec) with a `cxrray:provenance` tEXt chunk in the wording of
  `cxrray.eval.grids` ("SYNTHETIC - ... - cxrray X; not an acquired radiograph") naming the model;
- a colour-coded difference map (8-bit RGB PNG, same chunk): red = brighter (denser) in the
  counterfactual, blue = darker, white = unchanged, full colour at +-scale;
- a derived Secondary Capture DICOM (ImageType DERIVED\\SECONDARY, ConversionType SYN, new UIDs,
  empty patient module): nothing from the upload's header is copied into it.
"""
from __future__ import annotations

import base64
import io
from datetime import datetime, timezone

import numpy as np
from PIL import Image, PngImagePlugin
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from cxrray import __version__
from cxrray.data.imaging import PNG_MAX, encode_png16

PROVENANCE_KEY = "cxrray:provenance"
DIFFERENCE_LEGEND = ("red: brighter (denser) in the counterfactual; blue: darker; white: unchanged; "
                     "full colour at +-scale (image units, images in [-1, 1])")


def provenance(what: str, model: dict) -> str:
    return (f"SYNTHETIC - {what} by model {model['name']} version {model['version']} - cxrray {__version__}; "
            "not an acquired radiograph")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def png16(image: np.ndarray, text: str) -> bytes:
    """float [S, S] in [-1, 1] -> 16-bit greyscale PNG carrying the provenance chunk."""
    return encode_png16((np.asarray(image, dtype=np.float32) + 1.0) / 2.0,
                        text={PROVENANCE_KEY: text, "Software": f"cxrray {__version__}"})


def difference_png(diff: np.ndarray, text: str) -> tuple[bytes, float]:
    """Signed difference [S, S] -> (RGB PNG, scale): white at 0, red at +scale, blue at -scale."""
    diff = np.asarray(diff, dtype=np.float32)
    scale = max(float(np.abs(diff).max()), 1e-6)
    v = np.clip(diff / scale, -1.0, 1.0)
    rgb = np.stack([1 - np.clip(-v, 0, 1), 1 - np.abs(v), 1 - np.clip(v, 0, 1)], axis=-1)
    info = PngImagePlugin.PngInfo()
    info.add_text(PROVENANCE_KEY, text)
    info.add_text("cxrray:legend", DIFFERENCE_LEGEND)
    buf = io.BytesIO()
    Image.fromarray(np.round(rgb * 255).astype(np.uint8), mode="RGB").save(buf, format="PNG", pnginfo=info)
    return buf.getvalue(), scale


def secondary_capture(image: np.ndarray, text: str, model: dict, description: str) -> bytes:
    """float [S, S] in [-1, 1] -> a derived, synthetic Secondary Capture DICOM with fresh UIDs."""
    values = np.round(np.clip((np.asarray(image, dtype=np.float64) + 1) / 2, 0, 1) * PNG_MAX).astype("<u2")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    now = datetime.now(timezone.utc)
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    # Patient / study modules: type 2, present and empty. Nothing is copied from the upload.
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "PatientSex", "ReferringPhysicianName",
                    "AccessionNumber", "StudyID"):
        setattr(ds, keyword, "")
    ds.PatientIdentityRemoved = "YES"
    ds.DeidentificationMethod = "cxrray: synthetic; nothing copied from the upload"
    ds.StudyDate = ds.ContentDate = now.strftime("%Y%m%d")
    ds.StudyTime = ds.ContentTime = now.strftime("%H%M%S")
    ds.Modality = "OT"
    ds.ConversionType = "SYN"
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.SeriesDescription = f"SYNTHETIC {description} {model['name']} {model['version']}"[:64]
    ds.DerivationDescription = text[:1024]
    ds.ImageComments = text[:10240]
    ds.BurnedInAnnotation = "NO"
    ds.Manufacturer = "cxrray"
    ds.ManufacturerModelName = str(model["name"])[:64]
    ds.SoftwareVersions = [f"cxrray {__version__}", f"{model['name']} {model['version']}"[:64]]
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.ascontiguousarray(values).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
