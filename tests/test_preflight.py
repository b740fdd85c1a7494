"""Preflight (`bcellmap check-samples --deep`) on the real files in ../shared/data/realfcs."""

from __future__ import annotations

import pytest

from bcellmap.cli import main
from bcellmap.config import load_config, merge
from bcellmap.preflight import run_preflight

pytestmark = pytest.mark.realfcs

HEADER = "sample_id\tpatient_id\tday\tmodality\tpath\tpanel\n"


def _sheet(tmp_path, rows):
    path = tmp_path / "samples.tsv"
    path.write_text(HEADER + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    return path


def _errors(report, sample_id=None):
    if sample_id is None:
        return [f.text for f in report.cohort if f.level == "error"]
    sample = next(s for s in report.samples if s.sample_id == sample_id)
    return [f.text for f in sample.findings if f.level == "error"]


def test_flowsom_export_is_double_processing_under_the_default_panel(realfcs_dir, tmp_path):
    path = _sheet(tmp_path, [("ff", "P1", 0, "flow", realfcs_dir / "flowsom_ff.fcs", "")])
    report = run_preflight(path, load_config(), check_gpu=False)
    errors = " ".join(_errors(report, "ff"))
    assert "already transformed" in errors and "already compensated" in errors
    assert "transform: {method: none}" in errors
    sample = report.samples[0]
    assert "CD3" in sample.markers_found and "CD20" in sample.markers_missing
    assert "valid" in sample.compensation
    # A panel that says the file is processed already: no double-processing error.
    config = merge(load_config(), {"panels": {"ff": {"compensation": {"source": "none"},
                                                     "transform": {"method": "none"}}},
                                   "ingest": {"required_markers": []}})
    ok = _sheet(tmp_path, [("ff", "P1", 0, "flow", realfcs_dir / "flowsom_ff.fcs", "ff")])
    assert run_preflight(ok, config, check_gpu=False).ok


def test_cytof_mixed_with_fluorescence_is_reported(realfcs_dir, tmp_path):
    path = _sheet(tmp_path, [
        ("a", "P1", 0, "flow", realfcs_dir / "flowkit_100715.fcs", ""),
        ("b", "P1", 30, "flow", realfcs_dir / "flowkit_test_comp_example.fcs", ""),
        ("c", "P2", 0, "flow", realfcs_dir / "tidytof_ddpr_Healthy1_Basal.fcs", ""),
    ])
    config = merge(load_config(), {"ingest": {"required_markers": []}})
    report = run_preflight(path, config, check_gpu=False)
    cohort = " ".join(_errors(report))
    assert "mixes mass cytometry (c)" in cohort and "fluorescence flow (a, b)" in cohort
    assert report.samples[2].mass_cytometry and "cofactor 5" in report.samples[2].transform
    assert not _errors(report, "a") and not _errors(report, "b")


def test_every_problem_of_every_line_is_listed_at_once(realfcs_dir, tmp_path, capsys):
    folder = tmp_path / "folder"
    folder.mkdir()
    table = tmp_path / "events.csv"
    table.write_text("FSC-A,SSC-A\n1,2\n")
    path = _sheet(tmp_path, [
        ("dir", "P1", 0, "flow", folder, ""),
        ("csv", "P1", 7, "flow", table, ""),
        ("ff", "P1", 14, "flow", realfcs_dir / "flowsom_ff.fcs", ""),
        ("bad", "P1", "x", "flow", realfcs_dir / "flowai_bcells_3.fcs", ""),
    ])
    report = run_preflight(path, load_config(), check_gpu=False)
    cohort = " ".join(_errors(report))
    assert "line 2" in cohort and "is a directory" in cohort
    assert "line 3" in cohort and "not an FCS file" in cohort
    assert "line 5" in cohort and "not an integer" in cohort
    # The files are inspected even though the sheet has errors.
    assert any("already transformed" in e for e in _errors(report, "ff"))
    assert any("spillover matrix cannot be right" in e for e in _errors(report, "bad"))
    assert main(["check-samples", "--deep", "--samples", str(path)]) == 1
    out = capsys.readouterr().out
    assert "is a directory" in out and "already transformed" in out and "error(s)" in out


def test_check_samples_deep_ok_exits_0(realfcs_dir, tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("device: cpu\n")
    path = _sheet(tmp_path, [("a", "P1", 0, "flow", realfcs_dir / "flowkit_100715.fcs", "")])
    assert main(["check-samples", "--deep", "--config", str(config),
                 "--samples", str(path)]) == 0
    out = capsys.readouterr().out
    assert "markers found: CD3, CD19" in out and "0 error(s)" in out


def test_gpu_requested_without_gpu_is_an_error(realfcs_dir, tmp_path, monkeypatch):
    from bcellmap.kernels import backend

    monkeypatch.delenv("BCELLMAP_DEVICE", raising=False)
    monkeypatch.setattr(backend, "gpu_status", lambda: (False, "no device (test)"))
    path = _sheet(tmp_path, [("a", "P1", 0, "flow", realfcs_dir / "flowkit_100715.fcs", "")])
    report = run_preflight(path, merge(load_config(), {"device": "gpu"}))
    assert any("no GPU is usable" in e for e in _errors(report))
