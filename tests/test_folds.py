"""Cross-validation folds: stratified, seeded, every ok subject once per repeat, odd strata handled."""

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.errors import ConfigError, SubjectError
from pipeline.folds import make_folds, merge_small_strata, read_table
from pipeline.status import passed_subjects
from tests.eval_fixtures import eval_config, make_eval_cohort


def test_folds_are_stratified_complete_and_seeded():
    rng = np.random.default_rng(0)
    sids = [f"S{i:03d}" for i in range(103)]
    strata = rng.choice([0, 1, 2, 3], size=103, p=[0.5, 0.25, 0.15, 0.1]).tolist()
    folds = make_folds(sids, strata, n_folds=5, repeats=3, seed=11)
    assert list(folds.columns) == ["sid", "repeat", "fold"]
    for repeat, split in folds.groupby("repeat"):
        assert sorted(split["sid"]) == sids  # every subject exactly once per repeat
        sizes = split["fold"].value_counts()
        assert sorted(sizes.index) == [0, 1, 2, 3, 4] and sizes.max() - sizes.min() <= 1
        table = pd.crosstab(np.asarray(strata), split["fold"].to_numpy())
        assert (table.max(axis=1) - table.min(axis=1)).max() <= 1  # each stratum spread evenly
    again = make_folds(sids, strata, n_folds=5, repeats=3, seed=11)
    pd.testing.assert_frame_equal(folds, again)
    other = make_folds(sids, strata, n_folds=5, repeats=3, seed=12)
    assert not folds["fold"].equals(other["fold"])
    by_repeat = folds.pivot(index="sid", columns="repeat", values="fold")
    assert not by_repeat[0].equals(by_repeat[1])  # repeats are different splits


def test_small_and_missing_strata_are_merged_with_neighbours():
    values = [0] * 10 + [1] * 2 + [2] * 10 + [3] * 12 + [None] * 1
    codes = merge_small_strata(values, min_count=3)
    code = dict(zip(["0", "1", "2", "3", "missing"], [codes[0], codes[10], codes[12], codes[22], codes[34]]))
    # stratum 1 (2 members) joins its smaller neighbour (0 and 2 tie: the lower one); missing (1) joins 3
    assert code["1"] == code["0"] and code["missing"] == code["3"]
    assert len({code["0"], code["2"], code["3"]}) == 3
    # a large missing stratum stays its own stratum; NaN, None and "" all count as missing
    values = [0.0] * 5 + [float("nan")] * 2 + [None] * 2 + [""] * 2 + [1.0] * 5
    codes = merge_small_strata(values, min_count=3)
    assert len(set(codes[5:11])) == 1 and len(set(codes)) == 3
    # text strata sort as text
    assert len(set(merge_small_strata(["sharp"] * 4 + ["smooth"] * 4, 3))) == 2


def test_folds_with_missing_strata_do_not_fail():
    sids = [f"S{i}" for i in range(20)]
    strata = [None] * 3 + [0] * 15 + [5] * 2  # tiny rare stratum, a few missing values
    folds = make_folds(sids, strata, n_folds=5, repeats=1, seed=0)
    assert folds["fold"].value_counts().tolist() == [4] * 5


def test_make_folds_rejects_bad_values():
    with pytest.raises(ValueError, match="n_folds"):
        make_folds(["a", "b"], [0, 1], n_folds=1, repeats=1, seed=0)
    with pytest.raises(ValueError, match="repeats"):
        make_folds(["a", "b"], [0, 1], n_folds=2, repeats=0, seed=0)
    with pytest.raises(ConfigError, match="only 2 passed QC"):
        make_folds(["a", "b"], [0, 1], n_folds=3, repeats=1, seed=0)
    with pytest.raises(SubjectError, match="subject a"):
        make_folds(["a", "a", "b"], [0, 1, 1], n_folds=2, repeats=1, seed=0)


def test_folds_stage_uses_only_subjects_that_passed_qc(tmp_path):
    cohort = make_eval_cohort(tmp_path, n_subjects=30)
    out = tmp_path / "work" / "folds.tsv"
    settings = eval_config()["evaluate"]

    rc = main(["folds", "--subjects", str(cohort.subjects_tsv), "--work", str(cohort.layout.work),
               "--phenotypes", str(cohort.phenotypes), "--out", str(out), "--settings", json.dumps(settings)])
    assert rc == 0
    folds = pd.read_csv(out, sep="\t", dtype={"sid": str})
    assert set(folds["sid"]) == set(cohort.ok_sids) and not set(cohort.failed) & set(folds["sid"])
    assert len(folds) == len(cohort.ok_sids) * settings["repeats"]
    assert sorted(folds["fold"].unique()) == list(range(settings["n_folds"]))

    # a stratify column that is not in the phenotypes is a one-line config error
    bad = dict(settings, stratify="Emph_Nonexistent")
    assert main(["folds", "--subjects", str(cohort.subjects_tsv), "--work", str(cohort.layout.work),
                 "--phenotypes", str(cohort.phenotypes), "--out", str(out), "--settings", json.dumps(bad)]) == 1

    # a subject without a patches status: the stage has not run for it
    cohort.layout.status("patches", cohort.sids[0]).unlink()
    with pytest.raises(SubjectError, match=f"subject {cohort.sids[0]} .*no patches status"):
        passed_subjects(cohort.layout, cohort.sids, "patches")


def test_read_table_keeps_sids_as_text_and_reports_duplicates(tmp_path):
    path = tmp_path / "p.tsv"
    path.write_text("sid\tx\ty\nNA\t1\tfoo\n007\t.\t2\n")
    table = read_table(path, "phenotypes")
    assert list(table.index) == ["NA", "007"]
    assert table["x"].dtype.kind == "f" and np.isnan(table.at["007", "x"])
    assert table["y"].dtype.kind not in "fiu"  # a word in the column: left as text for the user to see
    path.write_text("sid\tx\nA\t1\nA\t2\n")
    with pytest.raises(SubjectError, match="subject A: appears more than once"):
        read_table(path, "phenotypes")
