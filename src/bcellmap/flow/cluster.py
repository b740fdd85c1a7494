"""Cohort SOM training (:func:`train_flow_model`) and per-sample mapping (:func:`map_sample`).

The one home of both: ``bcellmap train-flow`` / ``map-flow`` (on files) and
:func:`bcellmap.tl.train_som` / :func:`~bcellmap.tl.map_som` (on AnnData objects) call them.

Training sees a bounded, seeded subsample of the QC-passed events of every sample (at most
``cluster.events_per_sample`` each, and at most ``cluster.train_events`` in all: past that many
samples each gives ``train_events // samples``), so the cohort can grow without bound. The
columns are the canonical markers ``cluster.markers`` of the transformed ``X``.

Scaling: by default the transformed values are used unscaled, as FlowSOM does: arcsinh/logicle
put every fluorescence channel on a comparable scale, and z-scoring would inflate the noise of
markers that are negative on almost every event. ``cluster.scale: true`` standardises each
marker by the training mean and standard deviation instead; the model always stores
``center`` and ``scale`` (0 and 1 when unscaled) and mapping applies them.

The model NPZ holds ``codes`` (n_nodes x markers, in the scaled space), ``node_metacluster``,
``markers``, ``center``, ``scale``, ``xdim``, ``ydim``; the JSON beside it holds the parameters,
the provenance (inputs, events passing QC and events used per sample) and the device used.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import __version__
from ..contracts import sample_rng, subsample_indices
from ..errors import ConfigError, InputError
from ..kernels.som import map_to_nodes

log = logging.getLogger(__name__)


def _sample_id(adata: Any, path: str | Path) -> str:
    sample = adata.uns.get("sample") if hasattr(adata, "uns") else None
    if isinstance(sample, dict) and sample.get("sample_id"):
        return str(sample["sample_id"])
    return Path(path).name.removesuffix(".h5ad")


def _qc_mask(adata: Any, *, path: Path, sample_id: str) -> np.ndarray:
    if "qc_pass" not in adata.obs.columns:
        raise InputError("obs has no 'qc_pass' column; run ingest-flow first",
                         path=path, sample_id=sample_id)
    return adata.obs["qc_pass"].to_numpy().astype(bool)


def marker_indices(adata: Any, markers: Sequence[str], *, purpose: str = "clustering",
                   path: Path | str | None = None, sample_id: str | None = None) -> list[int]:
    """Column of each canonical marker in ``adata.X``; a missing or repeated one is an error.

    ``purpose`` names what the markers are for in the message ("clustering marker(s) ...").
    """
    if "canonical" not in adata.var.columns:
        raise InputError("var has no 'canonical' column; run ingest-flow first",
                         path=path, sample_id=sample_id)
    canonical = adata.var["canonical"].astype(str).to_numpy()
    missing = [m for m in markers if (canonical == m).sum() == 0]
    if missing:
        raise InputError(f"{purpose} marker(s) {', '.join(missing)} not found in this sample "
                         f"(canonical markers present: {', '.join(sorted(set(canonical) - {''}))})",
                         path=path, sample_id=sample_id)
    repeated = [m for m in markers if (canonical == m).sum() > 1]
    if repeated:
        raise InputError(f"{purpose} marker(s) {', '.join(repeated)} map to several channels",
                         path=path, sample_id=sample_id)
    return [int(np.flatnonzero(canonical == m)[0]) for m in markers]


def marker_matrix(adata: Any, markers: list[str], *, rows: np.ndarray | None = None,
                  path: Path | str | None = None, sample_id: str | None = None) -> np.ndarray:
    """Return the float32 ``X`` columns of canonical ``markers`` (optionally only ``rows``).

    Parameters
    ----------
    adata
        A flow AnnData with ``var["canonical"]``.
    markers
        Canonical marker names, in the order of the result's columns.
    rows
        Boolean mask or integer indices of the events to take; None: all.
    path, sample_id
        For error messages.

    Raises
    ------
    InputError
        A marker missing from (or duplicated in) the sample, or NaN/infinite values.
    """
    columns = marker_indices(adata, markers, path=path, sample_id=sample_id)
    matrix = adata.X if rows is None else adata.X[rows]
    if hasattr(matrix, "toarray"):
        matrix = matrix.toarray()
    values = np.asarray(matrix[:, columns], dtype=np.float32)
    if not np.isfinite(values).all():
        n_bad = int((~np.isfinite(values)).any(axis=1).sum())
        raise InputError(f"{n_bad} QC-passed event(s) hold NaN or infinite values in the "
                         f"clustering markers", path=path, sample_id=sample_id)
    return values


def cluster_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The clustering settings of a merged config (``cluster``, ``seed``), as plain values."""
    cluster = config.get("cluster") or {}
    som = cluster.get("som") or {}
    markers = list(cluster.get("markers") or [])
    if not markers:
        raise ConfigError("cluster.markers is empty: name the canonical markers to cluster on")
    alpha = som.get("alpha", [1.0, 1.0])
    return {
        "markers": markers,
        "events_per_sample": int(cluster.get("events_per_sample", 5000)),
        "train_events": (None if cluster.get("train_events") is None
                         else int(cluster["train_events"])),
        "scale": bool(cluster.get("scale", False)),
        "xdim": int(som.get("xdim", 10)),
        "ydim": int(som.get("ydim", 10)),
        "rlen": int(som.get("rlen", 10)),
        "alpha": (float(alpha[0]), float(alpha[1])),
        "radius": None if som.get("radius") is None else float(som["radius"]),
        "n_metaclusters": int(cluster.get("n_metaclusters", 20)),
        "consensus_resamples": int(cluster.get("consensus_resamples", 100)),
        "seed": int(cluster.get("seed", config.get("seed", 42))),
    }


def canonical_markers(paths: Sequence[str | Path]) -> dict[str, set[str]]:
    """``{sample: canonical markers}`` of flow h5ad files, reading only their ``var``.

    Opening the AnnData would read the whole obs of every sample. Samples are named by
    their file names without ``.h5ad``.

    Raises
    ------
    InputError
        A file cannot be read.
    """
    import h5py
    from anndata.io import read_elem

    markers: dict[str, set[str]] = {}
    for raw_path in paths:
        path = Path(raw_path)
        try:
            with h5py.File(path, "r") as handle:
                var = read_elem(handle["var"])
        except (OSError, KeyError) as exc:
            raise InputError(f"cannot read the flow h5ad ({exc})", path=path) from None
        markers[path.name.removesuffix(".h5ad")] = (
            set(var["canonical"].astype(str)) if "canonical" in var.columns else set())
    return markers


def shared_markers(canonical: Mapping[str, Collection[str]], markers: Sequence[str]
                   ) -> tuple[list[str], dict[str, list[str]]]:
    """The ``cluster.markers`` every sample has, and who lacks each dropped one.

    One cohort SOM needs the same markers in every sample. Cohorts mixing panels cluster on
    the markers the panels share (named in the log); no shared marker is an error that
    lists every sample and what it lacks, at once.

    Parameters
    ----------
    canonical
        ``{sample: its canonical markers}`` (:func:`canonical_markers` for files).
    markers
        The markers asked for, in order.

    Returns
    -------
    The markers kept (in order) and ``{dropped marker: samples lacking it}``.
    """
    lacking: dict[str, list[str]] = {}
    for sample, present in canonical.items():
        for marker in markers:
            if marker not in present:
                lacking.setdefault(marker, []).append(sample)
    lacking = {m: lacking[m] for m in markers if m in lacking}  # in cluster.markers order
    kept = [m for m in markers if m not in lacking]
    if not kept:
        detail = "; ".join(f"{m}: missing in {', '.join(s)}" for m, s in lacking.items())
        raise InputError(f"cluster.markers: no marker is in every flow sample "
                         f"({detail}); set cluster.markers to markers all panels share")
    if lacking:
        log.warning("cluster.markers: clustering on the markers every sample has (%s); "
                    "dropped %s", ", ".join(kept),
                    "; ".join(f"{m} (missing in {len(s)} sample(s): {', '.join(s[:5])}"
                              f"{', ...' if len(s) > 5 else ''})" for m, s in lacking.items()))
    return kept, lacking


def train_flow_model(
    samples: Iterable[tuple[str, Any, str | Path | None]],
    *,
    n_samples: int,
    canonical: Mapping[str, Collection[str]],
    config: Mapping[str, Any],
    backend: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Fit the cohort SOM and its metaclusters: the ``train-flow`` step.

    A seeded subsample of at most ``cluster.events_per_sample`` QC-passed events of every
    sample (fewer each when ``cluster.train_events`` would be exceeded) is pooled, a batch
    SOM is trained on the shared ``cluster.markers`` and its nodes are grouped by consensus
    hierarchical clustering.

    Parameters
    ----------
    samples
        ``(sample_id, flow AnnData, path or None)`` per sample, in pooling order; may be a
        generator that reads each sample only when it is reached (:func:`read_flow_arrays`),
        so the cohort need not fit in memory. ``sample_id`` seeds the sample's subsample.
    n_samples
        How many ``samples`` there are (the ``train_events`` cap is shared among them).
    canonical
        ``{sample: canonical markers}`` of every sample (:func:`shared_markers`).
    config
        The merged config (``cluster``, ``seed``).
    backend
        :class:`bcellmap.kernels.backend.Backend`.

    Returns
    -------
    model
        ``codes`` (nodes x markers, scaled space), ``node_metacluster``, ``markers`` (list),
        ``center``, ``scale``, ``xdim``, ``ydim``: the arrays of ``flow_som.npz``.
    info
        The provenance of ``flow_som.json``: version, parameters, markers dropped, device,
        training events and, per sample, events total / passing QC / used.

    Raises
    ------
    InputError
        Fewer training events than SOM nodes, a marker missing, NaN values.
    ConfigError
        ``cluster.n_metaclusters`` outside 1 .. SOM nodes.
    """
    # Here, not at module level: per-sample mapping jobs need neither (scipy's linkage).
    from ..kernels.metacluster import consensus_metaclusters
    from ..kernels.som import train_som

    options = cluster_options(config)
    options["markers"], dropped = shared_markers(canonical, options["markers"])
    per_sample = options["events_per_sample"]
    if options["train_events"] is not None:
        # The cohort-wide cap: training memory and time stay bounded however many samples.
        per_sample = min(per_sample, max(1, options["train_events"] // max(1, n_samples)))
    blocks, provenance, paths = [], [], []
    for sample_id, adata, path in samples:
        passed = np.flatnonzero(_qc_mask(adata, path=path, sample_id=sample_id))
        n_take = min(passed.size, per_sample)
        chosen = passed[subsample_indices(passed.size, n_take,
                                          sample_rng(options["seed"], sample_id))]
        blocks.append(marker_matrix(adata, options["markers"], rows=chosen, path=path,
                                    sample_id=sample_id))
        entry = {"sample_id": sample_id}
        if path is not None:
            entry["path"] = str(Path(path).resolve())
            paths.append(str(path))
        provenance.append({**entry, "events_total": int(adata.n_obs),
                           "events_qc_pass": int(passed.size), "events_used": int(n_take)})
    training = np.concatenate(blocks, axis=0) if blocks else np.zeros((0, len(options["markers"])))
    n_nodes = options["xdim"] * options["ydim"]
    if training.shape[0] < n_nodes:
        raise InputError(f"only {training.shape[0]} QC-passed events across {len(blocks)} "
                         f"sample(s), fewer than the {n_nodes} SOM nodes; use a smaller grid "
                         f"(cluster.som.xdim/ydim) or more events",
                         path=", ".join(paths) if paths else None)
    if not 1 <= options["n_metaclusters"] <= n_nodes:
        raise ConfigError(f"cluster.n_metaclusters={options['n_metaclusters']} must be between "
                          f"1 and the {n_nodes} SOM nodes")
    if options["scale"]:
        center = training.mean(axis=0, dtype=np.float64)
        scale = training.std(axis=0, dtype=np.float64)
        scale[scale == 0] = 1.0  # a constant marker carries no information; leave it as is
    else:
        center, scale = np.zeros(training.shape[1]), np.ones(training.shape[1])
    scaled = ((training - center) / scale).astype(np.float32)
    codes = train_som(scaled, backend=backend, seed=options["seed"], xdim=options["xdim"],
                      ydim=options["ydim"], rlen=options["rlen"], alpha=options["alpha"],
                      radius=options["radius"])
    node_metacluster = consensus_metaclusters(codes, n_clusters=options["n_metaclusters"],
                                              seed=options["seed"],
                                              n_resamples=options["consensus_resamples"])
    model = {"codes": codes, "node_metacluster": node_metacluster,
             "markers": list(options["markers"]), "center": center, "scale": scale,
             "xdim": options["xdim"], "ydim": options["ydim"]}
    info = {
        "bcellmap_version": __version__,
        "parameters": {**options, "alpha": list(options["alpha"])},
        "markers_dropped": dropped,
        "device": backend.device,
        "device_reason": backend.reason,
        "training_events": int(training.shape[0]),
        "samples": provenance,
    }
    log.info("trained a %dx%d SOM with %d metaclusters on %d events from %d samples (%s)",
             options["xdim"], options["ydim"], options["n_metaclusters"], training.shape[0],
             len(provenance), backend.device)
    return model, info


def load_model(path: str | Path) -> dict[str, Any]:
    """Read a flow SOM model NPZ written by ``train-flow``.

    Raises
    ------
    InputError
        The file is missing, unreadable or lacks a model array.
    """
    keys = ("codes", "node_metacluster", "markers", "center", "scale", "xdim", "ydim")
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [k for k in keys if k not in npz.files]
            if missing:
                raise InputError(f"not a bcellmap flow model: lacks {', '.join(missing)}",
                                 path=path)
            model = {k: npz[k] for k in keys}
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the model ({exc})", path=path) from exc
    model["markers"] = [str(m) for m in model["markers"]]
    return model


def map_sample(adata: Any, model: dict[str, Any], *, backend: Any,
               path: Path | str | None = None) -> Any:
    """The QC-passed events of one ingested sample, each assigned its SOM node.

    Parameters
    ----------
    adata
        An ingested (or normalised) flow AnnData with ``obs["qc_pass"]``.
    model
        The cohort model (:func:`load_model`).
    backend
        :class:`bcellmap.kernels.backend.Backend`.
    path
        The file ``adata`` came from, for messages.

    Returns
    -------
    anndata.AnnData
        A copy of the QC-passed rows with ``obs["som_node"]`` and ``obs["metacluster"]``
        (int64); valid and empty when no event passed QC.
    """
    path = Path(path) if path is not None else Path("<memory>")
    sample_id = _sample_id(adata, path)
    passed = _qc_mask(adata, path=path, sample_id=sample_id)
    mapped = adata[passed].copy()
    values = marker_matrix(mapped, model["markers"], path=path, sample_id=sample_id)
    scaled = ((values - model["center"]) / model["scale"]).astype(np.float32)
    nodes, _ = map_to_nodes(scaled, model["codes"], backend=backend)
    mapped.obs["som_node"] = nodes.astype(np.int64)
    mapped.obs["metacluster"] = model["node_metacluster"][nodes].astype(np.int64)
    log.info("mapped %d QC-passed events of %s (%d in the file)", mapped.n_obs, sample_id,
             adata.n_obs)
    return mapped


def read_flow_arrays(path: str | Path) -> Any:
    """``X``, ``var``, ``obs["qc_pass"]`` and ``uns["sample"]`` of a flow h5ad, nothing else.

    Training reads every sample of the cohort; the obs index, the other QC columns and the
    layers are not needed, and at a million events reading them costs more than ``X``. A
    file that is not a dense flow h5ad is read whole (``anndata.read_h5ad``).

    Returns
    -------
    An object with ``X``, ``var``, ``obs`` (``qc_pass`` only), ``uns`` (``sample``) and
    ``n_obs``, as :func:`marker_matrix` and the QC mask read them.

    Raises
    ------
    InputError
        The file cannot be read.
    """
    from types import SimpleNamespace

    import h5py
    import pandas as pd
    from anndata.io import read_elem

    try:
        with h5py.File(path, "r") as handle:
            if isinstance(handle.get("X"), h5py.Dataset):
                x = handle["X"][...]
                obs = pd.DataFrame(
                    {"qc_pass": read_elem(handle["obs/qc_pass"])} if "qc_pass" in handle["obs"]
                    else {}, index=pd.RangeIndex(x.shape[0]))
                sample = read_elem(handle["uns/sample"]) if "uns/sample" in handle else {}
                return SimpleNamespace(X=x, var=read_elem(handle["var"]), obs=obs,
                                       uns={"sample": dict(sample)}, n_obs=int(x.shape[0]))
    except (OSError, KeyError):
        pass  # not a dense flow h5ad: the full reader says what is wrong
    from ..io.readers import read_h5ad

    return read_h5ad(path, what="flow h5ad")
