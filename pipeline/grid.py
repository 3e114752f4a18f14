"""The atlas patch grid file, ``grid.npz``: the one reader every stage uses.

The atlas stage writes it (:func:`pipeline.atlas.build_grid`; keys and shapes in
docs/architecture.md, "grid.npz"); patches, train, embed, pool, the location map, the report,
export and apply read it. Each reader asks for the keys it needs and gets them with fixed types,
checked against each other, or a one-line :class:`~pipeline.errors.ConfigError` naming the file.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError

#: Per-location arrays ([P, 3] or [P]) and their types.
LOCATION_ARRAYS = {"corners": (np.int64, 3), "centers_mm": (np.float64, 3), "locations": (np.float32, 3),
                   "lung_fraction": (np.float32, None)}
#: Scalars and their Python types.
SCALARS = {"patch_size": int, "step": int, "spacing_mm": float}
#: The adjacency: ``edges`` int64 [2, E] (both directions) and ``edge_weight`` float32 [E].
EDGE_ARRAYS = {"edges": np.int64, "edge_weight": np.float32}
KEYS = (*LOCATION_ARRAYS, *EDGE_ARRAYS, *SCALARS)


def read_grid(path: str | os.PathLike, *keys: str) -> dict[str, Any]:
    """Read ``keys`` of the grid at ``path`` (all of :data:`KEYS` it holds when none are named).

    Returns:
        dict: per-location arrays with P rows (``corners`` int64 [P, 3] (z, y, x), ``centers_mm``
        float64 [P, 3] (x, y, z, LPS mm), ``locations`` float32 [P, 3], ``lung_fraction`` float32
        [P]), ``edges`` int64 [2, E], ``edge_weight`` float32 [E], and ``patch_size``/``step``
        (int), ``spacing_mm`` (float).

    Raises:
        ConfigError: the file is missing or unreadable, lacks a named key, or its arrays disagree
            (different P, an edge outside [0, P), E weights for another number of edges).
    """
    path = Path(path)
    unknown = sorted(set(keys) - set(KEYS))
    if unknown:
        raise ValueError(f"grid.npz has no key(s) {', '.join(unknown)}; known: {', '.join(KEYS)}")
    if not path.is_file():
        raise ConfigError(f"atlas grid {path} does not exist; run the atlas stage first")
    try:
        with np.load(path, allow_pickle=False) as data:
            stored = set(data.files)
            wanted = keys or tuple(k for k in KEYS if k in stored)
            raw = {key: data[key] for key in wanted if key in stored}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise ConfigError(f"atlas grid {path} cannot be read: {' '.join(str(error).split())}") from None
    missing = [key for key in wanted if key not in raw]
    if missing:
        raise ConfigError(f"atlas grid {path} lacks {', '.join(missing)}")
    grid: dict[str, Any] = {}
    sizes = set()
    for key, value in raw.items():
        if key in SCALARS:
            if value.shape != ():
                raise ConfigError(f"atlas grid {path}: {key} must be a scalar, got shape {value.shape}")
            grid[key] = SCALARS[key](value)
        elif key in LOCATION_ARRAYS:
            dtype, width = LOCATION_ARRAYS[key]
            if value.ndim != (1 if width is None else 2) or (width is not None and value.shape[1] != width):
                raise ConfigError(f"atlas grid {path}: {key} has shape {value.shape}, expected "
                                  f"[P{'' if width is None else f', {width}'}]")
            grid[key] = value.astype(dtype, copy=False)
            sizes.add(value.shape[0])
        else:
            grid[key] = value.astype(EDGE_ARRAYS[key], copy=False)
    if len(sizes) > 1:
        raise ConfigError(f"atlas grid {path}: per-location arrays disagree on the number of locations "
                          f"({', '.join(f'{k} {len(grid[k])}' for k in grid if k in LOCATION_ARRAYS)})")
    edges = grid.get("edges")
    if edges is not None:
        if edges.ndim != 2 or edges.shape[0] != 2:
            raise ConfigError(f"atlas grid {path}: edges has shape {edges.shape}, expected [2, E]")
        if sizes and edges.size and (edges.min() < 0 or edges.max() >= next(iter(sizes))):
            raise ConfigError(f"atlas grid {path}: edge indices outside [0, {next(iter(sizes))})")
        if "edge_weight" in grid and grid["edge_weight"].shape != (edges.shape[1],):
            raise ConfigError(f"atlas grid {path}: edge_weight has shape {grid['edge_weight'].shape} for "
                              f"{edges.shape[1]} edges")
    return grid
