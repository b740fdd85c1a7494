"""Flow and mass cytometry: ingest, compensation, transform, QC, clustering, gating, annotation."""
