"""Read and write the canonical ``work/`` volumes (compressed NIfTI through SimpleITK)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

from pipeline.errors import SubjectError
from pipeline.files import atomic_path

if TYPE_CHECKING:  # pragma: no cover - typing only
    import SimpleITK as sitk


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
