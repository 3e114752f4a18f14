"""Soft histogram of a patch's input intensities, as an encoder add-on.

Emphysema and airway-wall thickening are *tail fractions* of a patch's HU histogram: the share of
lung voxels below -950 HU, or above -500 HU. A stack of convolutions with global average pooling
can express such a share only through a step-like nonlinearity at the right threshold in its
first stage, and neither self-supervision nor supervision from 320 subjects taught the reference
CNN that (docs/science.md, "Why nothing learned reads awt"). This layer hands the encoder soft
voxel counts instead: each voxel's value is shared between the two nearest of K evenly spaced bin
centres by linear interpolation (triangular bins that sum to one), and the shares are averaged
over the patch. The encoder's feature layer that follows sees the K bins of every channel (or,
when ``feature_dim`` equals the backbone's output plus the bins, passes them on unchanged); a
tail fraction is a sum of bins, so it is one linear feature away. (Wang, Lu & Ding,
ECCV 2016, also train the bins' centres and widths; with fixed bins the histogram costs
O(voxels) instead of O(voxels x K), which is what makes embedding 400 subjects fast on a CPU.)
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class SoftHistogram(nn.Module):
    """Per-channel histogram with K triangular bins evenly spaced over [-1, 1] (the range of
    :meth:`models.intensity.PatchInput.to_channels`); values outside the range count in the edge
    bins. No parameters.

    Bin ``k`` is centred at ``-1 + 2k / (K - 1)``; a value ``v`` adds ``max(0, 1 - |v - centre| /
    spacing)`` to it, so every voxel adds exactly 1 over the K bins of its channel.

    Args:
        in_channels: C.
        bins: K, bins per channel (>= 2).

    Shapes: ``x`` [N, C, *spatial] -> [N, C * K] (channel-major: channel 0's K bins first), the
    share of the voxels in each bin, in [0, 1]. Optional ``weights`` [N, 1 or C, *spatial] (>= 0,
    e.g. a lung mask) count each voxel by its weight instead of 1; a channel whose weights sum to
    0 gets all-zero bins.
    """

    def __init__(self, in_channels: int, bins: int):
        super().__init__()
        if int(in_channels) < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels!r}")
        if int(bins) < 2:
            raise ValueError(f"histogram bins must be >= 2, got {bins!r}")
        self.in_channels, self.bins = int(in_channels), int(bins)

    @property
    def out_dim(self) -> int:
        """C * K."""
        return self.in_channels * self.bins

    def forward(self, x: Tensor, weights: Tensor | None = None) -> Tensor:
        """x [N, C, *spatial] (and weights [N, 1 or C, *spatial]) -> [N, C * K] voxel shares per bin."""
        if x.ndim < 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"SoftHistogram expects [N, {self.in_channels}, ...], got {list(x.shape)}")
        n, k = x.shape[0], self.bins
        values = x.flatten(2).to(torch.float32)  # NxCxV
        if weights is None:
            voxel_weight, total = None, float(values.shape[2])
        else:
            if (weights.shape[0] != n or weights.shape[1] not in (1, self.in_channels)
                    or weights.shape[2:] != x.shape[2:]):
                raise ValueError(f"histogram weights {list(weights.shape)} do not match x {list(x.shape)}")
            voxel_weight = weights.flatten(2).to(torch.float32).expand_as(values)  # NxCxV
            total = voxel_weight.sum(dim=2).clamp(min=torch.finfo(torch.float32).tiny).view(n, self.in_channels, 1)
        position = (values.clamp(-1.0, 1.0) + 1.0) * ((k - 1) / 2.0)  # in [0, K-1]
        lower = position.floor().clamp_(max=k - 2)  # NxCxV: the bin below (the last value goes to K-2, K-1)
        upper_share = position - lower  # NxCxV in [0, 1]
        row = torch.arange(n * self.in_channels, device=x.device).view(n, self.in_channels, 1) * k
        index = (row + lower.long()).flatten()  # flat index of the lower bin in [N*C*K]
        lower_share = 1.0 - upper_share
        if voxel_weight is not None:
            lower_share, upper_share = lower_share * voxel_weight, upper_share * voxel_weight
        counts = torch.zeros(n * self.in_channels * k, dtype=values.dtype, device=x.device)
        counts.index_add_(0, index, lower_share.flatten())
        counts.index_add_(0, index + 1, upper_share.flatten())
        shares = counts.view(n, self.in_channels, k) / total
        return shares.view(n, self.in_channels * k).to(x.dtype)


class WithHistogram(nn.Module):
    """A backbone whose output is extended by a :class:`SoftHistogram` of its input.

    Shapes: ``x`` [N, C, *spatial] -> [N, D + C * K], the backbone's D features first.
    """

    def __init__(self, backbone: nn.Module, in_channels: int, bins: int):
        super().__init__()
        self.backbone = backbone
        self.histogram = SoftHistogram(in_channels, bins)

    def forward(self, x: Tensor) -> Tensor:
        """x [N, C, *spatial] -> [N, D + C * K]."""
        return torch.cat([self.backbone(x), self.histogram(x)], dim=1)
