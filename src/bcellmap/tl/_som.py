"""``train_som`` and ``map_som``: the cohort SOM of the workflow's ``train-flow`` and
``map-flow`` steps, on AnnData objects in memory."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from .._apiutils import ConfigLike, as_mapping, h5ad_safe, qc_mask, record, resolve_config
from ..errors import ConfigError, InputError

if TYPE_CHECKING:
    from anndata import AnnData

log = logging.getLogger(__name__)

#: Arrays of a flow SOM model (the keys of ``results/models/flow_som.npz``).
MODEL_KEYS = ("codes", "node_metacluster", "markers", "center", "scale", "xdim", "ydim")


def _options(config: ConfigLike, *, markers: Sequence[str] | None,
             grid: tuple[int, int] | None, rlen: int | None,
             alpha: tuple[float, float] | None, radius: float | None,
             n_metaclusters: int | None, consensus_resamples: int | None,
             events_per_sample: int | None, scale: bool | None,
             seed: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config and the workflow's clustering options (``flow.cluster._cluster_options``),
    keyword arguments merged over ``config``."""
    from ..flow.cluster import _cluster_options

    if grid is not None and len(grid) != 2:
        raise ConfigError(f"grid must be (xdim, ydim), got {grid!r}")
    cfg = resolve_config(config, {
        "cluster.markers": None if markers is None else list(markers),
        "cluster.som.xdim": None if grid is None else int(grid[0]),
        "cluster.som.ydim": None if grid is None else int(grid[1]),
        "cluster.som.rlen": rlen,
        "cluster.som.alpha": None if alpha is None else [float(a) for a in alpha],
        "cluster.som.radius": None if radius is None else float(radius),
        "cluster.n_metaclusters": n_metaclusters,
        "cluster.consensus_resamples": consensus_resamples,
        "cluster.events_per_sample": events_per_sample,
        "cluster.scale": scale,
        "seed": seed,
    })
    return cfg, _cluster_options(cfg)


def _shared_markers(samples: Mapping[str, Any], markers: Sequence[str]) -> list[str]:
    """The markers every sample has (as ``flow.cluster.shared_markers`` does for files)."""
    lacking: dict[str, list[str]] = {}
    for sample_id, adata in samples.items():
        canonical = (set(adata.var["canonical"].astype(str))
                     if "canonical" in adata.var.columns else set())
        for marker in markers:
            if marker not in canonical:
                lacking.setdefault(marker, []).append(sample_id)
    kept = [m for m in markers if m not in lacking]
    if not kept:
        detail = "; ".join(f"{m}: missing in {', '.join(s)}" for m, s in lacking.items())
        raise InputError(f"cluster.markers: no marker is in every flow sample ({detail}); "
                         "set markers to markers all panels share")
    if lacking:
        log.warning("cluster.markers: clustering on the markers every sample has (%s); "
                    "dropped %s", ", ".join(kept), ", ".join(lacking))
    return kept


def train_som(
    adatas: AnnData | Sequence[AnnData] | Mapping[str, AnnData],
    *,
    markers: Sequence[str] | None = None,
    grid: tuple[int, int] | None = None,
    rlen: int | None = None,
    alpha: tuple[float, float] | None = None,
    radius: float | None = None,
    n_metaclusters: int | None = None,
    consensus_resamples: int | None = None,
    events_per_sample: int | None = None,
    scale: bool | None = None,
    seed: int | None = None,
    device: Literal["auto", "cpu", "gpu"] | None = None,
    config: ConfigLike = None,
    key_added: str = "som",
) -> dict[str, Any]:
    """Fit the cohort self-organising map and its metaclusters (the ``train-flow`` step).

    A seeded subsample of at most ``events_per_sample`` QC-passed events of every sample
    (drawn per sample id, as the workflow draws it) is pooled; a batch SOM
    (``bcellmap.kernels.som``) is trained on the canonical ``markers`` of ``X`` on the GPU
    (CuPy) or the CPU, and its nodes are grouped by consensus hierarchical clustering
    (``bcellmap.kernels.metacluster``).

    Parameters
    ----------
    adatas
        Ingested flow samples (:func:`bcellmap.flow._ingest`): one AnnData, a sequence (named
        by ``uns["sample"]["sample_id"]``) or a mapping ``{sample_id: AnnData}``. The order
        is the pooling order (the workflow's: sample-sheet order).
    markers
        Canonical markers to cluster on. Default: ``cluster.markers``; markers a sample lacks
        are dropped for all (logged).
    grid
        ``(xdim, ydim)`` of the SOM. Default: ``cluster.som.xdim``/``ydim`` (10 x 10).
    rlen
        Batch passes over the training data. Default: ``cluster.som.rlen`` (10).
    alpha
        Batch learning rate at the first and last pass. Default: ``cluster.som.alpha``.
    radius
        Start radius (grid units). Default: ``cluster.som.radius`` (None: FlowSOM's).
    n_metaclusters
        Metaclusters. Default: ``cluster.n_metaclusters`` (20).
    consensus_resamples
        Consensus clustering resamplings. Default: ``cluster.consensus_resamples`` (100).
    events_per_sample
        QC-passed events drawn per sample. Default: ``cluster.events_per_sample`` (5000).
    scale
        Z-score markers by the training mean and SD. Default: ``cluster.scale`` (False).
    seed
        Seed of the subsample, the SOM and the metaclustering. Default: the config's.
    device
        ``auto``, ``cpu`` or ``gpu`` (``BCELLMAP_DEVICE`` overrides it). Default: config.
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.
    key_added
        ``uns`` key the model is stored under in every sample.

    Returns
    -------
    dict
        The model: ``codes`` (nodes x markers), ``node_metacluster``, ``markers``,
        ``center``, ``scale``, ``xdim``, ``ydim`` (the arrays of the workflow's
        ``flow_som.npz``) and ``info`` (parameters, device, training events per sample,
        version). It is also stored in ``adata.uns[key_added]`` of every sample, so that
        :func:`map_som` finds it.

    Raises
    ------
    bcellmap.errors.InputError
        Fewer training events than SOM nodes, a marker missing, NaN values.
    """
    import numpy as np

    from .. import __version__
    from ..contracts import sample_rng, subsample_indices
    from ..flow.cluster import marker_matrix
    from ..kernels.backend import get_backend
    from ..kernels.metacluster import consensus_metaclusters
    from ..kernels.som import train_som as train_som_kernel

    samples = as_mapping(adatas)
    cfg, options = _options(config, markers=markers, grid=grid, rlen=rlen, alpha=alpha,
                            radius=radius, n_metaclusters=n_metaclusters,
                            consensus_resamples=consensus_resamples,
                            events_per_sample=events_per_sample, scale=scale, seed=seed)
    options["markers"] = _shared_markers(samples, options["markers"])
    backend = get_backend(cfg, device=device)
    blocks, provenance = [], []
    for sample_id, adata in samples.items():
        passed = np.flatnonzero(qc_mask(adata))
        n_take = min(passed.size, options["events_per_sample"])
        chosen = passed[subsample_indices(passed.size, n_take,
                                          sample_rng(options["seed"], sample_id))]
        blocks.append(marker_matrix(adata, options["markers"], rows=chosen, sample_id=sample_id))
        provenance.append({"sample_id": sample_id, "events_total": int(adata.n_obs),
                           "events_qc_pass": int(passed.size), "events_used": int(n_take)})
    training = np.concatenate(blocks, axis=0)
    n_nodes = options["xdim"] * options["ydim"]
    if training.shape[0] < n_nodes:
        raise InputError(f"only {training.shape[0]} QC-passed events across {len(blocks)} "
                         f"sample(s), fewer than the {n_nodes} SOM nodes; use a smaller grid "
                         "or more events")
    if not 1 <= options["n_metaclusters"] <= n_nodes:
        raise ConfigError(f"n_metaclusters={options['n_metaclusters']} must be between 1 and "
                          f"the {n_nodes} SOM nodes")
    if options["scale"]:
        center = training.mean(axis=0, dtype=np.float64)
        spread = training.std(axis=0, dtype=np.float64)
        spread[spread == 0] = 1.0
    else:
        center, spread = np.zeros(training.shape[1]), np.ones(training.shape[1])
    scaled = ((training - center) / spread).astype(np.float32)
    codes = train_som_kernel(scaled, backend=backend, seed=options["seed"],
                             xdim=options["xdim"], ydim=options["ydim"], rlen=options["rlen"],
                             alpha=options["alpha"], radius=options["radius"])
    node_metacluster = consensus_metaclusters(codes, n_clusters=options["n_metaclusters"],
                                              seed=options["seed"],
                                              n_resamples=options["consensus_resamples"])
    model: dict[str, Any] = {
        "codes": codes, "node_metacluster": node_metacluster,
        "markers": list(options["markers"]), "center": center, "scale": spread,
        "xdim": int(options["xdim"]), "ydim": int(options["ydim"]),
        "info": h5ad_safe({
            "bcellmap_version": __version__,
            "parameters": {**options, "alpha": list(options["alpha"])},
            "device": backend.device, "device_reason": backend.reason,
            "training_events": int(training.shape[0]), "samples": provenance,
        }),
    }
    params = {"markers": list(options["markers"]), "grid": [options["xdim"], options["ydim"]],
              "rlen": options["rlen"], "alpha": list(options["alpha"]),
              "radius": options["radius"], "n_metaclusters": options["n_metaclusters"],
              "consensus_resamples": options["consensus_resamples"],
              "events_per_sample": options["events_per_sample"], "scale": options["scale"],
              "seed": options["seed"], "device": backend.device, "key_added": key_added}
    for adata in samples.values():
        adata.uns[key_added] = model
        record(adata, "train_som", params)
    log.info("trained a %dx%d SOM with %d metaclusters on %d events from %d samples (%s)",
             options["xdim"], options["ydim"], options["n_metaclusters"], training.shape[0],
             len(provenance), backend.device)
    return model


def _model(adata: AnnData, model: Mapping[str, Any] | str | os.PathLike | None,
           key: str) -> dict[str, Any]:
    import numpy as np

    if model is None:
        if key not in adata.uns:
            raise InputError(f"no model given and no uns[{key!r}]: run bcellmap.tl.train_som "
                             "first, or pass model=")
        model = adata.uns[key]
    if isinstance(model, (str, os.PathLike)):
        from ..flow.cluster import load_model

        return load_model(model)
    missing = [k for k in MODEL_KEYS if k not in model]
    if missing:
        raise InputError(f"not a bcellmap flow SOM model: lacks {', '.join(missing)}")
    out = {k: model[k] for k in MODEL_KEYS}
    out["markers"] = [str(m) for m in np.asarray(out["markers"]).ravel()]
    return out


def map_som(
    adata: AnnData,
    *,
    model: Mapping[str, Any] | str | os.PathLike | None = None,
    key: str = "som",
    device: Literal["auto", "cpu", "gpu"] | None = None,
    config: ConfigLike = None,
    copy: bool = False,
) -> AnnData | None:
    """Assign every QC-passed event to its nearest SOM node (the ``map-flow`` step).

    Parameters
    ----------
    adata
        An ingested flow sample (:func:`bcellmap.flow._ingest`).
    model
        The model :func:`train_som` returned, or a ``flow_som.npz`` the workflow wrote.
        None: ``adata.uns[key]``.
    key
        ``uns`` key of the model when ``model`` is None.
    device
        ``auto``, ``cpu`` or ``gpu`` (``BCELLMAP_DEVICE`` overrides it). Default: config.
    config
        A bcellmap config (mapping or YAML file) merged over the package defaults.
    copy
        Return a copy instead of changing ``adata``.

    Returns
    -------
    anndata.AnnData or None
        The copy when ``copy`` is True, else None. ``obs["som_node"]`` and
        ``obs["metacluster"]`` (int64; -1 for events that failed QC, which the workflow's
        mapped h5ad leaves out).

    Raises
    ------
    bcellmap.errors.InputError
        A model marker missing from the sample, or NaN values.
    """
    import numpy as np

    from ..flow.cluster import map_sample
    from ..kernels.backend import get_backend

    adata = adata.copy() if copy else adata
    cfg = resolve_config(config)
    fitted = _model(adata, model, key)
    backend = get_backend(cfg, device=device)
    mask = qc_mask(adata)
    mapped = map_sample(adata, fitted, backend=backend)
    som_node = np.full(adata.n_obs, -1, dtype=np.int64)
    metacluster = np.full(adata.n_obs, -1, dtype=np.int64)
    som_node[mask] = mapped.obs["som_node"].to_numpy()
    metacluster[mask] = mapped.obs["metacluster"].to_numpy()
    adata.obs["som_node"] = som_node
    adata.obs["metacluster"] = metacluster
    record(adata, "map_som", {"model": str(model) if isinstance(model, (str, os.PathLike))
                              else f"uns[{key!r}]" if model is None else "given",
                              "markers": fitted["markers"], "device": backend.device})
    return adata if copy else None
