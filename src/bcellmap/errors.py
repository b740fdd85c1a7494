"""Errors that end a bcellmap command with a clear message and a non-zero exit."""

from __future__ import annotations


class BcellmapError(Exception):
    """An error caused by the input or the configuration, reported without a traceback."""


class InputError(BcellmapError):
    """Bad input data, naming the file and the sample it belongs to.

    Parameters
    ----------
    problem
        What is wrong, in words a user can act on.
    path
        The file (or folder) that holds the bad data.
    sample_id
        The sample the file belongs to, when known.
    """

    def __init__(self, problem: str, *, path: object = None, sample_id: str | None = None):
        self.problem = problem
        self.path = None if path is None else str(path)
        self.sample_id = sample_id
        where = []
        if sample_id is not None:
            where.append(f"sample {sample_id!r}")
        if self.path is not None:
            where.append(f"file {self.path}")
        prefix = ", ".join(where)
        super().__init__(f"{prefix}: {problem}" if prefix else problem)


class SampleSheetError(BcellmapError):
    """An invalid sample sheet, naming the sheet, the row and the column."""

    def __init__(self, problem: str, *, path: object, row: int | None = None,
                 column: str | None = None):
        self.problem = problem
        self.path = str(path)
        self.row = row
        self.column = column
        where = [f"sample sheet {self.path}"]
        if row is not None:
            # Row numbers count the header as line 1, as a spreadsheet would show them.
            where.append(f"line {row}")
        if column is not None:
            where.append(f"column {column!r}")
        super().__init__(f"{', '.join(where)}: {problem}")


class ConfigError(BcellmapError):
    """An invalid or contradictory configuration value."""
