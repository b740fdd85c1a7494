"""Per-sample counts, per-patient kinetics and cohort summaries.

The public API (tables in, tables out; see ``docs/tutorial.py``):

- :func:`quantify`: annotated samples -> the samples table (``samples.tsv``);
- :func:`kinetics`: samples table -> per-patient depletion and reconstitution
  (``kinetics.tsv``);
- :func:`cohort_summary`: kinetics -> cohort statistics (``cohort.tsv``);
- :func:`concordance`: flow vs scRNA at visits measured both ways (``concordance.tsv``).
"""

from ._api import cohort_summary, concordance, kinetics, quantify

__all__ = ["quantify", "kinetics", "cohort_summary", "concordance"]
