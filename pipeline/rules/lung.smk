# Classical lung segmentation (no downloaded weights) and CT densitometry.


rule lung:
    input:
        ct=LAYOUT.ct("{sid}"),
    output:
        lung=LAYOUT.lung("{sid}"),
        density=LAYOUT.density("{sid}"),
        status=LAYOUT.status("lung", "{sid}"),
    log:
        LAYOUT.logs("lung", "{sid}"),
    benchmark:
        LAYOUT.benchmark("lung", "{sid}")
    params:
        upstream_dir=LAYOUT.status_dir("ingest"),
        settings=settings("lung"),
    conda:
        "../../environment.yml"
    shell:
        "copdssl lung --sid {wildcards.sid} --ct {input.ct:q} --upstream {params.upstream_dir:q}/{wildcards.sid}.json"
        " --out {output.lung:q} --density {output.density:q} --status {output.status:q}"
        " --settings {params.settings:q} --log {log:q}"
