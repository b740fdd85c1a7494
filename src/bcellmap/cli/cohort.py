"""Cohort commands: ``quantify``, ``kinetics``, ``concordance``, ``flags`` and ``summary``.

Each reads its tables, calls the library (:mod:`bcellmap.cohort`) and writes its outputs
atomically; the computing lives in the library.
"""

from __future__ import annotations

import argparse
import logging
import sys

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


def cli_flags(args: argparse.Namespace) -> None:
    """``bcellmap flags``: samples, kinetics and gates tables -> results/tables/flags.tsv.

    With ``--check``, exit 1 naming every flag that ``fail_on`` (config) lists: the run is
    then an error (for CI and regulated use), its tables kept for inspection.
    """
    import pandas as pd

    from ..cohort._flags import failing_flags, flag_table
    from ..config import load_config
    from ..errors import InputError
    from ..io._atomic import write_tsv
    from ..io.readers import read_table

    if not args.check and not args.out:
        raise InputError("bcellmap flags: give --out (the flags table) or --check")
    config = load_config(args.config)
    samples = read_table(args.samples_table, what="samples table")
    kinetics = read_table(args.kinetics, what="kinetics table") if args.kinetics else None
    gates = (read_table(args.gates, what="gates table") if args.gates else None)
    table = flag_table(samples, kinetics, gates)
    if args.check:
        failing = failing_flags(table, config["fail_on"])
        if not failing.empty:
            listed = "; ".join(f"{row.id}: {row.flag}" for row in failing.itertuples())
            raise InputError(f"fail_on {list(config['fail_on'])}: {len(failing)} flag(s) "
                             f"raised: {listed}", path=args.samples_table)
        return
    write_tsv(table if not table.empty else pd.DataFrame(columns=table.columns), args.out)
    log.info("%d flags", len(table))


def cli_summary(args: argparse.Namespace) -> None:
    """``bcellmap summary --results DIR``: print what the run could not stand behind."""
    from ..cohort._flags import summary_text

    pages = [page for page in args.flags_page if page]
    print(summary_text(args.results, flags_page=pages), file=sys.stderr)
