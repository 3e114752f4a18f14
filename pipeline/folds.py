"""Stage ``folds``: the cross-validation folds shared by every row of the report.

The folds are made once, over the subjects whose ``patches`` stage succeeded, so that every
feature set (densitometry, each run and pooling, the oracle) is evaluated on the same subjects
and the same splits. There are ``repeats`` independent, seeded ``n_folds``-fold splits,
stratified on one phenotype column (``evaluate.stratify``, the visual emphysema score by
default). Subjects with a missing stratum value form their own stratum; strata smaller than
``n_folds`` are merged with their nearest neighbour in sorted order (missing sorts last) until
every stratum can be spread over all folds.

Output (``work/folds.tsv``), long format: ``sid, repeat, fold`` with one row per subject and
repeat.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import ConfigError, SubjectError
from pipeline.layout import Layout
from pipeline.status import passed_in_stage_table

log = logging.getLogger(__name__)

QC_STAGE = "patches"  # the last per-subject stage: a subject that passed it has all its inputs


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subjects", required=True, help="screened subjects TSV (work/subjects.tsv)")
    parser.add_argument("--work", default="work", help="work directory (default: %(default)s)")
    parser.add_argument("--phenotypes", required=True, help="phenotypes TSV (sid + COPDGene columns)")
    parser.add_argument("--out", required=True, help="folds TSV to write (work/folds.tsv)")


def merge_small_strata(values: Sequence, min_count: int) -> list[int]:
    """Stratum code per subject, merging strata with fewer than ``min_count`` members.

    Args:
        values: one stratum value per subject (numbers or strings; ``None``/NaN = missing).
        min_count: smallest allowed stratum size (the number of folds).

    Returns:
        codes ``[n]``: equal codes share a stratum. Distinct values are sorted (numerically when
        all non-missing values are numbers, else as text), missing last; the smallest stratum is
        repeatedly merged into its smaller adjacent stratum until all have ``min_count`` members
        or a single stratum is left.
    """
    keys = [_stratum_key(v) for v in values]
    numeric = all(isinstance(k, float) for k in keys if k is not None)
    distinct = sorted({k for k in keys if k is not None}, key=(float if numeric else str))
    if any(k is None for k in keys):
        distinct.append(None)
    groups = [[k] for k in distinct]  # adjacent values, in order
    sizes = [sum(1 for key in keys if key == k) for k in distinct]
    while len(groups) > 1 and min(sizes) < min_count:
        i = sizes.index(min(sizes))
        if i == 0:
            j = 1
        elif i == len(groups) - 1:
            j = i - 1
        else:
            j = i - 1 if sizes[i - 1] <= sizes[i + 1] else i + 1
        lo, hi = min(i, j), max(i, j)
        groups[lo:hi + 1] = [groups[lo] + groups[hi]]
        sizes[lo:hi + 1] = [sizes[lo] + sizes[hi]]
    code_of = {k: code for code, group in enumerate(groups) for k in group}
    return [code_of[k] for k in keys]


def _stratum_key(value):
    """``None`` for missing, a float for numbers (also numeric text), else the stripped text."""
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text == "" or text.lower() in ("na", "nan", "n/a", "none"):
            return None
        try:
            return float(text)
        except ValueError:
            return text
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    return None if number != number else number  # NaN -> missing


def make_folds(sids: Sequence[str], strata: Sequence, n_folds: int, repeats: int, seed: int):
    """Seeded, stratified K-fold assignments, repeated.

    Args:
        sids: subject IDs ``[n]`` (unique).
        strata: stratum value per subject ``[n]`` (missing allowed, see :func:`merge_small_strata`).
        n_folds: folds per repeat (>= 2, <= n).
        repeats: independent splits (>= 1).
        seed: the split of repeat ``r`` is seeded from ``(seed, r)``.

    Returns:
        DataFrame ``sid, repeat, fold`` with ``n * repeats`` rows (repeat-major, subjects in input order).
    """
    import numpy as np
    import pandas as pd
    from sklearn.model_selection import StratifiedKFold

    if isinstance(n_folds, bool) or not isinstance(n_folds, int) or n_folds < 2:
        raise ValueError(f"n_folds must be an integer >= 2, got {n_folds!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    sids = list(sids)
    if len(strata) != len(sids):
        raise ValueError(f"got {len(strata)} strata for {len(sids)} subjects")
    if len(set(sids)) != len(sids):
        duplicate = next(s for s in sids if sids.count(s) > 1)
        raise SubjectError(duplicate, "listed twice among the subjects to split into folds", stage="folds")
    if len(sids) < n_folds:
        raise ConfigError(f"config key 'evaluate.n_folds': {n_folds} folds need at least {n_folds} subjects, "
                          f"only {len(sids)} passed QC")
    codes = np.asarray(merge_small_strata(strata, n_folds))
    frames = []
    for repeat in range(repeats):
        split_seed = int(np.random.SeedSequence([seed, repeat]).generate_state(1)[0])
        splitter = StratifiedKFold(n_splits=n_folds, shuffle=True, random_state=split_seed)
        fold = np.empty(len(sids), dtype=np.int64)
        for index, (_, test) in enumerate(splitter.split(np.zeros((len(sids), 1)), codes)):
            fold[test] = index
        frames.append(pd.DataFrame({"sid": sids, "repeat": repeat, "fold": fold}))
    return pd.concat(frames, ignore_index=True)


MISSING_TEXT = ("", "na", "nan", "n/a", "none", "null", ".")


def read_table(path: str | Path, what: str):
    """Read a TSV with a ``sid`` column into a DataFrame indexed by sid (text, never NaN).

    Cells that are empty or spell a missing value (``NA``, ``nan``, ``.``...) become NaN; a
    column whose other cells all parse as numbers becomes numeric, any other column stays text
    (so that a stray word in a numeric column is reported by whoever uses it, not hidden).
    """
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{what} table {path} does not exist")
    frame = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
    if "sid" not in frame.columns:
        raise ConfigError(f"{what} table {path} has no 'sid' column")
    frame["sid"] = frame["sid"].str.strip()
    duplicated = frame["sid"][frame["sid"].duplicated()]
    if not duplicated.empty:
        raise SubjectError(duplicated.iloc[0], f"appears more than once in the {what} table {path}")
    for column in frame.columns.drop("sid"):
        text = frame[column].str.strip()
        text = text.mask(text.str.lower().isin(MISSING_TEXT))
        numbers = pd.to_numeric(text, errors="coerce")
        frame[column] = numbers if numbers.notna().sum() == text.notna().sum() else text
    return frame.set_index("sid")


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import stage_settings
    from pipeline.files import write_tsv
    from pipeline.manifest import read_subjects

    settings = stage_settings(args, "evaluate")
    layout = Layout(work=Path(args.work))
    sids = passed_in_stage_table(layout, [s.sid for s in read_subjects(args.subjects)], QC_STAGE)
    phenotypes = read_table(args.phenotypes, "phenotypes")
    column = settings.get("stratify") or ""
    if column and column not in phenotypes.columns:
        raise ConfigError(f"config key 'evaluate.stratify': column {column!r} is not in {args.phenotypes}")
    if column:
        strata = [phenotypes[column].get(sid) if sid in phenotypes.index else None for sid in sids]
    else:
        strata = [None] * len(sids)
    folds = make_folds(sids, strata, n_folds=settings["n_folds"], repeats=settings["repeats"], seed=settings["seed"])
    write_tsv(args.out, folds)
    log.info("folds: %d subjects, %d repeats x %d folds, stratified on %s -> %s",
             len(sids), settings["repeats"], settings["n_folds"], column or "nothing", args.out)
    return 0
