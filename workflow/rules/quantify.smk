# Quantification and kinetics: cohort tables from the per-sample counts.


rule quantify:
    input:
        counts_tables,
    output:
        "results/tables/samples.tsv",
    params:
        config=CONFIG_FILE,
        sheet=SAMPLE_SHEET,
        settings=lambda wildcards: [config["kinetics"]["lloq_events"], config["kinetics"]["loq_events"]],
    log:
        "logs/quantify.log",
    conda:
        CONDA_ENV
    shell:
        "bcellmap quantify --config {params.config} --samples {params.sheet}"
        " --inputs {input} --out {output} 2> {log}"


rule kinetics:
    input:
        "results/tables/samples.tsv",
    output:
        kinetics="results/tables/kinetics.tsv",
        cohort="results/tables/cohort.tsv",
    params:
        config=CONFIG_FILE,
        settings=lambda wildcards: config["kinetics"],
    log:
        "logs/kinetics.log",
    conda:
        CONDA_ENV
    shell:
        "bcellmap kinetics --config {params.config} --table {input}"
        " --out {output.kinetics} --cohort {output.cohort} 2> {log}"


rule concordance:
    input:
        "results/tables/samples.tsv",
    output:
        "results/tables/concordance.tsv",
    log:
        "logs/concordance.log",
    conda:
        CONDA_ENV
    shell:
        "bcellmap concordance --table {input} --out {output} 2> {log}"
