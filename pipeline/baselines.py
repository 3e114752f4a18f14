"""Stage ``baseline``: feature tables of the non-learned reference feature sets.

- ``densitometry``: the classical quantitative-CT summary of the whole lung, from
  ``work/density/{sid}.json`` (written by the ``lung`` stage): LAA-950 and LAA-910 (% of lung
  voxels below -950 / -910 HU), Perc15 (HU), lung volume (L) and mean lung density (HU).
- ``patchstats``: five simple statistics of each stored patch (``work/patches/{sid}.npy``),
  averaged over the grid locations: mean HU, % of voxels below -950 and below -910 HU, the 15th
  percentile and the within-patch standard deviation (:func:`patch_statistics`). What a learned
  encoder of the same patches must beat.
- ``airway``: densitometry *plus* the ``high_attenuation`` section of the densitometry JSON
  (:func:`pipeline.densitometry.high_attenuation`: the share of eroded-lung voxels above -700 ...
  -100 HU, the 85th ... 99th percentiles and the eroded-lung mean), which sees airway walls and
  vessels: the hand-crafted best effort.
- ``oracle``: the true latent disease factors ``cle, pse, awt`` of a synthetic cohort, from its
  ``truth.tsv``: an upper bound for what any image feature can explain.

All tables have the format of the pooled run features (``sid`` + one column per feature, one row
per subject that passed QC), so the ``evaluate`` stage treats them the same way. The names, their
pooling labels (``results/<name>/<pooling>/``) and report labels are defined here only
(:data:`BASELINE_POOLING`, :data:`BASELINE_LABELS`), and so is the name of a combined feature set
"baseline + run" (:func:`combined_name`).
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path
from types import MappingProxyType

import numpy as np

from pipeline.densitometry import HIGH_ATTENUATION_KEYS, HIGH_ATTENUATION_SECTION
from pipeline.errors import ConfigError, SubjectError
from pipeline.layout import Layout

log = logging.getLogger(__name__)

DENSITOMETRY_KEYS = ("laa950", "laa910", "perc15", "volume_l", "mean_hu")
PATCHSTATS_KEYS = ("patch_mean_hu", "patch_laa950", "patch_laa910", "patch_perc15", "patch_sd_hu")
AIRWAY_KEYS = (*DENSITOMETRY_KEYS, *HIGH_ATTENUATION_KEYS)
ORACLE_FACTORS = ("cle", "pse", "awt")
# Baseline name -> its pooling label, the second level of results/<name>/<pooling>/ (the one
# definition the Snakefile and the report import). In the config's order of evaluate.baselines.
BASELINE_POOLING = MappingProxyType({"densitometry": "lung", "patchstats": "patches", "airway": "lung",
                                     "oracle": "truth"})
BASELINES = tuple(BASELINE_POOLING)
# How the report names each baseline.
BASELINE_LABELS = MappingProxyType({"densitometry": "densitometry", "patchstats": "patch statistics",
                                    "airway": "hand-crafted airway / high-attenuation", "oracle": "oracle"})
# Joins a baseline and a run into a combined feature set's name. Run names cannot hold it (schema
# pattern ^[A-Za-z0-9][A-Za-z0-9._-]*$), so the name splits back unambiguously; it is safe in paths.
COMBINE_SEPARATOR = "+"
PATCH_CHUNK = 64  # locations read from the memory-mapped patches at a time


def combined_name(baseline: str, run: str) -> str:
    """Name of the feature set "``baseline``'s features joined to ``run``'s" (``densitometry+moco``);
    its results live in ``results/<combined name>/<run's pooling>/``."""
    if baseline not in BASELINE_POOLING:
        raise ValueError(f"unknown baseline {baseline!r}; expected one of {', '.join(BASELINES)}")
    if not run or COMBINE_SEPARATOR in run:
        raise ValueError(f"run name {run!r} cannot be combined (empty or contains {COMBINE_SEPARATOR!r})")
    return f"{baseline}{COMBINE_SEPARATOR}{run}"


def split_combined(name: str) -> tuple[str, str] | None:
    """``(baseline, run)`` of a combined feature set's name, or ``None`` for any other name."""
    baseline, separator, run = name.partition(COMBINE_SEPARATOR)
    if not separator or baseline not in BASELINE_POOLING or not run:
        return None
    return baseline, run


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--name", required=True, choices=BASELINES, help="which baseline feature table")
    parser.add_argument("--subjects", required=True, help="screened subjects TSV (work/subjects.tsv)")
    parser.add_argument("--work", default="work", help="work directory (default: %(default)s)")
    parser.add_argument("--truth", help="truth TSV of a synthetic cohort (oracle; default: cohort.truth)")
    parser.add_argument("--out", required=True, help="feature TSV to write")


def section_row(sid: str, density: dict, section: str, keys: Sequence[str]) -> list[float]:
    """The values of ``keys`` in one section of a subject's densitometry JSON, checked finite."""
    import math

    values = density.get(section)
    if not isinstance(values, dict):
        hint = " (written by an older lung stage: rerun the lung stage)" if section == HIGH_ATTENUATION_SECTION else ""
        raise SubjectError(sid, f"densitometry JSON has no '{section}' section{hint}", stage="baseline")
    row = []
    for key in keys:
        value = values.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise SubjectError(sid, f"densitometry value {section}.{key} is {value!r}, expected a finite number",
                               stage="baseline")
        row.append(float(value))
    return row


def densitometry_row(sid: str, density: dict) -> list[float]:
    """Whole-lung densitometry features of one subject ``[5]`` in :data:`DENSITOMETRY_KEYS` order."""
    return section_row(sid, density, "total", DENSITOMETRY_KEYS)


def airway_row(sid: str, density: dict) -> list[float]:
    """Densitometry and high-attenuation features of one subject ``[15]`` in :data:`AIRWAY_KEYS` order."""
    return densitometry_row(sid, density) + section_row(sid, density, HIGH_ATTENUATION_SECTION,
                                                         HIGH_ATTENUATION_KEYS)


def _read_density(layout: Layout, sid: str) -> dict:
    import json

    path = layout.density(sid)
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise SubjectError(sid, f"densitometry file {path} is missing", stage="baseline") from None
    except json.JSONDecodeError as error:
        raise SubjectError(sid, f"densitometry file {path} is not valid JSON ({error.msg})", stage="baseline") from None


def densitometry_features(layout: Layout, sids: Sequence[str]):
    """DataFrame ``sid, laa950, laa910, perc15, volume_l, mean_hu`` (one row per subject)."""
    import pandas as pd

    rows = [[sid, *densitometry_row(sid, _read_density(layout, sid))] for sid in sids]
    return pd.DataFrame(rows, columns=["sid", *DENSITOMETRY_KEYS])


def airway_features(layout: Layout, sids: Sequence[str]):
    """DataFrame ``sid`` + :data:`AIRWAY_KEYS` (densitometry, then the high-attenuation statistics)."""
    import pandas as pd

    rows = [[sid, *airway_row(sid, _read_density(layout, sid))] for sid in sids]
    return pd.DataFrame(rows, columns=["sid", *AIRWAY_KEYS])


def patch_statistics(patches: np.ndarray, chunk: int = PATCH_CHUNK) -> np.ndarray:
    """Five statistics of every patch, averaged over the locations.

    Per patch (all ``S³`` voxels, whatever HU range the patches were clipped to): mean HU, % of
    voxels below -950 HU and below -910 HU (strictly), the 15th percentile (inverted CDF: the
    ``ceil(0.15 S³)``-th smallest value, as densitometry's Perc15) and the standard deviation
    (population, ``ddof=0``); then the mean of each over the ``P`` locations.

    Args:
        patches: integer HU ``[P, S, S, S]`` (a memory map is read ``chunk`` locations at a time).

    Returns:
        float64 ``[5]`` in :data:`PATCHSTATS_KEYS` order.

    Raises:
        ValueError: not a non-empty integer ``[P, ...]`` array.
    """
    if patches.ndim < 2 or patches.shape[0] == 0 or patches[0].size == 0:
        raise ValueError(f"patches must be a non-empty [P, S, S, S] array, got shape {patches.shape}")
    if not np.issubdtype(patches.dtype, np.integer):
        raise ValueError(f"patches must hold integer HU values, got dtype {patches.dtype}")
    n_locations, voxels = patches.shape[0], patches[0].size
    k = -(-15 * voxels // 100) - 1  # 0-based rank of the 15th percentile
    sums = np.zeros(5)
    for start in range(0, n_locations, chunk):
        block = np.asarray(patches[start:start + chunk]).reshape(-1, voxels)  # [c, S³] integer HU
        values = block.astype(np.float64)
        sums += [values.mean(axis=1).sum(),
                 100.0 * (block < -950).mean(axis=1).sum(),
                 100.0 * (block < -910).mean(axis=1).sum(),
                 np.partition(block, k, axis=1)[:, k].astype(np.float64).sum(),
                 values.std(axis=1).sum()]
    return sums / n_locations


def patchstats_features(layout: Layout, sids: Sequence[str]):
    """DataFrame ``sid`` + :data:`PATCHSTATS_KEYS` from ``work/patches/{sid}.npy`` (one row per subject)."""
    import pandas as pd

    rows = []
    for sid in sids:
        path = layout.patches(sid)
        try:
            patches = np.load(path, mmap_mode="r", allow_pickle=False)
        except FileNotFoundError:
            raise SubjectError(sid, f"patches file {path} is missing", stage="baseline") from None
        except (OSError, ValueError) as error:
            raise SubjectError(sid, f"patches file {path} cannot be read ({error})", stage="baseline") from None
        try:
            rows.append([sid, *patch_statistics(patches)])
        except ValueError as error:
            raise SubjectError(sid, f"patches file {path}: {error}", stage="baseline") from None
        finally:
            del patches
    return pd.DataFrame(rows, columns=["sid", *PATCHSTATS_KEYS])


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
    from pipeline.status import passed_in_stage_table
    from pipeline.manifest import read_subjects

    layout = Layout(work=Path(args.work))
    sids = passed_in_stage_table(layout, [s.sid for s in read_subjects(args.subjects)], QC_STAGE)
    if args.name == "densitometry":
        table = densitometry_features(layout, sids)
    elif args.name == "airway":
        table = airway_features(layout, sids)
    elif args.name == "patchstats":
        table = patchstats_features(layout, sids)
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
