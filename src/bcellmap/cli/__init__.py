"""The ``bcellmap`` command line: one subcommand per workflow step.

Each Snakemake rule is a thin call of one subcommand. Modules are imported only when
their subcommand runs, so ``bcellmap --help`` and per-sample jobs stay fast.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import time
from collections.abc import Iterator

from .. import __version__

# subcommand -> (module, function, help). The function takes the parsed arguments.
_COMMANDS: dict[str, tuple[str, str, str]] = {
    "simulate": ("bcellmap.cli.demo", "cli_simulate",
                 "write the simulated demo cohort (FCS files, sample sheet, truth tables)"),
    "check-samples": ("bcellmap.cli", "_cli_check_samples",
                      "validate a sample sheet (--deep: and every file's header)"),
    "ingest-flow": ("bcellmap.cli.flow", "cli_ingest_flow",
                    "read one FCS sample: compensate, transform, QC -> h5ad"),
    "collect-qc": ("bcellmap.cli.flow", "cli_collect_qc", "combine per-sample QC tables"),
    "train-normalisation": ("bcellmap.cli.flow", "cli_train_normalisation",
                            "learn per-batch quantile maps from the reference (anchor) samples"),
    "normalise-flow": ("bcellmap.cli.flow", "cli_normalise_flow",
                       "normalise one flow sample to the reference goal of its batch"),
    "train-flow": ("bcellmap.cli.flow", "cli_train_flow",
                   "fit the cohort SOM and metaclusters on a subsample of every sample"),
    "map-flow": ("bcellmap.cli.flow", "cli_map_flow",
                 "assign every event of one sample to a SOM node and metacluster"),
    "thresholds": ("bcellmap.cli.flow", "cli_thresholds",
                   "learn positive/negative marker thresholds on the pooled cohort"),
    "annotate": ("bcellmap.cli.flow", "cli_annotate",
                 "label one sample's events: cell type and B-cell subset"),
    "export-gates": ("bcellmap.cli.flow", "cli_export_gates",
                     "write annotated samples' gates as GatingML 2.0 (FlowJo, FlowKit, "
                     "Cytobank)"),
    "compare-gates": ("bcellmap.cli.flow", "cli_compare_gates",
                      "hold bcellmap's calls against a FlowJo workspace's manual gates, per "
                      "sample: counts, % of parent, per-event F1"),
    "subsets": ("bcellmap.cli.flow", "cli_subsets",
                "print the built-in B-cell subset rule table (copy it to write your own)"),
    "quantify": ("bcellmap.cli.cohort", "cli_quantify",
                 "per-sample counts and frequencies -> results/tables/samples.tsv"),
    "kinetics": ("bcellmap.cli.cohort", "cli_kinetics",
                 "per-patient depletion and reconstitution, cohort summary"),
    "concordance": ("bcellmap.cli.cohort", "cli_concordance",
                    "flow vs scRNA B-cell frequencies at visits measured both ways"),
    "flags": ("bcellmap.cli.cohort", "cli_flags",
              "every flag of a run in one table -> results/tables/flags.tsv (--check: fail_on)"),
    "summary": ("bcellmap.cli.cohort", "cli_summary",
                "print what a run could not stand behind: flags by reason, values not "
                "evaluable"),
    "report": ("bcellmap.cli.report", "cli_report", "figures for the Snakemake report"),
    "ingest-scrna": ("bcellmap.cli.scrna", "cli_ingest_scrna",
                     "read one scRNA sample (10x .h5, mtx folder, .h5ad): QC, normalise -> h5ad"),
    "train-scrna": ("bcellmap.cli.scrna", "cli_train_scrna",
                    "cohort PCA + kNN + Leiden on a bounded subsample of every scRNA sample"),
    "map-scrna": ("bcellmap.cli.scrna", "cli_map_scrna",
                  "label every cell of one scRNA sample by kNN transfer from the cohort model"),
    "annotate-scrna": ("bcellmap.cli.scrna", "cli_annotate_scrna",
                       "label one scRNA sample's cells: cell type, B-cell subset, CAR-T"),
    "map-annotate-flow": ("bcellmap.cli.sample", "cli_map_annotate_flow",
                          "map-flow, then annotate, in one process (the workflow's per-sample "
                          "job)"),
    "map-annotate-scrna": ("bcellmap.cli.sample", "cli_map_annotate_scrna",
                           "map-scrna, then annotate-scrna, in one process (the workflow's "
                           "per-sample job)"),
    "write-config": ("bcellmap.cli.workflow", "cli_write_config",
                     "write the merged config (overrides of the defaults, JSON) as checked YAML"),
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", metavar="YAML", default=None,
                        help="config file merged over the package defaults")
    parser.add_argument("--config-json", metavar="JSON", default=None,
                        help="settings (JSON mapping) merged over --config and the defaults; "
                             "the workflow passes its config's differences from the defaults")


def build_parser() -> argparse.ArgumentParser:
    """Build the argument parser for all subcommands."""
    parser = argparse.ArgumentParser(
        prog="bcellmap",
        description="B-cell depletion and reconstitution after CD19 CAR-T therapy.",
    )
    parser.add_argument("--version", action="version", version=f"bcellmap {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    p = {name: sub.add_parser(name, help=text, description=text)
         for name, (_, _, text) in _COMMANDS.items()}

    s = p["simulate"]
    s.add_argument("--out", required=True, metavar="DIR", help="output folder")
    s.add_argument("--preset", choices=["fixture", "full"], default="fixture")
    s.add_argument("--seed", type=int, default=20241121)
    s.add_argument("--events", type=int, default=None,
                   help="events per FCS file (overrides the preset)")
    s.add_argument("--no-scrna", action="store_true", help="flow cytometry files only")
    s.add_argument("--threads", type=int, default=1, metavar="N",
                   help="processes for the scRNA patients (the files are the same for any N)")
    s.add_argument("--no-drift", action="store_true",
                   help="no per-visit staining and detector-gain drift")
    s.add_argument("--no-lymphopenic", action="store_true",
                   help="no lysed-whole-blood lymphopenic visits after lymphodepletion")

    s = p["check-samples"]
    _add_common(s)
    s.add_argument("--samples", required=True, metavar="TSV")
    s.add_argument("--deep", action="store_true",
                   help="also read every file's header: markers per panel, compensation, "
                        "already compensated/transformed values, mixed instruments, GPU; "
                        "report every problem at once")

    s = p["ingest-flow"]
    _add_common(s)
    s.add_argument("--samples", metavar="TSV", help="sample sheet (with --sample-id)")
    s.add_argument("--sample-id", metavar="ID")
    s.add_argument("--fcs", metavar="FCS", help="read this file instead of a sheet's row")
    s.add_argument("--out", required=True, metavar="H5AD")
    s.add_argument("--qc", required=True, metavar="TSV", help="per-sample QC table")
    s.add_argument("--no-layers", action="store_true",
                   help="leave out layers['compensated'] (no later step reads it)")

    s = p["collect-qc"]
    s.add_argument("--inputs", required=True, nargs="+", metavar="TSV")
    s.add_argument("--out", required=True, metavar="TSV")

    s = p["train-normalisation"]
    _add_common(s)
    s.add_argument("--samples", required=True, metavar="TSV",
                   help="sample sheet: the batch and reference flag of every input")
    s.add_argument("--inputs", required=True, nargs="+", metavar="H5AD",
                   help="the reference samples' flow h5ad files")
    s.add_argument("--model", required=True, metavar="NPZ")
    s.add_argument("--info", required=True, metavar="JSON")

    s = p["normalise-flow"]
    _add_common(s)
    s.add_argument("--input", required=True, metavar="H5AD")
    s.add_argument("--model", required=True, metavar="NPZ")
    s.add_argument("--out", required=True, metavar="H5AD")
    s.add_argument("--samples", metavar="TSV", help="sample sheet giving the sample's batch")
    s.add_argument("--sample-id", metavar="ID",
                   help="the sample's row in --samples (default: the id in the h5ad)")
    s.add_argument("--batch", default=None, help="the sample's batch (instead of --samples)")

    s = p["train-flow"]
    _add_common(s)
    s.add_argument("--inputs", required=True, nargs="+", metavar="H5AD")
    s.add_argument("--model", required=True, metavar="NPZ")
    s.add_argument("--info", required=True, metavar="JSON")

    s = p["map-flow"]
    _add_common(s)
    s.add_argument("--input", required=True, metavar="H5AD")
    s.add_argument("--model", required=True, metavar="NPZ")
    s.add_argument("--out", required=True, metavar="H5AD")

    s = p["thresholds"]
    _add_common(s)
    s.add_argument("--samples", required=True, metavar="TSV")
    s.add_argument("--inputs", required=True, nargs="+", metavar="H5AD")
    s.add_argument("--out", required=True, metavar="TSV", help="cohort reference gates")
    s.add_argument("--gates", required=True, metavar="TSV", help="every sample's own gates")

    s = p["annotate"]
    _add_common(s)
    s.add_argument("--samples", required=True, metavar="TSV")
    s.add_argument("--sample-id", required=True, metavar="ID")
    s.add_argument("--input", required=True, metavar="H5AD")
    s.add_argument("--thresholds", required=True, metavar="TSV", help="cohort reference gates")
    s.add_argument("--gates", required=True, metavar="TSV", help="every sample's own gates")
    s.add_argument("--out", required=True, metavar="H5AD")
    s.add_argument("--counts", required=True, metavar="TSV", help="per-sample counts table")
    s.add_argument("--lineage-qc", metavar="TSV",
                   help="per-sample lineage-gate QC row (lymphocytes by markers, purity)")

    s = p["export-gates"]
    _add_common(s)
    s.add_argument("--annotated", required=True, nargs="+", metavar="H5AD",
                   help="annotated flow samples, named {sample_id}.h5ad")
    s.add_argument("--outdir", required=True, metavar="DIR",
                   help="writes DIR/{sample_id}.gatingml.xml for each")

    s = p["compare-gates"]
    _add_common(s)
    s.add_argument("workspace", metavar="WSP", help="the FlowJo workspace (.wsp)")
    s.add_argument("--fcs-dir", default=None, metavar="DIR",
                   help="where its FCS files are (default: the workspace's folder); matched "
                        "by their $FIL keyword")
    s.add_argument("--mapping", default=None, metavar="YAML",
                   help="{population: workspace gate name or path}, e.g. {B: 'Lymphocytes/B "
                        "cells', naive: 'IgD+CD27-'} (default: common gate names)")
    s.add_argument("--annotated", nargs="*", default=[], metavar="H5AD",
                   help="bcellmap's annotated samples to compare (the workflow's); without "
                        "them bcellmap is run here on the workspace's files as one cohort")
    s.add_argument("--samples", default=None, metavar="TSV",
                   help="with --annotated: the sample sheet (each sample's FCS file)")
    s.add_argument("--counts", nargs="*", default=[], metavar="TSV",
                   help="with --annotated: their counts tables (what is not evaluable)")
    s.add_argument("--out", required=True, metavar="TSV", help="the agreement table")
    s.add_argument("--figure-dir", default=None, metavar="DIR",
                   help="also draw gate_agreement.png/.svg (B cells) there")

    s = p["subsets"]
    s.add_argument("--out", default=None, metavar="YAML",
                   help="write the table to this file instead of printing it")

    s = p["quantify"]
    _add_common(s)
    s.add_argument("--samples", required=True, metavar="TSV")
    s.add_argument("--inputs", required=True, nargs="+", metavar="TSV",
                   help="per-sample counts tables from annotate")
    s.add_argument("--out", required=True, metavar="TSV")

    s = p["kinetics"]
    _add_common(s)
    s.add_argument("--table", required=True, metavar="TSV", help="results/tables/samples.tsv")
    s.add_argument("--out", required=True, metavar="TSV")
    s.add_argument("--cohort", required=True, metavar="TSV")

    s = p["concordance"]
    s.add_argument("--table", required=True, metavar="TSV", help="results/tables/samples.tsv")
    s.add_argument("--out", required=True, metavar="TSV")

    s = p["flags"]
    _add_common(s)
    s.add_argument("--samples-table", required=True, metavar="TSV",
                   help="results/tables/samples.tsv")
    s.add_argument("--kinetics", default=None, metavar="TSV", help="results/tables/kinetics.tsv")
    s.add_argument("--gates", default=None, metavar="TSV", help="results/models/gates.tsv")
    s.add_argument("--out", default=None, metavar="TSV", help="results/tables/flags.tsv")
    s.add_argument("--check", action="store_true",
                   help="write nothing; exit 1 when a flag named in the config's fail_on "
                        "was raised")

    s = p["summary"]
    s.add_argument("--results", default="results", metavar="DIR",
                   help="the run's results folder (default: results)")
    s.add_argument("--flags-page", nargs="*", default=[], metavar="PATH",
                   help="where the flags table and figure are, printed at the end")

    s = p["report"]
    _add_common(s)
    s.add_argument("--figures", nargs="+", choices=["tables", "clusters", "gates"],
                   default=["tables", "clusters", "gates"],
                   help="figure groups to draw (default: all); the workflow runs one job per "
                        "group (and per patient for gates)")
    s.add_argument("--samples-table", default=None, metavar="TSV",
                   help="results/tables/samples.tsv (tables; gates unless --samples)")
    s.add_argument("--kinetics", default=None, metavar="TSV", help="tables: kinetics.tsv")
    s.add_argument("--cohort", default=None, metavar="TSV", help="not read (accepted)")
    s.add_argument("--qc", default=None, metavar="TSV", help="tables: qc.tsv")
    s.add_argument("--samples", default=None, metavar="TSV",
                   help="gates: the sample sheet, for patient and day (instead of "
                        "--samples-table, so that gates need not wait for quantify)")
    s.add_argument("--patients", nargs="+", default=None, metavar="ID",
                   help="gates: only these patients (default: every patient with flow rows)")
    s.add_argument("--model", default=None, metavar="NPZ", help="not read (accepted)")
    s.add_argument("--annotated", nargs="*", default=[], metavar="H5AD")
    s.add_argument("--outdir", required=True, metavar="DIR")
    s = p["ingest-scrna"]
    _add_common(s)
    s.add_argument("--samples", required=True, metavar="TSV")
    s.add_argument("--sample-id", required=True, metavar="ID")
    s.add_argument("--out", required=True, metavar="H5AD")
    s.add_argument("--qc", required=True, metavar="TSV", help="per-sample QC table")

    s = p["train-scrna"]
    _add_common(s)
    s.add_argument("--inputs", required=True, nargs="+", metavar="H5AD")
    s.add_argument("--model", required=True, metavar="NPZ")
    s.add_argument("--info", required=True, metavar="JSON")
    s.add_argument("--protein-thresholds", default=None, metavar="TSV",
                   help="write the cohort's CITE-seq protein gates (learned on all samples)")

    s = p["map-scrna"]
    _add_common(s)
    s.add_argument("--input", required=True, metavar="H5AD")
    s.add_argument("--model", required=True, metavar="NPZ")
    s.add_argument("--out", required=True, metavar="H5AD")

    s = p["annotate-scrna"]
    _add_common(s)
    s.add_argument("--samples", required=True, metavar="TSV")
    s.add_argument("--sample-id", required=True, metavar="ID")
    s.add_argument("--input", required=True, metavar="H5AD")
    s.add_argument("--out", required=True, metavar="H5AD")
    s.add_argument("--counts", required=True, metavar="TSV", help="per-sample counts table")
    s.add_argument("--protein-thresholds", default=None, metavar="TSV",
                   help="cohort CITE-seq protein gates from train-scrna (default: learned on "
                        "this sample alone, with a warning)")

    for name, modality in (("map-annotate-flow", "flow"), ("map-annotate-scrna", "scrna")):
        s = p[name]
        _add_common(s)
        s.add_argument("--samples", required=True, metavar="TSV")
        s.add_argument("--sample-id", required=True, metavar="ID")
        s.add_argument("--input", required=True, metavar="H5AD",
                       help=f"the sample's ingested {modality} h5ad")
        s.add_argument("--model", required=True, metavar="NPZ")
        if modality == "flow":
            s.add_argument("--thresholds", required=True, metavar="TSV",
                           help="cohort reference gates")
            s.add_argument("--gates", required=True, metavar="TSV",
                           help="every sample's own gates")
        else:
            s.add_argument("--protein-thresholds", default=None, metavar="TSV",
                           help="cohort CITE-seq protein gates from train-scrna")
        s.add_argument("--out", required=True, metavar="H5AD", help="annotated h5ad")
        s.add_argument("--counts", required=True, metavar="TSV", help="per-sample counts table")
        if modality == "flow":
            s.add_argument("--lineage-qc", required=True, metavar="TSV",
                           help="per-sample lineage-gate QC row")
        s.add_argument("--mapped", default=None, metavar="H5AD",
                       help=f"also write the mapped h5ad (as map-{modality} does)")
        s.add_argument("--keep-layers", action="store_true",
                       help="keep every layer in the annotated h5ad (default: leave out the "
                            "one the source file holds: flow compensated, scRNA counts)")
        s.add_argument("--compression", choices=["gzip", "lzf", "none"], default="gzip",
                       help="h5ad compression of the annotated file (default gzip)")

    s = p["write-config"]
    s.add_argument("--json", required=True, metavar="TEXT",
                   help="the merged config as JSON (the workflow passes it)")
    s.add_argument("--out", required=True, metavar="YAML")
    return parser


def _cli_check_samples(args: argparse.Namespace) -> None:
    from ..config import load_config
    from ..io.samplesheet import normalisation_active, read_sample_sheet

    config = load_config(args.config)
    if getattr(args, "deep", False):
        from ..errors import BcellmapError
        from ..preflight import run_preflight

        report = run_preflight(args.samples, config)
        print(report.format())
        if not report.ok:
            raise BcellmapError(f"{len(report.errors)} problem(s) in {args.samples}, listed "
                                "above")
    sheet = read_sample_sheet(args.samples, panels=list(config.get("panels", {})))
    method = str((config.get("normalisation") or {}).get("method", "auto"))
    if normalisation_active(sheet, method=method, path=args.samples):
        print(f"{args.samples}: batch normalisation on, references: "
              f"{', '.join(sheet.loc[sheet['reference'], 'sample_id'])}")
    print(f"{args.samples}: {len(sheet)} samples, {sheet['patient_id'].nunique()} patients: ok")


@contextlib.contextmanager
def _config_with_json(args: argparse.Namespace) -> Iterator[None]:
    """Point ``args.config`` at ``--config`` with ``--config-json`` merged in, while it runs.

    Every command reads its settings with ``load_config(args.config)``; the merged mapping is
    handed to it as a temporary YAML file (removed afterwards), checked there like any
    config file.
    """
    text = getattr(args, "config_json", None)
    if text is None:
        yield
        return
    import json
    import os
    import tempfile
    from pathlib import Path

    import yaml

    from ..config import check_config_keys, load_config, merge
    from ..errors import ConfigError

    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"--config-json is not valid JSON ({exc})") from None
    if not isinstance(overrides, dict):
        raise ConfigError("--config-json must be a mapping of keys")
    # Checked here, so that a problem names --config-json or the user's file, not the
    # temporary file.
    check_config_keys(overrides, source="--config-json")
    base: dict = {}
    if args.config is not None:
        load_config(args.config)
        base = yaml.safe_load(Path(args.config).read_text()) or {}
    handle, path = tempfile.mkstemp(prefix="bcellmap-config-json-", suffix=".yaml")
    try:
        with os.fdopen(handle, "w") as out:
            yaml.safe_dump(merge(base, overrides), out)
        args.config = path
        yield
    finally:
        os.unlink(path)


def main(argv: list[str] | None = None) -> int:
    """Run the command line; return the exit status (0 ok, 1 error in the input)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(name)s %(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    module_name, function_name, _ = _COMMANDS[args.command]
    from ..errors import BcellmapError

    start = time.perf_counter()
    try:
        function = getattr(importlib.import_module(module_name), function_name)
        with _config_with_json(args):
            function(args)
    except BcellmapError as exc:
        print(f"bcellmap {args.command}: error: {exc}", file=sys.stderr)
        return 1
    logging.getLogger("bcellmap").info("%s finished in %.1f s", args.command,
                                       time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
