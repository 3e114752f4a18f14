"""DICOM CT series writer (pydicom): one file per axial slice, written atomically as a directory.

Pixel data are raw stored values with ``HU = RescaleSlope * raw + RescaleIntercept`` (slope 1,
intercept -1024): unsigned 16-bit when every value is >= -1024 HU, signed 16-bit (with
``PixelPaddingValue``) for sites that pad outside the reconstruction circle at -2048/-3024 HU.
Slices carry ImagePositionPatient/ImageOrientationPatient (LPS, axial: rows along +x, columns
along +y), PixelSpacing, SliceThickness and deterministic UIDs. File names are hashes, not in
slice order, and InstanceNumber runs from head to feet, so readers must sort by position.
Patient name, ID and birth date are set (synthetic) so downstream stages can prove they do not
leak them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from pipeline.synth.plan import Grid, SubjectPlan

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RESCALE_INTERCEPT = -1024.0
UID_PREFIX = "1.2.826.0.1.3680043.8.498."   # pydicom's root for generated UIDs


def _uid(*parts: object):
    from pydicom.uid import generate_uid

    return generate_uid(prefix=UID_PREFIX, entropy_srcs=[str(p) for p in parts])


def slice_file_name(plan: SubjectPlan, k: int) -> str:
    """Hash-based file name of slice ``k`` (deterministic; unrelated to slice order)."""
    return hashlib.sha1(f"{plan.seed}/{plan.sid}/{k}".encode()).hexdigest()[:16] + ".dcm"


def patient_tags(plan: SubjectPlan) -> dict[str, str]:
    """Synthetic identifying tags (deterministic), which must never reach the pipeline outputs."""
    token = hashlib.sha1(f"{plan.seed}/{plan.sid}/patient".encode()).hexdigest()
    birth_year = 2021 - int(round(plan.age))
    return {
        "PatientName": f"Synthetic^Patient{token[:6].upper()}",
        "PatientID": f"PID{token[6:16].upper()}",
        "PatientBirthDate": f"{birth_year:04d}{1 + int(token[16:18], 16) % 12:02d}{1 + int(token[18:20], 16) % 28:02d}",
    }


def _ds_number(value: float) -> str:
    """A DICOM DS string (at most 16 characters; exact for the plan's rounded geometry)."""
    text = f"{value:.10g}"
    return text if len(text) <= 16 else f"{value:.8e}"


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``path`` (readers never see a
    half-written series); on error it is removed and ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)   # mkdtemp makes 0700; a data directory follows the umask
    try:
        yield tmp
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.old.", dir=path.parent))
            os.replace(path, old / path.name)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_dicom_series(directory: str | os.PathLike, hu_zyx: np.ndarray, grid: Grid, plan: SubjectPlan) -> int:
    """Write ``hu_zyx`` (int16 ``[z, y, x]`` HU on ``grid``) as a CT series in ``directory``.

    Returns:
        The number of files written.
    """
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID

    if hu_zyx.shape != tuple(grid.shape_zyx):
        raise ValueError(f"volume shape {hu_zyx.shape} does not match the grid {grid.shape_zyx}")
    nz, ny, nx = hu_zyx.shape
    sz, sy, sx = grid.spacing_zyx
    ox, oy, oz = grid.origin_lps
    signed = int(hu_zyx.min()) < RESCALE_INTERCEPT
    raw_dtype = np.int16 if signed else np.uint16
    study, series, frame = (_uid(plan.seed, plan.sid, what) for what in ("study", "series", "frame"))
    patient = patient_tags(plan)
    with atomic_directory(directory) as tmp:
        for k in range(nz):
            meta = FileMetaDataset()
            meta.MediaStorageSOPClassUID = CT_IMAGE_STORAGE
            meta.MediaStorageSOPInstanceUID = _uid(plan.seed, plan.sid, "slice", k)
            meta.TransferSyntaxUID = ExplicitVRLittleEndian
            meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
            ds = Dataset()
            ds.file_meta = meta
            ds.SOPClassUID = CT_IMAGE_STORAGE
            ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
            ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
            ds.Modality = "CT"
            ds.Manufacturer = "copdssl synthetic"
            ds.SeriesDescription = "synthetic chest CT"
            ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
            ds.StudyDate = ds.SeriesDate = "20210101"
            ds.PatientName = patient["PatientName"]
            ds.PatientID = patient["PatientID"]
            ds.PatientBirthDate = patient["PatientBirthDate"]
            ds.PatientSex = "F" if plan.gender == 2 else "M"
            ds.InstitutionName = plan.site
            ds.ConvolutionKernel = "B31f" if plan.kernel == "smooth" else "B45f"
            ds.KVP = "120"
            ds.SeriesNumber = 1
            ds.InstanceNumber = nz - k             # head first: instance 1 is the top slice
            z = oz + k * sz
            ds.ImagePositionPatient = [_ds_number(ox), _ds_number(oy), _ds_number(z)]
            ds.ImageOrientationPatient = ["1", "0", "0", "0", "1", "0"]
            ds.SliceLocation = _ds_number(z)
            ds.PixelSpacing = [_ds_number(sy), _ds_number(sx)]   # row spacing, column spacing
            ds.SliceThickness = _ds_number(sz)
            ds.SamplesPerPixel = 1
            ds.PhotometricInterpretation = "MONOCHROME2"
            ds.Rows, ds.Columns = ny, nx
            ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
            ds.PixelRepresentation = 1 if signed else 0
            ds.RescaleIntercept = _ds_number(RESCALE_INTERCEPT)
            ds.RescaleSlope = "1"
            ds.RescaleType = "HU"
            ds.WindowCenter, ds.WindowWidth = "-600", "1500"
            if signed and plan.padding_hu is not None:
                ds.PixelPaddingValue = int(plan.padding_hu - RESCALE_INTERCEPT)
            raw = (hu_zyx[k].astype(np.int32) - int(RESCALE_INTERCEPT)).astype(raw_dtype)
            ds.PixelData = raw.tobytes()
            ds.save_as(tmp / slice_file_name(plan, k), enforce_file_format=True)
    return nz
