"""Outcome heads: planted signals are recovered, the ordered logit is the statsmodels model, edge cases."""

import numpy as np
import pytest
from scipy.special import expit
from sklearn.base import clone
from sklearn.utils.estimator_checks import parametrize_with_checks
from statsmodels.miscmodels.ordinal_model import OrderedModel
from statsmodels.tools.numdiff import approx_fprime

from models.heads import (OrdinalHead, RidgeHead, _OrderedLogit, accuracy, one_off_accuracy,
                          ordered_logit_proba)


def test_one_off_accuracy_hand_made():
    assert one_off_accuracy([0, 1, 2, 3], [0, 2, 4, 3]) == 0.75  # |diff| = 0, 1, 2, 0
    assert one_off_accuracy([5, 0], [3, 2]) == 0.0
    assert one_off_accuracy(np.array([2.0]), np.array([1.0])) == 1.0
    assert accuracy([0, 1, 2, 3], [0, 2, 4, 3]) == 0.5
    with pytest.raises(ValueError, match="equal length"):
        one_off_accuracy([0, 1], [0])
    with pytest.raises(ValueError, match="empty"):
        one_off_accuracy([], [])


def test_ridge_recovers_planted_r2():
    # y = X beta + noise with X ~ N(0, I): population R^2 = |beta|^2 / (|beta|^2 + sigma^2) = 1.5 / 2.5 = 0.6
    rng = np.random.default_rng(1)
    d = 10
    beta = rng.standard_normal(d)
    beta *= np.sqrt(1.5) / np.linalg.norm(beta)
    X = rng.standard_normal((5500, d)) * 3.0 + 7.0  # scaled and shifted: the head standardises
    y = (X - 7.0) / 3.0 @ beta + rng.standard_normal(5500)
    head = RidgeHead(inner_folds=3, random_state=0).fit(X[:1500], y[:1500])
    pred = head.predict(X[1500:])
    r2 = 1 - np.sum((y[1500:] - pred) ** 2) / np.sum((y[1500:] - y[1500:].mean()) ** 2)
    assert r2 == pytest.approx(0.6, abs=0.03)
    assert head.alpha_ in head.alphas and head.inner_mse_.shape == (len(head.alphas),)


def _ordinal_data(rng, n, beta, thresholds):
    X = rng.standard_normal((n, beta.size))
    latent = X @ beta + rng.logistic(size=n)
    return X, np.searchsorted(thresholds, latent).astype(float)  # level = number of thresholds below


def test_ordinal_head_reaches_bayes_accuracy():
    rng = np.random.default_rng(2)
    beta = np.array([1.2, -0.8, 0.6, 0.0])
    thresholds = np.array([-2.0, -0.7, 0.7, 2.0])
    X, y = _ordinal_data(rng, 6000, beta, thresholds)
    train, test = slice(0, 1500), slice(1500, None)
    head = OrdinalHead(n_components=(2, 4), inner_folds=3, random_state=0).fit(X[train], y[train])
    # the Bayes rule from the true model: argmax_k P(y = k | x), P(y <= j | x) = F(t_j - x beta)
    cum = expit(thresholds[None, :] - (X[test] @ beta)[:, None])
    proba = np.diff(np.hstack([np.zeros((cum.shape[0], 1)), cum, np.ones((cum.shape[0], 1))]), axis=1)
    bayes = proba.argmax(axis=1)
    bayes_accuracy = np.mean(bayes == y[test])
    head_accuracy = np.mean(head.predict(X[test]) == y[test])
    majority = np.max(np.bincount(y[test].astype(int))) / y[test].size
    assert bayes_accuracy > majority + 0.1  # the signal matters
    assert head_accuracy == pytest.approx(bayes_accuracy, abs=0.03)
    assert head.n_components_ == 4  # all four directions carry signal
    np.testing.assert_allclose(head.predict_proba(X[test]).sum(axis=1), 1.0, atol=1e-9)


def test_analytic_score_matches_numerical_gradient_and_statsmodels_fit():
    rng = np.random.default_rng(3)
    X, y = _ordinal_data(rng, 800, np.array([0.8, -0.5, 0.3]), np.array([-1.0, 0.0, 1.2]))
    model = _OrderedLogit(y.astype(int), X)
    params = np.concatenate([rng.normal(0, 0.3, 3), [-0.8, -0.1, 0.2]])
    np.testing.assert_allclose(model.score(params), approx_fprime(params, model.loglike, centered=True),
                               rtol=1e-5, atol=1e-4)
    ours = model.fit(method="bfgs", disp=0, skip_hessian=True).params
    reference = OrderedModel(y, X, distr="logit").fit(method="bfgs", disp=0, skip_hessian=True)
    np.testing.assert_allclose(ours, reference.params, atol=1e-4)
    np.testing.assert_allclose(ordered_logit_proba(np.asarray(ours), X[:20], 4),
                               reference.model.predict(reference.params, exog=X[:20]), atol=1e-6)


def test_ordinal_head_with_a_level_absent_from_training():
    rng = np.random.default_rng(4)
    X, y = _ordinal_data(rng, 900, np.array([1.5, 0.5]), np.array([-1.0, 0.0, 1.0]))
    keep = y != 2
    head = OrdinalHead(n_components=(1, 2), random_state=0).fit(X[keep], y[keep])
    assert head.classes_.tolist() == [0.0, 1.0, 3.0]
    pred = head.predict(X)
    assert set(np.unique(pred)) <= {0.0, 1.0, 3.0} and {0.0, 3.0} <= set(np.unique(pred))
    assert head.predict_proba(X).shape == (900, 3)


def test_ordinal_head_constant_features_and_single_level():
    rng = np.random.default_rng(5)
    X, y = _ordinal_data(rng, 600, np.array([2.0, -1.0]), np.array([-1.0, 1.0]))
    with_constants = np.hstack([X, np.ones((600, 2)), np.zeros((600, 1))])
    head = OrdinalHead(n_components=(2, 4, 8), random_state=0).fit(with_constants, y)
    assert head.n_components_ == 2  # capped by the rank: constant columns add nothing
    assert np.mean(head.predict(with_constants) == y) > 0.6

    flat = np.full((600, 3), 7.0)
    prior = OrdinalHead().fit(flat, y)
    assert prior.n_components_ == 0
    np.testing.assert_allclose(prior.predict_proba(flat[:1])[0], np.bincount(y.astype(int)) / 600)
    assert np.all(prior.predict(flat) == np.argmax(np.bincount(y.astype(int))))

    single = OrdinalHead().fit(X, np.full(600, 2.0))
    assert np.all(single.predict(X[:5]) == 2.0)


def test_heads_are_deterministic_and_follow_sklearn_conventions():
    rng = np.random.default_rng(6)
    X, y = _ordinal_data(rng, 400, np.array([1.0, 0.5, 0.0]), np.array([-0.5, 0.5]))
    first = OrdinalHead(random_state=3).fit(X, y).predict_proba(X)
    second = clone(OrdinalHead(random_state=3)).fit(X, y).predict_proba(X)
    np.testing.assert_array_equal(first, second)
    assert OrdinalHead(inner_folds=4).get_params()["inner_folds"] == 4
    assert RidgeHead().fit(X, y).predict(X).shape == (400,)
    assert not hasattr(RidgeHead(), "alpha_")  # __init__ only stores parameters


@pytest.mark.parametrize("make, value", [
    (lambda: RidgeHead(alphas=[1.0, -1.0]), "-1.0"),
    (lambda: RidgeHead(inner_folds=1), "1"),
    (lambda: OrdinalHead(n_components=[0, 2]), "0"),
    (lambda: OrdinalHead(maxiter=0), "maxiter"),
])
def test_heads_reject_bad_parameters(make, value):
    head = make()  # __init__ only stores its arguments (scikit-learn's contract) ...
    with pytest.raises(ValueError, match=value):  # ... and fit validates them
        head.fit(np.arange(40.0).reshape(20, 2), np.arange(20) % 3)


def test_ordinal_head_rejects_non_integer_levels():
    with pytest.raises(ValueError, match="Unknown label type"):
        OrdinalHead().fit(np.zeros((10, 2)) + np.arange(10)[:, None], np.linspace(0, 1, 10))


# An ordered logit scores every sample on one axis (the PCA scores times one coefficient vector),
# so it cannot separate scikit-learn's three Gaussian blobs, which are not ordered along any axis:
# check_classifiers_train's 0.83 training accuracy is out of its reach by design.
ORDINAL_EXPECTED_FAILURES = {"check_classifiers_train": "an ordinal model cannot fit unordered blob classes"}


@parametrize_with_checks([RidgeHead(), OrdinalHead()], expected_failed_checks=lambda head: (
    ORDINAL_EXPECTED_FAILURES if isinstance(head, OrdinalHead) else {}))
def test_heads_pass_sklearn_check_estimator(estimator, check):
    check(estimator)
