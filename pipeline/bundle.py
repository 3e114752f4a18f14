"""A trained run as a self-describing bundle (``copdssl export``), and reading one back.

Layout of a bundle directory (docs/architecture.md, "Bundle"):

- ``encoder.safetensors``: the patch encoder's weights (the MoCo query encoder);
- ``graph.safetensors``: the graph-level encoder, when the run has one;
- ``atlas/atlas_lung.nii.gz`` and ``atlas/grid.npz``: the atlas and patch grid the encoder's
  locations refer to (``atlas.reference`` accepts the bundle directory);
- ``preprocessing.json``: everything that turns a raw scan into the encoder's input: canonical
  orientation and spacing, calibration, lung segmentation, registration, patch size and step, the
  stored HU range, the intensity windows and lung-mask option, the encoder architecture, the
  number of locations and the feature size (:func:`preprocessing_spec`);
- ``config.yaml``: the resolved config with this run only; ``provenance.json``: code version,
  config sha256, date, and the sha256 of every file;
- ``README.md``: a model card with YAML front matter (training data, the run's evaluation rows,
  intended use, limitations).

:func:`read_bundle` checks a bundle and fails with one line naming the file and the problem: a
missing file, a truncated or unreadable safetensors file, weights whose shapes disagree with
``preprocessing.json``, or a grid with another patch size or number of locations.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from pipeline.errors import ConfigError
from pipeline.layout import ATLAS_MASK_NAME, GRID_NAME, Layout

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
ENCODER_FILE = "encoder.safetensors"
GRAPH_FILE = "graph.safetensors"
PREPROCESSING_FILE = "preprocessing.json"
CONFIG_FILE = "config.yaml"
PROVENANCE_FILE = "provenance.json"
CARD_FILE = "README.md"
ATLAS_DIR = "atlas"


@dataclass(frozen=True)
class Bundle:
    """A checked bundle.

    Attributes:
        root: the bundle directory.
        run: the exported run's name.
        preprocessing: the parsed ``preprocessing.json``.
        config: the resolved config (``config.yaml``), with ``runs`` holding this run only.
        encoder: the patch encoder (:class:`models.encoder.PatchEncoder`) with the bundle's weights.
        graph: the graph encoder (:class:`models.graph.GraphEncoder`) with its weights, or ``None``.
    """

    root: Path
    run: str
    preprocessing: dict[str, Any]
    config: dict[str, Any]
    encoder: Any
    graph: Any | None

    @property
    def atlas_mask(self) -> Path:
        return self.root / ATLAS_DIR / ATLAS_MASK_NAME

    @property
    def grid(self) -> Path:
        return self.root / ATLAS_DIR / GRID_NAME


def preprocessing_spec(config: dict[str, Any], run: str, train: dict[str, Any], *, patch_size: int,
                       num_locations: int, graph: dict[str, Any] | None) -> dict[str, Any]:
    """The ``preprocessing.json`` of a run: what a new scan must go through to be embedded.

    Args:
        train: the run's resolved training settings (:func:`pipeline.config.run_settings`).
    """
    return {
        "format_version": FORMAT_VERSION,
        "run": run,
        "orientation": "canonical: RAS+ voxel axes as written by the ingest stage (pipeline.lung.check_canonical)",
        "spacing_mm": config["ingest"]["spacing_mm"],
        "ingest": config["ingest"],
        "lung": config["lung"],
        "atlas": {key: config["atlas"][key] for key in ("patch_size", "step", "min_lung_fraction", "adjacency_cutoff")},
        "register": config["register"],
        "patches": config["patches"],
        "input": train["input"],
        "encoder": train["encoder"],
        "patch_size": int(patch_size),
        "num_locations": int(num_locations),
        "feature_dim": int(train["encoder"]["feature_dim"]),
        "graph": graph,
    }


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _evaluation_rows(layout: Layout, run: str) -> list[dict[str, Any]]:
    """The run's evaluation (mean ± sd over CV repeats) per pooling, outcome and metric."""
    import pandas as pd

    rows = []
    for metrics in sorted(layout.results.glob(f"{run}/*/metrics.tsv")):
        frame = pd.read_csv(metrics, sep="\t")
        for (outcome, metric), group in frame.groupby(["outcome", "metric"], sort=False):
            rows.append({"pooling": metrics.parent.name, "outcome": outcome, "metric": metric,
                         "mean": round(float(group["value"].mean()), 4),
                         "sd": round(float(group["value"].std(ddof=1)) if len(group) > 1 else 0.0, 4),
                         "n": int(group["n"].max())})
    return rows


def model_card(config: dict[str, Any], run: str, train: dict[str, Any], spec: dict[str, Any],
               evaluation: list[dict[str, Any]], n_subjects: int) -> str:
    """The bundle's ``README.md``: YAML front matter and a short card (``train``: the run's settings)."""
    import yaml

    synthetic = config["cohort"]["source"] == "synthetic"
    front = {
        "library_name": "copdssl",
        "tags": ["chest-ct", "copd", "self-supervised", "moco", "3d"],
        "pipeline_tag": "feature-extraction",
        "model_type": "context-aware MoCo-v2 patch encoder" + (" + graph encoder" if spec["graph"] else ""),
        "training_data": {"cohort": "synthetic COPDGene-like (copdssl generator)" if synthetic else "user cohort",
                          "subjects": n_subjects},
        "preprocessing": PREPROCESSING_FILE,
        "model-index": [{"name": run, "results": [
            {"task": {"type": "regression" if row["metric"] == "r2" else "ordinal-classification"},
             "dataset": {"name": "synthetic cohort" if synthetic else "training cohort (cross-validated)"},
             "metrics": [{"type": row["metric"], "name": f"{row['outcome']} ({row['pooling']} pooling)",
                          "value": row["mean"]}]} for row in evaluation]}],
    }
    table = ["| pooling | outcome | metric | mean ± sd over CV repeats | subjects |", "|---|---|---|---|---:|"]
    table += [f"| {r['pooling']} | {r['outcome']} | {r['metric']} | {r['mean']:.3f} ± {r['sd']:.3f} | {r['n']} |"
              for r in evaluation]
    lines = [
        "---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
        f"# copdssl run `{run}`", "",
        f"A {front['model_type']} trained with copdssl on {n_subjects} "
        f"{'synthetic ' if synthetic else ''}subjects: {train['epochs']} epoch(s) of "
        f"{train['steps_per_epoch']} steps, batch {train['batch_size']}, loss `{train['loss']['method']}`"
        + (f" (ε {train['loss']['epsilon']})" if train["loss"]["method"] != "none" else "") + ".",
        "",
        "## Use", "",
        "```bash", "copdssl apply --bundle THIS_DIR --manifest scans.tsv --out embedded/", "```", "",
        "Each scan goes through the steps in `preprocessing.json` (canonical orientation, "
        f"{spec['spacing_mm']} mm voxels, lung segmentation, affine registration to `atlas/`, "
        f"{spec['patch_size']}³-voxel patches at {spec['num_locations']} atlas locations, the intensity windows "
        f"{spec['input']['windows']}{' and lung masking' if spec['input']['lung_mask'] else ''}); the result is one "
        f"{spec['feature_dim']}-d embedding per location and one pooled vector per subject.", "",
        "## Evaluation (cross-validated heads on the training cohort)", "",
        *(table if evaluation else ["No evaluation results were found when the bundle was exported."]), "",
        "## Intended use and limitations", "",
        "Research on chest CT representations; not a medical device and not for clinical decisions. "
        + ("It was trained on the synthetic cohort only: it shows that the pipeline works, not that it reads "
           "real disease (docs/science.md gives what the features carry on the generator's truth). "
           if synthetic else "")
        + "Scans must be inspiratory chest CT in HU; subjects whose registration is flagged in `qc.tsv` "
          "should be reviewed before their features are used.", "",
    ]
    return "\n".join(lines)


def export_bundle(config: dict[str, Any], layout: Layout, run: str, out: str | Path) -> Path:
    """Write the bundle of ``run`` to ``out`` (replaced atomically if it exists).

    Raises:
        ConfigError: an unknown run, or a missing encoder/atlas/grid file (one line, naming it).
    """
    import yaml
    from safetensors.torch import save_file

    from models.checkpoint import IGNORED_KEYS, load
    from pipeline.config import run_settings, validate_section
    from pipeline.grid import read_grid
    from pipeline.report.tables import config_hash
    from pipeline.status import passed_subjects

    if run not in config["runs"]:
        raise ConfigError(f"export: no run named {run!r} (known: {', '.join(config['runs'])})")
    for path, what in ((layout.encoder(run), "the run's encoder"), (layout.atlas_mask(), "the atlas"),
                       (layout.grid(), "the patch grid")):
        if not path.is_file():
            raise ConfigError(f"export: {what} {path} does not exist; run the workflow first")
    saved = load(layout.encoder(run))
    train = run_settings(config, run)
    # the saved settings with schema defaults added since training filled in (a new key's default
    # is, by the schema's contract, the behaviour the run was trained with)
    trained = {k: v for k, v in validate_section("train", saved["settings"]).items() if k not in IGNORED_KEYS}
    configured = {k: v for k, v in train.items() if k not in IGNORED_KEYS}
    if trained != configured:
        differing = sorted(k for k in set(trained) | set(configured) if trained.get(k) != configured.get(k))
        raise ConfigError(f"export: {layout.encoder(run)} was trained with other settings than the config gives for "
                          f"run {run!r} (train.{', train.'.join(differing)}); pass the config the workflow ran with")
    grid = read_grid(layout.grid(), "corners", "patch_size")
    graph_state, graph = None, None
    if layout.graph_model(run).is_file():
        graph_saved = load(layout.graph_model(run))
        graph_state, graph = graph_saved["state_dict"], dict(graph_saved["hyper_parameters"])
    spec = preprocessing_spec(config, run, train, patch_size=int(saved["patch_size"]),
                              num_locations=int(saved["num_locations"]), graph=graph)
    if int(grid["patch_size"]) != spec["patch_size"] or len(grid["corners"]) != spec["num_locations"]:
        raise ConfigError(f"export: the grid {layout.grid()} ({int(grid['patch_size'])}³, {len(grid['corners'])} "
                          f"locations) is not the one {layout.encoder(run)} was trained on "
                          f"({spec['patch_size']}³, {spec['num_locations']})")
    resolved = {**config, "runs": {run: config["runs"][run]}}
    subjects_tsv = layout.subjects()
    n_subjects = 0
    if subjects_tsv.is_file():
        from pipeline.manifest import read_subjects

        n_subjects = len(passed_subjects(layout, [s.sid for s in read_subjects(subjects_tsv)], "patches",
                                         missing="skip"))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file({k: v.contiguous() for k, v in saved["state_dict"].items()}, str(staging / ENCODER_FILE),
                  metadata={"format": "pt", "run": run})
        if graph_state is not None:
            save_file({k: v.contiguous() for k, v in graph_state.items()}, str(staging / GRAPH_FILE),
                      metadata={"format": "pt", "run": run})
        (staging / ATLAS_DIR).mkdir()
        shutil.copyfile(layout.atlas_mask(), staging / ATLAS_DIR / ATLAS_MASK_NAME)
        shutil.copyfile(layout.grid(), staging / ATLAS_DIR / GRID_NAME)
        (staging / PREPROCESSING_FILE).write_text(json.dumps(spec, indent=2, default=_plain) + "\n")
        (staging / CONFIG_FILE).write_text(yaml.safe_dump(json.loads(json.dumps(resolved, default=_plain)),
                                                           sort_keys=False))
        (staging / CARD_FILE).write_text(model_card(config, run, train, spec, _evaluation_rows(layout, run), n_subjects))
        from pipeline import __version__

        files = {p.relative_to(staging).as_posix(): _sha256(p) for p in sorted(staging.rglob("*")) if p.is_file()}
        (staging / PROVENANCE_FILE).write_text(json.dumps({
            "copdssl_version": __version__, "run": run, "config_sha256": config_hash(resolved),
            "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC"), "files_sha256": files,
        }, indent=2) + "\n")
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    log.info("export: run %s -> %s (%d locations, %d-d features%s)", run, out, spec["num_locations"],
             spec["feature_dim"], ", graph encoder" if graph_state is not None else "")
    return out


def _plain(value: Any) -> Any:
    """JSON fallback for numpy scalars and paths in a config."""
    if hasattr(value, "item"):
        return value.item()
    return str(value)


def _read_safetensors(path: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ConfigError(f"bundle: {path} does not exist")
    try:
        return load_file(str(path), device="cpu")
    except Exception as error:  # noqa: BLE001 - safetensors raises several types for bad files
        raise ConfigError(f"bundle: {path} is not a readable safetensors file "
                          f"({' '.join(str(error).split())[:200]})") from None


def read_bundle(root: str | Path) -> Bundle:
    """Check and load a bundle written by :func:`export_bundle`.

    Raises:
        ConfigError: one line naming the file and the problem.
    """
    import yaml

    from models.encoder import encoder_from_settings, input_channels
    from pipeline.grid import read_grid
    from pipeline.config import validate_config, validate_section

    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"bundle: {root} is not a directory")
    for name in (PREPROCESSING_FILE, CONFIG_FILE, f"{ATLAS_DIR}/{ATLAS_MASK_NAME}", f"{ATLAS_DIR}/{GRID_NAME}"):
        if not (root / name).is_file():
            raise ConfigError(f"bundle: {root / name} does not exist")
    try:
        spec = json.loads((root / PREPROCESSING_FILE).read_text())
        config = validate_config(yaml.safe_load((root / CONFIG_FILE).read_text()))
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise ConfigError(f"bundle: cannot parse {root}: {' '.join(str(error).split())[:200]}") from None
    if spec.get("format_version") != FORMAT_VERSION:
        raise ConfigError(f"bundle: {root / PREPROCESSING_FILE} has format_version {spec.get('format_version')!r}, "
                          f"this copdssl reads {FORMAT_VERSION}")
    run = spec["run"]
    if list(config["runs"]) != [run]:
        raise ConfigError(f"bundle: {root / CONFIG_FILE} should hold the run {run!r} only, not {list(config['runs'])}")
    grid = read_grid(root / ATLAS_DIR / GRID_NAME, "corners", "patch_size")
    if int(grid["patch_size"]) != spec["patch_size"] or len(grid["corners"]) != spec["num_locations"]:
        raise ConfigError(f"bundle: {root / ATLAS_DIR / GRID_NAME} has {int(grid['patch_size'])}³ patches at "
                          f"{len(grid['corners'])} locations, {PREPROCESSING_FILE} says {spec['patch_size']}³ at "
                          f"{spec['num_locations']}")
    state = _read_safetensors(root / ENCODER_FILE)
    saved = validate_section("train", {"encoder": spec["encoder"], "input": spec["input"]})  # schema defaults
    encoder = encoder_from_settings(saved["encoder"], int(spec["patch_size"]), in_channels=input_channels(saved))
    _load_checked(encoder, state, root / ENCODER_FILE)
    graph = None
    if spec.get("graph"):
        from models.graph import GraphEncoder

        graph = GraphEncoder(**spec["graph"])
        _load_checked(graph, _read_safetensors(root / GRAPH_FILE), root / GRAPH_FILE)
    return Bundle(root=root, run=run, preprocessing=spec, config=config, encoder=encoder, graph=graph)


#: Config sections a bundle fixes when it is applied: how a scan becomes the encoder's input, and the run.
APPLIED_SECTIONS = ("ingest", "lung", "atlas", "register", "patches", "train", "runs")


def workflow_config(config: dict[str, Any], root: str | Path) -> dict[str, Any]:
    """The workflow's config when it applies the bundle at ``root`` (``apply.bundle``).

    The bundle's preprocessing sections, training settings and run replace ``config``'s
    (:data:`APPLIED_SECTIONS`), its atlas is used as ``atlas.reference``, and pooling is ``mean``
    (plus ``gnn`` when the run has a graph stage); the cohort, paths and other sections stay the
    user's. Only ``config.yaml`` is read here (cheap, at DAG time); the weights are checked by
    :func:`read_bundle` when the ``unbundle`` job runs.

    Raises:
        ConfigError: the bundle or its config.yaml is missing or unreadable (one line).
    """
    import yaml

    from pipeline.config import run_settings, validate_config

    path = Path(root) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"apply.bundle: {path} does not exist (a bundle is written by `copdssl export`)")
    try:
        bundled = validate_config(yaml.safe_load(path.read_text()))
    except yaml.YAMLError as error:
        raise ConfigError(f"apply.bundle: cannot parse {path}: {' '.join(str(error).split())[:200]}") from None
    applied = {**config, **{section: bundled[section] for section in APPLIED_SECTIONS}}
    applied["atlas"] = {**bundled["atlas"], "reference": str(root)}
    (run,) = bundled["runs"]
    graph = run_settings(bundled, run)["graph"]["enabled"]
    applied["pool"] = {**config["pool"], "methods": ["mean"] + (["gnn"] if graph else [])}
    applied["report"] = {**config["report"], "location_map_runs": []}
    return validate_config(applied)


def _load_checked(module, state: dict[str, Any], path: Path) -> None:
    """Load ``state`` into ``module``; it must fit exactly: same keys, same shapes (one-line ``ConfigError`` if not)."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in state.items()}
    missing, extra = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    if missing or extra:
        raise ConfigError(f"bundle: {path} does not fit {PREPROCESSING_FILE}: "
                          + "; ".join(filter(None, [f"missing {', '.join(missing[:3])}" if missing else "",
                                                    f"unexpected {', '.join(extra[:3])}" if extra else ""])))
    for key, shape in expected.items():
        if found[key] != shape:
            raise ConfigError(f"bundle: {path} does not fit {PREPROCESSING_FILE}: {key} has shape {found[key]}, "
                              f"the encoder it describes needs {shape}")
    module.load_state_dict(state)


def write_checkpoints(bundle: Bundle, layout: Layout) -> None:
    """Write the bundle's encoder (and graph encoder) as the run's ``encoder.pt`` / ``graph.pt`` in
    ``layout``, so the embed and pool stages read them like a trained run's."""
    from models.checkpoint import export_encoder
    from models.graph import save_graph_encoder
    from pipeline.config import run_settings

    spec, run = bundle.preprocessing, bundle.run
    export_encoder(layout.encoder(run), bundle.encoder, run_settings(bundle.config, run),
                   patch_size=int(spec["patch_size"]), num_locations=int(spec["num_locations"]))
    if bundle.graph is not None:
        save_graph_encoder(layout.graph_model(run), bundle.graph)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--run", required=True, help="the run to export (a key of the config's runs)")
    parser.add_argument("--out", required=True, help="bundle directory to write (replaced if it exists)")


def run(args: argparse.Namespace) -> int:
    from pipeline.cli import full_config

    config = full_config(args)  # --config: the file the workflow ran with (`snakemake --configfile` replaces the default)
    export_bundle(config, Layout(work=Path(config["work_dir"]), results=Path(config["results_dir"])), args.run,
                  args.out)
    return 0
