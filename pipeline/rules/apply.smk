# Apply mode (apply.bundle, config/apply.yaml): the cohort is preprocessed with the bundle's
# settings and registered to the bundle's atlas by the usual per-subject rules; instead of
# training, this rule writes the bundle's weights as the run's checkpoints, which the embed and
# pool rules then read (common.smk: workflow_config, final_targets).


rule unbundle:
    input:
        weights=os.path.join(APPLY_BUNDLE, "encoder.safetensors"),
        spec=os.path.join(APPLY_BUNDLE, "preprocessing.json"),
    output:
        [LAYOUT.encoder(run) for run in RUNS] + [LAYOUT.graph_model(run) for run in RUNS if graph_enabled(run)],
    log:
        LAYOUT.logs("unbundle"),
    params:
        work=LAYOUT.work,
        bundle=lambda wildcards, input: os.path.dirname(input.spec),
    conda:
        "../../environment.yml"
    shell:
        "copdssl unbundle --bundle {params.bundle:q} --work {params.work:q} --log {log:q}"


ruleorder: unbundle > train
ruleorder: unbundle > train_graph
