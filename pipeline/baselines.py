"""Stage ``baseline``: feature tables of the non-learned reference feature sets.

- ``densitometry``: the classical quantitative-CT summary of the whole lung, from
  ``work/density/{sid}.json`` (written by the ``lung`` stage): LAA-950 and LAA-910 (% of lung
  voxels below -950 / -910 HU), Perc15 (HU), lung volume (L) and mean lung density (HU).
- ``oracle``: the true latent disease factors ``cle, pse, awt`` of a synthetic cohort, from its
  ``truth.tsv``: an upper bound for what any image feature can explain.

Both tables have the format of the pooled run features (``sid`` + one column per feature, one row
per subject that passed QC), so the ``evaluate`` stage treats them the same way.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from pipeline.errors import ConfigError, SubjectError
from pipeline.layout import Layout

log = logging.getLogger(__name__)

DENSITOMETRY_KEYS = ("laa950", "laa910", "perc15", "volume_l", "mean_hu")
ORACLE_FACTORS = ("cle", "pse", "awt")
BASELINES = ("densitometry", "oracle")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, choices=BASELINES, help="which baseline feature table")
    parser.add_argument("--subjects", required=True, help="screened subjects TSV (work/subjects.tsv)")
    parser.add_argument("--work", default="work", help="work directory (default: %(default)s)")
    parser.add_argument("--truth", help="truth TSV of a synthetic cohort (oracle; default: cohort.truth)")
    parser.add_argument("--out", required=True, help="feature TSV to write")


def densitometry_row(sid: str, density: dict) -> list[float]:
    """Whole-lung densitometry features of one subject ``[5]`` in :data:`DENSITOMETRY_KEYS` order."""
    import math

    total = density.get("total")
    if not isinstance(total, dict):
        raise SubjectError(sid, "densitometry JSON has no 'total' section", stage="baseline")
    row = []
    for key in DENSITOMETRY_KEYS:
        value = total.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SubjectError(sid, f"densitometry value total.{key} is {value!r}, expected a finite number",
                               stage="baseline")
        row.append(float(value))
    return row


def densitometry_features(layout: Layout, sids: Sequence[str]):
    """DataFrame ``sid, laa950, laa910, perc15, volume_l, mean_hu`` (one row per subject)."""
    import json

    import pandas as pd

    rows = []
    for sid in sids:
        path = layout.density(sid)
        try:
            density = json.loads(path.read_text())
        except FileNotFoundError:
            raise SubjectError(sid, f"densitometry file {path} is missing", stage="baseline") from None
        except json.JSONDecodeError as error:
            raise SubjectError(sid, f"densitometry file {path} is not valid JSON ({error.msg})", stage="baseline") from None
        rows.append([sid, *densitometry_row(sid, density)])
    return pd.DataFrame(rows, columns=["sid", *DENSITOMETRY_KEYS])


def oracle_features(truth, sids: Sequence[str]):
    """DataFrame ``sid, cle, pse, awt`` from a truth table indexed by sid (see ``read_table``)."""
    import numpy as np
    import pandas as pd

    missing = [f for f in ORACLE_FACTORS if f not in truth.columns]
    if missing:
        raise ConfigError(f"truth table lacks latent factor column(s): {', '.join(missing)}")
    absent = [sid for sid in sids if sid not in truth.index]
    if absent:
        raise SubjectError(absent[0], "has no row in the truth table", stage="baseline")
    table = truth.loc[list(sids), list(ORACLE_FACTORS)]
    for factor in ORACLE_FACTORS:
        numbers = pd.to_numeric(table[factor], errors="coerce").to_numpy(dtype=float)
        bad = table.index[~np.isfinite(numbers)]
        if len(bad):
            raise SubjectError(bad[0], f"truth value {factor} = {table.at[bad[0], factor]!r} is not a finite number",
                               stage="baseline")
        table[factor] = numbers
    table.index.name = "sid"
    return table.reset_index()


def run(args: argparse.Namespace) -> int:
    from pipeline.files import write_tsv
    from pipeline.folds import QC_STAGE, read_table
    from pipeline.status import passed_subjects
    from pipeline.manifest import read_subjects

    layout = Layout(work=Path(args.work))
    sids = passed_subjects(layout, [s.sid for s in read_subjects(args.subjects)], QC_STAGE)
    if args.name == "densitometry":
        table = densitometry_features(layout, sids)
    else:
        truth_path = args.truth
        if not truth_path:
            from pipeline.cli import stage_settings

            truth_path = stage_settings(args, None).get("cohort", {}).get("truth")
        if not truth_path:
            raise ConfigError("config key 'cohort.truth': the oracle baseline needs a truth table (--truth)")
        table = oracle_features(read_table(truth_path, "truth"), sids)
    write_tsv(args.out, table)
    log.info("baseline %s: %d subjects x %d features -> %s", args.name, len(table), table.shape[1] - 1, args.out)
    return 0
