# Per-location read-out map of a run: out-of-fold R² of each target from each atlas location's
# patch embeddings alone (repeat 0 of the shared folds), for the report's "Where the signal is".


rule locmap:
    input:
        embeddings=LAYOUT.embeddings_dir("{run}"),
        folds=LAYOUT.folds(),
        phenotypes=PHENOTYPES,
        truth=[TRUTH] if TRUTH else [],
        grid=LAYOUT.grid(),
    output:
        LAYOUT.location_map("{run}"),
    log:
        LAYOUT.logs("locmap", "{run}"),
    benchmark:
        LAYOUT.benchmark("locmap", "{run}")
    params:
        work=LAYOUT.work,
        settings=settings("evaluate"),
        truth=lambda w, input: f"--truth {input.truth[0]}" if input.truth else "",
    threads: 1
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads} copdssl locmap --run {wildcards.run} --work {params.work:q}"
        " --folds {input.folds:q} --phenotypes {input.phenotypes:q} {params.truth} --out {output:q}"
        " --jobs {threads} --settings {params.settings:q} --log {log:q}"
