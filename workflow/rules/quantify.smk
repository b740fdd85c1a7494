# Quantification and kinetics: cohort tables from the per-sample counts.


rule quantify:
    input:
        counts=counts_tables,
        sheet=ancient(SAMPLE_SHEET),
    output:
        "results/tables/samples.tsv",
    params:
        config=config_json,
        settings=settings("kinetics.lloq_events", "kinetics.loq_events"),
        # Patient, day, clinical counts and the other columns come from the sheet.
        sheet=sheet_records(),
    # Seconds long, and the tables and the report of them wait for it: first when ready.
    priority: 8
    log:
        "logs/quantify.log",
    benchmark:
        "logs/benchmarks/quantify.tsv"
    conda:
        CONDA_ENV
    shell:
        "bcellmap quantify --config-json {params.config:q} --samples {input.sheet}"
        " --inputs {input.counts} --out {output} 2> {log}"


rule kinetics:
    input:
        table="results/tables/samples.tsv",
    output:
        kinetics="results/tables/kinetics.tsv",
        cohort="results/tables/cohort.tsv",
    params:
        config=config_json,
        settings=settings("kinetics"),
    priority: 8
    log:
        "logs/kinetics.log",
    benchmark:
        "logs/benchmarks/kinetics.tsv"
    conda:
        CONDA_ENV
    shell:
        "bcellmap kinetics --config-json {params.config:q} --table {input.table}"
        " --out {output.kinetics} --cohort {output.cohort} 2> {log}"


rule concordance:
    input:
        "results/tables/samples.tsv",
    output:
        "results/tables/concordance.tsv",
    log:
        "logs/concordance.log",
    benchmark:
        "logs/benchmarks/concordance.tsv"
    conda:
        CONDA_ENV
    shell:
        "bcellmap concordance --table {input} --out {output} 2> {log}"
