"""Flow cytometry commands: ``ingest-flow``, ``collect-qc``, ``train-normalisation``,
``normalise-flow``, ``train-flow``, ``map-flow``, ``thresholds``, ``annotate`` and ``subsets``.

Each reads its inputs, calls the one library function that does the step (the function the
public API calls too) and writes its outputs atomically; the computing lives in the library.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _read_flow(path: str | Path, *, what: str = "ingested flow sample",
               sample_id: str | None = None):
    from ..io.readers import read_h5ad

    return read_h5ad(path, what=what, sample_id=sample_id)


def cli_ingest_flow(args: argparse.Namespace) -> None:
    """``bcellmap ingest-flow``: write ``--out`` (h5ad) and ``--qc`` (TSV) for one sample.

    ``args``: ``config``, ``samples`` with ``sample_id`` (the sheet's row), or ``fcs`` (a
    file; ``sample_id`` defaults to its name), ``out``, ``qc``, ``no_layers``.
    """
    from typing import Any

    from ..config import load_config
    from ..errors import ConfigError, InputError
    from ..flow._ingest import ingest_flow, qc_steps_table
    from ..io._atomic import atomic_path, write_tsv

    config = load_config(args.config)
    sample_meta: dict[str, Any] = {}
    panel = None
    if args.samples:
        from ..io.samplesheet import read_sample_sheet, sample_row

        if not args.sample_id:
            raise ConfigError("ingest-flow: --samples needs --sample-id")
        sheet = read_sample_sheet(args.samples, panels=list(config.get("panels") or {}))
        row = sample_row(sheet, args.sample_id, path=args.samples)
        if row["modality"] != "flow":
            raise InputError(f"modality is {row['modality']!r}, not 'flow'",
                             path=row["path"], sample_id=args.sample_id)
        sample_id = args.sample_id
        fcs_path = args.fcs or row["path"]
        panel = row.get("panel") or None
        sample_meta = {"patient_id": row["patient_id"], "day": int(row["day"])}
    elif args.fcs:
        fcs_path = args.fcs
        sample_id = args.sample_id or Path(args.fcs).stem
    else:
        raise ConfigError("ingest-flow: give --samples with --sample-id, or --fcs")

    adata = ingest_flow(fcs_path, config=config, sample_id=sample_id, panel=panel,
                        sample_meta=sample_meta)
    table = qc_steps_table(adata, sample_id=sample_id)
    if getattr(args, "no_layers", False):
        # The workflow's default: no step reads the compensated layer, and writing it
        # doubles the file (keep_intermediates keeps it).
        adata.layers.clear()
    # Both outputs or neither: the h5ad is renamed into place only after the table is written.
    with atomic_path(args.out) as tmp:
        adata.write_h5ad(tmp)
        write_tsv(table, args.qc)


def cli_collect_qc(args: argparse.Namespace) -> None:
    """``bcellmap collect-qc``: concatenate per-sample QC tables into one table."""
    from ..contracts import QC_TABLE_COLUMNS
    from ..flow._qc import collect_qc
    from ..io._atomic import write_tsv
    from ..io.readers import read_table

    tables = [read_table(path, required=QC_TABLE_COLUMNS, what="QC table")
              for path in args.inputs]
    write_tsv(collect_qc(tables), args.out)


def cli_train_normalisation(args: argparse.Namespace) -> None:
    """Train the reference-sample normalisation (``bcellmap train-normalisation``).

    ``args``: ``config`` (YAML or None), ``samples`` (sheet: batches and reference flags),
    ``inputs`` (the references' flow h5ad), ``model`` (NPZ out), ``info`` (JSON out).
    Every input must be a sample the sheet marks ``reference`` (with a batch).
    """
    import json

    from .. import __version__
    from ..config import load_config
    from ..flow.normalise import (
        flow_sample_id,
        normalisation_options,
        reference_batch,
        train_normalisation,
    )
    from ..io._atomic import atomic_path
    from ..io.samplesheet import read_sample_sheet
    from ..kernels.backend import get_backend

    config = load_config(args.config)
    options = normalisation_options(config)
    sheet = read_sample_sheet(args.samples, panels=list(config["panels"]))
    references, batches, sample_ids = [], [], []
    for raw_path in args.inputs:
        path = Path(raw_path)
        adata = _read_flow(path)
        sample_id = flow_sample_id(adata, path=path)
        batches.append(reference_batch(sheet, sample_id, path=path, sheet_path=args.samples))
        references.append(adata)
        sample_ids.append(sample_id)
    backend = get_backend(config)
    model, info = train_normalisation(
        references, batches, markers=options["markers"], quantiles=options["levels"].tolist(),
        n_clusters=options["n_clusters"], events_per_sample=options["events_per_sample"],
        min_cluster_events=options["min_cluster_events"], xdim=options["xdim"],
        ydim=options["ydim"], rlen=options["rlen"], seed=options["seed"], backend=backend,
        sample_ids=sample_ids, paths=list(args.inputs))
    info = {"bcellmap_version": __version__, **info, "device_reason": backend.reason}
    # Both outputs or neither: the model is renamed into place only after the JSON.
    with atomic_path(args.model) as tmp_model:
        model.save(tmp_model)
        with atomic_path(args.info) as tmp_info:
            tmp_info.write_text(json.dumps(info, indent=2) + "\n")
    log.info("trained the normalisation of %d markers on %d references in %d batches",
             len(options["markers"]), len(references), len(model.batches))


def cli_normalise_flow(args: argparse.Namespace) -> None:
    """Normalise one flow sample to the reference goal (``bcellmap normalise-flow``).

    ``args``: ``config``, ``input`` (flow h5ad), ``model`` (NPZ), ``out`` (h5ad), and the
    batch: ``batch``, or ``samples`` (sheet) with ``sample_id`` (default: the sample id in
    the h5ad).
    """
    from ..config import load_config
    from ..errors import ConfigError
    from ..flow.normalise import NormalisationModel, flow_sample_id, normalise, sample_batch
    from ..io._atomic import write_h5ad
    from ..io.samplesheet import read_sample_sheet
    from ..kernels.backend import get_backend

    config = load_config(args.config)
    path = Path(args.input)
    model = NormalisationModel.load(args.model)
    adata = _read_flow(path)
    sample_id = args.sample_id or flow_sample_id(adata, path=path)
    if args.batch is not None:
        batch = str(args.batch)
    elif args.samples:
        sheet = read_sample_sheet(args.samples, panels=list(config["panels"]))
        batch = sample_batch(sheet, sample_id, path=path, sheet_path=args.samples)
    else:
        raise ConfigError("normalise-flow: give --batch, or --samples (with --sample-id)")
    normalised = normalise(adata, model, batch=batch, backend=get_backend(config),
                           model_path=args.model, sample_id=sample_id, path=path)
    write_h5ad(normalised, args.out)


def cli_train_flow(args: argparse.Namespace) -> None:
    """Fit the cohort SOM and metaclusters (``bcellmap train-flow``).

    ``args``: ``config`` (YAML or None), ``inputs`` (flow h5ad files), ``model`` (NPZ out),
    ``info`` (JSON out). Each sample is read only when training reaches it.
    """
    import json

    import numpy as np

    from ..config import load_config
    from ..flow.cluster import canonical_markers, read_flow_arrays, train_flow_model
    from ..flow.normalise import flow_sample_id
    from ..io._atomic import atomic_path
    from ..kernels.backend import get_backend

    config = load_config(args.config)
    paths = [Path(p) for p in args.inputs]

    def samples():
        for path in paths:
            adata = read_flow_arrays(path)
            yield flow_sample_id(adata, path=path), adata, path

    model, info = train_flow_model(samples(), n_samples=len(paths),
                                   canonical=canonical_markers(paths), config=config,
                                   backend=get_backend(config))
    # Both outputs or neither: the model is renamed into place only after the JSON.
    with atomic_path(args.model) as tmp_model:
        with open(tmp_model, "wb") as handle:
            np.savez(handle, **{**model, "markers": np.array(model["markers"], dtype=str)})
        with atomic_path(args.info) as tmp_info:
            tmp_info.write_text(json.dumps(info, indent=2) + "\n")


def cli_map_flow(args: argparse.Namespace) -> None:
    """Map every QC-passed event of one sample to a SOM node (``bcellmap map-flow``).

    ``args``: ``config``, ``input`` (flow h5ad), ``model`` (NPZ), ``out`` (mapped h5ad). A
    sample with no QC-passed events (B-cell aplasia, a failed tube) is written as a valid empty
    AnnData.
    """
    from ..config import load_config
    from ..flow.cluster import load_model, map_sample
    from ..io._atomic import write_h5ad
    from ..kernels.backend import get_backend

    config = load_config(args.config)
    model = load_model(args.model)
    adata = _read_flow(args.input)
    mapped = map_sample(adata, model, backend=get_backend(config), path=args.input)
    write_h5ad(mapped, args.out)


def cli_thresholds(args: argparse.Namespace) -> None:
    """``bcellmap thresholds``: learn the gates on the QC-passed events of every sample.

    ``args``: ``config``, ``samples`` (sheet: panel, batch, day), ``inputs`` (the ingested or
    normalised flow h5ad files, named ``{sample_id}.h5ad``; mapped files, QC-passed events
    only, give the same gates), ``out`` (the cohort's reference gates, ``THRESHOLD_COLUMNS``)
    and ``gates`` (every sample's own gates, ``GATE_COLUMNS``, which ``annotate`` applies).
    """
    from ..config import load_config
    from ..errors import InputError
    from ..flow.thresholds import instrument_kind, learn_cohort_gates, read_qc_passed
    from ..io._atomic import write_tsv
    from ..io.samplesheet import read_sample_sheet
    from ._outputs import write_all

    config = load_config(args.config)
    sheet = read_sample_sheet(args.samples, check_files=False)
    paths: dict[str, Path] = {}
    for path in map(Path, args.inputs):
        sample_id = path.name.removesuffix(".h5ad")
        if sample_id not in sheet.index:
            raise InputError("input file is not named after a sample of the sheet",
                             path=path, sample_id=sample_id)
        paths[sample_id] = path

    def reader(path: Path, sample_id: str):
        return lambda: read_qc_passed(path, sample_id=sample_id)

    cohort, gates, _ = learn_cohort_gates(
        {s: reader(p, s) for s, p in paths.items()},
        rows={s: sheet.loc[s] for s in paths}, kinds={s: instrument_kind(p)
                                                      for s, p in paths.items()},
        config=config, sheet_path=args.samples)
    write_all([(args.out, lambda: write_tsv(cohort, args.out)),
               (args.gates, lambda: write_tsv(gates, args.gates))])


def cli_annotate(args: argparse.Namespace) -> None:
    """``bcellmap annotate``: one mapped sample -> annotated h5ad and counts table.

    ``args``: ``config``, ``samples``, ``sample_id``, ``input`` (mapped h5ad), ``thresholds``,
    ``gates`` (TSV), ``out`` (annotated h5ad), ``counts`` and ``lineage_qc`` (TSV; optional).
    """
    from ..config import load_config
    from ..flow.annotate import annotate_with_gates, lineage_qc_row
    from ..flow.thresholds import read_gates, read_thresholds
    from ..io._atomic import write_h5ad, write_tsv
    from ..io.samplesheet import read_sample_sheet, sample_row
    from ._outputs import write_all

    config = load_config(args.config)
    sheet = read_sample_sheet(args.samples, check_files=False)
    row = sample_row(sheet, args.sample_id, path=args.samples)
    thresholds, gates = read_thresholds(args.thresholds), read_gates(args.gates)
    adata = _read_flow(args.input, what="mapped flow sample", sample_id=args.sample_id)
    annotated, counts = annotate_with_gates(adata, config=config, row=row, gates=gates,
                                            thresholds=thresholds, gates_path=args.gates)
    writes = [(args.out, lambda: write_h5ad(annotated, args.out)),
              (args.counts, lambda: write_tsv(counts, args.counts))]
    if args.lineage_qc:
        writes.append((args.lineage_qc, lambda: write_tsv(lineage_qc_row(counts),
                                                          args.lineage_qc,
                                                          float_format="%.6g")))
    write_all(writes)
    log.info("%s: %d events, %d lymphocytes by markers, %d B cells", args.sample_id,
             annotated.n_obs, int(counts["lymphocytes"].iloc[0]), int(counts["b_cells"].iloc[0]))


def cli_subsets(args: argparse.Namespace) -> None:
    """``bcellmap subsets``: print the built-in B-cell subset rule table (``--out``: write it).

    Copy it, edit the copy and name it in ``annotate.subsets`` to use rules of your own.
    """
    import sys

    from ..flow.subsets import builtin_subsets_text
    from ..io._atomic import atomic_path

    text = builtin_subsets_text()
    if args.out is None:
        sys.stdout.write(text)
        return
    with atomic_path(args.out) as tmp:
        tmp.write_text(text)
    log.info("wrote the built-in subset rule table to %s", args.out)
