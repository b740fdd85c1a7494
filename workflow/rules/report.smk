# Figures, each registered for `snakemake --report report.html` (see report_outputs).
# gates_{patient} (one per patient with flow samples) draws the stored gates of every flow
# visit from the annotated h5ads, read one at a time (at most 20,000 events per panel).


rule report:
    input:
        samples="results/tables/samples.tsv",
        kinetics="results/tables/kinetics.tsv",
        cohort="results/tables/cohort.tsv",
        qc="results/tables/qc.tsv",
        annotated=expand("results/annotated/{sample_id}.h5ad", sample_id=FLOW_SAMPLES),
    output:
        report_outputs(),
    params:
        config=CONFIG_FILE,
        settings=lambda wildcards: [config["report"], config["seed"]],
    log:
        "logs/report.log",
    conda:
        CONDA_ENV
    shell:
        "bcellmap report --config {params.config} --samples-table {input.samples}"
        " --kinetics {input.kinetics} --cohort {input.cohort} --qc {input.qc}"
        " --annotated {input.annotated} --outdir results/report 2> {log}"
