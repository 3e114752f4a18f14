"""Implicit anatomy of the synthetic chest, in body-frame mm (numpy only).

Every structure is a *signed distance-like field*: positive inside, about the distance in mm
to the surface near it (first-order approximation for ellipses). Functions take body
coordinates ``ux, uy, uz`` (broadcastable arrays of any shape, e.g. ``[z, y, x]`` grids or
``[N]`` point lists) and return arrays of the broadcast shape. The same functions rasterise the
volume and steer the tree growth, so airways and vessels stay inside the lungs they are drawn in.

Body frame: LPS orientation (+x patient Left, +y Posterior, +z Superior), origin on the body
axis at the vertical centre of the lungs. The subject's right lung is at ``x < mediastinum_x``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.synth.plan import Z_MARGIN_MM, Anatomy

# Tissue values (HU) before noise and site calibration.
AIR_HU = -1000.0
FAT_HU = -100.0
MUSCLE_HU = 45.0
MEDIASTINUM_HU = 35.0
MEDIASTINAL_FAT_HU = -70.0
BLOOD_HU = 40.0
LIVER_HU = 58.0
ABDOMEN_HU = 38.0
BONE_HU = 300.0
CORTEX_HU = 650.0
PARENCHYMA_HU = -860.0
EMPHYSEMA_HU = -990.0
AIRWAY_WALL_HU = 30.0

RIGHT, LEFT = 1, 2
BODY_POWER, THORAX_POWER = 2.4, 2.8  # superellipse exponents of the body and thorax sections


@dataclass(frozen=True)
class Landmarks:
    """Derived positions (body-frame mm) shared by the fields and the trees."""

    z_apex: float          # lung apex
    z_low: float           # lowest lung point (posterior costophrenic recess)
    z_base: float          # reference level of the diaphragm domes
    z_carina: float
    inner_a: float         # thorax inner half-width / half-depth at mid-height
    inner_b: float
    x_mid: float           # mediastinal midline
    y_trachea: float
    spine_y: float
    aorta: tuple[tuple[float, float, float], ...]   # ascending top, arch top, descending top, bottom
    heart_centre: tuple[float, float, float]
    heart_radii: tuple[float, float, float]
    top: float             # top of the trachea (above the scanned range)


def landmarks(an: Anatomy) -> Landmarks:
    """Positions derived from the anatomy parameters."""
    half = an.lung_height / 2.0
    inner_a = an.body_half_width - an.fat_mm - an.chest_wall_mm
    inner_b = an.body_half_depth - an.fat_mm - an.chest_wall_mm
    spine_y = inner_b - 0.55 * an.spine_radius
    y_trachea = spine_y - an.spine_radius - 10.0 - an.trachea_radius
    z_low = -half
    z_base = z_low + 0.6 * an.dome_mm + 10.0
    size = inner_a / 125.0   # the heart scales with the thorax
    heart_radii = tuple(r * size for r in an.heart_radii)
    heart_z = z_base + an.dome_mm + 0.3 * heart_radii[2]
    heart_centre = (an.mediastinum_x + an.heart_x, -0.3 * inner_b, heart_z)
    z_carina = half - 0.38 * an.lung_height
    desc = (an.mediastinum_x + an.spine_radius + 6.0, spine_y - 0.3 * an.spine_radius)
    asc = (an.mediastinum_x + 4.0, heart_centre[1] + 0.35 * heart_radii[1])
    arch_z = z_carina + 30.0
    return Landmarks(
        z_apex=half, z_low=z_low, z_base=z_base, z_carina=z_carina,
        inner_a=inner_a, inner_b=inner_b, x_mid=an.mediastinum_x, y_trachea=y_trachea, spine_y=spine_y,
        aorta=((asc[0], asc[1], heart_z), (asc[0], asc[1], arch_z),
               (desc[0] + 6.0, 0.5 * (asc[1] + desc[1]), arch_z + 12.0),
               (desc[0], desc[1], arch_z), (desc[0], desc[1], z_low - 60.0)),
        heart_centre=heart_centre, heart_radii=heart_radii,
        top=half + Z_MARGIN_MM + 40.0,
    )


def ellipse_sdf(dx, dy, a, b):
    """Approximate signed distance (mm, positive inside) to an ellipse with semi-axes ``a, b``.

    First-order estimate ``(1 - q) / |grad q|`` with ``q`` the normalised radius; exact for a
    circle, good near the boundary, which is where it matters.
    """
    return superellipse_sdf(dx, dy, a, b, 2.0)


def superellipse_sdf(dx, dy, a, b, power):
    """Approximate signed distance (mm, positive inside) to the superellipse
    ``|x/a|^p + |y/b|^p = 1`` (``p > 2``: squarer than an ellipse), as ``(1 - q) / |grad q|``."""
    xa = np.abs(dx) / a
    yb = np.abs(dy) / b
    xp = xa ** (power - 1.0)
    yp = yb ** (power - 1.0)
    q = np.maximum((xp * xa + yp * yb) ** (1.0 / power), 1e-6)
    grad = q ** (1.0 - power) * np.sqrt((xp / a) ** 2 + (yp / b) ** 2)
    small = grad < 1e-9
    return np.where(small, np.minimum(a, b), (1.0 - q) / np.where(small, 1.0, grad))


def ellipsoid_sdf(dx, dy, dz, a, b, c):
    """Approximate signed distance (mm, positive inside) to an ellipsoid (see :func:`ellipse_sdf`)."""
    q = np.maximum(np.sqrt((dx / a) ** 2 + (dy / b) ** 2 + (dz / c) ** 2), 1e-6)
    grad = np.sqrt((dx / (a * a)) ** 2 + (dy / (b * b)) ** 2 + (dz / (c * c)) ** 2) / q
    small = grad < 1e-9
    return np.where(small, min(a, b, c), (1.0 - q) / np.where(small, 1.0, grad))


def capsule_sdf(px, py, pz, start, end, radius):
    """Signed distance (mm, positive inside) to the capsule of ``radius`` around segment start-end."""
    sx, sy, sz = start
    bx, by, bz = end[0] - sx, end[1] - sy, end[2] - sz
    length2 = max(bx * bx + by * by + bz * bz, 1e-12)
    ax, ay, az = px - sx, py - sy, pz - sz
    t = np.clip((ax * bx + ay * by + az * bz) * (1.0 / length2), 0.0, 1.0)
    return radius - np.sqrt((ax - t * bx) ** 2 + (ay - t * by) ** 2 + (az - t * bz) ** 2)


def _taper(uz, lm: Landmarks):
    """Body narrowing towards the thoracic inlet (1 below the apex region)."""
    return 1.0 - 0.22 * np.clip((uz - (lm.z_apex - 20.0)) / 80.0, 0.0, 1.0)


def body_field(ux, uy, uz, an: Anatomy):
    """Signed distance (mm) to the skin: an elliptic cylinder narrowing at the thoracic inlet."""
    lm = landmarks(an)
    t = _taper(uz, lm)
    return superellipse_sdf(ux, uy, an.body_half_width * t, an.body_half_depth * t, BODY_POWER)


def mediastinum_half_width(uy, an: Anatomy, lm: Landmarks):
    """Half-width (mm) of the gap between the lungs at depth ``uy``: wide around the trachea and
    great vessels, narrowing to ``anterior_gap / 2`` at the anterior junction line."""
    g = an.anterior_gap / 2.0
    sigma = 0.45 * lm.inner_b
    return g + (an.mediastinum_half_width - g) * np.exp(-(((uy - lm.y_trachea) / sigma) ** 2))


AORTA_RADIUS = 12.0


def _capsule_2d(ux, uy, a, b, radius):
    """Signed distance (positive inside) to a 2-D capsule (a vertical slab through all z)."""
    bx, by = b[0] - a[0], b[1] - a[1]
    ax, ay = ux - a[0], uy - a[1]
    t = np.clip((ax * bx + ay * by) / max(bx * bx + by * by, 1e-12), 0.0, 1.0)
    return radius - np.sqrt((ax - t * bx) ** 2 + (ay - t * by) ** 2)


def aorta_field(ux, uy, uz, lm: Landmarks, radius: float = AORTA_RADIUS):
    """Signed distance (mm) to the aorta: ascending part, arch and descending part (capsules)."""
    points = lm.aorta
    field = capsule_sdf(ux, uy, uz, points[0], points[1], radius)
    for start, end in zip(points[1:-1], points[2:]):
        field = np.maximum(field, capsule_sdf(ux, uy, uz, start, end, radius))
    return field


def lung_fields(ux, uy, uz, an: Anatomy):
    """Signed distance-like fields (mm, positive inside) of the right and the left lung.

    Each lung is the thorax interior (narrowing to a rounded apex) above its diaphragm dome,
    lateral to the mediastinum, outside the heart (3 mm pericardial margin), the spine and the
    descending aorta. The right dome sits ``right_dome_offset`` higher (liver); the heart, left
    of the midline, makes the left lung smaller. The two fields are negative in the gap between
    the lungs, which is at least ``anterior_gap`` wide.

    Returns:
        ``(phi_right, phi_left)`` with the broadcast shape of the inputs.
    """
    lm = landmarks(an)
    t = _taper(uz, lm)
    a_in = lm.inner_a * t
    b_in = lm.inner_b * t
    # shared exclusions
    hx, hy, hz = lm.heart_centre
    heart_out = -ellipsoid_sdf(ux - hx, uy - hy, uz - hz, *lm.heart_radii) - 3.0
    spine_out = np.sqrt((ux - lm.x_mid) ** 2 + (uy - lm.spine_y) ** 2) - (an.spine_radius + 3.0)
    # posterior mediastinum: oesophagus between trachea and spine, tissue between spine and aorta
    column = _capsule_2d(ux, uy, (lm.x_mid, lm.y_trachea), (lm.x_mid, lm.spine_y), an.trachea_radius + 6.0)
    link = _capsule_2d(ux, uy, (lm.x_mid, lm.spine_y), lm.aorta[-1][:2], AORTA_RADIUS + 2.0)
    spine_out = np.minimum(spine_out, -np.maximum(column, link))
    aorta_out = -aorta_field(ux, uy, uz, lm, AORTA_RADIUS + 2.0)
    shared = np.minimum(np.minimum(heart_out, spine_out), aorta_out)
    half_gap = mediastinum_half_width(uy, an, lm)
    out = []
    for side, sign in ((RIGHT, -1.0), (LEFT, 1.0)):
        # rounded apex: the thorax section shrinks towards the apex point as sqrt of the depth
        xa, ya = lm.x_mid + sign * 0.5 * lm.inner_a, 0.15 * lm.inner_b
        tau = np.sqrt(np.clip((lm.z_apex - uz) / 75.0, 1e-4, 1.0))
        thorax = tau * superellipse_sdf(xa + (ux - xa) / tau, ya + (uy - ya) / tau, a_in, b_in, THORAX_POWER)
        # diaphragm dome, lower posteriorly (costophrenic recess)
        xn = (ux - (lm.x_mid + sign * 0.45 * lm.inner_a)) / (0.55 * lm.inner_a)
        yn = uy / lm.inner_b
        r2 = np.minimum(xn ** 2 + (yn / 1.1) ** 2, 1.6)
        offset = an.right_dome_offset if side == RIGHT else 0.0
        z_dia = lm.z_base + offset + an.dome_mm * (1.0 - r2) - 10.0 * yn
        diaphragm = (uz - z_dia) / 1.3
        medial = sign * (ux - lm.x_mid) - half_gap
        out.append(np.minimum(np.minimum(np.minimum(thorax, diaphragm), medial), shared))
    return out[0], out[1]


def lung_label_points(ux, uy, uz, an: Anatomy, margin: float = 0.0):
    """Lung label (0 none, 1 right, 2 left) of body-frame points, ``margin`` mm inside the surface."""
    right, left = lung_fields(ux, uy, uz, an)
    return np.where(right > margin, RIGHT, np.where(left > margin, LEFT, 0)).astype(np.uint8)


def tissue_values(ux, uy, uz, an: Anatomy, body_phi=None):
    """HU of the non-lung tissue at body-frame points (lungs and trees are painted over it).

    Subcutaneous fat under the skin, muscle, the vertebral body (cancellous bone with a cortical
    rim), the sternum, the mediastinum (fat anteriorly), the heart and aorta (blood), and under
    the diaphragm the liver (right) and other abdominal organs (left).
    """
    lm = landmarks(an)
    if body_phi is None:
        body_phi = body_field(ux, uy, uz, an)
    shape = np.broadcast_shapes(np.shape(ux), np.shape(uy), np.shape(uz))
    values = np.full(shape, MUSCLE_HU, dtype=np.float32)
    values[np.broadcast_to(body_phi < an.fat_mm, shape)] = FAT_HU
    t = _taper(uz, lm)
    thorax = superellipse_sdf(ux, uy, lm.inner_a * t, lm.inner_b * t, THORAX_POWER)
    inside = np.broadcast_to(thorax > 0, shape)
    # mediastinum: anterior part fatty
    med = inside & np.broadcast_to(np.abs(ux - lm.x_mid) < mediastinum_half_width(uy, an, lm) + 6.0, shape)
    values[med] = MEDIASTINUM_HU
    values[med & np.broadcast_to(uy < lm.y_trachea - 25.0, shape)] = MEDIASTINAL_FAT_HU
    # abdomen below the lowest dome level (coarse; the lungs are painted over where they reach)
    below = inside & np.broadcast_to(uz < lm.z_base + an.right_dome_offset + an.dome_mm, shape)
    values[below & np.broadcast_to(ux < lm.x_mid, shape)] = LIVER_HU
    values[below & np.broadcast_to(ux >= lm.x_mid, shape)] = ABDOMEN_HU
    hx, hy, hz = lm.heart_centre
    values[np.broadcast_to(ellipsoid_sdf(ux - hx, uy - hy, uz - hz, *lm.heart_radii) > 0, shape)] = BLOOD_HU
    values[np.broadcast_to(aorta_field(ux, uy, uz, lm) > 0, shape)] = BLOOD_HU
    spine_r = np.sqrt((ux - lm.x_mid) ** 2 + (uy - lm.spine_y) ** 2)
    values[np.broadcast_to(spine_r < an.spine_radius, shape)] = CORTEX_HU
    values[np.broadcast_to(spine_r < an.spine_radius - 2.0, shape)] = BONE_HU
    sternum = ellipse_sdf(ux - lm.x_mid, uy + lm.inner_b + 0.5 * an.chest_wall_mm, 14.0, 6.0)
    values[np.broadcast_to((sternum > 0) & (uz < lm.z_apex - 10.0) & (uz > lm.z_base), shape)] = BONE_HU
    return values
