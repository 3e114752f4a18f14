# Affine registration of the atlas lung mask to each subject's lung mask.


rule register:
    input:
        lung=LAYOUT.lung("{sid}"),
        atlas=LAYOUT.atlas_mask(),
    output:
        transform=LAYOUT.transform("{sid}"),
        status=LAYOUT.status("register", "{sid}"),
    log:
        LAYOUT.logs("register", "{sid}"),
    benchmark:
        LAYOUT.benchmark("register", "{sid}")
    params:
        upstream_dir=LAYOUT.status_dir("lung"),
        settings=settings("register"),
    conda:
        "../../environment.yml"
    shell:
        "copdssl register --sid {wildcards.sid} --lung {input.lung:q} --atlas {input.atlas:q}"
        " --upstream {params.upstream_dir:q}/{wildcards.sid}.json --out {output.transform:q}"
        " --status {output.status:q} --settings {params.settings:q} --log {log:q}"
