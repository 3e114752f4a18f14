"""PatchStore (memory maps, shape checks), LocationBatchSampler, PatchLoader, NeighbourKeys."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.data import LocationBatchSampler, NeighbourKeys, PatchLoader, PatchStore
from pipeline.status import patch_subjects
from pipeline.errors import SubjectError
from pipeline.grid import read_grid
from tests.train_fixtures import make_cohort

torch.set_num_threads(1)


# ------------------------------------------------------------------------------- PatchStore
def test_store_memory_maps_and_returns_rows(tmp_path):
    cohort = make_cohort(tmp_path, n_subjects=4, patch_size=4)
    store = PatchStore(cohort.patch_paths(), cohort.ok_sids)
    assert store.shape == (8, 4, 4, 4) and len(store) == 4
    assert not store._open  # nothing opened before use
    mapped = store.array(2)
    assert isinstance(mapped, np.memmap) and mapped.mode == "r"
    expected = np.load(cohort.patch_paths()[2])
    subjects, locs = np.array([2, 0, 2, 3]), np.array([5, 1, 0, 7])
    batch = store.get(subjects, locs)
    assert batch.dtype == np.int16 and batch.shape == (4, 4, 4, 4)
    assert not isinstance(batch, np.memmap)
    np.testing.assert_array_equal(batch[0], expected[5])
    np.testing.assert_array_equal(batch[2], expected[0])
    np.testing.assert_array_equal(batch[1], np.load(cohort.patch_paths()[0])[1])


def test_store_bounds_open_maps(tmp_path):
    cohort = make_cohort(tmp_path, n_subjects=5, patch_size=4)
    store = PatchStore(cohort.patch_paths(), max_open=2)
    store.get(np.arange(5), np.zeros(5, int))
    assert len(store._open) == 2 and list(store._open) == [3, 4]  # least recently used closed


def test_store_shape_mismatch_names_file(tmp_path):
    cohort = make_cohort(tmp_path, n_subjects=3, patch_size=4)
    bad = cohort.patch_paths()[1]
    np.save(bad, np.zeros((8, 5, 5, 5), np.int16))
    with pytest.raises(SubjectError, match=str(bad)) as info:
        PatchStore(cohort.patch_paths(), cohort.ok_sids)
    assert info.value.sid == "S001" and "(8, 5, 5, 5)" in str(info.value)


def test_store_wrong_dtype_and_missing_file(tmp_path):
    cohort = make_cohort(tmp_path, n_subjects=2, patch_size=4)
    np.save(cohort.patch_paths()[0], np.zeros((8, 4, 4, 4), np.float32))
    with pytest.raises(SubjectError, match="dtype float32, expected int16"):
        PatchStore(cohort.patch_paths())
    with pytest.raises(SubjectError, match="does not exist"):
        PatchStore([tmp_path / "nope.npy"], ["X1"])


def test_patch_subjects_and_grid(tmp_path):
    cohort = make_cohort(tmp_path, n_subjects=5, failed=(1, 3))
    sids, ok = patch_subjects(cohort.layout, cohort.subjects_tsv)
    assert sids == cohort.sids and ok == ["S000", "S002", "S004"]
    grid = read_grid(cohort.layout.grid())
    assert grid["locations"].shape == (8, 3) and grid["edges"].shape == (2, 24) and grid["patch_size"] == 8


# ------------------------------------------------------------------------------- sampler
def _epoch(sampler: LocationBatchSampler) -> list[tuple[np.ndarray, np.ndarray]]:
    return [(s.copy(), l.copy()) for s, l in sampler]


def test_location_batches_one_location_distinct_subjects():
    sampler = LocationBatchSampler(10, 6, batch_size=4, mode="location", seed=3)
    batches = _epoch(sampler)
    assert len(batches) == 6 * 3  # ceil(10 / 4) chunks per location
    pairs = set()
    for subjects, locs in batches:
        assert len(set(locs.tolist())) == 1, "a location batch mixes locations"
        assert len(set(subjects.tolist())) == 4, "a location batch repeats a subject"
        pairs.update(zip(subjects.tolist(), locs.tolist()))
    assert len(pairs) == 10 * 6  # one pass covers every (subject, location) pair


def test_mixed_batches_cover_pairs_once():
    sampler = LocationBatchSampler(5, 4, batch_size=4, mode="mixed", seed=0)
    batches = _epoch(sampler)
    assert len(batches) == 5
    pairs = [p for s, l in batches for p in zip(s.tolist(), l.tolist())]
    assert len(set(pairs)) == 20 == len(pairs)
    assert any(len(set(l.tolist())) > 1 for _, l in batches)


def test_steps_per_epoch_spans_passes():
    sampler = LocationBatchSampler(4, 2, batch_size=4, mode="location", seed=0, steps_per_epoch=7)
    batches = _epoch(sampler)
    assert len(batches) == 7
    assert all(sorted(s.tolist()) == [0, 1, 2, 3] for s, _ in batches)


def test_sampler_deterministic_per_seed_and_epoch():
    def plan(seed, epoch):
        sampler = LocationBatchSampler(9, 5, batch_size=3, mode="location", seed=seed)
        sampler.set_epoch(epoch)
        return np.concatenate([np.stack(b) for b in _epoch(sampler)], axis=1)

    np.testing.assert_array_equal(plan(1, 0), plan(1, 0))
    assert not np.array_equal(plan(1, 0), plan(1, 1))
    assert not np.array_equal(plan(1, 0), plan(2, 0))


@pytest.mark.parametrize("mode", ["location", "mixed"])
def test_sampler_resumes_mid_epoch(mode):
    sampler = LocationBatchSampler(8, 6, batch_size=4, mode=mode, seed=5)
    sampler.set_epoch(2)
    full = _epoch(sampler)
    sampler.set_epoch(2)
    it = iter(sampler)
    for _ in range(5):
        next(it)
    state = sampler.state_dict()
    assert state["position"] == 5 and state["epoch"] == 2
    fresh = LocationBatchSampler(8, 6, batch_size=4, mode=mode, seed=5)
    fresh.load_state_dict(state)
    rest = _epoch(fresh)
    assert len(rest) == len(full) - 5
    for (s1, l1), (s2, l2) in zip(full[5:], rest):
        np.testing.assert_array_equal(s1, s2)
        np.testing.assert_array_equal(l1, l2)
    other = LocationBatchSampler(8, 6, batch_size=4, mode=mode, seed=6)
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)


@pytest.mark.parametrize("mode", ["location", "mixed"])
def test_ddp_shares_are_disjoint_and_cover_the_batch(mode):
    single = _epoch(LocationBatchSampler(12, 4, batch_size=6, mode=mode, seed=1))
    shares = [_epoch(LocationBatchSampler(12, 4, batch_size=6, mode=mode, seed=1, rank=r, world_size=3))
              for r in range(3)]
    assert all(len(s) == len(single) for s in shares)
    for step, (subjects, locs) in enumerate(single):
        parts = [shares[r][step] for r in range(3)]
        assert all(len(p[0]) == 2 for p in parts)
        got = sorted(pair for p in parts for pair in zip(p[0].tolist(), p[1].tolist()))
        assert got == sorted(zip(subjects.tolist(), locs.tolist()))


@pytest.mark.parametrize("kwargs, message", [
    ({"batch_size": 13}, "exceeds the number of subjects 12"),
    ({"mode": "random"}, "sampler mode"),
    ({"batch_size": 4, "world_size": 3}, "not divisible by the world size 3"),
    ({"rank": 2, "world_size": 2}, "rank 2"),
])
def test_sampler_rejects_bad_values(kwargs, message):
    args = {"n_subjects": 12, "n_locations": 4, "batch_size": 4, "mode": "location", "seed": 0} | kwargs
    with pytest.raises(ValueError, match=message):
        LocationBatchSampler(**args)


# ------------------------------------------------------------------------------- loader
def test_loader_yields_plan_in_order_and_tracks_position(tmp_path):
    cohort = make_cohort(tmp_path, n_subjects=6, patch_size=4)
    store = PatchStore(cohort.patch_paths())
    sampler = LocationBatchSampler(6, 8, batch_size=3, mode="location", seed=0, steps_per_epoch=6)
    sampler.position = 2
    loader = PatchLoader(store, sampler, "cpu", workers=2, depth=3)
    seen = 0
    for i, batch in enumerate(loader, start=2):
        assert sampler.position == i + 1  # advanced when handed over, not when read ahead
        s, l = sampler.batch(i)
        np.testing.assert_array_equal(batch.subject_idx.numpy(), s)
        np.testing.assert_array_equal(batch.patches.numpy(), store.get(s, l))
        assert batch.patches.dtype == torch.int16 and batch.loc_idx.dtype == torch.int64
        assert batch.masks is None and batch.key_patches is None and batch.key_loc_idx is None
        seen += 1
    assert seen == 4 and loader.wait_seconds >= 0.0


# ------------------------------------------------------------------------------- neighbour positives
def _chain_edges(n):
    """A path 0 - 1 - ... - n-1 in both directions: int64 [2, 2(n-1)]."""
    a = np.arange(n - 1)
    return np.stack([np.concatenate([a, a + 1]), np.concatenate([a + 1, a])])


def test_neighbour_keys_are_adjacent_locations():
    edges = _chain_edges(6)
    keys = NeighbourKeys(edges, 6, prob=1.0)
    loc = np.repeat(np.arange(6), 50)
    drawn = keys.draw(loc, np.random.default_rng(0))
    adjacent = {(int(a), int(b)) for a, b in edges.T}
    assert all((int(q), int(k)) in adjacent for q, k in zip(loc, drawn))
    # both neighbours of an inner location are used
    assert set(drawn[loc == 2].tolist()) == {1, 3}
    # prob 0: the key is the query's own location; an isolated location keeps its own
    np.testing.assert_array_equal(NeighbourKeys(edges, 6, prob=0.0).draw(loc, np.random.default_rng(0)), loc)
    isolated = NeighbourKeys(edges, 7, prob=1.0).draw(np.full(5, 6), np.random.default_rng(0))
    np.testing.assert_array_equal(isolated, np.full(5, 6))
    half = NeighbourKeys(edges, 6, prob=0.5).draw(np.full(2000, 3), np.random.default_rng(1))
    assert 0.45 < np.mean(half != 3) < 0.55


def test_loader_reads_neighbour_keys_and_masks_of_the_same_subject(tmp_path):
    from pipeline.patches import pack_masks

    cohort = make_cohort(tmp_path, n_subjects=6, patch_size=8)
    store = PatchStore(cohort.patch_paths())
    rng = np.random.default_rng(0)
    mask_paths = []
    for i, path in enumerate(cohort.patch_paths()):
        masks = rng.random(store.shape) < 0.5
        mask_paths.append(tmp_path / f"mask{i}.npy")
        np.save(mask_paths[-1], pack_masks(masks))
    mask_store = PatchStore(mask_paths, dtype=np.uint8)
    edges = read_grid(cohort.layout.grid())["edges"]
    adjacent = {(int(a), int(b)) for a, b in edges.T}
    sampler = LocationBatchSampler(6, 8, batch_size=3, mode="location", seed=4, steps_per_epoch=5)
    loader = PatchLoader(store, sampler, "cpu", masks=mask_store, keys=NeighbourKeys(edges, 8, prob=1.0))
    first = []
    for batch in loader:
        s, q, k = batch.subject_idx.numpy(), batch.loc_idx.numpy(), batch.key_loc_idx.numpy()
        assert all((int(a), int(b)) in adjacent for a, b in zip(q, k))
        np.testing.assert_array_equal(batch.key_patches.numpy(), store.get(s, k))  # same subject, adjacent location
        from pipeline.patches import unpack_masks

        np.testing.assert_array_equal(batch.masks.numpy(), unpack_masks(mask_store.get(s, q), 8))
        np.testing.assert_array_equal(batch.key_masks.numpy(), unpack_masks(mask_store.get(s, k), 8))
        first.append(k)
    # the key draws are a function of (seed, epoch, batch): a second pass repeats them
    sampler.set_epoch(0)
    again = [batch.key_loc_idx.numpy() for batch in PatchLoader(store, sampler, "cpu", masks=mask_store,
                                                               keys=NeighbourKeys(edges, 8, prob=1.0))]
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)
