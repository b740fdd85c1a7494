"""``bcellmap report``: read the workflow's tables, draw the figures, write PNG and SVG."""

from __future__ import annotations

import argparse
import logging

from ..errors import BcellmapError

log = logging.getLogger(__name__)


def cli_report(args: argparse.Namespace) -> None:
    """``bcellmap report``: write the report figures as PNG and SVG into ``args.outdir``.

    ``args.figures`` names the groups, each drawn by one function of ``report.figures``: ``tables``
    reads ``args.samples_table``, ``args.kinetics`` and ``args.qc``; ``clusters`` the
    annotated h5ads (``args.annotated``, may be empty); ``gates`` the annotated h5ads and the
    samples table, or the sample sheet (``args.samples``), and draws ``gates_{patient_id}``
    for ``args.patients`` (default: every patient with a flow row). ``args.cohort`` and
    ``args.model`` are not needed. All figures are drawn before any is written, so bad input
    leaves no figure behind.
    """
    import matplotlib

    # Headless: the report only writes files (set here, not at import, so that a notebook
    # importing bcellmap.pl keeps its own backend).
    matplotlib.use("Agg")
    from ..config import load_config
    from ..report.figures import (
        close_figures,
        draw_cluster_figures,
        draw_gate_figures,
        draw_table_figures,
        read_report_tables,
        read_samples_table,
        save_figure,
    )

    groups = list(dict.fromkeys(args.figures))
    needed = {"tables": ("samples_table", "kinetics", "qc")}
    for group in groups:
        missing = [f"--{name.replace('_', '-')}" for name in needed.get(group, ())
                   if getattr(args, name) is None]
        if missing:
            raise BcellmapError(f"bcellmap report --figures {group} needs {', '.join(missing)}")
    if "gates" in groups and args.samples is None and args.samples_table is None:
        raise BcellmapError("bcellmap report --figures gates needs --samples (the sample "
                            "sheet) or --samples-table")
    if args.patients is not None and "gates" not in groups:
        raise BcellmapError("--patients selects gate figures: add --figures gates")

    config = load_config(args.config)
    figures = []
    samples = None
    try:
        if "tables" in groups:
            samples, kinetics, qc = read_report_tables(args.samples_table, args.kinetics,
                                                       args.qc)
            figures += draw_table_figures(samples, kinetics, qc, config=config,
                                          samples_path=args.samples_table)
        if "clusters" in groups:
            figures += draw_cluster_figures(args.annotated, config=config)
        if "gates" in groups:
            if args.samples is not None:
                from ..io.samplesheet import read_sample_sheet

                gate_samples = read_sample_sheet(args.samples, check_files=False)
                samples_path = args.samples
            else:
                gate_samples = (samples if samples is not None
                                else read_samples_table(args.samples_table))
                samples_path = args.samples_table
            figures += draw_gate_figures(args.annotated, gate_samples, config=config,
                                         patients=args.patients, samples_path=samples_path)
    except BaseException:
        close_figures(figures)
        raise
    dpi = int(config["report"]["dpi"])
    for index, (stem, fig) in enumerate(figures):
        try:
            save_figure(fig, args.outdir, stem, dpi=dpi)
        except BaseException:
            close_figures(figures[index + 1:])
            raise
    log.info("wrote %d figures to %s", len(figures), args.outdir)
