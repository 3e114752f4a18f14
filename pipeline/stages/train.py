"""Stage ``train``: train one run's patch encoder on every subject whose patches are ok.

``copdssl train --run NAME --subjects work/subjects.tsv --work work [--device auto|cpu|cuda]``
writes ``work/runs/NAME/{encoder.pt, history.tsv, checkpoint.pt}``. An existing checkpoint with
the same settings and subjects is resumed (exactly); one written with other settings is ignored
and training starts fresh (logged). Only subjects whose patches status is ok are used.

Multi-GPU: ``torchrun --nproc_per_node N -m pipeline -- train --run NAME ...`` (equivalently
``python -m torch.distributed.run ...``) runs N processes with DDP; each trains a share of every
batch (``batch_size`` is the global batch) and rank 0 writes the files. The ``--`` matters:
without it torchrun's own parser reads ``--run`` as an abbreviation of its ``--run-path``.
"""

from __future__ import annotations

import argparse
import logging

from pipeline.stages import add_run_arguments, run_inputs

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_run_arguments(parser, "run name (a key of `runs` in the config)", "train.device")
    parser.add_argument("--max-steps", type=int, help="stop after this many optimisation steps in total "
                        "(checkpointed; a later call without it continues the run)")
    parser.add_argument("--checkpoint-every", type=int, default=0,
                        help="also checkpoint every N steps inside an epoch (default: once per epoch)")


def run(args: argparse.Namespace) -> int:
    import numpy as np

    from models.data import PatchStore
    from pipeline.grid import read_grid
    from models.distributed import cleanup, init_from_env
    from models.train import Trainer
    from pipeline.errors import ConfigError

    settings, layout, _, sids = run_inputs(args, "train")
    if len(sids) < 2:
        raise ConfigError(f"run {args.run}: training needs at least 2 subjects with ok patches, found {len(sids)}")
    grid = read_grid(layout.grid(), "locations", "edges", "patch_size")
    store = PatchStore([layout.patches(sid) for sid in sids], sids)
    if store.item_shape != (grid["patch_size"],) * 3:
        raise ConfigError(f"run {args.run}: patch files are {store.shape} but {layout.grid()} says patch_size "
                          f"{grid['patch_size']}")
    masks = None
    if settings["input"]["lung_mask"]:
        missing = [sid for sid in sids if not layout.patch_mask(sid).is_file()]
        if missing:
            raise ConfigError(f"run {args.run}: input.lung_mask needs the lung masks cut with the patches, but "
                              f"{layout.patch_mask(missing[0])} and {len(missing) - 1} more are missing "
                              "(set patches.lung_mask: true and rerun the patches stage)")
        masks = PatchStore([layout.patch_mask(sid) for sid in sids], sids, dtype=np.uint8)
    ctx = init_from_env(args.device or settings["device"])
    try:
        if ctx.rank == 0:
            log.info("run %s: %d subjects x %d locations, patch %d^3, %d process(es) on %s", args.run, len(sids),
                     store.num_locations, grid["patch_size"], ctx.world_size, ctx.device)
        try:
            trainer = Trainer(settings, store, grid["locations"], masks=masks, edges=grid["edges"], encoder_path=layout.encoder(args.run),
                              history_path=layout.history(args.run), checkpoint_path=layout.checkpoint(args.run),
                              dist=ctx, checkpoint_every=args.checkpoint_every, sids=sids, run_name=args.run)
        except ValueError as error:
            raise ConfigError(f"run {args.run}: {error}") from None
        trainer.fit(args.max_steps)
    finally:
        cleanup()
    return 0
