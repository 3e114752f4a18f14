"""Voxel geometry: orientation codes, canonical (identity-direction) axes, isotropic resampling."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from pipeline.ct_io.hu import AIR_HU, is_real

if TYPE_CHECKING:  # pragma: no cover - typing only
    import SimpleITK as sitk

CANONICAL = "LPS"  # ITK orientation string whose direction matrix is the identity


def quantised_geometry(spacing, direction, origin) -> tuple[tuple, tuple, tuple]:
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

    if not (is_real(spacing_mm) and np.isfinite(spacing_mm) and spacing_mm > 0):
        raise ValueError(f"spacing_mm must be a finite number > 0, got {spacing_mm!r}")
    if not (is_real(antialias_factor) and np.isfinite(antialias_factor) and antialias_factor >= 1):
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
