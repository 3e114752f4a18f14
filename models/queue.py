"""Queues of negative keys, one ring buffer per atlas location (or one shared).

Context-aware MoCo (Sun et al., AAAI 2021) draws the negatives of a query from keys of patches
at the *same* anatomical location, so the encoder must tell subjects apart rather than
locations. The queues are a registered buffer, so they are saved with the state_dict (as in
facebookresearch/moco) and follow ``.to(device)``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


class NegativeQueue(nn.Module):
    """Ring buffers of L2-normalised negative keys.

    Buffers: ``queue`` [L, K, D] (random unit vectors at start, from ``seed``), ``ptr`` long [L]
    (next write position per location). ``shared=True`` keeps a single queue (L = 1) and maps
    every location to it.

    Args:
        num_locations: number of atlas locations P (valid ``loc_idx`` are 0..P-1).
        size: K, keys per queue. dim: D, key dimension. seed: seed of the initial keys.
    """

    def __init__(self, num_locations: int, size: int, dim: int, shared: bool = False, seed: int = 0):
        super().__init__()
        for label, value in (("num_locations", num_locations), ("size", size), ("dim", dim)):
            if int(value) < 1:
                raise ValueError(f"{label} must be >= 1, got {value!r}")
        self.num_locations, self.size, self.dim = int(num_locations), int(size), int(dim)
        self.shared = bool(shared)
        queues = 1 if self.shared else self.num_locations
        generator = torch.Generator().manual_seed(int(seed))
        init = F.normalize(torch.randn(queues, self.size, self.dim, generator=generator), dim=2)
        self.register_buffer("queue", init)  # LxKxD
        self.register_buffer("ptr", torch.zeros(queues, dtype=torch.long))  # L

    def extra_repr(self) -> str:
        return f"num_locations={self.num_locations}, size={self.size}, dim={self.dim}, shared={self.shared}"

    def _rows(self, loc_idx: Tensor, n: int) -> Tensor:
        """Validated queue rows [N] for location indices [N]."""
        if loc_idx.ndim != 1 or loc_idx.shape[0] != n:
            raise ValueError(f"loc_idx must be [{n}], got {list(loc_idx.shape)}")
        if loc_idx.dtype.is_floating_point or loc_idx.dtype == torch.bool:
            raise ValueError(f"loc_idx must hold integer indices, got {loc_idx.dtype}")
        loc_idx = loc_idx.to(self.ptr.device, torch.long)
        if n and (int(loc_idx.min()) < 0 or int(loc_idx.max()) >= self.num_locations):
            raise ValueError(f"loc_idx must lie in [0, {self.num_locations - 1}], got values "
                             f"{int(loc_idx.min())}..{int(loc_idx.max())}")
        return torch.zeros_like(loc_idx) if self.shared else loc_idx

    def negative_logits(self, q: Tensor, loc_idx: Tensor) -> Tensor:
        """Similarities of each query with the keys queued at its location.

        Args:
            q: [N, D] normalised queries. loc_idx: [N] location indices.

        Returns:
            [N, K] with ``out[n] = queue[loc_idx[n]] @ q[n]``. One matrix product when all
            queries share a location (location batches, shared queue); otherwise one per distinct
            location (queries grouped by a sort), never gathering an [N, K, D] copy. The queue is
            read through a detached copy, so a later :meth:`enqueue` does not disturb autograd.
        """
        if q.ndim != 2 or q.shape[1] != self.dim:
            raise ValueError(f"q must be [N, {self.dim}], got {list(q.shape)}")
        rows = self._rows(loc_idx, q.shape[0])
        if q.shape[0] == 0:
            return q.new_zeros(0, self.size)
        first = rows[0]
        if bool((rows == first).all()):
            return q @ self.queue[first].detach().clone().to(q.dtype).T  # NxK
        order = torch.argsort(rows)
        groups, counts = torch.unique_consecutive(rows[order], return_counts=True)
        chunks = q[order].split(counts.tolist())
        out = torch.cat([chunk @ self.queue[g].detach().clone().to(q.dtype).T
                         for chunk, g in zip(chunks, groups.tolist())])  # NxK in sorted order
        return out[torch.argsort(order)]

    @torch.no_grad()
    def enqueue(self, keys: Tensor, loc_idx: Tensor) -> None:
        """Write ``keys`` [N, D] into the queues of ``loc_idx`` [N], in batch order.

        Per location, the keys go to consecutive slots from that location's pointer, wrapping
        around; the pointer advances by the number of keys (mod K). With more than K keys for one
        location only its last K survive, exactly as if written one by one.
        """
        if keys.ndim != 2 or keys.shape[1] != self.dim:
            raise ValueError(f"keys must be [N, {self.dim}], got {list(keys.shape)}")
        rows = self._rows(loc_idx, keys.shape[0])
        if keys.shape[0] == 0:
            return
        keys = keys.detach().to(self.queue.device, self.queue.dtype)
        queues = self.queue.shape[0]
        counts = torch.bincount(rows, minlength=queues)  # L
        # rank of each key among the keys of its location, in batch order (stable sort)
        order = torch.sort(rows, stable=True).indices
        starts = torch.cumsum(counts, 0) - counts  # L
        rank = torch.empty_like(rows)
        rank[order] = torch.arange(rows.numel(), device=rows.device) - starts[rows[order]]
        keep = rank >= counts[rows] - self.size  # only the last K per location survive
        slots = (self.ptr[rows] + rank) % self.size
        self.queue[rows[keep], slots[keep]] = keys[keep]
        self.ptr.add_(counts).remainder_(self.size)
