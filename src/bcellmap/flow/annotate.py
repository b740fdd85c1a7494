"""Cell types and B-cell subsets per event, from marker rules and cohort thresholds.

Cell types (per event, thresholds from ``bcellmap.flow.thresholds``):

- ``B``: CD3- and (CD19+ or CD20+). Plasmablasts (CD20-, CD19lo) are B-lineage when their
  CD19 is at or above the cohort CD19 threshold, as the subset table implies.
- ``T``: CD3+.
- ``other``: everything else (NK cells, monocytes, ... within the lymphocyte gate).

B-cell subsets come from the ordered subset rule table (:mod:`bcellmap.flow.subsets`: the
built-in ``bcellmap/subsets.yaml``, or the user's ``annotate.subsets``); the first rule that
matches wins (plasmablast, transitional, then the IgD/CD27 quadrants).
Non-B events, and B events that no callable rule matches, get an empty ``b_subset``.

Cluster-level phenotypes are reported beside the event calls: the median of every marker
over a metacluster's events in this sample, put through the same rules, gives
``obs["metacluster_cell_type"]`` and the table ``uns["metacluster_phenotypes"]``; the
number of events whose own cell type differs from their metacluster's is written to the
counts table (``cluster_discordant_events``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from ..contracts import ALL_SAMPLES, COUNT_COLUMNS, SUBSETS
from ..errors import InputError
from ..io.panel import marker_columns as _marker_columns
from .evaluability import not_evaluable, reliable_thresholds, unreliable_gates
from .subsets import SubsetRule, load_subset_rules

log = logging.getLogger(__name__)

# Keys under which ingest may record the number of events in the FCS file.
_EVENT_TOTAL_KEYS = ("n_events", "events", "n_events_total", "events_total", "tot", "$TOT")


def _level_mask(values: np.ndarray, level: str, cut: Mapping[str, float]) -> np.ndarray:
    """Events of ``values`` at ``level`` given ``{"pos": t, "hi": t}``."""
    if level == "neg":
        return values < cut["pos"]
    if level == "pos":
        return values >= cut["pos"]
    if level == "hi":
        return values >= cut["hi"]
    return values < cut["hi"]  # lo


def _callable(rule: SubsetRule, columns: Mapping[str, np.ndarray],
              thresholds: Mapping[str, Mapping[str, float]]) -> bool:
    """A rule can be evaluated when every marker is measured and has the needed threshold."""
    for marker, level in rule.levels.items():
        needed = "pos" if level in ("neg", "pos") else "hi"
        if marker not in columns or not np.isfinite(thresholds.get(marker, {}).get(needed,
                                                                                   np.nan)):
            return False
    return True


def call_subsets(
    columns: Mapping[str, np.ndarray],
    b_cell: np.ndarray,
    thresholds: Mapping[str, Mapping[str, float]],
    rules: Sequence[SubsetRule],
) -> tuple[np.ndarray, list[str]]:
    """B-cell subset of every B event by the ordered rules (first match wins).

    Returns the subset names (empty for non-B and unmatched B events) and the names of
    rules that cannot be evaluated with these markers and thresholds.
    """
    subset = np.full(len(b_cell), "", dtype=object)
    unassigned = np.asarray(b_cell, dtype=bool).copy()
    not_called = []
    for rule in rules:
        if not _callable(rule, columns, thresholds):
            not_called.append(rule.name)
            continue
        match = unassigned.copy()
        for marker, level in rule.levels.items():
            match &= _level_mask(columns[marker], level, thresholds[marker])
        subset[match] = rule.name
        unassigned &= ~match
    return subset, not_called


def call_events(
    columns: Mapping[str, np.ndarray],
    thresholds: Mapping[str, Mapping[str, float]],
    rules: Sequence[SubsetRule],
    *,
    scatter: tuple[np.ndarray, np.ndarray] | None = None,
    max_mahalanobis: float = 3.5,
) -> tuple[pd.DataFrame, list[str]]:
    """Call cell type, CD19/CD20 status and B-cell subset for every event.

    Parameters
    ----------
    columns
        Canonical marker -> transformed values (one entry per event).
    thresholds
        Marker -> ``{"pos": t, "hi": t}`` (the sample's own gates).
    rules
        Ordered subset rules; the first match wins.
    scatter
        (FSC-A, SSC-A) of the events, for the lymphocyte core (``gating.lymphocyte_gate``).
    max_mahalanobis
        Radius of the lymphocyte core around the T and B cells' scatter.

    Returns
    -------
    calls
        Columns ``cell_type`` (B, T, NK, other; ``lymphocyte_unresolved`` instead of T and
        NK when the panel has no CD3), ``lymphocyte`` (T, B or NK), ``b_subset``
        (empty for non-B and unmatched B), ``cd19_pos``, ``cd20_pos`` (bool; False when the
        marker is absent). ``calls.attrs["lymphocyte_gate"]`` says how NK cells were called.
    not_called
        Names of rules that cannot be evaluated with these markers and thresholds.
    """
    from .gating import lymphocyte_gate

    if not any(m in columns and np.isfinite(thresholds.get(m, {}).get("pos", np.nan))
               for m in ("CD19", "CD20")):
        raise InputError("cell types need CD19 or CD20 and a threshold for it")
    lineage, info = lymphocyte_gate(columns, thresholds, scatter=scatter,
                                    max_mahalanobis=max_mahalanobis)
    # Without CD3, non-B lymphocytes are T or NK cells: their lineage is not resolved.
    other_lymphocyte = "NK" if info["has_cd3"] else "lymphocyte_unresolved"
    cell_type = np.where(lineage["T"], "T", np.where(
        lineage["B"], "B", np.where(lineage["NK"], other_lymphocyte, "other"))).astype(object)
    subset, not_called = call_subsets(columns, lineage["B"], thresholds, rules)
    calls = pd.DataFrame({"cell_type": cell_type, "lymphocyte": lineage["lymphocyte"],
                          "b_subset": subset, "cd19_pos": lineage["cd19_pos"],
                          "cd20_pos": lineage["cd20_pos"]})
    calls.attrs["lymphocyte_gate"] = info
    return calls, not_called


def metacluster_phenotypes(
    columns: Mapping[str, np.ndarray],
    metacluster: np.ndarray,
    thresholds: Mapping[str, Mapping[str, float]],
    rules: Sequence[SubsetRule],
) -> pd.DataFrame:
    """Median marker values per metacluster, called with the same rules as events.

    Returns
    -------
    pandas.DataFrame
        One row per metacluster present: ``metacluster``, ``n_events``, ``median_{marker}``,
        ``cell_type``, ``b_subset``.
    """
    frame = pd.DataFrame({m: v for m, v in columns.items()})
    frame["metacluster"] = np.asarray(metacluster)
    if frame.empty:
        return pd.DataFrame(columns=["metacluster", "n_events", "cell_type", "b_subset"])
    medians = frame.groupby("metacluster", sort=True).median()
    sizes = frame.groupby("metacluster", sort=True).size()
    calls, _ = call_events({m: medians[m].to_numpy() for m in columns}, thresholds, rules)
    table = pd.DataFrame({"metacluster": medians.index.to_numpy(),
                          "n_events": sizes.to_numpy()})
    for marker in columns:
        table[f"median_{marker}"] = medians[marker].to_numpy()
    table["cell_type"] = calls["cell_type"].to_numpy()
    table["b_subset"] = calls["b_subset"].to_numpy()
    return table


def _events_total(adata: Any, *, sample_id: str) -> int | None:
    """Number of events in the source file, as recorded by ingest (None when absent)."""
    for section in ("source", "qc"):
        record = adata.uns.get(section, {})
        if isinstance(record, Mapping):
            for key in _EVENT_TOTAL_KEYS:
                if key in record:
                    try:
                        return int(record[key])
                    except (TypeError, ValueError):
                        continue
    log.warning("%s: uns['source'] records no event total; events_total left empty", sample_id)
    return None


def _scatter(adata: Any) -> tuple[np.ndarray, np.ndarray] | None:
    """FSC-A and SSC-A of the events when the sample has both."""
    columns = _marker_columns(adata, ("FSC-A", "SSC-A"))
    if len(columns) < 2:
        return None
    return columns["FSC-A"], columns["SSC-A"]


def annotate_sample(
    adata: Any,
    thresholds: Mapping[str, Mapping[str, float]],
    rules: Sequence[SubsetRule],
    *,
    sample_id: str,
    modality: str = "flow",
    threshold_table: pd.DataFrame | None = None,
    gate_table: pd.DataFrame | None = None,
    max_mahalanobis: float = 3.5,
    day: int | None = None,
) -> tuple[Any, pd.DataFrame]:
    """Annotate one mapped sample.

    Parameters
    ----------
    adata
        The mapped AnnData (QC-passed events; ``var["canonical"]``; ``obs["metacluster"]``).
    thresholds
        Marker -> ``{"pos": t, "hi": t}``: this sample's own gates.
    rules
        Ordered subset rules.
    sample_id, modality
        Written to the counts table.
    threshold_table
        The cohort's reference gates, stored in ``uns["thresholds"]``.
    gate_table
        This sample's gate rows (``gating.GATE_COLUMNS``), stored in ``uns["gates"]``; their
        flags go to the counts table's ``gate_flags``.
    max_mahalanobis
        Radius of the lymphocyte core around the T and B cells' scatter.
    day
        The visit's day (baseline when <= 0), for the plausibility flags.

    Returns
    -------
    annotated
        A copy of ``adata`` with ``obs`` columns ``cell_type``, ``lymphocyte``,
        ``b_subset``, ``cd19_pos``, ``cd20_pos``, ``metacluster_cell_type`` and ``uns``
        entries ``thresholds``, ``gates``, ``metacluster_phenotypes``, ``annotate``.
    counts
        The one-row per-sample counts table (``COUNT_COLUMNS``).
    """
    from .gating import gate_flags

    markers = list(dict.fromkeys(["CD3", "CD19", "CD20", "CD45", "CD14", "CD56", "CD16",
                                  *(m for rule in rules for m in rule.levels)]))
    annotated = adata.copy()
    columns = _marker_columns(annotated, markers)
    if not ({"CD19", "CD20"} & set(columns)):
        raise InputError("the panel lacks both CD19 and CD20; cannot call B cells",
                         sample_id=sample_id)
    calls, not_called = call_events(columns, thresholds, rules, scatter=_scatter(annotated),
                                    max_mahalanobis=max_mahalanobis)
    unreliable = unreliable_gates(gate_table)
    rejected = not_evaluable(columns, unreliable, rules, not_called)
    lymphocyte_calls = calls
    if unreliable and "lymphocytes" not in rejected:
        # The denominator from the sound gates only (e.g. B cells by CD20 alone).
        lymphocyte_calls, _ = call_events(columns, reliable_thresholds(thresholds, unreliable),
                                          rules, scatter=_scatter(annotated),
                                          max_mahalanobis=max_mahalanobis)
    lymphocyte_info = calls.attrs.get("lymphocyte_gate", {})
    if not_called:
        log.warning("%s: subsets not called (marker or threshold missing): %s", sample_id,
                    ", ".join(not_called))
    for column in calls.columns:
        values = calls[column].to_numpy()
        annotated.obs[column] = values if calls[column].dtype == bool else values.astype(str)

    discordant: int | None = None
    phenotypes = pd.DataFrame()
    if "metacluster" in annotated.obs.columns:
        phenotypes = metacluster_phenotypes(columns, annotated.obs["metacluster"].to_numpy(),
                                            thresholds, rules)
        mapping = dict(zip(phenotypes["metacluster"], phenotypes["cell_type"], strict=True))
        cluster_type = annotated.obs["metacluster"].map(mapping).astype(str).to_numpy()
        annotated.obs["metacluster_cell_type"] = cluster_type
        discordant = int((cluster_type != calls["cell_type"].to_numpy()).sum())
    else:
        log.warning("%s: no obs['metacluster']; cluster-level phenotypes not reported",
                    sample_id)

    if gate_table is None:
        gate_table = pd.DataFrame(
            [(m, lv, t, "", "given", 0, "") for m, levels in thresholds.items()
             for lv, t in levels.items()],
            columns=["marker", "level", "threshold", "parent", "method", "n_events", "flag"])
    gate_table = gate_table.reset_index(drop=True).copy()
    for column in ("sample_id", "group", "marker", "level", "parent", "method", "flag",
                   "reference", "reliability", "reliability_detail"):
        if column in gate_table.columns:  # h5ad stores text columns as strings only
            gate_table[column] = gate_table[column].fillna("").astype(str)
    if threshold_table is None:
        threshold_table = gate_table[["marker", "level", "threshold"]]
    annotated.uns["thresholds"] = threshold_table.reset_index(drop=True)
    annotated.uns["gates"] = gate_table
    annotated.uns["metacluster_phenotypes"] = phenotypes.reset_index(drop=True)
    annotated.uns["annotate"] = {
        "subset_precedence": [rule.name for rule in rules],
        "subsets_not_called": ";".join(not_called),
        "b_cell_rule": ("CD3- and (CD19+ or CD20+)" if "CD3" in columns
                        else "CD19+ or CD20+ (no CD3 in the panel)"),
        "nk_rule": str(lymphocyte_info.get("nk_rule", "")),
        # The T and B cells' scatter core of the NK call, for the GatingML export.
        "lymphocyte_core": {"mean": lymphocyte_info["scatter_mean"],
                            "covariance": lymphocyte_info["scatter_covariance"],
                            "max_mahalanobis": float(max_mahalanobis)}
        if "scatter_mean" in lymphocyte_info else {},
        "not_evaluable": ";".join(rejected),
        "not_evaluable_reason": _gate_reasons(unreliable) if rejected else "",
    }

    cell_type = calls["cell_type"].to_numpy()
    b_cell = cell_type == "B"
    n_events = annotated.n_obs
    lymphocytes = int(lymphocyte_calls["lymphocyte"].sum())
    measured = {m for m in ("CD19", "CD20") if m in columns
                and np.isfinite(thresholds.get(m, {}).get("pos", np.nan))}
    flags = gate_flags(gate_table)
    if flags:
        log.warning("%s: gates flagged: %s", sample_id, flags)
    record: dict[str, Any] = {
        "sample_id": sample_id,
        "modality": modality,
        "events_total": _events_total(annotated, sample_id=sample_id),
        "events_qc_pass": n_events,
        # Lymphocytes by markers (T + B + NK inside the lymphocyte core), not every event
        # of the scatter gate: lysed whole blood puts myeloid events there.
        "lymphocytes": lymphocytes,
        # Without CD3, T and NK cells are not told apart: not measured (empty), never 0.
        "t_cells": int((cell_type == "T").sum()) if "CD3" in columns else None,
        "b_cells": int(b_cell.sum()),
        # A marker without a usable threshold is not measured: empty, never a false 0.
        "cd19_pos": int((b_cell & calls["cd19_pos"].to_numpy()).sum())
        if "CD19" in measured else None,
        "cd20_pos": int((b_cell & calls["cd20_pos"].to_numpy()).sum())
        if "CD20" in measured else None,
        "cd19neg_cd20pos": int((b_cell & ~calls["cd19_pos"].to_numpy()
                                & calls["cd20_pos"].to_numpy()).sum())
        if {"CD19", "CD20"} <= measured else None,
        "nk_cells": int((lymphocyte_calls["cell_type"] == "NK").sum())
        if "CD3" in columns else None,
        "lymphocyte_purity_pct": 100.0 * lymphocytes / n_events if n_events else None,
        "gate_flags": flags,
    }
    subset_values = calls["b_subset"].to_numpy()
    for subset in SUBSETS:
        called = any(rule.name == subset for rule in rules) and subset not in not_called
        record[f"{subset}_count"] = int((subset_values == subset).sum()) if called else None
    record["subsets_not_called"] = ";".join(
        s for s in SUBSETS if record[f"{s}_count"] is None)
    # Cluster phenotypes are called with every gate: not evaluable when one is unreliable.
    record["cluster_discordant_events"] = None if rejected else discordant
    record["car_t_count"] = None
    record["car_t_pct_t"] = None
    # Values resting on an unreliable or nonspecific gate: NA, with the reason.
    for column in rejected:
        record[column] = None
    if "lymphocytes" in rejected:
        record["lymphocyte_purity_pct"] = None
    record["unreliable_gates"] = ";".join(
        f"{marker}:{text.split(':')[0]}" + ("" if level == "pos" else f"({level})")
        for (marker, level), text in unreliable.items())
    record["not_evaluable"] = ";".join(rejected)
    record["not_evaluable_reason"] = _gate_reasons(unreliable) if rejected else ""
    if rejected:
        log.warning("%s: not evaluable (they rest on an unreliable gate): %s; %s", sample_id,
                    record["not_evaluable"], record["not_evaluable_reason"])
    record["sample_flags"] = ";".join([*plausibility_flags(
        columns, record, day=day, groups=set(gate_table.get("group", pd.Series(dtype=str)))),
        *_qc_flags(annotated)])
    if record["sample_flags"]:
        log.warning("%s: implausible or incomplete result, check it: %s", sample_id,
                    record["sample_flags"])
    counts = pd.DataFrame([record], columns=list(COUNT_COLUMNS))
    counts.attrs["lymphocyte_gate"] = lymphocyte_info
    return annotated, counts


def _qc_flags(adata: Any) -> list[str]:
    """The QC flags ingest recorded (``uns["qc"]["flags"]``: a step that removed most of
    the events, lymphocytes by their markers removed)."""
    qc = adata.uns.get("qc") or {}
    flags = qc.get("flags") if isinstance(qc, Mapping) else None
    if flags is None:
        return []
    return [str(flag) for flag in np.atleast_1d(np.asarray(flags, dtype=object)) if str(flag)]


def _gate_reasons(unreliable: Mapping[tuple[str, str], str]) -> str:
    """One sentence per unreliable gate: ``CD19 gate nonspecific: ...``."""
    return "; ".join(f"{marker}{'' if level == 'pos' else ' ' + level} gate {text}"
                     for (marker, level), text in unreliable.items())


#: A baseline with fewer T cells (% of lymphocytes) than this is implausible: CD3 failed.
_MIN_BASELINE_T_PCT = 5.0
#: ... and with fewer B cells: prior B-cell depletion, or the CD19/CD20 gates failed.
_MIN_BASELINE_B_PCT = 1.0
#: Lineage markers whose 0.5-99.5% range is below this (transformed units) look squashed.
_MIN_MARKER_RANGE = 0.5


def plausibility_flags(columns: Mapping[str, np.ndarray], record: Mapping[str, Any], *,
                       day: int | None, groups: set[str]) -> list[str]:
    """Sample-level flags of results a user must check before reading them.

    - ``no_cd3_in_panel``: B cells are CD19+ or CD20+ among lymphocytes; T and NK cells are
      not told apart (``lymphocyte_unresolved``).
    - ``compressed_values``: every lineage marker (CD3, CD19, CD20) spans less than 0.5
      transformed units: values that look compensated/transformed twice (set
      ``compensation: {source: none}`` / ``transform: {method: none}`` for that panel).
    - ``few_t_cells_at_baseline`` (< 5% of lymphocytes) and ``few_b_cells_at_baseline``
      (< 1%): a baseline (day <= 0) without them is implausible before CAR-T, or shows prior
      B-cell depletion (rituximab) or failed gates.
    - ``instrument_mix``: the sample's gates were learned apart from samples of the other
      kind of instrument (mass vs fluorescence cytometry) in its panel group.
    """
    flags = []
    if "CD3" not in columns:
        flags.append("no_cd3_in_panel")
    lineage = [columns[m] for m in ("CD3", "CD19", "CD20") if m in columns]
    if lineage and len(lineage[0]) >= 100:
        spans = [np.subtract(*np.nanquantile(v, [0.995, 0.005])) for v in lineage]
        if max(spans) < _MIN_MARKER_RANGE:
            flags.append("compressed_values")
    lymphocytes = record.get("lymphocytes") or 0
    if day is not None and day <= 0 and lymphocytes >= 100:
        t_cells = record.get("t_cells")
        if t_cells is not None and 100.0 * t_cells / lymphocytes < _MIN_BASELINE_T_PCT:
            flags.append("few_t_cells_at_baseline")
        b_cells = record.get("b_cells")
        if b_cells is not None and 100.0 * b_cells / lymphocytes < _MIN_BASELINE_B_PCT:
            flags.append("few_b_cells_at_baseline")
    if any(str(g).endswith((":mass_cytometry", ":fluorescence")) for g in groups):
        flags.append("instrument_mix")
    return flags


def lineage_qc_row(counts: pd.DataFrame) -> pd.DataFrame:
    """The sample's ``lineage_gate`` row for results/tables/qc.tsv (QC table columns).

    ``events_in`` are the scatter-gated events, ``events_out`` the lymphocytes by markers;
    the T, B and NK shares and the purity (lymphocytes as % of the scatter gate) are added
    as columns and summarised in ``detail``.
    """
    row = counts.iloc[0]
    events_in = int(row["events_qc_pass"])
    if row["lymphocytes"] is None or pd.isna(row["lymphocytes"]):
        # Not evaluable: the lineage gates it rests on are unreliable.
        return pd.DataFrame([{
            "sample_id": row["sample_id"], "step": "lineage_gate", "events_in": events_in,
            "events_removed": None, "events_out": None,
            "detail": f"lymphocytes not evaluable: {row.get('not_evaluable_reason', '')}",
            "t_pct_lymphocytes": float("nan"), "b_pct_lymphocytes": float("nan"),
            "nk_pct_lymphocytes": float("nan"), "lymphocyte_purity_pct": float("nan"),
        }])
    lymphocytes = int(row["lymphocytes"])

    def share(count: Any) -> float:
        if count is None or pd.isna(count) or not lymphocytes:
            return float("nan")  # not measured (e.g. T and NK without CD3 in the panel)
        return 100.0 * float(count) / lymphocytes

    t_pct, b_pct, nk_pct = share(row["t_cells"]), share(row["b_cells"]), share(row["nk_cells"])
    purity = 100.0 * lymphocytes / events_in if events_in else float("nan")
    rule = counts.attrs.get("lymphocyte_gate", {}).get("nk_rule", "")
    return pd.DataFrame([{
        "sample_id": row["sample_id"], "step": "lineage_gate", "events_in": events_in,
        "events_removed": events_in - lymphocytes, "events_out": lymphocytes,
        "detail": (f"lymphocytes by markers: T {t_pct:.1f}%, B {b_pct:.1f}%, NK {nk_pct:.1f}%;"
                   f" purity {purity:.1f}% of the scatter gate; NK: {rule}"),
        "t_pct_lymphocytes": t_pct, "b_pct_lymphocytes": b_pct, "nk_pct_lymphocytes": nk_pct,
        "lymphocyte_purity_pct": purity,
    }])


def annotate_with_gates(adata: Any, *, config: Mapping[str, Any], row: Mapping[str, Any],
                        gates: pd.DataFrame, thresholds: pd.DataFrame | None = None,
                        gates_path: str | os.PathLike | None = None
                        ) -> tuple[Any, pd.DataFrame]:
    """Annotate one mapped sample with its own gates: the ``annotate`` step.

    The one home of annotation with learned gates: ``bcellmap annotate``,
    ``bcellmap map-annotate-flow`` and :func:`bcellmap.tl.annotate` all call it.

    Parameters
    ----------
    adata
        The mapped AnnData (QC-passed events; without ``obs["metacluster"]`` no cluster
        phenotypes are reported).
    config
        The merged config (``annotate.subsets``, ``annotate.gating``).
    row
        The sample's ``sample_id``, ``modality`` and ``day`` (None: unknown), e.g. its
        sample-sheet row.
    gates
        Every sample's own gates (``gates.tsv``: ``sample_id``, ``marker``, ``level``,
        ``threshold``, ...); this sample's rows are used.
    thresholds
        The cohort's reference gates (``thresholds.tsv``), of which the sample's group is
        stored in ``uns["thresholds"]``; None: the sample's own gates are stored.
    gates_path
        The file ``gates`` came from, for messages.

    Returns
    -------
    The annotated copy and the one-row counts table (:func:`annotate_sample`).

    Raises
    ------
    InputError
        The gates table has no gates for this sample.
    """
    from .gating import gates_for_sample

    sample_id = str(row["sample_id"])
    rules = load_subset_rules(config)
    if "sample_id" not in gates.columns:
        raise InputError("the gates table has no sample_id column", path=gates_path,
                         sample_id=sample_id)
    own, gate_rows = gates_for_sample(gates, sample_id)
    if gate_rows.empty:
        raise InputError("the gates table has no gates for this sample (was it learned "
                         "without it?)", path=gates_path, sample_id=sample_id)
    used = None
    if thresholds is not None:
        group = str(gate_rows["group"].iloc[0]) if "group" in gate_rows.columns \
            else ALL_SAMPLES
        used = thresholds[thresholds["group"].astype(str) == group]
    gating = dict(config.get("annotate", {}).get("gating", {}) or {})
    day = row.get("day")
    return annotate_sample(
        adata, own, rules, sample_id=sample_id, modality=str(row.get("modality") or "flow"),
        threshold_table=used, gate_table=gate_rows,
        max_mahalanobis=float(gating.get("lymphocyte_max_mahalanobis", 3.5)),
        day=None if day is None or pd.isna(day) else int(day))
