# Affine registration of the atlas lung mask to each subject's lung mask.


rule register:
    input:
        lung=LAYOUT.lung("{sid}"),
        atlas=LAYOUT.atlas_mask(),
        upstream=LAYOUT.status("lung", "{sid}"),
    output:
        transform=LAYOUT.transform("{sid}"),
        status=LAYOUT.status("register", "{sid}"),
    log:
        LAYOUT.logs("register", "{sid}"),
    benchmark:
        LAYOUT.benchmark("register", "{sid}")
    params:
        settings=settings("register"),
    conda:
        "../../environment.yml"
    shell:
        "copdssl register --sid {wildcards.sid} --lung {input.lung:q} --atlas {input.atlas:q}"
        " --upstream {input.upstream:q} --out {output.transform:q} --status {output.status:q}"
        " --settings {params.settings:q} --log {log:q}"
