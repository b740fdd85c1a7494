# Ingest: one job per flow sample (read, compensate, transform, QC), then the QC table.


rule ingest_flow:
    input:
        data=sample_path,
    output:
        h5ad="results/flow/{sample_id}.h5ad",
        qc="results/qc/{sample_id}.tsv",
    params:
        config=CONFIG_FILE,
        sheet=SAMPLE_SHEET,
        settings=lambda wildcards: [config["ingest"], config["panels"], config["seed"]],
    wildcard_constraints:
        sample_id=FLOW_SAMPLE,
    log:
        "logs/ingest_flow/{sample_id}.log",
    conda:
        CONDA_ENV
    shell:
        "bcellmap ingest-flow --config {params.config} --samples {params.sheet}"
        " --sample-id {wildcards.sample_id} --out {output.h5ad} --qc {output.qc} 2> {log}"


rule collect_qc:
    input:
        qc_tables,
    output:
        "results/tables/qc.tsv",
    log:
        "logs/collect_qc.log",
    conda:
        CONDA_ENV
    shell:
        "bcellmap collect-qc --inputs {input} --out {output} 2> {log}"
