# Cut S^3 patches at the atlas grid locations mapped into each subject.


rule patches:
    input:
        ct=LAYOUT.ct("{sid}"),
        lung=LAYOUT.lung("{sid}"),
        transform=LAYOUT.transform("{sid}"),
        grid=LAYOUT.grid(),
        upstream=LAYOUT.status("register", "{sid}"),
    output:
        patches=LAYOUT.patches("{sid}"),
        status=LAYOUT.status("patches", "{sid}"),
    log:
        LAYOUT.logs("patches", "{sid}"),
    benchmark:
        LAYOUT.benchmark("patches", "{sid}")
    params:
        settings=settings("patches"),
    conda:
        "../../environment.yml"
    shell:
        "copdssl patches --sid {wildcards.sid} --ct {input.ct:q} --lung {input.lung:q} --transform {input.transform:q}"
        " --grid {input.grid:q} --upstream {input.upstream:q} --out {output.patches:q}"
        " --status {output.status:q} --settings {params.settings:q} --log {log:q}"
