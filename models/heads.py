"""Outcome heads: supervised models fitted on subject features inside cross-validation folds.

Both heads follow the scikit-learn estimator conventions (``__init__`` only stores parameters,
``fit`` returns ``self``, fitted attributes end in ``_``) so that everything learned from data
(scaling, PCA, the choice of hyper-parameters) is learned from the rows passed to ``fit`` only.
The evaluation stage fits one head per training fold and predicts the held-out fold.

- :class:`RidgeHead`: continuous outcomes (log FEV1 % predicted, log FEV1/FVC) and the
  linear read-out of latent factors. StandardScaler + ridge regression; the penalty is chosen by
  an inner K-fold search over ``alphas`` (the scaler is refitted inside every inner fold).
- :class:`OrdinalHead`: ordered categorical outcomes (visual emphysema scores, mMRC), as in the
  IFM paper: StandardScaler + PCA + an ordered logit model (statsmodels ``OrderedModel`` with
  ``distr="logit"``, fitted by BFGS); the number of PCA components is chosen by an inner CV on
  (a capped, stratified subsample of) the training rows.

Shapes: ``X`` is ``[n_samples, n_features]``, ``y`` is ``[n_samples]``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
from scipy.special import expit
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.decomposition import PCA
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.pipeline import Pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, validate_data
from statsmodels.miscmodels.ordinal_model import OrderedModel

DEFAULT_ALPHAS = (0.01, 0.1, 1.0, 10.0, 100.0, 1000.0)
DEFAULT_COMPONENTS = (2, 4, 8, 16)
_PROB_FLOOR = 1e-6  # probability given to a level a model never saw, when scoring log-likelihood
_RANK_TOL = 1e-6  # PCA components with relative variance below this are treated as absent


def one_off_accuracy(y, pred) -> float:
    """Fraction of predictions within one level of the truth: ``mean(|y - pred| <= 1)``.

    Args:
        y: observed levels ``[n]``.
        pred: predicted levels ``[n]``.
    """
    y, pred = _paired_levels(y, pred, "one_off_accuracy")
    return float(np.mean(np.abs(y - pred) <= 1))


def accuracy(y, pred) -> float:
    """Fraction of exactly correct predictions ``mean(y == pred)`` (``[n]`` each)."""
    y, pred = _paired_levels(y, pred, "accuracy")
    return float(np.mean(y == pred))


def _paired_levels(y, pred, what: str) -> tuple[np.ndarray, np.ndarray]:
    """Observed and predicted levels as float arrays ``[n]``, checked to be 1-D, equal and non-empty."""
    y = np.asarray(y, dtype=float)
    pred = np.asarray(pred, dtype=float)
    if y.shape != pred.shape or y.ndim != 1:
        raise ValueError(f"y and pred must be 1-D arrays of equal length, got shapes {y.shape} and {pred.shape}")
    if y.size == 0:
        raise ValueError(f"{what} of an empty set is undefined")
    return y, pred


def _check_int(name: str, value, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Ridge regression head
# ---------------------------------------------------------------------------------------------


class RidgeHead(RegressorMixin, BaseEstimator):
    """StandardScaler + ridge regression with the penalty chosen by inner K-fold CV.

    The inner search refits the scaler inside every inner fold and solves all candidate
    penalties at once (one scikit-learn ``Ridge`` fit with one penalty per copy of the target),
    then keeps the penalty with the smallest held-out squared error (ties: the larger penalty).

    Args:
        alphas: candidate penalties (all > 0).
        inner_folds: folds of the inner search (on the training rows only).
        random_state: seed of the inner fold split.

    Fitted attributes: ``pipeline_`` (scaler + ridge refitted on all training rows),
    ``alpha_`` (chosen penalty), ``inner_mse_`` (held-out mean squared error per alpha
    ``[n_alphas]``), ``n_features_in_``.
    """

    def __init__(self, alphas: Sequence[float] = DEFAULT_ALPHAS, inner_folds: int = 3, random_state: int = 0):
        self.alphas = alphas
        self.inner_folds = inner_folds
        self.random_state = random_state

    def _check_params(self) -> np.ndarray:
        alphas = np.atleast_1d(np.asarray(self.alphas, dtype=float))
        if alphas.ndim != 1 or alphas.size == 0 or not np.all(np.isfinite(alphas) & (alphas > 0)):
            raise ValueError(f"alphas must be a non-empty list of positive numbers, got {self.alphas!r}")
        _check_int("inner_folds", self.inner_folds, 2)
        return alphas

    def fit(self, X, y) -> RidgeHead:
        """Fit on ``X [n, d]``, ``y [n]`` (finite values)."""
        alphas = self._check_params()
        X, y = validate_data(self, X, y, y_numeric=True, dtype=np.float64)
        if X.shape[0] < 2 * self.inner_folds:
            raise ValueError(f"RidgeHead needs at least {2 * self.inner_folds} samples for "
                             f"inner_folds={self.inner_folds}, got n_samples={X.shape[0]}")
        squared_error = np.zeros(alphas.size)
        splitter = KFold(self.inner_folds, shuffle=True, random_state=self.random_state)
        for train, test in splitter.split(X):
            scaler = StandardScaler().fit(X[train])
            ridge = Ridge(alpha=alphas).fit(scaler.transform(X[train]), np.tile(y[train, None], (1, alphas.size)))
            predicted = ridge.predict(scaler.transform(X[test]))  # [n_test, n_alphas]
            squared_error += np.sum((predicted - y[test, None]) ** 2, axis=0)
        self.inner_mse_ = squared_error / X.shape[0]
        ties = np.flatnonzero(self.inner_mse_ <= self.inner_mse_.min() * (1 + 1e-12))
        best = ties[np.argmax(alphas[ties])]
        self.alpha_ = float(alphas[best])
        self.pipeline_ = Pipeline([("scale", StandardScaler()), ("ridge", Ridge(alpha=self.alpha_))]).fit(X, y)
        return self

    def predict(self, X) -> np.ndarray:
        """Predicted outcome ``[n]`` for ``X [n, d]``."""
        check_is_fitted(self, "pipeline_")
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self.pipeline_.predict(X)


# ---------------------------------------------------------------------------------------------
# Ordered logit head
# ---------------------------------------------------------------------------------------------


class _OrderedLogit(OrderedModel):
    """statsmodels ``OrderedModel(distr="logit")`` with a closed-form gradient.

    statsmodels differentiates the log-likelihood numerically (one likelihood evaluation per
    parameter per gradient); BFGS with the analytic score below is several times faster and
    reaches the same optimum. Parameters are ``(beta [k], theta [K-1])`` with thresholds
    ``t_0 = theta_0``, ``t_j = theta_0 + sum_{m<=j} exp(theta_m)`` (statsmodels' layout).
    ``endog`` must hold integer codes ``0..K-1`` that all occur.
    """

    def __init__(self, endog, exog):
        super().__init__(endog, exog, distr="logit")

    def cdf(self, x):
        return expit(x)

    def pdf(self, x):
        p = expit(x)
        return p * (1.0 - p)

    def score(self, params):
        """Gradient of the total log-likelihood with respect to ``params`` ``[k + K - 1]``."""
        params = np.asarray(params, dtype=float)
        n_thresh = self.k_levels - 1
        low, upp = self._bounds(params)
        prob = np.maximum(self.cdf(upp) - self.cdf(low), 0) + 1e-20  # as in loglikeobs
        d_upp = self.pdf(upp) / prob  # [n]; 0 for the top level (upp = +inf)
        d_low = self.pdf(low) / prob  # [n]; 0 for the bottom level (low = -inf)
        grad_beta = -(d_upp - d_low) @ self.exog  # [k]
        y = self.endog
        upper_rows = y < n_thresh
        lower_rows = y > 0
        grad_t = (np.bincount(y[upper_rows], weights=d_upp[upper_rows], minlength=n_thresh)
                  - np.bincount(y[lower_rows] - 1, weights=d_low[lower_rows], minlength=n_thresh))  # [K-1]
        tail = np.cumsum(grad_t[::-1])[::-1]  # tail[m] = sum_{j>=m} dL/dt_j
        theta = params[-n_thresh:]
        grad_theta = tail.copy()
        grad_theta[1:] *= np.exp(theta[1:])
        return np.concatenate([grad_beta, grad_theta])


def ordered_logit_proba(params: np.ndarray, Z: np.ndarray, n_levels: int) -> np.ndarray:
    """Level probabilities ``[n, K]`` of an ordered logit model with ``params`` ``[k + K - 1]``.

    Same parameterisation as statsmodels' ``OrderedModel``: ``P(y <= j | z) = expit(t_j - z @ beta)``.
    """
    n_thresh = n_levels - 1
    beta, theta = params[:-n_thresh], params[-n_thresh:]
    thresholds = np.cumsum(np.concatenate([theta[:1], np.exp(theta[1:])]))  # [K-1]
    cum = expit(thresholds[None, :] - (Z @ beta)[:, None])  # [n, K-1]
    cum = np.concatenate([np.zeros((Z.shape[0], 1)), cum, np.ones((Z.shape[0], 1))], axis=1)
    return np.clip(np.diff(cum, axis=1), 0.0, 1.0)


def _fit_ordered_logit(Z: np.ndarray, codes: np.ndarray, start: np.ndarray | None, maxiter: int) -> np.ndarray:
    """BFGS fit of an ordered logit on ``Z [n, k]`` and codes ``[n]`` (all of ``0..K-1`` present).

    Returns the parameters ``[k + K - 1]``. Convergence and overflow warnings are silenced: with
    few samples per level the likelihood can be flat or separable, and the bounded number of
    BFGS iterations still gives usable (shrunk) estimates.
    """
    with warnings.catch_warnings(), np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        warnings.simplefilter("ignore")
        model = _OrderedLogit(codes, Z)
        result = model.fit(start_params=start, method="bfgs", maxiter=maxiter, disp=0, skip_hessian=True)
    params = np.asarray(result.params, dtype=float)
    if not np.all(np.isfinite(params)):
        raise FloatingPointError("ordered logit fit diverged")
    return params


class _OrdinalFit:
    """Scaler + PCA (up to ``max_components``) and ordered logits on one set of rows.

    The rows are an inner-CV training fold or all training rows of the head. ``codes [n]`` are
    level codes ``0..n_levels-1``; some may be absent from these rows, so the logit is fitted on
    the codes present and :meth:`proba` returns zero for the others.
    """

    def __init__(self, X: np.ndarray, codes: np.ndarray, n_levels: int, max_components: int, random_state: int):
        self.n_levels = n_levels
        self.scaler = StandardScaler().fit(X)
        Xs = self.scaler.transform(X)
        cap = min(max_components, X.shape[0] - 1, X.shape[1])
        if not np.any(self.scaler.var_ > 0):
            cap = 0  # every feature is constant: nothing for PCA to find
        self.pca = PCA(n_components=cap, whiten=True, random_state=random_state).fit(Xs) if cap >= 1 else None
        if self.pca is not None:
            variance = self.pca.explained_variance_
            self.rank = int(np.sum(variance > _RANK_TOL * max(variance[0], 1e-300)))
            self.scores = self.pca.transform(Xs)[:, : self.rank]
        else:
            self.rank = 0
            self.scores = np.zeros((X.shape[0], 0))
        self.present = np.unique(codes)  # codes that occur here
        self.local = np.searchsorted(self.present, codes)  # codes renumbered 0..len(present)-1
        self.prior = np.bincount(codes, minlength=n_levels) / codes.size

    def drop_training_data(self) -> None:
        """Forget the training scores once no more models will be fitted (keeps the head small)."""
        self.scores = self.scores[:0]
        self.local = self.local[:0]

    def fit(self, k: int, start: np.ndarray | None, maxiter: int) -> np.ndarray | None:
        """Ordered logit on the first ``k`` components; ``None`` when it cannot be fitted."""
        if k == 0 or self.present.size < 2:
            return None
        return _fit_ordered_logit(self.scores[:, :k], self.local, start, maxiter)

    def proba(self, params: np.ndarray | None, X: np.ndarray, k: int) -> np.ndarray:
        """Probabilities ``[n, n_levels]`` for new rows ``X [n, d]``."""
        if params is None:
            return np.tile(self.prior, (X.shape[0], 1))
        Z = self.pca.transform(self.scaler.transform(X))[:, :k]
        local = ordered_logit_proba(params, Z, self.present.size)
        out = np.zeros((X.shape[0], self.n_levels))
        out[:, self.present] = local
        return out


class OrdinalHead(ClassifierMixin, BaseEstimator):
    """StandardScaler + PCA + ordered logit (statsmodels ``OrderedModel``, logit link, BFGS).

    The number of PCA components is chosen among ``n_components`` (capped by the number of
    samples and of features, and by the rank of the data) by inner cross-validation on the
    training rows: the mean held-out log-likelihood. To keep the search cheap on large cohorts,
    it runs on a stratified random subsample of at most ``max_inner_samples`` training rows,
    and each larger component count is warm-started from the smaller one's solution (PCA scores
    are nested). The final model is refitted on all training rows.

    The levels are discrete labels ordered by their sort order (numbers numerically; continuous
    targets are rejected). Levels absent from the training rows cannot be predicted; the model is
    fitted on the levels that occur and predicts on the original label scale (``classes_``).

    Args:
        n_components: candidate PCA component counts (each >= 1).
        inner_folds: folds of the inner search.
        random_state: seed of the subsample and the inner split.
        max_inner_samples: cap on the rows used by the inner search (>= 2 * inner_folds).
        maxiter: BFGS iterations per fit.

    Fitted attributes: ``classes_`` (observed levels, sorted), ``n_components_`` (chosen; 0 when
    the features carry no variance or only one level was seen, in which case the head predicts
    the training level frequencies), ``params_`` (ordered logit parameters ``[k + K - 1]`` or
    ``None``), ``inner_scores_`` (dict components -> mean held-out log-likelihood per sample),
    ``model_`` (the fitted scaler + PCA), ``n_features_in_``.
    """

    def __init__(self, n_components: Sequence[int] = DEFAULT_COMPONENTS, inner_folds: int = 3,
                 random_state: int = 0, max_inner_samples: int = 2000, maxiter: int = 100):
        self.n_components = n_components
        self.inner_folds = inner_folds
        self.random_state = random_state
        self.max_inner_samples = max_inner_samples
        self.maxiter = maxiter

    def _check_params(self) -> list[int]:
        values = list(np.atleast_1d(self.n_components))
        if not values or not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) and v >= 1 for v in values):
            raise ValueError(f"n_components must be a non-empty list of integers >= 1, got {self.n_components!r}")
        _check_int("inner_folds", self.inner_folds, 2)
        _check_int("max_inner_samples", self.max_inner_samples, 2 * self.inner_folds)
        _check_int("maxiter", self.maxiter, 1)
        return sorted({int(v) for v in values})

    def fit(self, X, y) -> OrdinalHead:
        """Fit on ``X [n, d]`` and levels ``y [n]`` (discrete labels, ordered by their sort order)."""
        candidates = self._check_params()
        X, y = validate_data(self, X, y, dtype=np.float64)
        check_classification_targets(y)  # "Unknown label type: continuous" for non-integer numbers
        self.classes_, codes = np.unique(y, return_inverse=True)
        n_levels = self.classes_.size
        full = _OrdinalFit(X, codes, n_levels, max(candidates), self.random_state)
        # candidate counts capped by samples, features and rank (duplicates removed)
        capped = sorted({min(k, full.rank) for k in candidates} - {0})
        if n_levels < 2 or not capped:
            self.n_components_, self.params_, self.inner_scores_ = 0, None, {}
            full.drop_training_data()
            self.model_ = full
            return self
        if len(capped) == 1 or X.shape[0] < 2 * self.inner_folds:
            self.inner_scores_ = {}  # nothing to choose, or too few rows to split: the smallest model
            best = capped[0]
        else:
            self.inner_scores_ = self._inner_search(X, codes, n_levels, capped)
            best = max(capped, key=lambda k: (self.inner_scores_[k], -k))
        self.n_components_ = best
        self.params_ = full.fit(best, None, self.maxiter)
        full.drop_training_data()
        self.model_ = full
        return self

    def _inner_search(self, X: np.ndarray, codes: np.ndarray, n_levels: int, candidates: list[int]) -> dict[int, float]:
        """Mean held-out log-likelihood per sample for each candidate component count."""
        rng = np.random.default_rng(self.random_state)
        rows = np.arange(X.shape[0])
        if rows.size > self.max_inner_samples:
            rows = _stratified_subsample(codes, self.max_inner_samples, rng)
        Xi, ci = X[rows], codes[rows]
        counts = np.bincount(ci, minlength=n_levels)
        seed = int(rng.integers(2**31 - 1))
        if counts[counts > 0].min() >= self.inner_folds:
            splitter = StratifiedKFold(self.inner_folds, shuffle=True, random_state=seed)
        else:
            splitter = KFold(self.inner_folds, shuffle=True, random_state=seed)
        totals = dict.fromkeys(candidates, 0.0)
        for train, test in splitter.split(Xi, ci):
            inner = _OrdinalFit(Xi[train], ci[train], n_levels, max(candidates), self.random_state)
            start = None
            for k in candidates:
                kk = min(k, inner.rank)
                params = inner.fit(kk, _grow(start, kk), self.maxiter) if kk > 0 else None
                if params is not None:
                    start = (params, kk)
                proba = inner.proba(params, Xi[test], kk)
                totals[k] += float(np.sum(np.log(np.maximum(proba[np.arange(test.size), ci[test]], _PROB_FLOOR))))
        return {k: totals[k] / rows.size for k in candidates}

    def predict_proba(self, X) -> np.ndarray:
        """Probabilities ``[n, len(classes_)]`` of each observed level for ``X [n, d]``."""
        check_is_fitted(self, "classes_")
        X = validate_data(self, X, reset=False, dtype=np.float64)
        return self.model_.proba(self.params_, X, self.n_components_)

    def predict(self, X) -> np.ndarray:
        """Most probable level ``[n]`` (values from ``classes_``) for ``X [n, d]``."""
        check_is_fitted(self, "classes_")
        return self.classes_[np.argmax(self.predict_proba(X), axis=1)]


def _grow(start: tuple[np.ndarray, int] | None, k: int) -> np.ndarray | None:
    """Warm start for ``k`` components from a fit on fewer: extra coefficients start at zero."""
    if start is None:
        return None
    params, k_old = start
    if k_old > k:
        return None
    return np.concatenate([params[:k_old], np.zeros(k - k_old), params[k_old:]])


def _stratified_subsample(codes: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Row indices ``[<= size]`` drawn without replacement, keeping level proportions (>= 1 per level)."""
    picked = []
    n = codes.size
    for level in np.unique(codes):
        members = np.flatnonzero(codes == level)
        take = max(1, int(round(size * members.size / n)))
        picked.append(rng.choice(members, size=min(take, members.size), replace=False))
    return np.sort(np.concatenate(picked))
