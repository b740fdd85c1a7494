"""Flow cytometry commands: ``ingest-flow``, ``collect-qc``, ``train-normalisation``,
``normalise-flow``, ``train-flow``, ``map-flow``, ``thresholds``, ``annotate`` and ``subsets``.

Each reads its inputs, calls the one library function that does the step (the function the
public API calls too) and writes its outputs atomically; the computing lives in the library.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

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
    from ..flow.thresholds import (
        instrument_kind,
        learn_cohort_gates,
        read_qc_passed,
        read_user_gate_files,
        user_gate_file,
    )
    from ..io._atomic import write_tsv
    from ..io.readers import read_h5ad
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

    def header(sample_id: str):
        # var and uns (transforms, compensation) only: the events stay on disk.
        adata = read_h5ad(paths[sample_id], backed=True, what="flow h5ad",
                          sample_id=sample_id)
        adata.file.close()
        return adata

    files = {s: f for s in paths if (f := user_gate_file(sheet.loc[s], config)) is not None}
    cohort, gates, _ = learn_cohort_gates(
        {s: reader(p, s) for s, p in paths.items()},
        rows={s: sheet.loc[s] for s in paths}, kinds={s: instrument_kind(p)
                                                      for s, p in paths.items()},
        config=config, sheet_path=args.samples,
        user_gates=read_user_gate_files(files, header))
    write_all([(args.out, lambda: write_tsv(cohort, args.out)),
               (args.gates, lambda: write_tsv(gates, args.gates))])


def cli_export_gates(args: argparse.Namespace) -> None:
    """``bcellmap export-gates``: annotated flow samples -> ``{outdir}/{sample_id}.gatingml.xml``.

    ``args``: ``config`` (the subset rule table, ``annotate.subsets``), ``annotated`` (the
    annotated flow h5ad files, named ``{sample_id}.h5ad``; read without their events) and
    ``outdir``. Each file is written atomically (``flow.gatingml.write_gatingml``).
    """
    from ..config import load_config
    from ..flow.gatingml import write_gatingml
    from ..flow.subsets import load_subset_rules
    from ..io.readers import read_h5ad

    rules = load_subset_rules(load_config(args.config))
    outdir = Path(args.outdir)
    for path in map(Path, args.annotated):
        sample_id = path.name.removesuffix(".h5ad")
        adata = read_h5ad(path, backed=True, what="annotated flow sample", sample_id=sample_id)
        try:
            table = write_gatingml(adata, outdir / f"{sample_id}.gatingml.xml", rules=rules,
                                   sample_id=sample_id)
        finally:
            adata.file.close()
        log.info("%s: %d gates written as GatingML", sample_id, len(table))


def _bcellmap_on_workspace(workspace: Any, files: Mapping[str, Path], *,
                          config: Mapping[str, Any] | None = None,
                          sample_ids: Sequence[str] | None = None) -> dict[str, Any]:
    """Run bcellmap (read, compensate, transform, QC, cohort gates, annotate) on a
    workspace's FCS files, with the marker names and spillover matrix the workspace holds.

    Each sample is read with the panel ``flow.agreement.workspace_panel`` gives (the
    workspace's labels win over the file's own ``$PnS``), compensated with the workspace's
    matrix for it (none where the workspace has none: FlowJo exports of ``Comp-`` channels
    are compensated already), and gated with the rest as one cohort (the workflow's pooled
    gates).

    Returns
    -------
    ``{workspace sample id: annotated AnnData}``.
    """
    import bcellmap as bl

    from ..config import merge
    from ..flow.agreement import safe_id, workspace_labels, workspace_panel

    annotated = {}
    for sample_id in sample_ids or list(files):
        channels = workspace_panel(workspace, sample_id)
        matrix = workspace.get_comp_matrix(sample_id)
        panel = {"channels": channels, "required_markers": [["CD19", "CD20"]],
                 "compensation": {"source": "auto" if matrix is not None else "none"}}
        cfg = merge(dict(config or {}), {"panels": {"workspace": panel}})
        adata = bl.flow.read_fcs(files[sample_id], sample_id=safe_id(sample_id),
                                 panel="workspace", config=cfg)
        # The workspace's labels replace the file's: a detector the file calls CD3 but the
        # workspace CD3-IgD (both antibodies on one dye) is no CD3 channel.
        explicit = {channel: marker for marker, channel in channels.items()}
        for channel, label in workspace_labels(workspace, sample_id).items():
            if channel in adata.var_names:
                adata.var.loc[channel, "marker"] = label
                adata.var.loc[channel, "canonical"] = explicit.get(channel, "")
        bl.flow.compensate(adata, spillover=None if matrix is None else
                           matrix.as_dataframe(fluoro_labels=False), config=cfg,
                           **({} if matrix is not None else {"source": "none"}))
        bl.flow.transform(adata, config=cfg)
        bl.flow.qc(adata, config=cfg)
        annotated[sample_id] = (adata, cfg)
    cfg = merge(dict(config or {}), {"panels": {"workspace": {"channels": {}}}})
    bl.tl.gate({safe_id(s): a for s, (a, _) in annotated.items()}, config=cfg)
    for adata, own in annotated.values():
        bl.tl.annotate(adata, config=own)
    return {s: a for s, (a, _) in annotated.items()}


def cli_compare_gates(args: argparse.Namespace) -> None:
    """``bcellmap compare-gates WSP``: bcellmap's calls against a FlowJo workspace's gates.

    Without ``--annotated``, bcellmap reads, gates and annotates the workspace's FCS files
    itself (one cohort, the workspace's marker labels and spillover matrices); with it, the
    given annotated samples are matched to the workspace's by their FCS file's ``$FIL``.
    Writes ``--out`` (``flow.agreement.AGREEMENT_COLUMNS``) and, with ``--figure-dir``, the
    B-cell agreement figure.
    """
    import yaml

    from ..config import load_config
    from ..errors import InputError
    from ..flow.agreement import gate_agreement, read_workspace, safe_id, workspace_files
    from ..io._atomic import write_tsv
    from ..io.readers import read_h5ad, read_table

    config = load_config(args.config)
    wsp = Path(args.workspace)
    given_dir = args.fcs_dir or config["compare"]["fcs_dir"]
    fcs_dir = Path(given_dir) if given_dir else wsp.parent
    mapping = dict(config["compare"]["mapping"] or {})
    if args.mapping:
        try:
            mapping = yaml.safe_load(Path(args.mapping).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise InputError(f"cannot read the gate mapping ({exc})", path=args.mapping) from None
        if not isinstance(mapping, dict):
            raise InputError("the gate mapping must be {population: gate}", path=args.mapping)
    workspace = read_workspace(wsp, fcs_dir)
    files = workspace_files(workspace, fcs_dir)
    if args.annotated:
        import flowio

        from ..io.samplesheet import read_sample_sheet

        if not args.samples:
            raise InputError("compare-gates --annotated needs --samples (the sheet)")
        sheet = read_sample_sheet(args.samples, check_files=False)
        by_file = {str(path.resolve()): sample for sample, path in files.items()}
        by_fil = {workspace.get_sample(s).original_filename: s for s in files}
        counts = {Path(p).name.removesuffix(".tsv"): read_table(p, what="counts table")
                  for p in args.counts}
        samples = {}
        for path in map(Path, args.annotated):
            sample_id = path.name.removesuffix(".h5ad")
            if sample_id not in sheet.index:
                raise InputError("annotated file is not named after a sample of the sheet",
                                 path=path, sample_id=sample_id)
            fcs = Path(sheet.loc[sample_id, "path"]).resolve()
            fil = flowio.FlowData(str(fcs), only_text=True).text.get("fil")
            match = by_file.get(str(fcs)) or by_fil.get(str(fil or "")) or by_fil.get(fcs.name)
            if match is None:
                log.info("%s: not in the workspace", sample_id)
                continue
            adata = read_h5ad(path, what="annotated flow sample", sample_id=sample_id)
            if sample_id in counts and not counts[sample_id].empty:
                adata.uns["counts"] = counts[sample_id].iloc[0].to_dict()
            samples[sample_id] = (match, adata)
    else:
        annotated = _bcellmap_on_workspace(workspace, files, config=config)
        samples = {safe_id(s): (s, a) for s, a in annotated.items()}
    if not samples:
        raise InputError("no sample is both in the workspace and among bcellmap's", path=wsp)
    table = gate_agreement(workspace, samples, mapping=mapping)
    write_tsv(table, args.out)
    if args.figure_dir and (table["population"] == "B").any():
        from ..report.agreement import draw_gate_agreement

        draw_gate_agreement(table, args.figure_dir, dpi=int(config["report"]["dpi"]))
    for row in table[table["population"] == "B"].itertuples():
        log.info("%s: B cells %d (bcellmap) vs %d (workspace), F1 %.3f%s", row.sample_id,
                 row.bcellmap_count, row.workspace_count, row.f1,
                 f"; not evaluable: {row.bcellmap_not_evaluable}"
                 if row.bcellmap_not_evaluable else "")


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
