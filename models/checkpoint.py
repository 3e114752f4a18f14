"""Saving and loading training artefacts: only tensors and plain Python types inside.

Every file written here loads with ``torch.load(path, weights_only=True)``, so a checkpoint from
an untrusted source cannot execute code. Writes are atomic (temporary file + rename).

``encoder.pt`` = ``{"state_dict": query-encoder state_dict, "settings": run settings,
"patch_size": S, "num_locations": P, "feature_dim": D}``.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch

from pipeline.errors import ConfigError
from pipeline.files import atomic_path

# settings that do not change what the patch encoder learns (where it runs, loader threads, the
# later graph stage): a changed value does not invalidate a training checkpoint
IGNORED_KEYS = ("device", "num_workers", "graph")


def save(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Atomically ``torch.save`` a dict of tensors and plain types."""
    with atomic_path(path, suffix=".pt") as tmp:
        torch.save(obj, tmp)


def load(path: str | os.PathLike, map_location: Any = "cpu") -> dict[str, Any]:
    """``torch.load(weights_only=True)`` with a one-line error for unreadable files."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - torch raises many types for corrupt files
        raise ConfigError(f"{path} is not a readable weights-only checkpoint: {' '.join(str(error).split())[:300]}") from None


def fingerprint(settings: dict[str, Any], **extra: Any) -> str:
    """SHA-256 of the settings that determine training (:data:`IGNORED_KEYS` dropped) and ``extra``
    (e.g. the subject list and grid size): equal fingerprints mean a checkpoint can resume."""
    science = {k: v for k, v in settings.items() if k not in IGNORED_KEYS}
    text = json.dumps({"settings": science, **extra}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def export_encoder(path: str | os.PathLike, encoder: torch.nn.Module, settings: dict[str, Any],
                   patch_size: int, num_locations: int) -> None:
    """Write ``encoder.pt`` for the query encoder (tensors moved to CPU, contiguous)."""
    state = {k: v.detach().to("cpu").contiguous() for k, v in encoder.state_dict().items()}
    save({"state_dict": state, "settings": settings, "patch_size": int(patch_size),
          "num_locations": int(num_locations), "feature_dim": int(settings["encoder"]["feature_dim"])}, path)


def read_encoder(path: str | os.PathLike, device: Any = "cpu"):
    """Rebuild the patch encoder saved by :func:`export_encoder`.

    Returns:
        (encoder in eval mode on ``device``, metadata dict: ``settings``, ``patch_size``,
        ``num_locations``, ``feature_dim``).
    """
    from models.encoder import encoder_from_settings, input_channels
    from pipeline.config import validate_section

    saved = load(path)
    missing = {"state_dict", "settings", "patch_size", "num_locations"} - set(saved)
    if missing:
        raise ConfigError(f"{path} is not an encoder file: missing {', '.join(sorted(missing))}")
    # an encoder saved before a settings key existed gets the schema's default for it
    settings = validate_section("train", saved["settings"])
    encoder = encoder_from_settings(settings["encoder"], int(saved["patch_size"]), in_channels=input_channels(settings))
    encoder.load_state_dict(saved["state_dict"])
    metadata = {k: v for k, v in saved.items() if k != "state_dict"}
    return encoder.to(device).eval(), metadata


def load_encoder(path: str | os.PathLike, device: Any = "cpu"):
    """The :class:`models.encoder.PatchEncoder` of ``encoder.pt`` in eval mode on ``device``
    (``embed(x [N, 1, S, S, S], loc [N, 3]) -> [N, feature_dim]``)."""
    return read_encoder(path, device)[0]
