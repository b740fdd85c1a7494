"""Hierarchical gates learned inside their parent populations, aligned between visits.

Immunologists gate a B-cell panel as a hierarchy (openCyto's B-cell template does the
same): lymphocytes -> CD3- -> CD19+/CD20+ B cells -> IgD x CD27 quadrants and CD24 x CD38
on B cells. A gate learned on all events lands on whatever population dominates the pool:
an IgD threshold learned on lymphocytes falls inside the T cells' IgD-negative peak and
calls every B cell IgD+. Here each gate is learned on its parent only:

========== ============================================ ===================================
stage      parent population                            positive gates learned there
========== ============================================ ===================================
lymphocyte every QC-passed (scatter-gated) event        CD3, CD45, CD14
cd3neg     CD3- events of the stage above               CD19, CD20, CD56, CD16
b_cells    CD3- and (CD19+ or CD20+)                    subset markers (IgD, CD27, ...)
naive_b    B cells IgD+ CD27- (naive and transitional)  "hi" of naive-referenced markers
========== ============================================ ===================================

**Drift between visits** (landmark registration in the spirit of flowStats' gaussNorm).
Visits months apart differ in staining and instrument gain: 20-40% brightness per marker
is ordinary. For every marker and sample, the peaks of the parent population's density
are found (``find_landmarks``): the negative and the positive mode where the sample has
both, else its single mode. The cohort reference landmarks are the medians over the
samples that show both peaks. Each sample is registered onto them by the linear map that
sends its two modes onto the reference modes (one mode: a shift), the gate is learned
once on the pooled, registered values (``bcellmap.kernels.density.learn_marker_threshold``:
density valley, upper-tail fallback), and mapped back onto every sample's own scale. A
single mode is matched to the nearer reference landmark, so a B-cell-aplastic sample,
which has no CD19+ peak, is only shifted by its negative peak: its gate is never placed
on its own negative peak and it gains no B cells. A two-peak sample whose peak distance
differs from the reference by more than ``max_stretch`` is registered by its dominant
peak only. Registration is the gate's ``method`` suffix (``valley/aligned2``,
``valley/aligned1``, ``valley/unaligned``).

**Reference populations** (:mod:`bcellmap.flow.references`). Each sample's gate is then
checked against populations of the same sample whose biology is known (T cells for CD19,
CD20 and IgD; naive B cells for CD27; ...): a valley inside the negative reference, or far
above it with positives between, moves to where the reference's density ends; a parent
without a valley is gated there too (method ``reference_tail/...``), so a single mode is
never assumed to be the negative one. Every gate records its separation
(``negative_above_pct``, ``positive_below_pct``) and a ``reliability`` verdict
(``ok``, ``unreliable``, ``nonspecific``, ``not_assessed``); what rests on an unreliable
gate is not evaluable (:mod:`bcellmap.flow.evaluability`).

**Hi levels.** ``annotate.gating.hi_method`` chooses per marker:

- ``naive_reference`` (CD24, CD38 by default: continuous on B cells, no valley): the gate
  sits ``naive_sd`` robust SDs above the mode of the sample's own naive B cells (IgD+
  CD27-), the SD measured on the upper side of the naive peak among the cells below the
  other marker's gate (``naive_referenced_gates``). It depends on the sample alone, not
  on which visits are in the cohort, and follows the sample's drift. A sample with fewer
  than ``min_reference_events`` naive B cells gets the cohort median (flagged).
- ``positive_mode`` (CD27 and any other marker): the mode of the sample's positive
  population (plasmablasts are CD27hi: at least as bright as the typical memory B cell);
  a sample without its own positive peak uses the cohort's, registered; with none anywhere,
  the sample's positive gate (``positive_gate``).

**Method flags** (informative; ``reliability`` decides). A gate carries a ``flag`` when it
fell back to the pool's upper tail (``upper_tail``), could not be learned
(``insufficient_events``), had too few parent events in the sample to be placed or
registered from the sample itself (``few_events``), or sits at the cohort's positive mode
for want of the sample's own (``cohort_positive_mode``). Flags of gates whose parent holds
at least ``flag_min_events`` events are reported per sample (``gate_flags``) and in the
logs.

**Lymphocytes by markers** (``lymphocyte_gate``): T and B cells by their gates, NK cells
as lineage-negative events inside the T and B cells' own scatter core; see there.

``annotate.thresholds.fixed`` / ``fixed_hi`` set a gate on the data scale of every sample
(no registration; method ``fixed``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from ..contracts import (
    ALL_SAMPLES,
    GATE_COLUMNS,
    NOT_RELIABLE,
    THRESHOLD_COLUMNS,
    sample_rng,
    subsample_indices,
)
from ..io.panel import marker_columns
from ..kernels.density import (
    TailBoundary,
    density_mode,
    find_modes,
    learn_marker_threshold,
    without_ceiling_ties,
)
from .references import (
    REFERENCE_NAMES,
    ReferenceSpec,
    ReliabilitySettings,
    Separation,
    background_level,
    judge,
    reference_edge,
    reference_values,
    separation,
)

log = logging.getLogger(__name__)

#: Stages of the gating hierarchy, in order, and their parent population.
STAGES = ("lymphocyte", "cd3neg", "b_cells", "naive_b")
PARENT_NAMES = {"lymphocyte": "lymphocytes", "cd3neg": "cd3neg_lymphocytes",
                "b_cells": "b_cells", "naive_b": "naive_b"}
_LYMPHOCYTE_STAGE_MARKERS = ("CD3", "CD45", "CD14")
_CD3NEG_STAGE_MARKERS = ("CD19", "CD20", "CD56", "CD16")
#: Methods that are a learned, sample-supported gate (anything else is flagged).
_UNFLAGGED = ("valley", "fixed", "naive_reference", "positive_mode", "reference_tail",
              "positive_gate")


@dataclass(frozen=True)
class GatingSettings:
    """Settings of ``annotate.thresholds`` and ``annotate.gating`` (see config/README.md).

    Built from a loaded config (:meth:`from_config`); the values, defaults included, come
    from ``defaults.yaml`` only. ``GatingSettings.defaults()`` is the package defaults.
    """

    events_per_sample: int
    fallback_sd: float
    min_peak_fraction: float
    fixed: Mapping[str, float]
    fixed_hi: Mapping[str, float]
    min_landmark_events: int
    min_positive_events: int
    min_positive_fraction: float
    max_stretch: float
    naive_sd: float
    min_reference_events: int
    flag_min_events: int
    hi_method: Mapping[str, str]
    references: Mapping[str, ReferenceSpec]
    reliability: ReliabilitySettings

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> GatingSettings:
        """The settings of a config loaded by :func:`bcellmap.config.load_config`."""
        from ..config import section

        thresholds = section(config, "annotate.thresholds")
        gating = section(config, "annotate.gating")
        # The schema restricts hi_method values to naive_reference / positive_mode.
        hi_method = {str(k): str(v) for k, v in (gating["hi_method"] or {}).items()}
        return cls(
            events_per_sample=int(thresholds["events_per_sample"]),
            fallback_sd=float(thresholds["fallback_sd"]),
            min_peak_fraction=float(thresholds["min_peak_fraction"]),
            fixed={str(k): float(v) for k, v in (thresholds["fixed"] or {}).items()},
            fixed_hi={str(k): float(v) for k, v in (thresholds["fixed_hi"] or {}).items()},
            min_landmark_events=int(gating["min_landmark_events"]),
            min_positive_events=int(gating["min_positive_events"]),
            min_positive_fraction=float(gating["min_positive_fraction"]),
            max_stretch=float(gating["max_stretch"]),
            naive_sd=float(gating["naive_sd"]),
            min_reference_events=int(gating["min_reference_events"]),
            flag_min_events=int(gating["flag_min_events"]),
            hi_method=hi_method,
            references={str(marker): ReferenceSpec.from_config(entry)
                         for marker, entry in (gating["references"] or {}).items()},
            reliability=ReliabilitySettings.from_config(gating["reliability"]),
        )

    @classmethod
    def defaults(cls) -> GatingSettings:
        """The package defaults (``defaults.yaml``)."""
        from ..config import default_config

        return cls.from_config(default_config())


# --------------------------------------------------------------------------- landmarks


@dataclass(frozen=True)
class Landmarks:
    """Density modes of one marker in one sample's parent population.

    ``low``/``high`` are the negative and positive modes when the sample shows both
    populations; otherwise ``low`` is the single mode and ``high`` is None.
    """

    low: float
    high: float | None
    n_events: int
    high_share: float = 0.0
    valley: float | None = None


def find_landmarks(values: np.ndarray, *, min_events: int = 100, min_positive_events: int = 20,
                   min_positive_fraction: float = 0.005,
                   min_peak_fraction: float = 0.002) -> Landmarks | None:
    """Negative and positive density modes of one marker in one sample.

    Parameters
    ----------
    values
        The marker's transformed values in the sample's parent population.
    min_events
        Fewer finite values: no landmarks (None).
    min_positive_events, min_positive_fraction
        The smaller side of the sample's own valley must hold at least this many events
        and this share of the parent to count as a second population.
    min_peak_fraction
        Passed to the valley finder.

    Returns
    -------
    Landmarks or None
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    n = int(values.size)
    if n < min_events:
        return None
    modes = find_modes(values, min_peak_fraction=min_peak_fraction)
    if modes is not None:
        valley, (low, high) = modes
        above = int((values >= valley).sum())
        smaller = min(above, n - above)
        if smaller >= max(min_positive_events, min_positive_fraction * n):
            return Landmarks(low, high, n, above / n, valley)
    return Landmarks(density_mode(values), None, n)


@dataclass(frozen=True)
class _Registration:
    """x_reference = reference_low + (x - low) * scale; ``kind`` aligned2/aligned1/unaligned."""

    low: float
    reference_low: float
    scale: float
    kind: str

    def forward(self, x: np.ndarray | float) -> np.ndarray | float:
        return self.reference_low + (x - self.low) * self.scale

    def inverse(self, x: float) -> float:
        return self.low + (x - self.reference_low) / self.scale


_IDENTITY = _Registration(0.0, 0.0, 1.0, "unaligned")


def _register(landmarks: Mapping[str, Landmarks | None], *, max_stretch: float
              ) -> tuple[dict[str, _Registration], float | None, float | None]:
    """Registration of every sample onto the cohort's reference landmarks.

    Returns the registrations and the reference (negative, positive) modes.
    """
    both = [lm for lm in landmarks.values() if lm is not None and lm.high is not None]
    singles = [lm.low for lm in landmarks.values() if lm is not None and lm.high is None]
    if both:
        reference_low = float(np.median([lm.low for lm in both]))
        reference_high = float(np.median([lm.high for lm in both]))
    elif singles:
        reference_low, reference_high = float(np.median(singles)), None
    else:
        return {s: _IDENTITY for s in landmarks}, None, None
    registrations: dict[str, _Registration] = {}
    for sample_id, lm in landmarks.items():
        if lm is None:
            registrations[sample_id] = _IDENTITY
            continue
        if lm.high is not None and reference_high is not None:
            scale = (reference_high - reference_low) / (lm.high - lm.low)
            if 1.0 / max_stretch <= scale <= max_stretch:
                registrations[sample_id] = _Registration(lm.low, reference_low, scale,
                                                         "aligned2")
                continue
            # Implausible stretch: register by the sample's dominant peak only.
            single = lm.high if lm.high_share > 0.5 else lm.low
        else:
            single = lm.low
        if reference_high is not None and abs(single - reference_high) < abs(
                single - reference_low):
            registrations[sample_id] = _Registration(single, reference_high, 1.0, "aligned1")
        else:
            registrations[sample_id] = _Registration(single, reference_low, 1.0, "aligned1")
    return registrations, reference_low, reference_high


# --------------------------------------------------------------------------- gate learning


@dataclass
class _SampleGates:
    """The gates of one sample, filled stage by stage."""

    group: str
    learner: bool = True
    rows: list[dict[str, Any]] = field(default_factory=list)
    cut: dict[str, dict[str, float]] = field(default_factory=dict)
    #: Markers whose gate is unreliable or nonspecific: no reference rests on them.
    unreliable: set[str] = field(default_factory=set)
    background: float = float("nan")
    top: float = float("nan")
    #: The user's own gates, ``(marker, level) -> (threshold, source)``: they replace the
    #: learned ones, are recorded as method ``user`` and flag nothing.
    user: dict[tuple[str, str], tuple[float, str]] = field(default_factory=dict)

    def add(self, marker: str, level: str, threshold: float, *, parent: str, method: str,
            n_events: int, flag: str = "", low: float = float("nan"),
            high: float = float("nan"), reference: str = "",
            measured: Separation | None = None, reliability: str = "ok",
            detail: str = "") -> None:
        if method != "user" and (marker, level) in self.user:
            threshold, source = self.user[(marker, level)]
            method, flag, measured = "user", "", None
            reliability, detail = "ok", f"set by the user ({source})"
        measured = measured or Separation()
        self.cut.setdefault(marker, {})[level] = float(threshold)
        if reliability in NOT_RELIABLE:
            self.unreliable.add(marker)
        self.rows.append({"marker": marker, "level": level, "threshold": float(threshold),
                          "parent": parent, "method": method, "n_events": int(n_events),
                          "flag": flag, "negative_landmark": low, "positive_landmark": high,
                          "reference": reference,
                          "negative_above_pct": measured.negative_above_pct,
                          "positive_below_pct": measured.positive_below_pct,
                          "reliability": reliability, "reliability_detail": detail})


def parent_mask(stage: str, columns: Mapping[str, np.ndarray],
                cut: Mapping[str, Mapping[str, float]]) -> np.ndarray:
    """Events of a sample that form the parent population of ``stage``, given its gates."""
    n = len(next(iter(columns.values()))) if columns else 0
    mask = np.ones(n, dtype=bool)
    if stage == "lymphocyte":
        return mask
    if "CD3" in columns and np.isfinite(cut.get("CD3", {}).get("pos", np.nan)):
        mask &= columns["CD3"] < cut["CD3"]["pos"]
    if stage == "cd3neg":
        return mask
    lineage = np.zeros(n, dtype=bool)
    for marker in ("CD19", "CD20"):
        if marker in columns and np.isfinite(cut.get(marker, {}).get("pos", np.nan)):
            lineage |= columns[marker] >= cut[marker]["pos"]
    mask &= lineage
    if stage == "b_cells":
        return mask
    for marker, wanted in (("IgD", True), ("CD27", False)):
        if marker in columns and np.isfinite(cut.get(marker, {}).get("pos", np.nan)):
            mask &= (columns[marker] >= cut[marker]["pos"]) == wanted
    return mask


def _stage_of(marker: str) -> str:
    if marker in _LYMPHOCYTE_STAGE_MARKERS:
        return "lymphocyte"
    if marker in _CD3NEG_STAGE_MARKERS:
        return "cd3neg"
    return "b_cells"


def _flag(method: str, n_events: int, marker: str, settings: GatingSettings) -> str:
    base = method.split("/")[0]
    if base in _UNFLAGGED or n_events < settings.flag_min_events:
        return ""
    return f"{marker}:{base}"


def naive_referenced_gates(values: Mapping[str, np.ndarray], *, naive_sd: float = 2.0,
                           iterations: int = 3) -> dict[str, float]:
    """Hi gates of a CD24hi CD38hi-style box, referenced to a sample's naive B cells.

    ``values`` holds the markers of the box on the sample's IgD+ CD27- B cells: naive cells
    and, on their upper tail, transitional cells. Each gate sits ``naive_sd`` robust SDs
    above the mode of the naive cells. In arcsinh space a naive peak is skewed (its lower
    side is long), so the SD that matters is the upper side's; transitional cells
    contaminate that side, so each marker's upper SD is measured on the cells below the
    gates of the other markers (transitional cells are high on all of them), starting
    from the lower side's SD, for a few iterations. With one marker the lower side's SD is
    used as is.

    Returns
    -------
    dict
        Marker -> gate (NaN for a marker without finite values).
    """
    clean = {m: np.asarray(v, dtype=np.float64) for m, v in values.items()}
    finite = np.logical_and.reduce([np.isfinite(v) for v in clean.values()])
    clean = {m: v[finite] for m, v in clean.items()}
    if not finite.any():
        return {m: float("nan") for m in values}
    modes = {m: density_mode(v) for m, v in clean.items()}

    def spread(deviations: np.ndarray) -> float:
        # Half-normal: the first quartile of the distances from the mode on one side is
        # 0.319 SD. The inner quartile, not the median: transitional cells, up to a quarter of
        # the cells on a first return, sit far out on the upper side and would widen it.
        return float(np.quantile(deviations, 0.25)) / 0.3186 if deviations.size else 0.0

    gates = {m: modes[m] + naive_sd * spread(modes[m] - v[v < modes[m]])
             for m, v in clean.items()}
    if len(clean) < 2:
        return gates
    for _ in range(iterations):
        updated = {}
        for marker, v in clean.items():
            # Naive cells for this marker's upper side: below the gate on every other marker
            # of the box (transitional cells are high on all of them).
            naive = np.logical_and.reduce([clean[m] < gates[m] for m in clean if m != marker])
            updated[marker] = modes[marker] + naive_sd * spread(
                v[naive & (v > modes[marker])] - modes[marker])
        gates = updated
    return gates


def learn_gates(
    samples: Mapping[str, Callable[[], Any] | Any],
    *,
    pos_markers: Sequence[str],
    hi_markers: Sequence[str],
    settings: GatingSettings,
    seed: int,
    groups: Mapping[str, str] | None = None,
    learners: set[str] | None = None,
    user_gates: Mapping[str, Mapping[tuple[str, str], tuple[float, str]]] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Learn every sample's gates, stage by stage, on registered pooled parents.

    Within a stage, the markers that other gates take their reference from go first (CD3
    before CD45 and CD14: T cells; CD19 and CD20 before CD56 and CD16; IgD before CD27:
    naive B cells), each pass reading every sample once.

    Parameters
    ----------
    samples
        ``sample_id -> AnnData`` or a callable returning one (files are read once per
        pass, one at a time, so memory stays bounded by one sample and the per-sample
        subsamples). Each provides ``X`` and ``var["canonical"]`` (``var["kind"]`` where
        known, for the background level); rows are the sample's QC-passed events.
    pos_markers
        Markers that need a positive gate.
    hi_markers
        Markers that need a hi gate.
    settings
        Gating settings.
    seed
        Seed of the equal-per-sample pooling subsample.
    groups
        ``sample_id -> group``: each group learns its own reference gates (``all`` when
        None).
    learners
        Samples whose events make the pool (all when None; ``baseline`` method: day <= 0).
        Every sample gets gates.
    user_gates
        ``sample_id -> {(marker, level): (threshold, source)}``: gates a user set (a
        corrected GatingML file, :func:`bcellmap.flow.gatingml.read_user_gates`), on the
        sample's own scale. Each replaces the learned gate (method ``user``, reliability
        ``ok``, no flag; the separation from its references is still measured for ``pos``
        gates), and the gates below it are learned within the parent it defines.

    Returns
    -------
    cohort
        One row per group, marker and level on the reference scale (columns of
        ``contracts.THRESHOLD_COLUMNS``).
    gates
        One row per sample, marker and level on that sample's own scale (``GATE_COLUMNS``),
        with the reference populations, the separation and the reliability of every gate
        (:mod:`bcellmap.flow.references`).
    """
    ids = sorted(samples)
    groups = {s: (groups or {}).get(s, ALL_SAMPLES) for s in ids}
    learners = set(ids) if learners is None else set(learners)
    state = {s: _SampleGates(groups[s], s in learners,
                             user=dict((user_gates or {}).get(s, {}))) for s in ids}
    hi_markers = list(dict.fromkeys(hi_markers))
    pos_markers = list(dict.fromkeys([*pos_markers,
                                      *(m for m in hi_markers
                                        if settings.hi_method.get(m, "positive_mode")
                                        == "positive_mode")]))
    cohort_rows: list[tuple] = []
    wanted = list(dict.fromkeys([*pos_markers, *hi_markers, "CD3", "CD19", "CD20", "IgD",
                                 "CD27"]))

    def _load(sample_id: str) -> Any:
        item = samples[sample_id]
        return item() if callable(item) else item

    for stage, markers in _passes(pos_markers):
        pools = _collect(stage, markers, ids, _load, wanted, state, settings, seed)
        for marker in markers:
            _learn_positive(marker, stage, pools[marker], state, settings, cohort_rows)
        _learn_positive_modes(stage, hi_markers, {m: pools[m].landmarks for m in markers},
                              {m: pools[m].present for m in markers}, state, settings,
                              cohort_rows)

    naive_hi = [m for m in hi_markers if settings.hi_method.get(m) == "naive_reference"]
    if naive_hi:
        _learn_naive_referenced(naive_hi, ids, _load, wanted, state, settings, cohort_rows)

    cohort = pd.DataFrame(cohort_rows, columns=list(THRESHOLD_COLUMNS))
    gates = pd.DataFrame([{"sample_id": s, "group": state[s].group, **row}
                          for s in ids for row in state[s].rows], columns=list(GATE_COLUMNS))
    return cohort, gates


#: Per stage, the markers gated in a first pass: the other markers' references rest on them.
_FIRST_PASS = {"lymphocyte": ("CD3",), "cd3neg": ("CD19", "CD20"), "b_cells": ("IgD",)}


def _passes(pos_markers: Sequence[str]) -> list[tuple[str, list[str]]]:
    """``(stage, markers)`` in the order they are learned (see :func:`learn_gates`)."""
    passes = []
    for stage in STAGES[:3]:
        markers = [m for m in pos_markers if _stage_of(m) == stage]
        first = [m for m in markers if m in _FIRST_PASS[stage]]
        rest = [m for m in markers if m not in _FIRST_PASS[stage]]
        passes += [(stage, group) for group in (first, rest) if group]
    return passes


@dataclass
class _Pool:
    """What one pass collected for one marker, per sample."""

    landmarks: dict[str, Landmarks | None] = field(default_factory=dict)
    pooled: dict[str, np.ndarray] = field(default_factory=dict)
    present: dict[str, int] = field(default_factory=dict)
    negative: dict[str, np.ndarray] = field(default_factory=dict)
    positive: dict[str, np.ndarray] = field(default_factory=dict)


def _collect(stage: str, markers: Sequence[str], ids: Sequence[str],
             load: Callable[[str], Any], wanted: Sequence[str],
             state: Mapping[str, _SampleGates], settings: GatingSettings,
             seed: int) -> dict[str, _Pool]:
    """Read every sample once: landmarks, pooled parent values and reference values."""
    pools = {m: _Pool() for m in markers}
    for sample_id in ids:
        data = load(sample_id)
        columns = marker_columns(data, wanted)
        if not columns:
            continue
        sample = state[sample_id]
        if not np.isfinite(sample.background) and "kind" in data.var.columns:
            sample.background, sample.top = background_level(data.X, data.var["kind"],
                                                             data.var["canonical"])
        parent = np.flatnonzero(parent_mask(stage, columns, sample.cut))
        rng = sample_rng(seed, sample_id)
        keep = parent[subsample_indices(parent.size, settings.events_per_sample, rng)]
        for marker in markers:
            if marker not in columns:
                continue
            pool = pools[marker]
            values = columns[marker][parent]
            pool.present[sample_id] = int(values.size)
            pool.landmarks[sample_id] = find_landmarks(
                values, min_events=settings.min_landmark_events,
                min_positive_events=settings.min_positive_events,
                min_positive_fraction=settings.min_positive_fraction,
                min_peak_fraction=settings.min_peak_fraction)
            # A saturation spike is no population (kernels.density); registered, each
            # sample's spike would land elsewhere in the pool, so it leaves here.
            pool.pooled[sample_id] = without_ceiling_ties(columns[marker][keep])
            spec = settings.references.get(marker, ReferenceSpec())
            for name, store in ((spec.negative, pool.negative), (spec.positive, pool.positive)):
                if name is None:
                    continue
                rows = reference_values(name, columns, sample.cut, unreliable=sample.unreliable)
                if rows is not None:
                    rows = rows[subsample_indices(rows.size, settings.events_per_sample, rng)]
                    store[sample_id] = columns[marker][rows]
    return pools


def _learn_positive(marker: str, stage: str, pool: _Pool, state: Mapping[str, _SampleGates],
                    settings: GatingSettings, cohort_rows: list[tuple]) -> None:
    """The positive gate of one marker: registered pool per group, then per sample.

    A density valley of the registered pool is mapped back onto every sample and kept where
    the sample's negative reference agrees with it; otherwise, and where the pool shows one
    population, each sample's gate is placed where its own reference population ends
    (``bcellmap.flow.references``; the cohort's pooled reference, registered, when the
    sample's own is too small). Without a valley and without a reference the gate is the
    upper-tail fallback, and unreliable.
    """
    parent = PARENT_NAMES[stage]
    spec = settings.references.get(marker, ReferenceSpec())
    limits = settings.reliability
    enough = limits.min_reference_events
    reference = ";".join(f"{kind}: {REFERENCE_NAMES.get(name, name)}" for kind, name in
                         (("negative", spec.negative), ("positive", spec.positive)) if name)
    for group in sorted({g.group for g in state.values()}):
        members = [s for s, g in state.items() if g.group == group and s in pool.present]
        if not members:
            continue
        if marker in settings.fixed:
            value = settings.fixed[marker]
            cohort_rows.append((group, marker, "pos", value, "fixed",
                                sum(pool.present[s] for s in members), len(members), parent))
            for s in members:
                _add_judged(state[s], marker, value, parent=parent, method="fixed",
                            pool=pool, sample_id=s, spec=spec, reference=reference,
                            settings=settings)
            continue
        registrations, ref_low, ref_high = _register(
            {s: pool.landmarks.get(s) for s in members}, max_stretch=settings.max_stretch)
        learning = [s for s in members if s in pool.pooled and state[s].learner]
        values = [np.asarray(registrations[s].forward(pool.pooled[s])) for s in learning]
        fit = learn_marker_threshold(np.concatenate(values) if values else np.empty(0),
                                     fallback_sd=settings.fallback_sd,
                                     min_peak_fraction=settings.min_peak_fraction)
        # The cohort's references, registered: for samples whose own is too small.
        cohort_edge = {}
        for side, store in (("upper", pool.negative), ("lower", pool.positive)):
            pooled = [np.asarray(registrations[s].forward(store[s])) for s in learning
                      if s in store]
            edge = reference_edge(np.concatenate(pooled), spec, side=side,
                                  min_events=enough) if pooled else None
            cohort_edge[side] = edge
        cohort_method = fit.method
        cohort_value = fit.threshold
        if fit.method != "valley" and (cohort_edge["upper"] or cohort_edge["lower"]):
            cohort_method = "reference_tail"
            cohort_value = (cohort_edge["upper"] or cohort_edge["lower"]).boundary
        cohort_rows.append((group, marker, "pos", cohort_value, cohort_method, fit.n_events,
                            len(learning), parent))
        log.info("%s %s pos (%s): %.3f (%s, %d events; reference modes %s / %s)", group,
                 marker, parent, cohort_value, cohort_method, fit.n_events,
                 _fmt(ref_low), _fmt(ref_high))
        for s in members:
            registration = registrations[s]
            negative, positive = pool.negative.get(s), pool.positive.get(s)
            lm = pool.landmarks.get(s)
            threshold, method = _place(fit.threshold, fit.method, registration, negative,
                                       positive, cohort_edge, spec, settings,
                                       pool.pooled.get(s, np.empty(0)), stage, lm)
            _add_judged(state[s], marker, threshold, parent=parent, method=method, pool=pool,
                        sample_id=s, spec=spec, reference=reference, settings=settings,
                        low=lm.low if lm else float("nan"),
                        high=lm.high if lm and lm.high is not None else float("nan"),
                        unaligned=registration.kind == "unaligned")


#: References drawn from the gate's own parent population, whose negatives they are: naive B
#: cells among B cells. Events between such a reference's end and a valley, beyond what its
#: tail puts there, are positives. (T cells are no part of the CD3- parent, whose negatives -
#: NK cells, and myeloid cells in lysed whole blood - may sit higher: there the rule would
#: invent B cells.)
_REFERENCE_WITHIN_PARENT = {("naive_b", "b_cells")}


def _place(pooled_threshold: float, pooled_method: str, registration: _Registration,
           negative: np.ndarray | None, positive: np.ndarray | None,
           cohort_edge: Mapping[str, TailBoundary | None], spec: ReferenceSpec,
           settings: GatingSettings, parent: np.ndarray, stage: str,
           landmarks: Landmarks | None = None) -> tuple[float, str]:
    """One sample's gate and method from the pooled fit, its own valley, its references and
    its parent events (a subsample).

    A sample that shows both populations well (each side of its own valley holds at least
    ``min_landmark_events`` events and 2% of the parent) is gated at its own valley
    (``valley/own``): the registered cohort valley is for samples that cannot place one, and a
    sample shaped unlike the cohort (a real-blood visit among bimodal ones) would otherwise get
    the cohort's valley at the wrong place in its own distribution.
    """
    enough = settings.reliability.min_reference_events

    def edge(values: np.ndarray | None, side: str) -> tuple[float, str] | None:
        if values is not None and values.size >= enough:
            found = reference_edge(values, spec, side=side, min_events=enough)
            if found is not None:
                return found.boundary, f"reference_tail/{found.kind}"
        cohort = cohort_edge.get(side)
        if cohort is not None:
            return registration.inverse(cohort.boundary), "reference_tail/cohort"
        return None

    threshold = (registration.inverse(pooled_threshold) if np.isfinite(pooled_threshold)
                 else float("nan"))
    own = landmarks is not None and landmarks.valley is not None and min(
        landmarks.high_share, 1.0 - landmarks.high_share) * landmarks.n_events >= max(
        settings.min_landmark_events, 0.02 * landmarks.n_events)
    if own and pooled_method == "valley":
        threshold, kind = float(landmarks.valley), "own"
    else:
        kind = registration.kind
    if pooled_method == "valley":
        if negative is not None and negative.size >= enough:
            limits = settings.reliability
            placed = edge(negative, "upper")
            if placed is not None and threshold < placed[0] and 100.0 * float(
                    np.mean(negative >= threshold)) > (limits.valley_max_negative_above_pct
                                                       + spec.expected_positive_pct):
                # The valley lies inside the known negatives (a split negative peak).
                return placed
            if placed is not None and threshold > placed[0] and parent.size \
                    and (spec.negative, stage) in _REFERENCE_WITHIN_PARENT:
                # Events above where the negatives end but below the valley, beyond what the
                # negatives' own tail puts there, are positive too: the valley parts two
                # positive populations (memory B cells' dim CD27 from the plasmablasts'
                # bright CD27), not the negatives from the positives.
                inside = (parent >= placed[0]) & (parent < threshold)
                tail = float(np.mean((negative >= placed[0]) & (negative < threshold)))
                excess = float(inside.sum()) - tail * float((parent < threshold).sum())
                above = int((parent >= threshold).sum())
                if excess >= max(limits.valley_max_between_pct / 100.0 * max(above, 1), 5):
                    return placed[0], f"{placed[1]}/valley_above_positives"
        return threshold, f"valley/{kind}"
    for values, side in ((negative, "upper"), (positive, "lower")):
        placed = edge(values, side)
        if placed is not None:
            return placed
    return threshold, f"{pooled_method}/{registration.kind}"


def _add_judged(sample: _SampleGates, marker: str, threshold: float, *, parent: str,
                method: str, pool: _Pool, sample_id: str, spec: ReferenceSpec,
                reference: str, settings: GatingSettings, low: float = float("nan"),
                high: float = float("nan"), unaligned: bool = False) -> None:
    """Measure a sample's gate against its references, judge it, and record it."""
    negative, positive = pool.negative.get(sample_id), pool.positive.get(sample_id)
    user = sample.user.get((marker, "pos"))
    if user is not None:
        threshold, method = user[0], "user"
    # A positive reference measures the gate when it placed it (CD45: no negative one);
    # otherwise (CD27: 10-30% of T cells are CD27-) it only checks the side.
    measured = separation(threshold, parent=pool.pooled.get(sample_id, np.empty(0)),
                          negative=negative, positive=None if spec.negative else positive,
                          min_reference=settings.reliability.min_reference_events)
    n_parent = pool.present.get(sample_id, 0)
    reliability, detail = judge(
        marker, gate=threshold, spec=spec, method=method, measured=measured,
        negative=negative, positive=positive, background=sample.background,
        top=sample.top, n_parent=n_parent,
        min_parent=settings.flag_min_events, settings=settings.reliability)
    flag = _flag(method.split("/")[0], n_parent, marker, settings)
    if user is not None:
        # The user stands behind it: measured, not judged.
        flag, reliability, detail = "", "ok", f"set by the user ({user[1]})"
    elif not flag and unaligned and np.isfinite(threshold):
        # Too few parent events to register: the cohort's gate, as is.
        flag = _flag("few_events", n_parent, marker, settings)
    sample.add(marker, "pos", threshold, parent=parent, method=method, n_events=n_parent,
               flag=flag, low=low, high=high, reference=reference, measured=measured,
               reliability=reliability, detail=detail)


def _learn_positive_modes(stage: str, hi_markers: Sequence[str],
                          landmarks: Mapping[str, Mapping[str, Landmarks | None]],
                          present: Mapping[str, Mapping[str, int]],
                          state: Mapping[str, _SampleGates], settings: GatingSettings,
                          cohort_rows: list[tuple]) -> None:
    """Hi gates at the sample's positive mode (or the cohort's, registered)."""
    parent = PARENT_NAMES[stage]
    for marker in hi_markers:
        if marker not in landmarks or settings.hi_method.get(marker,
                                                             "positive_mode") != "positive_mode":
            continue
        for group in sorted({g.group for g in state.values()}):
            members = [s for s, g in state.items() if g.group == group and s in present[marker]]
            if not members:
                continue
            if marker in settings.fixed_hi:
                value = settings.fixed_hi[marker]
                cohort_rows.append((group, marker, "hi", value, "fixed", 0, len(members),
                                    parent))
                for s in members:
                    state[s].add(marker, "hi", value, parent=parent, method="fixed",
                                 n_events=present[marker][s], reliability="not_assessed",
                                 detail="fixed gate (annotate.thresholds.fixed_hi)")
                continue
            registrations, _, ref_high = _register(
                {s: landmarks[marker].get(s) for s in members}, max_stretch=settings.max_stretch)
            cohort_rows.append((group, marker, "hi", ref_high if ref_high is not None
                                else float("nan"), "positive_mode",
                                sum(present[marker][s] for s in members), len(members), parent))
            for s in members:
                lm = landmarks[marker].get(s)
                n = present[marker][s]
                if lm is not None and lm.high is not None and registrations[s].kind == "aligned2":
                    state[s].add(marker, "hi", lm.high, parent=parent, method="positive_mode",
                                 n_events=n)
                elif ref_high is not None:
                    # No positive peak of its own (e.g. no memory B cells on return).
                    state[s].add(marker, "hi", registrations[s].inverse(ref_high),
                                 parent=parent, method="cohort_positive_mode",
                                 n_events=n, flag=_flag("cohort_positive_mode", n, marker,
                                                        settings))
                elif np.isfinite(state[s].cut.get(marker, {}).get("pos", np.nan)):
                    # No positive peak anywhere (memory B cells' CD27 a shoulder, as in real
                    # blood): "hi" is at least positive, and as reliable as that gate.
                    pos_row = next(r for r in reversed(state[s].rows)
                                   if r["marker"] == marker and r["level"] == "pos")
                    state[s].add(marker, "hi", state[s].cut[marker]["pos"], parent=parent,
                                 method="positive_gate", n_events=n,
                                 reliability=pos_row["reliability"],
                                 detail=pos_row["reliability_detail"])
                else:
                    state[s].add(marker, "hi", float("nan"), parent=parent,
                                 method="insufficient_events", n_events=n,
                                 flag=_flag("insufficient_events", n, marker, settings))


def _learn_naive_referenced(markers: Sequence[str], ids: Sequence[str],
                            load: Callable[[str], Any], wanted: Sequence[str],
                            state: Mapping[str, _SampleGates], settings: GatingSettings,
                            cohort_rows: list[tuple]) -> None:
    """Hi gates referenced to each sample's own naive B cells (IgD+ CD27-)."""
    parent = PARENT_NAMES["naive_b"]
    own: dict[str, dict[str, tuple[float, int]]] = {m: {} for m in markers}
    naive_values: dict[str, dict[str, np.ndarray]] = {m: {} for m in markers}
    reference = "negative: naive B cells (IgD+ CD27-)"

    def record(s: str, marker: str, value: float, *, method: str, n: int,
               flag: str = "") -> None:
        # The naive reference rests on the sample's IgD and CD27 gates.
        resting = sorted({"IgD", "CD27"} & state[s].unreliable)
        values = naive_values[marker].get(s, np.empty(0))
        measured = Separation(100.0 * float(np.mean(values >= value))
                              if values.size and np.isfinite(value) else float("nan"))
        if method == "fixed":
            reliability, detail = "not_assessed", "fixed gate (annotate.thresholds.fixed_hi)"
        elif resting:
            reliability, detail = "unreliable", (
                f"its naive reference rests on the unreliable {' and '.join(resting)} gate")
        else:
            reliability, detail = "ok", ""
        state[s].add(marker, "hi", value, parent=parent, method=method, n_events=n,
                     flag=flag, reference=reference, measured=measured,
                     reliability=reliability, detail=detail)
    for sample_id in ids:
        columns = marker_columns(load(sample_id), [*wanted, *markers])
        if not columns:
            continue
        naive = parent_mask("naive_b", columns, state[sample_id].cut)
        present = [m for m in markers if m in columns]
        n = int(naive.sum())
        if n >= settings.min_reference_events and present:
            gates = naive_referenced_gates({m: columns[m][naive] for m in present},
                                           naive_sd=settings.naive_sd)
        else:
            gates = {m: float("nan") for m in present}
        for marker in present:
            own[marker][sample_id] = (gates[marker], n)
            naive_values[marker][sample_id] = columns[marker][naive]
    for marker in markers:
        for group in sorted({g.group for g in state.values()}):
            members = [s for s in own[marker] if state[s].group == group]
            if not members:
                continue
            supported = [own[marker][s][0] for s in members if np.isfinite(own[marker][s][0])]
            cohort_value = float(np.median(supported)) if supported else float("nan")
            if marker in settings.fixed_hi:
                cohort_rows.append((group, marker, "hi", settings.fixed_hi[marker], "fixed", 0,
                                    len(members), parent))
            else:
                cohort_rows.append((group, marker, "hi", cohort_value, "naive_reference",
                                    sum(own[marker][s][1] for s in members), len(supported),
                                    parent))
            for s in members:
                gate, n = own[marker][s]
                if marker in settings.fixed_hi:
                    record(s, marker, settings.fixed_hi[marker], method="fixed", n=n)
                elif np.isfinite(gate):
                    record(s, marker, gate, method="naive_reference", n=n)
                else:
                    method = "few_events" if np.isfinite(cohort_value) else "insufficient_events"
                    record(s, marker, cohort_value, method=f"{method}/cohort_median", n=n,
                           flag=_flag(method, n, marker, settings))


def _fmt(value: float | None) -> str:
    return "-" if value is None or not math.isfinite(value) else f"{value:.3f}"


def gates_for_sample(gates: pd.DataFrame, sample_id: str) -> tuple[dict[str, dict[str, float]],
                                                                   pd.DataFrame]:
    """``{marker: {level: threshold}}`` and the gate rows of one sample."""
    rows = gates[gates["sample_id"].astype(str) == str(sample_id)].reset_index(drop=True)
    cut: dict[str, dict[str, float]] = {}
    for row in rows.itertuples(index=False):
        cut.setdefault(str(row.marker), {})[str(row.level)] = float(row.threshold)
    return cut, rows


def gate_flags(rows: pd.DataFrame) -> str:
    """The sample's gate flags, semicolon-separated (empty when every gate is sound)."""
    if rows.empty or "flag" not in rows.columns:
        return ""
    flags = [str(f) for f in rows["flag"].fillna("") if str(f)]
    return ";".join(dict.fromkeys(flags))


# --------------------------------------------------------------------------- lymphocytes


def _robust_ellipse(points: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of the core of ``points``: two passes trimmed at chi2(2) 97.5%."""
    inside = np.ones(points.shape[0], dtype=bool)
    mean = np.median(points, axis=0)
    covariance = np.cov(points.T) + 1e-9 * np.eye(2)
    for _ in range(3):
        mean = points[inside].mean(axis=0)
        covariance = np.cov(points[inside].T) + 1e-9 * np.eye(2)
        delta = points - mean
        distance = np.einsum("ij,jk,ik->i", delta, np.linalg.inv(covariance), delta)
        inside = distance <= 7.38  # chi-square, 2 degrees of freedom, 97.5%
        if inside.sum() < 10:
            break
    # The trimmed covariance of a normal core underestimates its spread by the trimming.
    return mean, covariance / 0.8


def lymphocyte_gate(
    columns: Mapping[str, np.ndarray],
    cut: Mapping[str, Mapping[str, float]],
    *,
    scatter: tuple[np.ndarray, np.ndarray] | None,
    max_mahalanobis: float = 3.5,
    min_reference_events: int = 50,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """T, B and NK cells among the scatter-gated events: lymphocytes by markers.

    After lymphodepletion, lysed whole blood is mostly granulocytes and monocytes, and a
    scatter gate alone lets some of them in. T cells (CD3+) and B cells (CD3- and CD19+ or
    CD20+) are lymphocytes by their markers; their own scatter (a robust ellipse on FSC-A x
    SSC-A) then defines where lymphocytes sit in this sample, and lineage-negative events
    count as NK cells only inside it (and, where the panel has them, only when CD45+, CD14-
    and CD56+ or CD16+). Without scatter channels, or with fewer than
    ``min_reference_events`` T and B cells, every lineage-negative event that passes the
    marker conditions is counted (recorded in the returned info). A panel without CD3 (a
    B-cell panel) cannot tell T from NK cells: its non-B lymphocytes are the CD19-CD20-
    events inside the B cells' scatter core (CD45+ and CD14- where measured), returned as
    ``NK`` and reported by the caller as lymphocytes of unresolved lineage.

    Returns
    -------
    calls
        Boolean arrays ``T``, ``B``, ``NK``, ``lymphocyte``, ``cd19_pos``, ``cd20_pos``.
    info
        What was used: ``nk_rule``, ``scatter_reference_events``, ellipse mean/covariance.
    """
    def positive(marker: str) -> np.ndarray | None:
        threshold = cut.get(marker, {}).get("pos", np.nan)
        if marker not in columns or not np.isfinite(threshold):
            return None
        return columns[marker] >= threshold

    n = len(next(iter(columns.values())))
    cd3 = positive("CD3")
    t_cell = cd3 if cd3 is not None else np.zeros(n, dtype=bool)
    cd19 = positive("CD19")
    cd20 = positive("CD20")
    cd19 = cd19 if cd19 is not None else np.zeros(n, dtype=bool)
    cd20 = cd20 if cd20 is not None else np.zeros(n, dtype=bool)
    b_cell = ~t_cell & (cd19 | cd20)
    rule = ["CD3-" if cd3 is not None else "(no CD3: T and NK cells not told apart)",
            "CD19-", "CD20-"]
    nk = ~t_cell & ~b_cell
    for marker, wanted in (("CD45", True), ("CD14", False)):
        call = positive(marker)
        if call is not None:
            nk &= call == wanted
            rule.append(f"{marker}{'+' if wanted else '-'}")
    nk_markers = [call for call in (positive("CD56"), positive("CD16")) if call is not None]
    if nk_markers and cd3 is not None:
        nk &= np.logical_or.reduce(nk_markers)
        rule.append("CD56+ or CD16+")
    info: dict[str, Any] = {}
    reference = t_cell | b_cell
    if scatter is not None and reference.sum() >= min_reference_events:
        points = np.column_stack(scatter).astype(np.float64)
        mean, covariance = _robust_ellipse(points[reference])
        delta = points - mean
        distance = np.einsum("ij,jk,ik->i", delta, np.linalg.inv(covariance), delta)
        nk &= distance <= max_mahalanobis ** 2
        rule.append(f"within {max_mahalanobis:g} Mahalanobis of the T/B scatter")
        info.update(scatter_mean=mean.tolist(), scatter_covariance=covariance.tolist())
    elif scatter is not None:
        rule.append("scatter gate only (too few T and B cells to place the lymphocyte core)")
    else:
        rule.append("no scatter channels")
    info.update(nk_rule=" ".join(rule), scatter_reference_events=int(reference.sum()),
                has_cd3=cd3 is not None)
    return {"T": t_cell, "B": b_cell, "NK": nk, "lymphocyte": t_cell | b_cell | nk,
            "cd19_pos": cd19, "cd20_pos": cd20}, info
