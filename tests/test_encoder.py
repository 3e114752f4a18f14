"""Patch encoder: backbones, pre-projection features, location-conditioned projection."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.encoder import ConvBackbone, PatchEncoder, build_backbone, encoder_from_settings, histogram_columns
from tests.train_fixtures import encoder_settings

torch.set_num_threads(1)

SMALL = (4, 8, 16)


def _encoder(keys, patch_size, **options):
    """encoder_from_settings on ``keys`` over the schema's encoder defaults."""
    return encoder_from_settings(encoder_settings(**keys), patch_size, **options)


def _batch(n=3, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 1, size, size, size, generator=g), torch.rand(n, 3, generator=g) * 2 - 1


@pytest.mark.parametrize("size", [8, 16, 32])
def test_conv_backbone_shapes_and_structure(size):
    backbone = ConvBackbone()
    convs = [m for m in backbone.modules() if isinstance(m, nn.Conv3d)]
    assert [c.out_channels for c in convs] == [8, 16, 32, 64, 128]
    assert [c.stride for c in convs] == [(1, 1, 1)] + [(2, 2, 2)] * 4
    assert sum(isinstance(m, nn.BatchNorm3d) for m in backbone.modules()) == 5
    assert sum(isinstance(m, nn.ELU) for m in backbone.modules()) == 5
    x, _ = _batch(2, size)
    assert backbone(x).shape == (2, 128) and backbone.out_dim == 128


def test_conv_backbone_follows_spatial_dims():
    backbone = ConvBackbone(in_channels=2, widths=(4, 6), spatial_dims=2)
    assert backbone(torch.randn(3, 2, 10, 10)).shape == (3, 6)
    assert any(isinstance(m, nn.BatchNorm2d) for m in backbone.modules())


def test_multiscale_backbone_concatenates_the_average_of_every_stage():
    torch.manual_seed(0)
    plain = ConvBackbone(widths=(4, 6, 8)).eval()
    multiscale = ConvBackbone(widths=(4, 6, 8), multiscale=True).eval()
    multiscale.load_state_dict(plain.state_dict())  # the same parameters: only the read-out differs
    x, _ = _batch(2, 16)
    out = multiscale(x)
    assert out.shape == (2, 18) and multiscale.out_dim == 18
    first_stage = plain.features[:3](x).flatten(2).mean(dim=2)  # Conv + BatchNorm + ELU of stage 1
    assert torch.allclose(out[:, :4], first_stage, atol=1e-6)
    assert torch.allclose(out[:, -8:], plain(x), atol=1e-6)  # the last stage's average, as without it
    encoder = _encoder({"widths": [4, 6, 8], "feature_dim": 12, "multiscale": True}, 16, seed=0)
    assert encoder.backbone.out_dim == 18 and encoder.embed(x).shape == (2, 12)
    with pytest.raises(ValueError, match="multiscale is a property of the 'conv' backbone"):
        build_backbone("monai:ResNet", (4, 6, 8, 16), 16, 12, multiscale=True)


def test_soft_histogram_counts_voxels_by_intensity():
    from models.histogram import SoftHistogram

    histogram = SoftHistogram(in_channels=2, bins=5)  # centres -1, -0.5, 0, 0.5, 1
    x = torch.empty(1, 2, 4, 4, 4)
    x[:, 0] = -1.0  # channel 0: every voxel on the first centre
    x[:, 1, :2] = 0.25  # channel 1: half the voxels midway between the centres 0 and 0.5 ...
    x[:, 1, 2] = 1.0  # ... a quarter on the last centre ...
    x[:, 1, 3] = 1.7  # ... and a quarter beyond the range: counted in the edge bin
    out = histogram(x)
    assert out.shape == (1, 10) and histogram.out_dim == 10
    expected = torch.tensor([[1.0, 0, 0, 0, 0, 0, 0, 0.25, 0.25, 0.5]])
    assert torch.allclose(out, expected, atol=1e-6)
    values = torch.rand(3, 2, 6, 6, 6) * 2 - 1  # anywhere in [-1, 1]: every voxel adds 1 per channel
    shares = histogram(values).view(3, 2, 5)
    assert torch.allclose(shares.sum(dim=2), torch.ones(3, 2), atol=1e-5)
    # against the definition: the mean of max(0, 1 - |v - centre| / spacing) over the voxels
    centres = torch.linspace(-1, 1, 5)
    direct = torch.relu(1 - (values.flatten(2)[..., None] - centres).abs() / 0.5).mean(dim=2)  # 3x2x5
    assert torch.allclose(shares, direct, atol=1e-5)
    # weights: a voxel counts by its weight (a lung mask keeps only lung voxels), per channel or shared
    mask = (torch.rand(3, 1, 6, 6, 6) > 0.4).float()
    weighted = histogram(values, mask).view(3, 2, 5)
    kernel = torch.relu(1 - (values.flatten(2)[..., None] - centres).abs() / 0.5)  # 3x2xVx5
    by_hand = (kernel * mask.flatten(2)[..., None]).sum(dim=2) / mask.flatten(2).sum(dim=2)[..., None]
    assert torch.allclose(weighted, by_hand, atol=1e-5)
    assert torch.allclose(histogram(values, torch.ones(3, 2, 6, 6, 6)), histogram(values), atol=1e-6)
    assert torch.equal(histogram(values, torch.zeros(3, 1, 6, 6, 6)), torch.zeros(3, 10))  # no voxel counts
    with pytest.raises(ValueError, match="weights"):
        histogram(values, torch.ones(3, 1, 5, 6, 6))
    with pytest.raises(ValueError, match="bins must be >= 2"):
        SoftHistogram(1, 1)
    with pytest.raises(ValueError, match=r"expects \[N, 2"):
        histogram(torch.zeros(1, 1, 4, 4, 4))


def test_histogram_bins_extend_the_backbone_features():
    from pipeline.config import validate_config

    x, _ = _batch(2, 16)
    plain = _encoder({"widths": [4, 6, 8], "feature_dim": 12}, 16, seed=0)
    encoder = _encoder({"widths": [4, 6, 8], "feature_dim": 12, "histogram_bins": 8}, 16, seed=0)
    features = encoder.backbone(x)
    assert features.shape == (2, 8 + 8) and encoder.feature.in_features == 16
    assert torch.allclose(features[:, 8:], encoder.backbone.histogram(x))
    resolved = validate_config({"train": {"encoder": {"histogram_bins": 8}}})["train"]
    assert histogram_columns(resolved) == 8 == encoder.backbone.histogram.out_dim  # the last columns are the bins
    two_windows = validate_config({"train": {"encoder": {"histogram_bins": 8},
                                             "input": {"windows": [[-1024, -700], [-1024, 240]]}}})["train"]
    assert histogram_columns(two_windows) == 16
    assert histogram_columns(validate_config({})["train"]) == 0
    assert encoder.embed(x).shape == (2, 12) and plain.backbone(x).shape == (2, 8)
    with pytest.raises(Exception, match="histogram_bins"):
        validate_config({"train": {"encoder": {"histogram_bins": 1}}})


@pytest.mark.parametrize("kwargs, word", [({"widths": ()}, "widths"), ({"widths": (4, 0)}, "widths"),
                                          ({"in_channels": 0}, "in_channels"), ({"spatial_dims": 4}, "spatial_dims")])
def test_conv_backbone_rejects_bad_values(kwargs, word):
    with pytest.raises(ValueError, match=word):
        ConvBackbone(**kwargs)


@pytest.mark.parametrize("size", [16, 32])
def test_encoder_shapes_embed_and_projection(size):
    encoder = _encoder({"widths": list(SMALL), "feature_dim": 12, "projection_dim": 6}, size, seed=0)
    x, loc = _batch(4, size)
    h, z = encoder.embed(x, loc), encoder(x, loc)
    assert h.shape == (4, 12) and z.shape == (4, 6)
    assert torch.allclose(z.norm(dim=1), torch.ones(4), atol=1e-5)
    assert not torch.allclose(h.norm(dim=1), torch.ones(4), atol=1e-2)  # pre-projection: not normalised
    # embed is the pre-projection feature: the head applied to [embed, loc] gives forward
    assert torch.allclose(nn.functional.normalize(encoder.head(torch.cat([h, loc], 1)), dim=1), z, atol=1e-6)


def test_feature_layer_is_identity_when_sizes_match():
    encoder = _encoder({"widths": list(SMALL), "feature_dim": 16, "projection_dim": 6}, 16)
    assert isinstance(encoder.feature, nn.Identity)
    x, loc = _batch(2)
    assert torch.equal(encoder.embed(x, loc), encoder.backbone(x))


def test_location_changes_projection_but_not_embedding():
    encoder = _encoder({"widths": list(SMALL), "feature_dim": 12, "projection_dim": 6}, 16, seed=1)
    encoder.eval()
    x, loc = _batch(3)
    other = -loc
    assert torch.equal(encoder.embed(x, loc), encoder.embed(x, other))
    assert not torch.allclose(encoder(x, loc), encoder(x, other), atol=1e-4)


def test_without_location_the_projection_ignores_it():
    encoder = _encoder({"widths": list(SMALL), "feature_dim": 12, "projection_dim": 6,
                                     "use_location": False}, 16)
    encoder.eval()
    x, loc = _batch(3)
    assert encoder.head[0].in_features == 12
    assert torch.equal(encoder(x, loc), encoder(x, None))


def test_location_shape_is_checked():
    encoder = _encoder({"widths": list(SMALL), "feature_dim": 12, "projection_dim": 6}, 16)
    x, loc = _batch(3)
    with pytest.raises(ValueError, match="loc must be"):
        encoder(x, loc[:, :2])


def test_monai_resnet_backbone():
    backbone, dim = build_backbone("monai:ResNet", (8, 16, 32, 64, 128), 16, 24)
    assert dim == 24
    assert type(backbone).__name__ == "ResNet" and len(backbone.layer1) == 1  # layers=(1, 1, 1, 1)
    assert backbone.layer4[0].conv1.out_channels == 128  # block_inplanes = the last four widths
    encoder = PatchEncoder(backbone, dim, feature_dim=10, projection_dim=6)
    x, loc = _batch(2, 16)
    assert encoder.embed(x, loc).shape == (2, 10) and encoder(x, loc).shape == (2, 6)


@pytest.mark.parametrize("name, word", [
    ("resnet", "unknown backbone 'resnet'"),
    ("monai:", "unknown backbone"),
    ("monai:NoSuchNet", "NoSuchNet"),
])
def test_bad_backbone_names_are_rejected(name, word):
    with pytest.raises(ValueError, match=word):
        build_backbone(name, SMALL, 16, 8)


def test_bad_backbone_arguments_are_rejected():
    with pytest.raises(ValueError, match="pretrained"):
        build_backbone("monai:ResNet", SMALL + (32,), 16, 8, pretrained=True)
    with pytest.raises(ValueError, match="does not accept"):
        build_backbone("monai:ResNet", SMALL + (32,), 16, 8, colour=True)
    with pytest.raises(ValueError, match="at least 4 widths"):
        build_backbone("monai:ResNet", SMALL, 16, 8)
    with pytest.raises(ValueError, match="backbone_kwargs"):
        build_backbone("conv", SMALL, 16, 8, depth=3)


def test_backbone_without_a_vector_output_is_rejected():
    # a segmentation network keeps the spatial axes: not one vector per patch
    with pytest.raises(ValueError, match=r"gives \[2, 8, 32, 32, 32\]"):
        build_backbone("monai:BasicUNet", SMALL, 32, 8, features=(4, 4, 4, 4, 4, 4))
    # a network too deep for the patch size fails its dry run with a one-line error
    with pytest.raises(ValueError, match="fails on patches of size 16"):
        build_backbone("monai:BasicUNet", SMALL, 16, 8, features=(4, 4, 4, 4, 4, 4))


def test_seeded_construction_is_deterministic_and_leaves_global_rng_alone():
    settings = {"widths": list(SMALL), "feature_dim": 12, "projection_dim": 6}
    state = torch.get_rng_state()
    a, b = _encoder(settings, 16, seed=5), _encoder(settings, 16, seed=5)
    c = _encoder(settings, 16, seed=6)
    assert torch.equal(torch.get_rng_state(), state)
    for (name, pa), pb, pc in zip(a.state_dict().items(), b.state_dict().values(), c.state_dict().values()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.head[0].weight, c.head[0].weight)


@pytest.mark.parametrize("kwargs, word", [({"feature_dim": 0}, "feature_dim"),
                                          ({"projection_dim": 0}, "projection_dim"),
                                          ({"backbone_dim": 0}, "backbone_dim")])
def test_patch_encoder_rejects_bad_sizes(kwargs, word):
    args = {"backbone": nn.Identity(), "backbone_dim": 4, **kwargs}
    with pytest.raises(ValueError, match=word):
        PatchEncoder(**args)
