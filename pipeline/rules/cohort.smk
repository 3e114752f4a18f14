# The embedded default: a synthetic COPDGene-like cohort (only when cohort.source is synthetic).


if SYNTHETIC:

    rule cohort:
        output:
            manifest=os.path.join(SYNTH_DIR, "subjects.tsv"),
            phenotypes=os.path.join(SYNTH_DIR, "phenotypes.tsv"),
            truth=os.path.join(SYNTH_DIR, "truth.tsv"),
            images=synthetic_outputs(),
        log:
            LAYOUT.logs("cohort"),
        benchmark:
            LAYOUT.benchmark("cohort")
        params:
            out_dir=lambda w, output: os.path.dirname(output.manifest),
            settings=settings("synthetic"),
        threads: 8
        conda:
            "../../environment.yml"
        shell:
            "copdssl synth --settings {params.settings:q} --out-dir {params.out_dir:q}"
            " --threads {threads} --log {log:q}"

    rule cohort_preview:
        input:
            rules.cohort.output.manifest,
        output:
            report(
                os.path.join(config["results_dir"], "figures", "synthetic_preview.png"),
                caption="captions/synthetic_preview.rst",
                category="Cohort",
            ),
        log:
            LAYOUT.logs("cohort", "preview"),
        benchmark:
            LAYOUT.benchmark("cohort", "preview")
        params:
            out_dir=lambda w, input: os.path.dirname(input[0]),
            settings=settings("synthetic"),
        conda:
            "../../environment.yml"
        shell:
            "copdssl synth --settings {params.settings:q} --out-dir {params.out_dir:q}"
            " --preview {output:q} --log {log:q}"


rule manifest:
    input:
        config["cohort"]["manifest"],
    output:
        subjects=LAYOUT.subjects(),
        rejects=LAYOUT.manifest_rejects(),
    log:
        LAYOUT.logs("manifest"),
    benchmark:
        LAYOUT.benchmark("manifest")
    conda:
        "../../environment.yml"
    shell:
        "copdssl manifest --manifest {input:q} --out {output.subjects:q}"
        " --rejects {output.rejects:q} --log {log:q}"
