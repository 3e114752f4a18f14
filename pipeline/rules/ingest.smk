# Read each raw CT (DICOM series or NIfTI) as HU, reorient to canonical and resample to isotropic;
# optionally calibrate air (trachea) and blood (heart) HU (ingest.calibration, off by default).


rule ingest:
    input:
        image=subject_image,
    output:
        ct=LAYOUT.ct("{sid}"),
        status=LAYOUT.status("ingest", "{sid}"),
    log:
        LAYOUT.logs("ingest", "{sid}"),
    benchmark:
        LAYOUT.benchmark("ingest", "{sid}")
    params:
        settings=settings("ingest"),
        format=subject_format,
    conda:
        "../../environment.yml"
    shell:
        "copdssl ingest --sid {wildcards.sid} --image {input.image:q} --format {params.format}"
        " --out {output.ct:q} --status {output.status:q} --settings {params.settings:q} --log {log:q}"
