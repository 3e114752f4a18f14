"""Stage ``atlas`` (runs once): atlas lung mask, patch grid and patch adjacency graph.

The atlas is built from a deterministic sample of ``atlas.build_subjects`` subjects
(:func:`pipeline.template.atlas_sample`, by a hash of the subject IDs; the workflow passes it, so
the atlas depends on these subjects only), among those whose lung stage is ok:

- ``method: groupwise`` (default): their mean lung shape by iterative groupwise affine
  registration (:func:`pipeline.template.groupwise_template`);
- ``method: median_volume``: the lung mask of the sample's median-lung-volume subject.

Either way it is cropped to the lung bounding box plus a margin of ``max(S, T)`` voxels (zeros are
padded where the margin leaves the volume). With ``atlas.reference`` (a directory holding
``atlas_lung.nii.gz`` and ``grid.npz``, or a bundle with them under ``atlas/``) the stage copies
that atlas and grid instead, and depends on nothing from the cohort. The patch grid lives in atlas
space:

- a lattice of patch corners with step ``T`` that is centred on the lung bounding box and
  covers it, kept where the fraction of the ``S³`` patch inside the atlas lung is at least
  ``min_lung_fraction``;
- each patch's centre as an ITK physical point (for registration transforms) and normalised
  to ``[-1, 1]`` over the lung bounding box (encoder input);
- an undirected adjacency graph: two patches are joined when their overlap volume divided by
  ``S³`` is at least ``adjacency_cutoff``; that overlap is the edge weight. Patches one step
  apart along one axis overlap by ``(S - T) / S``; one step apart along two axes by
  ``((S - T) / S)²``, and so on.

``grid.npz`` keys and shapes are fixed in docs/architecture.md ("grid.npz").
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, CopdsslError
from pipeline.grid import read_grid
from pipeline.layout import ATLAS_MASK_NAME, GRID_NAME

log = logging.getLogger(__name__)

STAGE = "atlas"


@dataclass(frozen=True)
class GridSpec:
    """Patch grid parameters; rejects bad values with ``ValueError``.

    Attributes:
        patch_size: S, patch edge in voxels (>= 1).
        step: T, lattice step in voxels (>= 1).
        min_lung_fraction: keep patches with at least this fraction inside the lung (0..1).
        adjacency_cutoff: keep edges with overlap / S³ at least this (0..1).
    """

    patch_size: int
    step: int
    min_lung_fraction: float
    adjacency_cutoff: float

    def __post_init__(self):
        for name in ("patch_size", "step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        for name in ("min_lung_fraction", "adjacency_cutoff"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")

    @property
    def margin(self) -> int:
        """Crop margin around the lung bounding box, in voxels."""
        return max(self.patch_size, self.step)

    @classmethod
    def from_settings(cls, settings: dict[str, Any]) -> GridSpec:
        """From the config's validated ``atlas`` section (the schema holds the defaults)."""
        return cls(**{name: settings[name] for name in ("patch_size", "step", "min_lung_fraction", "adjacency_cutoff")})


def choose_atlas_subject(volumes: dict[str, float]) -> str:
    """The subject whose lung volume is closest to the cohort median (ties: first sid in sort order).

    Args:
        volumes: sid -> total lung volume.
    """
    if not volumes:
        raise ValueError("choose_atlas_subject needs at least one subject")
    median = float(np.median(list(volumes.values())))
    return min(sorted(volumes), key=lambda sid: abs(volumes[sid] - median))


def lung_bbox(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Inclusive bounding box ``(lo, hi)`` (int64 ``[3]`` each, ``(z, y, x)``) of a non-empty mask."""
    if not mask.any():
        raise ValueError("the lung mask is empty")
    lo = np.array([np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))).min() for axis in range(3)])
    hi = np.array([np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis))).max() for axis in range(3)])
    return lo.astype(np.int64), hi.astype(np.int64)


def crop_atlas(labels, margin: int):
    """Crop a label image to its lung bounding box plus ``margin`` voxels (zero-padded if needed).

    Args:
        labels: SimpleITK uint8 label image (0, 1, 2), canonical orientation.
        margin: voxels added on every side.

    Returns:
        The cropped SimpleITK image; its origin keeps every voxel at its physical position.
    """
    import SimpleITK as sitk

    array = sitk.GetArrayViewFromImage(labels)
    lo, hi = lung_bbox(array > 0)
    start, stop = lo - margin, hi + 1 + margin
    padded = np.zeros(tuple(int(n) for n in stop - start), np.uint8)
    src_lo, src_hi = np.maximum(start, 0), np.minimum(stop, array.shape)
    padded[tuple(slice(a - s, b - s) for a, b, s in zip(src_lo, src_hi, start))] = \
        array[tuple(slice(a, b) for a, b in zip(src_lo, src_hi))]
    cropped = sitk.GetImageFromArray(padded)
    cropped.SetSpacing(labels.GetSpacing())
    cropped.SetDirection(labels.GetDirection())
    cropped.SetOrigin(labels.TransformIndexToPhysicalPoint([int(v) for v in start[::-1]]))
    return cropped


def lattice_corners(lo: np.ndarray, hi: np.ndarray, patch_size: int, step: int) -> list[np.ndarray]:
    """Per axis, the corner positions of a lattice with step ``T`` covering ``[lo, hi]`` and centred on it.

    Args:
        lo, hi: inclusive bounding box ``(z, y, x)``.

    Returns:
        three int64 arrays (z, y, x) of corner positions.
    """
    axes = []
    for a, b in zip(lo, hi):
        length = int(b - a + 1)
        count = max(1, -(-(length - patch_size) // step) + 1)
        span = (count - 1) * step + patch_size
        start = int(a) - (span - length) // 2
        axes.append(start + step * np.arange(count, dtype=np.int64))
    return axes


def box_sums(mask: np.ndarray, corners: np.ndarray, size: int) -> np.ndarray:
    """Number of true voxels of ``mask`` in each ``size³`` box, by a summed-volume table.

    Args:
        mask: bool ``[Z, Y, X]``.
        corners: int ``[P, 3]`` box corners ``(z, y, x)``; boxes must lie inside the array.

    Returns:
        int64 ``[P]``.
    """
    table = np.zeros(tuple(n + 1 for n in mask.shape), np.int64)
    table[1:, 1:, 1:] = mask.cumsum(0, dtype=np.int64).cumsum(1).cumsum(2)
    a = np.asarray(corners, np.int64)
    b = a + size
    if a.size and (a.min() < 0 or np.any(b > np.array(mask.shape))):
        raise ValueError("a patch box leaves the atlas array; the crop margin is too small")
    total = np.zeros(len(a), np.int64)
    for dz in (0, 1):
        for dy in (0, 1):
            for dx in (0, 1):
                sign = (-1) ** (3 - dz - dy - dx)
                total += sign * table[(b if dz else a)[:, 0], (b if dy else a)[:, 1], (b if dx else a)[:, 2]]
    return total


def adjacency(lattice_index: np.ndarray, patch_size: int, step: int, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Overlap graph of patches on one lattice.

    Args:
        lattice_index: int ``[P, 3]`` lattice coordinates ``(z, y, x)`` of each patch
            (corner = origin + step * index).
        patch_size: S; step: T; cutoff: smallest kept overlap / S³.

    Returns:
        ``edges`` int64 ``[2, E]`` (both directions listed, sorted by source then target) and
        ``edge_weight`` float32 ``[E]`` = overlap volume / S³.
    """
    index = np.asarray(lattice_index, np.int64)
    if len(index) == 0:
        return np.zeros((2, 0), np.int64), np.zeros(0, np.float32)
    reach = (patch_size - 1) // step  # farthest lattice offset with a positive overlap
    shape = index.max(axis=0) + 1
    lookup = np.full(tuple(int(n) for n in shape), -1, np.int64)
    lookup[tuple(index.T)] = np.arange(len(index))
    sources, targets, weights = [], [], []
    offsets = range(-reach, reach + 1)
    for dz in offsets:
        for dy in offsets:
            for dx in offsets:
                if dz == dy == dx == 0:
                    continue
                weight = float(np.prod([patch_size - abs(d) * step for d in (dz, dy, dx)])) / patch_size**3
                if weight < cutoff:
                    continue
                other = index + np.array([dz, dy, dx])
                inside = np.all((other >= 0) & (other < shape), axis=1)
                neighbour = np.full(len(index), -1, np.int64)
                neighbour[inside] = lookup[tuple(other[inside].T)]
                found = np.flatnonzero(neighbour >= 0)
                sources.append(found)
                targets.append(neighbour[found])
                weights.append(np.full(found.size, weight, np.float32))
    if not sources:
        return np.zeros((2, 0), np.int64), np.zeros(0, np.float32)
    src, dst, w = np.concatenate(sources), np.concatenate(targets), np.concatenate(weights)
    order = np.lexsort((dst, src))
    return np.stack([src[order], dst[order]]), w[order]


def build_grid(atlas, spec: GridSpec) -> dict[str, np.ndarray]:
    """The patch grid of an atlas lung label image.

    Args:
        atlas: SimpleITK uint8 label image (cropped by :func:`crop_atlas`), isotropic spacing.
        spec: grid parameters.

    Returns:
        dict with the ``grid.npz`` keys: ``corners`` int32 ``[P, 3]`` (z, y, x), ``centers_mm``
        float64 ``[P, 3]`` (x, y, z, LPS mm), ``locations`` float32 ``[P, 3]`` (z, y, x in
        [-1, 1] over the lung bounding box), ``lung_fraction`` float32 ``[P]``, ``edges`` int64
        ``[2, E]``, ``edge_weight`` float32 ``[E]``, ``patch_size``, ``step``, ``spacing_mm``.
    """
    import SimpleITK as sitk

    spacing = np.asarray(atlas.GetSpacing(), float)
    if not np.allclose(spacing, spacing[0], rtol=1e-3):
        raise ValueError(f"the atlas must have isotropic voxels, got spacing {tuple(spacing)} mm")
    mask = sitk.GetArrayViewFromImage(atlas) > 0
    lo, hi = lung_bbox(mask)
    S, T = spec.patch_size, spec.step
    axes = lattice_corners(lo, hi, S, T)
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    lattice = np.stack(np.meshgrid(*(np.arange(a.size) for a in axes), indexing="ij"), axis=-1).reshape(-1, 3)
    fraction = box_sums(mask, grid, S) / float(S**3)
    keep = fraction >= spec.min_lung_fraction
    corners, lattice, fraction = grid[keep], lattice[keep], fraction[keep]
    edges, weights = adjacency(lattice, S, T, spec.adjacency_cutoff)

    centres = corners + (S - 1) / 2.0  # continuous voxel index (z, y, x) of each patch centre
    extent = np.maximum(hi - lo, 1).astype(float)
    locations = 2.0 * (centres - lo) / extent - 1.0
    centers_mm = np.array([atlas.TransformContinuousIndexToPhysicalPoint(tuple(float(v) for v in c[::-1]))
                           for c in centres], dtype=np.float64).reshape(-1, 3)
    return {
        "corners": corners.astype(np.int32),
        "centers_mm": centers_mm,
        "locations": locations.astype(np.float32),
        "lung_fraction": fraction.astype(np.float32),
        "edges": edges.astype(np.int64),
        "edge_weight": weights.astype(np.float32),
        "patch_size": np.int64(S),
        "step": np.int64(T),
        "spacing_mm": np.float64(spacing[0]),
    }


# ---- stage ---------------------------------------------------------------------------------


def reference_files(reference) -> tuple[Path, Path]:
    """The atlas mask and grid of ``atlas.reference``: a directory with them, or a bundle's ``atlas/``.

    Raises:
        ConfigError: when neither layout holds both files.
    """
    root = Path(reference)
    for folder in (root, root / "atlas"):
        mask, grid = folder / ATLAS_MASK_NAME, folder / GRID_NAME
        if mask.is_file() and grid.is_file():
            return mask, grid
    raise ConfigError(f"config key 'atlas.reference': {reference} holds no {ATLAS_MASK_NAME} and {GRID_NAME} "
                      "(directly or under atlas/)")


def check_reference_grid(grid: dict[str, np.ndarray], spec: GridSpec, source) -> None:
    """A supplied grid must have the configured patch size and step (one-line ``ConfigError`` if not)."""
    for key, wanted in (("patch_size", spec.patch_size), ("step", spec.step)):
        if int(grid[key]) != wanted:
            raise ConfigError(f"config key 'atlas.{key}': {wanted} differs from the reference grid {source} "
                              f"({key} {int(grid[key])})")


def sample_labels(sids: list[str], work) -> dict[str, Any]:
    """Lung label images of the sample subjects whose lung stage is ok (sid -> SimpleITK image)."""
    from pipeline.ct_io import read_volume
    from pipeline.layout import Layout
    from pipeline.logs import progress
    from pipeline.lung import check_canonical
    from pipeline.status import passed_subjects

    layout = Layout(work=Path(work))
    ok = passed_subjects(layout, sids, "lung", missing="skip")
    if len(ok) < len(sids):
        log.warning("atlas: %d of the %d sample subjects have no ok lung stage and are left out: %s",
                    len(sids) - len(ok), len(sids), ", ".join(s for s in sids if s not in ok))
    labels = {}
    for sid in progress(ok, desc="atlas: reading the sample", unit="subject"):
        labels[sid] = read_volume(layout.lung(sid), sid, STAGE)
        check_canonical(labels[sid], sid, STAGE)
    return labels


def build_atlas(labels: dict[str, Any], settings: dict[str, Any], spec: GridSpec) -> tuple[Any, dict[str, Any]]:
    """The cropped atlas label image of a sample and a summary (method, sample, per-method details)."""
    import SimpleITK as sitk

    from pipeline.logs import progress
    from pipeline.template import groupwise_template

    sids = list(labels)
    summary: dict[str, Any] = {"method": settings["method"], "sample": sids}
    if settings["method"] == "median_volume":
        volumes = {sid: float(np.count_nonzero(sitk.GetArrayViewFromImage(image))) for sid, image in labels.items()}
        sid = choose_atlas_subject(volumes)
        summary["atlas_sid"] = sid
        return crop_atlas(labels[sid], spec.margin), summary
    template, info = groupwise_template([labels[s] for s in sids], rounds=settings["rounds"], margin=spec.margin,
                                        register_settings=settings["register"], progress=progress)
    summary.update(start_sid=sids[info["start"]], soft_dice=info["soft_dice"], mean_scale=info["mean_scale"])
    return template, summary


def run_atlas(*, sids: list[str], work, out_atlas, out_grid, settings: dict[str, Any],
              register_settings: dict[str, Any]) -> dict[str, Any]:
    """Build (or copy from ``atlas.reference``) and write the atlas lung mask and ``grid.npz``.

    Args:
        sids: the atlas sample (:func:`pipeline.template.atlas_sample`); unused with a reference.
        settings: the config's validated ``atlas`` section.
        register_settings: the validated ``register`` section (the groupwise registrations use its
            :data:`pipeline.register.FIT_KEYS`).

    Returns:
        summary: method, sample, number of patches and edges.

    Raises:
        CopdsslError: when no sample subject passed the lung stage, or the grid is empty.
    """
    import shutil

    from pipeline.ct_io import read_volume, write_volume
    from pipeline.files import atomic_path, write_npz
    from pipeline.register import FIT_KEYS

    try:
        spec = GridSpec.from_settings(settings)
    except ValueError as error:
        raise ConfigError(f"config key 'atlas.{str(error).split()[0]}': {error}") from None
    if settings["reference"]:
        mask_path, grid_path = reference_files(settings["reference"])
        grid = read_grid(grid_path)
        check_reference_grid(grid, spec, grid_path)
        read_volume(mask_path, None, STAGE)  # readable as a volume: a truncated file fails here with its path
        for source, target in ((mask_path, out_atlas), (grid_path, out_grid)):
            with atomic_path(target) as tmp:
                shutil.copyfile(source, tmp)
        summary = {"method": "reference", "reference": str(settings["reference"]),
                   "patches": int(len(grid["corners"])), "edges": int(grid["edges"].shape[1])}
        log.info("atlas: copied %s and %s (%d patches)", mask_path, grid_path, summary["patches"])
        return summary
    labels = sample_labels(list(sids), work)
    if not labels:
        raise CopdsslError(f"atlas: none of the {len(sids)} sample subjects has an ok lung status; cannot build "
                           "the atlas (raise atlas.build_subjects or fix the lung stage)")
    atlas, summary = build_atlas(labels, {**settings, "register": {key: register_settings[key] for key in FIT_KEYS}}, spec)
    grid = build_grid(atlas, spec)
    if len(grid["corners"]) == 0:
        raise CopdsslError(f"atlas: no patch of the atlas has a lung fraction ≥ {spec.min_lung_fraction}")
    write_volume(atlas, out_atlas)
    write_npz(out_grid, **grid)
    summary.update(patches=int(len(grid["corners"])), edges=int(grid["edges"].shape[1]))
    log.info("atlas: %s of %d sample subjects, %d patches of %d³ voxels, %d directed edges", settings["method"],
             len(labels), summary["patches"], spec.patch_size, summary["edges"])
    return summary


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sids", nargs="*", default=None,
                        help="the atlas sample (default: pipeline.template.atlas_sample of --subjects)")
    parser.add_argument("--subjects", help="screened subjects (work/subjects.tsv), to draw the sample by hand")
    parser.add_argument("--work", required=True, help="work directory (statuses, lung masks)")
    parser.add_argument("--register-settings", help="the register section as JSON (used by Snakemake)")
    parser.add_argument("--out-atlas", required=True, help="atlas lung labels to write (work/atlas/atlas_lung.nii.gz)")
    parser.add_argument("--out-grid", required=True, help="patch grid to write (work/atlas/grid.npz)")


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import full_config, parse_settings, stage_settings
    from pipeline.template import atlas_sample

    settings = stage_settings(args, "atlas")
    if args.register_settings:
        register = parse_settings(args.register_settings, "register", "--register-settings")
    elif args.settings:  # one source for both sections: never the file's register beside JSON atlas settings
        raise ConfigError("atlas: --settings needs --register-settings (both sections as JSON, as Snakemake "
                          "passes them), or give neither and use --config")
    else:
        register = full_config(args)["register"]
    sids = args.sids
    if sids is None:
        if not args.subjects and not settings["reference"]:
            raise ConfigError("atlas: give the sample (--sids) or the subjects table to draw it from (--subjects)")
        from pipeline.manifest import read_subjects

        sids = atlas_sample([s.sid for s in read_subjects(args.subjects)], settings["build_subjects"]) \
            if args.subjects else []
    run_atlas(sids=sids, work=args.work, out_atlas=args.out_atlas, out_grid=args.out_grid, settings=settings,
              register_settings=register)
    return 0
