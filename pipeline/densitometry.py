"""Lung densitometry: LAA-950, LAA-910, Perc15, lung volume and mean HU, per lung and in total.

All measures come from one HU histogram per lung, so the whole lung is read once:

- ``laa950`` / ``laa910``: percentage of lung voxels below -950 / -910 HU (low-attenuation areas);
- ``perc15``: the HU value at the 15th percentile of the lung histogram, as the *inverted CDF*
  (the smallest HU value whose cumulative share reaches 15 %, numpy's ``method="inverted_cdf"``);
- ``volume_l``: lung volume in litres; ``mean_hu``: mean HU.

:func:`high_attenuation` adds statistics of the *high-attenuation tail* of the whole lung inside a
mask eroded by a few voxels (so the partial volume of the pleura and chest wall drops out): the
share of voxels above -700 ... -100 HU and the 85th ... 99th percentiles pick up airway walls and
vessels, which the low-attenuation measures above do not see.

The lung stage writes both to ``work/density/{sid}.json`` as
``{"total": {...}, "right": {...}, "left": {...}, "high_attenuation": {...}}``.
"""

from __future__ import annotations

import numpy as np

REGIONS = {"total": (1, 2), "right": (1,), "left": (2,)}
KEYS = ("laa950", "laa910", "perc15", "volume_l", "mean_hu")
HIGH_ATTENUATION_SECTION = "high_attenuation"
HAA_THRESHOLDS_HU = (-700, -600, -500, -300, -100)  # haa700 = % of voxels above -700 HU, ...
HAA_PERCENTILES = (85, 90, 95, 99)
HIGH_ATTENUATION_KEYS = (*(f"haa{-t}" for t in HAA_THRESHOLDS_HU), *(f"perc{q}" for q in HAA_PERCENTILES),
                         "eroded_mean_hu")
EROSION_VOXELS = 2


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


def high_attenuation(ct: np.ndarray, labels: np.ndarray, erosion_voxels: int = EROSION_VOXELS) -> dict[str, float]:
    """Whole-lung statistics of the high-attenuation tail, inside an eroded lung mask.

    Both lungs (``labels > 0``) are eroded by ``erosion_voxels`` = *k* voxels with a cube of
    ``2k + 1`` voxels (every voxel within *k* voxels of the background along any axis, diagonals
    included, is removed; three 1-D ``scipy.ndimage.minimum_filter1d`` passes over the lung's
    bounding box), so that the partial volume of the pleura, chest wall, diaphragm and
    mediastinum drops out. What remains above about -700 HU inside the lung is mostly airway walls
    and vessels. The measures, in :data:`HIGH_ATTENUATION_KEYS` order:

    - ``haa700``, ``haa600``, ``haa500``, ``haa300``, ``haa100``: % of eroded-lung voxels *above*
      -700, -600, -500, -300 and -100 HU (strictly);
    - ``perc85``, ``perc90``, ``perc95``, ``perc99``: HU percentiles as the inverted CDF (as ``perc15``
      of :func:`histogram_measures`);
    - ``eroded_mean_hu``: mean HU of the eroded lung.

    The keys differ from :data:`KEYS`, so both sets can be columns of one feature table.

    Args:
        ct: integer HU array ``[z, y, x]``.
        labels: lung labels ``[z, y, x]`` on the same grid (0 background, 1 right, 2 left).
        erosion_voxels: erosion depth in voxels (0: the mask as it is).

    Raises:
        ValueError: on mismatched shapes, a non-integer CT, a bad erosion depth, or when no lung
            voxel is left after the erosion.
    """
    from scipy import ndimage

    if ct.shape != labels.shape:
        raise ValueError(f"ct shape {ct.shape} differs from labels shape {labels.shape}")
    if not np.issubdtype(ct.dtype, np.integer):
        raise ValueError(f"ct must hold integer HU values, got dtype {ct.dtype}")
    if isinstance(erosion_voxels, bool) or not isinstance(erosion_voxels, (int, np.integer)) or erosion_voxels < 0:
        raise ValueError(f"erosion_voxels must be an integer >= 0, got {erosion_voxels!r}")
    lung = np.asarray(labels) > 0
    box = []
    for axis in range(lung.ndim):
        present = np.flatnonzero(lung.any(axis=tuple(a for a in range(lung.ndim) if a != axis)))
        if present.size == 0:
            raise ValueError("cannot measure high attenuation: the lung mask is empty")
        box.append(slice(int(present[0]), int(present[-1]) + 1))
    box = tuple(box)  # outside the bounding box is background, so eroding the crop is exact
    mask = lung[box].view(np.uint8)
    if erosion_voxels:  # a cube erosion is separable: faster than a 6-connected binary_erosion
        for axis in range(mask.ndim):
            mask = ndimage.minimum_filter1d(mask, 2 * int(erosion_voxels) + 1, axis=axis, mode="constant", cval=0)
    values = np.asarray(ct)[box][mask.astype(bool)].astype(np.int64)  # [n]
    if values.size == 0:
        raise ValueError(f"cannot measure high attenuation: no lung voxel is left after eroding by "
                         f"{erosion_voxels} voxels")
    lowest = int(values.min())
    hist = np.bincount(values - lowest)
    hu = lowest + np.arange(hist.size, dtype=np.int64)
    cumulative = np.cumsum(hist)
    n = int(values.size)
    result = {f"haa{-t}": 100.0 * float(hist[hu > t].sum()) / n for t in HAA_THRESHOLDS_HU}
    # the q-th percentile is the ceil(q n / 100)-th smallest value (integer arithmetic: exact)
    result.update({f"perc{q}": float(hu[np.searchsorted(cumulative, -(-q * n // 100))]) for q in HAA_PERCENTILES})
    result["eroded_mean_hu"] = float((hist * hu).sum()) / n
    return result
