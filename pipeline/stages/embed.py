"""Stage ``embed``: pre-projection features of every patch of every subject.

``copdssl embed --run NAME --subjects work/subjects.tsv --work work [--device auto|cpu|cuda]``
runs the run's trained encoder (``encoder.pt``) over each subject whose patches status is ok and
writes ``work/runs/NAME/embeddings/{sid}.npy`` = float32 ``[P, D]`` (D = encoder feature_dim),
atomically, with :func:`models.embed.embed_cohort`. Subjects whose patches failed get an empty
tombstone file, because Snakemake declares one output per subject.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.stages import add_run_arguments, run_inputs

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "run name (its encoder.pt is used)", "embed.device")


def run(args: argparse.Namespace) -> int:
    from models.embed import embed_cohort
    from models.train import resolve_device
    from pipeline.grid import read_grid

    settings, layout, sids, ok_sids = run_inputs(args, "embed")
    device = resolve_device(args.device or settings["device"])
    grid = read_grid(layout.grid(), "locations")
    counts = embed_cohort(layout.encoder(args.run), layout, args.run, sids, ok_sids, grid["locations"],
                          batch_size=int(settings["batch_size"]), device=device)
    log.info("embed %s: %d subjects embedded, %d tombstones (patches not ok) on %s", args.run,
             counts["embedded"], counts["tombstoned"], device)
    return 0
