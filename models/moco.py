"""MoCo-v2 with per-location negative queues (context-aware MoCo, Sun et al. AAAI 2021).

The model returns raw similarities; the loss (with or without IFM) lives in :mod:`models.ifm`,
as in facebookresearch/moco where ``forward`` returns logits and the loss is outside.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from models.distributed import broadcast_, concat_all_gather, is_distributed
from models.encoder import PatchEncoder, encoder_from_settings, input_channels
from models.momentum import update_momentum
from models.queue import NegativeQueue

SHUFFLE_BN = ("split", "none")


class MoCo(nn.Module):
    """Query encoder, momentum key encoder (a deep copy without gradients) and negative queue.

    ``forward(x_q, x_k, loc, loc_idx[, loc_k=...])`` with views x_q, x_k [N, C, S, S, S], normalised
    locations loc [N, 3] (of the queries; ``loc_k`` [N, 3] of the keys when they come from other
    locations, e.g. neighbour positives) and location indices loc_idx [N] (the queues'; keys are
    enqueued there) returns ``(l_pos [N, 1], l_neg [N, K])``, the
    raw cosine similarities of each query with its key and with the queued negatives of its
    location (not divided by the temperature: :class:`models.ifm.IFMLoss` does that). In training
    mode it first moves the key encoder towards the query encoder (momentum ``m``) and finally
    enqueues the keys; in eval mode neither happens.

    Shuffle-BN (so the batch statistics of a key are not computed over the same samples as those
    of its query):

    * ``'split'``, one process: queries are encoded in ``groups`` consecutive sub-batches; keys
      are shuffled with a random permutation, encoded in ``groups`` sub-batches and unshuffled;
    * ``'split'`` under DDP: keys are gathered from all ranks, shuffled by a permutation drawn on
      rank 0, encoded per rank and unshuffled (facebookresearch/moco); queries use per-rank BN;
    * ``'none'``: plain BN over the whole batch for both encoders.

    The permutations come from ``generator`` if given to ``forward``, else from the module's own
    CPU generator (seeded by ``seed``); its state is part of the ``state_dict`` (extra state), so
    a resumed run draws the same permutations. Under DDP every rank must have the same batch size.
    """

    def __init__(self, encoder: PatchEncoder, queue: NegativeQueue, momentum: float = 0.999,
                 shuffle_bn: str = "split", groups: int = 2, seed: int = 0):
        super().__init__()
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum!r}")
        if shuffle_bn not in SHUFFLE_BN:
            raise ValueError(f"shuffle_bn must be one of {', '.join(SHUFFLE_BN)}, got {shuffle_bn!r}")
        if int(groups) < 1 or (shuffle_bn == "split" and int(groups) < 2):
            raise ValueError(f"groups must be >= 2 for shuffle_bn='split' (>= 1 otherwise), got {groups!r}")
        projection_dim = getattr(encoder, "projection_dim", queue.dim)
        if projection_dim != queue.dim:
            raise ValueError(f"queue dim {queue.dim} does not match the encoder's projection_dim {projection_dim}")
        self.momentum, self.shuffle_bn, self.groups = float(momentum), shuffle_bn, int(groups)
        self.encoder_q = encoder
        self.encoder_k = copy.deepcopy(encoder)
        self.encoder_k.requires_grad_(False)
        self.queue = queue
        self._generator = torch.Generator().manual_seed(int(seed))

    def extra_repr(self) -> str:
        return f"momentum={self.momentum}, shuffle_bn={self.shuffle_bn!r}, groups={self.groups}"

    def get_extra_state(self) -> dict[str, Tensor]:
        return {"shuffle_generator": self._generator.get_state()}

    def set_extra_state(self, state: dict[str, Tensor]) -> None:
        self._generator.set_state(state["shuffle_generator"])

    def forward(self, x_q: Tensor, x_k: Tensor, loc: Tensor, loc_idx: Tensor,
                generator: torch.Generator | None = None, loc_k: Tensor | None = None) -> tuple[Tensor, Tensor]:
        n = x_q.shape[0]
        if x_k.shape != x_q.shape:
            raise ValueError(f"x_q and x_k must have the same shape, got {list(x_q.shape)} and {list(x_k.shape)}")
        if loc.ndim != 2 or loc.shape[0] != n or loc_idx.shape != (n,):
            raise ValueError(f"loc must be [{n}, 3] and loc_idx [{n}], got {list(loc.shape)} and {list(loc_idx.shape)}")
        loc_k = loc if loc_k is None else loc_k
        if loc_k.shape != loc.shape:
            raise ValueError(f"loc_k must be [{n}, {loc.shape[1]}], got {list(loc_k.shape)}")
        generator = self._generator if generator is None else generator
        q = self._encode_queries(x_q, loc)  # NxC, unit norm
        with torch.no_grad():
            if self.training:
                update_momentum(self.encoder_q, self.encoder_k, self.momentum)
            k = self._encode_keys(x_k, loc_k, generator)  # NxC, unit norm
        l_pos = (q * k.to(q.dtype)).sum(dim=1, keepdim=True)  # Nx1
        l_neg = self.queue.negative_logits(q, loc_idx)  # NxK
        if self.training:
            self.queue.enqueue(concat_all_gather(k), concat_all_gather(loc_idx.to(k.device, torch.long)))
        return l_pos, l_neg

    def _split(self) -> bool:
        return self.training and self.shuffle_bn == "split"

    def _encode_queries(self, x: Tensor, loc: Tensor) -> Tensor:
        """[N, C]; in 'split' mode on one process, per consecutive sub-batch (own BN statistics)."""
        if not self._split() or is_distributed():
            return self.encoder_q(x, loc)
        return torch.cat([self.encoder_q(xs, ls) for xs, ls in
                          zip(x.tensor_split(self.groups), loc.tensor_split(self.groups))])

    def _encode_keys(self, x: Tensor, loc: Tensor, generator: torch.Generator) -> Tensor:
        """[N, C] keys, in batch order."""
        if not self._split():
            return self.encoder_k(x, loc)
        if is_distributed():
            return self._encode_keys_ddp(x, loc, generator)
        perm = torch.randperm(x.shape[0], generator=generator, device=generator.device).to(x.device)
        keys = torch.cat([self.encoder_k(x[idx], loc[idx]) for idx in perm.tensor_split(self.groups)])
        return keys[torch.argsort(perm)]  # unshuffle: keys[perm[i]] was computed at row i

    def _encode_keys_ddp(self, x: Tensor, loc: Tensor, generator: torch.Generator) -> Tensor:
        """Batch shuffle across ranks (facebookresearch/moco ``_batch_shuffle_ddp``)."""
        x_all, loc_all = concat_all_gather(x), concat_all_gather(loc)  # (W*N)x...
        world = x_all.shape[0] // x.shape[0]
        rank = torch.distributed.get_rank()
        perm = torch.randperm(x_all.shape[0], generator=generator, device=generator.device).to(x.device)
        broadcast_(perm, src=0)
        mine = perm.view(world, -1)[rank]
        k_all = concat_all_gather(self.encoder_k(x_all[mine], loc_all[mine]))  # (W*N)xC in shuffled order
        k_all = k_all[torch.argsort(perm)]  # back to gathered batch order
        return k_all.view(world, -1, k_all.shape[1])[rank]


def validate_moco_settings(settings: dict[str, Any], world_size: int = 1) -> None:
    """Reject combinations of training settings that the schema cannot express.

    Args:
        settings: a resolved, validated run (the ``train`` section with the run's overrides).
        world_size: number of DDP processes (keys of all ranks are enqueued together).

    Raises:
        ValueError: per-location queues with location batches whose queue_size is not a multiple
            of the keys enqueued per step (every step must fill whole blocks of the ring, as
            facebookresearch/moco requires), or 'split' shuffle-BN with fewer than 2 groups or
            sub-batches of fewer than 2 samples.
    """
    moco = settings["moco"]
    batch = int(settings["batch_size"])
    queue_size = int(moco["queue_size"])
    groups = int(moco["shuffle_bn_groups"])
    if moco["queue"] == "per_location" and settings["sampler"] == "location":
        per_step = batch * int(world_size)
        if queue_size % per_step:
            across = f" x {world_size} processes" if world_size > 1 else ""
            raise ValueError(f"train.moco.queue_size {queue_size} is not a multiple of train.batch_size {batch}"
                             f"{across}: per-location queues with location batches enqueue a whole batch into one "
                             f"location's queue each step")
    if moco["shuffle_bn"] == "split" and world_size == 1:
        if groups < 2:
            raise ValueError(f"train.moco.shuffle_bn_groups {groups} must be >= 2 for shuffle_bn 'split'")
        if batch < 2 * groups:
            raise ValueError(f"train.batch_size {batch} gives sub-batches of fewer than 2 samples with "
                             f"train.moco.shuffle_bn_groups {groups}")


def moco_from_settings(settings: dict[str, Any], patch_size: int, num_locations: int, world_size: int = 1,
                       init_seed: int | None = None) -> MoCo:
    """Build :class:`MoCo` (encoder, queue, key encoder) from a resolved run's settings.

    The initial weights are drawn from ``init_seed`` (default ``settings['seed']``) in a forked
    RNG scope, so the global RNG is neither used nor changed; the queue's initial keys and the
    shuffle permutations are seeded by ``settings['seed']``.
    """
    validate_moco_settings(settings, world_size=world_size)
    seed = int(settings["seed"])
    moco = settings["moco"]
    encoder = encoder_from_settings(settings["encoder"], patch_size,
                                    seed=seed if init_seed is None else int(init_seed),
                                    in_channels=input_channels(settings))
    queue = NegativeQueue(num_locations, int(moco["queue_size"]), encoder.projection_dim,
                          shared=moco["queue"] == "shared", seed=seed)
    return MoCo(encoder, queue, momentum=float(moco["momentum"]), shuffle_bn=moco["shuffle_bn"],
                groups=int(moco["shuffle_bn_groups"]), seed=seed)
