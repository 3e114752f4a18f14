"""Training loop of the context-aware MoCo-v2 / IFM patch encoder: exact resume, optional DDP.

One optimisation step (Sun et al. 2021, Robinson et al. 2021):

1. the loader hands over one location batch of int16 patches ``[B, S, S, S]`` (memory-mapped,
   read ahead in background threads; with their lung masks when ``input.lung_mask`` is on, and
   with each query's positive patch at an adjacent location when ``positives.neighbour_prob`` >
   0), moved to the training device;
2. :class:`models.intensity.PatchInput` masks them and converts them to working units; they are
   augmented on the device by :class:`models.augment.BatchedAugment` (a query view of each patch
   and a key view of its positive) drawing from a seeded ``torch.Generator`` there, and then
   windowed into the C input channels;
3. :class:`models.moco.MoCo` gives ``l_pos [B, 1]`` and ``l_neg [B, K]`` against the queue of the
   batch's location (bf16 autocast on CUDA; ``channels_last_3d`` on CPU) and enqueues the keys;
4. :class:`models.ifm.IFMLoss` (plain InfoNCE, IFM or IFM-only) is minimised by SGD with a
   per-step cosine (or constant) learning rate.

Determinism and exact resume: the model is initialised from ``seed``; every random draw comes
from generators seeded from ``(seed, rank)`` (the augmentation generator, and the torch CPU/CUDA
generators inside a forked RNG scope, so the caller's global RNG state is untouched); the batch
plan is a function of ``(seed, epoch)``. A checkpoint (``checkpoint.pt``, atomic, weights-only
loadable) holds the model (query and key encoders, queues and pointers), optimizer, scheduler,
sampler position, every rank's generator states, the epoch's running sums and the history, so a
run stopped after any step and resumed produces bit-identical weights on CPU.

Under ``torchrun`` (world size > 1) the MoCo module is wrapped in DistributedDataParallel (the
whole module rather than ``encoder_q`` alone, so state_dict names and the momentum update's
parameter matching stay those of a single process): the query encoder's gradients are averaged
across ranks; the key encoder and the queues carry no gradients and stay identical on every rank
(keys are gathered before enqueueing). ``batch_size`` is the global batch: each rank takes
``batch_size / world_size`` samples of every location batch. A single process runs the same code
without the wrapper. Only rank 0 writes files.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from models import checkpoint as ckpt
from models.checkpoint import load_encoder  # noqa: F401  (public API: models.train.load_encoder)
from models.data import LocationBatchSampler, NeighbourKeys, PatchBatch, PatchLoader, PatchStore
from models.intensity import PatchInput
from pipeline.logs import interactive

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("epoch", "loss", "loss_ifm", "acc1", "lr", "pairs_per_s", "seconds")
CHECKPOINT_FORMAT = 1
_SEED_TORCH, _SEED_AUGMENT = 1, 2  # purpose ids of derived_seed


@dataclass
class TrainResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        model: the (unwrapped) MoCo module after training, on the training device.
        history: one dict per finished epoch with the :data:`HISTORY_COLUMNS`.
        global_step: optimisation steps done in total (including those before a resume).
        finished: False when ``max_steps`` stopped the run before the last epoch ended.
        loader_wait_seconds: time this process waited for data (the loader starving compute).
        resumed_from_step: global step of the checkpoint this call resumed from (0 = fresh start).
    """

    model: nn.Module
    history: list[dict[str, float]]
    global_step: int
    finished: bool
    loader_wait_seconds: float = 0.0
    resumed_from_step: int = 0


def derived_seed(seed: int, *keys: int) -> int:
    """A 63-bit seed for one purpose (``keys`` = e.g. rank and stream id) derived from ``seed``."""
    return int(np.random.SeedSequence([int(seed), *map(int, keys)]).generate_state(2, np.uint64)[0] >> np.uint64(1))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; ``cuda`` without a GPU -> ValueError."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but no CUDA GPU is available")
    if device != "cpu" and not device.startswith("cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    return torch.device(device)


def lr_factor(step: int, total_steps: int, schedule: str) -> float:
    """Learning-rate multiplier before step ``step`` (0-based): cosine from 1 to 0 over ``total_steps``."""
    if schedule == "constant":
        return 1.0
    if schedule != "cosine":
        raise ValueError(f"optimizer.schedule must be cosine or constant, got {schedule!r}")
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(1, total_steps)))


def validate_train_settings(settings: dict[str, Any], n_subjects: int, num_locations: int, world_size: int = 1) -> None:
    """Reject impossible combinations before anything is built (ValueError naming the values)."""
    from models.moco import validate_moco_settings

    # batch_size is the GLOBAL batch (split across processes), so one step enqueues batch_size keys
    # whatever the world size: the MoCo checks are those of a single process
    validate_moco_settings(settings, world_size=1)
    batch_size = int(settings["batch_size"])
    if n_subjects < 2:
        raise ValueError(f"training needs at least 2 subjects with patches, got {n_subjects}")
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by the number of processes {world_size}")
    if settings["sampler"] == "location" and batch_size > n_subjects:
        raise ValueError(f"batch_size {batch_size} exceeds the {n_subjects} subjects with patches; location "
                         "batches need distinct subjects (lower train.batch_size or use sampler: mixed)")
    if settings["sampler"] == "mixed" and batch_size > n_subjects * num_locations:
        raise ValueError(f"batch_size {batch_size} exceeds the {n_subjects * num_locations} (subject, location) pairs")


class _Progress:
    """tqdm bar with a postfix when a person watches (rank 0), else a log line every ~10%."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool):
        self.total, self.done, self.desc, self.enabled = total, initial, desc, enabled
        self.bar = None
        self.every = max(1, total // 10)
        if enabled and interactive():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True)

    def wants_postfix(self) -> bool:
        return self.enabled and ((self.bar is not None and self.done % 10 == 0)
                                 or (self.done + 1) % self.every == 0 or self.done + 1 == self.total)

    def update(self, postfix: dict[str, str] | None = None) -> None:
        self.done += 1
        if self.bar is not None:
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)
        elif self.enabled and postfix and (self.done % self.every == 0 or self.done == self.total):
            log.info("%s: %d/%d steps %s", self.desc, self.done, self.total,
                     " ".join(f"{k}={v}" for k, v in postfix.items()))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


class Trainer:
    """Trains one run's MoCo model on a :class:`~models.data.PatchStore`.

    Args:
        settings: a resolved run (``pipeline.config.run_settings``; the ``train`` schema).
        store: patches of the training subjects, int16 ``[P, S, S, S]`` each.
        locations: float32 ``[P, 3]`` normalised atlas locations (grid.npz ``locations``).
        masks: bit-packed lung masks of the same subjects (needed when ``input.lung_mask`` is on).
        edges: int64 ``[2, E]`` grid adjacency (needed when ``positives.neighbour_prob`` > 0).
        encoder_path, history_path, checkpoint_path: outputs (rank 0 writes them; ``None``
            skips that file).
        device: ``auto``/``cpu``/``cuda`` (ignored when ``dist`` is given: its device is used).
        dist: a :class:`models.distributed.DistContext` (``None`` = single process).
        checkpoint_every: also checkpoint every this many steps (0 = once per epoch).
        sids: subject IDs (part of the resume fingerprint: a different cohort starts fresh).
        run_name: for log messages.
        channels_last: ``channels_last_3d`` memory format (default: on CPU only).
    """

    def __init__(self, settings: dict[str, Any], store: PatchStore, locations: np.ndarray, *,
                 masks: PatchStore | None = None, edges: np.ndarray | None = None, encoder_path: str | os.PathLike | None = None, history_path: str | os.PathLike | None = None,
                 checkpoint_path: str | os.PathLike | None = None, device: str | torch.device = "auto",
                 dist=None, checkpoint_every: int = 0, sids: list[str] | None = None, run_name: str = "run",
                 show_progress: bool = True, channels_last: bool | None = None):
        from models.distributed import DistContext

        if checkpoint_every < 0:
            raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
        locations = np.asarray(locations, dtype=np.float32)
        if locations.ndim != 2 or locations.shape[1] != 3:
            raise ValueError(f"locations must be [P, 3], got shape {locations.shape}")
        if len(store.item_shape) != 3 or len(set(store.item_shape)) != 1:
            raise ValueError(f"patches must be [P, S, S, S], got {store.shape}")
        if locations.shape[0] != store.num_locations:
            raise ValueError(f"grid has {locations.shape[0]} locations but the patch files have {store.num_locations} rows")
        self.dist = dist or DistContext(rank=0, world_size=1, local_rank=0, device=resolve_device(device))
        validate_train_settings(settings, len(store), store.num_locations, self.dist.world_size)
        self.settings, self.store, self.run_name = settings, store, run_name
        self.device = torch.device(self.dist.device)
        self.patch_size, self.num_locations = store.item_shape[0], store.num_locations
        self.paths = {"encoder": encoder_path, "history": history_path, "checkpoint": checkpoint_path}
        self.checkpoint_every = int(checkpoint_every)
        self.show_progress = show_progress
        self.is_main = self.dist.rank == 0
        self.amp = bool(settings["amp"]) and self.device.type == "cuda"
        self.channels_last = self.device.type == "cpu" if channels_last is None else bool(channels_last)
        self.seed = int(settings["seed"])
        self.sampler = LocationBatchSampler(len(store), self.num_locations, int(settings["batch_size"]),
                                            settings["sampler"], seed=self.seed,
                                            steps_per_epoch=int(settings["steps_per_epoch"]),
                                            rank=self.dist.rank, world_size=self.dist.world_size)
        self.steps_per_epoch = len(self.sampler)
        self.total_steps = int(settings["epochs"]) * self.steps_per_epoch
        moco = settings["moco"]
        if settings["sampler"] == "location" and moco["queue"] == "per_location" \
                and moco["queue_size"] + self.sampler.batch_size > len(store) and self.is_main:
            log.warning("run %s: moco.queue_size %d + batch_size %d exceed the %d subjects: a location's queue "
                        "always holds keys of some subjects in the current batch (false negatives); consider a "
                        "smaller queue", run_name, moco["queue_size"], self.sampler.batch_size, len(store))
        self.fingerprint = ckpt.fingerprint(settings, sids=list(sids or store.sids), patch_size=self.patch_size,
                                            num_locations=self.num_locations, format=CHECKPOINT_FORMAT)
        self.locations = torch.as_tensor(locations, device=self.device)
        self.patch_input = PatchInput.from_settings(settings["input"])
        if self.patch_input.lung_mask and masks is None:
            raise ValueError("input.lung_mask is on but no lung masks were given (cut them with patches.lung_mask)")
        self.masks = masks if self.patch_input.lung_mask else None
        prob = float(settings["positives"]["neighbour_prob"])
        if prob > 0 and edges is None:
            raise ValueError("positives.neighbour_prob > 0 needs the grid adjacency (edges)")
        self.keys = NeighbourKeys(edges, self.num_locations, prob) if prob > 0 else None

    # ------------------------------------------------------------------ building blocks
    def build(self) -> None:
        """Create model, augmentation, loss, optimizer, scheduler and generators (fresh state).

        Also seeds this process's torch CPU (and CUDA) generators from ``(seed, rank)``;
        :meth:`fit` calls it inside a forked RNG scope so that the caller's state is restored.
        """
        from models.augment import augment_from_settings
        from models.ifm import IFMLoss
        from models.moco import moco_from_settings

        s = self.settings
        # weights, queues and the shuffle generator are initialised from settings["seed"] (the same
        # on every rank and device) without touching the global RNG
        moco = moco_from_settings(s, self.patch_size, self.num_locations).to(self.device)
        if self.channels_last:
            moco = moco.to(memory_format=torch.channels_last_3d)
        self.model = moco
        self.forward_model: nn.Module = moco
        if self.dist.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel

            # no per-step buffer broadcast: the queues (P x K x D, up to GBs) are identical on every
            # rank by construction (all ranks enqueue the same gathered keys) and BN running
            # statistics are not used in training mode; _sync_buffers aligns them at checkpoints
            self.forward_model = DistributedDataParallel(
                moco, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                broadcast_buffers=False)
        self.augment = augment_from_settings(s["augment"], self.patch_input).to(self.device)
        self.criterion = IFMLoss(method=s["loss"]["method"], epsilon=s["loss"]["epsilon"],
                                 alpha=s["loss"]["alpha"], temperature=s["moco"]["temperature"])
        opt = s["optimizer"]
        self.optimizer = torch.optim.SGD(moco.encoder_q.parameters(), lr=opt["lr"], momentum=opt["momentum"],
                                         weight_decay=opt["weight_decay"])
        total, schedule = self.total_steps, opt["schedule"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda step: lr_factor(step, total, schedule))
        self.aug_generator = torch.Generator(device=self.device)
        self.aug_generator.manual_seed(derived_seed(self.seed, self.dist.rank, _SEED_AUGMENT))
        torch.default_generator.manual_seed(derived_seed(self.seed, self.dist.rank, _SEED_TORCH))
        if self.device.type == "cuda":
            torch.cuda.manual_seed(derived_seed(self.seed, self.dist.rank, _SEED_TORCH))
        self.epoch, self.global_step, self.history = 0, 0, []
        self.sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, loss_ifm, acc1, steps
        self.epoch_seconds = 0.0
        self.sampler.set_epoch(0)

    # ------------------------------------------------------------------ state
    def _rng_state(self) -> dict[str, Any]:
        """This rank's generator states and running sums of the current epoch (CPU tensors)."""
        state = {"torch_cpu": torch.get_rng_state(), "augment": self.aug_generator.get_state(),
                 "epoch_sums": self.sums.detach().cpu()}
        if self.device.type == "cuda":
            state["torch_cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: dict[str, Any]) -> None:
        self.sums = state["epoch_sums"].to(self.device, torch.float64)
        torch.set_rng_state(state["torch_cpu"])
        self.aug_generator.set_state(state["augment"])
        if self.device.type == "cuda" and "torch_cuda" in state:
            torch.cuda.set_rng_state(state["torch_cuda"], self.device)

    def _all_rng_states(self) -> list[dict[str, Any]]:
        """Every rank's generator states, in rank order (a collective under DDP)."""
        own = self._rng_state()
        if self.dist.world_size == 1:
            return [own]
        import torch.distributed as torch_dist

        gathered: list[Any] = [None] * self.dist.world_size
        torch_dist.all_gather_object(gathered, {k: v.cpu() for k, v in own.items()})
        return gathered

    def _sync_buffers(self) -> None:
        """Copy rank 0's BN running statistics to every rank (before saving), so all ranks hold
        the state that rank 0 writes. The queues need no copy: they are equal on every rank."""
        if self.dist.world_size > 1:
            from models.distributed import broadcast_

            for name, buffer in self.model.named_buffers():
                if not name.startswith("queue."):
                    broadcast_(buffer, src=0)

    def _save_checkpoint(self) -> None:
        self._sync_buffers()
        rng = self._all_rng_states()  # every rank takes part
        path = self.paths["checkpoint"]
        if not self.is_main or path is None:
            return
        ckpt.save({
            "format": CHECKPOINT_FORMAT,
            "fingerprint": self.fingerprint,
            "settings": self.settings,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "sampler": self.sampler.state_dict(),
            "epoch": self.epoch,
            "global_step": self.global_step,
            "epoch_seconds": self.epoch_seconds,
            "history": self.history,
            "rng": {"world_size": self.dist.world_size, "per_rank": rng},
        }, path)

    def _try_resume(self) -> bool:
        path = self.paths["checkpoint"]
        if path is None or not Path(path).is_file():
            return False
        state = ckpt.load(path, map_location=self.device)
        if state.get("format") != CHECKPOINT_FORMAT or state.get("fingerprint") != self.fingerprint:
            log.info("run %s: %s was written with other settings or subjects; starting fresh", self.run_name, path)
            return False
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.sampler.load_state_dict(state["sampler"])
        self.epoch, self.global_step = int(state["epoch"]), int(state["global_step"])
        self.history = [dict(row) for row in state["history"]]
        self.epoch_seconds = float(state["epoch_seconds"])
        rng = state["rng"]
        if rng["world_size"] == self.dist.world_size:
            self._set_rng_state(rng["per_rank"][self.dist.rank])
        else:  # random streams restart; the epoch's running sums go to rank 0
            if self.is_main:
                self.sums = torch.stack([r["epoch_sums"] for r in rng["per_rank"]]).sum(0).to(self.device, torch.float64)
            log.warning("run %s: checkpoint from %d processes resumed with %d: random streams restart, the "
                        "result will not equal an uninterrupted run", self.run_name, rng["world_size"], self.dist.world_size)
        log.info("run %s: resuming from %s at epoch %d, step %d/%d", self.run_name, path,
                 self.epoch + 1, self.sampler.position, self.steps_per_epoch)
        return True

    # ------------------------------------------------------------------ one step
    def train_step(self, batch: PatchBatch) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """One optimisation step on a :class:`~models.data.PatchBatch` (on the device).

        Returns:
            (detached loss, stats of :class:`models.ifm.IFMLoss`: loss_plain, loss_ifm, acc1).
        """
        prepare = self.patch_input
        x = prepare.working_units(batch.patches, batch.masks)  # b x 1 x S x S x S
        if batch.key_patches is None:
            x_key, key_loc_idx = x, batch.loc_idx
        else:
            x_key, key_loc_idx = prepare.working_units(batch.key_patches, batch.key_masks), batch.key_loc_idx
        x_q = prepare.to_channels(self.augment(x, self.aug_generator))  # b x C x S x S x S
        x_k = prepare.to_channels(self.augment(x_key, self.aug_generator))
        if self.channels_last:
            x_q = x_q.contiguous(memory_format=torch.channels_last_3d)
            x_k = x_k.contiguous(memory_format=torch.channels_last_3d)
        loc, loc_k = self.locations[batch.loc_idx], self.locations[key_loc_idx]  # b x 3
        with torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.amp):
            l_pos, l_neg = self.forward_model(x_q, x_k, loc, batch.loc_idx, loc_k=loc_k)  # bx1, bxK
        loss, stats = self.criterion(l_pos.float(), l_neg.float())
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()
        return loss.detach(), stats

    def make_loader(self) -> PatchLoader:
        """Background reader of the sampler's batches from its current position
        (``num_workers`` threads; at least one)."""
        return PatchLoader(self.store, self.sampler, self.device, workers=max(1, int(self.settings["num_workers"])),
                           masks=self.masks, keys=self.keys)

    def _epoch_row(self) -> dict[str, float]:
        from models.distributed import concat_all_gather

        sums = concat_all_gather(self.sums.unsqueeze(0)).sum(0) if self.dist.world_size > 1 else self.sums
        loss, loss_ifm, acc1, steps = sums.tolist()
        steps = max(steps, 1.0)
        seconds = self.epoch_seconds
        return {"epoch": self.epoch + 1, "loss": loss / steps, "loss_ifm": loss_ifm / steps, "acc1": acc1 / steps,
                "lr": self.last_step_lr(),
                "pairs_per_s": self.steps_per_epoch * int(self.settings["batch_size"]) / max(seconds, 1e-9),
                "seconds": seconds}

    def last_step_lr(self) -> float:
        """Learning rate of the latest optimisation step (the optimizer already holds the next one)."""
        opt = self.settings["optimizer"]
        return float(opt["lr"]) * lr_factor(max(self.scheduler.last_epoch - 1, 0), self.total_steps, opt["schedule"])

    def _write_history(self) -> None:
        if self.is_main and self.paths["history"] is not None:
            import pandas as pd

            from pipeline.files import write_tsv

            write_tsv(self.paths["history"], pd.DataFrame(self.history, columns=list(HISTORY_COLUMNS)))

    def _export(self) -> None:
        if self.is_main and self.paths["encoder"] is not None:
            ckpt.export_encoder(self.paths["encoder"], self.model.encoder_q, self.settings,
                                self.patch_size, self.num_locations)

    # ------------------------------------------------------------------ loop
    def fit(self, max_steps: int | None = None) -> TrainResult:
        """Train (resuming from ``checkpoint_path`` when it matches) until the last epoch or
        ``max_steps`` total steps; write checkpoint, history and encoder (rank 0)."""
        if max_steps is not None and max_steps < 0:
            raise ValueError(f"max_steps must be >= 0, got {max_steps}")
        cuda_devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_devices):
            self.build()
            resumed = self._try_resume()
            start_step = self.global_step if resumed else 0
            finished, wait = self._loop(max_steps)
            self._save_checkpoint()
            self._write_history()
            self._export()
        if self.dist.world_size > 1:
            from models.distributed import barrier

            barrier()
        return TrainResult(self.model, list(self.history), self.global_step, finished, wait, start_step)

    def _loop(self, max_steps: int | None) -> tuple[bool, float]:
        epochs, batch_size = int(self.settings["epochs"]), int(self.settings["batch_size"])
        wait = 0.0
        self.model.train()
        while self.epoch < epochs:
            if max_steps is not None and self.global_step >= max_steps:
                return False, wait
            loader = self.make_loader()
            progress = _Progress(self.steps_per_epoch, self.sampler.position,
                                 f"train {self.run_name} epoch {self.epoch + 1}/{epochs}",
                                 self.is_main and self.show_progress)
            started, window_start, window_step = time.perf_counter(), time.perf_counter(), self.global_step
            batches = iter(loader)
            try:
                for batch in batches:
                    loss, stats = self.train_step(batch)
                    self.sums += torch.stack([torch.as_tensor(v, device=self.device).to(torch.float64).reshape(())
                                              for v in (loss, stats["loss_ifm"], stats["acc1"], 1.0)])
                    self.global_step += 1
                    postfix = None
                    if progress.wants_postfix():
                        current = loss.item()
                        if not math.isfinite(current):
                            raise FloatingPointError(f"run {self.run_name}: loss became {current} at epoch "
                                                     f"{self.epoch + 1}, step {self.sampler.position}; lower "
                                                     "train.optimizer.lr")
                        now = time.perf_counter()
                        rate = (self.global_step - window_step) * batch_size / max(now - window_start, 1e-9)
                        window_start, window_step = now, self.global_step
                        postfix = {"loss": f"{current:.3f}", "acc1": f"{stats['acc1'].item():.1f}",
                                   "pairs/s": f"{rate:.0f}"}
                    progress.update(postfix)
                    if self.sampler.position == self.steps_per_epoch:
                        continue  # the end of the epoch is handled below
                    stop = max_steps is not None and self.global_step >= max_steps
                    if stop or (self.checkpoint_every and self.global_step % self.checkpoint_every == 0):
                        if self.device.type == "cuda":
                            torch.cuda.synchronize(self.device)
                        self.epoch_seconds += time.perf_counter() - started
                        started = time.perf_counter()
                    if stop:  # fit() saves the checkpoint
                        log.warning("run %s: stopped after %d steps (max_steps) in epoch %d", self.run_name,
                                    self.global_step, self.epoch + 1)
                        return False, wait + loader.wait_seconds
                    if self.checkpoint_every and self.global_step % self.checkpoint_every == 0:
                        self._save_checkpoint()
            finally:
                batches.close()
                progress.close()
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.epoch_seconds += time.perf_counter() - started
            wait += loader.wait_seconds
            row = self._epoch_row()
            if not math.isfinite(row["loss"]):
                raise FloatingPointError(f"run {self.run_name}: mean loss of epoch {self.epoch + 1} is {row['loss']}; "
                                         "lower train.optimizer.lr")
            self.history.append(row)
            if self.is_main:
                log.info("run %s epoch %d/%d: loss %.4f loss_ifm %.4f acc1 %.1f%% lr %.4g %.0f pairs/s "
                         "(%.1f s, %.1f s waiting for data)", self.run_name, row["epoch"], epochs, row["loss"],
                         row["loss_ifm"], row["acc1"], row["lr"], row["pairs_per_s"], row["seconds"],
                         loader.wait_seconds)
            self.epoch += 1
            self.sums.zero_()
            self.epoch_seconds = 0.0
            self.sampler.set_epoch(self.epoch)
            if self.epoch < epochs:  # the final state is saved by fit()
                self._save_checkpoint()
                self._write_history()
        return True, wait


def train(settings: dict[str, Any], store: PatchStore, locations: np.ndarray, *, max_steps: int | None = None,
          **kwargs: Any) -> TrainResult:
    """Convenience wrapper: ``Trainer(settings, store, locations, **kwargs).fit(max_steps)``."""
    return Trainer(settings, store, locations, **kwargs).fit(max_steps)
