"""Flow and mass cytometry: ingest, compensation, transform, QC, clustering, gating, annotation.

The public API (AnnData in, AnnData out; see ``docs/tutorial.py``):

- :func:`read_fcs`: one FCS file -> AnnData of linear events, channel metadata in ``var``,
  FCS keywords and spillover in ``uns``;
- :func:`compensate`, :func:`transform`, :func:`qc`: the ingest steps, one at a time;
- :func:`ingest`: all four, as the workflow's ``ingest-flow`` step.

The submodules (``bcellmap.flow.gating``, ``bcellmap.flow.annotate``, ...) hold the
algorithms the workflow's commands run.
"""

try:
    # The submodule ``bcellmap.flow.ingest`` shares its name with the API function
    # ``ingest``. Importing it first means Python binds the submodule to this package's
    # attribute now, once, and the function below replaces it for good (a later import of
    # the submodule finds it in sys.modules and leaves the attribute alone). Remove this
    # once the submodule is private (``_ingest.py``).
    from . import ingest as _ingest_module  # noqa: F401
except ModuleNotFoundError as exc:  # pragma: no cover - the submodule became private
    if exc.name != f"{__name__}.ingest":
        raise

from ._api import compensate, ingest, qc, read_fcs, transform

__all__ = ["read_fcs", "compensate", "transform", "qc", "ingest"]
