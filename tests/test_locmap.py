"""Per-location read-out map (stage ``locmap``): the signal's location is found, tombstones are
skipped, the TSV has its contract's columns, the config key resolves, and the report draws it."""

import json

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import main
from pipeline.config import location_map_runs, validate_config
from pipeline.errors import ConfigError, SubjectError
from pipeline.files import write_npy, write_tsv
from pipeline.folds import make_folds
from pipeline.locmap import COLUMNS, location_features, location_map
from pipeline.report import build_report
from pipeline.report.figures import figure_names, location_map_slices, png
from pipeline.report.figures import location_map as location_map_figure
from tests.eval_fixtures import eval_config, make_eval_cohort

SETTINGS = eval_config()["evaluate"]  # inner_folds 3, ridge alphas 0.01 ... 1000


def synthetic_embeddings(tmp_path, n=60, P=6, D=5, signal=None, seed=0):
    """Embeddings ``[P, D]`` of ``n`` subjects: location ``signal[t]`` carries target ``t`` linearly in
    its first feature (plus a little noise), every other location is noise."""
    signal = signal or {"cle": 2, "awt": 4}
    rng = np.random.default_rng(seed)
    sids = [f"S{i:03d}" for i in range(n)]
    targets = {t: pd.Series(rng.standard_normal(n), index=sids) for t in signal}
    paths = {}
    for i, sid in enumerate(sids):
        embedding = rng.standard_normal((P, D)).astype(np.float32)
        for t, p in signal.items():
            embedding[p, 0] = targets[t].iloc[i] + 0.1 * rng.standard_normal()
        paths[sid] = tmp_path / "emb" / f"{sid}.npy"
        write_npy(paths[sid], embedding)
    folds = make_folds(sids, [0] * n, n_folds=5, repeats=2, seed=0)
    return sids, paths, folds, targets


def test_the_location_that_carries_a_target_has_high_r2_and_the_others_none(tmp_path):
    sids, paths, folds, targets = synthetic_embeddings(tmp_path)
    table = location_map(paths, folds, targets, SETTINGS, num_locations=6)
    assert list(table.columns) == list(COLUMNS)
    assert len(table) == 6 * 2 and (table["n"] == len(sids)).all()  # repeat 0 only: every subject once
    r2 = table.pivot(index="location", columns="target", values="r2")
    assert r2.loc[2, "cle"] > 0.9 and r2.loc[4, "awt"] > 0.9
    assert (r2["cle"].drop(2) < 0.15).all() and (r2["awt"].drop(4) < 0.15).all(), r2
    assert r2.drop([2, 4])["cle"].mean() < 0.05  # noise locations: near or below 0
    assert list(table["target"].unique()) == ["cle", "awt"]  # targets in the given order


def test_streaming_in_small_blocks_reads_the_same_rows(tmp_path):
    sids, paths, folds, targets = synthetic_embeddings(tmp_path, n=20, P=7, D=3)
    block = 2 * 20 * 3 * 4 / 2**20  # two locations per block, the last block holds one
    streamed = list(location_features(paths, sids, 7, 3, block_mb=block))
    assert [p for p, _ in streamed] == list(range(7))
    for p, X in streamed[-3:]:
        np.testing.assert_array_equal(X, np.stack([np.load(paths[s])[p] for s in sids]))
    small = location_map(paths, folds, targets, SETTINGS, block_mb=block)
    pd.testing.assert_frame_equal(small, location_map(paths, folds, targets, SETTINGS))


def test_tombstones_are_skipped_and_a_missing_embedding_is_an_error(tmp_path):
    sids, paths, folds, targets = synthetic_embeddings(tmp_path, n=30, P=3, D=4, signal={"cle": 1})
    paths[sids[5]].write_bytes(b"")  # embed failed for this subject
    table = location_map(paths, folds, targets, SETTINGS, num_locations=3)
    assert (table["n"] == len(sids) - 1).all()
    targets["cle"].iloc[7] = np.nan  # a missing value leaves the subject out of that target only
    assert (location_map(paths, folds, targets, SETTINGS)["n"] == len(sids) - 2).all()
    with pytest.raises(SubjectError, match="3 rows but the grid has 4"):
        location_map(paths, folds, targets, SETTINGS, num_locations=4)
    paths[sids[9]].unlink()
    with pytest.raises(SubjectError, match="missing; run the embed stage"):
        location_map(paths, folds, targets, SETTINGS)


def test_cli_writes_the_contract_columns_with_and_without_truth(tmp_path):
    cohort = make_eval_cohort(tmp_path, n_subjects=30, tombstone={"moco": 4})
    settings = json.dumps(SETTINGS)
    folds = tmp_path / "folds.tsv"
    work = str(cohort.layout.work)
    assert main(["folds", "--subjects", str(cohort.subjects_tsv), "--work", work, "--phenotypes",
                 str(cohort.phenotypes), "--out", str(folds), "--settings", settings]) == 0
    out = cohort.layout.location_map("moco")
    common = ["locmap", "--run", "moco", "--work", work, "--folds", str(folds), "--phenotypes", str(cohort.phenotypes),
              "--settings", settings]
    assert main([*common, "--truth", str(cohort.truth), "--out", str(out)]) == 0
    table = pd.read_csv(out, sep="\t")
    assert list(table.columns) == ["location", "target", "r2", "n"]
    P = 12  # the fixture's lattice
    assert list(table["target"].unique()) == ["cle", "pse", "awt"] and len(table) == 3 * P
    assert sorted(table["location"].unique()) == list(range(P))
    assert (table["n"] == len(cohort.ok_sids) - 1).all()  # the tombstoned subject is left out
    # every location of the moco run carries cle and pse (the fixture mixes them into every patch), not awt
    means = table.groupby("target")["r2"].mean()
    assert means["cle"] > 0.5 and means["pse"] > 0.5 and means["awt"] < 0.2, means

    real = tmp_path / "real.tsv"
    assert main([*common, "--out", str(real)]) == 0  # no truth: the regression outcomes
    table = pd.read_csv(real, sep="\t")
    assert list(table["target"].unique()) == ["logFEV1pp", "logFEV1FVC"]
    n = table.groupby("target")["n"].unique()
    assert list(n["logFEV1pp"]) == [len(cohort.ok_sids) - 3]  # two subjects lack FEV1, one is a tombstone
    assert list(n["logFEV1FVC"]) == [len(cohort.ok_sids) - 1]


def test_location_map_runs_key():
    runs = {"random_init": {"epochs": 0}, "moco": {}, "ifm_e0.1": {"loss": {"method": "ifm", "epsilon": 0.1}}}
    assert location_map_runs(validate_config({"runs": runs})) == ["moco", "ifm_e0.1"]  # default: runs that train
    chosen = validate_config({"runs": runs, "report": {"location_map_runs": ["ifm_e0.1", "random_init"]}})
    assert location_map_runs(chosen) == ["random_init", "ifm_e0.1"]  # config order
    assert location_map_runs(validate_config({"runs": runs, "report": {"location_map_runs": []}})) == []
    with pytest.raises(ConfigError, match="report.location_map_runs.*'mocco'"):
        validate_config({"runs": runs, "report": {"location_map_runs": ["mocco"]}})
    config = eval_config()
    assert figure_names(config)[-3:-1] == ["locmap_moco", "locmap_ifm_e0.1"]


def tiny_atlas():
    """A 24^3 atlas with a lung box and a 3x3x3 grid of 8-voxel patches at step 6."""
    atlas = np.zeros((24, 24, 24), np.uint8)
    atlas[3:21, 4:20, 2:11] = 1
    atlas[3:21, 4:20, 13:22] = 2
    starts = [2, 8, 14]
    corners = np.array([(z, y, x) for z in starts for y in starts for x in starts], np.int32)
    return atlas, corners, 8


def test_figure_draws_the_patches_crossing_each_slice():
    atlas, corners, size = tiny_atlas()
    k, j = location_map_slices(atlas, corners, size)
    assert (k, j) == (12, 12)  # lung centroid 11.5 in z and y, moved to the nearest layer middle 8 + 4
    values = {"cle": np.linspace(-0.2, 0.8, len(corners)), "awt": np.full(len(corners), np.nan)}
    values["awt"][:5] = 0.3
    figure = location_map_figure("moco", atlas, corners, size, values, vmax=0.8, spacing=(2.0, 2.0, 2.0))
    assert png(figure).startswith(b"\x89PNG")
    axes = figure.axes
    assert len(axes) == 2 * 2 + 1  # targets x (axial, coronal) + colour bar
    crossing_axial = int(((corners[:, 0] <= k) & (k < corners[:, 0] + size)).sum())
    filled = axes[0].collections[0]
    assert len(filled.get_paths()) == crossing_axial
    assert filled.get_array().min() >= 0  # clipped at 0
    assert filled.norm.vmin == 0 and filled.norm.vmax == 0.8
    assert axes[0].get_title().startswith("cle: axial") and axes[3].get_title().startswith("awt: coronal")


def test_report_has_the_section_and_figure(tmp_path):
    import SimpleITK as sitk

    from pipeline.files import write_npz

    cohort = make_eval_cohort(tmp_path, n_subjects=10)
    layout = cohort.layout
    atlas, corners, size = tiny_atlas()
    layout.atlas_mask().parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(atlas), str(layout.atlas_mask()))
    write_npz(layout.grid(), corners=corners, patch_size=np.int64(size))
    rows = [(p, t, 0.1 * (p % 5) - 0.1, 8) for t in ("cle", "pse", "awt") for p in range(len(corners))]
    write_tsv(layout.location_map("moco"), pd.DataFrame(rows, columns=list(COLUMNS)))
    config = eval_config(report={"location_map_runs": ["moco", "ifm_e0.1"]})
    out = tmp_path / "report.html"
    build_report(config, layout, out)
    text = out.read_text()
    section = text[text.index('<section id="locmap">'):]
    section = section[:section.index("</section>")]
    assert "<h2>Where the signal is</h2>" in section and "repeat 0 only" in section
    assert section.count("<img") == 2 and "ifm_e0.1: no location map found" in section
    assert "moco: out-of-fold R² per location, n = 8 subjects" in section
    assert (layout.results / "figures" / "locmap_moco.png").stat().st_size > 1000
    assert (layout.results / "figures" / "locmap_ifm_e0.1.png").is_file()
