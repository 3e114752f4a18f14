# copdssl: context-aware self-supervised learning on chest CT for COPD outcomes.
#
# This file is the table of contents. Each stage lives in pipeline/rules/<stage>.smk and calls
# one `copdssl <stage>` subcommand (pipeline/cli.py), so every stage also runs by hand.
# The config holds science and data paths; threads, GPUs and cluster settings go in profiles/.

from snakemake.utils import min_version

min_version("9.0")


configfile: "config/config.yaml"


include: "pipeline/rules/common.smk"
include: "pipeline/rules/cohort.smk"
include: "pipeline/rules/ingest.smk"
include: "pipeline/rules/lung.smk"
include: "pipeline/rules/atlas.smk"
include: "pipeline/rules/register.smk"
include: "pipeline/rules/patches.smk"
include: "pipeline/rules/qc.smk"
include: "pipeline/rules/train.smk"
include: "pipeline/rules/embed.smk"
include: "pipeline/rules/pool.smk"
include: "pipeline/rules/evaluate.smk"
include: "pipeline/rules/locmap.smk"
include: "pipeline/rules/report.smk"


if APPLY_BUNDLE:

    include: "pipeline/rules/apply.smk"


rule all:
    input:
        final_targets(),
    default_target: True
