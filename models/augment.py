"""Seeded, batched patch augmentation that runs on the tensor's device.

MONAI's random transforms work on one sample at a time on the CPU; for 3D patches that is the
training bottleneck (about 75 samples/s for elastic + noise + contrast on one core). Here every
random parameter of a whole batch is drawn at once from an explicit ``torch.Generator`` and the
spatial part (affine + elastic) is ONE ``grid_sample`` call for the batch.

Convention (the same as ``monai.transforms.Affine`` with ``rotate_params=angles[n]``,
``scale_params=(scale[n],) * 3``, ``translate_params=translate[n]``, ``mode="bilinear"``,
``padding_mode="zeros"`` applied to ``x - pad_value``):

* spatial axes are the tensor axes ``(D, H, W)`` = ``(z, y, x)`` of the project; MONAI calls them
  its "x", "y", "z" axes, so ``angles[:, i]`` rotates about tensor axis ``i``;
* the rotation is intrinsic X-Y-Z (MONAI's default ``rotate_order="XYZ"``):
  ``R = R0(angles[:, 0]) @ R1(angles[:, 1]) @ R2(angles[:, 2])``;
* an output voxel at centred voxel coordinate ``p`` (origin at the patch centre) samples the input
  at ``R @ (scale * p + translate) + d(p)``, where ``d`` is the elastic displacement in voxels
  (``d = 0`` for samples without elastic deformation). So ``scale > 1`` shows a larger field of
  view (content shrinks), as with MONAI's ``scale_params``;
* voxels sampled from outside the patch take ``pad_value`` (air).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _check_range(name: str, value: float, low: float, high: float = math.inf, low_open: bool = False) -> float:
    value = float(value)
    if not math.isfinite(value) or value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise ValueError(f"{name} must be in {bound}, got {value!r}")
    return value


def _check_pair(name: str, value: Sequence[float], low_open: bool) -> tuple[float, float]:
    pair = tuple(float(v) for v in value)
    if len(pair) != 2 or not all(math.isfinite(v) for v in pair) or pair[0] > pair[1] \
            or pair[0] < 0 or (low_open and pair[0] == 0):
        bound = "0 < low <= high" if low_open else "0 <= low <= high"
        raise ValueError(f"{name} must be (low, high) with {bound}, got {value!r}")
    return pair


def rotation_matrices(angles: Tensor) -> Tensor:
    """Intrinsic X-Y-Z rotations as in ``monai.transforms.utils.create_rotate``.

    Args:
        angles: [N, 3] radians about tensor axes 0, 1, 2.

    Returns:
        [N, 3, 3] ``R0(a0) @ R1(a1) @ R2(a2)`` acting on (axis0, axis1, axis2) coordinates.
    """
    cos, sin = torch.cos(angles), torch.sin(angles)  # Nx3
    one, zero = torch.ones_like(cos[:, 0]), torch.zeros_like(cos[:, 0])

    def stack(rows):  # 3x3 nested list of [N] tensors -> Nx3x3
        return torch.stack([torch.stack(row, dim=-1) for row in rows], dim=-2)

    c0, c1, c2 = cos.unbind(1)
    s0, s1, s2 = sin.unbind(1)
    r0 = stack([[one, zero, zero], [zero, c0, -s0], [zero, s0, c0]])
    r1 = stack([[c1, zero, s1], [zero, one, zero], [-s1, zero, c1]])
    r2 = stack([[c2, -s2, zero], [s2, c2, zero], [zero, zero, one]])
    return r0 @ r1 @ r2


def _interpolation_matrix(points: int, size: int, device, dtype) -> Tensor:
    """[size, points] weights of 1-D linear interpolation with ``align_corners=True`` (the outer
    control points sit on the outer samples); the 3-D product of three is trilinear upsampling."""
    eye = torch.eye(points, device=device, dtype=dtype).unsqueeze(0)  # 1 x points x points
    return F.interpolate(eye, size=size, mode="linear", align_corners=True)[0].T.contiguous()


def _upsample_separable(coarse: Tensor, weights: Tensor) -> Tensor:
    """Trilinear upsampling as three matrix products.

    Args:
        coarse: [N, 3, c, c, c] (components first); weights: [S, c] from :func:`_interpolation_matrix`.

    Returns:
        [N, S, S, S, 3], a permuted view of a contiguous [S, N, 3, S, S] tensor.
    """
    n, k, c = coarse.shape[0], coarse.shape[1], coarse.shape[2]
    size = weights.shape[0]
    out = (weights @ coarse.permute(2, 0, 1, 3, 4).reshape(c, -1)).view(size, n, k, c, c)  # S N k c c
    out = out @ weights.T  # S N k c S  (last axis)
    out = weights @ out  # S N k S S  (second last axis)
    return out.permute(1, 0, 3, 4, 2)  # N S S S k


class BatchedAugment(nn.Module):
    """Random affine + elastic warp, Gaussian noise and gamma contrast for a batch of 3D patches.

    Input ``x`` is ``[N, 1, S, S, S]`` float in linear intensity units of ``intensity_scale`` HU
    each, with air at ``pad_value`` (training uses :mod:`models.intensity`'s working units, HU /
    1000, before the windows are applied). Per sample: a random affine (rotation uniform in ±``rotation_deg`` about
    each axis, isotropic scale uniform in ``1 ± scale``, translation uniform in
    ``± translation * S`` voxels per axis) composed with, with probability ``elastic_prob``, a
    smooth elastic displacement (a coarse grid of control displacements ~ N(0, elastic_magnitude²)
    voxels, spaced about ``elastic_sigma`` voxels apart, trilinearly upsampled); one bilinear
    ``grid_sample`` applies both and pads with ``pad_value``. Then, with probability
    ``noise_prob``, Gaussian noise of standard deviation ``noise_std_hu / intensity_scale``; then,
    with probability ``contrast_prob``, MONAI's ``AdjustContrast`` with gamma uniform in
    ``contrast_gamma`` (min and max per sample); finally, when ``intensity_shift_hu > 0``, an
    intensity offset uniform in ±``intensity_shift_hu`` per sample (what a different inspiration
    level or scanner calibration does to a patch; 0, the reference's setting, turns it off).

    Two further groups, off by default (the reference has neither), are drawn after the above so
    that turning them on leaves the other draws unchanged:

    * **reconstruction kernel** (``kernel_prob > 0``): with probability ``kernel_prob`` a sample
      is re-filtered before the noise is added, half of them (``sharpen_fraction``) with an
      unsharp mask ``x + a (x - G_1 * x)``, a uniform in ``sharpen_amount``, the others with a
      Gaussian blur ``G_s * x``, s uniform in ``blur_sigma`` voxels. Blurring lowers the noise
      the image already has, sharpening raises it and makes it grainy: what a smooth or a sharp
      kernel does. ``G_s`` is a separable, truncated (3 s) Gaussian with reflected borders.
    * **intensity gain** (``intensity_gain > 0``): ``x -> pad + g (x - pad)`` with ``pad`` =
      ``pad_value`` (air), g uniform in ``1 ± intensity_gain`` per sample (a calibration slope
      error pivots about air), applied after the contrast and before the offset.

    All random numbers come from the generator passed to :meth:`sample` / :meth:`forward`; a
    generator on the input's device avoids host-device copies. Two views are two calls.
    """

    def __init__(
        self,
        rotation_deg: float = 10.0,
        scale: float = 0.1,
        translation: float = 0.1,
        elastic_prob: float = 0.5,
        elastic_magnitude: float = 1.0,
        elastic_sigma: float = 3.0,
        noise_std_hu: float = 50.0,
        noise_prob: float = 0.25,
        contrast_prob: float = 0.25,
        contrast_gamma: Sequence[float] = (0.7, 1.5),
        intensity_scale: float = 632.0,
        pad_value: float = -1.0,
        intensity_shift_hu: float = 0.0,
        intensity_gain: float = 0.0,
        kernel_prob: float = 0.0,
        blur_sigma: Sequence[float] = (0.5, 1.2),
        sharpen_amount: Sequence[float] = (0.3, 1.0),
        sharpen_fraction: float = 0.5,
    ):
        super().__init__()
        self.rotation_deg = _check_range("rotation_deg", rotation_deg, 0.0, 180.0)
        self.scale = _check_range("scale", scale, 0.0, 0.9)
        self.translation = _check_range("translation", translation, 0.0, 0.5)
        self.elastic_prob = _check_range("elastic_prob", elastic_prob, 0.0, 1.0)
        self.elastic_magnitude = _check_range("elastic_magnitude", elastic_magnitude, 0.0)
        self.elastic_sigma = _check_range("elastic_sigma", elastic_sigma, 0.0, low_open=True)
        self.noise_std_hu = _check_range("noise_std_hu", noise_std_hu, 0.0)
        self.noise_prob = _check_range("noise_prob", noise_prob, 0.0, 1.0)
        self.intensity_shift_hu = _check_range("intensity_shift_hu", intensity_shift_hu, 0.0)
        self.intensity_gain = _check_range("intensity_gain", intensity_gain, 0.0, 0.5)
        self.kernel_prob = _check_range("kernel_prob", kernel_prob, 0.0, 1.0)
        self.sharpen_fraction = _check_range("sharpen_fraction", sharpen_fraction, 0.0, 1.0)
        self.blur_sigma = _check_pair("blur_sigma", blur_sigma, low_open=True)
        self.sharpen_amount = _check_pair("sharpen_amount", sharpen_amount, low_open=False)
        self.contrast_prob = _check_range("contrast_prob", contrast_prob, 0.0, 1.0)
        gamma = tuple(float(g) for g in contrast_gamma)
        if len(gamma) != 2 or not all(math.isfinite(g) and g > 0 for g in gamma) or gamma[0] > gamma[1]:
            raise ValueError(f"contrast_gamma must be (low, high) with 0 < low <= high, got {contrast_gamma!r}")
        self.contrast_gamma = gamma
        self.intensity_scale = _check_range("intensity_scale", intensity_scale, 0.0, low_open=True)
        self.pad_value = float(pad_value)
        if not math.isfinite(self.pad_value):
            raise ValueError(f"pad_value must be finite, got {pad_value!r}")

    def extra_repr(self) -> str:
        return (f"rotation_deg={self.rotation_deg}, scale={self.scale}, translation={self.translation}, "
                f"elastic_prob={self.elastic_prob}, elastic_magnitude={self.elastic_magnitude}, "
                f"elastic_sigma={self.elastic_sigma}, noise_std_hu={self.noise_std_hu}, "
                f"noise_prob={self.noise_prob}, contrast_prob={self.contrast_prob}, "
                f"contrast_gamma={self.contrast_gamma}, intensity_scale={self.intensity_scale}, "
                f"pad_value={self.pad_value}, intensity_shift_hu={self.intensity_shift_hu}, "
                f"intensity_gain={self.intensity_gain}, kernel_prob={self.kernel_prob}, blur_sigma={self.blur_sigma}, "
                f"sharpen_amount={self.sharpen_amount}, sharpen_fraction={self.sharpen_fraction}")

    @property
    def noise_std(self) -> float:
        """Noise standard deviation in normalised units (``noise_std_hu / intensity_scale``)."""
        return self.noise_std_hu / self.intensity_scale

    def control_points(self, size: int) -> int:
        """Control points per axis of the elastic field for patch size ``size`` (spacing ~ sigma)."""
        return max(2, math.ceil((size - 1) / self.elastic_sigma) + 1)

    def _warps(self) -> bool:
        return (self.rotation_deg > 0 or self.scale > 0 or self.translation > 0
                or (self.elastic_prob > 0 and self.elastic_magnitude > 0))

    def sample(self, n: int, size: int, generator: torch.Generator, device=None) -> dict[str, Tensor]:
        """Draw every random parameter of a batch, in a fixed order from ``generator``.

        Args:
            n: batch size N; size: patch size S; device: where the returned tensors live
                (drawn on the generator's device and moved if different).

        Returns:
            ``angles`` [N, 3] radians; ``scale`` [N]; ``translate`` [N, 3] voxels (tensor-axis
            order); ``elastic_on`` bool [N]; ``elastic`` [N, 3, c, c, c] control displacements in
            voxels (c = :meth:`control_points`); ``noise_index`` long [M] (samples receiving
            noise) and ``noise`` [M, 1, S, S, S] (in normalised units); ``contrast_on`` bool [N];
            ``gamma`` [N]; ``shift`` [N] intensity offsets in normalised units (only when
            ``intensity_shift_hu > 0``, drawn last so the other draws do not depend on it);
            then, only when enabled and in this order: ``gain`` [N] (``intensity_gain > 0``);
            ``kernel_on``, ``sharpen`` bool [N], ``blur_sigma`` [N] voxels and ``sharpen_amount``
            [N] (``kernel_prob > 0``).
        """
        if n < 1 or size < 1:
            raise ValueError(f"sample needs n >= 1 and size >= 1, got n={n}, size={size}")
        gdev = generator.device
        device = torch.device(device) if device is not None else gdev

        def uniform(*shape, low=-1.0, high=1.0):
            return torch.rand(*shape, generator=generator, device=gdev) * (high - low) + low

        c = self.control_points(size)
        params = {
            "angles": uniform(n, 3) * math.radians(self.rotation_deg),
            "scale": 1.0 + uniform(n) * self.scale,
            "translate": uniform(n, 3) * (self.translation * size),
            "elastic_on": torch.rand(n, generator=generator, device=gdev) < self.elastic_prob,
            "elastic": torch.randn(n, 3, c, c, c, generator=generator, device=gdev) * self.elastic_magnitude,
            "contrast_on": torch.rand(n, generator=generator, device=gdev) < self.contrast_prob,
            "gamma": uniform(n, low=self.contrast_gamma[0], high=self.contrast_gamma[1]),
        }
        noise_on = torch.rand(n, generator=generator, device=gdev) < self.noise_prob
        if self.noise_std_hu == 0:
            noise_on.zero_()
        index = torch.nonzero(noise_on).flatten()
        params["noise_index"] = index
        # noise only for the samples that get it (noise_prob of the batch): the largest draw
        params["noise"] = torch.randn(index.numel(), 1, size, size, size, generator=generator,
                                      device=gdev) * self.noise_std
        if self.intensity_shift_hu > 0:
            params["shift"] = uniform(n) * (self.intensity_shift_hu / self.intensity_scale)
        if self.intensity_gain > 0:
            params["gain"] = 1.0 + uniform(n) * self.intensity_gain
        if self.kernel_prob > 0:
            params["kernel_on"] = torch.rand(n, generator=generator, device=gdev) < self.kernel_prob
            params["sharpen"] = torch.rand(n, generator=generator, device=gdev) < self.sharpen_fraction
            params["blur_sigma"] = uniform(n, low=self.blur_sigma[0], high=self.blur_sigma[1])
            params["sharpen_amount"] = uniform(n, low=self.sharpen_amount[0], high=self.sharpen_amount[1])
        return {key: value.to(device) for key, value in params.items()}

    def sampling_grid(self, params: dict[str, Tensor], size: int, dtype=torch.float32) -> Tensor:
        """The ``grid_sample`` grid of the affine + elastic warp.

        The sampling map (affine plus elastic displacement) is evaluated on the coarse c x c x c
        control grid only (c = 2 without elastic deformation) and upsampled to S x S x S by
        separable linear interpolation (three matrix products with a [S, c] weight matrix: exactly
        trilinear upsampling with ``align_corners=True``). Linear interpolation reproduces the
        affine part exactly, so this is the affine map plus the trilinearly interpolated elastic
        field, built without any [N, S^3]-sized intermediate but the result.

        Returns:
            [N, S, S, S, 3] normalised coordinates (align_corners=False), last axis in
            grid_sample's (W, H, D) order (a permuted view; grid_sample accepts it as is).
        """
        angles = params["angles"].to(dtype)
        n, device = angles.shape[0], angles.device
        rot = rotation_matrices(angles)  # Nx3x3, acting on (axis0, axis1, axis2) coordinates
        linear = rot * params["scale"].to(dtype).view(n, 1, 1)  # Nx3x3 (isotropic scale commutes)
        offset = (rot @ params["translate"].to(dtype).unsqueeze(-1)).squeeze(-1) * (2.0 / size)  # Nx3
        # output components in grid_sample's (W, H, D) order: reverse the rows
        linear, offset = linear.flip(1), offset.flip(1)
        elastic = self.elastic_magnitude > 0 and bool(params["elastic_on"].any())
        c = params["elastic"].shape[-1] if elastic else 2
        # normalised coordinates of the control points: the first and last voxel centres and between
        v = torch.linspace(-(size - 1) / size, (size - 1) / size, c, device=device, dtype=dtype)
        coarse = (offset.view(n, 3, 1, 1, 1)
                  + linear[:, :, 0].view(n, 3, 1, 1, 1) * v.view(1, 1, c, 1, 1)
                  + linear[:, :, 1].view(n, 3, 1, 1, 1) * v.view(1, 1, 1, c, 1)
                  + linear[:, :, 2].view(n, 3, 1, 1, 1) * v.view(1, 1, 1, 1, c))  # Nx3xcxcxc
        if elastic:
            on = params["elastic_on"].to(dtype).view(n, 1, 1, 1, 1)
            # voxels -> normalised units, components reversed to (W, H, D)
            coarse = coarse + params["elastic"].to(dtype).flip(1) * (on * (2.0 / size))
        return _upsample_separable(coarse, _interpolation_matrix(c, size, device, dtype))

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Apply the drawn parameters to ``x`` [N, 1, S, S, S]; returns a new [N, 1, S, S, S] tensor."""
        n, size = _check_input(x)
        if params["angles"].shape[0] != n:
            raise ValueError(f"parameters drawn for {params['angles'].shape[0]} samples, batch has {n}")
        owned = False  # whether x is already a new tensor that may be modified in place
        if self._warps():
            grid = self.sampling_grid(params, size, dtype=x.dtype)
            # zero padding of (x - pad) then + pad == padding with the air value
            x = F.grid_sample(x - self.pad_value, grid, mode="bilinear", padding_mode="zeros",
                              align_corners=False).add_(self.pad_value)
            owned = True
        if "kernel_on" in params and bool(params["kernel_on"].any()):
            x = self._refilter(x, params)
            owned = True
        index = params["noise_index"]
        if index.numel():
            noise = params["noise"].to(x.dtype)
            x = x.index_add_(0, index, noise) if owned else x.index_add(0, index, noise)
            owned = True
        on = torch.nonzero(params["contrast_on"]).flatten()
        if on.numel():
            adjusted = adjust_contrast(x[on], params["gamma"][on])
            x = x.index_copy_(0, on, adjusted) if owned else x.index_copy(0, on, adjusted)
            owned = True
        if "gain" in params:
            gain = params["gain"].to(x.dtype).view(-1, 1, 1, 1, 1)
            x = (x - self.pad_value) * gain + self.pad_value  # pivot: air
            owned = True
        if "shift" in params:
            shift = params["shift"].to(x.dtype).view(-1, 1, 1, 1, 1)
            x = x.add_(shift) if owned else x + shift
        return x

    def _refilter(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """The kernel augmentation of the samples with ``kernel_on``: blur or unsharp mask (new tensor)."""
        index = torch.nonzero(params["kernel_on"]).flatten()
        chosen = x[index]  # M x 1 x S x S x S
        sharpen = params["sharpen"][index]
        sigma = torch.where(sharpen, torch.ones_like(params["blur_sigma"][index]), params["blur_sigma"][index])
        smooth = gaussian_blur(chosen, sigma)
        amount = params["sharpen_amount"][index].to(x.dtype).view(-1, 1, 1, 1, 1)
        filtered = torch.where(sharpen.view(-1, 1, 1, 1, 1), chosen + amount * (chosen - smooth), smooth)
        return x.index_copy(0, index, filtered)

    def forward(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """One random view of ``x`` [N, 1, S, S, S] -> [N, 1, S, S, S] (same device and dtype)."""
        n, size = _check_input(x)
        return self.apply(x, self.sample(n, size, generator, x.device))


def gaussian_blur(x: Tensor, sigma: Tensor) -> Tensor:
    """Per-sample separable Gaussian blur with replicated borders.

    Args:
        x: [M, 1, S, S, S]; sigma: [M] standard deviations in voxels (> 0).

    Returns:
        [M, 1, S, S, S]: each sample convolved with its own normalised Gaussian, truncated at
        ``ceil(3 * max(sigma))`` voxels, along each of the three axes in turn (one grouped
        ``conv3d`` per axis for the whole batch: the samples are the groups).
    """
    m, size = x.shape[0], x.shape[2:]
    if m == 0:
        return x.clone()
    radius = max(1, math.ceil(3.0 * float(sigma.max())))
    offsets = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    kernels = torch.exp(-0.5 * (offsets.view(1, -1) / sigma.to(x.dtype).view(-1, 1)) ** 2)  # M x K
    kernels = kernels / kernels.sum(dim=1, keepdim=True)
    y = x.reshape(1, m, *size)  # the samples as channels of one image
    for axis in range(3):
        shape = [m, 1, 1, 1, 1]
        shape[2 + axis] = kernels.shape[1]
        pad = [0] * 6
        pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = radius  # F.pad lists the last axis first
        y = F.conv3d(F.pad(y, pad, mode="replicate"), kernels.view(shape), groups=m)
    return y.reshape(m, 1, *size)


def adjust_contrast(x: Tensor, gamma: Tensor) -> Tensor:
    """Batched ``monai.transforms.AdjustContrast``: per sample
    ``((x - min) / (max - min + 1e-7)) ** gamma * (max - min) + min``.

    Args:
        x: [N, C, ...]; gamma: [N]. Returns [N, C, ...].
    """
    dims = tuple(range(1, x.ndim))
    low = x.amin(dim=dims, keepdim=True)
    spread = x.amax(dim=dims, keepdim=True) - low
    shape = (-1,) + (1,) * (x.ndim - 1)
    return ((x - low) / (spread + 1e-7)) ** gamma.to(x.dtype).view(shape) * spread + low


def _check_input(x: Tensor) -> tuple[int, int]:
    if x.ndim != 5 or x.shape[1] != 1 or not (x.shape[2] == x.shape[3] == x.shape[4]):
        raise ValueError(f"augmentation expects patches [N, 1, S, S, S], got shape {list(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"augmentation expects intensity-normalised float patches, got dtype {x.dtype}")
    return x.shape[0], x.shape[-1]


AUGMENT_KEYS = ("rotation_deg", "scale", "translation", "elastic_prob", "elastic_magnitude", "elastic_sigma",
                "noise_std_hu", "noise_prob", "contrast_prob", "contrast_gamma", "intensity_shift_hu",
                "intensity_gain", "kernel_prob", "blur_sigma", "sharpen_amount", "sharpen_fraction")


def augment_from_settings(augment: dict[str, Any], patch_input) -> BatchedAugment:
    """Build from the ``train.augment`` section for inputs prepared by ``patch_input``
    (a :class:`models.intensity.PatchInput`): the augmentation works in its working units
    (HU / :data:`models.intensity.HU_PER_UNIT`) and pads with its air value."""
    from models.intensity import HU_PER_UNIT

    unknown = sorted(set(augment) - set(AUGMENT_KEYS))
    if unknown:
        raise ValueError(f"unknown augment setting(s): {', '.join(unknown)}")
    return BatchedAugment(**{k: augment[k] for k in AUGMENT_KEYS if k in augment}, intensity_scale=HU_PER_UNIT,
                          pad_value=patch_input.pad_value)
