"""Stage ``patches``: cut one ``S³`` patch per atlas grid location out of a subject's CT.

Each grid centre (``centers_mm``, atlas physical space) is carried into the subject by the
registration transform (atlas points → subject points) and converted to the nearest voxel of
the subject CT; an axis-aligned ``S³`` box centred there is copied. Patches keep the subject's
native scale and orientation (no resampling): the transform only decides *where* each patch is.
HU values are clipped to ``patches.clip_hu`` and voxels outside the CT are filled with -1024 HU
(clipped to the same range). The result, int16 ``[P, S, S, S]`` with row *p* = grid location *p*,
is written atomically as a memory-mappable ``.npy``.

With ``patches.lung_mask`` (default on) the subject's lung labels are cut with the same boxes and
stored beside the patches (``work/patches_lung/{sid}.npy``) as bit-packed lung membership, uint8
``[P, S, S, ceil(S/8)]`` (``np.packbits`` along the last axis, little bit order; unpack with
:func:`unpack_masks`), so that training and embedding can blank non-lung voxels
(``train.input.lung_mask``). Packing keeps the masks at 1/16 of the patches' size.

QC in the status: number of patches, mean fraction of patch voxels inside the subject lung mask
(when ``--lung`` is given) and the fraction of padded voxels. A subject whose patches are mostly
padding (more than :data:`MAX_PADDED_FRACTION`) fails: its transform puts the grid outside the CT.
"""

from __future__ import annotations

import argparse
import logging
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from pipeline.errors import SubjectError

log = logging.getLogger(__name__)

STAGE = "patches"
PAD_HU = -1024
MAX_PADDED_FRACTION = 0.5
SPACING_TOLERANCE = 0.01  # relative difference allowed between CT and atlas voxel sizes


def patch_corners(centers_mm: np.ndarray, transform, image, patch_size: int) -> np.ndarray:
    """Subject voxel corners ``(z, y, x)`` of the patches centred at the mapped grid centres.

    Args:
        centers_mm: float64 ``[P, 3]`` grid centres, physical ``(x, y, z)`` in atlas space.
        transform: SimpleITK transform mapping atlas points → subject points.
        image: the subject image (defines the physical → index mapping).
        patch_size: S.

    Returns:
        int64 ``[P, 3]`` corners; a patch spans ``corner .. corner + S - 1`` on each axis
        (possibly outside the image). A centre at continuous index ``c`` gets the corner
        ``floor(c - (S - 1) / 2 + 0.5)``, so an identity transform on the atlas grid returns the
        grid's own corners.
    """
    centers_mm = np.asarray(centers_mm, np.float64).reshape(-1, 3)
    half = (patch_size - 1) / 2.0
    corners = np.empty((len(centers_mm), 3), np.int64)
    for p, centre in enumerate(centers_mm):
        mapped = transform.TransformPoint(tuple(float(v) for v in centre))
        index_xyz = np.asarray(image.TransformPhysicalPointToContinuousIndex(mapped))
        corners[p] = np.floor(index_xyz[::-1] - half + 0.5)
    return corners


def extract_patches(volume: np.ndarray, corners: np.ndarray, patch_size: int,
                    fill: int | float) -> tuple[np.ndarray, int]:
    """Copy ``S³`` boxes out of ``volume``, filling what lies outside it.

    Args:
        volume: array ``[Z, Y, X]``.
        corners: int ``[P, 3]`` box corners ``(z, y, x)``, may lie partly or wholly outside.
        patch_size: S.
        fill: value of voxels outside ``volume``.

    Returns:
        (``[P, S, S, S]`` array of ``volume``'s dtype, number of filled voxels).
    """
    S = int(patch_size)
    out = np.full((len(corners), S, S, S), fill, dtype=volume.dtype)
    shape = np.asarray(volume.shape)
    padded = 0
    for p, corner in enumerate(np.asarray(corners, np.int64)):
        lo = np.maximum(corner, 0)
        hi = np.minimum(corner + S, shape)
        if np.any(hi <= lo):
            padded += S**3
            continue
        src = tuple(slice(a, b) for a, b in zip(lo, hi))
        dst = tuple(slice(a - c, b - c) for a, b, c in zip(lo, hi, corner))
        out[(p, *dst)] = volume[src]
        padded += S**3 - int(np.prod(hi - lo))
    return out, padded


def pack_masks(masks: np.ndarray) -> np.ndarray:
    """bool ``[P, S, S, S]`` -> uint8 ``[P, S, S, ceil(S/8)]`` (bits along the last axis, little order)."""
    return np.packbits(np.asarray(masks, dtype=bool), axis=-1, bitorder="little")


def unpack_masks(packed: np.ndarray, patch_size: int) -> np.ndarray:
    """uint8 ``[..., S, S, ceil(S/8)]`` from :func:`pack_masks` -> bool ``[..., S, S, S]``."""
    return np.unpackbits(np.asarray(packed), axis=-1, count=int(patch_size), bitorder="little").astype(bool)


def cut_patches(ct, grid: dict[str, np.ndarray], transform, *, clip_hu=(-1024, 3071), lung=None,
                sid: str | None = None, with_masks: bool = False) -> tuple[np.ndarray, dict[str, Any]] | tuple[
                    np.ndarray, dict[str, Any], np.ndarray]:
    """All grid patches of one subject.

    Args:
        ct: SimpleITK int16 HU image (canonical orientation).
        grid: ``grid.npz`` contents (``centers_mm``, ``patch_size``, ``spacing_mm``).
        transform: atlas points → subject points.
        clip_hu: ``(low, high)`` HU clipping range.
        lung: optional SimpleITK label image on the CT grid, for the lung-fraction QC.
        sid: subject ID for error messages.
        with_masks: also return the lung masks cut like the patches (needs ``lung``).

    Returns:
        (int16 ``[P, S, S, S]``, QC dict with ``n_patches``, ``padded_fraction`` and, with
        ``lung``, ``lung_fraction``) and, with ``with_masks``, bool ``[P, S, S, S]`` lung masks
        (voxels outside the CT are not lung).
    """
    import SimpleITK as sitk

    low, high = (float(v) for v in clip_hu)
    if not low < high:
        raise ValueError(f"clip_hu must be (low, high) with low < high, got {tuple(clip_hu)!r}")
    S = int(grid["patch_size"])
    spacing = np.asarray(ct.GetSpacing())
    atlas_spacing = float(grid["spacing_mm"])
    if np.any(np.abs(spacing - atlas_spacing) > SPACING_TOLERANCE * atlas_spacing):
        sizes = tuple(round(float(s), 4) for s in spacing)
        raise SubjectError(sid, f"CT voxel size {sizes} mm differs from the atlas grid's {atlas_spacing:g} mm; "
                                "ingest every subject at the same spacing", STAGE)
    corners = patch_corners(grid["centers_mm"], transform, ct, S)
    fill = int(np.clip(PAD_HU, low, high))
    volume = sitk.GetArrayViewFromImage(ct)
    patches, padded = extract_patches(volume, corners, S, fill)
    np.clip(patches, int(np.ceil(low)), int(np.floor(high)), out=patches)
    patches = patches.astype(np.int16, copy=False)
    total = max(patches.size, 1)
    qc: dict[str, Any] = {"n_patches": int(len(patches)), "patch_size": S, "padded_fraction": round(padded / total, 5)}
    if with_masks and lung is None:
        raise ValueError("cut_patches: with_masks needs the lung labels")
    inside = None
    if lung is not None:
        inside, _ = extract_patches(sitk.GetArrayViewFromImage(lung) > 0, corners, S, False)
        qc["lung_fraction"] = round(float(inside.mean()) if inside.size else 0.0, 5)
    if padded / total > MAX_PADDED_FRACTION:
        raise SubjectError(sid, f"patches fall outside the CT: {100 * padded / total:.0f} % of patch voxels are "
                                f"padding (limit {100 * MAX_PADDED_FRACTION:.0f} %); check the registration", STAGE)
    return (patches, qc, inside) if with_masks else (patches, qc)


# ---- stage ---------------------------------------------------------------------------------


def run_patches(*, sid: str, ct_path, transform_path, grid_path, out, status_path, upstream=(), lung_path=None,
                mask_out=None, clip_hu: Sequence[float]) -> dict[str, Any]:
    """The ``patches`` stage for one subject: int16 ``[P, S, S, S]`` to ``out`` (``.npy``).

    Args:
        lung_path: optional lung labels for the ``lung_fraction`` QC value (and the masks).
        mask_out: where to write the bit-packed lung masks (:func:`pack_masks`); needs ``lung_path``.
        clip_hu: ``patches.clip_hu``, the stored HU range ``[low, high]``.

    Returns:
        the status dict written to ``status_path``.
    """
    from pipeline.status import run_subject_stage

    from pipeline.errors import ConfigError

    if mask_out is not None and lung_path is None:
        raise ConfigError("patches: --out-mask needs --lung (the masks are cut from the lung labels)")
    if (not isinstance(clip_hu, (list, tuple)) or len(clip_hu) != 2
            or any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in clip_hu)
            or not clip_hu[0] < clip_hu[1]):
        raise ConfigError(f"config key 'patches.clip_hu': {clip_hu!r} is not [low, high] with low < high")

    def work() -> dict[str, Any]:
        from pipeline.grid import read_grid
        from pipeline.ct_io import read_volume
        from pipeline.files import write_npy
        from pipeline.lung import check_canonical
        from pipeline.register import read_transform

        started = time.perf_counter()
        ct = read_volume(ct_path, sid, STAGE)
        check_canonical(ct, sid, STAGE)
        lung = read_volume(lung_path, sid, STAGE) if lung_path else None
        transform = read_transform(transform_path, sid, STAGE)
        grid = read_grid(grid_path, "centers_mm", "patch_size", "spacing_mm")
        cut = cut_patches(ct, grid, transform, clip_hu=tuple(clip_hu), lung=lung, sid=sid,
                          with_masks=mask_out is not None)
        patches, qc = cut[0], cut[1]
        write_npy(out, patches)
        if mask_out is not None:
            write_npy(mask_out, pack_masks(cut[2]))
        qc["seconds"] = round(time.perf_counter() - started, 2)
        lung_note = f", {100 * qc['lung_fraction']:.0f} % lung" if "lung_fraction" in qc else ""
        log.info("subject %s: %d patches of %d³ voxels, %.1f %% padding%s (%.1f s)", sid, qc["n_patches"],
                 qc["patch_size"], 100 * qc["padded_fraction"], lung_note, qc["seconds"])
        return qc

    outputs = [out] if mask_out is None else [out, mask_out]
    return run_subject_stage(sid=sid, stage=STAGE, status_path=status_path, outputs=outputs, work=work,
                             upstream=upstream)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--sid", required=True, help="subject ID")
    parser.add_argument("--ct", required=True, help="ingested CT (work/ct/{sid}.nii.gz)")
    parser.add_argument("--transform", required=True, help="atlas → subject transform (work/transforms/{sid}.tfm)")
    parser.add_argument("--grid", required=True, help="patch grid (work/atlas/grid.npz)")
    parser.add_argument("--lung", help="subject lung labels, for the lung-fraction QC (optional)")
    parser.add_argument("--upstream", action="append", default=[], help="upstream status JSON (repeatable)")
    parser.add_argument("--out", required=True, help="patches to write (work/patches/{sid}.npy)")
    parser.add_argument("--out-mask", help="bit-packed lung masks to write (work/patches_lung/{sid}.npy; needs --lung)")
    parser.add_argument("--status", required=True, help="status JSON to write (work/qc/patches/{sid}.json)")


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import stage_settings

    run_patches(sid=args.sid, ct_path=args.ct, transform_path=args.transform, grid_path=args.grid, out=args.out,
                status_path=args.status, upstream=args.upstream, lung_path=args.lung, mask_out=args.out_mask,
                clip_hu=stage_settings(args, "patches")["clip_hu"])
    return 0
