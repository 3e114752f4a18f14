# Cut S^3 patches at the atlas grid locations mapped into each subject.


rule patches:
    input:
        ct=LAYOUT.ct("{sid}"),
        lung=LAYOUT.lung("{sid}"),
        transform=LAYOUT.transform("{sid}"),
        grid=LAYOUT.grid(),
    output:
        patches=LAYOUT.patches("{sid}"),
        status=LAYOUT.status("patches", "{sid}"),
    log:
        LAYOUT.logs("patches", "{sid}"),
    benchmark:
        LAYOUT.benchmark("patches", "{sid}")
    params:
        upstream_dir=LAYOUT.status_dir("register"),
        settings=settings("patches"),
    conda:
        "../../environment.yml"
    shell:
        "copdssl patches --sid {wildcards.sid} --ct {input.ct:q} --lung {input.lung:q} --transform {input.transform:q}"
        " --grid {input.grid:q} --upstream {params.upstream_dir:q}/{wildcards.sid}.json --out {output.patches:q}"
        " --status {output.status:q} --settings {params.settings:q} --log {log:q}"
