"""Embed patches with a trained encoder: pre-projection features of every patch of every subject.

:func:`embed_cohort` runs a run's trained encoder (``encoder.pt``) over each subject whose patches
are ok and writes ``[P, D]`` float32 features per subject (the ``embed`` stage,
:mod:`pipeline.stages.embed`, and ``copdssl apply`` call it). Inference is batched, without
gradients, in eval mode, with bf16 autocast on CUDA (channels_last_3d on CPU); the next subject's
patches are read in a background thread. The patches are masked and windowed by the run's
``input`` settings exactly as in training.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def embed_patches(encoder, patches: np.ndarray, locations, patch_input, batch_size: int = 512,
                  device: Any = "cpu", masks: np.ndarray | None = None) -> np.ndarray:
    """Embed one subject's patches.

    Args:
        encoder: a :class:`models.encoder.PatchEncoder` (on ``device``; put in eval mode here).
        patches: int16 ``[P, S, S, S]`` (HU; may be a memory map).
        locations: float ``[P, 3]`` normalised grid locations (array or tensor).
        patch_input: the run's :class:`models.intensity.PatchInput` (masking and windows, as in training).
        batch_size: patches per forward pass.
        masks: bool ``[P, S, S, S]`` lung masks (needed when ``patch_input.lung_mask`` is on).

    Returns:
        float32 ``[P, feature_dim]`` pre-projection features.
    """
    import torch

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device)
    loc = torch.as_tensor(np.asarray(locations, dtype=np.float32), device=device)
    if patches.ndim != 4 or loc.shape != (patches.shape[0], 3):
        raise ValueError(f"patches {patches.shape} and locations {tuple(loc.shape)} must be [P, S, S, S] and [P, 3]")
    encoder.eval()
    channels_last = device.type == "cpu"
    out = []
    with torch.no_grad(), torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
        for start in range(0, patches.shape[0], batch_size):
            chunk = torch.from_numpy(np.array(patches[start:start + batch_size])).to(device)  # copy out of a memory map
            mask = None if masks is None else torch.from_numpy(np.asarray(masks[start:start + batch_size])).to(device)
            x = patch_input(chunk, mask if patch_input.lung_mask else None)  # b x C x S x S x S
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last_3d)
            out.append(encoder.embed(x, loc[start:start + batch_size]).float().cpu())
    return torch.cat(out).numpy().astype(np.float32, copy=False)


def embed_cohort(encoder_path, layout, run: str, sids: list[str], ok_sids: list[str], locations: np.ndarray,
                 batch_size: int = 512, device: Any = "cpu") -> dict[str, int]:
    """Write ``layout.embedding(run, sid)`` for every sid: features for ``ok_sids``, tombstones otherwise.

    Returns:
        counts ``{"embedded": n, "tombstoned": m}``.
    """
    import torch

    from models.checkpoint import read_encoder
    from pipeline.errors import ConfigError, SubjectError
    from pipeline.files import atomic_path, write_npy
    from pipeline.logs import progress

    from models.intensity import PatchInput
    from pipeline.patches import unpack_masks

    encoder, meta = read_encoder(encoder_path, device)
    patch_input = PatchInput.from_settings(meta["settings"]["input"])
    if int(meta["num_locations"]) != locations.shape[0]:
        raise ConfigError(f"{encoder_path} was trained on {meta['num_locations']} grid locations, the grid has "
                          f"{locations.shape[0]}")
    if torch.device(device).type == "cpu":
        encoder = encoder.to(memory_format=torch.channels_last_3d)
    expected = (locations.shape[0],) + (int(meta["patch_size"]),) * 3
    ok = set(ok_sids)

    def read(sid: str) -> tuple[np.ndarray, np.ndarray | None]:
        path = layout.patches(sid)
        try:
            patches = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError) as error:
            raise SubjectError(sid, f"cannot read patches {path}: {error}", "embed") from None
        if patches.shape != expected or patches.dtype != np.int16:
            raise SubjectError(sid, f"patches {path} are {patches.dtype} {patches.shape}, expected int16 {expected}", "embed")
        masks = None
        if patch_input.lung_mask:
            mask_path = layout.patch_mask(sid)
            try:
                masks = unpack_masks(np.load(mask_path, allow_pickle=False), expected[-1])
            except (OSError, ValueError) as error:
                raise SubjectError(sid, f"cannot read the lung masks {mask_path} that input.lung_mask needs: "
                                   f"{' '.join(str(error).split())}", "embed") from None
            if masks.shape != expected:
                raise SubjectError(sid, f"lung masks {mask_path} are {masks.shape}, expected {expected}", "embed")
        return np.array(patches), masks  # read in the background thread

    counts = {"embedded": 0, "tombstoned": 0}
    todo = [sid for sid in sids if sid in ok]
    for sid in sids:
        if sid not in ok:
            with atomic_path(layout.embedding(run, sid)) as tmp:
                tmp.write_bytes(b"")
            counts["tombstoned"] += 1
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="embed-reader") as pool:
        pending = pool.submit(read, todo[0]) if todo else None
        for i, sid in enumerate(progress(todo, desc=f"embed {run}", unit="subject")):
            patches, masks = pending.result()
            pending = pool.submit(read, todo[i + 1]) if i + 1 < len(todo) else None
            features = embed_patches(encoder, patches, locations, patch_input, batch_size, device, masks=masks)
            write_npy(layout.embedding(run, sid), features)
            counts["embedded"] += 1
    return counts
