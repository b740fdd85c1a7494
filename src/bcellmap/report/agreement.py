"""The gate-agreement figure: bcellmap against a FlowJo workspace's manual gates.

Left, per sample, the population's share of all events of the file by each side (one
denominator for both), with the per-event F1 written above. Right, a Bland-Altman plot of the
same shares: the mean of the two against bcellmap minus the workspace, with the mean
difference and its 95% limits of agreement (± 1.96 SD). A sample whose bcellmap value is not
evaluable (its gate unreliable) is drawn hollow and left out of the limits.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..errors import InputError
from .figures import save_figure

_WORKSPACE = "#7f7f7f"
_BCELLMAP = "#1f77b4"


def draw_gate_agreement(table: pd.DataFrame, outdir: str | Path, *, population: str = "B",
                        stem: str = "gate_agreement", dpi: int = 200) -> list[Path]:
    """Draw :func:`bcellmap.flow.agreement.gate_agreement`'s table for one population.

    Returns the PNG and SVG written (``{outdir}/{stem}.png|svg``).

    Raises
    ------
    InputError
        The table has no row of ``population`` with both counts.
    """
    rows = table[(table["population"] == population)
                 & table["workspace_count"].notna()].reset_index(drop=True)
    if rows.empty:
        raise InputError(f"the agreement table has no {population} rows to draw")
    theirs = rows["workspace_pct_events"].to_numpy(dtype=float)
    ours = rows["bcellmap_pct_events"].to_numpy(dtype=float)
    evaluable = rows["bcellmap_not_evaluable"].fillna("").astype(str).eq("").to_numpy()
    names = rows["sample_id"].astype(str).str.removesuffix(".fcs").tolist()

    fig, (bars, bland) = plt.subplots(1, 2, figsize=(max(8.0, 1.1 * len(rows) + 5.0), 4.2),
                                      gridspec_kw={"width_ratios": [max(len(rows), 3), 3]},
                                      layout="constrained")
    x = np.arange(len(rows))
    bars.bar(x - 0.2, theirs, 0.4, color=_WORKSPACE, label="workspace (manual)")
    bars.bar(x + 0.2, ours, 0.4, color=np.where(evaluable, _BCELLMAP, "white"),
             edgecolor=_BCELLMAP, label="bcellmap")
    for i, f1 in enumerate(rows["f1"].to_numpy(dtype=float)):
        top = np.nanmax([theirs[i], ours[i]])
        bars.annotate(f"F1 {f1:.2f}" if np.isfinite(f1) else "F1 –", (x[i], top),
                      xytext=(0, 3), textcoords="offset points", ha="center", fontsize=7)
    bars.set_xticks(x, names, rotation=35, ha="right", fontsize=7)
    bars.set_ylabel(f"{population} cells, % of all events")
    bars.set_ylim(0, 1.18 * float(np.nanmax(np.r_[theirs, ours, 1e-9])))
    bars.legend(fontsize=7, frameon=False, loc="upper left")
    bars.set_title("per sample (hollow: bcellmap not evaluable)", fontsize=9)

    mean = (theirs + ours) / 2.0
    difference = ours - theirs
    bland.scatter(mean[evaluable], difference[evaluable], color=_BCELLMAP, s=22)
    bland.scatter(mean[~evaluable], difference[~evaluable], facecolor="white",
                  edgecolor=_BCELLMAP, s=22)
    kept = difference[evaluable]
    bland.axhline(0.0, color="black", lw=0.6)
    if kept.size >= 2:
        bias, spread = float(kept.mean()), float(kept.std(ddof=1))
        bland.axhline(bias, color=_BCELLMAP, lw=1.0)
        for limit in (bias - 1.96 * spread, bias + 1.96 * spread):
            bland.axhline(limit, color=_BCELLMAP, lw=0.8, ls="--")
        bland.set_title(f"Bland-Altman: bias {bias:+.2f}, limits ± {1.96 * spread:.2f} pts",
                        fontsize=9)
    else:
        bland.set_title("Bland-Altman", fontsize=9)
    bland.set_xlabel("mean of the two (% of events)")
    bland.set_ylabel("bcellmap − workspace (points)")
    fig.suptitle(f"{population} cells: bcellmap against the workspace's manual gates",
                 fontsize=10)
    return save_figure(fig, outdir, stem, dpi=dpi)
