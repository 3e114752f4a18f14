"""Coarse lattices, separable linear upsampling, correlated random fields and CT noise.

Smooth quantities (body and lung fields, tissue values, parenchymal texture, emphysema) are
computed on *lattices*: sub-samplings of the output grid by an integer factor per axis,
starting at some output voxel. :class:`Lattice` describes one, and :func:`upsample` moves a
field between lattices with separable linear interpolation done as three small matrix
products (BLAS), which is several times faster than gather-based interpolation and lets the
renderer work slab by slab at 512x512x600 without full-volume temporaries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from pipeline.synth.plan import Grid


@dataclass(frozen=True)
class Lattice:
    """Output voxels ``start + m * factor`` (per axis, ``m < shape``), in ``[z, y, x]`` order."""

    start: tuple[int, int, int]
    factor: tuple[int, int, int]
    shape: tuple[int, int, int]

    def __post_init__(self):
        if any(f < 1 for f in self.factor) or any(n < 1 for n in self.shape):
            raise ValueError(f"lattice factor and shape must be positive, got {self.factor!r}, {self.shape!r}")

    @staticmethod
    def covering(lo: tuple[int, int, int], hi: tuple[int, int, int], factor: tuple[int, int, int]) -> "Lattice":
        """The coarsest lattice with ``factor`` whose points cover output voxels ``lo <= v < hi``."""
        shape = tuple(max(1, math.ceil((h - 1 - l) / f) + 1) for l, h, f in zip(lo, hi, factor))
        return Lattice(tuple(int(v) for v in lo), tuple(int(f) for f in factor), shape)

    def grid(self, fine: Grid) -> Grid:
        """The lattice as a :class:`Grid` in world coordinates (for body coordinates)."""
        spacing = tuple(s * f for s, f in zip(fine.spacing_zyx, self.factor))
        ox, oy, oz = fine.origin_lps
        sz, sy, sx = fine.spacing_zyx
        kz, jy, ix = self.start
        return Grid(self.shape, spacing, (ox + ix * sx, oy + jy * sy, oz + kz * sz))


def factors_for(spacing_zyx: tuple[float, float, float], target_mm: float) -> tuple[int, int, int]:
    """Integer sub-sampling factors giving lattice spacing near ``target_mm`` (at least 1)."""
    return tuple(max(1, int(round(target_mm / s))) for s in spacing_zyx)


def _axis_matrix(dst_start: int, dst_factor: int, dst_count: int, src_start: int, src_factor: int,
                 src_count: int) -> tuple[np.ndarray, int, int]:
    """Linear interpolation along one axis, restricted to the source rows it touches.

    Returns:
        ``(matrix [dst_count, hi - lo], lo, hi)``: destination = matrix @ source[lo:hi].
    """
    pos = (dst_start + dst_factor * np.arange(dst_count) - src_start) / src_factor
    pos = np.clip(pos, 0.0, src_count - 1)
    i0 = np.minimum(np.floor(pos).astype(np.intp), max(src_count - 2, 0))
    w = (pos - i0).astype(np.float32)
    lo, hi = int(i0.min()), int(min(i0.max() + 2, src_count))
    matrix = np.zeros((dst_count, hi - lo), dtype=np.float32)
    rows = np.arange(dst_count)
    matrix[rows, i0 - lo] += 1.0 - w
    if src_count > 1:
        matrix[rows, i0 + 1 - lo] += w
    return matrix, lo, hi


def upsample(field: np.ndarray, src: Lattice, dst: Lattice) -> np.ndarray:
    """Linearly interpolate ``field`` (shape ``src.shape``) onto the points of ``dst``.

    Points of ``dst`` outside ``src`` take the nearest edge value.

    Returns:
        float32 array of shape ``dst.shape``.
    """
    if field.shape != src.shape:
        raise ValueError(f"field shape {field.shape} does not match the source lattice {src.shape}")
    (mz, z0, z1), (my, y0, y1), (mx, x0, x1) = (
        _axis_matrix(d0, df, dn, s0, sf, sn)
        for d0, df, dn, s0, sf, sn in zip(dst.start, dst.factor, dst.shape, src.start, src.factor, src.shape))
    block = np.asarray(field[z0:z1, y0:y1, x0:x1], dtype=np.float32)
    block = block @ mx.T                                   # [cz, cy, nx]
    block = np.matmul(my, block)                           # [cz, ny, nx]
    out = mz @ block.reshape(block.shape[0], -1)           # [nz, ny*nx]
    return out.reshape(dst.shape)


def gaussian_field(shape: tuple[int, ...], sigma_vox: tuple[float, ...], rng: np.random.Generator) -> np.ndarray:
    """Gaussian-filtered white noise with unit standard deviation, float32 of ``shape``."""
    from scipy import ndimage

    white = rng.standard_normal(shape, dtype=np.float32)
    field = ndimage.gaussian_filter(white, sigma=sigma_vox, mode="wrap", truncate=3.0)
    std = float(field.std())
    return field / std if std > 0 else field


def noise_bank(kernel: str, shape_yx: tuple[int, int], rng: np.random.Generator, slices: int = 12,
               pad: int = 48) -> np.ndarray:
    """In-plane CT noise textures with unit standard deviation: float32 ``[slices, ny+pad, nx+pad]``.

    ``smooth``: white noise low-passed with a Gaussian (sigma 0.8 voxel), fine-grained blotches;
    ``sharp``: white noise with its low frequencies attenuated (high-pass), grainy. Output
    slices are windows of random bank slices at random offsets, which costs one add per voxel
    instead of drawing and filtering fresh noise.
    """
    from scipy import ndimage

    if kernel not in ("smooth", "sharp"):
        raise ValueError(f"kernel must be 'smooth' or 'sharp', got {kernel!r}")
    ny, nx = shape_yx
    white = rng.standard_normal((slices, ny + pad, nx + pad), dtype=np.float32)
    if kernel == "smooth":
        bank = ndimage.gaussian_filter(white, sigma=(0, 0.8, 0.8), mode="wrap")
    else:
        bank = white - 0.6 * ndimage.gaussian_filter(white, sigma=(0, 1.2, 1.2), mode="wrap")
    bank /= bank.std()
    return bank
