"""Lung segmentation: Dice against the generator's true lungs, left/right, airways, failures and the stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.config import validate_section
from pipeline.errors import SubjectError
from pipeline.lung import run_lung, segment_lungs
from tests.preprocess_fixtures import dice, synth_subjects, synthetic_chest  # noqa: F401 (fixture)

sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def _array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def test_dice_against_generator_truth(synth_subjects):
    """Generator subjects (plain NIfTI, reoriented NIfTI, DICOM) → ingest → lung: Dice ≥ 0.95 per lung."""
    assert {s.plan.format for s in synth_subjects} == {"nifti", "dicom"}
    assert any(s.plan.reoriented for s in synth_subjects)
    for subject in synth_subjects:
        lungs, truth = _array(subject.lungs), _array(subject.truth)
        assert lungs.dtype == np.uint8 and set(np.unique(lungs)) == {0, 1, 2}
        for label in (1, 2):
            assert dice(lungs == label, truth == label) >= 0.95, (subject.sid, label)


def test_right_lung_has_smaller_x_and_airways_are_removed():
    chest = synthetic_chest(3.0, seed=5)
    result = segment_lungs(chest.ct, sid="S")
    labels = _array(result.labels)
    xs = np.arange(labels.shape[2])
    centre = [float((labels == k).sum(axis=(0, 1)) @ xs / (labels == k).sum()) for k in (1, 2)]
    assert centre[0] < labels.shape[2] / 2 < centre[1]
    assert result.qc["trachea_found"] and result.qc["airway_ml"] > 5
    # the trachea runs down the middle of the top slices: none of it is lung
    ct = _array(chest.ct)
    top = slice(labels.shape[0] - 10, labels.shape[0])
    trachea_air = (ct[top] < -900) & (np.abs(xs - (labels.shape[2] - 1) / 2) < 4)[None, None, :]
    assert trachea_air.sum() > 20
    assert not labels[top][trachea_air].any()
    for label in (1, 2):
        assert dice(labels == label, _array(chest.labels) == label) >= 0.97


def test_touching_lungs_are_split():
    chest = synthetic_chest(3.0, seed=6, joined=True, emphysema=0.1)
    result = segment_lungs(chest.ct, sid="S")
    assert result.qc["split_erosions"] > 0  # one air component: it had to be eroded apart
    labels, truth = _array(result.labels), _array(chest.labels)
    for label in (1, 2):
        assert dice(labels == label, truth == label) >= 0.95


def test_large_bowel_gas_is_not_taken_for_a_lung():
    """Touching lungs plus a gas pocket below the diaphragm as large as a fifth of them: the lungs are split."""
    chest = synthetic_chest(3.0, seed=6, joined=True)
    ct, truth = _array(chest.ct), _array(chest.labels)
    z, y, x = np.indices(ct.shape)
    lung_bottom = np.flatnonzero(truth.any(axis=(1, 2)))[0]
    centre = (lung_bottom - 22, ct.shape[1] // 2, ct.shape[2] // 2 + 10)
    gas = (z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2 <= 19**2  # 57 mm radius, ~780 ml
    assert not (gas & (truth > 0)).any() and gas.sum() * 27 / 1000 > 0.2 * (truth > 0).sum() * 27 / 1000
    ct[gas] = -1000
    image = sitk.GetImageFromArray(ct)
    image.CopyInformation(chest.ct)
    result = segment_lungs(image, sid="S")
    labels = _array(result.labels)
    assert result.qc["split_erosions"] > 0
    for label in (1, 2):
        assert dice(labels == label, truth == label) >= 0.95
    assert not labels[gas].any()


def test_segmentation_is_deterministic_and_keeps_geometry():
    chest = synthetic_chest(3.0, seed=7)
    first, second = segment_lungs(chest.ct), segment_lungs(chest.ct)
    assert np.array_equal(_array(first.labels), _array(second.labels))
    assert first.labels.GetOrigin() == chest.ct.GetOrigin()
    assert first.labels.GetSpacing() == chest.ct.GetSpacing()


def test_body_without_lungs_reports_its_air_volume():
    chest = synthetic_chest(3.0, seed=8)
    ct = _array(chest.ct)
    ct[_array(chest.labels) > 0] = 30  # fill both lungs with soft tissue; trachea and bowel gas stay
    image = sitk.GetImageFromArray(ct)
    image.CopyInformation(chest.ct)
    expected = r"no lungs found: \d+ ml of air inside the body \(need ≥ 500 ml\)"
    with pytest.raises(SubjectError, match=expected) as error:
        segment_lungs(image, sid="S9")
    assert error.value.sid == "S9" and error.value.stage == "lung"
    measured = float(error.value.reason.split(": ")[1].split(" ml")[0])
    assert 10 < measured < 500  # the trachea and the bowel gas


def test_non_canonical_volume_is_rejected():
    chest = synthetic_chest(3.0, seed=9)
    flipped = sitk.Flip(chest.ct, [True, False, False], flipAboutOrigin=False)
    assert flipped.GetDirection()[0] == -1.0
    with pytest.raises(SubjectError, match="canonical orientation"):
        segment_lungs(flipped, sid="S")


def test_real_head_ct_fails_with_no_lungs(tmp_path):
    """The real head CT from Debian's invesalius-examples: ingest works, lung fails with its air volume."""
    from pipeline.ingest import ingest_subject
    from tests.ct_fixtures import cranium_head_ct

    raw = cranium_head_ct(tmp_path / "cranium.nii.gz")
    if raw is None:
        pytest.skip("Debian package invesalius-examples (Cranium.inv3) is not installed")
    ingest_subject("HEAD", raw, "nifti", tmp_path / "ct.nii.gz",
                   **validate_section("ingest", {"spacing_mm": 2.0, "min_slices": 1}))
    (tmp_path / "ingest.json").write_text(json.dumps({"sid": "HEAD", "stage": "ingest", "status": "ok"}))
    status = run_lung(sid="HEAD", ct_path=tmp_path / "ct.nii.gz", out=tmp_path / "lung.nii.gz",
                      density_path=tmp_path / "density.json", status_path=tmp_path / "status.json",
                      upstream=[tmp_path / "ingest.json"], **validate_section("lung", {}))
    assert status["status"] == "failed" and status["failed_stage"] == "lung"
    assert status["reason"].startswith("no lungs found: ")
    air_ml = float(status["reason"].split(": ")[1].split(" ml of air inside the body")[0])
    assert 0 <= air_ml < 500
    assert (tmp_path / "lung.nii.gz").stat().st_size == 0 and (tmp_path / "density.json").stat().st_size == 0
    assert json.loads((tmp_path / "status.json").read_text()) == status


def _write_ct(image: sitk.Image, path) -> None:
    from pipeline.ct_io import write_volume

    write_volume(image, path)


def _ok_status(path, sid: str = "S", stage: str = "ingest") -> None:
    path.write_text(json.dumps({"sid": sid, "stage": stage, "status": "ok"}))


def test_stage_isolates_subjects_and_skips_failed_upstream(tmp_path):
    good = synthetic_chest(3.0, seed=10, emphysema=0.05)
    empty = sitk.GetImageFromArray(np.where(_array(good.labels) > 0, 30, _array(good.ct)).astype(np.int16))
    empty.CopyInformation(good.ct)
    _write_ct(good.ct, tmp_path / "good.nii.gz")
    _write_ct(empty, tmp_path / "empty.nii.gz")
    _ok_status(tmp_path / "ingest_ok.json")
    (tmp_path / "ingest_failed.json").write_text(json.dumps(
        {"sid": "C", "stage": "ingest", "status": "failed", "failed_stage": "ingest",
         "reason": "truncated gzip stream"}))

    def stage(sid, ct, upstream):
        return run_lung(sid=sid, ct_path=tmp_path / ct, out=tmp_path / f"{sid}.nii.gz",
                        density_path=tmp_path / f"{sid}.json", status_path=tmp_path / f"{sid}_status.json",
                        upstream=[tmp_path / upstream],
                        threshold_hu=-400.0, min_lung_volume_ml=500.0)

    bad = stage("A", "empty.nii.gz", "ingest_ok.json")
    ok = stage("B", "good.nii.gz", "ingest_ok.json")
    skipped = stage("C", "good.nii.gz", "ingest_failed.json")

    assert bad["status"] == "failed" and "no lungs found" in bad["reason"]
    assert ok["status"] == "ok" and ok["right_ml"] > 500 and ok["left_ml"] > 500
    assert skipped == {"sid": "C", "stage": "lung", "status": "skipped", "failed_stage": "ingest",
                       "reason": "truncated gzip stream"}
    for sid in ("A", "C"):
        assert (tmp_path / f"{sid}.nii.gz").stat().st_size == 0 and (tmp_path / f"{sid}.json").stat().st_size == 0
    labels = sitk.ReadImage(str(tmp_path / "B.nii.gz"))
    assert labels.GetPixelID() == sitk.sitkUInt8
    density = json.loads((tmp_path / "B.json").read_text())
    assert density["total"]["volume_l"] == pytest.approx(density["right"]["volume_l"] + density["left"]["volume_l"])
    assert density["total"]["volume_l"] * 1000 == pytest.approx(ok["right_ml"] + ok["left_ml"], abs=1.0)
    assert 2.0 < density["total"]["laa950"] < 15.0  # about 5 % of the lung rendered as emphysema
    tail = density["high_attenuation"]  # the eroded lung's high-attenuation tail (airway walls, vessels)
    assert tail["haa700"] >= tail["haa500"] >= tail["haa100"] and tail["perc85"] <= tail["perc99"]


def test_cli_runs_the_stage(tmp_path):
    from pipeline.cli import main

    chest = synthetic_chest(3.0, seed=11)
    _write_ct(chest.ct, tmp_path / "ct.nii.gz")
    _ok_status(tmp_path / "ingest.json")
    code = main(["lung", "--sid", "S", "--ct", str(tmp_path / "ct.nii.gz"), "--upstream", str(tmp_path / "ingest.json"),
                 "--out", str(tmp_path / "lung.nii.gz"), "--density", str(tmp_path / "density.json"),
                 "--status", str(tmp_path / "status.json"), "--log", str(tmp_path / "lung.log"),
                 "--settings", json.dumps({"threshold_hu": -400.0, "min_lung_volume_ml": 500.0})])
    assert code == 0
    assert json.loads((tmp_path / "status.json").read_text())["status"] == "ok"
    assert "lungs" in (tmp_path / "lung.log").read_text()
    truth = _array(chest.labels)
    labels = _array(sitk.ReadImage(str(tmp_path / "lung.nii.gz")))
    assert dice(labels == 1, truth == 1) >= 0.95


def test_bad_settings_are_config_errors():
    from pipeline.config import validate_section
    from pipeline.errors import ConfigError

    assert validate_section("lung", {}) == {"threshold_hu": -400.0, "min_lung_volume_ml": 500.0}
    with pytest.raises(ConfigError, match="lung.min_lung_volume_ml"):
        validate_section("lung", {"min_lung_volume_ml": -1})
    with pytest.raises(ConfigError, match="lung.threshold_hu"):
        validate_section("lung", {"threshold_hu": "low"})
