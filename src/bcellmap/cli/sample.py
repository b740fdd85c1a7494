"""Fused per-sample commands: one process per sample, from the cohort model to its counts.

The workflow's per-sample work after the cohort steps used to be two or three jobs per sample
(map, annotate), each paying for a process start, imports and a full h5ad round trip. These
commands do it in one:

- ``bcellmap map-annotate-flow``: map the QC-passed events of one ingested (or normalised) flow
  sample to the cohort SOM (as ``map-flow``), call cell types and B-cell subsets with the
  sample's own gates (as ``annotate``), and write the annotated h5ad, the counts table and the
  lineage-gate QC row;
- ``bcellmap map-annotate-scrna``: label the cells of one ingested scRNA sample from the cohort
  model (as ``map-scrna``), then annotate and count them (as ``annotate-scrna``).

``--mapped`` also writes the mapped h5ad (``keep_intermediates: true``). Unless
``--keep-layers`` is given, the annotated file leaves out the layer nothing downstream reads
and the source file already holds (rows by ``obs["event_index"]``): flow ``compensated``
(the FCS values with ``uns["compensation"]``'s matrix applied) and scRNA ``counts`` (the
source count matrix). It is written gzip-compressed (``--compression``).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

from ..io._atomic import write_h5ad
from ._outputs import write_all

log = logging.getLogger(__name__)

#: The layer each modality's annotated file leaves out without ``--keep-layers``.
_DROPPED_LAYER = {"flow": "compensated", "scrna": "counts"}


def _compression(args: argparse.Namespace) -> str | None:
    return None if args.compression == "none" else args.compression


def _read(path: str, *, what: str, sample_id: str) -> Any:
    from ..io.readers import read_h5ad

    return read_h5ad(path, what=what, sample_id=sample_id)


def _sample_row(args: argparse.Namespace, modality: str):
    from ..errors import InputError
    from ..io.samplesheet import read_sample_sheet, sample_row

    sheet = read_sample_sheet(args.samples, check_files=False)
    row = sample_row(sheet, args.sample_id, path=args.samples)
    if row["modality"] != modality:
        raise InputError(f"modality is {row['modality']!r}, not {modality!r}",
                         path=args.samples, sample_id=args.sample_id)
    return row


def cli_map_annotate_flow(args: argparse.Namespace) -> None:
    """``bcellmap map-annotate-flow``: ingested flow h5ad + model + gates -> annotated, counts.

    ``args``: ``config``, ``samples``, ``sample_id``, ``input`` (ingested or normalised h5ad),
    ``model`` (NPZ), ``thresholds``, ``gates`` (TSV), ``out`` (annotated h5ad), ``counts``,
    ``lineage_qc`` (TSV), ``mapped`` (optional h5ad), ``keep_layers``, ``compression``.
    """
    from ..config import load_config
    from ..flow.annotate import annotate_with_gates, lineage_qc_row
    from ..flow.cluster import load_model, map_sample
    from ..flow.thresholds import read_gates, read_thresholds
    from ..io._atomic import write_tsv
    from ..kernels.backend import get_backend

    config = load_config(args.config)
    row = _sample_row(args, "flow")
    model = load_model(args.model)
    thresholds, gates = read_thresholds(args.thresholds), read_gates(args.gates)
    adata = _read(args.input, what="ingested flow sample", sample_id=args.sample_id)
    mapped = map_sample(adata, model, backend=get_backend(config), path=args.input)
    del adata
    annotated, counts = annotate_with_gates(mapped, config=config, row=row, gates=gates,
                                            thresholds=thresholds, gates_path=args.gates)
    if not args.keep_layers:
        annotated.layers.pop(_DROPPED_LAYER["flow"], None)
    compression = _compression(args)
    writes: list[tuple[Path, Any]] = []
    if args.mapped:
        writes.append((Path(args.mapped),
                       lambda: write_h5ad(mapped, args.mapped, compression=None)))
    writes += [
        (Path(args.out), lambda: write_h5ad(annotated, args.out, compression=compression)),
        (Path(args.counts), lambda: write_tsv(counts, args.counts)),
        (Path(args.lineage_qc), lambda: write_tsv(lineage_qc_row(counts), args.lineage_qc,
                                                  float_format="%.6g")),
    ]
    write_all(writes)
    log.info("%s: %d events, %s lymphocytes by markers, %s B cells", args.sample_id,
             annotated.n_obs, counts["lymphocytes"].iloc[0], counts["b_cells"].iloc[0])


def cli_map_annotate_scrna(args: argparse.Namespace) -> None:
    """``bcellmap map-annotate-scrna``: ingested scRNA h5ad + model -> annotated, counts.

    ``args``: ``config``, ``samples``, ``sample_id``, ``input`` (ingested h5ad), ``model``
    (NPZ), ``protein_thresholds`` (TSV, optional), ``out`` (annotated h5ad), ``counts``
    (TSV), ``mapped`` (optional h5ad), ``keep_layers``, ``compression``.
    """
    import pandas as pd

    from ..config import load_config
    from ..contracts import COUNT_COLUMNS
    from ..io._atomic import write_tsv
    from ..kernels.backend import get_backend
    from ..scrna.annotate import annotate_scrna, read_protein_thresholds
    from ..scrna.cluster import load_scrna_model, map_scrna

    config = load_config(args.config)
    _sample_row(args, "scrna")
    model = load_scrna_model(args.model)
    adata = _read(args.input, what="ingested scRNA sample", sample_id=args.sample_id)
    mapped = map_scrna(adata, model, config=config, backend=get_backend(config),
                       sample_id=args.sample_id)
    del adata
    table = read_protein_thresholds(args.protein_thresholds) if args.protein_thresholds \
        else None
    annotated, row = annotate_scrna(mapped, config=config, sample_id=args.sample_id,
                                    protein_thresholds=table)
    if not args.keep_layers:
        annotated.layers.pop(_DROPPED_LAYER["scrna"], None)
    compression = _compression(args)
    counts = pd.DataFrame([row], columns=list(COUNT_COLUMNS))
    writes: list[tuple[Path, Any]] = []
    if args.mapped:
        writes.append((Path(args.mapped),
                       lambda: write_h5ad(mapped, args.mapped, compression=None)))
    writes += [
        (Path(args.out), lambda: write_h5ad(annotated, args.out, compression=compression)),
        (Path(args.counts), lambda: write_tsv(counts, args.counts)),
    ]
    write_all(writes)
    log.info("sample %s: %d cells, %d lymphocytes, %d B cells%s", args.sample_id,
             row["events_qc_pass"], row["lymphocytes"], row["b_cells"],
             f"; flagged protein gates: {row['gate_flags']}" if row["gate_flags"] else "")
