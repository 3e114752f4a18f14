"""Which feature sets a config evaluates: the one list that the workflow's targets and the report's rows share.

A feature set is a baseline (``pipeline.baselines``), a run x pooling, or a baseline's features
joined to a run's ("densitometry+moco", :func:`pipeline.baselines.combined_name`). The workflow
(pipeline/rules/common.smk) asks for ``results/<name>/<pooling>/`` of every one of them, and the
report (``pipeline.report``) draws one main-table row per set, in this module's order.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pipeline.baselines import BASELINE_LABELS, BASELINE_POOLING, combined_name
from pipeline.config import run_settings


@dataclass(frozen=True)
class FeatureSet:
    """One row of the main table: a run x pooling, a baseline, or a baseline + run x pooling.

    Attributes:
        name: run, baseline or combined name (the ``results/<name>/<pooling>/`` directory).
        pooling: ``mean``/``gnn`` for runs and combined sets, else the baseline's pooling label
            (``pipeline.baselines.BASELINE_POOLING``: ``lung``, ``patches``, ``truth``).
        kind: ``baseline``, ``run``, ``combined`` (a baseline's features joined to a run's) or ``oracle``.
        method: the baseline's name, or the run's ``random init``, ``moco``, ``ifm`` or ``ifm_only``.
        epsilon: the IFM epsilon of a run (0 for plain MoCo), else ``None``.
        base: the baseline of a combined set (``densitometry``), else ``None``.
        run: the run of a run or combined set, else ``None``.
    """

    name: str
    pooling: str
    kind: str
    method: str
    epsilon: float | None = None
    base: str | None = None
    run: str | None = None

    @property
    def title(self) -> str:
        """The feature set without its pooling: ``ifm_e0.5``, ``densitometry + ifm_e0.5``, a baseline's label."""
        if self.kind == "combined":
            return f"{BASELINE_LABELS.get(self.base, self.base)} + {self.run}"
        if self.kind == "run":
            return self.name
        return BASELINE_LABELS.get(self.name, self.name)

    @property
    def label(self) -> str:
        if self.kind in ("run", "combined"):
            return f"{self.title} / {self.pooling}"
        return self.title

    @property
    def base_key(self) -> str | None:
        """Key of the baseline row a combined set is compared with (``densitometry/lung``)."""
        return f"{self.base}/{BASELINE_POOLING[self.base]}" if self.kind == "combined" else None

    @property
    def key(self) -> str:
        return f"{self.name}/{self.pooling}"


def run_description(train: Mapping[str, Any]) -> tuple[str, float | None]:
    """(method, epsilon) of a run from its resolved training settings (``random init`` when it
    does not train; ``moco`` with epsilon 0 for plain InfoNCE)."""
    if train["epochs"] == 0:
        return "random init", None
    method = train["loss"]["method"]
    if method == "none":
        return "moco", 0.0
    return method, float(train["loss"]["epsilon"])


def feature_sets(config: Mapping[str, Any]) -> list[FeatureSet]:
    """The evaluated feature sets of a validated ``config``, in table order: the baselines
    (densitometry, patch statistics, airway), untrained runs, the other runs x poolings, each
    ``evaluate.combine_with`` baseline + every run x pooling (in the same order), oracle.

    gnn pooling rows exist only for runs whose graph stage is enabled; the oracle (as a baseline
    or a combined base) only when the cohort has a truth table.
    """
    evaluate = config["evaluate"]
    truth = config["cohort"]["truth"]
    sets = [FeatureSet(b, BASELINE_POOLING[b], "baseline", b) for b in BASELINE_POOLING
            if b in evaluate["baselines"] and b != "oracle"]
    runs = []
    for run in config["runs"]:
        train = run_settings(config, run)
        method, epsilon = run_description(train)
        for pooling in config["pool"]["methods"]:
            if pooling != "gnn" or train["graph"]["enabled"]:
                runs.append(FeatureSet(run, pooling, "run", method, epsilon, run=run))
    runs = [s for s in runs if s.method == "random init"] + [s for s in runs if s.method != "random init"]
    sets += runs
    for base in evaluate["combine_with"]:
        if base != "oracle" or truth:
            sets += [FeatureSet(combined_name(base, s.name), s.pooling, "combined", s.method, s.epsilon, base=base,
                                run=s.name) for s in runs]
    if "oracle" in evaluate["baselines"] and truth:
        sets.append(FeatureSet("oracle", BASELINE_POOLING["oracle"], "oracle", "oracle"))
    return sets
