"""Sample-sheet validation: each problem is named by sheet, line and column."""

from __future__ import annotations

import math

import pytest

from bcellmap.cli import main
from bcellmap.errors import SampleSheetError
from bcellmap.io.samplesheet import read_sample_sheet

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


def test_comma_separated_sheet_is_recognised(tmp_path):
    path = _sheet(tmp_path, ["s1,P1,0,flow,data/a.fcs,"], header=HEADER.replace("\t", ","))
    with pytest.raises(SampleSheetError, match="comma-separated") as caught:
        read_sample_sheet(path)
    assert "required column" not in str(caught.value)


def test_every_sheet_error_is_listed_at_once(tmp_path):
    (tmp_path / "data" / "folder").mkdir(parents=True)
    (tmp_path / "data" / "events.csv").write_text("FSC-A,SSC-A\n1,2\n")
    path = _sheet(tmp_path, ["s1\tP1\tx\tflow\tdata/a.fcs\t",
                             "s2\tP1\t7\tcytof\tdata/b.fcs\t-1",
                             "s3\tP1\t14\tflow\tdata/folder\t",
                             "s4\tP1\t21\tflow\tdata/events.csv\t",
                             "s4\tP1\t28\tflow\tdata/c.fcs\t"])
    with pytest.raises(SampleSheetError) as caught:
        read_sample_sheet(path)
    message = str(caught.value)
    for words in ("line 2, column 'day'", "line 3, column 'modality'",
                  "line 3, column 'lymphocytes_per_ul'", "line 4, column 'path'",
                  "is a directory", "line 5, column 'path'", "not an FCS file",
                  "line 6, column 'sample_id'"):
        assert words in message, words
    assert len(caught.value.errors) == 6
    assert caught.value.row == 2  # the first problem, as a single error would give


def test_scrna_folder_is_not_refused_as_a_path(tmp_path):
    (tmp_path / "data" / "mtx").mkdir(parents=True)
    path = _sheet(tmp_path, ["s1\tP1\t0\tscrna\tdata/mtx\t"])
    assert read_sample_sheet(path).loc["s1", "modality"] == "scrna"


def test_lymphodepletion_day_is_an_optional_integer(tmp_path):
    header = HEADER.rstrip("\n") + "\tlymphodepletion_day\n"
    path = _sheet(tmp_path, ["s1\tP1\t0\tflow\tdata/a.fcs\t\t-5",
                             "s2\tP1\t30\tflow\tdata/b.fcs\t\t"], header=header)
    sheet = read_sample_sheet(path)
    assert sheet.loc["s1", "lymphodepletion_day"] == -5
    assert sheet["lymphodepletion_day"].isna().tolist() == [False, True]
    path.write_text(header + "s1\tP1\t0\tflow\tdata/a.fcs\t\tday -5\n")
    with pytest.raises(SampleSheetError, match="lymphodepletion_day 'day -5' is not an integer"):
        read_sample_sheet(path)
    plain = _sheet(tmp_path, ["s1\tP1\t0\tflow\tdata/a.fcs\t"])
    assert read_sample_sheet(plain)["lymphodepletion_day"].isna().all()
