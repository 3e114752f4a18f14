# Shared by every rule: the validated config, paths, the subject list and named input functions.
# The pipeline CLI (`copdssl`) must be on PATH: activate the environment (`make run` does).

import json
import os
import re

from pipeline.config import run_settings, validate_config
from pipeline.layout import Layout
from pipeline.subjects import SID_PATTERN, Subject, read_manifest

# Validate against config/schema/config.schema.yaml and fill defaults (one-line error naming the key).
_validated = validate_config(config)
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
QC_STAGES = ["ingest", "lung", "register", "patches"]
BASELINE_POOLING = {"densitometry": "lung", "oracle": "truth"}
BASELINES = [b for b in config["evaluate"]["baselines"] if b != "oracle" or TRUTH]


def load_subjects():
    """Subjects known at parse time: the synthetic plan (the images do not exist yet) or the manifest."""
    if SYNTHETIC:
        from pipeline.synth.plan import plan_cohort

        return [Subject(p.sid, os.path.join(SYNTH_DIR, p.image), p.format) for p in plan_cohort(config["synthetic"])]
    subjects, _rejected = read_manifest(config["cohort"]["manifest"])
    return subjects


SUBJECTS = {s.sid: s for s in load_subjects()}
SIDS = list(SUBJECTS)


def graph_enabled(run):
    return run_settings(config, run)["graph"]["enabled"]


# (run, pooling) feature sets: gnn pooling only for runs whose graph stage is enabled.
FEATURE_SETS = [(run, pooling) for run in RUNS for pooling in POOLINGS if pooling != "gnn" or graph_enabled(run)]
# Every evaluated feature set as (name, pooling): baselines first, then runs.
EVALUATIONS = [(b, BASELINE_POOLING[b]) for b in BASELINES] + FEATURE_SETS


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


def run_settings_json(wildcards):
    return json.dumps(run_settings(config, wildcards.run))


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
        "grid": LAYOUT.grid(),
        "embeddings": LAYOUT.embeddings_dir(wildcards.run),
    }
    if wildcards.pooling == "gnn":
        inputs["graph"] = LAYOUT.graph_model(wildcards.run)
    return inputs


def evaluation_features(wildcards):
    if wildcards.name in BASELINE_POOLING:
        return LAYOUT.baseline_features(wildcards.name)
    return LAYOUT.features(wildcards.name, wildcards.fpool)


def report_figures():
    """Figure name -> path; the names match what `copdssl report` writes."""
    names = ["training_curves", "patch_grid"]
    names += [f"scatter_{name}" for name, o in OUTCOMES.items() if o["kind"] == "regression"]
    names += [f"confusion_{name}" for name, o in OUTCOMES.items() if o["kind"] == "ordinal"]
    if TRUTH:
        names.append("readout")
    return {name: os.path.join(FIGURES, f"{name}.png") for name in names}
