# Once per cohort: the atlas lung mask, the patch grid and its adjacency graph. The atlas is built
# from the hashed sample ATLAS_SAMPLE (common.smk) and depends on nothing else from the cohort;
# with atlas.reference it is copied from that directory or bundle.


rule atlas:
    input:
        atlas_inputs,
    output:
        atlas=LAYOUT.atlas_mask(),
        grid=LAYOUT.grid(),
    log:
        LAYOUT.logs("atlas"),
    benchmark:
        LAYOUT.benchmark("atlas")
    params:
        work=LAYOUT.work,
        sids=" ".join(ATLAS_SAMPLE),
        settings=settings("atlas"),
        register=json.dumps({key: config["register"][key] for key in REGISTER_FIT_KEYS}),
    conda:
        "../../environment.yml"
    shell:
        "copdssl atlas --sids {params.sids} --work {params.work:q}"
        " --out-atlas {output.atlas:q} --out-grid {output.grid:q}"
        " --settings {params.settings:q} --register-settings {params.register:q} --log {log:q}"
