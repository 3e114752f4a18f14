"""Per-subject stage status: how one bad subject is isolated from the others.

Every per-subject stage declares two outputs to Snakemake: its data file(s) and a status
JSON ``{work}/qc/{stage}/{sid}.json``. When the subject fails (a :class:`SubjectError`, or an
unexpected exception), the stage still succeeds from Snakemake's point of view: it writes the
status with ``"status": "failed"`` and the reason, and leaves an *empty* file (a tombstone) at
each data output. Downstream stages read the upstream status first and mark the subject
``"skipped"``; aggregate stages (atlas, train, folds, ...) simply leave it out. The DAG stays
static (no checkpoints), which keeps ``snakemake -n`` fast at 10,000 subjects, and fixing a raw
file makes Snakemake reprocess exactly that subject.
"""

from __future__ import annotations

import csv
import logging
import os
import traceback
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError, SubjectError
from pipeline.files import atomic_path, read_json, write_json

OK, FAILED, SKIPPED = "ok", "failed", "skipped"

log = logging.getLogger(__name__)


def read_status(path: str | os.PathLike) -> dict[str, Any]:
    """Read a status JSON written by :func:`run_subject_stage`."""
    return read_json(path)


def first_problem(status_paths: Iterable[str | os.PathLike]) -> dict[str, Any] | None:
    """The first upstream status that is not ``ok`` (or ``None`` when all are ok)."""
    for path in status_paths:
        status = read_status(path)
        if status.get("status") != OK:
            return status
    return None


def passed_subjects(layout, sids: Iterable[str], stage: str, missing: str = "error") -> list[str]:
    """The subjects (in the given order) whose ``stage`` status is ``ok``.

    The atlas (its sample's lung statuses) and ``copdssl apply`` pick subjects here; the aggregate
    stages of the workflow (train, embed, folds, pool, baselines) read the patches stage table
    instead (:func:`passed_in_stage_table`), which is built from these same files.

    Args:
        layout: :class:`pipeline.layout.Layout` of the work directory.
        sids: subject IDs to consider.
        stage: per-subject stage whose status decides.
        missing: what a subject without a status file (the stage has not run for it) means:
            ``"error"`` raises :class:`SubjectError`; ``"skip"`` leaves it out with a warning.
    """
    if missing not in ("error", "skip"):
        raise ValueError(f"missing must be 'error' or 'skip', got {missing!r}")
    passed = []
    for sid in sids:
        path = layout.status(stage, sid)
        if not path.is_file():
            if missing == "error":
                raise SubjectError(sid, f"no {stage} status file ({path}); run the {stage} stage first", stage=stage)
            log.warning("subject %s: no %s status at %s; left out", sid, stage, path)
            continue
        if read_status(path).get("status") == OK:
            passed.append(sid)
    return passed


def stage_table_statuses(path: str | os.PathLike) -> dict[str, str]:
    """sid -> status of a cohort-level stage table (``work/qc/<stage>.tsv``, ``copdssl qc --stage``).

    Raises:
        ConfigError: the table does not exist or has no ``sid``/``status`` column.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"stage table {path} does not exist; `copdssl qc --stage {path.stem}` writes it "
                          "(the workflow makes it before any stage that reads it)")
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        if not {"sid", "status"} <= set(reader.fieldnames or ()):
            raise ConfigError(f"stage table {path} has no 'sid' and 'status' columns")
        return {row["sid"]: row["status"] for row in reader}


def passed_in_stage_table(layout, sids: Iterable[str], stage: str) -> list[str]:
    """The subjects (in the given order) whose status in the cohort-level table of ``stage``
    (``work/qc/<stage>.tsv``) is ``ok``: one file for an aggregate stage to read, the one its
    Snakemake rule declares as input, instead of one status JSON per subject.

    Raises:
        ConfigError: the table is missing, or lacks a subject of ``sids`` (it is older than the
            subjects table: rewrite it with ``copdssl qc --stage <stage>``).
    """
    path = layout.stage_table(stage)
    statuses = stage_table_statuses(path)
    passed = []
    for sid in sids:
        if sid not in statuses:
            raise ConfigError(f"stage table {path} has no row for subject {sid}: it is older than the subjects "
                              f"table; rewrite it with `copdssl qc --stage {stage}`")
        if statuses[sid] == OK:
            passed.append(sid)
    return passed


def patch_subjects(layout, subjects_tsv: str | os.PathLike) -> tuple[list[str], list[str]]:
    """All subject IDs of ``subjects_tsv`` and those whose ``patches`` status is ``ok``, from the
    patches stage table (:func:`passed_in_stage_table`).

    Returns:
        (all sids in table order, ok sids in table order)
    """
    from pipeline.manifest import read_subjects

    path = Path(subjects_tsv)
    if not path.is_file():
        raise ConfigError(f"subjects table {path} does not exist")
    sids = [s.sid for s in read_subjects(path)]
    return sids, passed_in_stage_table(layout, sids, "patches")


def _tombstone(paths: Iterable[str | os.PathLike]) -> None:
    for path in paths:
        with atomic_path(path) as tmp:
            tmp.write_bytes(b"")


def run_subject_stage(
    *,
    sid: str,
    stage: str,
    status_path: str | os.PathLike,
    outputs: Iterable[str | os.PathLike],
    work: Callable[[], dict[str, Any] | None],
    upstream: Iterable[str | os.PathLike] = (),
) -> dict[str, Any]:
    """Run one subject through one stage with failure isolation.

    Args:
        sid: subject ID.
        stage: stage name recorded in the status.
        status_path: where to write the status JSON.
        outputs: data files the stage must leave behind (tombstoned on failure).
        work: does the stage's work and writes ``outputs`` atomically; returns QC metrics.
        upstream: status JSONs of the stages this one depends on.

    Returns:
        The status dict that was written.
    """
    outputs = [Path(p) for p in outputs]
    problem = first_problem(upstream)
    if problem is not None:
        origin = problem.get("failed_stage") or problem.get("stage")
        status = {"sid": sid, "stage": stage, "status": SKIPPED, "failed_stage": origin,
                  "reason": problem.get("reason", "upstream stage failed")}
        log.warning("subject %s [%s]: skipped, %s failed: %s", sid, stage, origin, status["reason"])
    else:
        try:
            metrics = work() or {}
            status = {"sid": sid, "stage": stage, "status": OK, **metrics}
        except SubjectError as error:
            status = {"sid": sid, "stage": stage, "status": FAILED, "failed_stage": stage, "reason": error.reason}
            log.error("subject %s [%s]: %s", sid, stage, error.reason)
        except (MemoryError, KeyboardInterrupt):
            raise
        except Exception as error:  # noqa: BLE001 - a bug or unreadable data must not stop other subjects
            reason = f"unexpected {type(error).__name__}: {error}"
            status = {"sid": sid, "stage": stage, "status": FAILED, "failed_stage": stage,
                      "reason": " ".join(reason.split())}
            log.error("subject %s [%s]: %s\n%s", sid, stage, status["reason"], traceback.format_exc())
    if status["status"] != OK:
        _tombstone(outputs)
    write_json(status_path, status)
    return status
