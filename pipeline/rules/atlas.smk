# Once per cohort: the atlas lung mask, the patch grid and its adjacency graph.


rule atlas:
    input:
        subjects=LAYOUT.subjects(),
        lungs=LAYOUT.stage_table("lung"),
    output:
        atlas=LAYOUT.atlas_mask(),
        grid=LAYOUT.grid(),
    log:
        LAYOUT.logs("atlas"),
    benchmark:
        LAYOUT.benchmark("atlas")
    params:
        work=LAYOUT.work,
        settings=settings("atlas"),
    conda:
        "../../environment.yml"
    shell:
        "copdssl atlas --subjects {input.subjects:q} --work {params.work:q}"
        " --out-atlas {output.atlas:q} --out-grid {output.grid:q}"
        " --settings {params.settings:q} --log {log:q}"
