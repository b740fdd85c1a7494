"""Per-sample counts, per-patient kinetics and cohort summaries."""
