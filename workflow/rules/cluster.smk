# Clustering: one cohort-wide SOM fit on a bounded subsample, then one mapping job per sample.
# Both ask for a GPU (resources: gpu=1) so a cluster profile sends them to GPU nodes.


rule train_flow:
    input:
        flow_h5ads,
    output:
        model="results/models/flow_som.npz",
        info="results/models/flow_som.json",
    params:
        config=CONFIG_FILE,
        settings=lambda wildcards: [config["cluster"], config["device"], config["seed"]],
    threads: 2
    resources:
        gpu=1,
    log:
        "logs/train_flow.log",
    conda:
        CONDA_ENV_CLUSTER
    shell:
        "bcellmap train-flow --config {params.config} --inputs {input}"
        " --model {output.model} --info {output.info} 2> {log}"


rule map_flow:
    input:
        h5ad=flow_h5ad,
        model="results/models/flow_som.npz",
    output:
        "results/mapped/{sample_id}.h5ad",
    params:
        config=CONFIG_FILE,
    wildcard_constraints:
        sample_id=FLOW_SAMPLE,
    resources:
        gpu=1,
    log:
        "logs/map_flow/{sample_id}.log",
    conda:
        CONDA_ENV_CLUSTER
    shell:
        "bcellmap map-flow --config {params.config} --input {input.h5ad}"
        " --model {input.model} --out {output} 2> {log}"
