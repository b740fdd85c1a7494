"""Sample-sheet validation: each problem is named by sheet, line and column."""

from __future__ import annotations

import math

import pytest

from bcellmap.cli import main
from bcellmap.errors import SampleSheetError
from bcellmap.samplesheet import read_sample_sheet

HEADER = "sample_id\tpatient_id\tday\tmodality\tpath\tlymphocytes_per_ul\n"


def _sheet(tmp_path, rows: list[str], header: str = HEADER):
    (tmp_path / "data").mkdir(exist_ok=True)
    for name in ("a.fcs", "b.fcs", "c.fcs"):
        (tmp_path / "data" / name).write_bytes(b"FCS3.1")
    path = tmp_path / "samples.tsv"
    path.write_text(header + "".join(row + "\n" for row in rows))
    return path


def test_valid_sheet_resolves_paths_against_its_folder(tmp_path, monkeypatch):
    path = _sheet(tmp_path, ["s1\tP1\t-5\tflow\tdata/a.fcs\t1200",
                             "s2\tP1\t30\tflow\tdata/b.fcs\t"])
    monkeypatch.chdir("/")  # relative paths must not depend on the working directory
    sheet = read_sample_sheet(path)
    assert list(sheet.index) == ["s1", "s2"]
    assert sheet.loc["s1", "path"] == str(tmp_path / "data" / "a.fcs")
    assert sheet.loc["s1", "day"] == -5
    assert sheet.loc["s1", "lymphocytes_per_ul"] == 1200.0
    assert math.isnan(sheet.loc["s2", "lymphocytes_per_ul"])


@pytest.mark.parametrize(
    ("rows", "header", "line", "column", "words"),
    [
        (["s1\tP1\t0\tflow\tdata/a.fcs\t", "s1\tP1\t7\tflow\tdata/b.fcs\t"], HEADER, 3,
         "sample_id", "duplicate sample_id 's1'"),
        (["s1\tP1\t0\tcytof\tdata/a.fcs\t"], HEADER, 2, "modality", "unknown modality"),
        (["s1\tP1\t7.5\tflow\tdata/a.fcs\t"], HEADER, 2, "day", "not an integer"),
        (["s1\tP1\tday7\tflow\tdata/a.fcs\t"], HEADER, 2, "day", "not an integer"),
        (["s1\tP1\t0\tflow\tdata/missing.fcs\t"], HEADER, 2, "path", "no such file"),
        (["s 1\tP1\t0\tflow\tdata/a.fcs\t"], HEADER, 2, "sample_id", "characters outside"),
        (["s1\tP1\t0\tflow\tdata/a.fcs\t-3"], HEADER, 2, "lymphocytes_per_ul", "non-negative"),
        (["s1\tP1\t0\tflow\tdata/a.fcs\t", "s2\tP1\t0\tflow\tdata/b.fcs\t"], HEADER, 3, "day",
         "two flow samples on day 0"),
        (["s1\tP1\t0\tflow"], "sample_id\tpatient_id\tday\tmodality\n", None, "path",
         "required column is missing"),
    ],
)
def test_invalid_sheet_names_line_and_column(tmp_path, rows, header, line, column, words):
    path = _sheet(tmp_path, rows, header)
    with pytest.raises(SampleSheetError) as caught:
        read_sample_sheet(path)
    error = caught.value
    assert error.row == line
    assert error.column == column
    assert words in str(error)
    assert str(path) in str(error)


def test_unknown_panel_is_refused(tmp_path):
    path = _sheet(tmp_path, ["s1\tP1\t0\tflow\tdata/a.fcs\t"],
                  HEADER.rstrip("\n") + "\tpanel\n")
    path.write_text(path.read_text().replace("data/a.fcs\t\n", "data/a.fcs\t\tlyoplate\n"))
    with pytest.raises(SampleSheetError, match="panel 'lyoplate' is not defined"):
        read_sample_sheet(path, panels=["default"])


def test_check_samples_command_exits_non_zero(tmp_path, capsys):
    path = _sheet(tmp_path, ["s1\tP1\t0\tflow\tdata/a.fcs\t", "s1\tP1\t7\tflow\tdata/b.fcs\t"])
    assert main(["check-samples", "--samples", str(path)]) == 1
    message = capsys.readouterr().err
    assert "line 3" in message and "sample_id" in message and "duplicate" in message
