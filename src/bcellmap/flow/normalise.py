"""Reference-sample (anchor) batch normalisation, in the manner of CytoNorm.

Cohorts acquired over months drift in brightness between batches (reagent lots, instrument
set-up). When every batch holds an aliquot of the same control blood (marked ``reference`` in
the sample sheet), the differences between those aliquots are technical, and can be learned
and removed (Van Gassen et al. 2020, Cytometry A 97:268, "CytoNorm"):

1. **Clusters.** A seeded, equal-sized subsample of each reference's QC-passed events
   (``normalisation.events_per_sample``) is pooled and clustered with the package's SOM
   (:mod:`bcellmap.kernels.som`, on the CPU or GPU backend) whose nodes are grouped into
   ``normalisation.n_clusters`` consensus metaclusters (:mod:`bcellmap.kernels.metacluster`),
   so that alignment happens per cell population: a batch effect is then not mistaken for a change
   in composition, and a shift of one population does not drag another along.
2. **Quantiles.** Per batch, cluster and marker, the quantiles of the batch's reference
   events at the levels ``normalisation.quantiles`` (evenly spaced over 0.01-0.99). The
   *goal* of a cluster and marker is the mean of the batches' quantiles (CytoNorm's
   ``goal = "mean"``).
3. **Maps.** Per batch, cluster and marker, a monotone piecewise-linear map from the
   batch's quantiles to the goal. Outside the learned range it continues with slope 1 (the
   identity plus the offset at the end point), so extreme events are shifted, never
   stretched. Tied quantiles (e.g. the many exact zeros of mass cytometry) map to the mean
   of their goal values, which keeps the map monotone.
4. **Fallback.** A cluster with fewer than ``normalisation.min_cluster_events`` reference
   events in a batch uses that batch's all-events map (quantiles of all its reference events
   to the mean of all batches' quantiles) and is recorded as a fallback; the cluster's goal
   is the mean over the batches that have enough events.

Applying (``bcellmap normalise-flow``): every event of a sample is assigned to the nearest SOM
node (hence cluster), and its values of the normalised markers are replaced by the map of
its batch and cluster. Other channels, ``layers["compensated"]`` and ``obs`` are untouched.
``obs["normalisation_cluster"]`` records the cluster (-1: an event with a non-finite value,
left as it is) and ``uns["normalisation"]`` the model, batch, markers and fallback clusters.

The model NPZ (``train-normalisation``) holds ``markers``, ``batches``, ``codes`` (SOM nodes
x markers), ``node_cluster``, ``levels``, ``batch_quantiles`` (batches x clusters+1 x markers x
levels; the last cluster slot is the batch's all-events quantiles; NaN where a cluster falls
back), ``goal`` (clusters+1 x markers x levels), ``fallback`` (batches x clusters) and
``cluster_events`` (reference events per batch and cluster). The JSON beside it records the
parameters, the references with their batches, and per batch the median shift per marker.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..contracts import sample_rng, subsample_indices
from ..errors import ConfigError, InputError

log = logging.getLogger(__name__)

#: The quantile levels span this range when ``normalisation.quantiles`` is a count.
QUANTILE_RANGE = (0.01, 0.99)
#: Method name recorded in ``uns["normalisation"]``.
METHOD = "reference_quantile"
_MODEL_KEYS = ("markers", "batches", "codes", "node_cluster", "levels", "batch_quantiles",
               "goal", "fallback", "cluster_events", "min_cluster_events")


@dataclass(frozen=True)
class NormalisationModel:
    """A trained reference-sample normalisation (see the module docstring).

    Attributes
    ----------
    markers
        Canonical markers that are normalised (and clustered on).
    batches
        Batch names, in the order of the first axis of the arrays.
    codes
        ``(n_nodes, n_markers)`` SOM codebook on the untransformed-by-us (ingest) scale.
    node_cluster
        Cluster of each SOM node, ``0..n_clusters-1``.
    levels
        Quantile levels, increasing, in (0, 1).
    batch_quantiles
        ``(n_batches, n_clusters + 1, n_markers, n_levels)``; slot ``n_clusters`` holds the
        batch's all-events quantiles; NaN where the batch falls back for a cluster.
    goal
        ``(n_clusters + 1, n_markers, n_levels)`` mean of the batches' quantiles; NaN for a
        cluster where every batch falls back.
    fallback
        ``(n_batches, n_clusters)`` True where the batch uses its all-events map.
    cluster_events
        ``(n_batches, n_clusters)`` reference events the quantiles were computed on.
    min_cluster_events
        The fewest reference events a cluster needs in a batch for its own map.
    """

    markers: list[str]
    batches: list[str]
    codes: np.ndarray
    node_cluster: np.ndarray
    levels: np.ndarray
    batch_quantiles: np.ndarray
    goal: np.ndarray
    fallback: np.ndarray
    cluster_events: np.ndarray
    min_cluster_events: int

    @property
    def n_clusters(self) -> int:
        """Number of clusters (without the all-events slot)."""
        return int(self.fallback.shape[1])

    def batch_index(self, batch: str, *, sample_id: str | None = None,
                    path: object = None) -> int:
        """Position of ``batch``; an :class:`InputError` names the batches the model knows."""
        if batch not in self.batches:
            raise InputError(f"batch {batch!r} has no reference in the normalisation model "
                             f"(batches with a reference: {', '.join(self.batches)}); mark a "
                             f"reference sample in that batch and retrain",
                             path=path, sample_id=sample_id)
        return self.batches.index(batch)

    def map_for(self, batch: int, cluster: int) -> tuple[np.ndarray, np.ndarray, bool]:
        """Source and target quantiles ``(n_markers, n_levels)`` of one batch and cluster.

        Returns
        -------
        source, target, fallback
            The batch's quantiles, the goal, and whether the all-events map is used.
        """
        all_slot = self.n_clusters
        if self.fallback[batch, cluster] or not np.isfinite(self.goal[cluster]).all():
            return self.batch_quantiles[batch, all_slot], self.goal[all_slot], True
        return self.batch_quantiles[batch, cluster], self.goal[cluster], False

    def save(self, path: str | Path) -> None:
        """Write the model NPZ atomically."""
        from ..io._atomic import atomic_path

        with atomic_path(path) as tmp, open(tmp, "wb") as handle:
            np.savez(handle, markers=np.array(self.markers, dtype=str),
                     batches=np.array(self.batches, dtype=str), codes=self.codes,
                     node_cluster=self.node_cluster, levels=self.levels,
                     batch_quantiles=self.batch_quantiles, goal=self.goal,
                     fallback=self.fallback, cluster_events=self.cluster_events,
                     min_cluster_events=self.min_cluster_events)

    @classmethod
    def load(cls, path: str | Path) -> NormalisationModel:
        """Read a model NPZ written by :meth:`save`.

        Raises
        ------
        InputError
            The file is missing, unreadable, or not a normalisation model.
        """
        try:
            with np.load(path, allow_pickle=False) as npz:
                missing = [k for k in _MODEL_KEYS if k not in npz.files]
                if missing:
                    raise InputError("not a bcellmap normalisation model: lacks "
                                     f"{', '.join(missing)}", path=path)
                arrays = {k: npz[k] for k in _MODEL_KEYS}
        except (OSError, ValueError, EOFError) as exc:
            raise InputError(f"cannot read the normalisation model ({exc})", path=path) from exc
        return cls(markers=[str(m) for m in arrays["markers"]],
                   batches=[str(b) for b in arrays["batches"]],
                   codes=arrays["codes"], node_cluster=arrays["node_cluster"].astype(np.int64),
                   levels=arrays["levels"], batch_quantiles=arrays["batch_quantiles"],
                   goal=arrays["goal"], fallback=arrays["fallback"].astype(bool),
                   cluster_events=arrays["cluster_events"].astype(np.int64),
                   min_cluster_events=int(arrays["min_cluster_events"]))


def quantile_levels(quantiles: int | Sequence[float]) -> np.ndarray:
    """The quantile levels of the maps.

    Parameters
    ----------
    quantiles
        A count (at least 2) of levels evenly spaced over :data:`QUANTILE_RANGE`, or the
        levels themselves (in (0, 1)).

    Raises
    ------
    ConfigError
        Fewer than two levels, or a level outside (0, 1).
    """
    if isinstance(quantiles, bool):
        raise ConfigError(f"normalisation.quantiles must be a count or a list of levels, "
                          f"got {quantiles!r}")
    if isinstance(quantiles, int | np.integer):
        if quantiles < 2:
            raise ConfigError(f"normalisation.quantiles={quantiles}: at least 2 levels needed")
        return np.linspace(*QUANTILE_RANGE, int(quantiles))
    try:
        levels = np.unique(np.asarray(list(quantiles), dtype=np.float64))
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"normalisation.quantiles {quantiles!r} is neither a count nor a "
                          f"list of levels") from exc
    if levels.size < 2 or not ((levels > 0) & (levels < 1)).all():
        raise ConfigError(f"normalisation.quantiles {list(quantiles)!r}: give at least two "
                          f"distinct levels strictly between 0 and 1")
    return levels


def monotone_map(values: np.ndarray, source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Map ``values`` by the monotone piecewise-linear function through (source, target).

    Parameters
    ----------
    values
        Values to map (any shape).
    source
        Non-decreasing knots on the input scale (a batch's quantiles).
    target
        Non-decreasing knots on the output scale (the goal quantiles), same length.

    Returns
    -------
    Mapped values, float64. Between the knots the map is linear; below the first and above
    the last knot it continues with slope 1 (a shift), so it is continuous and monotone.
    Knots that tie in ``source`` are merged, with the mean of their targets.
    """
    values = np.asarray(values, dtype=np.float64)
    source = np.asarray(source, dtype=np.float64)
    target = np.asarray(target, dtype=np.float64)
    knots, inverse = np.unique(source, return_inverse=True)
    heights = np.bincount(inverse, weights=target) / np.bincount(inverse)
    heights = np.maximum.accumulate(heights)  # guards rounding; the mean of monotone is monotone
    mapped = np.interp(values, knots, heights)
    below = values < knots[0]
    mapped[below] = values[below] + (heights[0] - knots[0])
    above = values > knots[-1]
    mapped[above] = values[above] + (heights[-1] - knots[-1])
    return mapped


def normalisation_options(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``normalisation`` settings of a merged config, with defaults resolved.

    ``markers`` null means ``cluster.markers``; the seed is the config's ``seed``.

    Raises
    ------
    ConfigError
        An unknown method, no markers, or a non-positive count.
    """
    settings = config["normalisation"]
    method = str(settings["method"])
    if method not in ("auto", "none", "reference"):
        raise ConfigError(f"normalisation.method {method!r} must be auto, none or reference")
    markers = settings["markers"]
    if markers is None:
        markers = config["cluster"]["markers"] or []
    markers = [str(m) for m in markers]
    if not markers:
        raise ConfigError("normalisation.markers (or cluster.markers) is empty: name the "
                          "canonical markers to normalise")
    if len(set(markers)) != len(markers):
        raise ConfigError(f"normalisation.markers lists a marker twice: {markers}")
    som = settings["som"]
    options = {
        "method": method,
        "markers": markers,
        "levels": quantile_levels(settings["quantiles"]),
        "n_clusters": int(settings["n_clusters"]),
        "events_per_sample": int(settings["events_per_sample"]),
        "min_cluster_events": int(settings["min_cluster_events"]),
        "xdim": int(som["xdim"]),
        "ydim": int(som["ydim"]),
        "rlen": int(som["rlen"]),
        "seed": int(config["seed"]),
    }
    for key in ("n_clusters", "events_per_sample", "xdim", "ydim", "rlen"):
        if options[key] < 1:
            raise ConfigError(f"normalisation {key}={options[key]} must be at least 1")
    if options["min_cluster_events"] < 2:
        raise ConfigError("normalisation.min_cluster_events must be at least 2")
    return options


def _marker_columns(adata: Any, markers: Sequence[str], *, path: object,
                    sample_id: str | None) -> list[int]:
    from .cluster import marker_indices

    return marker_indices(adata, markers, purpose="normalisation", path=path,
                          sample_id=sample_id)


def _dense(matrix: Any) -> np.ndarray:
    return np.asarray(matrix.toarray() if hasattr(matrix, "toarray") else matrix)


def _sample_id(adata: Any, fallback: str) -> str:
    sample = adata.uns.get("sample") if hasattr(adata, "uns") else None
    if isinstance(sample, Mapping) and sample.get("sample_id"):
        return str(sample["sample_id"])
    return fallback


def _qc_pass(adata: Any, *, path: object, sample_id: str) -> np.ndarray:
    if "qc_pass" not in adata.obs.columns:
        raise InputError("obs has no 'qc_pass' column; run ingest-flow first",
                         path=path, sample_id=sample_id)
    return adata.obs["qc_pass"].to_numpy().astype(bool)


def _subsample(passed: np.ndarray, n_max: int, *, seed: int, sample_id: str) -> np.ndarray:
    # Seeded per sample (not by input order), so adding a reference leaves the others' draws.
    return passed[subsample_indices(passed.size, n_max, sample_rng(seed, sample_id))]


def train_normalisation(
    references: Sequence[Any],
    batches: Sequence[str],
    *,
    markers: Sequence[str],
    quantiles: int | Sequence[float] = 51,
    n_clusters: int = 5,
    events_per_sample: int = 20000,
    min_cluster_events: int = 50,
    xdim: int = 5,
    ydim: int = 5,
    rlen: int = 10,
    seed: int = 42,
    backend: Any = None,
    sample_ids: Sequence[str] | None = None,
    paths: Sequence[object] | None = None,
) -> tuple[NormalisationModel, dict[str, Any]]:
    """Learn per-batch, per-cluster quantile maps from reference samples.

    Parameters
    ----------
    references
        Flow AnnData of the reference samples (transformed ``X``, ``var["canonical"]``,
        ``obs["qc_pass"]``).
    batches
        The batch of each reference (several references may share a batch; they are pooled).
    markers
        Canonical markers to cluster on and normalise.
    quantiles
        Number of quantile levels over 0.01-0.99, or the levels.
    n_clusters
        Metaclusters of the SOM nodes (cell populations aligned separately).
    events_per_sample
        Seeded subsample of QC-passed events per reference.
    min_cluster_events
        A cluster with fewer reference events in a batch uses the batch's all-events map.
    xdim, ydim, rlen
        SOM grid and batch passes.
    seed
        Seed of the subsamples, the SOM and the consensus metaclustering.
    backend
        :class:`bcellmap.kernels.backend.Backend`; None: chosen by ``BCELLMAP_DEVICE`` (else auto).
    sample_ids, paths
        Names for messages and provenance; default from ``uns["sample"]`` and positions.

    Returns
    -------
    model, info
        The model and a JSON-ready summary (events per reference, per batch and cluster,
        fallbacks, cluster shares and median shifts per marker).

    Raises
    ------
    InputError
        A reference lacks a marker or ``qc_pass``, holds non-finite values, or there are too
        few events for the SOM grid.
    ConfigError
        ``n_clusters`` larger than the SOM grid, or mismatched arguments.
    """
    from ..kernels.backend import get_backend
    from ..kernels.metacluster import consensus_metaclusters
    from ..kernels.som import map_to_nodes, train_som

    markers = [str(m) for m in markers]
    if len(references) != len(batches):
        raise ConfigError(f"{len(references)} references but {len(batches)} batches given")
    if not references:
        raise InputError("no reference samples to train the normalisation on; mark one "
                         "sample per batch with reference=true in the sample sheet")
    levels = quantile_levels(quantiles)
    n_nodes = xdim * ydim
    if not 1 <= n_clusters <= n_nodes:
        raise ConfigError(f"normalisation.n_clusters={n_clusters} must be between 1 and the "
                          f"{n_nodes} SOM nodes ({xdim}x{ydim})")
    backend = backend if backend is not None else get_backend({})
    paths = list(paths) if paths is not None else [None] * len(references)
    if sample_ids is None:
        sample_ids = [_sample_id(a, f"reference {i + 1}") for i, a in enumerate(references)]
    if not len(sample_ids) == len(paths) == len(references):
        raise ConfigError("sample_ids and paths must have one entry per reference")
    # Pooled in (batch, sample) order, so the model does not depend on the order of the inputs.
    order = sorted(range(len(references)), key=lambda i: (str(batches[i]), str(sample_ids[i])))
    blocks, block_batch, provenance = [], [], []
    for i in order:
        adata, batch, sample_id, path = references[i], str(batches[i]), sample_ids[i], paths[i]
        if not batch:
            raise InputError("a reference sample needs a batch", path=path, sample_id=sample_id)
        columns = _marker_columns(adata, markers, path=path, sample_id=sample_id)
        passed = np.flatnonzero(_qc_pass(adata, path=path, sample_id=sample_id))
        chosen = _subsample(passed, events_per_sample, seed=seed, sample_id=sample_id)
        values = np.asarray(_dense(adata.X[chosen])[:, columns], dtype=np.float64)
        if not np.isfinite(values).all():
            n_bad = int((~np.isfinite(values)).any(axis=1).sum())
            raise InputError(f"{n_bad} QC-passed event(s) hold NaN or infinite values in the "
                             f"normalisation markers", path=path, sample_id=sample_id)
        blocks.append(values)
        block_batch.append(np.full(values.shape[0], batch, dtype=object))
        provenance.append({"sample_id": sample_id, "batch": batch,
                           "path": "" if path is None else str(Path(str(path)).resolve()),
                           "events_total": int(adata.n_obs), "events_qc_pass": int(passed.size),
                           "events_used": int(chosen.size)})
    training = np.concatenate(blocks, axis=0)
    event_batch = np.concatenate(block_batch)
    if training.shape[0] < n_nodes:
        raise InputError(f"only {training.shape[0]} QC-passed reference events across "
                         f"{len(blocks)} reference(s), fewer than the {n_nodes} SOM nodes; use "
                         f"a smaller grid (normalisation.som.xdim/ydim)",
                         path=", ".join(str(p) for p in paths if p is not None) or None)
    codes = train_som(training.astype(np.float32), backend=backend, seed=seed, xdim=xdim,
                      ydim=ydim, rlen=rlen, alpha=(1.0, 1.0))
    node_cluster = consensus_metaclusters(codes, n_clusters=n_clusters, seed=seed,
                                          n_resamples=100)
    nodes, _ = map_to_nodes(training.astype(np.float32), codes, backend=backend)
    event_cluster = node_cluster[nodes]

    batch_names = sorted(set(event_batch.tolist()))
    n_batches, n_markers = len(batch_names), len(markers)
    batch_quantiles = np.full((n_batches, n_clusters + 1, n_markers, levels.size), np.nan)
    fallback = np.zeros((n_batches, n_clusters), dtype=bool)
    cluster_events = np.zeros((n_batches, n_clusters), dtype=np.int64)
    for b, name in enumerate(batch_names):
        in_batch = event_batch == name
        batch_quantiles[b, n_clusters] = np.quantile(training[in_batch], levels, axis=0).T
        for c in range(n_clusters):
            rows = in_batch & (event_cluster == c)
            cluster_events[b, c] = int(rows.sum())
            if cluster_events[b, c] < min_cluster_events:
                fallback[b, c] = True
            else:
                batch_quantiles[b, c] = np.quantile(training[rows], levels, axis=0).T
    goal = np.full((n_clusters + 1, n_markers, levels.size), np.nan)
    goal[n_clusters] = batch_quantiles[:, n_clusters].mean(axis=0)
    for c in range(n_clusters):
        usable = ~fallback[:, c]
        if usable.any():
            goal[c] = batch_quantiles[usable, c].mean(axis=0)
    model = NormalisationModel(markers=markers, batches=batch_names, codes=codes,
                               node_cluster=node_cluster.astype(np.int64), levels=levels,
                               batch_quantiles=batch_quantiles, goal=goal, fallback=fallback,
                               cluster_events=cluster_events,
                               min_cluster_events=int(min_cluster_events))
    if n_batches == 1:
        log.warning("references from one batch only (%s): normalisation is the identity",
                    batch_names[0])
    for b, name in enumerate(batch_names):
        if fallback[b].any():
            log.warning("batch %s: cluster(s) %s have fewer than %d reference events and use "
                        "the batch's all-events map", name,
                        ", ".join(str(c) for c in np.flatnonzero(fallback[b])),
                        min_cluster_events)
    median_slot = int(np.argmin(np.abs(levels - 0.5)))
    info = {
        "method": METHOD,
        "parameters": {"markers": markers, "quantile_levels": levels.tolist(),
                       "n_clusters": int(n_clusters), "events_per_sample": int(events_per_sample),
                       "min_cluster_events": int(min_cluster_events), "xdim": int(xdim),
                       "ydim": int(ydim), "rlen": int(rlen), "seed": int(seed)},
        "device": backend.device,
        "training_events": int(training.shape[0]),
        "references": provenance,
        "batches": {
            name: {
                "cluster_events": cluster_events[b].tolist(),
                "cluster_share": (cluster_events[b] / max(1, cluster_events[b].sum())).round(4)
                .tolist(),
                "fallback_clusters": np.flatnonzero(fallback[b]).tolist(),
                # goal minus this batch at the median level of all events, per marker
                "median_shift": dict(zip(markers, (goal[n_clusters, :, median_slot]
                                                   - batch_quantiles[b, n_clusters, :,
                                                                     median_slot]).round(4)
                                         .tolist(), strict=True)),
            }
            for b, name in enumerate(batch_names)
        },
    }
    return model, info


def normalise(
    adata: Any,
    model: NormalisationModel,
    *,
    batch: str,
    backend: Any = None,
    model_path: str | Path | None = None,
    sample_id: str | None = None,
    path: object = None,
) -> Any:
    """Apply a normalisation model to one sample.

    Parameters
    ----------
    adata
        A flow AnnData (transformed ``X``, ``var["canonical"]``, ``obs["qc_pass"]``).
    model
        A trained :class:`NormalisationModel`.
    batch
        The sample's batch; the model must hold a reference for it.
    backend
        Backend for the nearest-node search; None: chosen by ``BCELLMAP_DEVICE``.
    model_path
        Recorded in ``uns["normalisation"]["model"]``.
    sample_id, path
        For messages (default: ``uns["sample"]["sample_id"]``).

    Returns
    -------
    anndata.AnnData
        A copy whose ``X`` holds the normalised values of ``model.markers`` (float32, as
        ingest writes it), with ``obs["normalisation_cluster"]`` and ``uns["normalisation"]``.
        Events with a non-finite marker value are left as they are (cluster -1); QC-passed
        events must be finite.

    Raises
    ------
    InputError
        A missing marker, a batch without reference, or non-finite QC-passed values.
    """
    from ..kernels.backend import get_backend
    from ..kernels.som import map_to_nodes

    sample_id = sample_id or _sample_id(adata, "sample")
    b = model.batch_index(str(batch), sample_id=sample_id, path=path)
    columns = _marker_columns(adata, model.markers, path=path, sample_id=sample_id)
    passed = _qc_pass(adata, path=path, sample_id=sample_id)
    result = adata.copy()
    X = np.asarray(_dense(result.X), dtype=np.float32)
    values = X[:, columns].astype(np.float64)
    finite = np.isfinite(values).all(axis=1)
    if (passed & ~finite).any():
        raise InputError(f"{int((passed & ~finite).sum())} QC-passed event(s) hold NaN or "
                         f"infinite values in the normalisation markers",
                         path=path, sample_id=sample_id)
    backend = backend if backend is not None else get_backend({})
    rows = np.flatnonzero(finite)
    nodes, _ = map_to_nodes(values[rows].astype(np.float32), model.codes, backend=backend)
    cluster = np.full(adata.n_obs, -1, dtype=np.int64)
    cluster[rows] = model.node_cluster[nodes]
    out = values.copy()
    used_fallback = []
    for c in range(model.n_clusters):
        members = np.flatnonzero(cluster == c)
        source, target, fell_back = model.map_for(b, c)
        if fell_back:
            used_fallback.append(c)
        if members.size == 0:
            continue
        for m in range(len(model.markers)):
            out[members, m] = monotone_map(values[members, m], source[m], target[m])
    X[:, columns] = out.astype(np.float32)
    result.X = X
    result.obs["normalisation_cluster"] = cluster
    counts = np.bincount(cluster[cluster >= 0], minlength=model.n_clusters)
    result.uns["normalisation"] = {
        "method": METHOD,
        "model": "" if model_path is None else str(Path(model_path).resolve()),
        "batch": str(batch),
        "markers": list(model.markers),
        "n_clusters": int(model.n_clusters),
        "quantile_levels": int(model.levels.size),
        "fallback_clusters": [int(c) for c in used_fallback],
        "reference_events": [int(n) for n in model.cluster_events[b]],
        "events_per_cluster": [int(n) for n in counts],
        "events_normalised": int(rows.size),
        "events_not_normalised": int(adata.n_obs - rows.size),
    }
    log.info("%s: normalised %d events to the reference goal (batch %s, %d clusters%s)",
             sample_id, rows.size, batch, model.n_clusters,
             f"; all-events map for cluster(s) {used_fallback}" if used_fallback else "")
    return result


def flow_sample_id(adata: Any, *, path: str | Path | None = None) -> str:
    """The sample id of a flow AnnData: ``uns["sample"]["sample_id"]``, else the file name.

    Parameters
    ----------
    adata
        An ingested flow sample.
    path
        The h5ad file it was read from; its name without ``.h5ad`` is the fallback id
        (``"sample"`` without a path).

    Returns
    -------
    str
    """
    return _sample_id(adata, "sample" if path is None else Path(path).name.removesuffix(".h5ad"))


def reference_batch(sheet: Any, sample_id: str, *, path: str | Path | None = None,
                    sheet_path: str | Path | None = None) -> str:
    """The batch of a reference sample, checking that the sample sheet marks it a reference.

    Parameters
    ----------
    sheet
        The sample sheet as ``bcellmap.io.samplesheet.read_sample_sheet`` returns it (indexed
        by sample_id, with ``reference`` and ``batch`` columns).
    sample_id
        The sample (see :func:`flow_sample_id`).
    path
        The sample's h5ad file, for the error message.
    sheet_path
        The sample sheet's file, for the error message.

    Returns
    -------
    str
        The sample's batch.

    Raises
    ------
    bcellmap.errors.InputError
        The sheet does not list the sample, or does not mark it ``reference``: only reference
        samples train the normalisation.
    """
    if sample_id not in sheet.index:
        raise InputError(f"sample {sample_id!r} is not listed in the sample sheet "
                         f"{sheet_path}", path=path, sample_id=sample_id)
    row = sheet.loc[sample_id]
    if not bool(row["reference"]):
        raise InputError(f"not marked as a reference in the sample sheet {sheet_path} "
                         f"(column 'reference'); only reference samples train the "
                         f"normalisation", path=path, sample_id=sample_id)
    return str(row["batch"])


def sample_batch(sheet: Any, sample_id: str, *, path: str | Path | None = None,
                 sheet_path: str | Path | None = None) -> str:
    """The batch a sample is normalised in, from the sample sheet.

    Parameters
    ----------
    sheet
        The sample sheet as ``bcellmap.io.samplesheet.read_sample_sheet`` returns it.
    sample_id
        The sample (see :func:`flow_sample_id`).
    path
        The sample's h5ad file, for the error message.
    sheet_path
        The sample sheet's file, for the error messages.

    Returns
    -------
    str
        The sample's batch (never empty).

    Raises
    ------
    bcellmap.errors.SampleSheetError
        The sheet does not list the sample.
    bcellmap.errors.InputError
        The sample has no batch, so no reference to normalise to.
    """
    from ..io.samplesheet import sample_row

    row = sample_row(sheet, sample_id, path="" if sheet_path is None else sheet_path)
    batch = str(row["batch"])
    if not batch:
        raise InputError(f"has no batch in the sample sheet {sheet_path}, so no "
                         f"reference to normalise to", path=path, sample_id=sample_id)
    return batch
