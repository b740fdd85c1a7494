"""Atomic output: a result file appears complete or not at all."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it onto ``path`` on success.

    On any exception the temporary file is removed and ``path`` is left untouched, so a
    failed command never leaves a half-written result behind.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=f".tmp{final.suffix}",
                                    dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        # mkstemp makes owner-only files; give results the permissions of a plain open().
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_tsv(frame, path: str | os.PathLike, **kwargs) -> None:
    """Write a pandas DataFrame as a tab-separated table, atomically."""
    with atomic_path(path) as tmp:
        frame.to_csv(tmp, sep="\t", index=False, **kwargs)


def write_h5ad(adata, path: str | os.PathLike, *, compression: str | None = None) -> None:
    """Write an AnnData object atomically; ``compression`` None (fast), "gzip" or "lzf"."""
    with atomic_path(path) as tmp:
        adata.write_h5ad(tmp, compression=compression)
