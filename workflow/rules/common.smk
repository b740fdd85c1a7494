# Configuration, sample sheet and input functions shared by every rule.

import sys
from pathlib import Path

import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# Import the package from this checkout, so the workflow and its commands agree.
sys.path.insert(0, str(Path(BCELLMAP_ROOT) / "src"))
from bcellmap.config import default_config, merge  # noqa: E402
from bcellmap.errors import BcellmapError  # noqa: E402
from bcellmap.io.samplesheet import read_sample_sheet  # noqa: E402

# Package defaults under the user's values (config.yaml, --configfile, --config); an
# unknown key (a typo such as `devise`) is an error with a "did you mean".
from bcellmap.config import check_config_keys  # noqa: E402

try:
    check_config_keys(dict(config), source="config")
except BcellmapError as error:
    raise WorkflowError(str(error)) from None
_merged = merge(default_config(), config)
config.clear()
config.update(_merged)
validate(config, schema="../schemas/config.schema.yaml")


def _sample_sheet_path() -> Path:
    """The user's sample sheet, or the demo cohort's (simulated on first use)."""
    if config["samples"] != "demo":
        return Path(config["samples"])
    demo = config["demo"]
    sheet = Path(demo["outdir"]) / "samples.tsv"
    if not sheet.exists():
        from bcellmap.demo.simulate import simulate_cohort

        logger.info(f"bcellmap: simulating the demo cohort into {demo['outdir']} (first run)")
        simulate_cohort(demo["outdir"], preset=demo["preset"], seed=demo["seed"])
    return sheet


SAMPLE_SHEET = _sample_sheet_path().resolve()
# Preflight (bcellmap.preflight, as `bcellmap check-samples --deep`): every sheet line and
# every file's header, all problems listed at once, before any job. Only in the main
# process (not in cluster jobs) and not for --lint; the GPU is checked in onstart (below),
# where it is known whether jobs run on this machine.
if workflow.is_main_process and config["preflight"] and "--lint" not in sys.argv:
    from bcellmap.preflight import run_preflight

    _preflight = run_preflight(SAMPLE_SHEET, config, check_gpu=False)
    if not _preflight.ok:
        raise WorkflowError(_preflight.format())
    for _finding in _preflight.warnings:
        logger.warning(f"bcellmap preflight: {_finding.text}")


onstart:
    if workflow.local_exec and config["device"] != "cpu":
        from bcellmap.preflight import PreflightReport, _check_device

        _gpu = PreflightReport(sheet=str(SAMPLE_SHEET))
        _check_device(_gpu, config)
        if not _gpu.ok:
            raise WorkflowError(f"bcellmap preflight: {_gpu.errors[0].text}")


try:
    samples = read_sample_sheet(SAMPLE_SHEET, panels=list(config["panels"]))
except BcellmapError as error:
    raise WorkflowError(str(error)) from None
validate(samples, schema="../schemas/samples.schema.yaml")

FLOW_SAMPLES = samples.loc[samples["modality"] == "flow", "sample_id"].tolist()
SCRNA_SAMPLES = samples.loc[samples["modality"] == "scrna", "sample_id"].tolist()
PATIENTS = sorted(samples["patient_id"].unique())


def _write_effective_config(path: Path) -> Path:
    """Write the merged config for the commands; rewrite only when it changed."""
    text = yaml.safe_dump(dict(config), sort_keys=True)
    if not path.exists() or path.read_text() != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return path.resolve()


CONFIG_FILE = _write_effective_config(Path("results/config.yaml"))
CONDA_ENV = "../../envs/bcellmap.yaml"
# The clustering rules use the CuPy environment when the config asks for the GPU.
CONDA_ENV_CLUSTER = (
    "../../envs/bcellmap-gpu.yaml" if config["device"] == "gpu" else "../../envs/bcellmap.yaml"
)


def _one_of(names) -> str:
    """A wildcard constraint that matches exactly these sample ids."""
    import re

    return "|".join(re.escape(name) for name in names) or "(?!)"


FLOW_SAMPLE = _one_of(FLOW_SAMPLES)
SCRNA_SAMPLE = _one_of(SCRNA_SAMPLES)


def sample_path(wildcards) -> str:
    """The data file of one sample, as the sheet resolves it."""
    return samples.loc[wildcards.sample_id, "path"]


def subset_rules_text() -> str:
    """Text of the B-cell subset table; as a param, editing the table reruns annotation."""
    from bcellmap.flow.annotate import resolve_subsets_path

    return resolve_subsets_path(config).read_text()


def counts_tables(wildcards=None) -> list[str]:
    """Per-sample counts tables of every sample, both modalities."""
    return [f"results/counts/{sample_id}.tsv" for sample_id in samples["sample_id"]]


def qc_tables(wildcards=None) -> list[str]:
    """Per-sample QC tables, and the lineage-gate row (lymphocytes by markers) of flow ones."""
    return [f"results/qc/{sample_id}.tsv" for sample_id in samples["sample_id"]] + [
        f"results/qc/{sample_id}.lineage.tsv" for sample_id in FLOW_SAMPLES
    ]


def report_figures() -> list[str]:
    stems = [f"patient_{patient}" for patient in PATIENTS] + [
        "cohort_trajectories",
        "swimmer",
        "kaplan_meier",
        "composition_visits",
        "composition_baseline_vs_reconstitution",
        "qc_removed",
        "flags",
    ]
    if FLOW_SAMPLES:
        stems += ["cluster_heatmap", "embedding"]
        # Gates: one figure per patient with flow samples.
        stems += [f"gates_{patient}" for patient in _flow_patients()]
    return [f"results/report/{stem}.{ext}" for stem in stems for ext in ("png", "svg")]


def _flow_patients() -> list[str]:
    """Patients with at least one flow sample (each gets results/report/gates_{patient})."""
    return sorted(samples.loc[samples["modality"] == "flow", "patient_id"].unique())


def all_targets() -> list[str]:
    targets = [
        "results/tables/samples.tsv",
        "results/tables/kinetics.tsv",
        "results/tables/cohort.tsv",
        "results/tables/qc.tsv",
    ]
    targets += [f"results/annotated/{sample_id}.h5ad" for sample_id in samples["sample_id"]]
    if FLOW_SAMPLES and SCRNA_SAMPLES:
        targets.append("results/tables/concordance.tsv")
    if config["report"]["enabled"]:
        targets += report_figures()
    return targets


# Report figures: stem -> (category, caption file in workflow/report/).
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
    "flags": ("Quality control", "flags.rst"),
    "cluster_heatmap": ("Clustering", "cluster_heatmap.rst"),
    "embedding": ("Clustering", "embedding.rst"),
}


def report_outputs() -> list:
    """PNG figures registered in the report; SVG copies are plain outputs."""
    # (`report` may not begin a line here: the parser would take it for the directive.)
    outputs = []
    for patient in PATIENTS:
        figure = report(f"results/report/patient_{patient}.png", caption="../report/patient.rst",
                        category="Patients", labels={"patient": patient})
        outputs.append(figure)
    for patient in _flow_patients():
        figure = report(f"results/report/gates_{patient}.png", caption="../report/gates.rst",
                        category="Gates", labels={"patient": patient})
        outputs.append(figure)
    for stem, (category, caption) in _FIGURES.items():
        path = f"results/report/{stem}.png"
        if path in report_figures():
            figure = report(path, caption=f"../report/{caption}", category=category,
                            labels={"figure": stem.replace("_", " ")})
            outputs.append(figure)
    outputs += [path for path in report_figures() if path.endswith(".svg")]
    return outputs


# Reference-sample batch normalisation (normalise.smk): on for normalisation.method
# "reference", or "auto" with a reference marked in the sheet; then every batch of flow
# samples needs a reference, checked here before any job runs.
from bcellmap.io.samplesheet import normalisation_active  # noqa: E402

try:
    NORMALISE = normalisation_active(
        samples, method=config["normalisation"]["method"], path=SAMPLE_SHEET
    )
except BcellmapError as error:
    raise WorkflowError(str(error)) from None
REFERENCE_SAMPLES = samples.loc[
    (samples["modality"] == "flow") & samples["reference"].astype(bool), "sample_id"
].tolist()


def reference_h5ads(wildcards=None) -> list[str]:
    """The references' ingested flow files, which train the normalisation."""
    return [f"results/flow/{sample_id}.h5ad" for sample_id in REFERENCE_SAMPLES]


def reference_batches() -> list[list[str]]:
    """[sample_id, batch] of each reference; as a param, editing them retrains."""
    return [[s, samples.loc[s, "batch"]] for s in REFERENCE_SAMPLES]


def flow_h5ad(wildcards) -> str:
    """The flow file clustering reads: normalised when normalisation is on."""
    folder = "normalised" if NORMALISE else "flow"
    return f"results/{folder}/{wildcards.sample_id}.h5ad"


def flow_h5ads(wildcards=None) -> list[str]:
    """flow_h5ad of every flow sample (train_flow's input)."""
    folder = "normalised" if NORMALISE else "flow"
    return [f"results/{folder}/{sample_id}.h5ad" for sample_id in FLOW_SAMPLES]
