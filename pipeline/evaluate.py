"""Stage ``evaluate``: cross-validated outcome heads on one subject-level feature table.

For every repeat and fold of ``work/folds.tsv`` a head is fitted on the training folds only
(its scaler, PCA and hyper-parameter search included, see :mod:`models.heads`) and predicts the
held-out fold; the out-of-fold predictions of a repeat are then scored:

- regression outcomes (``kind: regression``; e.g. log FEV1 % predicted): :class:`RidgeHead`,
  R² on the transformed target (``transform: log`` as in the IFM paper);
- ordinal outcomes (``kind: ordinal``; e.g. the visual emphysema score 0-5, mMRC 0-4):
  :class:`OrdinalHead`, accuracy and one-off accuracy.

A subject whose outcome value is missing is left out of that outcome only. With ``--truth``
(synthetic cohorts) the stage also reads every numeric latent factor of ``truth.tsv`` (cle, pse,
awt and the numeric nuisance factors) out of the features with :class:`RidgeHead`: the
out-of-fold R² per factor shows which factors a representation keeps and which it suppresses.

Several ``--features`` tables are joined column-wise on sid (inner join; a subject missing from
one of them is left out with a warning): how a combined feature set such as
``densitometry+<run>`` (:func:`pipeline.baselines.combined_name`) is evaluated.

Outputs (``--out-dir``, atomically): ``metrics.tsv`` (``outcome, metric, repeat, value, n``),
``predictions.tsv`` (``sid, outcome, repeat, observed, predicted``; regression values on the
transformed scale) and ``readout.tsv`` (``factor, repeat, r2``; header only without a truth table).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.baselines import ORACLE_FACTORS
from pipeline.errors import ConfigError, CopdsslError, SubjectError

log = logging.getLogger(__name__)

KINDS = ("regression", "ordinal")
TRANSFORMS = ("none", "log")
BINARY_FACTORS = ("kernel",)  # two-level text factors of truth.tsv that the read-out codes 0/1
METRIC_COLUMNS = ("outcome", "metric", "repeat", "value", "n")
PREDICTION_COLUMNS = ("sid", "outcome", "repeat", "observed", "predicted")
READOUT_COLUMNS = ("factor", "repeat", "r2")


class EvaluationError(CopdsslError):
    """A head could not be fitted on a fold (too few subjects, degenerate data...)."""


@dataclass(frozen=True)
class Outcome:
    """One configured outcome (``evaluate.outcomes.<name>``).

    Args:
        name: label used in the outputs (``logFEV1pp``).
        column: phenotype column (``FEV1pp_utah``).
        kind: ``regression`` or ``ordinal``.
        transform: ``none`` or ``log`` (natural log; regression only).
        levels: ordinal only: the values are integers ``0..levels-1`` (``None``: not checked).
    """

    name: str
    column: str
    kind: str
    transform: str = "none"
    levels: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"outcome {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.transform not in TRANSFORMS:
            raise ValueError(f"outcome {self.name!r}: transform must be one of {TRANSFORMS}, got {self.transform!r}")
        if self.kind == "ordinal" and self.transform != "none":
            raise ValueError(f"outcome {self.name!r}: an ordinal outcome cannot be transformed ({self.transform!r})")
        if self.levels is not None and (isinstance(self.levels, bool) or not isinstance(self.levels, int)
                                        or self.levels < 2):
            raise ValueError(f"outcome {self.name!r}: levels must be an integer >= 2, got {self.levels!r}")


def outcomes_from_settings(settings: Mapping[str, Any]) -> list[Outcome]:
    """The configured outcomes, in config order."""
    return [Outcome(name=name, column=spec["column"], kind=spec["kind"], transform=spec.get("transform", "none"),
                    levels=spec.get("levels")) for name, spec in settings["outcomes"].items()]


def outcome_values(phenotypes, outcome: Outcome, sids: Sequence[str]):
    """Transformed outcome per subject: float Series indexed by ``sids`` (NaN = missing).

    Raises:
        ConfigError: the column is not in the phenotypes table.
        SubjectError: a value that cannot be this outcome (text, <= 0 under a log transform,
            a non-integer or out-of-range ordinal level), naming the subject.
    """
    import pandas as pd

    if outcome.column not in phenotypes.columns:
        raise ConfigError(f"config key 'evaluate.outcomes.{outcome.name}.column': "
                          f"{outcome.column!r} is not a phenotype column")
    raw = phenotypes[outcome.column].reindex(list(sids))
    values = pd.to_numeric(raw, errors="coerce")
    bad_text = raw.notna() & values.isna()
    if bad_text.any():
        sid = bad_text.index[bad_text][0]
        raise SubjectError(sid, f"{outcome.column} = {raw[sid]!r} is not a number", stage="evaluate")
    values = values.astype(float)
    observed = values.dropna()
    if outcome.transform == "log":
        bad = observed.index[observed <= 0]
        if len(bad):
            raise SubjectError(bad[0], f"{outcome.column} = {observed[bad[0]]:g} cannot be log-transformed "
                               f"(outcome {outcome.name})", stage="evaluate")
        values = np.log(values)
    if outcome.kind == "ordinal":
        invalid = observed != np.round(observed)
        if outcome.levels:
            invalid |= (observed < 0) | (observed > outcome.levels - 1)
        bad = observed.index[invalid]
        if len(bad):
            expected = f"an integer in 0..{outcome.levels - 1}" if outcome.levels else "an integer"
            raise SubjectError(bad[0], f"{outcome.column} = {observed[bad[0]]:g} is not {expected} "
                               f"(outcome {outcome.name})", stage="evaluate")
    return values


def read_feature_table(path: str | Path):
    """One feature table (``sid`` + numeric feature columns) as a float DataFrame indexed by sid, checked.

    Raises:
        ConfigError: the table is missing, has no feature columns or no subjects.
        SubjectError: a feature value that is text, missing or not finite, naming the subject.
    """
    import pandas as pd

    from pipeline.folds import read_table

    table = read_table(path, "features")
    if table.shape[1] == 0:
        raise ConfigError(f"features table {path} has no feature columns")
    if table.shape[0] == 0:
        raise ConfigError(f"features table {path} has no subjects")
    for column in table.columns:
        if table[column].dtype.kind not in "fiu":  # read_table leaves a column with a word in it as text
            text = table[column]
            bad = text.notna() & pd.to_numeric(text, errors="coerce").isna()
            sid = text.index[bad][0]
            raise SubjectError(sid, f"feature {column} = {text[sid]!r} is not a number", stage="evaluate")
    X = table.to_numpy(dtype=np.float64)
    bad_rows = ~np.isfinite(X).all(axis=1)
    if bad_rows.any():
        row = int(np.flatnonzero(bad_rows)[0])
        column = table.columns[int(np.flatnonzero(~np.isfinite(X[row]))[0])]
        raise SubjectError(table.index[row], f"feature {column} is missing or not finite in {path}", stage="evaluate")
    return table.astype(np.float64)


def join_features(tables: Sequence[Any], names: Sequence[str], desc: str = "evaluate"):
    """Column-wise inner join of feature tables on sid (a combined feature set such as densitometry + a run).

    Args:
        tables: DataFrames indexed by sid (see :func:`read_feature_table`).
        names: one name per table, for the warning and to tell apart a column name that is in
            more than one table (such a column becomes ``<name>:<column>``).

    Returns:
        DataFrame of the subjects that are in every table, in the first table's row order; the
        columns of the first table, then those of the second, and so on. A subject missing from
        some table is left out with a warning.

    Raises:
        ConfigError: no table, or no subject in every table.
    """
    import pandas as pd

    if not tables:
        raise ConfigError("no features table to join")
    if len(names) != len(tables):
        raise ValueError(f"{len(names)} names for {len(tables)} tables")
    counts = pd.Series([c for t in tables for c in t.columns]).value_counts()
    renamed = [t.rename(columns={c: f"{name}:{c}" for c in t.columns if counts[c] > 1})
               for t, name in zip(tables, names)]
    shared = set.intersection(*(set(t.index) for t in tables))
    common = [sid for sid in tables[0].index if sid in shared]
    lost = [sid for sid in dict.fromkeys(sid for t in tables for sid in t.index) if sid not in shared]
    if lost:
        missing_from = [name for t, name in zip(tables, names) if lost[0] not in t.index]
        log.warning("%s: %d subject(s) are not in every features table and are left out (e.g. %s, not in %s)",
                    desc, len(lost), lost[0], ", ".join(missing_from))
    if not common:
        raise ConfigError(f"{desc}: no subject is in every features table ({', '.join(names)})")
    return pd.concat([t.loc[common] for t in renamed], axis=1)


def read_features(paths: str | Path | Sequence[str | Path], desc: str = "evaluate") -> tuple[list[str], np.ndarray]:
    """Subject IDs ``[N]`` and features ``X [N, D]`` (float64) of a feature table, or of several
    tables joined column-wise on sid (:func:`join_features`)."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    tables = [read_feature_table(path) for path in paths]
    table = join_features(tables, [Path(path).stem for path in paths], desc=desc) if len(tables) > 1 else tables[0]
    return list(table.index), table.to_numpy(dtype=np.float64)


def read_folds(path: str | Path):
    """The folds table (``sid, repeat, fold``), checked: each subject once per repeat."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"folds table {path} does not exist; run the folds stage first")
    folds = pd.read_csv(path, sep="\t", dtype={"sid": str}, keep_default_na=False)
    missing = {"sid", "repeat", "fold"} - set(folds.columns)
    if missing:
        raise ConfigError(f"folds table {path} lacks column(s): {', '.join(sorted(missing))}")
    duplicated = folds[folds.duplicated(["sid", "repeat"])]
    if not duplicated.empty:
        raise SubjectError(duplicated["sid"].iloc[0], f"appears twice in repeat {duplicated['repeat'].iloc[0]} "
                           f"of {path}", stage="evaluate")
    return folds.astype({"repeat": int, "fold": int})


def make_head(kind: str, settings: Mapping[str, Any]):
    """An unfitted head for an outcome kind, configured from the ``evaluate`` settings."""
    from models.heads import OrdinalHead, RidgeHead

    if kind == "regression":
        return RidgeHead(alphas=tuple(settings["ridge_alphas"]), inner_folds=settings["inner_folds"],
                         random_state=settings["seed"])
    if kind == "ordinal":
        return OrdinalHead(n_components=tuple(settings["pca_components"]), inner_folds=settings["inner_folds"],
                           random_state=settings["seed"])
    raise ValueError(f"unknown outcome kind {kind!r}")


def _fit_predict(head, X: np.ndarray, y: np.ndarray, train: np.ndarray, test: np.ndarray, label: str) -> np.ndarray:
    """Fit ``head`` on rows ``train`` of ``X [N, D]`` / ``y [N]``; predict rows ``test`` -> ``[len(test)]``.

    The head never sees the test rows while fitting.
    """
    try:
        head.fit(X[train], y[train])
        return np.asarray(head.predict(X[test]), dtype=float)
    except (ValueError, np.linalg.LinAlgError, FloatingPointError) as error:
        raise EvaluationError(f"{label}: {' '.join(str(error).split())}") from None


def cross_validate(sids: Sequence[str], X: np.ndarray, folds, targets: Mapping[str, tuple[str, Any]],
                   settings: Mapping[str, Any], n_jobs: int = 1, desc: str = "evaluate",
                   head_factory: Callable[[str], Any] | None = None, show_progress: bool = True):
    """Out-of-fold predictions of every target in every repeat.

    Args:
        sids: subject IDs ``[N]`` of the rows of ``X``.
        X: features ``[N, D]``.
        folds: DataFrame ``sid, repeat, fold`` (subjects without features are ignored).
        targets: name -> (kind, float Series indexed by sid; NaN = missing).
        settings: the ``evaluate`` settings (heads' hyper-parameters, seed, n_folds).
        n_jobs: parallel fits (joblib processes).
        head_factory: ``kind -> unfitted estimator`` (default: :func:`make_head` with ``settings``).
        show_progress: report progress over the fits (off when the caller reports its own, e.g.
            :mod:`pipeline.locmap` calls this once per atlas location).

    Returns:
        DataFrame ``sid, outcome, repeat, observed, predicted``.
    """
    import pandas as pd
    from joblib import Parallel, delayed
    from threadpoolctl import threadpool_limits

    from pipeline.logs import progress

    row_of = {sid: i for i, sid in enumerate(sids)}
    make = head_factory or (lambda kind: make_head(kind, settings))
    tasks, pieces = [], []
    for name, (kind, values) in targets.items():
        y = values.reindex(list(sids)).to_numpy(dtype=float)  # [N], NaN = missing
        for repeat, split in folds.groupby("repeat", sort=True):
            rows = split["sid"].map(row_of)
            has_features = rows.notna().to_numpy()
            rows = rows[has_features].to_numpy(dtype=np.int64)
            fold_ids = split["fold"].to_numpy()[has_features]
            observed = np.isfinite(y[rows])
            rows, fold_ids = rows[observed], fold_ids[observed]
            if rows.size < 2 * settings["inner_folds"] or np.unique(fold_ids).size < 2:
                log.warning("%s: outcome %s repeat %d has only %d subjects with a value; not evaluated",
                            desc, name, repeat, rows.size)
                continue
            for fold in np.unique(fold_ids):
                train, test = rows[fold_ids != fold], rows[fold_ids == fold]
                label = f"outcome {name}, repeat {repeat}, fold {fold}"
                tasks.append(delayed(_fit_predict)(make(kind), X, y, train, test, label))
                pieces.append((name, int(repeat), test, y[test]))
    frames = []
    # One BLAS thread per fit (joblib's workers get the same): the matrices are small, and threaded
    # BLAS on a busy machine is many times slower than one thread.
    with threadpool_limits(1):
        results = Parallel(n_jobs=n_jobs, return_as="generator")(tasks)
        if show_progress:
            results = progress(results, desc=desc, total=len(tasks), unit="fit")
        for (name, repeat, test, observed), predicted in zip(pieces, results):
            frames.append(pd.DataFrame({"sid": [sids[i] for i in test], "outcome": name, "repeat": repeat,
                                        "observed": observed, "predicted": predicted}))
    if not frames:
        return pd.DataFrame(columns=list(PREDICTION_COLUMNS))
    order = {name: i for i, name in enumerate(targets)}
    predictions = pd.concat(frames, ignore_index=True)
    predictions["_order"] = predictions["outcome"].map(order)
    predictions["_row"] = predictions["sid"].map(row_of)
    predictions = predictions.sort_values(["_order", "repeat", "_row"], kind="stable")
    return predictions.drop(columns=["_order", "_row"]).reset_index(drop=True)


def score(predictions, kinds: Mapping[str, str]):
    """Per outcome and repeat: ``r2`` (regression) or ``acc`` and ``acc1off`` (ordinal).

    Returns:
        DataFrame ``outcome, metric, repeat, value, n``.
    """
    import pandas as pd
    from sklearn.metrics import r2_score

    from models.heads import accuracy, one_off_accuracy

    rows = []
    for (name, repeat), group in predictions.groupby(["outcome", "repeat"], sort=False):
        observed = group["observed"].to_numpy(dtype=float)
        predicted = group["predicted"].to_numpy(dtype=float)
        n = int(observed.size)
        if kinds[name] == "regression":
            rows.append((name, "r2", repeat, float(r2_score(observed, predicted)), n))
        else:
            rows.append((name, "acc", repeat, accuracy(observed, predicted), n))
            rows.append((name, "acc1off", repeat, one_off_accuracy(observed, predicted), n))
    return pd.DataFrame(rows, columns=list(METRIC_COLUMNS))


def readout_factors(truth):
    """The latent factors to read out, as a numeric DataFrame indexed like ``truth``.

    Numeric, non-constant columns defined for every subject (a factor that only some subjects
    have, like a site's padding value, is not a property of every image), plus two-level text
    factors such as the reconstruction kernel, coded 0/1 as ``<name>=<second level>``. The
    oracle factors come first.
    """
    import pandas as pd

    columns = {}
    for name in truth.columns:
        values = truth[name]
        if values.isna().any() or values.nunique() < 2:
            continue
        if values.dtype.kind in "fiu":
            columns[name] = values.astype(float)
        elif name in BINARY_FACTORS and values.nunique() == 2:
            levels = sorted(values.unique())
            columns[f"{name}={levels[1]}"] = (values == levels[1]).astype(float)
    order = [c for c in ORACLE_FACTORS if c in columns] + [c for c in columns if c not in ORACLE_FACTORS]
    return pd.DataFrame({c: columns[c] for c in order}, index=truth.index)


def evaluate(sids: Sequence[str], X: np.ndarray, folds, phenotypes, settings: Mapping[str, Any],
             truth=None, n_jobs: int = 1, desc: str = "evaluate"):
    """Run the whole evaluation of one feature table.

    Args:
        sids, X: subject IDs ``[N]`` and features ``[N, D]``.
        folds: DataFrame ``sid, repeat, fold``.
        phenotypes: DataFrame indexed by sid (see :func:`pipeline.folds.read_table`).
        settings: the ``evaluate`` settings.
        truth: optional truth DataFrame indexed by sid (synthetic cohorts).

    Returns:
        (metrics, predictions, readout) DataFrames with the columns of the output files.
    """
    import pandas as pd

    folded = set(folds["sid"])
    without = sorted(folded - set(sids))
    if without:
        log.warning("%s: %d subject(s) of the folds have no features and are left out (e.g. %s)",
                    desc, len(without), without[0])
    outcomes = outcomes_from_settings(settings)
    targets = {o.name: (o.kind, outcome_values(phenotypes, o, sids)) for o in outcomes}
    predictions = cross_validate(sids, X, folds, targets, settings, n_jobs=n_jobs, desc=desc)
    metrics = score(predictions, {name: kind for name, (kind, _) in targets.items()})
    readout = pd.DataFrame(columns=list(READOUT_COLUMNS))
    if truth is not None:
        factor_table = readout_factors(truth)
        factors = list(factor_table.columns)
        factor_targets = {f: ("regression", factor_table[f].reindex(list(sids))) for f in factors}
        factor_predictions = cross_validate(sids, X, folds, factor_targets, settings, n_jobs=n_jobs,
                                            desc=f"{desc} read-out")
        factor_metrics = score(factor_predictions, dict.fromkeys(factors, "regression"))
        readout = factor_metrics.rename(columns={"outcome": "factor", "value": "r2"})[list(READOUT_COLUMNS)]
    return metrics, predictions, readout


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--features", required=True, nargs="+", action="extend", metavar="TSV",
                        help="feature TSV (sid + feature columns); several (or --features repeated): joined "
                             "column-wise on sid, keeping the subjects that are in all of them")
    parser.add_argument("--folds", required=True, help="folds TSV (work/folds.tsv)")
    parser.add_argument("--phenotypes", required=True, help="phenotypes TSV (sid + COPDGene columns)")
    parser.add_argument("--truth", help="truth TSV of a synthetic cohort: also write the latent-factor read-out")
    parser.add_argument("--name", default="", help="name of the feature set (run or baseline), for the log")
    parser.add_argument("--pooling", default="", help="pooling of the feature set, for the log")
    parser.add_argument("--out-dir", required=True, help="directory for metrics.tsv, predictions.tsv, readout.tsv")
    parser.add_argument("--jobs", type=int, default=1,
                        help="head fits run in parallel worker processes (default: %(default)s; worth it "
                             "for thousands of subjects, where the fits outweigh the workers' start-up)")


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import stage_settings
    from pipeline.files import write_tsv
    from pipeline.folds import read_table

    jobs = args.jobs
    if jobs < 1:
        raise ConfigError(f"--jobs must be >= 1, got {jobs}")
    settings = stage_settings(args, "evaluate")
    label = "/".join(p for p in (args.name, args.pooling) if p) or "+".join(Path(f).stem for f in args.features)
    sids, X = read_features(args.features, desc=f"evaluate {label}")
    folds = read_folds(args.folds)
    phenotypes = read_table(args.phenotypes, "phenotypes")
    truth = read_table(args.truth, "truth") if args.truth else None
    metrics, predictions, readout = evaluate(sids, X, folds, phenotypes, settings, truth=truth,
                                             n_jobs=jobs, desc=f"evaluate {label}")
    out = Path(args.out_dir)
    write_tsv(out / "metrics.tsv", metrics)
    write_tsv(out / "predictions.tsv", predictions)
    write_tsv(out / "readout.tsv", readout)
    summary = metrics.groupby(["outcome", "metric"], sort=False)["value"].agg(["mean", "std"])
    for (outcome, metric), row in summary.iterrows():
        log.info("%s: %s %s = %.3f ± %.3f", label, outcome, metric, row["mean"], np.nan_to_num(row["std"]))
    return 0
