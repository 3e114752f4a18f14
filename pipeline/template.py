"""The atlas as an unbiased mean lung shape: a deterministic sample and groupwise affine registration.

:func:`atlas_sample` picks the subjects the template is built from by a hash of their subject
IDs, so the sample does not depend on the manifest's order, and a larger cohort keeps it unless a
new subject's hash ranks among the ``n`` smallest (each such subject displaces one member).

:func:`groupwise_template` builds the template from their right/left lung label maps:

1. start from the sample's median-lung-volume subject, cropped to its lungs plus a margin;
2. register the template to every subject (:func:`pipeline.register.register_masks`: template
   points → subject points) and pull each subject's right and left lung indicator onto the
   template grid (linear interpolation): the mean of these is a probability map per lung;
3. remove the template's own size and pose from the result: with ``Ā`` the mean of the
   subjects' affine matrices (homogeneous 4 × 4), the new template is the mean map resampled
   through ``Ā⁻¹``, so that the transforms from the new template to the subjects average to the
   identity (it sits at the sample's mean size, shape and pose, not at its starting subject's);
4. threshold: lung where ``p_right + p_left ≥ 0.5``, right where ``p_right ≥ p_left``; repeat
   from 2 for ``rounds`` rounds.

Every step is deterministic (fixed metric sampling seed, one thread, fixed subject order).
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

SAMPLE_SALT = "copdssl-atlas-sample"


def sample_rank(sid: str) -> str:
    """The sort key of a subject in the atlas sample: the SHA-256 of a salted subject ID (hex)."""
    return hashlib.sha256(f"{SAMPLE_SALT}:{sid}".encode()).hexdigest()


def atlas_sample(sids: Iterable[str], n: int) -> list[str]:
    """The ``n`` subjects with the smallest :func:`sample_rank` (fewer if the cohort is smaller), in rank order."""
    if isinstance(n, bool) or int(n) != n or n < 1:
        raise ValueError(f"the atlas sample size must be an integer >= 1, got {n!r}")
    return sorted(dict.fromkeys(sids), key=sample_rank)[: int(n)]


def _homogeneous(transform) -> np.ndarray:
    """4 × 4 matrix of an ``sitk.AffineTransform`` (``x ↦ A (x − c) + c + t``)."""
    matrix = np.asarray(transform.GetMatrix(), float).reshape(3, 3)
    centre = np.asarray(transform.GetCenter(), float)
    out = np.eye(4)
    out[:3, :3] = matrix
    out[:3, 3] = centre - matrix @ centre + np.asarray(transform.GetTranslation(), float)
    return out


def _affine(matrix: np.ndarray):
    import SimpleITK as sitk

    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in matrix[:3, :3].ravel()))
    transform.SetTranslation(tuple(float(v) for v in matrix[:3, 3]))
    return transform


def mean_affine(transforms: Sequence[Any]):
    """The arithmetic mean of affine transforms' homogeneous matrices, as an ``sitk.AffineTransform``."""
    return _affine(np.mean([_homogeneous(t) for t in transforms], axis=0))


def _indicator(labels, value: int):
    import SimpleITK as sitk

    return sitk.Cast(labels == value, sitk.sitkFloat32)


def _covering_grid(image, transform, spacing: float):
    """An empty image with ``image``'s direction and ``spacing`` covering ``transform(image's extent)``."""
    import SimpleITK as sitk

    size = np.asarray(image.GetSize())
    corners = [image.TransformContinuousIndexToPhysicalPoint([float(c) for c in corner])
               for corner in np.array(np.meshgrid(*[[-0.5, n - 0.5] for n in size], indexing="ij")).reshape(3, -1).T]
    mapped = np.array([transform.TransformPoint(p) for p in corners])
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    in_axes = mapped @ direction  # coordinates along the image axes (direction is orthonormal)
    lo, hi = in_axes.min(axis=0), in_axes.max(axis=0)
    shape = np.ceil((hi - lo) / spacing).astype(int) + 1
    grid = sitk.Image([int(v) for v in shape], sitk.sitkFloat32)
    grid.SetSpacing([spacing] * 3)
    grid.SetDirection(image.GetDirection())
    grid.SetOrigin(tuple(direction @ lo))
    return grid


def groupwise_template(subjects: Sequence[Any], *, rounds: int = 2, margin: int = 8,
                       register_settings: dict[str, Any] | None = None, progress=None):
    """A right/left lung label template at the sample's mean affine shape.

    Args:
        subjects: SimpleITK uint8 label images (0 background, 1 right lung, 2 left lung), canonical
            orientation, isotropic spacing; the first one of median lung volume starts the template.
        rounds: groupwise rounds (register, average, unbias, threshold).
        margin: voxels kept around the lungs when the template is cropped.
        register_settings: keyword arguments of :func:`pipeline.register.register_masks`
            (``shrink_factors``, ``iterations``, ``working_spacing_mm``).
        progress: optional callable wrapping an iterable (a progress bar).

    Returns:
        (template label image ``uint8``, info dict: ``start`` index, per-round mean soft Dice
        ``soft_dice`` and ``mean_scale`` (determinant of Ā before unbiasing, ^⅓)).
    """
    import SimpleITK as sitk

    from pipeline.atlas import crop_atlas
    from pipeline.register import register_masks

    if not subjects:
        raise ValueError("groupwise_template needs at least one subject")
    if isinstance(rounds, bool) or int(rounds) != rounds or rounds < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    spacing = float(subjects[0].GetSpacing()[0])
    volumes = [int(np.count_nonzero(sitk.GetArrayViewFromImage(s))) for s in subjects]
    start = int(np.argsort(volumes, kind="stable")[len(volumes) // 2])  # a median-volume subject
    template = crop_atlas(subjects[start], margin)
    wrap = progress or (lambda items, **_: items)
    info: dict[str, Any] = {"start": start, "soft_dice": [], "mean_scale": []}
    for round_ in range(int(rounds)):
        transforms, dice = [], []
        right = sitk.Image(template.GetSize(), sitk.sitkFloat32)
        right.CopyInformation(template)
        left = sitk.Image(right)
        for labels in wrap(subjects, desc=f"atlas: groupwise round {round_ + 1}/{rounds}", unit="subject"):
            transform, fit = register_masks(template, labels, **(register_settings or {}))
            transforms.append(transform)
            dice.append(fit["soft_dice"])
            right += sitk.Resample(_indicator(labels, 1), template, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
            left += sitk.Resample(_indicator(labels, 2), template, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        right, left = right / float(len(subjects)), left / float(len(subjects))
        average = mean_affine(transforms)
        unbias = average.GetInverse()  # pulls the mean maps through Ā⁻¹: output point q reads input point Ā⁻¹ q
        grid = _covering_grid(template, average, spacing)
        right = sitk.Resample(right, grid, unbias, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        left = sitk.Resample(left, grid, unbias, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
        p_right, p_left = sitk.GetArrayFromImage(right), sitk.GetArrayFromImage(left)
        labels = np.where(p_right + p_left >= 0.5, np.where(p_right >= p_left, 1, 2), 0).astype(np.uint8)
        if not labels.any():
            raise ValueError("the groupwise mean lung shape is empty: the sample's lungs do not overlap")
        image = sitk.GetImageFromArray(labels)
        image.CopyInformation(grid)
        template = crop_atlas(image, margin)
        info["soft_dice"].append(round(float(np.mean(dice)), 4))
        info["mean_scale"].append(round(float(np.linalg.det(_homogeneous(average)[:3, :3])) ** (1 / 3), 4))
        log.info("atlas: groupwise round %d/%d, mean soft Dice %.3f, mean scale %.3f", round_ + 1, rounds,
                 info["soft_dice"][-1], info["mean_scale"][-1])
    return template, info
