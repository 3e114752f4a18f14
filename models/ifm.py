"""InfoNCE with implicit feature modification (IFM; Robinson et al., NeurIPS 2021).

IFM perturbs the logits adversarially in closed form: the positive similarity is lowered by ε
and every negative similarity raised by ε (before the temperature), which makes the
contrastive task harder and discourages the encoder from relying on a few easy features.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

METHODS = ("none", "ifm", "ifm_only")


def contrastive_logits(l_pos: Tensor, l_neg: Tensor, temperature: float, epsilon: float | Tensor = 0.0) -> Tensor:
    """``cat(l_pos - ε, l_neg + ε) / τ``.

    Args:
        l_pos: [N, 1] query-positive cosine similarities. l_neg: [N, K] query-negative ones.
        temperature: τ > 0. epsilon: ε (a float, or a tensor when its gradient is wanted).

    Returns:
        [N, 1 + K] logits; the positive is column 0.
    """
    if l_pos.ndim != 2 or l_pos.shape[1] != 1 or l_neg.ndim != 2 or l_neg.shape[0] != l_pos.shape[0]:
        raise ValueError(f"need l_pos [N, 1] and l_neg [N, K], got {list(l_pos.shape)} and {list(l_neg.shape)}")
    return torch.cat([l_pos - epsilon, l_neg + epsilon], dim=1) / temperature  # Nx(1+K)


class IFMLoss(nn.Module):
    """Contrastive loss with optional IFM.

    ``method``: ``'none'`` -> L (plain MoCo InfoNCE); ``'ifm'`` -> (L + α·L_ε) / (1 + α);
    ``'ifm_only'`` -> L_ε; where L is the cross-entropy of :func:`contrastive_logits` with ε = 0
    and L_ε with ε, the target being column 0. With ε = 0, L_ε is L and every method returns L
    itself (bit-identical to plain MoCo).

    ``forward(l_pos [N, 1], l_neg [N, K])`` -> ``(loss, stats)``: loss a scalar; stats
    ``{'loss_plain', 'loss_ifm', 'acc1'}`` detached scalars (L, L_ε, and the top-1 accuracy in %
    of the positive among the unperturbed logits).
    """

    def __init__(self, method: str = "none", epsilon: float = 0.0, alpha: float = 1.0, temperature: float = 0.2):
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"IFM method must be one of {', '.join(METHODS)}, got {method!r}")
        for label, value in (("epsilon", epsilon), ("alpha", alpha)):
            if not (math.isfinite(float(value)) and float(value) >= 0):
                raise ValueError(f"{label} must be a finite number >= 0, got {value!r}")
        if not (math.isfinite(float(temperature)) and float(temperature) > 0):
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        self.method, self.epsilon = method, float(epsilon)
        self.alpha, self.temperature = float(alpha), float(temperature)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, epsilon={self.epsilon}, alpha={self.alpha}, temperature={self.temperature}"

    def forward(self, l_pos: Tensor, l_neg: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        logits = contrastive_logits(l_pos, l_neg, self.temperature)  # Nx(1+K)
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)  # positives: column 0
        need_plain = self.method != "ifm_only" or self.epsilon == 0
        with torch.set_grad_enabled(torch.is_grad_enabled() and need_plain):
            loss_plain = _cross_entropy(logits, target)
        if self.epsilon == 0:
            loss_ifm = loss_plain
            loss = loss_plain
        else:
            need_ifm = self.method != "none"
            with torch.set_grad_enabled(torch.is_grad_enabled() and need_ifm):
                perturbed = contrastive_logits(l_pos, l_neg, self.temperature, self.epsilon)
                loss_ifm = _cross_entropy(perturbed, target)
            if self.method == "none":
                loss = loss_plain
            elif self.method == "ifm_only":
                loss = loss_ifm
            else:
                loss = (loss_plain + self.alpha * loss_ifm) / (1.0 + self.alpha)
        with torch.no_grad():
            acc1 = (logits.argmax(dim=1) == 0).float().mean() * 100.0
        stats = {"loss_plain": loss_plain.detach(), "loss_ifm": loss_ifm.detach(), "acc1": acc1}
        return loss, stats


def _cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """Mean cross-entropy, computed in at least float32 (half-precision logits under AMP)."""
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return F.cross_entropy(logits, target)
