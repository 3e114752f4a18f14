# Shared by every rule: the validated config, paths, the subject list and named input functions.
# The pipeline CLI (`copdssl`) must be on PATH: activate the environment (`make run` does).

import gc
import json
import os
import re

# Snakemake holds millions of long-lived objects for a 10,000-subject DAG (40,000 jobs). With
# CPython's default thresholds (700, 10, 10) the cyclic garbage collector re-scans that whole heap
# as it grows: 19 full collections, 7.3 s of a 61.6 s `snakemake -n` at 10,000 subjects. Larger
# thresholds leave the young-generation collections in place and make full ones rare
# (BENCHMARKS.md, "Workflow DAG at scale"). This tunes the Snakemake process only; jobs run in
# their own processes.
gc.set_threshold(10_000, 10, 100)

from pipeline.baselines import BASELINE_POOLING, split_combined
from pipeline.bundle import workflow_config
from pipeline.config import location_map_runs, run_settings, validate_config
from pipeline.feature_sets import feature_sets
from pipeline.layout import Layout
from pipeline.register import FIT_KEYS as REGISTER_FIT_KEYS
from pipeline.subjects import SID_PATTERN, Subject, read_manifest
from pipeline.template import atlas_sample

# A stage reads the status of the stage before it (`--upstream`) to mark a subject skipped when
# that stage failed. The rules pass it as `{params.upstream_dir}/{wildcards.sid}.json`
# (Layout.status), not as an input: the job that wrote it also wrote the rule's declared data
# input, so it exists whenever that input does. Declared as inputs (or as params functions) these
# 30,000 files cost 4-5 s of a 10,000-subject `snakemake -n` (BENCHMARKS.md).

# Validate against config/schema/config.schema.yaml and fill defaults (one-line error naming the key).
_validated = validate_config(config)
# Apply mode (apply.bundle): the bundle's preprocessing, atlas and run replace the config's, and the
# workflow embeds the cohort with the bundle's weights instead of training (pipeline/rules/apply.smk).
APPLY_BUNDLE = _validated["apply"]["bundle"]
if APPLY_BUNDLE:
    _validated = workflow_config(_validated, APPLY_BUNDLE)
config.clear()
config.update(_validated)

LAYOUT = Layout(config["work_dir"], config["results_dir"])
RUNS = list(config["runs"])
POOLINGS = list(config["pool"]["methods"])
SYNTHETIC = config["cohort"]["source"] == "synthetic"
SYNTH_DIR = config["synthetic"]["out_dir"]
PHENOTYPES = config["cohort"]["phenotypes"]
TRUTH = config["cohort"]["truth"]
OUTCOMES = config["evaluate"]["outcomes"]
FIGURES = os.path.join(config["results_dir"], "figures")
# Per-subject stages with a cohort-level status table (work/qc/<stage>.tsv) that aggregate rules
# depend on: lung (atlas) and patches (train, embed, evaluate, qc).
TABLED_STAGES = ["lung", "patches"]
# Runs with a per-location read-out map (report.location_map_runs; default: every run that trains).
LOCMAP_RUNS = location_map_runs(config)
# Baselines whose tables the `baseline` rule computes from the images (the oracle reads truth.tsv).
IMAGE_BASELINES = [b for b in BASELINE_POOLING if b != "oracle"]


def load_subjects():
    """Subjects known at parse time: the synthetic plan (the images do not exist yet) or the manifest."""
    if SYNTHETIC:
        from pipeline.synth.plan import plan_cohort

        return [Subject(p.sid, os.path.join(SYNTH_DIR, p.image), p.format) for p in plan_cohort(config["synthetic"])]
    subjects, _rejected = read_manifest(config["cohort"]["manifest"])
    return subjects


SUBJECTS = {s.sid: s for s in load_subjects()}
SIDS = list(SUBJECTS)
# The subjects the atlas is built from (by a hash of their IDs; none with a supplied atlas): the
# atlas depends on their lung masks only, so fixing any other subject reruns that subject alone.
ATLAS_REFERENCE = config["atlas"]["reference"]
ATLAS_SAMPLE = [] if ATLAS_REFERENCE else atlas_sample(SIDS, config["atlas"]["build_subjects"])


def graph_enabled(run):
    return run_settings(config, run)["graph"]["enabled"]


# Every evaluated feature set as (name, pooling), in the report's order (pipeline.feature_sets):
# baselines, runs x poolings (gnn only where the graph stage is on), baseline+run combined sets.
_EVALUATED = feature_sets(config)
EVALUATIONS = [(s.name, s.pooling) for s in _EVALUATED]
# The (run, pooling) feature sets among them.
FEATURE_SETS = [(s.name, s.pooling) for s in _EVALUATED if s.kind == "run"]
# What the evaluate rule's {name} and {fpool} wildcards may be.
EVALUATION_NAMES = list(dict.fromkeys([*BASELINE_POOLING, *RUNS, *(name for name, _ in EVALUATIONS)]))
EVALUATION_POOLINGS = list(dict.fromkeys([*POOLINGS, *BASELINE_POOLING.values()]))


wildcard_constraints:
    sid=SID_PATTERN.pattern.strip("^$"),
    run="|".join(re.escape(r) for r in RUNS),
    pooling="|".join(POOLINGS),


def settings(section):
    """A config section as JSON, passed to the CLI with `--settings {params.settings:q}`.

    Passing the settings as a parameter makes Snakemake rerun exactly the jobs whose settings
    changed (params are a rerun trigger).
    """
    return json.dumps(config[section])


# The evaluate section as the folds and evaluate jobs see it: without the lists of which feature
# sets exist, so that adding a baseline or a combined set does not rerun the folds and every evaluation.
EVALUATE_SETTINGS = json.dumps({k: v for k, v in config["evaluate"].items() if k not in ("baselines", "combine_with")})


def run_settings_json(wildcards):
    return json.dumps(run_settings(config, wildcards.run))


def atlas_inputs(wildcards):
    """The atlas sample's lung masks and statuses, or the supplied reference atlas's two files."""
    if ATLAS_REFERENCE:
        from pipeline.atlas import reference_files

        return list(reference_files(ATLAS_REFERENCE))
    return [LAYOUT.lung(sid) for sid in ATLAS_SAMPLE] + [LAYOUT.status("lung", sid) for sid in ATLAS_SAMPLE]


def subject_image(wildcards):
    return SUBJECTS[wildcards.sid].image


def subject_format(wildcards):
    return SUBJECTS[wildcards.sid].format


def all_statuses(stage):
    return [LAYOUT.status(stage, sid) for sid in SIDS]


def synthetic_outputs():
    """Every image (DICOM series are directories) and true label map the generator writes."""
    images = [directory(s.image) if s.format == "dicom" else s.image for s in SUBJECTS.values()]
    labels = [os.path.join(SYNTH_DIR, "labels", f"{sid}.nii.gz") for sid in SIDS]
    return images + labels


def launcher(wildcards, resources):
    """`torchrun --nproc_per_node N` when the train job has more than one GPU, else the plain CLI."""
    gpus = int(resources.get("gpu", 0) or 0)
    if gpus > 1:
        return f"torchrun --standalone --nproc_per_node {gpus} -m pipeline --"
    return "copdssl"


def pool_inputs(wildcards):
    inputs = {
        "subjects": LAYOUT.subjects(),
        "patches": LAYOUT.stage_table("patches"),
        "grid": LAYOUT.grid(),
        "embeddings": LAYOUT.embeddings_dir(wildcards.run),
    }
    if wildcards.pooling == "gnn":
        inputs["graph"] = LAYOUT.graph_model(wildcards.run)
    return inputs


def evaluation_features(wildcards):
    """The feature table(s) of one evaluation; a combined set lists the baseline's, then the run's."""
    if wildcards.name in BASELINE_POOLING:
        return [LAYOUT.baseline_features(wildcards.name)]
    combined = split_combined(wildcards.name)
    if combined:
        baseline, run = combined
        return [LAYOUT.baseline_features(baseline), LAYOUT.features(run, wildcards.fpool)]
    return [LAYOUT.features(wildcards.name, wildcards.fpool)]


def report_figures():
    """Figure name -> path, with the names `copdssl report` writes (pipeline.report.figures.figure_names)."""
    from pipeline.report.figures import figure_names

    return {name: os.path.join(FIGURES, f"{name}.png") for name in figure_names(config)}


def final_targets():
    """What `snakemake` builds by default: the report and the QC table, or, applying a bundle, the
    bundle run's pooled features and the QC table."""
    if APPLY_BUNDLE:
        return [LAYOUT.features(run, pooling) for run, pooling in FEATURE_SETS] + [LAYOUT.qc_table()]
    return [LAYOUT.report(), LAYOUT.qc_table()]
