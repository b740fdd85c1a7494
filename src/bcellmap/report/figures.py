"""Figures for the Snakemake report (``bcellmap report``).

Every ``plot_*`` function takes tables (pandas DataFrames as written by ``quantify``,
``kinetics`` and ``collect-qc``) or pooled events and returns a matplotlib ``Figure``; key
artists carry a ``gid`` so tests and users can read back what was drawn. :func:`draw_report`
draws them all from the workflow's tables (:func:`read_report_tables`) under fixed file stems,
and :func:`save_figure` writes each as PNG and SVG (``bcellmap report``).

Conventions shared by the figures: colour-blind-safe Okabe-Ito colours, at most 7 inches wide,
fonts of at least 7 pt, B-cell levels on a log axis. A level at or below zero, or below the
LLOQ (``lloq_*``: the 95% upper bound at zero events, 3 events), is an upper bound: an open
down-triangle at the LLOQ that no line joins, because zero events out of N lymphocytes is not
zero B cells. A level above the LLOQ but below the limit of quantification (``loq_*``,
``below_loq``, when the table has them) is drawn hollow; 95% CI bars come from
``*_ci_low``/``*_ci_high`` when present. Older tables without those columns still draw.
Composition bars resting on fewer than ``report.min_b_events_composition`` B events are
pale, hatched and labelled with their event count.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from ..contracts import SUBSETS, sample_rng, subsample_indices
from ..errors import InputError
from ..io._atomic import atomic_path
from ..io.readers import h5ad_matrix, iter_h5ad_rows, open_h5ad

log = logging.getLogger(__name__)


# Okabe & Ito (2008), the colour-blind-safe palette recommended by Nature Methods (Wong 2011).
OKABE_ITO = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7",
             "#000000")
_SUBSET_COLOURS = {
    "transitional": "#E69F00",
    "naive": "#56B4E9",
    "unswitched_memory": "#009E73",
    "switched_memory": "#0072B2",
    "double_negative": "#CC79A7",
    "plasmablast": "#D55E00",
    "unassigned": "#BBBBBB",
}
_SUBSET_LABELS = {
    "transitional": "transitional",
    "naive": "naive",
    "unswitched_memory": "unswitched memory",
    "switched_memory": "switched memory",
    "double_negative": "double negative",
    "plasmablast": "plasmablast",
    "unassigned": "not assigned",
}
_MARKER_COLOURS = {"cd19": "#0072B2", "cd20": "#D55E00", "b": "#000000"}
_MARKER_LABELS = {"cd19": "CD19+", "cd20": "CD20+", "b": "B cells (CD19+ or CD20+)"}
_DEPLETION_COLOUR = "#009E73"
_RECONSTITUTION_COLOUR = "#E69F00"
_LLOQ_COLOUR = "#777777"
_MAX_WIDTH_IN = 7.0

_STYLE = {
    "font.size": 8,
    "axes.titlesize": 8,
    "axes.labelsize": 8,
    "xtick.labelsize": 7,
    "ytick.labelsize": 7,
    "legend.fontsize": 7,
    "legend.title_fontsize": 7,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.fonttype": "none",  # text stays text in the SVG, editable in a journal's workflow
}

_SAMPLES_COLUMNS = ("sample_id", "patient_id", "day", "modality", "b_cells",
                    "b_pct_lymphocytes", "cd19_pct_lymphocytes", "cd20_pct_lymphocytes",
                    "lloq_pct_lymphocytes")
_KINETICS_COLUMNS = ("patient_id", "modality", "measure", "depletion_day", "reconstitution_day",
                     "aplasia_days", "censored", "last_day")
_QC_COLUMNS = ("sample_id", "step", "events_in", "events_removed", "events_out")


# ---------------------------------------------------------------------------------------------
# Table helpers


def _as_bool(value: Any) -> bool:
    """Read a boolean written by pandas or by hand (True/true/1/yes); empty is False."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return False
    return str(value).strip().lower() in {"true", "1", "yes", "y", "t"}


def _number(value: Any) -> float:
    """A float, or NaN for an empty cell."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return float("nan")


def _lymphocytes_per_ul(samples: pd.DataFrame) -> pd.Series:
    """The clinical lymphocyte count per µL of each sample, NaN where none is known.

    Taken from a ``lymphocytes_per_ul`` column when the table has one; otherwise recovered
    from ``b_per_ul`` and ``b_pct_lymphocytes`` (possible only where B cells were counted).
    """
    if "lymphocytes_per_ul" in samples.columns:
        return pd.to_numeric(samples["lymphocytes_per_ul"], errors="coerce")
    result = pd.Series(np.nan, index=samples.index)
    for measure in ("b", "cd19", "cd20"):
        per_ul_column = f"{measure}_per_ul"
        if per_ul_column not in samples.columns:
            continue
        per_ul = pd.to_numeric(samples[per_ul_column], errors="coerce")
        pct = pd.to_numeric(samples[f"{measure}_pct_lymphocytes"], errors="coerce")
        recovered = per_ul / pct * 100.0
        usable = result.isna() & (pct > 0) & recovered.notna()
        result[usable] = recovered[usable]
    return result


def _has_absolute_counts(samples: pd.DataFrame) -> bool:
    """True when every row can be shown per µL (B level and its LLOQ).

    A row whose B cells are not evaluable (NA, resting on an unreliable gate) keeps the
    patient in cells/µL when its clinical count is known, as the kinetics table does.
    """
    if samples.empty or "b_per_ul" not in samples.columns:
        return False
    b_per_ul = pd.to_numeric(samples["b_per_ul"], errors="coerce")
    gated_out = pd.Series(False, index=samples.index)
    if "not_evaluable" in samples.columns:
        gated_out = samples["not_evaluable"].fillna("").astype(str) != ""
    return bool((b_per_ul.notna() | gated_out).all()
                and _lymphocytes_per_ul(samples).notna().all())


def _column_values(samples: pd.DataFrame, column: str) -> np.ndarray:
    """A numeric column as floats, all NaN when the table does not have it."""
    if column not in samples.columns:
        return np.full(len(samples), np.nan)
    return pd.to_numeric(samples[column], errors="coerce").to_numpy(float)


def _per_ul_or_converted(samples: pd.DataFrame, per_ul_column: str, pct: np.ndarray,
                         lymphocytes: np.ndarray) -> np.ndarray:
    """``per_ul_column`` where the table has a value, else ``pct`` converted with the count."""
    values = _column_values(samples, per_ul_column)
    return np.where(np.isnan(values), pct / 100.0 * lymphocytes, values)


def _levels(samples: pd.DataFrame, measure: str, *, per_ul: bool) -> tuple[np.ndarray, np.ndarray]:
    """Values of one measure (``b``, ``cd19``, ``cd20``) and their LLOQ, in the chosen unit."""
    pct = _column_values(samples, f"{measure}_pct_lymphocytes")
    lloq_pct = _column_values(samples, "lloq_pct_lymphocytes")
    if not per_ul:
        return pct, lloq_pct
    lymphocytes = _lymphocytes_per_ul(samples).to_numpy(float)
    return (_per_ul_or_converted(samples, f"{measure}_per_ul", pct, lymphocytes),
            _per_ul_or_converted(samples, "lloq_per_ul", lloq_pct, lymphocytes))


_COUNT_COLUMNS = {"b": "b_cells", "cd19": "cd19_pos", "cd20": "cd20_pos"}


def _loq_and_ci(samples: pd.DataFrame, measure: str, *,
                per_ul: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Limit of quantification and 95% CI bounds of one measure, NaN where not in the table.

    Read from ``loq_pct_lymphocytes`` / ``loq_per_ul`` and ``{value column}_ci_low`` /
    ``_ci_high`` (``{measure}_pct_lymphocytes_ci_*``, ``{measure}_per_ul_ci_*``); where only
    the % columns (or the event-count columns ``b_cells_ci_*``) have them, they are converted
    with the lymphocyte counts. Older tables without these columns give NaN: no LOQ line and
    no error bars are drawn.
    """
    lymphocyte_events = _column_values(samples, "lymphocytes")
    loq = _column_values(samples, "loq_pct_lymphocytes")
    bounds = []
    for side in ("ci_low", "ci_high"):
        pct = _column_values(samples, f"{measure}_pct_lymphocytes_{side}")
        count = _column_values(samples, f"{_COUNT_COLUMNS[measure]}_{side}")
        with np.errstate(divide="ignore", invalid="ignore"):
            from_count = np.where(lymphocyte_events > 0, count / lymphocyte_events * 100.0,
                                  np.nan)
        bounds.append(np.where(np.isnan(pct), from_count, pct))
    if not per_ul:
        return loq, bounds[0], bounds[1]
    lymphocytes = _lymphocytes_per_ul(samples).to_numpy(float)
    loq = _per_ul_or_converted(samples, "loq_per_ul", loq, lymphocytes)
    low = _per_ul_or_converted(samples, f"{measure}_per_ul_ci_low", bounds[0], lymphocytes)
    high = _per_ul_or_converted(samples, f"{measure}_per_ul_ci_high", bounds[1], lymphocytes)
    return loq, low, high


def _unit_label(per_ul: bool) -> str:
    return "cells/µL" if per_ul else "% of lymphocytes"


def _plotted_levels(values: np.ndarray, lloq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Positions on the log axis and a mask of levels below the LLOQ (drawn at the LLOQ).

    A level at or below zero with no LLOQ known stays NaN here and is placed at the axis
    floor by the caller.
    """
    below = (values <= 0) | (np.isfinite(lloq) & (values < lloq))
    below &= ~np.isnan(values)
    shown = np.where(below, np.where(lloq > 0, lloq, np.nan), values)
    return shown, below


@dataclass
class _Trace:
    """One measure of one patient and modality, split by how each visit may be read.

    ``below_lloq``: an upper bound only (fewer events than the 95% upper bound at zero
    events, zero included), drawn as an open down-triangle at the LLOQ (``shown``).
    ``imprecise``: measured but below the limit of quantification (LOQ), a hollow marker at
    its value. ``precise``: everything else that was measured, a filled marker. ``line``
    holds the measured values with NaN at below-LLOQ visits, so no line segment runs through
    a visit that was not measured.
    """

    days: np.ndarray
    values: np.ndarray
    lloq: np.ndarray
    loq: np.ndarray
    ci_low: np.ndarray
    ci_high: np.ndarray
    shown: np.ndarray
    line: np.ndarray
    below_lloq: np.ndarray
    imprecise: np.ndarray
    precise: np.ndarray


def _trace(part: pd.DataFrame, measure: str, *, per_ul: bool) -> _Trace:
    """The :class:`_Trace` of ``measure`` over the (day-sorted) rows of ``part``."""
    values, lloq = _levels(part, measure, per_ul=per_ul)
    loq, ci_low, ci_high = _loq_and_ci(part, measure, per_ul=per_ul)
    shown, below_lloq = _plotted_levels(values, lloq)
    measured = np.isfinite(values) & ~below_lloq
    imprecise = measured & np.isfinite(loq) & (values < loq)
    if measure == "b" and "below_loq" in part.columns:
        flagged = np.array([_as_bool(v) for v in part["below_loq"]], dtype=bool)
        imprecise |= measured & flagged
    return _Trace(days=part["day"].to_numpy(float), values=values, lloq=lloq, loq=loq,
                  ci_low=ci_low, ci_high=ci_high, shown=shown,
                  line=np.where(below_lloq, np.nan, values), below_lloq=below_lloq,
                  imprecise=imprecise, precise=measured & ~imprecise)


def _draw_ci(ax, trace: _Trace, colour: str, gid: str, *, lw: float = 0.8) -> bool:
    """95% CI bars at measured visits (none at upper-bound-only visits); True if any drawn."""
    low = np.where(np.isfinite(trace.ci_low), trace.ci_low, trace.line)
    high = np.where(np.isfinite(trace.ci_high), trace.ci_high, trace.line)
    usable = (~trace.below_lloq & np.isfinite(trace.line)
              & (np.isfinite(trace.ci_low) | np.isfinite(trace.ci_high)))
    if not usable.any():
        return False
    # A lower bound of 0 cannot be drawn on the log axis: the bar runs to the axis bottom.
    low = np.where(low > 0, low, np.nan)
    floor = float(np.nanmin(np.concatenate([low[usable], trace.line[usable]]))) / 10.0
    low = np.where(np.isnan(low), floor, low)
    ax.vlines(trace.days[usable], low[usable], high[usable], colors=colour, lw=lw, zorder=2,
              gid=gid)
    return True


def _limit_events(samples: pd.DataFrame, column: str, default: str) -> str:
    """The event count behind a limit column (``3``, ``50``), for legend labels."""
    pct = _column_values(samples, column)
    events = pct / 100.0 * _column_values(samples, "lymphocytes")
    events = events[np.isfinite(events)]
    if events.size == 0:
        return default
    rounded = np.unique(np.round(events, 1))
    return f"{rounded[0]:g}" if rounded.size == 1 else default


def _flags(row: pd.Series | None) -> set[str]:
    """The semicolon-separated flags of a kinetics row."""
    if row is None:
        return set()
    value = row.get("flags")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return set()
    return {flag.strip() for flag in str(value).split(";") if flag.strip()}


def _patient_flags(kinetics: pd.DataFrame, patient_id: str, modality: str) -> set[str]:
    """Flags on any kinetics row (any measure) of one patient and modality."""
    if "flags" not in kinetics.columns:
        return set()
    rows = kinetics[(kinetics["patient_id"] == patient_id) & (kinetics["modality"] == modality)]
    flags: set[str] = set()
    for _, row in rows.iterrows():
        flags |= _flags(row)
    return flags


def _axis_floor(*arrays: np.ndarray) -> float:
    """A lower y limit below every positive value drawn (for the log axis)."""
    positive = np.concatenate([a[np.isfinite(a) & (a > 0)] for a in arrays] + [np.array([])])
    if positive.size == 0:
        return 1e-3
    return float(positive.min()) / 3.0


def _log_axis(ax, floor: float, drawn: Sequence[np.ndarray]) -> None:
    """Log y axis over at least two decades, labelled in plain numbers (0.1, 1, 10)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    top = max([float(np.nanmax(a)) for a in drawn if np.isfinite(a).any()] + [floor])
    top = max(top * 2.0, floor * 100.0)
    ax.set_yscale("log")
    ax.set_ylim(floor / 1.5, top)
    ax.yaxis.set_major_formatter(FuncFormatter(lambda value, _: f"{value:g}"))
    ax.yaxis.set_minor_formatter(NullFormatter())


def _patient_modality(samples: pd.DataFrame, patient_id: str) -> str | None:
    """The modality that carries a patient's kinetics: flow when present, else scrna."""
    modalities = set(samples.loc[samples["patient_id"] == patient_id, "modality"])
    for modality in ("flow", "scrna"):
        if modality in modalities:
            return modality
    return None


def _kinetics_row(kinetics: pd.DataFrame, patient_id: str, modality: str | None,
                  *, measure: str = "b") -> pd.Series | None:
    """The kinetics row of one patient, modality and measure, or None when absent."""
    rows = kinetics[(kinetics["patient_id"] == patient_id) & (kinetics["measure"] == measure)]
    if modality is not None and (rows["modality"] == modality).any():
        rows = rows[rows["modality"] == modality]
    if rows.empty:
        return None
    return rows.iloc[0]


def _read_table(path: str | Path, columns: Sequence[str]) -> pd.DataFrame:
    """Read a tab-separated table, ids as text, and check its required columns."""
    from ..io.readers import read_table

    return read_table(path, required=columns, empty_ok=True)


def _message_axes(ax, message: str) -> None:
    """Say in the panel why there is nothing to draw (instead of an empty frame)."""
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, wrap=True,
            color="#444444")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_visible(False)


def _palette(labels: Sequence[str]) -> dict[str, str]:
    """Okabe-Ito colours for category labels; more than eight labels cycle tab10-colorblind."""
    extra = plt.style.library["tableau-colorblind10"]["axes.prop_cycle"].by_key()["color"]
    colours = list(OKABE_ITO[:7]) + list(extra)
    return {label: colours[i % len(colours)] for i, label in enumerate(labels)}


# ---------------------------------------------------------------------------------------------
# Per patient and cohort kinetics


_DISCORDANCE_COLOUR = "#CC79A7"
_DISCORDANCE_TEXT = "CD19−CD20+ B cells: possible CD19 loss/masking"


def _draw_trace(ax, trace: _Trace, *, colour: str, marker: str, size: float, style: str,
                lw: float, label: str | None, gid: str, alpha: float = 1.0,
                ci_gid: str | None = None) -> None:
    """One trace: measured line (broken at below-LLOQ visits), filled/hollow/triangle markers.

    Gids: ``level_{gid}`` (line; the caller may rename), ``measured_{gid}`` (filled: at or
    above the LOQ), ``below_loq_{gid}`` (hollow, at the value: above the LLOQ, below the
    LOQ), ``below_lloq_{gid}`` (open down-triangles at the LLOQ: upper bounds), and
    ``ci_gid`` for the 95% CI bars when the table has them.
    """
    ax.plot(trace.days, trace.line, style, color=colour, lw=lw, alpha=alpha, label=label,
            gid=gid)
    suffix = gid.removeprefix("level_").removeprefix("trajectory_")
    ax.scatter(trace.days[trace.precise], trace.line[trace.precise], marker=marker, s=size,
               color=colour, zorder=3, gid=f"measured_{suffix}")
    ax.scatter(trace.days[trace.imprecise], trace.line[trace.imprecise], marker=marker, s=size,
               facecolors="white", edgecolors=colour, linewidths=1.0, zorder=3,
               gid=f"below_loq_{suffix}")
    bound = trace.below_lloq & np.isfinite(trace.shown)
    ax.scatter(trace.days[bound], trace.shown[bound], marker="v", s=size * 1.2,
               facecolors="white", edgecolors=colour, linewidths=1.0, zorder=3,
               gid=f"below_lloq_{suffix}")
    if ci_gid is not None:
        _draw_ci(ax, trace, colour, ci_gid)


def _limit_legend(handles: list, labels: list, traces: Sequence[_Trace]) -> None:
    """Legend entries for the marker kinds actually drawn."""
    if any(t.imprecise.any() for t in traces):
        handles.append(Line2D([], [], marker="o", ls="", markerfacecolor="white",
                              markeredgecolor="#444444"))
        labels.append("below LOQ: measured, imprecise")
    if any((t.below_lloq & np.isfinite(t.shown)).any() for t in traces):
        handles.append(Line2D([], [], marker="v", ls="", markerfacecolor="white",
                              markeredgecolor="#444444"))
        labels.append("< LLOQ: upper bound, drawn at LLOQ,\nnot joined (not measured)")
    if any(np.isfinite(t.ci_low).any() or np.isfinite(t.ci_high).any() for t in traces):
        handles.append(Line2D([], [], marker="|", ls="", color="#444444", markersize=8))
        labels.append("95% CI")


def plot_patient(samples: pd.DataFrame, kinetics: pd.DataFrame, patient_id: str) -> Figure:
    """CD19+ and CD20+ B cells of one patient over time, on a log axis.

    Parameters
    ----------
    samples
        ``results/tables/samples.tsv``.
    kinetics
        ``results/tables/kinetics.tsv``; depletion and reconstitution days are read from the
        patient's measure ``b`` row (flow when the patient has flow data, else scRNA); its
        ``flags`` (any measure) give ``cd19_cd20_discordance``, ``unconfirmed``.
    patient_id
        The patient to draw.

    Returns
    -------
    The figure. Cells/µL when every sample of the patient has an absolute count, else % of
    lymphocytes. A visit below its LLOQ is an upper bound: an open down-triangle at the LLOQ
    and never joined by the measured line; one above the LLOQ but below the LOQ (when the
    table has ``loq_*``) is a hollow marker at its value. Artists with gids:
    ``level_{measure}_{modality}`` (lines, y = measured level, NaN at below-LLOQ visits),
    ``measured_*``, ``below_loq_*``, ``below_lloq_*`` (markers, same suffix), ``ci_*`` (95%
    CI bars, when the table has ``*_ci_low``/``*_ci_high``), ``lloq_{modality}`` and
    ``loq_{modality}`` (limit lines, y per visit), ``discordance_{modality}`` (markers at the
    visits with CD19−CD20+ B events when the patient is flagged ``cd19_cd20_discordance``),
    ``discordance_note``, ``day0``, ``depletion``, ``reconstitution``, ``censored``.
    """
    rows = samples[samples["patient_id"] == patient_id].sort_values(["modality", "day"])
    per_ul = _has_absolute_counts(rows)
    modality_main = _patient_modality(samples, patient_id)
    kinetic = _kinetics_row(kinetics, patient_id, modality_main)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(_MAX_WIDTH_IN, 3.2), layout="constrained")
        if rows.empty:
            _message_axes(ax, f"No samples for patient {patient_id}")
            return fig
        drawn: list[np.ndarray] = []
        traces: list[_Trace] = []
        floor_points: list[tuple[np.ndarray, str]] = []
        discordant: list[tuple[np.ndarray, np.ndarray, str]] = []
        flagged_discordance = False
        modalities = [m for m in ("flow", "scrna") if m in set(rows["modality"])]
        for modality in modalities:
            part = rows[rows["modality"] == modality]
            style = "--" if modality == "scrna" and len(modalities) > 1 else "-"
            name = "flow" if modality == "flow" else "scRNA"
            suffix = "" if len(modalities) == 1 else f" ({name})"
            by_measure: dict[str, _Trace] = {}
            # CD19 wider and bigger beneath CD20, so both stay visible where they coincide.
            for measure, marker, width, size in (("cd19", "o", 2.4, 42), ("cd20", "s", 1.0, 14)):
                trace = _trace(part, measure, per_ul=per_ul)
                by_measure[measure] = trace
                colour = _MARKER_COLOURS[measure]
                _draw_trace(ax, trace, colour=colour, marker=marker, size=size, style=style,
                            lw=width, label=f"{_MARKER_LABELS[measure]}{suffix}",
                            gid=f"level_{measure}_{modality}",
                            ci_gid=f"ci_{measure}_{modality}")
                traces.append(trace)
                drawn += [trace.shown, trace.ci_high]
                missing = trace.below_lloq & np.isnan(trace.shown)
                if missing.any():
                    floor_points.append((trace.days[missing], colour))
            reference = by_measure["cd19"]
            for name, limit, style, width, fallback in (
                    ("LLOQ", reference.lloq, ":", 1.0, "3"),
                    ("LOQ", reference.loq, "-.", 0.8, "LOQ")):
                if np.isfinite(limit).any():
                    events = _limit_events(part, f"{name.lower()}_pct_lymphocytes", fallback)
                    ax.plot(reference.days, limit, style, color=_LLOQ_COLOUR, lw=width,
                            label=f"{name} ({events} events){suffix}",
                            gid=f"{name.lower()}_{modality}")
                    drawn.append(limit)
            if "cd19_cd20_discordance" in _patient_flags(kinetics, patient_id, modality):
                flagged_discordance = True
                cd20 = by_measure["cd20"]
                present = _column_values(part, "cd19neg_cd20pos") > 0
                level = np.where(np.isfinite(cd20.line), cd20.line, cd20.shown)
                present &= np.isfinite(level)
                discordant.append((cd20.days[present], level[present], modality))
        for _, level, _ in discordant:
            drawn.append(level * 2.2 * 1.6)  # room for the discordance stars
        floor = _axis_floor(*drawn)
        for days, colour in floor_points:
            ax.scatter(days, np.full(days.shape, floor), marker="v", s=18, facecolors="white",
                       edgecolors=colour, zorder=3, gid="zero_no_lloq")
        _log_axis(ax, floor, drawn)
        for days, level, modality in discordant:
            # Above the CD20 marker (log axis: a constant factor is a constant distance).
            ax.scatter(days, level * 2.2, marker="*", s=55, color=_DISCORDANCE_COLOUR,
                       edgecolors="#000000", linewidths=0.4, zorder=4,
                       gid=f"discordance_{modality}")
        _mark_kinetics(ax, kinetic, _patient_flags(kinetics, patient_id, modality_main)
                       if modality_main else set())
        gated_out = _not_evaluable_days(rows)
        if gated_out:
            # Every visit on the axis, those without a value too.
            days = rows["day"].to_numpy(float)
            low, high = ax.get_xlim()
            pad = 0.03 * max(float(np.nanmax(days) - np.nanmin(days)), 10.0)
            ax.set_xlim(min(low, float(np.nanmin(days)) - pad),
                        max(high, float(np.nanmax(days)) + pad))
        for modality, days in gated_out.items():
            # No value: an X on the top edge, never a point on the curve.
            ax.scatter(days, np.ones(len(days)), transform=ax.get_xaxis_transform(),
                       marker="X", s=40, color=_UNRELIABLE_COLOUR, clip_on=False, zorder=5,
                       gid=f"not_evaluable_{modality}")
        handles, labels = ax.get_legend_handles_labels()
        _limit_legend(handles, labels, traces)
        if floor_points:
            handles.append(Line2D([], [], marker="v", ls="", markerfacecolor="white",
                                  markeredgecolor="#444444"))
            labels.append("0 events, no LLOQ (axis floor)")
        if gated_out:
            handles.append(Line2D([], [], marker="X", ls="", color=_UNRELIABLE_COLOUR))
            labels.append("not evaluable: rests on an\nunreliable gate (no value)")
        if flagged_discordance:
            handles.append(Line2D([], [], marker="*", ls="", color=_DISCORDANCE_COLOUR,
                                  markeredgecolor="#000000", markersize=8))
            labels.append("CD19−CD20+ B cells present:\npossible CD19 loss/masking")
            note = ax.set_title("★ " + _DISCORDANCE_TEXT, loc="right", fontsize=7,
                                bbox={"boxstyle": "round,pad=0.2", "fc": "#F5DDEB",
                                      "ec": _DISCORDANCE_COLOUR, "lw": 0.6})
            note.set_gid("discordance_note")
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
        ax.set_xlabel("days after CAR-T infusion")
        ax.set_ylabel(f"B cells (CD3−), {_unit_label(per_ul)}")
        ax.set_title(f"Patient {patient_id}", loc="left")
    return fig


def _not_evaluable_days(rows: pd.DataFrame) -> dict[str, np.ndarray]:
    """Per modality, the days whose B-cell values rest on an unreliable gate."""
    if "not_evaluable" not in rows.columns:
        return {}
    listed = rows["not_evaluable"].fillna("").astype(str).str.split(";")
    hit = listed.apply(lambda names: bool({"b_cells", "cd19_pos", "cd20_pos", "lymphocytes"}
                                          & set(names)))
    return {str(modality): part["day"].to_numpy(float)
            for modality, part in rows[hit.to_numpy()].groupby("modality")}


def _mark_kinetics(ax, kinetic: pd.Series | None, flags: set[str] | None = None) -> None:
    """Day 0, and the depletion and reconstitution days of the patient's measure b row.

    An ``unconfirmed`` reconstitution (no later sample to confirm it) is drawn dotted and
    says so; a censored aplasia ends in an arrow labelled with the last day.
    """
    ax.axvline(0, color="#000000", lw=0.8, ls="-", gid="day0", label="CAR-T infusion (day 0)")
    if kinetic is None:
        return
    flags = flags or set()
    depletion = _number(kinetic.get("depletion_day"))
    reconstitution = _number(kinetic.get("reconstitution_day"))
    censored = _as_bool(kinetic.get("censored"))
    unconfirmed = "unconfirmed" in flags
    if math.isfinite(depletion):
        ax.axvline(depletion, color=_DEPLETION_COLOUR, lw=1.0, ls="--", gid="depletion",
                   label=f"depletion (day {depletion:g})")
    if math.isfinite(reconstitution):
        label = f"reconstitution (day {reconstitution:g})"
        if unconfirmed:
            label = f"reconstitution (day {reconstitution:g},\nunconfirmed: no later sample)"
        ax.axvline(reconstitution, color=_RECONSTITUTION_COLOUR, lw=1.0,
                   ls=":" if unconfirmed else "--", gid="reconstitution", label=label)
    if math.isfinite(depletion):
        last_day = _number(kinetic.get("last_day"))
        end = reconstitution if math.isfinite(reconstitution) and not censored else last_day
        if not math.isfinite(end):
            end = reconstitution
        if math.isfinite(end):
            label = "B-cell aplasia" + (" (censored)" if censored else "")
            ax.axvspan(depletion, end, color="#DDDDDD", alpha=0.5, lw=0, zorder=0, label=label)
            if censored:
                text = f"censored, day {end:g}" + (" (unconfirmed return)" if unconfirmed
                                                    else "")
                ax.annotate(text, xy=(end, 0.02), xycoords=("data", "axes fraction"),
                            xytext=(-3, 0), textcoords="offset points", ha="right",
                            va="bottom", fontsize=7, color="#444444", gid="censored",
                            arrowprops=None)


def plot_cohort_trajectories(samples: pd.DataFrame, kinetics: pd.DataFrame) -> Figure:
    """All patients' B-cell levels (measure ``b``) over time in one log-axis panel.

    Each patient is drawn from flow samples when it has any, else from scRNA. Cells/µL when
    every drawn sample has an absolute count, else % of lymphocytes. Up to eight patients get
    one colour each; larger cohorts are coloured by reconstitution status. Lines carry the gid
    ``trajectory_{patient_id}`` (y: measured level, NaN at visits below the LLOQ, so no
    segment joins visits that were not measured); markers ``measured_{patient_id}``,
    ``below_loq_{patient_id}`` (hollow: below the LOQ), ``below_lloq_{patient_id}`` (open
    down-triangles at the LLOQ: upper bounds); 95% CI bars ``ci_{patient_id}`` when the table
    has them.
    """
    patients = sorted(samples["patient_id"].unique())
    parts = {}
    for patient in patients:
        modality = _patient_modality(samples, patient)
        parts[patient] = samples[(samples["patient_id"] == patient)
                                 & (samples["modality"] == modality)].sort_values("day")
    per_ul = bool(parts) and all(_has_absolute_counts(p) for p in parts.values())
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(_MAX_WIDTH_IN, 3.4), layout="constrained")
        if not patients:
            _message_axes(ax, "No samples")
            return fig
        by_patient = len(patients) <= len(OKABE_ITO)
        colours = _palette(patients) if by_patient else {}
        status_colours = {True: _RECONSTITUTION_COLOUR, False: "#0072B2"}
        drawn: list[np.ndarray] = []
        traces: list[_Trace] = []
        for patient, part in parts.items():
            trace = _trace(part, "b", per_ul=per_ul)
            kinetic = _kinetics_row(kinetics, patient, _patient_modality(samples, patient))
            reconstituted = kinetic is not None and math.isfinite(
                _number(kinetic.get("reconstitution_day")))
            colour = colours[patient] if by_patient else status_colours[reconstituted]
            _draw_trace(ax, trace, colour=colour, marker="o", size=12, style="-", lw=1.1,
                        alpha=0.9, label=patient if by_patient else None,
                        gid=f"trajectory_{patient}", ci_gid=f"ci_{patient}")
            traces.append(trace)
            drawn += [trace.shown, trace.lloq]
        floor = _axis_floor(*drawn)
        _log_axis(ax, floor, drawn)
        ax.axvline(0, color="#000000", lw=0.8, label="CAR-T infusion (day 0)")
        handles, labels = ax.get_legend_handles_labels()
        if not by_patient:
            handles += [Line2D([], [], color=status_colours[True]),
                        Line2D([], [], color=status_colours[False])]
            labels += ["reconstituted", "not reconstituted"]
        _limit_legend(handles, labels, traces)
        ax.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False,
                  title="patient" if by_patient else None)
        ax.set_xlabel("days after CAR-T infusion")
        ax.set_ylabel(f"B cells (CD3− CD19+ or CD20+),\n{_unit_label(per_ul)}")
        ax.set_title(f"B-cell trajectories, {len(patients)} patient(s)", loc="left")
    return fig


def _cohort_kinetics(samples: pd.DataFrame, kinetics: pd.DataFrame) -> pd.DataFrame:
    """One measure-b kinetics row per patient of the sheet (flow preferred), NaN-filled."""
    records = []
    for patient in sorted(samples["patient_id"].unique()):
        modality = _patient_modality(samples, patient)
        row = _kinetics_row(kinetics, patient, modality)
        record = {"patient_id": patient, "modality": modality}
        for column in ("depletion_day", "reconstitution_day", "aplasia_days", "last_day"):
            record[column] = np.nan if row is None else _number(row.get(column))
        record["censored"] = False if row is None else _as_bool(row.get("censored"))
        if not math.isfinite(record["last_day"]):
            days = samples.loc[samples["patient_id"] == patient, "day"]
            record["last_day"] = float(days.max())
        records.append(record)
    return pd.DataFrame.from_records(records)


def plot_swimmer(samples: pd.DataFrame, kinetics: pd.DataFrame) -> Figure:
    """Swimmer plot of B-cell aplasia, one row per patient.

    A bar runs from the depletion day for ``aplasia_days`` (to reconstitution, or to the last
    sample when censored). A filled diamond marks reconstitution, an arrow censoring, a
    vertical tick the last follow-up. Bars carry the gid ``aplasia_{patient_id}``, censoring
    arrows ``censored_{patient_id}``, reconstitution markers ``reconstitution_{patient_id}``.
    """
    table = _cohort_kinetics(samples, kinetics)
    if not table.empty:
        # Longest aplasia on top; patients never depleted at the bottom.
        table = table.assign(_order=table["aplasia_days"].fillna(-1.0)).sort_values(
            ["_order", "patient_id"], ascending=[True, False]).reset_index(drop=True)
    height = min(9.0, 1.3 + 0.28 * max(len(table), 1))
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(_MAX_WIDTH_IN, height), layout="constrained")
        if table.empty:
            _message_axes(ax, "No patients")
            return fig
        span = float(np.nanmax(table["last_day"])) if table["last_day"].notna().any() else 1.0
        first_day = float(samples["day"].min())
        for y, row in table.iterrows():
            # Follow-up lane: from the first sample of the cohort to the patient's last one.
            ax.plot([min(first_day, 0.0), row["last_day"]], [y, y], color="#BBBBBB", lw=0.8,
                    zorder=0)
            depletion, aplasia = row["depletion_day"], row["aplasia_days"]
            if math.isfinite(depletion) and math.isfinite(aplasia):
                ax.barh(y, aplasia, left=depletion, height=0.55, color="#56B4E9",
                        edgecolor="#0072B2", lw=0.6, gid=f"aplasia_{row['patient_id']}")
                end = depletion + aplasia
                if row["censored"]:
                    ax.annotate("", xy=(end + 0.04 * span, y), xytext=(end, y),
                                arrowprops={"arrowstyle": "-|>", "color": "#000000", "lw": 1.0},
                                gid=f"censored_{row['patient_id']}")
            else:
                ax.text(max(0.0, row["last_day"]) + 0.01 * span, y, "no depletion called",
                        va="center", fontsize=7, color="#444444")
            if math.isfinite(row["reconstitution_day"]):
                ax.plot(row["reconstitution_day"], y, "D", color=_RECONSTITUTION_COLOUR,
                        markeredgecolor="#000000", markersize=5, zorder=3,
                        gid=f"reconstitution_{row['patient_id']}")
            ax.plot(row["last_day"], y, "|", color="#000000", markersize=9, mew=1.5, zorder=3)
        ax.axvline(0, color="#000000", lw=0.8)
        ax.set_yticks(range(len(table)), table["patient_id"])
        ax.set_ylim(-0.7, len(table) - 0.3)
        ax.set_xlim(min(0.0, float(np.nanmin(table["depletion_day"].fillna(0)))) - 0.03 * span,
                    span * 1.12)
        ax.set_xlabel("days after CAR-T infusion (day 0: vertical line)")
        ax.set_ylabel("patient")
        handles = [Patch(facecolor="#56B4E9", edgecolor="#0072B2", label="B-cell aplasia"),
                   Line2D([], [], marker="D", ls="", color=_RECONSTITUTION_COLOUR,
                          markeredgecolor="#000000", label="reconstitution"),
                   Line2D([], [], marker=r"$\rightarrow$", ls="", color="#000000",
                          markersize=10, label="censored (not reconstituted)"),
                   Line2D([], [], marker="|", ls="", color="#000000", markersize=9, mew=1.5,
                          label="last follow-up")]
        ax.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=4,
                  frameon=False)
    return fig


def plot_kaplan_meier(samples: pd.DataFrame, kinetics: pd.DataFrame) -> Figure:
    """Kaplan-Meier estimate of time to B-cell reconstitution (measure b, flow preferred).

    Time runs from infusion to the reconstitution day, or to the last sample for censored
    patients; patients with no depletion called are left out (said in the figure). The curve
    is the proportion still in aplasia (gid ``km``), with its 95% confidence band, censoring
    ticks (gid ``censor_ticks``) and the number at risk below.
    """
    from lifelines import KaplanMeierFitter

    table = _cohort_kinetics(samples, kinetics)
    eligible = table[np.isfinite(table["depletion_day"])] if not table.empty else table
    left_out = len(table) - len(eligible)
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(5.0, 3.6), layout="constrained")
        if eligible.empty:
            _message_axes(ax, "No patient with B-cell depletion called:\n"
                              "no time to reconstitution to estimate")
            return fig
        reconstituted = np.isfinite(eligible["reconstitution_day"]) & ~eligible["censored"]
        durations = np.where(reconstituted, eligible["reconstitution_day"], eligible["last_day"])
        kmf = KaplanMeierFitter(label="still in aplasia")
        kmf.fit(durations, event_observed=reconstituted.to_numpy(), timeline=None)
        survival = kmf.survival_function_.iloc[:, 0]
        timeline = survival.index.to_numpy(float)
        ax.step(timeline, survival.to_numpy(), where="post", color="#0072B2", lw=1.5,
                gid="km", label="still in B-cell aplasia (KM)")
        band = kmf.confidence_interval_survival_function_
        ax.fill_between(band.index.to_numpy(float), band.iloc[:, 0], band.iloc[:, 1], step="post",
                        color="#56B4E9", alpha=0.3, lw=0, label="95% CI")
        censored_times = durations[~reconstituted.to_numpy()]
        ax.plot(censored_times, kmf.survival_function_at_times(censored_times).to_numpy(), "|",
                color="#000000", markersize=8, mew=1.2, gid="censor_ticks", label="censored")
        median = kmf.median_survival_time_
        title = "Time to B-cell reconstitution"
        if math.isfinite(median):
            title += f" (median {median:g} days)"
        ax.set_title(title, loc="left")
        ax.set_ylim(-0.02, 1.05)
        ax.set_xlim(left=0)
        ax.set_xlabel("days after CAR-T infusion")
        ax.set_ylabel("proportion in B-cell aplasia")
        # A decreasing curve leaves the lower left empty.
        ax.legend(loc="lower left", frameon=False)
        if left_out:
            ax.text(0.0, -0.02, f"{left_out} patient(s) without depletion left out",
                    transform=fig.transFigure, fontsize=7, va="bottom", color="#444444")
        _at_risk_row(ax, durations)
    return fig


def _at_risk_row(ax, durations: np.ndarray) -> None:
    """Number at risk (still in aplasia and under follow-up) below each x tick."""
    low, high = ax.get_xlim()
    ticks = [t for t in ax.get_xticks() if low <= t <= high]
    ax.set_xticks(ticks)
    for tick in ticks:
        ax.annotate(f"{int((durations >= tick).sum())}", xy=(tick, 0), xycoords=("data",
                    "axes fraction"), xytext=(0, -30), textcoords="offset points", ha="center",
                    va="top", fontsize=7, gid="at_risk")
    ax.annotate("at risk", xy=(0, 0), xycoords="axes fraction", xytext=(-6, -30),
                textcoords="offset points", ha="right", va="top", fontsize=7)


# ---------------------------------------------------------------------------------------------
# B-cell subset composition


def _subset_percentages(rows: pd.DataFrame) -> pd.DataFrame:
    """% of B cells per subset plus the unassigned remainder; NaN where no B cells."""
    columns = {}
    for subset in SUBSETS:
        column = f"{subset}_pct_b"
        columns[subset] = (pd.to_numeric(rows[column], errors="coerce")
                           if column in rows.columns else pd.Series(np.nan, index=rows.index))
    frame = pd.DataFrame(columns)
    assigned = frame.sum(axis=1, min_count=1)
    frame["unassigned"] = (100.0 - assigned).clip(lower=0).where(assigned.notna())
    return frame


def _b_events_text(n: int) -> str:
    """``n = 1 B event`` / ``n = 12 B events``."""
    return f"n = {n} B event" + ("" if n == 1 else "s")


_FEW_EVENTS_ALPHA = 0.25


def plot_composition_visits(samples: pd.DataFrame, *, min_b_events: int = 50) -> Figure:
    """Stacked bars of B-cell subsets (% of B cells) per visit, one panel per patient.

    Visits with fewer than ``min_b_events`` B events are drawn pale, hatched and labelled with
    their event count (``n = 1 B event``, gid ``{sample_id}:n_b_events``): a bar made of one
    plasmablast event is not "100% plasmablasts". Visits with no B events show an empty
    hatched frame labelled ``n = 0 B events``. Bars carry the gid ``{sample_id}:{subset}``.
    """
    patients = sorted(samples["patient_id"].unique())
    ncols = min(3, max(len(patients), 1))
    nrows = max(1, math.ceil(len(patients) / ncols))
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(nrows, ncols, figsize=(_MAX_WIDTH_IN, 0.6 + 2.1 * nrows),
                                 layout="constrained", squeeze=False, sharey=True)
        for ax in axes.flat[len(patients):]:
            ax.set_visible(False)
        if not patients:
            axes.flat[0].set_visible(True)
            _message_axes(axes.flat[0], "No samples")
            return fig
        any_few = False
        for ax, patient in zip(axes.flat, patients, strict=False):
            rows = samples[samples["patient_id"] == patient].sort_values(["day", "modality"])
            percentages = _subset_percentages(rows)
            b_events = pd.to_numeric(rows["b_cells"], errors="coerce").fillna(0).to_numpy()
            x = np.arange(len(rows))
            few = b_events < min_b_events
            any_few |= bool(few.any())
            bottom = np.zeros(len(rows))
            for subset in (*SUBSETS, "unassigned"):
                heights = percentages[subset].fillna(0).to_numpy()
                for i, (sample_id, height) in enumerate(zip(rows["sample_id"], heights,
                                                            strict=True)):
                    if height <= 0:
                        continue
                    ax.bar(x[i], height, bottom=bottom[i], width=0.8,
                           color=_SUBSET_COLOURS[subset],
                           alpha=_FEW_EVENTS_ALPHA if few[i] else 1.0,
                           hatch="////" if few[i] else None, edgecolor="#555555" if few[i]
                           else "none", lw=0.3, gid=f"{sample_id}:{subset}")
                bottom += heights
            for i in np.flatnonzero(bottom <= 0):
                ax.bar(x[i], 100.0, width=0.8, color="none", edgecolor="#999999", hatch="////",
                       lw=0.5, gid=f"{rows['sample_id'].iloc[i]}:no_b_events")
            for i in np.flatnonzero(few):
                # Written up the bar, on white: legible over any subset colour.
                ax.text(x[i], 50.0, _b_events_text(int(b_events[i])), rotation=90,
                        ha="center", va="center", fontsize=7, color="#000000",
                        gid=f"{rows['sample_id'].iloc[i]}:n_b_events",
                        bbox={"boxstyle": "square,pad=0.1", "fc": "white", "ec": "none",
                              "alpha": 0.85})
            labels = [f"{day}" + (" sc" if modality == "scrna" else "")
                      for day, modality in zip(rows["day"], rows["modality"], strict=True)]
            ax.set_xticks(x, labels, rotation=90)
            ax.set_xlim(-0.6, len(rows) - 0.4)
            ax.set_ylim(0, 100)
            ax.set_title(f"Patient {patient}", loc="left")
        for ax in axes[:, 0]:
            ax.set_ylabel("% of B cells")
        has_scrna = bool((samples["modality"] == "scrna").any())
        for ax in axes.flat[max(0, len(patients) - ncols):len(patients)]:
            ax.set_xlabel("day after infusion" + (" (sc: scRNA)" if has_scrna else ""))
        handles = [Patch(color=_SUBSET_COLOURS[s], label=_SUBSET_LABELS[s])
                   for s in (*SUBSETS, "unassigned")]
        if any_few:
            handles.append(Patch(facecolor="white", edgecolor="#555555", hatch="////",
                                 label=f"< {min_b_events} B events: not a composition\n"
                                       "(n = B events written on the bar)"))
        fig.legend(handles=handles, loc="outside lower center", ncols=4, frameon=False)
    return fig


def _baseline_and_reconstitution(samples: pd.DataFrame, kinetics: pd.DataFrame,
                                 *, min_b_events: int) -> pd.DataFrame:
    """Subset % of B cells per patient at baseline and at reconstitution.

    Baseline: the last sample with day <= 0 of the patient's kinetics modality; reconstitution:
    the sample on the measure-b reconstitution day. Column ``b_events`` holds the B events
    behind the percentages and ``enough`` whether they reach ``min_b_events``; a sample
    below it is kept (to be shown as such) but is not part of a mean. At baseline the last
    sample with enough B events is taken when there is one.
    """
    records = []
    for patient in sorted(samples["patient_id"].unique()):
        modality = _patient_modality(samples, patient)
        rows = samples[(samples["patient_id"] == patient) & (samples["modality"] == modality)]
        events = pd.to_numeric(rows["b_cells"], errors="coerce").fillna(0)
        kinetic = _kinetics_row(kinetics, patient, modality)
        before = rows[rows["day"] <= 0].sort_values("day")
        enough_before = before[events[before.index] >= min_b_events]
        chosen = {"baseline": (enough_before if not enough_before.empty else before).tail(1)}
        if kinetic is not None and math.isfinite(_number(kinetic.get("reconstitution_day"))):
            chosen["reconstitution"] = rows[rows["day"] == _number(kinetic["reconstitution_day"])]
        for timepoint, row in chosen.items():
            if row.empty:
                continue
            row = row.head(1)
            n = int(events[row.index[0]])
            percentages = _subset_percentages(row).iloc[0]
            records.append({"patient_id": patient, "timepoint": timepoint, "b_events": n,
                            "enough": n >= min_b_events and n > 0, **percentages})
    return pd.DataFrame.from_records(
        records, columns=["patient_id", "timepoint", "b_events", "enough", *SUBSETS,
                          "unassigned"])


def plot_composition_baseline_vs_reconstitution(samples: pd.DataFrame, kinetics: pd.DataFrame,
                                                *, min_b_events: int = 50) -> Figure:
    """Cohort B-cell subset composition at baseline vs at reconstitution.

    Bars: mean % of B cells per subset over the patients whose sample has at least
    ``min_b_events`` B events (gids ``mean_{timepoint}_{subset}``); points: those patients
    (gids ``points_{timepoint}_{subset}``). Samples with fewer B events are not averaged:
    they are drawn as open grey points (gids ``few_{timepoint}_{subset}``) and named with
    their event count below the panel (gid ``few_events_note``), e.g. ``P05 reconstitution:
    n = 1 B event``.
    """
    table = _baseline_and_reconstitution(samples, kinetics, min_b_events=min_b_events)
    timepoints = (("baseline", "#999999"), ("reconstitution", _RECONSTITUTION_COLOUR))
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(_MAX_WIDTH_IN, 3.4), layout="constrained")
        if table.empty or not (table["b_events"] > 0).any():
            _message_axes(ax, "No baseline or reconstitution sample with B events")
            return fig
        x = np.arange(len(SUBSETS))
        width = 0.38
        rng = np.random.default_rng(0)  # jitter of points only; not a result
        any_few = False
        for offset, (timepoint, colour) in zip((-width / 2, width / 2), timepoints, strict=True):
            part = table[(table["timepoint"] == timepoint) & table["enough"]]
            few = table[(table["timepoint"] == timepoint) & ~table["enough"]
                        & (table["b_events"] > 0)]
            n = len(part)
            events = int(part["b_events"].sum())
            means = part[list(SUBSETS)].mean(axis=0).to_numpy() if n else np.full(len(SUBSETS),
                                                                                np.nan)
            label = f"{timepoint} (n = {n} patients, {events} B events)"
            for i, subset in enumerate(SUBSETS):
                if n and math.isfinite(means[i]):
                    ax.bar(x[i] + offset, means[i], width=width, color=colour, alpha=0.8,
                           gid=f"mean_{timepoint}_{subset}", label=label if i == 0 else None)
                values = part[subset].dropna().to_numpy()
                ax.scatter(x[i] + offset + rng.uniform(-0.08, 0.08, values.size), values, s=10,
                           color="#000000", zorder=3, gid=f"points_{timepoint}_{subset}",
                           label="individual patients" if (i == 0 and timepoint == "baseline")
                           else None)
                values = few[subset].dropna().to_numpy()
                if values.size:
                    any_few = True
                    ax.scatter(x[i] + offset + rng.uniform(-0.08, 0.08, values.size), values,
                               s=12, facecolors="white", edgecolors="#777777", zorder=3,
                               gid=f"few_{timepoint}_{subset}")
            if n == 0:
                ax.bar([], [], color=colour, label=label)
        if any_few:
            ax.scatter([], [], s=12, facecolors="white", edgecolors="#777777",
                       label=f"< {min_b_events} B events (not in the mean)")
        few = table[~table["enough"]]
        if not few.empty:
            parts = [f"{row.patient_id} {row.timepoint}: {_b_events_text(int(row.b_events))}"
                     for row in few.itertuples()]
            lines = ["; ".join(parts[i:i + 3]) for i in range(0, len(parts), 3)]
            ax.set_xlabel(f"Not averaged (< {min_b_events} B events): " + ";\n".join(lines),
                          fontsize=7, color="#444444")
            ax.xaxis.label.set_gid("few_events_note")
        ax.set_xticks(x, [_SUBSET_LABELS[s].replace(" ", "\n") for s in SUBSETS])
        ax.set_ylabel("% of B cells (bar: mean)")
        ax.set_ylim(0, 100)
        ax.legend(loc="upper right", frameon=False)
        ax.set_title("B-cell subsets at baseline and at reconstitution", loc="left")
    return fig


# ---------------------------------------------------------------------------------------------
# Clustering: pooled events from the annotated h5ads


def pool_annotated(paths: Sequence[str | Path], *, markers: Sequence[str],
                   events_per_sample: int, seed: int) -> pd.DataFrame:
    """A seeded subsample of events from each annotated flow h5ad, pooled.

    Parameters
    ----------
    paths
        ``results/annotated/{sample_id}.h5ad`` files (scRNA ones are skipped).
    markers
        Canonical markers (``var["canonical"]``) whose ``X`` values are kept; markers missing
        from any sample are dropped for all.
    events_per_sample
        At most this many events per sample, drawn without replacement.
    seed
        Seed of the subsampling (files are visited in sorted path order, so the result does
        not depend on the order given).

    Returns
    -------
    One row per pooled event: ``sample_id``, ``metacluster``, ``cell_type``, ``b_subset``,
    ``label`` (``metacluster_cell_type`` when present, else ``cell_type``) and one column per
    marker kept.
    """
    rng = np.random.default_rng(seed)
    parts = []
    for path in sorted(str(p) for p in paths):
        part = _pool_one(path, markers=markers, events_per_sample=events_per_sample, rng=rng)
        if part is not None:
            parts.append(part)
    if not parts:
        return pd.DataFrame(columns=["sample_id", "metacluster", "cell_type", "b_subset",
                                     "label", *markers])
    pooled = pd.concat(parts, ignore_index=True)
    kept = [m for m in markers if m in pooled.columns and pooled[m].notna().all()]
    dropped = [m for m in markers if m not in kept]
    if dropped:
        log.warning("markers missing from some annotated samples, left out of the clustering "
                    "figures: %s", ", ".join(dropped))
    return pooled[["sample_id", "metacluster", "cell_type", "b_subset", "label", *kept]]


_POOL_OBS = ("metacluster", "cell_type", "b_subset", "metacluster_cell_type")


def _pool_one(path: str, *, markers: Sequence[str], events_per_sample: int,
              rng: np.random.Generator) -> pd.DataFrame | None:
    """One annotated file's share of :func:`pool_annotated` (None: scRNA or no events).

    Reads only ``uns["sample"]``, ``var``, the obs columns pooled and the X rows drawn (h5py,
    as :func:`read_gate_visit`): reading the whole ``uns`` of every file was most of the
    time of pooling.
    """
    from anndata.io import read_elem

    with open_h5ad(path) as handle:
        try:
            uns = handle["uns"] if "uns" in handle else {}
            sample = dict(read_elem(uns["sample"])) if "sample" in uns else {}
            sample_id = str(sample.get("sample_id", Path(path).stem))
            if str(sample.get("modality", "flow")) == "scrna":
                return None
            obs_group, var = handle["obs"], read_elem(handle["var"])
            x_node = handle["X"]
        except (KeyError, TypeError, ValueError) as exc:
            raise InputError(f"cannot be read as an annotated sample ({type(exc).__name__}: "
                             f"{exc})", path=path) from None
        for column in ("metacluster", "cell_type"):
            if column not in obs_group:
                raise InputError(f"obs[{column!r}] is missing", path=path, sample_id=sample_id)
        if "canonical" not in var.columns:
            raise InputError("var['canonical'] is missing", path=path, sample_id=sample_id)
        x = h5ad_matrix(x_node)
        n_obs = int(x.shape[0])
        if n_obs == 0:
            return None
        canonical = var["canonical"].astype(str).tolist()
        present = [m for m in markers if m in canonical]
        take = min(n_obs, int(events_per_sample))
        rows = subsample_indices(n_obs, take, rng)
        values = _read_rows(x, rows, [canonical.index(m) for m in present])
        obs = {c: np.asarray(read_elem(obs_group[c]))[rows] for c in _POOL_OBS
               if c in obs_group}
    part = pd.DataFrame(values, columns=present)
    part.insert(0, "sample_id", sample_id)
    part.insert(1, "metacluster", obs["metacluster"])
    part.insert(2, "cell_type", _text_array(obs["cell_type"]))
    part.insert(3, "b_subset", _text_array(obs["b_subset"]) if "b_subset" in obs
                else np.full(take, ""))
    label = "metacluster_cell_type" if "metacluster_cell_type" in obs else "cell_type"
    part.insert(4, "label", _text_array(obs[label]))
    return part


def _marker_columns(pooled: pd.DataFrame) -> list[str]:
    return [c for c in pooled.columns
            if c not in {"sample_id", "metacluster", "cell_type", "b_subset", "label"}]


def plot_cluster_heatmap(pooled: pd.DataFrame) -> Figure:
    """Median marker value per metacluster, as a heatmap with phenotype row labels.

    The image (gid ``medians``) holds the medians of the pooled events' transformed values,
    rows in metacluster order, columns in marker order. Each row is labelled with the
    metacluster id, the majority phenotype label (with the majority B subset when most of its
    events have one) and its share of the pooled events.
    """
    markers = _marker_columns(pooled)
    with plt.rc_context(_STYLE):
        if pooled.empty or not markers:
            fig, ax = plt.subplots(figsize=(5.0, 2.5), layout="constrained")
            _message_axes(ax, "No annotated flow events with clustering markers")
            return fig
        groups = pooled.groupby("metacluster", sort=True)
        medians = groups[markers].median()
        labels = []
        for metacluster, group in groups:
            label = group["label"].value_counts().idxmax()
            subsets = group["b_subset"][group["b_subset"] != ""]
            if len(subsets) * 2 > len(group):
                label += f" ({_SUBSET_LABELS.get(subsets.value_counts().idxmax(), '?')})"
            share = 100.0 * len(group) / len(pooled)
            labels.append(f"{metacluster}: {label} · {share:.1f}%")
        height = min(9.0, 1.4 + 0.24 * len(medians))
        width = min(_MAX_WIDTH_IN, 3.4 + 0.45 * len(markers))
        fig, ax = plt.subplots(figsize=(width, height), layout="constrained")
        image = ax.imshow(medians.to_numpy(float), aspect="auto", cmap="viridis",
                          interpolation="nearest", gid="medians")
        ax.set_xticks(range(len(markers)), markers, rotation=45, ha="right")
        ax.set_yticks(range(len(labels)), labels)
        values = medians.to_numpy(float)
        middle = np.nanmin(values) + 0.5 * (np.nanmax(values) - np.nanmin(values))
        if values.size <= 400:
            for (i, j), value in np.ndenumerate(values):
                ax.text(j, i, f"{value:.1f}", ha="center", va="center", fontsize=7,
                        color="#000000" if value > middle else "#FFFFFF")
        ax.spines[:].set_visible(False)
        ax.set_xlabel("marker")
        ax.set_ylabel("metacluster: label · % of events")
        fig.colorbar(image, ax=ax, label="median transformed intensity", shrink=0.8)
        ax.set_title(f"Metacluster medians ({len(pooled):,} pooled events, "
                     f"{pooled['sample_id'].nunique()} samples)", loc="left")
    return fig


def embed_umap(values: np.ndarray, *, seed: int, n_neighbors: int = 15) -> np.ndarray:
    """A seeded 2-D UMAP embedding of the rows of ``values``, made as scanpy's ``tl.umap`` makes
    it: bcellmap's graph, umap-learn's layout.

    The graph is bcellmap's exact kNN (:func:`bcellmap.kernels.knn.nearest_neighbors`, on the
    CPU) weighted as UMAP's fuzzy simplicial set (:func:`bcellmap.kernels.leiden.knn_graph`,
    equal to umap-learn's to about 1e-6); umap-learn's ``simplicial_set_embedding`` lays it out
    (spectral initialisation, min_dist 0.3, its default epochs). Building the graph here skips
    umap-learn's neighbour search (pynndescent: about a minute of compiling on its first call)
    and its ``fuzzy_simplicial_set``, whose numba functions (not cached) compile for about
    3.5 s in every new process.
    """
    from umap.umap_ import find_ab_params, simplicial_set_embedding

    from ..kernels.backend import get_backend
    from ..kernels.knn import nearest_neighbors
    from ..kernels.leiden import knn_graph

    n = values.shape[0]
    if n < 3:
        return np.zeros((n, 2))
    values = np.ascontiguousarray(values, dtype=np.float64)
    k = min(n_neighbors, n - 1)
    indices, distances = nearest_neighbors(values, k=k, backend=get_backend(device="cpu"))
    graph = knn_graph(indices, distances, weighting="umap")
    a, b = find_ab_params(1.0, 0.3)  # spread, min_dist
    # A seeded RandomState makes the layout deterministic; parallel=False keeps it so.
    embedding, _ = simplicial_set_embedding(
        data=values, graph=graph.tocoo(), n_components=2, initial_alpha=1.0, a=a, b=b,
        gamma=1.0, negative_sample_rate=5, n_epochs=None,
        init="spectral" if n > k + 1 else "random", random_state=np.random.RandomState(seed),
        metric="euclidean", metric_kwds={}, densmap=False, densmap_kwds={}, output_dens=False,
        parallel=False)
    return np.asarray(embedding, dtype=float)


def plot_embedding(pooled: pd.DataFrame, *, max_events: int = 20_000, seed: int,
                   n_neighbors: int = 15) -> Figure:
    """UMAP of a seeded subsample of pooled events, coloured by cell type and by B subset.

    At most ``max_events`` events are embedded (drawn without replacement with ``seed``).
    Panel 1 has one scatter per cell type (gid ``celltype_{label}``), panel 2 one per B
    subset (gid ``subset_{subset}``) over the non-B events in grey. Points are rasterised so
    the SVG stays small.
    """
    markers = _marker_columns(pooled)
    with plt.rc_context(_STYLE):
        fig, axes = plt.subplots(1, 2, figsize=(_MAX_WIDTH_IN, 3.9), layout="constrained")
        if pooled.empty or not markers:
            for ax in axes:
                _message_axes(ax, "No annotated flow events with clustering markers")
            return fig
        if len(pooled) > max_events:
            chosen = subsample_indices(len(pooled), max_events, np.random.default_rng(seed))
            pooled = pooled.iloc[chosen].reset_index(drop=True)
        coordinates = embed_umap(pooled[markers].to_numpy(float), seed=seed,
                                 n_neighbors=n_neighbors)
        size = float(np.clip(6000 / len(pooled), 0.5, 12))
        cell_types = pooled["cell_type"].to_numpy(str)
        colours = _palette(sorted(set(cell_types)))
        for label, colour in colours.items():
            mask = cell_types == label
            axes[0].scatter(coordinates[mask, 0], coordinates[mask, 1], s=size, color=colour,
                            lw=0, rasterized=True, label=f"{label} ({mask.sum():,})",
                            gid=f"celltype_{label}")
        subsets = pooled["b_subset"].to_numpy(str)
        unlabelled = ~np.isin(subsets, SUBSETS)
        axes[1].scatter(coordinates[unlabelled, 0], coordinates[unlabelled, 1], s=size,
                        color="#DDDDDD", lw=0, rasterized=True, label="not a B subset",
                        gid="subset_none")
        for subset in SUBSETS:
            mask = subsets == subset
            if mask.any():
                axes[1].scatter(coordinates[mask, 0], coordinates[mask, 1], s=size,
                                color=_SUBSET_COLOURS[subset], lw=0, rasterized=True,
                                label=f"{_SUBSET_LABELS[subset]} ({mask.sum():,})",
                                gid=f"subset_{subset}")
        for ax, title in zip(axes, ("cell type", "B-cell subset"), strict=True):
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel("UMAP 1")
            ax.set_ylabel("UMAP 2")
            ax.set_title(title, loc="left")
            ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.08), ncols=2, frameon=False,
                      markerscale=max(1.0, 4.0 / math.sqrt(size)), handletextpad=0.2,
                      columnspacing=0.8)
        fig.suptitle(f"UMAP of {len(pooled):,} pooled events (seed {seed})", x=0.01, ha="left",
                     fontsize=8)
    return fig


# ---------------------------------------------------------------------------------------------
# Gates: per-visit bivariate plots with the stored gates, one figure per patient

_WARNING_COLOUR = "#D55E00"  # Okabe-Ito vermilion: a gate that needs checking
_GATE_COLOUR = "#000000"
_GATE_OBS = ("cell_type", "lymphocyte", "b_subset", "cd19_pos", "cd20_pos")
_GATE_COLUMNS = ("marker", "level", "threshold", "parent", "method", "n_events", "flag",
                 "reference", "negative_above_pct", "positive_below_pct", "reliability",
                 "reliability_detail")
_UNRELIABLE_COLOUR = "#B00000"  # a gate nothing may rest on: its values are not evaluable
_REFERENCE_COLOUR = "#56B4E9"  # Okabe-Ito sky blue: the negative reference (T cells)
_NOT_RELIABLE = ("unreliable", "nonspecific")
_CD3NEG_MARKERS = ("CD19", "CD20")
_B_MARKERS = ("IgD", "CD27", "CD24", "CD38")
# Parents searched, in order, for the gate of each panel (then any parent).
_LINEAGE_PARENTS = ("cd3neg_lymphocytes", "lymphocytes")
_B_PARENTS = ("b_cells",)
_HI_PARENTS = ("b_cells", "naive_b")
_IGD_CD27_QUADRANTS = (  # (subset, IgD positive, CD27 positive)
    ("naive", True, False), ("unswitched_memory", True, True),
    ("switched_memory", False, True), ("double_negative", False, False))
_DENSITY_MIN_EVENTS = 200  # fewer events: single dots instead of a density
_DENSITY_BINS = 60  # bins a side of the density image of a gate panel (as the hexbin grid was)


@dataclass
class GateVisit:
    """What the gate figure needs of one annotated flow sample (see :func:`read_gate_visit`).

    Counts are over all events of the sample (the per-event calls stored in obs, exactly what
    the tables count); the event frames are seeded subsamples for drawing only.

    Attributes
    ----------
    sample_id, patient_id, day
        The visit (``day`` NaN when unknown).
    markers
        Canonical markers present in the sample's panel.
    n_cd3neg
        CD3- lymphocytes (``lymphocyte`` and ``cell_type != "T"``).
    n_b
        B cells (``cell_type == "B"``).
    cd19_cd20
        CD3- lymphocytes per CD19/CD20 quadrant, keys ``CD19+CD20+``, ``CD19-CD20+``,
        ``CD19+CD20-``, ``CD19-CD20-``; empty when obs lacks ``cd19_pos``/``cd20_pos``.
    subsets
        B cells per ``b_subset`` value (``""`` for a B cell without a subset).
    gates
        The stored gate table (``uns["gates"]``), columns as in ``_GATE_COLUMNS``.
    cd3neg_events, b_events
        Subsamples of CD3- lymphocytes (CD19, CD20 values) and of B cells (IgD, CD27, CD24,
        CD38 values), markers absent from the panel left out.
    t_events
        A subsample of T cells (CD19, CD20, IgD, CD27 values): the negative reference of the
        CD19, CD20 and IgD gates, drawn over the panels (empty without T cells).
    """

    sample_id: str
    patient_id: str
    day: float
    markers: tuple[str, ...]
    n_cd3neg: int
    n_b: int
    cd19_cd20: dict[str, int]
    subsets: dict[str, int]
    gates: pd.DataFrame
    cd3neg_events: pd.DataFrame
    b_events: pd.DataFrame
    t_events: pd.DataFrame = field(default_factory=pd.DataFrame)


#: T cells drawn per visit as the negative reference (a cloud, not a density).
_REFERENCE_EVENTS = 600


def _bool_array(values: Any) -> np.ndarray:
    """Booleans from a stored column (bool, 0/1, or text such as "True")."""
    array = np.asarray(values)
    if array.dtype == bool:
        return array
    if array.dtype.kind in "iuf":
        return np.nan_to_num(array.astype(float)) != 0
    return np.array([_as_bool(v) for v in array], dtype=bool)


def _text_array(values: Any) -> np.ndarray:
    """Text labels from a stored column; missing values become ``""``."""
    series = pd.Series(np.asarray(values, dtype=object))
    return series.where(series.notna(), "").astype(str).replace({"nan": ""}).to_numpy()


def _gate_table(value: Any, *, path: object, sample_id: str) -> pd.DataFrame:
    """The stored gate table as a DataFrame with every contract column."""
    if value is None:
        return pd.DataFrame(columns=list(_GATE_COLUMNS))
    table = value.copy() if isinstance(value, pd.DataFrame) else pd.DataFrame(dict(value))
    for column in ("marker", "threshold"):
        if column not in table.columns:
            raise InputError(f"uns['gates'] has no column {column!r}", path=path,
                             sample_id=sample_id)
    for column in ("level", "parent", "method", "flag", "reference", "reliability",
                   "reliability_detail"):
        table[column] = _text_array(table[column]) if column in table.columns else ""
    for column in ("n_events", "negative_above_pct", "positive_below_pct"):
        if column not in table.columns:
            table[column] = np.nan
    table["marker"] = _text_array(table["marker"])
    table["level"] = np.where(table["level"] == "", "pos", table["level"])
    table["threshold"] = pd.to_numeric(table["threshold"], errors="coerce")
    return table.reset_index(drop=True)


def _read_rows(x: Any, rows: np.ndarray, columns: list[int]) -> np.ndarray:
    """Rows (sorted) and columns of a dense or sparse X as floats, one slab at a time."""
    out = np.empty((rows.size, len(columns)), dtype=float)
    if rows.size == 0 or not columns:
        return out
    done = 0
    for part in iter_h5ad_rows(x, rows):
        if hasattr(part, "toarray"):
            part = part[:, columns].toarray()
        else:
            part = np.asarray(part)[:, columns]
        out[done:done + part.shape[0]] = part
        done += part.shape[0]
    return out


def read_gate_visit(source: str | Path | Any, *, samples: pd.DataFrame | None = None,
                    max_events: int = 20_000, seed: int = 0) -> GateVisit:
    """Read what the gate figure needs from one annotated flow h5ad (or an AnnData).

    Only obs ``cell_type``, ``lymphocyte``, ``b_subset``, ``cd19_pos``, ``cd20_pos``, the var
    ``canonical`` names, ``uns["sample"]``, ``uns["gates"]`` and the rows of X that are drawn
    are read, X one block of rows at a time, so large files stay cheap.

    Parameters
    ----------
    source
        ``results/annotated/{sample_id}.h5ad``, or an in-memory ``AnnData``.
    samples
        A table with ``sample_id``, ``patient_id``, ``day``: used where ``uns["sample"]``
        lacks the patient or the day.
    max_events
        At most this many events per panel are kept for drawing (CD3- lymphocytes; B cells),
        drawn without replacement.
    seed
        Config ``seed``; the subsample of a sample depends on it and on the sample id only.
    """
    if isinstance(source, (str, Path)):
        from anndata.io import read_elem

        path: object = source
        with open_h5ad(source) as handle:
            uns = handle["uns"] if "uns" in handle else {}
            sample = dict(read_elem(uns["sample"])) if "sample" in uns else {}
            gates = read_elem(uns["gates"]) if "gates" in uns else None
            var = read_elem(handle["var"])
            obs_group = handle["obs"]
            obs = {c: read_elem(obs_group[c]) for c in _GATE_OBS if c in obs_group}
            x = h5ad_matrix(handle["X"])
            rows, columns, finish = _gate_visit_parts(
                path, sample, gates, var, obs, int(x.shape[0]), samples=samples,
                max_events=max_events, seed=seed)
            values = _read_rows(x, rows, columns)
    else:
        path = getattr(source, "filename", None)
        sample = dict(source.uns.get("sample", {})) if "sample" in source.uns else {}
        gates = source.uns.get("gates")
        obs = {c: source.obs[c].to_numpy() for c in _GATE_OBS if c in source.obs.columns}
        rows, columns, finish = _gate_visit_parts(
            path, sample, gates, source.var, obs, source.n_obs, samples=samples,
            max_events=max_events, seed=seed)
        values = _read_rows(source.X, rows, columns)
    return finish(values)


def _gate_visit_parts(path: object, sample: dict, gates: Any, var: pd.DataFrame,
                      obs: dict[str, Any], n_obs: int, *, samples: pd.DataFrame | None,
                      max_events: int, seed: int):
    """Counts of one visit and the X rows and columns to draw.

    Returns ``(rows, columns, finish)``: sorted rows and column positions of X to read, and
    ``finish(values)`` that builds the :class:`GateVisit` from those values.
    """
    sample_id = str(sample.get("sample_id", Path(str(path)).stem if path else "sample"))
    for column in ("cell_type", "b_subset"):
        if column not in obs:
            raise InputError(f"obs[{column!r}] is missing", path=path, sample_id=sample_id)
    if "canonical" not in var.columns:
        raise InputError("var['canonical'] is missing", path=path, sample_id=sample_id)
    patient_id = str(sample.get("patient_id") or "").strip() or None
    day = sample.get("day")
    day = None if not math.isfinite(_number(day)) else day
    if (patient_id is None or day is None) and samples is not None:
        row = samples[samples["sample_id"].astype(str) == sample_id]
        if not row.empty:
            patient_id = row["patient_id"].iloc[0] if patient_id is None else patient_id
            day = row["day"].iloc[0] if day is None else day
    if patient_id is None:
        raise InputError("no patient_id in uns['sample'] nor in the samples table", path=path,
                         sample_id=sample_id)
    cell_type = _text_array(obs["cell_type"])
    if cell_type.size != n_obs:
        raise InputError(f"obs has {cell_type.size} rows but X has {n_obs}", path=path,
                         sample_id=sample_id)
    lymphocyte = (_bool_array(obs["lymphocyte"]) if "lymphocyte" in obs
                  else np.isin(cell_type, ["T", "B", "NK"]))
    cd3neg = lymphocyte & (cell_type != "T")
    is_b = cell_type == "B"
    b_subset = _text_array(obs["b_subset"])[is_b]
    subsets = {str(k): int(v) for k, v in pd.Series(b_subset).value_counts().items()}
    quadrants: dict[str, int] = {}
    if "cd19_pos" in obs and "cd20_pos" in obs:
        cd19 = _bool_array(obs["cd19_pos"])[cd3neg]
        cd20 = _bool_array(obs["cd20_pos"])[cd3neg]
        for name, a, b in (("CD19+CD20+", True, True), ("CD19-CD20+", False, True),
                           ("CD19+CD20-", True, False), ("CD19-CD20-", False, False)):
            quadrants[name] = int(np.sum((cd19 == a) & (cd20 == b)))
    canonical = [str(m) for m in var["canonical"]]
    markers = tuple(dict.fromkeys(canonical))
    lineage = [m for m in _CD3NEG_MARKERS if m in markers]
    b_markers = [m for m in _B_MARKERS if m in markers]
    rng = sample_rng(seed, sample_id)
    cd3neg_rows = np.flatnonzero(cd3neg)
    cd3neg_rows = cd3neg_rows[subsample_indices(cd3neg_rows.size, int(max_events), rng)]
    b_rows = np.flatnonzero(is_b)
    b_rows = b_rows[subsample_indices(b_rows.size, int(max_events), rng)]
    t_rows = np.flatnonzero(cell_type == "T")
    t_rows = t_rows[subsample_indices(t_rows.size, _REFERENCE_EVENTS, rng)]
    rows = np.union1d(np.union1d(cd3neg_rows, b_rows), t_rows)
    wanted = list(dict.fromkeys(lineage + b_markers))
    columns = [canonical.index(m) for m in wanted]
    table = _gate_table(gates, path=path, sample_id=sample_id)

    def finish(values: np.ndarray) -> GateVisit:
        frame = pd.DataFrame(values, columns=wanted)
        return GateVisit(
            sample_id=sample_id, patient_id=str(patient_id), day=_number(day),
            markers=markers, n_cd3neg=int(cd3neg.sum()), n_b=int(is_b.sum()),
            cd19_cd20=quadrants, subsets=subsets, gates=table,
            cd3neg_events=frame.iloc[np.searchsorted(rows, cd3neg_rows)][lineage]
            .reset_index(drop=True),
            b_events=frame.iloc[np.searchsorted(rows, b_rows)][b_markers]
            .reset_index(drop=True),
            t_events=frame.iloc[np.searchsorted(rows, t_rows)][wanted]
            .reset_index(drop=True))

    return rows, columns, finish


def _find_gate(gates: pd.DataFrame, marker: str, level: str,
               parents: Sequence[str]) -> pd.Series | None:
    """The stored gate of a marker and level, from the first preferred parent that has one."""
    rows = gates[(gates["marker"] == marker) & (gates["level"] == level)]
    if rows.empty:
        return None
    for parent in parents:
        match = rows[rows["parent"] == parent]
        if not match.empty:
            return match.iloc[0]
    return rows.iloc[0]


def _day_label(day: float) -> str:
    if not math.isfinite(day):
        return "day ?"
    return f"day {int(day)}" if float(day).is_integer() else f"day {day:g}"


def _pct_text(count: int, total: int) -> str:
    return f"{100.0 * count / total:.1f}%" if total > 0 else "–"


def _panel_limits(values: np.ndarray, thresholds: Sequence[float]) -> tuple[float, float]:
    """Axis limits over the 0.5-99.5 percentile of the events and every gate threshold."""
    finite = values[np.isfinite(values)]
    points = [t for t in thresholds if math.isfinite(t)]
    if finite.size:
        points += [float(v) for v in np.quantile(finite, [0.005, 0.995])]
    if not points:
        return -0.5, 5.0
    lo, hi = min(points), max(points)
    pad = max(0.08 * (hi - lo), 0.25)
    return lo - pad, hi + pad


def _density(ax, x: np.ndarray, y: np.ndarray, extent: tuple[float, float, float, float],
             gid: str) -> None:
    """Density-coloured events; few events as single dots.

    The density is a 2-D histogram over the panel (``_DENSITY_BINS`` square bins a side,
    empty bins blank, counts on a log colour scale) drawn as one image, which an SVG embeds
    at its own size in bins: a rasterised hexbin made the SVG backend render and crop a
    whole-figure buffer for every panel.
    """
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = x[finite], y[finite]
    if x.size >= _DENSITY_MIN_EVENTS:
        x0, x1, y0, y1 = extent
        counts, _, _ = np.histogram2d(x, y, bins=_DENSITY_BINS, range=[[x0, x1], [y0, y1]])
        # histogram2d is indexed [x, y]; an image is [row (y), column (x)].
        counts = np.ma.masked_less(counts.T, 1)
        if counts.count():
            ax.imshow(counts, origin="lower", extent=extent, aspect="auto", cmap="viridis",
                      norm=LogNorm(vmin=1, vmax=max(float(counts.max()), 2.0)),
                      interpolation="none", gid=gid)
    elif x.size:
        ax.scatter(x, y, s=4, color="#444444", lw=0, rasterized=True, gid=gid)


def _reliable(gate: pd.Series | None) -> bool:
    return gate is None or str(gate.get("reliability", "")) not in _NOT_RELIABLE


def _separation_text(gate: pd.Series) -> str:
    """The gate's two separation numbers, as written beside it."""
    parts = []
    for column, label in (("negative_above_pct", "neg ref above"),
                          ("positive_below_pct", "gated below")):
        value = pd.to_numeric(gate.get(column), errors="coerce")
        if value is not None and np.isfinite(value):
            parts.append(f"{label} {value:.1f}%")
    return " · ".join(parts)


def _draw_gate_line(ax, gate: pd.Series | None, *, axis: str, gid: str,
                    span: tuple[float, float] | None = None) -> bool:
    """The gate threshold as a line (``axis`` "x": vertical), its separation written beside it.

    Solid black: a sound gate; dashed vermilion: a method flag (check it); dash-dot dark red:
    unreliable or nonspecific (what rests on it is not evaluable). ``span`` limits the line
    to a range of the other axis (data units), for a gate box. Returns True when a line was
    drawn (the threshold is finite).
    """
    if gate is None or not math.isfinite(float(gate["threshold"])):
        return False
    threshold = float(gate["threshold"])
    flagged = bool(str(gate["flag"]).strip())
    reliable = _reliable(gate)
    colour = (_GATE_COLOUR if reliable and not flagged else
              _WARNING_COLOUR if reliable else _UNRELIABLE_COLOUR)
    style = {"color": colour, "ls": "-" if reliable and not flagged else (
        "--" if reliable else "-."), "lw": 1.0 if reliable else 1.4, "gid": gid, "zorder": 4}
    if span is None:
        if axis == "x":
            ax.axvline(threshold, **style)
        else:
            ax.axhline(threshold, **style)
    elif axis == "x":
        ax.plot([threshold, threshold], list(span), **style)
    else:
        ax.plot(list(span), [threshold, threshold], **style)
    text = _separation_text(gate)
    if text:
        # Along the line, at the far end of the axis: the numbers that say how well it
        # separates (negative reference above it, gated population below it).
        if axis == "x":
            ax.text(threshold, 0.99, f" {text}", transform=ax.get_xaxis_transform(),
                    rotation=90, ha="right", va="top", fontsize=5, color=colour,
                    gid=f"separation:{gid}", zorder=5)
        else:
            ax.text(0.99, threshold, f"{text} ", transform=ax.get_yaxis_transform(),
                    ha="right", va="bottom", fontsize=5, color=colour,
                    gid=f"separation:{gid}", zorder=5)
    return True


def _gate_notes(ax, notes: list[tuple[str, str]], sample_id: str, panel: str) -> None:
    """Under the panel: flagged or missing gates, in the warning colour."""
    for i, (marker, note) in enumerate(notes):
        colour = _UNRELIABLE_COLOUR if "not evaluable" in note else _WARNING_COLOUR
        ax.annotate(note, xy=(0.5, 0.0), xycoords="axes fraction", xytext=(0, -26 - 8 * i),
                    textcoords="offset points", ha="center", va="top", fontsize=6.5,
                    color=colour, annotation_clip=False,
                    gid=f"flag:{sample_id}:{panel}:{marker}")


def _gate_note(marker: str, level: str, gate: pd.Series | None) -> str | None:
    suffix = "hi" if level == "hi" else "+"
    if gate is None:
        return f"no {marker}{suffix} gate stored"
    if not _reliable(gate):
        # The reason in full is in gates.tsv and on the flags page.
        return f"{marker}{suffix} gate {gate['reliability']}: not evaluable"
    flag = str(gate["flag"]).strip()
    if flag:
        # Flags read "CD19:upper_tail"; the marker is already named.
        return f"{marker}{suffix} gate flagged: {flag.removeprefix(f'{marker}:')}"
    if not math.isfinite(float(gate["threshold"])):
        return f"{marker}{suffix} gate: no threshold"
    return None


def _corner(ax, text: str, corner: str, gid: str) -> None:
    x = 0.03 if "left" in corner else 0.97
    y = 0.97 if "upper" in corner else 0.03
    ax.text(x, y, text, transform=ax.transAxes, ha="left" if "left" in corner else "right",
            va="top" if "upper" in corner else "bottom", fontsize=6.5, linespacing=1.0,
            gid=gid, zorder=5,
            bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "alpha": 0.75,
                  "edgecolor": "none"})


def _missing_markers(visit: GateVisit, markers: Sequence[str]) -> list[str]:
    return [m for m in markers if m not in visit.markers]


def _panel_axes(ax, visit: GateVisit, panel: str, xm: str, ym: str,
                events: pd.DataFrame, gates: list[tuple[str, str, pd.Series | None]],
                *, box: bool = False, reference: pd.DataFrame | None = None) -> bool:
    """Draw events and gate lines of one panel; False (with a message) if a marker is absent.

    ``reference``: the negative reference's events (T cells), drawn in sky blue.

    With one of the two markers absent, the other is drawn as a histogram with its gate (a
    CD19-only panel still shows its CD19 gate); the axes then carry the gid ``histogram``.
    """
    missing = _missing_markers(visit, (xm, ym))
    thresholds = {marker: float(g["threshold"]) if g is not None else float("nan")
                  for marker, _, g in gates}
    present = [m for m in (xm, ym) if m not in missing]
    if len(present) == 1 and present[0] in events.columns:
        marker = present[0]
        values = events[marker].to_numpy(float)
        values = values[np.isfinite(values)]
        ax.set_gid("histogram")
        if values.size:
            limits = _panel_limits(values, [thresholds.get(marker, float("nan"))])
            ax.hist(values, bins=80, range=limits, color="#999999", histtype="stepfilled",
                    gid=f"hist:{visit.sample_id}:{panel}")
            if reference is not None and marker in reference.columns and len(reference):
                ref = reference[marker].to_numpy(float)
                ax.hist(ref[np.isfinite(ref)], bins=80, range=limits, color=_REFERENCE_COLOUR,
                        histtype="step", lw=0.8, gid=f"reference:{visit.sample_id}:{panel}",
                        label="T cells (negative reference)")
                ax.legend(loc="upper left", fontsize=5.5, frameon=False)
        gate = {m: g for m, _, g in gates}.get(marker)
        _draw_gate_line(ax, gate, axis="x", gid=f"gate:{visit.sample_id}:{panel}:{marker}")
        notes = [(m, note) for m, level, g in gates
                 if m == marker and (note := _gate_note(m, level, g)) is not None]
        _gate_notes(ax, notes, visit.sample_id, panel)
        ax.text(0.99, 1.0, f"{', '.join(missing)} not in panel", transform=ax.transAxes,
                ha="right", va="bottom", fontsize=6, gid=f"message:{visit.sample_id}:{panel}")
        ax.set_xlabel(f"{marker} (transformed)", labelpad=1)
        ax.set_ylabel("events", labelpad=1)
        return False
    if missing:
        _message_axes(ax, f"{', '.join(missing)} not in panel")
        ax.texts[-1].set_gid(f"message:{visit.sample_id}:{panel}")
        return False
    x = events[xm].to_numpy(float)
    y = events[ym].to_numpy(float)
    xlim = _panel_limits(x, [thresholds.get(xm, float("nan"))])
    ylim = _panel_limits(y, [thresholds.get(ym, float("nan"))])
    _density(ax, x, y, (*xlim, *ylim), gid=f"density:{visit.sample_id}:{panel}")
    if reference is not None and {xm, ym} <= set(reference.columns) and len(reference):
        # The negative reference (T cells) where it lies: what the gates are placed from.
        ax.scatter(reference[xm].to_numpy(float), reference[ym].to_numpy(float), s=1.2, lw=0,
                   color=_REFERENCE_COLOUR, alpha=0.5, rasterized=True, zorder=3,
                   gid=f"reference:{visit.sample_id}:{panel}")
    ax.set_xlim(*xlim)
    ax.set_ylim(*ylim)
    by_marker = {marker: gate for marker, _, gate in gates}
    if box:
        x_thr, y_thr = thresholds.get(xm, float("nan")), thresholds.get(ym, float("nan"))
        x_span = (y_thr, ylim[1]) if math.isfinite(y_thr) else None
        y_span = (x_thr, xlim[1]) if math.isfinite(x_thr) else None
        _draw_gate_line(ax, by_marker.get(xm), axis="x", span=x_span,
                        gid=f"gate:{visit.sample_id}:{panel}:{xm}")
        _draw_gate_line(ax, by_marker.get(ym), axis="y", span=y_span,
                        gid=f"gate:{visit.sample_id}:{panel}:{ym}")
    else:
        _draw_gate_line(ax, by_marker.get(xm), axis="x",
                        gid=f"gate:{visit.sample_id}:{panel}:{xm}")
        _draw_gate_line(ax, by_marker.get(ym), axis="y",
                        gid=f"gate:{visit.sample_id}:{panel}:{ym}")
    notes = [(marker, note) for marker, level, gate in gates
             if (note := _gate_note(marker, level, gate)) is not None]
    _gate_notes(ax, notes, visit.sample_id, panel)
    ax.set_xlabel(f"{xm} (transformed)", labelpad=1)
    ax.set_ylabel(f"{ym} (transformed)", labelpad=1)
    return True


def _few_b_message(ax, visit: GateVisit, panel: str) -> None:
    ax.text(0.5, 0.5, f"n = {visit.n_b:,} B events:\ntoo few to read subsets",
            transform=ax.transAxes, ha="center", va="center", fontsize=7, zorder=5,
            gid=f"message:{visit.sample_id}:{panel}",
            bbox={"boxstyle": "round,pad=0.2", "facecolor": "white", "alpha": 0.85,
                  "edgecolor": "#777777"})


def plot_gates(visits: Sequence[GateVisit], patient_id: str, *,
               min_b_events: int = 50) -> Figure:
    """The gates of every flow visit of one patient: one row per visit, three panels.

    Rows are ordered by day (then sample id) and titled "day N · sample_id". Panels:

    1. CD19 × CD20 of CD3- lymphocytes, the CD19+ and CD20+ gates, and the % of CD3-
       lymphocytes in each quadrant (from obs ``cd19_pos``/``cd20_pos``) and the B count;
    2. IgD × CD27 of B cells, the IgD+ and CD27+ gates and the % of B cells that are naive,
       unswitched memory, switched memory and double negative (from obs ``b_subset``; the
       transitional and plasmablast % are written under the title line);
    3. CD24 × CD38 of B cells, the CD24hi × CD38hi transitional box and its % of B cells,
       and the plasmablast % where a CD27hi gate is stored.

    A visit with fewer than ``min_b_events`` B cells shows its events but no subset %. A gate
    with a non-empty ``flag`` is dashed in vermilion and its flag written under the panel.

    Artist gids: ``gate:{sample_id}:{panel}:{marker}`` (gate lines; panel ``cd19_cd20``,
    ``igd_cd27`` or ``cd24_cd38``), ``pct:{sample_id}:{key}`` (texts; key a quadrant such as
    ``CD19-CD20+``, a subset, or ``b_count``), ``flag:{sample_id}:{panel}:{marker}``,
    ``message:{sample_id}:{panel}`` and ``density:{sample_id}:{panel}``.
    """
    visits = sorted(visits, key=lambda v: (not math.isfinite(v.day),
                                           v.day if math.isfinite(v.day) else 0.0, v.sample_id))
    with plt.rc_context(_STYLE):
        if not visits:
            fig, ax = plt.subplots(figsize=(_MAX_WIDTH_IN, 2.0), layout="constrained")
            _message_axes(ax, f"No annotated flow samples for patient {patient_id}")
            return fig
        fig, axes = plt.subplots(len(visits), 3, figsize=(_MAX_WIDTH_IN, 0.9 + 2.35 * len(visits)),
                                 layout="constrained", squeeze=False)
        for row, visit in zip(axes, visits, strict=True):
            _plot_gate_row(row, visit, min_b_events=min_b_events)
        # One scale per column across visits, so drift and empty (aplastic) panels read
        # against the same axes as the populated visits.
        for column in range(3):
            scatter = [ax for ax in axes[:, column] if ax.get_gid() != "histogram"]
            for limit in ("xlim", "ylim"):
                if not scatter:
                    break
                spans = np.array([getattr(ax, f"get_{limit}")() for ax in scatter])
                for ax in scatter:
                    getattr(ax, f"set_{limit}")(spans[:, 0].min(), spans[:, 1].max())
        fig.suptitle(f"Patient {patient_id}: gates per flow visit (solid: sound gate; dashed "
                     "vermilion: flagged, check it; dash-dot red: unreliable, not evaluable)\n"
                     "beside each gate: % of its negative reference above it, % of the gated "
                     "population below it; sky blue: T cells, the negative reference",
                     x=0.01, ha="left", fontsize=7)
    return fig


def _not_evaluable_panels(gates: pd.DataFrame) -> set[str]:
    """The gate figure's panels whose percentages rest on an unreliable gate."""
    bad = gates[gates["reliability"].isin(_NOT_RELIABLE)]
    positive = set(bad.loc[bad["level"] == "pos", "marker"])
    hi = set(bad.loc[bad["level"] == "hi", "marker"])
    panels = set()
    if positive & {"CD3", "CD19", "CD20"}:
        panels |= {"cd19_cd20", "igd_cd27", "cd24_cd38"}
    if positive & {"IgD", "CD27"}:
        panels.add("igd_cd27")
    if hi & {"CD24", "CD38", "CD27"}:
        panels |= {"igd_cd27", "cd24_cd38"}
    return panels


def _not_evaluable_mark(ax, sample_id: str, panel: str) -> None:
    ax.text(0.5, 0.5, "not evaluable:\na gate it rests on\ncannot be relied on",
            transform=ax.transAxes, ha="center", va="center", fontsize=7, zorder=6,
            color=_UNRELIABLE_COLOUR, gid=f"not_evaluable:{sample_id}:{panel}",
            bbox={"boxstyle": "round,pad=0.25", "facecolor": "white", "alpha": 0.85,
                  "edgecolor": _UNRELIABLE_COLOUR})


def _plot_gate_row(row, visit: GateVisit, *, min_b_events: int) -> None:
    sid = visit.sample_id
    gates = visit.gates
    ax1, ax2, ax3 = row
    unevaluable = _not_evaluable_panels(gates)
    # 1. CD19 x CD20 of CD3- lymphocytes
    ax1.set_title(f"{_day_label(visit.day)} · {sid}\nCD3− lymphocytes (n = {visit.n_cd3neg:,})",
                  loc="left", fontsize=7)
    lineage = [(m, "pos", _find_gate(gates, m, "pos", _LINEAGE_PARENTS))
               for m in ("CD19", "CD20")]
    if _panel_axes(ax1, visit, "cd19_cd20", "CD19", "CD20", visit.cd3neg_events, lineage,
                   reference=visit.t_events):
        if "cd19_cd20" in unevaluable:
            _not_evaluable_mark(ax1, sid, "cd19_cd20")
        elif visit.cd19_cd20:
            for key, corner in (("CD19-CD20+", "upper left"), ("CD19+CD20+", "upper right"),
                                ("CD19-CD20-", "lower left"), ("CD19+CD20-", "lower right")):
                label = key.replace("-", "−")
                _corner(ax1, f"{label}\n{_pct_text(visit.cd19_cd20[key], visit.n_cd3neg)}",
                        corner, gid=f"pct:{sid}:{key}")
        else:
            ax1.text(0.5, 0.5, "no CD19/CD20 calls stored", transform=ax1.transAxes,
                     ha="center", va="center", fontsize=7, gid=f"message:{sid}:cd19_cd20")
    ax1.set_title("B cells: not evaluable\n" if "cd19_cd20" in unevaluable
                  else f"B cells: {visit.n_b:,}\n", loc="right", fontsize=7).set_gid(
        f"pct:{sid}:b_count")
    few = visit.n_b < min_b_events
    n_b = visit.n_b
    has_pb_gate = bool(((gates["marker"] == "CD27") & (gates["level"] == "hi")).any())
    # 2. IgD x CD27 of B cells
    extra = ""
    if not few and "igd_cd27" not in unevaluable:
        extra = f"; transitional {_pct_text(visit.subsets.get('transitional', 0), n_b)}"
        if has_pb_gate:
            extra += f", PB {_pct_text(visit.subsets.get('plasmablast', 0), n_b)}"
    ax2.set_title(f"IgD × CD27 of B cells (n = {n_b:,})\n% of B cells{extra}", loc="left",
                  fontsize=7)
    igd_cd27 = [(m, "pos", _find_gate(gates, m, "pos", _B_PARENTS)) for m in ("IgD", "CD27")]
    if _panel_axes(ax2, visit, "igd_cd27", "IgD", "CD27", visit.b_events, igd_cd27,
                   reference=visit.t_events):
        if "igd_cd27" in unevaluable:
            _not_evaluable_mark(ax2, sid, "igd_cd27")
        elif few:
            _few_b_message(ax2, visit, "igd_cd27")
        else:
            corners = {"naive": "lower right", "unswitched_memory": "upper right",
                       "switched_memory": "upper left", "double_negative": "lower left"}
            for subset, _, _ in _IGD_CD27_QUADRANTS:
                _corner(ax2, f"{_SUBSET_LABELS[subset]}\n"
                             f"{_pct_text(visit.subsets.get(subset, 0), n_b)}",
                        corners[subset], gid=f"pct:{sid}:{subset}")
    # 3. CD24 x CD38 of B cells: transitional box, plasmablasts
    ax3.set_title(f"CD24 × CD38 of B cells (n = {n_b:,})\ntransitional: CD24hi CD38hi box",
                  loc="left", fontsize=7)
    hi = [(m, "hi", _find_gate(gates, m, "hi", _HI_PARENTS)) for m in ("CD24", "CD38")]
    if _panel_axes(ax3, visit, "cd24_cd38", "CD24", "CD38", visit.b_events, hi, box=True):
        if "cd24_cd38" in unevaluable:
            _not_evaluable_mark(ax3, sid, "cd24_cd38")
        elif few:
            _few_b_message(ax3, visit, "cd24_cd38")
        else:
            _corner(ax3, f"transitional\n{_pct_text(visit.subsets.get('transitional', 0), n_b)}",
                    "upper right", gid=f"pct:{sid}:transitional")
            if has_pb_gate:
                _corner(ax3, f"plasmablasts\n"
                             f"{_pct_text(visit.subsets.get('plasmablast', 0), n_b)}",
                        "upper left", gid=f"pct:{sid}:plasmablast")


def gate_visits_by_patient(paths: Sequence[str | Path],
                           samples: pd.DataFrame | None = None) -> dict[str, list[Path]]:
    """Group annotated h5ad paths by patient (``uns["sample"]``, else the samples table).

    Reads only ``uns["sample"]`` of each file; scRNA samples are left out.
    """
    from anndata.io import read_elem

    grouped: dict[str, list[Path]] = {}
    for path in sorted(Path(p) for p in paths):
        with open_h5ad(path) as handle:
            uns = handle["uns"] if "uns" in handle else {}
            sample = dict(read_elem(uns["sample"])) if "sample" in uns else {}
        sample_id = str(sample.get("sample_id", path.stem))
        patient = str(sample.get("patient_id") or "").strip() or None
        modality = sample.get("modality")
        if samples is not None:
            row = samples[samples["sample_id"].astype(str) == sample_id]
            if not row.empty:
                patient = row["patient_id"].iloc[0] if patient is None else patient
                modality = row["modality"].iloc[0] if modality is None else modality
        if str(modality) == "scrna":
            continue
        if patient is None:
            raise InputError("no patient_id in uns['sample'] nor in the samples table",
                             path=path, sample_id=sample_id)
        grouped.setdefault(str(patient), []).append(path)
    return grouped


# ---------------------------------------------------------------------------------------------
# QC


def plot_qc_removed(qc: pd.DataFrame) -> Figure:
    """Events removed per QC step per sample, as % of the sample's events (stacked bars).

    The denominator is ``events_in`` of the sample's first step (all events acquired). Bars
    carry the gid ``{sample_id}:{step}``; samples and steps keep the table's order.
    """
    samples_order = list(dict.fromkeys(qc["sample_id"].astype(str)))  # the table's order
    steps = list(dict.fromkeys(qc["step"].astype(str)))
    height = min(9.5, 1.2 + 0.13 * max(len(samples_order), 4))
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(_MAX_WIDTH_IN, height), layout="constrained")
        if qc.empty:
            _message_axes(ax, "No QC table rows")
            return fig
        colours = dict(zip(steps, _palette(steps).values(), strict=True))
        left = np.zeros(len(samples_order))
        totals = {}
        for sample_id in samples_order:
            rows = qc[qc["sample_id"].astype(str) == sample_id]
            totals[sample_id] = float(pd.to_numeric(rows["events_in"]).iloc[0])
        for step in steps:
            widths = np.zeros(len(samples_order))
            for i, sample_id in enumerate(samples_order):
                rows = qc[(qc["sample_id"].astype(str) == sample_id) & (qc["step"] == step)]
                removed = float(pd.to_numeric(rows["events_removed"]).sum())
                widths[i] = 100.0 * removed / totals[sample_id] if totals[sample_id] > 0 else 0
            bars = ax.barh(np.arange(len(samples_order)), widths, left=left, height=0.75,
                           color=colours[step], label=step)
            for bar, sample_id in zip(bars, samples_order, strict=True):
                bar.set_gid(f"{sample_id}:{step}")
            left += widths
        for i, total in enumerate(left):
            ax.text(total, i, f" {total:.1f}%", va="center", fontsize=7)
        ax.set_yticks(np.arange(len(samples_order)), samples_order,
                      fontsize=7 if len(samples_order) <= 70 else 5)
        ax.set_ylim(len(samples_order) - 0.5, -0.5)  # first sample on top, no empty margin
        ax.set_xlim(0, max(5.0, float(left.max()) * 1.15))
        ax.set_xlabel("events removed, % of events acquired")
        ax.legend(title="QC step", loc="lower center", bbox_to_anchor=(0.5, 1.0),
                  ncols=len(steps), frameon=False)
    return fig


_FLAG_COLUMNS = (("not_evaluable", "not evaluable"), ("unreliable_gates", "unreliable gate"),
                 ("sample_flags", "result"), ("gate_flags", "gate"))
#: Kinetics flags that describe the timeline rather than ask the user to check something.
_INFORMATIONAL_FLAGS = {"below_lloq", "nadir_below_lloq"}


def flag_rows(samples: pd.DataFrame, kinetics: pd.DataFrame) -> pd.DataFrame:
    """Everything flagged, one row per sample or patient: patient, where, kind, flags."""
    rows = []
    for record in samples.sort_values(["patient_id", "day"]).itertuples(index=False):
        for column, kind in _FLAG_COLUMNS:
            value = getattr(record, column, "")
            if isinstance(value, str) and value:
                rows.append((str(record.patient_id),
                             f"{record.sample_id} (day {int(record.day)}, {record.modality})",
                             kind, value.replace(";", "; ")))
    if "flags" in kinetics.columns:
        for record in kinetics.sort_values(["patient_id", "modality"]).itertuples(index=False):
            if getattr(record, "measure", "b") != "b" or not isinstance(record.flags, str):
                continue
            flags = [f for f in record.flags.split(";") if f and f not in _INFORMATIONAL_FLAGS]
            if flags:
                rows.append((str(record.patient_id), f"kinetics ({record.modality}, B cells)",
                             "kinetics", "; ".join(flags)))
    return pd.DataFrame(rows, columns=["patient_id", "where", "kind", "flags"])


def plot_flags(samples: pd.DataFrame, kinetics: pd.DataFrame, *, max_rows: int = 70) -> Figure:
    """What to check before reading the numbers: every flagged sample, gate and patient.

    Rows come from ``samples.tsv`` (``sample_flags``: implausible results; ``gate_flags``:
    gates that fell back or had few events) and ``kinetics.tsv`` (``flags`` of the B-cell
    measure, less the informational ``below_lloq``). Text rows carry the gid
    ``flag:{patient}:{row}``.
    """
    table = flag_rows(samples, kinetics)
    shown = table.head(max_rows)
    height = min(11.0, 1.0 + 0.19 * max(len(shown), 3))
    with plt.rc_context(_STYLE):
        fig, ax = plt.subplots(figsize=(_MAX_WIDTH_IN, height), layout="constrained")
        ax.set_axis_off()
        if table.empty:
            _message_axes(ax, "Nothing flagged: no implausible result, no fallback gate, "
                              "no kinetics flag")
            return fig
        ax.set_title("Check these before reading the numbers\n(samples.tsv: not_evaluable, "
                     "unreliable_gates, sample_flags, gate_flags; kinetics.tsv: flags)",
                     loc="left", fontsize=8)
        colours = {"not evaluable": _UNRELIABLE_COLOUR, "unreliable gate": _UNRELIABLE_COLOUR,
                   "result": "#D55E00", "gate": "#E69F00", "kinetics": "#0072B2"}
        step = 1.0 / (len(shown) + 1)
        for i, row in enumerate(shown.itertuples(index=False)):
            y = 1.0 - (i + 1) * step
            ax.text(0.0, y, row.patient_id, fontsize=7, va="center", transform=ax.transAxes)
            ax.text(0.08, y, row.where, fontsize=7, va="center", transform=ax.transAxes)
            text = ax.text(0.45, y, f"{row.kind}: {row.flags}", fontsize=7, va="center",
                           color=colours[row.kind], transform=ax.transAxes)
            text.set_gid(f"flag:{row.patient_id}:{i}")
        if len(table) > max_rows:
            ax.text(0.0, 0.0, f"... and {len(table) - max_rows} more rows: see samples.tsv and "
                    "kinetics.tsv", fontsize=7, transform=ax.transAxes)
    return fig


# ---------------------------------------------------------------------------------------------
# Output


def save_figure(fig: Figure, outdir: str | Path, stem: str, *, dpi: int = 200) -> list[Path]:
    """Write ``{stem}.png`` and ``{stem}.svg`` atomically into ``outdir``; close the figure."""
    written = []
    try:
        for extension in ("png", "svg"):
            path = Path(outdir) / f"{stem}.{extension}"
            with atomic_path(path) as tmp:
                fig.savefig(tmp, format=extension, dpi=dpi)
            written.append(path)
            # The first save laid the figure out; the second keeps that layout rather than
            # solving it again (constrained layout was a third of the report's time). No
            # engine at all, not "none" (a placeholder engine): with any engine, savefig
            # draws the whole figure once more before the real draw. The rc values make
            # None mean no engine whatever the user's matplotlibrc says.
            with plt.rc_context({"figure.autolayout": False,
                                 "figure.constrained_layout.use": False}):
                fig.set_layout_engine(None)
    finally:
        plt.close(fig)
    return written


def _check_patient_id(patient_id: str, *, path: object) -> None:
    """Patient ids become file names: refuse ones that cannot."""
    if not patient_id or patient_id in {".", ".."} or any(c in patient_id for c in "/\\\0"):
        raise InputError(f"patient_id {patient_id!r} cannot be used in a file name", path=path)


def read_report_tables(samples_path: str | Path, kinetics_path: str | Path,
                       qc_path: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Read the tables the report draws: ``samples.tsv``, ``kinetics.tsv`` and ``qc.tsv``.

    Parameters
    ----------
    samples_path, kinetics_path, qc_path
        The workflow's tables (``results/tables/``).

    Returns
    -------
    tuple of pandas.DataFrame
        ``(samples, kinetics, qc)``, ids as text and ``samples["day"]`` numeric.

    Raises
    ------
    bcellmap.errors.InputError
        A table is missing or lacks a column the figures need, a day is empty or not a
        number, or a patient id cannot be used in a file name.
    """
    samples = read_samples_table(samples_path)
    kinetics = _read_table(kinetics_path, _KINETICS_COLUMNS)
    qc = _read_table(qc_path, _QC_COLUMNS)
    return samples, kinetics, qc


def read_samples_table(samples_path: str | Path) -> pd.DataFrame:
    """Read ``samples.tsv`` as :func:`read_report_tables` does (ids as text, day numeric)."""
    samples = _read_table(samples_path, _SAMPLES_COLUMNS)
    samples["day"] = pd.to_numeric(samples["day"], errors="coerce")
    if samples["day"].isna().any():
        raise InputError("column 'day' has empty or non-numeric values", path=samples_path)
    for patient in samples["patient_id"].unique():
        _check_patient_id(str(patient), path=samples_path)
    return samples


def draw_table_figures(samples: pd.DataFrame, kinetics: pd.DataFrame, qc: pd.DataFrame, *,
                       config: Mapping[str, Any], samples_path: str | Path | None = None
                       ) -> list[tuple[str, Figure]]:
    """Draw the figures of the tables: ``patient_{patient_id}`` per patient,
    ``cohort_trajectories``, ``swimmer``, ``kaplan_meier``, ``composition_visits``,
    ``composition_baseline_vs_reconstitution``, ``qc_removed`` and ``flags``.

    Parameters
    ----------
    samples, kinetics, qc
        The workflow's tables (:func:`read_report_tables`).
    config
        The bcellmap config; uses ``report.min_b_events_composition``.
    samples_path
        Named in errors about a patient id.

    Returns
    -------
    list of (str, matplotlib.figure.Figure)
        In writing order; the caller closes (or saves) them.
    """
    min_b = int(config["report"]["min_b_events_composition"])
    for patient in samples["patient_id"].unique():
        _check_patient_id(str(patient), path=samples_path)
    figures: list[tuple[str, Figure]] = []
    try:
        for patient in sorted(samples["patient_id"].unique()):
            figures.append((f"patient_{patient}", plot_patient(samples, kinetics, patient)))
        figures += [
            ("cohort_trajectories", plot_cohort_trajectories(samples, kinetics)),
            ("swimmer", plot_swimmer(samples, kinetics)),
            ("kaplan_meier", plot_kaplan_meier(samples, kinetics)),
            ("composition_visits", plot_composition_visits(samples, min_b_events=min_b)),
            ("composition_baseline_vs_reconstitution",
             plot_composition_baseline_vs_reconstitution(samples, kinetics, min_b_events=min_b)),
            ("qc_removed", plot_qc_removed(qc)),
            ("flags", plot_flags(samples, kinetics)),
        ]
    except BaseException:
        close_figures(figures)
        raise
    return figures


def draw_cluster_figures(annotated_paths: Sequence[str | Path], *, config: Mapping[str, Any]
                         ) -> list[tuple[str, Figure]]:
    """Draw ``cluster_heatmap`` and ``embedding`` from the annotated flow files.

    Parameters
    ----------
    annotated_paths
        Annotated h5ad files (may be empty; scRNA ones are skipped), read a bounded number of
        events at a time.
    config
        The bcellmap config; uses ``seed``, ``cluster.markers`` and ``report.*``.

    Returns
    -------
    list of (str, matplotlib.figure.Figure)
    """
    settings = config["report"]
    seed = int(config["seed"])
    pooled = pool_annotated(annotated_paths, markers=config["cluster"]["markers"],
                            events_per_sample=int(settings["heatmap_events_per_sample"]),
                            seed=seed)
    figures = [("cluster_heatmap", plot_cluster_heatmap(pooled))]
    try:
        figures.append(("embedding", plot_embedding(
            pooled, max_events=int(settings["embedding_events"]), seed=seed,
            n_neighbors=int(settings["embedding_neighbors"]))))
    except BaseException:
        close_figures(figures)
        raise
    return figures


def draw_gate_figures(annotated_paths: Sequence[str | Path], samples: pd.DataFrame, *,
                      config: Mapping[str, Any], patients: Sequence[str] | None = None,
                      samples_path: str | Path | None = None) -> list[tuple[str, Figure]]:
    """Draw ``gates_{patient_id}`` for every patient with a flow row in ``samples``.

    Parameters
    ----------
    annotated_paths
        Annotated h5ad files; each patient's are read one at a time.
    samples
        ``sample_id``, ``patient_id``, ``day`` and ``modality`` of every sample: the samples
        table or the sample sheet.
    config
        The bcellmap config; uses ``seed``, ``report.gate_events`` and
        ``report.min_b_events_composition``.
    patients
        Only these patients (each must have a flow row); None: all with one.
    samples_path
        The samples table's file, for messages.

    Returns
    -------
    list of (str, matplotlib.figure.Figure)

    Raises
    ------
    bcellmap.errors.InputError
        A patient id that cannot be a file name, a requested patient without flow samples,
        or an unreadable annotated file.
    """
    settings = config["report"]
    seed = int(config["seed"])
    min_b = int(settings["min_b_events_composition"])
    flow_patients = set(samples.loc[samples["modality"] == "flow", "patient_id"].astype(str))
    for patient in flow_patients:
        _check_patient_id(patient, path=samples_path)
    if patients is not None:
        missing = sorted(set(map(str, patients)) - flow_patients)
        if missing:
            raise InputError(f"no flow samples for patient(s) {', '.join(missing)}",
                             path=samples_path)
        flow_patients = set(map(str, patients))
    by_patient = gate_visits_by_patient(annotated_paths, samples)
    figures: list[tuple[str, Figure]] = []
    try:
        for patient in sorted(flow_patients):
            visits = [read_gate_visit(path, samples=samples, seed=seed,
                                      max_events=int(settings["gate_events"]))
                      for path in by_patient.get(patient, [])]
            figures.append((f"gates_{patient}", plot_gates(visits, patient,
                                                           min_b_events=min_b)))
    except BaseException:
        close_figures(figures)
        raise
    if patients is None:
        for patient in sorted(set(by_patient) - flow_patients):
            log.warning("annotated samples of patient %s have no flow row in %s: no gate "
                        "figure", patient, samples_path or "the samples table")
    return figures


def draw_report(samples: pd.DataFrame, kinetics: pd.DataFrame, qc: pd.DataFrame,
                annotated_paths: Sequence[str | Path], *, config: Mapping[str, Any],
                samples_path: str | Path | None = None) -> list[tuple[str, Figure]]:
    """Draw every report figure, each with the file stem it is written under.

    The figures of :func:`draw_table_figures`, then :func:`draw_cluster_figures`, then
    :func:`draw_gate_figures` (every patient with a flow row in ``samples``). All are drawn
    before any is written (:func:`save_figure`), so bad input leaves no figure behind; on an
    error the figures drawn so far are closed.

    Parameters
    ----------
    samples, kinetics, qc
        The workflow's tables (:func:`read_report_tables`).
    annotated_paths
        Annotated h5ad files (may be empty), read a bounded number of events at a time.
    config
        The bcellmap config (``bcellmap.config.load_config``): ``seed``, ``report.*`` and
        ``cluster.markers``.
    samples_path
        The samples table's file, for messages.

    Returns
    -------
    list of (str, matplotlib.figure.Figure)
        ``(file stem, figure)`` in writing order; the caller closes (or saves) them.

    Raises
    ------
    bcellmap.errors.InputError
        A patient id that cannot be a file name, or an unreadable annotated file.
    """
    figures = draw_table_figures(samples, kinetics, qc, config=config, samples_path=samples_path)
    try:
        figures += draw_cluster_figures(annotated_paths, config=config)
        figures += draw_gate_figures(annotated_paths, samples, config=config,
                                     samples_path=samples_path)
    except BaseException:
        close_figures(figures)
        raise
    return figures


def close_figures(figures: Sequence[tuple[str, Figure]]) -> None:
    """Close every figure of ``(stem, figure)`` pairs (as :func:`draw_report` returns)."""
    for _, fig in figures:
        plt.close(fig)
