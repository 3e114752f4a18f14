"""Patches: identity equals the direct crop, translations move the crop, clipping, padding, QC and the stage."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.atlas import GridSpec, build_grid, crop_atlas
from pipeline.errors import SubjectError
from pipeline.patches import cut_patches, extract_patches, patch_corners, run_patches
from tests.preprocess_fixtures import synth_subjects, synthetic_chest  # noqa: F401 (fixture)

SPEC = GridSpec(patch_size=8, step=6, min_lung_fraction=0.25, adjacency_cutoff=0.13)


@pytest.fixture(scope="module")
def chest_grid():
    """A 3 mm chest, its atlas (the chest's own lungs, cropped) and the grid (S = 8, T = 6)."""
    chest = synthetic_chest(3.0, seed=12, emphysema=0.05)
    atlas = crop_atlas(chest.labels, SPEC.margin)
    return chest, atlas, build_grid(atlas, SPEC)


def _crop_like(image: sitk.Image, reference: sitk.Image) -> np.ndarray:
    """``image`` values on ``reference``'s grid (same spacing, shifted origin): a plain array crop."""
    return sitk.GetArrayFromImage(sitk.Resample(image, reference, sitk.Transform(), sitk.sitkNearestNeighbor, -1024,
                                                image.GetPixelID()))


def test_identity_transform_gives_the_direct_crops(chest_grid):
    chest, atlas, grid = chest_grid
    ct_on_atlas = _crop_like(chest.ct, atlas)
    # the subject *is* the atlas (its CT on the atlas grid), so the identity is the right transform
    subject = sitk.GetImageFromArray(ct_on_atlas)
    subject.CopyInformation(atlas)
    patches, qc = cut_patches(subject, grid, sitk.AffineTransform(3), clip_hu=(-1024, 240))
    S = SPEC.patch_size
    assert patches.dtype == np.int16 and patches.shape == (len(grid["corners"]), S, S, S)
    assert np.array_equal(patch_corners(grid["centers_mm"], sitk.AffineTransform(3), subject, S), grid["corners"])
    for p, (z, y, x) in enumerate(grid["corners"]):
        expected = np.clip(ct_on_atlas[z:z + S, y:y + S, x:x + S], -1024, 240)
        assert np.array_equal(patches[p], expected), p
    assert qc["n_patches"] == len(grid["corners"]) and qc["padded_fraction"] == 0.0


def test_patches_follow_the_transform_direction(chest_grid):
    """A transform that maps atlas points 2 voxels further along x cuts every patch 2 voxels further along x."""
    chest, _, grid = chest_grid
    affine = sitk.AffineTransform(3)
    affine.SetTranslation((6.0, 0.0, -3.0))  # atlas → subject: +2 voxels in x, -1 in z
    S = SPEC.patch_size
    base = patch_corners(grid["centers_mm"], sitk.AffineTransform(3), chest.ct, S)
    moved = patch_corners(grid["centers_mm"], affine, chest.ct, S)
    assert np.array_equal(moved - base, np.tile([-1, 0, 2], (len(base), 1)))
    patches, _ = cut_patches(chest.ct, grid, affine)
    array = sitk.GetArrayViewFromImage(chest.ct)
    z, y, x = moved[len(moved) // 2]
    assert np.array_equal(patches[len(moved) // 2], np.clip(array[z:z + S, y:y + S, x:x + S], -1024, 240))


def test_centres_map_to_the_nearest_voxel_under_scaling(chest_grid):
    chest, _, grid = chest_grid
    scale = sitk.AffineTransform(3)
    scale.SetMatrix((1.1, 0, 0, 0, 0.9, 0, 0, 0, 1.0))
    scale.SetCenter((0.0, 0.0, 0.0))
    S = SPEC.patch_size
    corners = patch_corners(grid["centers_mm"], scale, chest.ct, S)
    for centre, corner in zip(grid["centers_mm"], corners):
        mapped = np.array([1.1, 0.9, 1.0]) * centre
        index = (mapped - np.asarray(chest.ct.GetOrigin())) / 3.0  # x, y, z continuous index
        assert np.all(np.abs(corner[::-1] + (S - 1) / 2 - index) <= 0.5 + 1e-9)


def test_extract_pads_outside_and_counts_padding():
    volume = np.arange(5 * 6 * 7, dtype=np.int16).reshape(5, 6, 7)
    corners = np.array([[-2, 0, 0], [1, 1, 1], [10, 10, 10]])
    patches, padded = extract_patches(volume, corners, 4, fill=-1024)
    assert np.all(patches[0, :2] == -1024) and np.array_equal(patches[0, 2:], volume[0:2, 0:4, 0:4])
    assert np.array_equal(patches[1], volume[1:5, 1:5, 1:5])
    assert np.all(patches[2] == -1024)
    assert padded == 2 * 16 + 64


def test_hu_clipping_padding_value_and_padding_qc(chest_grid):
    chest, atlas, grid = chest_grid
    far = sitk.AffineTransform(3)
    far.SetTranslation((0.0, 0.0, 10_000.0))  # every patch outside the CT
    with pytest.raises(SubjectError, match=r"patches fall outside the CT: 100 % of patch voxels are padding"):
        cut_patches(chest.ct, grid, far, sid="S")
    patches, qc = cut_patches(chest.ct, grid, sitk.AffineTransform(3), clip_hu=(-900, 0), lung=chest.labels)
    assert patches.min() >= -900 and patches.max() <= 0
    assert (patches == 0).any() and (patches == -900).any()
    assert 0.25 < qc["lung_fraction"] <= 1.0
    # a CT no larger than the atlas crop, the grid shifted 12 voxels along x: the last patches pad
    subject = sitk.GetImageFromArray(np.full(sitk.GetArrayViewFromImage(atlas).shape, -500, np.int16))
    subject.CopyInformation(atlas)
    shifted = sitk.AffineTransform(3)
    shifted.SetTranslation((36.0, 0.0, 0.0))
    patches, qc = cut_patches(subject, grid, shifted, clip_hu=(-900, 0))
    assert 0 < qc["padded_fraction"] < 0.5
    assert set(np.unique(patches)) == {-900, -500}  # -1024 padding clipped into the range
    assert qc["padded_fraction"] == pytest.approx(np.mean(patches == -900), abs=1e-5)  # rounded in the QC


def test_spacing_mismatch_is_a_subject_error(chest_grid):
    chest, _, grid = chest_grid
    coarse = sitk.Resample(chest.ct, [n // 2 for n in chest.ct.GetSize()], sitk.Transform(), sitk.sitkLinear,
                           chest.ct.GetOrigin(), (6.0, 6.0, 6.0), chest.ct.GetDirection(), -1024, sitk.sitkInt16)
    with pytest.raises(SubjectError, match="differs from the atlas grid"):
        cut_patches(coarse, grid, sitk.AffineTransform(3), sid="S")


def _stage_inputs(tmp_path, chest, atlas, grid):
    from pipeline.ct_io import write_volume
    from pipeline.files import write_npz

    write_volume(chest.ct, tmp_path / "ct.nii.gz")
    write_volume(chest.labels, tmp_path / "lung.nii.gz")
    write_npz(tmp_path / "grid.npz", **grid)
    sitk.WriteTransform(sitk.AffineTransform(3), str(tmp_path / "t.tfm"))
    for stage in ("lung", "register"):
        (tmp_path / f"{stage}.json").write_text(json.dumps({"sid": "S", "stage": stage, "status": "ok"}))


def _run_stage(tmp_path, name="S", **options):
    """The patches stage on the ``_stage_inputs`` files, writing ``{name}.npy`` and ``{name}.json``."""
    return run_patches(sid="S", ct_path=tmp_path / "ct.nii.gz", transform_path=tmp_path / "t.tfm",
                       grid_path=tmp_path / "grid.npz", out=tmp_path / f"{name}.npy",
                       status_path=tmp_path / f"{name}.json", **options)


def test_stage_writes_a_memory_mappable_array_and_qc(tmp_path, chest_grid):
    chest, atlas, grid = chest_grid
    _stage_inputs(tmp_path, chest, atlas, grid)
    status = _run_stage(tmp_path, upstream=[tmp_path / "register.json", tmp_path / "lung.json"],
                        lung_path=tmp_path / "lung.nii.gz", clip_hu=[-1024, 240])
    assert status["status"] == "ok" and status["n_patches"] == len(grid["corners"])
    assert status["padded_fraction"] == 0.0 and status["lung_fraction"] >= 0.25
    stored = np.load(tmp_path / "S.npy", mmap_mode="r")
    assert isinstance(stored, np.memmap) and stored.dtype == np.int16
    direct, _ = cut_patches(chest.ct, grid, sitk.AffineTransform(3))
    assert np.array_equal(stored, direct)


def test_stage_skips_on_any_failed_upstream(tmp_path, chest_grid):
    chest, atlas, grid = chest_grid
    _stage_inputs(tmp_path, chest, atlas, grid)
    (tmp_path / "register.json").write_text(json.dumps({"sid": "S", "stage": "register", "status": "failed",
                                                        "failed_stage": "register",
                                                        "reason": "registration failed: Dice 0.41"}))
    status = run_patches(sid="S", ct_path=tmp_path / "ct.nii.gz", transform_path=tmp_path / "t.tfm",
                         grid_path=tmp_path / "grid.npz", out=tmp_path / "S.npy", status_path=tmp_path / "S.json",
                         upstream=[tmp_path / "lung.json", tmp_path / "register.json"], clip_hu=[-1024, 240])
    assert status["status"] == "skipped" and status["failed_stage"] == "register"
    assert (tmp_path / "S.npy").stat().st_size == 0


def test_cli_runs_the_stage(tmp_path, chest_grid):
    from pipeline.cli import main

    chest, atlas, grid = chest_grid
    _stage_inputs(tmp_path, chest, atlas, grid)
    code = main(["patches", "--sid", "S", "--ct", str(tmp_path / "ct.nii.gz"), "--transform", str(tmp_path / "t.tfm"),
                 "--grid", str(tmp_path / "grid.npz"), "--upstream", str(tmp_path / "lung.json"),
                 "--upstream", str(tmp_path / "register.json"), "--out", str(tmp_path / "S.npy"),
                 "--status", str(tmp_path / "S.json"), "--log", str(tmp_path / "p.log"),
                 "--settings", json.dumps({"clip_hu": [-1000, 200]})])
    assert code == 0
    stored = np.load(tmp_path / "S.npy")
    assert stored.shape == (len(grid["corners"]), 8, 8, 8) and stored.min() >= -1000 and stored.max() <= 200
    assert "lung_fraction" not in json.loads((tmp_path / "S.json").read_text())  # no --lung given


def test_generator_subject_patches_land_in_its_lungs(synth_subjects):
    """Atlas from one generator subject, patches of another through the real registration: mostly lung."""
    from pipeline.register import register_masks

    atlas = crop_atlas(synth_subjects[0].lungs, SPEC.margin)
    grid = build_grid(atlas, SPEC)
    subject = synth_subjects[1]
    transform, _ = register_masks(atlas, subject.lungs)
    patches, qc = cut_patches(subject.ct, grid, transform, lung=subject.lungs, sid=subject.sid)
    atlas_fraction = float(np.mean(grid["lung_fraction"]))
    assert qc["lung_fraction"] > atlas_fraction - 0.1  # as much lung as in the atlas, within registration error
    assert qc["padded_fraction"] == 0.0
    assert np.median(patches.reshape(len(patches), -1), axis=1).mean() < -500  # lung parenchyma, not soft tissue


def test_bad_clip_range_is_a_config_error(tmp_path, chest_grid):
    from pipeline.errors import ConfigError

    chest, atlas, grid = chest_grid
    _stage_inputs(tmp_path, chest, atlas, grid)
    for clip in ([240, -1024], [-1024], "wide"):
        with pytest.raises(ConfigError, match="patches.clip_hu"):
            run_patches(sid="S", ct_path=tmp_path / "ct.nii.gz", transform_path=tmp_path / "t.tfm",
                        grid_path=tmp_path / "grid.npz", out=tmp_path / "S.npy", status_path=tmp_path / "S.json",
                        clip_hu=clip)
    assert not (tmp_path / "S.json").exists()


def test_stage_writes_lung_masks_cut_like_the_patches(tmp_path, chest_grid):
    from pipeline.patches import unpack_masks

    chest, atlas, grid = chest_grid
    _stage_inputs(tmp_path, chest, atlas, grid)
    status = _run_stage(tmp_path, upstream=[tmp_path / "register.json", tmp_path / "lung.json"],
                        lung_path=tmp_path / "lung.nii.gz", mask_out=tmp_path / "S_mask.npy",
                        clip_hu=[-1024, 240])
    assert status["status"] == "ok"
    size = int(grid["patch_size"])
    packed = np.load(tmp_path / "S_mask.npy")
    assert packed.dtype == np.uint8 and packed.shape == (len(grid["corners"]), size, size, (size + 7) // 8)
    masks = unpack_masks(packed, size)
    # each mask is the lung labels' crop at the patch's corner in the subject (identity transform)
    labels = sitk.GetArrayFromImage(chest.labels) > 0
    corners = patch_corners(grid["centers_mm"], sitk.AffineTransform(3), chest.ct, size)
    for p, (z, y, x) in enumerate(corners):
        np.testing.assert_array_equal(masks[p], labels[z:z + size, y:y + size, x:x + size])
    assert 0 < masks.mean() < 1 and abs(masks.mean() - status["lung_fraction"]) < 1e-6
    with pytest.raises(Exception, match="--out-mask needs --lung"):
        _run_stage(tmp_path, name="S2", mask_out=tmp_path / "S2_mask.npy", clip_hu=[-1024, 240])
