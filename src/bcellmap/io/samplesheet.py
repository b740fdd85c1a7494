"""The sample sheet: reading and validation with row- and column-level messages."""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable
from pathlib import Path

import pandas as pd

from ..contracts import MODALITIES
from ..contracts import SAMPLE_SHEET_REQUIRED as REQUIRED_COLUMNS
from ..errors import SampleSheetError

_SAMPLE_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
#: Accepted spellings of the ``reference`` column (case-insensitive); empty means false.
_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0", "")


class SampleSheetErrors(SampleSheetError):
    """Several sample-sheet problems, all listed in one message.

    ``row``, ``column`` and ``problem`` are those of the first problem; ``errors`` holds
    every one (a :class:`~bcellmap.errors.SampleSheetError` each).
    """

    def __init__(self, errors: list[SampleSheetError], *, path: object):
        first = errors[0]
        super().__init__(first.problem, path=path, row=first.row, column=first.column)
        self.errors = list(errors)
        lines = "\n".join(f"  - {_where(e)}{e.problem}" for e in errors)
        self.args = (f"sample sheet {path}: {len(errors)} problems:\n{lines}",)

    def __str__(self) -> str:
        return str(self.args[0])


def _where(error: SampleSheetError) -> str:
    parts = []
    if error.row is not None:
        parts.append(f"line {error.row}")
    if error.column is not None:
        parts.append(f"column {error.column!r}")
    return f"{', '.join(parts)}: " if parts else ""


def raise_all(errors: list[SampleSheetError], *, path: object) -> None:
    """Raise nothing, the one error, or every error at once (:class:`SampleSheetErrors`)."""
    if len(errors) == 1:
        raise errors[0]
    if errors:
        raise SampleSheetErrors(errors, path=path)


def _separator_problem(path: Path, columns: list[str]) -> str | None:
    """Say so when the sheet is comma- or semicolon-separated rather than tab-separated."""
    if len(columns) != 1:
        return None
    header = columns[0]
    for separator, name in ((",", "comma"), (";", "semicolon")):
        fields = [field.strip().strip('"') for field in header.split(separator)]
        if len(fields) > 1 and "sample_id" in fields:
            return (f"the sheet is {name}-separated ({name}s in the header line: "
                    f"{header!r}); bcellmap reads tab-separated sheets. Save it as "
                    "tab-separated text (spreadsheet: 'Save as' > 'Text (Tab delimited)'; "
                    "or: python -c \"import pandas as p; p.read_csv('in.csv', sep='"
                    f"{separator}').to_csv('samples.tsv', sep='\\t', index=False)\")")
    return None


def _check_data_path(data_path: Path, modality: str) -> str | None:
    """Why a sample's data path cannot be read (None when it can, as far as a cheap look goes).

    Flow rows need a regular file that starts with the FCS magic bytes; a directory, or a
    CSV/TSV export given as an FCS path, is refused here rather than in a later job.
    """
    if not data_path.exists():
        return f"no such file: {data_path}"
    if not os.access(data_path, os.R_OK):
        return f"file is not readable: {data_path}"
    if modality != "flow":
        return None
    if data_path.is_dir():
        return (f"{data_path} is a directory; a flow sample's path must be one FCS file "
                "(list each file of the folder on its own line)")
    if not data_path.is_file():
        return f"{data_path} is not a regular file"
    try:
        with data_path.open("rb") as handle:
            magic = handle.read(6)
    except OSError as exc:
        return f"file cannot be read: {data_path} ({exc.strerror})"
    if not magic.startswith(b"FCS"):
        kind = ""
        if data_path.suffix.lower() in (".csv", ".tsv", ".txt"):
            kind = (" It looks like a table of events exported as text; give the FCS file "
                    "it was exported from")
        elif data_path.suffix.lower() in (".h5", ".h5ad", ".mtx", ".gz"):
            kind = " It looks like single-cell data: set modality scrna for this row"
        return (f"{data_path} is not an FCS file (it starts with {magic!r}, an FCS file starts "
                f"with 'FCS').{kind}")
    return None


def read_sample_sheet(
    path: str | os.PathLike,
    *,
    check_files: bool = True,
    panels: list[str] | None = None,
) -> pd.DataFrame:
    """Read and validate a sample sheet.

    Parameters
    ----------
    path
        Tab-separated sample sheet.
    check_files
        Check that every ``path`` exists and is readable, and that every flow row's path is
        a file that starts like an FCS file (not a folder, not a CSV export).
    panels
        Panel names defined in the config; a ``panel`` value outside them is an error.

    Returns
    -------
    One row per sample, indexed by ``sample_id``, with ``day`` as int, ``lymphocytes_per_ul``
    as float (NaN where absent), ``reference`` as bool (False where absent),
    ``lymphodepletion_day`` as nullable Int64 (<NA> where absent) and ``path`` resolved to an
    absolute path (relative paths are taken from the sheet's folder).

    Raises
    ------
    SampleSheetError
        Naming the sheet, the line and the column of the problem; when there are several,
        a :class:`SampleSheetErrors` lists every one of them (every line, every column).
    """
    path = Path(path)
    try:
        sheet = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment=None)
    except FileNotFoundError:
        raise SampleSheetError("file not found", path=path) from None
    except (OSError, pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise SampleSheetError(
            f"cannot be read as a tab-separated table ({exc})", path=path
        ) from None
    sheet.columns = [c.strip() for c in sheet.columns]
    separator = _separator_problem(path, list(sheet.columns))
    if separator:
        raise SampleSheetError(separator, path=path)
    missing = [c for c in REQUIRED_COLUMNS if c not in sheet.columns]
    if missing:
        raise_all([SampleSheetError(
            f"required column is missing (columns present: {', '.join(sheet.columns)})",
            path=path, column=column) for column in missing], path=path)
    if sheet.empty:
        raise SampleSheetError("no samples listed", path=path)
    sheet = sheet.apply(lambda col: col.str.strip())

    errors: list[SampleSheetError] = []

    def problem(text: str, line: int | None, column: str | None) -> None:
        errors.append(SampleSheetError(text, path=path, row=line, column=column))

    base = path.resolve().parent
    first_line = {}
    days = []
    resolved = []
    counts = []
    references = []
    depletion_days = []
    user_gates = []
    for position, row in enumerate(sheet.to_dict("records")):
        line = position + 2  # header is line 1
        record = row
        sample_id = record["sample_id"]
        for column in REQUIRED_COLUMNS:
            if record[column] == "":
                problem("empty value", line, column)
        if sample_id and not _SAMPLE_ID.match(sample_id):
            problem(f"sample_id {sample_id!r} has characters outside [A-Za-z0-9_.-]", line,
                    "sample_id")
        if sample_id in first_line:
            problem(f"duplicate sample_id {sample_id!r} (first on line {first_line[sample_id]})",
                    line, "sample_id")
        elif sample_id:
            first_line[sample_id] = line
        try:
            days.append(int(record["day"]))
        except ValueError:
            days.append(None)
            if record["day"] != "":
                problem(f"day {record['day']!r} is not an integer number of days from infusion",
                        line, "day")
        if record["modality"] and record["modality"] not in MODALITIES:
            problem(f"unknown modality {record['modality']!r} "
                    f"(expected one of {', '.join(MODALITIES)})", line, "modality")
        data_path = Path(record["path"])
        if not data_path.is_absolute():
            data_path = base / data_path
        if check_files and record["path"]:
            why = _check_data_path(data_path, record["modality"])
            if why:
                problem(why, line, "path")
        resolved.append(str(data_path))
        count = record.get("lymphocytes_per_ul", "")
        if count in ("", None):
            counts.append(float("nan"))
        else:
            try:
                value = float(count)
            except ValueError:
                value = float("nan")
                ok = False
            else:
                ok = value >= 0 and math.isfinite(value)
            if not ok:
                problem(f"lymphocytes_per_ul {count!r} is not a non-negative number", line,
                        "lymphocytes_per_ul")
            counts.append(value)
        user_gates.append(_user_gate_file(record, base=base, check=check_files,
                                          problem=lambda text, line=line: problem(
                                              text, line, "gatingml")))
        depletion = record.get("lymphodepletion_day", "")
        if depletion in ("", None):
            depletion_days.append(pd.NA)
        else:
            try:
                depletion_days.append(int(depletion))
            except ValueError:
                depletion_days.append(pd.NA)
                problem(f"lymphodepletion_day {depletion!r} is not an integer number of days "
                        "from infusion (e.g. -5), or empty", line, "lymphodepletion_day")
        if panels is not None and record.get("panel", "") not in ("", None):
            if record["panel"] not in panels:
                problem(f"panel {record['panel']!r} is not defined in the config "
                        f"(defined: {', '.join(panels)})", line, "panel")
        try:
            references.append(_reference_flag(record, path=path, line=line))
        except SampleSheetError as error:
            errors.append(error)
            references.append(False)

    # One visit per patient, modality and day: a second would make kinetics ambiguous.
    seen: dict[tuple[str, str, int], int] = {}
    depletion_of: dict[str, tuple[int, int]] = {}
    for position, (patient, modality, day, depletion) in enumerate(
        zip(sheet["patient_id"], sheet["modality"], days, depletion_days, strict=True)
    ):
        line = position + 2
        if day is not None:
            key = (patient, modality, day)
            if key in seen:
                problem(f"patient {patient!r} has two {modality} samples on day {day} "
                        f"(first on line {seen[key]}); merge them or correct the day", line,
                        "day")
            else:
                seen[key] = line
        if depletion is not pd.NA:
            if patient in depletion_of and depletion_of[patient][0] != depletion:
                first_value, first_line_no = depletion_of[patient]
                problem(f"patient {patient!r} has lymphodepletion_day {depletion} here but "
                        f"{first_value} on line {first_line_no}; a patient has one "
                        "lymphodepletion", line, "lymphodepletion_day")
            depletion_of.setdefault(patient, (depletion, line))
    errors.sort(key=lambda e: (e.row or 0))
    raise_all(errors, path=path)

    sheet["day"] = days
    sheet["path"] = resolved
    sheet["lymphocytes_per_ul"] = counts
    sheet["reference"] = references
    sheet["lymphodepletion_day"] = pd.array(depletion_days, dtype="Int64")
    sheet["gatingml"] = user_gates
    for column in ("disease", "batch", "panel"):
        if column not in sheet.columns:
            sheet[column] = ""
    return sheet.set_index("sample_id", drop=False)


def sample_row(sheet: pd.DataFrame, sample_id: str, *, path: object = "") -> pd.Series:
    """Return one sample's row, with a clear error when the sheet does not list it."""
    if sample_id not in sheet.index:
        raise SampleSheetError(f"sample_id {sample_id!r} is not listed", path=path,
                               column="sample_id")
    return sheet.loc[sample_id]


def _user_gate_file(record: dict, *, base: Path, check: bool,
                    problem: Callable[[str], None]) -> str:
    """The row's ``gatingml`` file (the user's corrected gates), resolved; "" where none."""
    value = str(record.get("gatingml", "") or "")
    if not value:
        return ""
    if record.get("modality") != "flow":
        problem("gatingml (corrected gates) is for flow samples only")
    resolved = Path(value) if Path(value).is_absolute() else base / value
    if check and not resolved.is_file():
        problem(f"gatingml file {value!r} does not exist (looked for {resolved})")
    return str(resolved)


def _reference_flag(record: dict, *, path: Path, line: int) -> bool:
    """The ``reference`` value of one row: a bool; a reference needs a batch and flow data."""
    value = str(record.get("reference", "") or "").lower()
    if value not in _TRUE + _FALSE:
        raise SampleSheetError(
            f"reference {record['reference']!r} is not true/false (also yes/no, 1/0, or empty)",
            path=path, row=line, column="reference",
        )
    if value in _FALSE:
        return False
    if str(record.get("batch", "") or "") == "":
        raise SampleSheetError(
            "a reference sample needs a batch: it stands for the batch it was acquired in",
            path=path, row=line, column="batch",
        )
    if record["modality"] != "flow":
        raise SampleSheetError(
            f"reference samples normalise flow cytometry batches; this sample's modality is "
            f"{record['modality']!r}",
            path=path, row=line, column="reference",
        )
    return True


def normalisation_active(sheet: pd.DataFrame, *, method: str, path: object = "") -> bool:
    """Tell whether reference-sample normalisation runs, and check the sheet supports it.

    Parameters
    ----------
    sheet
        A sheet from :func:`read_sample_sheet`.
    method
        ``normalisation.method``: ``none`` (off), ``reference`` (on) or ``auto`` (on when the
        sheet marks any flow sample as a reference).
    path
        The sheet, for messages.

    Returns
    -------
    True when the flow samples are to be normalised.

    Raises
    ------
    SampleSheetError
        Normalisation is on and some flow samples have no batch, or a batch has flow samples
        but no reference; every such batch is named with its samples, in one message.
    ConfigError
        An unknown ``method``.
    """
    from ..errors import ConfigError

    if method not in ("auto", "none", "reference"):
        raise ConfigError(f"normalisation.method {method!r} must be auto, none or reference")
    flow = sheet.loc[sheet["modality"] == "flow"]
    reference = flow["reference"] if "reference" in flow.columns else pd.Series(False, flow.index)
    if method == "none" or flow.empty or (method == "auto" and not reference.astype(bool).any()):
        return False
    batch = flow["batch"].astype(str) if "batch" in flow.columns else pd.Series("", flow.index)
    problems = []
    unbatched = flow.loc[batch == "", "sample_id"].tolist()
    if unbatched:
        problems.append(f"flow samples without a batch: {', '.join(unbatched)}")
    for name in sorted(set(batch) - {""}):
        members = batch == name
        if not reference[members].astype(bool).any():
            problems.append(f"batch {name!r} has no reference sample "
                            f"(samples: {', '.join(flow.loc[members, 'sample_id'])})")
    if problems:
        raise SampleSheetError(
            f"batch normalisation is on (normalisation.method: {method}), but: "
            + "; ".join(problems)
            + ". Mark one sample per batch with reference=true (the same control aliquot "
            "acquired in each batch), or set normalisation.method: none",
            path=path, column="reference",
        )
    return True
