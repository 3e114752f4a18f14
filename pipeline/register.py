"""Stage ``register``: affine registration of the atlas lung mask to one subject's lung mask.

Both masks are reduced to lung-fraction images (float, block means of the binary mask) on a
working grid of about :data:`WORKING_SPACING_MM` (5 mm), where an affine fit costs about a
second. The registration is SimpleITK's ``ImageRegistrationMethod`` with ITK's convention
fixed = atlas, moving = subject, so the result maps **atlas physical points → subject physical
points** (what ``patches`` needs to carry grid centres into a subject):

1. initialisation by moments: the centroids are matched and the matrix is
   ``sqrt(C_subject) · sqrt(C_atlas)⁻¹`` from the masks' second moments (symmetric square roots),
   which already undoes scale and shear;
2. multi-resolution (``shrink_factors`` of the working grid, Gaussian smoothing of half the
   shrunk voxel size) affine optimisation of MeanSquares with regular-step gradient descent,
   parameter scales from physical shifts, a fixed metric sampling seed and one thread, so the
   result is deterministic;
3. a safeguard: when the optimised transform overlaps the masks worse than its
   initialisation (soft Dice on the working grid), the initialisation is kept.
4. optionally (``register.deformable.enabled``, off by default), a low-DOF cubic B-spline
   refinement on the same images (:func:`refine_deformable`), kept only when it raises the soft
   Dice. The transform file is then an affine + B-spline composite, and ``patches`` cuts its
   boxes at the refined centres. Atypical anatomy (a lung shape the affine cannot follow) gains
   overlap; the QC's determinant and scale checks read the affine part.

QC (status JSON) is **graded**, so that no valid subject is lost to an imperfect fit:

- ``failed`` only for gross failures: a Dice of the warped atlas with the subject's lungs below
  ``register.min_dice`` (about 0.6), a non-positive determinant (a reflection or a collapse), or a
  scale outside ``[1 / register.max_scale, register.max_scale]`` along some axis (singular values
  of the affine matrix);
- ``ok`` with ``"flagged": true`` and a ``flag_reason`` when the overall Dice or one lung's Dice is
  below ``register.flag_dice``: the subject is kept and its reason goes to ``qc.tsv``;
- the QC table (:mod:`pipeline.qc`) also flags subjects whose Dice is low *relative to the cohort*
  (below the median − ``register.flag_mad`` · MAD).
"""

from __future__ import annotations

import argparse
import logging
import time
from typing import Any

import numpy as np

from pipeline.errors import SubjectError

log = logging.getLogger(__name__)

STAGE = "register"
WORKING_SPACING_MM = 5.0
# Regular metric sampling of the fixed (atlas) working grid: 10 % gives the same Dice as 50 % on demo
# subjects (within 0.0004) at less than half the time (BENCHMARKS.md, "Registration").
SAMPLING_PERCENTAGE = 0.1
SAMPLING_SEED = 20210  # ITK treats seed 0 as "wall clock"; any fixed non-zero seed is deterministic
# The register settings that shape the fit itself (register_masks' keywords); the rest are QC thresholds.
FIT_KEYS = ("shrink_factors", "iterations", "working_spacing_mm")


def lung_fraction_image(labels, spacing_mm: float = WORKING_SPACING_MM):
    """Lung fraction on a coarser grid: block means of ``labels > 0``.

    Args:
        labels: SimpleITK label image (any integer type).
        spacing_mm: target voxel size; blocks have ``round(spacing_mm / spacing)`` voxels per axis.

    Returns:
        float32 SimpleITK image with values in [0, 1].
    """
    import SimpleITK as sitk

    factors = [max(1, int(round(spacing_mm / s))) for s in labels.GetSpacing()]
    mask = sitk.Cast(labels > 0, sitk.sitkFloat32)
    return sitk.BinShrink(mask, factors) if max(factors) > 1 else mask


def _moments(image) -> tuple[np.ndarray, np.ndarray]:
    """Centroid ``[3]`` and covariance ``[3, 3]`` (physical LPS mm, x-y-z) of a weight image."""
    import SimpleITK as sitk

    weights = sitk.GetArrayViewFromImage(image).astype(np.float64)
    total = weights.sum()
    if total <= 0:
        raise ValueError("cannot compute moments of an empty mask")
    axes = [np.arange(n, dtype=np.float64) for n in weights.shape]  # z, y, x indices
    mean_index = np.array([(weights.sum(axis=tuple(a for a in range(3) if a != k)) * axes[k]).sum() / total
                           for k in range(3)])[::-1]  # x, y, z
    idx = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)[:, ::-1]  # [N, 3] x, y, z
    w = weights.ravel()
    keep = w > 0
    idx, w = idx[keep], w[keep]
    direction = np.asarray(image.GetDirection()).reshape(3, 3) * np.asarray(image.GetSpacing())
    centred = (idx - mean_index) @ direction.T
    covariance = (centred * w[:, None]).T @ centred / total
    centroid = np.asarray(image.TransformContinuousIndexToPhysicalPoint(tuple(mean_index)))
    return centroid, covariance


def _sqrtm(matrix: np.ndarray) -> np.ndarray:
    values, vectors = np.linalg.eigh(matrix)
    return vectors @ np.diag(np.sqrt(np.clip(values, 1e-12, None))) @ vectors.T


def moments_affine(fixed, moving):
    """Affine transform (fixed → moving points) matching centroids and second moments.

    Args:
        fixed, moving: float weight images (lung fractions).

    Returns:
        ``sitk.AffineTransform`` with centre at the fixed centroid.
    """
    import SimpleITK as sitk

    c_fixed, cov_fixed = _moments(fixed)
    c_moving, cov_moving = _moments(moving)
    transform = sitk.AffineTransform(3)
    transform.SetCenter(tuple(c_fixed))
    transform.SetMatrix(tuple((_sqrtm(cov_moving) @ np.linalg.inv(_sqrtm(cov_fixed))).ravel()))
    transform.SetTranslation(tuple(c_moving - c_fixed))
    return transform


def soft_dice(fixed, moving, transform) -> float:
    """Dice of two fraction images after mapping ``moving`` onto ``fixed`` with ``transform``."""
    import SimpleITK as sitk

    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    f, m = sitk.GetArrayViewFromImage(fixed), sitk.GetArrayViewFromImage(warped)
    return float(2.0 * (f * m).sum() / max(float(f.sum() + m.sum()), 1e-12))


def _fraction_image_method(shrink_factors, working_spacing_mm: float):
    """The registration set-up both fits share: MeanSquares on lung-fraction images with regular
    sampling (fixed seed, one thread: deterministic), linear interpolation, and a pyramid of
    ``shrink_factors`` of the working grid, each smoothed by half its shrunk voxel size (in mm).
    The caller sets the optimiser and the transforms."""
    import SimpleITK as sitk

    method = sitk.ImageRegistrationMethod()
    method.SetNumberOfThreads(1)
    method.SetMetricAsMeanSquares()
    method.SetMetricSamplingStrategy(method.REGULAR)
    method.SetMetricSamplingPercentage(SAMPLING_PERCENTAGE, SAMPLING_SEED)
    method.SetInterpolator(sitk.sitkLinear)
    method.SetShrinkFactorsPerLevel([int(f) for f in shrink_factors])
    method.SetSmoothingSigmasPerLevel([0.5 * f * working_spacing_mm for f in shrink_factors])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOn()
    return method


def affine_part(transform):
    """The affine of a transform: itself, or the first of a composite (what an ITK optimiser returns,
    or the affine + B-spline this stage writes with ``register.deformable``)."""
    import SimpleITK as sitk

    if transform.GetName() == "CompositeTransform":
        transform = sitk.CompositeTransform(transform).GetNthTransform(0)
    return sitk.AffineTransform(transform)


def register_masks(atlas_labels, subject_labels, *, shrink_factors=(4, 2, 1), iterations: int = 200,
                   working_spacing_mm: float = WORKING_SPACING_MM):
    """Affine transform mapping atlas physical points to subject physical points.

    Args:
        atlas_labels: SimpleITK label image of the atlas (fixed).
        subject_labels: SimpleITK label image of the subject (moving).
        shrink_factors: pyramid levels, relative to the working grid (coarsest first).
        iterations: maximum optimiser iterations per level.
        working_spacing_mm: voxel size of the lung-fraction images the fit runs on.

    Returns:
        (``sitk.AffineTransform``, info dict with ``iterations``, ``metric``, ``stop``,
        ``soft_dice_init``, ``soft_dice``, ``kept_initial``).
    """
    import SimpleITK as sitk

    shrink_factors = [int(s) for s in shrink_factors]
    if not shrink_factors or min(shrink_factors) < 1:
        raise ValueError(f"shrink_factors must be integers >= 1, got {shrink_factors!r}")
    if isinstance(iterations, bool) or int(iterations) != iterations or iterations < 1:
        raise ValueError(f"iterations must be an integer >= 1, got {iterations!r}")
    if not working_spacing_mm > 0:
        raise ValueError(f"working_spacing_mm must be > 0, got {working_spacing_mm!r}")
    fixed = lung_fraction_image(atlas_labels, working_spacing_mm)
    moving = lung_fraction_image(subject_labels, working_spacing_mm)
    initial = moments_affine(fixed, moving)

    method = _fraction_image_method(shrink_factors, working_spacing_mm)
    method.SetOptimizerAsRegularStepGradientDescent(learningRate=1.0, minStep=1e-3, numberOfIterations=int(iterations),
                                                   relaxationFactor=0.5, gradientMagnitudeTolerance=1e-8)
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetInitialTransform(sitk.AffineTransform(initial), inPlace=False)
    counter = {"iterations": 0}

    def count():
        counter["iterations"] += 1

    method.AddCommand(sitk.sitkIterationEvent, count)
    optimised = affine_part(method.Execute(fixed, moving))
    dice_init, dice_opt = soft_dice(fixed, moving, initial), soft_dice(fixed, moving, optimised)
    kept_initial = dice_opt < dice_init
    info = {"iterations": counter["iterations"], "metric": float(method.GetMetricValue()),
            "stop": method.GetOptimizerStopConditionDescription().split(".")[0],
            "soft_dice_init": round(dice_init, 4), "soft_dice": round(max(dice_opt, dice_init), 4),
            "kept_initial": bool(kept_initial)}
    return (initial if kept_initial else optimised), info


def refine_deformable(atlas_labels, subject_labels, affine, *, grid_spacing_mm: float = 80.0, iterations: int = 30,
                      working_spacing_mm: float = WORKING_SPACING_MM):
    """Low-DOF B-spline refinement of an affine fit (``register.deformable``).

    A cubic B-spline transform with control points about ``grid_spacing_mm`` apart over the atlas
    working grid is optimised (MeanSquares, L-BFGS-B, the same regular sampling as the affine fit)
    on the lung-fraction images at twice the working spacing, with ``affine`` as the moving initial
    transform. ITK composes them as ``T(x) = affine(bspline(x))``: atlas points -> subject points,
    as for the affine.

    Returns:
        (``sitk.CompositeTransform`` [affine, bspline], info dict with ``soft_dice_affine``,
        ``soft_dice`` and ``kept_affine``) or, when the refinement does not raise the soft Dice,
        (``affine``, info with ``kept_affine`` true): it never makes a fit worse.
    """
    import SimpleITK as sitk

    if not grid_spacing_mm > 0:
        raise ValueError(f"grid_spacing_mm must be > 0, got {grid_spacing_mm!r}")
    fixed = lung_fraction_image(atlas_labels, working_spacing_mm)
    moving = lung_fraction_image(subject_labels, working_spacing_mm)
    extent = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
    mesh = [max(1, int(round(e / float(grid_spacing_mm)))) for e in extent]
    bspline = sitk.BSplineTransformInitializer(fixed, mesh, order=3)
    # the control points are grid_spacing_mm apart: a grid twice as coarse as the affine's fine level
    # samples them amply, at an eighth of the cost per evaluation
    method = _fraction_image_method((2,), working_spacing_mm)
    method.SetOptimizerAsLBFGSB(gradientConvergenceTolerance=1e-6, numberOfIterations=int(iterations),
                                maximumNumberOfCorrections=5, maximumNumberOfFunctionEvaluations=4 * int(iterations))
    method.SetMovingInitialTransform(affine)
    method.SetInitialTransform(bspline, inPlace=True)
    method.Execute(fixed, moving)
    refined = sitk.CompositeTransform([sitk.AffineTransform(affine), bspline])
    dice_affine, dice_refined = soft_dice(fixed, moving, affine), soft_dice(fixed, moving, refined)
    kept_affine = not dice_refined > dice_affine
    info = {"soft_dice_affine": round(dice_affine, 4), "soft_dice": round(max(dice_refined, dice_affine), 4),
            "kept_affine": bool(kept_affine), "bspline_mesh": mesh}
    return (affine if kept_affine else refined), info


def label_dice(atlas_labels, subject_labels, transform) -> dict[str, float]:
    """Dice of the atlas labels warped onto the subject grid against the subject labels.

    Args:
        transform: maps atlas points → subject points. An affine's inverse pulls the atlas onto
            the subject grid; a deformable (composite) transform, which has no closed-form
            inverse, pulls the subject onto the atlas grid instead.

    Returns:
        ``{"dice": both lungs, "dice_right": label 1, "dice_left": label 2}``.
    """
    import SimpleITK as sitk

    if transform.GetName() == "AffineTransform":
        warped = sitk.Resample(atlas_labels, subject_labels, transform.GetInverse(), sitk.sitkNearestNeighbor, 0,
                               sitk.sitkUInt8)
        a, s = sitk.GetArrayViewFromImage(warped), sitk.GetArrayViewFromImage(subject_labels)
    else:  # a B-spline has no closed-form inverse: compare on the atlas grid instead
        warped = sitk.Resample(subject_labels, atlas_labels, transform, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
        a, s = sitk.GetArrayViewFromImage(atlas_labels), sitk.GetArrayViewFromImage(warped)

    def dice(x: np.ndarray, y: np.ndarray) -> float:
        total = int(x.sum()) + int(y.sum())
        return 2.0 * int(np.count_nonzero(x & y)) / total if total else 0.0

    return {"dice": dice(a > 0, s > 0), "dice_right": dice(a == 1, s == 1), "dice_left": dice(a == 2, s == 2)}


def registration_verdict(dice: dict[str, float], matrix: np.ndarray, settings: dict[str, Any],
                         sid: str | None = None) -> str:
    """Apply the graded QC policy to one registration.

    Args:
        dice: the values of :func:`label_dice`.
        matrix: ``[3, 3]`` linear part of the atlas → subject affine transform.
        settings: the ``register`` section (``min_dice``, ``flag_dice``, ``max_scale``).

    Returns:
        the flag reason (empty when the registration is simply ok).

    Raises:
        SubjectError: a gross failure (Dice below ``min_dice``, non-positive determinant, or an
            implausible scale); the one-line reason gives the values.
    """
    determinant = float(np.linalg.det(matrix))
    if determinant <= 0:
        raise SubjectError(sid, f"registration failed: the affine transform has determinant {determinant:.3g} "
                                "(a reflection or a collapse)", STAGE)
    scales = np.linalg.svd(matrix, compute_uv=False)
    max_scale = float(settings["max_scale"])
    if scales.max() > max_scale or scales.min() < 1.0 / max_scale:
        raise SubjectError(sid, f"registration failed: implausible scale {scales.min():.2f}-{scales.max():.2f} of the "
                                f"atlas onto the lungs (register.max_scale {max_scale:g})", STAGE)
    values = f"Dice {dice['dice']:.3f} (right {dice['dice_right']:.3f}, left {dice['dice_left']:.3f})"
    if dice["dice"] < settings["min_dice"]:
        raise SubjectError(sid, f"registration failed: {values} of the warped atlas with the lungs is below "
                                f"register.min_dice {settings['min_dice']:g}", STAGE)
    if min(dice.values()) < settings["flag_dice"]:
        return f"registration imperfect: {values} is below register.flag_dice {settings['flag_dice']:g}"
    return ""


def _transform_summary(transform) -> dict[str, Any]:
    matrix = np.asarray(transform.GetMatrix()).reshape(3, 3)
    return {"determinant": round(float(np.linalg.det(matrix)), 4),
            "translation_mm": [round(float(v), 2) for v in transform.GetTranslation()]}


# ---- stage ---------------------------------------------------------------------------------


def run_register(*, sid: str, lung_path, atlas_path, out, status_path, upstream=(),
                 settings: dict[str, Any]) -> dict[str, Any]:
    """The ``register`` stage for one subject: transform to ``out`` (``.tfm``), QC in the status.

    Args:
        settings: the config's validated ``register`` section (QC thresholds, the fit's
            :data:`FIT_KEYS`, ``deformable``; :func:`pipeline.config.validate_section`).

    Returns:
        the status dict written to ``status_path``.
    """
    from pipeline.status import run_subject_stage

    fit = {key: settings[key] for key in FIT_KEYS}

    def work() -> dict[str, Any]:
        import SimpleITK as sitk

        from pipeline.ct_io import read_volume
        from pipeline.files import atomic_path
        from pipeline.lung import check_canonical

        started = time.perf_counter()
        subject = read_volume(lung_path, sid, STAGE)
        atlas = read_volume(atlas_path, sid, STAGE)
        for image in (subject, atlas):
            check_canonical(image, sid, STAGE)
        if not sitk.GetArrayViewFromImage(subject).any():
            raise SubjectError(sid, f"lung mask {lung_path} is empty", STAGE)
        transform, info = register_masks(atlas, subject, **fit)
        deformable = settings["deformable"]
        if deformable["enabled"]:
            transform, refined = refine_deformable(atlas, subject, transform,
                                                   grid_spacing_mm=deformable["grid_spacing_mm"],
                                                   iterations=deformable["iterations"],
                                                   working_spacing_mm=fit["working_spacing_mm"])
            info = {**info, "deformable": refined}
        dice = label_dice(atlas, subject, transform)
        rounded = {k: round(v, 4) for k, v in dice.items()}
        affine = affine_part(transform)
        flag_reason = registration_verdict(dice, np.asarray(affine.GetMatrix()).reshape(3, 3), settings, sid)
        with atomic_path(out) as tmp:
            sitk.WriteTransform(transform, str(tmp))
        seconds = time.perf_counter() - started
        log.info("subject %s: Dice %.3f (right %.3f, left %.3f)%s, %d iterations, %.1f s", sid, dice["dice"],
                 dice["dice_right"], dice["dice_left"], ", FLAGGED" if flag_reason else "", info["iterations"], seconds)
        return {**rounded, "flagged": bool(flag_reason), "flag_reason": flag_reason, **info,
                **_transform_summary(affine),
                "seconds": round(seconds, 2)}

    return run_subject_stage(sid=sid, stage=STAGE, status_path=status_path, outputs=[out], work=work, upstream=upstream)


def read_transform(path, sid: str | None = None, stage: str | None = None):
    """Read a transform written by this stage: an ``sitk.AffineTransform``, or an
    ``sitk.CompositeTransform`` of an affine and a B-spline (``register.deformable``).

    Raises:
        SubjectError: missing, empty (tombstone) or unreadable file, or another kind of transform.
    """
    import os

    import SimpleITK as sitk

    if not os.path.isfile(path):
        raise SubjectError(sid, f"transform {path} does not exist", stage)
    if os.path.getsize(path) == 0:
        raise SubjectError(sid, f"transform {path} is empty (an upstream stage failed)", stage)
    try:
        transform = sitk.ReadTransform(str(path))
    except RuntimeError as error:
        raise SubjectError(sid, f"cannot read transform {path}: {' '.join(str(error).split())[:200]}", stage) from None
    parts = [transform]
    if transform.GetName() == "CompositeTransform":
        composite = sitk.CompositeTransform(transform)
        parts = [composite.GetNthTransform(i) for i in range(composite.GetNumberOfTransforms())]
    kinds = [part.GetName() for part in parts]
    if kinds == ["AffineTransform"]:
        return sitk.AffineTransform(parts[0])
    if kinds == ["AffineTransform", "BSplineTransform"]:
        return sitk.CompositeTransform([sitk.AffineTransform(parts[0]), sitk.BSplineTransform(parts[1])])
    raise SubjectError(sid, f"transform {path} holds {' + '.join(kinds) or 'nothing'}, expected an affine "
                            "(optionally followed by a B-spline)", stage)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sid", required=True, help="subject ID")
    parser.add_argument("--lung", required=True, help="subject lung labels (work/lung/{sid}.nii.gz)")
    parser.add_argument("--atlas", required=True, help="atlas lung labels (work/atlas/atlas_lung.nii.gz)")
    parser.add_argument("--upstream", action="append", default=[], help="status JSON of the lung stage (repeatable)")
    parser.add_argument("--out", required=True, help="transform to write (work/transforms/{sid}.tfm)")
    parser.add_argument("--status", required=True, help="status JSON to write (work/qc/register/{sid}.json)")


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import stage_settings

    run_register(sid=args.sid, lung_path=args.lung, atlas_path=args.atlas, out=args.out, status_path=args.status,
                 upstream=args.upstream, settings=stage_settings(args, "register"))
    return 0
