"""Location-conditioned patch encoder: a 3D CNN backbone, a feature layer and a projection head.

As in Sun et al. (AAAI 2021), the projection head sees the patch's normalised atlas location
concatenated to the image features, so the contrastive task is conditioned on anatomy; the
pre-projection features (what :meth:`PatchEncoder.embed` returns) are what downstream uses.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.histogram import WithHistogram

BACKBONE_HELP = "'conv' (the reference 3D CNN) or 'monai:<Network>' (a class in monai.networks.nets)"


class ConvBackbone(nn.Module):
    """Reference 3D CNN: per width ``Conv(k=3) + BatchNorm + ELU``; every width after the first
    starts with a stride-2 convolution; global average pooling at the end.

    Args:
        in_channels: input channels C.
        widths: output channels of each stage (default 8, 16, 32, 64, 128).
        spatial_dims: 1, 2 or 3 (picks ``nn.Conv{d}d`` / ``nn.BatchNorm{d}d``, as MONAI's
            ``Conv``/``Norm`` factories do, without paying for importing MONAI).
        multiscale: return the global average of *every* stage's feature map, concatenated,
            instead of the last stage's only. The first stages' averages are, after their
            nonlinearity, soft counts of voxels in an intensity range with a given local texture:
            tail fractions of the patch histogram (emphysema below -950 HU, airway walls and
            vessels above -700 HU) stay linear features instead of being squeezed through four
            stride-2 stages (docs/science.md, "Encoder capacity").

    Shapes: ``x`` [N, C, S, S, S] (for spatial_dims 3) -> [N, D] with D = widths[-1], or
    sum(widths) with ``multiscale``. Any S >= 1 works (S = 8, 16, 32 in practice); a stride-2
    convolution with padding 1 maps size s to ceil(s/2). The parameters do not depend on
    ``multiscale``.
    """

    def __init__(self, in_channels: int = 1, widths: Sequence[int] = (8, 16, 32, 64, 128), spatial_dims: int = 3,
                 multiscale: bool = False):
        super().__init__()
        if int(in_channels) < 1:
            raise ValueError(f"in_channels must be >= 1, got {in_channels!r}")
        widths = tuple(int(w) for w in widths)
        if not widths or min(widths) < 1:
            raise ValueError(f"widths must be a non-empty sequence of positive integers, got {widths!r}")
        if spatial_dims not in (1, 2, 3):
            raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")
        conv, norm = getattr(nn, f"Conv{spatial_dims}d"), getattr(nn, f"BatchNorm{spatial_dims}d")
        layers: list[nn.Module] = []
        channels = int(in_channels)
        for i, width in enumerate(widths):
            layers += [conv(channels, width, kernel_size=3, stride=1 if i == 0 else 2, padding=1, bias=False),
                       norm(width), nn.ELU(inplace=True)]
            channels = width
        self.features = nn.Sequential(*layers)
        self.spatial_dims = spatial_dims
        self.multiscale = bool(multiscale)
        self.out_dim = sum(widths) if self.multiscale else widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        """x [N, C, *spatial] -> [N, out_dim] (global average of the last feature map, or of every
        stage's map concatenated with ``multiscale``)."""
        if not self.multiscale:
            return self.features(x).flatten(2).mean(dim=2)
        pooled = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i % 3 == 2:  # after each stage's Conv + BatchNorm + ELU
                pooled.append(x.flatten(2).mean(dim=2))
        return torch.cat(pooled, dim=1)


def _accepted_parameters(cls: type) -> set[str]:
    """Constructor parameter names of ``cls``, following ``**kwargs`` into its base classes."""
    names: set[str] = set()
    for klass in cls.__mro__:
        init = klass.__dict__.get("__init__")
        if init is None or klass is nn.Module or klass is object:
            continue
        params = inspect.signature(init).parameters
        names |= {p.name for p in params.values() if p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}
        if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
            break
    names.discard("self")
    return names


def _monai_network(net: str, widths: Sequence[int], patch_size: int, feature_dim: int, in_channels: int,
                   **kwargs: Any) -> nn.Module:
    import monai.networks.nets as nets

    cls = getattr(nets, net, None)
    if not (inspect.isclass(cls) and issubclass(cls, nn.Module)):
        raise ValueError(f"backbone 'monai:{net}': monai.networks.nets has no network named {net!r}")
    if kwargs.get("pretrained"):
        raise ValueError(f"backbone 'monai:{net}': pretrained=True would download weights, which is not allowed")
    accepted = _accepted_parameters(cls)
    defaults: dict[str, Any] = {"spatial_dims": 3, "in_channels": in_channels, "n_input_channels": in_channels,
                                "num_classes": feature_dim, "out_channels": feature_dim,
                                "img_size": (patch_size,) * 3, "pretrained": False}
    if net == "ResNet":
        layers = tuple(kwargs.get("layers", (1, 1, 1, 1)))
        if len(widths) < len(layers):
            raise ValueError(f"backbone 'monai:ResNet' needs at least {len(layers)} widths, got {list(widths)}")
        defaults.update(block="basic", layers=layers, block_inplanes=list(widths[-len(layers):]))
    params = {key: value for key, value in defaults.items() if key in accepted}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"backbone 'monai:{net}' does not accept {', '.join(unknown)}")
    params.update(kwargs)
    try:
        return cls(**params)
    except (TypeError, ValueError, AssertionError) as error:
        raise ValueError(f"backbone 'monai:{net}' cannot be built with {params}: {error}") from None


def build_backbone(name: str, widths: Sequence[int], patch_size: int, feature_dim: int, in_channels: int = 1,
                   multiscale: bool = False, **kwargs: Any) -> tuple[nn.Module, int]:
    """Build a backbone mapping [N, C, S, S, S] patches (C = ``in_channels``) to [N, D] vectors.

    Args:
        name: ``'conv'`` -> :class:`ConvBackbone` (``widths``; D = widths[-1]); ``'monai:<Net>'``
            -> ``monai.networks.nets.<Net>`` with ``spatial_dims=3``, one input channel and
            ``feature_dim`` outputs (``num_classes``/``out_channels``), ``img_size`` when the
            network takes one; for ``monai:ResNet`` also ``block='basic'``, ``layers=(1, 1, 1, 1)``
            and ``block_inplanes`` = the last four widths. ``kwargs`` override these.
        widths: stage widths; patch_size: S; feature_dim: output size asked of MONAI networks.
        multiscale: the conv backbone's every-stage pooling (:class:`ConvBackbone`).

    Returns:
        ``(module, D)``; D is measured with a dry run on a [2, 1, S, S, S] zero batch, which
        also rejects networks that do not give one vector per patch at this patch size.

    Raises:
        ValueError: unknown name, bad arguments, or an output that is not [N, D] for size S.
    """
    if int(patch_size) < 1:
        raise ValueError(f"patch_size must be >= 1, got {patch_size!r}")
    if int(feature_dim) < 1:
        raise ValueError(f"feature_dim must be >= 1, got {feature_dim!r}")
    if name == "conv":
        if kwargs:
            raise ValueError(f"backbone 'conv' takes no backbone_kwargs, got {', '.join(sorted(kwargs))}")
        module: nn.Module = ConvBackbone(in_channels=in_channels, widths=widths, spatial_dims=3,
                                         multiscale=multiscale)
    elif isinstance(name, str) and name.startswith("monai:") and len(name) > len("monai:"):
        if multiscale:
            raise ValueError(f"encoder.multiscale is a property of the 'conv' backbone, not of {name!r}")
        module = _monai_network(name[len("monai:"):], widths, patch_size, feature_dim, in_channels, **kwargs)
    else:
        raise ValueError(f"unknown backbone {name!r}; use {BACKBONE_HELP}")
    return module, _output_dim(module, name, int(patch_size), int(in_channels))


def _output_dim(module: nn.Module, name: str, patch_size: int, in_channels: int) -> int:
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            out = module(torch.zeros(2, in_channels, patch_size, patch_size, patch_size))
    except (RuntimeError, ValueError, IndexError) as error:
        raise ValueError(f"backbone {name!r} fails on patches of size {patch_size}: "
                         f"{' '.join(str(error).split())}") from None
    finally:
        module.train(was_training)
    if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != 2:
        shape = list(out.shape) if isinstance(out, Tensor) else type(out).__name__
        raise ValueError(f"backbone {name!r} gives {shape} for patches of size {patch_size}; need [N, D]")
    return int(out.shape[1])


class PatchEncoder(nn.Module):
    """Backbone + feature layer + location-conditioned projection head.

    ``embed(x, loc)`` -> [N, feature_dim]: backbone output through a linear feature layer (the
    identity when ``backbone_dim == feature_dim``); not normalised and independent of ``loc``.
    ``forward(x, loc)`` -> [N, projection_dim]: L2-normalised ``MLP(concat(embed, loc))`` with
    MLP = Linear(feature_dim + location_dim, hidden_dim) - ReLU - Linear(hidden_dim, projection_dim);
    without ``use_location`` the MLP sees the features alone.

    Args:
        backbone: module mapping x [N, C, S, S, S] to [N, backbone_dim].
        backbone_dim, feature_dim, projection_dim, location_dim: sizes (>= 1).
        use_location: concatenate the normalised atlas location to the projection input.
        hidden_dim: MLP hidden width (default feature_dim + location_dim, or feature_dim).
    """

    def __init__(self, backbone: nn.Module, backbone_dim: int, feature_dim: int = 128, projection_dim: int = 128,
                 use_location: bool = True, location_dim: int = 3, hidden_dim: int | None = None):
        super().__init__()
        for label, value in (("backbone_dim", backbone_dim), ("feature_dim", feature_dim),
                             ("projection_dim", projection_dim), ("location_dim", location_dim)):
            if int(value) < 1:
                raise ValueError(f"{label} must be >= 1, got {value!r}")
        self.backbone = backbone
        self.backbone_dim, self.feature_dim = int(backbone_dim), int(feature_dim)
        self.projection_dim, self.location_dim = int(projection_dim), int(location_dim)
        self.use_location = bool(use_location)
        same = self.backbone_dim == self.feature_dim
        self.feature = nn.Identity() if same else nn.Linear(self.backbone_dim, self.feature_dim)
        head_in = self.feature_dim + (self.location_dim if self.use_location else 0)
        hidden = head_in if hidden_dim is None else int(hidden_dim)
        if hidden < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {hidden_dim!r}")
        self.head = nn.Sequential(nn.Linear(head_in, hidden), nn.ReLU(inplace=True),
                                  nn.Linear(hidden, self.projection_dim))

    def embed(self, x: Tensor, loc: Tensor | None = None) -> Tensor:
        """x [N, C, S, S, S] -> [N, feature_dim] pre-projection features (``loc`` is not used)."""
        return self.feature(self.backbone(x))  # NxF

    def forward(self, x: Tensor, loc: Tensor | None = None) -> Tensor:
        """x [N, C, S, S, S], loc [N, location_dim] -> [N, projection_dim], unit L2 norm."""
        h = self.embed(x)  # NxF
        if self.use_location:
            if loc is None or loc.shape != (h.shape[0], self.location_dim):
                got = None if loc is None else list(loc.shape)
                raise ValueError(f"loc must be [{h.shape[0]}, {self.location_dim}], got {got}")
            h = torch.cat([h, loc.to(h.dtype)], dim=1)  # Nx(F+3)
        return F.normalize(self.head(h), dim=1)  # NxP


def input_channels(settings: dict[str, Any]) -> int:
    """C, the encoder's input channels of a resolved run: one per ``input.windows`` entry
    (:class:`models.intensity.PatchInput`)."""
    return len(settings["input"]["windows"])


def histogram_columns(settings: dict[str, Any]) -> int:
    """C x K, the histogram bins of a resolved run (0 without bins): the last columns of its
    backbone output (:class:`models.histogram.WithHistogram`), and of its embeddings when the
    feature layer passes them on unchanged (``feature_dim`` = CNN width + C x K)."""
    return input_channels(settings) * int(settings["encoder"]["histogram_bins"])


def encoder_from_settings(encoder: dict[str, Any], patch_size: int, seed: int | None = None,
                          in_channels: int = 1) -> PatchEncoder:
    """Build a :class:`PatchEncoder` from a validated ``train.encoder`` section (every key present:
    :func:`pipeline.config.validate_section` fills the schema's defaults, the only place they are
    spelled) for ``in_channels`` input channels (see :func:`input_channels`). A missing or unknown
    key is a ``TypeError`` naming it. See :func:`build_encoder`."""
    return build_encoder(patch_size, in_channels=in_channels, seed=seed, **encoder)


def build_encoder(patch_size: int, *, backbone: str, widths: Sequence[int], feature_dim: int, projection_dim: int,
                  use_location: bool, multiscale: bool, histogram_bins: int, backbone_kwargs: dict[str, Any],
                  in_channels: int = 1, seed: int | None = None) -> PatchEncoder:
    """A :class:`PatchEncoder` for patches ``[N, in_channels, S, S, S]`` with ``S = patch_size``.

    With ``histogram_bins`` > 0 the backbone's output is extended by a soft histogram (fixed bins)
    of the input (:class:`models.histogram.WithHistogram`). With ``seed``, the initial weights are
    drawn from a seeded RNG (the global RNG state is saved and restored, so callers see no side
    effect). The keywords are the ``train.encoder`` keys of config/schema/config.schema.yaml.
    """
    def build() -> PatchEncoder:
        net, net_dim = build_backbone(backbone, widths, patch_size, int(feature_dim), in_channels,
                                      multiscale=bool(multiscale), **dict(backbone_kwargs or {}))
        if histogram_bins:
            net = WithHistogram(net, in_channels, int(histogram_bins))
            net_dim += net.histogram.out_dim
        return PatchEncoder(net, net_dim, feature_dim=int(feature_dim), projection_dim=int(projection_dim),
                            use_location=bool(use_location))

    if seed is None:
        return build()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        return build()
