"""Stage ``locmap``: where in the lung the signal is, as a per-location read-out map of one run.

For every atlas grid location ``p`` and every target, the out-of-fold R² of the target read from
that location's patch embeddings alone (``X_p [N, D]``, row ``p`` of every subject's
``work/runs/{run}/embeddings/{sid}.npy``). The head is the read-out's: :class:`models.heads.RidgeHead`
(StandardScaler + ridge, penalty chosen by inner CV; ``evaluate.ridge_alphas``,
``evaluate.inner_folds``), fitted by :func:`pipeline.evaluate.cross_validate` with the shared folds
of ``work/folds.tsv``. Only **repeat 0** of the folds is used, to keep the ``P`` x targets x
folds fits cheap; one R² per (location, target) over the out-of-fold predictions of all folds.

Targets: with a truth table (synthetic cohorts) the latent factors ``cle``, ``pse`` and ``awt``
(which regions carry upper-zone centrilobular emphysema, sub-pleural paraseptal emphysema,
airway wall thickness); without one (real data) the regression outcomes of ``evaluate.outcomes``
(e.g. ``logFEV1pp``), valued and transformed as in :mod:`pipeline.evaluate`.

Subjects: those of the folds (they passed QC) whose embedding is not an empty tombstone (a failed
embedding; left out with a warning). A subject missing a value of a target is left out of that
target only.

Memory: the embeddings are **streamed in blocks of locations**. For each block ``[p0, p1)`` the
rows ``p0:p1`` of every subject's file are copied out of a read-only memory map (``np.load(...,
mmap_mode="r")``; one contiguous byte range per subject, the map closed again at once, so no more
than one file is open) into a ``[p1 - p0, N, D]`` float32 buffer of at most ``block_mb``; then
the locations of the block are fitted one by one. Every byte of the embeddings is read once,
whatever the cohort size: at 10,000 subjects x 300 locations x 128 dims (1.5 GB) and the default
256 MB, that is 6 blocks of 51 locations, each file opened 6 times. (Keeping all ``N`` maps open
instead would hold one file descriptor per subject, over the usual limit of 1,024.)

Output (``results/{run}/location_map.tsv``, atomically): ``location, target, r2, n`` with
``location`` the grid row ``p`` of ``work/atlas/grid.npz`` and ``n`` the subjects scored.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, SubjectError
from pipeline.grid import read_grid
from pipeline.layout import Layout

log = logging.getLogger(__name__)

COLUMNS = ("location", "target", "r2", "n")
STAGE = "locmap"
DEFAULT_BLOCK_MB = 256.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="run name (config key runs.<name>)")
    parser.add_argument("--work", default="work", help="work directory (default: %(default)s)")
    parser.add_argument("--folds", required=True, help="folds TSV (work/folds.tsv); repeat 0 is used")
    parser.add_argument("--phenotypes", required=True, help="phenotypes TSV (sid + COPDGene columns)")
    parser.add_argument("--truth", help="truth TSV of a synthetic cohort: map its latent factors cle, pse, awt "
                                        "instead of the regression outcomes")
    parser.add_argument("--out", required=True, help="TSV to write (results/<run>/location_map.tsv)")
    parser.add_argument("--jobs", type=int, default=1, help="parallel head fits (joblib; default: %(default)s)")
    parser.add_argument("--block-mb", type=float, default=DEFAULT_BLOCK_MB,
                        help="memory for one block of locations x subjects x dims (float32; default: %(default)s)")


def location_targets(settings: Mapping[str, Any], phenotypes, truth=None, sids: Sequence[str] = ()):
    """What to map: name -> float Series indexed by ``sids`` (NaN = missing).

    With ``truth`` (DataFrame indexed by sid) the latent factors ``cle, pse, awt``; otherwise the
    regression outcomes of the ``evaluate`` settings, from ``phenotypes`` via
    :func:`pipeline.evaluate.outcome_values` (the same columns and transforms as the main table).

    Raises:
        ConfigError: a latent factor is missing or not numeric; no regression outcome is configured.
    """
    from pipeline.baselines import ORACLE_FACTORS
    from pipeline.evaluate import outcome_values, outcomes_from_settings

    sids = list(sids)
    if truth is not None:
        targets = {}
        for factor in ORACLE_FACTORS:
            if factor not in truth.columns:
                raise ConfigError(f"truth table lacks the latent factor column {factor!r}")
            if truth[factor].dtype.kind not in "fiu":
                raise ConfigError(f"truth column {factor!r} is not numeric")
            targets[factor] = truth[factor].astype(float).reindex(sids)
        return targets
    outcomes = [o for o in outcomes_from_settings(settings) if o.kind == "regression"]
    if not outcomes:
        raise ConfigError("config key 'evaluate.outcomes': no regression outcome to map per location")
    return {o.name: outcome_values(phenotypes, o, sids) for o in outcomes}


def _open(path: Path, sid: str) -> np.ndarray | None:
    """Read-only memory map of one embedding ``[P, D]``, or ``None`` for an empty tombstone."""
    if not path.is_file():
        raise SubjectError(sid, f"embedding {path} is missing; run the embed stage first", stage=STAGE)
    if path.stat().st_size == 0:
        return None
    try:
        embedding = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise SubjectError(sid, f"embedding {path} is unreadable ({error})", stage=STAGE) from None
    if embedding.ndim != 2 or 0 in embedding.shape:
        raise SubjectError(sid, f"embedding has shape {embedding.shape}, expected [P, D]", stage=STAGE)
    return embedding


def embedding_subjects(embeddings: Mapping[str, Path], num_locations: int | None = None) -> tuple[list[str], int, int]:
    """Subjects with an embedding (tombstones left out with a warning), and the shared ``P``, ``D``.

    Reads only the ``.npy`` headers.

    Raises:
        SubjectError: a missing or unreadable file, or a shape unlike the grid's or the others'.
    """
    kept, shape = [], None
    for sid, path in embeddings.items():
        embedding = _open(Path(path), sid)
        if embedding is None:
            log.warning("subject %s [%s]: left out, its embedding is an empty tombstone (embed failed)", sid, STAGE)
            continue
        if num_locations is not None and embedding.shape[0] != num_locations:
            raise SubjectError(sid, f"embedding has {embedding.shape[0]} rows but the grid has {num_locations} "
                               "locations; re-run embed after the atlas changed", stage=STAGE)
        if shape is not None and embedding.shape != shape:
            raise SubjectError(sid, f"embedding has shape {embedding.shape}, other subjects {shape}", stage=STAGE)
        shape = embedding.shape
        kept.append(sid)
        del embedding
    if shape is None:
        raise ConfigError("no subject has an embedding (all are tombstones or none is in the folds)")
    return kept, int(shape[0]), int(shape[1])


def location_features(embeddings: Mapping[str, Path], sids: Sequence[str], num_locations: int, dim: int,
                      block_mb: float = DEFAULT_BLOCK_MB) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(p, X_p)`` for every location ``p``: ``X_p`` float32 ``[N, D]``, row ``i`` = subject ``sids[i]``.

    Streams blocks of locations (see the module docstring): each block's rows are copied from each
    subject's memory-mapped file once, into a buffer of at most ``block_mb`` (at least one location).
    ``X_p`` is a view into that buffer, valid until the next block is read.
    """
    if block_mb <= 0:
        raise ValueError(f"block_mb must be > 0, got {block_mb!r}")
    per_location = len(sids) * dim * 4
    block = int(max(1, min(num_locations, block_mb * 2**20 // max(per_location, 1))))
    for start in range(0, num_locations, block):
        stop = min(num_locations, start + block)
        buffer = np.empty((stop - start, len(sids), dim), dtype=np.float32)  # [B, N, D]
        for i, sid in enumerate(sids):
            embedding = _open(Path(embeddings[sid]), sid)
            if embedding is None or embedding.shape != (num_locations, dim):
                raise SubjectError(sid, "embedding changed while it was being read", stage=STAGE)
            buffer[:, i, :] = embedding[start:stop]
            del embedding
            if not np.all(np.isfinite(buffer[:, i, :])):
                raise SubjectError(sid, "embedding contains non-finite values", stage=STAGE)
        for p in range(start, stop):
            yield p, buffer[p - start]


def location_map(embeddings: Mapping[str, Path], folds, targets: Mapping[str, Any], settings: Mapping[str, Any],
                 num_locations: int | None = None, block_mb: float = DEFAULT_BLOCK_MB, n_jobs: int = 1,
                 desc: str = STAGE):
    """Out-of-fold R² of every target from every location's embeddings alone (folds repeat 0 only).

    Args:
        embeddings: sid -> embedding ``.npy`` (float32 ``[P, D]``; empty file = tombstone). Subjects
            of the folds that are not keys are ignored.
        folds: DataFrame ``sid, repeat, fold`` (:func:`pipeline.evaluate.read_folds`); only its
            first repeat is used.
        targets: name -> float Series indexed by sid (NaN = missing), see :func:`location_targets`.
        settings: the ``evaluate`` settings (``ridge_alphas``, ``inner_folds``, ``seed``).
        num_locations: the grid's ``P``, checked against every embedding when given.
        block_mb: memory for one block of locations (see :func:`location_features`).
        n_jobs: parallel head fits per location (joblib processes).

    Returns:
        DataFrame ``location, target, r2, n`` (targets in the given order, then locations).
    """
    import pandas as pd
    from sklearn import config_context

    from pipeline.evaluate import cross_validate, score
    from pipeline.logs import progress

    first = folds[folds["repeat"] == folds["repeat"].min()]
    folded = [sid for sid in first["sid"] if sid in embeddings]
    sids, P, D = embedding_subjects({sid: embeddings[sid] for sid in folded}, num_locations)
    log.info("%s: %d subjects x %d locations x %d dims, %d target(s): %s", desc, len(sids), P, D, len(targets),
             ", ".join(targets))
    regression = {name: ("regression", values) for name, values in targets.items()}
    kinds = dict.fromkeys(targets, "regression")
    frames = []
    for p, X in progress(location_features(embeddings, sids, P, D, block_mb), desc=desc, total=P, unit="location"):
        # Thousands of small fits: scikit-learn's per-call input checks are a good part of each one at
        # demo scale. The rows were checked finite above and cross_validate drops missing targets.
        with config_context(assume_finite=True, skip_parameter_validation=True):
            predictions = cross_validate(sids, X, first, regression, settings, n_jobs=n_jobs,
                                         desc=f"{desc} location {p}", show_progress=False)
        metrics = score(predictions, kinds)
        frames.append(pd.DataFrame({"location": p, "target": metrics["outcome"], "r2": metrics["value"],
                                    "n": metrics["n"]}))
    table = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=list(COLUMNS))
    table = table[list(COLUMNS)]
    order = {name: i for i, name in enumerate(targets)}
    table = table.sort_values(["target", "location"], key=lambda c: c.map(order) if c.name == "target" else c,
                              kind="stable")
    return table.reset_index(drop=True)


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import stage_settings
    from pipeline.evaluate import read_folds
    from pipeline.files import write_tsv
    from pipeline.folds import read_table

    if args.jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {args.jobs}")
    if args.block_mb <= 0:
        raise ConfigError(f"--block-mb must be > 0, got {args.block_mb}")
    settings = stage_settings(args, "evaluate")
    layout = Layout(work=Path(args.work))
    num_locations = len(read_grid(layout.grid(), "corners")["corners"])
    folds = read_folds(args.folds)
    sids = list(dict.fromkeys(folds["sid"]))
    phenotypes = read_table(args.phenotypes, "phenotypes")
    truth = read_table(args.truth, "truth") if args.truth else None
    targets = location_targets(settings, phenotypes, truth, sids)
    embeddings = {sid: layout.embedding(args.run, sid) for sid in sids}
    table = location_map(embeddings, folds, targets, settings, num_locations=num_locations, block_mb=args.block_mb,
                         n_jobs=args.jobs, desc=f"locmap {args.run}")
    write_tsv(args.out, table)
    for target, group in table.groupby("target", sort=False):
        scored = group.dropna(subset=["r2"])
        if scored.empty:
            continue
        best = scored.loc[scored["r2"].idxmax()]
        log.info("locmap %s: %s: best location %d (R² %.3f), median R² %.3f over %d locations", args.run, target,
                 int(best["location"]), best["r2"], scored["r2"].median(), len(scored))
    return 0
