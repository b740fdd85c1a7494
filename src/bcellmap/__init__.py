"""bcellmap: B-cell depletion and reconstitution after CD19 CAR-T therapy.

Submodules are imported lazily by the command line so that a per-sample Snakemake
job pays only for what it uses.
"""

__version__ = "0.1.0"
