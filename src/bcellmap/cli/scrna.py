"""scRNA commands: ``ingest-scrna``, ``train-scrna``, ``map-scrna`` and ``annotate-scrna``.

Each reads its inputs, calls the library (:mod:`bcellmap.scrna`) and writes its outputs
atomically; the computing lives in the library.
"""

from __future__ import annotations

import argparse
import logging

log = logging.getLogger(__name__)


def cli_ingest_scrna(args: argparse.Namespace) -> None:
    """``bcellmap ingest-scrna``: one sample of the sheet -> h5ad and QC table."""
    from ..config import load_config
    from ..errors import InputError
    from ..io._atomic import write_h5ad, write_tsv
    from ..io.samplesheet import read_sample_sheet, sample_row
    from ..scrna.ingest import ingest_scrna
    from ._outputs import write_all

    config = load_config(args.config)
    sheet = read_sample_sheet(args.samples)
    row = sample_row(sheet, args.sample_id, path=args.samples)
    if row["modality"] != "scrna":
        raise InputError(f"modality is {row['modality']!r}, not 'scrna'", path=args.samples,
                         sample_id=args.sample_id)
    sample = {"sample_id": args.sample_id, "patient_id": str(row["patient_id"]),
              "day": int(row["day"]), "modality": "scrna", "panel": str(row.get("panel", ""))}
    adata, qc_table = ingest_scrna(row["path"], config=config, sample=sample)
    n_pass = int(adata.obs["qc_pass"].sum())
    if n_pass == 0:
        log.warning("sample %s: no cell passed QC", args.sample_id)
    write_all([(args.qc, lambda: write_tsv(qc_table, args.qc)),
               (args.out, lambda: write_h5ad(adata, args.out))])
    log.info("sample %s: %d cells, %d passed QC", args.sample_id, adata.n_obs, n_pass)


def cli_train_scrna(args: argparse.Namespace) -> None:
    """``bcellmap train-scrna``: ingested h5ad files -> model NPZ, info JSON and (with
    ``--protein-thresholds``) the cohort's CITE-seq protein gates."""
    import json

    import numpy as np

    from ..config import load_config
    from ..io._atomic import atomic_path, write_tsv
    from ..kernels.backend import get_backend
    from ..scrna.cluster import train_scrna_cohort
    from ._outputs import write_all

    config = load_config(args.config)
    protein = getattr(args, "protein_thresholds", None)
    model, info, gates = train_scrna_cohort(args.inputs, config=config,
                                            backend=get_backend(config),
                                            protein_thresholds=bool(protein))

    def write_model() -> None:
        # The model is renamed into place only after the JSON.
        with atomic_path(args.model) as tmp_model:
            with open(tmp_model, "wb") as handle:
                np.savez(handle, **model)
            with atomic_path(args.info) as tmp_info:
                tmp_info.write_text(json.dumps(info, indent=2) + "\n")

    writes = [(protein, lambda: write_tsv(gates, protein))] if protein else []
    write_all([*writes, (args.model, write_model)])


def cli_map_scrna(args: argparse.Namespace) -> None:
    """``bcellmap map-scrna``: one ingested h5ad + model -> mapped h5ad."""
    import numpy as np

    from ..config import load_config
    from ..io._atomic import write_h5ad
    from ..io.readers import read_h5ad
    from ..kernels.backend import get_backend
    from ..scrna.cluster import load_scrna_model, map_scrna, scrna_sample_id

    config = load_config(args.config)
    model = load_scrna_model(args.model)
    adata = read_h5ad(args.input, what="ingested scRNA sample")
    sample_id = scrna_sample_id(adata, args.input)
    mapped = map_scrna(adata, model, config=config, backend=get_backend(config),
                       sample_id=sample_id)
    write_h5ad(mapped, args.out)
    log.info("sample %s: %d cells mapped to %d clusters", sample_id, mapped.n_obs,
             len(np.unique(mapped.obs["leiden"])))


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
