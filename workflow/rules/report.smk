# Figures, each registered for `snakemake --report report.html` (see report_outputs).
# gates_{patient} (one per patient with flow samples) draws the stored gates of every flow
# visit from the annotated h5ads, read one at a time (at most report.gate_events per panel).


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
        config=config_json,
        # The heatmap and embedding pool the clustering markers.
        settings=settings("report", "cluster.markers", "seed"),
        outdir=lambda wildcards, output: str(Path(output[0]).parent),
    log:
        "logs/report.log",
    benchmark:
        "logs/benchmarks/report.tsv"
    conda:
        CONDA_ENV
    shell:
        "bcellmap report --config-json {params.config:q} --samples-table {input.samples}"
        " --kinetics {input.kinetics} --cohort {input.cohort} --qc {input.qc}"
        " --annotated {input.annotated} --outdir {params.outdir} 2> {log}"
