"""Distributed data parallel helpers. Single-process is the default: every function here has a
trivial result when no process group is initialised, so no other module needs a DDP-only path.

Launch with ``torchrun --nproc_per_node G copdssl train ...``: torchrun sets ``RANK``,
``WORLD_SIZE`` and ``LOCAL_RANK``, and :func:`init_from_env` joins the process group (NCCL on
CUDA, Gloo on CPU).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class DistContext:
    """Where this process runs: ``rank`` of ``world_size`` processes, ``local_rank`` on its node."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        """True on the process that writes outputs (rank 0)."""
        return self.rank == 0


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {value!r}") from None


def init_from_env(device: str = "auto") -> DistContext:
    """Join the torchrun process group if ``WORLD_SIZE`` > 1, else run as a single process.

    Args:
        device: ``'auto'`` (CUDA when available), ``'cpu'`` or ``'cuda'``. Under torchrun on
            CUDA each process uses GPU ``LOCAL_RANK``.

    Raises:
        ValueError: unknown device, ``'cuda'`` without CUDA, or malformed torchrun variables.
    """
    if device not in DEVICES:
        raise ValueError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but CUDA is not available")
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world_size = _env_int("WORLD_SIZE") or 1
    rank = _env_int("RANK") or 0
    local_rank = _env_int("LOCAL_RANK") or 0
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"invalid torchrun environment: RANK={rank}, WORLD_SIZE={world_size}")
    if use_cuda:
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible")
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device("cpu")
    if world_size > 1 and not is_distributed():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world_size,
                                **({"device_id": torch_device} if use_cuda else {}))
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def is_distributed() -> bool:
    """True inside an initialised process group of more than one process."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def concat_all_gather(t: Tensor) -> Tensor:
    """Concatenate ``t`` [B, ...] from every rank along dim 0 -> [world_size * B, ...], in rank
    order (same B on every rank). No gradient flows through. Identity when not distributed."""
    if not is_distributed():
        return t
    gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, t.contiguous())
    return torch.cat(gathered, dim=0)


def broadcast_(t: Tensor, src: int = 0) -> Tensor:
    """Overwrite ``t`` in place with rank ``src``'s tensor and return it (a no-op when not distributed)."""
    if is_distributed():
        dist.broadcast(t, src=src)
    return t


def barrier() -> None:
    """Wait for every rank (a no-op when not distributed)."""
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group if one was joined."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
