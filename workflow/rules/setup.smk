# Set-up jobs, so that parsing the workflow writes nothing: the merged config every command
# reads, and (samples: demo) the simulated demo cohort.


# Writing the config takes no time: on a cluster it runs where snakemake runs.
localrules:
    write_config,
    flags,
    check_flags,


# The merged config (package defaults, config files, --config), for the record: commands get
# it on their command line (config_json in common.smk). The command gets the differences from
# the package defaults; the whole merged config is the rerun trigger.
rule write_config:
    output:
        CONFIG_FILE,
    params:
        merged=json.dumps(dict(config), sort_keys=True, default=str),
        overrides=config_overrides(),
    log:
        "logs/write_config.log",
    conda:
        CONDA_ENV
    shell:
        "bcellmap write-config --json {params.overrides:q} --out {output} 2> {log}"


if DEMO:

    # The demo cohort: FCS files, scRNA files, truth tables and the sample sheet, written
    # into demo.outdir. Its outputs are the files the sheet of common.smk (a pure function of
    # demo.preset and demo.seed) names; changing either rewrites the cohort.
    rule simulate_demo:
        output:
            sheet=SAMPLE_SHEET,
            data=list(samples["path"]),
        params:
            outdir=lambda wildcards, output: str(Path(output.sheet).parent),
            preset=config["demo"]["preset"],
            seed=config["demo"]["seed"],
        threads: 2
        log:
            "logs/simulate_demo.log",
        benchmark:
            "logs/benchmarks/simulate_demo.tsv"
        conda:
            CONDA_ENV
        shell:
            "bcellmap simulate --out {params.outdir} --preset {params.preset}"
            " --seed {params.seed} --threads {threads} > {log} 2>&1"
