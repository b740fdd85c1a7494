"""Figures for the Snakemake report."""
