"""The hand-crafted baselines: patch statistics and densitometry + airway statistics (hand-computed on
tiny arrays), the single definition of baseline names, and the naming of combined feature sets.

The densitometry and oracle baselines are tested in test_pool.py; the high-attenuation measures
themselves in test_densitometry.py.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.baselines import (AIRWAY_KEYS, BASELINE_POOLING, BASELINES, DENSITOMETRY_KEYS, PATCHSTATS_KEYS,
                                airway_features, combined_name, patch_statistics, patchstats_features,
                                split_combined)
from pipeline.cli import main
from pipeline.config import load_schema, validate_config
from pipeline.densitometry import HIGH_ATTENUATION_KEYS
from pipeline.errors import ConfigError, SubjectError
from pipeline.files import write_json, write_npy
from tests.eval_fixtures import make_eval_cohort

# Two 2x2x2 patches (8 voxels each), by hand:
#   patch 0: -1000 -960 -950 -930 -920 -900 -800 -700
#            mean -7160/8 = -895; < -950: 2/8 = 25 %; < -910: 5/8 = 62.5 % (-950 itself is not < -950);
#            15th percentile = the ceil(0.15 * 8) = 2nd smallest = -960;
#            sd = sqrt(mean of squared deviations) = sqrt((105² + 65² + 55² + 35² + 25² + 5² + 95² + 195²) / 8)
#               = sqrt(67200 / 8)
#   patch 1: all -850: mean -850, 0 %, 0 %, -850, sd 0
PATCH0 = [-1000, -960, -950, -930, -920, -900, -800, -700]
SQUARED_DEVIATIONS0 = sum((v + 895) ** 2 for v in PATCH0)  # 67200


def tiny_patches() -> np.ndarray:
    return np.array([PATCH0, [-850] * 8], dtype=np.int16).reshape(2, 2, 2, 2)


def test_patch_statistics_by_hand():
    assert SQUARED_DEVIATIONS0 == 67200
    expected = [(-895 - 850) / 2, (25.0 + 0.0) / 2, (62.5 + 0.0) / 2, (-960 - 850) / 2,
                (np.sqrt(67200 / 8) + 0.0) / 2]
    np.testing.assert_allclose(patch_statistics(tiny_patches()), expected, rtol=1e-12)
    # read in chunks of one location: the same numbers
    np.testing.assert_allclose(patch_statistics(tiny_patches(), chunk=1), expected, rtol=1e-12)


def test_patch_statistics_do_not_assume_the_clip_range():
    patches = np.array([[-3000, -2000, 1500, 3000] * 2, [-1024] * 8], dtype=np.int16).reshape(2, 2, 2, 2)
    stats = patch_statistics(patches)
    assert stats[0] == pytest.approx((-125 - 1024) / 2)  # patch 0 mean: (-3000 - 2000 + 1500 + 3000) / 4
    assert stats[1] == pytest.approx((50.0 + 100.0) / 2) and stats[3] == pytest.approx((-3000 - 1024) / 2)


def test_patch_statistics_match_numpy_on_random_patches():
    rng = np.random.default_rng(1)
    patches = rng.normal(-800, 150, size=(7, 5, 5, 5)).round().astype(np.int16)
    flat = patches.reshape(7, -1).astype(np.float64)
    expected = [flat.mean(), 100 * (flat < -950).mean(), 100 * (flat < -910).mean(),
                np.percentile(flat, 15, axis=1, method="inverted_cdf").mean(), flat.std(axis=1).mean()]
    np.testing.assert_allclose(patch_statistics(patches, chunk=3), expected, rtol=1e-10)


def test_patch_statistics_reject_bad_arrays():
    with pytest.raises(ValueError, match="non-empty"):
        patch_statistics(np.zeros((0, 2, 2, 2), np.int16))
    with pytest.raises(ValueError, match="integer HU"):
        patch_statistics(np.zeros((1, 2, 2, 2), np.float32))


def _high_attenuation(z: float) -> dict[str, float]:
    return dict(zip(HIGH_ATTENUATION_KEYS, [10.0 + z, 5.0, 3.0, 1.0, 0.5, -700.0, -650.0, -500.0, -100.0, -840.0]))


def test_patchstats_and_airway_stage(tmp_path):
    cohort = make_eval_cohort(tmp_path, n_subjects=6, failed={3: "failed QC"})
    layout = cohort.layout
    for i, sid in enumerate(cohort.sids):
        write_npy(layout.patches(sid), tiny_patches() + np.int16(i))  # memory-mapped by the stage
        density = json.loads(layout.density(sid).read_text())
        write_json(layout.density(sid), {**density, "high_attenuation": _high_attenuation(float(i))})

    out = tmp_path / "patchstats.tsv"
    assert main(["baseline", "--name", "patchstats", "--subjects", str(cohort.subjects_tsv), "--work",
                 str(layout.work), "--out", str(out)]) == 0
    table = pd.read_csv(out, sep="\t", dtype={"sid": str}).set_index("sid")
    assert list(table.index) == cohort.ok_sids and tuple(table.columns) == PATCHSTATS_KEYS
    # S002: every voxel + 2 HU -> the mean and the 15th percentile move by 2 and the sd does not
    s2 = table.loc["S002"]
    assert s2["patch_mean_hu"] == pytest.approx((-895 - 850) / 2 + 2) and s2["patch_perc15"] == pytest.approx(-903)
    assert s2["patch_sd_hu"] == pytest.approx(np.sqrt(67200 / 8) / 2)

    out = tmp_path / "airway.tsv"
    assert main(["baseline", "--name", "airway", "--subjects", str(cohort.subjects_tsv), "--work",
                 str(layout.work), "--out", str(out)]) == 0
    table = pd.read_csv(out, sep="\t", dtype={"sid": str}).set_index("sid")
    assert list(table.index) == cohort.ok_sids and tuple(table.columns) == AIRWAY_KEYS
    assert AIRWAY_KEYS[:len(DENSITOMETRY_KEYS)] == DENSITOMETRY_KEYS  # densitometry + airway statistics
    density = json.loads(layout.density("S004").read_text())
    expected = {**{k: density["total"][k] for k in DENSITOMETRY_KEYS}, **_high_attenuation(4.0)}
    assert table.loc["S004"].to_dict() == pytest.approx(expected, rel=1e-5)  # TSVs keep 6-7 digits


def test_airway_baseline_needs_the_high_attenuation_section(tmp_path):
    cohort = make_eval_cohort(tmp_path, n_subjects=3, failed={})  # densitometry JSONs of an older lung stage
    with pytest.raises(SubjectError, match="subject S000 \\[baseline\\]: densitometry JSON has no 'high_attenuation' "
                                           "section .*rerun the lung stage"):
        airway_features(cohort.layout, cohort.ok_sids)
    density = json.loads(cohort.layout.density("S000").read_text())
    write_json(cohort.layout.density("S000"), {**density, "high_attenuation": {**_high_attenuation(0), "perc99": None}})
    with pytest.raises(SubjectError, match="densitometry value high_attenuation.perc99 is None"):
        airway_features(cohort.layout, cohort.ok_sids[:1])


def test_patchstats_names_a_missing_patches_file(tmp_path):
    cohort = make_eval_cohort(tmp_path, n_subjects=2, failed={})
    with pytest.raises(SubjectError, match="subject S000 \\[baseline\\]: patches file .* is missing"):
        patchstats_features(cohort.layout, cohort.ok_sids)


def test_baseline_names_are_defined_once():
    schema = load_schema()["properties"]["evaluate"]["properties"]
    assert schema["baselines"]["items"]["enum"] == list(BASELINES)
    assert schema["combine_with"]["items"]["enum"] == list(BASELINES)
    assert schema["baselines"]["default"] == ["densitometry", "patchstats", "airway", "oracle"]
    assert schema["combine_with"]["default"] == ["densitometry"]
    assert dict(BASELINE_POOLING) == {"densitometry": "lung", "patchstats": "patches", "airway": "lung",
                                      "oracle": "truth"}
    for name in BASELINES:  # a run named like a baseline would share its results directory
        with pytest.raises(ConfigError, match=f"runs.{name}"):
            validate_config({"runs": {name: {}}})


def test_combined_names_split_back_and_cannot_clash_with_runs():
    assert combined_name("densitometry", "ifm_e0.5") == "densitometry+ifm_e0.5"
    assert split_combined("densitometry+ifm_e0.5") == ("densitometry", "ifm_e0.5")
    for name in ("ifm_e0.5", "densitometry", "unknown+moco", "densitometry+"):
        assert split_combined(name) is None
    with pytest.raises(ValueError, match="unknown baseline"):
        combined_name("pca", "moco")
    with pytest.raises(ConfigError, match="runs"):  # the run-name pattern keeps '+' out of run names
        validate_config({"runs": {"a+b": {}}})
