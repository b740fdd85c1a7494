# Single-cell RNA: per-sample ingest, cohort PCA + kNN + Leiden (and the CITE-seq protein
# gates, learned on a subsample of every sample), then one job per sample: label transfer from
# the cohort model, annotation and counts (map-annotate-scrna), into the flow counts contract.
# Each rule tracks the scrna keys it reads, so that an annotation setting reruns no ingest.


rule ingest_scrna:
    input:
        data=sample_path,
        sheet=ancient(SAMPLE_SHEET),
    output:
        h5ad=intermediate("results/scrna/{sample_id}.h5ad"),
        qc="results/qc/{sample_id}.tsv",
    params:
        config=config_json,
        # Only the protein keys that find and normalise the ADTs; the gate keys are the
        # model's and the annotation's.
        settings=settings(
            "scrna.input_normalised",
            "scrna.mito_prefix",
            "scrna.qc",
            "scrna.normalise",
            "scrna.hvg",
            "scrna.protein.markers",
            "scrna.protein.clr_margin",
            "scrna.protein.required",
            "scrna.protein.obsm_key",
            "scrna.protein.names_key",
            "seed",
        ),
        sample=sample_record,
    wildcard_constraints:
        sample_id=SCRNA_SAMPLE,
    log:
        "logs/ingest_scrna/{sample_id}.log",
    benchmark:
        "logs/benchmarks/ingest_scrna/{sample_id}.tsv"
    conda:
        CONDA_ENV
    shell:
        "bcellmap ingest-scrna --config-json {params.config:q} --samples {input.sheet}"
        " --sample-id {wildcards.sample_id} --out {output.h5ad} --qc {output.qc} 2> {log}"


rule train_scrna:
    input:
        h5ads=expand("results/scrna/{sample_id}.h5ad", sample_id=SCRNA_SAMPLES),
    output:
        model="results/models/scrna_model.npz",
        info="results/models/scrna_model.json",
        protein="results/models/scrna_protein_thresholds.tsv",
    params:
        config=config_json,
        # The model (not transfer_k, which only mapping uses), the protein gates, and the
        # per-cell RNA call that stands in for a parent protein a sample lacks.
        settings=settings(
            "scrna.cluster.cells_per_sample",
            "scrna.cluster.n_genes",
            "scrna.cluster.n_pcs",
            "scrna.cluster.k",
            "scrna.cluster.resolution",
            "scrna.protein",
            "scrna.annotate.markers",
            "scrna.annotate.min_score",
            "scrna.annotate.t_core_genes",
            "scrna.annotate.t_core_min_counts",
            "scrna.annotate.pdc_min_counts",
            "device",
            "seed",
        ),
    threads: 2
    resources:
        gpu=GPU_JOBS,
    # A cohort step: every per-sample job after it waits for it, so it goes first (above the
    # one-core thresholds job, for the reason given at train_flow).
    priority: 11
    log:
        "logs/train_scrna.log",
    benchmark:
        "logs/benchmarks/train_scrna.tsv"
    conda:
        CONDA_ENV_CLUSTER
    shell:
        "bcellmap train-scrna --config-json {params.config:q} --inputs {input.h5ads}"
        " --model {output.model} --info {output.info}"
        " --protein-thresholds {output.protein} 2> {log}"


rule map_annotate_scrna:
    input:
        h5ad="results/scrna/{sample_id}.h5ad",
        model="results/models/scrna_model.npz",
        protein="results/models/scrna_protein_thresholds.tsv",
        sheet=ancient(SAMPLE_SHEET),
    output:
        h5ad="results/annotated/{sample_id}.h5ad",
        counts="results/counts/{sample_id}.tsv",
        **({"mapped": "results/scrna_mapped/{sample_id}.h5ad"} if KEEP else {}),
    params:
        config=config_json,
        settings=settings(
            "scrna.cluster.transfer_k",
            "scrna.annotate",
            "scrna.car_feature",
            "scrna.protein",
            "device",
            "seed",
        ),
        sample=sample_record,
        keep=lambda wildcards, output: (
            f"--mapped {output.mapped} --keep-layers" if KEEP else ""
        ),
    wildcard_constraints:
        sample_id=SCRNA_SAMPLE,
    resources:
        gpu=GPU_JOBS,
    log:
        "logs/map_annotate_scrna/{sample_id}.log",
    benchmark:
        "logs/benchmarks/map_annotate_scrna/{sample_id}.tsv"
    conda:
        CONDA_ENV_CLUSTER
    shell:
        "bcellmap map-annotate-scrna --config-json {params.config:q} --samples {input.sheet}"
        " --sample-id {wildcards.sample_id} --input {input.h5ad} --model {input.model}"
        " --protein-thresholds {input.protein} --out {output.h5ad} --counts {output.counts}"
        " {params.keep} 2> {log}"
