# The outcome report: results/report.html plus its figures, also exposed to `snakemake --report`.


rule report:
    input:
        metrics=[LAYOUT.metrics(n, p) for n, p in EVALUATIONS],
        predictions=[LAYOUT.predictions(n, p) for n, p in EVALUATIONS],
        histories=[LAYOUT.history(run) for run in RUNS],
        qc=LAYOUT.qc_table(),
        folds=LAYOUT.folds(),
        grid=LAYOUT.grid(),
        preview=rules.cohort_preview.output if SYNTHETIC else [],
        location_maps=[LAYOUT.location_map(run) for run in LOCMAP_RUNS],
        atlas=LAYOUT.atlas_mask() if LOCMAP_RUNS else [],
    output:
        html=LAYOUT.report(),
        **{
            name: report(path, caption=f"captions/{name.split('_')[0]}.rst", category="Outcomes")
            for name, path in report_figures().items()
        },
    log:
        LAYOUT.logs("report"),
    benchmark:
        LAYOUT.benchmark("report")
    params:
        work=LAYOUT.work,
        results=LAYOUT.results,
        settings=json.dumps(config),
    conda:
        "../../environment.yml"
    shell:
        "copdssl report --work {params.work:q} --results {params.results:q} --out {output.html:q}"
        " --settings {params.settings:q} --log {log:q}"
