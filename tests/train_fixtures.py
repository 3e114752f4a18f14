"""Tiny cohorts and settings for the training-side tests (data, train, resume, DDP, embed, graph).

:func:`make_cohort` writes what the ``train``/``embed``/``train-graph`` stages read from ``work/``:
``subjects.tsv``, ``atlas/grid.npz`` (a 2 x 2 x 2 lattice of locations with 6-neighbour edges by
default), ``patches/{sid}.npy`` (int16 ``[P, S, S, S]``) and ``qc/patches/{sid}.json`` statuses
(failed subjects get an empty tombstone instead of patches). With ``structured=True`` every
(subject, location) patch is a smooth random texture with its own mean density and texture
strength, so instance discrimination is learnable by a small pooled CNN; otherwise patches are uniform noise over the clipped HU range.

:func:`tiny_settings` returns schema-validated run settings (``pipeline.config.run_settings``)
small enough for a 2-core CPU: patch size 8, widths (4, 8), queue size 16.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from pipeline.config import deep_merge, run_settings, validate_config, validate_section
from pipeline.files import write_json, write_npy, write_npz, write_tsv
from pipeline.layout import Layout
from pipeline.qc import stage_rows

TINY_TRAIN: dict[str, Any] = {
    "seed": 0,
    "device": "cpu",
    "epochs": 3,
    "steps_per_epoch": 4,
    "batch_size": 4,
    "sampler": "location",
    "num_workers": 0,
    "amp": False,
    "encoder": {"widths": [4, 8], "feature_dim": 8, "projection_dim": 8},
    "moco": {"queue": "per_location", "queue_size": 16, "temperature": 0.2, "momentum": 0.99,
             "shuffle_bn": "split", "shuffle_bn_groups": 2},
    "optimizer": {"lr": 0.03, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "cosine"},
    "graph": {"enabled": True, "epochs": 3, "batch_size": 4, "hidden_dim": 8, "layers": 2, "queue_size": 16,
              "temperature": 0.2, "momentum": 0.9, "lr": 0.01, "node_drop": 0.2, "feature_noise": 0.1},
}


def encoder_settings(**keys: Any) -> dict[str, Any]:
    """A validated ``train.encoder`` section: ``keys`` over the schema's defaults."""
    return validate_section("train", {"encoder": keys})["encoder"]


def tiny_settings(**overrides: Any) -> dict[str, Any]:
    """Resolved, schema-validated settings of a tiny run; ``overrides`` are deep-merged (nested dicts)."""
    config = validate_config({"train": deep_merge(TINY_TRAIN, overrides), "runs": {"tiny": {}}})
    return run_settings(config, "tiny")


@dataclass(frozen=True)
class Cohort:
    """A tiny work directory: every subject, the ok ones, the grid and the layout."""

    work: Path
    layout: Layout
    subjects_tsv: Path
    sids: list[str]
    ok_sids: list[str]
    locations: np.ndarray  # float32 [P, 3]
    edges: np.ndarray  # int64 [2, E]
    edge_weight: np.ndarray  # float32 [E]
    patch_size: int

    def patch_paths(self) -> list[Path]:
        return [self.layout.patches(sid) for sid in self.ok_sids]


def lattice_grid(shape: tuple[int, int, int] = (2, 2, 2)) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Locations float32 [P, 3] in [-1, 1] on a ``shape`` lattice, 6-neighbour edges int64 [2, E]
    (both directions) and weights float32 [E] (0.5, as for half-overlapping patches)."""
    coords = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).reshape(-1, 3)
    span = np.maximum(np.array(shape) - 1, 1)
    locations = (coords / span * 2 - 1).astype(np.float32)
    pairs = [(i, j) for i in range(len(coords)) for j in range(len(coords))
             if np.abs(coords[i] - coords[j]).sum() == 1]
    edges = np.array(pairs, dtype=np.int64).T.reshape(2, -1)
    return locations, edges, np.full(edges.shape[1], 0.5, dtype=np.float32)


def make_patches(n_subjects: int, n_locations: int, patch_size: int, seed: int, structured: bool = True) -> np.ndarray:
    """int16 [N, P, S, S, S] HU patches (see module docstring)."""
    rng = np.random.default_rng(seed)
    shape = (n_subjects, n_locations, patch_size, patch_size, patch_size)
    if not structured:
        return rng.integers(-1024, 241, size=shape, dtype=np.int16)
    field = ndimage.gaussian_filter(rng.normal(size=shape), sigma=(0, 0, 1.2, 1.2, 1.2))
    field /= field.std(axis=(2, 3, 4), keepdims=True)
    # each (subject, location) has its own density and texture strength, as lungs differ in
    # emphysema and vessels: statistics a pooled CNN feature can tell apart under augmentation
    mean = rng.uniform(-950, -650, size=(n_subjects, n_locations, 1, 1, 1))
    amplitude = rng.uniform(30, 250, size=(n_subjects, n_locations, 1, 1, 1))
    return np.clip(mean + amplitude * field, -1024, 240).astype(np.int16)


def make_cohort(root: Path, n_subjects: int = 12, lattice: tuple[int, int, int] = (2, 2, 2), patch_size: int = 8,
                seed: int = 0, failed: tuple[int, ...] = (), structured: bool = True) -> Cohort:
    """Write a tiny work directory under ``root`` (see module docstring).

    Args:
        n_subjects: subjects in ``subjects.tsv`` (IDs ``S000``, ``S001``, ...).
        lattice: grid shape; P = product.
        failed: indices of subjects whose patches stage failed (tombstone + failed status).
    """
    work = Path(root) / "work"
    layout = Layout(work)
    locations, edges, weights = lattice_grid(lattice)
    write_npz(layout.grid(), locations=locations, edges=edges, edge_weight=weights,
              patch_size=np.int64(patch_size), corners=np.zeros((len(locations), 3), np.int32))
    patches = make_patches(n_subjects, len(locations), patch_size, seed, structured)
    sids = [f"S{i:03d}" for i in range(n_subjects)]
    for i, sid in enumerate(sids):
        status = {"sid": sid, "stage": "patches", "status": "ok"}
        if i in failed:
            layout.patches(sid).parent.mkdir(parents=True, exist_ok=True)
            layout.patches(sid).write_bytes(b"")
            status.update(status="failed", failed_stage="patches", reason="test: registration failed")
        else:
            write_npy(layout.patches(sid), patches[i])
        write_json(layout.status("patches", sid), status)
    write_tsv(layout.stage_table("patches"), stage_rows(sids, "patches", layout))  # what `copdssl qc --stage` writes
    subjects_tsv = layout.subjects()
    with open(subjects_tsv, "w", newline="") as handle:
        writer = csv.writer(handle, delimiter="\t", lineterminator="\n")
        writer.writerow(["sid", "image", "format"])
        writer.writerows([sid, f"images/{sid}.nii.gz", "nifti"] for sid in sids)
    ok = [sid for i, sid in enumerate(sids) if i not in failed]
    return Cohort(work, layout, subjects_tsv, sids, ok, locations, edges, weights, patch_size)


def assert_state_equal(a, b, name: str = "state") -> None:
    """``torch.equal`` on tensors, recursively through dicts (state_dicts with module extra state)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), f"{name}: keys differ"
        for key in a:
            assert_state_equal(a[key], b[key], f"{name}.{key}")
    else:
        assert torch.equal(a, b), f"{name} differs"

