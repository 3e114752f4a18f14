"""Subject feature tables: mean and gnn pooling of patch embeddings, and the baseline tables."""

import json

import numpy as np
import pandas as pd
import pytest
import torch

from pipeline.baselines import DENSITOMETRY_KEYS, densitometry_features, oracle_features
from pipeline.cli import main
from pipeline.errors import ConfigError, SubjectError
from pipeline.folds import read_table
from pipeline.pool import (INTERIOR_LUNG_FRACTION, GraphPooler, load_embedding, location_weights, mean_pool,
                           pool_subjects, weighted_mean_pool)
from tests.eval_fixtures import make_eval_cohort

torch.set_num_threads(1)


def read_features(path):
    return pd.read_csv(path, sep="\t", dtype={"sid": str}).set_index("sid")


def test_mean_pooling_equals_the_mean_of_the_embeddings(tmp_path):
    cohort = make_eval_cohort(tmp_path, n_subjects=12, tombstone={"moco": 4})
    out = tmp_path / "features_mean.tsv"
    rc = main(["pool", "--run", "moco", "--pooling", "mean", "--subjects", str(cohort.subjects_tsv),
               "--work", str(cohort.layout.work), "--out", str(out)])
    assert rc == 0
    table = read_features(out)
    assert list(table.columns) == [f"f{i}" for i in range(cohort.dim)]
    # failed subjects (patches) and the subject with a tombstone embedding are left out
    expected = [s for s in cohort.ok_sids if s != cohort.sids[4]]
    assert list(table.index) == expected
    for sid in expected:
        embedding = np.load(cohort.layout.embedding("moco", sid))
        np.testing.assert_allclose(table.loc[sid].to_numpy(), embedding.mean(axis=0), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("pooling", ["weighted", "interior"])
def test_lung_fraction_poolings_weight_the_locations(tmp_path, pooling):
    cohort = make_eval_cohort(tmp_path, n_subjects=6, failed={})
    out = tmp_path / f"features_{pooling}.tsv"
    assert main(["pool", "--run", "moco", "--pooling", pooling, "--subjects", str(cohort.subjects_tsv),
                 "--work", str(cohort.layout.work), "--out", str(out)]) == 0
    with np.load(cohort.layout.grid()) as grid:
        fraction = grid["lung_fraction"].astype(np.float64)
    weights = fraction if pooling == "weighted" else (fraction >= INTERIOR_LUNG_FRACTION).astype(np.float64)
    assert 0 < weights.sum() and (pooling == "weighted" or weights.sum() < len(weights))
    table = read_features(out)
    for sid in cohort.ok_sids:
        embedding = np.load(cohort.layout.embedding("moco", sid)).astype(np.float64)
        expected = (embedding * weights[:, None]).sum(0) / weights.sum()
        np.testing.assert_allclose(table.loc[sid].to_numpy(), expected, rtol=1e-5, atol=1e-6)


def test_weighted_pool_by_hand_and_its_checks():
    x = np.array([[0.0, 2.0], [4.0, 6.0], [8.0, 10.0]])
    np.testing.assert_allclose(weighted_mean_pool(x, np.array([1.0, 0.0, 1.0])), [4.0, 6.0])
    np.testing.assert_allclose(weighted_mean_pool(x, np.array([0.5, 0.25, 0.25])), [3.0, 5.0])
    with pytest.raises(ValueError, match="shape"):
        weighted_mean_pool(x, np.ones(2))
    with pytest.raises(ValueError, match="not all zero"):
        weighted_mean_pool(x, np.zeros(3))
    np.testing.assert_array_equal(location_weights("interior", np.array([0.3, 0.96, 1.0])), [0.0, 1.0, 1.0])
    with pytest.raises(ConfigError, match="no atlas location"):
        location_weights("interior", np.array([0.3, 0.5]))


def test_mean_pool_and_embedding_checks(tmp_path):
    x = np.arange(12, dtype=np.float32).reshape(4, 3)
    np.testing.assert_array_equal(mean_pool(x), [4.5, 5.5, 6.5])
    empty = tmp_path / "e.npy"
    empty.write_bytes(b"")
    assert load_embedding(empty, "S1") is None
    bad = tmp_path / "b.npy"
    np.save(bad, np.array([np.nan, 1.0], dtype=np.float32).reshape(1, 2))
    with pytest.raises(SubjectError, match="subject S1 \\[pool\\]: embedding contains non-finite"):
        load_embedding(bad, "S1")
    with pytest.raises(SubjectError, match="subject S2 \\[pool\\]: embedding .* is missing"):
        load_embedding(tmp_path / "none.npy", "S2")
    np.save(bad, np.zeros((3, 2), dtype=np.float32))
    with pytest.raises(SubjectError, match="subject S3 \\[pool\\]: embedding has 3 rows but the grid has 12"):
        load_embedding(bad, "S3", num_locations=12)


class StandInEncoder:
    """Has the ``pool`` method of models.graph.GraphEncoder: neighbour-averaged features, then a linear map."""

    def __init__(self, in_dim, hidden):
        self.weight = torch.arange(in_dim * hidden, dtype=torch.float32).reshape(in_dim, hidden) / 100

    def pool(self, x, edge_index, edge_weight):
        messages = torch.zeros_like(x).index_add_(0, edge_index[1], x[edge_index[0]] * edge_weight[:, None])
        return ((x + messages) @ self.weight).mean(0)


def test_gnn_pooling_with_a_stand_in_encoder(tmp_path):
    cohort = make_eval_cohort(tmp_path, n_subjects=8, failed={})
    with np.load(cohort.layout.grid()) as grid:
        pooler = GraphPooler(StandInEncoder(cohort.dim, 5), grid["edges"], grid["edge_weight"])
    table = pool_subjects(cohort.ok_sids, lambda sid: np.load(cohort.layout.embedding("moco", sid)), pooler)
    assert table.shape == (8, 1 + 5) and list(table.columns)[1:] == [f"f{i}" for i in range(5)]
    assert np.isfinite(table.iloc[:, 1:].to_numpy()).all()
    with pytest.raises(SubjectError, match="subject S000 \\[pool\\]: embedding has 2 patches"):
        pool_subjects(["S000"], lambda sid: np.zeros((2, cohort.dim), np.float32), pooler)


def test_gnn_pooling_with_the_real_graph_encoder(tmp_path):
    from models.graph import GraphEncoder, save_graph_encoder

    cohort = make_eval_cohort(tmp_path, n_subjects=6, failed={})
    torch.manual_seed(0)
    encoder = GraphEncoder(in_dim=cohort.dim, hidden_dim=7, layers=2)
    save_graph_encoder(cohort.layout.graph_model("moco"), encoder)
    out = tmp_path / "features_gnn.tsv"
    rc = main(["pool", "--run", "moco", "--pooling", "gnn", "--subjects", str(cohort.subjects_tsv),
               "--work", str(cohort.layout.work), "--out", str(out)])
    assert rc == 0
    table = read_features(out)
    assert table.shape == (6, 7)
    with np.load(cohort.layout.grid()) as grid:
        edges, weights = torch.as_tensor(grid["edges"]), torch.as_tensor(grid["edge_weight"])
    x = torch.as_tensor(np.load(cohort.layout.embedding("moco", "S002")))
    np.testing.assert_allclose(table.loc["S002"].to_numpy(), encoder.pool(x, edges, weights).numpy(),
                               rtol=1e-4, atol=1e-5)


def test_pool_gnn_without_graph_model_is_a_one_line_error(tmp_path, capsys):
    cohort = make_eval_cohort(tmp_path, n_subjects=4, failed={})
    rc = main(["pool", "--run", "moco", "--pooling", "gnn", "--subjects", str(cohort.subjects_tsv),
               "--work", str(cohort.layout.work), "--out", str(tmp_path / "f.tsv")])
    assert rc == 1 and "run train-graph first" in capsys.readouterr().err


def test_densitometry_and_oracle_baselines(tmp_path):
    cohort = make_eval_cohort(tmp_path, n_subjects=10)
    out = tmp_path / "densitometry.tsv"
    rc = main(["baseline", "--name", "densitometry", "--subjects", str(cohort.subjects_tsv),
               "--work", str(cohort.layout.work), "--out", str(out)])
    assert rc == 0
    table = read_features(out)
    assert list(table.index) == cohort.ok_sids and tuple(table.columns) == DENSITOMETRY_KEYS

    density = json.loads(cohort.layout.density("S004").read_text())["total"]
    assert table.loc["S004"].to_dict() == pytest.approx({k: density[k] for k in DENSITOMETRY_KEYS}, rel=1e-5)

    out = tmp_path / "oracle.tsv"
    rc = main(["baseline", "--name", "oracle", "--subjects", str(cohort.subjects_tsv), "--work",
               str(cohort.layout.work), "--truth", str(cohort.truth), "--out", str(out)])
    assert rc == 0
    oracle = read_features(out)
    assert list(oracle.columns) == ["cle", "pse", "awt"] and list(oracle.index) == cohort.ok_sids
    np.testing.assert_allclose(oracle.to_numpy(), cohort.latent.loc[cohort.ok_sids].to_numpy(), rtol=1e-5)


def test_baselines_report_bad_subject_data(tmp_path):
    cohort = make_eval_cohort(tmp_path, n_subjects=5, failed={})
    cohort.layout.density("S001").write_text('{"total": {"laa950": "n/a"}}')
    with pytest.raises(SubjectError, match="subject S001 \\[baseline\\]: densitometry value total.laa950"):
        densitometry_features(cohort.layout, cohort.ok_sids)
    truth = read_table(cohort.truth, "truth").drop(index="S003")
    with pytest.raises(SubjectError, match="subject S003 \\[baseline\\]: has no row in the truth table"):
        oracle_features(truth, cohort.ok_sids)
