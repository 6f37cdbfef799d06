"""Synthetic/counterfactual image outputs that say what they are (provenance on every file).

- PNG-16 greyscale with a `cxrray:provenance` tEXt chunk,
- colour-coded signed difference map (8-bit RGB PNG, blue = darker, red = brighter), same chunk,
- DICOM Secondary Capture with ImageType DERIVED\\SECONDARY and a description naming the model and
  version; new UIDs and no patient/study identifiers (nothing is copied from any input header).

Images come in as float [-1, 1] arrays [S, S] (model range).
"""
from __future__ import annotations

import datetime as dt
import io

import numpy as np
from PIL import Image, PngImagePlugin

from cxrray import __version__
from cxrray.data.imaging import encode_png16

PROVENANCE_KEY = "cxrray:provenance"


def provenance(model: dict, what: str) -> str:
    """One line naming the image as synthetic, what produced it and how."""
    return (f"SYNTHETIC - {what} - model {model['name']} version {model['version']} - cxrray {__version__}; "
            f"not an acquired radiograph")


def image_png(image: np.ndarray, text: str) -> bytes:
    """[-1, 1] [S, S] -> 16-bit PNG with provenance."""
    return encode_png16((np.asarray(image, np.float32) + 1) / 2, {PROVENANCE_KEY: text})


def difference_png(difference: np.ndarray, text: str, scale: float | None = None) -> bytes:
    """Signed difference [S, S] (model units) -> RGB PNG, symmetric around 0 with the 'bwr' colormap.
    `scale` is the |value| mapped to full colour (default: the 99th percentile of |difference|)."""
    from matplotlib import colormaps

    d = np.asarray(difference, np.float32)
    scale = float(scale or np.percentile(np.abs(d), 99) or 1e-6)
    rgb = colormaps["bwr"](np.clip(0.5 + d / (2 * scale), 0, 1))[..., :3]
    info = PngImagePlugin.PngInfo()
    info.add_text(PROVENANCE_KEY, f"{text}; difference map, full colour at +/-{scale:.4g} (model units)")
    buf = io.BytesIO()
    Image.fromarray((rgb * 255).round().astype(np.uint8)).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def derived_dicom(image: np.ndarray, model: dict, what: str) -> bytes:
    """[-1, 1] [S, S] -> DICOM Secondary Capture bytes (MONOCHROME2, 16-bit) marked DERIVED."""
    import pydicom
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, SecondaryCaptureImageStorage, generate_uid

    values = np.round(np.clip((np.asarray(image, np.float32) + 1) / 2, 0, 1) * 65535).astype(np.uint16)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    now = dt.datetime.now(dt.timezone.utc)
    ds.SOPClassUID, ds.SOPInstanceUID = SecondaryCaptureImageStorage, sop
    ds.StudyInstanceUID, ds.SeriesInstanceUID = generate_uid(), generate_uid()
    ds.ImageType = ["DERIVED", "SECONDARY"]
    ds.Modality, ds.ConversionType = "OT", "SYN"
    ds.ContentDate, ds.ContentTime = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    description = provenance(model, what)
    ds.SeriesDescription = description[:64]
    ds.DerivationDescription = description[:1024]
    ds.ImageComments = description[:10240]
    ds.Manufacturer, ds.ManufacturerModelName = "cxrray", f"{model['name']} {model['version']}"[:64]
    ds.SoftwareVersions = __version__
    ds.BurnedInAnnotation = "NO"
    ds.PatientName, ds.PatientID = "SYNTHETIC", ""
    ds.Rows, ds.Columns = values.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = values.tobytes()
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()
