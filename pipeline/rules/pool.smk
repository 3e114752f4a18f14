# Subject-level feature tables: pooled patch embeddings per run, and the non-learned baselines.


rule pool:
    input:
        unpack(pool_inputs),
    output:
        LAYOUT.features("{run}", "{pooling}"),
    log:
        LAYOUT.logs("pool", "{run}_{pooling}"),
    benchmark:
        LAYOUT.benchmark("pool", "{run}_{pooling}")
    params:
        work=LAYOUT.work,
    conda:
        "../../environment.yml"
    shell:
        "copdssl pool --run {wildcards.run} --pooling {wildcards.pooling} --subjects {input.subjects:q}"
        " --work {params.work:q} --out {output:q} --log {log:q}"


rule baseline_densitometry:
    input:
        subjects=LAYOUT.subjects(),
        patches=LAYOUT.stage_table("patches"),
    output:
        LAYOUT.baseline_features("densitometry"),
    log:
        LAYOUT.logs("baseline", "densitometry"),
    benchmark:
        LAYOUT.benchmark("baseline", "densitometry")
    params:
        work=LAYOUT.work,
    conda:
        "../../environment.yml"
    shell:
        "copdssl baseline --name densitometry --subjects {input.subjects:q} --work {params.work:q}"
        " --out {output:q} --log {log:q}"


if TRUTH:

    rule baseline_oracle:
        input:
            subjects=LAYOUT.subjects(),
            truth=TRUTH,
            patches=LAYOUT.stage_table("patches"),
        output:
            LAYOUT.baseline_features("oracle"),
        log:
            LAYOUT.logs("baseline", "oracle"),
        benchmark:
            LAYOUT.benchmark("baseline", "oracle")
        params:
            work=LAYOUT.work,
        conda:
            "../../environment.yml"
        shell:
            "copdssl baseline --name oracle --subjects {input.subjects:q} --work {params.work:q}"
            " --truth {input.truth:q} --out {output:q} --log {log:q}"
