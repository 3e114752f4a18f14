"""Load and validate the configuration.

The schema (``config/schema/config.schema.yaml``) is the single source of defaults. Validation
fills missing keys with them, rejects unknown keys, and reports the first problem as one line
naming the key, e.g. ``config key 'train.optimizer.lr': -1 is less than or equal to the minimum of 0``.
Runs (``runs.<name>``) are deep-merged over ``train`` and validated as a whole.
"""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft202012Validator, validators

from pipeline.baselines import BASELINES
from pipeline.errors import ConfigError

RESERVED_RUN_NAMES = BASELINES  # a run named like a baseline would share its results directory
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "config" / "schema" / "config.schema.yaml"


def _with_defaults(validator_class):
    """A validator class that fills ``default`` values into objects while validating."""
    validate_properties = validator_class.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for name, subschema in properties.items():
                if "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
                elif "$ref" in subschema and "default" in subschema and name not in instance:
                    instance[name] = copy.deepcopy(subschema["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return validators.extend(validator_class, {"properties": set_defaults})


_DefaultFillingValidator = _with_defaults(Draft202012Validator)


def load_schema(path: str | os.PathLike = SCHEMA_PATH) -> dict[str, Any]:
    """The schema at ``path``, parsed once per process (a copy, so callers may change it).

    Every stage job validates its settings, and the pure-Python YAML parser took 0.12 s per read
    of the schema: libyaml's loader (when PyYAML has it) and one read per process cut that to a
    few ms (benchmarks/bench_preprocess.py).
    """
    return copy.deepcopy(_parsed_schema(Path(path).resolve()))


@functools.lru_cache(maxsize=4)
def _parsed_schema(path: Path) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path) as handle:
        return yaml.load(handle, Loader=loader)


def _key(path) -> str:
    return ".".join(str(part) for part in path) or "<root>"


def _validate(instance: dict[str, Any], schema: dict[str, Any], prefix: str = "") -> None:
    validator = _DefaultFillingValidator(schema)
    # Two passes: the first fills defaults, the second reports errors on the completed config.
    for _ in validator.iter_errors(instance):
        pass
    errors = sorted(validator.iter_errors(instance), key=lambda e: (len(e.absolute_path), list(map(str, e.absolute_path))))
    if errors:
        error = errors[0]
        key = _key(error.absolute_path)
        if prefix:
            key = f"{prefix}.{key}" if key != "<root>" else prefix
        raise ConfigError(f"config key '{key}': {error.message}")


def deep_merge(base: dict[str, Any], override: dict[str, Any]) -> dict[str, Any]:
    """Return a copy of ``base`` with ``override`` merged in recursively."""
    merged = copy.deepcopy(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = copy.deepcopy(value)
    return merged


def validate_config(config: dict[str, Any], schema: dict[str, Any] | None = None) -> dict[str, Any]:
    """Validate ``config`` (a copy is returned with defaults filled in)."""
    schema = schema or load_schema()
    config = copy.deepcopy(config or {})
    _derive_synthetic_paths(config)
    _validate(config, schema)
    train_schema = {"$defs": schema["$defs"], **schema["$defs"]["train"]}
    for name in config["runs"]:
        if name in RESERVED_RUN_NAMES:
            raise ConfigError(f"config key 'runs.{name}': {name!r} is reserved for a baseline feature set")
        resolved = deep_merge(config["train"], config["runs"][name])
        _validate(resolved, train_schema, prefix=f"runs.{name}")
    _check_synthetic_paths(config)
    location_map_runs(config)  # an unknown run name is a config error
    return config


def _derive_synthetic_paths(config: dict[str, Any]) -> None:
    """With the synthetic source, unset cohort paths default to the generator's outputs."""
    cohort = config.get("cohort") or {}
    if not isinstance(cohort, dict) or cohort.get("source", "synthetic") != "synthetic":
        return
    synthetic = config.get("synthetic") or {}
    out_dir = Path(synthetic.get("out_dir", "data/synthetic")) if isinstance(synthetic, dict) else Path("data/synthetic")
    config["cohort"] = {"manifest": str(out_dir / "subjects.tsv"), "phenotypes": str(out_dir / "phenotypes.tsv"),
                        "truth": str(out_dir / "truth.tsv"), **cohort}


def _check_synthetic_paths(config: dict[str, Any]) -> None:
    """With the synthetic source, the cohort files must be the generator's outputs."""
    if config["cohort"]["source"] != "synthetic":
        return
    out_dir = Path(config["synthetic"]["out_dir"])
    for key, name in (("manifest", "subjects.tsv"), ("phenotypes", "phenotypes.tsv"), ("truth", "truth.tsv")):
        value = config["cohort"][key]
        if value is not None and Path(value) != out_dir / name:
            raise ConfigError(f"config key 'cohort.{key}': with source synthetic it must be "
                              f"{out_dir / name} (synthetic.out_dir/{name}), not {value}")


def load_config(path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Read a YAML config file, merge ``overrides`` and validate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    with open(path) as handle:
        try:
            config = yaml.safe_load(handle) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"config file {path} is not valid YAML: {' '.join(str(error).split())}") from None
    if not isinstance(config, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return validate_config(deep_merge(config, overrides or {}))


def validate_section(section: str, settings: dict[str, Any] | None) -> dict[str, Any]:
    """Validate one config section (e.g. the ``--settings`` JSON a stage receives) and fill its defaults.

    ``section`` is a top-level key of the schema; ``train`` validates a resolved run. Errors name
    the key as ``config key '<section>.<key>': ...``.
    """
    schema = load_schema()
    definition = schema["$defs"]["train"] if section == "train" else schema["properties"].get(section)
    if definition is None:
        raise ConfigError(f"config key '{section}': no such section")
    settings = copy.deepcopy(settings if settings is not None else {})
    _validate(settings, {"$defs": schema["$defs"], **definition}, prefix=section)
    return settings


def run_settings(config: dict[str, Any], run: str) -> dict[str, Any]:
    """The full training settings of ``run``: ``train`` with ``runs[run]`` merged over it."""
    if run not in config["runs"]:
        raise ConfigError(f"config key 'runs': no run named {run!r} (known: {', '.join(config['runs'])})")
    schema = load_schema()
    resolved = deep_merge(config["train"], config["runs"][run])
    _validate(resolved, {"$defs": schema["$defs"], **schema["$defs"]["train"]}, prefix=f"runs.{run}")
    return resolved


def location_map_runs(config: dict[str, Any]) -> list[str]:
    """The runs that get a per-location read-out map (``report.location_map_runs``), in config order.

    ``null`` (the default) means every run that trains (``epochs`` > 0): an untrained encoder's map
    says nothing about where the signal is.

    Raises:
        ConfigError: a listed name is not a run.
    """
    names = (config.get("report") or {}).get("location_map_runs")
    if names is None:
        return [run for run in config["runs"] if deep_merge(config["train"], config["runs"][run])["epochs"] > 0]
    unknown = [name for name in names if name not in config["runs"]]
    if unknown:
        raise ConfigError(f"config key 'report.location_map_runs': no run named {unknown[0]!r} "
                          f"(known: {', '.join(config['runs'])})")
    return [run for run in config["runs"] if run in names]
