"""Graph stage: batching, GraphEncoder shapes and pool(), graph MoCo learning, stage train-graph."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from models.data import PatchStore
from models.graph import GraphEncoder, GraphMoCo, batch_graphs, graph_views, load_graph_encoder
from models.graph_train import GRAPH_HISTORY_COLUMNS, feature_stats, train_graph
from models.train import Trainer
from pipeline.cli import main as cli_main
from pipeline.files import write_npy
from tests.train_fixtures import lattice_grid, make_cohort, tiny_settings

torch.set_num_threads(1)


def test_batch_graphs_drops_nodes_and_their_edges():
    edges = torch.tensor([[0, 1, 1, 2], [1, 0, 2, 1]])  # path 0-1-2
    weight = torch.tensor([0.1, 0.2, 0.3, 0.4])
    x = torch.arange(2 * 3 * 2, dtype=torch.float32).view(2, 3, 2)
    keep = torch.tensor([[True, True, True], [True, False, True]])
    graph = batch_graphs(x, edges, weight, keep)
    assert graph.num_graphs == 2
    torch.testing.assert_close(graph.x, torch.cat([x[0], x[1, [0, 2]]]))
    assert graph.batch.tolist() == [0, 0, 0, 1, 1]
    # graph 0 keeps all 4 edges; in graph 1 node 1 is gone, so every edge of the path is gone
    assert graph.edge_index.tolist() == [[0, 1, 1, 2], [1, 0, 2, 1]]
    torch.testing.assert_close(graph.edge_weight, weight)
    keep[1, 1], keep[0, 0] = True, False  # graph 0 loses node 0 -> edge 1-2 (renumbered 0-1) stays
    graph = batch_graphs(x, edges, weight, keep)
    assert graph.edge_index.tolist() == [[0, 1, 2, 3, 3, 4], [1, 0, 3, 2, 4, 3]]
    torch.testing.assert_close(graph.edge_weight, torch.tensor([0.3, 0.4, 0.1, 0.2, 0.3, 0.4]))


def test_views_keep_a_node_per_graph_and_are_seeded():
    _, edges, weight = lattice_grid((2, 2, 2))
    x = torch.randn(3, 8, 4)
    e, w = torch.from_numpy(edges), torch.from_numpy(weight)
    a = graph_views(x, e, w, 0.9, 0.1, torch.ones(4), torch.Generator().manual_seed(1))
    b = graph_views(x, e, w, 0.9, 0.1, torch.ones(4), torch.Generator().manual_seed(1))
    assert torch.equal(a.x, b.x) and torch.equal(a.edge_index, b.edge_index)
    assert set(a.batch.tolist()) == {0, 1, 2}
    clean = graph_views(x, e, w, 0.0, 0.0, torch.ones(4), torch.Generator().manual_seed(2))
    torch.testing.assert_close(clean.x, x.reshape(24, 4))
    assert clean.edge_index.shape[1] == 3 * edges.shape[1]


def test_graph_encoder_shapes_pool_and_locality():
    _, edges, weight = lattice_grid((2, 2, 2))
    e, w = torch.from_numpy(edges), torch.from_numpy(weight)
    torch.manual_seed(0)
    encoder = GraphEncoder(in_dim=6, hidden_dim=5, layers=2, projection_dim=3)
    x = torch.randn(4, 8, 6)
    graph = batch_graphs(x, e, w)
    out = encoder(graph)
    assert out.shape == (4, 3)
    torch.testing.assert_close(out.norm(dim=1), torch.ones(4))
    encoder.eval()
    with torch.no_grad():
        embedded = encoder.embed(graph)
    assert embedded.shape == (4, 5)
    encoder.train()
    pooled = encoder.pool(x[2], e, w)
    assert pooled.shape == (5,) and encoder.training  # pool runs in eval mode and restores the mode
    torch.testing.assert_close(pooled, embedded[2])
    # one GCN layer on the lattice: node 0's output ignores node 7 (not a neighbour), not node 1
    single = GraphEncoder(in_dim=6, hidden_dim=5, layers=1).eval()
    base = single.nodes(x[0], e, w)
    far, near = x[0].clone(), x[0].clone()
    far[7] += 5.0
    near[1] += 5.0
    torch.testing.assert_close(single.nodes(far, e, w)[0], base[0])
    assert not torch.allclose(single.nodes(near, e, w)[0], base[0])


def test_graph_moco_updates_key_encoder_and_queue_only_in_training():
    """Eval mode scores a batch without touching the momentum encoder or the queue (as MoCo)."""
    _, edges, weight = lattice_grid((2, 2, 2))
    graph = batch_graphs(torch.randn(4, 8, 6), torch.from_numpy(edges), torch.from_numpy(weight))
    torch.manual_seed(0)
    model = GraphMoCo(GraphEncoder(in_dim=6, hidden_dim=5, layers=2, projection_dim=3), queue_size=8, momentum=0.5)
    with torch.no_grad():
        for param in model.encoder_q.parameters():
            param.add_(1.0)  # the query encoder moves away from the key encoder's copy

    def state():
        return ({k: v.clone() for k, v in model.encoder_k.state_dict().items()}, model.queue.queue.clone(),
                model.queue.ptr.clone())

    keys, queue, pointer = state()
    model.eval()
    with torch.no_grad():
        l_pos, l_neg = model(graph, graph)
    assert l_pos.shape == (4, 1) and l_neg.shape == (4, 8)
    after = state()
    assert all(torch.equal(keys[k], after[0][k]) for k in keys)
    assert torch.equal(queue, after[1]) and torch.equal(pointer, after[2])
    model.train()
    model(graph, graph)
    after = state()
    assert not all(torch.equal(keys[k], after[0][k]) for k in keys)  # momentum update
    assert not torch.equal(queue, after[1]) and after[2].item() == (pointer.item() + 4) % 8  # 4 keys enqueued


def test_gcn_runs_without_compiled_pyg_extensions():
    """GCNConv + global_mean_pool on the grid adjacency with pyg-lib, torch-scatter, torch-sparse
    and torch-cluster made unimportable (in a fresh interpreter)."""
    code = textwrap.dedent("""
        import sys
        BLOCKED = ("pyg_lib", "torch_scatter", "torch_sparse", "torch_cluster")
        for name in BLOCKED:  # None in sys.modules: import raises, importlib.util.find_spec says absent
            sys.modules[name] = None
        import torch
        from models.graph import GraphEncoder, batch_graphs
        from tests.train_fixtures import lattice_grid
        _, edges, weight = lattice_grid((3, 2, 2))
        torch.manual_seed(0)
        encoder = GraphEncoder(4, 6, 2)
        graph = batch_graphs(torch.randn(3, 12, 4), torch.from_numpy(edges), torch.from_numpy(weight))
        out = encoder(graph)
        out.sum().backward()
        assert out.shape == (3, 6) and encoder.pool(torch.randn(12, 4), torch.from_numpy(edges),
                                                    torch.from_numpy(weight)).shape == (6,)
        assert all(sys.modules[name] is None for name in BLOCKED)
        print("ok")
    """)
    root = Path(__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize("bad", [{"in_dim": 0}, {"hidden_dim": -1}, {"layers": 0}])
def test_graph_encoder_rejects_bad_sizes(bad):
    args = {"in_dim": 4, "hidden_dim": 4, "layers": 1} | bad
    with pytest.raises(ValueError, match=next(iter(bad))):
        GraphEncoder(**args)


def _toy_embeddings(tmp_path, n=16, p=8, d=6, seed=0):
    """Subjects = distinct random feature patterns over the nodes, plus small node noise."""
    rng = np.random.default_rng(seed)
    paths = []
    for i in range(n):
        path = tmp_path / f"S{i:03d}.npy"
        write_npy(path, (rng.normal(size=(1, d)) * 2 + rng.normal(size=(p, d)) * 0.3).astype(np.float32))
        paths.append(path)
    return PatchStore(paths, dtype=np.float32)


def test_feature_stats_match_numpy(tmp_path):
    store = _toy_embeddings(tmp_path, n=4)
    stacked = np.concatenate([np.load(p) for p in store.paths]).astype(np.float64)
    mean, std = feature_stats(store)
    np.testing.assert_allclose(mean, stacked.mean(0), rtol=1e-9)
    np.testing.assert_allclose(std, stacked.std(0), rtol=1e-9)


def test_graph_moco_loss_falls_on_a_toy_set(tmp_path):
    store = _toy_embeddings(tmp_path)
    _, edges, weight = lattice_grid((2, 2, 2))
    graph = tiny_settings()["graph"] | {"epochs": 8, "batch_size": 8, "queue_size": 16, "lr": 0.01}
    encoder, history = train_graph(graph, store, edges, weight, seed=0, device="cpu", show_progress=False)
    losses = [row["loss"] for row in history]
    assert len(history) == 8 and list(history[0]) == list(GRAPH_HISTORY_COLUMNS)
    assert losses[-1] < losses[1], f"graph loss did not fall: {losses}"
    assert history[-1]["acc1"] > 2 * 100 / 17
    assert not encoder.training


def test_stage_train_graph(tmp_path, capsys):
    cohort = make_cohort(tmp_path, n_subjects=6, failed=(3,))
    settings = tiny_settings(epochs=0)
    store = PatchStore(cohort.patch_paths(), cohort.ok_sids)
    Trainer(settings, store, cohort.locations, encoder_path=cohort.layout.encoder("tiny"), device="cpu",
            show_progress=False).fit()
    common = ["--run", "tiny", "--subjects", str(cohort.subjects_tsv), "--work", str(cohort.work)]
    assert cli_main(["embed", *common, "--settings", json.dumps({"batch_size": 8, "device": "cpu"})]) == 0
    assert cli_main(["train-graph", *common, "--settings", json.dumps(settings)]) == 0
    saved = torch.load(cohort.layout.graph_model("tiny"), weights_only=True)
    assert saved["hyper_parameters"] == {"in_dim": 8, "hidden_dim": 8, "layers": 2, "projection_dim": 8}
    history = pd.read_csv(cohort.layout.graph_history("tiny"), sep="\t")
    assert list(history.columns) == list(GRAPH_HISTORY_COLUMNS) and len(history) == settings["graph"]["epochs"]
    encoder = load_graph_encoder(cohort.layout.graph_model("tiny"))
    features = np.load(cohort.layout.embedding("tiny", cohort.ok_sids[0]))
    pooled = encoder.pool(torch.from_numpy(features), torch.from_numpy(cohort.edges), torch.from_numpy(cohort.edge_weight))
    assert pooled.shape == (8,) and torch.isfinite(pooled).all()
    stacked = np.concatenate([np.load(cohort.layout.embedding("tiny", s)) for s in cohort.ok_sids])
    np.testing.assert_allclose(encoder.feature_mean.numpy(), stacked.mean(0), rtol=1e-4, atol=1e-6)

    disabled = tiny_settings(epochs=0, graph={"enabled": False})
    assert cli_main(["train-graph", *common, "--settings", json.dumps(disabled)]) == 1
    assert "train.graph.enabled is false" in capsys.readouterr().err
