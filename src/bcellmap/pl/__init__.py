"""Plots: the report's figures as functions of tables and AnnData objects.

Each function returns a matplotlib ``Figure`` (save it with ``fig.savefig``); the drawing is
``bcellmap.report.figures``, the code behind ``bcellmap report``.

- from the tables of :mod:`bcellmap.cohort`: :func:`patient`, :func:`cohort_trajectories`,
  :func:`swimmer`, :func:`kaplan_meier`, :func:`composition_visits`,
  :func:`composition_baseline_vs_reconstitution`, :func:`flags`;
- from the samples: :func:`qc_removed`, :func:`cluster_heatmap`, :func:`embedding`,
  :func:`gates`.
"""

from ._plots import (
    cluster_heatmap,
    cohort_trajectories,
    composition_baseline_vs_reconstitution,
    composition_visits,
    embedding,
    flags,
    gates,
    kaplan_meier,
    patient,
    qc_removed,
    swimmer,
)

__all__ = ["patient", "cohort_trajectories", "swimmer", "kaplan_meier", "composition_visits",
           "composition_baseline_vs_reconstitution", "flags", "qc_removed", "cluster_heatmap",
           "embedding", "gates"]
