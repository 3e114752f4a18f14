"""Classical lung segmentation (no model weights) and the ``lung`` stage.

The topology is worked out on a coarse copy of the CT (block means to about 2 mm), where
connected components, hole filling and morphology are cheap; the lung boundary is then
refined at the CT's own resolution. Steps:

1. **Air**: voxels below ``threshold_hu`` (default -400 HU).
2. **Body and outside air**: outside air is the air connected to the side faces (x/y
   borders) of the volume. The **body** is the largest non-air component after an opening
   that cuts thin contacts with the table, with its axial outline filled. Air inside the body
   (lungs, airways, bowel gas, ...) is measured; less than ``min_lung_volume_ml`` of it means
   "no lungs found" (e.g. a head CT). The table and anything else outside the body outline
   drop out.
3. **Trachea and main bronchi**: the tubular air region is found in the top slices near the
   body's left-right centre and tracked slice by slice downwards through small 2-D blobs; the
   tracking of a branch stops where it merges into a large (lung) blob.
4. **Left/right split**: the two largest remaining air components; when the lungs touch (one
   component) it is eroded until it falls apart into two large cores, which are grown back over
   the original component (nearest core, Euclidean). Right = smaller x index (canonical LPS).
5. **Vessels and holes**: per-lung morphological closing and per-slice hole filling.
6. **Refinement at full resolution**: voxels well inside a coarse lung keep its label; in a
   band of one coarse voxel around the coarse boundary the full-resolution threshold decides.

Output labels: uint8, 0 background, 1 right lung, 2 left lung, on the CT grid.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.errors import SubjectError

log = logging.getLogger(__name__)

STAGE = "lung"
COARSE_SPACING_MM = 2.0  # grid of the topology steps
BODY_OPENING_MM = 5.0  # opening radius that separates the body from the table
TRACHEA_SEARCH_MM = 40.0  # look for the trachea in this top part of the internal air
TRACHEA_MAX_OFFSET_MM = 30.0  # trachea centre: at most this far from the body's left-right centre
TRACHEA_MAX_AREA_MM2 = 700.0  # cross-section of a trachea (diameter up to ~30 mm)
TRACHEA_MIN_AREA_MM2 = 30.0
SECOND_LUNG_MIN_RATIO = 0.2  # the smaller lung holds at least this fraction of the larger one
MIN_Z_OVERLAP = 0.5  # the two lungs share at least this fraction of the shorter one's height
MAX_SPLIT_EROSION_MM = 30.0
CLOSING_RADIUS_MM = 4.0
MAX_HOLE_AREA_MM2 = 600.0  # largest axial hole (a vessel) filled inside a lung


@dataclass(frozen=True)
class LungSegmentation:
    """Result of :func:`segment_lungs`.

    Attributes:
        labels: uint8 image on the CT grid (0 background, 1 right, 2 left).
        qc: plain-type metrics for the stage status (volumes in ml, airway found, ...).
    """

    labels: Any  # SimpleITK.Image
    qc: dict[str, Any]


@dataclass(frozen=True)
class CoarseAirway:
    """Result of :func:`find_airway`: body, internal air and airway on the coarse grid.

    The coarse grid is the CT's grid shrunk by integer ``factors`` (block means, SimpleITK
    ``BinShrink``): coarse voxel ``(k, j, i)`` covers the CT voxels ``f*k .. f*k+f-1`` per axis.

    Attributes:
        factors: block size ``(fz, fy, fx)`` in CT voxels.
        spacing: coarse voxel size ``(z, y, x)`` in mm.
        coarse_ct: ``[z', y', x']`` block means of the CT (HU), in the CT's pixel type (int16: rounded).
        body: bool ``[z', y', x']`` the body, including the air it encloses.
        internal_air: bool ``[z', y', x']`` air inside the body (lungs, airways, bowel gas, ...).
        body_x: the body's left-right centre (x index on the coarse grid).
        airway: bool ``[z', y', x']`` trachea and main bronchi (empty when no trachea was found).
        trachea_found: whether a trachea was found in the top of the internal air.
    """

    factors: tuple[int, int, int]
    spacing: tuple[float, float, float]
    coarse_ct: np.ndarray
    body: np.ndarray
    internal_air: np.ndarray
    body_x: float
    airway: np.ndarray
    trachea_found: bool


def _planar() -> np.ndarray:
    """3x3x3 structure connecting voxels within an axial slice only (4-neighbourhood)."""
    from scipy import ndimage

    structure = np.zeros((3, 3, 3), bool)
    structure[1] = ndimage.generate_binary_structure(2, 1)
    return structure


def _ball(radius: int) -> np.ndarray:
    r = np.arange(-radius, radius + 1)
    return (r[:, None, None] ** 2 + r[None, :, None] ** 2 + r[None, None, :] ** 2) <= radius**2


def _largest(labels: np.ndarray, count: int) -> tuple[np.ndarray, np.ndarray]:
    """Component ids sorted by decreasing size (largest first) and the size of every id."""
    sizes = np.bincount(labels.ravel(), minlength=count + 1)
    sizes[0] = 0
    order = np.argsort(-sizes[1:], kind="stable") + 1
    return order, sizes


def _centre_x(mask: np.ndarray) -> float:
    """Mean x index of the true voxels of ``mask`` (bool ``[z, y, x]``); 0 when empty."""
    profile = mask.sum(axis=(0, 1), dtype=np.float64)
    return float(profile @ np.arange(profile.size) / max(profile.sum(), 1.0))


def _fill_planar(mask: np.ndarray) -> np.ndarray:
    """Fill the holes of every axial slice of ``mask`` (bool ``[z, y, x]``) independently."""
    from scipy import ndimage

    padded = np.pad(mask, ((1, 1), (0, 0), (0, 0)))  # empty end slices keep the slices apart
    return ndimage.binary_fill_holes(padded, structure=_planar())[1:-1]


def _body_and_internal_air(air: np.ndarray, spacing: tuple[float, float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Find the body and the air inside it.

    The body is the largest component of the non-air voxels after an opening with a ball of
    :data:`BODY_OPENING_MM` (which cuts thin contacts with the patient table, clothes or
    blankets), grown back over the non-air voxels within one more ball radius, with every axial
    slice's holes filled. Air inside the body is air inside that outline that is not connected
    to the side faces of the volume.

    Args:
        air: bool ``[z, y, x]``.
        spacing: voxel size ``(z, y, x)`` in mm.

    Returns:
        (body, internal_air): bool ``[z, y, x]`` each (``body`` includes the air it encloses).
    """
    from scipy import ndimage

    air_labels, _ = ndimage.label(air)
    faces = np.concatenate([air_labels[:, 0, :].ravel(), air_labels[:, -1, :].ravel(),
                            air_labels[:, :, 0].ravel(), air_labels[:, :, -1].ravel()])
    outside = np.isin(air_labels, np.unique(faces[faces > 0]))
    del air_labels
    radius = max(1, int(round(BODY_OPENING_MM / min(spacing))))
    tissue = ~air
    core = ndimage.binary_opening(tissue, structure=_ball(radius))
    core_labels, count = ndimage.label(core)
    if count == 0:
        return np.zeros_like(air), np.zeros_like(air)
    order, _ = _largest(core_labels, count)
    body = ndimage.binary_dilation(core_labels == order[0], structure=_ball(radius + 1)) & tissue
    body = _fill_planar(body)
    return body, air & body & ~outside


def _track_airway(air: np.ndarray, body_x: float, spacing: tuple[float, float, float]) -> tuple[np.ndarray, bool]:
    """Trachea and main bronchi: tracked from the top slices down to where they enter the lungs.

    Args:
        air: bool ``[z, y, x]`` air inside the body (coarse grid).
        body_x: the body's left-right centre (x index).
        spacing: voxel size ``(z, y, x)`` in mm.

    Returns:
        (airway bool ``[z, y, x]``, whether a trachea was found).
    """
    from scipy import ndimage

    airway = np.zeros_like(air)
    slices = np.flatnonzero(air.any(axis=(1, 2)))
    if slices.size == 0:
        return airway, False
    blobs, count = ndimage.label(air, structure=_planar())
    pixel_mm2 = spacing[1] * spacing[2]
    area = np.bincount(blobs.ravel(), minlength=count + 1) * pixel_mm2
    x_index = np.broadcast_to(np.arange(air.shape[2], dtype=np.float64), air.shape)
    with np.errstate(invalid="ignore", divide="ignore"):
        centre_x = np.bincount(blobs.ravel(), weights=x_index.ravel(), minlength=count + 1) / (area / pixel_mm2)

    seed = None
    top = int(slices.max())
    lowest = top - int(round(TRACHEA_SEARCH_MM / spacing[0]))
    for z in range(top, max(lowest, -1), -1):
        ids = np.unique(blobs[z])
        ids = ids[ids > 0]
        offset = np.abs(centre_x[ids] - body_x) * spacing[2]
        ok = ((area[ids] <= TRACHEA_MAX_AREA_MM2) & (area[ids] >= TRACHEA_MIN_AREA_MM2)
              & (offset <= TRACHEA_MAX_OFFSET_MM))
        if ok.any():
            seed = (z, int(ids[ok][np.argmin(offset[ok])]))
            break
    if seed is None:
        return airway, False

    z_seed, seed_id = seed
    max_area = max(3.0 * area[seed_id], TRACHEA_MAX_AREA_MM2)
    airway[z_seed] = blobs[z_seed] == seed_id
    for step in (-1, 1):  # down to the carina and bronchi; up in case the seed was not the top
        previous = airway[z_seed]
        z = z_seed + step
        while 0 <= z < air.shape[0] and previous.any():
            ids = np.unique(blobs[z][previous])
            ids = ids[(ids > 0)]
            ids = ids[area[ids] <= max_area]  # a large blob is a lung: this branch has entered it
            if ids.size == 0:
                break
            airway[z] = np.isin(blobs[z], ids)
            previous = airway[z]
            z += step
    return airway, True


def _pair_of_lungs(components: np.ndarray, first: int, second: int, sizes: np.ndarray) -> bool:
    """Whether two air components look like a right and a left lung.

    The smaller holds at least :data:`SECOND_LUNG_MIN_RATIO` of the larger one's volume and
    their heights overlap by at least :data:`MIN_Z_OVERLAP` of the shorter one (bowel gas below
    the diaphragm does not).
    """
    if sizes[second] < SECOND_LUNG_MIN_RATIO * sizes[first]:
        return False
    z_first = np.flatnonzero((components == first).any(axis=(1, 2)))
    z_second = np.flatnonzero((components == second).any(axis=(1, 2)))
    shared = min(z_first[-1], z_second[-1]) - max(z_first[0], z_second[0]) + 1
    shorter = min(z_first[-1] - z_first[0], z_second[-1] - z_second[0]) + 1
    return shared >= MIN_Z_OVERLAP * shorter


def _split_left_right(air: np.ndarray, spacing: tuple[float, float, float], body_x: float,
                      sid: str | None) -> tuple[np.ndarray, int]:
    """Label the two lungs: 1 right (smaller x), 2 left.

    Args:
        air: bool ``[z, y, x]`` lung candidate air (airways removed).
        spacing: voxel size ``(z, y, x)`` in mm.
        body_x: the body's left-right centre (x index).

    Returns:
        (uint8 labels ``[z, y, x]``, number of erosions needed to separate the lungs).

    Raises:
        SubjectError: when two lungs cannot be found.
    """
    from scipy import ndimage

    components, count = ndimage.label(air)
    if count == 0:
        raise SubjectError(sid, "no lungs found: no air left inside the body after removing the airways", STAGE)
    order, sizes = _largest(components, count)
    erosions = 0
    if count >= 2 and _pair_of_lungs(components, order[0], order[1], sizes):
        cores = np.where(components == order[0], 1, 0) + np.where(components == order[1], 2, 0)
        lungs = cores.astype(np.uint8)
    else:
        # One large component: the lungs touch. Erode until it falls apart into two large cores.
        box = ndimage.find_objects((components == order[0]).astype(np.int8))[0]
        box = tuple(slice(max(s.start - 1, 0), s.stop + 1) for s in box)
        whole = components[box] == order[0]
        eroded = whole
        split = None
        max_erosions = int(np.ceil(MAX_SPLIT_EROSION_MM / min(spacing)))
        while erosions < max_erosions:
            eroded = ndimage.binary_erosion(eroded)
            erosions += 1
            parts, n_parts = ndimage.label(eroded)
            if n_parts == 0:
                break
            part_order, part_sizes = _largest(parts, n_parts)
            if n_parts >= 2 and part_sizes[part_order[1]] >= SECOND_LUNG_MIN_RATIO * part_sizes[part_order[0]]:
                split = np.where(parts == part_order[0], 1, 0) + np.where(parts == part_order[1], 2, 0)
                break
        if split is None:
            volume_ml = sizes[order[0]] * float(np.prod(spacing)) / 1000.0
            eroded_mm = erosions * min(spacing)
            raise SubjectError(sid, f"could not separate the left and right lungs: one air region of "
                                    f"{volume_ml:.0f} ml did not split after {eroded_mm:.0f} mm of erosion", STAGE)
        nearest = ndimage.distance_transform_edt(split == 0, sampling=spacing, return_distances=False,
                                                 return_indices=True)
        grown = np.where(whole, split[tuple(nearest)], 0)
        lungs = np.zeros(air.shape, np.uint8)
        lungs[box] = grown
    # Right lung = smaller x; both lungs must lie on either side of the body centre.
    centres = [_centre_x(lungs == k) for k in (1, 2)]
    if not (min(centres) < body_x < max(centres)):
        raise SubjectError(sid, "no lungs found: the two largest air regions inside the body lie on the same side "
                                f"(x = {centres[0]:.0f} and {centres[1]:.0f}, body centre {body_x:.0f})", STAGE)
    if centres[0] > centres[1]:
        lungs = np.where(lungs > 0, 3 - lungs, 0).astype(np.uint8)
    return lungs, erosions


def _fill(lungs: np.ndarray, spacing: tuple[float, float, float]) -> np.ndarray:
    """Fill vessels and holes of each lung: closing with a small ball, then per-slice hole filling.

    Only axial holes up to :data:`MAX_HOLE_AREA_MM2` are filled: vessels, not the tissue under
    the diaphragm dome, which an axial slice can show as a large hole ringed by lung.

    Args:
        lungs: uint8 ``[z, y, x]`` labels (0, 1, 2).
        spacing: voxel size ``(z, y, x)`` in mm.

    Returns:
        uint8 ``[z, y, x]`` filled labels; voxels of one lung are never given to the other.
    """
    from scipy import ndimage

    radius = max(1, int(round(CLOSING_RADIUS_MM / min(spacing))))
    ball = _ball(radius)
    max_hole_pixels = MAX_HOLE_AREA_MM2 / (spacing[1] * spacing[2])
    filled = lungs.copy()
    for label in (1, 2):
        box = ndimage.find_objects((lungs == label).astype(np.int8))[0]
        pad = radius + 1
        box = tuple(slice(max(s.start - pad, 0), min(s.stop + pad, n)) for s, n in zip(box, lungs.shape))
        mask = np.pad(lungs[box] == label, pad)
        mask = ndimage.binary_closing(mask, structure=ball)
        holes = _fill_planar(mask) & ~mask
        hole_labels, count = ndimage.label(holes, structure=_planar())
        if count:
            small = np.bincount(hole_labels.ravel(), minlength=count + 1) <= max_hole_pixels
            small[0] = False
            mask |= small[hole_labels]
        mask = mask[pad:-pad, pad:-pad, pad:-pad]
        region = filled[box]
        region[mask & (lungs[box] == 0)] = label
    return filled


def _refine(ct: np.ndarray, coarse: np.ndarray, factors: tuple[int, int, int], threshold_hu: float) -> np.ndarray:
    """Full-resolution labels from coarse ones.

    Voxels under the coarse lung eroded by one coarse voxel keep its label; in the band up to
    one coarse voxel outside, a voxel is lung when its own HU is below ``threshold_hu``.

    Args:
        ct: int16 HU ``[Z, Y, X]`` at full resolution.
        coarse: uint8 labels ``[Z // fz, Y // fy, X // fx]`` (block ``i`` covers voxels ``f*i .. f*i+f-1``).
        factors: block size ``(fz, fy, fx)``.

    Returns:
        uint8 labels ``[Z, Y, X]``.
    """
    from scipy import ndimage

    code = np.zeros(coarse.shape, np.uint8)  # 1/2: core of right/left, 3/4: boundary band
    for label in (1, 2):
        mask = coarse == label
        band = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask) & (code == 0)
        code[band] = label + 2
        code[ndimage.binary_erosion(mask)] = label
    for axis, factor in enumerate(factors):
        if factor > 1:
            code = code.repeat(factor, axis=axis)
    code = np.pad(code, [(0, n - m) for n, m in zip(ct.shape, code.shape)])
    band = code > 2
    labels = np.where(band, 0, code).astype(np.uint8)
    band &= ct < threshold_hu
    labels[band] = code[band] - 2
    return labels


def check_canonical(image, sid: str | None, stage: str) -> None:
    """Raise :class:`SubjectError` unless ``image`` has the identity direction (canonical LPS)."""
    if not np.allclose(np.asarray(image.GetDirection()), np.eye(3).ravel(), atol=1e-4):
        direction = tuple(round(v, 3) for v in image.GetDirection())
        raise SubjectError(sid, f"volume is not in the canonical orientation (direction {direction}); "
                                "use the output of the ingest stage", stage)


def find_airway(ct, *, threshold_hu: float = -400.0) -> CoarseAirway:
    """Body, internal air, trachea and main bronchi of a chest CT, on a grid of about
    :data:`COARSE_SPACING_MM` (steps 1 to 3 of the module docstring).

    Args:
        ct: SimpleITK image, integer HU, canonical orientation, size ``(X, Y, Z)``, i.e. arrays ``[Z, Y, X]``.
        threshold_hu: air threshold.

    Returns:
        :class:`CoarseAirway` (arrays ``[Z // fz, Y // fy, X // fx]``).
    """
    import SimpleITK as sitk

    spacing_xyz = ct.GetSpacing()
    factors_xyz = [max(1, int(round(COARSE_SPACING_MM / s))) for s in spacing_xyz]
    factors = tuple(factors_xyz[::-1])  # (z, y, x)
    coarse_spacing = tuple(float(s) * f for s, f in zip(spacing_xyz[::-1], factors))
    coarse_ct = sitk.GetArrayFromImage(sitk.BinShrink(ct, factors_xyz) if max(factors) > 1 else ct)
    air = coarse_ct < threshold_hu
    body, internal = _body_and_internal_air(air, coarse_spacing)
    body_x = _centre_x(body)
    airway, trachea_found = _track_airway(internal, body_x, coarse_spacing)
    return CoarseAirway(factors, coarse_spacing, coarse_ct, body, internal, body_x, airway, trachea_found)


def segment_lungs(ct, *, threshold_hu: float = -400.0, min_lung_volume_ml: float = 500.0,
                  sid: str | None = None) -> LungSegmentation:
    """Segment the right and left lungs of a chest CT without model weights.

    Args:
        ct: SimpleITK image, integer HU, canonical orientation (identity direction), size
            ``(X, Y, Z)`` i.e. arrays ``[Z, Y, X]``.
        threshold_hu: air threshold.
        min_lung_volume_ml: less air than this inside the body (or in the two lungs) means no lungs.
        sid: subject ID for error messages.

    Returns:
        :class:`LungSegmentation` with uint8 labels on the CT grid and QC metrics.

    Raises:
        SubjectError: no lungs found (with the measured air volume), lungs that cannot be
            separated, or a CT that is not in the canonical orientation.
    """
    import SimpleITK as sitk

    if not min_lung_volume_ml >= 0:
        raise ValueError(f"min_lung_volume_ml must be >= 0, got {min_lung_volume_ml}")
    check_canonical(ct, sid, STAGE)
    spacing = tuple(float(s) for s in ct.GetSpacing()[::-1])
    found = find_airway(ct, threshold_hu=threshold_hu)
    factors, coarse_spacing = found.factors, found.spacing
    internal, body_x, airway, trachea_found = found.internal_air, found.body_x, found.airway, found.trachea_found
    coarse_ml = float(np.prod(coarse_spacing)) / 1000.0
    air_ml = float(internal.sum()) * coarse_ml
    if air_ml < min_lung_volume_ml:
        raise SubjectError(sid, f"no lungs found: {air_ml:.0f} ml of air inside the body "
                                f"(need ≥ {min_lung_volume_ml:.0f} ml)", STAGE)

    if not trachea_found:
        log.warning("subject %s: no trachea found in the top %.0f mm of the internal air; no airway removed", sid,
                    TRACHEA_SEARCH_MM)
    lungs, erosions = _split_left_right(internal & ~airway, coarse_spacing, body_x, sid)
    lungs = _fill(lungs, coarse_spacing)

    ct_array = sitk.GetArrayViewFromImage(ct)
    labels = _refine(ct_array, lungs, factors, threshold_hu)
    voxel_ml = float(np.prod(spacing)) / 1000.0
    counts = np.bincount(labels.ravel(), minlength=3)
    right_ml, left_ml = counts[1] * voxel_ml, counts[2] * voxel_ml
    if right_ml + left_ml < min_lung_volume_ml:
        raise SubjectError(sid, f"no lungs found: the two lungs measure {right_ml + left_ml:.0f} ml (need ≥ "
                                f"{min_lung_volume_ml:.0f} ml; {air_ml:.0f} ml of air inside the body)", STAGE)
    image = sitk.GetImageFromArray(labels)
    image.CopyInformation(ct)
    qc = {
        "air_inside_body_ml": round(air_ml, 1),
        "airway_ml": round(float(airway.sum()) * coarse_ml, 1),
        "trachea_found": bool(trachea_found),
        "split_erosions": int(erosions),
        "right_ml": round(float(right_ml), 1),
        "left_ml": round(float(left_ml), 1),
        "coarse_spacing_mm": [round(s, 3) for s in coarse_spacing],
    }
    return LungSegmentation(image, qc)


# ---- stage ---------------------------------------------------------------------------------


def run_lung(*, sid: str, ct_path, out, density_path, status_path, upstream=(), threshold_hu: float,
             min_lung_volume_ml: float) -> dict[str, Any]:
    """The ``lung`` stage for one subject: labels to ``out``, densitometry to ``density_path``
    (:func:`pipeline.densitometry.measure` plus its ``high_attenuation`` section).

    Args:
        threshold_hu, min_lung_volume_ml: the config's ``lung`` section (:func:`segment_lungs`).

    Returns:
        the status dict written to ``status_path``.
    """
    from pipeline.status import run_subject_stage

    options = {"threshold_hu": threshold_hu, "min_lung_volume_ml": min_lung_volume_ml}

    def work() -> dict[str, Any]:
        import SimpleITK as sitk

        from pipeline.ct_io import read_volume, write_volume
        from pipeline.densitometry import HIGH_ATTENUATION_SECTION, high_attenuation, measure
        from pipeline.files import write_json

        ct = read_volume(ct_path, sid, STAGE)
        result = segment_lungs(ct, sid=sid, **options)
        voxel_ml = float(np.prod(ct.GetSpacing())) / 1000.0
        ct_array, labels_array = sitk.GetArrayViewFromImage(ct), sitk.GetArrayViewFromImage(result.labels)
        density = measure(ct_array, labels_array, voxel_ml)
        density[HIGH_ATTENUATION_SECTION] = high_attenuation(ct_array, labels_array)
        write_volume(result.labels, out)
        write_json(density_path, density)
        log.info("subject %s: lungs %.0f ml right, %.0f ml left; LAA-950 %.1f %%", sid,
                 result.qc["right_ml"], result.qc["left_ml"], density["total"]["laa950"])
        return {**result.qc, "laa950": round(density["total"]["laa950"], 3)}

    return run_subject_stage(sid=sid, stage=STAGE, status_path=status_path, outputs=[out, density_path],
                             work=work, upstream=upstream)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sid", required=True, help="subject ID")
    parser.add_argument("--ct", required=True, help="ingested CT (work/ct/{sid}.nii.gz)")
    parser.add_argument("--upstream", action="append", default=[], help="status JSON of the ingest stage (repeatable)")
    parser.add_argument("--out", required=True, help="lung labels to write (work/lung/{sid}.nii.gz)")
    parser.add_argument("--density", required=True, help="densitometry JSON to write (work/density/{sid}.json)")
    parser.add_argument("--status", required=True, help="status JSON to write (work/qc/lung/{sid}.json)")


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import stage_settings

    run_lung(sid=args.sid, ct_path=args.ct, out=args.out, density_path=args.density, status_path=args.status,
             upstream=args.upstream, **stage_settings(args, "lung"))
    return 0
