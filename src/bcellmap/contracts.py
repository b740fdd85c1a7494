"""The file contracts and shared conventions, each defined once.

Other tools read bcellmap's tables (``../shared/DESIGN.md``); their column names and order,
the B-cell subset names, the QC steps and the seeded per-sample subsample all live here, and
every module imports them from here. Columns are only ever added, never renamed.

This module sits at the bottom of the package's layers: it imports nothing from bcellmap.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import numpy as np

# --- B-cell subsets -------------------------------------------------------------------------

#: B-cell subsets, in maturation order (the subset rule table defines their marker rules: the
#: built-in ``bcellmap/subsets.yaml``, or the user's ``annotate.subsets``).
SUBSETS = ("transitional", "naive", "unswitched_memory", "switched_memory", "double_negative",
           "plasmablast")
#: Marker levels a subset rule may ask for.
LEVELS = ("neg", "pos", "hi", "lo")

# --- Sample sheet ---------------------------------------------------------------------------

SAMPLE_SHEET_REQUIRED = ("sample_id", "patient_id", "day", "modality", "path")
SAMPLE_SHEET_OPTIONAL = ("lymphocytes_per_ul", "disease", "batch", "panel", "reference",
                         "lymphodepletion_day", "gatingml")
MODALITIES = ("flow", "scrna")

# --- Per-sample counts (results/counts/{sample_id}.tsv) ------------------------------------

COUNT_COLUMNS = ("sample_id", "modality", "events_total", "events_qc_pass", "lymphocytes",
                 "t_cells", "b_cells", "cd19_pos", "cd20_pos", "cd19neg_cd20pos",
                 *(f"{s}_count" for s in SUBSETS), "subsets_not_called",
                 "cluster_discordant_events", "car_t_count", "car_t_pct_t", "nk_cells",
                 "lymphocyte_purity_pct", "gate_flags", "sample_flags", "unreliable_gates",
                 "not_evaluable", "not_evaluable_reason")

# --- Cohort tables (results/tables/) -------------------------------------------------------

#: Leading columns of samples.tsv (the rest follow the counts, frequencies and intervals).
SAMPLE_COLUMNS = ("sample_id", "patient_id", "day", "modality", "events_total",
                  "events_qc_pass", "lymphocytes", "b_cells", "cd19_pos", "cd20_pos",
                  "cd19neg_cd20pos", "b_pct_lymphocytes", "cd19_pct_lymphocytes",
                  "cd20_pct_lymphocytes", "b_per_ul", "lloq_pct_lymphocytes")
KINETICS_COLUMNS = ("patient_id", "modality", "measure", "baseline_value", "depletion_day",
                    "nadir_value", "reconstitution_day", "aplasia_days", "censored",
                    "last_day", "naive_pct_b_at_reconstitution",
                    "memory_pct_b_at_reconstitution", "transitional_pct_b_at_reconstitution",
                    "flags")
COHORT_COLUMNS = ("statistic", "modality", "measure", "value", "n", "detail", "unit")
CONCORDANCE_COLUMNS = ("patient_id", "day", "flow_sample_id", "scrna_sample_id", "measure",
                       "flow_pct_lymphocytes", "scrna_pct_lymphocytes", "difference_pct_points",
                       "ratio", "flow_events", "scrna_cells", "flow_lymphocytes",
                       "scrna_lymphocytes")

# --- Gates and thresholds (results/models/) ------------------------------------------------

THRESHOLD_COLUMNS = ("group", "marker", "level", "threshold", "method", "n_events",
                     "n_samples", "pool")
#: Gating group of the samples when one set of gates serves them all (the default panel,
#: no batches): the ``group`` of thresholds.tsv and gates.tsv.
ALL_SAMPLES = "all"
GATE_COLUMNS = ("sample_id", "group", "marker", "level", "threshold", "parent", "method",
                "n_events", "flag", "negative_landmark", "positive_landmark", "reference",
                "negative_above_pct", "positive_below_pct", "reliability", "reliability_detail")
#: ``reliability`` values of a gate that nothing may rest on (``flow.references.judge``).
NOT_RELIABLE = ("unreliable", "nonspecific")
PROTEIN_THRESHOLD_COLUMNS = ("marker", "parent", "threshold", "method", "n_events",
                             "n_samples", "pool", "flag")

# --- QC (results/qc/) -----------------------------------------------------------------------

#: Flow QC steps, in the order they are applied; ``qc_reason`` names the first that failed.
FLOW_QC_STEPS = ("non_finite", "margin", "doublets", "dead", "debris", "time_anomaly")
#: scRNA QC steps, in the order they are applied.
SCRNA_QC_STEPS = ("min_counts", "min_genes", "mito", "doublets")
#: The ``obs["qc_reason"]`` value of an event that passed every step.
QC_PASS = "pass"
QC_TABLE_COLUMNS = ("sample_id", "step", "events_in", "events_removed", "events_out", "detail")


def qc_reason(failed: Mapping[str, np.ndarray], steps: Sequence[str]):
    """The first failing QC step of every event, as ``obs["qc_reason"]``.

    Parameters
    ----------
    failed
        Boolean array per step name: the events that step flags.
    steps
        The steps in the order they are applied (:data:`FLOW_QC_STEPS` or
        :data:`SCRNA_QC_STEPS`).

    Returns
    -------
    pandas.Categorical
        Categories ``[*steps, "pass"]`` in that order, for flow and scRNA alike.
    """
    import pandas as pd

    n_events = len(next(iter(failed.values())))
    reason = np.full(n_events, QC_PASS, dtype=object)
    for step in reversed(steps):
        reason[np.asarray(failed[step], dtype=bool)] = step
    return pd.Categorical(reason, categories=[*steps, QC_PASS])


# --- Seeded per-sample subsampling ----------------------------------------------------------

def sample_rng(seed: int, sample_id: str, *, stream: int = 0) -> np.random.Generator:
    """The random generator of one sample: the config seed and the sample's name.

    A sample's subsample therefore depends neither on the order of the sheet nor on the
    other samples, so adding a visit to a cohort leaves every other visit's draw unchanged.
    ``stream`` separates independent draws from the same sample (e.g. training vs
    evaluation); stream 0 is the one every step uses unless it needs a second draw.
    """
    key = [int(seed), zlib.crc32(str(sample_id).encode())]
    if stream:
        key.append(int(stream))
    return np.random.default_rng(key)


def subsample_indices(n: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a uniform subsample of at most ``size`` of ``n`` rows, without
    replacement (all rows, in order, when ``n <= size``)."""
    if n <= size:
        return np.arange(n)
    return np.sort(rng.choice(n, size=size, replace=False))
