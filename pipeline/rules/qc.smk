# Quality control: status tables of the stages that aggregate rules wait on (one input instead of
# 10,000, so the DAG stays small at 10,000 subjects; the aggregate stages read their subjects'
# statuses from it, pipeline.status.passed_in_stage_table) and the overall QC table, one row per subject:
# ok, or the stage that failed and why (manifest rejections included). The QC table depends on the
# `patches` table only: a subject's patches status exists once all its earlier stages have run, and
# `copdssl qc` reads every stage's status files itself.


rule stage_table:
    input:
        subjects=LAYOUT.subjects(),
        statuses=lambda w: all_statuses(w.stage),
    output:
        LAYOUT.stage_table("{stage}"),
    log:
        LAYOUT.logs("qc", "{stage}"),
    benchmark:
        LAYOUT.benchmark("qc", "{stage}")
    params:
        work=LAYOUT.work,
    wildcard_constraints:
        stage="|".join(TABLED_STAGES),
    conda:
        "../../environment.yml"
    shell:
        "copdssl qc --stage {wildcards.stage} --subjects {input.subjects:q} --work {params.work:q}"
        " --out {output:q} --log {log:q}"


rule qc:
    input:
        subjects=LAYOUT.subjects(),
        rejects=LAYOUT.manifest_rejects(),
        patches=LAYOUT.stage_table("patches"),
    output:
        report(LAYOUT.qc_table(), caption="captions/qc.rst", category="Quality control"),
    log:
        LAYOUT.logs("qc"),
    benchmark:
        LAYOUT.benchmark("qc")
    params:
        work=LAYOUT.work,
        settings=settings("register"),
    conda:
        "../../environment.yml"
    shell:
        "copdssl qc --subjects {input.subjects:q} --rejects {input.rejects:q}"
        " --work {params.work:q} --settings {params.settings:q} --out {output:q} --log {log:q}"
