"""Single-cell RNA (and CITE-seq protein): ingest, clustering, annotation."""
