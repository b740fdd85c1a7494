# Ingest: one job per flow sample (read, compensate, transform, QC), then the QC table.
# results/flow/ is an intermediate (keep_intermediates): deleted once clustering, gating and
# the sample's own job have read it; without keep_intermediates it also leaves out the
# compensated layer, which no later step reads.


rule ingest_flow:
    input:
        data=sample_path,
        sheet=ancient(SAMPLE_SHEET),
    output:
        h5ad=intermediate("results/flow/{sample_id}.h5ad"),
        qc="results/qc/{sample_id}.tsv",
    params:
        config=config_json,
        settings=settings("ingest", "panels", "seed"),
        sample=sample_record,
        layers="" if KEEP else "--no-layers",
    wildcard_constraints:
        sample_id=FLOW_SAMPLE,
    log:
        "logs/ingest_flow/{sample_id}.log",
    benchmark:
        "logs/benchmarks/ingest_flow/{sample_id}.tsv"
    conda:
        CONDA_ENV
    shell:
        "bcellmap ingest-flow --config-json {params.config:q} --samples {input.sheet}"
        " --sample-id {wildcards.sample_id} --out {output.h5ad} --qc {output.qc}"
        " {params.layers} 2> {log}"


rule collect_qc:
    input:
        qc_tables,
    output:
        "results/tables/qc.tsv",
    log:
        "logs/collect_qc.log",
    benchmark:
        "logs/benchmarks/collect_qc.tsv"
    conda:
        CONDA_ENV
    shell:
        "bcellmap collect-qc --inputs {input} --out {output} 2> {log}"
