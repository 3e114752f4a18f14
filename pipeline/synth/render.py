"""Render one synthetic subject: HU volume and true lung labels on its grid.

Pipeline (all in world mm, so the phantom does not depend on the resolution):

1. structures in the body frame: airway tree, vessel tree, paraseptal bullae (:mod:`.trees`);
2. a *shape lattice* (~4 mm) over the whole grid: skin field, tissue values, lung field;
3. a *texture lattice* (~2 mm) over the lung bounding box: parenchymal texture and density,
   the paraseptal bullae field and the centrilobular emphysema field, whose threshold is the
   quantile that makes ``cle`` of the lung volume emphysematous;
4. the output grid slab by slab: lattices upsampled (:func:`.fields.upsample`), anti-aliased
   edges (occupancy = clip(0.5 + signed distance / voxel size)), trees rasterised inside each
   segment's bounding box, CT noise from a kernel-specific noise bank, site calibration,
   clipping to [-1024, 3071] HU and, for some sites, padding outside the reconstruction circle.

Random streams are ``np.random.default_rng([seed, index, stream])``, one per component, so the
output is determined by (seed, sid) and the grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.synth import anatomy as anat
from pipeline.synth.fields import Lattice, factors_for, gaussian_field, noise_bank, upsample
from pipeline.synth.geometry import body_coordinate_axes, body_coordinates, body_to_world
from pipeline.synth.plan import Grid, SubjectPlan
from pipeline.synth.trees import Segments, airway_tree, bullae, vessel_tree, wall_thickness

STREAM_AIRWAYS, STREAM_VESSELS, STREAM_BULLAE, STREAM_TEXTURE, STREAM_NOISE = 1, 2, 3, 4, 5

SHAPE_LATTICE_MM = 4.0
TEXTURE_LATTICE_MM = 2.0
SLAB_SLICES = 24
HU_MIN, HU_MAX = -1024, 3071

TEXTURE_SD_HU = 12.0        # parenchymal texture amplitude
TEXTURE_SIGMA_MM = 3.0      # and its correlation length (Gaussian sigma)
GRAVITY_HU = 25.0           # dependent (posterior) lung is denser by up to this much
CLE_SIGMA_MM = 2.0          # correlation length of the emphysema field: clusters of a few mm
CLE_ZONE_WEIGHT = 0.8       # upper-zone predominance (in standard deviations, apex vs base)
COUCH_HU, COUCH_THICKNESS_MM, COUCH_GAP_MM = 120.0, 6.0, 3.0


@dataclass(frozen=True)
class Structures:
    """A subject's trees and bullae in body-frame mm (independent of the image grid)."""

    airways: Segments
    vessels: Segments
    bulla_centres: np.ndarray   # [M, 3]
    bulla_radii: np.ndarray     # [M]


@dataclass(frozen=True)
class Rendered:
    """A rendered subject: ``hu`` int16 ``[z, y, x]``, ``labels`` uint8 ``[z, y, x]`` (0/1 right/2 left)
    and, when asked for, ``emphysema`` bool ``[z, y, x]`` (voxels at least half emphysematous)."""

    hu: np.ndarray
    labels: np.ndarray
    grid: Grid
    emphysema: np.ndarray | None = None


def subject_rng(plan: SubjectPlan, stream: int) -> np.random.Generator:
    """The generator of one component (``STREAM_*``) of one subject."""
    return np.random.default_rng([plan.seed, plan.index, stream])


def structures(plan: SubjectPlan) -> Structures:
    """Airway and vessel trees and bullae of ``plan`` (deterministic in (seed, sid))."""
    airways = airway_tree(plan.anatomy, subject_rng(plan, STREAM_AIRWAYS))
    vessels = vessel_tree(plan.anatomy, subject_rng(plan, STREAM_VESSELS), airways, plan.awt)
    centres, radii = bullae(plan.anatomy, plan.pse, subject_rng(plan, STREAM_BULLAE))
    return Structures(airways, vessels, centres, radii)


# ---- helpers -------------------------------------------------------------------------------------------

def _smooth(values: np.ndarray, sigma: float) -> np.ndarray:
    from scipy import ndimage

    return ndimage.gaussian_filter(values, sigma, mode="nearest", truncate=2.5)


def _main_component(phi: np.ndarray) -> np.ndarray:
    """``phi`` with every positive lattice point outside its largest 6-connected positive
    component pushed just below zero.

    Linear interpolation of the result is then positive only in cells touching the main
    component, and (interpolation being linear along each axis) every such fine voxel connects
    to it: each lung is a single piece at any resolution.
    """
    from scipy import ndimage

    labels, count = ndimage.label(phi > 0)
    if count <= 1:
        return phi
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    stray = (labels > 0) & (labels != int(np.argmax(sizes)))
    out = phi.copy()
    out[stray] = -1e-3
    return out


def _voxel_size(grid: Grid) -> float:
    """Edge width (mm) used for anti-aliasing: the geometric mean voxel size."""
    return float(np.prod(grid.spacing_zyx) ** (1.0 / 3.0))


def _index_boxes(grid: Grid, lo_world: np.ndarray, hi_world: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Voxel index boxes ``[N, 3]`` (z, y, x; half-open) covering world boxes (x, y, z), clipped."""
    origin = np.asarray(grid.origin_lps)
    spacing = np.asarray(grid.spacing_zyx[::-1])
    shape = np.asarray(grid.shape_zyx[::-1])
    lo = np.clip(np.floor((lo_world - origin) / spacing).astype(int), 0, shape)
    hi = np.clip(np.ceil((hi_world - origin) / spacing).astype(int) + 1, 0, shape)
    return lo[:, ::-1], hi[:, ::-1]


@dataclass(frozen=True)
class _Capsules:
    """World-space capsules to paint with one HU value (radius in mm)."""

    start: np.ndarray
    end: np.ndarray
    radius: np.ndarray
    value: float
    box_lo: np.ndarray
    box_hi: np.ndarray


def _capsules(grid: Grid, plan: SubjectPlan, seg: Segments, radius: np.ndarray, value: float, h: float) -> _Capsules:
    start = body_to_world(plan.pose, seg.start)
    end = body_to_world(plan.pose, seg.end)
    r = radius * plan.pose.scale
    reach = (r + h)[:, None]
    lo, hi = _index_boxes(grid, np.minimum(start, end) - reach, np.maximum(start, end) + reach)
    return _Capsules(start, end, r, value, lo, hi)


SMALL_BOX = 8   # capsules whose voxel box fits in SMALL_BOX^3 are rasterised in one vectorised batch


def _capsule_occupancy(px, py, pz, ab, radius, inv_h):
    """Anti-aliased occupancy of capsules from their start along ``ab`` ([..., 3]); ``px, py, pz`` are
    coordinates relative to the start (broadcastable)."""
    length2 = np.maximum((ab * ab).sum(-1), 1e-12)
    dot = (px * ab[..., 0] + py * ab[..., 1]) + pz * ab[..., 2]
    t = np.clip(dot / length2, 0.0, 1.0)
    d2 = (px * px + py * py) + pz * pz - t * (2.0 * dot - t * length2)
    return np.clip(0.5 + (radius - np.sqrt(np.maximum(d2, 0.0))) * inv_h, 0.0, 1.0)


def _paint_capsules(block: np.ndarray, z0: int, caps: _Capsules, axes: tuple[np.ndarray, ...], h: float) -> None:
    """Blend capsules of one value into ``block`` (output rows ``z0 ...``).

    The coverage of a voxel is the largest occupancy of any capsule (order-independent), and the
    block is blended once: ``v += coverage * (value - v)``. ``axes`` are the world coordinates
    (float32) of the grid's x, y and z voxel centres.
    """
    nzs, ny, nx = block.shape
    z1 = z0 + nzs
    wx, wy, wz = axes
    lo = caps.box_lo.copy()
    hi = caps.box_hi.copy()
    lo[:, 0] = np.maximum(lo[:, 0], z0)
    hi[:, 0] = np.minimum(hi[:, 0], z1)
    hits = np.nonzero((hi > lo).all(axis=1))[0]
    if len(hits) == 0:
        return
    coverage = np.zeros(block.shape, dtype=np.float32)
    inv_h = np.float32(1.0 / h)
    small = (hi[hits] - lo[hits] <= SMALL_BOX).all(axis=1)
    for s in hits[~small]:
        (k0, j0, i0), (k1, j1, i1) = lo[s].tolist(), hi[s].tolist()
        a = caps.start[s]
        occ = _capsule_occupancy((wx[i0:i1] - a[0])[None, None, :], (wy[j0:j1] - a[1])[None, :, None],
                                 (wz[k0:k1] - a[2])[:, None, None], caps.end[s] - a, caps.radius[s], inv_h)
        target = coverage[k0 - z0:k1 - z0, j0:j1, i0:i1]
        np.maximum(target, occ, out=target)
    batch = hits[small]
    if len(batch):
        steps = np.arange(SMALL_BOX)
        iz, iy, ix = (lo[batch, c][:, None] + steps[None, :] for c in range(3))          # [N, B] each
        valid = ((iz < hi[batch, 0:1])[:, :, None, None] & (iy < hi[batch, 1:2])[:, None, :, None]
                 & (ix < hi[batch, 2:3])[:, None, None, :])
        iz, iy, ix = np.minimum(iz, z1 - 1), np.minimum(iy, ny - 1), np.minimum(ix, nx - 1)
        a = caps.start[batch].astype(np.float32)
        ab = (caps.end[batch] - caps.start[batch]).astype(np.float32)[:, None, None, None, :]
        occ = _capsule_occupancy((wx[ix] - a[:, 0:1])[:, None, None, :], (wy[iy] - a[:, 1:2])[:, None, :, None],
                                 (wz[iz] - a[:, 2:3])[:, :, None, None], ab,
                                 caps.radius[batch].astype(np.float32)[:, None, None, None], inv_h)
        flat = ((iz - z0)[:, :, None, None] * ny + iy[:, None, :, None]) * nx + ix[:, None, None, :]
        keep = valid & (occ > 0)
        np.maximum.at(coverage.reshape(-1), flat[keep], occ[keep])
    block += coverage * (caps.value - block)


# ---- rendering --------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Lungs:
    lattice: Lattice          # texture lattice over the lung box
    lo: tuple[int, int, int]  # lung box in output voxels (half-open)
    hi: tuple[int, int, int]
    parenchyma: np.ndarray    # HU on the texture lattice
    emphysema: np.ndarray     # signed distance-like (mm) on the texture lattice


def _lung_box(psi: np.ndarray, lattice: Lattice, grid: Grid) -> tuple[tuple, tuple] | None:
    inside = np.nonzero(psi > -2.0 * max(s * f for s, f in zip(grid.spacing_zyx, lattice.factor)))
    if len(inside[0]) == 0:
        return None
    lo = tuple(max(0, st + f * (int(ix.min()) - 1)) for st, f, ix in zip(lattice.start, lattice.factor, inside))
    hi = tuple(min(n, st + f * (int(ix.max()) + 1) + 1)
               for st, f, ix, n in zip(lattice.start, lattice.factor, inside, grid.shape_zyx))
    return lo, hi


def _emphysema_fields(plan: SubjectPlan, grid: Grid, shape_lat: Lattice, psi: np.ndarray,
                      parts: Structures) -> _Lungs | None:
    """Parenchymal density and the emphysema field on the texture lattice of the lung box."""
    box = _lung_box(psi, shape_lat, grid)
    if box is None:
        return None
    lo, hi = box
    lat = Lattice.covering(lo, hi, factors_for(grid.spacing_zyx, TEXTURE_LATTICE_MM))
    tgrid = lat.grid(grid)
    ux, uy, uz = body_coordinates(tgrid, plan.pose)
    lung = upsample(psi, shape_lat, lat) > 0
    scale = plan.pose.scale
    lm = anat.landmarks(plan.anatomy)
    # paraseptal bullae: signed distance to the union of spheres (world mm)
    bullae_field = np.full(lat.shape, -1e3, dtype=np.float32)
    if len(parts.bulla_radii):
        centres_w = body_to_world(plan.pose, parts.bulla_centres)
        radii_w = parts.bulla_radii * scale
        blo, bhi = _index_boxes(tgrid, centres_w - radii_w[:, None], centres_w + radii_w[:, None])
        for c, r, l, u in zip(parts.bulla_centres, radii_w, blo, bhi):
            if np.any(u <= l):
                continue
            sl = tuple(slice(a, b) for a, b in zip(l, u))
            d = np.sqrt((ux[sl] - c[0]) ** 2 + (uy[sl] - c[1]) ** 2 + (uz[sl] - c[2]) ** 2) * scale
            np.maximum(bullae_field[sl], r - d, out=bullae_field[sl])
    rng = subject_rng(plan, STREAM_TEXTURE)
    tspacing = np.asarray(tgrid.spacing_zyx)
    texture = gaussian_field(lat.shape, tuple(TEXTURE_SIGMA_MM / tspacing), rng)
    parenchyma = (anat.PARENCHYMA_HU + plan.density_shift_hu + TEXTURE_SD_HU * texture
                  + GRAVITY_HU * np.clip(uy / lm.inner_b, -1.0, 1.0))
    # centrilobular emphysema: the top `cle` fraction of a correlated field tilted to the apex
    score = gaussian_field(lat.shape, tuple(CLE_SIGMA_MM / tspacing), rng)
    score += CLE_ZONE_WEIGHT * np.clip(uz / (plan.anatomy.lung_height / 2.0), -1.0, 1.0)
    available = lung & (bullae_field <= 0)
    target = int(round(plan.cle * int(lung.sum())))
    n_available = int(available.sum())
    if target > 0 and n_available > 0:
        values = score[available]
        target = min(target, n_available)
        threshold = np.partition(values, n_available - target)[n_available - target]
        cle_field = (score - threshold) * (0.7 * CLE_SIGMA_MM * scale)
    else:
        cle_field = np.full(lat.shape, -1e3, dtype=np.float32)
    emphysema = np.maximum(cle_field, bullae_field).astype(np.float32)
    return _Lungs(lat, lo, hi, parenchyma.astype(np.float32), emphysema)


def render_subject(plan: SubjectPlan, grid: Grid | None = None, slab: int = SLAB_SLICES,
                   with_emphysema: bool = False) -> Rendered:
    """Render ``plan`` on ``grid`` (default: the subject's own grid).

    Args:
        plan: the subject.
        grid: any axis-aligned LPS grid (e.g. a small high-resolution box around an airway).
        slab: output slices processed at a time (memory vs. overhead; not part of the result).
        with_emphysema: also return the true emphysema mask (for validation).

    Returns:
        :class:`Rendered` with int16 HU and uint8 labels, both ``[z, y, x]`` on ``grid``.
    """
    if slab < 1:
        raise ValueError(f"slab must be >= 1, got {slab}")
    try:
        from threadpoolctl import threadpool_limits   # installed with scikit-learn
    except ImportError:  # pragma: no cover
        return _render(plan, grid or plan.grid, slab, with_emphysema)
    # the matrix products here are small: BLAS threads would only contend with each other
    with threadpool_limits(limits=1, user_api="blas"):
        return _render(plan, grid or plan.grid, slab, with_emphysema)


@dataclass(frozen=True)
class _Shape:
    """Fields on the shape lattice (world mm / HU) and the couch height."""

    lattice: Lattice
    body: np.ndarray          # signed distance to the skin
    tissue: np.ndarray        # HU of non-lung tissue
    lung: np.ndarray          # signed distance to the nearer lung (each lung one component)
    couch_top: float | None   # world y of the couch surface


def _shape_fields(plan: SubjectPlan, grid: Grid) -> _Shape:
    an, scale = plan.anatomy, plan.pose.scale
    lattice = Lattice.covering((0, 0, 0), grid.shape_zyx, factors_for(grid.spacing_zyx, SHAPE_LATTICE_MM))
    sgrid = lattice.grid(grid)
    ux, uy, uz = body_coordinates(sgrid, plan.pose)
    body = anat.body_field(ux, uy, uz, an)
    # smoothed: the piecewise-constant tissue map would upsample to stair-stepped edges
    tissue = _smooth(anat.tissue_values(ux, uy, uz, an, body), 0.6)
    right, left = anat.lung_fields(ux, uy, uz, an)
    lung = (np.maximum(_main_component(right), _main_component(left)) * scale).astype(np.float32)
    body = (body * scale).astype(np.float32)
    couch_top = None
    rows = np.nonzero((body > 0).any(axis=(0, 2)))[0]
    if len(rows):  # a plate under the lowest (most posterior) point of the body
        couch_top = float(sgrid.origin_lps[1] + sgrid.spacing_zyx[1] * (rows.max() + 1)) + COUCH_GAP_MM
    return _Shape(lattice, body, tissue, lung, couch_top)


@dataclass(frozen=True)
class _Scanner:
    """Per-slice noise windows, reconstruction circle and couch rows of one acquisition."""

    bank: np.ndarray                 # [B, ny + pad, nx + pad] unit noise
    pick: np.ndarray                 # [nz] bank slice of each output slice
    off_y: np.ndarray                # [nz] window offsets
    off_x: np.ndarray
    outside_fov: np.ndarray | None   # [ny, nx] bool, padded sites only
    couch_rows: np.ndarray           # [R] output rows crossed by the couch
    couch_occ: np.ndarray            # [1, R, 1] their occupancy


def _scanner(plan: SubjectPlan, grid: Grid, couch_top: float | None) -> _Scanner:
    nz, ny, nx = grid.shape_zyx
    sz, sy, sx = grid.spacing_zyx
    rng = subject_rng(plan, STREAM_NOISE)
    bank = noise_bank(plan.kernel, (ny, nx), rng)
    pick = rng.integers(0, bank.shape[0], nz)
    off_y = rng.integers(0, bank.shape[1] - ny + 1, nz)
    off_x = rng.integers(0, bank.shape[2] - nx + 1, nz)
    outside = None
    if plan.padding_hu is not None:
        gy = (np.arange(ny) - (ny - 1) / 2.0) * sy
        gx = (np.arange(nx) - (nx - 1) / 2.0) * sx
        outside = (gy[:, None] ** 2 + gx[None, :] ** 2) > (0.5 * min(ny * sy, nx * sx)) ** 2
    rows, occ = np.zeros(0, dtype=int), np.zeros((1, 0, 1), dtype=np.float32)
    if couch_top is not None:
        yw = grid.origin_lps[1] + sy * np.arange(ny)
        overlap = (np.minimum(yw + sy / 2, couch_top + COUCH_THICKNESS_MM) - np.maximum(yw - sy / 2, couch_top)) / sy
        rows = np.nonzero(overlap > 0)[0]
        occ = np.clip(overlap[rows], 0.0, 1.0).astype(np.float32)[None, :, None]
    return _Scanner(bank, pick, off_y, off_x, outside, rows, occ)


def _render(plan: SubjectPlan, grid: Grid, slab: int, with_emphysema: bool) -> Rendered:
    an = plan.anatomy
    lm = anat.landmarks(an)
    nz, ny, nx = grid.shape_zyx
    h = _voxel_size(grid)
    parts = structures(plan)
    shape = _shape_fields(plan, grid)
    lungs = _emphysema_fields(plan, grid, shape.lattice, shape.lung, parts)
    scanner = _scanner(plan, grid, shape.couch_top)
    wall = parts.airways.radius + wall_thickness(parts.airways.radius, plan.awt)
    paint = [  # painted in this order: vessels, airway walls, airway lumens
        _capsules(grid, plan, parts.vessels, parts.vessels.radius, anat.BLOOD_HU, h),
        _capsules(grid, plan, parts.airways, wall, anat.AIRWAY_WALL_HU, h),
        _capsules(grid, plan, parts.airways, parts.airways.radius, anat.AIR_HU, h),
    ]
    weights, offset = body_coordinate_axes(grid, plan.pose, dtype=np.float64)
    world_axes = tuple((o + s * np.arange(n)).astype(np.float32)
                       for o, s, n in zip(grid.origin_lps, grid.spacing_zyx[::-1], grid.shape_zyx[::-1]))

    hu = np.empty(grid.shape_zyx, dtype=np.int16)
    labels = np.zeros(grid.shape_zyx, dtype=np.uint8)
    emphysema = np.zeros(grid.shape_zyx, dtype=bool) if with_emphysema else None
    for z0 in range(0, nz, slab):
        z1 = min(nz, z0 + slab)
        # body: air outside, tissue inside, anti-aliased skin; the couch under it
        dst = Lattice((z0, 0, 0), (1, 1, 1), (z1 - z0, ny, nx))
        occ = np.clip(0.5 + upsample(shape.body, shape.lattice, dst) / h, 0.0, 1.0)
        v = upsample(shape.tissue, shape.lattice, dst)
        v -= anat.AIR_HU
        v *= occ
        v += anat.AIR_HU
        if len(scanner.couch_rows):
            rows = v[:, scanner.couch_rows, :]
            v[:, scanner.couch_rows, :] = rows + scanner.couch_occ * (COUCH_HU - rows)
        # lungs (in their bounding box): parenchyma with emphysema, labels
        if lungs is not None and lungs.lo[0] < z1 and lungs.hi[0] > z0:
            zl0, zl1 = max(z0, lungs.lo[0]), min(z1, lungs.hi[0])
            (_, y0, x0), (_, y1, x1) = lungs.lo, lungs.hi
            sub = Lattice((zl0, y0, x0), (1, 1, 1), (zl1 - zl0, y1 - y0, x1 - x0))
            # body x relative to the midline decides the side and keeps the lungs apart voxel-exactly
            k = np.arange(zl0, zl1, dtype=np.float64)[:, None, None]
            j = np.arange(y0, y1, dtype=np.float64)[None, :, None]
            i = np.arange(x0, x1, dtype=np.float64)[None, None, :]
            bx = ((offset[0] - lm.x_mid + weights[0, 1] * j + weights[0, 0] * i).astype(np.float32)
                  + (weights[0, 2] * k).astype(np.float32))
            phi = np.minimum(upsample(shape.lung, shape.lattice, sub),
                             (np.abs(bx) - an.anterior_gap / 2.0) * plan.pose.scale)
            labels[zl0:zl1, y0:y1, x0:x1] = np.where(phi > 0, np.where(bx < 0, anat.RIGHT, anat.LEFT), 0)
            value = upsample(lungs.parenchyma, lungs.lattice, sub)
            emph = np.clip(0.5 + upsample(lungs.emphysema, lungs.lattice, sub) / h, 0.0, 1.0)
            if emphysema is not None:
                emphysema[zl0:zl1, y0:y1, x0:x1] = (emph >= 0.5) & (phi > 0)
            value += emph * (anat.EMPHYSEMA_HU - value)
            target = v[zl0 - z0:zl1 - z0, y0:y1, x0:x1]
            target += np.clip(0.5 + phi / h, 0.0, 1.0) * (value - target)
        # trees, then the scanner: noise, calibration, value range, reconstruction circle
        for caps in paint:
            _paint_capsules(v, z0, caps, world_axes, h)
        for kk in range(z0, z1):
            oy, ox = scanner.off_y[kk], scanner.off_x[kk]
            v[kk - z0] += plan.noise_hu * scanner.bank[scanner.pick[kk], oy:oy + ny, ox:ox + nx]
        v += plan.calibration_hu
        np.clip(v, HU_MIN, HU_MAX, out=v)
        if scanner.outside_fov is not None:
            v[:, scanner.outside_fov] = plan.padding_hu
        np.rint(v, out=v)
        hu[z0:z1] = v
    return Rendered(hu=hu, labels=labels, grid=grid, emphysema=emphysema)


def lung_volume_litres(rendered: Rendered) -> dict[str, float]:
    """Volumes (litres) of the right and left lung labels."""
    voxel = math.prod(rendered.grid.spacing_zyx) / 1e6
    counts = np.bincount(rendered.labels.ravel(), minlength=3)
    return {"right": counts[1] * voxel, "left": counts[2] * voxel}
