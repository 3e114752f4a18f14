"""Air/blood HU calibration of a chest CT: trachea lumen → ``air_hu``, blood pool → ``blood_hu``.

Scanners and sites differ by a few HU in their calibration (the synthetic cohort by -8..+6 HU,
docs/synthetic_cohort.md). :func:`fit_calibration` measures two internal references on the
canonical CT and returns the linear map ``HU' = a * HU + b`` that takes the median HU of the
trachea lumen to ``air_hu`` (-1000) and the median HU of the blood pool to ``blood_hu`` (+50);
:meth:`Calibration.apply` applies it (rounded and clipped to int16). The ``ingest`` stage uses it
when ``ingest.calibration.enabled`` is set (off by default).

Detection rules (all on the coarse grid of :func:`pipeline.lung.find_airway`, about 2 mm, whose
block means are the "small smoothing filter"; the medians are then taken over the CT's own voxels):

* **Trachea lumen.** :func:`pipeline.lung.find_airway` finds the body, the air inside it and
  tracks the trachea down from the top of the internal air (the same code as the lung
  segmentation). The trachea is the run of tracked slices, from the top down, in which the
  airway is a single axial blob (the carina is where it splits). Its upper half, at most
  :data:`TRACHEA_LENGTH_MM` long and without the topmost slice when there are enough, is used.
  There, CT voxels below :data:`AIR_THRESHOLD_HU` under the coarse airway (grown by one coarse
  voxel) form the lumen, which is eroded in each axial slice: only voxels farther than
  ``max(LUMEN_EROSION_MM, 1.5 voxels)`` from the nearest non-lumen voxel are kept, so the wall's
  partial volume does not enter the median.
* **Blood pool.** Below the carina, a voxel lies *between the lungs* when its axial row
  (constant z and y) holds lung air (internal air that is not airway) on both sides of it. The
  soft-tissue voxels there (coarse HU in :data:`SOFT_TISSUE_HU` after a 3-voxel median filter)
  form the mediastinum; its largest connected component is kept and eroded to its *core*: the
  voxels at least ``max(BLOOD_MIN_DEPTH_MM, BLOOD_CORE_FRACTION × the deepest voxel's depth)``
  inside it. In a chest CT the thickest soft-tissue mass between the lungs is the heart, so the
  core lies in the cardiac blood pool (chambers and myocardium, which non-contrast CT does not
  tell apart), and the median HU under it is the blood reference.

Limits: the blood rule is meant for **non-contrast** CT. With contrast medium the blood pool is
brighter than :data:`SOFT_TISSUE_HU` and the core falls on myocardium or other tissue, which
gives an implausible blood median or slope (an error, or a skip with ``on_failure: skip``).
A scan that starts below the carina has no trachea; one that stops above the heart has no
blood pool; a heart pushed against the chest wall or a large mediastinal mass can move the core
off the blood pool. Plausibility checks catch the grossest of these: the raw trachea median must
lie in :data:`AIR_RANGE_HU`, the raw blood median in :data:`BLOOD_RANGE_HU` and the slope in
``slope_range`` (default [0.8, 1.25]).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import SubjectError

AIR_THRESHOLD_HU = -400.0  # air/tissue threshold (the lung segmentation's default)
TRACHEA_LENGTH_MM = 40.0  # at most this top part of the trachea is used
LUMEN_EROSION_MM = 2.0  # lumen voxels closer than this (or 1.5 voxels) to the wall are left out
SOFT_TISSUE_HU = (-50.0, 150.0)  # soft tissue after the median filter (fat and bone excluded)
BLOOD_MIN_DEPTH_MM = 5.0  # the blood core lies at least this deep inside the mediastinal soft tissue ...
BLOOD_CORE_FRACTION = 0.7  # ... and at least this fraction of the deepest voxel's depth
MIN_REGION_VOXELS = 20  # fewer CT voxels in a reference region is a failure
AIR_RANGE_HU = (-1150.0, -800.0)  # plausible raw trachea median
BLOOD_RANGE_HU = (-40.0, 140.0)  # plausible raw blood median
SLOPE_RANGE = (0.8, 1.25)


class CalibrationError(SubjectError):
    """Calibration impossible for one subject; ``reason`` is one line naming the cause.

    Attributes:
        air_median_hu, blood_median_hu: the raw medians when they were measured (implausible
            values or slope), else ``None``.
    """

    def __init__(self, sid: str | None, reason: str, stage: str | None = None, *,
                 air_median_hu: float | None = None, blood_median_hu: float | None = None):
        super().__init__(sid, reason, stage)
        self.air_median_hu = air_median_hu
        self.blood_median_hu = blood_median_hu


@dataclass(frozen=True)
class Calibration:
    """A fitted air/blood calibration ``HU' = slope * HU + intercept``.

    Attributes:
        air_median_hu: median raw HU of the eroded trachea lumen.
        blood_median_hu: median raw HU of the blood pool core.
        air_voxels: CT voxels in the trachea region.
        blood_voxels: CT voxels in the blood region.
        slope: ``a``.
        intercept: ``b`` (HU).
    """

    air_median_hu: float
    blood_median_hu: float
    air_voxels: int
    blood_voxels: int
    slope: float
    intercept: float

    def apply(self, hu: np.ndarray) -> np.ndarray:
        """The calibrated volume: ``round(slope * hu + intercept)`` clipped to int16.

        Args:
            hu: HU array of any shape (e.g. ``[z, y, x]``).

        Returns:
            int16 array of the same shape.
        """
        return apply_linear(hu, self.slope, self.intercept)


def apply_linear(hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    """``round(slope * hu + intercept)`` clipped to the int16 range; int16, same shape as ``hu``."""
    info = np.iinfo(np.int16)
    out = np.asarray(hu, dtype=np.float32) * np.float32(slope)
    out += np.float32(intercept)
    np.rint(out, out=out)
    np.clip(out, info.min, info.max, out=out)
    return out.astype(np.int16)


def _upsample_box(coarse: np.ndarray, factors: tuple[int, ...],
                  shape: tuple[int, ...]) -> tuple[tuple[slice, ...], np.ndarray] | None:
    """A coarse mask on the CT grid, within its bounding box.

    Args:
        coarse: bool ``[z', y', x']``; coarse voxel ``k`` covers CT voxels ``f*k .. f*k+f-1``.
        factors: block size ``(fz, fy, fx)``.
        shape: the CT's shape ``(Z, Y, X)``.

    Returns:
        (box: slices of the CT grid, bool mask of the box's shape), or ``None`` when ``coarse`` is empty.
    """
    from scipy import ndimage

    found = ndimage.find_objects(coarse.astype(np.int8))
    if not found:
        return None
    box = tuple(slice(s.start * f, min(s.stop * f, n)) for s, f, n in zip(found[0], factors, shape))
    fine = coarse[found[0]]
    for axis, factor in enumerate(factors):
        if factor > 1:
            fine = fine.repeat(factor, axis=axis)
    return box, fine[tuple(slice(0, b.stop - b.start) for b in box)]


def _trachea_slices(airway: np.ndarray, spacing_z: float) -> tuple[np.ndarray, int]:
    """Coarse slices of the upper trachea and the coarse carina slice.

    Args:
        airway: bool ``[z, y, x]`` tracked airway (coarse grid).
        spacing_z: coarse slice spacing in mm.

    Returns:
        (slice indices used for the air reference, the carina: the first slice below the top run
        of single-blob slices, where the airway splits into two or more axial blobs or ends; -1
        when that run reaches the bottom of the volume).
    """
    from scipy import ndimage

    slices = np.flatnonzero(airway.any(axis=(1, 2)))
    top = int(slices.max())
    z = top
    while z >= 0 and airway[z].any() and ndimage.label(airway[z])[1] == 1:
        z -= 1
    carina = z  # first slice below the single-blob run (-1: none)
    run = top - carina  # number of single-blob slices
    if run <= 0:
        return np.zeros(0, int), carina
    count = max(1, min((run + 1) // 2, int(round(TRACHEA_LENGTH_MM / spacing_z))))
    start = top - 1 if run >= 4 else top  # leave out the topmost slice (edge of the field of view)
    return np.arange(start, start - count, -1), carina


def _trachea_mask(hu: np.ndarray, spacing: tuple[float, float, float], airway: np.ndarray,
                  factors: tuple[int, int, int], slices: np.ndarray) -> np.ndarray:
    """Eroded trachea lumen on the CT grid: bool ``[z, y, x]`` like ``hu``."""
    from scipy import ndimage

    grown = ndimage.binary_dilation(airway[slices], structure=ndimage.generate_binary_structure(3, 1)[1:2])
    coarse = np.zeros_like(airway)
    coarse[slices] = grown
    mask = np.zeros(hu.shape, bool)
    upsampled = _upsample_box(coarse, factors, hu.shape)
    if upsampled is None:
        return mask
    box, region = upsampled
    lumen = region & (hu[box] < AIR_THRESHOLD_HU)
    limit = max(LUMEN_EROSION_MM, 1.5 * max(spacing[1], spacing[2]))
    core = np.zeros_like(lumen)
    for k in range(lumen.shape[0]):
        if lumen[k].any():
            padded = np.pad(lumen[k], 1)  # the box edge is not lumen
            depth = ndimage.distance_transform_edt(padded, sampling=spacing[1:])[1:-1, 1:-1]
            core[k] = depth > limit
    mask[box] = core
    return mask


def _blood_mask(hu: np.ndarray, spacing: tuple[float, float, float], found, carina: int) -> tuple[np.ndarray, float]:
    """Blood pool core on the CT grid (bool ``[z, y, x]`` like ``hu``) and the mediastinum's depth in mm."""
    from scipy import ndimage

    airway = ndimage.binary_dilation(found.airway)
    lungs = found.internal_air & ~airway
    lungs[max(carina, 0):] = False  # only below the carina
    before = np.maximum.accumulate(lungs, axis=2)
    after = np.maximum.accumulate(lungs[:, :, ::-1], axis=2)[:, :, ::-1]
    between = before & after & ~lungs & found.body
    box = ndimage.find_objects(between.astype(np.int8))
    if not box:
        return np.zeros(hu.shape, bool), 0.0
    box = box[0]
    smooth = ndimage.median_filter(found.coarse_ct[box], size=3)
    soft = between[box] & (smooth >= SOFT_TISSUE_HU[0]) & (smooth <= SOFT_TISSUE_HU[1])
    labels, count = ndimage.label(soft)
    if count == 0:
        return np.zeros(hu.shape, bool), 0.0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    largest = labels == int(np.argmax(sizes))
    depth = ndimage.distance_transform_edt(np.pad(largest, 1), sampling=found.spacing)[1:-1, 1:-1, 1:-1]
    deepest = float(depth.max())
    core = depth >= max(BLOOD_MIN_DEPTH_MM, BLOOD_CORE_FRACTION * deepest)
    coarse = np.zeros(found.airway.shape, bool)
    coarse[box] = core
    mask = np.zeros(hu.shape, bool)
    upsampled = _upsample_box(coarse, found.factors, hu.shape)
    if upsampled is not None:
        mask[upsampled[0]] = upsampled[1]
    return mask, deepest


def reference_regions(hu: np.ndarray, spacing: tuple[float, float, float], *, sid: str | None = None,
                      stage: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The trachea lumen and blood pool regions used by :func:`fit_calibration`.

    Args:
        hu: int16 HU ``[z, y, x]``, canonical orientation (identity direction, LPS).
        spacing: voxel size ``(z, y, x)`` in mm.
        sid, stage: for error messages.

    Returns:
        (trachea, blood): bool ``[z, y, x]`` masks on the grid of ``hu``.

    Raises:
        CalibrationError: no trachea or no blood pool found (one-line reason).
    """
    import SimpleITK as sitk

    from pipeline.lung import find_airway

    hu = np.asarray(hu)
    if hu.ndim != 3:
        raise ValueError(f"hu must be a [z, y, x] volume, got shape {hu.shape}")
    image = sitk.GetImageFromArray(hu)
    image.SetSpacing(tuple(float(s) for s in spacing[::-1]))
    found = find_airway(image, threshold_hu=AIR_THRESHOLD_HU)
    del image
    if not found.trachea_found:
        raise CalibrationError(sid, "no trachea found (no tubular air near the body's centre in the "
                                    "top of the air inside the body)", stage)
    slices, carina = _trachea_slices(found.airway, found.spacing[0])
    if slices.size == 0:
        raise CalibrationError(sid, "no trachea found (the tracked airway is split from its top slice)",
                               stage)
    trachea = _trachea_mask(hu, spacing, found.airway, found.factors, slices)
    if trachea.sum() < MIN_REGION_VOXELS:
        raise CalibrationError(sid, f"trachea lumen too small: {int(trachea.sum())} voxels after "
                                    f"erosion (need ≥ {MIN_REGION_VOXELS})", stage)
    blood, deepest = _blood_mask(hu, spacing, found, carina)
    if deepest < BLOOD_MIN_DEPTH_MM or blood.sum() < MIN_REGION_VOXELS:
        raise CalibrationError(sid, f"blood pool not found: the soft tissue between the lungs below the "
                                    f"carina is at most {deepest:.0f} mm deep ({int(blood.sum())} voxels in its core; "
                                    f"need ≥ {BLOOD_MIN_DEPTH_MM:g} mm and ≥ {MIN_REGION_VOXELS} voxels)", stage)
    return trachea, blood


def fit_calibration(hu: np.ndarray, spacing: tuple[float, float, float], *, air_hu: float = -1000.0,
                    blood_hu: float = 50.0, slope_range: tuple[float, float] = SLOPE_RANGE, sid: str | None = None,
                    stage: str | None = None) -> Calibration:
    """Fit the linear map taking the trachea median to ``air_hu`` and the blood median to ``blood_hu``.

    Args:
        hu: int16 HU ``[z, y, x]``, canonical orientation (identity direction, LPS).
        spacing: voxel size ``(z, y, x)`` in mm.
        air_hu: target of the trachea lumen median.
        blood_hu: target of the blood pool median.
        slope_range: plausible slopes ``(low, high)``; outside is a failure.
        sid, stage: for error messages.

    Returns:
        :class:`Calibration`.

    Raises:
        CalibrationError: (a :class:`SubjectError`) no trachea, no blood pool, implausible
            medians or slope; the reason is one line naming the cause.
        ValueError: ``blood_hu <= air_hu`` or a bad ``slope_range``.
    """
    if not blood_hu > air_hu:
        raise ValueError(f"blood_hu must be greater than air_hu, got air_hu={air_hu}, blood_hu={blood_hu}")
    if not 0 < slope_range[0] <= slope_range[1]:
        raise ValueError(f"slope_range must be (low, high) with 0 < low <= high, got {slope_range}")
    hu = np.asarray(hu)
    trachea, blood = reference_regions(hu, spacing, sid=sid, stage=stage)
    air_median = float(np.median(hu[trachea]))
    blood_median = float(np.median(hu[blood]))
    measured = {"air_median_hu": air_median, "blood_median_hu": blood_median}
    if not AIR_RANGE_HU[0] <= air_median <= AIR_RANGE_HU[1]:
        raise CalibrationError(sid, f"implausible trachea median {air_median:.1f} HU (expected "
                                    f"{AIR_RANGE_HU[0]:g}..{AIR_RANGE_HU[1]:g})", stage, **measured)
    if not BLOOD_RANGE_HU[0] <= blood_median <= BLOOD_RANGE_HU[1]:
        raise CalibrationError(sid, f"implausible blood pool median {blood_median:.1f} HU (expected "
                                    f"{BLOOD_RANGE_HU[0]:g}..{BLOOD_RANGE_HU[1]:g}; contrast-enhanced scan?)", stage,
                               **measured)
    slope = (blood_hu - air_hu) / (blood_median - air_median)
    intercept = air_hu - slope * air_median
    if not slope_range[0] <= slope <= slope_range[1]:
        raise CalibrationError(sid, f"implausible slope {slope:.3f} (allowed {slope_range[0]:g}.."
                                    f"{slope_range[1]:g}; trachea {air_median:.1f} HU, blood {blood_median:.1f} HU)",
                               stage, **measured)
    return Calibration(air_median, blood_median, int(trachea.sum()), int(blood.sum()), float(slope), float(intercept))
