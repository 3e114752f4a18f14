"""Atlas stage: sample, median-volume or groupwise atlas, supplied reference, crop, patch grid and adjacency graph."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import SimpleITK as sitk

from pipeline.atlas import (GridSpec, adjacency, box_sums, build_grid, choose_atlas_subject, crop_atlas,
                            run_atlas)
from pipeline.config import validate_section
from pipeline.errors import CopdsslError
from pipeline.grid import read_grid
from tests.preprocess_fixtures import synthetic_chest

GRID_KEYS = {"corners": (np.int32, 2), "centers_mm": (np.float64, 2), "locations": (np.float32, 2),
             "lung_fraction": (np.float32, 1), "edges": (np.int64, 2), "edge_weight": (np.float32, 1),
             "patch_size": (np.int64, 0), "step": (np.int64, 0), "spacing_mm": (np.float64, 0)}


def _labels(array: np.ndarray, spacing: float = 2.0, origin=(-10.0, 5.0, 30.0)) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    image.SetSpacing((spacing,) * 3)
    image.SetOrigin(origin)
    return image


def test_choose_atlas_subject_takes_the_median_volume():
    assert choose_atlas_subject({"a": 5.0, "b": 3.0, "c": 4.1, "d": 9.0, "e": 1.0}) == "c"
    # even count: the median 4.5 is equidistant from 4 and 5 -> first sid in sort order
    assert choose_atlas_subject({"z": 5.0, "y": 4.0, "x": 1.0, "w": 8.0}) == "y"
    with pytest.raises(ValueError):
        choose_atlas_subject({})


def test_grid_spec_rejects_bad_values():
    good = {"patch_size": 8, "step": 6, "min_lung_fraction": 0.25, "adjacency_cutoff": 0.13}
    for kwargs in ({"patch_size": 0}, {"step": -1}, {"patch_size": 3.5}, {"min_lung_fraction": 1.5},
                   {"adjacency_cutoff": -0.1}, {"step": True}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            GridSpec(**{**good, **kwargs})
    assert GridSpec(**{**good, "step": 10}).margin == 10


def test_crop_keeps_physical_positions_and_pads():
    array = np.zeros((20, 30, 40), np.uint8)
    array[2:10, 5:25, 3:30] = 1  # lung box touching near the array edge: the margin needs padding
    labels = _labels(array)
    cropped = crop_atlas(labels, margin=4)
    out = sitk.GetArrayFromImage(cropped)
    assert out.shape == (8 + 8, 20 + 8, 27 + 8)
    assert out.sum() == array.sum()
    # voxel [4, 4, 4] of the crop is the first lung voxel [2, 5, 3] of the original, at the same point
    assert out[4, 4, 4] == 1 and out[3, 4, 4] == 0
    assert cropped.TransformIndexToPhysicalPoint((4, 4, 4)) == labels.TransformIndexToPhysicalPoint((3, 5, 2))


def test_box_sums_match_brute_force():
    rng = np.random.default_rng(0)
    mask = rng.random((15, 16, 17)) < 0.3
    corners = np.array([[0, 0, 0], [3, 4, 5], [10, 11, 12], [7, 0, 9]])
    expected = [mask[z:z + 5, y:y + 5, x:x + 5].sum() for z, y, x in corners]
    assert box_sums(mask, corners, 5).tolist() == expected
    with pytest.raises(ValueError, match="margin"):
        box_sums(mask, np.array([[12, 0, 0]]), 5)


def _brute_force_edges(corners: np.ndarray, size: int, cutoff: float) -> dict[tuple[int, int], float]:
    """Overlap / S³ of every pair of boxes, by direct intersection."""
    edges = {}
    for p, q in itertools.permutations(range(len(corners)), 2):
        overlap = np.prod(np.clip(size - np.abs(corners[p] - corners[q]), 0, None)) / size**3
        if overlap > 0 and overlap >= cutoff:
            edges[(p, q)] = overlap
    return edges


@pytest.mark.parametrize("size,step,cutoff", [(8, 6, 0.13), (8, 6, 0.0), (32, 26, 0.13), (10, 4, 0.2)])
def test_adjacency_matches_brute_force_overlaps(size, step, cutoff):
    rng = np.random.default_rng(size + step)
    lattice = np.argwhere(rng.random((4, 5, 6)) < 0.6)
    edges, weights = adjacency(lattice, size, step, cutoff)
    found = {(int(a), int(b)): float(w) for (a, b), w in zip(edges.T, weights)}
    expected = _brute_force_edges(lattice * step, size, cutoff)
    assert found.keys() == expected.keys()
    for key, weight in expected.items():
        assert found[key] == pytest.approx(weight, rel=1e-6)
    assert edges.dtype == np.int64 and weights.dtype == np.float32
    assert np.all(np.diff(edges[0]) >= 0)  # sorted by source


def test_grid_of_a_box_lung_is_analytic():
    """A 40×40×40-voxel box lung, S=16, T=12: the lattice, fractions, locations and edges are known."""
    S, T = 16, 12
    array = np.zeros((80, 80, 80), np.uint8)
    array[20:60, 20:60, 20:40] = 1  # right half
    array[20:60, 20:60, 40:60] = 2  # left half
    atlas = crop_atlas(_labels(array, spacing=1.5, origin=(100.0, -50.0, 7.0)), GridSpec(S, T, 0.5, 0.13).margin)
    grid = build_grid(atlas, GridSpec(patch_size=S, step=T, min_lung_fraction=0.5, adjacency_cutoff=0.13))
    for key, (dtype, ndim) in GRID_KEYS.items():
        assert grid[key].dtype == dtype and grid[key].ndim == ndim, key
    # 40 voxels covered by ceil((40 - 16) / 12) + 1 = 3 patches per axis, span 40: no overhang
    axis = 16 + 12 * np.arange(3)  # the crop margin is 16 voxels, so the box starts at 16
    expected_corners = np.array(list(itertools.product(axis, axis, axis)))
    assert np.array_equal(grid["corners"], expected_corners)
    assert np.all(grid["lung_fraction"] == 1.0)
    # the lung bounding box spans voxels 16..55 of the crop -> centres map to [-1, 1]
    centres = expected_corners + 7.5
    assert np.allclose(grid["locations"], 2 * (centres - 16) / 39 - 1)
    assert grid["locations"].min() >= -1 and grid["locations"].max() <= 1
    # physical centres: origin + spacing * index, in (x, y, z) order
    origin = np.asarray(atlas.GetOrigin())
    assert np.allclose(grid["centers_mm"], origin + 1.5 * centres[:, ::-1])
    # 27 patches on a 3×3×3 lattice: 2·3·(3·3·2) = 108 directed face-neighbour edges of weight (S-T)/S
    assert grid["edges"].shape == (2, 108)
    assert np.allclose(grid["edge_weight"], (S - T) / S)
    assert int(grid["patch_size"]) == S and int(grid["step"]) == T and float(grid["spacing_mm"]) == 1.5


def test_adult_lung_at_1mm_gives_a_few_hundred_connected_patches():
    chest = synthetic_chest(2.0, seed=3, scale=1.15)
    array = sitk.GetArrayFromImage(chest.labels)
    fine = array.repeat(2, 0).repeat(2, 1).repeat(2, 2)  # 1 mm labels
    volume_l = np.count_nonzero(fine) / 1e6
    assert 3.5 < volume_l < 6.5
    spec = GridSpec(patch_size=32, step=26, min_lung_fraction=0.25, adjacency_cutoff=0.13)
    atlas = crop_atlas(_labels(fine, spacing=1.0), spec.margin)
    grid = build_grid(atlas, spec)
    P = len(grid["corners"])
    assert 200 <= P <= 800
    assert np.all(grid["lung_fraction"] >= 0.25)
    edges, weights = grid["edges"], grid["edge_weight"]
    # undirected: every edge is listed both ways with the same weight; no self-loops
    forward = {(int(a), int(b)): float(w) for (a, b), w in zip(edges.T, weights)}
    assert all(forward[(b, a)] == w for (a, b), w in forward.items())
    assert not np.any(edges[0] == edges[1])
    assert np.all((weights >= 0.13) & (weights <= 1.0))
    # with S=32, T=26 only face neighbours pass 0.13: weight 6/32; corners differ by one step on one axis
    assert np.allclose(weights, 6 / 32)
    diffs = np.abs(grid["corners"][edges[0]] - grid["corners"][edges[1]])
    assert np.all(np.sort(diffs, axis=1) == [0, 0, 26])
    # every patch has a neighbour (the lung grid is one piece)
    assert np.unique(edges[0]).size == P


def _stage_inputs(tmp_path, depths: dict[str, int], failed: set[str]):
    """A work directory with subjects.tsv, lung statuses and box-shaped lung masks.

    ``depths``: sid -> the lungs' extent along z in voxels (so the volumes are ordered like it).
    """
    from pipeline.ct_io import write_volume
    from pipeline.layout import Layout

    layout = Layout(work=tmp_path / "work")
    rows = ["sid\timage\tformat"]
    for sid, depth in depths.items():
        rows.append(f"{sid}\timages/{sid}.nii.gz\tnifti")
        status = {"sid": sid, "stage": "lung", "status": "failed" if sid in failed else "ok"}
        layout.status("lung", sid).parent.mkdir(parents=True, exist_ok=True)
        layout.status("lung", sid).write_text(json.dumps(status))
        array = np.zeros((40, 30, 30), np.uint8)
        array[6:6 + depth, 6:24, 5:14] = 1
        array[6:6 + depth, 6:24, 16:25] = 2
        write_volume(_labels(array), layout.lung(sid))
    layout.subjects().write_text("\n".join(rows) + "\n")
    return layout


SMALL_GRID = {"patch_size": 4, "step": 3, "min_lung_fraction": 0.25, "adjacency_cutoff": 0.13}


def _settings(**settings):
    """Validated ``atlas`` and ``register`` sections: SMALL_GRID with ``settings`` over it."""
    return {"settings": validate_section("atlas", {**SMALL_GRID, **settings}),
            "register_settings": validate_section("register", {})}


def _run(layout, sids, **settings):
    return run_atlas(sids=sids, work=layout.work, out_atlas=layout.atlas_mask(), out_grid=layout.grid(),
                     **_settings(**settings))


def test_median_volume_takes_the_median_of_the_sample_subjects_whose_lungs_are_ok(tmp_path):
    # c would be the median of all five, but it failed its lung stage
    layout = _stage_inputs(tmp_path, {"a": 8, "b": 10, "c": 12, "d": 14, "e": 16}, failed={"c"})
    summary = _run(layout, ["a", "b", "c", "d", "e"], method="median_volume")
    # ok depths 8, 10, 14, 16 -> median 12; b and d are equally close -> b (sort order)
    assert summary["atlas_sid"] == "b" and summary["sample"] == ["a", "b", "d", "e"]
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.atlas_mask())))
    assert array.shape == (10 + 8, 18 + 8, 20 + 8)  # lung box plus a margin of S = 4 voxels
    assert set(np.unique(array)) == {0, 1, 2}
    grid = read_grid(layout.grid())
    assert set(grid) == set(GRID_KEYS)
    assert len(grid["corners"]) == summary["patches"] > 0


def test_groupwise_atlas_of_boxes_is_their_mean_shape(tmp_path):
    """Boxes 8..16 voxels deep, all else equal: the unbiased mean shape is 12 deep, whichever box starts it."""
    layout = _stage_inputs(tmp_path, {"a": 8, "b": 10, "c": 12, "d": 14, "e": 16}, failed=set())
    summary = _run(layout, ["e", "a", "d", "b", "c"], rounds=2)
    assert summary["method"] == "groupwise" and summary["start_sid"] == "c"
    array = sitk.GetArrayFromImage(sitk.ReadImage(str(layout.atlas_mask())))
    depth = np.flatnonzero(array.any(axis=(1, 2)))
    assert abs(depth.size - 12) <= 1, depth.size
    right, left = np.argwhere(array == 1), np.argwhere(array == 2)
    assert right[:, 2].max() < left[:, 2].min()  # right lung (label 1) at low x, as in every subject


def test_stage_without_ok_sample_subjects_stops(tmp_path):
    layout = _stage_inputs(tmp_path, {"a": 8, "b": 8}, failed={"a"})
    with pytest.raises(CopdsslError, match="none of the 1 sample subjects"):
        _run(layout, ["a"])
    assert not layout.grid().exists()


def test_cli_draws_the_sample_from_the_subjects_table(tmp_path):
    from pipeline.cli import main
    from pipeline.template import atlas_sample

    layout = _stage_inputs(tmp_path, {"a": 8, "b": 10, "c": 12}, failed=set())
    command = ["atlas", "--subjects", str(layout.subjects()), "--work", str(layout.work),
               "--out-atlas", str(layout.atlas_mask()), "--out-grid", str(layout.grid()),
               "--log", str(tmp_path / "atlas.log"),
               "--settings", json.dumps({"patch_size": 6, "step": 5, "build_subjects": 2, "rounds": 1,
                                         "method": "median_volume"})]
    # JSON atlas settings never meet the register section of a config file: both come as JSON
    assert main(command) == 1 and not layout.grid().exists()
    assert "atlas: --settings needs --register-settings" in (tmp_path / "atlas.log").read_text()
    code = main([*command, "--register-settings", json.dumps({"iterations": 100})])
    assert code == 0
    sample = atlas_sample(["a", "b", "c"], 2)
    assert f"median_volume of {len(sample)} sample subjects" in (tmp_path / "atlas.log").read_text()
    grid = read_grid(layout.grid())
    assert int(grid["patch_size"]) == 6 and int(grid["step"]) == 5


def test_a_reference_atlas_is_copied_and_must_match_the_grid_settings(tmp_path):
    from pipeline.errors import ConfigError

    layout = _stage_inputs(tmp_path, {"a": 8, "b": 12}, failed=set())
    _run(layout, ["a", "b"], rounds=1)
    bundle = tmp_path / "bundle" / "atlas"
    bundle.mkdir(parents=True)
    for path in (layout.atlas_mask(), layout.grid()):
        (bundle / path.name).write_bytes(path.read_bytes())
    other = _stage_inputs(tmp_path / "other", {"z": 20}, failed=set())
    summary = run_atlas(sids=[], work=other.work, out_atlas=other.atlas_mask(), out_grid=other.grid(),
                        **_settings(reference=str(tmp_path / "bundle")))
    assert summary["method"] == "reference"
    assert other.grid().read_bytes() == layout.grid().read_bytes()
    assert other.atlas_mask().read_bytes() == layout.atlas_mask().read_bytes()
    with pytest.raises(ConfigError, match=r"atlas.patch_size': 6 differs from the reference grid .*\(patch_size 4\)"):
        run_atlas(sids=[], work=other.work, out_atlas=other.atlas_mask(), out_grid=other.grid(),
                  **_settings(patch_size=6, reference=str(bundle)))
    with pytest.raises(ConfigError, match="holds no atlas_lung.nii.gz and grid.npz"):
        run_atlas(sids=[], work=other.work, out_atlas=other.atlas_mask(), out_grid=other.grid(),
                  **_settings(reference=str(tmp_path)))


def test_bad_settings_are_config_errors(tmp_path):
    from pipeline.errors import ConfigError

    layout = _stage_inputs(tmp_path, {"a": 8}, failed=set())
    for settings, key in (({"patch_size": 0}, "atlas.patch_size"), ({"method": "mean"}, "atlas.method"),
                          ({"build_subjects": 0}, "atlas.build_subjects"), ({"rounds": 0}, "atlas.rounds")):
        with pytest.raises(ConfigError, match=key):
            _run(layout, ["a"], **settings)
