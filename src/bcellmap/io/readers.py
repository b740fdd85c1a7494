"""Reading the pipeline's own h5ad and TSV files, with one error convention.

Every step reads its inputs through :func:`read_h5ad` and :func:`read_table`, so a missing,
truncated or foreign file fails the same way everywhere: an :class:`~bcellmap.errors.InputError`
that names the file (and the sample, when known) and says what was expected. Steps that need
only parts of a file open it with :func:`open_h5ad` (h5py) and read rows of its ``X`` with
:func:`iter_h5ad_rows`: anndata's backed mode would load every layer and ``obsm`` entry.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InputError

#: Identifier columns are text ("007" stays "007"); the rest is left to pandas.
_TEXT_COLUMNS = ("sample_id", "patient_id", "group", "marker", "level", "parent", "method",
                 "flag", "pool", "detail", "gate_flags", "sample_flags", "subsets_not_called",
                 "flags", "modality", "measure", "statistic", "unit", "step")


def read_h5ad(path: str | os.PathLike, *, backed: bool = False, what: str = "h5ad file",
              sample_id: str | None = None) -> Any:
    """Read an AnnData file written by a previous step.

    Parameters
    ----------
    path
        The ``.h5ad`` file.
    backed
        Open read-only without loading ``X`` (``anndata.read_h5ad(backed="r")``); close it
        with ``adata.file.close()``.
    what
        What the file is, for the error message (e.g. ``"ingested flow sample"``).
    sample_id
        The sample, for the error message.

    Returns
    -------
    anndata.AnnData

    Raises
    ------
    InputError
        The file is missing or is not a readable h5ad file.
    """
    import anndata as ad

    if not os.path.exists(path):
        raise InputError(f"{what} not found", path=path, sample_id=sample_id)
    try:
        return ad.read_h5ad(path, backed="r" if backed else None)
    except Exception as exc:  # noqa: BLE001 - h5py and anndata raise many types
        raise InputError(f"cannot be read as an {what} ({type(exc).__name__}: {exc})",
                         path=path, sample_id=sample_id) from None


def open_h5ad(path: str | os.PathLike, *, sample_id: str | None = None) -> Any:
    """An h5ad file opened read-only with h5py (use as a context manager).

    Raises
    ------
    InputError
        The file is missing or is not an HDF5 file.
    """
    import h5py

    try:
        return h5py.File(path, "r")
    except FileNotFoundError:
        raise InputError("file not found", path=path, sample_id=sample_id) from None
    except OSError as exc:
        raise InputError(f"cannot be read as an h5ad file ({exc})", path=path,
                         sample_id=sample_id) from None


def h5ad_matrix(node: Any) -> Any:
    """An on-disk ``X`` (or layer) node as something that slices by rows: the h5py dataset
    itself when dense, anndata's sparse dataset when CSR/CSC."""
    import h5py
    from anndata.io import sparse_dataset

    return node if isinstance(node, h5py.Dataset) else sparse_dataset(node)


def iter_h5ad_rows(matrix: Any, rows: np.ndarray, *, block: int = 65_536) -> Iterator[Any]:
    """The given rows of an on-disk matrix, one slab of ``block`` consecutive rows at a time.

    Each slab is read with one contiguous slice (row-by-row reads of a sparse dataset cost a
    disk request per row) and cut to the rows asked for in it, so memory stays within a slab.

    Parameters
    ----------
    matrix
        From :func:`h5ad_matrix` (or any array that slices by rows).
    rows
        Row indices, sorted ascending.
    block
        Rows per slab.

    Yields
    ------
    The requested rows falling in each slab, in order: a SciPy sparse matrix or an array.
    """
    rows = np.asarray(rows, dtype=np.int64)
    n_rows = int(matrix.shape[0])
    for start in range(0, n_rows, block):
        stop = min(start + block, n_rows)
        lo, hi = np.searchsorted(rows, [start, stop])
        if lo == hi:
            continue
        yield matrix[start:stop][rows[lo:hi] - start]


def cell_text(value: object) -> str:
    """A table cell as text: missing (None, NaN, pd.NA) is empty."""
    import pandas as pd

    return "" if value is None or (not isinstance(value, str) and pd.isna(value)) \
        else str(value)


def read_table(path: str | os.PathLike, *, required: Sequence[str] = (),
               what: str = "table", sample_id: str | None = None, empty_ok: bool = False,
               dtype: Mapping[str, Any] | None = None, one_row: bool = False):
    """Read a tab-separated table written by a previous step.

    Identifier columns stay text and only empty cells are missing values (``NA`` is a
    patient id, not a missing one).

    Parameters
    ----------
    path
        The ``.tsv`` file.
    required
        Columns the table must have; all missing ones are named in the error.
    what
        What the table is, for the error message (e.g. ``"counts table"``).
    sample_id
        The sample, for the error message.
    empty_ok
        An empty file reads as an empty table with the ``required`` columns.
    dtype
        Extra column types, over the text identifier columns.
    one_row
        The table must have exactly one row (per-sample tables).

    Returns
    -------
    pandas.DataFrame

    Raises
    ------
    InputError
        The file is missing, unreadable, lacks a required column or has the wrong rows.
    """
    import pandas as pd

    types = {column: str for column in _TEXT_COLUMNS}
    types.update(dtype or {})
    if not os.path.exists(path):
        raise InputError(f"{what} not found", path=path, sample_id=sample_id)
    try:
        frame = pd.read_csv(path, sep="\t", keep_default_na=False, na_values=[""],
                            dtype=types)
    except pd.errors.EmptyDataError:
        if empty_ok:
            return pd.DataFrame(columns=list(required))
        raise InputError(f"{what} is empty", path=path, sample_id=sample_id) from None
    except (OSError, pd.errors.ParserError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"cannot be read as a tab-separated {what} ({exc})", path=path,
                         sample_id=sample_id) from None
    missing = [column for column in required if column not in frame.columns]
    if missing:
        raise InputError(f"{what} lacks column(s) {', '.join(missing)}", path=path,
                         sample_id=sample_id)
    if one_row and len(frame) != 1:
        raise InputError(f"{what} must have exactly one row, not {len(frame)}", path=path,
                         sample_id=sample_id)
    return frame
