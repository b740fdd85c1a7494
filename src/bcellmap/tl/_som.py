"""``train_som`` and ``map_som``: the cohort SOM of the workflow's ``train-flow`` and
``map-flow`` steps, on AnnData objects in memory."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Literal

from .._apiutils import ConfigLike, as_mapping, h5ad_safe, qc_mask, record, resolve_config
from ..errors import ConfigError, InputError

if TYPE_CHECKING:
    from anndata import AnnData

#: Arrays of a flow SOM model (the keys of ``results/models/flow_som.npz``).
MODEL_KEYS = ("codes", "node_metacluster", "markers", "center", "scale", "xdim", "ydim")


def _options(config: ConfigLike, *, markers: Sequence[str] | None,
             grid: tuple[int, int] | None, rlen: int | None,
             alpha: tuple[float, float] | None, radius: float | None,
             n_metaclusters: int | None, consensus_resamples: int | None,
             events_per_sample: int | None, scale: bool | None,
             seed: int | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """The config and the workflow's clustering options (``flow.cluster.cluster_options``),
    keyword arguments merged over ``config``."""
    from ..flow.cluster import cluster_options

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
    return cfg, cluster_options(cfg)


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
    (drawn per sample id, as the workflow draws it; fewer each when ``cluster.train_events``
    would be exceeded) is pooled; a batch SOM (``bcellmap.kernels.som``) is trained on the
    canonical ``markers`` of ``X`` on the GPU (CuPy) or the CPU, and its nodes are grouped by
    consensus hierarchical clustering (``bcellmap.kernels.metacluster``). The training is
    the workflow's own (``bcellmap.flow.cluster.train_flow_model``).

    Parameters
    ----------
    adatas
        Ingested flow samples (:func:`bcellmap.flow.ingest`, with ``obs["qc_pass"]``): one
        AnnData, a sequence (named by ``uns["sample"]["sample_id"]``) or a mapping
        ``{sample_id: AnnData}``. The order is the pooling order (the workflow's: sample-sheet
        order).
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
    from ..flow.cluster import train_flow_model
    from ..kernels.backend import get_backend

    samples = as_mapping(adatas)
    cfg, options = _options(config, markers=markers, grid=grid, rlen=rlen, alpha=alpha,
                            radius=radius, n_metaclusters=n_metaclusters,
                            consensus_resamples=consensus_resamples,
                            events_per_sample=events_per_sample, scale=scale, seed=seed)
    backend = get_backend(cfg, device=device)
    canonical = {s: (set(a.var["canonical"].astype(str)) if "canonical" in a.var.columns
                     else set()) for s, a in samples.items()}
    fitted, info = train_flow_model(((s, a, None) for s, a in samples.items()),
                                    n_samples=len(samples), canonical=canonical, config=cfg,
                                    backend=backend)
    model: dict[str, Any] = {**fitted, "info": h5ad_safe(info)}
    options = {**options, "markers": list(fitted["markers"])}
    params = {"markers": list(options["markers"]), "grid": [options["xdim"], options["ydim"]],
              "rlen": options["rlen"], "alpha": list(options["alpha"]),
              "radius": options["radius"], "n_metaclusters": options["n_metaclusters"],
              "consensus_resamples": options["consensus_resamples"],
              "events_per_sample": options["events_per_sample"], "scale": options["scale"],
              "seed": options["seed"], "device": backend.device, "key_added": key_added}
    for adata in samples.values():
        adata.uns[key_added] = model
        record(adata, "train_som", params)
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
