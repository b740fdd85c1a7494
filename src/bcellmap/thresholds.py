"""Positive/negative (and high) marker thresholds, learned once on the pooled cohort.

A threshold placed per sample would invent positives: in B-cell aplasia a sample has no
CD19+ population, and a two-population model fitted to that sample alone splits its
negative peak in two. Thresholds are therefore learned on a pool (the whole cohort, the
baseline samples, or each batch; ``annotate.thresholds.method``) made of an equal-sized,
seeded subsample of every sample, and the same values are applied to every sample.

Learning, per marker (``learn_marker_threshold``):

1. the density of the pooled values (histogram smoothed with a Gaussian kernel whose
   width follows Silverman's rule on the inter-quartile range, so a rare positive
   population does not widen the kernel);
2. the threshold is the density minimum between the highest peak and the other peak
   that makes the deepest valley with it (depth = log of the lower peak's height over the
   valley's height), provided that peak holds at least ``min_peak_fraction`` of the pool;
3. when no such valley exists (a unimodal pool, e.g. a marker nobody expresses), the
   threshold is the upper tail of the single population: median + ``fallback_sd`` robust
   standard deviations (1.4826 x MAD), which calls almost nothing positive.

The "hi" level of CD24, CD38 and CD27 (markers used with ``hi`` in the subset rules) is
learned on a second pool: B-lineage events (CD3- and CD19+ or CD20+ by the first-level
thresholds) that are positive for the marker; the valley between the positive and the
bright population, or, without one, the positive population's median + ``hi_fallback_sd``
robust standard deviations. Fixed values from ``annotate.thresholds.fixed`` (positive
level) and ``annotate.thresholds.fixed_hi`` (hi level) override learning.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .errors import ConfigError, InputError

log = logging.getLogger(__name__)

#: Markers of the cell-type rules; subset markers come from the subset rule table.
LINEAGE_MARKERS = ("CD3", "CD19", "CD20")
#: Columns of results/models/thresholds.tsv.
THRESHOLD_COLUMNS = ("group", "marker", "level", "threshold", "method", "n_events",
                     "n_samples", "pool")
#: Group name used when one set of thresholds serves every sample.
ALL_SAMPLES = "all"


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


def _robust_sd(values: np.ndarray) -> float:
    """1.4826 x median absolute deviation: the SD of a normal population, robust to tails."""
    median = float(np.median(values))
    return 1.4826 * float(np.median(np.abs(values - median)))


def learn_marker_threshold(
    values: np.ndarray,
    *,
    bins: int = 256,
    min_peak_fraction: float = 0.002,
    min_log_depth: float = math.log(2.0),
    fallback_sd: float = 4.0,
    min_events: int = 50,
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

    Returns
    -------
    ThresholdFit
    """
    from scipy.ndimage import gaussian_filter1d
    from scipy.signal import find_peaks

    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    n = int(values.size)
    if n < min_events:
        return ThresholdFit(float("nan"), "insufficient_events", n)
    lo, hi = np.quantile(values, [0.001, 0.999])
    if not hi > lo:
        # Nearly all values tied (e.g. an instrument floor at 0): "pos" is ">=", so the
        # threshold sits just above the tie, never on it.
        return ThresholdFit(float(np.nextafter(lo, np.inf)), "upper_tail", n)
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    centres = 0.5 * (edges[:-1] + edges[1:])
    width = edges[1] - edges[0]
    q25, q75 = np.quantile(values, [0.25, 0.75])
    spread = (q75 - q25) / 1.34
    if not spread > 0:
        spread = float(np.std(values)) or width
    # Silverman's rule on the IQR, halved: the IQR of a bimodal pool overstates each mode.
    bandwidth = 0.5 * 0.9 * spread * n ** (-0.2)
    density = gaussian_filter1d(counts.astype(np.float64), sigma=max(bandwidth / width, 1.0),
                                mode="constant")
    density /= density.sum()
    peaks, _ = find_peaks(np.concatenate(([0.0], density, [0.0])))
    peaks = peaks - 1
    if peaks.size >= 2:
        top = int(peaks[np.argmax(density[peaks])])
        best: tuple[float, int] | None = None
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
                    best = (depth, valley)
        if best is not None:
            return ThresholdFit(float(centres[best[1]]), "valley", n)
    median = float(np.median(values))
    robust_sd = _robust_sd(values)
    if not robust_sd > 0:  # over half the values tied: stay above the tie
        return ThresholdFit(float(np.nextafter(median, np.inf)), "upper_tail", n)
    return ThresholdFit(median + fallback_sd * robust_sd, "upper_tail", n)


def _marker_columns(adata: Any, markers: Iterable[str]) -> dict[str, np.ndarray]:
    """Return the ``X`` column of every named canonical marker that the sample has."""
    if "canonical" not in adata.var.columns:
        raise InputError("var has no 'canonical' column naming the markers")
    canonical = list(adata.var["canonical"].astype(str))
    columns: dict[str, np.ndarray] = {}
    x = adata.X
    for marker in markers:
        if marker in canonical:
            j = canonical.index(marker)
            column = x[:, j]
            column = column.toarray().ravel() if hasattr(column, "toarray") else column
            columns[marker] = np.asarray(column, dtype=np.float64).ravel()
    return columns


def _settings(config: Mapping[str, Any]) -> dict[str, Any]:
    """The ``annotate.thresholds`` settings with defaults for keys absent in old configs."""
    settings = dict(config.get("annotate", {}).get("thresholds", {}))
    settings.setdefault("method", "pooled")
    settings.setdefault("fixed", {})
    settings.setdefault("fixed_hi", {})
    settings.setdefault("events_per_sample", 5000)
    settings.setdefault("fallback_sd", 4.0)
    settings.setdefault("hi_fallback_sd", 2.0)
    settings.setdefault("min_peak_fraction", 0.002)
    if settings["method"] not in ("pooled", "baseline", "batch"):
        raise ConfigError(f"annotate.thresholds.method {settings['method']!r}: expected "
                          "pooled, baseline or batch")
    return settings


def _subsample(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a seeded subsample of at most ``size`` of ``n`` rows."""
    if n <= size:
        return np.arange(n)
    return np.sort(rng.choice(n, size=size, replace=False))


def _b_lineage(columns: Mapping[str, np.ndarray], positive: Mapping[str, float]) -> np.ndarray:
    """CD3- and (CD19+ or CD20+) by the given thresholds (the cell-type rule for B)."""
    n = len(next(iter(columns.values())))
    b_marker = np.zeros(n, dtype=bool)
    for marker in ("CD19", "CD20"):
        if marker in columns and np.isfinite(positive.get(marker, np.nan)):
            b_marker |= columns[marker] >= positive[marker]
    if "CD3" in columns and np.isfinite(positive.get("CD3", np.nan)):
        b_marker &= columns["CD3"] < positive["CD3"]
    return b_marker


def learn_thresholds(
    samples: Mapping[str, Any] | Sequence[tuple[str, Any]],
    *,
    markers: Sequence[str],
    hi_markers: Sequence[str],
    config: Mapping[str, Any],
    group: str = ALL_SAMPLES,
) -> pd.DataFrame:
    """Learn positive and hi thresholds on a pool of samples.

    Parameters
    ----------
    samples
        ``sample_id -> AnnData`` (or a callable returning one, so files are read one at a
        time; each is opened twice). Each provides ``X`` and ``var["canonical"]``.
    markers
        Canonical markers that get a positive threshold.
    hi_markers
        Markers that also get a hi threshold (learned on the B-lineage pool).
    config
        The merged config (``seed`` and ``annotate.thresholds``).
    group
        Name written in the ``group`` column (``all`` or a batch name).

    Returns
    -------
    pandas.DataFrame
        Columns ``THRESHOLD_COLUMNS``, one row per marker and level.
    """
    settings = _settings(config)
    seed = int(config.get("seed", 0))
    per_sample = int(settings["events_per_sample"])
    items = sorted(dict(samples).items())
    wanted = list(dict.fromkeys([*markers, *hi_markers]))

    def _load(item: Any) -> Any:
        return item() if callable(item) else item

    # Pass 1: equal-per-sample subsample of all events; one seed stream per sample, in
    # sample_id order, so the pool does not depend on the order of the inputs.
    streams = np.random.SeedSequence(seed).spawn(len(items))
    pool: dict[str, list[np.ndarray]] = {m: [] for m in wanted}
    seen: dict[str, int] = {m: 0 for m in wanted}
    for (sample_id, item), stream in zip(items, streams, strict=True):
        columns = _marker_columns(_load(item), wanted)
        if not columns:
            continue
        n = len(next(iter(columns.values())))
        keep = _subsample(n, per_sample, np.random.default_rng(stream))
        for marker, column in columns.items():
            pool[marker].append(column[keep])
            seen[marker] += 1
        log.debug("%s: %d of %d events pooled", sample_id, keep.size, n)

    fixed = {str(k): float(v) for k, v in dict(settings["fixed"]).items()}
    fixed_hi = {str(k): float(v) for k, v in dict(settings["fixed_hi"]).items()}
    rows = []
    positive: dict[str, float] = {}
    for marker in wanted:
        values = np.concatenate(pool[marker]) if pool[marker] else np.empty(0)
        if marker in fixed:
            fit = ThresholdFit(fixed[marker], "fixed", int(values.size))
        elif values.size == 0:
            continue  # no sample has this marker: rules using it cannot be called
        else:
            fit = learn_marker_threshold(values, fallback_sd=float(settings["fallback_sd"]),
                                         min_peak_fraction=float(settings["min_peak_fraction"]))
        positive[marker] = fit.threshold
        rows.append((group, marker, "pos", fit.threshold, fit.method, fit.n_events,
                     seen[marker], "all_events"))
        log.info("%s %s pos: %.3f (%s, %d events)", group, marker, fit.threshold, fit.method,
                 fit.n_events)

    # Pass 2: hi levels on B-lineage events positive for the marker.
    hi_wanted = [m for m in hi_markers if m in positive]
    if hi_wanted:
        hi_pool: dict[str, list[np.ndarray]] = {m: [] for m in hi_wanted}
        streams = np.random.SeedSequence([seed, 1]).spawn(len(items))
        for (_, item), stream in zip(items, streams, strict=True):
            columns = _marker_columns(_load(item), wanted)
            if not columns:
                continue
            b_rows = np.flatnonzero(_b_lineage(columns, positive))
            b_rows = b_rows[_subsample(b_rows.size, per_sample, np.random.default_rng(stream))]
            for marker in hi_wanted:
                if marker in columns:
                    values = columns[marker][b_rows]
                    hi_pool[marker].append(values[values >= positive[marker]])
        for marker in hi_wanted:
            values = np.concatenate(hi_pool[marker]) if hi_pool[marker] else np.empty(0)
            if marker in fixed_hi:
                fit = ThresholdFit(fixed_hi[marker], "fixed", int(values.size))
            else:
                fit = _learn_hi(values, floor=positive[marker],
                                fallback_sd=float(settings["hi_fallback_sd"]),
                                min_peak_fraction=float(settings["min_peak_fraction"]))
            rows.append((group, marker, "hi", fit.threshold, fit.method, fit.n_events,
                         seen[marker], "b_lineage_positive"))
            log.info("%s %s hi: %.3f (%s, %d events)", group, marker, fit.threshold,
                     fit.method, fit.n_events)
    return pd.DataFrame(rows, columns=list(THRESHOLD_COLUMNS))


def _learn_hi(values: np.ndarray, *, floor: float, fallback_sd: float,
              min_peak_fraction: float) -> ThresholdFit:
    """Hi level within the positive events: a valley above ``floor``, else an upper tail."""
    fit = learn_marker_threshold(values, fallback_sd=fallback_sd,
                                 min_peak_fraction=min_peak_fraction)
    if fit.method == "valley" and fit.threshold > floor:
        return fit
    if fit.method == "insufficient_events":
        return fit
    median = float(np.median(values))
    return ThresholdFit(max(median + fallback_sd * _robust_sd(values), floor), "upper_tail",
                        fit.n_events)


def thresholds_for(table: pd.DataFrame, group: str) -> dict[str, dict[str, float]]:
    """Return ``{marker: {"pos": t, "hi": t}}`` for one group of a thresholds table.

    Falls back to the ``all`` group when the table has no rows for ``group``.
    """
    rows = table[table["group"].astype(str) == str(group)]
    if rows.empty:
        rows = table[table["group"].astype(str) == ALL_SAMPLES]
    if rows.empty:
        raise InputError(f"thresholds table has no rows for group {group!r} nor {ALL_SAMPLES!r}")
    out: dict[str, dict[str, float]] = {}
    for row in rows.itertuples(index=False):
        out.setdefault(str(row.marker), {})[str(row.level)] = float(row.threshold)
    return out


def read_thresholds(path: str | os.PathLike) -> pd.DataFrame:
    """Read ``thresholds.tsv``, checking its columns."""
    try:
        table = pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""],
                            dtype={"group": str, "marker": str, "level": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"cannot read the thresholds table ({exc})", path=path) from None
    missing = [c for c in ("group", "marker", "level", "threshold") if c not in table.columns]
    if missing:
        raise InputError(f"thresholds table lacks columns {', '.join(missing)}", path=path)
    return table


def threshold_group(row: Mapping[str, Any], method: str) -> str:
    """The thresholds group a sample uses: its batch under ``method: batch``, else ``all``."""
    if method == "batch":
        batch = str(row.get("batch", "") or "")
        return batch if batch else ALL_SAMPLES
    return ALL_SAMPLES


def cli_thresholds(args: argparse.Namespace) -> None:
    """``bcellmap thresholds``: learn thresholds on the mapped samples -> thresholds.tsv."""
    import anndata as ad

    from ._io import write_tsv
    from .annotate import load_subset_rules
    from .config import load_config
    from .samplesheet import read_sample_sheet

    config = load_config(args.config)
    settings = _settings(config)
    sheet = read_sample_sheet(args.samples, check_files=False)
    rules = load_subset_rules(config)
    subset_markers = [m for rule in rules for m in rule.levels]
    hi_markers = list(dict.fromkeys(m for rule in rules for m, lv in rule.levels.items()
                                    if lv in ("hi", "lo")))
    markers = list(dict.fromkeys([*LINEAGE_MARKERS, *subset_markers]))

    paths: dict[str, Path] = {}
    for path in map(Path, args.inputs):
        sample_id = path.name.removesuffix(".h5ad")
        if sample_id not in sheet.index:
            raise InputError("input file is not named after a sample of the sheet",
                             path=path, sample_id=sample_id)
        paths[sample_id] = path

    def _reader(path: Path, sample_id: str) -> Any:
        def _read() -> Any:
            try:
                return ad.read_h5ad(path)
            except OSError as exc:
                raise InputError(f"cannot read the mapped h5ad ({exc})", path=path,
                                 sample_id=sample_id) from None
        return _read

    groups: dict[str, dict[str, Any]] = {}
    for sample_id, path in paths.items():
        row = sheet.loc[sample_id]
        if settings["method"] == "baseline":
            if int(row["day"]) > 0:
                continue
            group = ALL_SAMPLES
        else:
            group = threshold_group(row, settings["method"])
        groups.setdefault(group, {})[sample_id] = _reader(path, sample_id)
    if not groups:
        raise InputError("no sample to learn thresholds on (method "
                         f"{settings['method']!r}: baseline needs samples with day <= 0)",
                         path=args.samples)
    tables = [learn_thresholds(members, markers=markers, hi_markers=hi_markers, config=config,
                               group=group)
              for group, members in sorted(groups.items())]
    write_tsv(pd.concat(tables, ignore_index=True), args.out)
