"""Supervised upper bound (models/supervised.py): it learns a subject-level target and is seeded."""

from __future__ import annotations

import numpy as np
import pytest

from models.data import PatchStore
from models.supervised import SubjectRegressor, fit_subject_regressor, predict_subjects
from tests.train_fixtures import make_cohort, tiny_settings


def _store_and_target(tmp_path):
    cohort = make_cohort(tmp_path, n_subjects=16, lattice=(2, 2, 2), patch_size=8, seed=3)
    store = PatchStore(cohort.patch_paths(), cohort.ok_sids)
    # target: each subject's mean HU (standardised), a subject-level property of its patches
    mean_hu = np.array([np.load(path).mean() for path in cohort.patch_paths()])
    return store, ((mean_hu - mean_hu.mean()) / mean_hu.std())[:, None]


def test_the_regressor_learns_a_subject_level_target_and_is_seeded(tmp_path):
    store, target = _store_and_target(tmp_path)
    settings = tiny_settings(augment={"rotation_deg": 0.0, "elastic_prob": 0.0, "noise_prob": 0.0,
                                      "contrast_prob": 0.0})
    untrained = fit_subject_regressor(settings, store, None, target, steps=0, seed=1)
    trained = fit_subject_regressor(settings, store, None, target, steps=120, subjects_per_step=8,
                                    patches_per_subject=8, lr=1e-2, seed=1)
    before = predict_subjects(untrained, settings, store, None)
    after = predict_subjects(trained, settings, store, None)
    assert after.shape == (16, 1)
    error_before = np.mean((before - target) ** 2)
    error_after = np.mean((after - target) ** 2)
    correlation_before = np.corrcoef(before[:, 0], target[:, 0])[0, 1]
    correlation_after = np.corrcoef(after[:, 0], target[:, 0])[0, 1]
    assert error_after < error_before and correlation_after > max(0.9, correlation_before)
    again = fit_subject_regressor(settings, store, None, target, steps=120, subjects_per_step=8,
                                  patches_per_subject=8, lr=1e-2, seed=1)
    np.testing.assert_array_equal(predict_subjects(again, settings, store, None), after)


def test_bad_targets_and_missing_masks_are_errors(tmp_path):
    store, target = _store_and_target(tmp_path)
    with pytest.raises(ValueError, match="targets must be"):
        fit_subject_regressor(tiny_settings(), store, None, target[:3], steps=1)
    with pytest.raises(ValueError, match="no lung masks"):
        fit_subject_regressor(tiny_settings(input={"lung_mask": True}), store, None, target, steps=1)
    with pytest.raises(ValueError, match="n_targets"):
        SubjectRegressor(None, 0)
