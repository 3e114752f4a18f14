"""Affine registration of the atlas lung mask to subjects: accuracy, direction convention, QC policy, stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.config import validate_section
from pipeline.atlas import crop_atlas
from pipeline.errors import SubjectError
from pipeline.register import label_dice, read_transform, register_masks, registration_verdict, run_register
from tests.preprocess_fixtures import synth_subjects, synthetic_chest  # noqa: F401 (fixture)

sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)


def test_generator_subjects_register_to_an_atlas_with_dice_above_090(synth_subjects):
    """Segmented generator subjects (different size, pose and orientation on disk) vs an atlas made of the first."""
    atlas = crop_atlas(synth_subjects[0].lungs, margin=8)
    for subject in synth_subjects[1:]:
        transform, info = register_masks(atlas, subject.lungs)
        dice = label_dice(atlas, subject.lungs, transform)
        assert dice["dice"] >= 0.90, (subject.sid, dice, info)
        assert min(dice["dice_right"], dice["dice_left"]) >= 0.85, (subject.sid, dice)


def _known_transform() -> sitk.AffineTransform:
    """Atlas → subject: 8 % larger, rotated 4° about z and 2° about x, shifted by (6, -4, 9) mm."""
    rotation = sitk.Euler3DTransform((0, 0, 0), np.radians(2.0), 0.0, np.radians(4.0))
    matrix = 1.08 * np.asarray(rotation.GetMatrix()).reshape(3, 3)
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(matrix.ravel()))
    transform.SetCenter((0.0, 0.0, 20.0))
    transform.SetTranslation((6.0, -4.0, 9.0))
    return transform


def test_recovers_a_known_transform_in_the_atlas_to_subject_direction():
    chest = synthetic_chest(3.0, seed=1)
    atlas = crop_atlas(chest.labels, margin=6)
    truth = _known_transform()
    # subject(q) = atlas(truth⁻¹(q)): Resample pulls values through output → input points
    subject = sitk.Resample(atlas, chest.labels, truth.GetInverse(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    transform, info = register_masks(atlas, subject)
    assert transform.GetName() == "AffineTransform"
    # compare where both transforms send atlas lung points
    points = np.argwhere(sitk.GetArrayViewFromImage(atlas) > 0)[::97]
    errors = []
    for z, y, x in points:
        p = atlas.TransformIndexToPhysicalPoint((int(x), int(y), int(z)))
        errors.append(np.linalg.norm(np.subtract(transform.TransformPoint(p), truth.TransformPoint(p))))
    assert np.mean(errors) < 1.5 and np.max(errors) < 3.0, (np.mean(errors), np.max(errors), info)
    assert label_dice(atlas, subject, transform)["dice"] >= 0.95
    # the inverse direction would be far off: the test can tell the conventions apart
    inverse = truth.GetInverse()
    p = atlas.TransformIndexToPhysicalPoint([int(v) for v in points[0][::-1]])
    assert np.linalg.norm(np.subtract(inverse.TransformPoint(p), truth.TransformPoint(p))) > 10.0


def test_registration_is_deterministic():
    atlas = crop_atlas(synthetic_chest(4.0, seed=2).labels, margin=4)
    subject = synthetic_chest(4.0, seed=3, scale=0.9, shift_mm=(8.0, -5.0, 6.0)).labels
    first, _ = register_masks(atlas, subject)
    second, _ = register_masks(atlas, subject)
    assert first.GetParameters() == second.GetParameters()
    assert first.GetFixedParameters() == second.GetFixedParameters()


def test_register_masks_rejects_bad_settings():
    labels = synthetic_chest(6.0, seed=1).labels
    with pytest.raises(ValueError, match="shrink_factors"):
        register_masks(labels, labels, shrink_factors=[4, 0])
    with pytest.raises(ValueError, match="iterations"):
        register_masks(labels, labels, iterations=0)


_POLICY = {"min_dice": 0.6, "flag_dice": 0.85, "max_scale": 2.0}


def test_graded_policy_keeps_imperfect_fits_and_fails_only_gross_ones():
    identity = np.eye(3)
    assert registration_verdict({"dice": 0.95, "dice_right": 0.94, "dice_left": 0.96}, identity, _POLICY) == ""
    low_lung = registration_verdict({"dice": 0.90, "dice_right": 0.95, "dice_left": 0.80}, identity, _POLICY)
    assert low_lung == ("registration imperfect: Dice 0.900 (right 0.950, left 0.800) is below "
                        "register.flag_dice 0.85")
    assert registration_verdict({"dice": 0.70, "dice_right": 0.75, "dice_left": 0.65}, identity, _POLICY) \
        .startswith("registration imperfect: Dice 0.700")
    expected = r"registration failed: Dice 0\.550 .* below register\.min_dice 0\.6$"
    with pytest.raises(SubjectError, match=expected) as error:
        registration_verdict({"dice": 0.55, "dice_right": 0.6, "dice_left": 0.5}, identity, _POLICY, sid="S1")
    assert error.value.sid == "S1" and error.value.stage == "register"


@pytest.mark.parametrize("matrix, match", [
    (np.diag([1.0, 1.0, -1.0]), r"determinant -1 \(a reflection"),
    (np.diag([1.0, 1.0, 0.0]), "determinant 0 "),
    (np.diag([2.5, 1.0, 1.0]), r"implausible scale 1\.00-2\.50 .*register\.max_scale 2"),
    (np.diag([0.4, 1.0, 1.0]), r"implausible scale 0\.40-1\.00"),
])
def test_graded_policy_fails_reflections_collapses_and_implausible_scales(matrix, match):
    perfect = {"dice": 0.99, "dice_right": 0.99, "dice_left": 0.99}
    with pytest.raises(SubjectError, match=match):
        registration_verdict(perfect, matrix, _POLICY, sid="S2")


def _stage_files(tmp_path):
    from pipeline.ct_io import write_volume

    atlas = crop_atlas(synthetic_chest(4.0, seed=4).labels, margin=4)
    subject = synthetic_chest(4.0, seed=5, scale=1.1, shift_mm=(-6.0, 4.0, -8.0)).labels
    write_volume(atlas, tmp_path / "atlas.nii.gz")
    write_volume(subject, tmp_path / "lung.nii.gz")
    (tmp_path / "lung_ok.json").write_text(json.dumps({"sid": "S", "stage": "lung", "status": "ok"}))
    return atlas, subject


def _run(tmp_path, sid, upstream="lung_ok.json", **settings):
    return run_register(sid=sid, lung_path=tmp_path / "lung.nii.gz", atlas_path=tmp_path / "atlas.nii.gz",
                        out=tmp_path / f"{sid}.tfm", status_path=tmp_path / f"{sid}.json",
                        upstream=[tmp_path / upstream],
                        settings=validate_section("register", {"min_dice": 0.85, "iterations": 200,
                                                               "shrink_factors": [4, 2, 1], **settings}))


def test_stage_writes_transform_and_qc_or_fails_with_the_dice(tmp_path):
    atlas, subject = _stage_files(tmp_path)
    ok = _run(tmp_path, "A")
    assert ok["status"] == "ok" and ok["flagged"] is False and ok["flag_reason"] == "" and ok["dice"] >= 0.9
    assert {"dice_right", "dice_left", "iterations", "determinant"} <= set(ok)
    transform = read_transform(tmp_path / "A.tfm")
    assert label_dice(atlas, subject, transform)["dice"] == pytest.approx(ok["dice"], abs=1e-4)
    assert ok["determinant"] > 1.1  # the subject's lungs are 10 % larger in every direction

    picky = _run(tmp_path, "F", flag_dice=0.9999)
    assert picky["status"] == "ok" and picky["flagged"] is True
    assert picky["flag_reason"].startswith(f"registration imperfect: Dice {ok['dice']:.3f}")
    assert (tmp_path / "F.tfm").stat().st_size > 0

    strict = _run(tmp_path, "B", min_dice=0.9999)
    assert strict["status"] == "failed"
    assert strict["reason"].startswith(f"registration failed: Dice {ok['dice']:.3f}")
    assert (tmp_path / "B.tfm").stat().st_size == 0
    with pytest.raises(SubjectError, match="empty"):
        read_transform(tmp_path / "B.tfm", "B", "patches")


def test_stage_skips_a_subject_whose_lung_stage_failed(tmp_path):
    _stage_files(tmp_path)
    (tmp_path / "lung_failed.json").write_text(json.dumps(
        {"sid": "C", "stage": "lung", "status": "failed", "failed_stage": "lung", "reason": "no lungs found: 12 ml"}))
    status = _run(tmp_path, "C", upstream="lung_failed.json")
    assert status["status"] == "skipped" and status["failed_stage"] == "lung"
    assert status["reason"] == "no lungs found: 12 ml"
    assert (tmp_path / "C.tfm").stat().st_size == 0


def test_cli_runs_the_stage(tmp_path):
    from pipeline.cli import main

    _stage_files(tmp_path)
    code = main(["register", "--sid", "D", "--lung", str(tmp_path / "lung.nii.gz"),
                 "--atlas", str(tmp_path / "atlas.nii.gz"),
                 "--upstream", str(tmp_path / "lung_ok.json"), "--out", str(tmp_path / "D.tfm"),
                 "--status", str(tmp_path / "D.json"), "--log", str(tmp_path / "register.log"),
                 "--settings", json.dumps({"min_dice": 0.85, "iterations": 100, "shrink_factors": [2, 1]})])
    assert code == 0
    assert json.loads((tmp_path / "D.json").read_text())["status"] == "ok"
    assert read_transform(tmp_path / "D.tfm").GetName() == "AffineTransform"
    assert "Dice" in (tmp_path / "register.log").read_text()


def test_bad_settings_are_config_errors():
    from pipeline.errors import ConfigError

    assert validate_section("register", {}) == {"min_dice": 0.6, "flag_dice": 0.85, "flag_mad": 3.0, "max_scale": 2.0,
                                                "iterations": 200, "shrink_factors": [4, 2, 1],
                                                "working_spacing_mm": 5.0,
                                                "deformable": {"enabled": False, "grid_spacing_mm": 80.0,
                                                               "iterations": 30}}
    for settings, key in (({"min_dice": 1.5}, "min_dice"), ({"shrink_factors": []}, "shrink_factors"),
                          ({"shrink_factors": [2, 0]}, "shrink_factors"), ({"iterations": 0}, "iterations"),
                          ({"working_spacing_mm": 0}, "working_spacing_mm"), ({"max_scale": 1.0}, "max_scale"),
                          ({"deformable": {"grid_spacing_mm": 0}}, "deformable.grid_spacing_mm"),
                          ({"flag_mad": 0}, "flag_mad")):
        with pytest.raises(ConfigError, match=f"register.{key}"):
            validate_section("register", settings)


def _bent_subject(chest):
    """The chest's lungs bent by a smooth non-affine displacement: medial parts pulled down, lateral parts up."""
    pull = sitk.BSplineTransformInitializer(chest.labels, [2, 2, 2], order=3)
    n = 5  # control points per axis of a 2x2x2 cubic mesh
    params = np.zeros(3 * n ** 3)
    for ix in range(n):
        params[2 * n ** 3 + ix + n * np.arange(n * n)] = 80.0 * np.cos(np.pi * (ix - 2) / 2)  # z coefficients
    pull.SetParameters(tuple(params))
    return sitk.Resample(chest.labels, chest.labels, pull, sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8), pull


def test_deformable_refinement_follows_anatomy_the_affine_cannot(tmp_path):
    from pipeline.ct_io import write_volume
    from pipeline.patches import patch_corners

    chest = synthetic_chest(4.0, seed=1)
    atlas = crop_atlas(chest.labels, margin=6)
    write_volume(atlas, tmp_path / "atlas.nii.gz")
    bent, pull = _bent_subject(chest)  # subject(q) = chest(pull(q)): an atlas point p sits where pull(q) = p
    write_volume(bent, tmp_path / "lung.nii.gz")
    (tmp_path / "lung_ok.json").write_text(json.dumps({"sid": "S", "stage": "lung", "status": "ok"}))
    affine = _run(tmp_path, "AFF", min_dice=0.6)
    refined = _run(tmp_path, "DEF", min_dice=0.6, deformable={"enabled": True})
    assert affine["status"] == refined["status"] == "ok"
    assert affine["dice"] < 0.95 and refined["dice"] >= affine["dice"] + 0.03, (affine["dice"], refined["dice"])
    assert refined["deformable"]["kept_affine"] is False and "deformable" not in affine
    transform = read_transform(tmp_path / "DEF.tfm")
    assert transform.GetName() == "CompositeTransform"
    subject = sitk.ReadImage(str(tmp_path / "lung.nii.gz"))
    assert label_dice(atlas, subject, transform)["dice"] == pytest.approx(refined["dice"], abs=1e-4)
    # the patches are cut at the refined centres, which are closer to where the atlas points really went
    points = np.argwhere(sitk.GetArrayViewFromImage(atlas) > 0)[::53][:, ::-1]
    centres = np.array([atlas.TransformIndexToPhysicalPoint([int(v) for v in p]) for p in points])

    def error_mm(fitted):
        return np.mean([np.linalg.norm(np.subtract(pull.TransformPoint(fitted.TransformPoint(p)), p)) for p in centres])

    assert error_mm(transform) < 0.6 * error_mm(read_transform(tmp_path / "AFF.tfm"))
    corners = patch_corners(centres, transform, subject, 4)
    assert not np.array_equal(corners, patch_corners(centres, read_transform(tmp_path / "AFF.tfm"), subject, 4))
