"""IFM loss against a hand-written reference (explicit loops, manual log-sum-exp in float64)."""

from __future__ import annotations

import math

import pytest
import torch

from models.ifm import IFMLoss, contrastive_logits

torch.set_num_threads(1)


def _reference_ce(l_pos: list[float], l_neg: list[list[float]], tau: float, eps: float) -> float:
    """Mean over rows of -log softmax(column 0), written out with Python floats."""
    total = 0.0
    for pos, negs in zip(l_pos, l_neg):
        logits = [(pos - eps) / tau] + [(neg + eps) / tau for neg in negs]
        top = max(logits)
        log_sum = top + math.log(sum(math.exp(z - top) for z in logits))
        total += log_sum - logits[0]
    return total / len(l_pos)


def _similarities(n=6, k=9, seed=0):
    g = torch.Generator().manual_seed(seed)
    l_pos = torch.rand(n, 1, generator=g) * 2 - 1
    l_neg = torch.rand(n, k, generator=g) * 2 - 1
    return l_pos, l_neg


def test_contrastive_logits_layout():
    l_pos, l_neg = _similarities(3, 4)
    logits = contrastive_logits(l_pos, l_neg, temperature=0.5, epsilon=0.1)
    assert logits.shape == (3, 5)
    assert torch.allclose(logits[:, 0], (l_pos[:, 0] - 0.1) / 0.5)
    assert torch.allclose(logits[:, 1:], (l_neg + 0.1) / 0.5)


@pytest.mark.parametrize("method", ["none", "ifm", "ifm_only"])
def test_loss_matches_hand_written_reference(method):
    l_pos, l_neg = _similarities()
    tau, eps, alpha = 0.2, 0.3, 0.5
    loss, stats = IFMLoss(method, epsilon=eps, alpha=alpha, temperature=tau)(l_pos, l_neg)
    pos, neg = l_pos[:, 0].tolist(), l_neg.tolist()
    plain, perturbed = _reference_ce(pos, neg, tau, 0.0), _reference_ce(pos, neg, tau, eps)
    expected = {"none": plain, "ifm": (plain + alpha * perturbed) / (1 + alpha), "ifm_only": perturbed}[method]
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    assert stats["loss_plain"].item() == pytest.approx(plain, rel=1e-5)
    assert stats["loss_ifm"].item() == pytest.approx(perturbed, rel=1e-5)
    assert all(not value.requires_grad for value in stats.values())


@pytest.mark.parametrize("method", ["ifm", "ifm_only"])
def test_epsilon_zero_is_exactly_plain_moco(method):
    l_pos, l_neg = _similarities(8, 16, seed=3)
    plain, _ = IFMLoss("none", temperature=0.2)(l_pos, l_neg)
    loss, stats = IFMLoss(method, epsilon=0.0, alpha=0.7, temperature=0.2)(l_pos, l_neg)
    assert torch.equal(loss, plain)
    assert torch.equal(stats["loss_ifm"], stats["loss_plain"])


def test_gradients_match_reference_autograd():
    l_pos, l_neg = _similarities(5, 7, seed=1)
    a_pos, a_neg = l_pos.double().requires_grad_(), l_neg.double().requires_grad_()
    loss, _ = IFMLoss("ifm", epsilon=0.2, alpha=2.0, temperature=0.1)(a_pos, a_neg)
    loss.backward()

    def ref(p, n, eps):  # log-softmax spelled out
        z = torch.cat([(p - eps) / 0.1, (n + eps) / 0.1], dim=1)
        return (torch.logsumexp(z, dim=1) - z[:, 0]).mean()

    b_pos, b_neg = l_pos.double().requires_grad_(), l_neg.double().requires_grad_()
    ((ref(b_pos, b_neg, 0.0) + 2.0 * ref(b_pos, b_neg, 0.2)) / 3.0).backward()
    assert torch.allclose(a_pos.grad, b_pos.grad) and torch.allclose(a_neg.grad, b_neg.grad)


def test_increasing_epsilon_increases_perturbed_loss_with_the_analytic_gradient():
    l_pos, l_neg = _similarities(6, 10, seed=2)
    tau = 0.2
    losses = [IFMLoss("ifm_only", epsilon=e, temperature=tau)(l_pos, l_neg)[0].item() for e in (0.0, 0.1, 0.3, 1.0)]
    assert losses == sorted(losses) and len(set(losses)) == 4
    # dL_eps/d eps = 2 (1 - p_pos) / tau per row: the positive loses eps, every negative gains it
    eps = torch.tensor(0.25, dtype=torch.float64, requires_grad=True)
    logits = contrastive_logits(l_pos.double(), l_neg.double(), tau, eps)
    loss = torch.nn.functional.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    loss.backward()
    p_pos = torch.softmax(logits.detach(), dim=1)[:, 0]
    assert eps.grad.item() == pytest.approx((2 * (1 - p_pos) / tau).mean().item(), rel=1e-9)
    assert eps.grad.item() > 0


def test_only_ifm_methods_train_on_the_perturbed_loss():
    l_pos, l_neg = _similarities(4, 6, seed=4)
    grads = {}
    for method in ("none", "ifm_only"):
        p = l_pos.clone().requires_grad_()
        IFMLoss(method, epsilon=0.5, temperature=0.2)(p, l_neg)[0].backward()
        grads[method] = p.grad
    assert not torch.allclose(grads["none"], grads["ifm_only"])


def test_top1_accuracy_of_unperturbed_logits():
    l_pos = torch.tensor([[0.9], [0.8], [0.1], [0.5]])
    l_neg = torch.tensor([[0.1, 0.2], [0.7, 0.3], [0.6, 0.0], [0.45, 0.4]])
    # with eps 0.1 the last row's positive would lose; acc1 ignores the perturbation
    _, stats = IFMLoss("ifm", epsilon=0.1, temperature=0.2)(l_pos, l_neg)
    assert stats["acc1"].item() == pytest.approx(75.0)


@pytest.mark.parametrize("kwargs, word", [
    ({"method": "adversarial"}, "adversarial"),
    ({"method": "ifm", "epsilon": -0.1}, "epsilon"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -1.0}, "temperature"),
    ({"alpha": -1.0}, "alpha"),
])
def test_bad_values_are_rejected(kwargs, word):
    with pytest.raises(ValueError, match=word):
        IFMLoss(**kwargs)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError, match="l_pos"):
        IFMLoss()(torch.zeros(3), torch.zeros(3, 4))
