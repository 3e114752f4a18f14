# One training job per run: context-aware MoCo-v2 patch encoder with IFM, then (optionally)
# the graph-level MoCo stage on the frozen patch embeddings.
#
# GPUs are a resource set by the profile (profiles/slurm): with more than one, the job launches
# torchrun and trains with DDP. checkpoint.pt is deliberately not a declared output: Snakemake
# deletes the outputs of a killed job, and the checkpoint must survive to resume it exactly.


rule train:
    input:
        subjects=LAYOUT.subjects(),
        grid=LAYOUT.grid(),
        patches=LAYOUT.stage_table("patches"),
    output:
        encoder=LAYOUT.encoder("{run}"),
        history=LAYOUT.history("{run}"),
    log:
        LAYOUT.logs("train", "{run}"),
    benchmark:
        LAYOUT.benchmark("train", "{run}")
    params:
        work=LAYOUT.work,
        settings=run_settings_json,
        launcher=launcher,
    threads: 8
    resources:
        gpu=0,
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads} {params.launcher} train --run {wildcards.run} --subjects {input.subjects:q}"
        " --work {params.work:q} --settings {params.settings:q} --log {log:q}"


rule train_graph:
    input:
        subjects=LAYOUT.subjects(),
        patches=LAYOUT.stage_table("patches"),
        grid=LAYOUT.grid(),
        embeddings=LAYOUT.embeddings_dir("{run}"),
    output:
        model=LAYOUT.graph_model("{run}"),
        history=LAYOUT.graph_history("{run}"),
    log:
        LAYOUT.logs("train_graph", "{run}"),
    benchmark:
        LAYOUT.benchmark("train_graph", "{run}")
    params:
        work=LAYOUT.work,
        settings=run_settings_json,
    threads: 4
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads} copdssl train-graph --run {wildcards.run} --subjects {input.subjects:q}"
        " --work {params.work:q} --settings {params.settings:q} --log {log:q}"
