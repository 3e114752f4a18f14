"""Lung densitometry: LAA-950, LAA-910, Perc15, lung volume and mean HU, per lung and in total.

All measures come from one HU histogram per lung, so the whole lung is read once:

- ``laa950`` / ``laa910``: percentage of lung voxels below -950 / -910 HU (low-attenuation areas);
- ``perc15``: the HU value at the 15th percentile of the lung histogram, as the *inverted CDF*
  (the smallest HU value whose cumulative share reaches 15 %, numpy's ``method="inverted_cdf"``);
- ``volume_l``: lung volume in litres; ``mean_hu``: mean HU.

The lung stage writes the result to ``work/density/{sid}.json`` as
``{"total": {...}, "right": {...}, "left": {...}}``.
"""

from __future__ import annotations

import numpy as np

REGIONS = {"total": (1, 2), "right": (1,), "left": (2,)}
KEYS = ("laa950", "laa910", "perc15", "volume_l", "mean_hu")


def histogram_measures(hist: np.ndarray, lowest_hu: int, voxel_volume_ml: float) -> dict[str, float]:
    """Densitometry from an HU histogram.

    Args:
        hist: int64 ``[K]`` voxel counts; ``hist[i]`` counts voxels with HU ``lowest_hu + i``.
        lowest_hu: HU value of bin 0.
        voxel_volume_ml: volume of one voxel in ml.

    Returns:
        dict with the keys in :data:`KEYS`.

    Raises:
        ValueError: when the histogram is empty (no lung voxels).
    """
    hist = np.asarray(hist, dtype=np.int64)
    n = int(hist.sum())
    if n == 0:
        raise ValueError("cannot measure densitometry of an empty region (no lung voxels)")
    hu = lowest_hu + np.arange(hist.size, dtype=np.int64)
    cumulative = np.cumsum(hist)
    return {
        "laa950": 100.0 * float(hist[hu < -950].sum()) / n,
        "laa910": 100.0 * float(hist[hu < -910].sum()) / n,
        "perc15": float(hu[np.searchsorted(cumulative, 0.15 * n)]),
        "volume_l": n * voxel_volume_ml / 1000.0,
        "mean_hu": float((hist * hu).sum()) / n,
    }


def measure(ct: np.ndarray, labels: np.ndarray, voxel_volume_ml: float) -> dict[str, dict[str, float]]:
    """Densitometry of the right lung, the left lung and both together.

    Args:
        ct: integer HU array ``[z, y, x]``.
        labels: uint8 array ``[z, y, x]`` on the same grid (0 background, 1 right, 2 left).
        voxel_volume_ml: volume of one voxel in ml (product of the spacing in mm / 1000).

    Returns:
        ``{"total": {...}, "right": {...}, "left": {...}}``, each with the keys in :data:`KEYS`.

    Raises:
        ValueError: on mismatched shapes, a non-integer CT, a non-positive voxel volume or an
            empty lung.
    """
    if ct.shape != labels.shape:
        raise ValueError(f"ct shape {ct.shape} differs from labels shape {labels.shape}")
    if not np.issubdtype(ct.dtype, np.integer):
        raise ValueError(f"ct must hold integer HU values, got dtype {ct.dtype}")
    if not voxel_volume_ml > 0:
        raise ValueError(f"voxel_volume_ml must be positive, got {voxel_volume_ml}")
    per_label: dict[int, np.ndarray] = {}
    values = {label: ct[labels == label].astype(np.int64) for label in (1, 2)}
    lowest = min((int(v.min()) for v in values.values() if v.size), default=0)
    highest = max((int(v.max()) for v in values.values() if v.size), default=0)
    for label, v in values.items():
        per_label[label] = np.bincount(v - lowest, minlength=highest - lowest + 1)
    result = {}
    for region, members in REGIONS.items():
        hist = sum(per_label[label] for label in members)
        try:
            result[region] = histogram_measures(hist, lowest, voxel_volume_ml)
        except ValueError:
            raise ValueError(f"cannot measure densitometry: the {region} lung is empty") from None
    return result
