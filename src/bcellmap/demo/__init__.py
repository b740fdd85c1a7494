"""Simulated demo cohort (flow and scRNA) with known truth."""
