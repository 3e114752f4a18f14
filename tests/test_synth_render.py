"""Rendered volumes: determinism, HU structure, lung geometry, emphysema and airway walls."""

import dataclasses

import numpy as np
import pytest
from scipy import ndimage

from pipeline.synth.anatomy import EMPHYSEMA_HU, PARENCHYMA_HU, lung_fields
from pipeline.synth.geometry import body_to_world
from pipeline.synth.render import render_subject, structures
from pipeline.synth.trees import wall_thickness
from tests.synth_fixtures import box_grid, small_plan


@pytest.fixture(scope="module")
def plan():
    # subject at mean inspiration and calibration, so the parenchyma peak sits at its nominal HU
    return small_plan(1, density_shift_hu=0.0, calibration_hu=0.0)


@pytest.fixture(scope="module")
def rendered(plan):
    return render_subject(plan, with_emphysema=True)


def _world_centroid(mask: np.ndarray, grid) -> np.ndarray:
    """LPS world centroid (x, y, z) of a [z, y, x] mask."""
    k, j, i = (idx.mean() for idx in np.nonzero(mask))
    sz, sy, sx = grid.spacing_zyx
    return np.asarray(grid.origin_lps) + np.array([i * sx, j * sy, k * sz])


def test_same_seed_same_volume_other_seed_other_volume(plan, rendered):
    again = render_subject(plan, with_emphysema=True)
    assert again.hu.dtype == np.int16 and again.labels.dtype == np.uint8
    assert np.array_equal(again.hu, rendered.hu) and np.array_equal(again.labels, rendered.labels)
    assert rendered.hu.shape == plan.grid.shape_zyx
    # slab size is an implementation detail, not part of the result
    assert np.array_equal(render_subject(plan, slab=7).hu, rendered.hu)
    other = render_subject(small_plan(1, seed=8))
    assert other.hu.shape != rendered.hu.shape or np.mean(other.hu != rendered.hu) > 0.3


def test_hu_histogram_has_air_lung_and_soft_tissue_peaks(rendered):
    hu = rendered.hu.astype(float)
    counts, edges = np.histogram(hu, bins=np.arange(-1100, 301, 10))
    centres = (edges[:-1] + edges[1:]) / 2

    def mode(lo, hi):
        sel = (centres >= lo) & (centres < hi)
        return centres[sel][np.argmax(counts[sel])], counts[sel].max()

    air, n_air = mode(-1100, -960)
    lung, n_lung = mode(-960, -600)
    soft, n_soft = mode(-200, 200)
    assert -1030 <= air <= -980
    assert -910 <= lung <= -790              # parenchyma around -860 (vessels and texture around it)
    assert 0 <= soft <= 60
    # they are separate peaks: the valleys between them are much lower
    valley_lung_soft = counts[(centres > -600) & (centres < -250)].max()
    assert valley_lung_soft < 0.25 * min(n_lung, n_soft)
    assert (rendered.hu >= -1024).all() and (rendered.hu <= 3071).all()


def test_lung_volumes_and_fraction_of_the_body_are_plausible(rendered):
    labels, grid = rendered.labels, rendered.grid
    voxel_l = np.prod(grid.spacing_zyx) / 1e6
    right, left = (labels == 1).sum() * voxel_l, (labels == 2).sum() * voxel_l
    # adult inspiratory lung volumes are ~3-8 L; the right lung is the larger (~52-56 %)
    assert 2.5 < right + left < 8.5
    assert 1.0 < right / left < 1.4
    # fraction of the body (skin inwards, lungs included) in the slices that contain lung: a
    # ~30x22 cm chest section holds two ~10x16 cm lungs (~45 % mid-chest, less at apex and base)
    body = ndimage.binary_fill_holes(rendered.hu > -500, structure=np.ones((1, 3, 3))) | (labels > 0)
    rows = (labels > 0).any(axis=(1, 2))
    fraction = (labels[rows] > 0).sum() / body[rows].sum()
    assert 0.2 < fraction < 0.5


def test_right_lung_is_on_the_subjects_right_and_lungs_are_separable(plan, rendered):
    labels, grid = rendered.labels, rendered.grid
    right = _world_centroid(labels == 1, grid)
    left = _world_centroid(labels == 2, grid)
    body_x = _world_centroid(rendered.hu > -500, grid)[0]
    # LPS: +x is the patient's left, so the right lung has the smaller x ...
    assert right[0] < body_x < left[0]
    assert left[0] - right[0] > 80
    # ... and RAS x = -LPS x: the right lung has positive RAS x (the world origin is near the body axis)
    assert -right[0] > 30 and -left[0] < -30
    # the lungs never touch (a lung segmentation can split them)
    grown = ndimage.binary_dilation(labels == 1, structure=ndimage.generate_binary_structure(3, 1))
    assert not (grown & (labels == 2)).any()
    # each lung is one connected piece
    for side in (1, 2):
        assert ndimage.label(labels == side)[1] == 1


def test_emphysema_fractions_are_fractions_of_lung_volume(plan):
    # on the subject's own grid the true emphysema mask covers about cle + pse of the lungs
    for cle, pse in ((0.0, 0.0), (0.2, 0.0), (0.0, 0.1), (0.1, 0.05)):
        out = render_subject(dataclasses.replace(plan, cle=cle, pse=pse), with_emphysema=True)
        lung = out.labels > 0
        assert abs(out.emphysema[lung].mean() - (cle + pse)) < 0.01 + 0.1 * (cle + pse)


def _laa950(plan, grid):
    out = render_subject(plan, grid)
    return (out.hu[out.labels > 0] < -950).mean()


def test_laa950_rises_monotonically_with_cle_and_with_pse(plan):
    # densitometry on a central box at demo resolution (1.8 x 1.8 x 2 mm)
    grid = box_grid(plan.grid.centre_lps, (64, 80, 96), (2.0, 1.8, 1.8))
    base = dataclasses.replace(plan, cle=0.0, pse=0.0)
    cle_sweep = [_laa950(dataclasses.replace(base, cle=c), grid) for c in (0.0, 0.05, 0.15, 0.3)]
    pse_sweep = [_laa950(dataclasses.replace(base, pse=p), grid) for p in (0.0, 0.04, 0.12)]
    assert all(a < b for a, b in zip(cle_sweep, cle_sweep[1:])), cle_sweep
    assert all(a < b for a, b in zip(pse_sweep, pse_sweep[1:])), pse_sweep
    # partial volume and noise make LAA-950 read low, but it tracks the fraction
    assert 0.5 * 0.3 < cle_sweep[-1] - cle_sweep[0] < 1.1 * 0.3
    assert cle_sweep[0] < 0.03
    # emphysema is dark: ~-990 HU inside clusters, well below parenchyma
    assert EMPHYSEMA_HU < -950 < PARENCHYMA_HU


def _measure_wall(plan, segment, spacing=0.35):
    """Median wall thickness (mm) of an airway segment, measured on rays in the rendered image."""
    start = body_to_world(plan.pose, segment[0])
    end = body_to_world(plan.pose, segment[1])
    axis = (end - start) / np.linalg.norm(end - start)
    centre = (start + end) / 2
    grid = box_grid(centre, (72, 72, 72), (spacing,) * 3)
    hu = render_subject(plan, grid).hu.astype(np.float32)
    e1 = np.cross(axis, [0.0, 0.0, 1.0] if abs(axis[2]) < 0.9 else [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(axis, e1)
    rho = np.arange(0.0, 9.0, 0.05)
    thickness = []
    for theta in np.linspace(0, 2 * np.pi, 36, endpoint=False):
        ray = np.cos(theta) * e1 + np.sin(theta) * e2
        points = np.stack([centre + s * axis + r * ray for s in np.linspace(-2.5, 2.5, 7) for r in rho])
        index = ((points - np.asarray(grid.origin_lps)) / np.asarray(grid.spacing_zyx[::-1]))[:, ::-1].T
        profile = ndimage.map_coordinates(hu, index, order=1).reshape(7, len(rho)).mean(axis=0)
        inner = np.argmax(profile > -485)                    # lumen (-1000) to wall (+30): half way
        wall = profile > -415                                # wall (+30) to parenchyma (-860): half way
        first = np.argmax(wall)
        outer = first + np.argmax(~wall[first:])
        if 0 < inner <= first < outer:
            thickness.append(rho[outer] - rho[inner])
    return float(np.median(thickness))


def test_measured_airway_wall_thickness_rises_with_awt(plan):
    tree = structures(plan).airways
    length = np.linalg.norm(tree.end - tree.start, axis=1)
    middle = (tree.start + tree.end) / 2
    depth = np.maximum(*lung_fields(middle[:, 0], middle[:, 1], middle[:, 2], plan.anatomy))
    # a bronchus surrounded by parenchyma (not at the hilum), long enough to sample its middle
    candidates = np.nonzero((tree.side > 0) & (tree.radius > 2.0) & (tree.radius < 3.5) & (length > 12.0)
                            & (depth > 15.0))[0]
    assert len(candidates) > 0
    s = candidates[0]
    segment = (tree.start[s], tree.end[s])
    measured, expected = [], []
    for awt in (0.6, 1.1, 1.7):
        subject = dataclasses.replace(plan, awt=awt, cle=0.0, pse=0.0)
        measured.append(_measure_wall(subject, segment))
        expected.append(float(wall_thickness(tree.radius[s], awt)) * plan.pose.scale)
    assert measured[0] < measured[1] < measured[2], measured
    # within about one voxel (0.35 mm) of the model's thickness
    assert np.allclose(measured, expected, atol=0.4), (measured, expected)


def test_padding_outside_the_reconstruction_circle_for_padded_sites(plan):
    padded = render_subject(dataclasses.replace(plan, padding_hu=-3024))
    corner = padded.hu[:, :3, :3]
    assert (corner == -3024).all()
    assert (padded.hu[:, padded.hu.shape[1] // 2, padded.hu.shape[2] // 2] > -3024).all()
    unpadded = render_subject(dataclasses.replace(plan, padding_hu=None))
    assert unpadded.hu.min() >= -1024
