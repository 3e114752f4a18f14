"""Stage ``manifest``: screen the image manifest before any subject is processed.

Writes the accepted subjects (``work/subjects.tsv``) and the rejected rows with their reasons
(``work/qc/manifest_rejects.tsv``). Rejections never stop the run; they appear in the QC table
and the report.
"""

from __future__ import annotations

import argparse
import csv
import logging

from pipeline.files import write_tsv
from pipeline.subjects import Rejection, Subject, read_manifest

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--manifest", help="TSV with sid, image[, format] (default: cohort.manifest)")
    parser.add_argument("--out", required=True, help="accepted subjects TSV")
    parser.add_argument("--rejects", required=True, help="rejected rows TSV (sid, reason)")


def read_subjects(path) -> list[Subject]:
    """Read a screened subjects table written by this stage."""
    with open(path, newline="") as handle:
        return [Subject(row["sid"], row["image"], row["format"]) for row in csv.DictReader(handle, delimiter="\t")]


def read_rejections(path) -> list[Rejection]:
    """Read a rejected-rows table written by this stage."""
    with open(path, newline="") as handle:
        return [Rejection(row["sid"], row["reason"]) for row in csv.DictReader(handle, delimiter="\t")]


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import stage_settings

    manifest = args.manifest or stage_settings(args, "cohort")["manifest"]
    subjects, rejections = read_manifest(manifest)
    for rejection in rejections:
        log.error("subject %r [manifest]: %s", rejection.sid, rejection.reason)
    write_tsv(args.out, [{"sid": s.sid, "image": s.image, "format": s.format} for s in subjects],
              ("sid", "image", "format"))
    write_tsv(args.rejects, [{"sid": r.sid, "reason": r.reason} for r in rejections], ("sid", "reason"))
    log.info("manifest %s: %d subjects accepted, %d rejected", manifest, len(subjects), len(rejections))
    return 0
