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


rule flags:
    input:
        samples="results/tables/samples.tsv",
        kinetics="results/tables/kinetics.tsv",
        gates=flag_gates,
    output:
        "results/tables/flags.tsv",
    params:
        gates=lambda wildcards, input: f"--gates {input.gates}" if input.gates else "",
    priority: 8
    log:
        "logs/flags.log",
    benchmark:
        "logs/benchmarks/flags.tsv"
    conda:
        CONDA_ENV
    shell:
        "bcellmap flags --samples-table {input.samples} --kinetics {input.kinetics}"
        " {params.gates} --out {output} 2> {log}"


# fail_on (config): the chosen flags end the run as an error, once every table is written.
rule check_flags:
    input:
        samples="results/tables/samples.tsv",
        kinetics="results/tables/kinetics.tsv",
        gates=flag_gates,
        flags="results/tables/flags.tsv",
    output:
        "results/tables/fail_on.txt",
    params:
        config=config_json,
        settings=settings("fail_on"),
        gates=lambda wildcards, input: f"--gates {input.gates}" if input.gates else "",
    log:
        "logs/check_flags.log",
    conda:
        CONDA_ENV
    shell:
        "bcellmap flags --check --config-json {params.config:q} --samples-table {input.samples}"
        " --kinetics {input.kinetics} {params.gates} 2> {log}"
        " && echo 'fail_on {params.settings}: no such flag raised' > {output}"
