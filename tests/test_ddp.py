"""DDP on CPU: two processes on the gloo backend train one run and end identical."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pandas as pd
import torch
import torch.multiprocessing as mp

from models.data import LocationBatchSampler
from tests.train_fixtures import assert_state_equal, make_cohort, tiny_settings

WORLD_SIZE = 2


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _worker(rank: int, port: int, work: str, sids: list[str], settings: dict, out: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
                      WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank))
    from models.data import PatchStore
    from pipeline.grid import read_grid
    from models.distributed import cleanup, init_from_env
    from models.train import Trainer
    from pipeline.layout import Layout

    layout = Layout(work)
    ctx = init_from_env("cpu")
    try:
        store = PatchStore([layout.patches(s) for s in sids], sids)
        grid = read_grid(layout.grid())
        result = Trainer(settings, store, grid["locations"], dist=ctx, encoder_path=Path(out) / "encoder.pt",
                         history_path=Path(out) / "history.tsv", checkpoint_path=Path(out) / "checkpoint.pt",
                         show_progress=False).fit()
        # the test (not the library) records every rank's final state for comparison
        torch.save(result.model.state_dict(), Path(out) / f"rank{rank}.pt")
    finally:
        cleanup()


def test_two_process_gloo_training_keeps_ranks_identical(tmp_path):
    cohort = make_cohort(tmp_path, n_subjects=8)
    settings = tiny_settings(epochs=2, steps_per_epoch=3, batch_size=4)
    out = tmp_path / "run"
    out.mkdir()
    mp.spawn(_worker, args=(_free_port(), str(cohort.work), cohort.ok_sids, settings, str(out)),
             nprocs=WORLD_SIZE, join=True)
    states = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in range(WORLD_SIZE)]
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        assert_state_equal(states[0][name], states[1][name], name)
    # every step enqueued the keys of BOTH ranks (the global batch of 4) at its location
    sampler = LocationBatchSampler(8, 8, batch_size=4, mode="location", seed=settings["seed"], steps_per_epoch=3)
    counts = torch.zeros(8, dtype=torch.long)
    for epoch in range(2):
        sampler.set_epoch(epoch)
        for _, locs in sampler:
            counts[int(locs[0])] += 4
    assert torch.equal(states[0]["queue.ptr"], counts % settings["moco"]["queue_size"])
    # rank 0 wrote the outputs
    history = pd.read_csv(out / "history.tsv", sep="\t")
    assert list(history["epoch"]) == [1, 2]
    encoder = torch.load(out / "encoder.pt", weights_only=True)["state_dict"]
    for name, value in encoder.items():
        assert torch.equal(value, states[0][f"encoder_q.{name}"])
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["rng"]["world_size"] == 2 and len(ckpt["rng"]["per_rank"]) == 2
    assert not torch.equal(ckpt["rng"]["per_rank"][0]["augment"], ckpt["rng"]["per_rank"][1]["augment"])
