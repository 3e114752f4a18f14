# Cross-validated outcome heads on every feature table, with folds shared by all of them.


rule folds:
    input:
        subjects=LAYOUT.subjects(),
        phenotypes=PHENOTYPES,
        patches=LAYOUT.stage_table("patches"),
    output:
        LAYOUT.folds(),
    log:
        LAYOUT.logs("folds"),
    benchmark:
        LAYOUT.benchmark("folds")
    params:
        work=LAYOUT.work,
        settings=EVALUATE_SETTINGS,
    conda:
        "../../environment.yml"
    shell:
        "copdssl folds --subjects {input.subjects:q} --work {params.work:q} --phenotypes {input.phenotypes:q}"
        " --out {output:q} --settings {params.settings:q} --log {log:q}"


rule evaluate:
    input:
        features=evaluation_features,
        folds=LAYOUT.folds(),
        phenotypes=PHENOTYPES,
        truth=[TRUTH] if TRUTH else [],
    output:
        metrics=LAYOUT.metrics("{name}", "{fpool}"),
        predictions=LAYOUT.predictions("{name}", "{fpool}"),
        readout=LAYOUT.readout("{name}", "{fpool}"),
    log:
        LAYOUT.logs("evaluate", "{name}_{fpool}"),
    benchmark:
        LAYOUT.benchmark("evaluate", "{name}_{fpool}")
    params:
        settings=EVALUATE_SETTINGS,
        truth=lambda w, input: f"--truth {input.truth[0]}" if input.truth else "",
        out_dir=lambda w: LAYOUT.eval_dir(w.name, w.fpool),
    wildcard_constraints:
        name="|".join(re.escape(n) for n in EVALUATION_NAMES),
        fpool="|".join(re.escape(p) for p in EVALUATION_POOLINGS),
    # Many small ridge/ordinal fits: a second BLAS thread gains nothing (16.4 s at 1 thread, 17.6 s at 2,
    # one demo job; BENCHMARKS.md), while two one-thread jobs run side by side.
    threads: 1
    conda:
        "../../environment.yml"
    shell:
        "OMP_NUM_THREADS={threads} copdssl evaluate --features {input.features:q} --folds {input.folds:q}"
        " --phenotypes {input.phenotypes:q} {params.truth} --name {wildcards.name} --pooling {wildcards.fpool}"
        " --out-dir {params.out_dir:q} --settings {params.settings:q} --log {log:q}"
