"""Flow cytometry cohort commands: ``collect-qc``, ``train-normalisation``, ``normalise-flow``.

Each reads its inputs, calls the library (:mod:`bcellmap.flow`) and writes its outputs
atomically; the computing lives in the library.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def _read_flow(path: str | Path):
    from ..io.readers import read_h5ad

    return read_h5ad(path, what="ingested flow sample")


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
