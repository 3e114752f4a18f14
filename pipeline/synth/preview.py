"""A PNG montage of synthetic subjects (axial and coronal slices) so a person can look at them.

Images are read back from ``out_dir`` when they have been written (which also checks the
writers: reoriented NIfTI and DICOM subjects must come out upright), and rendered otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from pipeline.synth.plan import SubjectPlan


def read_written_image(path: str | os.PathLike, fmt: str) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a written synthetic image back as HU in the canonical LPS orientation.

    Args:
        path: ``.nii.gz`` file or DICOM series directory.
        fmt: ``nifti`` or ``dicom``.

    Returns:
        ``(hu [z, y, x] float32, spacing (z, y, x) mm)``; voxel axis x points to the patient's
        left, y posterior, z superior.
    """
    path = Path(path)
    if fmt == "nifti":
        import nibabel as nib
        from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

        image = nib.load(str(path))
        data = np.asarray(image.dataobj, dtype=np.float32)
        transform = ornt_transform(io_orientation(image.affine), axcodes2ornt(("L", "P", "S")))
        data = apply_orientation(data, transform)
        zooms = np.asarray(image.header.get_zooms()[:3], dtype=float)
        spacing_xyz = np.empty(3)
        spacing_xyz[transform[:, 0].astype(int)] = zooms
        return np.ascontiguousarray(data.T), tuple(float(s) for s in spacing_xyz[::-1])
    if fmt == "dicom":
        import pydicom

        slices = [pydicom.dcmread(f) for f in sorted(path.iterdir()) if f.suffix == ".dcm"]
        if not slices:
            raise ValueError(f"no .dcm files in {path}")
        slices.sort(key=lambda ds: float(ds.ImagePositionPatient[2]))
        hu = np.stack([ds.pixel_array.astype(np.float32) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
                       for ds in slices])
        z_first, z_last = (float(ds.ImagePositionPatient[2]) for ds in (slices[0], slices[-1]))
        dz = (z_last - z_first) / max(len(slices) - 1, 1)
        row, col = (float(v) for v in slices[0].PixelSpacing)
        return hu, (dz, row, col)
    raise ValueError(f"unknown image format {fmt!r} (expected nifti or dicom)")


def preview_plans(plans: list[SubjectPlan], count: int) -> list[SubjectPlan]:
    """``count`` subjects spread over the range of ``cle`` (lowest to highest)."""
    if count < 1:
        raise ValueError(f"preview count must be >= 1, got {count}")
    order = sorted(plans, key=lambda p: (p.cle, p.sid))
    picks = np.unique(np.round(np.linspace(0, len(order) - 1, min(count, len(order)))).astype(int))
    return [order[i] for i in picks]


def _lung_centre(hu: np.ndarray) -> tuple[int, int]:
    """Slice ``k`` at 60 % of the lung height and row ``j`` through the lung centre of ``hu`` [z, y, x]:
    lungs are the air (< -500 HU) enclosed by the body in each axial slice."""
    from scipy import ndimage

    step = max(1, hu.shape[0] // 48)
    ks = np.arange(0, hu.shape[0], step)
    counts, rows = [], []
    for k in ks:
        body = hu[k] > -500
        lung = ndimage.binary_fill_holes(body) & ~body
        counts.append(int(lung.sum()))
        rows.append(float(np.nonzero(lung)[0].mean()) if lung.any() else hu.shape[1] / 2)
    counts = np.asarray(counts)
    if counts.max() == 0:
        return hu.shape[0] // 2, hu.shape[1] // 2
    present = np.nonzero(counts > 0.05 * counts.max())[0]
    pick = int(round(present[0] + 0.6 * (present[-1] - present[0])))
    return int(ks[pick]), int(round(rows[pick]))


def _volume(plan: SubjectPlan, out_dir: Path | None) -> tuple[np.ndarray, tuple[float, float, float], str]:
    if out_dir is not None and (out_dir / plan.image).exists():
        hu, spacing = read_written_image(out_dir / plan.image, plan.format)
        return hu, spacing, "written"
    from pipeline.synth.render import render_subject

    rendered = render_subject(plan)
    return rendered.hu.astype(np.float32), rendered.grid.spacing_zyx, "rendered"


def write_preview(plans: list[SubjectPlan], png: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                  count: int = 6) -> list[str]:
    """Write a montage (one row per subject: axial slice at 60 % of the lung height, coronal slice
    through the hila) to ``png`` atomically. Returns the subject IDs shown."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.files import atomic_path

    chosen = preview_plans(plans, count)
    out_dir = Path(out_dir) if out_dir is not None else None
    fig, axes = plt.subplots(len(chosen), 2, figsize=(8.0, 3.6 * len(chosen)), squeeze=False,
                             gridspec_kw={"width_ratios": [1.0, 1.0]})
    for row, plan in enumerate(chosen):
        hu, (sz, sy, sx), source = _volume(plan, out_dir)
        nz, ny, nx = hu.shape
        k, j = _lung_centre(hu)
        # axial: radiological display (patient's right on the image left; voxel x increases to the left)
        axes[row, 0].imshow(hu[k], cmap="gray", vmin=-1100, vmax=300, interpolation="nearest",
                            extent=(0, nx * sx, ny * sy, 0))
        axes[row, 1].imshow(hu[::-1, j, :], cmap="gray", vmin=-1100, vmax=300, interpolation="nearest",
                            extent=(0, nx * sx, 0, nz * sz))
        axes[row, 0].set_title(f"{plan.sid} ({plan.format}, {plan.orientation}, {source}) axial", fontsize=8)
        axes[row, 1].set_title(f"cle {plan.cle:.3f}  pse {plan.pse:.3f}  awt {plan.awt:.2f} mm  "
                               f"{plan.kernel}, {plan.site}", fontsize=8)
        for ax in axes[row]:
            ax.set_xticks([])
            ax.set_yticks([])
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, dpi=90)
    plt.close(fig)
    return [p.sid for p in chosen]
