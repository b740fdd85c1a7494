"""bcellmap: B-cell depletion and reconstitution after CD19 CAR-T therapy.

The Python API, grouped by layer (AnnData in, AnnData or tables out; ``docs/tutorial.py``):

- :mod:`bcellmap.flow`: ``read_fcs``, ``compensate``, ``transform``, ``qc``, ``ingest``;
- :mod:`bcellmap.tl`: ``train_som``, ``map_som``, ``gate``, ``annotate``, ``pca``,
  ``neighbors``, ``leiden``, ``kmeans``;
- :mod:`bcellmap.cohort`: ``quantify``, ``kinetics``, ``cohort_summary``, ``concordance``;
- :mod:`bcellmap.pl`: the report's figures.

The namespaces are imported on first use (PEP 562), so ``import bcellmap`` stays cheap and
the command line's per-sample jobs pay only for what they use.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

#: Public namespaces, imported when first accessed as ``bcellmap.<name>``.
_NAMESPACES = ("flow", "tl", "cohort", "pl")

__all__ = ["flow", "tl", "cohort", "pl"]


def __getattr__(name: str) -> Any:
    if name in _NAMESPACES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_NAMESPACES})
