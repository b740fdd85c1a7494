# Single-cell RNA: per-sample ingest, cohort PCA + kNN + Leiden, per-sample label transfer
# and annotation into the same counts-table contract as flow. The CITE-seq protein gates are
# learned once, with the model, on a subsample of every sample, and applied to each sample.


rule ingest_scrna:
    input:
        data=sample_path,
    output:
        h5ad="results/scrna/{sample_id}.h5ad",
        qc="results/qc/{sample_id}.tsv",
    params:
        config=CONFIG_FILE,
        sheet=SAMPLE_SHEET,
        settings=lambda wildcards: [config["scrna"], config["seed"]],
    wildcard_constraints:
        sample_id=SCRNA_SAMPLE,
    log:
        "logs/ingest_scrna/{sample_id}.log",
    conda:
        CONDA_ENV
    shell:
        "bcellmap ingest-scrna --config {params.config} --samples {params.sheet}"
        " --sample-id {wildcards.sample_id} --out {output.h5ad} --qc {output.qc} 2> {log}"


rule train_scrna:
    input:
        expand("results/scrna/{sample_id}.h5ad", sample_id=SCRNA_SAMPLES),
    output:
        model="results/models/scrna_model.npz",
        info="results/models/scrna_model.json",
        protein="results/models/scrna_protein_thresholds.tsv",
    params:
        config=CONFIG_FILE,
    threads: 2
    resources:
        gpu=1,
    log:
        "logs/train_scrna.log",
    conda:
        CONDA_ENV_CLUSTER
    shell:
        "bcellmap train-scrna --config {params.config} --inputs {input}"
        " --model {output.model} --info {output.info}"
        " --protein-thresholds {output.protein} 2> {log}"


rule map_scrna:
    input:
        h5ad="results/scrna/{sample_id}.h5ad",
        model="results/models/scrna_model.npz",
    output:
        "results/scrna_mapped/{sample_id}.h5ad",
    params:
        config=CONFIG_FILE,
    wildcard_constraints:
        sample_id=SCRNA_SAMPLE,
    resources:
        gpu=1,
    log:
        "logs/map_scrna/{sample_id}.log",
    conda:
        CONDA_ENV_CLUSTER
    shell:
        "bcellmap map-scrna --config {params.config} --input {input.h5ad}"
        " --model {input.model} --out {output} 2> {log}"


rule annotate_scrna:
    input:
        h5ad="results/scrna_mapped/{sample_id}.h5ad",
        protein="results/models/scrna_protein_thresholds.tsv",
    output:
        h5ad="results/annotated/{sample_id}.h5ad",
        counts="results/counts/{sample_id}.tsv",
    params:
        config=CONFIG_FILE,
        sheet=SAMPLE_SHEET,
    wildcard_constraints:
        sample_id=SCRNA_SAMPLE,
    log:
        "logs/annotate_scrna/{sample_id}.log",
    conda:
        CONDA_ENV
    shell:
        "bcellmap annotate-scrna --config {params.config} --samples {params.sheet}"
        " --sample-id {wildcards.sample_id} --input {input.h5ad}"
        " --protein-thresholds {input.protein}"
        " --out {output.h5ad} --counts {output.counts} 2> {log}"
