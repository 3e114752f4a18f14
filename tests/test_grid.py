"""The one grid.npz reader (pipeline/grid.py): types, the keys a caller asks for, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.files import write_npz
from pipeline.grid import read_grid


def _grid(p=4, **overrides):
    grid = {"corners": np.zeros((p, 3), np.int32), "centers_mm": np.zeros((p, 3)), "locations": np.zeros((p, 3)),
            "lung_fraction": np.ones(p), "edges": np.array([[0, 1], [1, 0]]), "edge_weight": np.ones(2),
            "patch_size": np.int64(16), "step": np.int64(13), "spacing_mm": np.float64(2.0)}
    grid.update(overrides)
    return grid


def test_read_grid_returns_fixed_types_of_the_keys_asked_for(tmp_path):
    path = tmp_path / "grid.npz"
    write_npz(path, **_grid())
    grid = read_grid(path)
    assert set(grid) == {"corners", "centers_mm", "locations", "lung_fraction", "edges", "edge_weight", "patch_size",
                         "step", "spacing_mm"}
    assert grid["corners"].dtype == np.int64 and grid["locations"].dtype == np.float32
    assert grid["edges"].dtype == np.int64 and grid["edge_weight"].dtype == np.float32
    assert grid["patch_size"] == 16 and type(grid["patch_size"]) is int and type(grid["spacing_mm"]) is float
    assert set(read_grid(path, "locations", "patch_size")) == {"locations", "patch_size"}


@pytest.mark.parametrize("overrides, keys, message", [
    ({}, ("nope",), None),
    ({"edges": np.array([[0, 4], [4, 0]])}, (), r"edge indices outside \[0, 4\)"),
    ({"locations": np.zeros((5, 3))}, (), "disagree on the number of locations"),
    ({"edge_weight": np.ones(3)}, (), "edge_weight has shape"),
    ({"corners": np.zeros((4, 2))}, (), r"corners has shape \(4, 2\)"),
    ({"patch_size": np.array([16, 16])}, (), "patch_size must be a scalar"),
])
def test_read_grid_rejects_inconsistent_grids(tmp_path, overrides, keys, message):
    path = tmp_path / "grid.npz"
    write_npz(path, **_grid(**overrides))
    if message is None:
        with pytest.raises(ValueError, match="no key"):
            read_grid(path, *keys)
        return
    with pytest.raises(ConfigError, match=message):
        read_grid(path, *keys)


def test_read_grid_names_a_missing_file_or_key(tmp_path):
    with pytest.raises(ConfigError, match="does not exist; run the atlas stage first"):
        read_grid(tmp_path / "grid.npz")
    path = tmp_path / "grid.npz"
    write_npz(path, locations=np.zeros((2, 3)))
    with pytest.raises(ConfigError, match="lacks lung_fraction"):
        read_grid(path, "locations", "lung_fraction")
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(ConfigError, match="cannot be read"):
        read_grid(tmp_path / "bad.npz")
