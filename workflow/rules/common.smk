# Configuration, sample sheet, rerun triggers and input functions shared by every rule.
#
# Parsing writes nothing and runs nothing: the demo cohort is made by rule simulate_demo (its
# sample list is a pure function of demo.preset and demo.seed), results/config.yaml by rule
# write_config. Each command gets the merged config on its command line (--config-json: the
# differences from the package defaults), and each rule reruns when the settings it reads
# change (its `settings` param names the config sections or keys), not for any edit.

import json
import sys
from importlib.resources import files
from pathlib import Path

from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

# bcellmap is imported as installed (`pip install -e .`, README), the same package the rules'
# `bcellmap` commands run; no sys.path manipulation.
try:
    from bcellmap.cli.workflow import demo_sample_sheet, settings_text
    from bcellmap.config import check_config_keys, default_config, merge
    from bcellmap.errors import BcellmapError
    from bcellmap.io.samplesheet import normalisation_active, read_sample_sheet
except ImportError as error:
    raise WorkflowError(
        f"the bcellmap package cannot be imported ({error}); install it into the environment "
        f"that runs snakemake: pip install -e {workflow.basedir}"
    ) from None

# Package defaults under the user's values (config.yaml, --configfile, --config); an
# unknown key (a typo such as `devise`) is an error with a "did you mean".
try:
    check_config_keys(dict(config), source="config")
except BcellmapError as error:
    raise WorkflowError(str(error)) from None
_merged = merge(default_config(), config)
config.clear()
config.update(_merged)
# The package ships the schema (load_config validates every command's config against it too).
validate(config, schema=str(files("bcellmap").joinpath("schemas", "config.schema.yaml")))

# keep_intermediates: false (default) deletes the per-event intermediates once every job that
# reads them has run, and leaves the annotated files without the layers the source files hold.
KEEP = bool(config["keep_intermediates"])


def intermediate(path: str):
    """A per-event intermediate file: temp() unless keep_intermediates."""
    return path if KEEP else temp(path)


def settings(*keys: str) -> str:
    """The config values (dotted keys) a rule reads, as canonical text; its rerun trigger."""
    return settings_text(config, keys)


# --- samples ---------------------------------------------------------------------------------

DEMO = config["samples"] == "demo"
if DEMO:
    # The demo sheet as the simulator will write it; rule simulate_demo makes the files.
    try:
        samples = demo_sample_sheet(
            config["demo"]["outdir"], preset=config["demo"]["preset"], seed=config["demo"]["seed"]
        )
    except BcellmapError as error:
        raise WorkflowError(str(error)) from None
    SAMPLE_SHEET = f"{str(config['demo']['outdir']).rstrip('/')}/samples.tsv"
else:
    SAMPLE_SHEET = str(config["samples"])
    # Preflight (bcellmap.preflight, as `bcellmap check-samples --deep`): every sheet line and
    # every file's header, all problems listed at once, before any job (so at parse time: it
    # reads, never writes). Only in the main process (not in cluster jobs) and not for
    # --lint; the GPU is checked in onstart (below), where it is known whether jobs run here.
    if workflow.is_main_process and config["preflight"] and "--lint" not in sys.argv:
        from bcellmap.preflight import run_preflight

        _preflight = run_preflight(SAMPLE_SHEET, config, check_gpu=False)
        if not _preflight.ok:
            raise WorkflowError(_preflight.format())
        for _finding in _preflight.warnings:
            logger.warning(f"bcellmap preflight: {_finding.text}")
    try:
        samples = read_sample_sheet(SAMPLE_SHEET, panels=list(config["panels"]))
    except BcellmapError as error:
        raise WorkflowError(str(error)) from None
validate(samples, schema="../schemas/samples.schema.yaml")


def flag_gates(wildcards) -> list[str]:
    """The gates table the flags read: only a cohort with flow samples has one."""
    return ["results/models/gates.tsv"] if FLOW_SAMPLES else []


# What the run could not stand behind, printed when it ends, locally and on a cluster (the
# handlers run in the main process): flags by reason, values not evaluable, the flags page.
onsuccess:
    shell(
        "bcellmap summary --results results --flags-page results/tables/flags.tsv"
        + (" results/report/flags.png" if config["report"]["enabled"] else "")
        + " || true"
    )


onerror:
    shell("bcellmap summary --results results --flags-page results/tables/flags.tsv || true")


onstart:
    if workflow.local_exec and config["device"] != "cpu":
        from bcellmap.preflight import PreflightReport, _check_device

        _gpu = PreflightReport(sheet=str(SAMPLE_SHEET))
        _check_device(_gpu, config)
        if not _gpu.ok:
            raise WorkflowError(f"bcellmap preflight: {_gpu.errors[0].text}")


FLOW_SAMPLES = samples.loc[samples["modality"] == "flow", "sample_id"].tolist()
SCRNA_SAMPLES = samples.loc[samples["modality"] == "scrna", "sample_id"].tolist()
PATIENTS = sorted(samples["patient_id"].unique())

# The merged config, written by rule write_config for the record; no rule reads it (see
# config_json).
CONFIG_FILE = "results/config.yaml"
CONDA_ENV = "../../envs/bcellmap.yaml"
# The clustering rules use the CuPy environment when the config asks for the GPU.
CONDA_ENV_CLUSTER = (
    "../../envs/bcellmap-gpu.yaml" if config["device"] == "gpu" else "../../envs/bcellmap.yaml"
)


def _gpu_jobs() -> int:
    """`resources: gpu` of the jobs that can use a GPU: 1 only where they will use one.

    Asking for the GPU with device auto on a machine without one would run those jobs one at
    a time under the default profile's `gpu: 1` (the cohort trainings of flow and scRNA, and
    every per-sample mapping), for nothing. Jobs sent to a cluster always ask (device auto
    decides on the node), so that a cluster profile sends them to GPU nodes.
    """
    import os

    device = os.environ.get("BCELLMAP_DEVICE", "").strip().lower() or config["device"]
    if device == "cpu":
        return 0
    if device == "gpu" or not workflow.local_exec:
        return 1
    from bcellmap.kernels.backend import gpu_status

    return int(gpu_status()[0])


GPU_JOBS = _gpu_jobs()


def config_overrides() -> str:
    """The merged config's differences from the package defaults, as JSON (write_config)."""

    def diff(merged, defaults):
        out = {}
        for key, value in merged.items():
            if isinstance(value, dict) and isinstance(defaults.get(key), dict):
                nested = diff(value, defaults[key])
                if nested:
                    out[key] = nested
            elif key not in defaults or defaults[key] != value:
                out[key] = value
        return out

    return json.dumps(diff(dict(config), default_config()), sort_keys=True)


CONFIG_OVERRIDES = config_overrides()


def config_json(wildcards, input) -> str:
    """What a command gets as --config-json: the config's differences from the defaults.

    A function of `input` on purpose: Snakemake leaves params derived from input out of its
    params rerun trigger, so a rule reruns when the settings it reads change (its `settings`
    param), not for every edit of the config. (A config file that every rule takes as an
    input cannot do this: Snakemake does not re-check the params of the jobs below a job
    that must run, and the file's writer must run after every edit.)
    """
    return CONFIG_OVERRIDES


def _one_of(names) -> str:
    """A wildcard constraint that matches exactly these sample ids."""
    import re

    return "|".join(re.escape(name) for name in names) or "(?!)"


FLOW_SAMPLE = _one_of(FLOW_SAMPLES)
SCRNA_SAMPLE = _one_of(SCRNA_SAMPLES)
# Patients with at least one flow sample: each gets results/report/gates_{patient_id}.
FLOW_PATIENTS = sorted(
    samples.loc[samples["modality"] == "flow", "patient_id"].astype(str).unique()
)
FLOW_PATIENT = _one_of(FLOW_PATIENTS)


def sample_path(wildcards) -> str:
    """The data file of one sample, as the sheet resolves it."""
    return samples.loc[wildcards.sample_id, "path"]


def _records(sample_ids, columns) -> str:
    frame = samples.loc[list(sample_ids), [c for c in columns if c in samples.columns]]
    return frame.astype(str).to_json(orient="index")


def sample_record(wildcards) -> str:
    """The sample's sheet row: a per-sample rerun trigger (a corrected day, panel, count).

    Not its corrected gates (gatingml): those reach the sample through the gates table."""
    return _records([wildcards.sample_id], [c for c in samples.columns if c != "gatingml"])


def compare_workspace(wildcards=None) -> list[str]:
    """The FlowJo workspace of compare.workspace (an input: editing it reruns compare_gates)."""
    return [config["compare"]["workspace"]] if config["compare"]["workspace"] else []


def user_gate_files(wildcards=None) -> list[str]:
    """The GatingML files of corrected gates (sheet column gatingml, annotate.user_gates by
    panel) of every flow sample: inputs of the gates step, so that editing one reruns it."""
    from bcellmap.flow.thresholds import user_gate_file

    found = (user_gate_file(samples.loc[s], config) for s in FLOW_SAMPLES)
    return sorted({str(path) for path in found if path is not None})


def sheet_records(columns=None, modality=None) -> str:
    """Sheet rows (of one modality, some columns): a cohort rule's rerun trigger."""
    ids = samples["sample_id"] if modality is None else (
        FLOW_SAMPLES if modality == "flow" else SCRNA_SAMPLES
    )
    return _records(ids, columns or samples.columns)


def subset_rules_text() -> str:
    """Text of the B-cell subset table in use (the user's annotate.subsets, else the built-in
    one); as a param, editing the table reruns the rules that read it."""
    from bcellmap.flow.subsets import subset_rules_text as _subset_rules_text

    return _subset_rules_text(config)


def counts_tables(wildcards=None) -> list[str]:
    """Per-sample counts tables of every sample, both modalities."""
    return [f"results/counts/{sample_id}.tsv" for sample_id in samples["sample_id"]]


def qc_tables(wildcards=None) -> list[str]:
    """Per-sample QC tables, and the lineage-gate row (lymphocytes by markers) of flow ones."""
    return [f"results/qc/{sample_id}.tsv" for sample_id in samples["sample_id"]] + [
        f"results/qc/{sample_id}.lineage.tsv" for sample_id in FLOW_SAMPLES
    ]


REPORT_DIR = "results/report"
_TABLE_FIGURES = [
    "cohort_trajectories",
    "swimmer",
    "kaplan_meier",
    "composition_visits",
    "composition_baseline_vs_reconstitution",
    "qc_removed",
    "flags",
]
_CLUSTER_FIGURES = ["cluster_heatmap", "embedding"]


def report_figures() -> list[str]:
    """Every report figure of the run, PNG and SVG."""
    stems = [f"patient_{patient}" for patient in PATIENTS] + _TABLE_FIGURES
    if FLOW_SAMPLES:
        stems += _CLUSTER_FIGURES
        # Gates: one figure per patient with flow samples.
        stems += [f"gates_{patient}" for patient in FLOW_PATIENTS]
    return [f"{REPORT_DIR}/{stem}.{ext}" for stem in stems for ext in ("png", "svg")]


def patient_flow_annotated(wildcards) -> list[str]:
    """The annotated flow files of one patient (its gate figure's input)."""
    rows = (samples["modality"] == "flow") & (
        samples["patient_id"].astype(str) == wildcards.patient_id
    )
    return [f"results/annotated/{sample_id}.h5ad" for sample_id in samples.loc[rows, "sample_id"]]


def all_targets() -> list[str]:
    targets = [
        CONFIG_FILE,
        "results/tables/samples.tsv",
        "results/tables/kinetics.tsv",
        "results/tables/cohort.tsv",
        "results/tables/qc.tsv",
        "results/tables/flags.tsv",
    ]
    if config["fail_on"]:
        targets.append("results/tables/fail_on.txt")
    targets += [f"results/annotated/{sample_id}.h5ad" for sample_id in samples["sample_id"]]
    if FLOW_SAMPLES and SCRNA_SAMPLES:
        targets.append("results/tables/concordance.tsv")
    if FLOW_SAMPLES and not NORMALISE:
        targets += [f"results/gates/{sample_id}.gatingml.xml" for sample_id in FLOW_SAMPLES]
    if FLOW_SAMPLES and config["compare"]["workspace"]:
        targets.append("results/tables/gate_agreement.tsv")
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


def _registered(stems: list[str]) -> list:
    """PNG figures registered in the report, then their SVG copies as plain outputs."""
    # (`report` may not begin a line here: the parser would take it for the directive.)
    outputs = []
    for stem in stems:
        category, caption = _FIGURES[stem]
        figure = report(f"{REPORT_DIR}/{stem}.png", caption=f"../report/{caption}",
                        category=category, labels={"figure": stem.replace("_", " ")})
        outputs.append(figure)
    return outputs + [f"{REPORT_DIR}/{stem}.svg" for stem in stems]


def report_table_outputs() -> list:
    """Rule report: the patient figures and the figures of the cohort and QC tables."""
    outputs = []
    for patient in PATIENTS:
        figure = report(f"{REPORT_DIR}/patient_{patient}.png", caption="../report/patient.rst",
                        category="Patients", labels={"patient": patient})
        outputs.append(figure)
    outputs += [f"{REPORT_DIR}/patient_{patient}.svg" for patient in PATIENTS]
    return outputs + _registered(_TABLE_FIGURES)


def report_cluster_outputs() -> list:
    """Rule report_clusters: the heatmap and the embedding of the clustering markers."""
    return _registered(_CLUSTER_FIGURES)


def report_gate_outputs() -> list:
    """Rule report_gates: one patient's gate figure (wildcard patient_id)."""
    figure = report(f"{REPORT_DIR}/gates_{{patient_id}}.png", caption="../report/gates.rst",
                    category="Gates", labels={"patient": "{patient_id}"})
    return [figure, f"{REPORT_DIR}/gates_{{patient_id}}.svg"]


# Reference-sample batch normalisation (normalise.smk): on for normalisation.method
# "reference", or "auto" with a reference marked in the sheet; then every batch of flow
# samples needs a reference, checked here before any job runs.
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
    """The flow file clustering and gating read: normalised when normalisation is on."""
    folder = "normalised" if NORMALISE else "flow"
    return f"results/{folder}/{wildcards.sample_id}.h5ad"


def flow_h5ads(wildcards=None) -> list[str]:
    """flow_h5ad of every flow sample (train_flow's and thresholds' input)."""
    folder = "normalised" if NORMALISE else "flow"
    return [f"results/{folder}/{sample_id}.h5ad" for sample_id in FLOW_SAMPLES]

