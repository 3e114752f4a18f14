"""The ``copdssl`` command: one subcommand per pipeline stage.

Snakemake rules call these subcommands, and people can run them by hand. Only the chosen
subcommand's module is imported, so ``copdssl ingest`` does not pay for importing torch.

Each stage module provides ``add_arguments(parser)`` and ``run(args) -> int``. Common options
(``--log``, ``--verbose``, ``--config``, ``--settings``) are added here.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
from typing import Any

from pipeline.errors import ConfigError, CopdsslError

# name -> (module, one-line help, config section used for --config/--settings or None)
COMMANDS: dict[str, tuple[str, str, str | None]] = {
    "synth": ("pipeline.synth.cli", "generate the synthetic COPDGene-like cohort (or a --preview montage)", "synthetic"),
    "manifest": ("pipeline.manifest", "screen the image manifest (unsafe or duplicate subject IDs)", "cohort"),
    "ingest": ("pipeline.ingest", "read a DICOM series or NIfTI as HU, reorient and resample", "ingest"),
    "lung": ("pipeline.lung", "segment the lungs (no weights) and measure densitometry", "lung"),
    "atlas": ("pipeline.atlas", "build the atlas lung mask, patch grid and adjacency graph", "atlas"),
    "register": ("pipeline.register", "affinely register the atlas lung mask to a subject", "register"),
    "patches": ("pipeline.patches", "cut patches at the atlas grid locations", "patches"),
    "qc": ("pipeline.qc", "collect per-subject statuses into the QC table", "register"),
    "train": ("pipeline.stages.train", "train a context-aware MoCo-v2/IFM patch encoder (one run)", "train"),
    "train-graph": ("pipeline.stages.train_graph", "train the graph-level MoCo stage on frozen patch embeddings", "train"),
    "embed": ("pipeline.stages.embed", "embed every patch of every subject with a trained encoder", "embed"),
    "pool": ("pipeline.pool", "pool patch embeddings to one feature vector per subject", "pool"),
    "baseline": ("pipeline.baselines", "build a baseline feature table (densitometry, oracle)", None),
    "folds": ("pipeline.folds", "make the cross-validation folds shared by every run", "evaluate"),
    "evaluate": ("pipeline.evaluate", "cross-validated outcome heads on one feature table", "evaluate"),
    "locmap": ("pipeline.locmap", "per-location read-out map: R² of each target from each atlas location", "evaluate"),
    "report": ("pipeline.report", "write the HTML outcome report", None),
    "export": ("pipeline.bundle", "write a trained run as a bundle (safetensors, atlas, preprocessing.json, model card)",
               None),
    "apply": ("pipeline.apply", "embed new scans with a bundle: preprocess, embed, pool, QC (no training)", None),
    "unbundle": ("pipeline.unbundle", "write a bundle's weights as a run's checkpoints (the workflow's apply mode)",
                 None),
}


def stage_settings(args: argparse.Namespace, section: str | None) -> dict[str, Any]:
    """The validated settings of a stage: ``--settings JSON`` if given (Snakemake), else from ``--config``.

    Snakemake passes the resolved section as JSON so that changing a setting reruns exactly
    the jobs that use it; by hand, ``--config FILE`` reads the file. Either way the settings are
    checked against the schema (one line naming a bad key) and missing keys get their defaults.
    """
    from pipeline.config import load_config, run_settings

    if getattr(args, "settings", None):
        return parse_settings(args.settings, section)

    config = load_config(args.config)
    if section == "train" and getattr(args, "run", None):
        return run_settings(config, args.run)
    return config if section is None else config[section]


def parse_settings(text: str, section: str | None, option: str = "--settings") -> dict[str, Any]:
    """Settings given as JSON on the command line (``option``), validated: the ``section`` of the
    schema (the whole config when ``None``), with missing keys filled from the schema's defaults.

    Raises:
        ConfigError: not JSON, or a bad key (one line naming ``option`` or the key).
    """
    from pipeline.config import validate_config, validate_section

    try:
        settings = json.loads(text)
    except json.JSONDecodeError as error:
        raise ConfigError(f"{option} is not valid JSON: {error}") from None
    return validate_config(settings) if section is None else validate_section(section, settings)


def full_config(args: argparse.Namespace) -> dict[str, Any]:
    """The whole validated config from ``--config`` (for stages that need several sections)."""
    from pipeline.config import load_config

    return load_config(args.config)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="copdssl", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", metavar="STAGE")
    for name, (module, help_text, _) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            sp.add_argument("--config", default="config/config.yaml", help="YAML config (default: %(default)s)")
            sp.add_argument("--settings", help="stage settings as JSON (overrides --config; used by Snakemake)")
            sp.add_argument("--log", help="also append log messages to this file")
            sp.add_argument("-v", "--verbose", action="store_true", help="debug logging")
            importlib.import_module(module).add_arguments(sp)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--"]:  # `torchrun ... -m pipeline -- train ...` keeps torchrun off our options
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        build_parser().print_help()
        return 0
    command = argv[0]
    if command not in COMMANDS:
        build_parser().error(f"unknown stage {command!r}; choose from {', '.join(COMMANDS)}")
    args = build_parser(command).parse_args(argv)
    from pipeline.logs import setup_logging

    setup_logging(args.log, args.verbose)
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.run(args) or 0)
    except CopdsslError as error:
        logging.getLogger("copdssl").error("%s", error)
        return 1
