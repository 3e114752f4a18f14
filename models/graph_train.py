"""Graph-level MoCo on frozen patch embeddings (Sun et al. 2021, stage 2).

:func:`train_graph` trains a :class:`models.graph.GraphEncoder` with
:class:`models.graph.GraphMoCo` on the per-location embeddings ``[P, D]`` of every subject and the
grid adjacency (the ``train-graph`` stage, :mod:`pipeline.stages.train_graph`, feeds it). Settings
are the run's ``train.graph``: two views per subject graph (node dropout ``node_drop``, Gaussian
feature noise ``feature_noise`` in cohort-sd units), plain InfoNCE at temperature
``graph.temperature`` (the run's IFM setting is deliberately not applied here: the graph stage
only aggregates features the patch encoder already learned, and plain InfoNCE keeps it comparable
across runs), Adam at ``graph.lr``. ``graph.epochs: 0`` returns the randomly initialised GCN (with
the cohort feature statistics).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

GRAPH_HISTORY_COLUMNS = ("epoch", "loss", "acc1", "lr", "seconds")


def feature_stats(store) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and sd [D] of all node features of a store of ``[P, D]`` arrays
    (float64 accumulation, one subject in memory at a time)."""
    total = np.zeros(store.item_shape[-1])
    square = np.zeros_like(total)
    for i in range(len(store)):
        x = np.asarray(store.array(i), dtype=np.float64)
        total += x.sum(0)
        square += (x * x).sum(0)
    count = len(store) * store.num_locations
    mean = total / count
    return mean, np.sqrt(np.maximum(square / count - mean * mean, 0.0))


def train_graph(graph: dict[str, Any], store, edges: np.ndarray, edge_weight: np.ndarray, *, seed: int = 0,
                device: Any = "cpu", run_name: str = "run", show_progress: bool = True):
    """Train the graph encoder.

    Args:
        graph: the run's ``train.graph`` settings.
        store: :class:`models.data.PatchStore` of float32 embeddings ``[P, D]`` (one per subject).
        edges: int64 [2, E] grid adjacency; edge_weight: float32 [E].
        seed: the run seed (model init, batch order and views derive from it).

    Returns:
        (:class:`models.graph.GraphEncoder` query encoder on ``device``, history rows).
    """
    import torch

    from models.graph import GraphEncoder, GraphMoCo, graph_views
    from models.ifm import IFMLoss
    from models.train import derived_seed
    from pipeline.logs import progress

    n = len(store)
    if n < 2:
        raise ValueError(f"the graph stage needs at least 2 subjects with embeddings, got {n}")
    device = torch.device(device)
    batch_size = min(int(graph["batch_size"]), n)
    if int(graph["queue_size"]) + batch_size > n:
        log.warning("train-graph %s: graph.queue_size %d + batch size %d exceed the %d subjects: the queue always "
                    "holds keys of subjects in the current batch (false negatives); consider a smaller queue",
                    run_name, int(graph["queue_size"]), batch_size, n)
    mean, std = feature_stats(store)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(derived_seed(seed, 0, 10))
        encoder = GraphEncoder(store.item_shape[-1], int(graph["hidden_dim"]), int(graph["layers"]))
        encoder.set_feature_stats(torch.from_numpy(mean), torch.from_numpy(std))
        model = GraphMoCo(encoder, int(graph["queue_size"]), float(graph["momentum"]), seed=seed).to(device)
        criterion = IFMLoss(method="none", temperature=float(graph["temperature"]))
        optimizer = torch.optim.Adam(model.encoder_q.parameters(), lr=float(graph["lr"]))
        generator = torch.Generator(device=device).manual_seed(derived_seed(seed, 0, 11))
        order_rng = torch.Generator().manual_seed(derived_seed(seed, 0, 12))
        edge_index = torch.as_tensor(edges, dtype=torch.long, device=device)
        weight = torch.as_tensor(edge_weight, dtype=torch.float32, device=device)
        feature_std = model.encoder_q.feature_std
        history = []
        model.train()
        for epoch in range(int(graph["epochs"])):
            started = time.perf_counter()
            order = torch.randperm(n, generator=order_rng).numpy()
            steps = n // batch_size
            sums = torch.zeros(3, dtype=torch.float64, device=device)
            step_range = range(steps)
            if show_progress:
                step_range = progress(step_range, desc=f"train-graph {run_name} epoch {epoch + 1}", unit="step")
            for step in step_range:
                idx = order[step * batch_size:(step + 1) * batch_size]
                x = torch.from_numpy(np.stack([store.array(int(i)) for i in idx])).to(device)  # BxPxD
                view_q = graph_views(x, edge_index, weight, graph["node_drop"], graph["feature_noise"], feature_std, generator)
                view_k = graph_views(x, edge_index, weight, graph["node_drop"], graph["feature_noise"], feature_std, generator)
                l_pos, l_neg = model(view_q, view_k)
                loss, stats = criterion(l_pos, l_neg)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                sums += torch.stack([loss.detach().double(), torch.as_tensor(stats["acc1"], device=device).double(),
                                     torch.ones((), dtype=torch.float64, device=device)])
            loss_sum, acc_sum, count = sums.tolist()
            row = {"epoch": epoch + 1, "loss": loss_sum / count, "acc1": acc_sum / count,
                   "lr": optimizer.param_groups[0]["lr"], "seconds": time.perf_counter() - started}
            if not np.isfinite(row["loss"]):
                raise FloatingPointError(f"run {run_name}: graph loss became {row['loss']} in epoch {epoch + 1}; "
                                         "lower train.graph.lr")
            history.append(row)
            log.info("train-graph %s epoch %d: loss %.4f acc1 %.1f%% (%.1f s)", run_name, epoch + 1, row["loss"],
                     row["acc1"], row["seconds"])
    return model.encoder_q.eval(), history
