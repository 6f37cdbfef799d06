"""Write phantom images as real DICOM files (DX, 12-bit, varied photometrics and transfer syntaxes)."""
from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    DigitalXRayImageStorageForPresentation,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)

from .cases import PhantomCase
from .config import PhantomConfig

BITS_STORED = 12
MAX_VALUE = (1 << BITS_STORED) - 1
FIELD_OF_VIEW_MM = 430.0  # detector height


def quantize(pixels: np.ndarray) -> np.ndarray:
    """Density image in [0, 1] -> 12-bit values (MONOCHROME2 sense), the intended decoded pixels."""
    return np.rint(np.clip(pixels, 0.0, 1.0) * MAX_VALUE).astype(np.uint16)


def stored_values(case: PhantomCase, pixels: np.ndarray) -> np.ndarray:
    """What goes into PixelData: quantized, inverted for MONOCHROME1 (bright = low values)."""
    q = quantize(pixels)
    return (MAX_VALUE - q).astype(np.uint16) if case.photometric == "MONOCHROME1" else q


def decode(ds: Dataset) -> np.ndarray:
    """Decoded values in MONOCHROME2 sense (rescale applied, MONOCHROME1 undone): inverse of quantize."""
    arr = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    if ds.PhotometricInterpretation == "MONOCHROME1":
        arr = (2 ** int(ds.BitsStored) - 1) * float(ds.RescaleSlope) + 2 * float(ds.RescaleIntercept) - arr
    return arr


def _uid(case: PhantomCase, what: str) -> str:
    return generate_uid(entropy_srcs=["cxrray-phantom", str(case.seed), str(case.index), what])


def build_dataset(case: PhantomCase, pixels: np.ndarray, window_of: np.ndarray | None = None) -> Dataset:
    """The full DICOM dataset (uncompressed pixel data) for one case; its VOI window from `pixels`, or from
    `window_of` (another render of the case: a paired counterpart then decodes on the same intensity scale,
    and is written as a DERIVED image of its own series and SOP instance)."""
    stored = stored_values(case, pixels)
    rows, cols = stored.shape
    derived = window_of is not None  # a paired counterpart: its own series and instance, DERIVED
    sop_uid = _uid(case, "sop-counterpart" if derived else "sop")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = DigitalXRayImageStorageForPresentation
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = "CXRRAY_PHANTOM"

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["DERIVED", "SECONDARY"] if derived else ["ORIGINAL", "PRIMARY"]
    ds.SOPClassUID = DigitalXRayImageStorageForPresentation
    ds.SOPInstanceUID = sop_uid
    date = case.study_date.strftime("%Y%m%d")
    ds.StudyDate = ds.SeriesDate = ds.AcquisitionDate = ds.ContentDate = date
    ds.StudyTime = ds.SeriesTime = ds.AcquisitionTime = ds.ContentTime = case.study_time
    ds.AccessionNumber = case.accession
    ds.Modality = "DX"
    ds.PresentationIntentType = "FOR PRESENTATION"
    ds.Manufacturer = "CXRRAY"
    ds.InstitutionName, ds.InstitutionAddress = case.institution
    ds.ReferringPhysicianName = case.referring
    ds.StationName = case.station
    ds.StudyDescription = f"XR CHEST {case.view}"
    ds.SeriesDescription = f"CHEST {case.view}"
    ds.PerformingPhysicianName = case.performing
    ds.OperatorsName = case.operator
    ds.ManufacturerModelName = "PHANTOM DR 1"
    # patient
    p = case.patient
    ds.PatientName = p.name
    ds.PatientID = p.patient_id
    ds.IssuerOfPatientID = case.institution[0][:64]
    ds.PatientBirthDate = p.birth_date.strftime("%Y%m%d")
    ds.PatientSex = p.sex
    ds.OtherPatientIDs = p.other_id
    ds.PatientAge = f"{min(case.age, 999):03d}Y"
    ds.PatientAddress = p.address
    ds.PatientIdentityRemoved = "NO"
    # acquisition / equipment
    ds.BodyPartExamined = "CHEST"
    ds.DeviceSerialNumber = case.device_serial
    ds.SoftwareVersions = "1.0"
    ds.ProtocolName = f"CHEST {case.view}"
    ds.ViewPosition = case.view
    ds.PatientOrientation = ["L", "F"]
    ds.StudyInstanceUID = _uid(case, "study")
    ds.SeriesInstanceUID = _uid(case, "series-counterpart" if derived else "series")
    ds.StudyID = case.study_id
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.BurnedInAnnotation = "NO"
    spacing = round(FIELD_OF_VIEW_MM / rows, 4)
    ds.ImagerPixelSpacing = [spacing, spacing]
    ds.PixelSpacing = [spacing, spacing]
    # image pixel
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = case.photometric
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated = 16
    ds.BitsStored = BITS_STORED
    ds.HighBit = BITS_STORED - 1
    ds.PixelRepresentation = 0
    ds.PixelIntensityRelationship = "LOG"
    ds.PixelIntensityRelationshipSign = 1 if case.photometric == "MONOCHROME1" else -1
    ds.RescaleIntercept = "0"
    ds.RescaleSlope = "1"
    ds.RescaleType = "US"
    lo, hi = np.percentile(stored if window_of is None else stored_values(case, window_of), [0.5, 99.5])
    ds.WindowCenter = f"{(lo + hi) / 2:.1f}"
    ds.WindowWidth = f"{max(hi - lo + 1, 2):.1f}"
    ds.VOILUTFunction = "LINEAR"
    ds.LossyImageCompression = "00"
    ds.PixelData = stored.tobytes()
    return ds


def write_dicom(case: PhantomCase, pixels: np.ndarray, path: str | os.PathLike, cfg: PhantomConfig | None = None,
                window_of: np.ndarray | None = None) -> None:
    """Write one case as a DICOM Part 10 file, encoded with `case.transfer_syntax` (`window_of`: `build_dataset`)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(dicom_bytes(case, pixels, window_of))


def dicom_bytes(case: PhantomCase, pixels: np.ndarray, window_of: np.ndarray | None = None) -> bytes:
    """One case as DICOM Part 10 bytes, encoded with `case.transfer_syntax` (what `write_dicom` writes)."""
    ds = build_dataset(case, pixels, window_of)
    ts = pydicom.uid.UID(case.transfer_syntax)
    if ts.is_compressed:
        ds.compress(ts, stored_values(case, pixels), generate_instance_uid=False)
    elif ts == ImplicitVRLittleEndian:
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()
