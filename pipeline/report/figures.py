"""The report's figures, drawn with matplotlib's object API (Agg; no pyplot global state).

Each function returns a :class:`matplotlib.figure.Figure`; :func:`png` renders one to PNG bytes
(embedded in the HTML as base64) and :func:`save_png` also writes it atomically under
``results/figures/`` with the names in :func:`figure_names` (what Snakemake's ``--report`` picks
up). When the data for a figure is missing, :func:`placeholder` draws the reason instead, so the
declared outputs always exist.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

DPI = 100


def figure_names(config: Mapping[str, Any]) -> list[str]:
    """File stems of the figures the report writes: fixed by the config alone."""
    outcomes = config["evaluate"]["outcomes"]
    names = ["training_curves", "patch_grid"]
    names += [f"scatter_{name}" for name, spec in outcomes.items() if spec["kind"] == "regression"]
    names += [f"confusion_{name}" for name, spec in outcomes.items() if spec["kind"] == "ordinal"]
    if config["cohort"]["truth"]:
        names.append("readout")
    return names + location_map_names(config) + QC_FIGURES


# Drawn in the report's QC section (not in its Figures section).
REGISTRATION_DICE = "registration_dice"
QC_FIGURES = [REGISTRATION_DICE]


def location_map_names(config: Mapping[str, Any]) -> list[str]:
    """File stems of the per-location read-out maps: ``locmap_<run>`` per mapped run."""
    from pipeline.config import location_map_runs

    return [f"locmap_{run}" for run in location_map_runs(config)]


def png(figure: Figure) -> bytes:
    """PNG bytes of a figure."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    return buffer.getvalue()


def save_png(figure: Figure, path: str | os.PathLike) -> bytes:
    """Write the figure to ``path`` atomically; return its PNG bytes."""
    from pipeline.files import atomic_path

    data = png(figure)
    with atomic_path(path, suffix=".png") as tmp:
        tmp.write_bytes(data)
    return data


def placeholder(title: str, message: str) -> Figure:
    """A small figure that states why the real one could not be drawn."""
    figure = Figure(figsize=(6, 1.6))
    ax = figure.add_subplot()
    ax.axis("off")
    ax.set_title(title)
    ax.text(0.5, 0.4, message, ha="center", va="center", wrap=True, fontsize=10, color="0.3")
    return figure


def training_curves(histories: Mapping[str, pd.DataFrame]) -> Figure:
    """Loss (solid: InfoNCE; dashed: IFM term) and contrastive acc@1 per epoch, one line per run.

    Args:
        histories: run -> history table with columns ``epoch, loss, loss_ifm, acc1``.
    """
    figure = Figure(figsize=(10, 3.8))
    ax_loss, ax_acc = figure.subplots(1, 2)
    for index, (run, history) in enumerate(histories.items()):
        color = f"C{index % 10}"
        epochs = history["epoch"].to_numpy(dtype=float)
        ax_loss.plot(epochs, history["loss"].to_numpy(dtype=float), color=color, marker="o", ms=3, label=run)
        if "loss_ifm" in history and history["loss_ifm"].notna().any() and (history["loss_ifm"].fillna(0) != 0).any():
            ax_loss.plot(epochs, history["loss_ifm"].to_numpy(dtype=float), color=color, ls="--", lw=1)
        if "acc1" in history:
            ax_acc.plot(epochs, history["acc1"].to_numpy(dtype=float), color=color, marker="o", ms=3, label=run)
    ax_loss.set(xlabel="epoch", ylabel="loss", title="contrastive loss (dashed: IFM term)")
    ax_acc.set(xlabel="epoch", ylabel="acc@1", title="contrastive top-1 accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    ax_acc.legend(fontsize=8, loc="best")
    figure.tight_layout()
    return figure


def scatter(outcome: str, panels: Sequence[tuple[str, pd.DataFrame]]) -> Figure:
    """Out-of-fold predicted vs observed (repeat 0), one panel per feature set, identity line.

    Args:
        panels: (label, predictions with ``observed, predicted``) pairs.
    """
    figure = Figure(figsize=(4.2 * len(panels), 4))
    axes = np.atleast_1d(figure.subplots(1, len(panels), sharex=True, sharey=True))
    values = np.concatenate([np.r_[p["observed"].to_numpy(float), p["predicted"].to_numpy(float)] for _, p in panels])
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    pad = 0.05 * (hi - lo or 1.0)
    for ax, (label, frame) in zip(axes, panels):
        observed, predicted = frame["observed"].to_numpy(float), frame["predicted"].to_numpy(float)
        ax.scatter(observed, predicted, s=10, alpha=0.6)
        ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="0.4", lw=1, ls="--")
        ss_res = float(np.sum((observed - predicted) ** 2))
        ss_tot = float(np.sum((observed - observed.mean()) ** 2))
        r2 = 1 - ss_res / ss_tot if ss_tot > 0 else float("nan")
        ax.set(title=f"{label} (R² {r2:.2f}, n={observed.size})", xlabel=f"observed {outcome}",
               ylabel=f"predicted {outcome}", xlim=(lo - pad, hi + pad), ylim=(lo - pad, hi + pad))
        ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def confusion(outcome: str, label: str, predictions: pd.DataFrame, levels: int | None = None) -> Figure:
    """Confusion matrix (counts summed over repeats, colour = row fraction) of an ordinal outcome."""
    observed = predictions["observed"].to_numpy(float).astype(int)
    predicted = predictions["predicted"].to_numpy(float).astype(int)
    if levels:
        classes = np.arange(levels)
    else:
        classes = np.unique(np.r_[observed, predicted])
    counts = np.zeros((len(classes), len(classes)), dtype=np.int64)  # [observed, predicted]
    index = {int(c): i for i, c in enumerate(classes)}
    for o, p in zip(observed, predicted):
        if int(o) in index and int(p) in index:
            counts[index[int(o)], index[int(p)]] += 1
    rows = counts.sum(axis=1, keepdims=True)
    fraction = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    figure = Figure(figsize=(1.0 + 0.6 * len(classes), 0.8 + 0.6 * len(classes)))
    ax = figure.add_subplot()
    image = ax.imshow(fraction, cmap="Blues", vmin=0, vmax=1)
    for i in range(len(classes)):
        for j in range(len(classes)):
            ax.text(j, i, str(counts[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if fraction[i, j] > 0.6 else "black")
    ax.set_xticks(range(len(classes)), [str(c) for c in classes])
    ax.set_yticks(range(len(classes)), [str(c) for c in classes])
    ax.set(xlabel="predicted", ylabel="observed", title=f"{outcome}: {label}")
    figure.colorbar(image, ax=ax, fraction=0.046, label="fraction of row")
    figure.tight_layout()
    return figure


def readout_heatmap(table: pd.DataFrame) -> Figure:
    """Heatmap of mean read-out R² (rows: feature sets, columns: latent factors).

    Args:
        table: cells are ``(mean, sd)`` tuples or NaN (see ``tables.readout_table``).
    """
    means = np.array([[cell[0] if isinstance(cell, tuple) else np.nan for cell in row] for row in table.to_numpy()],
                     dtype=float).reshape(table.shape)
    figure = Figure(figsize=(1.6 + 0.9 * table.shape[1], 1.0 + 0.45 * table.shape[0]))
    ax = figure.add_subplot()
    image = ax.imshow(np.clip(means, 0, 1), cmap="viridis", vmin=0, vmax=1, aspect="auto")
    for i in range(means.shape[0]):
        for j in range(means.shape[1]):
            if np.isfinite(means[i, j]):
                ax.text(j, i, f"{means[i, j]:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if means[i, j] > 0.6 else "white")
    ax.set_xticks(range(table.shape[1]), list(table.columns), rotation=30, ha="right")
    ax.set_yticks(range(table.shape[0]), list(table.index))
    ax.set_title("linear read-out of latent factors (out-of-fold R²)")
    figure.colorbar(image, ax=ax, fraction=0.046, label="R² (clipped to [0, 1])")
    figure.tight_layout()
    return figure


def registration_dice(qc: pd.DataFrame, min_dice: float, flag_dice: float) -> Figure:
    """Histogram of the registration Dice of kept subjects, flagged ones stacked in their own colour.

    Args:
        qc: the QC table (``status`` and ``register_dice`` columns; rows without a Dice are counted
            in the title only).
        min_dice, flag_dice: the ``register`` thresholds, drawn as vertical lines.
    """
    from pipeline.qc import KEPT

    figure = Figure(figsize=(6.4, 3.0))
    ax = figure.add_subplot()
    dice = pd.to_numeric(qc.get("register_dice", pd.Series(dtype=float)), errors="coerce")
    groups = [(status, dice[(qc["status"] == status) & dice.notna()].to_numpy()) for status in KEPT]
    values = np.concatenate([v for _, v in groups]) if any(v.size for _, v in groups) else np.zeros(0)
    lo = min(float(values.min()) if values.size else 1.0, min_dice) - 0.02
    bins = np.linspace(lo, 1.0, 41)
    ax.hist([v for _, v in groups], bins=bins, stacked=True, color=["#4c72b0", "#dd8452"],
            label=[f"{status} ({v.size})" for status, v in groups])
    ax.axvline(min_dice, color="#c44e52", linestyle="--", linewidth=1)
    ax.axvline(flag_dice, color="#dd8452", linestyle=":", linewidth=1)
    ax.text(min_dice, ax.get_ylim()[1] * 0.95, " min_dice (failed below)", color="#c44e52", fontsize=8, va="top")
    ax.text(flag_dice, ax.get_ylim()[1] * 0.8, " flag_dice", color="#dd8452", fontsize=8, va="top")
    failed = int((~qc["status"].isin(KEPT)).sum())
    ax.set_title(f"registration Dice of the warped atlas ({failed} subject(s) not kept, not shown)", fontsize=10)
    ax.set_xlabel("Dice with the subject's lungs")
    ax.set_ylabel("subjects")
    ax.legend(fontsize=8, loc="center left")  # the threshold labels sit at the top
    figure.tight_layout()
    return figure


def grid_footprints(ct, transform, centers_mm: np.ndarray, half_mm: float, plane: str, index: int) -> list[np.ndarray]:
    """Outlines of the patches cut by one slice of the subject's CT, in that slice's voxel coordinates.

    As in the ``patches`` stage, each patch centre (``centers_mm [P, 3]``, atlas ITK physical
    ``(x, y, z)``) is mapped through ``transform`` (atlas -> subject physical points) and the patch
    is the axis-aligned cube of half-size ``half_mm`` around the mapped centre: patches keep the
    subject's own scale and orientation, so the outlines are squares on the subject's voxel grid.

    Args:
        ct: SimpleITK image of the subject (canonical, identity direction).
        transform: SimpleITK transform, atlas physical -> subject physical points.
        plane: ``axial`` (slice ``k = index``; outlines in (i, j)) or ``coronal`` (``j = index``; (i, k)).

    Returns:
        One ``[4, 2]`` polygon per patch whose mapped centre lies within half a patch of the slice.
    """
    if plane == "axial":
        normal_axis, axes = 2, (0, 1)
    elif plane == "coronal":
        normal_axis, axes = 1, (0, 2)
    else:
        raise ValueError(f"plane must be 'axial' or 'coronal', got {plane!r}")
    spacing = ct.GetSpacing()
    half = [half_mm / spacing[axis] for axis in axes]
    polygons = []
    for center in np.asarray(centers_mm, dtype=float):
        mapped = ct.TransformPhysicalPointToContinuousIndex(transform.TransformPoint(tuple(center)))
        if abs(mapped[normal_axis] - index) > half_mm / spacing[normal_axis]:
            continue
        u, v = mapped[axes[0]], mapped[axes[1]]
        polygons.append(np.asarray([(u - half[0], v - half[1]), (u + half[0], v - half[1]),
                                    (u + half[0], v + half[1]), (u - half[0], v + half[1])]))
    return polygons


def patch_grid(sid: str, ct, transform, centers_mm: np.ndarray, half_mm: float) -> Figure:
    """Axial and coronal mid-slices of a subject's CT with the mapped patch grid drawn on them."""
    import SimpleITK as sitk
    from matplotlib.patches import Polygon

    array = sitk.GetArrayViewFromImage(ct)  # [z, y, x]
    k_mid, j_mid = array.shape[0] // 2, array.shape[1] // 2
    sx, sy, sz = ct.GetSpacing()
    figure = Figure(figsize=(10, 5))
    ax_axial, ax_coronal = figure.subplots(1, 2)
    window = dict(cmap="gray", vmin=-1024, vmax=200, interpolation="nearest")
    ax_axial.imshow(array[k_mid], origin="upper", aspect=sy / sx, **window)
    ax_coronal.imshow(array[:, j_mid, :], origin="lower", aspect=sz / sx, **window)
    for ax, plane, index in ((ax_axial, "axial", k_mid), (ax_coronal, "coronal", j_mid)):
        for polygon in grid_footprints(ct, transform, centers_mm, half_mm, plane, index):
            ax.add_patch(Polygon(polygon, closed=True, fill=False, edgecolor="tab:orange", lw=0.8, alpha=0.9))
        ax.set_xticks([])
        ax.set_yticks([])
    ax_axial.set_title(f"{sid}: axial slice {k_mid} (patient right on the left)")
    ax_coronal.set_title(f"{sid}: coronal slice {j_mid}")
    figure.tight_layout()
    return figure


def location_map_slices(atlas: np.ndarray, corners: np.ndarray, patch_size: int) -> tuple[int, int]:
    """The axial (``z``) and coronal (``y``) slice indices of the location map.

    Each goes through the atlas lung's centroid along its axis, moved to the middle of the nearest
    layer of grid patches (so that with a step above half the patch size a slice crosses one
    layer only, and every square drawn is the patch nearest the slice).

    Args:
        atlas: label map ``[Z, Y, X]`` (lung > 0).
        corners: int ``[P, 3]`` patch corners ``(z, y, x)`` in ``atlas`` index space.
        patch_size: ``S`` in voxels.
    """
    lung = np.argwhere(atlas > 0)
    if lung.size == 0:
        raise ValueError("the atlas has no lung voxels")
    centroid = lung.mean(axis=0)  # (z, y, x)
    picked = []
    for axis in (0, 1):
        middles = np.unique(np.asarray(corners)[:, axis]) + patch_size // 2
        target = centroid[axis]
        index = int(middles[np.argmin(np.abs(middles - target))]) if middles.size else int(round(target))
        picked.append(int(np.clip(index, 0, atlas.shape[axis] - 1)))
    return picked[0], picked[1]


def location_map(run: str, atlas: np.ndarray, corners: np.ndarray, patch_size: int,
                 values: Mapping[str, np.ndarray], vmax: float = 1.0,
                 spacing: Sequence[float] = (1.0, 1.0, 1.0)) -> Figure:
    """Per-location R² of each target on one axial and one coronal slice of the atlas lung.

    One row per target (left: axial slice, patient right on the left; right: coronal slice,
    superior up). Every location whose patch box ``[corner, corner + S)`` crosses the slice is a
    filled square, coloured by its R² on one colour scale ``[0, vmax]`` shared by all panels
    (values below 0 get the colour of 0; locations without a value are left unfilled). The
    patches nearest the slice are drawn last (on top); the atlas lung is outlined in white.

    Args:
        atlas: label map ``[Z, Y, X]`` (lung > 0).
        corners: int ``[P, 3]`` patch corners ``(z, y, x)`` in ``atlas`` index space (``grid.npz``).
        patch_size: ``S`` in voxels.
        values: target -> R² per location ``[P]`` (NaN = not evaluated).
        vmax: top of the colour scale.
        spacing: atlas voxel size ``(z, y, x)`` in mm (panel aspect ratios).
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.collections import PatchCollection
    from matplotlib.colors import Normalize
    from matplotlib.patches import Rectangle

    atlas = np.asarray(atlas)
    corners = np.asarray(corners, dtype=np.int64)
    k, j = location_map_slices(atlas, corners, patch_size)
    lung = (atlas > 0).astype(float)
    norm = Normalize(vmin=0.0, vmax=max(float(vmax), 1e-6))
    cmap = "viridis"
    sz, sy, sx = (float(v) for v in spacing)
    targets = list(values)
    figure = Figure(figsize=(8.4, 3.4 * max(1, len(targets))))
    axes = np.atleast_2d(figure.subplots(max(1, len(targets)), 2, squeeze=False))
    # (normal axis, slice index, in-plane axes (horizontal, vertical), image, origin, aspect)
    planes = (
        (0, k, (2, 1), lung[k], "upper", sy / sx, f"axial slice z={k} (patient right on the left)"),
        (1, j, (2, 0), lung[:, j, :], "lower", sz / sx, f"coronal slice y={j} (superior up)"),
    )
    for row, target in enumerate(targets):
        r2 = np.asarray(values[target], dtype=float)
        if r2.shape != (corners.shape[0],):
            raise ValueError(f"values[{target!r}] has shape {r2.shape}, expected [{corners.shape[0]}]")
        for col, (normal, index, (u, v), image, origin, aspect, title) in enumerate(planes):
            ax = axes[row, col]
            ax.imshow(image, cmap="gray", vmin=-0.6, vmax=1.6, origin=origin, aspect=aspect, interpolation="nearest")
            crossing = np.flatnonzero((corners[:, normal] <= index) & (index < corners[:, normal] + patch_size))
            distance = np.abs(corners[crossing, normal] + 0.5 * (patch_size - 1) - index)
            crossing = crossing[np.argsort(-distance, kind="stable")]  # nearest the slice drawn last
            filled = crossing[np.isfinite(r2[crossing])]
            empty = crossing[~np.isfinite(r2[crossing])]
            squares = [Rectangle((corners[p, u] - 0.5, corners[p, v] - 0.5), patch_size, patch_size) for p in filled]
            if squares:
                collection = PatchCollection(squares, cmap=cmap, norm=norm, edgecolor="0.15", linewidth=0.4)
                collection.set_array(np.clip(r2[filled], 0.0, None))
                ax.add_collection(collection)
            if empty.size:
                ax.add_collection(PatchCollection(
                    [Rectangle((corners[p, u] - 0.5, corners[p, v] - 0.5), patch_size, patch_size) for p in empty],
                    facecolor="none", edgecolor="0.5", linewidth=0.4, linestyle=":"))
            if image.any():
                ax.contour(image, levels=[0.5], colors="white", linewidths=0.8)  # (col, row) like imshow
            ax.set_xlim(-0.5, image.shape[1] - 0.5)
            ax.set_ylim(*((image.shape[0] - 0.5, -0.5) if origin == "upper" else (-0.5, image.shape[0] - 0.5)))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{target}: {title}", fontsize=9)
    figure.suptitle(f"{run}: out-of-fold R² from each location's embedding alone", fontsize=11)
    figure.tight_layout(rect=(0, 0, 0.9, 0.97))
    bar = figure.add_axes((0.91, 0.1, 0.02, 0.8))
    figure.colorbar(ScalarMappable(norm=norm, cmap=cmap), cax=bar, label="R² (clipped at 0)")
    return figure
