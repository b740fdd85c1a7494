"""Reading parts of the pipeline's h5ad files (bcellmap.io.readers) against anndata."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
import scipy.sparse as sp

from bcellmap.errors import InputError
from bcellmap.io.readers import h5ad_matrix, iter_h5ad_rows, open_h5ad


@pytest.mark.parametrize("kind", ["dense", "csr", "csc"])
def test_rows_read_in_slabs_equal_anndata_in_memory(tmp_path, kind):
    rng = np.random.default_rng(0)
    values = rng.poisson(0.7, (1003, 9)).astype(np.float32)
    matrix = {"dense": values, "csr": sp.csr_matrix(values), "csc": sp.csc_matrix(values)}[kind]
    path = tmp_path / "x.h5ad"
    ad.AnnData(X=matrix).write_h5ad(path)
    rows = np.sort(rng.choice(1003, size=317, replace=False))
    rows[-1] = 1002  # the last row, in a short last slab
    with open_h5ad(path) as handle:
        parts = list(iter_h5ad_rows(h5ad_matrix(handle["X"]), rows, block=100))
    # One part per slab that holds a requested row, each cut to exactly those rows.
    assert len(parts) == len(np.unique(rows // 100))
    got = np.vstack([p.toarray() if sp.issparse(p) else np.asarray(p) for p in parts])
    np.testing.assert_array_equal(got, values[rows])
    with open_h5ad(path) as handle:
        assert list(iter_h5ad_rows(h5ad_matrix(handle["X"]), np.array([], dtype=int))) == []


def test_open_h5ad_names_the_file(tmp_path):
    with pytest.raises(InputError, match="file not found") as missing:
        open_h5ad(tmp_path / "absent.h5ad", sample_id="S1")
    assert "absent.h5ad" in str(missing.value) and "S1" in str(missing.value)
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    with pytest.raises(InputError, match="cannot be read as an h5ad file") as unreadable:
        open_h5ad(bad)
    assert "bad.h5ad" in str(unreadable.value)
