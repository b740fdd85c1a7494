"""Ingest of one single-cell RNA sample: read, CITE-seq protein, QC, normalise -> h5ad.

Output AnnData (``results/scrna/{sample_id}.h5ad``), the scRNA counterpart of the flow AnnData:

- one row per cell (droplet barcode) of the source, in source order, QC failures included;
  ``obs["event_index"]`` is its row in the source;
- ``layers["counts"]``: raw UMI counts (float32 CSR); ``X``: ``log1p`` of counts normalised to
  ``scrna.normalise.target_sum`` per cell (scanpy); ``var["highly_variable"]`` from scanpy's
  ``seurat`` flavour on the QC-passed cells; ``var["mito"]``;
- QC columns as flow: ``qc_min_counts``, ``qc_min_genes``, ``qc_mito``, ``qc_doublet`` (True =
  removed by that step), ``qc_pass``, ``qc_reason`` (first failing step or ``pass``), plus
  ``n_counts``, ``n_genes``, ``pct_mito`` and ``doublet_score`` (NaN where scrublet did not run);
- CITE-seq: ``obsm["protein"]`` (CLR-normalised antibody counts of the configured markers found),
  ``obsm["protein_counts"]`` (raw), ``uns["protein_names"]`` (configured marker names, column
  order), ``uns["protein_features"]`` (the source ADT name of each column) and
  ``uns["protein_panel"]`` (where the ADTs came from, what matched, ``flag``; see below);
- ``uns["sample"]``, ``uns["source"]``, ``uns["qc"]``.

QC steps are sequential for counting (``min_counts``, ``min_genes``, ``mito``, ``doublets``):
scrublet (``scanpy.pp.scrublet``, exact sklearn neighbours, seeded) runs on the cells that
passed the first three steps. The QC table has the flow columns.

Input must hold raw counts (``X`` or ``layers["counts"]`` of an .h5ad); log-normalised input
is refused unless ``scrna.input_normalised`` is true, in which case ``X`` is kept as given,
``layers["counts"]`` is absent and the count-based steps (``min_counts``, doublets) are skipped.

CITE-seq antibody-derived tags (ADTs) are read from, in order:

1. features of ``var`` whose ``feature_types`` is ``Antibody Capture`` (Cell Ranger; also
   ``ADT``, ``Antibody``, ``Protein``), or, in an ``.h5ad`` without ``feature_types``, features
   named ``ADT_<name>``;
2. otherwise an ``obsm`` entry, as scvi-tools/totalVI keep them: ``scrna.protein.obsm_key``, or
   the first of ``protein_expression``, ``protein_counts``, ``adt_counts``, ``adt``,
   ``protein``, ``proteins``, ``prot`` (any case) holding raw counts. A DataFrame gives the ADT
   names in its columns; an array takes them from ``uns[scrna.protein.names_key]``, or
   ``uns["<key>_names"]``, ``uns["protein_names"]``, ``uns["adt_names"]``,
   ``uns["_scvi"]["protein_names"]``. An entry with non-count values, no names, names that do
   not fit its columns, or rows that are not the file's cells (count or barcodes) is refused
   with an :class:`InputError` naming the file and the sample, never ignored.

ADT names are matched to ``scrna.protein.markers`` with the flow panel's marker resolution
(:func:`bcellmap.io.panel.canonical_name`) after ``.``, ``|`` and ``+`` are read as separators,
and for a BD AbSeq name (``CD19:HIB19|CD19|AHS0030|pAbO``) the antigen before ``:`` first:
``CD19(HIB19)``, ``CD19-TotalSeqB``, ``ADT_CD19``, ``Hu.CD19`` and ``anti-human CD19`` are all
CD19, and CD27 is never CD274. A marker with no CD/Ig form (``HLA-DR``) is matched whole between
separators. A sample whose ADTs match none of the markers is logged as a warning and flagged
(``uns["protein_panel"]["flag"] == "protein_no_marker_match"``); with
``scrna.protein.required: true`` that, or a sample without ADTs, is an error.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..contracts import SCRNA_QC_STEPS as QC_STEPS
from ..contracts import qc_reason
from ..errors import ConfigError, InputError
from ..io.panel import canonical_name

log = logging.getLogger(__name__)

_QC_COLUMN = {"min_counts": "qc_min_counts", "min_genes": "qc_min_genes", "mito": "qc_mito",
              "doublets": "qc_doublet"}


def _is_integer_valued(matrix: Any) -> bool:
    values = matrix.data if sp.issparse(matrix) else np.asarray(matrix)
    if values.size == 0:
        return True
    sample = values[: 1_000_000]
    return bool(np.all(sample >= 0) and np.all(np.equal(np.mod(sample, 1), 0)))


def read_scrna(path: str | Path, *, sample_id: str | None = None,
               input_normalised: bool = False):
    """Read a 10x .h5, a 10x matrix folder or an .h5ad into an AnnData of raw counts.

    Parameters
    ----------
    path
        Cell Ranger ``.h5``, a folder with ``matrix.mtx(.gz)``, ``barcodes``, ``features``
        (or ``genes``), or an ``.h5ad`` with counts in ``layers["counts"]`` or ``X``.
    sample_id
        For error messages.
    input_normalised
        Accept a log-normalised ``.h5ad`` (``X`` kept as is, ``uns["input_normalised"]``).

    Returns
    -------
    AnnData with float32 CSR ``X`` (counts, or the normalised values when accepted) and
    ``var["feature_types"]`` (``Gene Expression`` where the file does not say).

    Raises
    ------
    InputError
        Unreadable or unknown format, no cells or features, or non-count values.
    """
    import anndata as ad
    import scanpy as sc

    path = Path(path)
    try:
        if path.is_dir():
            adata = sc.read_10x_mtx(path, var_names="gene_symbols", gex_only=False)
        elif path.suffix == ".h5":
            adata = sc.read_10x_h5(path, gex_only=False)
        elif path.suffix == ".h5ad":
            _check_h5ad_obsm_rows(path, sample_id=sample_id)
            adata = ad.read_h5ad(path)
            if "counts" in adata.layers:
                adata.X = adata.layers["counts"]
            adata.layers.clear()
        else:
            raise InputError("unknown scRNA format: expected a 10x .h5, a 10x matrix folder or "
                             "an .h5ad", path=path, sample_id=sample_id)
    except InputError:
        raise
    except Exception as exc:  # noqa: BLE001 - readers raise many types; report them as input
        raise InputError(f"cannot be read as scRNA counts ({type(exc).__name__}: {exc})",
                         path=path, sample_id=sample_id) from exc
    if adata.n_vars == 0:
        raise InputError("no features (genes) in the file", path=path, sample_id=sample_id)
    if adata.X is None:
        raise InputError("no count matrix (X is empty and there is no layers['counts'])",
                         path=path, sample_id=sample_id)
    adata.var_names_make_unique()
    if "feature_types" not in adata.var:
        # An .h5ad without feature types: ADT_<name> features are antibody capture.
        is_adt = adata.var_names.str.match(_ADT_PREFIX)
        adata.var["feature_types"] = np.where(is_adt, "Antibody Capture", "Gene Expression")
        if is_adt.any():
            log.info("sample %s: %d features named ADT_<name> read as antibody capture",
                     sample_id, int(is_adt.sum()))
    adata.X = sp.csr_matrix(adata.X, dtype=np.float32)
    adata.X.eliminate_zeros()  # stored zeros would count as detected genes
    adata.uns["input_normalised"] = False
    if not _is_integer_valued(adata.X):
        if not input_normalised:
            raise InputError(
                "values are not integer counts (looks log-normalised); give raw counts in X or "
                "layers['counts'], or set scrna.input_normalised: true to accept it",
                path=path, sample_id=sample_id)
        adata.uns["input_normalised"] = True
    elif input_normalised and adata.n_obs and adata.X.max() > 50:
        raise InputError("scrna.input_normalised is true but the values are integer counts "
                         f"up to {adata.X.max():.0f}; set it to false",
                         path=path, sample_id=sample_id)
    return adata


def clr_normalise(counts: np.ndarray, *, margin: str = "cell") -> np.ndarray:
    """Centred log-ratio of antibody counts as Seurat ``NormalizeData(method="CLR")``.

    ``log1p(x / exp(mean(log1p(x[x > 0]))))`` where the mean is taken within each cell
    (``margin="cell"``, Seurat margin=2, the usual choice for ADTs) or within each feature
    across cells (``margin="feature"``, Seurat margin=1); as in Seurat, the sum of ``log1p``
    over positive values is divided by the length of the whole vector.
    """
    counts = np.asarray(counts, dtype=np.float64)
    axis = 1 if margin == "cell" else 0
    if margin not in ("cell", "feature"):
        raise ValueError(f"margin must be 'cell' or 'feature', not {margin!r}")
    logs = np.log1p(np.where(counts > 0, counts, 0.0))
    geometric = np.exp(logs.sum(axis=axis, keepdims=True) / max(counts.shape[axis], 1))
    return np.log1p(counts / geometric).astype(np.float32)


#: ``var["feature_types"]`` values that mean antibody capture (compared in lower case).
ADT_FEATURE_TYPES = ("antibody capture", "adt", "antibody", "protein", "protein expression")
#: ``obsm`` keys searched for proteins when ``scrna.protein.obsm_key`` is not set (any case).
PROTEIN_OBSM_KEYS = ("protein_expression", "protein_counts", "adt_counts", "adt", "protein",
                     "proteins", "prot")
NO_MARKER_MATCH = "protein_no_marker_match"
_ADT_PREFIX = r"(?i)^ADT[_.:\-]"
# Separators of an ADT name besides those of panel.canonical_name: "Hu.CD19", AbSeq "|".
_ADT_SEPARATORS = re.compile(r"[.|+]+")
_SEPARATOR = r"[\s._\-|:()/,;+]"


def _name_candidates(name: str) -> list[str]:
    """Labels to try for one ADT name, most specific first.

    BD AbSeq ``CD19:HIB19|CD19|AHS0030|pAbO`` gives ``CD19`` (antigen before the clone) before
    the whole name, whose gene field (``CD3E``) could make it ambiguous.
    """
    text = str(name).strip()
    first = text.split("|", 1)[0]
    candidates = [first.split(":", 1)[0], first, text]
    return list(dict.fromkeys(c for c in candidates if c.strip()))


def adt_canonical(name: str) -> str:
    """The canonical marker (``CD19``, ``IgD``, ...) an ADT name denotes, or "".

    Uses :func:`bcellmap.io.panel.canonical_name`, the flow panel's resolution, on the name with
    ``.``, ``|`` and ``+`` read as separators.
    """
    for candidate in _name_candidates(name):
        found = canonical_name(_ADT_SEPARATORS.sub(" ", candidate))
        if found:
            return found
    return ""


def match_protein_markers(adt_names: list[str], markers: list[str]
                          ) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Match ADT names to configured protein markers.

    Parameters
    ----------
    adt_names
        ADT feature names as the file has them.
    markers
        ``scrna.protein.markers``.

    Returns
    -------
    ({marker: index of its ADT}, {marker: every ADT name that matched, when several did}).
    A marker with a CD/Ig form matches an ADT of the same canonical name; any other marker
    (``HLA-DR``) matches an ADT name that holds it whole between separators (any case).
    The first matching ADT is used.
    """
    canonicals = [adt_canonical(name) for name in adt_names]
    matched: dict[str, int] = {}
    several: dict[str, list[str]] = {}
    for marker in markers:
        wanted = canonical_name(str(marker))
        if wanted:
            hits = [i for i, c in enumerate(canonicals) if c == wanted]
        else:
            pattern = re.compile(rf"(^|{_SEPARATOR}){re.escape(str(marker))}({_SEPARATOR}|$)",
                                 re.IGNORECASE)
            hits = [i for i, name in enumerate(adt_names) if pattern.search(str(name))]
        if hits:
            matched[str(marker)] = hits[0]
            if len(hits) > 1:
                several[str(marker)] = [str(adt_names[i]) for i in hits]
    return matched, several


def _h5_rows(node) -> tuple[int | None, np.ndarray | None]:
    """(rows, row names or None) of an on-disk AnnData element, without reading its values."""
    import h5py

    if isinstance(node, h5py.Dataset):
        return (int(node.shape[0]) if node.shape else None), None
    encoding = node.attrs.get("encoding-type", "")
    if isinstance(encoding, bytes):
        encoding = encoding.decode()
    if encoding == "dataframe":
        index = node[node.attrs.get("_index", "_index")]
        if isinstance(index, h5py.Group):  # categorical or nullable index: count only
            return _h5_rows(index.get("codes", index.get("values")))[0], None
        names = index.asstr()[:] if index.dtype.kind in "OS" else index[:]
        return len(names), np.asarray(names, dtype=object)
    if "shape" in node.attrs:
        return int(node.attrs["shape"][0]), None
    return None, None


def _check_h5ad_obsm_rows(path: Path, *, sample_id: str | None) -> None:
    """Refuse an .h5ad whose ``obsm`` entries are not one row per cell, before anndata reads it.

    anndata refuses such a file with a shape error that names neither a remedy nor the
    protein matrix; a protein matrix from another object (other cells, other order) must not
    be attached to these cells.
    """
    try:
        import h5py

        with h5py.File(path, "r") as handle:
            if "obsm" not in handle or "obs" not in handle:
                return
            n_cells, cells = _h5_rows(handle["obs"])
            if n_cells is None:
                return
            problems = []
            for key in handle["obsm"]:
                rows, names = _h5_rows(handle["obsm"][key])
                what = ("the protein (ADT) matrix " if key.lower() in PROTEIN_OBSM_KEYS
                        else "")
                if rows is not None and rows != n_cells:
                    problems.append(f"{what}obsm[{key!r}] has {rows} rows but the file has "
                                    f"{n_cells} cells")
                elif names is not None and cells is not None and \
                        not np.array_equal(names, cells):
                    order = ("the same barcodes in another order"
                             if set(names) == set(cells) else "other barcodes")
                    problems.append(f"{what}obsm[{key!r}] rows are {order} than the cells (obs)")
    except OSError:
        return  # not HDF5: anndata's own error is reported by read_scrna
    if problems:
        raise InputError("; ".join(problems) + ": its rows must be the file's cells, in obs "
                         "order (subset or reorder it with the cells, e.g. "
                         "adata.obsm[key] = protein.loc[adata.obs_names])",
                         path=path, sample_id=sample_id)


def _protein_settings(config: dict[str, Any]) -> dict[str, Any]:
    settings = {"markers": [], "clr_margin": "cell", "required": False, "obsm_key": None,
                "names_key": None}
    settings.update(config["scrna"].get("protein") or {})
    return settings


def _obsm_protein_names(adata, key: str, n_columns: int, names_key: str | None,
                        *, path: object, sample_id: str) -> list[str]:
    """ADT names of an array in ``obsm[key]``, from ``uns``."""
    if names_key is not None:
        candidates = [(f"uns[{names_key!r}]", adata.uns.get(names_key))]
    else:
        scvi = adata.uns.get("_scvi")
        candidates = [(f"uns[{k!r}]", adata.uns.get(k))
                      for k in (f"{key}_names", "protein_names", "adt_names")]
        candidates.append(("uns['_scvi']['protein_names']",
                           scvi.get("protein_names") if isinstance(scvi, dict) else None))
    for where, value in candidates:
        if value is None:
            continue
        names = [str(v) for v in np.asarray(value, dtype=object).ravel()]
        if len(names) != n_columns:
            raise InputError(f"obsm[{key!r}] has {n_columns} protein columns but {where} "
                             f"names {len(names)}; give one name per column (or store "
                             "obsm[key] as a DataFrame with the names as columns)",
                             path=path, sample_id=sample_id)
        return names
    looked = (f"uns[{names_key!r}]" if names_key is not None else
              ", ".join(where for where, _ in candidates))
    raise InputError(f"obsm[{key!r}] holds {n_columns} proteins but no names ({looked} absent):"
                     " store it as a DataFrame with the ADT names as columns, put the names in "
                     "uns['protein_names'], or set scrna.protein.names_key",
                     path=path, sample_id=sample_id)


def _obsm_values(adata, key: str, *, path: object, sample_id: str, names_key: str | None
                 ) -> tuple[np.ndarray | None, list[str], str]:
    """(values, ADT names, why refused or "") of one ``obsm`` entry."""
    value = adata.obsm[key]
    if isinstance(value, pd.DataFrame):
        if not value.index.equals(adata.obs_names):
            raise InputError(f"the protein (ADT) matrix obsm[{key!r}] rows are not the file's "
                             "cells (obs_names); reorder it with the cells",
                             path=path, sample_id=sample_id)
        names = [str(c) for c in value.columns]
        try:
            values = value.to_numpy(dtype=np.float64)
        except (TypeError, ValueError):
            return None, names, "has non-numeric columns"
    else:
        values = value.toarray() if sp.issparse(value) else np.asarray(value)
        if values.ndim != 2:
            return None, [], f"is not a cells x proteins matrix (shape {values.shape})"
        if values.shape[0] != adata.n_obs:
            raise InputError(f"the protein (ADT) matrix obsm[{key!r}] has {values.shape[0]} "
                             f"rows but the file has {adata.n_obs} cells",
                             path=path, sample_id=sample_id)
        try:
            values = values.astype(np.float64)
        except (TypeError, ValueError):
            return None, [], "is not numeric"
        names = _obsm_protein_names(adata, key, values.shape[1], names_key, path=path,
                                    sample_id=sample_id)
    if values.size and not (np.all(np.isfinite(values)) and _is_integer_valued(values)):
        return None, names, ("holds values that are not integer counts (normalised, e.g. CLR "
                             "or totalVI denoised)")
    return values, names, ""


def _protein_from_obsm(adata, settings: dict[str, Any], *, path: object, sample_id: str
                       ) -> tuple[np.ndarray | None, list[str], str]:
    """Raw ADT counts, names and source (``obsm['key']``) from ``obsm``; (None, [], "")."""
    configured = settings.get("obsm_key")
    names_key = settings.get("names_key")
    if configured is not None:
        if configured not in adata.obsm:
            raise InputError(f"scrna.protein.obsm_key is {configured!r}, which this file does "
                             f"not have (obsm keys: {', '.join(adata.obsm) or 'none'})",
                             path=path, sample_id=sample_id)
        keys = [configured]
    else:
        by_lower = {str(k).lower(): str(k) for k in adata.obsm}
        keys = [by_lower[k] for k in PROTEIN_OBSM_KEYS if k in by_lower]
    refused = []
    for key in keys:
        values, names, why = _obsm_values(adata, key, path=path, sample_id=sample_id,
                                          names_key=names_key)
        if values is not None:
            for other in keys:
                if other != key:
                    log.info("sample %s: proteins read from obsm[%r]; obsm[%r] not used",
                             sample_id, key, other)
            return values, names, f"obsm[{key!r}]"
        refused.append(f"obsm[{key!r}] {why}")
    if refused:
        raise InputError("protein (ADT) data found but not usable: " + "; ".join(refused) +
                         ". Give raw antibody counts (as scvi-tools keeps them in "
                         "obsm['protein_expression']), or remove the entry to ingest RNA only",
                         path=path, sample_id=sample_id)
    return None, [], ""


def _split_protein(adata, *, config: dict[str, Any], sample_id: str, path: object = None
                   ) -> tuple[np.ndarray, list[str]]:
    """Take the ADTs out of ``adata`` (``var`` or ``obsm``) -> (CLR values, marker names).

    Also sets ``obsm["protein_counts"]`` (raw counts of the matched markers),
    ``uns["protein_features"]`` and ``uns["protein_panel"]``; see the module docstring.
    """
    settings = _protein_settings(config)
    markers = [str(m) for m in settings["markers"]]
    types = adata.var["feature_types"].astype(str).str.strip().str.lower()
    is_adt = types.isin(ADT_FEATURE_TYPES).to_numpy()
    obsm_keys = {str(k).lower(): str(k) for k in adata.obsm}
    protein_keys = [obsm_keys[k] for k in PROTEIN_OBSM_KEYS if k in obsm_keys]
    if settings.get("obsm_key") is not None and settings["obsm_key"] not in protein_keys:
        protein_keys.append(str(settings["obsm_key"]))
    if is_adt.any():
        adt_names = [str(n) for n in adata.var_names[is_adt]]
        adt_counts = adata.X[:, is_adt].toarray()
        source = "var (feature_types 'Antibody Capture')"
        adata._inplace_subset_var(~is_adt)
        if protein_keys:
            log.warning("sample %s: proteins read from var (Antibody Capture features); "
                        "%s not used", sample_id, ", ".join(f"obsm[{k!r}]" for k in protein_keys))
    else:
        values, adt_names, source = _protein_from_obsm(adata, settings, path=path,
                                                       sample_id=sample_id)
        adt_counts = np.zeros((adata.n_obs, 0)) if values is None else values
    for key in protein_keys:  # stale input entries must not pass for this module's output
        adata.obsm.pop(key, None)

    panel: dict[str, Any] = {"source": source or "none", "adts": len(adt_names),
                             "required": bool(settings.get("required")), "flag": ""}
    if not adt_names:
        if settings.get("required"):
            raise InputError("scrna.protein.required is true but the file has no CITE-seq "
                             "antibody data (no 'Antibody Capture' features in var, no protein "
                             f"matrix in obsm: {', '.join(PROTEIN_OBSM_KEYS)})",
                             path=path, sample_id=sample_id)
        panel["matched"] = panel["markers_missing"] = panel["adts_unmatched"] = ""
        adata.uns["protein_panel"] = panel
        return np.zeros((adata.n_obs, 0), dtype=np.float32), []

    matched, several = match_protein_markers(adt_names, markers)
    for marker, hits in several.items():
        log.warning("sample %s: protein %s matches several ADTs (%s); using %r", sample_id,
                    marker, ", ".join(hits), hits[0])
    names = list(matched)
    keep = [matched[m] for m in names]
    used = set(keep)
    panel["matched"] = ";".join(f"{m}={adt_names[i]}" for m, i in matched.items())
    panel["markers_missing"] = ";".join(m for m in markers if m not in matched)
    panel["adts_unmatched"] = ";".join(n for i, n in enumerate(adt_names) if i not in used)
    if not matched:
        panel["flag"] = NO_MARKER_MATCH
        message = (f"none of the {len(adt_names)} ADTs ({', '.join(adt_names[:20])}"
                   f"{', ...' if len(adt_names) > 20 else ''}) from {source} matches "
                   f"scrna.protein.markers ({', '.join(markers) or 'none'}); name the ADTs "
                   "after the markers (CD19, CD19_TotalSeqB, CD19:HIB19|CD19|AHS0030|pAbO) or "
                   "change scrna.protein.markers")
        if settings.get("required"):
            raise InputError(f"scrna.protein.required is true but {message}", path=path,
                             sample_id=sample_id)
        log.warning("sample %s: %s; protein is not used for this sample", sample_id, message)
    elif panel["markers_missing"]:
        log.warning("sample %s: protein markers not among the ADTs: %s", sample_id,
                    panel["markers_missing"].replace(";", ", "))
    if matched:
        log.info("sample %s: protein from %s: %s", sample_id, source,
                 panel["matched"].replace(";", ", "))
    adata.uns["protein_panel"] = panel
    clr = clr_normalise(adt_counts, margin=settings["clr_margin"])
    adata.obsm["protein_counts"] = adt_counts[:, keep].astype(np.float32)
    if keep:
        adata.uns["protein_features"] = [adt_names[i] for i in keep]
    return clr[:, keep], names


def _scrublet_scores(counts: sp.csr_matrix, *, config: dict[str, Any], seed: int
                     ) -> tuple[np.ndarray, np.ndarray, float | None]:
    """Doublet scores and calls of scanpy's scrublet with exact (sklearn) neighbours.

    pynndescent 0.7 breaks with scipy 1.17 from 8,192 cells (``csr_array.getnnz``), and
    scrublet's manifold holds observed plus simulated cells, so the exact path is forced.
    """
    import anndata as ad
    import scanpy as sc

    settings = config["scrna"]["qc"]["doublets"]
    if settings["threshold"] is None:
        try:
            import skimage  # noqa: F401 - scrublet's automatic threshold needs it
        except ImportError:
            raise ConfigError("scrna.qc.doublets.threshold is null (automatic), which needs "
                              "scikit-image; install it or set a threshold such as 0.25"
                              ) from None
    tmp = ad.AnnData(X=counts.copy())
    sc.pp.scrublet(tmp, expected_doublet_rate=float(settings["expected_rate"]),
                   threshold=settings["threshold"], random_state=seed,
                   use_approx_neighbors=False, verbose=False)
    scores = tmp.obs["doublet_score"].to_numpy(dtype=float)
    threshold = tmp.uns["scrublet"].get("threshold")
    if threshold is None or not np.isfinite(threshold):
        log.warning("scrublet found no doublet-score threshold; no cell removed as doublet")
        return scores, np.zeros(len(scores), dtype=bool), None
    return scores, scores > threshold, float(threshold)


def run_qc(adata, *, config: dict[str, Any], sample_id: str) -> pd.DataFrame:
    """Flag cells that fail QC in ``adata.obs`` and return the per-sample QC table.

    Parameters
    ----------
    adata
        Raw counts in ``X`` (or normalised values when ``uns["input_normalised"]``).
    config
        Merged config (``scrna.qc``, ``scrna.mito_prefix``, ``seed``).
    sample_id
        Written into the QC table.
    """
    qc = config["scrna"]["qc"]
    normalised_input = bool(adata.uns.get("input_normalised", False))
    mito = adata.var_names.str.startswith(config["scrna"]["mito_prefix"])
    adata.var["mito"] = mito
    X = adata.X
    n_counts = np.asarray(X.sum(axis=1)).ravel()
    n_genes = np.diff(X.indptr)  # X is CSR without stored zeros (read_scrna)
    mito_counts = np.asarray(X[:, mito].sum(axis=1)).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        pct_mito = np.where(n_counts > 0, 100.0 * mito_counts / n_counts, 0.0)
    adata.obs["n_counts"] = n_counts.astype(np.float32)
    adata.obs["n_genes"] = n_genes.astype(np.int32)
    adata.obs["pct_mito"] = pct_mito.astype(np.float32)
    adata.obs["doublet_score"] = np.nan

    alive = np.ones(adata.n_obs, dtype=bool)
    rows = []
    learned: dict[str, Any] = {}
    for step in QC_STEPS:
        failed = np.zeros(adata.n_obs, dtype=bool)
        detail = ""
        if step == "min_counts":
            if normalised_input:
                detail = "skipped: input is normalised"
            else:
                failed = n_counts < qc["min_counts"]
                detail = f"n_counts < {qc['min_counts']}"
        elif step == "min_genes":
            failed = n_genes < qc["min_genes"]
            detail = f"n_genes < {qc['min_genes']}"
        elif step == "mito":
            if normalised_input or not mito.any():
                detail = ("skipped: input is normalised" if normalised_input else
                          f"skipped: no gene starts with {config['scrna']['mito_prefix']!r}")
            else:
                failed = pct_mito > qc["max_mito_pct"]
                detail = f"pct_mito > {qc['max_mito_pct']}"
        elif step == "doublets":
            settings = qc["doublets"]
            if not settings["enabled"]:
                detail = "skipped: disabled"
            elif normalised_input:
                detail = "skipped: input is normalised"
            elif alive.sum() < settings["min_cells"]:
                detail = f"skipped: {int(alive.sum())} cells < min_cells {settings['min_cells']}"
            else:
                scores, calls, threshold = _scrublet_scores(
                    X[alive], config=config, seed=int(config["seed"]))
                adata.obs.loc[alive, "doublet_score"] = scores
                failed[alive] = calls
                learned["doublet_threshold"] = threshold
                detail = (f"scrublet score > {threshold:.3f}" if threshold is not None
                          else "scrublet: no threshold found, none removed")
        adata.obs[_QC_COLUMN[step]] = failed
        removed = int((failed & alive).sum())
        rows.append({"sample_id": sample_id, "step": step, "events_in": int(alive.sum()),
                     "events_removed": removed, "events_out": int(alive.sum()) - removed,
                     "detail": detail})
        alive &= ~failed
    adata.obs["qc_pass"] = alive
    adata.obs["qc_reason"] = qc_reason(
        {step: adata.obs[_QC_COLUMN[step]].to_numpy() for step in QC_STEPS}, QC_STEPS)
    adata.uns["qc"] = {"min_counts": qc["min_counts"], "min_genes": qc["min_genes"],
                       "max_mito_pct": qc["max_mito_pct"],
                       "doublets": {k: v for k, v in qc["doublets"].items() if v is not None},
                       **{k: v for k, v in learned.items() if v is not None}}
    return pd.DataFrame(rows, columns=["sample_id", "step", "events_in", "events_removed",
                                       "events_out", "detail"])


def ingest_scrna(path: str | Path, *, config: dict[str, Any], sample: dict[str, Any]):
    """Read, QC and normalise one scRNA sample.

    Parameters
    ----------
    path
        The sample's file or folder (see :func:`read_scrna`).
    config
        Merged config.
    sample
        Sample-sheet fields: sample_id, patient_id, day, modality, panel.

    Returns
    -------
    (AnnData, QC table) as described in the module docstring.
    """
    import scanpy as sc

    sample_id = str(sample["sample_id"])
    scfg = config["scrna"]
    adata = read_scrna(path, sample_id=sample_id, input_normalised=bool(scfg["input_normalised"]))
    protein, protein_names = _split_protein(adata, config=config, sample_id=sample_id,
                                            path=path)
    n_source = adata.n_obs
    adata.obs["event_index"] = np.arange(n_source, dtype=np.int64)
    qc_table = run_qc(adata, config=config, sample_id=sample_id)

    if not adata.uns["input_normalised"]:
        adata.layers["counts"] = adata.X.copy()
        sc.pp.normalize_total(adata, target_sum=float(scfg["normalise"]["target_sum"]))
        sc.pp.log1p(adata)
        adata.uns.pop("log1p", None)
    adata.var["highly_variable"] = False
    passed = adata.obs["qc_pass"].to_numpy()
    if passed.sum() >= 3:
        view = adata[passed].copy()
        sc.pp.highly_variable_genes(view, flavor="seurat",
                                    n_top_genes=min(int(scfg["hvg"]["n_top_genes"]),
                                                    adata.n_vars))
        adata.var["highly_variable"] = view.var["highly_variable"].to_numpy()
        adata.var["dispersions_norm"] = view.var["dispersions_norm"].to_numpy(dtype=np.float32)
    if protein_names:
        adata.obsm["protein"] = protein
        adata.uns["protein_names"] = protein_names
        adata.uns["protein_clr_margin"] = scfg["protein"]["clr_margin"]
    adata.uns["sample"] = {k: ("" if v is None else v) for k, v in sample.items()}
    adata.uns["source"] = {"path": str(path), "cells": int(n_source),
                           "features": int(adata.n_vars)}
    return adata, qc_table
