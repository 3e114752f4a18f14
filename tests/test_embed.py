"""Stage embed: float32 [P, D] features equal to encoder.embed, tombstones for failed subjects."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from models.checkpoint import load_encoder
from models.data import PatchStore
from models.embed import embed_patches
from models.train import Trainer
from pipeline.cli import main as cli_main
from tests.train_fixtures import make_cohort, tiny_settings

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    cohort = make_cohort(tmp_path_factory.mktemp("embed"), n_subjects=6, failed=(4,))
    store = PatchStore(cohort.patch_paths(), cohort.ok_sids)
    Trainer(tiny_settings(epochs=1, steps_per_epoch=2), store, cohort.locations,
            encoder_path=cohort.layout.encoder("tiny"), device="cpu", show_progress=False).fit()
    return cohort


def _reference(cohort, sid):
    """encoder.embed on the same inputs, computed independently of models.embed."""
    encoder = load_encoder(cohort.layout.encoder("tiny"))
    hu = torch.from_numpy(np.load(cohort.layout.patches(sid)).astype(np.float32))
    x = ((hu + 1024.0) / 632.0 - 1.0).unsqueeze(1)  # the schema's default normalisation
    with torch.no_grad():
        return encoder.embed(x, torch.from_numpy(cohort.locations)).numpy()


def test_cli_embeds_ok_subjects_and_tombstones_the_rest(trained):
    cohort = trained
    args = ["embed", "--run", "tiny", "--subjects", str(cohort.subjects_tsv), "--work", str(cohort.work),
            "--settings", json.dumps({"batch_size": 3, "device": "cpu"})]  # 8 patches: batches of 3, 3, 2
    assert cli_main(args) == 0
    for sid in cohort.sids:
        path = cohort.layout.embedding("tiny", sid)
        if sid in cohort.ok_sids:
            features = np.load(path)
            assert features.dtype == np.float32 and features.shape == (8, 8)
            np.testing.assert_allclose(features, _reference(cohort, sid), rtol=1e-4, atol=1e-5)
        else:
            assert path.is_file() and path.stat().st_size == 0
    first, second = (np.load(cohort.layout.embedding("tiny", s)) for s in cohort.ok_sids[:2])
    assert not np.allclose(first, second)  # subjects differ


def test_embed_patches_is_batch_size_invariant(trained):
    cohort = trained
    encoder = load_encoder(cohort.layout.encoder("tiny"))
    patches = np.load(cohort.layout.patches(cohort.ok_sids[0]), mmap_mode="r")
    from models.intensity import PatchInput

    norm = PatchInput()
    whole = embed_patches(encoder, patches, cohort.locations, norm, batch_size=8)
    single = embed_patches(encoder, patches, cohort.locations, norm, batch_size=1)
    np.testing.assert_allclose(whole, single, rtol=1e-4, atol=1e-5)  # eval-mode BN: no batch coupling


def test_embed_rejects_a_patch_file_with_the_wrong_shape(trained, tmp_path, capsys):
    cohort = trained
    bad = cohort.ok_sids[1]
    original = np.load(cohort.layout.patches(bad))
    np.save(cohort.layout.patches(bad), original[:5])
    try:
        args = ["embed", "--run", "tiny", "--subjects", str(cohort.subjects_tsv), "--work", str(cohort.work),
                "--settings", json.dumps({"batch_size": 4, "device": "cpu"})]
        assert cli_main(args) == 1
        err = capsys.readouterr().err
        assert f"subject {bad} [embed]" in err and "(5, 8, 8, 8)" in err
    finally:
        np.save(cohort.layout.patches(bad), original)
