"""Graph stage model (Sun et al. 2021): a GCN over the patch adjacency graph of one subject.

Nodes are the P grid locations with the frozen patch embeddings ``[P, D]`` as features; edges
are the atlas grid's adjacency (``grid.npz`` ``edges [2, E]``, ``edge_weight [E]``). The
:class:`GraphEncoder` standardises the features with cohort statistics stored as buffers, applies
``layers`` x (``GCNConv`` with edge weights -> ``BatchNorm1d`` -> ELU), mean-pools the nodes of
each graph (``global_mean_pool``) to ``[B, hidden_dim]`` and projects with an MLP for the
contrastive loss. :class:`GraphMoCo` is MoCo at the graph level: a momentum key encoder and one
shared queue of negative subject keys. Two views of a subject graph are made by dropping nodes
and adding Gaussian feature noise (:func:`graph_views`). Only torch-geometric's pure-PyTorch
paths are used (no pyg-lib, torch-scatter or torch-sparse).
"""

from __future__ import annotations

import copy
import os
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class GraphBatch(NamedTuple):
    """Several graphs as one disconnected graph (torch-geometric convention).

    Attributes:
        x: node features [N, D]; edge_index: long [2, E] (into the N nodes);
        edge_weight: [E]; batch: long [N] graph of each node; num_graphs: B.
    """

    x: Tensor
    edge_index: Tensor
    edge_weight: Tensor
    batch: Tensor
    num_graphs: int


def batch_graphs(x: Tensor, edge_index: Tensor, edge_weight: Tensor, keep: Tensor | None = None) -> GraphBatch:
    """Stack B graphs sharing one topology, optionally keeping only some nodes.

    Args:
        x: [B, P, D] node features; edge_index: long [2, E] over P nodes; edge_weight: [E];
        keep: bool [B, P] nodes to keep (default all). Edges touching a dropped node are dropped.

    Returns:
        A :class:`GraphBatch` with N = keep.sum() nodes (graph b's nodes before graph b+1's).
    """
    b, p, _ = x.shape
    if keep is None:
        keep = torch.ones(b, p, dtype=torch.bool, device=x.device)
    flat_keep = keep.reshape(-1)  # B*P
    new_index = torch.cumsum(flat_keep.long(), 0) - 1  # old flat node -> new node
    offsets = (torch.arange(b, device=x.device) * p).view(b, 1)  # Bx1
    src = (edge_index[0].view(1, -1) + offsets).reshape(-1)  # B*E
    dst = (edge_index[1].view(1, -1) + offsets).reshape(-1)
    weight = edge_weight.repeat(b)
    alive = flat_keep[src] & flat_keep[dst]
    edges = torch.stack([new_index[src[alive]], new_index[dst[alive]]])
    batch = torch.arange(b, device=x.device).repeat_interleave(p)[flat_keep]
    return GraphBatch(x.reshape(b * p, -1)[flat_keep], edges, weight[alive], batch, b)


def graph_views(x: Tensor, edge_index: Tensor, edge_weight: Tensor, node_drop: float, feature_noise: float,
                feature_std: Tensor, generator: torch.Generator) -> GraphBatch:
    """One random view of B subject graphs: node dropout + Gaussian feature noise.

    Args:
        x: [B, P, D] frozen patch embeddings; edge_index [2, E]; edge_weight [E].
        node_drop: probability of dropping each node (one random node per graph is always kept).
        feature_noise: noise standard deviation in units of the cohort feature sd ``feature_std`` [D].
        generator: source of every random draw (on ``x``'s device).
    """
    b, p, d = x.shape
    dev = x.device
    keep = torch.rand(b, p, generator=generator, device=dev) >= node_drop
    keep[torch.arange(b, device=dev), torch.randint(p, (b,), generator=generator, device=dev)] = True
    noise = torch.randn(b, p, d, generator=generator, device=dev) * (feature_noise * feature_std.to(x.dtype))
    return batch_graphs(x + noise, edge_index, edge_weight, keep)


class GraphEncoder(nn.Module):
    """GCN encoder of subject graphs.

    Args:
        in_dim: node feature size D (the patch encoder's feature_dim).
        hidden_dim: GCN width and size of the pooled graph embedding.
        layers: number of GCNConv + BatchNorm + ELU blocks.
        projection_dim: output of the projection MLP (default ``hidden_dim``).
    """

    def __init__(self, in_dim: int, hidden_dim: int = 128, layers: int = 2, projection_dim: int | None = None):
        super().__init__()
        from torch_geometric.nn import GCNConv

        projection_dim = hidden_dim if projection_dim is None else projection_dim
        for name, value in (("in_dim", in_dim), ("hidden_dim", hidden_dim), ("layers", layers),
                            ("projection_dim", projection_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        self.in_dim, self.hidden_dim, self.layers, self.projection_dim = in_dim, hidden_dim, layers, projection_dim
        self.convs = nn.ModuleList(GCNConv(in_dim if i == 0 else hidden_dim, hidden_dim) for i in range(layers))
        self.norms = nn.ModuleList(nn.BatchNorm1d(hidden_dim) for _ in range(layers))
        self.projection = nn.Sequential(nn.Linear(hidden_dim, hidden_dim), nn.ReLU(inplace=True),
                                        nn.Linear(hidden_dim, projection_dim))
        self.register_buffer("feature_mean", torch.zeros(in_dim))
        self.register_buffer("feature_std", torch.ones(in_dim))

    def hyper_parameters(self) -> dict[str, int]:
        return {"in_dim": self.in_dim, "hidden_dim": self.hidden_dim, "layers": self.layers,
                "projection_dim": self.projection_dim}

    @torch.no_grad()
    def set_feature_stats(self, mean: Tensor, std: Tensor) -> None:
        """Cohort mean and sd [D] of the node features (sd floored at 1e-6)."""
        self.feature_mean.copy_(torch.as_tensor(mean, dtype=self.feature_mean.dtype))
        self.feature_std.copy_(torch.as_tensor(std, dtype=self.feature_std.dtype).clamp_min(1e-6))

    def nodes(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor) -> Tensor:
        """Node embeddings: x [N, D] raw features -> [N, hidden_dim]."""
        h = (x - self.feature_mean) / self.feature_std
        for conv, norm in zip(self.convs, self.norms):
            h = F.elu(norm(conv(h, edge_index, edge_weight)))
        return h

    def embed(self, graph: GraphBatch) -> Tensor:
        """Pre-projection graph embeddings [B, hidden_dim] (mean over each graph's nodes)."""
        from torch_geometric.nn import global_mean_pool

        h = self.nodes(graph.x, graph.edge_index, graph.edge_weight)
        return global_mean_pool(h, graph.batch, size=graph.num_graphs)

    def forward(self, graph: GraphBatch) -> Tensor:
        """L2-normalised projections [B, projection_dim]."""
        return F.normalize(self.projection(self.embed(graph)), dim=1)

    @torch.no_grad()
    def pool(self, x: Tensor, edge_index: Tensor, edge_weight: Tensor) -> Tensor:
        """Subject feature for the ``gnn`` pooling: x [P, D] patch embeddings of one subject,
        edge_index long [2, E], edge_weight [E] -> [hidden_dim] (eval mode, pre-projection)."""
        was_training = self.training
        self.eval()
        try:
            dev = self.feature_mean.device
            x = torch.as_tensor(x, dtype=torch.float32, device=dev)
            if x.ndim != 2 or x.shape[1] != self.in_dim:
                raise ValueError(f"pool expects node features [P, {self.in_dim}], got {list(x.shape)}")
            edge_index = torch.as_tensor(edge_index, dtype=torch.long, device=dev)
            edge_weight = torch.as_tensor(edge_weight, dtype=torch.float32, device=dev)
            h = self.nodes(x, edge_index, edge_weight)
            return h.mean(0)
        finally:
            self.train(was_training)


class GraphMoCo(nn.Module):
    """Graph-level MoCo: query encoder, momentum key encoder, one shared queue of subject keys.

    Args:
        encoder: the query :class:`GraphEncoder` (the key encoder is a deep copy, no gradients).
        queue_size: K negatives; momentum: key encoder EMA factor; seed: queue initialisation.

    ``forward(view_q, view_k) -> (l_pos [B, 1], l_neg [B, K])`` raw cosine similarities; in
    training mode the momentum update happens before the keys are computed and the keys are
    enqueued afterwards (as in :class:`models.moco.MoCo`); in eval mode both are left alone, so
    that scoring a validation batch changes neither the key encoder nor the queue. Plain InfoNCE
    on these (:class:`models.ifm.IFMLoss` with method ``none``) is the
    graph stage's loss.
    """

    def __init__(self, encoder: GraphEncoder, queue_size: int = 256, momentum: float = 0.99, seed: int = 0):
        super().__init__()
        from models.queue import NegativeQueue

        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        self.momentum = float(momentum)
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)
        for param in self.encoder_k.parameters():
            param.requires_grad_(False)
        self.queue = NegativeQueue(1, queue_size, encoder.projection_dim, shared=True, seed=seed)

    def forward(self, view_q: GraphBatch, view_k: GraphBatch) -> tuple[Tensor, Tensor]:
        from models.momentum import update_momentum

        q = self.encoder_q(view_q)  # BxC
        with torch.no_grad():
            if self.training:
                update_momentum(self.encoder_q, self.encoder_k, self.momentum)
            k = self.encoder_k(view_k)  # BxC
        zeros = torch.zeros(q.shape[0], dtype=torch.long, device=q.device)
        l_pos = (q * k).sum(dim=1, keepdim=True)  # Bx1
        l_neg = self.queue.negative_logits(q, zeros)  # BxK
        if self.training:
            self.queue.enqueue(k, zeros)
        return l_pos, l_neg


def save_graph_encoder(path: str | os.PathLike, encoder: GraphEncoder, **metadata: Any) -> None:
    """Write ``graph.pt``: ``{"state_dict", "hyper_parameters", **metadata}`` (weights-only loadable)."""
    from models.checkpoint import save

    state = {k: v.detach().cpu().contiguous() for k, v in encoder.state_dict().items()}
    save({"state_dict": state, "hyper_parameters": encoder.hyper_parameters(), **metadata}, path)


def load_graph_encoder(path: str | os.PathLike, device: Any = "cpu") -> GraphEncoder:
    """The :class:`GraphEncoder` of ``graph.pt`` in eval mode on ``device``."""
    from models.checkpoint import load
    from pipeline.errors import ConfigError

    saved = load(path)
    if "state_dict" not in saved or "hyper_parameters" not in saved:
        raise ConfigError(f"{path} is not a graph model file: missing state_dict or hyper_parameters")
    encoder = GraphEncoder(**saved["hyper_parameters"])
    encoder.load_state_dict(saved["state_dict"])
    return encoder.to(device).eval()
