"""NIfTI writers for synthetic images and label maps (nibabel, atomic).

A rendered volume is ``[z, y, x]`` on an LPS grid; NIfTI stores ``[i, j, k]`` with a RAS
affine. The canonical storage is the transposed array with affine ``diag(-sx, -sy, sz)``
(axis codes ``LPS``); reoriented subjects permute and/or flip the axes and carry the matching
affine (:func:`pipeline.synth.geometry.reorient`). qform and sform are both set (code 1,
scanner), units mm.
"""

from __future__ import annotations

import os

import numpy as np

from pipeline.files import atomic_path
from pipeline.synth.geometry import canonical_affine, reorient
from pipeline.synth.plan import Grid


def nifti_image(volume_zyx: np.ndarray, grid: Grid, axes=(0, 1, 2), flips=(False, False, False)):
    """A ``nibabel.Nifti1Image`` of ``volume_zyx`` (``[z, y, x]`` on ``grid``), optionally reoriented."""
    import nibabel as nib

    if volume_zyx.shape != tuple(grid.shape_zyx):
        raise ValueError(f"volume shape {volume_zyx.shape} does not match the grid {grid.shape_zyx}")
    data, affine = reorient(volume_zyx.T, canonical_affine(grid), tuple(axes), tuple(flips))
    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(volume_zyx.dtype)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    image.header.set_xyzt_units("mm")
    return image


def write_nifti(path: str | os.PathLike, volume_zyx: np.ndarray, grid: Grid, axes=(0, 1, 2),
                flips=(False, False, False)) -> None:
    """Atomically write ``volume_zyx`` as ``.nii.gz`` (dtype kept: int16 HU or uint8 labels)."""
    image = nifti_image(volume_zyx, grid, axes, flips)
    with atomic_path(path) as tmp:
        image.to_filename(str(tmp))
