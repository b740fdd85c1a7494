"""Reference populations: where a gate is placed from, how well it separates, and whether it
can be stood behind.

Real blood is rarely bimodal in the markers that matter. Within B cells, IgD is one broad
positive mode with a memory shoulder; CD27+ memory is a shoulder of the naive peak; a
channel can stain every cell. A gate learned from the shape of one population alone can sit
on the wrong side of the only population there. So every gate is placed, and checked,
against populations of the same sample whose biology is known (``annotate.gating.references``;
defaults in ``bcellmap/defaults.yaml``):

=========  =====================================  =======================================
marker     negative reference (known negative)     positive reference (known positive)
=========  =====================================  =======================================
CD3        B-lineage cells (provisional: above      -
           their own CD19 and CD20 valleys)
CD19, IgD  T cells (CD3+)                           -
CD20       T cells (3-5% are CD20dim)              -
CD14       T cells                                  -
CD56, CD16 T cells (some NKT-like cells carry them) -
CD27       naive B cells (IgD-high B cells)        T cells (most blood T cells are CD27+)
CD45       -                                        T cells (lymphocytes are CD45-bright)
=========  =====================================  =======================================

**Placement** (:func:`bcellmap.flow.gating.learn_gates`). A density valley between two
populations of the parent stays the gate unless it lies inside the negative reference: below
where the reference's density ends, with more than ``valley_max_negative_above_pct`` of the
reference (plus its known positive share) above it; or it lies well above the reference's
end, with more parent events between the two than ``valley_max_between_pct`` of the events
above the valley (the valley then parts two positive populations: memory B cells' dim CD27
from the plasmablasts' bright CD27). Otherwise, and whenever the parent shows
one population, the gate goes where the negative reference's density ends
(:func:`bcellmap.kernels.density.tail_boundary`: openCyto's ``gate_tail``, flowDensity's
``deGate(upper = TRUE)``; a shoulder counts as a boundary), or where the positive
reference's density begins. A single mode is therefore never
taken for the negative one: which side of the gate it lies on follows from the reference.

**Separation**, two numbers per gate (``gates.tsv``, ``uns["gates"]``, the gate figures):

- ``negative_above_pct``: the share of the negative reference at or above the gate (the
  events known negative that the gate would call positive);
- ``positive_below_pct``: the share of the gated population below the gate: of the positive
  reference where it placed the gate (CD45), else of the parent's events above the gate
  modelled by their upper side mirrored about their mode
  (:func:`bcellmap.kernels.density.mirrored_share`). (CD27's positive reference, the T
  cells, of which 10-30% are CD27-, only checks the side: their mode must lie above it.)
  Where the gated events form no peak of their own (a shoulder) this is about 50%: the gate
  then rests on its reference, not on a gap in the data.

**Reliability** (``reliability`` column: ``ok``, ``unreliable``, ``nonspecific`` or
``not_assessed`` for fixed gates), limits in ``annotate.gating.reliability``:

- ``nonspecific``: the negative reference is not negative. Its median lies above the sample's
  background (the median, over the panel's marker channels, of each channel's 2nd percentile)
  by more than ``nonspecific_fraction`` of the panel's span (background to the highest 99.5th
  percentile of its marker channels: the span of a stained channel, whether or not this one
  has positive events; in B-cell aplasia CD19 has none). A CD19 channel that stains the T
  cells and granulocytes as brightly as it stains anything (mass cytometry with a failed or
  mislabelled metal) is no B-cell marker.
- ``unreliable``: the negative reference overlaps the gate (more than
  ``max_negative_above_pct``, plus the reference's known positive share, of it above the
  gate); the positive reference's mode lies below the gate; the parent is one population
  and no reference says which side it is on (a CD3-less panel with a unimodal CD19); or,
  with no reference, the gate is a valley whose gated events do not form a population of
  their own (more than ``max_positive_below_pct`` of them below it: a tail, not a peak).

A value that rests on an unreliable or nonspecific gate is not evaluable: see
:func:`bcellmap.flow.annotate.annotate_sample`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..kernels.density import TailBoundary, density_mode, mirrored_share, tail_boundary

__all__ = ["ReferenceSpec", "ReliabilitySettings", "Separation", "background_level",
           "judge", "reference_edge", "reference_values",
           "separation", "REFERENCE_NAMES"]

#: Reference populations a spec may name, and how messages and tables name them.
REFERENCE_NAMES = {"t_cells": "T cells (CD3+)", "naive_b": "naive B cells (IgD-high B cells)",
                   "b_lineage": "B-lineage cells (above their own CD19 and CD20 valleys)"}
#: Share (%) of a clean reference allowed above a tail gate before it is a long tail of the
#: same population (see ``kernels.density.tail_boundary``'s ``max_tail_share``).
_CLEAN_TAIL_PCT = 2.0
#: ... for a strict reference (a rare-event gate).
_STRICT_TAIL_PCT = 0.2
#: The gated population needs this many events for ``positive_below_pct``.
_MIN_GATED_EVENTS = 20


@dataclass(frozen=True)
class ReferenceSpec:
    """The reference populations of one marker's gate.

    Attributes
    ----------
    negative
        A population known negative for the marker (``t_cells``, ``naive_b``,
        ``b_lineage``) or None.
    positive
        A population known positive (``t_cells``) or None.
    expected_positive_pct
        The share (%) of the negative reference that carries the marker in normal blood (3-5%
        of T cells are CD20dim): added to every limit on the reference's share above a gate.
    strict
        Gate where the reference's density has all but ended, not at its edge: a marker that
        counts rare events (CD19, CD20 in B-cell aplasia, where every negative event above the
        gate is a phantom B cell) takes openCyto's ``gate_tail`` tolerance (1% of the
        steepest slope: 3.6 SD of a normal population, 0.02% of it above) and leaves at most
        0.2% of a clean reference above; otherwise flowDensity's (10%: 2.75 SD, 0.3% above;
        the upper edge an expert draws between IgD- and IgD+ cells) and 2%.
    """

    negative: str | None = None
    positive: str | None = None
    expected_positive_pct: float = 0.0
    strict: bool = False

    @classmethod
    def from_config(cls, entry: Mapping[str, Any] | None) -> ReferenceSpec:
        entry = dict(entry or {})
        return cls(negative=entry.get("negative"), positive=entry.get("positive"),
                   expected_positive_pct=float(entry.get("expected_positive_pct") or 0.0),
                   strict=bool(entry.get("strict") or False))


@dataclass(frozen=True)
class ReliabilitySettings:
    """``annotate.gating.reliability`` (see config/README.md for the rationale)."""

    max_negative_above_pct: float
    valley_max_negative_above_pct: float
    valley_max_between_pct: float
    max_positive_below_pct: float
    nonspecific_fraction: float
    min_reference_events: int

    @classmethod
    def from_config(cls, section: Mapping[str, Any]) -> ReliabilitySettings:
        return cls(max_negative_above_pct=float(section["max_negative_above_pct"]),
                   valley_max_negative_above_pct=float(section["valley_max_negative_above_pct"]),
                   valley_max_between_pct=float(section["valley_max_between_pct"]),
                   max_positive_below_pct=float(section["max_positive_below_pct"]),
                   nonspecific_fraction=float(section["nonspecific_fraction"]),
                   min_reference_events=int(section["min_reference_events"]))


@dataclass(frozen=True)
class Separation:
    """The two separation numbers of one gate (NaN: not measurable)."""

    negative_above_pct: float = float("nan")
    positive_below_pct: float = float("nan")


def reference_values(name: str, columns: Mapping[str, np.ndarray],
                     cut: Mapping[str, Mapping[str, float]], *,
                     unreliable: set[str]) -> np.ndarray | None:
    """Indices of a sample's events that make the reference population ``name``.

    ``cut`` holds the sample's gates so far and ``unreliable`` the markers whose gate is not
    reliable: a reference defined by an unreliable gate is no reference (None).

    - ``t_cells``: CD3 at or above its gate.
    - ``b_lineage``: events above the sample's own CD19 and CD20 density valleys (the CD3
      gate's reference: B cells are CD3-; learned before any CD3 gate, so it is a
      provisional B-cell call; none in B-cell aplasia).
    - ``naive_b``: B cells (CD3- and CD19+ or CD20+) at or above the IgD gate and at or above
      the median IgD of those IgD+ B cells. Unswitched memory B cells (IgD+ CD27+) carry less
      IgD than naive ones, so the upper half of IgD+ B cells is nearly all naive.
    """
    def gate(marker: str) -> float:
        return float(cut.get(marker, {}).get("pos", np.nan))

    if name == "t_cells":
        if "CD3" not in columns or "CD3" in unreliable or not np.isfinite(gate("CD3")):
            return None
        return np.flatnonzero(columns["CD3"] >= gate("CD3"))
    if name == "b_lineage":
        return _b_lineage(columns)
    if name == "naive_b":
        n = len(next(iter(columns.values())))
        b_cell = np.ones(n, dtype=bool)
        if "CD3" in columns:
            if "CD3" in unreliable or not np.isfinite(gate("CD3")):
                return None
            b_cell &= columns["CD3"] < gate("CD3")
        lineage = [m for m in ("CD19", "CD20") if m in columns and np.isfinite(gate(m))]
        if not lineage or any(m in unreliable for m in lineage) or "IgD" not in columns \
                or "IgD" in unreliable or not np.isfinite(gate("IgD")):
            return None
        b_cell &= np.logical_or.reduce([columns[m] >= gate(m) for m in lineage])
        igd_positive = np.flatnonzero(b_cell & (columns["IgD"] >= gate("IgD")))
        if igd_positive.size == 0:
            return igd_positive
        high = columns["IgD"][igd_positive] >= np.median(columns["IgD"][igd_positive])
        return igd_positive[high]
    raise ValueError(f"unknown reference population {name!r} (expected "
                     f"{', '.join(REFERENCE_NAMES)})")


def _b_lineage(columns: Mapping[str, np.ndarray]) -> np.ndarray | None:
    """Events above their own CD19 and CD20 density valleys (above the one of them the panel
    has), where each marker's valley parts a clearly separate positive population; else None.

    Both markers, where the panel has both: 3-5% of T cells are CD20dim and would otherwise
    join (in B-cell aplasia they would be all of it). Each positive population must hold
    1-60% of the events, and its mode lie at least four robust SDs (of the negative peak's
    lower side) above the negative mode; the reference needs 100 events. A few bright events
    of a B-depleted sample (doublets, spillover) are no B-cell population, nor is a dip inside
    its negative peak.
    """
    from ..kernels.density import separated_valley

    markers = [m for m in ("CD19", "CD20") if m in columns]
    if not markers:
        return None
    chosen = np.ones(len(columns[markers[0]]), dtype=bool)
    for marker in markers:
        valley = separated_valley(columns[marker], max_share=0.6)
        if valley is None:
            return None
        chosen &= columns[marker] >= valley
    rows = np.flatnonzero(chosen)
    return rows if rows.size >= 100 else None


def background_level(x: np.ndarray, kinds: Any, canonicals: Any) -> tuple[float, float]:
    """A sample's background and top: over its marker channels, the median of each one's
    2nd percentile, and the highest of their 99.5th percentiles.

    Only channels named as markers (``var["canonical"]``, fluorescence or mass kind) count,
    so empty barcode and DNA channels of mass cytometry do not. One nonspecific channel does
    not move the median. NaN without marker channels.
    """
    x = np.asarray(x)
    columns = [np.asarray(x[:, i], dtype=np.float64)
               for i, (kind, name) in enumerate(zip(kinds, canonicals, strict=True))
               if str(kind) == "fluorescence" and str(name) and x.shape[0]]
    if not columns:
        return float("nan"), float("nan")
    return (float(np.median([np.nanquantile(c, 0.02) for c in columns])),
            float(np.max([np.nanquantile(c, 0.995) for c in columns])))


def reference_edge(values: np.ndarray, spec: ReferenceSpec, *, side: str = "upper",
                   min_events: int = 50) -> TailBoundary | None:
    """Where the reference population's density ends (upper) or begins (lower)."""
    clean_pct = _STRICT_TAIL_PCT if spec.strict else _CLEAN_TAIL_PCT
    share = (clean_pct + spec.expected_positive_pct) / 100.0
    return tail_boundary(values, side="upper" if side == "upper" else "lower",
                         alpha=0.01 if spec.strict else 0.1, max_tail_share=share,
                         clean=spec.expected_positive_pct <= 0, min_events=min_events)



def separation(gate: float, *, parent: np.ndarray, negative: np.ndarray | None,
               positive: np.ndarray | None, min_reference: int = 1) -> Separation:
    """The gate's ``negative_above_pct`` and ``positive_below_pct`` (module docstring).

    A reference smaller than ``min_reference`` events measures nothing (NaN): its shares are
    noise.
    """
    if not np.isfinite(gate):
        return Separation()
    negative_above = (100.0 * float(np.mean(negative >= gate))
                      if negative is not None and negative.size >= min_reference
                      else float("nan"))
    if positive is not None and positive.size >= min_reference:
        positive_below = 100.0 * float(np.mean(positive < gate))
    else:
        gated = parent[parent >= gate]
        positive_below = float("nan")
        if gated.size >= _MIN_GATED_EVENTS:
            mode = density_mode(gated)
            positive_below = 100.0 * mirrored_share(gated, mode=mode, gate=gate, side="below")
    return Separation(negative_above, positive_below)


def judge(marker: str, *, gate: float, spec: ReferenceSpec, method: str,
          measured: Separation, negative: np.ndarray | None, positive: np.ndarray | None,
          background: float, top: float, n_parent: int, min_parent: int,
          settings: ReliabilitySettings) -> tuple[str, str]:
    """``(reliability, detail)`` of one sample's gate (module docstring).

    A gate whose parent holds fewer than ``min_parent`` events is ``not_assessed``: nothing
    rests on it that is measurable (its counts are below any limit of quantification).
    """
    if method.startswith("fixed"):
        return "not_assessed", "fixed gate (annotate.thresholds.fixed): set by the user"
    if n_parent < min_parent:
        return "not_assessed", f"{n_parent} parent events: too few to judge the gate"
    if not np.isfinite(gate):
        return "unreliable", "no gate could be learned"
    enough = settings.min_reference_events
    if negative is not None and negative.size >= enough and np.isfinite(background) \
            and np.isfinite(top) and top > background:
        level = float(np.median(negative))
        fraction = (level - background) / (top - background)
        if fraction > settings.nonspecific_fraction:
            return "nonspecific", (
                f"{marker} stains its negative reference: the median of "
                f"{REFERENCE_NAMES.get(spec.negative or '', spec.negative)} is "
                f"{100 * fraction:.0f}% of the way from the background to the panel's top "
                f"(limit {100 * settings.nonspecific_fraction:.0f}%)")
    limit = settings.max_negative_above_pct + spec.expected_positive_pct
    if negative is not None and negative.size >= enough \
            and measured.negative_above_pct > limit:
        return "unreliable", (
            f"{measured.negative_above_pct:.1f}% of "
            f"{REFERENCE_NAMES.get(spec.negative or '', spec.negative)} lie above the gate "
            f"(limit {limit:g}%)")
    if positive is not None and positive.size >= enough and density_mode(positive) < gate:
        return "unreliable", (
            f"the mode of {REFERENCE_NAMES.get(spec.positive or '', spec.positive)}, known "
            f"{marker}+, lies below the gate")
    no_reference = (negative is None or negative.size < enough) and (
        positive is None or positive.size < enough)
    if no_reference and method.startswith("valley") \
            and measured.positive_below_pct > settings.max_positive_below_pct:
        return "unreliable", (
            f"without a reference population, the gate rests on the valley alone, and "
            f"{measured.positive_below_pct:.0f}% of the gated population lies below it "
            f"(limit {settings.max_positive_below_pct:g}%): no separate population")
    if method.split("/")[0] in ("upper_tail", "insufficient_events") and no_reference:
        reason = ("no reference population in this sample" if spec.negative or spec.positive
                  else "no reference population is configured for it")
        return "unreliable", (f"{marker} shows one population and {reason} to tell which "
                              "side of the gate it lies on")
    return "ok", ""
