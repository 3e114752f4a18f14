"""Exact resume: a run stopped or killed part-way and resumed equals an uninterrupted run."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from models.data import PatchStore
from models.train import Trainer
from tests.train_fixtures import assert_state_equal, make_cohort, tiny_settings

torch.set_num_threads(1)

SETTINGS = {"epochs": 3, "steps_per_epoch": 4}  # 12 steps, location batches of 4, queues of 16


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), n_subjects=10)


def _trainer(cohort, out, settings=None, **kwargs):
    store = PatchStore(cohort.patch_paths(), cohort.ok_sids)
    return Trainer(settings or tiny_settings(**SETTINGS), store, cohort.locations,
                   encoder_path=out / "encoder.pt", history_path=out / "history.tsv",
                   checkpoint_path=out / "checkpoint.pt", device="cpu", show_progress=False, **kwargs)


@pytest.fixture(scope="module")
def uninterrupted(cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("uninterrupted")
    result = _trainer(cohort, out).fit()
    return result, pd.read_csv(out / "history.tsv", sep="\t")


def _assert_identical(reference, resumed_model):
    ref = reference.model.state_dict()
    got = resumed_model.state_dict()
    assert ref.keys() == got.keys()
    assert any(k.startswith("encoder_k.") for k in ref) and "queue.queue" in ref and "queue.ptr" in ref
    for name in ref:
        assert_state_equal(ref[name], got[name], name)



def _assert_same_history(reference_history, out):
    got = pd.read_csv(out / "history.tsv", sep="\t")
    timing = ["pairs_per_s", "seconds"]
    pd.testing.assert_frame_equal(reference_history.drop(columns=timing), got.drop(columns=timing))


@pytest.mark.parametrize("stop_after", [4, 6])  # end of epoch 1; middle of epoch 2
def test_stop_and_resume_is_exact(cohort, uninterrupted, tmp_path, stop_after):
    reference, history = uninterrupted
    first = _trainer(cohort, tmp_path).fit(max_steps=stop_after)
    assert not first.finished and first.global_step == stop_after
    resumed = _trainer(cohort, tmp_path).fit()
    assert resumed.finished and resumed.resumed_from_step == stop_after and resumed.global_step == 12
    _assert_identical(reference, resumed.model)
    _assert_same_history(history, tmp_path)
    saved = torch.load(tmp_path / "encoder.pt", weights_only=True)["state_dict"]
    for name, value in reference.model.encoder_q.state_dict().items():
        assert torch.equal(saved[name], value)


def test_crash_between_checkpoints_resumes_from_the_last_one(cohort, uninterrupted, tmp_path, monkeypatch):
    """Kill the process (an exception) at step 7 with a checkpoint every 3 steps: the work of
    step 7 is lost, the run restarts from step 6 and still ends bit-identical."""
    reference, history = uninterrupted
    original = Trainer.train_step
    calls = {"n": 0}

    def dying_step(self, *args):
        calls["n"] += 1
        if calls["n"] == 7:
            raise KeyboardInterrupt("killed")
        return original(self, *args)

    monkeypatch.setattr(Trainer, "train_step", dying_step)
    with pytest.raises(KeyboardInterrupt):
        _trainer(cohort, tmp_path, checkpoint_every=3).fit()
    monkeypatch.setattr(Trainer, "train_step", original)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert state["global_step"] == 6 and state["sampler"]["position"] == 2 and state["epoch"] == 1
    resumed = _trainer(cohort, tmp_path, checkpoint_every=3).fit()
    assert resumed.resumed_from_step == 6
    _assert_identical(reference, resumed.model)
    _assert_same_history(history, tmp_path)


def test_changed_settings_start_fresh(cohort, tmp_path):
    _trainer(cohort, tmp_path).fit(max_steps=5)
    other = tiny_settings(**SETTINGS, optimizer={"lr": 0.01})
    restarted = _trainer(cohort, tmp_path, settings=other).fit(max_steps=2)
    assert restarted.resumed_from_step == 0 and restarted.global_step == 2
    fresh = _trainer(cohort, tmp_path / "fresh", settings=other).fit(max_steps=2)
    for name, value in fresh.model.state_dict().items():
        assert_state_equal(restarted.model.state_dict()[name], value, name)


def test_runtime_and_graph_settings_do_not_invalidate_the_checkpoint(cohort, tmp_path):
    _trainer(cohort, tmp_path).fit(max_steps=2)
    settings = tiny_settings(**SETTINGS, num_workers=2, device="auto", graph={"epochs": 7})
    assert _trainer(cohort, tmp_path, settings=settings).fit(max_steps=3).resumed_from_step == 2
