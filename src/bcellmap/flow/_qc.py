"""Per-event quality control of one flow sample, and the cohort QC table.

Steps, in order (each flags events in ``obs`` and is counted in the per-sample QC table):

``non_finite``
    Events with a NaN or infinite value on any channel (as read, or after transform). They
    are removed before every other step, so no step fits on them; their values are set to 0
    in the AnnData (``ingest``), which therefore holds only finite numbers.
``margin``
    Detector saturation and impossible scatter, as FlowJo and PeacoQC's ``RemoveMargins``
    do. Saturation is judged on the *raw* channel value, before ``$PnE`` log decoding and
    ``$PnG`` gain: raw ``>= $PnR - 1`` (tested as linear ``>=`` the linearised value of raw
    ``$PnR - 1``, ``FcsData.saturation``, which is the same test since decoding is monotone;
    on an FCS 2.0 file with ``$PnR 1024`` and 4 log decades that is linear 9910, not 1023).
    Saturated events are removed on the channel kinds in ``qc.margin.remove_saturated`` and
    only counted (``detail``, ``uns["qc"]["margin"]``) on the others. The default, ``auto``,
    removes them on scatter and on the fluorescence channels that were compensated (a
    clipped value spilled back out of the other channels corrupts all of them: a T cell
    with a clipped CD27 detector comes out CD3-negative), and counts them on uncompensated
    fluorescence, where a saturated event is usually a real bright cell (CD19/CD20 B cells,
    CD38++ plasmablasts on old log-amplified files). Events with scatter area/height below
    ``qc.margin.scatter_min`` (default -111, PeacoQC's lower bound for BD instruments) are
    removed. Skipped for mass
    cytometry, whose ``$PnR`` is not a detector limit.
``doublets``
    ``FSC-A / FSC-H`` above ``median + mad_cutoff * MAD`` (MAD scaled to a normal SD),
    learned on the events that passed ``margin``. Events with ``FSC-H <= 0`` are flagged.
``dead``
    Viability (``Live`` channel, transformed) above a threshold: ``qc.dead.threshold`` when
    set, else the density valley between the dim (live) peak and the next peak above it;
    with a single peak, ``median + fallback_mad_cutoff * MAD`` of the live peak.
``debris``
    A lymphocyte scatter gate learned per sample: a seeded Gaussian mixture on the scaled
    FSC-A/SSC-A of the events passing the earlier steps. The lymphocyte component is the one
    with the lowest SSC among components of at least 5% weight whose FSC mean is at least
    ``min_fsc_fraction`` of the largest such FSC mean (debris has low FSC); components whose
    means lie within ``max_mahalanobis`` of it are merged into the gate (the mixture may split
    lymphocytes). Events further than ``max_mahalanobis`` from every gate component are
    flagged (debris and non-lymphocytes). Checked against the lymphocytes by their markers
    (T cells above their own CD3 valley, B cells above both CD19 and CD20 valleys): a gate
    that would remove more than ``max_lineage_removed_fraction`` of them is not applied
    (``scatter_gate_not_applied``).
``time_anomaly``
    Equal-width time bins; a bin is flagged when its event count, or the mean of any
    transformed fluorescence/viability channel, lies more than ``mad_cutoff`` robust SDs (and,
    for a mean, ``min_shift`` transformed units) from the other bins (PeacoQC/flowAI spirit).
    Uses the events passing the earlier steps.

Every step fits on the events that passed the steps before it and then flags *every* event
(an event can be flagged by several steps); the QC table counts them sequentially. A step is
skipped, and recorded as skipped in ``detail``, when its channels are absent.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..contracts import FLOW_QC_STEPS as STEPS
from ..contracts import QC_TABLE_COLUMNS, subsample_indices
from ..contracts import qc_reason as _qc_reason
from ..errors import ConfigError
from ..kernels.density import density_mode, learn_marker_threshold, robust_sd
from ..kernels.gmm import gaussian_mixture

log = logging.getLogger(__name__)

#: obs column per step.
FLAG_COLUMNS = {"non_finite": "qc_non_finite",
                "margin": "qc_margin", "doublets": "qc_doublet", "dead": "qc_dead",
                "debris": "qc_debris", "time_anomaly": "qc_time_anomaly"}
# config["ingest"]["qc"] section per step.
_SETTINGS_KEY = {"non_finite": "non_finite",
                 "margin": "margin", "doublets": "doublets", "dead": "dead",
                 "debris": "scatter_gate", "time_anomaly": "time_anomaly"}
_MAD_TO_SD = 1.4826
# A viability valley must fall below 80% of the lower of its two peaks (log(1 / 0.8)).
_DEAD_MIN_LOG_DEPTH = 0.2231
_SCATTER_FOR_MARGIN = ("FSC-A", "FSC-H", "SSC-A", "SSC-H")
# Gaussian-mixture fits see at most this many events (seeded subsample): plenty for a 2-D fit.
_GMM_MAX_EVENTS = 20000


def _robust_center_scale(values: np.ndarray) -> tuple[float, float]:
    """Median and MAD scaled to a normal SD."""
    median = float(np.median(values))
    return median, float(_MAD_TO_SD * np.median(np.abs(values - median)))


def margin_flags(linear: np.ndarray, *, kinds: Sequence[str], canonicals: Sequence[str],
                 ranges: Sequence[float], scatter_min: float,
                 saturation: Sequence[float] | None = None,
                 remove_saturated: Sequence[str] = ("scatter",),
                 remove_channels: Sequence[bool] | None = None,
                 ) -> tuple[np.ndarray, dict]:
    """Flag saturated events and scatter below ``scatter_min``.

    ``saturation`` is per channel the linear value of raw channel ``$PnR - 1`` (defaults to
    ``ranges - 1``, right for linear channels without gain). Saturation flags an event only
    on the channel kinds in ``remove_saturated``, or on the channels ``remove_channels``
    marks; on the others it is counted.

    Returns the flags and ``{"removed": {channel: n}, "counted": {channel: n},
    "below_scatter_min": {channel: n}}``.
    """
    limits = (np.asarray(ranges, dtype=float) - 1.0 if saturation is None
              else np.asarray(saturation, dtype=float))
    flags = np.zeros(linear.shape[0], dtype=bool)
    removed: dict[str, int] = {}
    counted: dict[str, int] = {}
    low: dict[str, int] = {}
    for index, kind in enumerate(kinds):
        if kind not in ("scatter", "fluorescence", "viability"):
            continue
        name = canonicals[index] or str(index)
        column = linear[:, index]
        saturated = column >= limits[index]
        remove = kind in remove_saturated or bool(
            remove_channels is not None and remove_channels[index])
        if saturated.any():
            (removed if remove else counted)[name] = int(saturated.sum())
        if remove:
            flags |= saturated
        if canonicals[index] in _SCATTER_FOR_MARGIN:
            below = column < scatter_min
            if below.any():
                low[name] = int(below.sum())
            flags |= below
    return flags, {"removed": removed, "counted": counted, "below_scatter_min": low}


def doublet_flags(fsc_area: np.ndarray, fsc_height: np.ndarray, *, fit_mask: np.ndarray,
                  mad_cutoff: float) -> tuple[np.ndarray, dict]:
    """Flag events whose FSC-A/FSC-H ratio is above ``median + mad_cutoff * MAD``."""
    valid = fsc_height > 0
    ratio = np.full(fsc_area.shape, np.inf)
    np.divide(fsc_area, fsc_height, out=ratio, where=valid)
    fit = ratio[fit_mask & valid]
    if fit.size < 10:
        return ~valid, {"skipped": "fewer than 10 events to learn the FSC-A/FSC-H ratio"}
    median, scale = _robust_center_scale(fit)
    cutoff = median + mad_cutoff * scale
    return ratio > cutoff, {"ratio_median": median, "ratio_mad": scale, "ratio_cutoff": cutoff}


def dead_flags(viability: np.ndarray, *, fit_mask: np.ndarray, threshold: float | None,
               fallback_mad_cutoff: float, fsc: np.ndarray | None = None
               ) -> tuple[np.ndarray, dict]:
    """Flag events with viability signal above the configured or learned threshold.

    The learned threshold is the first density valley above the live (dye-negative) peak,
    so dim dying cells and debris go too; without a valley, the live peak's upper tail
    (median + ``fallback_mad_cutoff`` robust SDs). Dead cells are the dye-*bright* ones, so a
    valley that would call most events dead, the sample's dominant population among them,
    is checked against the events' scatter: it is believed only when the brighter side looks
    dead by its scatter too (median FSC-A at most 85% of the dimmer side's: dying cells
    shrink). Otherwise the valley lies under a live population (a live-cell export whose
    viability peak has a dim shoulder, compensation spread below it) and the gate moves
    above the dominant peak: its next valley, or its upper tail (``method`` says which).
    """
    if threshold is not None:
        return viability > threshold, {"threshold": float(threshold), "method": "config"}
    fit = viability[fit_mask]
    if fit.size < 50:
        return np.zeros(viability.shape, dtype=bool), {
            "skipped": "fewer than 50 events to learn the viability threshold"}
    fit_result = learn_marker_threshold(fit, fallback_sd=fallback_mad_cutoff, valley="first",
                                        min_peak_fraction=0.01,
                                        min_log_depth=_DEAD_MIN_LOG_DEPTH)
    method = ("density valley" if fit_result.method == "valley"
              else "single peak: median + MAD")
    cut = fit_result.threshold
    dominant = density_mode(fit)
    if fit_result.method == "valley" and cut < dominant and np.mean(fit > cut) > 0.5:
        fsc_fit = None if fsc is None else fsc[fit_mask]
        brighter_looks_dead = fsc_fit is not None and (fit > cut).any() and (
            fit <= cut).any() and float(np.median(fsc_fit[fit > cut])) <= 0.85 * float(
                np.median(fsc_fit[fit <= cut]))
        if not brighter_looks_dead:
            upper = fit[fit >= dominant - robust_sd(fit[fit <= dominant])]
            above = learn_marker_threshold(upper, fallback_sd=fallback_mad_cutoff,
                                           valley="first", min_peak_fraction=0.01,
                                           min_log_depth=_DEAD_MIN_LOG_DEPTH)
            if above.method == "valley" and above.threshold > dominant:
                cut, method = above.threshold, "valley above the dominant (live) peak"
            else:
                spread = robust_sd(fit[fit <= dominant])
                cut = dominant + fallback_mad_cutoff * max(spread, 1e-9)
                method = ("upper tail of the dominant (live) peak: a valley below it would "
                          "have called it dead")
    return viability > cut, {"threshold": float(cut), "method": method}


def _mahalanobis_sq(points: np.ndarray, mean: np.ndarray, covariance: np.ndarray) -> np.ndarray:
    delta = points - mean
    return np.einsum("ij,jk,ik->i", delta, np.linalg.inv(covariance), delta)


def scatter_gate_flags(fsc: np.ndarray, ssc: np.ndarray, *, fit_mask: np.ndarray,
                       n_components: int, max_mahalanobis: float, min_fsc_fraction: float,
                       seed: int) -> tuple[np.ndarray, dict]:
    """Flag events outside the learned lymphocyte gate on (FSC-A, SSC-A)."""
    points = np.column_stack([fsc, ssc]).astype(np.float64)
    fit_index = np.flatnonzero(fit_mask)
    if fit_index.size < 10 * n_components:
        return np.zeros(fsc.shape, dtype=bool), {
            "skipped": f"fewer than {10 * n_components} events to fit the scatter gate"}
    # fit_index is sorted, so the subsample stays in event order.
    fit_index = fit_index[subsample_indices(fit_index.size, _GMM_MAX_EVENTS,
                                            np.random.default_rng(seed))]
    mixture = gaussian_mixture(points[fit_index], n_components=n_components, seed=seed,
                               reg_covar=1e-4, n_init=5)
    means, covariances, weights = mixture.means, mixture.covariances, mixture.weights
    candidates = np.flatnonzero(weights >= 0.05)
    top_fsc = means[candidates, 0].max()
    candidates = candidates[means[candidates, 0] >= min_fsc_fraction * top_fsc]
    lymphocytes = int(candidates[np.argmin(means[candidates, 1])])
    limit = max_mahalanobis ** 2
    gate = [k for k in range(n_components)
            if k == lymphocytes or _mahalanobis_sq(means[k:k + 1], means[lymphocytes],
                                                   covariances[lymphocytes])[0] <= limit]
    inside = np.zeros(fsc.shape, dtype=bool)
    for k in gate:
        inside |= _mahalanobis_sq(points, means[k], covariances[k]) <= limit
    return ~inside, {
        "components": {"means": means.tolist(), "weights": weights.tolist()},
        "lymphocyte_component": lymphocytes,
        "gate_components": gate,
        "gate_means": means[gate].tolist(),
        "gate_covariances": covariances[gate].tolist(),
    }


def time_anomaly_flags(time: np.ndarray, signals: np.ndarray, *, fit_mask: np.ndarray,
                       bins: int, mad_cutoff: float, min_shift: float = 0.3,
                       min_events_per_bin: int = 10) -> tuple[np.ndarray, dict]:
    """Flag events in time bins with an abnormal event rate or mean signal.

    The signal check compares per-bin means, not medians: a marker whose events are about
    half positive has a bimodal distribution, and its per-bin median jumps between the two
    modes by chance, while the mean moves smoothly with composition. A bin is flagged on
    signal only when its mean is both ``mad_cutoff`` robust SDs and ``min_shift``
    transformed units away from the typical bin, so tiny but consistent bins are kept.
    """
    fit_time = time[fit_mask]
    if fit_time.size < bins * min_events_per_bin // 2 or np.ptp(fit_time) <= 0:
        return np.zeros(time.shape, dtype=bool), {
            "skipped": "too few events or no time span for the time check"}
    edges = np.linspace(fit_time.min(), fit_time.max(), bins + 1)
    fit_bin = np.clip(np.searchsorted(edges, fit_time, side="right") - 1, 0, bins - 1)
    counts = np.bincount(fit_bin, minlength=bins).astype(float)
    bad = np.zeros(bins, dtype=bool)

    def _outlying(values: np.ndarray, usable: np.ndarray, floor: float = 0.0) -> np.ndarray:
        median, scale = _robust_center_scale(values[usable])
        if scale <= 0:
            scale = max(1e-9, 1e-6 * abs(median))
        return usable & (np.abs(values - median) > max(mad_cutoff * scale, floor))

    # Bins of zero events hold nothing to remove, so the rate check looks at the others.
    by_rate = _outlying(counts, counts > 0)
    bad |= by_rate
    enough = counts >= min_events_per_bin
    by_signal = np.zeros(bins, dtype=bool)
    if signals.shape[1] and enough.sum() >= 5:
        fit_signals = signals[fit_mask]
        safe_counts = np.maximum(counts, 1.0)
        for column in range(signals.shape[1]):
            means = np.bincount(fit_bin, weights=fit_signals[:, column], minlength=bins)
            by_signal |= _outlying(means / safe_counts, enough, floor=min_shift)
        bad |= by_signal
    event_bin = np.clip(np.searchsorted(edges, time, side="right") - 1, 0, bins - 1)
    # Events outside the fitted time span (possible only for earlier-flagged ones) stay unflagged.
    in_span = (time >= edges[0]) & (time <= edges[-1])
    return in_span & bad[event_bin], {
        "bins": int(bins), "edges": [float(edges[0]), float(edges[-1])],
        "bad_bins": np.flatnonzero(bad).tolist(), "bad_by_rate": np.flatnonzero(by_rate).tolist(),
        "bad_by_signal": np.flatnonzero(by_signal).tolist()}


def run_qc(
    X: np.ndarray,
    linear: np.ndarray,
    *,
    canonicals: Sequence[str],
    kinds: Sequence[str],
    ranges: Sequence[float],
    settings: Mapping[str, Any],
    seed: int,
    mass_cytometry: bool = False,
    saturation: Sequence[float] | None = None,
    non_finite: np.ndarray | None = None,
    compensated: Sequence[bool] | None = None,
) -> tuple[dict[str, np.ndarray], list[dict[str, Any]], dict[str, Any]]:
    """Run the QC steps on one sample.

    Parameters
    ----------
    X
        Transformed events (scatter scaled to 0-10).
    linear
        Uncompensated linear events (for detector margins and the FSC-A/FSC-H ratio).
    canonicals, kinds, ranges
        Per channel: canonical name, kind, ``$PnR``.
    settings
        ``config["ingest"]["qc"]``.
    seed
        Seed of the scatter-gate mixture fit and its subsample.
    mass_cytometry
        Skip the margin step (mass cytometry ``$PnR`` is no detector limit).
    saturation
        Per channel, the linear value of raw channel ``$PnR - 1`` (``FcsData.saturation``);
        None: ``ranges - 1``.
    non_finite
        Events known to hold a NaN/inf (before they were zero-filled); None: found in ``X``
        and ``linear``.
    compensated
        Per channel, whether it was compensated (``remove_saturated: auto`` removes
        saturation on those); None: no channel was.

    Returns
    -------
    flags, steps, learned
        ``{obs column: bool array}`` per step, one record per step (``step, events_in,
        events_removed, events_out, detail``) and the parameters/gates used per step.
    """
    n_events = X.shape[0]
    where = {name: i for i, name in enumerate(canonicals) if name}
    passed = np.ones(n_events, dtype=bool)
    flags: dict[str, np.ndarray] = {}
    steps: list[dict[str, Any]] = []
    learned: dict[str, Any] = {}

    not_applied: list[str] = []
    for step in STEPS:
        step_settings = dict(settings.get(_SETTINGS_KEY[step]) or {})
        flag = np.zeros(n_events, dtype=bool)
        info: dict[str, Any]
        skipped = None
        if step == "non_finite":
            # Always on: no later step can fit on NaN/inf, and none may pass QC.
            flag = np.zeros(n_events, dtype=bool) if non_finite is None else \
                np.asarray(non_finite, dtype=bool).copy()
            flag |= ~np.isfinite(X).all(axis=1) | ~np.isfinite(linear).all(axis=1)
            info = {"rule": "NaN or infinite value on any channel"}
        elif not step_settings["enabled"]:
            skipped = "disabled in config"
        elif step == "margin":
            if mass_cytometry:
                skipped = "mass cytometry: $PnR is not a detector limit"
            else:
                remove_on = step_settings["remove_saturated"]
                auto = remove_on == "auto"
                remove_on = ["scatter"] if auto else (
                    [remove_on] if isinstance(remove_on, str) else list(remove_on or []))
                unknown = sorted(set(remove_on) - {"scatter", "fluorescence", "viability"})
                if unknown:
                    raise ConfigError(f"ingest.qc.margin.remove_saturated: {unknown} are not "
                                     "channel kinds (scatter, fluorescence, viability), nor auto")
                # auto: a clipped detector that was compensated corrupts every channel it
                # spills into, so those events go; uncompensated fluorescence is counted.
                remove_channels = list(compensated) if auto and compensated is not None \
                    else None
                flag, per_channel = margin_flags(
                    linear, kinds=kinds, canonicals=canonicals, ranges=ranges,
                    scatter_min=float(step_settings["scatter_min"]),
                    saturation=saturation, remove_saturated=remove_on,
                    remove_channels=remove_channels)
                if auto:
                    remove_on = [*remove_on, "compensated fluorescence"]
                info = {"rule": "raw value >= $PnR - 1 (removed on "
                        f"{', '.join(remove_on) or 'no channel kind'}, counted on the others), "
                        f"or scatter < {step_settings.get('scatter_min', -111.0)}",
                        "remove_saturated": remove_on, **per_channel}
        elif step == "doublets":
            if "FSC-A" in where and "FSC-H" in where:
                flag, info = doublet_flags(linear[:, where["FSC-A"]], linear[:, where["FSC-H"]],
                                           fit_mask=passed,
                                           mad_cutoff=float(step_settings["mad_cutoff"]))
            else:
                skipped = "no FSC-A and FSC-H channels"
        elif step == "dead":
            if "Live" in where:
                threshold = step_settings.get("threshold")
                flag, info = dead_flags(
                    X[:, where["Live"]], fit_mask=passed,
                    threshold=None if threshold is None else float(threshold),
                    fallback_mad_cutoff=float(step_settings["fallback_mad_cutoff"]),
                    fsc=linear[:, where["FSC-A"]] if "FSC-A" in where else None)
            else:
                skipped = "no viability channel"
        elif step == "debris":
            if "FSC-A" in where and "SSC-A" in where:
                flag, info = scatter_gate_flags(
                    X[:, where["FSC-A"]], X[:, where["SSC-A"]], fit_mask=passed,
                    n_components=int(step_settings["n_components"]),
                    max_mahalanobis=float(step_settings["max_mahalanobis"]),
                    min_fsc_fraction=float(step_settings["min_fsc_fraction"]),
                    seed=seed)
                # Checked against the lymphocytes by their markers: a scatter gate that would
                # cut many of them (a live-cell export, already gated, whose lymphocytes a
                # mixture fitted for whole blood splits) is not applied, and said so.
                cut = _lineage_removed_by(X, where, kept=passed, removed=passed & flag)
                limit = 100.0 * float(settings["max_lineage_removed_fraction"])
                if cut is not None and cut["removed_pct"] > limit:
                    flag = np.zeros(n_events, dtype=bool)
                    info = {"skipped": (
                        f"not applied: it would remove {cut['removed_pct']:.0f}% of the "
                        f"lymphocytes by their markers ({', '.join(cut['markers'])}; limit "
                        f"{limit:g}%)")}
                    not_applied.append("scatter_gate_not_applied")
            else:
                skipped = "no FSC-A and SSC-A channels"
        elif step == "time_anomaly":
            if "Time" in where:
                signal_columns = [i for i, k in enumerate(kinds)
                                  if k in ("fluorescence", "viability")]
                flag, info = time_anomaly_flags(
                    X[:, where["Time"]].astype(np.float64), X[:, signal_columns],
                    fit_mask=passed, bins=int(step_settings["bins"]),
                    mad_cutoff=float(step_settings["mad_cutoff"]),
                    min_shift=float(step_settings["min_shift"]))
            else:
                skipped = "no Time channel"
        if skipped is None and "skipped" in info:
            skipped = info.pop("skipped")
        if skipped is not None:
            flag = np.zeros(n_events, dtype=bool)
            info = {"skipped": skipped}
        flags[FLAG_COLUMNS[step]] = flag
        removed = int((passed & flag).sum())
        events_in = int(passed.sum())
        passed &= ~flag
        steps.append({"step": step, "events_in": events_in, "events_removed": removed,
                      "events_out": events_in - removed,
                      "detail": f"skipped: {skipped}" if skipped else _detail(step, info)})
        learned[step] = {"settings": step_settings, **info}
    learned["flags"] = removed_most_flags(steps, max_fraction=float(
        settings["max_removed_fraction"])) + not_applied
    lineage = _lineage_cells_removed(X, where, flags)
    if lineage is not None:
        learned["lineage_check"] = lineage
        if lineage["removed_pct"] > 100.0 * float(settings["max_lineage_removed_fraction"]):
            learned["flags"].append("qc_removed_lineage_cells")
    for step in steps:
        if f"{step['step']}_removed_most" in learned["flags"]:
            share = 100.0 * step["events_removed"] / step["events_in"]
            step["detail"] += f"; removed {share:.0f}% of its events (flagged)"
    return flags, steps, learned


#: Steps whose removal of lineage-marker-positive cells is checked. Margin and doublet events
#: are no cells to keep, and dead cells bind antibodies unspecifically (they would look like
#: lineage cells): these are measured among the events that passed all three.
_CELL_STEPS = ("debris", "time_anomaly")


def _lineage_cells_removed(X: np.ndarray, where: Mapping[str, int],
                           flags: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
    """The share of lineage-positive events that the debris (scatter) and time steps removed
    (:func:`_lineage_removed_by`), among the events that passed margin, doublets and dead."""
    earlier = np.logical_or.reduce([flags[FLAG_COLUMNS[step]] for step in (
        "non_finite", "margin", "doublets", "dead")])
    removed = np.logical_or.reduce([flags[FLAG_COLUMNS[step]] for step in _CELL_STEPS])
    return _lineage_removed_by(X, where, kept=~earlier, removed=removed)


def _lineage_removed_by(X: np.ndarray, where: Mapping[str, int], *, kept: np.ndarray,
                        removed: np.ndarray) -> dict[str, Any] | None:
    """The share of lineage-positive events among ``kept`` (T cells above their own CD3
    density valley; B cells above their own CD19 and CD20 valleys, where the panel has both)
    that ``removed`` holds.

    These are lymphocytes by their markers, a reference the QC steps never saw: a scatter
    gate or a time filter that removes many of them (a live-cell export's lymphocytes cut
    by a scatter gate learned for whole blood) removes real cells. None without a separated
    lineage marker (a valley whose positive side holds 1-90% of the events).
    """
    from ..kernels.density import separated_valley

    # The valleys are those of the events every step kept: a time anomaly's shifted events
    # make no lineage population of their own.
    clean = kept & ~removed
    enough = int(clean.sum()) >= 100

    def above_valley(marker: str) -> np.ndarray | None:
        if marker not in where or not enough:
            return None
        values = X[:, where[marker]]
        valley = separated_valley(values[clean], max_share=0.9)
        return None if valley is None else kept & (values >= valley)

    positive = np.zeros(X.shape[0], dtype=bool)
    used = []
    t_cells = above_valley("CD3")
    if t_cells is not None:
        positive |= t_cells
        used.append("CD3")
    # B cells only by both B-lineage markers: granulocytes' and monocytes' autofluorescence,
    # an uncompensated neighbour's spillover or a time anomaly's shift can raise one channel
    # above its valley, not both.
    lineage = [m for m in ("CD19", "CD20") if m in where]
    b_calls = [above_valley(m) for m in lineage]
    if len(lineage) == 2 and all(call is not None for call in b_calls):
        positive |= np.logical_and.reduce(b_calls)
        used += lineage
    if positive.sum() < 50:
        return None
    return {"markers": used, "events": int(positive.sum()),
            "removed_pct": 100.0 * float((positive & removed).sum()) / float(positive.sum())}


def removed_most_flags(steps: Sequence[Mapping[str, Any]], *, max_fraction: float) -> list[str]:
    """``{step}_removed_most`` for every QC step that removed more than ``max_fraction`` of
    the events it was given (at least 100): never silently. Whole blood after lymphodepletion
    loses most of its events to the scatter gate (granulocytes); a live-cell export should
    lose few to any step, and a viability gate that removes most events of one is suspect.
    """
    return [f"{step['step']}_removed_most" for step in steps
            if step["events_in"] >= 100
            and step["events_removed"] > max_fraction * step["events_in"]]


def _detail(step: str, info: Mapping[str, Any]) -> str:
    """A short human-readable summary of what a step learned."""
    if step == "non_finite":
        return "events with a NaN or infinite value"
    if step == "margin":
        def _list(counts: Mapping[str, int]) -> str:
            return ", ".join(f"{k} {v}" for k, v in counts.items()) or "none"
        return (f"saturated, removed: {_list(info['removed'])}; saturated, kept (counted): "
                f"{_list(info['counted'])}; scatter below minimum: "
                f"{_list(info['below_scatter_min'])}")
    if step == "doublets":
        return f"FSC-A/FSC-H ratio > {info['ratio_cutoff']:.4g}"
    if step == "dead":
        return f"viability > {info['threshold']:.4g} ({info['method']})"
    if step == "debris":
        return (f"lymphocyte gate: {len(info['gate_components'])} mixture component(s), "
                f"lymphocyte mean FSC-A/SSC-A "
                f"{info['components']['means'][info['lymphocyte_component']][0]:.3g}/"
                f"{info['components']['means'][info['lymphocyte_component']][1]:.3g}")
    return f"{len(info['bad_bins'])} of {info['bins']} time bins flagged"


def qc_reason(flags: Mapping[str, np.ndarray]):
    """First failing step per event (in ``STEPS`` order), or ``pass``, as a Categorical.

    ``flags`` maps the obs flag columns (:data:`FLAG_COLUMNS`) to boolean arrays.
    """
    return _qc_reason({step: flags[FLAG_COLUMNS[step]] for step in STEPS}, STEPS)


def qc_table(steps: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]], *,
             sample_id: str):
    """The per-sample QC table (``results/qc/{sample_id}.tsv``) as a DataFrame.

    ``steps`` is the step records of ``run_qc`` or their columns (``uns["qc"]["table"]``).
    """
    import pandas as pd

    frame = pd.DataFrame(steps if isinstance(steps, Mapping) else list(steps))
    frame.insert(0, "sample_id", sample_id)
    return frame[list(QC_TABLE_COLUMNS)]


def collect_qc(tables: Sequence[Any]):
    """The cohort QC table (``results/tables/qc.tsv``): per-sample QC tables, one after another.

    Parameters
    ----------
    tables
        Per-sample QC tables (:func:`qc_table`, ``results/qc/{sample_id}.tsv``), each with at
        least the ``QC_TABLE_COLUMNS``.

    Returns
    -------
    pandas.DataFrame
        The rows of every table in the order given (an empty table when none is given).
    """
    import pandas as pd

    if not tables:
        return pd.DataFrame(columns=list(QC_TABLE_COLUMNS))
    return pd.concat(list(tables), ignore_index=True)
