# Embed every patch of every subject with a run's encoder (pre-projection features).


rule embed:
    input:
        encoder=LAYOUT.encoder("{run}"),
        subjects=LAYOUT.subjects(),
        patches=LAYOUT.stage_table("patches"),
    output:
        directory(LAYOUT.embeddings_dir("{run}")),
    log:
        LAYOUT.logs("embed", "{run}"),
    benchmark:
        LAYOUT.benchmark("embed", "{run}")
    params:
        work=LAYOUT.work,
        settings=settings("embed"),
    threads: 8
    resources:
        gpu=0,
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads} copdssl embed --run {wildcards.run} --subjects {input.subjects:q}"
        " --work {params.work:q} --settings {params.settings:q} --log {log:q}"
