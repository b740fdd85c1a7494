# Annotation: hierarchical gates learned on the registered, pooled cohort (bcellmap.flow.gating),
# mapped onto every sample's own scale, then applied per sample.


rule thresholds:
    input:
        expand("results/mapped/{sample_id}.h5ad", sample_id=FLOW_SAMPLES),
    output:
        cohort="results/models/thresholds.tsv",
        gates="results/models/gates.tsv",
    params:
        config=CONFIG_FILE,
        sheet=SAMPLE_SHEET,
        settings=lambda wildcards: [config["annotate"], config["seed"]],
    log:
        "logs/thresholds.log",
    conda:
        CONDA_ENV
    shell:
        "bcellmap thresholds --config {params.config} --samples {params.sheet}"
        " --inputs {input} --out {output.cohort} --gates {output.gates} 2> {log}"


rule annotate:
    input:
        h5ad="results/mapped/{sample_id}.h5ad",
        thresholds="results/models/thresholds.tsv",
        gates="results/models/gates.tsv",
    output:
        h5ad="results/annotated/{sample_id}.h5ad",
        counts="results/counts/{sample_id}.tsv",
        lineage_qc="results/qc/{sample_id}.lineage.tsv",
    params:
        config=CONFIG_FILE,
        sheet=SAMPLE_SHEET,
        subset_rules=lambda wildcards: subset_rules_text(),
    wildcard_constraints:
        sample_id=FLOW_SAMPLE,
    log:
        "logs/annotate/{sample_id}.log",
    conda:
        CONDA_ENV
    shell:
        "bcellmap annotate --config {params.config} --samples {params.sheet}"
        " --sample-id {wildcards.sample_id} --input {input.h5ad}"
        " --thresholds {input.thresholds} --gates {input.gates} --out {output.h5ad}"
        " --counts {output.counts} --lineage-qc {output.lineage_qc} 2> {log}"
