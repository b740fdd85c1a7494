"""All-or-nothing output of a command that writes several files."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any


def write_all(writes: Sequence[tuple[str | Path, Callable[[], Any]]]) -> None:
    """Run each ``(path, write)`` in turn; on failure remove every one already written.

    Each ``write`` writes its one file atomically (``bcellmap.io._atomic``), so a failed
    command leaves none of its outputs behind.
    """
    done: list[Path] = []
    try:
        for path, write in writes:
            write()
            done.append(Path(path))
    except BaseException:
        for path in done:
            path.unlink(missing_ok=True)
        raise
