"""Tests of stage ``ingest`` (pipeline.ingest) through its CLI and its library entry point."""

from __future__ import annotations

import gzip
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.cli import main
from pipeline.config import validate_section
from pipeline.errors import ConfigError
from pipeline.ingest import ingest_subject
from tests.ct_fixtures import PATIENT_TAGS, cranium_head_ct, phantom_hu, write_dicom_series, write_nifti

SPACING = (0.75, 0.875, 1.25)  # (x, y, z) mm, exact in float32
ORIGIN = (-12.5, 20.25, 30.5)
SETTINGS = {"spacing_mm": 1.0, "spacing_tolerance": 0.05, "min_slices": 8}
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def phantom():
    return phantom_hu((16, 24, 28), seed=5, padding=True)


def _ingest_cli(tmp_path, sid, image, fmt, settings=SETTINGS):
    out, status, log = tmp_path / "ct" / f"{sid}.nii.gz", tmp_path / "qc" / f"{sid}.json", tmp_path / f"{sid}.log"
    code = main(["ingest", "--sid", sid, "--image", str(image), "--format", fmt, "--out", str(out),
                 "--status", str(status), "--settings", json.dumps(settings), "--log", str(log)])
    return code, out, json.loads(status.read_text()), log.read_text()


def test_dicom_and_nifti_of_the_same_volume_ingest_to_the_same_array(tmp_path, phantom):
    nifti = write_nifti(tmp_path / "raw" / "a.nii.gz", phantom, SPACING, ORIGIN, code="RAS")
    dicom = write_dicom_series(tmp_path / "raw" / "b", phantom, SPACING, ORIGIN, code="LPS")
    code_a, out_a, status_a, _ = _ingest_cli(tmp_path, "a", nifti, "nifti")
    code_b, out_b, status_b, _ = _ingest_cli(tmp_path, "b", dicom, "dicom")
    assert code_a == code_b == 0
    assert status_a["status"] == status_b["status"] == "ok"
    a, b = sitk.ReadImage(str(out_a)), sitk.ReadImage(str(out_b))
    assert a.GetPixelID() == b.GetPixelID() == sitk.sitkInt16
    np.testing.assert_array_equal(sitk.GetArrayFromImage(a), sitk.GetArrayFromImage(b))
    for img in (a, b):
        assert img.GetDirection() == pytest.approx((1, 0, 0, 0, 1, 0, 0, 0, 1))
        assert img.GetSpacing() == pytest.approx((1.0, 1.0, 1.0))
    assert a.GetOrigin() == pytest.approx(b.GetOrigin())
    # Original geometry is reported in the stored volume's own [k, j, i] axis order.
    assert status_a["original_orientation"] == "RAS" and status_b["original_orientation"] == "LPS"
    assert status_a["original_shape"] == status_b["original_shape"] == [16, 24, 28]
    assert status_a["original_spacing_mm"] == status_b["original_spacing_mm"] == [1.25, 0.875, 0.75]
    # 28 × 0.75 = 21 mm, 24 × 0.875 = 21 mm, 16 × 1.25 = 20 mm at 1 mm
    assert status_a["shape"] == [20, 21, 21] and status_a["n_slices"] == 16
    assert status_b["manufacturer"] == "ACME" and status_b["kernel"] == "B31f"
    assert status_b["slice_thickness_mm"] == 1.25 and "manufacturer" not in status_a
    hu = [status_a[f"hu_p{p:02d}"] for p in (1, 5, 50, 95, 99)]
    assert hu == sorted(hu) and hu[0] == -1024.0  # padding clipped to -1024, not -2048
    values = sitk.GetArrayFromImage(a)
    assert hu[2] == np.percentile(values, 50)


def test_no_patient_tag_leaves_the_dicom(tmp_path, phantom):
    dicom = write_dicom_series(tmp_path / "raw", phantom, SPACING, ORIGIN)
    code, out, status, log = _ingest_cli(tmp_path, "p1", dicom, "dicom")
    assert code == 0 and status["status"] == "ok"
    nifti_bytes = gzip.decompress(out.read_bytes())
    status_text = json.dumps(status)
    for keyword, value in PATIENT_TAGS.items():
        for text in (value, value.split("^")[0]):
            assert text not in status_text, keyword
            assert text.encode() not in nifti_bytes, keyword
            assert text not in log, keyword


def _truncated_nifti(tmp_path, phantom):
    path = write_nifti(tmp_path / "t.nii.gz", phantom, SPACING, ORIGIN)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path, "nifti"


def _empty_nifti(tmp_path, phantom):
    path = tmp_path / "e.nii.gz"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path, "nifti"


def _nan_nifti(tmp_path, phantom):
    values = phantom.astype(np.float32)
    values[3, 4, 5:9] = np.nan
    return write_nifti(tmp_path / "nan.nii.gz", values, SPACING, ORIGIN, dtype=np.float32), "nifti"


def _dicom(**options):
    def make(tmp_path, phantom):
        return write_dicom_series(tmp_path / "d", phantom, SPACING, ORIGIN, **options), "dicom"
    return make


BAD_INPUTS = {
    "truncated_nifti": (_truncated_nifti, "truncated or corrupt NIfTI: "),
    "empty_file": (_empty_nifti, "is an empty file"),
    "nan_nifti": (_nan_nifti, "image contains 4 NaN voxels"),
    "missing_slice": (_dicom(drop_slice=7), "missing slice between z=38.00 and z=40.50 mm (gap 2.50 mm, expected 1.25 mm)"),
    "not_ct": (_dicom(modality="MR"), "modality MR is not CT"),
    "mixed_orientation": (_dicom(mix_orientation=True), "mixed orientation: ImageOrientationPatient"),
    "mixed_shape": (_dicom(mix_shape=True), "mixed shape: "),
    "mixed_series": (_dicom(mix_series=True), "mixed series: 2 different SeriesInstanceUIDs"),
    "raw_unsigned": (_dicom(unsigned_raw=True), "values are not plausibly HU: no air (minimum 0 > -500 HU)"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_fails_one_subject_with_one_clear_line(tmp_path, phantom, case):
    make, cause = BAD_INPUTS[case]
    image, fmt = make(tmp_path / "raw", phantom)
    code, out, status, log = _ingest_cli(tmp_path, f"bad-{case}", image, fmt)
    assert code == 0  # the subject fails, the stage does not
    assert status["status"] == "failed" and status["failed_stage"] == "ingest"
    assert cause in status["reason"]
    assert out.is_file() and out.stat().st_size == 0  # tombstone
    errors = [line for line in log.splitlines() if " ERROR " in line]
    assert len(errors) == 1, log
    assert f"subject bad-{case} [ingest]: " in errors[0] and cause in errors[0]
    assert "Traceback" not in log


def test_settings_are_validated(tmp_path, phantom, capsys):
    assert validate_section("ingest", {"spacing_mm": 2, "spacing_tolerance": 0.1}) == {
        "spacing_mm": 2, "spacing_tolerance": 0.1, "min_slices": 16,  # the schema's defaults fill in
        "calibration": {"enabled": False, "air_hu": -1000.0, "blood_hu": 50.0, "on_failure": "error"}}
    with pytest.raises(ConfigError, match="'ingest.calibration.on_failure': 'ignore' is not one of"):
        validate_section("ingest", {"calibration": {"enabled": True, "on_failure": "ignore"}})
    # the target ranges keep blood above air: swapped targets are rejected by name
    with pytest.raises(ConfigError, match="'ingest.calibration.air_hu': 50 is greater than the maximum of -900"):
        validate_section("ingest", {"calibration": {"air_hu": 50, "blood_hu": -1000}})
    with pytest.raises(ConfigError, match="'ingest.spacing_mm': 0 is less than or equal to the minimum of 0"):
        validate_section("ingest", {"spacing_mm": 0, "spacing_tolerance": 0.1, "min_slices": 4})
    with pytest.raises(ConfigError, match="'ingest.min_slices': 2.5 is not of type 'integer'"):
        validate_section("ingest", {"spacing_mm": 1, "spacing_tolerance": 0.1, "min_slices": 2.5})
    # through the stage: a bad --settings value stops it with one line naming the key, before any work
    image = write_nifti(tmp_path / "S1.nii.gz", phantom, SPACING, ORIGIN)
    code = main(["ingest", "--sid", "S1", "--image", str(image), "--format", "nifti", "--out",
                 str(tmp_path / "ct.nii.gz"), "--status", str(tmp_path / "s.json"),
                 "--settings", json.dumps({"spacing_mm": -1})])
    assert code == 1 and not (tmp_path / "s.json").exists()
    assert "config key 'ingest.spacing_mm': -1 is less than or equal to the minimum of 0" in capsys.readouterr().err


def test_nifti_with_too_few_slices_fails(tmp_path, phantom):
    path = write_nifti(tmp_path / "thin.nii.gz", phantom[:9], SPACING, ORIGIN)
    from pipeline.errors import SubjectError

    with pytest.raises(SubjectError, match=r"only 9 slices \(minimum 10\)"):
        ingest_subject("s1", path, "nifti", tmp_path / "out.nii.gz", **validate_section("ingest", {"min_slices": 10}))


def test_importing_the_stage_is_light():
    """The per-subject CLI must not pay for SimpleITK/nibabel/pydicom before it needs them."""
    code = ("import sys, pipeline.ingest; heavy = {'SimpleITK', 'nibabel', 'pydicom', 'torch', 'pandas'}; "
            "print(sorted(heavy & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_real_head_ct_ingests_with_a_sane_histogram(tmp_path):
    source = cranium_head_ct(tmp_path / "cranium.nii.gz")
    if source is None:
        pytest.skip("Debian package invesalius-examples (real head CT Cranium.inv3) is not installed")
    qc = ingest_subject("cranium", source, "nifti", tmp_path / "ct.nii.gz", **validate_section("ingest", {"spacing_mm": 2.0}))
    assert qc["original_shape"] == [108, 256, 256] and qc["original_orientation"] == "LAS"
    assert qc["shape"] == [81, 122, 122]  # 162 mm × 245 mm × 245 mm at 2 mm
    values = sitk.GetArrayFromImage(sitk.ReadImage(str(tmp_path / "ct.nii.gz"))).astype(np.int32)
    assert qc["hu_p01"] <= -990  # air around the head
    assert qc["hu_p99"] > 300  # skull
    brain = np.mean((values >= 0) & (values <= 80))
    assert 0.1 < brain < 0.6
    soft = values[(values > -200) & (values < 200)]
    mode = np.bincount(soft + 200).argmax() - 200
    assert 15 <= mode <= 50  # brain parenchyma (grey/white matter ~ 25–45 HU)
