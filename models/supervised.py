"""Supervised upper bound: the patch encoder trained to predict subject-level targets.

It answers "what could this encoder architecture hold?": the same :class:`PatchEncoder` (same
backbone, input windows, masking and augmentation as a run) with a linear head on the mean
embedding of K patches of a subject, trained by mean squared error to predict the subject's
standardised targets (on the synthetic cohort: the latent factors cle, pse, awt). If even this
cannot read a factor, the encoder, the input normalisation or the pooling is the bottleneck, not
the self-supervised objective.

Per step: ``subjects_per_step`` training subjects, ``patches_per_subject`` random grid locations
each, masked and augmented (:mod:`models.intensity`, :mod:`models.augment`), embedded, averaged
per subject ``[B, K, D] -> [B, D]`` and regressed ``[B, D] -> [B, T]``. Prediction embeds all P
patches of a subject (eval mode) and applies the head to their mean, so it is the mean-pooled
feature that is read, as for the self-supervised runs.

Only for benchmarks: the targets are the generator's truth, which the pipeline never trains on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from models.augment import augment_from_settings
from models.data import PatchStore
from models.encoder import PatchEncoder, encoder_from_settings
from models.intensity import PatchInput


class SubjectRegressor(nn.Module):
    """Patch encoder + linear head on the mean patch embedding of each subject.

    ``forward(x [B*K, C, S, S, S], k)`` -> ``[B, T]``: ``head(mean_k encoder.embed(x))``.
    """

    def __init__(self, encoder: PatchEncoder, n_targets: int):
        super().__init__()
        if n_targets < 1:
            raise ValueError(f"n_targets must be >= 1, got {n_targets}")
        self.encoder = encoder
        self.head = nn.Linear(encoder.feature_dim, int(n_targets))

    def forward(self, x: Tensor, k: int) -> Tensor:
        h = self.encoder.embed(x)  # (B*K) x D
        if h.shape[0] % k:
            raise ValueError(f"batch of {h.shape[0]} patches is not a whole number of subjects of {k} patches")
        return self.head(h.view(-1, k, h.shape[1]).mean(dim=1))  # B x T


def _patch_batch(store: PatchStore, masks: PatchStore | None, subjects: np.ndarray, locations: np.ndarray,
                 patch_input: PatchInput) -> Tensor:
    """Working units ``[B*K, 1, S, S, S]`` of ``subjects`` [B*K] at ``locations`` [B*K]."""
    from pipeline.patches import unpack_masks

    patches = torch.from_numpy(store.get(subjects, locations))
    mask = None
    if patch_input.lung_mask:
        mask = torch.from_numpy(unpack_masks(masks.get(subjects, locations), store.item_shape[-1]))
    return patch_input.working_units(patches, mask)


def fit_subject_regressor(settings: Mapping[str, Any], store: PatchStore, masks: PatchStore | None,
                          targets: np.ndarray, *, steps: int = 600, subjects_per_step: int = 8,
                          patches_per_subject: int = 16, lr: float = 1e-3, seed: int = 0,
                          locations: Sequence[int] | None = None) -> SubjectRegressor:
    """Train a :class:`SubjectRegressor` on every subject of ``store``.

    Args:
        settings: a resolved run (encoder, input, augment sections are used).
        store: training subjects' patches (int16 ``[P, S, S, S]`` each); ``masks`` their lung
            masks when ``input.lung_mask`` is on.
        targets: float ``[N, T]`` standardised targets, rows as the store's subjects.
        steps, subjects_per_step, patches_per_subject, lr: AdamW optimisation (cosine schedule).
        seed: weights, batches and augmentation.
        locations: grid locations to draw from (default: all).

    Returns:
        the trained model (eval mode, CPU).
    """
    targets = np.asarray(targets, dtype=np.float32)
    if targets.ndim != 2 or targets.shape[0] != len(store):
        raise ValueError(f"targets must be [{len(store)}, T], got {targets.shape}")
    patch_input = PatchInput.from_settings(settings["input"])
    if patch_input.lung_mask and masks is None:
        raise ValueError("input.lung_mask is on but no lung masks were given")
    pool = np.arange(store.num_locations) if locations is None else np.asarray(locations, dtype=np.int64)
    b, k = min(int(subjects_per_step), len(store)), int(patches_per_subject)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        encoder = encoder_from_settings(settings["encoder"], store.item_shape[0], seed=seed,
                                        in_channels=patch_input.channels)
        model = SubjectRegressor(encoder, targets.shape[1])
        augment = augment_from_settings(settings["augment"], patch_input)
        optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, steps) / max(steps, 1))))
        generator = torch.Generator().manual_seed(seed)
        rng = np.random.default_rng([seed, 17])
        y_all = torch.from_numpy(targets)
        model.train()
        for _ in range(int(steps)):
            chosen = rng.choice(len(store), size=b, replace=False)
            subjects = np.repeat(chosen, k)
            where = rng.choice(pool, size=b * k, replace=True)
            x = patch_input.to_channels(augment(_patch_batch(store, masks, subjects, where, patch_input), generator))
            loss = torch.nn.functional.mse_loss(model(x, k), y_all[chosen])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    return model.eval()


@torch.no_grad()
def predict_subjects(model: SubjectRegressor, settings: Mapping[str, Any], store: PatchStore,
                     masks: PatchStore | None, locations: Sequence[int] | None = None) -> np.ndarray:
    """Predicted targets ``[N, T]`` of every subject of ``store`` from the mean embedding of its
    patches (all grid locations, or ``locations``), without augmentation."""
    patch_input = PatchInput.from_settings(settings["input"])
    where = np.arange(store.num_locations) if locations is None else np.asarray(locations, dtype=np.int64)
    out = []
    model.eval()
    for i in range(len(store)):
        subjects = np.full(where.size, i)
        x = patch_input.to_channels(_patch_batch(store, masks, subjects, where, patch_input))
        out.append(model(x, where.size)[0].numpy())
    return np.stack(out).astype(np.float64)
