"""Exponential moving average of a model's weights (the MoCo key encoder)."""

from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def update_momentum(model: nn.Module, ema_model: nn.Module, m: float) -> None:
    """``ema = m * ema + (1 - m) * model`` for every parameter; buffers are copied from ``model``.

    Args:
        model: the trained (query) network. ema_model: a network of the same structure (the key
            encoder), updated in place. m: momentum in [0, 1] (1 freezes ``ema_model``, 0 copies).

    Raises:
        ValueError: ``m`` outside [0, 1] or the two models' parameters/buffers do not match.
    """
    m = float(m)
    if not 0.0 <= m <= 1.0:
        raise ValueError(f"momentum m must be in [0, 1], got {m!r}")
    params, ema_params = dict(model.named_parameters()), dict(ema_model.named_parameters())
    buffers, ema_buffers = dict(model.named_buffers()), dict(ema_model.named_buffers())
    if params.keys() != ema_params.keys() or buffers.keys() != ema_buffers.keys():
        raise ValueError("update_momentum: model and ema_model have different parameters or buffers")
    for name, param in params.items():
        target = ema_params[name]
        if target.shape != param.shape:
            raise ValueError(f"update_momentum: parameter {name} has shape {list(param.shape)} in model "
                             f"but {list(target.shape)} in ema_model")
        target.mul_(m).add_(param.detach(), alpha=1.0 - m)
    for name, buffer in buffers.items():
        ema_buffers[name].copy_(buffer)
