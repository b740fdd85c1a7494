# Reference-sample batch normalisation (normalisation.method; config/README.md): one model
# learned on the references of every batch, then one job per flow sample. Clustering reads
# results/normalised/ instead of results/flow/ when it is on (flow_h5ad in common.smk).


rule train_normalisation:
    input:
        reference_h5ads,
    output:
        model="results/models/normalisation.npz",
        info="results/models/normalisation.json",
    params:
        config=CONFIG_FILE,
        sheet=SAMPLE_SHEET,
        settings=lambda wildcards: [
            config["normalisation"],
            config["cluster"]["markers"],
            config["device"],
            config["seed"],
            reference_batches(),
        ],
    threads: 2
    resources:
        gpu=1,
    log:
        "logs/train_normalisation.log",
    conda:
        CONDA_ENV_CLUSTER
    shell:
        "bcellmap train-normalisation --config {params.config} --samples {params.sheet}"
        " --inputs {input} --model {output.model} --info {output.info} 2> {log}"


rule normalise_flow:
    input:
        h5ad="results/flow/{sample_id}.h5ad",
        model="results/models/normalisation.npz",
    output:
        "results/normalised/{sample_id}.h5ad",
    params:
        config=CONFIG_FILE,
        sheet=SAMPLE_SHEET,
        batch=lambda wildcards: samples.loc[wildcards.sample_id, "batch"],
    wildcard_constraints:
        sample_id=FLOW_SAMPLE,
    resources:
        gpu=1,
    log:
        "logs/normalise_flow/{sample_id}.log",
    conda:
        CONDA_ENV_CLUSTER
    shell:
        "bcellmap normalise-flow --config {params.config} --samples {params.sheet}"
        " --sample-id {wildcards.sample_id} --input {input.h5ad} --model {input.model}"
        " --out {output} 2> {log}"
