"""``copdssl synth``: generate the synthetic COPDGene-like cohort, or a preview montage.

    copdssl synth --out-dir DIR [--sids S ...] [--threads N] [--tables-only] [--preview PNG]

Default: the tables and every subject's image and label. ``--sids`` writes only those subjects'
volumes (tables untouched); ``--tables-only`` only the tables; ``--preview PNG`` only the
montage (from the written images when present). Settings: the ``synthetic`` config section.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out-dir", help="cohort directory (default: synthetic.out_dir)")
    parser.add_argument("--sids", nargs="+", metavar="S", help="write only these subjects' images and labels")
    parser.add_argument("--threads", type=int, default=1, help="worker processes (default: %(default)s)")
    parser.add_argument("--tables-only", action="store_true", help="write only subjects/phenotypes/truth tables")
    parser.add_argument("--preview", metavar="PNG", help="write only a PNG montage of preview_subjects subjects")


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import stage_settings
    from pipeline.errors import ConfigError, SubjectError
    from pipeline.synth.cohort import write_subjects, write_tables
    from pipeline.synth.plan import plan_cohort

    settings = stage_settings(args, "synthetic")
    out_dir = args.out_dir or settings["out_dir"]
    if args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    try:
        plans = plan_cohort(settings)
    except ValueError as error:
        raise ConfigError(str(error)) from None

    if args.preview:
        from pipeline.synth.preview import write_preview

        shown = write_preview(plans, args.preview, out_dir, int(settings["preview_subjects"]))
        log.info("preview of %s written to %s", ", ".join(shown), args.preview)
        return 0

    if args.tables_only:
        write_tables(plans, out_dir)
        log.info("tables for %d subjects written to %s", len(plans), out_dir)
        return 0

    if args.sids:
        by_sid = {p.sid: p for p in plans}
        for sid in args.sids:
            if sid not in by_sid:
                reason = f"not in the synthetic plan (n_subjects={len(plans)}, seed={settings.get('seed')})"
                raise SubjectError(sid, reason, stage="synth")
        selected = [by_sid[sid] for sid in dict.fromkeys(args.sids)]
    else:
        write_tables(plans, out_dir)
        selected = plans
    failures = write_subjects(selected, out_dir, threads=args.threads)
    log.info("%d of %d subjects written to %s", len(selected) - len(failures), len(selected), out_dir)
    if failures:
        log.error("failed subjects: %s", ", ".join(f.sid for f in failures))
        return 1
    return 0
