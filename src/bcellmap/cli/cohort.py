"""Cohort commands: ``quantify``, ``kinetics`` and ``concordance``.

Each reads its tables, calls the library (:mod:`bcellmap.cohort`) and writes its outputs
atomically; the computing lives in the library.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def cli_quantify(args: argparse.Namespace) -> None:
    """``bcellmap quantify``: counts tables + sheet -> results/tables/samples.tsv."""
    from ..cohort._quantify import quantify, read_counts
    from ..config import load_config
    from ..io._atomic import write_tsv
    from ..io.samplesheet import read_sample_sheet

    config = load_config(args.config)
    sheet = read_sample_sheet(args.samples, check_files=False)
    counts = read_counts(args.inputs)
    table = quantify(counts, sheet, lloq_events=float(config["kinetics"]["lloq_events"]),
                     loq_events=float(config["kinetics"]["loq_events"]))
    write_tsv(table, args.out, float_format="%.10g")
    log.info("%d samples quantified", len(table))


def cli_kinetics(args: argparse.Namespace) -> None:
    """``bcellmap kinetics``: samples.tsv -> kinetics.tsv and cohort.tsv."""
    from ..cohort import cohort_summary, kinetics
    from ..config import load_config
    from ..io._atomic import atomic_path
    from ..io.readers import read_table

    config = load_config(args.config)
    table = read_table(args.table, what="samples table")
    per_patient = kinetics(table, config=config)
    cohort = cohort_summary(per_patient, config=config)
    # Both outputs or neither: write to temporaries, rename only when both are complete.
    with atomic_path(args.out) as kinetics_tmp, atomic_path(args.cohort) as cohort_tmp:
        per_patient.to_csv(kinetics_tmp, sep="\t", index=False, float_format="%.10g")
        cohort.to_csv(cohort_tmp, sep="\t", index=False, float_format="%.10g")
    log.info("%d patient x modality x measure rows", len(per_patient))


def cli_concordance(args: argparse.Namespace) -> None:
    """``bcellmap concordance --table samples.tsv --out concordance.tsv``."""
    from ..cohort import concordance
    from ..io._atomic import write_tsv
    from ..io.readers import read_table

    samples = read_table(args.table, what="samples table")
    write_tsv(concordance(samples), args.out)
