# Cut S^3 patches at the atlas grid locations mapped into each subject (and, with
# patches.lung_mask, the lung masks cut the same way, bit-packed, beside them).


rule patches:
    input:
        ct=LAYOUT.ct("{sid}"),
        lung=LAYOUT.lung("{sid}"),
        transform=LAYOUT.transform("{sid}"),
        grid=LAYOUT.grid(),
    output:
        patches=LAYOUT.patches("{sid}"),
        status=LAYOUT.status("patches", "{sid}"),
        **({"mask": LAYOUT.patch_mask("{sid}")} if config["patches"]["lung_mask"] else {}),
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
        " --status {output.status:q}" + (" --out-mask {output.mask:q}" if config["patches"]["lung_mask"] else "") + " --settings {params.settings:q} --log {log:q}"
