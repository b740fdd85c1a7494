"""The 1-D density threshold learner: one marker, two populations, one valley.

The one learner of the package: QC (the viability dye), the flow gates
(:mod:`bcellmap.flow.gating`) and the CITE-seq protein gates (:mod:`bcellmap.scrna.annotate`)
all place their thresholds with it.

1. the density of the values (histogram smoothed with a Gaussian kernel whose width follows
   Silverman's rule on the inter-quartile range, so a rare positive population does not
   widen the kernel);
2. the threshold is the density minimum between the highest peak and the other peak that
   makes the deepest valley with it (depth = log of the lower peak's height over the valley's
   height), provided that peak holds at least ``min_peak_fraction`` of the values;
3. when no such valley exists (a unimodal pool, e.g. a marker nobody expresses), the
   threshold is the upper tail of the single population: median + ``fallback_sd`` robust
   standard deviations (1.4826 x MAD), which calls almost nothing positive.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import numpy as np

__all__ = ["TailBoundary", "ThresholdFit", "density_mode", "find_modes", "learn_marker_threshold",
           "mirrored_share", "robust_sd", "tail_boundary", "without_ceiling_ties"]


@dataclass(frozen=True)
class ThresholdFit:
    """One learned threshold.

    Attributes
    ----------
    threshold
        The transformed value separating the two levels (NaN when it could not be learned).
    method
        ``valley``, ``upper_tail`` (no valley found), ``fixed`` or ``insufficient_events``.
    n_events
        Events in the pool it was learned on.
    """

    threshold: float
    method: str
    n_events: int


def robust_sd(values: np.ndarray) -> float:
    """1.4826 x median absolute deviation: the SD of a normal population, robust to tails."""
    median = float(np.median(values))
    return 1.4826 * float(np.median(np.abs(values - median)))


def without_ceiling_ties(values: np.ndarray) -> np.ndarray:
    """``values`` without a tie at their maximum held by many events (a saturation spike).

    Saturated events (kept on uncompensated fluorescence, or clipped at the top of a
    0-4,096 export) all carry the channel's top value; their spike is no population, yet
    a density sees a peak there and a valley below it. At least 10 events and 0.1% of them,
    and at most 5%, tied at the maximum make a spike. They stay positive for any gate
    (``>=``), so leaving them out of the density moves no event. More than 5% tied is a
    population of its own at the top of the scale, and stays.
    """
    if values.size < 10:
        return values
    top = values.max()
    tied = int((values == top).sum())
    if max(10, 0.001 * values.size) <= tied <= 0.05 * values.size:
        return values[values < top]
    return values


def _gaussian_smooth(values: np.ndarray, *, sigma: float, truncate: float = 4.0) -> np.ndarray:
    """Gaussian smoothing with zeros beyond the ends.

    The same numbers as ``scipy.ndimage.gaussian_filter1d(values, sigma, mode="constant")``,
    without importing scipy.ndimage (a third of a second in every per-sample job).
    """
    radius = int(truncate * sigma + 0.5)
    offsets = np.arange(-radius, radius + 1, dtype=np.float64)
    kernel = np.exp(-0.5 * (offsets / sigma) ** 2)
    kernel /= kernel.sum()
    # The kernel is symmetric, so convolution equals scipy's correlation.
    return np.convolve(values, kernel, mode="full")[radius:radius + values.size]


def _local_maxima(values: np.ndarray) -> np.ndarray:
    """Indices of the local maxima of ``values``: ``scipy.signal.find_peaks(values)[0]``.

    A maximum is higher than both neighbours; a flat top counts once, at its middle (rounded
    down); the ends never count. Kept here because importing scipy.signal costs about a
    second in every per-sample job.
    """
    peaks = []
    i, last = 1, values.size - 1
    while i < last:
        if values[i - 1] < values[i]:
            ahead = i + 1
            while ahead < last and values[ahead] == values[i]:
                ahead += 1
            if values[ahead] < values[i]:
                peaks.append((i + ahead - 1) // 2)
                i = ahead
        i += 1
    return np.asarray(peaks, dtype=np.intp)


def _density(values: np.ndarray, *, bins: int = 256, bandwidth_factor: float = 0.5
             ) -> tuple[np.ndarray, np.ndarray] | None:
    """Smoothed, normalised histogram density of finite ``values`` and its bin centres.

    The histogram spans the 0.1-99.9 percentile range; the Gaussian kernel's width follows
    Silverman's rule on the inter-quartile range, times ``bandwidth_factor`` (halved by
    default: the IQR of a bimodal pool overstates each mode; a single reference population
    is smoothed with the full width, so that its slope is not ragged). None when nearly all
    values are tied.
    """
    n = values.size
    lo, hi = np.quantile(values, [0.001, 0.999])
    if not hi > lo:
        return None
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    width = edges[1] - edges[0]
    q25, q75 = np.quantile(values, [0.25, 0.75])
    spread = (q75 - q25) / 1.34
    if not spread > 0:
        spread = float(np.std(values)) or width
    bandwidth = bandwidth_factor * 0.9 * spread * n ** (-0.2)
    density = _gaussian_smooth(counts.astype(np.float64), sigma=max(bandwidth / width, 1.0))
    return density / density.sum(), centres


def _deepest_valley(density: np.ndarray, *, min_peak_fraction: float,
                    min_log_depth: float) -> tuple[int, int, int] | None:
    """(valley, lower peak, upper peak) bins of the deepest valley beside the highest peak.

    The other peak must make a valley at least ``min_log_depth`` deep (log of the lower
    peak's density over the valley's) and hold ``min_peak_fraction`` of the mass.
    """
    peaks = _local_maxima(np.concatenate(([0.0], density, [0.0]))) - 1
    if peaks.size < 2:
        return None
    top = int(peaks[np.argmax(density[peaks])])
    best: tuple[float, int, int, int] | None = None
    for other in peaks:
        other = int(other)
        if other == top:
            continue
        left, right = sorted((top, other))
        valley = left + int(np.argmin(density[left:right + 1]))
        floor = max(float(density[valley]), 1e-12)
        depth = math.log(min(density[top], density[other]) / floor)
        # Mass of the smaller population: the side of the valley that holds `other`.
        side = density[valley + 1:] if other > top else density[:valley]
        if depth >= min_log_depth and side.sum() >= min_peak_fraction:
            if best is None or depth > best[0]:
                best = (depth, valley, left, right)
    return None if best is None else best[1:]


def _first_valley(density: np.ndarray, *, min_peak_fraction: float,
                  min_log_depth: float) -> tuple[int, int, int] | None:
    """(valley, lower peak, upper peak) bins of the first valley above the lowest peak.

    Walks up from the lowest peak (peaks below 5% of the highest are ignored); a valley
    counts when it is ``min_log_depth`` deep below the lower of its two peaks and the events
    above it hold ``min_peak_fraction`` of the mass; a shallower neighbour is merged into
    the walk (the higher of the two goes on).
    """
    peaks = _local_maxima(np.concatenate(([0.0], density, [0.0])))
    # Ripples in a tail are not populations: a peak must reach 5% of the highest one.
    peaks = [int(p) - 1 for p in peaks if density[p - 1] >= 0.05 * density.max()]
    if len(peaks) < 2:
        return None
    current = peaks[0]
    for candidate in peaks[1:]:
        valley = current + int(np.argmin(density[current:candidate + 1]))
        floor = max(float(density[valley]), 1e-12)
        depth = math.log(min(density[current], density[candidate]) / floor)
        if depth >= min_log_depth and density[valley + 1:].sum() >= min_peak_fraction:
            return valley, current, candidate
        if density[candidate] > density[current]:
            current = candidate
    return None


def learn_marker_threshold(
    values: np.ndarray,
    *,
    bins: int = 256,
    min_peak_fraction: float = 0.002,
    min_log_depth: float = math.log(2.0),
    fallback_sd: float = 4.0,
    min_events: int = 50,
    valley: Literal["deepest", "first"] = "deepest",
) -> ThresholdFit:
    """Learn the threshold between a marker's negative and positive populations.

    Parameters
    ----------
    values
        Transformed values of one marker, pooled over samples.
    bins
        Histogram bins over the 0.1-99.9 percentile range.
    min_peak_fraction
        The smaller population must hold at least this fraction of the pool to count.
    min_log_depth
        Minimum log ratio of the smaller peak's density over the valley's density.
    fallback_sd
        Without a valley: median + this many robust SDs.
    min_events
        Fewer finite values than this: the threshold is NaN (``insufficient_events``).
    valley
        ``deepest``: the deepest valley beside the highest peak (a marker's negative and
        positive populations). ``first``: the first valley above the lowest peak, so that
        everything brighter than the negative population is "positive" (a viability dye,
        where dim events are dying cells and debris, not live cells).

    Returns
    -------
    ThresholdFit
    """
    values = np.asarray(values, dtype=np.float64)
    values = without_ceiling_ties(values[np.isfinite(values)])
    n = int(values.size)
    if n < min_events:
        return ThresholdFit(float("nan"), "insufficient_events", n)
    estimate = _density(values, bins=bins)
    if estimate is None:
        # Nearly all values tied (e.g. an instrument floor at 0): "pos" is ">=", so the
        # threshold sits just above the tie, never on it.
        return ThresholdFit(float(np.nextafter(np.quantile(values, 0.001), np.inf)),
                            "upper_tail", n)
    density, centres = estimate
    finder = _deepest_valley if valley == "deepest" else _first_valley
    found = finder(density, min_peak_fraction=min_peak_fraction, min_log_depth=min_log_depth)
    if found is not None:
        return ThresholdFit(float(centres[found[0]]), "valley", n)
    median = float(np.median(values))
    spread = robust_sd(values)
    if not spread > 0:  # over half the values tied: stay above the tie
        return ThresholdFit(float(np.nextafter(median, np.inf)), "upper_tail", n)
    return ThresholdFit(median + fallback_sd * spread, "upper_tail", n)


def find_modes(values: np.ndarray, *, bins: int = 256, min_peak_fraction: float = 0.002,
               min_log_depth: float = math.log(2.0)) -> tuple[float, tuple[float, float]] | None:
    """The deepest valley of ``values`` and the density modes on either side of it.

    Returns ``(valley, (lower mode, upper mode))``, or None for a unimodal sample.
    """
    values = np.asarray(values, dtype=np.float64)
    values = without_ceiling_ties(values[np.isfinite(values)])
    estimate = _density(values, bins=bins) if values.size else None
    if estimate is None:
        return None
    density, centres = estimate
    found = _deepest_valley(density, min_peak_fraction=min_peak_fraction,
                            min_log_depth=min_log_depth)
    if found is None:
        return None
    valley = found[0]
    low = int(np.argmax(density[:valley + 1]))
    high = valley + int(np.argmax(density[valley:]))
    return float(centres[valley]), (float(centres[low]), float(centres[high]))


def separated_valley(values: np.ndarray, *, max_share: float) -> float | None:
    """The valley of a clearly separate positive population in ``values``, else None.

    The population above the valley must hold 1% to ``max_share`` of the events, and its
    mode lie at least four robust SDs (of the negative peak's lower side) above the negative
    mode: a few bright events, or a dip inside one population, are no population of their
    own.
    """
    modes = find_modes(values)
    if modes is None:
        return None
    valley, (low, high) = modes
    lower = values[values < low]
    spread = 1.4826 * float(np.median(low - lower)) if lower.size else 0.0
    share = float(np.mean(values >= valley))
    if not (0.01 <= share <= max_share and spread > 0 and high - low >= 4.0 * spread):
        return None
    return valley


def density_mode(values: np.ndarray, *, bins: int = 256) -> float:
    """The highest point of the smoothed density of ``values`` (the median when tied)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    estimate = _density(values, bins=bins) if values.size else None
    if estimate is None:
        return float(np.median(values)) if values.size else float("nan")
    density, centres = estimate
    return float(centres[int(np.argmax(density))])


@dataclass(frozen=True)
class TailBoundary:
    """Where the dominant population of a sample ends on one side (:func:`tail_boundary`).

    Attributes
    ----------
    boundary
        The transformed value where the population's density ends.
    peak
        Its mode.
    kind
        ``tail`` (the density has flattened out), ``shoulder`` (the slope eased off and
        steepened again: another population starts), ``valley`` (the density rises again)
        ``quantile`` (a long tail: see ``max_tail_share``) or ``range_end`` (none of these
        before the end of the data).
    spread
        Robust SD of the population on its inner side (the side away from the boundary, which
        other populations do not contaminate): 1.4826 x the median distance from the mode.
    n_events
        Values it was found on.
    """

    boundary: float
    peak: float
    kind: str
    spread: float
    n_events: int


def _excess_beyond(values: np.ndarray, mode: float, point: float) -> float:
    """Events at or beyond ``point`` (above ``mode``) minus those the values below ``mode``,
    mirrored about it, put there."""
    mirrored = int(((mode - values[values < mode]) >= point - mode).sum())
    return float((values >= point).sum() - mirrored)


def _first_valley_beyond(density: np.ndarray, top: int) -> int | None:
    """The first density minimum right of ``top`` that a real second population follows.

    A ripple is no valley: the density must then climb to a peak at least 25% above the
    minimum and at least 5% of the height at ``top``.
    """
    maxima = _local_maxima(np.concatenate(([0.0], density, [0.0]))) - 1
    for peak in maxima[maxima > top]:
        low = top + int(np.argmin(density[top:peak + 1]))
        if density[peak] >= max(1.25 * density[low], 0.05 * density[top]):
            return low
    return None


def _tail_density(values: np.ndarray, *, bins: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Density of one population, smoothed with Silverman's full bandwidth, on a grid that
    runs three bandwidths past the 0.1 and 99.9 percentiles, so that its tails fall off
    smoothly instead of at a cut-off (the tail rule reads their slope)."""
    lo, hi = np.quantile(values, [0.001, 0.999])
    if not hi > lo:
        return None
    q25, q75 = np.quantile(values, [0.25, 0.75])
    spread = (q75 - q25) / 1.34
    if not spread > 0:
        spread = float(np.std(values)) or (hi - lo)
    bandwidth = 0.9 * spread * values.size ** (-0.2)
    lo, hi = lo - 3.0 * bandwidth, hi + 3.0 * bandwidth
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    width = edges[1] - edges[0]
    density = _gaussian_smooth(counts.astype(np.float64), sigma=max(bandwidth / width, 1.0))
    return density / density.sum(), 0.5 * (edges[:-1] + edges[1:])


def tail_boundary(
    values: np.ndarray,
    *,
    side: Literal["upper", "lower"] = "upper",
    alpha: float = 0.1,
    magnitude: float = 0.3,
    shoulder_ratio: float = 0.5,
    min_excess: float = 0.02,
    max_tail_share: float | None = 0.02,
    clean: bool = False,
    min_events: int = 50,
    bins: int = 256,
) -> TailBoundary | None:
    """Where the density of a sample's dominant population ends: a tail gate.

    A gate placed where a *reference* population's density ends, as the field places tail
    gates: openCyto's ``gate_tail`` (RGLab/cytoUtils ``R/tailgate.R``: the first point past
    the density's steepest descent beyond the reference peak where the slope falls below a
    tolerance) and flowDensity's ``deGate(upper = TRUE)`` (mehrnoushmalek/flowDensity
    ``R/helper_functions.R``, ``.trackSlope``: the first point beyond the peak where the
    slope is below ``alpha`` of the steepest slope *and* the density below ``magnitude`` of
    the peak's height; defaults 0.1 and 0.3). For a normal population that is 2.75 SD
    beyond the mode (0.3% of it above).

    Like flowDensity's slope tracking, a shoulder counts as a population boundary: where,
    past the steepest descent, the slope eases to a local minimum below ``shoulder_ratio`` of
    the steepest slope and then steepens again, a second population overlaps the first
    (memory B cells' CD27 on the naive peak), and the boundary is there. A density that
    rises again (a valley) ends the population too.

    Parameters
    ----------
    values
        Transformed values of the reference population (e.g. a sample's T cells' CD19).
    side
        ``upper``: where the population ends above its mode (a negative reference: the gate
        of the positive events above it); ``lower``: below its mode (a positive reference).
    alpha, magnitude
        flowDensity's tail rule: slope below ``alpha`` of the steepest slope and density
        below ``magnitude`` of the peak.
    shoulder_ratio
        A shoulder's slope must ease below this share of the steepest slope.
    min_excess
        ... and the events beyond it must exceed what the population's clean side, mirrored
        about the mode, accounts for by this share of all values (and by 10 events).
    max_tail_share
        A ``tail`` (or ``range_end``) boundary with more than this share of the values above
        it, up to the next population's valley if there is one (a long, flat tail, as
        zero-inflated mass cytometry counts have), moves up to the ``1 - max_tail_share``
        quantile (``kind`` ``quantile``): every value of a clean
        reference is negative. None for a reference that may hold a positive subset (naive
        B cells among IgD+ B cells, CD20dim T cells), whose tail may be that subset.
    min_events
        Fewer finite values: None.
    bins
        Histogram bins over the 0.1-99.9 percentile range and three bandwidths beyond
        (full Silverman bandwidth).

    Returns
    -------
    TailBoundary or None
    """
    values = np.asarray(values, dtype=np.float64)
    values = without_ceiling_ties(values[np.isfinite(values)])
    if values.size < min_events:
        return None
    flip = -1.0 if side == "lower" else 1.0
    values = flip * values
    estimate = _tail_density(values, bins=bins)
    if estimate is None:
        peak = float(np.median(values))
        return TailBoundary(flip * float(np.nextafter(peak, np.inf)), flip * peak,
                            "range_end", 0.0, int(values.size))
    density, centres = estimate
    top = int(np.argmax(density))
    peak = float(centres[top])
    inner = peak - values[values < peak]
    spread = 1.4826 * float(np.median(inner)) if inner.size else 0.0
    descent = -np.gradient(density)  # positive where the density falls to the right
    # The population's far side runs from its mode to the first point where the density
    # rises again (a valley) or to the end of the grid; its steepest descent is the flank.
    end = density.size - 1
    valley = _first_valley_beyond(density, top)
    if valley is not None:
        end = valley
    steepest = top + int(np.argmax(descent[top:end + 1]))
    steepest_slope = float(descent[steepest])
    kind, index = ("valley", end) if valley is not None else ("range_end", end)
    if steepest_slope > 0:
        for i in range(steepest + 1, end):
            slope = descent[i]
            if slope < alpha * steepest_slope and density[i] < magnitude * density[top]:
                kind, index = "tail", i
                break
            # A shoulder: the slope eases to a local minimum and then steepens again by a
            # fifth of the flank's slope at least, and more events lie beyond it than the
            # population's clean side, mirrored, accounts for (ripples carry no such excess).
            if (slope <= descent[i - 1] and slope < descent[i + 1]
                    and slope < shoulder_ratio * steepest_slope
                    and centres[i] - peak >= 1.5 * spread
                    and descent[i + 1:end + 1].max() >= slope + 0.2 * steepest_slope
                    and _excess_beyond(values, peak, float(centres[i])) >= max(
                        min_excess * values.size, 10)):
                kind, index = "shoulder", i
                break
    boundary = float(centres[index])
    # A long tail of the same population (zero-inflated mass cytometry counts): its density
    # flattens early, so the gate goes where all but max_tail_share of it lie. In a clean
    # population a valley or shoulder is such a tail too; in one that may hold a second
    # population, only the events up to the valley before that population are its tail.
    stop = np.inf if clean or valley is None else float(centres[valley])
    if max_tail_share is not None and (clean or kind in ("tail", "range_end")) and np.mean(
            (values >= boundary) & (values < stop)) > max_tail_share:
        kind = "quantile"
        boundary = min(float(np.quantile(values, 1.0 - max_tail_share)), stop)
    return TailBoundary(flip * boundary, flip * peak, kind, spread, int(values.size))


def mirrored_share(values: np.ndarray, *, mode: float, gate: float,
                   side: Literal["above", "below"] = "above") -> float:
    """Share of a population on one side of ``gate``, modelled from its clean side.

    A population overlapped by another on one side is modelled by its other side reflected
    about its mode (the population is taken as symmetric there): for a negative population
    under a gate, its lower side; for a positive one, its upper side. ``side="above"``: the
    share of the population modelled by the values below ``mode`` that lies at or above
    ``gate``; ``side="below"``: of the population modelled by the values above ``mode``, the
    share below ``gate``. NaN without values on the clean side.
    """
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if side == "above":
        clean = mode - values[values < mode]
        distance = gate - mode
    else:
        clean = values[values > mode] - mode
        distance = mode - gate
    if clean.size == 0:
        return float("nan")
    if distance <= 0:
        # The gate is on the clean side: the clean values beyond it, and the whole mirror.
        return float(0.5 + 0.5 * np.mean(clean <= -distance))
    return float(0.5 * np.mean(clean >= distance))
