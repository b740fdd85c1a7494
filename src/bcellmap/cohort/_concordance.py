"""Flow vs scRNA concordance of B-cell frequencies at visits measured both ways."""

from __future__ import annotations

import pandas as pd

from ..contracts import CONCORDANCE_COLUMNS
from ..errors import InputError

_MEASURES = ("b", "cd19", "cd20")
_EVENTS = {"b": "b_cells", "cd19": "cd19_pos", "cd20": "cd20_pos"}


def concordance(samples: pd.DataFrame) -> pd.DataFrame:
    """Pair every patient's flow and scRNA samples taken on the same day.

    Parameters
    ----------
    samples
        ``results/tables/samples.tsv``.

    Returns
    -------
    One row per pair and measure (``b``, ``cd19``, ``cd20``): both frequencies (% of
    lymphocytes; scRNA lymphocytes are QC-passed T, B and NK cells), their difference
    (scRNA − flow, percentage points), their ratio (scRNA / flow; empty when flow is 0), and the
    event counts behind each. Empty when no visit has both modalities.
    """
    missing = {"patient_id", "day", "modality", "sample_id", "lymphocytes"} - set(samples.columns)
    if missing:
        raise InputError(f"samples table lacks columns {sorted(missing)}")
    flow = samples[samples["modality"] == "flow"]
    scrna = samples[samples["modality"] == "scrna"]
    pairs = flow.merge(scrna, on=["patient_id", "day"], suffixes=("_flow", "_scrna"))
    rows = []
    for _, pair in pairs.sort_values(["patient_id", "day"]).iterrows():
        for measure in _MEASURES:
            flow_pct = pair[f"{measure}_pct_lymphocytes_flow"]
            scrna_pct = pair[f"{measure}_pct_lymphocytes_scrna"]
            rows.append({
                "patient_id": pair["patient_id"], "day": int(pair["day"]),
                "flow_sample_id": pair["sample_id_flow"],
                "scrna_sample_id": pair["sample_id_scrna"], "measure": measure,
                "flow_pct_lymphocytes": flow_pct, "scrna_pct_lymphocytes": scrna_pct,
                "difference_pct_points": scrna_pct - flow_pct,
                "ratio": scrna_pct / flow_pct if flow_pct > 0 else float("nan"),
                "flow_events": pair[f"{_EVENTS[measure]}_flow"],
                "scrna_cells": pair[f"{_EVENTS[measure]}_scrna"],
                "flow_lymphocytes": pair["lymphocytes_flow"],
                "scrna_lymphocytes": pair["lymphocytes_scrna"],
            })
    return pd.DataFrame(rows, columns=list(CONCORDANCE_COLUMNS))
