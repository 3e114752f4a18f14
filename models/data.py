"""Training data: memory-mapped patch arrays, location batches, background prefetch.

* :class:`PatchStore` opens each subject's ``int16 [P, S, S, S]`` patch file with
  ``np.load(mmap_mode="r")`` on first use, so host memory does not grow with the cohort
  (pages live in the OS page cache and are reclaimable); at most ``max_open`` memory maps are
  held at once, which also bounds the number of open file descriptors.
* :class:`LocationBatchSampler` plans the batches of an epoch as ``(subject_idx, loc_idx)``
  index arrays. In ``location`` mode every batch is one atlas location with ``batch_size``
  distinct subjects (what the per-location negative queues of Sun et al. need); in ``mixed``
  mode batches are random (subject, location) pairs. The plan is a pure function of
  ``(seed, epoch)``, and the position inside the epoch is part of ``state_dict()``, so a run
  resumes mid-epoch exactly. Under DDP every global batch is split into disjoint per-rank shares.
* :class:`PatchLoader` reads the planned batches in background threads (numpy copies out of a
  memory map release the GIL), with the lung masks and the neighbour-positive keys when asked,
  pins them on CUDA and hands them over in plan order as :class:`PatchBatch`.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import SubjectError

SAMPLER_MODES = ("location", "mixed")
_KEY_STREAM = 3  # stream id of the neighbour-key draws (see PatchLoader)

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# patch store
# ---------------------------------------------------------------------------------------------
def read_npy_header(path: str | os.PathLike) -> tuple[tuple[int, ...], np.dtype]:
    """Shape and dtype of a ``.npy`` file from its header alone (no data is read)."""
    with open(path, "rb") as handle:
        version = np.lib.format.read_magic(handle)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(handle)
        else:
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(handle)
    if fortran and len(shape) > 1:
        raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
    return tuple(int(s) for s in shape), np.dtype(dtype)


class PatchStore:
    """Memory-mapped per-subject arrays that all share one shape ``[P, ...]``.

    Args:
        paths: one ``.npy`` file per subject, e.g. ``work/patches/{sid}.npy`` holding
            ``int16 [P, S, S, S]`` (or ``work/runs/{run}/embeddings/{sid}.npy``, float32 ``[P, D]``).
        sids: subject IDs for error messages (default: the file stems).
        dtype: required dtype (``None`` accepts any dtype shared by all files).
        max_open: most memory maps held open at once (least recently used are closed).

    Every header is read at construction (cheap: a few hundred bytes per file); a file whose
    shape or dtype differs from the first one raises :class:`SubjectError` naming the file.
    """

    def __init__(self, paths: Sequence[str | os.PathLike], sids: Sequence[str] | None = None,
                 dtype: Any = np.int16, max_open: int = 256, stage: str = "train"):
        if len(paths) == 0:
            raise ValueError("PatchStore needs at least one file, got none")
        if max_open < 1:
            raise ValueError(f"max_open must be >= 1, got {max_open}")
        self.paths = [Path(p) for p in paths]
        self.sids = list(sids) if sids is not None else [p.name.split(".")[0] for p in self.paths]
        if len(self.sids) != len(self.paths):
            raise ValueError(f"got {len(self.sids)} subject IDs for {len(self.paths)} files")
        self.max_open = int(max_open)
        self.stage = stage
        self.shape: tuple[int, ...] = ()
        self.dtype: np.dtype | None = None
        for i, path in enumerate(self.paths):
            shape, file_dtype = self._header(i)
            if dtype is not None and file_dtype != np.dtype(dtype):
                raise SubjectError(self.sids[i], f"{path} has dtype {file_dtype}, expected {np.dtype(dtype)}", stage)
            if i == 0:
                if len(shape) < 2 or min(shape) < 1:
                    raise SubjectError(self.sids[i], f"{path} has shape {shape}, expected [P, ...] with P >= 1", stage)
                self.shape, self.dtype = shape, file_dtype
            elif shape != self.shape or file_dtype != self.dtype:
                raise SubjectError(self.sids[i], f"{path} has shape {shape} {file_dtype}, but {self.paths[0]} has "
                                   f"{self.shape} {self.dtype}; all files must agree", stage)
        self._open: collections.OrderedDict[int, np.memmap] = collections.OrderedDict()
        self._lock = threading.Lock()  # loader threads share the cache of open maps

    def _header(self, i: int) -> tuple[tuple[int, ...], np.dtype]:
        try:
            return read_npy_header(self.paths[i])
        except FileNotFoundError:
            raise SubjectError(self.sids[i], f"file {self.paths[i]} does not exist", self.stage) from None
        except (OSError, ValueError) as error:
            raise SubjectError(self.sids[i], f"{self.paths[i]} is not a readable .npy file: {error}", self.stage) from None

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_locations(self) -> int:
        return self.shape[0]

    @property
    def item_shape(self) -> tuple[int, ...]:
        """Shape of one row, e.g. ``(S, S, S)`` for patches."""
        return self.shape[1:]

    def __getstate__(self) -> dict[str, Any]:  # worker processes open their own maps
        state = self.__dict__.copy()
        del state["_open"], state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._open = collections.OrderedDict()
        self._lock = threading.Lock()

    def array(self, i: int) -> np.memmap:
        """The read-only memory map of subject ``i`` (``[P, ...]``), opened on first use."""
        with self._lock:
            mapped = self._open.get(i)
            if mapped is not None:
                self._open.move_to_end(i)
                return mapped
        try:
            mapped = np.load(self.paths[i], mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise SubjectError(self.sids[i], f"cannot memory-map {self.paths[i]}: {error}", self.stage) from None
        if mapped.shape != self.shape:  # changed on disk after construction
            raise SubjectError(self.sids[i], f"{self.paths[i]} has shape {mapped.shape}, expected {self.shape}", self.stage)
        with self._lock:
            self._open[i] = mapped
            while len(self._open) > self.max_open:
                self._open.popitem(last=False)
        return mapped

    def get(self, subject_idx: np.ndarray, loc_idx: np.ndarray) -> np.ndarray:
        """Rows ``loc_idx[b]`` of subjects ``subject_idx[b]``.

        Args:
            subject_idx: int ``[B]`` indices into the store's files.
            loc_idx: int ``[B]`` grid locations.

        Returns:
            A new (not memory-mapped) array ``[B, *item_shape]`` of the store's dtype.
        """
        subject_idx = np.asarray(subject_idx, dtype=np.int64).reshape(-1)
        loc_idx = np.asarray(loc_idx, dtype=np.int64).reshape(-1)
        if subject_idx.shape != loc_idx.shape:
            raise ValueError(f"subject_idx {subject_idx.shape} and loc_idx {loc_idx.shape} differ in length")
        if subject_idx.size and (subject_idx.min() < 0 or subject_idx.max() >= len(self)):
            raise IndexError(f"subject index out of range [0, {len(self)})")
        if loc_idx.size and (loc_idx.min() < 0 or loc_idx.max() >= self.num_locations):
            raise IndexError(f"location index out of range [0, {self.num_locations})")
        out = np.empty((subject_idx.size, *self.item_shape), dtype=self.dtype)
        for b, (s, p) in enumerate(zip(subject_idx.tolist(), loc_idx.tolist())):
            out[b] = self.array(s)[p]
        return out


class NeighbourKeys:
    """Key locations for neighbour positives (DrasCLR): with probability ``prob`` a query's key is
    the same subject's patch at a uniformly chosen adjacent atlas location, else the same patch.

    Args:
        edges: int64 ``[2, E]`` grid adjacency (``grid.npz`` ``edges``, both directions).
        n_locations: P.
        prob: probability of a neighbour key (a location without neighbours keeps its own patch).
    """

    def __init__(self, edges: np.ndarray, n_locations: int, prob: float):
        edges = np.asarray(edges, dtype=np.int64).reshape(2, -1)
        if not 0.0 <= float(prob) <= 1.0:
            raise ValueError(f"neighbour probability must be in [0, 1], got {prob!r}")
        if edges.size and (edges.min() < 0 or edges.max() >= n_locations):
            raise ValueError(f"edges refer to locations outside [0, {n_locations})")
        order = np.lexsort((edges[1], edges[0]))
        self.targets = edges[1, order]  # neighbours of location p: targets[start[p]:start[p + 1]]
        self.start = np.searchsorted(edges[0, order], np.arange(n_locations + 1))
        self.prob = float(prob)

    def draw(self, loc_idx: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """Key locations int64 ``[B]`` for query locations ``loc_idx`` int64 ``[B]``."""
        loc_idx = np.asarray(loc_idx, dtype=np.int64)
        count = self.start[loc_idx + 1] - self.start[loc_idx]
        use = (rng.random(loc_idx.size) < self.prob) & (count > 0)
        pick = (rng.random(loc_idx.size) * np.maximum(count, 1)).astype(np.int64)
        keys = loc_idx.copy()
        keys[use] = self.targets[self.start[loc_idx[use]] + pick[use]]
        return keys


# ---------------------------------------------------------------------------------------------
# batch sampler
# ---------------------------------------------------------------------------------------------
class LocationBatchSampler:
    """Seeded, resumable plan of ``(subject_idx, loc_idx)`` batches.

    Args:
        n_subjects, n_locations: cohort size N and grid size P.
        batch_size: GLOBAL batch size B (all ranks together); each rank gets ``B / world_size``.
        mode: ``location`` (one location, B distinct subjects per batch) or ``mixed``.
        seed: base seed; the plan of epoch e depends only on ``(seed, e)``.
        steps_per_epoch: batches per epoch; 0 = one pass over all N*P (subject, location) pairs
            (``location``: P * ceil(N/B) batches, the last chunk of each location filled up with
            other subjects; ``mixed``: floor(N*P/B) batches).
        rank, world_size: DDP position; each rank takes a disjoint slice of every batch.

    Iterating yields this rank's ``(subject_idx int64 [B/W], loc_idx int64 [B/W])`` from
    ``position`` onwards and advances ``position``; :meth:`batch` gives random access.
    """

    def __init__(self, n_subjects: int, n_locations: int, batch_size: int, mode: str = "location",
                 seed: int = 0, steps_per_epoch: int = 0, rank: int = 0, world_size: int = 1):
        if mode not in SAMPLER_MODES:
            raise ValueError(f"sampler mode must be one of {SAMPLER_MODES}, got {mode!r}")
        if n_subjects < 1 or n_locations < 1:
            raise ValueError(f"need at least one subject and one location, got {n_subjects} and {n_locations}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        if batch_size % world_size:
            raise ValueError(f"batch_size {batch_size} is not divisible by the world size {world_size}")
        if mode == "location" and batch_size > n_subjects:
            raise ValueError(f"batch_size {batch_size} exceeds the number of subjects {n_subjects}: "
                             "location batches need distinct subjects")
        if mode == "mixed" and batch_size > n_subjects * n_locations:
            raise ValueError(f"batch_size {batch_size} exceeds the {n_subjects * n_locations} (subject, location) pairs")
        if steps_per_epoch < 0:
            raise ValueError(f"steps_per_epoch must be >= 0, got {steps_per_epoch}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.n_subjects, self.n_locations = int(n_subjects), int(n_locations)
        self.batch_size, self.mode, self.seed = int(batch_size), mode, int(seed)
        self.steps_per_epoch = int(steps_per_epoch)
        self.rank, self.world_size = int(rank), int(world_size)
        self.local_batch_size = self.batch_size // self.world_size
        self.epoch = 0
        self.position = 0
        # (epoch, subjects [T, B], locations [T] (location mode) or [T, B] (mixed))
        self._plan: tuple[int, np.ndarray, np.ndarray] | None = None

    # -- plan -------------------------------------------------------------------------------
    def _pass_length(self) -> int:
        if self.mode == "location":
            return self.n_locations * -(-self.n_subjects // self.batch_size)
        return (self.n_subjects * self.n_locations) // self.batch_size

    def __len__(self) -> int:
        return self.steps_per_epoch or self._pass_length()

    def _one_pass(self, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """One pass: subjects int32 [T, B] and locations int32 [T] (location) or [T, B] (mixed)."""
        n, p, b = self.n_subjects, self.n_locations, self.batch_size
        if self.mode == "location":
            chunks = -(-n // b)
            perms = rng.permuted(np.tile(np.arange(n, dtype=np.int32), (p, 1)), axis=1)  # P x N
            extra = chunks * b - n  # fill the last chunk with subjects from the first one (distinct)
            rows = np.concatenate([perms, perms[:, :extra]], axis=1).reshape(p * chunks, b)
            locs = np.repeat(np.arange(p, dtype=np.int32), chunks)
            order = rng.permutation(p * chunks)
            return rows[order], locs[order]
        pairs = rng.permutation(n * p)[: self._pass_length() * b].reshape(-1, b)
        return (pairs // p).astype(np.int32), (pairs % p).astype(np.int32)

    def _epoch_plan(self) -> tuple[np.ndarray, np.ndarray]:
        if self._plan is None or self._plan[0] != self.epoch:
            total, subjects, locs, pass_index = len(self), [], [], 0
            while sum(len(s) for s in subjects) < total:
                rng = np.random.default_rng([self.seed, self.epoch, pass_index])
                s, l = self._one_pass(rng)
                subjects.append(s)
                locs.append(l)
                pass_index += 1
            self._plan = (self.epoch, np.concatenate(subjects)[:total], np.concatenate(locs)[:total])
        return self._plan[1], self._plan[2]

    def batch(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """This rank's share of batch ``index`` of the current epoch: int64 ``[B/W]`` each."""
        if not 0 <= index < len(self):
            raise IndexError(f"batch {index} out of range [0, {len(self)})")
        subjects, locs = self._epoch_plan()
        lo, hi = self.rank * self.local_batch_size, (self.rank + 1) * self.local_batch_size
        subject_idx = subjects[index, lo:hi].astype(np.int64)
        if self.mode == "location":
            loc_idx = np.full(self.local_batch_size, locs[index], dtype=np.int64)
        else:
            loc_idx = locs[index, lo:hi].astype(np.int64)
        return subject_idx, loc_idx

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        while self.position < len(self):
            index = self.position
            self.position = index + 1  # consumed once handed over
            yield self.batch(index)

    # -- state ------------------------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start epoch ``epoch`` from its first batch."""
        if epoch < 0:
            raise ValueError(f"epoch must be >= 0, got {epoch}")
        self.epoch, self.position = int(epoch), 0

    def state_dict(self) -> dict[str, Any]:
        """Plain-typed state: the configuration (checked on load), epoch and position."""
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "mode": self.mode,
                "n_subjects": self.n_subjects, "n_locations": self.n_locations,
                "batch_size": self.batch_size, "steps_per_epoch": self.steps_per_epoch}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "mode", "n_subjects", "n_locations", "batch_size", "steps_per_epoch"):
            if state.get(key) != getattr(self, key):
                raise ValueError(f"sampler state has {key}={state.get(key)!r}, this sampler has {getattr(self, key)!r}")
        if not 0 <= int(state["position"]) <= len(self):
            raise ValueError(f"sampler state position {state['position']} is outside [0, {len(self)}]")
        self.epoch, self.position = int(state["epoch"]), int(state["position"])


# ---------------------------------------------------------------------------------------------
# background prefetch
# ---------------------------------------------------------------------------------------------
@dataclass
class PatchBatch:
    """One training batch as the loader hands it over (tensors on the training device).

    Attributes:
        patches: int16 ``[b, S, S, S]`` query patches (HU).
        subject_idx, loc_idx: int64 ``[b]``.
        masks: bool ``[b, S, S, S]`` lung masks of the patches, or ``None`` (no masks loaded).
        key_patches, key_masks, key_loc_idx: the positives' patches, masks and locations when they
            differ from the queries' (neighbour positives), else ``None``.
    """

    patches: Any
    subject_idx: Any
    loc_idx: Any
    masks: Any = None
    key_patches: Any = None
    key_masks: Any = None
    key_loc_idx: Any = None

    def to(self, device, non_blocking: bool = False) -> PatchBatch:
        return PatchBatch(**{f.name: None if getattr(self, f.name) is None
                             else getattr(self, f.name).to(device, non_blocking=non_blocking) for f in fields(self)})

    def pin_memory(self) -> PatchBatch:
        return PatchBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name).pin_memory()
                             for f in fields(self)})


class PatchLoader:
    """Background reading of the sampler's batches, in plan order.

    Args:
        store: the patch store (``[P, S, S, S]`` int16 per subject).
        sampler: the batch plan; iteration starts at ``sampler.position`` and advances it as
            batches are handed to the consumer (not when they are read), so a checkpoint taken
            after consuming batch i resumes at i + 1.
        device: target device of the batches.
        workers: reading threads (>= 1).
        depth: batches read ahead.
        masks: optional store of the bit-packed lung masks (uint8 ``[P, S, S, ceil(S/8)]`` per
            subject, same subjects and order as ``store``), unpacked to bool ``[b, S, S, S]``.
        keys: optional :class:`NeighbourKeys`; the key locations of batch i are drawn from a
            generator seeded by ``(sampler seed, epoch, i, rank)``, so they need no state to resume.

    Yields :class:`PatchBatch` on ``device`` (copied from pinned memory asynchronously on CUDA).
    ``wait_seconds`` accumulates the time the consumer spent waiting for data (the loader
    "starving" it).
    """

    def __init__(self, store: PatchStore, sampler: LocationBatchSampler, device: Any = "cpu",
                 workers: int = 1, depth: int = 4, masks: PatchStore | None = None, keys: NeighbourKeys | None = None):
        import torch

        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if depth < 1:
            raise ValueError(f"depth must be >= 1, got {depth}")
        if masks is not None and (len(masks) != len(store) or masks.num_locations != store.num_locations):
            raise ValueError(f"mask store ({len(masks)} subjects x {masks.num_locations} locations) does not match "
                             f"the patch store ({len(store)} x {store.num_locations})")
        self.store, self.sampler, self.masks, self.keys = store, sampler, masks, keys
        self.device = torch.device(device)
        self.workers, self.depth = int(workers), int(depth)
        self.pin = self.device.type == "cuda"
        self.wait_seconds = 0.0

    def __len__(self) -> int:
        return len(self.sampler) - self.sampler.position

    def _masks(self, subject_idx: np.ndarray, loc_idx: np.ndarray):
        import torch

        from pipeline.patches import unpack_masks

        return torch.from_numpy(unpack_masks(self.masks.get(subject_idx, loc_idx), self.store.item_shape[-1]))

    def _read(self, index: int) -> PatchBatch:
        import torch

        subject_idx, loc_idx = self.sampler.batch(index)
        batch = PatchBatch(torch.from_numpy(self.store.get(subject_idx, loc_idx)), torch.from_numpy(subject_idx),
                           torch.from_numpy(loc_idx))
        if self.masks is not None:
            batch.masks = self._masks(subject_idx, loc_idx)
        if self.keys is not None:
            s = self.sampler
            rng = np.random.default_rng([s.seed, s.epoch, index, s.rank, _KEY_STREAM])
            key_loc = self.keys.draw(loc_idx, rng)
            batch.key_loc_idx = torch.from_numpy(key_loc)
            batch.key_patches = torch.from_numpy(self.store.get(subject_idx, key_loc))
            if self.masks is not None:
                batch.key_masks = self._masks(subject_idx, key_loc)
        return batch.pin_memory() if self.pin else batch

    def __iter__(self) -> Iterator[PatchBatch]:
        sampler = self.sampler
        sampler._epoch_plan()  # build the plan once, before threads race for it
        pending: collections.deque[tuple[int, Future]] = collections.deque()
        with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="patch-loader") as pool:
            next_index = sampler.position
            try:
                while True:
                    while len(pending) < self.depth and next_index < len(sampler):
                        pending.append((next_index, pool.submit(self._read, next_index)))
                        next_index += 1
                    if not pending:
                        return
                    index, future = pending.popleft()
                    started = time.perf_counter()
                    host = future.result()
                    self.wait_seconds += time.perf_counter() - started
                    batch = host.to(self.device, non_blocking=self.pin)
                    sampler.position = index + 1
                    yield batch
            finally:
                for _, future in pending:
                    future.cancel()
