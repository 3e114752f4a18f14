"""Read a single-series DICOM CT directory (pydicom) as a SimpleITK image in HU."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.ct_io.geometry import quantised_geometry
from pipeline.ct_io.hu import AIR_HU, STAGE, checked_hu, is_real
from pipeline.errors import SubjectError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import SimpleITK as sitk

log = logging.getLogger(__name__)

# DICOM tags copied into the QC record. A whitelist: no patient or institution tag may leak.
_QC_TAGS = ("Manufacturer", "ManufacturerModelName", "ConvolutionKernel", "SliceThickness", "KVP")
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


@dataclass(frozen=True)
class DicomSeries:
    """A DICOM CT series read as HU.

    Attributes:
        image: SimpleITK image, voxel axes (column, row, slice) of the acquisition; arrays
            from it are ``[slice, row, column]``.
        info: whitelisted acquisition tags for QC (manufacturer, kernel, slice thickness ...);
            never patient tags.
    """

    image: sitk.Image
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Slice:
    path: Path
    dataset: Any
    position: float


def _tag(ds, keyword: str, path: Path, sid: str | None):
    value = ds.get(keyword)
    if value is None or value == "":
        raise SubjectError(sid, f"DICOM file {path.name} lacks {keyword}", STAGE)
    return value


def _read_slices(directory: Path, sid: str | None) -> list[Any]:
    """Parse every DICOM image file in ``directory`` (pixel data deferred)."""
    import pydicom
    from pydicom.errors import InvalidDicomError

    if not directory.exists():
        raise SubjectError(sid, f"DICOM directory {directory} does not exist", STAGE)
    if not directory.is_dir():
        raise SubjectError(sid, f"DICOM input {directory} is not a directory", STAGE)
    datasets = []
    for path in sorted(directory.iterdir()):
        if not path.is_file():
            log.debug("subject %s: skipping %s (not a file)", sid, path.name)
            continue
        unreadable = (InvalidDicomError, EOFError, OSError, ValueError, TypeError, AttributeError, KeyError,
                      IndexError, OverflowError, UnicodeDecodeError)
        try:
            ds = pydicom.dcmread(path, defer_size="64 KB")
        except InvalidDicomError:
            # No 'DICM' preamble: legacy files may still be DICOM; keep them only if they are images.
            try:
                ds = pydicom.dcmread(path, defer_size="64 KB", force=True)
                if "ImagePositionPatient" not in ds:
                    raise InvalidDicomError("no DICM preamble and no image position")
                _set_transfer_syntax(ds)
            except unreadable as error:
                log.debug("subject %s: skipping %s (not DICOM: %s)", sid, path.name, error)
                continue
        except unreadable as error:
            log.debug("subject %s: skipping %s (not DICOM: %s)", sid, path.name, error)
            continue
        sop_class = str(getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", ""))
        if sop_class == _DICOMDIR_SOP_CLASS or "PixelData" not in ds:
            log.debug("subject %s: skipping %s (no image: DICOMDIR or no pixel data)", sid, path.name)
            continue
        datasets.append((path, ds))
    if not datasets:
        raise SubjectError(sid, f"no DICOM image files in {directory}", STAGE)
    return datasets


def _set_transfer_syntax(ds) -> None:
    """Give a preamble-less (legacy) dataset the transfer syntax it was parsed with."""
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    meta = getattr(ds, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        return
    implicit, little = ds.original_encoding
    if meta is None:
        ds.file_meta = meta = FileMetaDataset()
    meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                              ExplicitVRLittleEndian if little else ExplicitVRBigEndian)


def load_dicom_series(directory: str | os.PathLike, sid: str | None, *, spacing_tolerance: float = 0.05,
                      min_slices: int = 1) -> DicomSeries:
    """Read a single-series DICOM CT directory as HU (see :func:`read_dicom_series_hu`).

    Returns:
        :class:`DicomSeries` with the image and whitelisted QC tags.
    """
    import SimpleITK as sitk

    if not (is_real(spacing_tolerance) and np.isfinite(spacing_tolerance) and spacing_tolerance >= 0):
        raise ValueError(f"spacing_tolerance must be a finite number >= 0, got {spacing_tolerance!r}")
    if not (is_real(min_slices) and float(min_slices).is_integer() and min_slices >= 1):
        raise ValueError(f"min_slices must be an integer >= 1, got {min_slices!r}")
    directory = Path(directory)
    datasets = _read_slices(directory, sid)

    modalities = sorted({str(ds.get("Modality", "") or "missing") for _, ds in datasets})
    if modalities != ["CT"]:
        bad = [m for m in modalities if m != "CT"]
        raise SubjectError(sid, f"modality {'/'.join(bad)} is not CT", STAGE)
    series = {str(ds.get("SeriesInstanceUID", "")) for _, ds in datasets}
    if len(series) > 1:
        raise SubjectError(sid, f"mixed series: {len(series)} different SeriesInstanceUIDs in {directory}", STAGE)
    frames = {int(ds.get("NumberOfFrames", 1) or 1) for _, ds in datasets}
    if frames != {1}:
        raise SubjectError(sid, "multi-frame DICOM is not supported (one file per slice expected)", STAGE)

    first_path, first = datasets[0]
    iop = np.asarray(_tag(first, "ImageOrientationPatient", first_path, sid), dtype=np.float64)
    shape = (int(_tag(first, "Rows", first_path, sid)), int(_tag(first, "Columns", first_path, sid)))
    pixel_spacing = np.asarray(_tag(first, "PixelSpacing", first_path, sid), dtype=np.float64)
    for path, ds in datasets[1:]:
        other = np.asarray(_tag(ds, "ImageOrientationPatient", path, sid), dtype=np.float64)
        if other.shape != iop.shape or not np.allclose(other, iop, atol=1e-4):
            raise SubjectError(sid, f"mixed orientation: ImageOrientationPatient {_fmt(iop)} in {first_path.name} "
                                    f"but {_fmt(other)} in {path.name}", STAGE)
        other_shape = (int(_tag(ds, "Rows", path, sid)), int(_tag(ds, "Columns", path, sid)))
        if other_shape != shape:
            raise SubjectError(sid, f"mixed shape: {shape[0]}x{shape[1]} slices in {first_path.name} but "
                                    f"{other_shape[0]}x{other_shape[1]} in {path.name}", STAGE)
        other_spacing = np.asarray(_tag(ds, "PixelSpacing", path, sid), dtype=np.float64)
        if other_spacing.shape != pixel_spacing.shape or not np.allclose(other_spacing, pixel_spacing, rtol=1e-4):
            raise SubjectError(sid, f"mixed shape: PixelSpacing {_fmt(pixel_spacing)} in {first_path.name} but "
                                    f"{_fmt(other_spacing)} in {path.name}", STAGE)
    if iop.shape != (6,) or pixel_spacing.shape != (2,) or np.any(pixel_spacing <= 0):
        raise SubjectError(sid, "invalid ImageOrientationPatient or PixelSpacing", STAGE)

    row_cos, col_cos = iop[:3], iop[3:]
    if not (np.isclose(np.linalg.norm(row_cos), 1, atol=1e-3) and np.isclose(np.linalg.norm(col_cos), 1, atol=1e-3)
            and abs(row_cos @ col_cos) < 1e-3):
        raise SubjectError(sid, f"ImageOrientationPatient {_fmt(iop)} is not two orthonormal vectors", STAGE)
    row_cos, col_cos = row_cos / np.linalg.norm(row_cos), col_cos / np.linalg.norm(col_cos)
    normal = np.cross(row_cos, col_cos)

    # Sort by position along the slice normal, never by file name or InstanceNumber.
    slices = []
    for path, ds in datasets:
        ipp = np.asarray(_tag(ds, "ImagePositionPatient", path, sid), dtype=np.float64)
        if ipp.shape != (3,):
            raise SubjectError(sid, f"DICOM file {path.name} has an invalid ImagePositionPatient", STAGE)
        slices.append(_Slice(path, ds, float(ipp @ normal)))
    del datasets  # from here on each dataset is referenced once, so _stack_hu can free it
    slices.sort(key=lambda s: s.position)
    if len(slices) < min_slices:
        raise SubjectError(sid, f"only {len(slices)} slices (minimum {min_slices})", STAGE)

    positions = np.array([s.position for s in slices])
    slice_spacing = _slice_spacing(positions, first, spacing_tolerance, sid)
    origin = np.asarray(slices[0].dataset.ImagePositionPatient, dtype=np.float64)
    if len(slices) > 1:
        last = np.asarray(slices[-1].dataset.ImagePositionPatient, dtype=np.float64)
        along = (last - origin) @ normal
        off_axis = np.linalg.norm((last - origin) - along * normal)
        if off_axis > max(0.01 * abs(along), 0.5 * float(pixel_spacing.min())):
            angle = np.degrees(np.arctan2(off_axis, abs(along)))
            raise SubjectError(sid, f"slice positions are not along the slice normal (gantry tilt or shear of "
                                    f"{angle:.1f} degrees); not supported", STAGE)

    volume = _stack_hu(slices, shape, sid)
    values = checked_hu(volume, sid)
    del volume
    spacing, direction, origin = quantised_geometry((pixel_spacing[1], pixel_spacing[0], slice_spacing),
                                           np.column_stack([row_cos, col_cos, normal]), origin)
    img = sitk.GetImageFromArray(values)  # [slice, row, column] -> x = column, y = row, z = slice
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    img.SetOrigin(origin)
    return DicomSeries(img, _qc_info(first))


def read_dicom_series_hu(directory: str | os.PathLike, sid: str | None, *, spacing_tolerance: float = 0.05,
                         min_slices: int = 1) -> "sitk.Image":
    """Read a directory holding one DICOM CT series (one file per slice) as HU.

    Files that are not DICOM images (README, DICOMDIR, ...) are skipped with a debug log.
    Every slice must be CT, of the same series, with the same ImageOrientationPatient, Rows,
    Columns and PixelSpacing. Slices are sorted by their position along the slice normal
    ``dot(ImagePositionPatient, row × column)``, RescaleSlope/RescaleIntercept are applied per
    slice, and the slice spacing must be uniform within ``spacing_tolerance`` (relative); a gap
    of about twice the median spacing is reported as a missing slice.

    Args:
        directory: the series directory.
        sid: subject ID for error messages.
        spacing_tolerance: relative tolerance on slice spacing (0.05 = 5 %).
        min_slices: minimum number of slices.

    Returns:
        SimpleITK image (int16 when exact, else float32) with direction columns (row cosine,
        column cosine, slice normal) in LPS and the first slice's ImagePositionPatient as
        origin; arrays from it are ``[slice, row, column]``. Not yet canonical.

    Raises:
        SubjectError: with a one-line reason naming the cause.
        ValueError: for invalid ``spacing_tolerance`` / ``min_slices``.
    """
    return load_dicom_series(directory, sid, spacing_tolerance=spacing_tolerance, min_slices=min_slices).image


def _slice_spacing(positions: np.ndarray, first, tolerance: float, sid: str | None) -> float:
    """Uniform slice spacing from sorted positions ``[n]`` along the normal, in mm."""
    if len(positions) == 1:
        for keyword in ("SpacingBetweenSlices", "SliceThickness"):
            value = first.get(keyword)
            if value not in (None, "") and float(value) > 0:
                return float(value)
        return 1.0
    gaps = np.diff(positions)
    duplicate = np.flatnonzero(gaps < 1e-3)
    if duplicate.size:
        raise SubjectError(sid, f"two slices at the same position z={positions[duplicate[0]]:.2f} mm", STAGE)
    expected = float(np.median(gaps))
    bad = np.flatnonzero(np.abs(gaps - expected) > tolerance * expected)
    if bad.size:
        index = int(bad[0])
        gap = float(gaps[index])
        between = f"between z={positions[index]:.2f} and z={positions[index + 1]:.2f} mm"
        missing = round(gap / expected) - 1
        if missing >= 1 and abs(gap - (missing + 1) * expected) <= tolerance * expected * (missing + 1):
            what = "missing slice" if missing == 1 else f"{missing} missing slices"
            raise SubjectError(sid, f"{what} {between} (gap {gap:.2f} mm, expected {expected:.2f} mm)", STAGE)
        raise SubjectError(sid, f"non-uniform slice spacing {between} (gap {gap:.2f} mm, expected {expected:.2f} mm, "
                                f"tolerance {tolerance:.0%})", STAGE)
    return float(positions[-1] - positions[0]) / (len(positions) - 1)


def _stack_hu(slices: list[_Slice], shape: tuple[int, int], sid: str | None) -> np.ndarray:
    """Decode and rescale every slice into one ``[n, rows, cols]`` array (int16 when exact)."""
    rescale = [(float(s.dataset.get("RescaleSlope", 1) or 1), float(s.dataset.get("RescaleIntercept", 0) or 0))
               for s in slices]
    integral = all(float(a).is_integer() and float(b).is_integer() for a, b in rescale)
    volume = np.empty((len(slices), *shape), dtype=np.int16 if integral else np.float32)
    low, high = np.iinfo(np.int16).min, np.iinfo(np.int16).max
    for index, (item, (slope, intercept)) in enumerate(zip(slices, rescale)):
        ds = item.dataset
        try:
            raw = ds.pixel_array
        except Exception as error:  # noqa: BLE001 - pydicom raises many types for undecodable data
            syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "?")
            raise SubjectError(sid, f"cannot decode pixel data of {item.path.name} (transfer syntax {syntax}): "
                                    f"{type(error).__name__}: {error}", STAGE) from None
        if raw.shape != shape:
            raise SubjectError(sid, f"mixed shape: {item.path.name} holds {raw.shape} pixels, expected {shape}", STAGE)
        if integral:  # exact integer arithmetic, int32 per slice
            hu = raw.astype(np.int32)
            if slope != 1:
                hu *= int(slope)
            hu += int(intercept)
        else:
            hu = raw.astype(np.float32) * np.float32(slope) + np.float32(intercept)
        padding = ds.get("PixelPaddingValue")
        if padding is not None:
            hu[raw == padding] = AIR_HU
        if integral and (hu.min() < low or hu.max() > high):
            raise SubjectError(sid, f"values outside the int16 range in {item.path.name}: {hu.min()} to "
                                    f"{hu.max()} HU", STAGE)
        volume[index] = hu
        item.dataset = None  # drop the slice's pixel bytes and decoded array early
        del ds, raw, hu
    return volume


def _qc_info(ds) -> dict[str, Any]:
    """Whitelisted acquisition tags of a dataset, as plain JSON types."""
    info: dict[str, Any] = {}
    for keyword in _QC_TAGS:
        value = ds.get(keyword)
        if value is None or value == "":
            continue
        if keyword in ("SliceThickness", "KVP"):
            try:
                info[keyword] = float(value)
            except (TypeError, ValueError):
                continue
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            info[keyword] = "\\".join(str(v) for v in value)
        else:
            info[keyword] = str(value)
    return info


def _fmt(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"
