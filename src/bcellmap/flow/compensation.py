"""Spillover compensation from the FCS keyword or a matrix file, with sanity checks.

The spillover matrix ``S`` (rows: emitting dye, columns: detector, diagonal 1) relates true
signals ``t`` to measured ``m`` by ``m = t @ S``, so compensation solves ``S.T t.T = m.T``
(``flowutils.compensate.compensate``). Scatter and time are never compensated.

A matrix is refused (``InputError``) when it cannot be a spillover matrix: non-finite values,
a diagonal that is not 1, a row of zeros, a singular or ill-conditioned matrix (condition
number above ``MAX_CONDITION``), or names that are not fluorescence channels of the file.
With ``allow_invalid: true`` it is used anyway (a singular one through its pseudo-inverse)
and a warning is logged.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

#: Spillover keywords, as flowio stores them (lower case, "$" dropped), in order of preference.
SPILLOVER_KEYWORDS = ("spillover", "spill")
#: Largest acceptable condition number: real spillover matrices are far below this.
MAX_CONDITION = 1e6
_DIAGONAL_TOLERANCE = 1e-3


def spillover_from_text(text: Mapping[str, str], *, path: object = None,
                        sample_id: str | None = None) -> tuple[np.ndarray, list[str]] | None:
    """Parse the ``$SPILLOVER`` / ``SPILL`` / ``SPILLOVER`` keyword, or return None.

    Returns
    -------
    (matrix, names) or None
        The n x n spillover matrix and its n detector names ($PnN; a keyword that names
        detectors by parameter number, as the Accuri C6 writes it, is mapped to $PnN).
    """
    from flowutils.compensate import get_spill

    for keyword in SPILLOVER_KEYWORDS:
        value = text.get(keyword, "")
        if value and value.strip() and value.strip() != "0":
            try:
                matrix, names = get_spill(value.strip())
            except (ValueError, IndexError) as exc:
                raise InputError(f"the {keyword.upper()} keyword is not a valid spillover "
                                 f"matrix ({exc})", path=path, sample_id=sample_id) from None
            names = [str(n).strip() for n in names]
            if names and all(n.isdigit() for n in names):
                # Some instruments (Accuri C6) name detectors by parameter number: $PnN of n.
                numbered = [text.get(f"p{int(n)}n") or text.get(f"$p{int(n)}n") for n in names]
                if all(numbered):
                    names = [str(n) for n in numbered]
            return np.asarray(matrix, dtype=float), names
    return None


def read_matrix_file(path: str | os.PathLike, *, sample_id: str | None = None
                     ) -> tuple[np.ndarray, list[str]]:
    """Read a spillover matrix from a CSV/TSV file.

    The header row holds the detector names ($PnN); an optional first column of row names
    (any non-numeric first column) is ignored. Rows are in header order.
    """
    import pandas as pd

    path = Path(path)
    try:
        frame = pd.read_csv(path, sep=None, engine="python", comment="#")
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise InputError(f"compensation matrix file cannot be read ({exc})", path=path,
                         sample_id=sample_id) from None
    first = frame.columns[0]
    if not pd.api.types.is_numeric_dtype(frame[first]) or str(first).strip() == "" \
            or str(first).startswith("Unnamed"):
        frame = frame.drop(columns=first)
    try:
        matrix = frame.to_numpy(dtype=float)
    except ValueError as exc:
        raise InputError(f"compensation matrix file holds non-numeric values ({exc})",
                         path=path, sample_id=sample_id) from None
    if matrix.shape[0] != matrix.shape[1]:
        raise InputError(f"compensation matrix is {matrix.shape[0]} x {matrix.shape[1]}, not "
                         "square", path=path, sample_id=sample_id)
    return matrix, [str(c).strip() for c in frame.columns]


def matrix_problems(matrix: np.ndarray, names: Sequence[str], *, channels: Sequence[str],
                    kinds: Sequence[str]) -> list[str]:
    """List the reasons a spillover matrix cannot be right (empty when it passes).

    Parameters
    ----------
    matrix
        n x n spillover matrix.
    names
        Its detector names.
    channels, kinds
        The file's ``$PnN`` and channel kinds (from ``panel.channel_kind``).
    """
    problems = []
    kind_of = dict(zip(channels, kinds, strict=True))
    unknown = [n for n in names if n not in kind_of]
    if unknown:
        problems.append(f"names not in the file: {', '.join(unknown)}")
    not_fluor = [n for n in names if kind_of.get(n) in ("scatter", "time")]
    if not_fluor:
        problems.append(f"names scatter/time channels, which are never compensated: "
                        f"{', '.join(not_fluor)}")
    if len(set(names)) != len(names):
        problems.append("names a detector twice")
    if not np.all(np.isfinite(matrix)):
        problems.append("holds non-finite values")
        return problems
    off_diagonal = np.flatnonzero(np.abs(np.diag(matrix) - 1.0) > _DIAGONAL_TOLERANCE)
    if off_diagonal.size:
        problems.append("diagonal is not 1 at " + ", ".join(
            f"{names[i]} ({matrix[i, i]:.4g})" for i in off_diagonal))
    zero_rows = np.flatnonzero(~np.any(matrix != 0, axis=1))
    if zero_rows.size:
        problems.append("row(s) of zeros: " + ", ".join(names[i] for i in zero_rows))
    condition = np.linalg.cond(matrix) if matrix.size else 1.0
    if not np.isfinite(condition) or condition > MAX_CONDITION:
        problems.append(f"singular or ill-conditioned (condition number {condition:.3g})")
    return problems


def compensate_events(
    events: np.ndarray,
    channels: Sequence[str],
    kinds: Sequence[str],
    *,
    settings: Mapping[str, Any],
    text: Mapping[str, str],
    path: object = None,
    sample_id: str | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """Compensate linear events as ``ingest.compensation`` says.

    Parameters
    ----------
    events
        Linear events (events x channels); not modified.
    channels, kinds
        ``$PnN`` and channel kind per column.
    settings
        ``config["ingest"]["compensation"]``: ``source`` (auto | file | none),
        ``matrix_file``, ``allow_invalid``.
    text
        The FCS TEXT keywords (for ``source: auto``).
    path, sample_id
        Named in error messages.

    Returns
    -------
    compensated, info
        A compensated copy of ``events`` and ``{"source", "channels", "matrix"}`` for
        ``uns["compensation"]`` (``matrix`` None when nothing was compensated).
    """
    from flowutils.compensate import compensate

    source = str(settings.get("source", "auto")).lower()
    allow_invalid = bool(settings.get("allow_invalid", False))
    none_info = {"source": "none", "channels": [], "matrix": None}
    if source == "none":
        return events.copy(), none_info
    if source == "file":
        matrix_file = settings.get("matrix_file")
        if not matrix_file:
            raise InputError("ingest.compensation.source is 'file' but matrix_file is not set",
                             path=path, sample_id=sample_id)
        matrix, names = read_matrix_file(matrix_file, sample_id=sample_id)
        origin = f"file:{matrix_file}"
    elif source == "auto":
        parsed = spillover_from_text(text, path=path, sample_id=sample_id)
        if parsed is None:
            return events.copy(), none_info
        matrix, names = parsed
        origin = "keyword"
    else:
        raise InputError(f"ingest.compensation.source {source!r} is not auto, file or none",
                         path=path, sample_id=sample_id)

    problems = matrix_problems(matrix, names, channels=channels, kinds=kinds)
    if problems and not allow_invalid:
        raise InputError(
            f"spillover matrix ({origin}) cannot be right: {'; '.join(problems)}. Use "
            "ingest.compensation.source: none if the data are already compensated, give a "
            "matrix_file, or set allow_invalid: true to use it anyway",
            path=path, sample_id=sample_id)
    if problems:
        log.warning("%s: using a spillover matrix that fails the checks (allow_invalid): %s",
                    path, "; ".join(problems))
        kind_of = dict(zip(channels, kinds, strict=True))
        keep = [i for i, n in enumerate(names) if kind_of.get(n) not in (None, "scatter", "time")]
        matrix = matrix[np.ix_(keep, keep)]
        names = [names[i] for i in keep]
    indices = [list(channels).index(n) for n in names]
    if not indices:
        return events.copy(), none_info
    if problems and np.linalg.matrix_rank(matrix) < matrix.shape[0]:
        # A singular matrix has no solve; the pseudo-inverse is the least-squares answer.
        compensated = events.copy()
        compensated[:, indices] = events[:, indices] @ np.linalg.pinv(matrix)
    else:
        compensated = compensate(events, matrix, fluoro_indices=indices)
    info = {"source": origin, "channels": list(names),
            "matrix": [[float(v) for v in row] for row in matrix]}
    return compensated, info
