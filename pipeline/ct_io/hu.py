"""Hounsfield-unit plausibility checks, applied to every raw volume before anything else.

Rules of :func:`check_hu`:

1. no NaN or infinite voxels;
2. the minimum must be below −500 HU: every chest (or head) CT contains air. A minimum above
   −500 means raw scanner values without the RescaleIntercept (air ≈ 0, water ≈ 1024);
3. the maximum must be above −500 HU: a CT with nothing denser than lung is not a body scan;
4. the median (estimated on a regular sub-sample of at most ~2 M voxels) must be at most
   500 HU: a scan is mostly air, lung and soft tissue, so a larger median means raw units;
5. every value must fit int16 (−32768 … 32767), the storage type of ``work/ct``.

Only *after* these checks are values below −1024 HU (scanner padding such as −2048 or −3024
outside the reconstruction circle) clipped to −1024 (:func:`clip_below_air`).
"""

from __future__ import annotations

import numbers
from typing import Any

import numpy as np

from pipeline.errors import SubjectError

STAGE = "ingest"
AIR_HU = -1024
NO_AIR_ABOVE_HU = -500.0
NO_TISSUE_BELOW_HU = -500.0
MAX_MEDIAN_HU = 500.0
MEDIAN_SAMPLE_VOXELS = 2_000_000


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


def checked_hu(values: np.ndarray, sid: str | None) -> np.ndarray:
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


def is_real(value: Any) -> bool:
    """True for int and float values (numpy scalars included), False for bool and others."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)
