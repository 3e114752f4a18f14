"""``copdssl unbundle``: a bundle's weights as a run's checkpoints, for the workflow's apply mode.

    copdssl unbundle --bundle BUNDLE --work work/

With ``apply.bundle`` set, the workflow embeds the cohort with a bundle instead of training:
this stage checks the bundle (:func:`pipeline.bundle.read_bundle`) and writes its encoder (and
graph encoder) as ``work/runs/<run>/encoder.pt`` (``graph.pt``), which the embed and pool stages
read like a trained run's.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", required=True, help="bundle directory written by `copdssl export`")
    parser.add_argument("--work", required=True, help="work directory of the workflow")


def run(args: argparse.Namespace) -> int:
    from pipeline.bundle import read_bundle, write_checkpoints
    from pipeline.layout import Layout

    bundle = read_bundle(args.bundle)
    layout = Layout(work=Path(args.work))
    write_checkpoints(bundle, layout)
    log.info("unbundle: run %s from %s -> %s%s", bundle.run, args.bundle, layout.encoder(bundle.run),
             " and its graph encoder" if bundle.graph is not None else "")
    return 0
