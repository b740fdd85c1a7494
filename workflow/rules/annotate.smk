# Annotation: marker thresholds learned once on the pooled cohort, applied to every sample.


rule thresholds:
    input:
        expand("results/mapped/{sample_id}.h5ad", sample_id=FLOW_SAMPLES),
    output:
        "results/models/thresholds.tsv",
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
        " --inputs {input} --out {output} 2> {log}"


rule annotate:
    input:
        h5ad="results/mapped/{sample_id}.h5ad",
        thresholds="results/models/thresholds.tsv",
    output:
        h5ad="results/annotated/{sample_id}.h5ad",
        counts="results/counts/{sample_id}.tsv",
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
        " --thresholds {input.thresholds} --out {output.h5ad} --counts {output.counts} 2> {log}"
