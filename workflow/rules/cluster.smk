# Flow clustering: one cohort-wide SOM fit on a bounded subsample (cluster.events_per_sample
# per sample), then the per-sample job (annotate.smk) maps every event to it. Training asks
# for a GPU (resources: gpu, GPU_JOBS in common.smk) so that a cluster profile sends it to GPU
# nodes; run here without a GPU it asks for none, and runs beside the scRNA training.


rule train_flow:
    input:
        h5ads=flow_h5ads,
    output:
        model="results/models/flow_som.npz",
        info="results/models/flow_som.json",
    params:
        config=config_json,
        settings=settings("cluster", "device", "seed"),
    threads: 2
    resources:
        gpu=GPU_JOBS,
    # A cohort step: every per-sample job after it waits for it, so it goes first. Above the
    # other cohort steps: a job asking for every core must be picked while all are free, or
    # the greedy scheduler fills the cores with one-core jobs and starves it.
    priority: 12
    log:
        "logs/train_flow.log",
    benchmark:
        "logs/benchmarks/train_flow.tsv"
    conda:
        CONDA_ENV_CLUSTER
    shell:
        "bcellmap train-flow --config-json {params.config:q} --inputs {input.h5ads}"
        " --model {output.model} --info {output.info} 2> {log}"
