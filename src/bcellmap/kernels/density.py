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

__all__ = ["ThresholdFit", "density_mode", "find_modes", "learn_marker_threshold", "robust_sd"]


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


def _density(values: np.ndarray, *, bins: int = 256) -> tuple[np.ndarray, np.ndarray] | None:
    """Smoothed, normalised histogram density of finite ``values`` and its bin centres.

    The histogram spans the 0.1-99.9 percentile range; the Gaussian kernel's width follows
    Silverman's rule on the inter-quartile range, halved (the IQR of a bimodal pool
    overstates each mode). None when nearly all values are tied.
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
    bandwidth = 0.5 * 0.9 * spread * n ** (-0.2)
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
    values = values[np.isfinite(values)]
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
    values = values[np.isfinite(values)]
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


def density_mode(values: np.ndarray, *, bins: int = 256) -> float:
    """The highest point of the smoothed density of ``values`` (the median when tied)."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    estimate = _density(values, bins=bins) if values.size else None
    if estimate is None:
        return float(np.median(values)) if values.size else float("nan")
    density, centres = estimate
    return float(centres[int(np.argmax(density))])
