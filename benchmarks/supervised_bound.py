"""The supervised upper bound of the science benchmark: out-of-fold predictions of the latent factors.

    python -m benchmarks.supervised_bound --work WORK --truth truth.tsv --settings RUN_JSON \
        --seed 0 --out features.tsv [--steps 600]

For each fold of the first repeat of ``WORK/folds.tsv`` (the folds every row of the benchmark
shares), :func:`models.supervised.fit_subject_regressor` trains the run's encoder architecture,
input windows, masking and augmentation on the other folds' subjects to predict their
standardised ``cle, pse, awt`` (from the generator's truth), and predicts the held-out fold from
the mean embedding of all its patches. The out-of-fold predictions of every subject form a
three-column feature table (``sid, f0, f1, f2``) that the project's ``evaluate`` stage reads like
any other: its read-out of a factor is what this encoder can be *taught* to hold.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

FACTORS = ("cle", "pse", "awt")


def out_of_fold_predictions(work: Path, truth_path: Path, settings: dict, *, seed: int, steps: int,
                            subjects_per_step: int = 8, patches_per_subject: int = 16, lr: float = 1e-3):
    """DataFrame ``sid, f0, f1, f2``: out-of-fold predicted cle, pse, awt (first CV repeat)."""
    import pandas as pd

    from models.data import PatchStore
    from models.supervised import fit_subject_regressor, predict_subjects
    from pipeline.folds import read_table
    from pipeline.layout import Layout
    from pipeline.logs import progress

    layout = Layout(work)
    folds = pd.read_csv(layout.folds(), sep="\t")
    folds = folds[folds["repeat"] == folds["repeat"].min()]
    truth = read_table(truth_path, "truth")
    masked = bool(settings["input"]["lung_mask"])

    def stores(sids):
        patches = PatchStore([layout.patches(s) for s in sids], sids)
        masks = PatchStore([layout.patch_mask(s) for s in sids], sids, dtype=np.uint8) if masked else None
        return patches, masks

    predicted = pd.DataFrame(index=list(folds["sid"]), columns=list(FACTORS), dtype=float)
    for fold in progress(sorted(folds["fold"].unique()), desc=f"supervised bound seed {seed}", unit="fold"):
        train = list(folds.loc[folds["fold"] != fold, "sid"])
        test = list(folds.loc[folds["fold"] == fold, "sid"])
        y = truth.loc[train, list(FACTORS)].to_numpy(dtype=float)
        mean, sd = y.mean(axis=0), y.std(axis=0)  # standardised on the training folds only
        model = fit_subject_regressor(settings, *stores(train), (y - mean) / sd, steps=steps,
                                      subjects_per_step=subjects_per_step, patches_per_subject=patches_per_subject,
                                      lr=lr, seed=seed)
        predicted.loc[test] = predict_subjects(model, settings, *stores(test)) * sd + mean
    predicted.columns = [f"f{i}" for i in range(len(FACTORS))]
    predicted.index.name = "sid"
    return predicted.reset_index()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, required=True, help="work directory with patches and folds.tsv")
    parser.add_argument("--truth", type=Path, required=True, help="truth.tsv of the synthetic cohort")
    parser.add_argument("--settings", required=True, help="resolved run settings (JSON) whose encoder is trained")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=600, help="optimisation steps per fold")
    parser.add_argument("--out", type=Path, required=True, help="feature table to write")
    args = parser.parse_args(argv)

    import torch

    from pipeline.config import validate_section
    from pipeline.files import write_tsv
    from pipeline.logs import setup_logging

    setup_logging(None, False)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    settings = validate_section("train", json.loads(args.settings))
    started = time.perf_counter()
    table = out_of_fold_predictions(args.work, args.truth, settings, seed=args.seed, steps=args.steps)
    write_tsv(args.out, table)
    log.info("supervised bound seed %d: %d subjects in %.0f s -> %s", args.seed, len(table),
             time.perf_counter() - started, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
