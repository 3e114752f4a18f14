"""The report's numbers: which feature sets exist, their metrics summarised over CV repeats,
the latent-factor read-out, QC exclusions, run times and provenance.

Everything here reads files through :class:`~pipeline.layout.Layout` and returns plain data
(dataclasses, DataFrames, dicts); nothing is rendered. A missing file is not an error: the piece
is left out and a note says why.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import pandas as pd

from pipeline.feature_sets import FeatureSet
from pipeline.layout import Layout

PACKAGES = ("copdssl", "torch", "monai", "torch-geometric", "snakemake", "SimpleITK", "statsmodels", "scikit-learn",
            "numpy", "scipy", "pandas", "matplotlib", "nibabel", "pydicom", "jsonschema", "PyYAML")
STAGE_ORDER = ("cohort", "manifest", "ingest", "lung", "atlas", "register", "patches", "qc", "train", "embed",
               "train-graph", "train_graph", "pool", "baseline", "folds", "evaluate", "locmap", "report")
HIGHER_IS_BETTER = MappingProxyType({"r2": True, "acc": True, "acc1off": True})


@dataclass(frozen=True)
class Column:
    """One outcome metric column of the main table."""

    outcome: str
    metric: str  # r2 | acc | acc1off

    @property
    def label(self) -> str:
        return {"r2": f"{self.outcome} R²", "acc": f"{self.outcome} acc", "acc1off": f"{self.outcome} 1-off"}[self.metric]

    @property
    def percent(self) -> bool:
        return self.metric != "r2"


@dataclass
class MainTable:
    """Rows x columns of (mean, sd, repeats) cells; ``best`` marks the best non-oracle row per column;
    ``gain`` is, for a combined row, its mean minus its baseline's mean (what the run adds to it)."""

    rows: list[FeatureSet]
    columns: list[Column]
    cells: dict[tuple[str, Column], tuple[float, float, int]] = field(default_factory=dict)
    best: dict[Column, set[str]] = field(default_factory=dict)
    gain: dict[tuple[str, Column], float] = field(default_factory=dict)


def metric_columns(outcomes: Mapping[str, Mapping[str, Any]]) -> list[Column]:
    """R² for regression outcomes, accuracy and one-off accuracy for ordinal ones (config order)."""
    columns = []
    for name, spec in outcomes.items():
        if spec["kind"] == "regression":
            columns.append(Column(name, "r2"))
        else:
            columns += [Column(name, "acc"), Column(name, "acc1off")]
    return columns


def read_tsv(path) -> pd.DataFrame | None:
    """A TSV as a DataFrame, or ``None`` when the file is missing or empty."""
    try:
        if path.stat().st_size == 0:
            return None
        return pd.read_csv(path, sep="\t", dtype={"sid": str}, keep_default_na=True)
    except (FileNotFoundError, pd.errors.EmptyDataError):
        return None


def load_results(layout: Layout, sets: Sequence[FeatureSet], what: str) -> dict[str, pd.DataFrame]:
    """``what`` (``metrics``, ``predictions`` or ``readout``) of each feature set that has it, by key."""
    path_of = {"metrics": layout.metrics, "predictions": layout.predictions, "readout": layout.readout}[what]
    found = {}
    for s in sets:
        frame = read_tsv(path_of(s.name, s.pooling))
        if frame is not None and not frame.empty:
            found[s.key] = frame
    return found


def summarise(values: pd.Series) -> tuple[float, float, int]:
    """(mean, sample sd or NaN for one value, count) of the per-repeat values."""
    values = values.dropna().astype(float)
    sd = float(values.std(ddof=1)) if len(values) > 1 else math.nan
    return float(values.mean()), sd, int(len(values))


def main_table(sets: Sequence[FeatureSet], metrics: Mapping[str, pd.DataFrame], columns: Sequence[Column]) -> MainTable:
    """The rows with metrics, their mean ± sd cells, the best non-oracle row per column, and each
    combined row's gain over its baseline alone."""
    rows = [s for s in sets if s.key in metrics]
    table = MainTable(rows=rows, columns=list(columns))
    for s in rows:
        frame = metrics[s.key]
        for column in columns:
            values = frame.loc[(frame["outcome"] == column.outcome) & (frame["metric"] == column.metric), "value"]
            if not values.dropna().empty:
                table.cells[(s.key, column)] = summarise(values)
    for column in columns:
        candidates = {s.key: table.cells[(s.key, column)][0] for s in rows
                      if s.kind != "oracle" and (s.key, column) in table.cells}
        if candidates:
            best = max(candidates.values()) if HIGHER_IS_BETTER[column.metric] else min(candidates.values())
            table.best[column] = {k for k, v in candidates.items() if math.isclose(v, best, rel_tol=0, abs_tol=1e-12)}
    for s in rows:
        for column in columns:
            if s.kind == "combined" and (s.key, column) in table.cells and (s.base_key, column) in table.cells:
                table.gain[(s.key, column)] = table.cells[(s.key, column)][0] - table.cells[(s.base_key, column)][0]
    return table


def best_run(table: MainTable, column: Column) -> FeatureSet | None:
    """The run (not a baseline or the oracle) with the best mean in ``column``."""
    scored = [(table.cells[(s.key, column)][0], s) for s in table.rows
              if s.kind == "run" and (s.key, column) in table.cells]
    if not scored:
        return None
    return max(scored, key=lambda item: item[0])[1]


def readout_table(sets: Sequence[FeatureSet], readouts: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """Rows = feature sets with a read-out, columns = latent factors, cells = (mean, sd) of R²."""
    factors: list[str] = []
    for frame in readouts.values():
        factors += [f for f in frame["factor"].drop_duplicates() if f not in factors]
    data = {}
    for s in sets:
        if s.key in readouts:
            frame = readouts[s.key]
            data[s.label] = {f: summarise(frame.loc[frame["factor"] == f, "r2"])[:2] for f in factors
                             if (frame["factor"] == f).any()}
    return pd.DataFrame.from_dict(data, orient="index", columns=factors)


def qc_summary(layout: Layout) -> tuple[pd.DataFrame | None, dict[str, int]]:
    """The QC table (``""`` for missing cells) and subject counts per status; ``(None, {})`` without one."""
    qc = read_tsv(layout.qc_table())
    if qc is None or "status" not in qc.columns:
        return None, {}
    counts = {str(k): int(v) for k, v in qc["status"].value_counts().items()}
    text = [c for c in ("sid", "status", "failed_stage", "reason", "flag_reason") if c in qc.columns]
    qc[text] = qc[text].fillna("")
    return qc.reset_index(drop=True), counts


def outcome_counts(metrics: Mapping[str, pd.DataFrame], outcomes: Sequence[str]) -> dict[str, tuple[int, int]]:
    """Per outcome, the (smallest, largest) number of evaluated subjects over feature sets and repeats."""
    counts = {}
    for outcome in outcomes:
        ns = [int(n) for frame in metrics.values() for n in frame.loc[frame["outcome"] == outcome, "n"].dropna()]
        if ns:
            counts[outcome] = (min(ns), max(ns))
    return counts


def stage_runtimes(layout: Layout) -> pd.DataFrame:
    """Per stage: number of jobs, summed wall time (s) and peak RSS (MB) from Snakemake benchmark TSVs."""
    rows = []
    root = layout.work / "benchmarks"
    for stage_dir in sorted(p for p in root.glob("*") if p.is_dir()) if root.is_dir() else []:
        seconds, peak, jobs = 0.0, math.nan, 0
        for path in sorted(stage_dir.glob("*.tsv")):
            frame = read_tsv(path)
            if frame is None or "s" not in frame.columns:
                continue
            jobs += 1
            seconds += float(pd.to_numeric(frame["s"], errors="coerce").fillna(0).sum())
            if "max_rss" in frame.columns:
                rss = pd.to_numeric(frame["max_rss"], errors="coerce").max()
                if rss == rss:
                    peak = rss if peak != peak else max(peak, rss)
        if jobs:
            rows.append({"stage": stage_dir.name, "jobs": jobs, "seconds": seconds, "max_rss_mb": peak})
    order = {s: i for i, s in enumerate(STAGE_ORDER)}
    rows.sort(key=lambda r: (order.get(r["stage"], len(order)), r["stage"]))
    return pd.DataFrame(rows, columns=["stage", "jobs", "seconds", "max_rss_mb"])


def config_hash(config: Mapping[str, Any]) -> str:
    """sha256 of the canonical JSON of the config (sorted keys, no whitespace)."""
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def package_versions(packages: Sequence[str] = PACKAGES) -> dict[str, str]:
    """Installed version of each distribution (metadata only; nothing is imported)."""
    from importlib import metadata

    versions = {}
    for name in packages:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def provenance(config: Mapping[str, Any]) -> dict[str, Any]:
    import platform

    return {
        "config_sha256": config_hash(config),
        "versions": package_versions(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"),
    }
