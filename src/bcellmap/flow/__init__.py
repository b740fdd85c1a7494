"""Flow and mass cytometry: ingest, compensation, transform, QC, clustering, gating, annotation.

The public API (AnnData in, AnnData out; see ``docs/tutorial.py``):

- :func:`read_fcs`: one FCS file -> AnnData of linear events, channel metadata in ``var``,
  FCS keywords and spillover in ``uns``;
- :func:`compensate`, :func:`transform`, :func:`qc`: the ingest steps, one at a time;
- :func:`ingest`: all four, as the workflow's ``ingest-flow`` step.

The submodules (``bcellmap.flow.gating``, ``bcellmap.flow.annotate``, ...) hold the
algorithms the workflow's commands run.
"""

from ._api import compensate, ingest, qc, read_fcs, transform

__all__ = ["read_fcs", "compensate", "transform", "qc", "ingest"]
