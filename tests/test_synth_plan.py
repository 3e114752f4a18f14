"""The cohort plan: identities, independence of subjects, settings, phenotypes and the oracle."""

import math
import sys

import numpy as np
import pytest

from pipeline.synth.plan import (PHENOTYPE_COLUMNS, PRESETS, make_sid, phenotype_table, plan_cohort, sid_index,
                                 subjects_table, truth_table)
from tests.synth_fixtures import small_settings


@pytest.fixture(scope="module")
def big_plan():
    # plan only (no volumes): cheap enough for population statistics
    return plan_cohort({"n_subjects": 2000, "seed": 11})


def test_sids_are_one_based_zero_padded_and_invertible():
    assert [make_sid(i) for i in (1, 2, 999, 12345)] == ["SYN0001", "SYN0002", "SYN0999", "SYN12345"]
    assert sid_index("SYN0042") == 42
    for bad in ("SYN42", "SYN00042", "XYZ0001", "SYN00a1"):
        with pytest.raises(ValueError, match="synthetic subject ID"):
            sid_index(bad)
    plans = plan_cohort(small_settings(n_subjects=3))
    assert [p.sid for p in plans] == ["SYN0001", "SYN0002", "SYN0003"]
    assert [p.image for p in plans] == [f"images/{p.sid}" if p.format == "dicom" else f"images/{p.sid}.nii.gz"
                                        for p in plans]
    assert all(p.label == f"labels/{p.sid}.nii.gz" for p in plans)


def test_subject_does_not_depend_on_cohort_size_and_seed_matters():
    few = plan_cohort(small_settings(n_subjects=3))
    many = plan_cohort(small_settings(n_subjects=40))
    # repr is exact for floats and, unlike ==, treats the NaNs of missing phenotypes as equal
    assert repr(few) == repr(many[:3])
    again = plan_cohort(small_settings(n_subjects=3))
    assert repr(again) == repr(few)
    other = plan_cohort(small_settings(n_subjects=3, seed=8))
    assert all(a.cle != b.cle and a.pose != b.pose for a, b in zip(few, other))


def test_plan_import_is_light_and_fast():
    import subprocess
    import textwrap

    code = textwrap.dedent("""
        import sys, time
        import pipeline.synth.plan as plan
        heavy = [m for m in ("torch", "pandas", "scipy", "nibabel", "pydicom", "matplotlib") if m in sys.modules]
        t = time.perf_counter(); plan.plan_cohort({"n_subjects": 10000, "seed": 1}); dt = time.perf_counter() - t
        print(heavy, dt)
    """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "[]", f"pipeline.synth.plan imported heavy modules: {out}"
    assert float(out[-1]) < 10.0  # ~1 s on a loaded 2-core machine; the Snakefile plans at parse time


def test_formats_and_reorientation_follow_the_fractions(big_plan):
    dicom = np.mean([p.format == "dicom" for p in big_plan])
    assert abs(dicom - 0.25) < 0.04
    nifti = [p for p in big_plan if p.format == "nifti"]
    reoriented = np.mean([p.reoriented for p in nifti])
    assert abs(reoriented - 0.25) < 0.04
    assert all(not p.reoriented for p in big_plan if p.format == "dicom")
    assert all(p.orientation == "LPS" for p in nifti if not p.reoriented)
    assert len({p.orientation for p in nifti if p.reoriented}) > 10
    none = plan_cohort(small_settings(n_subjects=50, dicom_fraction=0.0, reoriented_fraction=0.0))
    assert all(p.format == "nifti" and not p.reoriented for p in none)


def test_resolution_presets_and_overrides():
    demo = plan_cohort({"n_subjects": 30, "seed": 3})
    for p in demo:
        nz, ny, nx = p.grid.shape_zyx
        assert (ny, nx) == (192, 192) and p.grid.spacing_zyx[0] == PRESETS["demo"]["spacing_z"]
        assert 1.5 < p.grid.spacing_zyx[2] < 2.3 and 120 < nz < 200
        # the lungs (height * scale) fit in the scanned range with margin
        assert nz * p.grid.spacing_zyx[0] > p.anatomy.lung_height * p.pose.scale + 40
    full = plan_cohort({"n_subjects": 5, "seed": 3, "resolution": "full"})
    for p in full:
        nz, ny, nx = p.grid.shape_zyx
        assert (ny, nx) == (512, 512) and p.grid.spacing_zyx[0] == 0.6 and 450 < nz < 650
        assert 0.55 < p.grid.spacing_zyx[2] < 0.85
    fixed = plan_cohort(small_settings(n_subjects=3, spacing_mm=[1.0, 1.5, 2.5], shape=[64, 48, 32]))
    assert all(p.grid.shape_zyx == (32, 48, 64) and p.grid.spacing_zyx == (2.5, 1.5, 1.0) for p in fixed)
    spaced = plan_cohort(small_settings(n_subjects=3, spacing_mm=[2.0, 2.0, 2.0], shape=None))
    for p in spaced:
        assert p.grid.spacing_zyx == (2.0, 2.0, 2.0)
        assert p.grid.shape_zyx[0] * 2.0 >= p.anatomy.lung_height * p.pose.scale + 80 - 2.0


@pytest.mark.parametrize("key, value, message", [
    ("n_subjects", 0, "n_subjects"), ("seed", -1, "seed"), ("resolution", "huge", "resolution"),
    ("dicom_fraction", 1.5, "dicom_fraction"), ("spacing_mm", [1.0, 0.0, 1.0], "spacing_mm"),
    ("shape", [96, 96, 8], "shape"),
])
def test_bad_settings_are_rejected_naming_the_key(key, value, message):
    with pytest.raises(ValueError, match=message):
        plan_cohort(small_settings(**{key: value}))


def test_phenotype_columns_types_and_ranges(big_plan):
    rows = phenotype_table(big_plan)
    assert all(tuple(r) == PHENOTYPE_COLUMNS for r in rows)
    col = {c: np.array([r[c] for r in rows], dtype=object) for c in PHENOTYPE_COLUMNS}
    fev1 = col["FEV1pp_utah"].astype(float)
    ratio = col["FEV1_FVC_utah"].astype(float)
    assert 12 <= fev1.min() and fev1.max() <= 140 and 60 < fev1.mean() < 95
    assert 0.25 <= ratio.min() and ratio.max() <= 0.92          # a fraction, not a percentage
    assert set(col["Emph_Severity"]) <= set(range(6)) and len(set(col["Emph_Severity"])) == 6
    paraseptal = col["Emph_Paraseptal"].astype(float)
    assert set(paraseptal[~np.isnan(paraseptal)]) == {0.0, 1.0, 2.0}
    mmrc = col["MMRCDyspneaScor"].astype(float)
    assert set(mmrc[~np.isnan(mmrc)]) == {0.0, 1.0, 2.0, 3.0, 4.0}
    assert not np.signbit(mmrc[~np.isnan(mmrc)]).any()              # no "-0" in the table
    assert 0.01 < np.isnan(mmrc).mean() < 0.035                  # ~2 % missing, by design
    assert 0.0 < np.isnan(paraseptal).mean() < 0.025
    assert set(col["finalGold"]) == {-1, 0, 1, 2, 3, 4}
    assert set(col["gender"]) == {1, 2}
    age = col["age"].astype(float)
    assert 45 <= age.min() and age.max() <= 80
    assert col["ATS_PackYears"].astype(float).min() >= 10       # COPDGene inclusion: >= 10 pack-years
    assert set(col["ccenter"]) == {"SITE1", "SITE2", "SITE3", "SITE4", "SITE5"}
    assert set(col["kernel"]) == {"smooth", "sharp"}
    assert all(isinstance(v, int) for v in col["Emph_Severity"]) and all(isinstance(v, int) for v in col["finalGold"])


def test_gold_stage_follows_the_gold_rules(big_plan):
    for p in big_plan:
        if p.FEV1_FVC_utah < 0.7:
            expected = 1 if p.FEV1pp_utah >= 80 else 2 if p.FEV1pp_utah >= 50 else 3 if p.FEV1pp_utah >= 30 else 4
        else:
            expected = -1 if p.FEV1pp_utah < 80 else 0
        assert p.finalGold == expected, p.sid


def test_latent_factors_look_like_a_smoking_cohort(big_plan):
    cle = np.array([p.cle for p in big_plan])
    pse = np.array([p.pse for p in big_plan])
    awt = np.array([p.awt for p in big_plan])
    assert np.median(cle) < 0.04 and np.mean(cle < 0.01) > 0.25    # many near zero ...
    assert np.quantile(cle, 0.99) > 0.2 and cle.max() < 0.6        # ... and a long tail
    assert 0 <= pse.min() and pse.max() < 0.3 and np.median(pse) < np.median(cle)
    assert 0.5 <= awt.min() and awt.max() <= 1.8 and 0.12 < awt.std() < 0.25
    # mildly correlated, not collinear
    assert 0.1 < np.corrcoef(cle, pse)[0, 1] < 0.6 and abs(np.corrcoef(pse, awt)[0, 1]) < 0.15


def test_emphysema_scores_track_the_factors(big_plan):
    cle = np.array([p.cle for p in big_plan])
    severity = np.array([p.Emph_Severity for p in big_plan])
    means = [cle[severity == s].mean() for s in range(6)]
    assert all(a < b for a, b in zip(means, means[1:]))
    pse = np.array([p.pse for p in big_plan])
    para = np.array([p.Emph_Paraseptal for p in big_plan])
    assert pse[para == 0].mean() < pse[para == 1].mean() < pse[para == 2].mean()


def test_oracle_r2_of_log_fev1_is_between_0_6_and_0_8_and_awt_matters(big_plan):
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import r2_score
    from sklearn.model_selection import KFold, cross_val_predict

    x = np.array([[p.cle, p.pse, p.awt] for p in big_plan])
    y = np.log(np.array([p.FEV1pp_utah for p in big_plan]))
    folds = KFold(5, shuffle=True, random_state=0)
    r2 = r2_score(y, cross_val_predict(LinearRegression(), x, y, cv=folds))
    assert 0.6 <= r2 <= 0.8
    # densitometry sees cle and pse only: without awt the oracle loses a real share
    r2_no_awt = r2_score(y, cross_val_predict(LinearRegression(), x[:, :2], y, cv=folds))
    assert r2 - r2_no_awt > 0.1
    # and mMRC responds to awt beyond what FEV1 explains
    mmrc = np.array([p.MMRCDyspneaScor for p in big_plan])
    ok = ~np.isnan(mmrc)
    design = np.column_stack([np.ones(ok.sum()), -y[ok], x[ok, 2]])
    coef = np.linalg.lstsq(design, mmrc[ok], rcond=None)[0]
    assert coef[1] > 1.0 and coef[2] > 0.5


def test_truth_and_subject_tables():
    plans = plan_cohort(small_settings(n_subjects=5, dicom_fraction=0.5))
    truth = truth_table(plans)
    for key in ("sid", "cle", "pse", "awt", "kernel", "noise_hu", "density_shift_hu", "site", "scale",
                "rot_x_deg", "rot_y_deg", "rot_z_deg", "shift_x_mm", "shift_y_mm", "shift_z_mm"):
        assert key in truth[0]
    assert [r["sid"] for r in truth] == [p.sid for p in plans]
    assert all(abs(r["rot_z_deg"]) <= 6 and 0.92 <= r["scale"] <= 1.08 for r in truth)
    for r in truth:
        padding = r["padding_hu"]
        assert (r["site"] in ("SITE3", "SITE5")) == (not math.isnan(padding))
    assert subjects_table(plans) == [{"sid": p.sid, "image": p.image, "format": p.format} for p in plans]
