"""Stage ``ingest``: one raw CT (NIfTI file or DICOM series) → ``work/ct/{sid}.nii.gz``.

The raw image is read as Hounsfield units (:mod:`pipeline.ct_io`), checked for plausibility,
reoriented to the canonical identity direction (LPS) and linearly resampled to isotropic
``ingest.spacing_mm``; the result is written as int16 NIfTI, atomically. The status JSON
(``work/qc/ingest/{sid}.json``) holds QC values: source format, original shape, spacing and
orientation, output shape and spacing, HU percentiles of the output and, for DICOM, the
manufacturer, model, kernel, kVp and slice thickness. No patient tag is ever copied.

Optional air/blood calibration (``ingest.calibration``, off by default; :mod:`pipeline.calibration`):
after resampling, the linear map taking the trachea lumen median to ``air_hu`` and the blood pool
median to ``blood_hu`` is fitted on the resampled grid and applied (rounded, clipped to int16).
The map is linear, so applying it after the linear resampling equals applying it before, up to
the one extra rounding (under 1 HU); on the resampled grid it is cheaper. The status records
``calibration`` (``applied``, ``off`` or ``skipped: <reason>``), ``calib_air_median_hu``,
``calib_blood_median_hu`` (raw medians), ``calib_slope``, ``calib_intercept``,
``calib_air_voxels`` and ``calib_blood_voxels``. When the references are not found the subject
fails (``on_failure: error``) or keeps its uncalibrated CT with the reason in the status and a
warning naming the subject (``on_failure: skip``); the image is never changed silently.

A bad subject (corrupt file, missing slice, not CT, ...) gives a ``failed`` status with a
one-line reason and an empty tombstone at the output; the command still exits 0.
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any


log = logging.getLogger(__name__)

STAGE = "ingest"
HU_PERCENTILES = (1, 5, 50, 95, 99)
def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sid", required=True, help="subject ID")
    parser.add_argument("--image", required=True, help="NIfTI file or DICOM series directory")
    parser.add_argument("--format", required=True, choices=("nifti", "dicom"), help="raw image format")
    parser.add_argument("--out", required=True, help="output CT (.nii.gz): int16 HU, canonical, isotropic")
    parser.add_argument("--status", required=True, help="status/QC JSON")


def _calibrate(ct, sid: str, settings: dict[str, Any]):
    """Apply the air/blood calibration to ``ct`` (int16 SimpleITK image, canonical, isotropic).

    Returns:
        (image to write, QC keys ``calibration`` and ``calib_*``).

    Raises:
        SubjectError: calibration impossible and ``on_failure`` is ``"error"``.
    """
    import SimpleITK as sitk

    from pipeline.calibration import CalibrationError, fit_calibration
    from pipeline.errors import SubjectError

    qc: dict[str, Any] = {"calibration": "off", "calib_air_median_hu": None, "calib_blood_median_hu": None,
                          "calib_slope": None, "calib_intercept": None, "calib_air_voxels": None,
                          "calib_blood_voxels": None}
    if not settings["enabled"]:
        return ct, qc
    array = sitk.GetArrayViewFromImage(ct)
    spacing = tuple(float(s) for s in ct.GetSpacing()[::-1])
    try:
        fit = fit_calibration(array, spacing, air_hu=settings["air_hu"], blood_hu=settings["blood_hu"], sid=sid,
                              stage=STAGE)
    except CalibrationError as error:
        if settings["on_failure"] == "error":
            raise SubjectError(sid, f"calibration failed: {error.reason}", STAGE) from None
        log.warning("subject %s: calibration skipped, the CT stays uncalibrated: %s", sid, error.reason)
        for key, value in (("calib_air_median_hu", error.air_median_hu),
                           ("calib_blood_median_hu", error.blood_median_hu)):
            qc[key] = None if value is None else round(value, 1)  # measured before a plausibility check failed
        qc["calibration"] = f"skipped: {error.reason}"
        return ct, qc
    calibrated = sitk.GetImageFromArray(fit.apply(array))
    calibrated.CopyInformation(ct)
    qc.update(calibration="applied", calib_air_median_hu=round(fit.air_median_hu, 1),
              calib_blood_median_hu=round(fit.blood_median_hu, 1), calib_slope=round(fit.slope, 5),
              calib_intercept=round(fit.intercept, 3), calib_air_voxels=fit.air_voxels,
              calib_blood_voxels=fit.blood_voxels)
    log.info("subject %s: calibrated HU' = %.4f HU %+.2f (trachea %.1f -> %g HU, blood %.1f -> %g HU)", sid,
             fit.slope, fit.intercept, fit.air_median_hu, settings["air_hu"], fit.blood_median_hu,
             settings["blood_hu"])
    return calibrated, qc


def ingest_subject(sid: str, image: str | Path, fmt: str, out: str | Path, *, spacing_mm: float,
                   spacing_tolerance: float, min_slices: int, calibration: dict[str, Any]) -> dict[str, Any]:
    """Read, check, reorient and resample one raw CT and write it to ``out``.

    Args:
        sid: subject ID (error messages).
        image: NIfTI file (``fmt="nifti"``) or DICOM series directory (``fmt="dicom"``).
        fmt: ``"nifti"`` or ``"dicom"``.
        out: output ``.nii.gz``; int16 HU, identity direction, isotropic ``spacing_mm``.
        spacing_mm: output voxel size in mm.
        spacing_tolerance: relative tolerance on DICOM slice spacing.
        min_slices: minimum number of slices along the image's third axis.
        calibration: the ``ingest.calibration`` settings (``enabled``, ``air_hu``, ``blood_hu``,
            ``on_failure``).

    The keywords are the validated ``ingest`` section (:func:`pipeline.config.validate_section`
    fills the schema's defaults: ``ingest_subject(..., **validate_section("ingest", {}))``).

    Returns:
        QC metrics for the status JSON. Shapes/spacings are in array order: the original
        ``[k, j, i]`` of the stored volume, the output ``[z, y, x]``.

    Raises:
        SubjectError: bad input, or calibration impossible with ``on_failure: error``, with a one-line reason.
        ValueError: unknown ``fmt``, invalid numeric settings or an unknown ``on_failure``.
    """
    import numpy as np
    import SimpleITK as sitk

    from pipeline import ct_io
    from pipeline.errors import SubjectError

    if fmt not in ("nifti", "dicom"):
        raise ValueError(f"fmt must be 'nifti' or 'dicom', got {fmt!r}")
    started = time.perf_counter()
    info: dict[str, Any] = {}
    if fmt == "nifti":
        raw = ct_io.read_nifti_hu(image, sid)
    else:
        series = ct_io.load_dicom_series(image, sid, spacing_tolerance=spacing_tolerance, min_slices=min_slices)
        raw, info = series.image, series.info
    original_size = raw.GetSize()
    if original_size[2] < min_slices:
        raise SubjectError(sid, f"only {original_size[2]} slices (minimum {min_slices})", STAGE)
    qc: dict[str, Any] = {
        "source_format": fmt,
        "original_shape": [int(n) for n in original_size[::-1]],
        "original_spacing_mm": [round(float(s), 6) for s in raw.GetSpacing()[::-1]],
        "original_orientation": ct_io.orientation_code(raw),
        "n_slices": int(original_size[2]),
    }
    read_s = time.perf_counter() - started
    log.info("subject %s: read %s %s voxels, spacing %s mm, orientation %s (%.1f s)", sid, fmt,
             "x".join(map(str, qc["original_shape"])), qc["original_spacing_mm"], qc["original_orientation"], read_s)

    canonical = ct_io.to_canonical(raw)
    del raw
    ct = ct_io.resample_isotropic(canonical, spacing_mm)
    del canonical
    ct, calibration_qc = _calibrate(ct, sid, calibration)
    ct_io.write_volume(ct, out)
    array = sitk.GetArrayViewFromImage(ct)
    percentiles = np.percentile(array, HU_PERCENTILES)
    qc.update({
        "shape": [int(n) for n in ct.GetSize()[::-1]],
        "spacing_mm": float(spacing_mm),
        **{f"hu_p{p:02d}": round(float(v), 1) for p, v in zip(HU_PERCENTILES, percentiles)},
        **calibration_qc,
        "seconds": round(time.perf_counter() - started, 2),
    })
    for key, name in (("Manufacturer", "manufacturer"), ("ManufacturerModelName", "model"),
                      ("ConvolutionKernel", "kernel"), ("SliceThickness", "slice_thickness_mm"), ("KVP", "kvp")):
        if key in info:
            qc[name] = info[key]
    log.info("subject %s: wrote %s, %s voxels at %g mm, HU p1/p50/p99 %g/%g/%g (%.1f s)", sid, out,
             "x".join(map(str, qc["shape"])), spacing_mm, qc["hu_p01"], qc["hu_p50"], qc["hu_p99"], qc["seconds"])
    return qc


def run_ingest(*, sid: str, image, fmt: str, out, status_path, settings: dict[str, Any]) -> dict[str, Any]:
    """The ``ingest`` stage for one subject: the CT to ``out``, its status (QC or failure) to ``status_path``.

    Args:
        settings: the config's validated ``ingest`` section (the keywords of :func:`ingest_subject`).
    """
    from pipeline.status import run_subject_stage

    return run_subject_stage(sid=sid, stage=STAGE, status_path=status_path, outputs=[out],
                             work=lambda: ingest_subject(sid, image, fmt, out, **settings))


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import stage_settings

    run_ingest(sid=args.sid, image=args.image, fmt=args.format, out=args.out, status_path=args.status,
               settings=stage_settings(args, "ingest"))
    return 0
