"""Airway and vessel trees and paraseptal bullae, in body-frame mm (numpy only).

Trees grow generation by generation, vectorised over all tips: every tip proposes two children
(a major and a minor branch, rotated to opposite sides in a random plane), and a child is kept
when its end lies inside the same lung, clear of the pleura by its own radius. Rejected
children are proposed again (new plane and angles) a few times, then dropped. Growth stops
below a minimum radius. Everything is drawn from the generator passed in, so a tree is
determined by (seed, sid) and does not depend on the image grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.synth.anatomy import LEFT, RIGHT, landmarks, lung_fields
from pipeline.synth.plan import Anatomy

#: Airway wall thickness (mm) of a lumen of radius r: ``awt * sqrt(r / AWT_REFERENCE_RADIUS)``.
AWT_REFERENCE_RADIUS = 2.0
AIRWAY_MIN_RADIUS = 0.9
VESSEL_MIN_RADIUS = 0.6


@dataclass(frozen=True)
class Segments:
    """Tree segments (capsules) in body-frame mm.

    Attributes:
        start, end: ``[N, 3]`` end points (x, y, z).
        radius: ``[N]`` lumen radius (airways) or vessel radius.
        generation: ``[N]`` 0 for the trunk (trachea, vessel roots), increasing distally.
        side: ``[N]`` 0 mediastinal, 1 right lung, 2 left lung.
    """

    start: np.ndarray
    end: np.ndarray
    radius: np.ndarray
    generation: np.ndarray
    side: np.ndarray

    def __len__(self) -> int:
        return len(self.radius)

    @staticmethod
    def concat(parts: list["Segments"]) -> "Segments":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Segments(np.zeros((0, 3)), np.zeros((0, 3)), np.zeros(0), np.zeros(0, int), np.zeros(0, int))
        return Segments(*(np.concatenate([getattr(p, f) for p in parts]) for f in
                          ("start", "end", "radius", "generation", "side")))


def wall_thickness(radius: np.ndarray, awt: float) -> np.ndarray:
    """Airway wall thickness (mm) for lumen radii ``radius`` (mm) of a subject with ``awt``."""
    return awt * np.sqrt(np.asarray(radius) / AWT_REFERENCE_RADIUS)


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _random_perpendicular(direction: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random unit vectors ``[N, 3]`` perpendicular to ``direction`` ``[N, 3]``."""
    v = rng.standard_normal(direction.shape)
    v -= (v * direction).sum(-1, keepdims=True) * direction
    bad = np.linalg.norm(v, axis=-1) < 1e-6
    if bad.any():
        v[bad] = np.cross(direction[bad], [0.0, 0.0, 1.0]) + np.cross(direction[bad], [1.0, 0.0, 0.0])
    return _unit(v)


def _side_field(points: np.ndarray, side: np.ndarray, an: Anatomy) -> np.ndarray:
    """Signed distance (mm) of points ``[N, 3]`` to the lung named by ``side`` ``[N]``."""
    right, left = lung_fields(points[:, 0], points[:, 1], points[:, 2], an)
    return np.where(side == RIGHT, right, left)


def grow(an: Anatomy, rng: np.random.Generator, start: np.ndarray, direction: np.ndarray, radius: np.ndarray,
         side: np.ndarray, min_radius: float, length_ratio: tuple[float, float] = (5.0, 9.0),
         max_generations: int = 14, attempts: int = 6, first_generation: int = 1,
         ratios: tuple[tuple[float, float], tuple[float, float]] = ((0.80, 0.90), (0.66, 0.80))) -> Segments:
    """Grow bifurcating trees inside the lungs from the given tips.

    Args:
        start: ``[T, 3]`` tip positions; direction: ``[T, 3]`` parent directions;
        radius: ``[T]`` parent radii; side: ``[T]`` lung (1 right, 2 left) each tip grows into.
        min_radius: children thinner than this are not grown.
        length_ratio: branch length / radius is uniform in this range.
        ratios: ranges of the child / parent radius ratio of the major and the minor child.
        first_generation: generation number of the first children (their midpoints may lie
            outside the lung: they may start in the hilum).

    Returns:
        The grown segments (the tips themselves are not included).
    """
    pos, dirs, rad, sides = (np.asarray(a, dtype=float) for a in (start, direction, radius, side))
    dirs = _unit(np.atleast_2d(dirs))
    sides = sides.astype(int)
    out = []
    for generation in range(first_generation, first_generation + max_generations):
        if len(rad) == 0:
            break
        n = len(rad)
        # two children per tip: major (thicker, smaller angle) and minor
        p_pos = np.repeat(pos, 2, axis=0)
        p_dir = np.repeat(dirs, 2, axis=0)
        p_side = np.repeat(sides, 2)
        major = np.tile([True, False], n)
        ratio = np.where(major, rng.uniform(*ratios[0], 2 * n), rng.uniform(*ratios[1], 2 * n))
        c_rad = np.repeat(rad, 2) * ratio
        keep = c_rad >= min_radius
        p_pos, p_dir, p_side, major, c_rad = p_pos[keep], p_dir[keep], p_side[keep], major[keep], c_rad[keep]
        m = len(c_rad)
        if m == 0:
            break
        ends = np.full((m, 3), np.nan)
        c_dir = np.zeros((m, 3))
        pending = np.arange(m)
        normal = _random_perpendicular(p_dir, rng)
        for attempt in range(attempts + 1):
            if len(pending) == 0:
                break
            k = len(pending)
            if attempt > 0:  # new plane for the retries
                normal[pending] = _random_perpendicular(p_dir[pending], rng)
            angle = np.where(major[pending], rng.uniform(15.0, 35.0, k), -rng.uniform(35.0, 65.0, k))
            angle = np.radians(angle)
            d, nrm = p_dir[pending], normal[pending]
            new_dir = d * np.cos(angle)[:, None] + np.cross(nrm, d) * np.sin(angle)[:, None]
            length = c_rad[pending] * rng.uniform(*length_ratio, k)
            if attempt == attempts:
                length *= 0.5  # last try: a short branch
            length = np.maximum(length, 2.0)
            end = p_pos[pending] + new_dir * length[:, None]
            mid = p_pos[pending] + new_dir * (0.5 * length)[:, None]
            both = _side_field(np.concatenate([end, mid]), np.concatenate([p_side[pending]] * 2), an)
            ok = both[:k] > c_rad[pending] + 1.0
            ok &= (both[k:] > 0.0) | (generation == first_generation)
            ends[pending[ok]] = end[ok]
            c_dir[pending[ok]] = new_dir[ok]
            pending = pending[~ok]
        grown = ~np.isnan(ends[:, 0])
        out.append(Segments(p_pos[grown], ends[grown], c_rad[grown], np.full(grown.sum(), generation),
                            p_side[grown]))
        pos, dirs, rad, sides = ends[grown], c_dir[grown], c_rad[grown], p_side[grown]
    return Segments.concat(out)


def _direction(lateral: float, posterior: float, down_deg: float, sign: float) -> np.ndarray:
    """Unit vector pointing ``down_deg`` from straight down, towards the side ``sign``."""
    a = math.radians(down_deg)
    v = np.array([sign * math.sin(a) * lateral, posterior, -math.cos(a)])
    return v / np.linalg.norm(v)


def airway_tree(an: Anatomy, rng: np.random.Generator) -> Segments:
    """Trachea (from above the scanned range to the carina), main bronchi and the bronchial trees.

    Right main bronchus: steeper (35 degrees from vertical) and shorter (26 mm); left: 50
    degrees, 46 mm. Radii: trachea ``trachea_radius``, main bronchi 0.72 / 0.66 of it.
    """
    lm = landmarks(an)
    r_tr = an.trachea_radius
    carina = np.array([lm.x_mid, lm.y_trachea, lm.z_carina])
    trachea = Segments(np.array([[lm.x_mid, lm.y_trachea, lm.top]]), carina[None], np.array([r_tr]),
                       np.array([0]), np.array([0]))
    main_tips, tips, dirs, radii, sides, lobar = [], [], [], [], [], []
    for side, sign, angle, length, ratio in ((RIGHT, -1.0, 35.0, 26.0, 0.72), (LEFT, 1.0, 50.0, 46.0, 0.66)):
        d = _direction(1.0, 0.08, angle, sign)
        tip = carina + d * length
        main_tips.append(tip)
        r_main = r_tr * ratio
        # lobar bronchi: one to the upper lobe (up and out), one continuing down
        for lobe_dir, lobe_len, lobe_ratio in ((_direction(1.0, -0.1, 130.0, sign), 16.0, 0.72),
                                               (_direction(0.6, 0.1, 20.0, sign), 20.0, 0.82)):
            end = tip + lobe_dir * lobe_len
            lobar.append((tip, end, r_main * lobe_ratio, side))
            tips.append(end)
            dirs.append(lobe_dir)
            radii.append(r_main * lobe_ratio)
            sides.append(side)
    main = Segments(np.stack([carina, carina]), np.stack(main_tips), np.array([r_tr * 0.72, r_tr * 0.66]),
                    np.array([0, 0]), np.array([0, 0]))
    lobes = Segments(np.stack([l[0] for l in lobar]), np.stack([l[1] for l in lobar]), np.array([l[2] for l in lobar]),
                     np.ones(len(lobar), int), np.array([l[3] for l in lobar]))
    tree = grow(an, rng, np.stack(tips), np.stack(dirs), np.array(radii), np.array(sides),
                min_radius=AIRWAY_MIN_RADIUS, length_ratio=(5.0, 8.0), first_generation=2)
    return Segments.concat([trachea, main, lobes, tree])


def vessel_tree(an: Anatomy, rng: np.random.Generator, airways: Segments, awt: float = 1.0) -> Segments:
    """Pulmonary arteries (beside every intrapulmonary bronchus, as in the bronchovascular
    bundle, 0.5 mm outside the airway wall of thickness set by ``awt``, plus trunks from the
    heart to each hilum) and pulmonary veins (trees grown from the left atrium, behind the
    heart, into the upper, middle and lower lung)."""
    lm = landmarks(an)
    parts = []
    # arteries: the airway segments shifted sideways, radius ~ the lumen radius
    intra = airways.side > 0
    start, end, radius = airways.start[intra], airways.end[intra], airways.radius[intra]
    if len(radius):
        axis = _unit(end - start)
        ref = np.where(np.abs(axis[:, 2:3]) > 0.9, np.array([[1.0, 0.0, 0.0]]), np.array([[0.0, 0.0, 1.0]]))
        offset_dir = _unit(np.cross(axis, ref))
        a_rad = radius * rng.uniform(0.85, 1.05, len(radius))
        gap = radius + wall_thickness(radius, awt) + a_rad + 0.5
        shift = offset_dir * gap[:, None]
        parts.append(Segments(start + shift, end + shift, a_rad, airways.generation[intra], airways.side[intra]))
    # arterial trunks: heart top to both hila (in front of the main bronchi)
    hx, hy, hz = lm.heart_centre
    trunk = np.array([hx - 8.0, hy - 10.0, hz + 0.8 * lm.heart_radii[2]])
    hilum_tips = airways.end[(airways.generation == 0) & (airways.side == 0)][1:3]
    for tip in hilum_tips:
        parts.append(Segments(trunk[None], (tip + np.array([0.0, -14.0, 4.0]))[None], np.array([8.0]),
                              np.array([0]), np.array([0])))
    # veins: roots at the back of the heart, three per side (upper, middle, lower), grown into the lungs
    roots, dirs, radii, sides = [], [], [], []
    for side, sign in ((RIGHT, -1.0), (LEFT, 1.0)):
        for dz, down in ((0.45, 140.0), (0.25, 80.0), (-0.15, 40.0)):
            root = np.array([hx + sign * 0.7 * lm.heart_radii[0] - (hx - lm.x_mid) * 0.5,
                             hy + 0.6 * lm.heart_radii[1], hz + dz * lm.heart_radii[2]])
            roots.append(root)
            dirs.append(_direction(1.0, 0.15, down, sign))
            radii.append(5.5)
            sides.append(side)
    roots, dirs = np.stack(roots), np.stack(dirs)
    first_end = roots + dirs * 25.0
    parts.append(Segments(roots, first_end, np.array(radii), np.zeros(len(radii), int), np.zeros(len(radii), int)))
    parts.append(grow(an, rng, first_end, dirs, np.array(radii), np.array(sides), min_radius=VESSEL_MIN_RADIUS,
                      length_ratio=(5.0, 8.0), max_generations=16, ratios=((0.83, 0.91), (0.71, 0.82))))
    return Segments.concat(parts)


def lung_sample_points(an: Anatomy, rng: np.random.Generator, n: int = 20000) -> tuple[np.ndarray, np.ndarray]:
    """Uniform random points inside the lungs (rejection sampling in the thorax box).

    Returns:
        ``(points [n, 3], signed distance to the lung surface [n])``.
    """
    lm = landmarks(an)
    low = np.array([lm.x_mid - lm.inner_a, -lm.inner_b, lm.z_low])
    high = np.array([lm.x_mid + lm.inner_a, lm.inner_b, lm.z_apex])
    points, depth = [], []
    count = 0
    for _ in range(50):
        p = rng.uniform(low, high, size=(2 * n, 3))
        right, left = lung_fields(p[:, 0], p[:, 1], p[:, 2], an)
        phi = np.maximum(right, left)
        inside = phi > 0
        points.append(p[inside])
        depth.append(phi[inside])
        count += int(inside.sum())
        if count >= n:
            break
    return np.concatenate(points)[:n], np.concatenate(depth)[:n]


def bullae(an: Anatomy, pse: float, rng: np.random.Generator, n_points: int = 10000,
           max_bullae: int = 3000) -> tuple[np.ndarray, np.ndarray]:
    """Paraseptal bullae: spheres touching the pleura, predominantly in the upper zones.

    Bullae (radius 4-12 mm) are centred 25-55 % of their radius inside the lung surface and
    added until they cover the fraction ``pse`` of the lung volume, measured on ``n_points``
    uniform lung points (Monte Carlo; standard error below 0.5 % absolute).

    Returns:
        ``(centres [M, 3], radii [M])`` in body-frame mm.
    """
    if not 0.0 <= pse < 1.0:
        raise ValueError(f"pse must be in [0, 1), got {pse!r}")
    lm = landmarks(an)
    if pse == 0.0:
        return np.zeros((0, 3)), np.zeros(0)
    points, _ = lung_sample_points(an, rng, n_points)
    covered = np.zeros(len(points), dtype=bool)
    centres, radii = [], []
    candidates = np.zeros((0, 3))
    cand_r = np.zeros(0)
    while covered.mean() < pse and len(radii) < max_bullae:
        if len(cand_r) == 0:
            r = rng.uniform(4.0, 12.0, 4000)
            low = [lm.x_mid - lm.inner_a, -lm.inner_b, lm.z_low]
            high = [lm.x_mid + lm.inner_a, lm.inner_b, lm.z_apex]
            p = rng.uniform(low, high, size=(4000, 3))
            right, left = lung_fields(p[:, 0], p[:, 1], p[:, 2], an)
            phi = np.maximum(right, left)
            zone = (p[:, 2] - lm.z_low) / (lm.z_apex - lm.z_low)       # 0 base .. 1 apex
            ok = (phi > 0.25 * r) & (phi < 0.55 * r) & (rng.random(4000) < 0.3 + 0.7 * zone)
            candidates, cand_r = p[ok], r[ok]
            continue
        c, r = candidates[0], cand_r[0]
        candidates, cand_r = candidates[1:], cand_r[1:]
        covered |= ((points - c) ** 2).sum(1) < r * r
        centres.append(c)
        radii.append(r)
    return np.array(centres).reshape(-1, 3), np.array(radii)
