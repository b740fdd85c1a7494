# Gates and the per-sample flow job. The gates are learned once on the registered, pooled
# cohort (bcellmap.flow.gating) from the QC-passed events of the ingested files, and mapped
# onto every sample's own scale. Then one job per sample, from the cohort model to its counts:
# map to the SOM, annotate with its gates, count, lineage-gate QC row (map-annotate-flow).


rule thresholds:
    input:
        h5ads=flow_h5ads,
        sheet=ancient(SAMPLE_SHEET),
        user_gates=user_gate_files,
    output:
        cohort="results/models/thresholds.tsv",
        gates="results/models/gates.tsv",
    params:
        config=config_json,
        settings=settings("annotate", "seed"),
        subset_rules=subset_rules_text(),
        # Gating groups (panel, batch) and baseline pools (day) come from the sheet.
        sheet=sheet_records(["day", "panel", "batch", "gatingml"], modality="flow"),
    # A cohort step: every per-sample job after it waits for it, so it goes first.
    priority: 10
    log:
        "logs/thresholds.log",
    benchmark:
        "logs/benchmarks/thresholds.tsv"
    conda:
        CONDA_ENV
    shell:
        "bcellmap thresholds --config-json {params.config:q} --samples {input.sheet}"
        " --inputs {input.h5ads} --out {output.cohort} --gates {output.gates} 2> {log}"


rule map_annotate_flow:
    input:
        h5ad=flow_h5ad,
        model="results/models/flow_som.npz",
        thresholds="results/models/thresholds.tsv",
        gates="results/models/gates.tsv",
        sheet=ancient(SAMPLE_SHEET),
    output:
        h5ad="results/annotated/{sample_id}.h5ad",
        counts="results/counts/{sample_id}.tsv",
        lineage_qc="results/qc/{sample_id}.lineage.tsv",
        **({"mapped": "results/mapped/{sample_id}.h5ad"} if KEEP else {}),
    params:
        config=config_json,
        settings=settings("annotate.gating", "annotate.subsets", "device"),
        subset_rules=subset_rules_text(),
        sample=sample_record,
        keep=lambda wildcards, output: (
            f"--mapped {output.mapped} --keep-layers" if KEEP else ""
        ),
    wildcard_constraints:
        sample_id=FLOW_SAMPLE,
    resources:
        gpu=GPU_JOBS,
    log:
        "logs/map_annotate_flow/{sample_id}.log",
    benchmark:
        "logs/benchmarks/map_annotate_flow/{sample_id}.tsv"
    conda:
        CONDA_ENV_CLUSTER
    shell:
        "bcellmap map-annotate-flow --config-json {params.config:q} --samples {input.sheet}"
        " --sample-id {wildcards.sample_id} --input {input.h5ad} --model {input.model}"
        " --thresholds {input.thresholds} --gates {input.gates} --out {output.h5ad}"
        " --counts {output.counts} --lineage-qc {output.lineage_qc} {params.keep} 2> {log}"


# Every flow sample's gates as GatingML 2.0, on its own compensation and transforms, for review
# in FlowJo, FlowKit or Cytobank (bcellmap.flow.gatingml). One job for the cohort: FlowKit's
# import alone costs seconds. Not with batch normalisation, whose per-cluster quantile maps
# have no GatingML form.
rule export_gates:
    input:
        annotated=expand("results/annotated/{sample_id}.h5ad", sample_id=FLOW_SAMPLES),
    output:
        expand("results/gates/{sample_id}.gatingml.xml", sample_id=FLOW_SAMPLES),
    params:
        config=config_json,
        settings=settings("annotate.subsets"),
        subset_rules=subset_rules_text(),
    log:
        "logs/export_gates.log",
    benchmark:
        "logs/benchmarks/export_gates.tsv"
    conda:
        CONDA_ENV
    shell:
        "bcellmap export-gates --config-json {params.config:q} --annotated {input.annotated}"
        " --outdir results/gates 2> {log}"


# bcellmap's calls against a FlowJo workspace's manual gates (config compare.workspace): the
# workspace's samples are matched to the sheet's by their FCS file ($FIL).
rule compare_gates:
    input:
        annotated=expand("results/annotated/{sample_id}.h5ad", sample_id=FLOW_SAMPLES),
        counts=expand("results/counts/{sample_id}.tsv", sample_id=FLOW_SAMPLES),
        sheet=ancient(SAMPLE_SHEET),
        workspace=compare_workspace,
    output:
        table="results/tables/gate_agreement.tsv",
        figure=report(
            f"{REPORT_DIR}/gate_agreement.png",
            caption="../report/gate_agreement.rst",
            category="Gates",
            labels={"figure": "agreement with the workspace"},
        ),
        svg=f"{REPORT_DIR}/gate_agreement.svg",
    params:
        config=config_json,
        settings=settings("compare", "report.dpi"),
    log:
        "logs/compare_gates.log",
    benchmark:
        "logs/benchmarks/compare_gates.tsv"
    conda:
        CONDA_ENV
    shell:
        "bcellmap compare-gates {input.workspace:q} --config-json {params.config:q}"
        " --annotated {input.annotated} --counts {input.counts} --samples {input.sheet}"
        f" --out {{output.table}} --figure-dir {REPORT_DIR} 2> {{log}}"
