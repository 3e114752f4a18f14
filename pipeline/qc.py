"""Stage ``qc``: one row per subject with its overall status and, when it failed, where and why.

Rows come from the manifest rejections (status ``rejected``) and from the per-stage status
JSONs of every accepted subject (status ``ok`` or ``failed``). Scalar QC metrics recorded by the
stages (Dice, lung volume, HU percentiles, ...) are added as ``<stage>_<metric>`` columns.
"""

from __future__ import annotations

import argparse
import csv
import io
import logging
from typing import Any

from pipeline.files import write_text
from pipeline.layout import Layout
from pipeline.status import OK, read_status
from pipeline.subjects import Rejection

log = logging.getLogger(__name__)

STAGES = ("ingest", "lung", "register", "patches")
_STATUS_KEYS = {"sid", "stage", "status", "failed_stage", "reason"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--subjects", required=True, help="screened subjects TSV (work/subjects.tsv)")
    parser.add_argument("--rejects", help="manifest rejections TSV (for the full QC table)")
    parser.add_argument("--stage", choices=STAGES,
                        help="write only this stage's status table (work/qc/<stage>.tsv) instead of the full QC table")
    parser.add_argument("--work", default="work", help="work directory (default: %(default)s)")
    parser.add_argument("--out", required=True, help="table to write (results/qc.tsv or work/qc/<stage>.tsv)")


def subject_row(sid: str, layout: Layout, stages=STAGES) -> dict[str, Any]:
    """Overall QC row of one subject from its per-stage status files (missing = not run)."""
    row: dict[str, Any] = {"sid": sid, "status": OK, "failed_stage": "", "reason": ""}
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
                       reason=status.get("reason", ""))
            break
    return row


def stage_rows(subjects: list[str], stage: str, layout: Layout) -> list[dict[str, Any]]:
    """One row per subject with its status in ``stage`` (the cohort-level stage table)."""
    rows = []
    for sid in subjects:
        status = read_status(layout.status(stage, sid))
        rows.append({"sid": sid, "status": status.get("status"), "failed_stage": status.get("failed_stage") or "",
                     "reason": status.get("reason") or ""})
    return rows


def qc_rows(subjects: list[str], rejects: list[Rejection], layout: Layout) -> list[dict[str, Any]]:
    rows = [{"sid": r.sid, "status": "rejected", "failed_stage": "manifest", "reason": r.reason} for r in rejects]
    rows += [subject_row(sid, layout) for sid in subjects]
    return rows


def to_tsv(rows: list[dict[str, Any]]) -> str:
    columns = ["sid", "status", "failed_stage", "reason"]
    for row in rows:
        columns += [key for key in row if key not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, delimiter="\t", lineterminator="\n", restval="")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def run(args: argparse.Namespace) -> int:
    from pipeline.manifest import read_rejections, read_subjects

    layout = Layout(work=args.work)
    subjects = [subject.sid for subject in read_subjects(args.subjects)]
    if args.stage:
        rows = stage_rows(subjects, args.stage, layout)
    else:
        rejects = read_rejections(args.rejects) if args.rejects else []
        rows = qc_rows(subjects, rejects, layout)
    write_text(args.out, to_tsv(rows))
    counts: dict[str, int] = {}
    for row in rows:
        counts[row["status"]] = counts.get(row["status"], 0) + 1
    log.info("QC: %s", ", ".join(f"{n} {status}" for status, n in sorted(counts.items())))
    return 0
