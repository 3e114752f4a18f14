"""Stage ``qc``: one row per subject with its overall status and, when it failed, where and why.

Rows come from the manifest rejections (status ``rejected``) and from the per-stage status
JSONs of every accepted subject. Scalar QC metrics recorded by the stages (Dice, lung volume,
HU percentiles, ...) are added as ``<stage>_<metric>`` columns. The status is graded:

- ``ok``: every stage passed;
- ``flagged``: every stage passed and the subject is **kept**, but a stage flagged it
  (``flag_reason``): its registration Dice is below ``register.flag_dice``, or below the cohort's
  median − ``register.flag_mad`` · MAD (:func:`flag_cohort_outliers`);
- ``failed`` / ``incomplete`` / ``rejected``: the subject is not used (``failed_stage``, ``reason``).
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from pipeline.files import write_tsv
from pipeline.layout import Layout
from pipeline.status import OK, read_status
from pipeline.subjects import Rejection

log = logging.getLogger(__name__)

STAGES = ("ingest", "lung", "register", "patches")
FLAGGED = "flagged"
KEPT = (OK, FLAGGED)  # statuses of the subjects every later stage uses
_STATUS_KEYS = {"sid", "stage", "status", "failed_stage", "reason", "flagged", "flag_reason"}
# The MAD of a normal sample times this estimates its standard deviation.
MAD_TO_SD = 1.4826
# The QC table's leading columns; each stage's QC measures follow in order of first appearance.
QC_COLUMNS = ("sid", "status", "failed_stage", "reason", "flag_reason")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subjects", required=True, help="screened subjects TSV (work/subjects.tsv)")
    parser.add_argument("--rejects", help="manifest rejections TSV (for the full QC table)")
    parser.add_argument("--stage", choices=STAGES,
                        help="write only this stage's status table (work/qc/<stage>.tsv) instead of the full QC table")
    parser.add_argument("--work", default="work", help="work directory (default: %(default)s)")
    parser.add_argument("--out", required=True, help="table to write (results/qc.tsv or work/qc/<stage>.tsv)")


def subject_row(sid: str, layout: Layout, stages=STAGES) -> dict[str, Any]:
    """Overall QC row of one subject from its per-stage status files (missing = not run)."""
    row: dict[str, Any] = {"sid": sid, "status": OK, "failed_stage": "", "reason": "", "flag_reason": ""}
    for stage in stages:
        path = layout.status(stage, sid)
        if not path.exists():
            row.update(status="incomplete", failed_stage=stage, reason="stage has not run")
            break
        status = read_status(path)
        for key, value in status.items():
            if key not in _STATUS_KEYS and isinstance(value, (int, float, str, bool)):
                row[f"{stage}_{key}"] = value
        if status.get("status") != OK:
            row.update(status="failed", failed_stage=status.get("failed_stage") or stage,
                       reason=status.get("reason", ""), flag_reason="")
            break
        if status.get("flag_reason"):
            _add_flag(row, status["flag_reason"])
    return row


def _add_flag(row: dict[str, Any], reason: str) -> None:
    """Mark a kept row ``flagged`` and append ``reason`` to its ``flag_reason`` (in place)."""
    row.update(status=FLAGGED, flag_reason="; ".join(filter(None, [row.get("flag_reason", ""), reason])))


def flag_cohort_outliers(rows: list[dict[str, Any]], column: str, k: float, label: str) -> list[str]:
    """Flag kept subjects whose ``column`` is below the cohort's median − ``k`` · MAD (in place).

    The MAD is scaled to a standard deviation (× 1.4826) and computed over the subjects that are
    ``ok`` or ``flagged``; with fewer than 5 of them nothing is flagged.

    Returns:
        the sids newly flagged.
    """
    import numpy as np

    kept = [row for row in rows if row["status"] in KEPT and isinstance(row.get(column), (int, float))]
    if len(kept) < 5:
        return []
    values = np.array([float(row[column]) for row in kept])
    median = float(np.median(values))
    mad = MAD_TO_SD * float(np.median(np.abs(values - median)))
    limit = median - k * mad
    flagged = []
    for row in kept:
        if float(row[column]) < limit:
            _add_flag(row, f"{label} {float(row[column]):.3f} is an outlier of the cohort: below its median "
                           f"{median:.3f} - {k:g} MAD ({limit:.3f})")
            flagged.append(row["sid"])
    return flagged


def stage_rows(subjects: list[str], stage: str, layout: Layout) -> list[dict[str, Any]]:
    """One row per subject with its status in ``stage`` (the cohort-level stage table)."""
    rows = []
    for sid in subjects:
        status = read_status(layout.status(stage, sid))
        rows.append({"sid": sid, "status": status.get("status"), "failed_stage": status.get("failed_stage") or "",
                     "reason": status.get("reason") or ""})
    return rows


def qc_rows(subjects: list[str], rejects: list[Rejection], layout: Layout,
            flag_mad: float = 3.0) -> list[dict[str, Any]]:
    """The QC table's rows: rejections, then one graded row per accepted subject.

    Args:
        flag_mad: ``register.flag_mad``, for :func:`flag_cohort_outliers` on the registration Dice.
    """
    rows = [{"sid": r.sid, "status": "rejected", "failed_stage": "manifest", "reason": r.reason, "flag_reason": ""}
            for r in rejects]
    rows += [subject_row(sid, layout) for sid in subjects]
    flag_cohort_outliers(rows, "register_dice", flag_mad, "registration Dice")
    return rows


def write_qc_table(path, rows: list[dict[str, Any]]) -> dict[str, int]:
    """Write the rows as a TSV (atomically); return the number of subjects per status."""
    write_tsv(path, rows, QC_COLUMNS)
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    return counts


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import stage_settings
    from pipeline.manifest import read_rejections, read_subjects

    layout = Layout(work=args.work)
    subjects = [subject.sid for subject in read_subjects(args.subjects)]
    if args.stage:
        rows = stage_rows(subjects, args.stage, layout)
    else:
        rejects = read_rejections(args.rejects) if args.rejects else []
        rows = qc_rows(subjects, rejects, layout, flag_mad=stage_settings(args, "register")["flag_mad"])
    counts = write_qc_table(args.out, rows)
    log.info("QC: %s", ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return 0
