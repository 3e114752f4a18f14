"""Small pieces the benchmark scripts share: machine facts, the JSON result, the markdown table."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def machine() -> dict[str, Any]:
    """CPU count and model, memory, platform, Python and the load average now (timings on a loaded
    machine are pessimistic)."""
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "unknown CPU"
    memory_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": round(memory_gib, 1),
            "platform": platform.platform(), "python": platform.python_version(), "load_avg": os.getloadavg()}


def describe_machine() -> str:
    """One line for a report: "2 CPUs (model), 24 GiB RAM, platform, Python x.y.z"."""
    facts = machine()
    return (f"{facts['cpus']} CPUs ({facts['cpu_model']}), {facts['memory_gib']:.0f} GiB RAM, {facts['platform']}, "
            f"Python {facts['python']}")


def write_result(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """A right-aligned markdown table of ``rows`` with ``columns`` given as (key, header) pairs."""
    lines = ["| " + " | ".join(header for _, header in columns) + " |",
             "|" + "---:|" * len(columns)]
    lines += ["| " + " | ".join(str(row[key]) for key, _ in columns) + " |" for row in rows]
    return "\n".join(lines)


def read_out_factors(features, truth, factors: Sequence[str]) -> dict[str, list[float]]:
    """Out-of-fold R² of each truth column in ``factors`` from a subject feature table.

    ``StandardScaler + RidgeCV`` (alphas 1e-3 .. 1e4), 5-fold CV repeated 3 times (seed 0), the
    subjects of ``features`` (a DataFrame indexed by sid) looked up in ``truth`` (indexed by sid).

    Returns:
        factor -> [mean, sd] of the 15 fold R² values, rounded to 3 decimals.
    """
    import numpy as np
    from sklearn.linear_model import RidgeCV
    from sklearn.model_selection import RepeatedKFold, cross_val_score
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    out = {}
    for factor in factors:
        model = make_pipeline(StandardScaler(), RidgeCV(alphas=np.logspace(-3, 4, 15)))
        scores = cross_val_score(model, features, truth.loc[features.index, factor],
                                 cv=RepeatedKFold(n_splits=5, n_repeats=3, random_state=0), scoring="r2")
        out[factor] = [round(float(scores.mean()), 3), round(float(scores.std(ddof=1)), 3)]
    return out
