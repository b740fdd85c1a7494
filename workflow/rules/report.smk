# Figures, each registered for `snakemake --report report.html`.

_FIGURES = {
    # stem: (category, caption)
    "cohort_trajectories": ("Cohort", "cohort_trajectories.rst"),
    "swimmer": ("Cohort", "swimmer.rst"),
    "kaplan_meier": ("Cohort", "kaplan_meier.rst"),
    "composition_visits": ("B-cell subsets", "composition_visits.rst"),
    "composition_baseline_vs_reconstitution": (
        "B-cell subsets",
        "composition_baseline_vs_reconstitution.rst",
    ),
    "qc_removed": ("Quality control", "qc_removed.rst"),
    "cluster_heatmap": ("Clustering", "cluster_heatmap.rst"),
    "embedding": ("Clustering", "embedding.rst"),
}


def _report_outputs() -> list:
    """PNG figures registered in the report; SVG copies are plain outputs."""
    # (`report` may not begin a line here: the parser would take it for the directive.)
    outputs = []
    for patient in PATIENTS:
        figure = report(f"results/report/patient_{patient}.png", caption="../report/patient.rst",
                        category="Patients", labels={"patient": patient})
        outputs.append(figure)
    for stem, (category, caption) in _FIGURES.items():
        path = f"results/report/{stem}.png"
        if path in report_figures():
            figure = report(path, caption=f"../report/{caption}", category=category,
                            labels={"figure": stem.replace("_", " ")})
            outputs.append(figure)
    outputs += [path for path in report_figures() if path.endswith(".svg")]
    return outputs


rule report:
    input:
        samples="results/tables/samples.tsv",
        kinetics="results/tables/kinetics.tsv",
        cohort="results/tables/cohort.tsv",
        qc="results/tables/qc.tsv",
        annotated=expand("results/annotated/{sample_id}.h5ad", sample_id=FLOW_SAMPLES),
    output:
        _report_outputs(),
    params:
        config=CONFIG_FILE,
    log:
        "logs/report.log",
    conda:
        CONDA_ENV
    shell:
        "bcellmap report --config {params.config} --samples-table {input.samples}"
        " --kinetics {input.kinetics} --cohort {input.cohort} --qc {input.qc}"
        " --annotated {input.annotated} --outdir results/report 2> {log}"
