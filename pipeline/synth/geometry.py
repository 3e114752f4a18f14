"""Coordinate frames of the synthetic cohort (numpy only).

Three frames, all in mm:

- **voxel** indices ``(k, j, i)`` of a :class:`~pipeline.synth.plan.Grid` (array order ``[z, y, x]``);
- **world**: LPS patient coordinates ``(x, y, z)`` (+x Left, +y Posterior, +z Superior), the
  frame of DICOM ``ImagePositionPatient``. The grid is axis-aligned in it;
- **body**: LPS-oriented, centred on the body axis at the vertical centre of the lungs; the
  anatomy is defined here, and :class:`~pipeline.synth.plan.Pose` maps it to world.

NIfTI affines are RAS (nibabel), i.e. ``diag(-1, -1, 1)`` times LPS: the subject's right has
*negative* LPS x and *positive* RAS x.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.synth.plan import Grid, Pose

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def rotation_matrix(rotation_deg: tuple[float, float, float]) -> np.ndarray:
    """``Rz @ Ry @ Rx`` for angles (about x, y, z) in degrees; ``[3, 3]``."""
    ax, ay, az = (math.radians(a) for a in rotation_deg)
    rx = np.array([[1, 0, 0], [0, math.cos(ax), -math.sin(ax)], [0, math.sin(ax), math.cos(ax)]])
    ry = np.array([[math.cos(ay), 0, math.sin(ay)], [0, 1, 0], [-math.sin(ay), 0, math.cos(ay)]])
    rz = np.array([[math.cos(az), -math.sin(az), 0], [math.sin(az), math.cos(az), 0], [0, 0, 1]])
    return rz @ ry @ rx


def body_to_world(pose: Pose, points: np.ndarray) -> np.ndarray:
    """Body-frame points ``[..., 3]`` (x, y, z) to LPS world ``[..., 3]``."""
    r = rotation_matrix(pose.rotation_deg)
    return np.asarray(pose.centre_lps) + pose.scale * (np.asarray(points, dtype=float) @ r.T)


def world_to_body(pose: Pose, points: np.ndarray) -> np.ndarray:
    """LPS world points ``[..., 3]`` to the body frame ``[..., 3]``."""
    r = rotation_matrix(pose.rotation_deg)
    return ((np.asarray(points, dtype=float) - np.asarray(pose.centre_lps)) @ r) / pose.scale


def voxel_to_world_matrix(grid: Grid) -> np.ndarray:
    """``[4, 4]`` matrix taking homogeneous ``(i, j, k, 1)`` to LPS ``(x, y, z, 1)``."""
    sz, sy, sx = grid.spacing_zyx
    matrix = np.diag([sx, sy, sz, 1.0])
    matrix[:3, 3] = grid.origin_lps
    return matrix


def body_coordinate_axes(grid: Grid, pose: Pose, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """Affine map from voxel indices to body coordinates, split per axis for broadcasting.

    Returns ``(weights, offset)``: ``weights[c]`` is ``[3]`` (per-voxel-axis ``i, j, k``
    increment of body coordinate ``c``) and ``offset[c]`` the body coordinate of voxel 0, so that
    ``u_c[k, j, i] = offset[c] + weights[c] @ (i, j, k)``.
    """
    r = rotation_matrix(pose.rotation_deg)
    sz, sy, sx = grid.spacing_zyx
    weights = (r.T * np.array([sx, sy, sz])[None, :]) / pose.scale        # [c, axis]
    offset = (r.T @ (np.asarray(grid.origin_lps) - np.asarray(pose.centre_lps))) / pose.scale
    return weights.astype(dtype), offset.astype(dtype)


def body_coordinates(grid: Grid, pose: Pose, z_slice: slice = slice(None),
                     dtype=np.float32) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Body coordinates of every voxel of ``grid`` (rows ``z_slice``).

    Returns:
        ``(ux, uy, uz)``, each ``[nz', ny, nx]`` in mm.
    """
    nz, ny, nx = grid.shape_zyx
    weights, offset = body_coordinate_axes(grid, pose, dtype=np.float64)
    k = np.arange(nz, dtype=np.float64)[z_slice][:, None, None]
    j = np.arange(ny, dtype=np.float64)[None, :, None]
    i = np.arange(nx, dtype=np.float64)[None, None, :]
    out = []
    for c in range(3):
        w = weights[c]
        # the sum of three broadcast 1-D terms; float64 terms, one float32 result
        plane = (offset[c] + w[1] * j + w[0] * i).astype(dtype)
        out.append(plane + (w[2] * k).astype(dtype))
    return out[0], out[1], out[2]


# ---- NIfTI storage ----------------------------------------------------------------------------------

def canonical_affine(grid: Grid) -> np.ndarray:
    """RAS affine (nibabel) of the canonical ``[x, y, z]`` array of ``grid`` (axis codes ``LPS``)."""
    return LPS_TO_RAS @ voxel_to_world_matrix(grid)


def reorient(array_xyz: np.ndarray, affine: np.ndarray, axes: tuple[int, int, int],
             flips: tuple[bool, bool, bool]) -> tuple[np.ndarray, np.ndarray]:
    """Store a canonical ``[x, y, z]`` array with permuted and/or flipped axes.

    Stored axis ``a`` is canonical axis ``axes[a]``, reversed where ``flips[a]``. The affine is
    updated so every voxel keeps its world position (same physical content).

    Returns:
        ``(stored array, stored affine)``; the array is a view where possible.
    """
    if sorted(axes) != [0, 1, 2]:
        raise ValueError(f"axes must be a permutation of (0, 1, 2), got {axes!r}")
    stored = np.transpose(array_xyz, axes)
    shape = stored.shape
    # T maps stored voxel index v' to canonical index v: v[axes[a]] = flip ? n'_a - 1 - v'_a : v'_a
    transform = np.zeros((4, 4))
    transform[3, 3] = 1.0
    for a, (axis, flip) in enumerate(zip(axes, flips)):
        transform[axis, a] = -1.0 if flip else 1.0
        transform[axis, 3] = shape[a] - 1 if flip else 0.0
    flip_axes = tuple(a for a, f in enumerate(flips) if f)
    if flip_axes:
        stored = np.flip(stored, axis=flip_axes)
    return stored, affine @ transform
