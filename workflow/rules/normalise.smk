# Reference-sample batch normalisation (normalisation.method; config/README.md): one model
# learned on the references of every batch, then one job per flow sample. Clustering and
# gating read results/normalised/ instead of results/flow/ when it is on (flow_h5ad in
# common.smk); both are intermediates (keep_intermediates).


rule train_normalisation:
    input:
        h5ads=reference_h5ads,
        sheet=ancient(SAMPLE_SHEET),
    output:
        model="results/models/normalisation.npz",
        info="results/models/normalisation.json",
    params:
        config=config_json,
        settings=settings("normalisation", "cluster.markers", "device", "seed"),
        references=reference_batches(),
    threads: 2
    resources:
        gpu=GPU_JOBS,
    log:
        "logs/train_normalisation.log",
    benchmark:
        "logs/benchmarks/train_normalisation.tsv"
    conda:
        CONDA_ENV_CLUSTER
    shell:
        "bcellmap train-normalisation --config-json {params.config:q} --samples {input.sheet}"
        " --inputs {input.h5ads} --model {output.model} --info {output.info} 2> {log}"


rule normalise_flow:
    input:
        h5ad="results/flow/{sample_id}.h5ad",
        model="results/models/normalisation.npz",
        sheet=ancient(SAMPLE_SHEET),
    output:
        intermediate("results/normalised/{sample_id}.h5ad"),
    params:
        config=config_json,
        settings=settings("device"),
        batch=lambda wildcards: samples.loc[wildcards.sample_id, "batch"],
    wildcard_constraints:
        sample_id=FLOW_SAMPLE,
    resources:
        gpu=GPU_JOBS,
    log:
        "logs/normalise_flow/{sample_id}.log",
    benchmark:
        "logs/benchmarks/normalise_flow/{sample_id}.tsv"
    conda:
        CONDA_ENV_CLUSTER
    shell:
        "bcellmap normalise-flow --config-json {params.config:q} --samples {input.sheet}"
        " --sample-id {wildcards.sample_id} --input {input.h5ad} --model {input.model}"
        " --out {output} 2> {log}"
