"""The evaluate stage: real heads through the real code path, no leakage, planted read-out, bad input."""

import json

import numpy as np
import pandas as pd
import pytest
from sklearn.preprocessing import StandardScaler

from pipeline.cli import main
from pipeline.errors import ConfigError, SubjectError
from pipeline.evaluate import Outcome, cross_validate, join_features, outcome_values, read_features, score
from pipeline.folds import make_folds, read_table
from tests.eval_fixtures import eval_config, make_eval_cohort

SETTINGS = eval_config()["evaluate"]  # 3 folds, 2 repeats, PCA components (2, 4)


def read(path):
    return pd.read_csv(path, sep="\t", dtype={"sid": str})


def test_evaluate_stage_end_to_end(tmp_path):
    cohort = make_eval_cohort(tmp_path, n_subjects=60)
    work, settings = str(cohort.layout.work), json.dumps(SETTINGS)
    features = tmp_path / "features.tsv"
    folds = tmp_path / "folds.tsv"
    out = tmp_path / "results" / "moco" / "mean"
    assert main(["pool", "--run", "moco", "--pooling", "mean", "--subjects", str(cohort.subjects_tsv),
                 "--work", work, "--out", str(features)]) == 0
    assert main(["folds", "--subjects", str(cohort.subjects_tsv), "--work", work, "--phenotypes",
                 str(cohort.phenotypes), "--out", str(folds), "--settings", settings]) == 0
    assert main(["evaluate", "--features", str(features), "--folds", str(folds), "--phenotypes",
                 str(cohort.phenotypes), "--truth", str(cohort.truth), "--name", "moco", "--pooling", "mean",
                 "--out-dir", str(out), "--settings", settings, "--jobs", "1"]) == 0

    metrics = read(out / "metrics.tsv")
    assert list(metrics.columns) == ["outcome", "metric", "repeat", "value", "n"]
    expected = {("logFEV1pp", "r2"), ("logFEV1FVC", "r2"), ("CLE", "acc"), ("CLE", "acc1off"),
                ("Paraseptal", "acc"), ("Paraseptal", "acc1off"), ("mMRC", "acc"), ("mMRC", "acc1off")}
    assert set(zip(metrics["outcome"], metrics["metric"])) == expected
    assert sorted(metrics["repeat"].unique()) == [0, 1]
    n = metrics.groupby("outcome")["n"].first()
    ok = len(cohort.ok_sids)  # 58: S003 and S007 failed QC
    # a missing value drops the subject from that outcome only
    assert (n["logFEV1pp"], n["CLE"], n["logFEV1FVC"], n["mMRC"]) == (ok - 2, ok - 1, ok, ok)
    ordinal = metrics[metrics["metric"] != "r2"]
    assert ordinal["value"].between(0, 1).all()
    acc = metrics.pivot_table(index=["outcome", "repeat"], columns="metric", values="value").dropna()
    assert (acc["acc1off"] >= acc["acc"]).all()

    predictions = read(out / "predictions.tsv")
    assert list(predictions.columns) == ["sid", "outcome", "repeat", "observed", "predicted"]
    fev1 = predictions[(predictions["outcome"] == "logFEV1pp") & (predictions["repeat"] == 1)]
    assert sorted(fev1["sid"]) == sorted(set(cohort.ok_sids) - {"S000", "S005"})  # once each, out of fold
    phenotypes = read_table(cohort.phenotypes, "phenotypes")
    np.testing.assert_allclose(fev1["observed"], np.log(phenotypes.loc[fev1["sid"], "FEV1pp_utah"]), rtol=1e-5)
    cle = predictions[predictions["outcome"] == "CLE"]
    assert set(cle["predicted"]) <= set(range(6))

    # read-out: the moco features carry cle and pse but not awt (see eval_fixtures); the two-level
    # kernel is coded 0/1, other text factors are skipped
    readout = read(out / "readout.tsv")
    assert list(readout.columns) == ["factor", "repeat", "r2"]
    assert list(dict.fromkeys(readout["factor"])) == ["cle", "pse", "awt", "kernel=smooth", "noise_hu",
                                                            "density_shift_hu", "site"]
    r2 = readout.groupby("factor")["r2"].mean()
    assert r2["cle"] > 0.8 and r2["pse"] > 0.8 and r2["awt"] < 0.15 and r2["noise_hu"] < 0.15


def test_without_truth_the_readout_file_is_header_only(tmp_path):
    cohort = make_eval_cohort(tmp_path, n_subjects=30)
    features = tmp_path / "features.tsv"
    main(["baseline", "--name", "densitometry", "--subjects", str(cohort.subjects_tsv), "--work",
          str(cohort.layout.work), "--out", str(features)])
    folds = make_folds(cohort.ok_sids, [0] * len(cohort.ok_sids), n_folds=3, repeats=1, seed=0)
    folds.to_csv(tmp_path / "folds.tsv", sep="\t", index=False)
    settings = dict(SETTINGS, outcomes={"logFEV1pp": SETTINGS["outcomes"]["logFEV1pp"]})
    assert main(["evaluate", "--features", str(features), "--folds", str(tmp_path / "folds.tsv"), "--phenotypes",
                 str(cohort.phenotypes), "--out-dir", str(tmp_path / "out"), "--settings", json.dumps(settings),
                 "--jobs", "1"]) == 0
    assert (tmp_path / "out" / "readout.tsv").read_text().strip() == "factor\trepeat\tr2"
    assert set(read(tmp_path / "out" / "metrics.tsv")["outcome"]) == {"logFEV1pp"}


def test_join_matches_rows_by_sid_and_drops_a_subject_missing_from_one_side(tmp_path, caplog):
    base = tmp_path / "densitometry.tsv"
    base.write_text("sid\tlaa950\tperc15\nA\t1.0\t-900\nB\t2.0\t-910\nC\t3.0\t-920\n")
    run = tmp_path / "features_mean.tsv"
    run.write_text("sid\tf0\tf1\nC\t30.0\t31.0\nA\t10.0\t11.0\nD\t40.0\t41.0\n")  # other order, no B, extra D
    with caplog.at_level("WARNING", logger="pipeline.evaluate"):
        sids, X = read_features([base, run], desc="evaluate densitometry+moco/mean")
    assert sids == ["A", "C"]  # the first table's order
    np.testing.assert_array_equal(X, [[1.0, -900, 10.0, 11.0], [3.0, -920, 30.0, 31.0]])
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert "evaluate densitometry+moco/mean: 2 subject(s) are not in every features table" in warning
    assert "e.g. B, not in features_mean" in warning

    # a column name in both tables is told apart by its table's name; no shared subject is an error
    tables = [pd.DataFrame({"f0": [1.0]}, index=["A"]), pd.DataFrame({"f0": [2.0], "f1": [3.0]}, index=["A"])]
    assert list(join_features(tables, ["left", "right"]).columns) == ["left:f0", "right:f0", "f1"]
    with pytest.raises(ConfigError, match="no subject is in every features table"):
        join_features([tables[0], pd.DataFrame({"f1": [1.0]}, index=["B"])], ["left", "right"])


def test_evaluate_stage_joins_repeated_features(tmp_path):
    cohort = make_eval_cohort(tmp_path, n_subjects=30)
    work = str(cohort.layout.work)
    base, pooled = tmp_path / "densitometry.tsv", tmp_path / "features_mean.tsv"
    assert main(["baseline", "--name", "densitometry", "--subjects", str(cohort.subjects_tsv), "--work", work,
                 "--out", str(base)]) == 0
    assert main(["pool", "--run", "moco", "--pooling", "mean", "--subjects", str(cohort.subjects_tsv),
                 "--work", work, "--out", str(pooled)]) == 0
    folds = make_folds(cohort.ok_sids, [0] * len(cohort.ok_sids), n_folds=3, repeats=1, seed=0)
    folds.to_csv(tmp_path / "folds.tsv", sep="\t", index=False)
    settings = dict(SETTINGS, outcomes={"logFEV1pp": SETTINGS["outcomes"]["logFEV1pp"]})
    out = tmp_path / "results" / "densitometry+moco" / "mean"
    assert main(["evaluate", "--features", str(base), "--features", str(pooled), "--folds", str(tmp_path / "folds.tsv"),
                 "--phenotypes", str(cohort.phenotypes), "--name", "densitometry+moco", "--pooling", "mean",
                 "--out-dir", str(out), "--settings", json.dumps(settings), "--jobs", "1"]) == 0
    predictions = read(out / "predictions.tsv")
    assert sorted(predictions["sid"]) == sorted(set(cohort.ok_sids) - {"S000", "S005"})  # FEV1 missing for two
    assert set(read(out / "metrics.tsv")["outcome"]) == {"logFEV1pp"}


def _signal_data(n=300, d=8, seed=0):
    """Features driven by 3 latent factors (so the signal lies in the top principal components)."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 3))
    X = latent @ rng.standard_normal((3, d)) + 0.5 * rng.standard_normal((n, d))
    sids = [f"S{i:03d}" for i in range(n)]
    regression = pd.Series(latent[:, 0] + 0.5 * latent[:, 1] + 0.5 * rng.standard_normal(n), index=sids)
    ordinal = pd.Series(np.searchsorted([-1.0, 0.0, 1.0], 1.5 * latent[:, 2] + rng.logistic(size=n)).astype(float),
                        index=sids)
    return sids, X, regression, ordinal


def test_shuffled_labels_give_no_signal_and_real_labels_do():
    sids, X, regression, ordinal = _signal_data()
    folds = make_folds(sids, ordinal.tolist(), n_folds=5, repeats=1, seed=1)
    shuffled = np.random.default_rng(9).permutation(len(sids))
    targets = {"reg": ("regression", regression), "ord": ("ordinal", ordinal),
               "reg_shuffled": ("regression", pd.Series(regression.to_numpy()[shuffled], index=sids)),
               "ord_shuffled": ("ordinal", pd.Series(ordinal.to_numpy()[shuffled], index=sids))}
    predictions = cross_validate(sids, X, folds, targets, SETTINGS)
    metrics = score(predictions, {k: kind for k, (kind, _) in targets.items()}).set_index(["outcome", "metric"])
    majority = ordinal.value_counts(normalize=True).max()
    assert metrics.loc[("reg_shuffled", "r2"), "value"] <= 0.05
    assert metrics.loc[("ord_shuffled", "acc"), "value"] <= majority + 0.05
    assert metrics.loc[("reg", "r2"), "value"] > 0.6  # the same code finds the real signal
    assert metrics.loc[("ord", "acc"), "value"] > majority + 0.1
    # deterministic, also when the fits run in two worker processes
    again = cross_validate(sids, X, folds, {"ord": targets["ord"], "reg": targets["reg"]}, SETTINGS, n_jobs=2)
    expected = predictions[predictions["outcome"].isin(["ord", "reg"])]
    pd.testing.assert_frame_equal(again.sort_values(["outcome", "sid"]).reset_index(drop=True),
                                  expected.sort_values(["outcome", "sid"]).reset_index(drop=True))


def test_heads_never_see_the_test_rows(monkeypatch):
    """Every scaler and PCA fitted inside the heads misses a whole outer test fold; a scaler fitted on
    all rows before cross-validation (the classic leak) would not, and is caught by the same check."""
    sids, X, regression, ordinal = _signal_data(n=120, d=6)
    ids = np.arange(len(sids), dtype=float)
    X = np.column_stack([ids * 1e-3, X])  # column 0 identifies the row (tiny scale: no signal)
    seen: list[set[int]] = []

    class SpyScaler(StandardScaler):
        def fit(self, X, y=None, sample_weight=None):
            seen.append(set(np.rint(np.asarray(X)[:, 0] * 1e3).astype(int)))
            return super().fit(X, y, sample_weight)

    monkeypatch.setattr("models.heads.StandardScaler", SpyScaler)
    folds = make_folds(sids, ordinal.tolist(), n_folds=4, repeats=1, seed=2)
    test_sets = [set(np.flatnonzero(folds["fold"].to_numpy() == f)) for f in range(4)]

    def leak_free(rows: set[int]) -> bool:
        return any(not rows & test for test in test_sets)

    cross_validate(sids, X, folds, {"reg": ("regression", regression), "ord": ("ordinal", ordinal)}, SETTINGS)
    assert len(seen) > 8 and all(leak_free(rows) for rows in seen)

    seen.clear()
    SpyScaler().fit(X)  # scaling the whole cohort first
    assert not leak_free(seen[0])


class ExactSpy:
    """A head whose prediction is the number of test rows it was trained on (must be 0)."""

    def fit(self, X, y):
        self.train_ids_ = set(np.rint(X[:, 0]).astype(int))
        return self

    def predict(self, X):
        overlap = len(self.train_ids_ & set(np.rint(X[:, 0]).astype(int)))
        return np.full(X.shape[0], float(overlap))


def test_training_rows_are_exactly_the_other_folds():
    sids, X, regression, _ = _signal_data(n=60, d=2)
    X = np.column_stack([np.arange(60, dtype=float), X])
    regression.iloc[[4, 9]] = np.nan  # missing outcome: never in training nor test
    folds = make_folds(sids, [0] * 60, n_folds=3, repeats=1, seed=0)
    predictions = cross_validate(sids, X, folds, {"reg": ("regression", regression)}, SETTINGS,
                                 head_factory=lambda kind: ExactSpy())
    assert (predictions["predicted"] == 0).all()
    assert sorted(predictions["sid"]) == sorted(set(sids) - {sids[4], sids[9]})


def test_bad_outcome_values_name_the_subject(tmp_path):
    table = pd.DataFrame({"FEV1pp_utah": [80.0, 0.0, np.nan], "Emph_Severity": [1.0, 2.5, 7.0],
                          "MMRCDyspneaScor": [1, 2, 9], "word": ["1", "x", "2"]},
                         index=pd.Index(["A", "B", "C"], name="sid"))
    log_outcome = Outcome("logFEV1pp", "FEV1pp_utah", "regression", "log")
    with pytest.raises(SubjectError, match="subject B \\[evaluate\\]: FEV1pp_utah = 0 cannot be log-transformed"):
        outcome_values(table, log_outcome, ["A", "B", "C"])
    values = outcome_values(table, log_outcome, ["A", "C"])
    assert values["A"] == pytest.approx(np.log(80.0)) and np.isnan(values["C"])
    with pytest.raises(SubjectError, match="subject B .*Emph_Severity = 2.5 is not an integer in 0..5"):
        outcome_values(table, Outcome("CLE", "Emph_Severity", "ordinal", levels=6), ["A", "B"])
    with pytest.raises(SubjectError, match="subject C .*MMRCDyspneaScor = 9 is not an integer in 0..4"):
        outcome_values(table, Outcome("mMRC", "MMRCDyspneaScor", "ordinal", levels=5), ["A", "C"])
    with pytest.raises(SubjectError, match="subject B .*word = 'x' is not a number"):
        outcome_values(table, Outcome("w", "word", "regression"), ["A", "B"])
    with pytest.raises(ConfigError, match="evaluate.outcomes.gold.column"):
        outcome_values(table, Outcome("gold", "finalGold", "ordinal"), ["A"])
    with pytest.raises(ValueError, match="'binary'"):
        Outcome("x", "y", "binary")
    with pytest.raises(ValueError, match="levels"):
        Outcome("x", "y", "ordinal", levels=1)

    features = tmp_path / "f.tsv"
    features.write_text("sid\tf0\tf1\nA\t1.0\t2.0\nB\t3.0\tNA\n")
    with pytest.raises(SubjectError, match="subject B \\[evaluate\\]: feature f1 is missing"):
        read_features(features)


def test_readout_factors_skip_partial_and_code_the_kernel():
    import pandas as pd

    from pipeline.evaluate import readout_factors

    truth = pd.DataFrame({"awt": [1.0, 1.2, 0.8], "cle": [0.1, 0.0, 0.2], "padding_hu": [None, -2048, None],
                          "kernel": ["sharp", "smooth", "sharp"], "format": ["nifti", "dicom", "nifti"],
                          "scale": [1.0, 1.0, 1.0]}, index=["A", "B", "C"])
    table = readout_factors(truth)
    assert list(table.columns) == ["cle", "awt", "kernel=smooth"]
    assert table["kernel=smooth"].tolist() == [0.0, 1.0, 0.0]
