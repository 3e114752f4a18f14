"""Air/blood HU calibration (pipeline.calibration) and its use in the ingest stage."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline import ct_io
from pipeline.calibration import Calibration, CalibrationError, apply_linear, fit_calibration, reference_regions
from pipeline.cli import main
from pipeline.config import validate_section
from pipeline.ingest import ingest_subject
from tests.ct_fixtures import write_nifti

SPACING = 2.5  # mm, isotropic phantom
AIR, BLOOD, TISSUE = -1000.0, 50.0, 40.0  # true HU of the phantom's trachea lumen, heart and other soft tissue
CARINA_Z = 40.0  # mm
SCALE, OFFSET = 1.03, 20.0  # the "scanner": HU_obs = SCALE * HU + OFFSET


def chest_phantom(*, trachea: bool = True, seed: int = 0, noise_hu: float = 10.0):
    """A small chest CT in canonical order with a trachea and a heart, and its true reference regions.

    Body (soft tissue 40 HU, fat rim -100 HU, spine 400 HU) holding two lungs (-860 HU), a heart
    (blood, 50 HU) between them below the carina, and (optionally) a trachea (lumen -1000 HU,
    wall 40 HU) from the top of the field of view to the carina with two main bronchi.

    Returns:
        (int16 HU ``[z, y, x]``, truth): truth maps ``lumen``, ``lumen_core`` (the upper trachea, 3 mm
        inside its wall), ``heart`` and ``heart_core`` (60 % of its radii) to bool masks ``[z, y, x]``.
    """
    rng = np.random.default_rng(seed)
    nx, ny, nz = 120, 96, 96  # 300 x 240 x 240 mm
    z, y, x = np.ogrid[0:nz, 0:ny, 0:nx]
    x = (x - (nx - 1) / 2) * SPACING
    y = (y - (ny - 1) / 2) * SPACING
    z = (z - (nz - 1) / 2) * SPACING
    shape = (nz, ny, nx)
    hu = np.full(shape, -1000.0, np.float32)
    body = (x / 140.0) ** 2 + (y / 100.0) ** 2
    hu[np.broadcast_to(body <= 1.0, shape)] = -100.0
    hu[np.broadcast_to(body <= 0.85, shape)] = TISSUE
    hu[np.broadcast_to(x**2 + (y - 70.0) ** 2 <= 15.0**2, shape)] = 400.0  # spine
    heart = ((x - 5.0) / 45.0) ** 2 + ((y + 25.0) / 40.0) ** 2 + ((z + 50.0) / 40.0) ** 2
    near_heart = ((x - 5.0) / 49.0) ** 2 + ((y + 25.0) / 44.0) ** 2 + ((z + 50.0) / 44.0) ** 2 <= 1.0
    for side in (-1.0, 1.0):
        lung = (((x - side * 65.0) / 50.0) ** 2 + (y / 70.0) ** 2 + ((z + 10.0) / 100.0) ** 2 <= 1.0)
        lung &= ((x / 125.0) ** 2 + (y / 85.0) ** 2 <= 1.0) & ~near_heart
        hu[lung] = -860.0
    hu[heart <= 1.0] = BLOOD
    lumen, lumen_core = np.zeros(shape, bool), np.zeros(shape, bool)
    if trachea:
        def tube(start, end, radius):
            a, d = np.asarray(start, float), np.asarray(end, float) - np.asarray(start, float)
            t = np.clip(((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / (d @ d), 0.0, 1.0)
            return (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2 <= radius**2

        top, carina = (0.0, 10.0, 130.0), (0.0, 10.0, CARINA_Z)
        hu[tube(top, carina, 11.5)] = TISSUE
        lumen = tube(top, carina, 9.0)
        hu[lumen] = AIR
        for side in (-1.0, 1.0):
            bronchus = ((0.0, 10.0, CARINA_Z), (side * 45.0, 10.0, 10.0))
            hu[tube(*bronchus, 8.0) & (hu > -500)] = TISSUE
            hu[tube(*bronchus, 6.0)] = AIR
        lumen_core = tube((0.0, 10.0, 110.0), (0.0, 10.0, 70.0), 6.0)
    truth = {"lumen": lumen, "lumen_core": lumen_core, "heart": np.broadcast_to(heart <= 1.0, shape),
             "heart_core": np.broadcast_to(heart <= 0.6**2, shape)}
    hu += rng.normal(0.0, noise_hu, shape).astype(np.float32)
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16), truth


def scanner(hu: np.ndarray) -> np.ndarray:
    """The phantom as a miscalibrated scanner sees it: ``SCALE * HU + OFFSET``, int16."""
    return apply_linear(hu, SCALE, OFFSET)


@pytest.fixture(scope="module")
def chest():
    return chest_phantom()


@pytest.fixture(scope="module")
def no_trachea():
    return chest_phantom(trachea=False)[0]


def test_known_air_and_blood_offsets_are_mapped_back(chest):
    hu, truth = chest
    observed = scanner(hu)
    fit = fit_calibration(observed, (SPACING,) * 3, air_hu=AIR, blood_hu=BLOOD)
    assert isinstance(fit, Calibration)
    # the detected regions lie in the trachea lumen above the carina and in the heart
    trachea, blood = reference_regions(observed, (SPACING,) * 3)
    assert trachea.sum() == fit.air_voxels >= 50 and blood.sum() == fit.blood_voxels >= 200
    assert truth["lumen"][trachea].all() and blood[truth["heart"]].sum() == blood.sum()
    carina = int(np.ceil(CARINA_Z / SPACING + (hu.shape[0] - 1) / 2))
    assert not trachea[:carina].any()
    assert fit.air_median_hu == pytest.approx(SCALE * AIR + OFFSET, abs=2.0)
    assert fit.blood_median_hu == pytest.approx(SCALE * BLOOD + OFFSET, abs=2.0)
    assert fit.slope == pytest.approx(1 / SCALE, abs=0.005)
    assert fit.intercept == pytest.approx(-OFFSET / SCALE, abs=3.0)
    calibrated = fit.apply(observed)
    assert calibrated.dtype == np.int16 and calibrated.shape == hu.shape
    # medians of the true regions (not the detected ones) are back at the targets
    assert np.median(calibrated[truth["lumen_core"]]) == pytest.approx(AIR, abs=2.0)
    assert np.median(calibrated[truth["heart_core"]]) == pytest.approx(BLOOD, abs=2.0)
    # the map takes the measured medians exactly to the targets
    assert fit.slope * fit.air_median_hu + fit.intercept == pytest.approx(AIR)
    assert fit.slope * fit.blood_median_hu + fit.intercept == pytest.approx(BLOOD)


def test_apply_rounds_and_clips_to_int16():
    values = np.array([[-1024, 0, 3071, 32000]], np.int16)
    out = Calibration(-1010.0, 61.0, 100, 1000, 1.1, 0.3).apply(values)
    assert out.dtype == np.int16
    assert out.tolist() == [[-1126, 0, 3378, 32767]]
    assert apply_linear(values, 1.0, 0.0).tolist() == values.tolist()


def test_lung_test_phantom_references_are_found():
    from tests.preprocess_fixtures import synthetic_chest

    chest = synthetic_chest(spacing=3.0, seed=1)  # air -1000 HU, every soft tissue 40 HU, noise sd 15
    hu = sitk.GetArrayFromImage(chest.ct)
    fit = fit_calibration(hu, (3.0,) * 3)
    assert fit.air_median_hu == pytest.approx(-1000.0, abs=3.0)
    assert fit.blood_median_hu == pytest.approx(40.0, abs=2.0)
    assert fit.slope == pytest.approx(1050.0 / 1040.0, abs=0.005)


def test_no_trachea_is_a_one_line_error(no_trachea):
    with pytest.raises(CalibrationError) as caught:
        fit_calibration(no_trachea, (SPACING,) * 3, sid="S9", stage="ingest")
    assert caught.value.reason.startswith("no trachea found")
    assert str(caught.value).startswith("subject S9 [ingest]: no trachea found") and "\n" not in str(caught.value)


def test_implausible_slope_is_an_error_with_the_medians(chest):
    hu = chest[0]
    with pytest.raises(CalibrationError, match=r"implausible slope 1\.\d+ \(allowed 0\.8\.\.1\.02") as caught:
        fit_calibration(hu, (SPACING,) * 3, blood_hu=100.0, slope_range=(0.8, 1.02))  # slope 1100/1050
    assert caught.value.air_median_hu == pytest.approx(AIR, abs=2.0)


def test_bad_arguments_are_value_errors(chest):
    with pytest.raises(ValueError, match="blood_hu must be greater than air_hu"):
        fit_calibration(chest[0], (SPACING,) * 3, air_hu=50.0, blood_hu=-1000.0)
    with pytest.raises(ValueError, match=r"hu must be a \[z, y, x\] volume"):
        fit_calibration(chest[0][0], (SPACING,) * 2)


# ---- the ingest stage ----------------------------------------------------------------------

ORIGIN = (-150.0, -120.0, -240.0)


def _ingest(tmp_path, sid, image, calibration=None):
    """Run ``copdssl ingest`` on a NIfTI; returns (exit code, output array, status dict, log text)."""
    settings = {"spacing_mm": SPACING, "min_slices": 8}
    if calibration is not None:
        settings["calibration"] = calibration
    out, status, log = tmp_path / "ct" / f"{sid}.nii.gz", tmp_path / "qc" / f"{sid}.json", tmp_path / f"{sid}.log"
    code = main(["ingest", "--sid", sid, "--image", str(image), "--format", "nifti", "--out", str(out),
                 "--status", str(status), "--settings", json.dumps(settings), "--log", str(log)])
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(out))) if out.stat().st_size else None
    return code, array, json.loads(status.read_text()), log.read_text()


def test_ingest_calibration_off_is_the_uncalibrated_pipeline_and_on_applies_the_fit(tmp_path, chest):
    image = write_nifti(tmp_path / "raw" / "c.nii.gz", scanner(chest[0]), (SPACING,) * 3, ORIGIN, code="RAS")
    # by hand, the steps ingest took before calibration existed
    expected = sitk.GetArrayFromImage(ct_io.resample_isotropic(ct_io.to_canonical(ct_io.read_nifti_hu(image, "C1")),
                                                               SPACING))
    code, default, status, _ = _ingest(tmp_path / "default", "C1", image)
    assert code == 0 and status["status"] == "ok" and status["calibration"] == "off"
    assert status["calib_slope"] is None and status["calib_intercept"] is None
    np.testing.assert_array_equal(default, expected)
    _, off, status_off, _ = _ingest(tmp_path / "off", "C1", image, {"enabled": False, "on_failure": "skip"})
    np.testing.assert_array_equal(off, expected)
    assert status_off["calibration"] == "off"

    code, on, status, log = _ingest(tmp_path / "on", "C1", image, {"enabled": True, "air_hu": AIR, "blood_hu": BLOOD})
    assert code == 0 and status["status"] == "ok" and status["calibration"] == "applied"
    fit = fit_calibration(expected, (SPACING,) * 3, air_hu=AIR, blood_hu=BLOOD)  # fitted after resampling
    np.testing.assert_array_equal(on, fit.apply(expected))
    assert status["calib_slope"] == pytest.approx(fit.slope, abs=1e-5)
    assert status["calib_intercept"] == pytest.approx(fit.intercept, abs=1e-3)
    assert status["calib_air_median_hu"] == pytest.approx(fit.air_median_hu, abs=0.05)
    assert status["calib_blood_median_hu"] == pytest.approx(fit.blood_median_hu, abs=0.05)
    assert status["calib_air_voxels"] == fit.air_voxels and status["calib_blood_voxels"] == fit.blood_voxels
    assert status["hu_p50"] == np.percentile(on, 50)  # QC percentiles describe the written (calibrated) CT
    assert "subject C1: calibrated HU' = " in log


def test_ingest_without_trachea_fails_or_skips_as_configured(tmp_path, no_trachea):
    image = write_nifti(tmp_path / "raw" / "n.nii.gz", no_trachea, (SPACING,) * 3, ORIGIN, code="LPS")
    code, out, status, log = _ingest(tmp_path / "error", "N1", image, {"enabled": True, "on_failure": "error"})
    assert code == 0 and out is None  # the subject fails (tombstone), the stage does not
    assert status["status"] == "failed" and status["failed_stage"] == "ingest"
    assert status["reason"].startswith("calibration failed: no trachea found")
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "subject N1 [ingest]: calibration failed: no trachea found" in errors[0]
    assert "Traceback" not in log

    _, off, status_off, _ = _ingest(tmp_path / "off", "N1", image)
    code, skipped, status, log = _ingest(tmp_path / "skip", "N1", image, {"enabled": True, "on_failure": "skip"})
    assert code == 0 and status["status"] == "ok"
    np.testing.assert_array_equal(skipped, off)  # never changed silently: the uncalibrated CT
    assert status["calibration"].startswith("skipped: no trachea found")
    assert status["calib_slope"] is None and status["calib_air_median_hu"] is None
    assert {key: status[key] for key in status_off if key.startswith("hu_p")} == {
        key: status_off[key] for key in status_off if key.startswith("hu_p")}
    warnings = [line for line in log.splitlines() if " WARNING " in line]
    assert len(warnings) == 1 and "subject N1: calibration skipped" in warnings[0]
    assert "no trachea found" in warnings[0]


def test_synthetic_subject_is_calibrated_and_the_intercept_tracks_its_site_offset(tmp_path):
    from pipeline.synth.anatomy import AIR_HU, BLOOD_HU
    from pipeline.synth.cohort import write_subject
    from tests.synth_fixtures import small_plan

    plan = small_plan(7)  # a NIfTI subject of a site with a -8 HU calibration offset, smooth kernel
    assert plan.format == "nifti" and plan.calibration_hu == -8.0
    statuses, outputs = {}, {}
    settings = {"enabled": True, "air_hu": -1000.0, "blood_hu": 50.0}
    for offset in (plan.calibration_hu, 0.0):
        subject = dataclasses.replace(plan, calibration_hu=offset)  # the same subject, noise and all
        root = tmp_path / f"offset{offset:+.0f}"
        write_subject(subject, root / "raw")
        outputs[offset] = root / "ct.nii.gz"
        statuses[offset] = ingest_subject(subject.sid, root / "raw" / subject.image, subject.format, outputs[offset],
                                          **validate_section("ingest", {"spacing_mm": 3.0, "min_slices": 1,
                                                                        "calibration": settings}))
    status = statuses[plan.calibration_hu]
    assert status["calibration"] == "applied"
    # the raw references sit at the generator's nominal values plus the site offset
    assert status["calib_air_median_hu"] == pytest.approx(AIR_HU + plan.calibration_hu, abs=5.0)
    assert status["calib_blood_median_hu"] == pytest.approx(BLOOD_HU + plan.calibration_hu, abs=3.0)
    # the intercept tracks the offset: same subject without it differs by -slope * offset
    shift = status["calib_intercept"] - statuses[0.0]["calib_intercept"]
    assert shift == pytest.approx(-status["calib_slope"] * plan.calibration_hu, abs=1.5)
    # after calibration the references, detected afresh, are at the targets
    calibrated = sitk.GetArrayFromImage(sitk.ReadImage(str(outputs[plan.calibration_hu])))
    trachea, blood = reference_regions(calibrated, (3.0,) * 3)
    assert np.median(calibrated[trachea]) == pytest.approx(settings["air_hu"], abs=2.0)
    assert np.median(calibrated[blood]) == pytest.approx(settings["blood_hu"], abs=2.0)
