"""``bcellmap annotate-scrna``: read one mapped scRNA sample, annotate it, write the results."""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def cli_annotate_scrna(args: argparse.Namespace) -> None:
    """``bcellmap annotate-scrna``: mapped h5ad -> annotated h5ad and counts table."""
    import pandas as pd

    from ..config import load_config
    from ..contracts import COUNT_COLUMNS
    from ..io._atomic import write_h5ad, write_tsv
    from ..io.readers import read_h5ad
    from ..io.samplesheet import read_sample_sheet, sample_row
    from ..scrna.annotate import annotate_scrna, read_protein_thresholds

    config = load_config(args.config)
    sheet = read_sample_sheet(args.samples, check_files=False)
    sample_row(sheet, args.sample_id, path=args.samples)
    adata = read_h5ad(args.input, what="mapped scRNA sample", sample_id=args.sample_id)
    table = read_protein_thresholds(args.protein_thresholds) \
        if getattr(args, "protein_thresholds", None) else None
    annotated, row = annotate_scrna(adata, config=config, sample_id=args.sample_id,
                                    protein_thresholds=table)
    write_h5ad(annotated, args.out)
    write_tsv(pd.DataFrame([row], columns=list(COUNT_COLUMNS)), args.counts)
    log.info("sample %s: %d cells, %d lymphocytes, %d B cells%s", args.sample_id,
             row["events_qc_pass"], row["lymphocytes"], row["b_cells"],
             f"; flagged protein gates: {row['gate_flags']}" if row["gate_flags"] else "")
