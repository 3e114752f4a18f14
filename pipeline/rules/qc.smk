# One row per subject: ok, or the stage that failed and why (manifest rejections included).

QC_STAGES = ["ingest", "lung", "register", "patches"]


rule qc:
    input:
        subjects=LAYOUT.subjects(),
        rejects=LAYOUT.manifest_rejects(),
        statuses=[LAYOUT.status(stage, sid) for stage in QC_STAGES for sid in SIDS],
    output:
        report(LAYOUT.qc_table(), caption="captions/qc.rst", category="Quality control"),
    log:
        LAYOUT.logs("qc"),
    benchmark:
        LAYOUT.benchmark("qc")
    params:
        work=LAYOUT.work,
    conda:
        "../../environment.yml"
    shell:
        "copdssl qc --subjects {input.subjects:q} --rejects {input.rejects:q}"
        " --work {params.work:q} --out {output:q} --log {log:q}"
