"""Reading and writing: FCS files, sample sheets, panels, atomic h5ad/TSV output."""
