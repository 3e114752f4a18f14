"""What the encoder sees of a patch: lung masking, HU windows and the linear working units.

Patches are stored as int16 HU over a wide range (``patches.clip_hu``) and, optionally, with
the subject's lung labels cut the same way (``work/patches/{sid}.lung.npy``). The ``train.input``
section decides, identically in training and embedding, how they become network input:

1. **Lung masking** (``lung_mask: true``): voxels outside the subject's lung mask take the
   constant ``fill_hu``. Border patches then no longer show chest wall, mediastinum and the edge
   of the body, which encode pose and lung size rather than disease.
2. **Linear working units**: HU are clipped to the union of the windows and divided by
   :data:`HU_PER_UNIT` (air is about -1.024). The batched augmentation (warps, noise, blur,
   contrast, intensity offset and gain) works in these units, so its HU-valued settings mean HU.
3. **Windows** (``windows: [[lo, hi], ...]``): each window is one input channel,
   ``2 (clip(HU, lo, hi) - lo) / (hi - lo) - 1`` in ``[-1, 1]``, as radiologists read CT with a
   lung window and a wide (mediastinal) window. One window ``[-1024, 240]`` is the reference
   normalisation ``(HU + 1024) / 632 - 1``.

Shapes: stored patches ``[B, S, S, S]`` int16, masks ``[B, S, S, S]`` uint8, working units
``[B, 1, S, S, S]`` float32, network input ``[B, C, S, S, S]`` float32 with C = number of windows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

HU_PER_UNIT = 1000.0  # working units: HU / 1000 (air about -1.024, water 0)
AIR_HU = -1024.0


@dataclass(frozen=True)
class PatchInput:
    """How stored HU patches become the encoder's C-channel input (see the module docstring).

    Args:
        windows: ``((lo, hi), ...)`` HU windows, one channel each (lo < hi).
        lung_mask: replace non-lung voxels by ``fill_hu`` (needs the stored lung masks).
        fill_hu: the constant of non-lung voxels when ``lung_mask`` is on.
    """

    windows: tuple[tuple[float, float], ...] = ((-1024.0, 240.0),)
    lung_mask: bool = False
    fill_hu: float = -850.0

    def __post_init__(self):
        windows = tuple((float(lo), float(hi)) for lo, hi in self.windows)
        if not windows:
            raise ValueError("input.windows must hold at least one [low, high] HU window")
        for lo, hi in windows:
            if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
                raise ValueError(f"input.windows: [{lo:g}, {hi:g}] is not a window with low < high")
        if not math.isfinite(float(self.fill_hu)):
            raise ValueError(f"input.fill_hu must be finite, got {self.fill_hu!r}")
        object.__setattr__(self, "windows", windows)
        object.__setattr__(self, "lung_mask", bool(self.lung_mask))
        object.__setattr__(self, "fill_hu", float(self.fill_hu))

    @classmethod
    def from_settings(cls, settings: Mapping[str, Any]) -> PatchInput:
        """From a resolved run's ``input`` section (schema-validated)."""
        return cls(windows=tuple(tuple(w) for w in settings["windows"]), lung_mask=settings["lung_mask"],
                   fill_hu=settings["fill_hu"])

    @property
    def channels(self) -> int:
        """C, the number of input channels (one per window)."""
        return len(self.windows)

    @property
    def hu_range(self) -> tuple[float, float]:
        """The union of the windows: HU outside it reach no channel and are clipped first."""
        return min(lo for lo, _ in self.windows), max(hi for _, hi in self.windows)

    @property
    def pad_value(self) -> float:
        """Air in working units (clipped to :attr:`hu_range`): what spatial warps pad with."""
        lo, hi = self.hu_range
        return min(max(AIR_HU, lo), hi) / HU_PER_UNIT

    def working_units(self, patches: Tensor, masks: Tensor | None = None) -> Tensor:
        """Stored patches -> working units.

        Args:
            patches: int16 (or float) HU ``[B, S, S, S]``.
            masks: lung labels ``[B, S, S, S]`` (> 0 = lung); required when ``lung_mask`` is on.

        Returns:
            float32 ``[B, 1, S, S, S]``: masked, clipped to :attr:`hu_range`, divided by
            :data:`HU_PER_UNIT`.
        """
        x = patches.to(torch.float32)
        if self.lung_mask:
            if masks is None:
                raise ValueError("input.lung_mask is on but no lung masks were given (patches.lung_mask must be "
                                 "on when the patches are cut)")
            if masks.shape != patches.shape:
                raise ValueError(f"lung masks {list(masks.shape)} do not match patches {list(patches.shape)}")
            x = torch.where(masks > 0, x, torch.full_like(x, self.fill_hu))
        lo, hi = self.hu_range
        return x.clamp_(lo, hi).div_(HU_PER_UNIT).unsqueeze(1)

    def to_channels(self, x: Tensor) -> Tensor:
        """Working units ``[B, 1, S, S, S]`` -> windowed network input ``[B, C, S, S, S]`` in [-1, 1]."""
        hu = x * HU_PER_UNIT
        return torch.cat([(hu.clamp(lo, hi) - lo) * (2.0 / (hi - lo)) - 1.0 for lo, hi in self.windows], dim=1)

    def __call__(self, patches: Tensor, masks: Tensor | None = None) -> Tensor:
        """Stored patches (and masks) -> network input ``[B, C, S, S, S]`` without augmentation."""
        return self.to_channels(self.working_units(patches, masks))
