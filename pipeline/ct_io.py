"""CT input/output: read NIfTI or DICOM as Hounsfield units, reorient, resample, write.

Raw inputs are read with nibabel (NIfTI) and pydicom (DICOM); everything after that is a
SimpleITK image in ITK's LPS world. Volumes under ``work/`` are canonical: identity direction
(voxel axis *i* → patient Left, *j* → Posterior, *k* → Superior), so
``sitk.GetArrayFromImage`` gives ``[z, y, x]`` arrays (see docs/architecture.md).

HU plausibility rules (:func:`check_hu`), applied to every raw volume before anything else:

1. no NaN or infinite voxels;
2. the minimum must be below −500 HU: every chest (or head) CT contains air. A minimum above
   −500 means raw scanner values without the RescaleIntercept (air ≈ 0, water ≈ 1024);
3. the maximum must be above −500 HU: a CT with nothing denser than lung is not a body scan;
4. the median (estimated on a regular sub-sample of at most ~2 M voxels) must be at most
   500 HU: a scan is mostly air, lung and soft tissue, so a larger median means raw units;
5. every value must fit int16 (−32768 … 32767), the storage type of ``work/ct``.

Only *after* these checks are values below −1024 HU (scanner padding such as −2048 or −3024
outside the reconstruction circle) clipped to −1024 (:func:`clip_below_air`).

Heavy libraries (SimpleITK, nibabel, pydicom) are imported inside the functions so that
importing this module stays cheap for the per-subject CLI.
"""

from __future__ import annotations

import logging
import numbers
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import SubjectError
from pipeline.files import atomic_path

if TYPE_CHECKING:  # pragma: no cover - typing only
    import SimpleITK as sitk

log = logging.getLogger(__name__)

STAGE = "ingest"
AIR_HU = -1024
CANONICAL = "LPS"  # ITK orientation string whose direction matrix is the identity
NO_AIR_ABOVE_HU = -500.0
NO_TISSUE_BELOW_HU = -500.0
MAX_MEDIAN_HU = 500.0
MEDIAN_SAMPLE_VOXELS = 2_000_000
# RAS (NIfTI world) <-> LPS (ITK world): negate x and y.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])
# DICOM tags copied into the QC record. A whitelist: no patient or institution tag may leak.
_QC_TAGS = ("Manufacturer", "ManufacturerModelName", "ConvolutionKernel", "SliceThickness", "KVP")
_DICOMDIR_SOP_CLASS = "1.2.840.10008.1.3.10"


# --------------------------------------------------------------------------------------------
# HU plausibility
# --------------------------------------------------------------------------------------------
def check_hu(values: np.ndarray, sid: str | None, stage: str = STAGE) -> None:
    """Raise :class:`SubjectError` unless ``values`` look like Hounsfield units.

    Args:
        values: the volume in HU, any shape (``[z, y, x]`` in practice), any numeric dtype.
        sid: subject ID for the error message.
        stage: stage name for the error.

    The rules are listed in the module docstring.
    """
    if values.size == 0:
        raise SubjectError(sid, "image has no voxels", stage)
    if np.issubdtype(values.dtype, np.floating):
        n_nan = int(np.count_nonzero(np.isnan(values)))
        if n_nan:
            raise SubjectError(sid, f"image contains {n_nan} NaN voxels", stage)
        n_inf = int(np.count_nonzero(np.isinf(values)))
        if n_inf:
            raise SubjectError(sid, f"image contains {n_inf} infinite voxels", stage)
    vmin, vmax = float(values.min()), float(values.max())
    if vmin > NO_AIR_ABOVE_HU:
        raise SubjectError(sid, f"values are not plausibly HU: no air (minimum {vmin:g} > {NO_AIR_ABOVE_HU:g} HU); "
                                f"raw scanner values without RescaleIntercept?", stage)
    if vmax < NO_TISSUE_BELOW_HU:
        raise SubjectError(sid, f"values are not plausibly HU: no tissue (maximum {vmax:g} < {NO_TISSUE_BELOW_HU:g} HU)",
                           stage)
    median = float(np.median(_subsample(values)))
    if median > MAX_MEDIAN_HU:
        raise SubjectError(sid, f"values are not plausibly HU: median {median:g} > {MAX_MEDIAN_HU:g} HU; "
                                f"raw scanner values without RescaleIntercept?", stage)
    info = np.iinfo(np.int16)
    if vmin < info.min or vmax > info.max:
        raise SubjectError(sid, f"values outside the int16 range: {vmin:g} to {vmax:g} HU", stage)


def _subsample(values: np.ndarray) -> np.ndarray:
    """A regular sub-sample of at most about :data:`MEDIAN_SAMPLE_VOXELS` voxels (a view)."""
    step = 1
    while values.size / step ** values.ndim > MEDIAN_SAMPLE_VOXELS:
        step += 1
    return values[(slice(None, None, step),) * values.ndim]


def clip_below_air(values: np.ndarray) -> np.ndarray:
    """Clip values below −1024 HU (scanner padding) to −1024 **in place**; returns ``values``."""
    np.maximum(values, AIR_HU, out=values)
    return values


def _checked_hu(values: np.ndarray, sid: str | None) -> np.ndarray:
    """Check plausibility, clip padding and pick the storage type (int16 when exact).

    Args:
        values: HU volume, any shape and numeric dtype (may be modified in place).

    Returns:
        The clipped volume as int16 when every value is an integer, else float32.
    """
    check_hu(values, sid)
    if np.issubdtype(values.dtype, np.integer):
        clipped = clip_below_air(values.astype(np.int16, copy=False))
        return clipped
    values = clip_below_air(values.astype(np.float32, copy=False))
    if np.array_equal(values, np.rint(values)):
        return values.astype(np.int16)
    return values


# --------------------------------------------------------------------------------------------
# NIfTI
# --------------------------------------------------------------------------------------------
def _check_file(path: Path, sid: str | None, what: str) -> None:
    if not path.exists():
        raise SubjectError(sid, f"{what} {path} does not exist", STAGE)
    if path.is_dir():
        raise SubjectError(sid, f"{what} {path} is a directory, not a file", STAGE)
    if path.stat().st_size == 0:
        raise SubjectError(sid, f"{what} {path} is an empty file", STAGE)


def read_nifti_hu(path: str | os.PathLike, sid: str | None) -> "sitk.Image":
    """Read a NIfTI CT as HU with its world geometry.

    nibabel applies ``scl_slope``/``scl_inter``. The NIfTI affine (RAS world) is converted to
    ITK's LPS world by negating x and y, then split into spacing, direction and origin.

    Args:
        path: ``.nii`` or ``.nii.gz`` file holding a 3-D volume (trailing singleton
            dimensions, e.g. ``(x, y, z, 1)``, are allowed).
        sid: subject ID for error messages.

    Returns:
        SimpleITK image in the file's own voxel order (not yet canonical): int16 when all
        values are integers, else float32; values below −1024 clipped (see :func:`check_hu`).

    Raises:
        SubjectError: missing/empty/truncated/corrupt file, not 3-D, sheared affine, NaN or
        infinite voxels, or values that are not plausibly HU.
    """
    import zlib

    import nibabel as nib
    import SimpleITK as sitk
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    path = Path(path)
    _check_file(path, sid, "NIfTI file")
    corrupt = (ImageFileError, HeaderDataError, EOFError, zlib.error, OSError, ValueError)
    try:
        image = nib.load(str(path), mmap=False)
        header = image.header
        shape = tuple(int(n) for n in image.shape)
        affine = np.asarray(image.affine, dtype=np.float64)
    except corrupt as error:
        raise SubjectError(sid, f"truncated or corrupt NIfTI: {type(error).__name__}: {error}", STAGE) from None
    if "sform_code" in header and int(header["sform_code"]) == 0 and int(header["qform_code"]) == 0:
        log.warning("subject %s: %s has neither sform nor qform; orientation is a guess", sid, path.name)
    spatial = shape
    while len(spatial) > 3 and spatial[-1] == 1:  # trailing singleton dimensions (x, y, z, 1)
        spatial = spatial[:-1]
    if len(spatial) != 3:
        raise SubjectError(sid, f"NIfTI is not a 3-D volume (shape {shape})", STAGE)
    if min(spatial) < 1:
        raise SubjectError(sid, f"NIfTI has an empty dimension (shape {shape})", STAGE)
    try:
        proxy = image.dataobj
        slope = float(getattr(proxy, "slope", 1.0))
        inter = float(getattr(proxy, "inter", 0.0))
        if np.issubdtype(np.dtype(proxy.dtype), np.integer) and slope == 1.0 and inter == 0.0:
            data = np.asarray(proxy.get_unscaled() if hasattr(proxy, "get_unscaled") else proxy)
        else:
            data = image.get_fdata(dtype=np.float32)
    except corrupt as error:
        raise SubjectError(sid, f"truncated or corrupt NIfTI: {type(error).__name__}: {error}", STAGE) from None
    data = data.reshape(spatial, order="A")
    spacing, direction, origin = _split_affine(_RAS_TO_LPS @ affine[:3, :3], _RAS_TO_LPS @ affine[:3, 3], sid)

    values = _checked_hu(data, sid)
    del data
    # nibabel arrays are indexed [i, j, k]; SimpleITK wants C-ordered [k, j, i].
    img = sitk.GetImageFromArray(np.ascontiguousarray(values.T))
    img.SetSpacing(spacing)
    img.SetDirection(direction)
    img.SetOrigin(origin)
    return img


def _split_affine(linear: np.ndarray, offset: np.ndarray, sid: str | None) -> tuple[tuple, tuple, tuple]:
    """Split a 3×3 LPS voxel→world matrix into spacing, flattened direction and origin."""
    if not (np.all(np.isfinite(linear)) and np.all(np.isfinite(offset))):
        raise SubjectError(sid, "NIfTI affine has non-finite entries", STAGE)
    spacing = np.linalg.norm(linear, axis=0)
    if np.any(spacing < 1e-6):
        raise SubjectError(sid, f"NIfTI affine is degenerate (voxel sizes {np.round(spacing, 6).tolist()})", STAGE)
    direction = linear / spacing
    gram = direction.T @ direction
    if not np.allclose(gram, np.eye(3), atol=1e-4):
        raise SubjectError(sid, "NIfTI affine is sheared (voxel axes are not orthogonal)", STAGE)
    # Re-orthonormalise so that ITK (which checks orthogonality tightly) accepts the matrix.
    u, _, vt = np.linalg.svd(direction)
    direction = u @ vt
    return _geometry(spacing, direction, offset)


def _geometry(spacing, direction, origin) -> tuple[tuple, tuple, tuple]:
    """Plain-float (spacing, flattened direction, origin) at a precision both formats share.

    NIfTI stores the affine in float32 (0.65 becomes 0.64999998), DICOM as decimal strings.
    Spacing and origin are quantised to float32 (a relative change below 1e-7, i.e. < 0.1 µm
    at 500 mm) and direction cosines rounded to 1e-9, so the same geometry read from a DICOM
    series or from its NIfTI conversion is bit-identical and resamples to the same array.
    """
    spacing = np.asarray(spacing, dtype=np.float64).astype(np.float32).astype(np.float64)
    direction = np.round(np.asarray(direction, dtype=np.float64), 9) + 0.0  # + 0.0 turns -0.0 into 0.0
    origin = np.asarray(origin, dtype=np.float64).astype(np.float32).astype(np.float64) + 0.0
    return tuple(map(float, spacing)), tuple(map(float, direction.ravel())), tuple(map(float, origin))


# --------------------------------------------------------------------------------------------
# DICOM
# --------------------------------------------------------------------------------------------
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

    if not (_is_real(spacing_tolerance) and np.isfinite(spacing_tolerance) and spacing_tolerance >= 0):
        raise ValueError(f"spacing_tolerance must be a finite number >= 0, got {spacing_tolerance!r}")
    if not (_is_real(min_slices) and float(min_slices).is_integer() and min_slices >= 1):
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
    values = _checked_hu(volume, sid)
    del volume
    spacing, direction, origin = _geometry((pixel_spacing[1], pixel_spacing[0], slice_spacing),
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


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _fmt(values: np.ndarray) -> str:
    return "[" + ", ".join(f"{v:.4g}" for v in values) + "]"


# --------------------------------------------------------------------------------------------
# geometry
# --------------------------------------------------------------------------------------------
def orientation_code(img: "sitk.Image") -> str:
    """Three-letter orientation of the image axes in ITK's convention, e.g. ``"LPS"``.

    Letter *a* names the patient direction that voxel axis *a* (i, j, k) points to: the
    canonical identity direction is ``"LPS"``, a NIfTI stored RAS-up is ``"RAS"``. Oblique
    axes get the closest letter.
    """
    import SimpleITK as sitk

    return sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(img.GetDirection())


def to_canonical(img: "sitk.Image") -> "sitk.Image":
    """Permute/flip voxel axes (no interpolation) to the canonical identity direction.

    The physical content is unchanged: the same volume stored with permuted or flipped axes
    gives the same array. For oblique images the direction is only the closest permutation
    of the identity; :func:`resample_isotropic` then removes the remaining rotation.

    Args:
        img: 3-D SimpleITK image, any pixel type.

    Returns:
        Image with axes (i, j, k) → (L, P, S); its array is ``[z, y, x]``.
    """
    import SimpleITK as sitk

    if img.GetDimension() != 3:
        raise ValueError(f"to_canonical needs a 3-D image, got {img.GetDimension()}-D")
    if orientation_code(img) == CANONICAL:  # already canonical (or oblique around it): no copy
        return img
    return sitk.DICOMOrient(img, CANONICAL)


def resample_isotropic(img: "sitk.Image", spacing_mm: float = 1.0, *, antialias_factor: float = 2.0,
                       default_hu: float = AIR_HU) -> "sitk.Image":
    """Linear resampling onto an isotropic, identity-direction grid over the same extent.

    The output grid is centred on the input's physical bounding box (voxel edges included),
    with ``round(extent / spacing_mm)`` voxels per axis. Axes downsampled by at least
    ``antialias_factor`` are first smoothed with a Gaussian of standard deviation
    ``(spacing_mm - old_spacing) / 2`` mm (about half the downsampling factor, in input
    voxels) to avoid aliasing; smaller factors are left to the linear interpolation.

    Args:
        img: 3-D SimpleITK image in HU (any direction, any numeric pixel type).
        spacing_mm: output voxel size in mm (> 0).
        antialias_factor: smallest downsampling factor that triggers smoothing (>= 1).
        default_hu: value outside the input (air).

    Returns:
        int16 image (values rounded to the nearest integer) with identity direction;
        its array is ``[z, y, x]``.
    """
    import SimpleITK as sitk

    if not (_is_real(spacing_mm) and np.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f"spacing_mm must be a finite number > 0, got {spacing_mm!r}")
    if not (_is_real(antialias_factor) and np.isfinite(antialias_factor) and antialias_factor >= 1):
        raise ValueError(f"antialias_factor must be >= 1, got {antialias_factor!r}")
    if img.GetDimension() != 3:
        raise ValueError(f"resample_isotropic needs a 3-D image, got {img.GetDimension()}-D")
    old_spacing = np.array(img.GetSpacing())
    size = np.array(img.GetSize())
    direction = np.array(img.GetDirection()).reshape(3, 3)
    origin = np.array(img.GetOrigin())

    # Physical bounding box of the voxel edges (continuous index -0.5 ... n - 0.5).
    corners = np.array([[a, b, c] for a in (0, 1) for b in (0, 1) for c in (0, 1)], dtype=np.float64)
    index = corners * size - 0.5
    world = origin + (index * old_spacing) @ direction.T
    low, high = world.min(axis=0), world.max(axis=0)
    new_size = np.maximum(1, np.rint((high - low) / spacing_mm)).astype(int)
    centre = (low + high) / 2
    new_origin = centre - (new_size - 1) / 2 * spacing_mm

    factors = spacing_mm / old_spacing
    variance = np.where(factors >= antialias_factor, ((spacing_mm - old_spacing) / 2) ** 2, 0.0)
    source = img
    if np.any(variance > 0):
        source = sitk.DiscreteGaussian(sitk.Cast(img, sitk.sitkFloat32), variance=[float(v) for v in variance],
                                       maximumKernelWidth=64, maximumError=0.01, useImageSpacing=True)

    resampler = sitk.ResampleImageFilter()
    resampler.SetSize([int(n) for n in new_size])
    resampler.SetOutputSpacing([float(spacing_mm)] * 3)
    resampler.SetOutputOrigin([float(v) for v in new_origin])
    resampler.SetOutputDirection([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0])
    resampler.SetInterpolator(sitk.sitkLinear)
    resampler.SetDefaultPixelValue(float(default_hu))
    resampler.SetOutputPixelType(sitk.sitkFloat32)
    resampled = resampler.Execute(source)
    del source
    return sitk.Cast(sitk.Round(resampled), sitk.sitkInt16)


# --------------------------------------------------------------------------------------------
# work/ volumes
# --------------------------------------------------------------------------------------------
def read_volume(path: str | os.PathLike, sid: str | None = None, stage: str | None = None) -> "sitk.Image":
    """Read a ``work/`` volume written by :func:`write_volume`.

    Raises:
        SubjectError: when the file is missing, empty (a failed subject's tombstone) or unreadable.
    """
    import SimpleITK as sitk

    path = Path(path)
    if not path.is_file():
        raise SubjectError(sid, f"volume {path} does not exist", stage)
    if path.stat().st_size == 0:
        raise SubjectError(sid, f"volume {path} is empty (an upstream stage failed)", stage)
    try:
        return sitk.ReadImage(str(path))
    except RuntimeError as error:
        first = str(error).strip().splitlines()
        raise SubjectError(sid, f"cannot read volume {path}: {first[-1] if first else error}", stage) from None


def write_volume(img: "sitk.Image", path: str | os.PathLike, compression_level: int = 1) -> None:
    """Atomically write ``img`` as compressed NIfTI (``.nii.gz``).

    Args:
        img: SimpleITK image; only its voxels and geometry are written (no metadata).
        path: target ``.nii.gz`` path.
        compression_level: zlib level 1 (fast, default) … 9 (small).
    """
    import SimpleITK as sitk

    if not 1 <= int(compression_level) <= 9:
        raise ValueError(f"compression_level must be in 1..9, got {compression_level!r}")
    clean = img
    if img.GetMetaDataKeys():
        clean = sitk.Image(img)
        for key in clean.GetMetaDataKeys():
            clean.EraseMetaData(key)
    with atomic_path(path) as tmp:
        sitk.WriteImage(clean, str(tmp), True, int(compression_level))
