"""Small synthetic chest CTs and helpers for the preprocessing tests (lung, atlas, register, patches).

:func:`synthetic_chest` renders a chest-like CT in the canonical orientation of ``work/`` volumes
(identity direction in ITK's LPS world, arrays indexed ``[z, y, x]``) together with its true lung
labels (0 background, 1 right = smaller x, 2 left). It has what a classical lung segmentation must
cope with: outside air, a hollow patient table, a body outline with a fat layer, a trachea and main
bronchi joining the lungs, vessels inside the lungs, low-attenuation (emphysema-like) blobs,
bowel gas below the diaphragm, and optionally lungs that touch in front of the heart.

The rest builds on the real synthetic cohort (:mod:`pipeline.synth`) and the real ingest stage:
:func:`synth_settings`, :func:`render_on_grid` (a subject rendered straight onto a coarse
canonical grid, for cohort-level tests) and the session-scoped fixture :func:`synth_subjects`
(a few subjects written as NIfTI/DICOM by the generator, ingested at
:data:`SYNTH_SPACING_MM`, their true labels resampled onto the ingested grid with nearest
neighbour, and segmented once by :func:`pipeline.lung.segment_lungs`). Test modules import the
fixture by name.

Everything is seeded; nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy import ndimage

SYNTH_SPACING_MM = 3.0  # ingest spacing of the synthetic subjects in the tests (the demo uses 2 mm)


@dataclass(frozen=True)
class Chest:
    """A rendered synthetic chest.

    Attributes:
        ct: int16 HU image, canonical orientation.
        labels: uint8 true lung labels on the same grid (0 background, 1 right, 2 left).
        emphysema: fraction of the true lung volume rendered as low-attenuation (< -950 HU) blobs.
    """

    ct: sitk.Image
    labels: sitk.Image
    emphysema: float


def _image(array: np.ndarray, spacing: float, origin: tuple[float, float, float]) -> sitk.Image:
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((spacing, spacing, spacing))
    image.SetOrigin(origin)
    image.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    return image


def _tube(x, y, z, start, end, radius):
    """Boolean mask of a capsule from ``start`` to ``end`` (mm, (x, y, z)) with ``radius`` mm."""
    a = np.asarray(start, float)
    d = np.asarray(end, float) - a
    length2 = float(d @ d)
    t = ((x - a[0]) * d[0] + (y - a[1]) * d[1] + (z - a[2]) * d[2]) / length2
    t = np.clip(t, 0.0, 1.0)
    return (x - a[0] - t * d[0]) ** 2 + (y - a[1] - t * d[1]) ** 2 + (z - a[2] - t * d[2]) ** 2 <= radius**2


def synthetic_chest(
    spacing: float = 3.0,
    fov_mm: tuple[float, float, float] = (330.0, 300.0, 360.0),
    *,
    seed: int = 0,
    emphysema: float = 0.0,
    scale: float = 1.0,
    shift_mm: tuple[float, float, float] = (0.0, 0.0, 0.0),
    joined: bool = False,
    noise_hu: float = 15.0,
) -> Chest:
    """Render a chest CT and its true lung labels.

    Args:
        spacing: isotropic voxel size in mm.
        fov_mm: field of view ``(x, y, z)`` in mm; the array has shape ``round(fov / spacing)`` as (z, y, x).
        seed: seeds every random draw (vessels, blobs, noise).
        emphysema: target fraction (0..0.5) of lung voxels replaced by blobs at about -990 HU,
            denser in the upper zones.
        scale: lung size factor (1 = an adult lung of about 5 L in total).
        shift_mm: lung and airway offset ``(x, y, z)`` in mm relative to the body.
        joined: make the lungs touch in front of the heart (one air component after the trachea is removed).
        noise_hu: sd of the white image noise.

    Returns:
        :class:`Chest` with ``ct`` (int16, HU) and ``labels`` (uint8) on the same grid.
    """
    if not 0.0 <= emphysema <= 0.5:
        raise ValueError(f"emphysema must lie in [0, 0.5], got {emphysema}")
    rng = np.random.default_rng(seed)
    nx, ny, nz = (int(round(f / spacing)) for f in fov_mm)
    origin = tuple(-0.5 * (n - 1) * spacing for n in (nx, ny, nz))
    z, y, x = np.ogrid[0:nz, 0:ny, 0:nx]
    x = (origin[0] + x * spacing).astype(np.float32)
    y = (origin[1] + y * spacing).astype(np.float32)
    z = (origin[2] + z * spacing).astype(np.float32)
    shape = (nz, ny, nx)

    ct = np.full(shape, -1000.0, np.float32)
    # Patient table (posterior = +y) with a hollow core, separate from the body.
    table = (np.abs(x) < 0.48 * fov_mm[0]) & (y > 112) & (y < 128)
    ct[np.broadcast_to(table, shape)] = 150.0
    ct[np.broadcast_to(table & (y > 116) & (y < 124) & (np.abs(x) < 0.4 * fov_mm[0]), shape)] = -1000.0
    # Body: elliptic cylinder with a fat layer.
    body_r = (x / 155.0) ** 2 + (y / 110.0) ** 2
    ct[np.broadcast_to(body_r <= 1.0, shape)] = -100.0
    ct[np.broadcast_to(body_r <= 0.86, shape)] = 40.0

    sx, sy, sz = shift_mm
    cz = 20.0 + sz
    labels = np.zeros(shape, np.uint8)
    half_gap = 56.0 if joined else 66.0
    for label, side in ((1, -1.0), (2, 1.0)):
        cx = side * half_gap * scale + sx
        ax, ay, az = 56.0 * scale, 75.0 * scale, 115.0 * scale
        inside = ((x - cx) / ax) ** 2 + ((y - sy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1.0
        # Diaphragm dome: cut the base of the ellipsoid with a paraboloid.
        dome = cz - 0.55 * az + 35.0 * scale * (1.0 - ((x - cx) / ax) ** 2 - ((y - sy) / ay) ** 2)
        lung = inside & (z >= dome) & (body_r <= 0.72)  # the chest wall bounds the lungs
        if joined:  # a bridge of lung in front of the heart joins the two sides
            bridge = ((np.abs(x - sx) < 6.0 * scale) & (np.abs(y - sy + 55.0 * scale) < 10.0 * scale)
                      & (np.abs(z - cz) < 40.0 * scale))
            lung = lung | (bridge & (side * (x - sx) >= 0))
        labels[lung] = label

    lung_any = labels > 0
    ct[lung_any] = -860.0
    # Correlated parenchymal texture.
    texture = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma=1.5 * 3.0 / spacing)
    texture *= 25.0 / max(float(texture.std()), 1e-6)
    ct[lung_any] += texture[lung_any]

    # Vessels: tubes from each hilum into the lung (inside the true lung label).
    carina = np.array([sx, sy - 20.0 * scale, cz + 45.0 * scale])
    for side in (-1.0, 1.0):
        hilum = np.array([side * 42.0 * scale + sx, sy - 5.0 * scale, cz + 5.0 * scale])
        for _ in range(6):
            direction = rng.normal(size=3) * np.array([0.6, 0.8, 1.0]) + np.array([side * 0.8, 0.0, 0.0])
            direction /= np.linalg.norm(direction)
            end = hilum + direction * rng.uniform(50, 90) * scale
            vessel = _tube(x, y, z, hilum, end, rng.uniform(1.5, 3.5) * scale) & lung_any
            ct[vessel] = 40.0
    # Emphysema: low-attenuation blobs, more in the upper zones, until the target fraction is reached.
    if emphysema > 0:
        lung_idx = np.argwhere(lung_any)
        target = emphysema * len(lung_idx)
        weights = np.exp((lung_idx[:, 0] - lung_idx[:, 0].min()) / max(1, np.ptp(lung_idx[:, 0])) * 1.5)
        weights /= weights.sum()
        emph = np.zeros(shape, bool)
        radius_vox = max(1.0, 5.0 / spacing)
        count = 0
        while count < target:
            centres = lung_idx[rng.choice(len(lung_idx), size=64, p=weights)]
            for cz_, cy_, cx_ in centres:
                r = rng.uniform(0.6, 1.4) * radius_vox
                rr = int(np.ceil(r))
                sl = tuple(slice(max(0, c - rr), c + rr + 1) for c in (cz_, cy_, cx_))
                sub = emph[sl]
                gz, gy, gx = np.ogrid[sl[0].start - cz_:sl[0].start - cz_ + sub.shape[0],
                                      sl[1].start - cy_:sl[1].start - cy_ + sub.shape[1],
                                      sl[2].start - cx_:sl[2].start - cx_ + sub.shape[2]]
                sub |= (gz**2 + gy**2 + gx**2 <= r * r) & lung_any[sl]
            count = int(emph.sum())
        ct[emph] = -990.0 + 0.3 * texture[emph]
        emphysema = count / len(lung_idx)

    # Airways: trachea from the top of the FOV to the carina, then main bronchi into each lung.
    top = np.array([sx, sy - 20.0 * scale, float(z.max()) + spacing])
    airway = _tube(x, y, z, top, carina, 8.0 * scale)
    wall = _tube(x, y, z, top, carina, 10.0 * scale)
    for side in (-1.0, 1.0):
        hilum = np.array([side * 48.0 * scale + sx, sy - 8.0 * scale, cz + 12.0 * scale])
        airway |= _tube(x, y, z, carina, hilum, 5.5 * scale)
        wall |= _tube(x, y, z, carina, hilum, 7.0 * scale)
    ct[wall & ~lung_any] = 40.0
    ct[airway] = -1000.0
    # Bowel gas below the diaphragm.
    gas = ((x - 40.0) ** 2 + (y + 30.0) ** 2 + (z - (cz - 115.0 * scale - 10.0)) ** 2) <= 18.0**2
    ct[gas & ~lung_any] = -1000.0

    ct += rng.normal(0.0, noise_hu, size=shape).astype(np.float32)
    ct = np.clip(np.rint(ct), -1024, 3071).astype(np.int16)
    return Chest(_image(ct, spacing, origin), _image(labels, spacing, origin), float(emphysema))


# ---- the real synthetic cohort ---------------------------------------------------------------


def synth_settings(n_subjects: int, seed: int = 2021, spacing_mm: float | None = SYNTH_SPACING_MM, **overrides) -> dict:
    """A validated ``synthetic`` config section (raw images at ``spacing_mm`` to stay small)."""
    from pipeline.config import validate_config

    section = {"n_subjects": n_subjects, "seed": seed, "resolution": "demo", **overrides}
    if spacing_mm is not None:
        section["spacing_mm"] = [spacing_mm] * 3
    return validate_config({"synthetic": section})["synthetic"]


def render_on_grid(plan, spacing_mm: float) -> tuple[sitk.Image, sitk.Image]:
    """Render a synthetic subject straight onto a canonical isotropic grid covering its own field of view.

    Returns:
        (int16 HU image, uint8 true labels), identity direction, same grid.
    """
    from pipeline.synth.plan import Grid
    from pipeline.synth.render import render_subject

    g = plan.grid
    extent = [n * s for n, s in zip(g.shape_zyx, g.spacing_zyx)]
    shape = tuple(int(round(e / spacing_mm)) for e in extent)
    origin = tuple(o - s / 2 + spacing_mm / 2 for o, s in zip(g.origin_lps, g.spacing_zyx[::-1]))
    grid = Grid(shape, (spacing_mm,) * 3, origin)
    rendered = render_subject(plan, grid)
    return _image(rendered.hu, spacing_mm, origin), _image(rendered.labels, spacing_mm, origin)


@dataclass(frozen=True)
class SynthSubject:
    """A generator subject after the real ingest stage.

    Attributes:
        sid: subject ID; plan: its :class:`pipeline.synth.plan.SubjectPlan`.
        ct_path: ingested CT file; ct: the same, read back (int16, canonical).
        truth: true labels resampled (nearest) onto the ingested grid.
        lungs: labels from :func:`pipeline.lung.segment_lungs`; lung_qc: its QC dict.
    """

    sid: str
    plan: object
    ct_path: Path
    ct: sitk.Image
    truth: sitk.Image
    lungs: sitk.Image
    lung_qc: dict


def _pick_varied(plans, count: int) -> list:
    """Up to ``count`` plans covering plain NIfTI, reoriented NIfTI and DICOM subjects first."""
    chosen = []
    for wanted in (lambda p: p.format == "nifti" and not p.reoriented, lambda p: p.format == "nifti" and p.reoriented,
                   lambda p: p.format == "dicom"):
        match = next((p for p in plans if wanted(p) and p not in chosen), None)
        if match is not None:
            chosen.append(match)
    chosen += [p for p in plans if p not in chosen]
    return chosen[:count]


@pytest.fixture(scope="session")
def synth_subjects(tmp_path_factory) -> list[SynthSubject]:
    """Three generator subjects (plain NIfTI, reoriented NIfTI, DICOM) ingested at 3 mm and segmented.

    Test modules import this fixture by name, which registers it once per module; the results
    are therefore kept under the session's base temporary directory and built only once.
    """
    import json

    from pipeline.config import validate_section
    from pipeline.ct_io import read_volume, write_volume
    from pipeline.files import write_json
    from pipeline.ingest import ingest_subject
    from pipeline.lung import segment_lungs
    from pipeline.synth.cohort import write_subject
    from pipeline.synth.plan import plan_cohort

    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
    root = tmp_path_factory.getbasetemp() / "synth_subjects"
    plans = {p.sid: p for p in plan_cohort(synth_settings(8, seed=2021, dicom_fraction=0.3, reoriented_fraction=0.5))}
    index = root / "subjects.json"
    if not index.is_file():
        qc = {}
        for plan in _pick_varied(list(plans.values()), 3):
            write_subject(plan, root / "raw")
            ct_path = root / "ct" / f"{plan.sid}.nii.gz"
            ingest_subject(plan.sid, root / "raw" / plan.image, plan.format, ct_path,
                           **validate_section("ingest", {"spacing_mm": SYNTH_SPACING_MM, "min_slices": 1}))
            ct = read_volume(ct_path, plan.sid)
            labels = sitk.ReadImage(str(root / "raw" / plan.label))
            truth = sitk.Resample(labels, ct, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
            result = segment_lungs(ct, sid=plan.sid)
            write_volume(truth, root / "truth" / f"{plan.sid}.nii.gz")
            write_volume(result.labels, root / "lungs" / f"{plan.sid}.nii.gz")
            qc[plan.sid] = result.qc
        write_json(index, qc)  # written last: marks the set as complete
    qc = json.loads(index.read_text())
    return [SynthSubject(sid, plans[sid], root / "ct" / f"{sid}.nii.gz", read_volume(root / "ct" / f"{sid}.nii.gz"),
                         read_volume(root / "truth" / f"{sid}.nii.gz"), read_volume(root / "lungs" / f"{sid}.nii.gz"),
                         qc[sid]) for sid in qc]


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice coefficient of two boolean arrays."""
    total = int(a.sum()) + int(b.sum())
    return 2.0 * int(np.count_nonzero(a & b)) / total if total else 1.0
