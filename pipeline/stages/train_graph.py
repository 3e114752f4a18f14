"""Stage ``train-graph``: graph-level MoCo on frozen patch embeddings (Sun et al. 2021, stage 2).

``copdssl train-graph --run NAME --subjects work/subjects.tsv --work work [--device ...]`` reads
``work/runs/NAME/embeddings/{sid}.npy`` (float32 ``[P, D]``, memory-mapped) of every subject
whose patches are ok and the grid adjacency, and trains a :class:`models.graph.GraphEncoder`
with :class:`models.graph.GraphMoCo` (settings ``train.graph`` of the run): two views per subject
graph (node dropout ``node_drop``, Gaussian feature noise ``feature_noise`` in cohort-sd units),
plain InfoNCE at temperature ``graph.temperature`` (the run's IFM setting is deliberately not
applied here: the graph stage only aggregates features the patch encoder already learned, and
plain InfoNCE keeps it comparable across runs), Adam at ``graph.lr``. Writes
``work/runs/NAME/graph.pt`` (weights-only loadable: state_dict + hyper-parameters) and
``graph_history.tsv`` (``epoch, loss, acc1, lr, seconds``). ``graph.epochs: 0`` exports the
randomly initialised GCN (with the cohort feature statistics).
"""

from __future__ import annotations

import argparse
import logging
import os

import numpy as np

from pipeline.stages import add_run_arguments, run_inputs

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "run name (its embeddings are the node features)", "train.device")


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    from models.data import PatchStore
    from models.graph import save_graph_encoder
    from models.graph_train import GRAPH_HISTORY_COLUMNS, train_graph
    from models.train import resolve_device
    from pipeline.errors import ConfigError
    from pipeline.files import write_tsv
    from pipeline.grid import read_grid

    settings, layout, _, sids = run_inputs(args, "train")
    graph = settings["graph"]
    if not graph["enabled"]:
        raise ConfigError(f"run {args.run}: train.graph.enabled is false; the graph stage is not part of this run")
    grid = read_grid(layout.grid(), "locations", "edges", "edge_weight")
    paths = [layout.embedding(args.run, sid) for sid in sids]
    empty = [sid for sid, path in zip(sids, paths) if path.is_file() and os.path.getsize(path) == 0]
    if empty:
        raise ConfigError(f"run {args.run}: embeddings of subjects with ok patches are tombstones: {', '.join(empty[:5])}")
    store = PatchStore(paths, sids, dtype=np.float32, stage="train-graph")
    if store.num_locations != grid["locations"].shape[0]:
        raise ConfigError(f"run {args.run}: embeddings have {store.num_locations} rows, the grid "
                          f"{grid['locations'].shape[0]} locations")
    device = resolve_device(args.device or settings["device"])
    try:
        encoder, history = train_graph(graph, store, grid["edges"], grid["edge_weight"], seed=int(settings["seed"]),
                                       device=device, run_name=args.run)
    except ValueError as error:
        raise ConfigError(f"run {args.run}: {error}") from None
    save_graph_encoder(layout.graph_model(args.run), encoder, settings=graph, num_locations=store.num_locations,
                       subjects=len(sids))
    write_tsv(layout.graph_history(args.run), pd.DataFrame(history, columns=list(GRAPH_HISTORY_COLUMNS)))
    log.info("train-graph %s: %d subjects, %d epochs -> %s", args.run, len(sids), len(history),
             layout.graph_model(args.run))
    return 0
