"""``bcellmap report``: read the workflow's tables, draw every figure, write PNG and SVG."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def cli_report(args: argparse.Namespace) -> None:
    """``bcellmap report``: write every report figure as PNG and SVG into ``args.outdir``.

    Reads ``args.samples_table``, ``args.kinetics``, ``args.qc`` and the annotated h5ads
    (``args.annotated``, may be empty); ``args.cohort`` and ``args.model`` are not needed.
    Every patient with a flow row in the samples table gets ``gates_{patient_id}``.
    All figures are drawn before any is written, so bad input leaves no figure behind.
    """
    import matplotlib

    # Headless: the report only writes files (set here, not at import, so that a notebook
    # importing bcellmap.pl keeps its own backend).
    matplotlib.use("Agg")
    from ..config import load_config
    from ..report.figures import close_figures, draw_report, read_report_tables, save_figure

    config = load_config(args.config)
    samples, kinetics, qc = read_report_tables(args.samples_table, args.kinetics, args.qc)
    figures = draw_report(samples, kinetics, qc, args.annotated, config=config,
                          samples_path=args.samples_table)
    dpi = int(config["report"]["dpi"])
    for index, (stem, fig) in enumerate(figures):
        try:
            save_figure(fig, args.outdir, stem, dpi=dpi)
        except BaseException:
            close_figures(figures[index + 1:])
            raise
    log.info("wrote %d figures to %s", len(figures), args.outdir)
