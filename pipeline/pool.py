"""Stage ``pool``: one feature vector per subject from its patch embeddings.

- ``mean``: the average of the ``P`` patch embeddings ``[P, D] -> [D]``, as in the IFM paper's
  COPDGene experiments.
- ``weighted``: the average weighted by each location's atlas lung fraction (``grid.npz``
  ``lung_fraction``), so that border patches, half chest wall, count less ``[P, D] -> [D]``.
- ``interior``: the average over the lung-interior locations only (atlas lung fraction at least
  ``INTERIOR_LUNG_FRACTION``) ``[P, D] -> [D]``; border patches carry the lung's outline (pose,
  size, inspiration) more than its parenchyma.
- ``gnn``: the graph encoder trained by ``train-graph`` (``work/runs/{run}/graph.pt``) applied
  to the patch embeddings as node features over the atlas grid adjacency (``grid.npz``
  ``edges``/``edge_weight``) ``[P, D] -> [H]``.

Rows: every subject that passed QC (``patches`` ok) and whose embedding exists; an empty
embedding file is the tombstone of a subject whose embedding failed, and it is left out with a
warning. Output ``work/runs/{run}/features_{pooling}.tsv``: ``sid, f0 ... f{D-1}``.
"""

from __future__ import annotations

import argparse
import functools
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from pipeline.errors import ConfigError, SubjectError
from pipeline.grid import read_grid
from pipeline.layout import Layout

log = logging.getLogger(__name__)

POOLINGS = ("mean", "weighted", "interior", "gnn")
INTERIOR_LUNG_FRACTION = 0.95  # a location is "interior" when at least this fraction of its atlas patch is lung


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run name (config key runs.<name>)")
    parser.add_argument("--pooling", required=True, choices=POOLINGS, help="pooling method")
    parser.add_argument("--subjects", required=True, help="screened subjects TSV (work/subjects.tsv)")
    parser.add_argument("--work", default="work", help="work directory (default: %(default)s)")
    parser.add_argument("--out", required=True, help="feature TSV to write")
    parser.add_argument("--device", default="cpu", help="torch device of the graph encoder (gnn; default: %(default)s)")


def load_embedding(path: Path, sid: str, num_locations: int | None = None) -> np.ndarray | None:
    """float32 ``[P, D]`` embedding of one subject, or ``None`` for a tombstone (embedding failed).

    ``num_locations``: the grid's P, checked when given.
    """
    if not path.is_file():
        raise SubjectError(sid, f"embedding {path} is missing; run the embed stage first", stage="pool")
    if path.stat().st_size == 0:
        return None
    try:
        embedding = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise SubjectError(sid, f"embedding {path} is unreadable ({error})", stage="pool") from None
    if embedding.ndim != 2 or embedding.shape[0] == 0 or embedding.shape[1] == 0:
        raise SubjectError(sid, f"embedding has shape {embedding.shape}, expected [P, D]", stage="pool")
    if num_locations is not None and embedding.shape[0] != num_locations:
        raise SubjectError(sid, f"embedding has {embedding.shape[0]} rows but the grid has {num_locations} "
                           "locations; re-run embed after the atlas changed", stage="pool")
    if not np.all(np.isfinite(embedding)):
        raise SubjectError(sid, "embedding contains non-finite values", stage="pool")
    return embedding


def mean_pool(embedding: np.ndarray) -> np.ndarray:
    """Average over patches: ``[P, D] -> [D]`` (float64 accumulation)."""
    return np.asarray(embedding, dtype=np.float64).mean(axis=0)


def weighted_mean_pool(embedding: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """Weighted average over patches: ``[P, D], [P] -> [D]`` (weights >= 0, not all zero)."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.shape != (len(embedding),):
        raise ValueError(f"pooling weights have shape {weights.shape}, the embedding has {len(embedding)} rows")
    if np.any(weights < 0) or weights.sum() <= 0:
        raise ValueError("pooling weights must be non-negative and not all zero")
    return (weights / weights.sum()) @ np.asarray(embedding, dtype=np.float64)


def location_weights(pooling: str, lung_fraction: np.ndarray) -> np.ndarray:
    """``[P]`` weights of the ``weighted`` or ``interior`` pooling from the atlas lung fractions ``[P]``."""
    lung_fraction = np.asarray(lung_fraction, dtype=np.float64)
    if pooling == "weighted":
        return lung_fraction
    interior = lung_fraction >= INTERIOR_LUNG_FRACTION
    if not interior.any():
        raise ConfigError(f"interior pooling: no atlas location has a lung fraction >= {INTERIOR_LUNG_FRACTION}")
    return interior.astype(np.float64)


class GraphPooler:
    """Pool with a trained graph encoder over the fixed patch adjacency.

    Args:
        encoder: object with ``pool(x [P, D], edge_index [2, E], edge_weight [E]) -> [H]``
            (``models.graph.GraphEncoder``).
        edges: int64 ``[2, E]`` adjacency (both directions), from ``grid.npz``.
        edge_weight: float32 ``[E]``.
        device: torch device the encoder lives on.
    """

    def __init__(self, encoder, edges: np.ndarray, edge_weight: np.ndarray, device: str = "cpu"):
        import torch

        edges = np.asarray(edges)
        edge_weight = np.asarray(edge_weight)
        if edges.ndim != 2 or edges.shape[0] != 2:
            raise ValueError(f"edges must have shape [2, E], got {edges.shape}")
        if edge_weight.shape != (edges.shape[1],):
            raise ValueError(f"edge_weight must have shape [{edges.shape[1]}], got {edge_weight.shape}")
        self.encoder = encoder
        self.device = torch.device(device)
        self.num_nodes = int(edges.max()) + 1 if edges.size else 0
        self.edge_index = torch.as_tensor(edges, dtype=torch.long, device=self.device)
        self.edge_weight = torch.as_tensor(edge_weight, dtype=torch.float32, device=self.device)

    def __call__(self, embedding: np.ndarray) -> np.ndarray:
        """``[P, D] -> [H]``."""
        import torch

        if embedding.shape[0] < self.num_nodes:
            raise ValueError(f"embedding has {embedding.shape[0]} patches but the grid adjacency "
                             f"refers to {self.num_nodes}")
        x = torch.as_tensor(np.asarray(embedding, dtype=np.float32), device=self.device)
        with torch.inference_mode():
            pooled = self.encoder.pool(x, self.edge_index, self.edge_weight)
        pooled = pooled.detach().float().cpu().numpy().reshape(-1)
        return pooled.astype(np.float64)


def pool_subjects(sids: Sequence[str], load: Callable[[str], np.ndarray | None],
                  pool: Callable[[np.ndarray], np.ndarray], desc: str = "pool"):
    """Feature table of the subjects: DataFrame ``sid, f0 ... f{D-1}``.

    Args:
        sids: subjects to pool (in output order).
        load: ``sid -> [P, D]`` embedding, or ``None`` to leave the subject out (tombstone).
        pool: ``[P, D] -> [D']``.
    """
    import pandas as pd

    from pipeline.logs import progress

    kept, rows = [], []
    for sid in progress(sids, desc=desc, unit="subject"):
        embedding = load(sid)
        if embedding is None:
            log.warning("subject %s [pool]: left out, its embedding is an empty tombstone (embed failed)", sid)
            continue
        try:
            vector = pool(embedding)
        except ValueError as error:
            raise SubjectError(sid, str(error), stage="pool") from None
        if rows and vector.shape != rows[0].shape:
            raise SubjectError(sid, f"pooled feature has shape {vector.shape}, other subjects {rows[0].shape}",
                               stage="pool")
        if not np.all(np.isfinite(vector)):
            raise SubjectError(sid, "pooled feature contains non-finite values", stage="pool")
        kept.append(sid)
        rows.append(vector)
    width = rows[0].size if rows else 0
    table = pd.DataFrame(np.vstack(rows) if rows else np.zeros((0, width)),
                         columns=[f"f{i}" for i in range(width)])
    table.insert(0, "sid", kept)
    return table


def make_pooler(pooling: str, layout: Layout, run: str, device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """The pooling function of ``pooling`` for ``run``."""
    if pooling == "mean":
        return mean_pool
    if pooling in ("weighted", "interior"):
        weights = location_weights(pooling, read_grid(layout.grid(), "lung_fraction")["lung_fraction"])
        return functools.partial(weighted_mean_pool, weights=weights)
    if pooling == "gnn":
        from models.graph import load_graph_encoder

        path = layout.graph_model(run)
        if not path.is_file():
            raise ConfigError(f"gnn pooling of run {run!r} needs the graph encoder {path}; run train-graph first")
        grid = read_grid(layout.grid(), "edges", "edge_weight")
        encoder = load_graph_encoder(path, device=device)
        if hasattr(encoder, "eval"):
            encoder.eval()
        return GraphPooler(encoder, grid["edges"], grid["edge_weight"], device=device)
    raise ValueError(f"unknown pooling {pooling!r}; choose from {', '.join(POOLINGS)}")


def run(args: argparse.Namespace) -> int:
    from pipeline.files import write_tsv
    from pipeline.folds import QC_STAGE
    from pipeline.status import passed_in_stage_table
    from pipeline.manifest import read_subjects

    layout = Layout(work=Path(args.work))
    sids = passed_in_stage_table(layout, [s.sid for s in read_subjects(args.subjects)], QC_STAGE)
    num_locations = len(read_grid(layout.grid(), "locations")["locations"])
    pooler = make_pooler(args.pooling, layout, args.run, device=args.device)
    table = pool_subjects(sids, lambda sid: load_embedding(layout.embedding(args.run, sid), sid, num_locations),
                          pooler, desc=f"pool {args.run}/{args.pooling}")
    write_tsv(args.out, table)
    log.info("pool %s/%s: %d subjects x %d features -> %s", args.run, args.pooling, len(table),
             table.shape[1] - 1, args.out)
    return 0
