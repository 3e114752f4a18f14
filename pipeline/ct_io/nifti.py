"""Read a NIfTI CT (nibabel) as a SimpleITK image in HU, in ITK's LPS world."""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.ct_io.geometry import quantised_geometry
from pipeline.ct_io.hu import STAGE, checked_hu
from pipeline.errors import SubjectError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import SimpleITK as sitk

log = logging.getLogger(__name__)

# RAS (NIfTI world) <-> LPS (ITK world): negate x and y.
_RAS_TO_LPS = np.diag([-1.0, -1.0, 1.0])


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

    values = checked_hu(data, sid)
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
    return quantised_geometry(spacing, direction, offset)
