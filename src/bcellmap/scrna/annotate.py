"""Annotation of one scRNA sample: cell types, B-cell subsets, CAR-T cells, counts table.

Per cell, ``scanpy.tl.score_genes`` (seeded) scores every marker set of
``scrna.annotate.markers`` (B, plasmablast, T, NK, monocyte, DC: B cells are called against real
alternatives); the per-cell call (``obs["cell_type_cell"]``) is the best-scoring population, or
``unassigned`` when no score is above ``scrna.annotate.min_score``. Plasmablasts are B-lineage:
their ``cell_type`` is ``B`` and their ``b_subset`` ``plasmablast``. The cluster call
(``obs["cluster_cell_type"]``) is the majority of the per-cell calls in the cell's Leiden cluster
(``obs["leiden"]`` from ``map-scrna``); ``obs["cell_type"]`` is the cluster call
(``scrna.annotate.call: cluster``, robust to marker dropout) or the per-cell call (``cell``).

B-cell subsets (``obs["b_subset"]``, empty for non-B), per cell:

- RNA only: plasmablast when the plasmablast score beats the pan-B score; otherwise naive or
  memory by the higher of the naive and memory scores, memory split into switched (IGHG/IGHA
  expression above IGHM/IGHD) and unswitched. Transitional (needs CD24/CD38 protein) and
  double negative (needs IgD/CD27 protein) are not resolvable from RNA and are listed in
  ``subsets_not_called``.
- CITE-seq (``obsm["protein"]``): protein takes precedence for the subset markers:
  transitional CD24hi CD38hi, then the IgD/CD27 quadrants (naive IgD+CD27-, unswitched memory
  IgD+CD27+, switched memory IgD-CD27+, double negative IgD-CD27-); plasmablasts stay the RNA
  call.

Protein gates (CLR thresholds) follow the flow rules (:mod:`bcellmap.flow.thresholds`): they are
learned once for the cohort by ``train-scrna`` (:func:`learn_protein_thresholds`, written to
``results/models/scrna_protein_thresholds.tsv``) on a pool made of an equal-sized seeded
subsample (``scrna.protein.cells_per_sample``) of the QC-passed cells of every sample with
protein, and the same values are applied to every sample. A gate placed on one sample would
invent positives: an aplastic visit has no CD19+ peak, and a two-population model of that
visit alone splits its negative peak. Each gate is learned inside its parent population, as
the HIPC Lyoplate B-cell panel is gated (:data:`GATE_PARENTS`): CD3 on all QC-passed cells;
CD19 and CD20 on CD3- cells; IgD, CD27, CD38 and CD24 on CD20+ B cells (CD3-, CD19+ or CD20+,
and CD20+: plasmablasts are CD20- and CD27hi, and would otherwise pull the CD27 gate above
the memory cells; without CD20 protein, all B cells). A parent whose protein is not measured
falls back to RNA (CD3-: not called T; B: the RNA B call). The learner is
:func:`bcellmap.kernels.density.learn_marker_threshold` (density valley, else an upper tail);
``scrna.protein.thresholds`` fixed values override it. A gate learned without a valley
(``upper_tail``, ``insufficient_events``, or ``not_learned`` when the cohort table lacks the
protein) is flagged: logged as a warning, listed in ``uns["protein_thresholds"]`` (one row
per protein: marker, parent, threshold, method, n_events, n_samples, pool, flag, n_parent) and
in the counts column ``gate_flags`` (``"CD38:upper_tail;CD24:upper_tail"``). Without a cohort
table (``annotate_scrna(..., protein_thresholds=None)``) the gates are learned, the same way,
on the sample alone (pool ``sample``, with a warning). ``obs["b_protein"]`` marks the
protein-defined B cells (CD3- and CD19+ or CD20+) when CD19 or CD20 protein is measured.

Lineage (``obs["cell_type"]``; ``obs["lineage_source"]`` = ``protein`` or ``rna``): where CITE-seq
lineage proteins are gated they decide (:func:`protein_lineage`): CD3+ is T even where RNA
says NK; CD3- CD19+ or CD20+ is B; CD14+ monocyte; CD3- CD56+, or CD16+ with a non-myeloid
RNA call, NK. RNA decides the rest (no lineage protein positive, or none measured): the
protein-decided calls join the per-cell calls whose cluster majority labels those cells.
``obs["cell_type_rna"]`` keeps the RNA call, ``obs["cell_type_protein"]`` the protein one. In
RNA, a best-NK cell with at least ``t_core_min_counts`` UMIs of the CD3 genes is T (effector
CD8 and CAR-T cells express NKG7/GNLY/KLRD1 as highly as NK cells), and a best-plasmablast
cell with at least ``pdc_min_counts`` UMIs of the ``pDC`` set is a pDC (pDCs express MZB1 and
JCHAIN); pDCs are not lymphocytes.

CAR-T cells: a T cell is CAR+ with at least ``car_min_counts`` CAR UMIs and more than the
``car_ambient_quantile`` Poisson quantile of the ambient CAR UMIs expected in it
(:func:`car_thresholds`: the sample's ambient rate, estimated on cells that cannot carry a CAR,
times the cell's UMIs); ``uns["car_ambient"]`` records the rate.

Missing marker genes: populations are scored with the genes present (partial scoring, listed in
``uns["annotation"]["missing_genes"]`` and logged); a population with none is not scored (and
cannot be called). No pan-B gene at all is an error: B cells could not be called.

Counts (``results/counts/{sample_id}.tsv``, the counts-table contract plus ``gate_flags``):
``lymphocytes`` is the
QC-passed T, B and NK cells, so the scRNA B-cell frequency is relative to lymphocytes, as for
flow (monocytes, DC and unassigned cells are excluded). ``cd19_pos``/``cd20_pos`` count B cells
with the CD19/CD20 protein above threshold, and are left empty (not measured) without CITE-seq
protein for that marker: CD19 mRNA drops out in most B cells, so an RNA-only "CD19-negative"
B cell is no evidence of CD19 loss, and counting it would raise false CD19/CD20 discordance.
``cd19neg_cd20pos`` needs both proteins. ``obs["cd19_rna"]``/``obs["cd20_rna"]`` keep the
transcript calls (at least one CD19/MS4A1 UMI) for inspection. ``car_t_count``: T cells with
at least ``scrna.annotate.car_min_counts`` UMIs of ``scrna.car_feature`` and above the
ambient threshold (above); ``car_t_pct_t`` =
100 x car_t_count / t_cells (empty without a CAR feature or without T cells).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from ..contracts import COUNT_COLUMNS, PROTEIN_THRESHOLD_COLUMNS, SUBSETS
from ..errors import ConfigError, InputError
from ..kernels.density import ThresholdFit, learn_marker_threshold

log = logging.getLogger(__name__)

#: Parent population of each protein gate (the rest: CD20+ B cells). Gates are learned level
#: by level, in this order, each on the parent defined by the gates above it.
GATE_PARENTS = {"CD3": "all", "CD14": "all", "CD19": "CD3-", "CD20": "CD3-", "CD56": "CD3-",
                "CD16": "CD3-"}
SUBSET_PARENT = "CD20+ B"
_GATE_LEVELS = ("all", "CD3-", SUBSET_PARENT)
#: Methods of a trusted gate; any other is flagged.
TRUSTED_METHODS = ("valley", "fixed")
LYMPHOCYTE_TYPES = ("T", "B", "NK")
UNASSIGNED = "unassigned"
#: ``obs["lineage_source"]`` values: the gated lineage proteins decided, or the RNA call.
PROTEIN, RNA = "protein", "rna"
#: RNA calls under which a CD16+ CD56- (CD14-) cell is a myeloid cell, not an NK cell:
#: CD16 (FCGR3A) also marks non-classical monocytes, which are CD14 dim.
_MYELOID = ("monocyte", "DC", "pDC")
_CLUSTER_KEY = "leiden"


def _present(adata, genes: list[str]) -> tuple[list[str], list[str]]:
    names = set(adata.var_names)
    return [g for g in genes if g in names], [g for g in genes if g not in names]


def _score(adata, genes: list[str], *, name: str, seed: int) -> np.ndarray:
    """Seeded marker score; the control set is capped by the genes available.

    ``name`` names the score in messages only.
    """
    ctrl = max(1, min(50, adata.n_vars - len(genes)))
    return _score_genes(adata.X, np.asarray(adata.var_names, dtype=object), genes,
                        ctrl_size=ctrl, n_bins=min(25, max(1, adata.n_vars // 20)),
                        random_state=seed, name=name)


def _nan_mean(matrix: Any, *, axis: int) -> np.ndarray:
    """Mean ignoring NaN (float64), of a dense array or a SciPy sparse matrix."""
    if not sp.issparse(matrix):
        return np.nanmean(np.asarray(matrix), axis=axis, dtype=np.float64)
    matrix = sp.csr_matrix(matrix, dtype=np.float64, copy=True)
    nans = np.isnan(matrix.data)
    matrix.data[nans] = 0.0
    counted = matrix.shape[axis] - np.asarray(
        sp.csr_matrix((nans.astype(np.float64), matrix.indices, matrix.indptr),
                      shape=matrix.shape).sum(axis=axis)).ravel()
    return np.asarray(matrix.sum(axis=axis)).ravel() / counted


def _score_genes(matrix: Any, var_names: np.ndarray, genes: Sequence[str], *, ctrl_size: int,
                 n_bins: int, random_state: int, name: str) -> np.ndarray:
    """Seurat's module score as scanpy's ``tl.score_genes`` computes it (scanpy 1.9-1.11).

    The genes are cut into ``n_bins`` bins by their mean expression; from every bin that
    holds a scored gene, ``ctrl_size`` control genes are drawn (``RandomState(random_state)``
    draws what scanpy's ``np.random.seed`` then ``pandas.Series.sample`` draw, so the control
    set and the scores are scanpy's: tested against it). The score of a cell is the mean of
    the scored genes minus the mean of the control genes. Importing scanpy for this costs
    2.7 s per job, a third of the scRNA mapping job.
    """
    position = {gene: i for i, gene in enumerate(var_names)}
    gene_list = list(dict.fromkeys(g for g in genes if g in position))
    if not gene_list:
        raise ValueError(f"{name}: no valid genes were passed for scoring")
    averages = _nan_mean(matrix, axis=0)
    finite = np.isfinite(averages)
    pool = var_names[finite]
    # pandas' rank(method="min") of the finite gene means, floor-divided into bins.
    pool_averages = averages[finite]
    first = np.searchsorted(np.sort(pool_averages), pool_averages, side="left")
    n_items = int(np.round(len(pool_averages) / (n_bins - 1)))
    cut = (first + 1).astype(np.float64) // n_items
    cut_of = dict(zip(pool, cut, strict=True))
    scored = set(gene_list)
    rng = np.random.RandomState(random_state)
    control: set[str] = set()
    for bin_id in np.unique([cut_of[g] for g in gene_list if g in cut_of]):
        candidates = pool[cut == bin_id]
        if ctrl_size < len(candidates):
            candidates = candidates[rng.choice(len(candidates), size=ctrl_size, replace=False)]
        control.update(g for g in candidates if g not in scored)
    if not control:
        raise ValueError(f"{name}: no control genes found in any bin")

    def columns(names: Sequence[str]) -> Any:
        index = [position[g] for g in names]
        return matrix if len(index) == matrix.shape[1] else matrix[:, index]
    return _nan_mean(columns(gene_list), axis=1) - _nan_mean(columns(sorted(control)), axis=1)


def _counts_of(adata, gene: str) -> np.ndarray:
    """UMIs of one gene per cell (``layers["counts"]``; X > 0 for normalised input)."""
    column = adata.var_names.get_loc(gene)
    if "counts" in adata.layers:
        values = adata.layers["counts"][:, column]
    else:
        values = (adata.X[:, column] > 0).astype(np.float32)
    values = values.toarray() if sp.issparse(values) else np.asarray(values)
    return values.ravel()


def _mean_expression(adata, genes: list[str]) -> np.ndarray:
    if not genes:
        return np.zeros(adata.n_obs)
    values = adata[:, genes].X
    values = values.toarray() if sp.issparse(values) else np.asarray(values)
    return values.mean(axis=1)


RnaCall = np.ndarray | Callable[[], np.ndarray | None] | None


def _protein_settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """``scrna.protein`` of a loaded config, fixed thresholds as floats."""
    settings = dict(config["scrna"]["protein"])
    settings["thresholds"] = {str(k): float(v)
                              for k, v in dict(settings["thresholds"] or {}).items()}
    return settings


def gate_parent(marker: str) -> str:
    """The parent population a protein gate is learned and applied in."""
    return GATE_PARENTS.get(marker, SUBSET_PARENT)


def _flag(marker: str, method: str) -> str:
    return "" if method in TRUSTED_METHODS else f"{marker}:{method}"


def protein_parents(columns: Mapping[str, np.ndarray], cuts: Mapping[str, float],
                    rna_call: RnaCall, *, n: int) -> dict[str, np.ndarray | None]:
    """Parent populations of the protein gates for one sample's cells.

    Parameters
    ----------
    columns
        Protein -> CLR values of the cells.
    cuts
        Protein -> threshold (NaN or absent: that protein cannot be gated).
    rna_call
        Per-cell RNA call (``B``, ``T``, ...), a callable returning it (computed only when a
        parent needs it), or None.
    n
        Number of cells.

    Returns
    -------
    ``{"all", "CD3-", "B", "CD20+ B"}`` -> boolean mask, or None where it cannot be defined.
    ``CD3-``: CD3 protein below its gate (without CD3 protein: not called T by RNA); ``B``:
    CD3- and CD19+ or CD20+ (without CD19 and CD20 protein: the RNA B call); ``CD20+ B``: B
    cells CD20+ (without CD20 protein: all B cells).
    """
    cache: list[np.ndarray | None] = []

    def rna() -> np.ndarray | None:
        if not cache:
            cache.append(rna_call() if callable(rna_call) else rna_call)
        return None if cache[0] is None else np.asarray(cache[0])

    def gated(marker: str) -> bool:
        return marker in columns and bool(np.isfinite(cuts.get(marker, np.nan)))

    if gated("CD3"):
        cd3_neg = columns["CD3"] < cuts["CD3"]
    else:
        calls = rna()
        cd3_neg = None if calls is None else calls != "T"
    lineage = [m for m in ("CD19", "CD20") if gated(m)]
    if lineage and cd3_neg is not None:
        b_cell = cd3_neg & np.logical_or.reduce([columns[m] >= cuts[m] for m in lineage])
    else:
        calls = rna()
        b_cell = None if calls is None else calls == "B"
    cd20_b = b_cell & (columns["CD20"] >= cuts["CD20"]) if b_cell is not None \
        and gated("CD20") else b_cell
    return {"all": np.ones(n, dtype=bool), "CD3-": cd3_neg, "B": b_cell, SUBSET_PARENT: cd20_b}


def protein_lineage(positive: Mapping[str, np.ndarray], rna_call: np.ndarray | None, *,
                    n: int) -> np.ndarray:
    """Lineage decided by the gated lineage proteins; ``""`` where they do not decide.

    Parameters
    ----------
    positive
        Protein -> boolean call (at or above its gate), only for gated proteins.
    rna_call
        Per-cell RNA call, used where a protein is not measured (CD3-: not called T) and to
        tell a CD16+ CD56- cell's lineage (CD16 also marks non-classical monocytes); None:
        no RNA call.
    n
        Number of cells.

    Returns
    -------
    numpy.ndarray of object
        In this order of precedence: ``T`` (CD3+); ``B`` (CD3-, CD19+ or CD20+);
        ``monocyte`` (CD3-, not B, CD14+); ``NK`` (CD3-, not B, not CD14+, and CD56+, or
        CD16+ with an RNA call that is not myeloid); ``""`` otherwise: no lineage protein
        positive (DC, pDC, dim staining) or no lineage protein measured, where RNA decides.
    """
    out = np.full(n, "", dtype=object)
    rna = None if rna_call is None else np.asarray(rna_call, dtype=object)
    lineage = {"CD3", "CD19", "CD20", "CD14", "CD56", "CD16"} & set(positive)
    if not n or not lineage:
        return out
    if "CD3" in positive:
        cd3_pos = np.asarray(positive["CD3"], dtype=bool)
        cd3_neg = ~cd3_pos
        out[cd3_pos] = "T"
    else:  # no CD3 protein: the RNA call stands in for CD3- (as for the gate parents)
        cd3_neg = np.ones(n, dtype=bool) if rna is None else rna != "T"

    def pos(marker: str) -> np.ndarray:
        values = positive.get(marker)
        return np.zeros(n, dtype=bool) if values is None else np.asarray(values, dtype=bool)

    b_cell = cd3_neg & (pos("CD19") | pos("CD20"))
    out[b_cell] = "B"
    monocyte = cd3_neg & ~b_cell & pos("CD14")
    out[monocyte] = "monocyte"
    rest = cd3_neg & ~b_cell & ~monocyte
    not_myeloid = np.ones(n, dtype=bool) if rna is None else ~np.isin(rna, _MYELOID)
    out[rest & (pos("CD56") | (pos("CD16") & not_myeloid))] = "NK"
    return out


def learn_protein_thresholds(samples: Iterable[tuple[str, Mapping[str, np.ndarray], RnaCall]],
                             *, config: Mapping[str, Any], pool: str = "cohort"
                             ) -> pd.DataFrame:
    """Learn the protein gates, level by level, on the pooled cells of the given samples.

    Parameters
    ----------
    samples
        ``(sample_id, {protein: CLR values}, RNA call)`` per sample: the cells to pool (the
        caller subsamples them) and their per-cell RNA call (see :func:`protein_parents`).
    config
        Merged config (``scrna.protein``).
    pool
        Written in the ``pool`` column: ``cohort`` or ``sample``.

    Returns
    -------
    pandas.DataFrame
        ``PROTEIN_THRESHOLD_COLUMNS``, one row per protein measured in any sample.
    """
    settings = _protein_settings(config)
    fixed = settings["thresholds"]
    items = [(str(sid), dict(columns), rna) for sid, columns, rna in samples]
    measured = list(dict.fromkeys(m for _, columns, _ in items for m in columns))
    cuts: dict[str, float] = {}
    rows = []
    for level in _GATE_LEVELS:
        markers = [m for m in measured if gate_parent(m) == level]
        if not markers:
            continue
        pooled: dict[str, list[np.ndarray]] = {m: [] for m in markers}
        for sample_id, columns, rna in items:
            present = [m for m in markers if m in columns]
            if not present:
                continue
            n = len(columns[present[0]])
            parent = protein_parents(columns, cuts, rna, n=n)[level]
            if parent is None:
                log.warning("sample %s: parent population %s of %s cannot be defined (no "
                            "protein and no RNA call for it); not pooled", sample_id, level,
                            ", ".join(present))
                continue
            for marker in present:
                pooled[marker].append(np.asarray(columns[marker], dtype=float)[parent])
        for marker in markers:
            values = np.concatenate(pooled[marker]) if pooled[marker] else np.empty(0)
            if marker in fixed:
                fit = ThresholdFit(fixed[marker], "fixed", int(values.size))
            else:
                fit = learn_marker_threshold(values, fallback_sd=float(settings["fallback_sd"]))
            cuts[marker] = float(fit.threshold)
            flag = _flag(marker, fit.method)
            rows.append((marker, level, float(fit.threshold), fit.method, int(fit.n_events),
                         len(pooled[marker]), pool, flag))
            (log.warning if flag else log.info)(
                "protein gate %s on %s (%s pool): %.3f (%s, %d cells of %d samples)%s",
                marker, level, pool, fit.threshold, fit.method, fit.n_events,
                len(pooled[marker]), "; FLAGGED: no density valley, check this gate" if flag
                else "")
    return pd.DataFrame(rows, columns=list(PROTEIN_THRESHOLD_COLUMNS))


def read_protein_thresholds(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``scrna_protein_thresholds.tsv`` (written by ``train-scrna``), checking columns."""
    from ..io.readers import read_table

    table = read_table(path, required=("marker", "threshold", "method"), empty_ok=True,
                       what="protein thresholds table")
    if table.empty and not len(table.columns):
        return pd.DataFrame(columns=list(PROTEIN_THRESHOLD_COLUMNS))
    for column in ("parent", "pool", "flag"):
        table[column] = table[column].fillna("") if column in table.columns else ""
    return table


def _protein_gates(adata, *, cell_type: np.ndarray, config: Mapping[str, Any],
                   table: pd.DataFrame | None, sample_id: str
                   ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray | None], pd.DataFrame]:
    """Apply the protein gates to one sample.

    Returns
    -------
    (protein -> boolean call, only for gated proteins; parent populations (see
    :func:`protein_parents`); this sample's gate table: ``PROTEIN_THRESHOLD_COLUMNS`` plus
    ``n_parent``, the sample's cells in the gate's parent population)
    """
    columns_out = [*PROTEIN_THRESHOLD_COLUMNS, "n_parent"]
    names = list(adata.uns.get("protein_names", []))
    if "protein" not in adata.obsm or not names:
        return {}, {}, pd.DataFrame(columns=columns_out)
    protein = np.asarray(adata.obsm["protein"], dtype=float)
    columns = {name: protein[:, j] for j, name in enumerate(names)}
    if table is None:
        log.warning("sample %s: no cohort protein thresholds given; the protein gates are "
                    "learned on this sample alone (an aplastic sample has no positive peak "
                    "to learn from: pass train-scrna's --protein-thresholds table)", sample_id)
        table = learn_protein_thresholds([(sample_id, columns, cell_type)], config=config,
                                         pool="sample")
    known = {str(r["marker"]): r for r in table.to_dict("records")}
    fixed = _protein_settings(config)["thresholds"]
    rows = []
    for marker in names:
        if marker in fixed:
            row = {"marker": marker, "parent": gate_parent(marker), "threshold": fixed[marker],
                   "method": "fixed", "n_events": int(known.get(marker, {}).get("n_events", 0)),
                   "n_samples": int(known.get(marker, {}).get("n_samples", 0)),
                   "pool": "config"}
        elif marker in known:
            row = {k: known[marker].get(k) for k in PROTEIN_THRESHOLD_COLUMNS}
            row["parent"] = gate_parent(marker)
        else:
            log.warning("sample %s: the protein thresholds table has no gate for %s; it is not "
                        "gated (was the table learned on other samples?)", sample_id, marker)
            row = {"marker": marker, "parent": gate_parent(marker), "threshold": float("nan"),
                   "method": "not_learned", "n_events": 0, "n_samples": 0, "pool": ""}
        row["threshold"] = float(row["threshold"])
        row["flag"] = _flag(marker, str(row["method"]))
        rows.append(row)
    cuts = {r["marker"]: r["threshold"] for r in rows}
    parents = protein_parents(columns, cuts, cell_type, n=len(cell_type))
    for row in rows:
        parent = parents.get(row["parent"])
        row["n_parent"] = -1 if parent is None else int(parent.sum())
        if row["flag"]:
            log.warning("sample %s: protein gate %s (parent %s) is %s at %.3f; its calls are "
                        "less reliable", sample_id, row["marker"], row["parent"], row["method"],
                        row["threshold"])
    calls = {m: columns[m] >= cut for m, cut in cuts.items() if np.isfinite(cut)}
    return calls, parents, pd.DataFrame(rows, columns=columns_out)


def _population_scores(adata, marker_sets: Mapping[str, list[str]], *, seed: int,
                       sample_id: str | None) -> tuple[dict[str, np.ndarray],
                                                       dict[str, list[str]]]:
    """Seeded marker score of every population with a marker gene present; missing genes."""
    scores: dict[str, np.ndarray] = {}
    missing: dict[str, list[str]] = {}
    for population, genes in marker_sets.items():
        present, absent = _present(adata, list(genes))
        if absent:
            missing[population] = absent
        if not present:
            log.warning("sample %s: no %s marker gene found; %s is not scored", sample_id,
                        population, population)
            continue
        scores[population] = _score(adata, present, name=f"_score_{population}", seed=seed) \
            if adata.n_obs else np.zeros(0)
    return scores, missing


def _per_cell_call(scores: Mapping[str, np.ndarray], n: int, min_score: float, *,
                   cd3_counts: np.ndarray | None = None, cd3_min_counts: float = 2.0,
                   pdc_counts: np.ndarray | None = None, pdc_min_counts: float = 2.0
                   ) -> np.ndarray:
    """Best-scoring population per cell (plasmablast -> B; at or below min_score: unassigned).

    T versus NK: effector CD8 and CAR-T cells express the cytotoxic NK program (NKG7, GNLY,
    KLRD1) as highly as NK cells while keeping the CD3 genes, so a cell whose best score is
    NK but which carries at least ``cd3_min_counts`` UMIs of the CD3 genes (``cd3_counts``)
    is a T cell; an NK call needs the CD3 genes absent or nearly so. pDC versus plasmablast:
    pDCs express MZB1 and JCHAIN too, so a cell whose best score is plasmablast but which
    carries at least ``pdc_min_counts`` UMIs of the pDC genes (``pdc_counts``) is a pDC.
    """
    populations = list(scores)
    if not n or not populations:
        return np.full(n, UNASSIGNED, dtype=object)
    matrix = np.column_stack([scores[p] for p in populations])
    best = np.asarray(populations, dtype=object)[matrix.argmax(axis=1)]
    per_cell = np.where(best == "plasmablast", "B", best).astype(object)
    if cd3_counts is not None and "T" in scores:
        per_cell[(best == "NK") & (np.asarray(cd3_counts) >= cd3_min_counts)] = "T"
    if pdc_counts is not None and "pDC" in scores:
        per_cell[(best == "plasmablast") & (np.asarray(pdc_counts) >= pdc_min_counts)] = "pDC"
    per_cell[matrix.max(axis=1) <= min_score] = UNASSIGNED
    return per_cell


def _cd3_counts(adata, acfg: Mapping[str, Any]) -> np.ndarray | None:
    """UMIs of the T-core genes (``scrna.annotate.t_core_genes``) per cell; None: none present."""
    return _set_counts(adata, list(acfg["t_core_genes"]))


def _pdc_counts(adata, acfg: Mapping[str, Any]) -> np.ndarray | None:
    """UMIs of the pDC marker genes per cell; None: no pDC set or none of its genes present."""
    return _set_counts(adata, list(acfg["markers"].get("pDC", [])))


def _set_counts(adata, genes: list[str]) -> np.ndarray | None:
    genes, _ = _present(adata, genes)
    if not genes:
        return None
    return np.sum([_counts_of(adata, g) for g in genes], axis=0) if adata.n_obs \
        else np.zeros(0)


def _rna_call(adata, scores: Mapping[str, np.ndarray], acfg: Mapping[str, Any]) -> np.ndarray:
    return _per_cell_call(scores, adata.n_obs, float(acfg["min_score"]),
                          cd3_counts=_cd3_counts(adata, acfg),
                          cd3_min_counts=float(acfg["t_core_min_counts"]),
                          pdc_counts=_pdc_counts(adata, acfg),
                          pdc_min_counts=float(acfg["pdc_min_counts"]))


def _total_counts(adata) -> np.ndarray | None:
    """UMIs per cell (``layers["counts"]``, else ``obs["total_counts"]``); None: unknown."""
    if "counts" in adata.layers:
        return np.asarray(adata.layers["counts"].sum(axis=1), dtype=float).ravel()
    if "total_counts" in adata.obs:
        return adata.obs["total_counts"].to_numpy(dtype=float)
    return None


def ambient_rate(car_umis: np.ndarray, totals: np.ndarray) -> tuple[float, str]:
    """Ambient CAR UMIs per UMI of a droplet, from cells that cannot carry a CAR.

    Droplets draw ambient UMIs as Poisson(rate x their UMIs); the rate is solved from the
    share of those cells with no CAR UMI, ``mean(exp(-rate x totals)) = share``, which a few
    doublets with a CAR-T cell (many CAR UMIs in one droplet) barely move; when every such
    cell carries CAR UMIs, the pooled ratio of CAR UMIs to UMIs.
    """
    from scipy.optimize import brentq

    car_umis = np.asarray(car_umis, dtype=float)
    totals = np.maximum(np.asarray(totals, dtype=float), 1.0)
    zero = float(np.mean(car_umis == 0))
    if zero == 1.0:
        return 0.0, "zero_fraction"
    if zero == 0.0:
        return float(car_umis.sum() / totals.sum()), "ratio"

    def excess(rate: float) -> float:
        return float(np.mean(np.exp(-rate * totals))) - zero

    high = 1.0 / float(np.median(totals))
    while excess(high) > 0:
        high *= 4.0
    return float(brentq(excess, 0.0, high, xtol=1e-12)), "zero_fraction"


def _poisson_quantile(quantile: float, mean: np.ndarray) -> np.ndarray:
    """``scipy.stats.poisson.ppf(quantile, mean)`` for ``0 < quantile < 1``, by scipy's own
    formula from :mod:`scipy.special` (importing scipy.stats costs 0.5 s per job)."""
    from scipy import special

    mean = np.asarray(mean, dtype=np.float64)
    upper = np.ceil(special.pdtrik(quantile, mean))
    lower = np.maximum(upper - 1, 0)
    return np.where(special.pdtr(lower, mean) >= quantile, lower, upper)


def car_thresholds(car_umis: np.ndarray, totals: np.ndarray | None, *, reference: np.ndarray,
                   min_counts: float, quantile: float = 0.999, min_cells: int = 50
                   ) -> tuple[np.ndarray, dict[str, Any]]:
    """Per-cell CAR UMIs that make a cell CAR+ despite the sample's ambient CAR RNA.

    Parameters
    ----------
    car_umis
        CAR-feature UMIs per cell.
    totals
        UMIs per cell (None: unknown, only ``min_counts`` applies).
    reference
        Cells that cannot carry a CAR (B cells, monocytes, DCs): their CAR UMIs are ambient.
    min_counts
        ``scrna.annotate.car_min_counts``: the floor of every threshold.
    quantile
        A cell is CAR+ with more CAR UMIs than this Poisson quantile of the ambient UMIs
        expected in it (rate x its UMIs).
    min_cells
        Fewer reference cells: no ambient estimate (only ``min_counts``; flagged).

    Returns
    -------
    (threshold per cell: ``max(min_counts, Poisson quantile + 1)``, a summary dict: rate,
    method, n_reference, quantile)
    """
    if not 0.0 < quantile < 1.0:
        raise ConfigError(f"scrna.annotate.car_ambient_quantile must be in (0, 1), not "
                          f"{quantile}")
    car_umis = np.asarray(car_umis, dtype=float)
    reference = np.asarray(reference, dtype=bool)
    n_reference = int(reference.sum())
    info: dict[str, Any] = {"rate": float("nan"), "method": "", "n_reference": n_reference,
                            "quantile": float(quantile), "min_counts": float(min_counts)}
    floor = np.full(car_umis.shape, float(min_counts))
    if totals is None:
        info["method"] = "no_counts"
        return floor, info
    if n_reference < min_cells:
        info["method"] = "too_few_reference_cells"
        return floor, info
    totals = np.asarray(totals, dtype=float)
    # Reference droplets holding a CAR-T cell too (doublets) carry more CAR UMIs than ambient
    # explains: left out, and the rate estimated again, until none is left out.
    keep = reference.copy()
    for _ in range(10):
        rate, method = ambient_rate(car_umis[keep], totals[keep])
        outlier = keep & (car_umis > _poisson_quantile(quantile, rate * totals))
        if not outlier.any() or (keep & ~outlier).sum() < max(min_cells, 1):
            break
        keep &= ~outlier
    info.update(rate=rate, method=method, n_reference_outliers=int((reference & ~keep).sum()))
    ambient = _poisson_quantile(quantile, rate * totals) + 1.0
    return np.maximum(floor, ambient), info


def rna_cell_calls(adata, *, config: Mapping[str, Any], sample_id: str | None = None
                   ) -> np.ndarray:
    """Per-cell RNA call (``B``, ``T``, ``NK``, ..., ``unassigned``) of log-normalised cells,
    as ``obs["cell_type_cell"]`` of :func:`annotate_scrna` (the cluster call needs a model)."""
    acfg = config["scrna"]["annotate"]
    scores, _ = _population_scores(adata, {k: list(v) for k, v in acfg["markers"].items()},
                                   seed=int(config["seed"]), sample_id=sample_id)
    return _rna_call(adata, scores, acfg)


def annotate_scrna(adata, *, config: Mapping[str, Any], sample_id: str,
                   events_total: int | None = None,
                   protein_thresholds: pd.DataFrame | None = None
                   ) -> tuple[Any, dict[str, Any]]:
    """Label the cells of one mapped scRNA sample and count them.

    Parameters
    ----------
    adata
        QC-passed cells: log-normalised ``X``, ``layers["counts"]``, ``obs["leiden"]`` (optional;
        without it the per-cell call is used), ``obsm["protein"]`` (optional).
    config
        Merged config (``scrna``, ``seed``).
    sample_id
        For messages and the counts row.
    events_total
        Cells in the source file (QC failures included); default ``uns["source"]["cells"]``.
    protein_thresholds
        The cohort's protein gates (:func:`learn_protein_thresholds`, ``train-scrna``); None:
        learned on this sample alone, with a warning.

    Returns
    -------
    (annotated AnnData copy, counts-table row as a dict with the ``COUNT_COLUMNS``)
    """
    scfg = config["scrna"]
    acfg = scfg["annotate"]
    seed = int(config["seed"])
    adata = adata.copy()
    n = adata.n_obs
    marker_sets = {k: list(v) for k, v in acfg["markers"].items()}
    present_b, _ = _present(adata, marker_sets.get("B", []))
    if not present_b:
        raise InputError("none of the pan-B marker genes "
                         f"({', '.join(marker_sets.get('B', []))}) is in the count matrix; "
                         "B cells cannot be called (check gene symbols vs Ensembl ids)",
                         sample_id=sample_id)

    scores, missing = _population_scores(adata, marker_sets, seed=seed, sample_id=sample_id)
    subset_scores: dict[str, np.ndarray] = {}
    subset_genes: dict[str, list[str]] = {}
    for subset, genes in acfg["subset_markers"].items():
        present, absent = _present(adata, list(genes))
        subset_genes[subset] = present
        if absent:
            missing[f"subset:{subset}"] = absent
        if present and subset in ("naive", "memory") and n:
            subset_scores[subset] = _score(adata, present, name=f"_score_{subset}", seed=seed)
    if missing:
        log.warning("sample %s: marker genes missing, scored with the rest: %s", sample_id,
                    "; ".join(f"{k}: {', '.join(v)}" for k, v in missing.items()))

    populations = list(scores)
    for p in populations:
        adata.obs[f"score_{p}"] = scores[p].astype(np.float32)
    rna_cell = _rna_call(adata, scores, acfg)
    adata.obs["cell_type_rna"] = rna_cell

    has_clusters = _CLUSTER_KEY in adata.obs
    clusters = adata.obs[_CLUSTER_KEY].astype(str).to_numpy() if has_clusters and n else None
    use_cluster = acfg["call"] == "cluster" and has_clusters

    def majority(calls: np.ndarray) -> np.ndarray:
        if clusters is None:
            return calls.copy()
        top = (pd.DataFrame({"c": clusters, "t": calls}).groupby("c")["t"]
               .agg(lambda s: s.value_counts().index[0]))
        return top.reindex(clusters).to_numpy(dtype=object)

    rna_type = majority(rna_cell) if use_cluster else rna_cell
    # Protein precedence (CITE-seq): cohort gates, each applied inside its parent population
    # (parents defined by RNA where their protein is not measured). The gated lineage proteins
    # decide a cell's lineage; RNA decides where they are absent or all negative.
    protein, parents, gates = _protein_gates(adata, cell_type=np.asarray(rna_type, dtype=object),
                                             config=config, table=protein_thresholds,
                                             sample_id=sample_id)
    by_protein = protein_lineage(protein, np.asarray(rna_type, dtype=object), n=n)
    decided = by_protein != ""
    per_cell = np.where(decided, by_protein, rna_cell).astype(object)
    adata.obs["cell_type_protein"] = by_protein
    adata.obs["cell_type_cell"] = per_cell
    cluster_call = majority(per_cell)
    adata.obs["cluster_cell_type"] = cluster_call
    cell_type = np.where(decided, by_protein,
                         cluster_call if use_cluster else rna_cell).astype(object)
    adata.obs["lineage_source"] = pd.Categorical(np.where(decided, PROTEIN, RNA),
                                                 categories=[PROTEIN, RNA])
    discordant = int((cluster_call != per_cell).sum()) if has_clusters else 0
    b_cell = cell_type == "B"

    # B-cell subsets from RNA.
    subset = np.full(n, "", dtype=object)
    not_called = {"transitional", "double_negative"}
    pb = scores.get("plasmablast", np.full(n, -np.inf))
    pan_b = scores.get("B", np.full(n, -np.inf))
    pdc = scores.get("pDC", np.full(n, -np.inf))  # MZB1/JCHAIN also mark pDCs
    is_pb = b_cell & (pb > pan_b) & (pb > pdc) & (pb > float(acfg["min_score"]))
    pdc_umis = _pdc_counts(adata, acfg) if n else None
    if pdc_umis is not None:
        is_pb &= pdc_umis < float(acfg["pdc_min_counts"])
    subset[is_pb] = "plasmablast"
    if "plasmablast" not in scores:
        not_called.add("plasmablast")
    rest = b_cell & ~is_pb
    if "naive" in subset_scores and "memory" in subset_scores:
        memory = subset_scores["memory"] > subset_scores["naive"]
        switched = (_mean_expression(adata, subset_genes.get("switched", []))
                    > _mean_expression(adata, subset_genes.get("unswitched", [])))
        subset[rest & ~memory] = "naive"
        subset[rest & memory & switched] = "switched_memory"
        subset[rest & memory & ~switched] = "unswitched_memory"
    else:
        not_called |= {"naive", "unswitched_memory", "switched_memory"}

    # B-cell subsets from protein.
    if {"IgD", "CD27"} <= set(protein):
        igd, cd27 = protein["IgD"], protein["CD27"]
        target = b_cell & ~is_pb
        subset[target & igd & ~cd27] = "naive"
        subset[target & igd & cd27] = "unswitched_memory"
        subset[target & ~igd & cd27] = "switched_memory"
        subset[target & ~igd & ~cd27] = "double_negative"
        not_called -= {"double_negative", "naive", "unswitched_memory", "switched_memory"}
        if {"CD24", "CD38"} <= set(protein):
            subset[target & protein["CD24"] & protein["CD38"]] = "transitional"
            not_called.discard("transitional")
    adata.obs["cell_type"] = pd.Categorical(cell_type)
    adata.obs["b_subset"] = pd.Categorical(subset)

    def _rna_positive(gene: str) -> np.ndarray:
        if gene in adata.var_names:
            return b_cell & (_counts_of(adata, gene) >= 1)
        return np.zeros(n, dtype=bool)

    adata.obs["cd19_rna"] = _rna_positive("CD19")
    adata.obs["cd20_rna"] = _rna_positive("MS4A1")
    # Per-marker counts only from protein: None = not measured in this sample.
    cd19 = b_cell & protein["CD19"] if "CD19" in protein else None
    cd20 = b_cell & protein["CD20"] if "CD20" in protein else None
    for column, calls in (("cd19_pos", cd19), ("cd20_pos", cd20)):
        if calls is not None:
            adata.obs[column] = calls
    # Protein-defined B cells (CD3- and CD19+ or CD20+), where CD19 or CD20 protein is gated.
    b_protein = parents["B"] if {"CD19", "CD20"} & set(protein) else None
    if b_protein is not None:
        adata.obs["b_protein"] = b_protein
    gate_flags = ";".join(flag for flag in gates["flag"] if flag)

    t_cells = int((cell_type == "T").sum())
    car_count: int | None = None
    car_feature = scfg.get("car_feature")
    if car_feature:
        if car_feature not in adata.var_names:
            raise InputError(f"scrna.car_feature {car_feature!r} is not a feature of this "
                             "sample; check the CAR transcript name of the product",
                             sample_id=sample_id)
        car_umis = _counts_of(adata, car_feature) if n else np.zeros(0)
        threshold, car_info = car_thresholds(
            car_umis, _total_counts(adata),
            reference=np.isin(cell_type, list(acfg.get("car_ambient_reference",
                                                       ["B", "monocyte", "DC", "pDC"]))),
            min_counts=float(acfg["car_min_counts"]),
            quantile=float(acfg["car_ambient_quantile"]),
            min_cells=int(acfg["car_ambient_min_cells"]))
        car_positive = car_umis >= threshold
        car = (cell_type == "T") & car_positive
        adata.obs["car_umis"] = car_umis.astype(np.float32)
        adata.obs["car_threshold"] = threshold.astype(np.float32)
        adata.obs["car_positive"] = car_positive
        adata.obs["car_t"] = car
        car_count = int(car.sum())
        car_info["car_positive_not_t"] = int((car_positive & (cell_type != "T")).sum())
        adata.uns["car_ambient"] = car_info
        (log.warning if car_info["method"] == "too_few_reference_cells" else log.info)(
            "sample %s: ambient %s rate %s per UMI (%s, %d reference cells); %d CAR+ T cells, "
            "%d CAR+ non-T cells", sample_id, car_feature, f"{car_info['rate']:.3g}",
            car_info["method"], car_info["n_reference"], car_count,
            car_info["car_positive_not_t"])

    if events_total is None:
        events_total = int(adata.uns.get("source", {}).get("cells", n))
    row: dict[str, Any] = {
        "sample_id": sample_id, "modality": "scrna", "events_total": int(events_total),
        "events_qc_pass": n,
        "lymphocytes": int(np.isin(cell_type, LYMPHOCYTE_TYPES).sum()),
        "t_cells": t_cells, "b_cells": int(b_cell.sum()),
        "nk_cells": int((cell_type == "NK").sum()),  # where the shared columns have it
        "cd19_pos": "" if cd19 is None else int(cd19.sum()),
        "cd20_pos": "" if cd20 is None else int(cd20.sum()),
        "cd19neg_cd20pos": "" if cd19 is None or cd20 is None else int((cd20 & ~cd19).sum()),
        # A subset this sample cannot resolve is empty (not measured), as in flow, so that
        # its cells are not reported as a measured zero.
        **{f"{s}_count": "" if s in not_called else int((subset == s).sum())
           for s in SUBSETS},
        "subsets_not_called": ";".join(s for s in SUBSETS if s in not_called),
        "cluster_discordant_events": discordant,
        "car_t_count": "" if car_count is None else car_count,
        "car_t_pct_t": "" if car_count is None or t_cells == 0
        else round(100.0 * car_count / t_cells, 4),
        "gate_flags": gate_flags,
        # Ingest found ADTs but none matched the configured protein markers (RNA only).
        "sample_flags": str(dict(adata.uns.get("protein_panel", {}) or {}).get("flag", "") or ""),
    }
    row = {column: row.get(column, "") for column in COUNT_COLUMNS}
    adata.uns["annotation"] = {
        "call": "cluster" if use_cluster else "cell", "populations_scored": populations,
        "missing_genes": missing, "protein_used": sorted(protein),
        "subsets_not_called": row["subsets_not_called"],
        "lymphocytes": "T, B and NK cells that passed QC",
        "b_cells_protein": -1 if b_protein is None else int(b_protein.sum()),
        "lineage_by_protein": int(decided.sum()),
        "gate_flags": gate_flags,
    }
    adata.uns["protein_thresholds"] = gates
    return adata, row
