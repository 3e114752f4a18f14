"""Stage CLIs of the training stages (``train``, ``train-graph``, ``embed``).

Each module is the plumbing of one stage: its arguments, its settings, the work layout and the
subjects' statuses. The science it runs (training loops, encoders, embedding) lives in
``models/``, which never imports the pipeline's CLI, layout or status modules.
"""

from __future__ import annotations

import argparse
from typing import Any


def add_run_arguments(parser: argparse.ArgumentParser, run_help: str, device_setting: str) -> None:
    """The arguments every training stage takes: ``--run``, ``--subjects``, ``--work``, ``--device``."""
    parser.add_argument("--run", required=True, help=run_help)
    parser.add_argument("--subjects", required=True, help="screened subjects table (work/subjects.tsv)")
    parser.add_argument("--work", required=True, help="work directory (patches, atlas grid, runs)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), help=f"override {device_setting}")


def run_inputs(args: argparse.Namespace, section: str) -> tuple[dict[str, Any], Any, list[str], list[str]]:
    """What a training stage starts from.

    Returns:
        (the validated settings of ``section`` (``train`` resolves the run), the work
        :class:`~pipeline.layout.Layout`, every sid of ``--subjects`` in table order, the sids
        whose patches are ok).
    """
    from pipeline.cli import stage_settings
    from pipeline.layout import Layout
    from pipeline.status import patch_subjects

    layout = Layout(args.work)
    return (stage_settings(args, section), layout, *patch_subjects(layout, args.subjects))
