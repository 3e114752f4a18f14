"""Training loop: determinism, encoder export, epochs 0, validation, learning signal, CLI stage."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from models.checkpoint import load_encoder
from models.data import PatchStore
from models.train import HISTORY_COLUMNS, Trainer, lr_factor
from pipeline.cli import main as cli_main
from tests.train_fixtures import make_cohort, tiny_settings

torch.set_num_threads(1)

TIMING = ["pairs_per_s", "seconds"]


def _fit(cohort, out, settings, **kwargs):
    store = PatchStore(cohort.patch_paths(), cohort.ok_sids)
    trainer = Trainer(settings, store, cohort.locations, encoder_path=out / "encoder.pt",
                      history_path=out / "history.tsv", checkpoint_path=out / "checkpoint.pt",
                      device="cpu", show_progress=False, **kwargs)
    return trainer.fit()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), n_subjects=10)


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), f"{name} differs"


def test_same_seed_gives_identical_encoder_and_history(cohort, tmp_path):
    settings = tiny_settings(epochs=2, steps_per_epoch=3)
    before = torch.get_rng_state()
    _fit(cohort, tmp_path / "a", settings)
    assert torch.equal(torch.get_rng_state(), before), "training changed the caller's global RNG state"
    _fit(cohort, tmp_path / "b", settings)
    enc_a = torch.load(tmp_path / "a" / "encoder.pt", weights_only=True)
    enc_b = torch.load(tmp_path / "b" / "encoder.pt", weights_only=True)
    _assert_same_tensors(enc_a["state_dict"], enc_b["state_dict"])
    hist_a = pd.read_csv(tmp_path / "a" / "history.tsv", sep="\t")
    hist_b = pd.read_csv(tmp_path / "b" / "history.tsv", sep="\t")
    assert list(hist_a.columns) == list(HISTORY_COLUMNS) and len(hist_a) == 2
    pd.testing.assert_frame_equal(hist_a.drop(columns=TIMING), hist_b.drop(columns=TIMING))
    # lr is that of each epoch's last step (cosine over 6 steps: steps 2 and 5), not the next step's 0
    expected_lr = [0.03 * lr_factor(step, 6, "cosine") for step in (2, 5)]
    np.testing.assert_allclose(hist_a["lr"], expected_lr, rtol=1e-6)
    assert hist_a["lr"].iloc[-1] > 0
    # another seed trains other weights
    _fit(cohort, tmp_path / "c", tiny_settings(epochs=2, steps_per_epoch=3, seed=1))
    enc_c = torch.load(tmp_path / "c" / "encoder.pt", weights_only=True)
    assert not all(torch.equal(enc_a["state_dict"][k], enc_c["state_dict"][k]) for k in enc_a["state_dict"])


def test_encoder_file_contract_and_load(cohort, tmp_path):
    settings = tiny_settings(epochs=1, steps_per_epoch=2)
    result = _fit(cohort, tmp_path, settings)
    saved = torch.load(tmp_path / "encoder.pt", weights_only=True)
    assert saved["patch_size"] == 8 and saved["num_locations"] == 8 and saved["feature_dim"] == 8
    assert saved["settings"] == settings
    encoder = load_encoder(tmp_path / "encoder.pt", "cpu")
    assert not encoder.training
    x = torch.randn(3, 1, 8, 8, 8)
    loc = torch.from_numpy(cohort.locations[:3])
    trained = result.model.encoder_q.eval()
    with torch.no_grad():
        torch.testing.assert_close(encoder.embed(x, loc), trained.embed(x, loc), rtol=1e-5, atol=1e-6)
        assert encoder.embed(x, loc).shape == (3, 8)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert {"model", "optimizer", "scheduler", "sampler", "rng", "epoch", "global_step"} <= set(ckpt)
    assert {"torch_cpu", "augment"} <= set(ckpt["rng"]["per_rank"][0])
    assert ckpt["model"]["queue.queue"].shape == (8, 16, 8) and ckpt["model"]["queue.ptr"].shape == (8,)


def test_epochs_zero_exports_the_initial_encoder(cohort, tmp_path):
    settings = tiny_settings(epochs=0)
    result = _fit(cohort, tmp_path, settings)
    assert result.global_step == 0 and result.history == []
    history = pd.read_csv(tmp_path / "history.tsv", sep="\t")
    assert list(history.columns) == list(HISTORY_COLUMNS) and history.empty
    from models.moco import moco_from_settings

    fresh = moco_from_settings(settings, 8, 8).encoder_q  # initialised from settings["seed"]
    saved = torch.load(tmp_path / "encoder.pt", weights_only=True)["state_dict"]
    _assert_same_tensors(saved, {k: v.contiguous() for k, v in fresh.state_dict().items()})
    other = moco_from_settings(tiny_settings(epochs=0, seed=3), 8, 8).encoder_q
    assert not all(torch.equal(saved[k], v) for k, v in other.state_dict().items())


@pytest.mark.parametrize("overrides, message", [
    ({"batch_size": 12, "moco": {"queue_size": 24}}, "batch_size 12 exceeds the 10 subjects"),
    ({"batch_size": 4, "moco": {"queue_size": 18}}, "18"),
])
def test_bad_combinations_rejected_at_start(cohort, overrides, message):
    store = PatchStore(cohort.patch_paths(), cohort.ok_sids)
    with pytest.raises(ValueError, match=message):
        Trainer(tiny_settings(**overrides), store, cohort.locations, device="cpu")


def test_grid_and_patch_files_must_agree(cohort):
    store = PatchStore(cohort.patch_paths(), cohort.ok_sids)
    with pytest.raises(ValueError, match="grid has 7 locations but the patch files have 8 rows"):
        Trainer(tiny_settings(), store, cohort.locations[:7], device="cpu")


def test_cosine_schedule():
    assert lr_factor(0, 10, "cosine") == 1.0
    assert lr_factor(5, 10, "cosine") == pytest.approx(0.5)
    assert lr_factor(10, 10, "cosine") == pytest.approx(0.0)
    assert lr_factor(7, 10, "constant") == 1.0


def test_learning_signal(tmp_path):
    """Each (subject, patch) has its own density and texture, so instance discrimination is
    learnable. The loss first rises while the queues fill with real keys (the random initial keys
    are easy negatives), then falls; a control run with a vanishing learning rate stays near
    chance level ln(1 + K), and acc@1 stays far above chance 100 / (1 + K).

    Shuffle-BN is off here: with 8-sample BN groups the batch statistics are too noisy for a
    few-second run to learn (the other tests exercise 'split')."""
    cohort = make_cohort(tmp_path, n_subjects=48, lattice=(1, 1, 1))
    mild = {"rotation_deg": 5.0, "scale": 0.05, "translation": 0.05, "elastic_prob": 0.0, "noise_std_hu": 20.0,
            "noise_prob": 0.5, "contrast_prob": 0.0}
    common = dict(epochs=12, steps_per_epoch=10, batch_size=16, augment=mild,
                  moco={"queue_size": 16, "momentum": 0.9, "temperature": 0.1, "shuffle_bn": "none"})
    trained = _fit(cohort, tmp_path / "run", tiny_settings(**common, optimizer={"lr": 0.05, "schedule": "constant"}))
    control = _fit(cohort, tmp_path / "control", tiny_settings(**common, optimizer={"lr": 1e-9, "schedule": "constant"}))
    losses = [row["loss"] for row in trained.history]
    peak = max(losses[:5])
    assert np.mean(losses[-3:]) < peak - 0.2, f"loss did not fall after the queue filled: {losses}"
    assert losses[-1] < control.history[-1]["loss"] - 0.5, "training did no better than a frozen encoder"
    assert control.history[-1]["loss"] == pytest.approx(np.log(17), abs=0.3)
    chance = 100.0 / (1 + 16)
    assert min(row["acc1"] for row in trained.history[-3:]) > 3 * chance


def test_cli_trains_on_ok_subjects_and_resumes(tmp_path, capsys):
    cohort = make_cohort(tmp_path, n_subjects=9, failed=(2,))
    layout = cohort.layout
    settings = tiny_settings(epochs=2, steps_per_epoch=2)
    args = ["train", "--run", "tiny", "--subjects", str(cohort.subjects_tsv), "--work", str(cohort.work),
            "--settings", json.dumps(settings)]
    assert cli_main(args + ["--max-steps", "3"]) == 0
    ckpt = torch.load(layout.checkpoint("tiny"), weights_only=True)
    assert ckpt["global_step"] == 3 and ckpt["sampler"]["n_subjects"] == 8  # the failed subject is left out
    assert cli_main(args) == 0
    assert "resuming from" in capsys.readouterr().err
    assert torch.load(layout.checkpoint("tiny"), weights_only=True)["global_step"] == 4
    assert len(pd.read_csv(layout.history("tiny"), sep="\t")) == 2
    assert layout.encoder("tiny").is_file()
    capsys.readouterr()
    changed = json.dumps(tiny_settings(epochs=1, steps_per_epoch=2, seed=5))
    assert cli_main(args[:-1] + [changed]) == 0
    assert "starting fresh" in capsys.readouterr().err
    assert len(pd.read_csv(layout.history("tiny"), sep="\t")) == 1


def test_cli_reports_bad_settings_in_one_line(tmp_path, capsys):
    cohort = make_cohort(tmp_path, n_subjects=3)
    args = ["train", "--run", "tiny", "--subjects", str(cohort.subjects_tsv), "--work", str(cohort.work),
            "--settings", json.dumps(tiny_settings(batch_size=4))]
    assert cli_main(args) == 1
    assert "run tiny: batch_size 4 exceeds the 3 subjects" in capsys.readouterr().err
