"""The 1-D threshold learner, the thresholds tables and ``bcellmap thresholds``.

A threshold placed per sample would invent positives: in B-cell aplasia a sample has no
CD19+ population, and a two-population model fitted to that sample alone splits its
negative peak in two. Thresholds are therefore learned on a pool (the whole cohort, the
baseline samples, or each batch; ``annotate.thresholds.method``) made of an equal-sized,
seeded subsample of every sample, and mapped onto every sample through its registration.

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

Where each threshold is learned (the parent population of every gate), how visits are
registered onto each other before pooling, and the "hi" levels: ``bcellmap.flow.gating``.
``bcellmap thresholds`` writes the cohort's reference gates (``thresholds.tsv``) and every
sample's own gates (``gates.tsv``). Fixed values from ``annotate.thresholds.fixed`` (positive
level) and ``annotate.thresholds.fixed_hi`` (hi level) override learning.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from ..errors import ConfigError, InputError

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


def _density(values: np.ndarray, *, bins: int = 256) -> tuple[np.ndarray, np.ndarray] | None:
    """Smoothed, normalised histogram density of finite ``values`` and its bin centres.

    The histogram spans the 0.1-99.9 percentile range; the Gaussian kernel's width follows
    Silverman's rule on the inter-quartile range, halved (the IQR of a bimodal pool
    overstates each mode). None when nearly all values are tied.
    """
    from scipy.ndimage import gaussian_filter1d

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
    density = gaussian_filter1d(counts.astype(np.float64), sigma=max(bandwidth / width, 1.0),
                                mode="constant")
    return density / density.sum(), centres


def _deepest_valley(density: np.ndarray, *, min_peak_fraction: float,
                    min_log_depth: float) -> tuple[int, int, int] | None:
    """(valley, lower peak, upper peak) bins of the deepest valley beside the highest peak.

    The other peak must make a valley at least ``min_log_depth`` deep (log of the lower
    peak's density over the valley's) and hold ``min_peak_fraction`` of the mass.
    """
    from scipy.signal import find_peaks

    peaks, _ = find_peaks(np.concatenate(([0.0], density, [0.0])))
    peaks = peaks - 1
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
    valley = _deepest_valley(density, min_peak_fraction=min_peak_fraction,
                             min_log_depth=min_log_depth)
    if valley is not None:
        return ThresholdFit(float(centres[valley[0]]), "valley", n)
    median = float(np.median(values))
    robust_sd = _robust_sd(values)
    if not robust_sd > 0:  # over half the values tied: stay above the tie
        return ThresholdFit(float(np.nextafter(median, np.inf)), "upper_tail", n)
    return ThresholdFit(median + fallback_sd * robust_sd, "upper_tail", n)


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


def read_thresholds(path: str | os.PathLike, *,
                    required: tuple[str, ...] = ("group", "marker", "level", "threshold")
                    ) -> pd.DataFrame:
    """Read ``thresholds.tsv`` (or ``gates.tsv``), checking the ``required`` columns."""
    try:
        table = pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""],
                            dtype={"group": str, "marker": str, "level": str,
                                   "sample_id": str, "flag": str, "method": str,
                                   "parent": str})
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError) as exc:
        raise InputError(f"cannot read the thresholds table ({exc})", path=path) from None
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputError(f"thresholds table lacks columns {', '.join(missing)}", path=path)
    return table


def threshold_group(row: Mapping[str, Any], method: str) -> str:
    """The gating group of a sample: its panel (``all`` for the default one), and under
    ``method: batch`` its batch too (``batch`` alone for the default panel).

    Panels are never pooled: a CyTOF panel and a fluorescence panel, or two fluorescence
    panels with other fluorochromes, have other scales.
    """
    panel = str(row.get("panel", "") or "")
    panel = "" if panel in ("default", "nan") else panel
    batch = str(row.get("batch", "") or "") if method == "batch" else ""
    batch = "" if batch == "nan" else batch
    if panel and batch:
        return f"{panel}:{batch}"
    return panel or batch or ALL_SAMPLES


def _instrument_kind(path: Path) -> str:
    """``mass_cytometry`` or ``fluorescence``, as ingest recorded it in ``uns["source"]``."""
    import anndata as ad

    try:
        adata = ad.read_h5ad(path, backed="r")
        mass = bool(adata.uns.get("source", {}).get("mass_cytometry", False))
        adata.file.close()
    except (OSError, KeyError, TypeError):
        return "fluorescence"
    return "mass_cytometry" if mass else "fluorescence"


def split_instrument_mix(groups: Mapping[str, str], kinds: Mapping[str, str]) -> dict[str, str]:
    """Split every group that holds both mass and fluorescence cytometry samples.

    Their scales differ, so one pooled gate would fit neither: each kind gets its own
    group, ``{group}:mass_cytometry`` / ``{group}:fluorescence`` (flagged downstream).
    """
    mixed = {g for g in set(groups.values())
             if len({kinds[s] for s, group in groups.items() if group == g}) > 1}
    for group in sorted(mixed):
        log.warning("gating group %r mixes mass and fluorescence cytometry samples; their gates "
                    "are learned apart (flagged instrument_mix)", group)
    return {s: f"{g}:{kinds[s]}" if g in mixed else g for s, g in groups.items()}


def cli_thresholds(args: argparse.Namespace) -> None:
    """``bcellmap thresholds``: learn the gates on the mapped samples.

    Writes the cohort's reference gates (``--out``, ``THRESHOLD_COLUMNS``) and every
    sample's own gates (``--gates``, ``gating.GATE_COLUMNS``), which ``annotate`` applies.
    """
    import anndata as ad

    from ..config import load_config
    from ..io._atomic import write_tsv
    from ..io.samplesheet import read_sample_sheet
    from .annotate import load_subset_rules
    from .gating import GatingSettings, learn_gates

    config = load_config(args.config)
    settings = _settings(config)
    sheet = read_sample_sheet(args.samples, check_files=False)
    rules = load_subset_rules(config)
    pos_markers = list(dict.fromkeys(
        [*LINEAGE_MARKERS, *(m for rule in rules for m, lv in rule.levels.items()
                             if lv in ("neg", "pos"))]))
    hi_markers = list(dict.fromkeys(m for rule in rules for m, lv in rule.levels.items()
                                    if lv in ("hi", "lo")))
    # The lymphocyte gate uses these where the panel has them (see annotate).
    pos_markers += [m for m in ("CD45", "CD14", "CD56", "CD16") if m not in pos_markers]
    if "CD3" not in pos_markers:
        pos_markers.insert(0, "CD3")

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

    groups = split_instrument_mix(
        {s: threshold_group(sheet.loc[s], settings["method"]) for s in paths},
        {s: _instrument_kind(p) for s, p in paths.items()})
    learners = set(paths)
    if settings["method"] == "baseline":
        learners = {s for s in paths if int(sheet.loc[s, "day"]) <= 0}
    if not learners:
        raise InputError("no sample to learn thresholds on (method "
                         f"{settings['method']!r}: baseline needs samples with day <= 0)",
                         path=args.samples)
    cohort, gates = learn_gates({s: _reader(p, s) for s, p in paths.items()},
                                pos_markers=pos_markers, hi_markers=hi_markers,
                                settings=GatingSettings.from_config(config),
                                seed=int(config.get("seed", 0)), groups=groups,
                                learners=learners)
    for row in gates[gates["flag"].astype(str) != ""].itertuples(index=False):
        log.warning("%s: gate %s %s (%s) flagged %s: %s on %d parent events", row.sample_id,
                    row.marker, row.level, row.parent, row.flag, row.method, row.n_events)
    write_tsv(cohort, args.out)
    try:
        write_tsv(gates, args.gates)
    except BaseException:
        Path(args.out).unlink(missing_ok=True)  # the two outputs are all-or-nothing
        raise
