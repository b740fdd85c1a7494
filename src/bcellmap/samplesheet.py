"""The sample sheet: reading and validation with row- and column-level messages."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path

import pandas as pd

from .errors import SampleSheetError

REQUIRED_COLUMNS = ("sample_id", "patient_id", "day", "modality", "path")
OPTIONAL_COLUMNS = ("lymphocytes_per_ul", "disease", "batch", "panel", "reference")
MODALITIES = ("flow", "scrna")
_SAMPLE_ID = re.compile(r"^[A-Za-z0-9_.-]+$")
#: Accepted spellings of the ``reference`` column (case-insensitive); empty means false.
_TRUE = ("true", "yes", "1")
_FALSE = ("false", "no", "0", "")


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
        Check that every ``path`` exists and is readable.
    panels
        Panel names defined in the config; a ``panel`` value outside them is an error.

    Returns
    -------
    One row per sample, indexed by ``sample_id``, with ``day`` as int, ``lymphocytes_per_ul``
    as float (NaN where absent), ``reference`` as bool (False where absent) and ``path``
    resolved to an absolute path (relative paths are taken from the sheet's folder).

    Raises
    ------
    SampleSheetError
        Naming the sheet, the line and the column of the first problem found.
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
    for column in REQUIRED_COLUMNS:
        if column not in sheet.columns:
            raise SampleSheetError(
                f"required column is missing (columns present: {', '.join(sheet.columns)})",
                path=path, column=column,
            )
    if sheet.empty:
        raise SampleSheetError("no samples listed", path=path)
    sheet = sheet.apply(lambda col: col.str.strip())

    base = path.resolve().parent
    first_line = {}
    days = []
    resolved = []
    counts = []
    references = []
    for position, row in enumerate(sheet.itertuples(index=False)):
        line = position + 2  # header is line 1
        record = row._asdict()
        sample_id = record["sample_id"]
        for column in REQUIRED_COLUMNS:
            if record[column] == "":
                raise SampleSheetError("empty value", path=path, row=line, column=column)
        if not _SAMPLE_ID.match(sample_id):
            raise SampleSheetError(
                f"sample_id {sample_id!r} has characters outside [A-Za-z0-9_.-]",
                path=path, row=line, column="sample_id",
            )
        if sample_id in first_line:
            raise SampleSheetError(
                f"duplicate sample_id {sample_id!r} (first on line {first_line[sample_id]})",
                path=path, row=line, column="sample_id",
            )
        first_line[sample_id] = line
        try:
            days.append(int(record["day"]))
        except ValueError:
            raise SampleSheetError(
                f"day {record['day']!r} is not an integer number of days from infusion",
                path=path, row=line, column="day",
            ) from None
        if record["modality"] not in MODALITIES:
            raise SampleSheetError(
                f"unknown modality {record['modality']!r} "
                f"(expected one of {', '.join(MODALITIES)})",
                path=path, row=line, column="modality",
            )
        data_path = Path(record["path"])
        if not data_path.is_absolute():
            data_path = base / data_path
        if check_files:
            if not data_path.exists():
                raise SampleSheetError(f"no such file: {data_path}", path=path, row=line,
                                       column="path")
            if not os.access(data_path, os.R_OK):
                raise SampleSheetError(f"file is not readable: {data_path}", path=path, row=line,
                                       column="path")
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
                raise SampleSheetError(
                    f"lymphocytes_per_ul {count!r} is not a non-negative number",
                    path=path, row=line, column="lymphocytes_per_ul",
                )
            counts.append(value)
        if panels is not None and record.get("panel", "") not in ("", None):
            if record["panel"] not in panels:
                raise SampleSheetError(
                    f"panel {record['panel']!r} is not defined in the config "
                    f"(defined: {', '.join(panels)})",
                    path=path, row=line, column="panel",
                )
        references.append(_reference_flag(record, path=path, line=line))

    sheet["day"] = days
    sheet["path"] = resolved
    sheet["lymphocytes_per_ul"] = counts
    sheet["reference"] = references
    for column in ("disease", "batch", "panel"):
        if column not in sheet.columns:
            sheet[column] = ""

    # One visit per patient, modality and day: a second would make kinetics ambiguous.
    seen: dict[tuple[str, str, int], int] = {}
    for position, (patient, modality, day) in enumerate(
        zip(sheet["patient_id"], sheet["modality"], sheet["day"], strict=True)
    ):
        key = (patient, modality, day)
        if key in seen:
            raise SampleSheetError(
                f"patient {patient!r} has two {modality} samples on day {day} "
                f"(first on line {seen[key]}); merge them or correct the day",
                path=path, row=position + 2, column="day",
            )
        seen[key] = position + 2
    return sheet.set_index("sample_id", drop=False)


def sample_row(sheet: pd.DataFrame, sample_id: str, *, path: object = "") -> pd.Series:
    """Return one sample's row, with a clear error when the sheet does not list it."""
    if sample_id not in sheet.index:
        raise SampleSheetError(f"sample_id {sample_id!r} is not listed", path=path,
                               column="sample_id")
    return sheet.loc[sample_id]


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
    from .errors import ConfigError

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
