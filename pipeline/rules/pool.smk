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


rule baseline:
    input:
        subjects=LAYOUT.subjects(),
        patches=LAYOUT.stage_table("patches"),
    output:
        LAYOUT.baseline_features("{baseline}"),
    log:
        LAYOUT.logs("baseline", "{baseline}"),
    benchmark:
        LAYOUT.benchmark("baseline", "{baseline}")
    params:
        work=LAYOUT.work,
    wildcard_constraints:
        baseline="|".join(IMAGE_BASELINES),
    conda:
        "../../environment.yml"
    shell:
        "copdssl baseline --name {wildcards.baseline} --subjects {input.subjects:q} --work {params.work:q}"
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
