# Figures, each registered for `snakemake --report report.html` (see report_*_outputs), in
# three kinds of job so that they run beside the rest of the workflow: the figures of the
# tables (rule report, after kinetics), the clustering figures (as soon as every flow sample is
# annotated) and one gate figure per patient with flow samples (as soon as that patient's
# samples are annotated; its visits' days come from the sample sheet).


rule report:
    input:
        samples="results/tables/samples.tsv",
        kinetics="results/tables/kinetics.tsv",
        qc="results/tables/qc.tsv",
    output:
        report_table_outputs(),
    params:
        config=config_json,
        settings=settings("report.dpi", "report.min_b_events_composition"),
        outdir=lambda wildcards, output: str(Path(output[0]).parent),
    # The last job of a run: everything else waits for nothing, this waits for kinetics.
    priority: 5
    log:
        "logs/report.log",
    benchmark:
        "logs/benchmarks/report.tsv"
    conda:
        CONDA_ENV
    shell:
        "bcellmap report --figures tables --config-json {params.config:q}"
        " --samples-table {input.samples} --kinetics {input.kinetics} --qc {input.qc}"
        " --outdir {params.outdir} 2> {log}"


rule report_clusters:
    input:
        annotated=expand("results/annotated/{sample_id}.h5ad", sample_id=FLOW_SAMPLES),
    output:
        report_cluster_outputs(),
    params:
        config=config_json,
        # The heatmap and embedding pool the clustering markers.
        settings=settings(
            "report.dpi",
            "report.heatmap_events_per_sample",
            "report.embedding_events",
            "report.embedding_neighbors",
            "cluster.markers",
            "seed",
        ),
        outdir=lambda wildcards, output: str(Path(output[0]).parent),
    # The longest figure job (the UMAP embedding): started first once the flow samples are
    # annotated, it runs beside the tables and the report of them instead of after.
    priority: 6
    log:
        "logs/report_clusters.log",
    benchmark:
        "logs/benchmarks/report_clusters.tsv"
    conda:
        CONDA_ENV
    shell:
        "bcellmap report --figures clusters --config-json {params.config:q}"
        " --annotated {input.annotated} --outdir {params.outdir} 2> {log}"


rule report_gates:
    input:
        annotated=patient_flow_annotated,
        sheet=ancient(SAMPLE_SHEET),
    output:
        report_gate_outputs(),
    params:
        config=config_json,
        settings=settings(
            "report.dpi", "report.gate_events", "report.min_b_events_composition", "seed"
        ),
        outdir=lambda wildcards, output: str(Path(output[0]).parent),
    wildcard_constraints:
        patient_id=FLOW_PATIENT,
    log:
        "logs/report_gates/{patient_id}.log",
    benchmark:
        "logs/benchmarks/report_gates/{patient_id}.tsv"
    conda:
        CONDA_ENV
    shell:
        "bcellmap report --figures gates --config-json {params.config:q}"
        " --samples {input.sheet} --patients {wildcards.patient_id}"
        " --annotated {input.annotated} --outdir {params.outdir} 2> {log}"
