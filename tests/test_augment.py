"""Batched augmentation: MONAI equivalence of the warp, seeding, independence, identity, device."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from models.augment import BatchedAugment, adjust_contrast, augment_from_settings

torch.set_num_threads(1)

STILL = {"rotation_deg": 0.0, "scale": 0.0, "translation": 0.0, "elastic_prob": 0.0, "noise_prob": 0.0,
         "contrast_prob": 0.0}


def _patches(n=4, size=12, seed=0):
    """Smooth random patches in normalised units (air about -1)."""
    g = torch.Generator().manual_seed(seed)
    x = F.avg_pool3d(torch.rand(n, 1, size + 2, size + 2, size + 2, generator=g), 3, stride=1)
    return x * 1.5 - 1.0


def test_affine_equals_monai_affine_per_sample():
    from monai.transforms import Affine

    aug = BatchedAugment(rotation_deg=25, scale=0.2, translation=0.2, elastic_prob=0.0, noise_prob=0.0,
                         contrast_prob=0.0, pad_value=-1.0)
    x = _patches(5, 12)
    params = aug.sample(5, 12, torch.Generator().manual_seed(1))
    out = aug.apply(x, params)
    assert not torch.allclose(out, x, atol=0.05)
    for i in range(5):
        # MONAI pads with zeros: shift so that zero is air, as BatchedAugment does with pad_value
        affine = Affine(rotate_params=params["angles"][i].tolist(), scale_params=[params["scale"][i].item()] * 3,
                        translate_params=params["translate"][i].tolist(), mode="bilinear", padding_mode="zeros",
                        image_only=True)
        expected = torch.as_tensor(affine(x[i] + 1.0)) - 1.0
        assert torch.allclose(out[i], expected, atol=1e-4), f"sample {i}"


def test_translation_pads_with_the_air_value():
    aug = BatchedAugment(**{**STILL, "translation": 0.5}, pad_value=-0.75)
    x = torch.zeros(1, 1, 8, 8, 8)
    params = aug.sample(1, 8, torch.Generator().manual_seed(0))
    params.update(angles=torch.zeros(1, 3), scale=torch.ones(1), translate=torch.tensor([[4.0, 0.0, 0.0]]))
    out = aug.apply(x, params)
    # output voxel i samples input i + 4 along axis 0: the last four slices come from outside
    assert torch.allclose(out[0, 0, :4], torch.zeros(4, 8, 8), atol=1e-6)
    assert torch.allclose(out[0, 0, 4:], torch.full((4, 8, 8), -0.75), atol=1e-6)


def test_elastic_field_is_the_upsampled_control_grid():
    aug = BatchedAugment(**{**STILL, "elastic_prob": 1.0, "elastic_magnitude": 2.0, "elastic_sigma": 3.0})
    size = 10
    params = aug.sample(3, size, torch.Generator().manual_seed(2))
    c = aug.control_points(size)
    assert params["elastic"].shape == (3, 3, c, c, c) and c == 4  # spacing (10 - 1) / 3 = 3 voxels
    grid = aug.sampling_grid(params, size)
    u = (2 * torch.arange(size) + 1.0) / size - 1.0
    identity = torch.stack(torch.meshgrid(u, u, u, indexing="ij"), dim=-1).flip(-1)  # (W, H, D) order
    dense = F.interpolate(params["elastic"], size=(size,) * 3, mode="trilinear", align_corners=True)
    expected = identity + (dense * (2.0 / size)).permute(0, 2, 3, 4, 1).flip(-1)
    assert torch.allclose(grid, expected, atol=1e-6)
    # the control displacements are N(0, magnitude^2) voxels
    assert params["elastic"].std().item() == pytest.approx(2.0, rel=0.25)


def test_samples_without_elastic_get_a_pure_affine_grid():
    aug = BatchedAugment(rotation_deg=10, elastic_prob=0.5, noise_prob=0.0, contrast_prob=0.0)
    params = aug.sample(16, 8, torch.Generator().manual_seed(3))
    on = params["elastic_on"]
    assert 0 < on.sum() < 16
    without = dict(params, elastic_on=torch.zeros(16, dtype=torch.bool))
    grid, affine_only = aug.sampling_grid(params, 8), aug.sampling_grid(without, 8)
    assert torch.allclose(grid[~on], affine_only[~on], atol=1e-6)
    assert not torch.allclose(grid[on], affine_only[on], atol=1e-3)


def test_seeded_reproducible_and_seed_dependent():
    aug = BatchedAugment()
    x = _patches(6, 12)
    a = aug(x, torch.Generator().manual_seed(7))
    b = aug(x, torch.Generator().manual_seed(7))
    c = aug(x, torch.Generator().manual_seed(8))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c, atol=1e-3)


def test_two_views_are_drawn_independently():
    aug = BatchedAugment()
    x = _patches(6, 12)
    g = torch.Generator().manual_seed(0)
    first, second = aug.sample(6, 12, g), aug.sample(6, 12, g)
    for key in ("angles", "scale", "translate", "elastic", "gamma"):
        assert not torch.allclose(first[key], second[key]), key
    g = torch.Generator().manual_seed(0)
    v1, v2 = aug(x, g), aug(x, g)
    assert not torch.allclose(v1, v2, atol=1e-3)
    # the per-sample parameters of one view are not shared across the batch either
    assert first["angles"].unique(dim=0).shape[0] == 6


def test_parameters_stay_in_their_ranges_and_probabilities_hold():
    aug = BatchedAugment(rotation_deg=10, scale=0.1, translation=0.25, elastic_prob=0.5, noise_prob=0.25,
                         contrast_prob=0.75, contrast_gamma=(0.7, 1.5))
    n, size = 2000, 8
    p = aug.sample(n, size, torch.Generator().manual_seed(4))
    assert p["angles"].abs().max() <= math.radians(10) and p["angles"].abs().max() > math.radians(9.9)
    assert (p["scale"] - 1).abs().max() <= 0.1
    assert p["translate"].abs().max() <= 0.25 * size
    assert 0.7 <= p["gamma"].min() and p["gamma"].max() <= 1.5
    assert p["elastic_on"].float().mean().item() == pytest.approx(0.5, abs=0.04)
    assert p["contrast_on"].float().mean().item() == pytest.approx(0.75, abs=0.04)
    assert p["noise_index"].numel() / n == pytest.approx(0.25, abs=0.04)
    assert p["noise"].shape == (p["noise_index"].numel(), 1, size, size, size)
    assert p["noise"].std().item() == pytest.approx(50.0 / 632.0, rel=0.05)


def test_zero_strength_is_the_identity():
    x = _patches(4, 12)
    assert torch.equal(BatchedAugment(**STILL)(x, torch.Generator().manual_seed(0)), x)
    # the warping path with identity parameters also reproduces the input
    aug = BatchedAugment(rotation_deg=10, noise_prob=0.0, contrast_prob=0.0)
    params = aug.sample(4, 12, torch.Generator().manual_seed(0))
    params.update(angles=torch.zeros(4, 3), scale=torch.ones(4), translate=torch.zeros(4, 3),
                  elastic_on=torch.zeros(4, dtype=torch.bool))
    assert torch.allclose(aug.apply(x, params), x, atol=1e-5)


def test_noise_has_the_configured_standard_deviation_in_normalised_units():
    aug = BatchedAugment(**{**STILL, "noise_prob": 1.0, "noise_std_hu": 100.0}, intensity_scale=500.0)
    x = _patches(8, 12)
    diff = aug(x, torch.Generator().manual_seed(5)) - x
    assert diff.std().item() == pytest.approx(0.2, rel=0.05)
    assert diff.mean().abs().item() < 0.01


def test_intensity_shift_is_one_offset_per_sample_within_range():
    aug = BatchedAugment(**STILL, intensity_shift_hu=63.2, intensity_scale=632.0)
    x = _patches(64, 8)
    diff = aug(x, torch.Generator().manual_seed(3)) - x
    per_sample = diff.flatten(1)
    assert torch.allclose(per_sample, per_sample[:, :1].expand_as(per_sample), atol=1e-6)
    offsets = per_sample[:, 0]
    assert offsets.abs().max().item() <= 0.1 + 1e-6 and offsets.std().item() > 0.03
    # off by default: no draw, so the other parameters are unchanged by the option's existence
    default = BatchedAugment(**STILL).sample(4, 8, torch.Generator().manual_seed(0))
    assert "shift" not in default


def test_contrast_equals_monai_adjust_contrast():
    from monai.transforms import AdjustContrast

    x = _patches(3, 8)
    gamma = torch.tensor([0.7, 1.0, 1.5])
    out = adjust_contrast(x, gamma)
    for i in range(3):
        expected = torch.as_tensor(AdjustContrast(gamma=float(gamma[i]))(x[i]))
        assert torch.allclose(out[i], expected, atol=1e-6)
    aug = BatchedAugment(**{**STILL, "contrast_prob": 1.0})
    params = aug.sample(3, 8, torch.Generator().manual_seed(0))
    assert torch.allclose(aug.apply(x, params), adjust_contrast(x, params["gamma"]))


def test_output_follows_input_device_and_dtype():
    aug = BatchedAugment()
    x = _patches(2, 8).double()
    out = aug(x, torch.Generator().manual_seed(0))
    assert out.dtype == torch.float64 and out.device == x.device and out.shape == x.shape


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu_for_the_same_parameters():
    aug = BatchedAugment(noise_prob=1.0, contrast_prob=1.0, elastic_prob=1.0)
    x = _patches(4, 12)
    params = aug.sample(4, 12, torch.Generator().manual_seed(0))
    on_gpu = aug.apply(x.cuda(), {k: v.cuda() for k, v in params.items()})
    assert on_gpu.is_cuda
    assert torch.allclose(on_gpu.cpu(), aug.apply(x, params), atol=1e-4)
    view = aug(x.cuda(), torch.Generator(device="cuda").manual_seed(0))
    assert view.is_cuda and view.shape == x.shape


@pytest.mark.parametrize("kwargs, word", [
    ({"rotation_deg": -1}, "rotation_deg"), ({"scale": 1.0}, "scale"), ({"translation": 0.6}, "translation"),
    ({"elastic_prob": 1.5}, "elastic_prob"), ({"elastic_sigma": 0}, "elastic_sigma"),
    ({"noise_std_hu": -5}, "noise_std_hu"), ({"contrast_prob": -0.1}, "contrast_prob"),
    ({"contrast_gamma": (1.5, 0.7)}, "contrast_gamma"), ({"contrast_gamma": (0.0, 1.0)}, "contrast_gamma"),
    ({"intensity_scale": 0}, "intensity_scale"),
])
def test_bad_constructor_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        BatchedAugment(**kwargs)


def test_bad_inputs_are_rejected():
    aug = BatchedAugment()
    g = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match=r"\[N, 1, S, S, S\]"):
        aug(torch.zeros(2, 1, 8, 8, 6), g)
    with pytest.raises(ValueError, match=r"\[N, 1, S, S, S\]"):
        aug(torch.zeros(2, 2, 8, 8, 8), g)
    with pytest.raises(ValueError, match="float"):
        aug(torch.zeros(2, 1, 8, 8, 8, dtype=torch.int16), g)


def test_from_settings_works_in_the_input_units():
    from models.intensity import PatchInput

    aug = augment_from_settings({"rotation_deg": 5.0, "noise_std_hu": 100.0}, PatchInput())
    assert aug.pad_value == pytest.approx(-1.024) and aug.noise_std == pytest.approx(0.1) and aug.rotation_deg == 5.0
    narrow = augment_from_settings({}, PatchInput(windows=((-1000.0, -700.0),)))
    assert narrow.pad_value == pytest.approx(-1.0)  # air clipped into the windows' range
    with pytest.raises(ValueError, match="rotation"):
        augment_from_settings({"rotation": 5.0}, PatchInput())


# ----------------------------------------------------------------- kernel and intensity gain
KERNEL = {**STILL, "kernel_prob": 1.0, "blur_sigma": (0.6, 1.4), "sharpen_amount": (0.2, 0.9)}


def _hand_gaussian(volume, sigma):
    """A reference blur: scipy's separable Gaussian, truncated at the same radius, nearest borders."""
    import math

    from scipy import ndimage

    radius = max(1, math.ceil(3.0 * sigma))
    return ndimage.gaussian_filter(volume.astype("float64"), sigma, mode="nearest", truncate=radius / sigma)


def test_gaussian_blur_matches_scipy_per_sample():
    from models.augment import gaussian_blur

    x = _patches(3, 10, seed=4)
    sigma = torch.tensor([0.5, 1.0, 1.0])
    out = gaussian_blur(x, sigma)
    # the kernel radius is set by the largest sigma; a smaller sigma's extra taps are ~0
    for i in range(3):
        expected = _hand_gaussian(x[i, 0].numpy(), float(sigma[i]))
        assert torch.allclose(out[i, 0].double(), torch.from_numpy(expected), atol=1e-5), i


def test_kernel_augmentation_blurs_or_sharpens_by_the_drawn_parameters():
    aug = BatchedAugment(**KERNEL)
    x = _patches(8, 10, seed=5)
    params = aug.sample(8, 10, torch.Generator().manual_seed(6))
    assert params["kernel_on"].all() and 0 < params["sharpen"].sum() < 8
    assert ((params["blur_sigma"] >= 0.6) & (params["blur_sigma"] <= 1.4)).all()
    assert ((params["sharpen_amount"] >= 0.2) & (params["sharpen_amount"] <= 0.9)).all()
    out = aug.apply(x, params)
    for i in range(8):
        volume = x[i, 0].numpy()
        if params["sharpen"][i]:
            amount = float(params["sharpen_amount"][i])
            expected = volume + amount * (volume - _hand_gaussian(volume, 1.0))
        else:
            expected = _hand_gaussian(volume, float(params["blur_sigma"][i]))
        assert torch.allclose(out[i, 0].double(), torch.from_numpy(expected), atol=1e-4), i
    # blurring lowers the voxel-to-voxel variation, sharpening raises it
    rough = lambda v: (v[..., 1:] - v[..., :-1]).abs().mean()  # noqa: E731
    for i in range(8):
        assert (rough(out[i]) > rough(x[i])) == bool(params["sharpen"][i])


def test_kernel_probability_and_seeding():
    aug = BatchedAugment(**{**KERNEL, "kernel_prob": 0.3})
    params = aug.sample(2000, 4, torch.Generator().manual_seed(7))
    assert 0.26 < params["kernel_on"].float().mean() < 0.34
    a = aug.sample(16, 8, torch.Generator().manual_seed(8))
    b = aug.sample(16, 8, torch.Generator().manual_seed(8))
    assert all(torch.equal(a[k], b[k]) for k in a)
    # off (the default) draws nothing, so the other draws do not change
    plain = BatchedAugment(**STILL).sample(16, 8, torch.Generator().manual_seed(8))
    assert "kernel_on" not in plain and all(torch.equal(plain[k], a[k]) for k in plain)


def test_intensity_gain_and_offset_pivot_about_air_per_view():
    aug = BatchedAugment(**STILL, intensity_gain=0.2, intensity_shift_hu=40.0, intensity_scale=1000.0,
                         pad_value=-1.024)
    x = _patches(6, 8, seed=9)
    g = torch.Generator().manual_seed(10)
    params = aug.sample(6, 8, g)
    assert ((params["gain"] >= 0.8) & (params["gain"] <= 1.2)).all()
    assert (params["shift"].abs() <= 0.04 + 1e-7).all()
    out = aug.apply(x, params)
    for i in range(6):
        expected = -1.024 + float(params["gain"][i]) * (x[i] + 1.024) + float(params["shift"][i])
        assert torch.allclose(out[i], expected, atol=1e-6)
    # two views of one batch get different gains (independent draws)
    other = aug.sample(6, 8, g)
    assert not torch.allclose(other["gain"], params["gain"])
